//! NBD end to end, as a user runs it: ringblk's `--nbd-server` and `--export type=nbd` under
//! QEMU's own client (qemu-io, qemu-img over `nbd+unix://` and `nbd://`), ringblk's
//! `--blockdev driver=nbd` against qemu-storage-daemon's export, and live storage migration
//! between two network namespaces (tests/nbd/migrate.py) with ringblk and then QSD as the
//! destination. A missing tool makes a test print one `SKIP:` line.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the tool runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    assert!(
        !text.contains("Pattern verification failed") && !text.contains("error"),
        "{cmd:?}:\n{text}"
    );
    text
}

/// qemu-io on `uri` (read-only for `read-only,` plus the uri, as qemu-io's `-r`).
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    match uri.strip_prefix("read-only,") {
        Some(uri) => cmd.args(["-r", "-f", "raw", uri]),
        None => cmd.args(["-f", "raw", uri]),
    };
    for c in commands {
        cmd.args(["-c", c]);
    }
    run(&mut cmd)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn image(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    path.display().to_string()
}

#[test]
fn qemu_io_and_qemu_img_use_ringblks_nbd_export_over_unix_and_tcp() {
    if !have("qemu-io") || !have("qemu-img") {
        return skip("NBD export test: qemu-io or qemu-img not installed (run .ci/install-deps)");
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "disk.raw");
    let socket = dir.path().join("nbd.sock");
    let port = free_port();
    let unix = vec![
        "--blockdev".to_owned(),
        format!("file,node-name=disk,filename={img}"),
        "--nbd-server".to_owned(),
        format!(
            "addr.type=unix,addr.path={},max-connections=4",
            socket.display()
        ),
        "--export".to_owned(),
        "nbd,id=e0,node-name=disk,name=vm-disk,writable=on,description=test".to_owned(),
    ];
    let daemon = DaemonProcess::start(env!("CARGO_BIN_EXE_ringblk"), &unix, &socket);
    let uri = format!("nbd+unix:///vm-disk?socket={}", socket.display());
    qemu_io(
        &uri,
        &[
            "write -P 0x3c 1M 2M",
            "write -z 8M 1M",
            "read -P 0x3c 1M 2M",
        ],
    );
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    assert!(
        map.contains("\"start\": 1048576, \"length\": 2097152"),
        "{map}"
    );
    let copy = dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &uri])
        .arg(&copy));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&copy));
    drop(daemon);
    // The same image over TCP, read-only.
    let tcp = vec![
        "--blockdev".to_owned(),
        format!("file,node-name=disk,filename={img},read-only=on"),
        "--nbd-server".to_owned(),
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export".to_owned(),
        "nbd,id=e0,node-name=disk".to_owned(),
        "--chardev".to_owned(),
        format!(
            "socket,id=m,path={}/qmp.sock,server=on,wait=off",
            dir.path().display()
        ),
        "--monitor".to_owned(),
        "m".to_owned(),
    ];
    let qmp = dir.path().join("qmp.sock");
    let _daemon = DaemonProcess::start(env!("CARGO_BIN_EXE_ringblk"), &tcp, &qmp);
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    qemu_io(
        &format!("read-only,{uri}"),
        &["read -P 0x3c 1M 2M", "read -P 0 8M 1M"],
    );
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(&copy));
}

#[test]
fn ringblks_nbd_node_reads_and_writes_qsds_export() {
    if !have("qemu-storage-daemon") || !have("qemu-io") {
        return skip("NBD client test: qemu-storage-daemon or qemu-io not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "qsd.raw");
    let qsd_socket = dir.path().join("qsd.sock");
    let qsd_args = vec![
        "--blockdev".to_owned(),
        format!("file,node-name=f,filename={img}"),
        "--nbd-server".to_owned(),
        format!("addr.type=unix,addr.path={}", qsd_socket.display()),
        "--export".to_owned(),
        "nbd,id=q,node-name=f,name=qsd-disk,writable=on".to_owned(),
    ];
    let _qsd = DaemonProcess::start("qemu-storage-daemon", &qsd_args, &qsd_socket);
    // ringblk opens QSD's export as a node and exports that node again, for qemu-io.
    let socket = dir.path().join("ringblk.sock");
    let args = vec![
        "--blockdev".to_owned(),
        format!(
            "nbd,node-name=remote,server.type=unix,server.path={},export=qsd-disk",
            qsd_socket.display()
        ),
        "--nbd-server".to_owned(),
        format!("addr.type=unix,addr.path={}", socket.display()),
        "--export".to_owned(),
        "nbd,id=e,node-name=remote,writable=on".to_owned(),
    ];
    let _ringblk = DaemonProcess::start(env!("CARGO_BIN_EXE_ringblk"), &args, &socket);
    let uri = format!("nbd+unix:///remote?socket={}", socket.display());
    qemu_io(
        &uri,
        &[
            "write -P 0x61 0 4M",
            "aio_write -P 0x62 16M 64k",
            "aio_write -P 0x63 20M 1M",
            "aio_flush",
            "write -z 4M 1M",
            "read -P 0x61 0 4M",
            "read -P 0x62 16M 64k",
            "read -P 0x63 20M 1M",
            "read -P 0 4M 1M",
        ],
    );
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[..4 << 20].iter().all(|&b| b == 0x61),
        "written through to QSD's file"
    );
}

fn migrate(destination: &str) {
    if !have("python3") {
        return skip("NBD migration test: python3 not installed");
    }
    let bench = Path::new(env!("CARGO_BIN_EXE_ringblk"))
        .with_file_name("ringblk-bench")
        .display()
        .to_string();
    let out = Command::new("python3")
        .arg(repo().join("tests/nbd/migrate.py"))
        .args([
            "--ringblk",
            env!("CARGO_BIN_EXE_ringblk"),
            "--bench",
            &bench,
        ])
        .args(["--destination", destination])
        .output()
        .expect("python3 runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    if out.status.code() == Some(77) {
        return skip(text.trim());
    }
    assert!(out.status.success(), "migration failed:\n{text}");
    assert_eq!(text.matches("OK: ").count(), 5, "{text}");
}

#[test]
fn live_storage_migration_to_a_ringblk_destination() {
    migrate("ringblk");
}

#[test]
fn live_storage_migration_to_a_qsd_destination() {
    migrate("qsd");
}
