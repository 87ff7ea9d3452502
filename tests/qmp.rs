//! Runs the QMP tests of `tests/qmp/test_qmp.py` (the real `qemu.qmp` client and raw sockets
//! against the ringblk binary, and against qemu-storage-daemon where it is installed).
//! Without python3 or `qemu.qmp` the test prints one `SKIP:` line saying what is missing.

use std::path::Path;
use std::process::Command;

#[test]
fn qmp_python_suite_passes() {
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
        .arg(root.join("tests/qmp/test_qmp.py"))
        .arg("-v")
        .env("RINGBLK", env!("CARGO_BIN_EXE_ringblk"))
        .current_dir(root)
        .output()
        .expect("python3 runs");
    let report = String::from_utf8_lossy(&output.stderr);
    println!("{report}");
    assert!(output.status.success(), "QMP tests failed:\n{report}");
}
