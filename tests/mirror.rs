//! The mirror end to end: a real Linux guest writes with fio verify while `blockdev-mirror`
//! copies its disk and `job-complete` pivots, all driven over QMP by the real qemu.qmp client
//! (tests/mirror/mirror_guest.py). Skips with one SKIP line when QEMU, the guest build tools or
//! qemu.qmp are missing.

mod support;

use std::process::Command;

use support::*;

#[test]
fn guest_writes_survive_a_mirror_and_pivot_driven_over_qmp() {
    for tool in ["qemu-system-x86_64", "fio", "busybox", "python3"] {
        if !have(tool) {
            return skip(&format!(
                "mirror-in-guest test: {tool} not installed (run .ci/install-deps)"
            ));
        }
    }
    let built = Command::new("bash")
        .arg(repo().join("tests/guest/build.sh"))
        .status()
        .expect("bash runs");
    assert!(built.success(), "tests/guest/build.sh failed");
    let out = Command::new("python3")
        .arg(repo().join("tests/mirror/mirror_guest.py"))
        .args(["--daemon", env!("CARGO_BIN_EXE_ringblk"), "--runs", "2"])
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    if out.status.code() == Some(77) {
        return skip(text.trim());
    }
    assert!(
        out.status.success(),
        "mirror under guest writes failed:\n{text}"
    );
    assert_eq!(text.matches("OK: run").count(), 2, "{text}");
}
