//! Helpers shared by the root package's end-to-end tests: starting the real daemons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Prints the one loud line of a skipped test.
pub fn skip(why: &str) {
    eprintln!("SKIP: {why}");
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A daemon process (ringblk or qemu-storage-daemon), killed on drop.
pub struct DaemonProcess {
    child: Child,
    pub socket: PathBuf,
}

impl DaemonProcess {
    /// Starts `program` with `args` and waits until `socket` exists.
    pub fn start(program: &str, args: &[String], socket: &Path) -> DaemonProcess {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(program)
            .args(args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let mut daemon = DaemonProcess {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("{program} exited before listening: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        daemon
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ringblk exporting a file on /dev/shm (or null-co) at a fresh socket, with one iothread.
pub fn ringblk_export(blockdev: &str, dir: &Path) -> DaemonProcess {
    let socket = dir.join("ringblk.sock");
    let args = vec![
        "--blockdev".to_owned(),
        blockdev.to_owned(),
        "--object".to_owned(),
        "iothread,id=io0".to_owned(),
        "--export".to_owned(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path={},writable=on,iothread=io0",
            socket.display()
        ),
    ];
    DaemonProcess::start(env!("CARGO_BIN_EXE_ringblk"), &args, &socket)
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
