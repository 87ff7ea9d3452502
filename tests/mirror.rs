//! The mirror end to end: a real Linux guest writes with fio verify while `blockdev-mirror`
//! copies its disk and `job-complete` pivots, all driven over QMP by the real qemu.qmp client
//! (tests/mirror/mirror_guest.py). The images are where users keep them: files on the disk the
//! tests run from (the work tree: ext4 or xfs) opened with `cache.direct=on` (libvirt's
//! `cache=none`), in both copy modes; plus one run on /dev/shm, and a run whose target runs out
//! of space, where the job must fail and the guest must not. Skips with one SKIP line when
//! QEMU, the guest build tools or qemu.qmp are missing.

mod support;

use std::process::Command;

use support::*;

/// Runs mirror_guest.py once with `args`; returns its output, or None if it skipped.
fn mirror_guest(args: &[&str]) -> Option<String> {
    let out = Command::new("python3")
        .arg(repo().join("tests/mirror/mirror_guest.py"))
        .args(["--daemon", env!("CARGO_BIN_EXE_ringblk")])
        .args(args)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("mirror_guest.py {}:\n{text}", args.join(" "));
    if out.status.code() == Some(77) {
        skip(text.trim());
        return None;
    }
    assert!(
        out.status.success(),
        "mirror under guest writes failed ({}):\n{text}",
        args.join(" ")
    );
    assert_eq!(text.matches("OK: run").count(), 1, "{text}");
    Some(text)
}

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
    let disk = env!("CARGO_TARGET_TMPDIR");
    // One guest at a time: each boots under TCG on a CPU of its own.
    let scenarios: [&[&str]; 4] = [
        &["--image-dir", "/dev/shm"],
        &["--image-dir", disk, "--direct", "--fill-mib", "64"],
        &[
            "--image-dir",
            disk,
            "--direct",
            "--fill-mib",
            "64",
            "--copy-mode",
            "write-blocking",
        ],
        &[
            "--image-dir",
            disk,
            "--direct",
            "--fill-mib",
            "64",
            "--target-enospc",
        ],
    ];
    for args in scenarios {
        if mirror_guest(args).is_none() {
            return;
        }
    }
}
