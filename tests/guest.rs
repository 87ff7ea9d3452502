//! A real Linux guest under QEMU (TCG here; KVM where it is real) with its disk served by the
//! ringblk binary over vhost-user-blk: real fio with verify inside the guest, then every fio
//! profile. Needs qemu-system-x86_64, fio, busybox-static and network access for the guest
//! kernel package (.ci/install-deps installs them); skips with one loud line otherwise.

mod support;

use std::process::Command;

use support::*;

/// Builds the guest kernel and initramfs (cached), or says why it cannot.
fn guest_ready() -> Result<(), String> {
    for tool in ["qemu-system-x86_64", "fio", "busybox", "python3"] {
        if !have(tool) {
            return Err(format!("{tool} not installed (run .ci/install-deps)"));
        }
    }
    let out = Command::new("bash")
        .arg(repo().join("tests/guest/build.sh"))
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "tests/guest/build.sh failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Runs one fio job in a fresh guest on `socket`; returns guest.py's exit status and output.
fn fio_in_guest(socket: &std::path::Path, job: &std::path::Path) -> (bool, String) {
    let out = Command::new("python3")
        .arg(repo().join("tests/guest/guest.py"))
        .args([
            "--socket",
            &socket.display().to_string(),
            "--job",
            &job.display().to_string(),
            "--timeout",
            "240",
        ])
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn guest_fio_verify_and_profiles_pass_on_a_ringblk_disk() {
    if let Err(why) = guest_ready() {
        return skip(&format!("real-guest test: {why}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
    image.as_file().set_len(1 << 30).unwrap();
    let daemon = ringblk_export(
        &format!(
            "driver=file,node-name=disk,filename={}",
            image.path().display()
        ),
        dir.path(),
    );
    let mut profiles: Vec<_> = std::fs::read_dir(repo().join("fio-profiles"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "fio"))
        .collect();
    profiles.sort();
    // Verify first: the guest writes, reads back and checks every block through ringblk.
    profiles.sort_by_key(|p| !p.to_string_lossy().contains("verify"));
    for profile in &profiles {
        let (ok, output) = fio_in_guest(&daemon.socket, profile);
        eprintln!(
            "{}: {}",
            profile.display(),
            output.lines().last().unwrap_or("")
        );
        assert!(
            ok,
            "fio in the guest failed on {}:\n{output}",
            profile.display()
        );
    }
    assert!(
        daemon.terminate().success(),
        "ringblk exits 0 on SIGTERM after serving the guest"
    );
}
