//! End to end: the vhost-user-blk export served on real ring contexts, driven by a real
//! vhost-user frontend (ringblk-bench) over a unix socket with memfd guest memory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringblk_bench::{Job, RunOptions, run_job};
use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::{BackendHandle, Node};
use ringblk_ring::{Context, IoThread, Remote};
use ringblk_virtio::{Export, ExportConfig};

/// The iothreads poll like production ones (QSD's default poll-max-ns), so the queues run in
/// polling mode with the guest's kicks suppressed, then fall back to kicks before sleeping.
const POLL_MAX: Duration = Duration::from_nanos(32768);

/// A daemon in miniature: a main context serving one export, queues on `iothreads` threads
/// (or on the main context when 0). Stopped and joined on drop.
struct Daemon {
    main: Remote,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(
        node: impl FnOnce() -> Node + Send + 'static,
        iothreads: usize,
        num_queues: u16,
        writable: bool,
    ) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost.sock");
        let path = socket.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ctx = Context::new(256).unwrap();
            let threads: Vec<IoThread> = (0..iothreads)
                .map(|i| IoThread::spawn(&format!("iot{i}"), POLL_MAX).unwrap())
                .collect();
            let rings = if threads.is_empty() {
                vec![ctx.remote()]
            } else {
                threads.iter().map(|t| t.remote().clone()).collect()
            };
            let handle = BackendHandle::new(&node());
            let config = ExportConfig {
                id: "e0".into(),
                path: path.clone(),
                writable,
                num_queues,
                logical_block_size: 512,
            };
            let export = Export::start(&config, handle, rings).unwrap();
            tx.send(ctx.remote()).unwrap();
            ctx.run();
            export.stop(&path);
            drop(threads);
            ctx.shutdown();
        });
        let main = rx.recv().unwrap();
        Daemon {
            main,
            thread: Some(thread),
            socket,
            _dir: dir,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.main.stop();
        if let Some(t) = self.thread.take() {
            t.join().expect("daemon thread panicked");
        }
    }
}

fn null_node() -> Node {
    Node::new(
        "null",
        NullCo::new(NullOptions {
            size: 64 << 20,
            read_zeroes: true,
            ..NullOptions::default()
        }),
    )
}

fn file_node(path: &Path) -> impl FnOnce() -> Node + Send + 'static {
    let path = path.to_owned();
    move || {
        let options = FileOptions {
            filename: path,
            read_only: false,
            direct: false,
        };
        Node::new("file", FileNode::open(&options).unwrap())
    }
}

fn image(len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
    f.as_file().set_len(len).unwrap();
    f
}

fn job(text: &str) -> Job {
    Job::parse(text).unwrap()
}

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
