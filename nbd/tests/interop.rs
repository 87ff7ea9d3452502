//! The NBD server and client against QEMU's own (qemu-io, qemu-img, qemu-nbd), libnbd's
//! (nbdinfo, nbdcopy), each other, and hostile peers. A tool that is missing makes its test
//! print one `SKIP:` line.
// Test sizes are small constants.
#![allow(clippy::cast_possible_truncation)]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::{BackendHandle, BlockResult, Node, Request};
use ringblk_nbd::{Address, ClientOptions, ExportConfig, NbdClient, NbdServer};
use ringblk_ring::buf::OwnedBuf;
use ringblk_ring::{Context, IoThread};

const MIB: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        println!("SKIP: {tool} is not installed (.ci/install-deps installs it)");
    }
    found
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn file_node(name: &str, path: &Path) -> Node {
    let options = FileOptions {
        filename: path.to_owned(),
        read_only: false,
        direct: false,
    };
    Node::new(name, FileNode::open(&options).unwrap())
}

/// A ringblk NBD server exporting a fresh image as `disk`, served on an iothread.
struct Served {
    server: NbdServer,
    image: PathBuf,
    socket: PathBuf,
    _thread: IoThread,
}

fn serve(dir: &Path, size: u64, writable: bool) -> Served {
    let image = image(dir, "served.raw", size);
    let socket = dir.join("nbd.sock");
    let thread = IoThread::spawn("nbd-test", Duration::ZERO).unwrap();
    let server = NbdServer::start(&Address::Unix(socket.clone()), 0).unwrap();
    let config = ExportConfig {
        name: "disk".into(),
        description: "a test disk".into(),
        writable,
    };
    let handle = BackendHandle::new(&file_node("disk", &image));
    server
        .add_export(config, handle, thread.remote().clone())
        .unwrap();
    Served {
        server,
        image,
        socket,
        _thread: thread,
    }
}

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", socket.display())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn qemu_io(target: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", target]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let text = run(&mut cmd);
    assert!(
        !text.contains("fail") && !text.contains("error") && !text.contains("mismatch"),
        "qemu-io {commands:?}:\n{text}"
    );
    text
}

#[test]
fn qemu_io_reads_and_writes_through_the_export() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), 64 * MIB, true);
    let target = uri(&served.socket);
    qemu_io(
        &target,
        &[
            "write -P 0xab 0 1M",
            "aio_write -P 0xcd 4M 64k",
            "aio_write -P 0xef 8M 4k",
            "aio_flush",
            "write -z 16M 1M",
            "discard 20M 1M",
            "write -f -P 0x11 32M 4k",
            "read -P 0xab 0 1M",
            "read -P 0xcd 4M 64k",
            "read -P 0xef 8M 4k",
            "read -P 0 16M 1M",
            "read -P 0x11 32M 4k",
        ],
    );
    let bytes = std::fs::read(&served.image).unwrap();
    assert!(bytes[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        bytes[4 * MIB as usize..][..65536]
            .iter()
            .all(|&b| b == 0xcd)
    );
    // Reads past the end are refused, the connection survives.
    let text = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &target,
            "-c",
            "read 64M 4k",
            "-c",
            "read -P 0xab 0 4k",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("read 4096/4096 bytes at offset 0"), "{text}");
}

#[test]
fn qemu_img_maps_compares_and_converts_over_unix_and_tcp() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), 16 * MIB, true);
    let target = uri(&served.socket);
    qemu_io(&target, &["write -P 0x5a 1M 1M"]);
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &target]));
    assert!(
        map.contains("\"start\": 1048576, \"length\": 1048576") && map.contains("\"data\": true"),
        "{map}"
    );
    assert!(map.contains("\"zero\": true"), "holes are reported: {map}");
    let copy = dir.path().join("copy.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &target])
        .arg(&copy));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &target])
        .arg(&copy));
    // The same through TCP.
    let port = free_port();
    let thread = IoThread::spawn("nbd-tcp", Duration::ZERO).unwrap();
    let server = NbdServer::start(
        &Address::Inet {
            host: "127.0.0.1".into(),
            port: port.to_string(),
        },
        0,
    )
    .unwrap();
    let config = ExportConfig {
        name: "disk".into(),
        description: String::new(),
        writable: false,
    };
    let handle = BackendHandle::new(&file_node("ro", &served.image));
    server
        .add_export(config, handle, thread.remote().clone())
        .unwrap();
    let tcp_uri = format!("nbd://127.0.0.1:{port}/disk");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &tcp_uri])
        .arg(&copy));
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", &tcp_uri, "-c", "write 0 4k"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stdout).into_owned()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only"),
        "{text}"
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn nbdinfo_lists_and_describes_and_nbdcopy_copies() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), 8 * MIB, true);
    let target = uri(&served.socket);
    let list = run(Command::new("nbdinfo").args(["--list", &target]));
    assert!(
        list.contains("export=\"disk\"") || list.contains("disk"),
        "{list}"
    );
    let info = run(Command::new("nbdinfo").arg(&target));
    assert!(info.contains("export-size: 8388608"), "{info}");
    assert!(info.contains("a test disk"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    let map = run(Command::new("nbdinfo").args(["--map", &target]));
    assert!(map.contains("hole,zero"), "{map}");
    let source = image(dir.path(), "source.raw", 8 * MIB);
    let pattern: Vec<u8> = (0..8 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&source, &pattern).unwrap();
    run(Command::new("nbdcopy").arg(&source).arg(&target));
    assert_eq!(std::fs::read(&served.image).unwrap(), pattern);
}

/// Runs `ctx` until `req` completes on it; returns the result and the request.
fn perform(ctx: &Context, node: &Node, req: Request) -> (BlockResult, Request) {
    let slot: Rc<RefCell<Option<(BlockResult, Request)>>> = Rc::default();
    let s = slot.clone();
    node.submit(
        req,
        Box::new(move |r, req| *s.borrow_mut() = Some((r, req))),
    );
    ctx.run_until(|| slot.borrow().is_some());
    slot.take().unwrap()
}

fn client(server: Address, export: &str) -> Node {
    let options = ClientOptions {
        server,
        export: export.into(),
        open_timeout: Duration::from_secs(5),
        read_only: false,
    };
    Node::new("nbd-client", NbdClient::connect(&options).unwrap())
}

/// Writes, reads back (many in flight, one larger than the server's maximum), zeroes and
/// flushes through a client node.
fn exercise_client(ctx: &Context, node: &Node) {
    let count = 64;
    let done = Rc::new(RefCell::new(0));
    for i in 0..count {
        let d = done.clone();
        let buf = OwnedBuf::from_slice(&vec![i as u8 + 1; 65536]);
        let req = Request::Write {
            offset: i * 65536,
            buf: Box::new(buf),
        };
        node.submit(
            req,
            Box::new(move |r, _| {
                r.unwrap();
                *d.borrow_mut() += 1;
            }),
        );
    }
    ctx.run_until(|| *done.borrow() == count);
    let (r, req) = perform(
        ctx,
        node,
        Request::Read {
            offset: 0,
            buf: Box::new(OwnedBuf::zeroed((count * 65536) as usize)),
        },
    );
    r.unwrap();
    let bytes = read_back(req);
    for i in 0..count as usize {
        assert!(
            bytes[i * 65536..][..65536]
                .iter()
                .all(|&b| b == i as u8 + 1)
        );
    }
    let big = 40 * MIB as usize;
    let (r, _) = perform(
        ctx,
        node,
        Request::Write {
            offset: 8 * MIB,
            buf: Box::new(OwnedBuf::from_slice(&vec![7; big])),
        },
    );
    r.unwrap();
    let (r, req) = perform(
        ctx,
        node,
        Request::Read {
            offset: 8 * MIB,
            buf: Box::new(OwnedBuf::zeroed(big)),
        },
    );
    r.unwrap();
    assert!(read_back(req).iter().all(|&b| b == 7));
    let zeroes = Request::WriteZeroes {
        offset: 0,
        len: MIB,
        unmap: true,
    };
    perform(ctx, node, zeroes).0.unwrap();
    perform(ctx, node, Request::Flush).0.unwrap();
    let (r, req) = perform(
        ctx,
        node,
        Request::Read {
            offset: 0,
            buf: Box::new(OwnedBuf::zeroed(MIB as usize)),
        },
    );
    r.unwrap();
    assert!(read_back(req).iter().all(|&b| b == 0));
}

fn read_back(req: Request) -> Vec<u8> {
    let buf = OwnedBuf::from_boxed(req.into_buf().unwrap()).ok().unwrap();
    buf.as_slice().to_vec()
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(path).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        assert!(Instant::now() < deadline, "server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn client_node_against_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "q.raw", 64 * MIB);
    let socket = dir.path().join("q.sock");
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "disk", "-k"])
        .arg(&socket)
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for_socket(&socket, &mut child);
    let _kill = Kill(child);
    let ctx = Context::new(256).unwrap();
    let node = client(Address::Unix(socket), "disk");
    assert_eq!(node.size(), 64 * MIB);
    exercise_client(&ctx, &node);
    drop(node);
    ctx.run_until(|| true);
    let bytes = std::fs::read(&img).unwrap();
    assert!(
        bytes[8 * MIB as usize..][..40 * MIB as usize]
            .iter()
            .all(|&b| b == 7)
    );
}

#[test]
fn client_node_against_the_ringblk_server_and_a_server_that_dies() {
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), 64 * MIB, true);
    let ctx = Context::new(256).unwrap();
    let node = client(Address::Unix(served.socket.clone()), "disk");
    exercise_client(&ctx, &node);
    let unknown = ClientOptions {
        server: Address::Unix(served.socket.clone()),
        export: "nope".into(),
        open_timeout: Duration::ZERO,
        read_only: false,
    };
    let err = NbdClient::connect(&unknown).err().unwrap().to_string();
    assert!(err.contains("export 'nope'"), "{err}");
    drop(served);
    let (r, _) = perform(&ctx, &node, Request::Flush);
    let err = r.unwrap_err().to_string();
    assert!(err.contains("NBD export 'disk': connection lost"), "{err}");
}

#[test]
fn garbage_from_a_client_closes_only_its_connection() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served = serve(dir.path(), 16 * MIB, true);
    // A handshake, then a request with a bad magic.
    let mut bad = UnixStream::connect(&served.socket).unwrap();
    let mut greeting = [0u8; 18];
    bad.read_exact(&mut greeting).unwrap();
    bad.write_all(&1u32.to_be_bytes()).unwrap();
    let mut go = Vec::new();
    go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&10u32.to_be_bytes());
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    bad.write_all(&go).unwrap();
    // Meanwhile a well-behaved client works.
    qemu_io(&uri(&served.socket), &["write -P 1 0 64k"]);
    bad.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.read_to_end(&mut rest).unwrap();
    // Option replies came, then the server closed the connection.
    assert!(!rest.is_empty());
    // A client that sends garbage instead of a handshake.
    let mut junk = UnixStream::connect(&served.socket).unwrap();
    junk.write_all(&[0x42; 100]).unwrap();
    let mut rest = Vec::new();
    junk.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = junk.read_to_end(&mut rest);
    qemu_io(&uri(&served.socket), &["read -P 1 0 64k"]);
    // Every connection ends (asynchronously, on the export's ring).
    let deadline = Instant::now() + Duration::from_secs(10);
    while served.server.connections() > 0 {
        assert!(Instant::now() < deadline, "a connection was left open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn malformed_reply_fails_the_client_nodes_requests_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("evil.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let evil = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut msg = Vec::new();
        msg.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
        msg.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        msg.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&msg).unwrap();
        let mut buf = [0u8; 4 + 8 + 4 + 4 + 4 + 2 + 2];
        s.read_exact(&mut buf).unwrap();
        let mut reply = Vec::new();
        let mut option_reply = |kind: u32, data: &[u8]| {
            reply.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
            reply.extend_from_slice(&7u32.to_be_bytes());
            reply.extend_from_slice(&kind.to_be_bytes());
            reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
            reply.extend_from_slice(data);
        };
        let mut info = 0u16.to_be_bytes().to_vec();
        info.extend_from_slice(&MIB.to_be_bytes());
        info.extend_from_slice(&1u16.to_be_bytes());
        option_reply(3, &info);
        option_reply(1, &[]);
        s.write_all(&reply).unwrap();
        let mut request = [0u8; 28];
        s.read_exact(&mut request).unwrap();
        // A reply to a handle nobody sent.
        let mut bogus = 0x6744_6698u32.to_be_bytes().to_vec();
        bogus.extend_from_slice(&0u32.to_be_bytes());
        bogus.extend_from_slice(&0xdead_beefu64.to_be_bytes());
        s.write_all(&bogus).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let ctx = Context::new(256).unwrap();
    let node = client(Address::Unix(socket), "");
    let (r, _) = perform(
        &ctx,
        &node,
        Request::Read {
            offset: 0,
            buf: Box::new(OwnedBuf::zeroed(4096)),
        },
    );
    let err = r.unwrap_err().to_string();
    assert!(
        err.contains("malformed reply") && err.contains("unknown handle"),
        "{err}"
    );
    let (r, _) = perform(&ctx, &node, Request::Flush);
    assert!(r.is_err());
    drop(node);
    ctx.run_until(|| true);
    evil.join().unwrap();
}
