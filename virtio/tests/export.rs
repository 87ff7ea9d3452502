//! End to end: the vhost-user-blk export served on real ring contexts, driven by a real
//! vhost-user frontend (ringblk-bench) over a unix socket with memfd guest memory.

mod common;

use common::{Daemon, file_node, image, job, null_node};
use ringblk_bench::{RunOptions, run_job};

#[test]
fn randread_on_null_completes_every_request() {
    let daemon = Daemon::start(null_node, 1, 1, true);
    let report = run_job(
        &daemon.socket,
        &job("[j]\nrw=randread\nbs=4k\niodepth=32\nsize=16m\n"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.read.bytes, 16 << 20);
}

#[test]
fn verify_of_random_writes_to_a_file_passes() {
    let img = image(32 << 20);
    let daemon = Daemon::start(file_node(img.path()), 1, 1, true);
    let report = run_job(
        &daemon.socket,
        &job("[j]\nrw=randwrite\nbs=4k\niodepth=16\nsize=8m\nverify=crc32c\n"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(report.passed(), "{report}");
    assert_eq!(report.verify.as_ref().map(|v| v.bad_blocks), Some(0));
}

#[test]
fn queues_are_spread_over_iothreads_and_all_serve() {
    let img = image(32 << 20);
    let daemon = Daemon::start(file_node(img.path()), 2, 2, true);
    let report = run_job(
        &daemon.socket,
        &job("[j]\nrw=randrw\nbs=4k\niodepth=8\nsize=8m\nnumjobs=2\nverify=crc32c\n"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(report.passed(), "{report}");
}

#[test]
fn queues_on_the_main_context_serve_too() {
    let daemon = Daemon::start(null_node, 0, 1, true);
    let report = run_job(
        &daemon.socket,
        &job("[j]\nrw=read\nbs=128k\niodepth=4\nsize=8m\n"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(report.passed(), "{report}");
}

#[test]
fn export_accepts_the_next_frontend_after_a_disconnect() {
    let img = image(16 << 20);
    let daemon = Daemon::start(file_node(img.path()), 1, 1, true);
    for _ in 0..3 {
        let report = run_job(
            &daemon.socket,
            &job("[j]\nrw=randwrite\nbs=4k\niodepth=4\nsize=2m\nverify=crc32c\n"),
            &RunOptions::default(),
        )
        .unwrap();
        assert!(report.passed(), "{report}");
    }
}

#[test]
fn read_only_export_offers_ro_and_serves_reads() {
    let daemon = Daemon::start(null_node, 1, 1, false);
    let reads = run_job(
        &daemon.socket,
        &job("[j]\nrw=read\nbs=4k\niodepth=4\nsize=1m\n"),
        &RunOptions::default(),
    )
    .unwrap();
    assert!(reads.passed(), "{reads}");
    let writes = run_job(
        &daemon.socket,
        &job("[j]\nrw=write\nbs=4k\niodepth=4\nsize=1m\n"),
        &RunOptions::default(),
    );
    // The device offers VIRTIO_BLK_F_RO, so a well-behaved frontend does not even try (a write
    // that comes anyway gets IOERR: virtio's request-parsing tests cover that path).
    let refusal = writes.expect_err("a write job against a read-only device must not run");
    assert!(refusal.to_string().contains("read-only"), "{refusal}");
}
