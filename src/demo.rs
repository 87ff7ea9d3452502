//! `ringblk demo`: the main job on an embedded default, no flags and no VM needed.
//!
//! It creates two scratch raw images, serves the first from an in-process daemon (main context
//! plus one iothread, exactly what `ringblk --blockdev ... --export ...` runs) and drives the
//! export with ringblk-bench, the vhost-user-blk frontend, running an embedded fio profile: a
//! 70/30 random mix with generation-stamped verify. In the middle of the run a live mirror
//! copies the disk to the second image and pivots the export to it while the writes go on; the
//! verify at the end reads every acknowledged write back through the export, from the new disk.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ringblk_bench::{Job, RunOptions, run_job};
use ringblk_mirror::{JobEvent, Mirror, MirrorOptions};
use ringblk_ring::{Context, Remote};
use serde_json::json;

use crate::daemon::Daemon;
use crate::options::{BlockdevOptions, ExportOptions, Form, ObjectOptions};

/// The embedded profile (fio syntax; `fio-profiles/` has the same kind of files).
const PROFILE: &str = "\
[demo-randrw-verify]
rw=randrw
rwmixread=70
bs=4k
iodepth=32
size=128m
runtime=6
time_based=1
verify=crc32c
";

const IMAGE_BYTES: u64 = 256 << 20;

/// When the mirror starts, into the load run.
const MIRROR_AFTER: Duration = Duration::from_millis(1500);

thread_local! {
    /// The demo's daemon, on its main context's thread (reached through `Remote::call`).
    static DAEMON: RefCell<Option<Daemon>> = const { RefCell::new(None) };
}

/// Runs the demo; `args` are the arguments after `demo` (none are accepted yet).
pub fn run(args: &[std::ffi::OsString]) -> ExitCode {
    if let Some(arg) = args.first() {
        eprintln!(
            "ringblk: demo: unexpected argument '{}' (the demo takes no arguments)",
            arg.to_string_lossy()
        );
        return ExitCode::FAILURE;
    }
    let dir = scratch_dir();
    let image = dir.join(format!("ringblk-demo-{}.img", std::process::id()));
    let target = dir.join(format!("ringblk-demo-{}-target.img", std::process::id()));
    let socket = dir.join(format!("ringblk-demo-{}.sock", std::process::id()));
    let result = demo(&image, &target, &socket);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&target);
    match result {
        Ok(passed) if passed => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ringblk: demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// /dev/shm when there is one (the image then lives in memory), else the temp directory.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

fn demo(image: &Path, target: &Path, socket: &Path) -> Result<bool, String> {
    for path in [image, target] {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(IMAGE_BYTES))
            .map_err(|e| format!("cannot create the scratch image {}: {e}", path.display()))?;
    }
    println!(
        "ringblk demo: serving a {} MiB scratch image {} over vhost-user-blk at {}",
        IMAGE_BYTES >> 20,
        image.display(),
        socket.display()
    );
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (image_path, target_path, socket_path) =
        (image.to_owned(), target.to_owned(), socket.to_owned());
    let daemon_thread = std::thread::spawn(move || -> Result<(), String> {
        let ctx = Context::new(256).map_err(|e| format!("io_uring: {e}"))?;
        let mut daemon = Daemon::new();
        let started = start_daemon(&mut daemon, &image_path, &target_path, &socket_path);
        let ok = started.is_ok();
        DAEMON.with(|d| *d.borrow_mut() = Some(daemon));
        let _ = ready_tx.send(started.map(|()| ctx.remote()));
        if ok {
            ctx.run();
        }
        if let Some(daemon) = DAEMON.with(|d| d.borrow_mut().take()) {
            daemon.shutdown();
        }
        ctx.shutdown();
        Ok(())
    });
    let main = ready_rx
        .recv()
        .map_err(|_| "the daemon thread died".to_owned())??;

    let job = Job::parse(PROFILE).map_err(|e| e.to_string())?;
    println!(
        "running the embedded profile through ringblk-bench, with a live mirror after {MIRROR_AFTER:?}:\n{PROFILE}"
    );
    let load_socket = socket.to_owned();
    let load = std::thread::spawn(move || run_job(&load_socket, &job, &RunOptions::default()));
    std::thread::sleep(MIRROR_AFTER);
    let mirror = mirror_and_pivot(&main);
    let report = load
        .join()
        .map_err(|_| "the load generator panicked".to_owned())?;
    main.stop();
    daemon_thread
        .join()
        .map_err(|_| "the daemon thread panicked".to_owned())??;
    let report = report.map_err(|e| e.to_string())?;
    let mirror = mirror?;
    println!("{report}");
    let lost = report.verify.as_ref().map_or(0, |v| v.bad_blocks);
    println!(
        "summary: {:.0} IOPS, {:.1} MB/s, p50 {:.1} us, worst {:.1} ms; mirror: {} MiB copied at {:.0} MB/s, \
         READY after {:.0} ms, pivot {:.2} ms, export now on '{}'; lost or stale writes: {lost}",
        report.total.iops,
        report.total.mb_per_s,
        report.total.lat_us.p50,
        report.total.lat_us.max / 1000.0,
        IMAGE_BYTES >> 20,
        IMAGE_BYTES as f64 / mirror.ready.as_secs_f64() / 1e6,
        mirror.ready.as_secs_f64() * 1000.0,
        mirror.pivot.as_secs_f64() * 1000.0,
        mirror.export_node,
    );
    Ok(report.passed() && mirror.export_node == "target")
}

/// What the live mirror measured.
struct MirrorRun {
    ready: Duration,
    pivot: Duration,
    export_node: String,
}

/// Starts a mirror of "disk" to "target" on the daemon's main context, completes it at READY and
/// waits for the pivot, timing both as QMP would (command sent to event received).
fn mirror_and_pivot(main: &Remote) -> Result<MirrorRun, String> {
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<JobEvent>();
    let wait = |want: fn(&JobEvent) -> bool| -> Result<JobEvent, String> {
        loop {
            let event = events_rx
                .recv_timeout(Duration::from_secs(60))
                .map_err(|_| "the mirror stalled".to_owned())?;
            if let JobEvent::Completed { error: Some(e), .. } = &event {
                return Err(format!("the mirror failed: {e}"));
            }
            if want(&event) {
                return Ok(event);
            }
        }
    };
    let started = Instant::now();
    let created = main
        .call(move || {
            DAEMON.with(|d| -> Result<(), String> {
                let mut guard = d.borrow_mut();
                let daemon = guard.as_mut().ok_or("no daemon")?;
                let (source, target) = (
                    daemon.node("disk").map_err(|e| e.to_string())?.clone(),
                    daemon.node("target").map_err(|e| e.to_string())?.clone(),
                );
                let sink = Box::new(move |e: JobEvent| {
                    let _ = events_tx.send(e);
                });
                let options = MirrorOptions {
                    target_is_zero: true,
                    ..MirrorOptions::new("demo-mirror")
                };
                let mirror = Mirror::create(&source, &target, options, Some(sink))
                    .map_err(|e| e.to_string())?;
                mirror.start().map_err(|e| e.to_string())?;
                daemon.add_job(mirror);
                Ok(())
            })
        })
        .ok_or("the daemon stopped")?;
    created?;
    wait(|e| matches!(e, JobEvent::Ready(_)))?;
    let ready = started.elapsed();
    let complete_sent = Instant::now();
    let completed = main
        .call(|| {
            DAEMON.with(|d| {
                d.borrow()
                    .as_ref()
                    .map(|daemon| daemon.job("demo-mirror").map(Mirror::complete))
            })
        })
        .ok_or("the daemon stopped")?;
    match completed {
        Some(Ok(Ok(()))) => {}
        Some(Ok(Err(e))) => return Err(e.to_string()),
        _ => return Err("the mirror job vanished".to_owned()),
    }
    wait(|e| matches!(e, JobEvent::Completed { .. }))?;
    let pivot = complete_sent.elapsed();
    let export_node = main
        .call(|| {
            DAEMON.with(|d| {
                d.borrow()
                    .as_ref()
                    .and_then(|daemon| daemon.export_node("demo"))
                    .unwrap_or_default()
            })
        })
        .ok_or("the daemon stopped")?;
    Ok(MirrorRun {
        ready,
        pivot,
        export_node,
    })
}

fn start_daemon(
    daemon: &mut Daemon,
    image: &Path,
    target: &Path,
    socket: &Path,
) -> Result<(), String> {
    let blockdev = json!({"driver": "file", "node-name": "disk", "filename": image});
    let target = json!({"driver": "file", "node-name": "target", "filename": target});
    let iothread = json!({"qom-type": "iothread", "id": "io0"});
    let export = json!({
        "type": "vhost-user-blk", "id": "demo", "node-name": "disk", "writable": true, "iothread": "io0",
        "addr": {"type": "unix", "path": socket},
    });
    let err = |e: &dyn std::fmt::Display| e.to_string();
    for node in [blockdev, target] {
        let options = BlockdevOptions::from_value(&node, Form::Json).map_err(|e| err(&e))?;
        daemon.add_blockdev(&options).map_err(|e| err(&e))?;
    }
    let options = ObjectOptions::from_value(&iothread, Form::Json).map_err(|e| err(&e))?;
    daemon.add_object(&options).map_err(|e| err(&e))?;
    let options = ExportOptions::from_value(&export, Form::Json).map_err(|e| err(&e))?;
    daemon.add_export(&options).map_err(|e| err(&e))
}
