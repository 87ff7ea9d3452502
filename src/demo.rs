//! `ringblk demo`: the main job on an embedded default, no flags and no VM needed.
//!
//! It creates a scratch raw image, serves it from an in-process daemon (main context plus one
//! iothread, exactly what `ringblk --blockdev ... --export ...` runs) and drives the export with
//! ringblk-bench, the vhost-user-blk frontend, running an embedded fio profile: a 70/30 random
//! mix with generation-stamped verify, so every acknowledged write is read back at the end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ringblk_bench::{Job, RunOptions, run_job};
use ringblk_ring::Context;
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
runtime=5
time_based=1
verify=crc32c
";

const IMAGE_BYTES: u64 = 256 << 20;

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
    let socket = dir.join(format!("ringblk-demo-{}.sock", std::process::id()));
    let result = demo(&image, &socket);
    let _ = std::fs::remove_file(&image);
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

fn demo(image: &Path, socket: &Path) -> Result<bool, String> {
    std::fs::File::create(image)
        .and_then(|f| f.set_len(IMAGE_BYTES))
        .map_err(|e| format!("cannot create the scratch image {}: {e}", image.display()))?;
    println!(
        "ringblk demo: serving a {} MiB scratch image {} over vhost-user-blk at {}",
        IMAGE_BYTES >> 20,
        image.display(),
        socket.display()
    );

    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let image_path = image.to_owned();
    let socket_path = socket.to_owned();
    let daemon_thread = std::thread::spawn(move || -> Result<(), String> {
        let ctx = Context::new(256).map_err(|e| format!("io_uring: {e}"))?;
        let mut daemon = Daemon::new();
        let started = start_daemon(&mut daemon, &image_path, &socket_path);
        let ok = started.is_ok();
        let _ = ready_tx.send(started.map(|()| ctx.remote()));
        if ok {
            ctx.run();
        }
        daemon.shutdown();
        ctx.shutdown();
        Ok(())
    });
    let main = ready_rx
        .recv()
        .map_err(|_| "the daemon thread died".to_owned())??;

    let job = Job::parse(PROFILE).map_err(|e| e.to_string())?;
    println!("running the embedded profile through ringblk-bench:\n{PROFILE}");
    let report = run_job(socket, &job, &RunOptions::default());
    main.stop();
    daemon_thread
        .join()
        .map_err(|_| "the daemon thread panicked".to_owned())??;
    let report = report.map_err(|e| e.to_string())?;
    println!("{report}");
    let lost = report.verify.as_ref().map_or(0, |v| v.bad_blocks);
    println!(
        "summary: {:.0} IOPS, {:.1} MB/s, p50 {:.1} us; lost or stale writes: {lost}",
        report.total.iops, report.total.mb_per_s, report.total.lat_us.p50
    );
    Ok(report.passed())
}

fn start_daemon(daemon: &mut Daemon, image: &Path, socket: &Path) -> Result<(), String> {
    let blockdev = json!({"driver": "file", "node-name": "disk", "filename": image});
    let iothread = json!({"qom-type": "iothread", "id": "io0"});
    let export = json!({
        "type": "vhost-user-blk", "id": "demo", "node-name": "disk", "writable": true, "iothread": "io0",
        "addr": {"type": "unix", "path": socket},
    });
    let err = |e: &dyn std::fmt::Display| e.to_string();
    daemon
        .add_blockdev(&BlockdevOptions::from_value(&blockdev, Form::Json).map_err(|e| err(&e))?)
        .map_err(|e| err(&e))?;
    daemon
        .add_object(&ObjectOptions::from_value(&iothread, Form::Json).map_err(|e| err(&e))?)
        .map_err(|e| err(&e))?;
    daemon
        .add_export(&ExportOptions::from_value(&export, Form::Json).map_err(|e| err(&e))?)
        .map_err(|e| err(&e))
}
