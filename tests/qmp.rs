//! Runs the QMP tests of `tests/qmp/` (the real `qemu.qmp` client and raw sockets against the
//! ringblk binary, and against qemu-storage-daemon where it is installed): `test_qmp.py` for the
//! protocol and the node and export commands, `test_jobs.py` for blockdev-mirror and the job
//! commands, `test_resize_guest.py` for a block_resize a real guest sees. Without python3 or
//! `qemu.qmp` each test prints one `SKIP:` line saying what is missing.

use std::path::Path;
use std::process::Command;

/// Runs `tests/qmp/<script>` with `-v` against this build's ringblk; fails with its report.
fn run_python_suite(script: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
    {
        Err(e) => {
            println!("SKIP: python3 cannot be run ({e}); the QMP tests need it");
            return;
        }
        Ok(probe) if !probe.status.success() => {
            println!("SKIP: the Python package qemu.qmp is missing (pip install qemu.qmp)");
            return;
        }
        Ok(_) => {}
    }
    let output = Command::new("python3")
        .arg(root.join("tests/qmp").join(script))
        .arg("-v")
        .env("RINGBLK", env!("CARGO_BIN_EXE_ringblk"))
        .current_dir(root)
        .output()
        .expect("python3 runs");
    let report = String::from_utf8_lossy(&output.stderr);
    println!("{report}");
    assert!(output.status.success(), "{script} failed:\n{report}");
}

/// Needs QEMU and the built guest (tests/guest/build.sh); skips with a SKIP line without them.
#[test]
fn a_guest_sees_block_resize() {
    run_python_suite("test_resize_guest.py");
}

#[test]
fn qmp_python_suite_passes() {
    run_python_suite("test_qmp.py");
}

/// ringblk-bench (for the write-load test) is looked for next to the ringblk binary; without
/// it that one test is skipped (`cargo build -p ringblk-bench` first to run it).
#[test]
fn qmp_block_job_suite_passes() {
    run_python_suite("test_jobs.py");
}
