//! End-to-end tests against a real qemu-storage-daemon (no mocks). Each test starts its own
//! daemon on its own socket; without qemu-storage-daemon they print a SKIP line and return.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ringblk_bench::{
    BadReason, Error, Job, JobFile, RunOptions, Session, WaitMode, run_job, run_jobs,
};

const QSD: &str = "qemu-storage-daemon";

fn qsd_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(QSD))
        .find(|p| p.is_file())
}

macro_rules! require_qsd {
    () => {
        match qsd_path() {
            Some(p) => p,
            None => {
                println!("SKIP: qemu-storage-daemon not found in PATH");
                return;
            }
        }
    };
}

/// A scratch directory (removed on drop), on /dev/shm when there is one.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "ringblk-bench-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn image(&self, len: u64) -> PathBuf {
        let p = self.0.join("disk.img");
        File::create(&p).unwrap().set_len(len).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A qemu-storage-daemon exporting one block node as vhost-user-blk.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Qsd {
    fn start(qsd: &Path, dir: &Scratch, blockdev: &str, node: &str, extra: &str) -> Qsd {
        let socket = dir.0.join("vhost.sock");
        let export = format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on{extra}",
            socket.display()
        );
        let mut child = Command::new(qsd)
            .args(["--blockdev", blockdev, "--export", &export])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let t0 = Instant::now();
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("qemu-storage-daemon exited early: {status}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no socket after 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Qsd { child, socket }
    }

    fn null(qsd: &Path, dir: &Scratch, size: u64, extra: &str) -> Qsd {
        Qsd::start(
            qsd,
            dir,
            &format!("driver=null-co,node-name=n,size={size}"),
            "n",
            extra,
        )
    }

    fn file(qsd: &Path, dir: &Scratch, image: &Path) -> Qsd {
        Qsd::file_with(qsd, dir, image, "")
    }

    fn file_with(qsd: &Path, dir: &Scratch, image: &Path, extra: &str) -> Qsd {
        Qsd::start(
            qsd,
            dir,
            &format!("driver=file,node-name=f,filename={}", image.display()),
            "f",
            extra,
        )
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        progress: false,
        ..RunOptions::default()
    }
}

#[test]
fn short_randread_job_completes_with_every_byte() {
    let qsd = require_qsd!();
    let dir = Scratch::new("randread");
    let d = Qsd::null(&qsd, &dir, 64 << 20, "");
    let job = Job::parse("[r]\nrw=randread\nbs=4k\niodepth=8\nsize=4m\n").unwrap();
    let opts = RunOptions {
        backend_pid: Some(d.pid()),
        ..quiet()
    };
    let r = run_job(&d.socket, &job, &opts).unwrap();
    assert_eq!(r.read.ios, 1024);
    assert_eq!(r.read.bytes, 4 << 20);
    assert_eq!(r.write.ios, 0);
    assert!(r.read.iops > 0.0 && r.total.iops > 0.0);
    assert!(r.read.lat_us.p50 > 0.0 && r.read.lat_us.max >= r.read.lat_us.p99);
    assert_eq!(r.io_errors, 0);
    assert!(r.cpu.backend_us_per_io.is_some());
    assert_eq!(r.device.capacity_bytes, 64 << 20);
    assert!(r.verify.is_none());
}

#[test]
fn event_wait_mode_completes_time_based_mixed_job() {
    let qsd = require_qsd!();
    let dir = Scratch::new("event");
    let d = Qsd::null(&qsd, &dir, 64 << 20, "");
    let job =
        Job::parse("[m]\nrw=randrw\nrwmixread=70\nbs=4k\niodepth=4\nruntime=300ms\ntime_based\n")
            .unwrap();
    let opts = RunOptions {
        wait_mode: WaitMode::Event,
        ..quiet()
    };
    let r = run_job(&d.socket, &job, &opts).unwrap();
    assert!(r.read.ios > 0 && r.write.ios > 0, "{r}");
    assert!(r.elapsed_s >= 0.3 && r.elapsed_s < 5.0, "{}", r.elapsed_s);
    assert!(r.passed());
}

#[test]
fn two_jobs_run_on_two_queues() {
    let qsd = require_qsd!();
    let dir = Scratch::new("mq");
    let d = Qsd::null(&qsd, &dir, 64 << 20, ",num-queues=2");
    let file = JobFile::parse(
        "[global]\nbs=4k\niodepth=4\nsize=1m\n[a]\nrw=randread\n[b]\nrw=write\noffset=1m\n",
    )
    .unwrap();
    let r = run_jobs(&d.socket, &file.jobs, &quiet()).unwrap();
    assert_eq!((r.read.ios, r.write.ios), (256, 256));
    assert_eq!(r.device.num_queues, 2);
    // Three threads do not fit two queues.
    let too_many = JobFile::parse("[a]\nnumjobs=3\nsize=1m\n").unwrap();
    match run_jobs(&d.socket, &too_many.jobs, &quiet()) {
        Err(Error::Job(m)) => assert!(m.contains("queues"), "{m}"),
        other => panic!(
            "expected a job error, got {:?}",
            other.map(|r| r.to_string())
        ),
    }
}

#[test]
fn verify_job_against_a_file_passes() {
    let qsd = require_qsd!();
    let dir = Scratch::new("verify");
    let image = dir.image(32 << 20);
    let d = Qsd::file(&qsd, &dir, &image);
    // Random writes and reads over 8 MiB, three passes, then the final pass.
    let job = Job::parse(
        "[v]\nrw=randrw\nbs=4k\niodepth=16\nsize=8m\noffset=4m\nloops=3\nverify=crc32c\n",
    )
    .unwrap();
    let r = run_job(&d.socket, &job, &quiet()).unwrap();
    let v = r.verify.as_ref().expect("verify report");
    assert_eq!(v.bad_blocks, 0, "{r}");
    assert!(v.blocks_checked >= 1024, "{r}");
    assert!(r.passed());
    assert_eq!(r.read.ios + r.write.ios, 3 * 2048);
}

#[test]
fn verify_with_two_threads_splits_the_region_between_two_queues() {
    let qsd = require_qsd!();
    let dir = Scratch::new("verify2");
    let image = dir.image(16 << 20);
    let d = Qsd::file_with(&qsd, &dir, &image, ",num-queues=2");
    let job =
        Job::parse("[v]\nrw=randwrite\nbs=4k\niodepth=8\nnumjobs=2\nsize=4m\nverify=1\n").unwrap();
    let r = run_job(&d.socket, &job, &quiet()).unwrap();
    // Each thread writes its own half once; the final pass reads all 1024 blocks.
    assert_eq!(r.write.ios, 1024, "{r}");
    let v = r.verify.as_ref().unwrap();
    assert_eq!((v.blocks_checked, v.bad_blocks), (1024, 0), "{r}");
    // Every block of the region holds its own stamp.
    let img = File::open(&image).unwrap();
    let mut head = [0u8; 16];
    for block in [0u64, 511, 512, 1023] {
        img.read_exact_at(&mut head, block * 4096).unwrap();
        assert_eq!(&head[..8], b"RBLKVFY1");
        assert_eq!(
            u64::from_le_bytes(head[8..16].try_into().unwrap()),
            block * 4096
        );
    }
}

#[test]
fn verify_catches_a_lost_overwrite() {
    let qsd = require_qsd!();
    let dir = Scratch::new("lost");
    let image = dir.image(4 << 20);
    let d = Qsd::file(&qsd, &dir, &image);
    let job = Job::parse("[w]\nrw=write\nbs=4k\niodepth=4\nsize=1m\nverify=1\n").unwrap();
    let mut session = Session::new(&d.socket, quiet());
    const VICTIM: u64 = 17 * 4096;
    let img = File::options().read(true).write(true).open(&image).unwrap();

    // Generation 1 everywhere; keep the victim block's contents.
    assert!(session.run(std::slice::from_ref(&job)).unwrap().passed());
    let mut gen1 = vec![0u8; 4096];
    img.read_exact_at(&mut gen1, VICTIM).unwrap();
    assert_eq!(&gen1[..8], b"RBLKVFY1");

    // Generation 2 everywhere.
    assert!(session.run(std::slice::from_ref(&job)).unwrap().passed());
    let mut gen2 = vec![0u8; 4096];
    img.read_exact_at(&mut gen2, VICTIM).unwrap();
    assert_ne!(gen1, gen2);
    assert_eq!(session.verify().unwrap().bad_blocks, 0);

    // Behind the generator's back, the overwrite of one block is undone.
    img.write_all_at(&gen1, VICTIM).unwrap();
    let v = session.verify().unwrap();
    assert_eq!(v.blocks_checked, 256);
    assert_eq!(v.bad_blocks, 1, "{v:?}");
    let bad = &v.bad[0];
    assert_eq!(bad.offset, VICTIM);
    assert_eq!(bad.reason, BadReason::StaleGeneration);
    assert_eq!(
        (bad.expected_generation, bad.found_generation),
        (2, Some(1))
    );
}

#[test]
fn verify_during_randrw_catches_a_corrupted_block_and_stops_when_fatal() {
    let qsd = require_qsd!();
    let dir = Scratch::new("fatal");
    let image = dir.image(4 << 20);
    let d = Qsd::file(&qsd, &dir, &image);
    let fill = Job::parse("[w]\nrw=write\nbs=4k\niodepth=4\nsize=64k\nverify=1\n").unwrap();
    let mut session = Session::new(&d.socket, quiet());
    assert!(session.run(std::slice::from_ref(&fill)).unwrap().passed());
    // Zero one block of the 16: reads of it during the mixed run must fail verification.
    let img = File::options().write(true).open(&image).unwrap();
    img.write_all_at(&[0u8; 4096], 5 * 4096).unwrap();
    let mixed = Job::parse(
        "[m]\nrw=randrw\nrwmixread=100\nbs=4k\niodepth=1\nsize=64k\nloops=50\nverify=1\nverify_fatal=1\n",
    )
    .unwrap();
    let r = session.run(std::slice::from_ref(&mixed)).unwrap();
    let v = r.verify.as_ref().unwrap();
    assert_eq!(v.bad_blocks, 1, "{r}");
    assert_eq!(v.bad[0].offset, 5 * 4096);
    assert_eq!(v.bad[0].reason, BadReason::NoStamp);
    assert!(r.read.ios < 16 * 50, "verify_fatal stops the run early");
    assert!(!r.passed());
}

fn bench_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringblk-bench")
}

#[test]
fn cli_names_the_unknown_key_and_its_line() {
    let dir = Scratch::new("cli");
    let job = dir.0.join("bad.fio");
    std::fs::write(&job, "[global]\nbs=4k\n[j]\nrw=read\nwhatever=1\n").unwrap();
    let out = Command::new(bench_bin())
        .args(["run", "--socket", "/nonexistent.sock"])
        .arg(&job)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("whatever"), "{err}");
}

#[test]
fn cli_run_writes_json() {
    let qsd = require_qsd!();
    let dir = Scratch::new("clijson");
    let d = Qsd::null(&qsd, &dir, 64 << 20, "");
    let job = dir.0.join("j.fio");
    std::fs::write(&job, "[j]\nrw=randread\nbs=4k\niodepth=2\nsize=256k\n").unwrap();
    let json = dir.0.join("out.json");
    let out = Command::new(bench_bin())
        .args(["run", "--no-progress", "--set", "iodepth=1", "--socket"])
        .arg(&d.socket)
        .arg("--json")
        .arg(&json)
        .arg(&job)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("IOPS=") && stdout.contains("p99.9="),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["read"]["ios"], 64);
    assert!(v["total"]["lat_us"]["p50"].as_f64().unwrap() > 0.0);
    assert!(v["jobs"][0].as_str().unwrap().contains("iodepth=1"));
}

#[test]
fn compare_self_test_runs_qsd_against_itself() {
    let _qsd = require_qsd!();
    let dir = Scratch::new("compare");
    let job = dir.0.join("p.fio");
    std::fs::write(
        &job,
        "[p]\nrw=randread\nbs=4k\niodepth=8\nruntime=300ms\ntime_based\n",
    )
    .unwrap();
    let json = dir.0.join("cmp.json");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let daemon_cpu = if cpus > 1 { "1" } else { "0" };
    let out = Command::new(bench_bin())
        .args(["compare", "--self-test", "--runs", "2", "--no-progress"])
        .args(["--blockdev", "driver=null-co,node-name=disk0,size=67108864"])
        .args(["--daemon-cpu", daemon_cpu, "--generator-cpu", "0"])
        .arg("--json")
        .arg(&json)
        .arg(&job)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("qsd-a/qsd-b"), "{stdout}");
    // Both wait modes by default, event first, each table saying which it is.
    let event_table = stdout.find("wait mode event").expect("an event-mode table");
    let poll_table = stdout.find("wait mode poll").expect("a poll-mode table");
    assert!(event_table < poll_table, "{stdout}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let modes = v["modes"].as_array().unwrap();
    let names: Vec<&str> = modes
        .iter()
        .map(|m| m["wait_mode"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["event", "poll"]);
    for m in modes {
        let sides: Vec<&str> = m["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["side"].as_str().unwrap())
            .collect();
        assert_eq!(sides, ["qsd-a", "qsd-b", "qsd-a", "qsd-b"]);
        assert!(m["ratio"]["iops"].as_f64().unwrap() > 0.0);
        assert!(m["a"]["median"]["daemon_cpu_us_per_io"].as_f64().unwrap() > 0.0);
    }
}
