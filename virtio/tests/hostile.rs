//! End to end: a hostile vhost-user frontend never takes the daemon down, and the other exports
//! keep serving (design invariant 4).
//!
//! Every test runs a miniature daemon with two exports, A (two queues) and B (one queue), each
//! on its own socket. A hostile frontend, built on the rust-vmm `vhost` crate's frontend side
//! plus raw socket writes for what that API cannot express, does one bad thing to A. Then:
//! 1. the daemon is alive: its main context and every iothread still run callbacks;
//! 2. B serves a ringblk-bench verify job from start to end;
//! 3. A accepts a new, well-behaved frontend and serves its verify job (reconnect).
//!
//! What the hostile frontend itself must see is asserted too: a refused request is refused (a
//! negative REPLY_ACK, or the connection closed), never accepted and never left unanswered, and
//! the daemon then closes the connection. Every wait is bounded.
//!
//! For contrast, `qsd_contrast` (ignored; run it with `--ignored --nocapture`) does the same
//! things to qemu-storage-daemon and prints which of them it survives; what QSD 10.0.2 did on
//! this project's machines is summarized above that test.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Daemon, ExportSpec, file_node, image, job};
use ringblk_bench::{Report, RunOptions, WaitMode, run_job};
use ringblk_virtio::memory::{MemoryTable, RegionDesc};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_MQ, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Longest wait for one vhost-user reply, or for the daemon to close a connection.
const REPLY_WAIT: Duration = Duration::from_secs(5);
/// Longest wait for one verify job.
const JOB_WAIT: Duration = Duration::from_secs(20);
/// How long a queue must stay silent to count as not completing a request.
const QUIET: Duration = Duration::from_millis(300);

/// A small verify job: random writes, then every block read back and checked.
const VERIFY_JOB: &str = "[v]\nrw=randwrite\nbs=4k\niodepth=8\nsize=512k\nverify=crc32c\n";

const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const NEED_REPLY: u32 = 0x8;
const VERSION_1_FLAGS: u32 = 0x1;
const HEADER_BYTES: usize = 12;

// ---------------------------------------------------------------------------------------------
// The daemon: two exports.

/// Whether A and B share one iothread (a stall of A's ring would then stall B too).
#[derive(Clone, Copy, Debug)]
enum Iothreads {
    Shared,
    Separate,
}

struct Pair {
    daemon: Daemon,
    a: PathBuf,
    b: PathBuf,
    _images: [tempfile::NamedTempFile; 2],
}

impl Pair {
    fn start(iothreads: Iothreads) -> Pair {
        let images = [image(16 << 20), image(16 << 20)];
        let (a_threads, b_threads) = match iothreads {
            Iothreads::Shared => (vec![0], vec![0]),
            Iothreads::Separate => (vec![0], vec![1]),
        };
        let daemon = Daemon::start_exports(
            2,
            vec![
                ExportSpec {
                    id: "a".into(),
                    node: Box::new(file_node(images[0].path())),
                    iothreads: a_threads,
                    num_queues: 2,
                    writable: true,
                },
                ExportSpec {
                    id: "b".into(),
                    node: Box::new(file_node(images[1].path())),
                    iothreads: b_threads,
                    num_queues: 1,
                    writable: true,
                },
            ],
        );
        Pair {
            a: daemon.sockets[0].clone(),
            b: daemon.sockets[1].clone(),
            daemon,
            _images: images,
        }
    }

    /// (1) alive, (2) B serves, (3) A serves a new frontend.
    fn assert_unharmed(&self, after: &str) {
        self.daemon.assert_responsive(REPLY_WAIT);
        verify_job_passes(&self.b, &format!("export B after {after}"));
        verify_job_passes(&self.a, &format!("export A reconnected after {after}"));
        self.daemon.assert_responsive(REPLY_WAIT);
    }
}

fn quiet() -> RunOptions {
    RunOptions {
        wait_mode: WaitMode::Event,
        progress: false,
        ..RunOptions::default()
    }
}

/// Runs `f` on a thread of its own and gives up after `timeout`.
fn within<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no result within {timeout:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

fn run_verify_job(socket: &Path, what: &str) -> Result<Report, String> {
    let socket = socket.to_owned();
    within(JOB_WAIT, what, move || {
        run_job(&socket, &job(VERIFY_JOB), &quiet()).map_err(|e| e.to_string())
    })
}

fn verify_job_passes(socket: &Path, what: &str) {
    match run_verify_job(socket, what) {
        Ok(report) => assert!(report.passed(), "{what}: {report}"),
        Err(e) => panic!("{what}: the verify job failed: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The hostile frontend.

/// What the frontend saw after a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Accepted,
    /// A negative REPLY_ACK.
    Refused,
    /// The daemon closed the connection instead of answering.
    Closed,
    /// No answer within REPLY_WAIT: the frontend would wait forever.
    Silent,
}

impl Answer {
    /// A refusal, whichever way it was said.
    fn is_refusal(self) -> bool {
        matches!(self, Answer::Refused | Answer::Closed)
    }
}

fn answer_of(e: &vhost::Error) -> Answer {
    use vhost::vhost_user::Error as E;
    match e {
        vhost::Error::VhostUserProtocol(E::BackendInternalError) => Answer::Refused,
        vhost::Error::VhostUserProtocol(
            E::Disconnected | E::PartialMessage | E::SocketBroken(_) | E::SocketError(_),
        ) => Answer::Closed,
        other => panic!("a frontend-side error that says nothing about the daemon: {other}"),
    }
}

struct Hostile {
    fe: Frontend,
    /// The same connection, for raw writes and for reading what the daemon sends.
    sock: UnixStream,
}

impl Hostile {
    fn connect(socket: &Path) -> Hostile {
        let sock = UnixStream::connect(socket).expect("connect to the export");
        sock.set_read_timeout(Some(REPLY_WAIT)).unwrap();
        sock.set_write_timeout(Some(REPLY_WAIT)).unwrap();
        // Up to 256 vrings, so that the vhost crate lets indices beyond the device's through.
        let fe = Frontend::from_stream(sock.try_clone().unwrap(), 256);
        Hostile { fe, sock }
    }

    /// Connects and negotiates like a VMM, with REPLY_ACK on every later message.
    fn negotiated(socket: &Path) -> Hostile {
        let h = Hostile::connect(socket);
        h.call(|fe| {
            let offered = fe.get_features()?;
            let proto = fe.get_protocol_features()?;
            fe.set_protocol_features(
                proto
                    & (VhostUserProtocolFeatures::REPLY_ACK
                        | VhostUserProtocolFeatures::MQ
                        | VhostUserProtocolFeatures::CONFIG
                        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
            )?;
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            fe.set_owner()?;
            fe.set_features(
                offered
                    & ((1 << VIRTIO_F_VERSION_1)
                        | F_PROTOCOL_FEATURES
                        | (1 << VIRTIO_BLK_F_MQ)
                        | (1 << VIRTIO_RING_F_EVENT_IDX)),
            )
        })
        .expect("feature negotiation");
        h
    }

    /// Negotiated, with `guest`'s memory shared.
    fn with_memory(socket: &Path, guest: &Guest) -> Hostile {
        let h = Hostile::negotiated(socket);
        let region = guest.region();
        assert_eq!(
            h.ask(move |fe| fe.set_mem_table(&[region])),
            Answer::Accepted
        );
        h
    }

    /// Runs requests on a helper thread: the vhost crate retries a timed-out read forever, so
    /// a reply that never comes would otherwise hang the test.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T> + Send + 'static,
    ) -> Result<T, Answer> {
        let mut fe = self.fe.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f(&mut fe));
        });
        match rx.recv_timeout(REPLY_WAIT) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(answer_of(&e)),
            Err(_) => {
                // Unblocks the helper thread.
                let _ = self.sock.shutdown(Shutdown::Both);
                Err(Answer::Silent)
            }
        }
    }

    fn ask<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T> + Send + 'static,
    ) -> Answer {
        match self.call(f) {
            Ok(_) => Answer::Accepted,
            Err(a) => a,
        }
    }

    /// SET_VRING_NUM/ADDR/BASE/KICK/CALL/ENABLE for `vq`; the first answer that is not an
    /// acceptance, or Accepted.
    fn start_queue(&self, vq: &Vq) -> Answer {
        let (index, config) = (vq.index, vq.config());
        let kick = vq.kick.try_clone().unwrap();
        let call = vq.call.try_clone().unwrap();
        self.ask(move |fe| {
            fe.set_vring_num(index, config.queue_size)?;
            fe.set_vring_addr(index, &config)?;
            fe.set_vring_base(index, 0)?;
            fe.set_vring_kick(index, &kick)?;
            fe.set_vring_call(index, &call)?;
            fe.set_vring_enable(index, true)
        })
    }

    fn send_raw(&self, bytes: &[u8]) {
        (&self.sock).write_all(bytes).expect("write to the daemon");
    }

    /// A request with NEED_REPLY and any body, bypassing the vhost crate's types.
    fn raw_request(&self, code: FrontendReq, body: &[u8]) -> Answer {
        self.send_raw(&raw_message(
            code.into(),
            VERSION_1_FLAGS | NEED_REPLY,
            body,
        ));
        let mut reply = [0u8; HEADER_BYTES + 8];
        match (&self.sock).read_exact(&mut reply) {
            Ok(()) if reply[HEADER_BYTES..] == [0; 8] => Answer::Accepted,
            Ok(()) => Answer::Refused,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                ) =>
            {
                Answer::Closed
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Answer::Silent
            }
            Err(e) => panic!("reading a reply: {e}"),
        }
    }

    /// Whether the daemon closes the connection within REPLY_WAIT (replies on the way are
    /// skipped).
    fn closed_by_daemon(&self) -> bool {
        let deadline = Instant::now() + REPLY_WAIT;
        let mut buf = [0u8; 256];
        loop {
            match (&self.sock).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading from the daemon: {e}"),
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// A vhost-user message: header (request, flags, size; native endian) and body.
fn raw_message(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let size = u32::try_from(body.len()).unwrap();
    let mut m = Vec::with_capacity(HEADER_BYTES + body.len());
    m.extend_from_slice(&code.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&size.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// Body of SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE: index and number, any u32s.
fn vring_state(index: u32, num: u32) -> Vec<u8> {
    [index.to_ne_bytes(), num.to_ne_bytes()].concat()
}

/// The hostile frontend's request must be refused, and the daemon must then close the
/// connection (a frontend that sends such a thing is not served further).
#[track_caller]
fn assert_refused_and_closed(h: &Hostile, answer: Answer, what: &str) {
    assert!(
        answer.is_refusal(),
        "{what}: the daemon answered {answer:?}"
    );
    assert!(
        h.closed_by_daemon(),
        "{what}: refused, but the connection stays open"
    );
}

// ---------------------------------------------------------------------------------------------
// The hostile frontend's guest: memory and the driver side of split virtqueues.

const GUEST_BASE: u64 = 0x10_0000;
/// Where the frontend claims to have guest memory mapped (vring addresses are in this space).
const FRONTEND_BASE: u64 = 0x7f00_0000_0000;
const GUEST_BYTES: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 16;
/// Guest memory per queue: descriptor table, avail ring, used ring, request buffers.
const QUEUE_AREA: u64 = 0x4000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

/// Guest memory in a memfd. The test writes it through a `MemoryTable` of its own, so the
/// driver side needs no raw pointer either.
struct Guest {
    file: File,
    table: MemoryTable,
}

impl Guest {
    fn new(bytes: u64) -> Guest {
        let fd =
            nix::sys::memfd::memfd_create(c"hostile-guest", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create");
        let file = File::from(fd);
        file.set_len(bytes).unwrap();
        let table = MemoryTable::new(&[(
            RegionDesc {
                guest_phys_addr: GUEST_BASE,
                memory_size: bytes,
                userspace_addr: FRONTEND_BASE,
                mmap_offset: 0,
            },
            file.as_fd(),
        )])
        .unwrap();
        Guest { file, table }
    }

    /// The honest description of the memory.
    fn region(&self) -> VhostUserMemoryRegionInfo {
        self.region_claiming(GUEST_BASE, GUEST_BYTES, FRONTEND_BASE, 0)
    }

    /// A description of this memfd saying anything.
    fn region_claiming(
        &self,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
        mmap_offset: u64,
    ) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr,
            memory_size,
            userspace_addr,
            mmap_offset,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap();
        let s = self.table.guest_slice(gpa, len).unwrap();
        s.copy_from(0, bytes).unwrap();
    }

    fn read_u8(&self, gpa: u64) -> u8 {
        self.table.guest_slice(gpa, 1).unwrap().load_u8(0).unwrap()
    }

    fn write_desc(&self, vq: &Vq, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(vq.desc() + 16 * u64::from(index), &d);
    }

    /// Puts `head` in the next avail slot, publishes it and kicks.
    fn make_available(&self, vq: &mut Vq, head: u16) {
        let slot = u64::from(vq.avail_idx % QUEUE_SIZE);
        self.write(vq.avail() + 4 + 2 * slot, &head.to_le_bytes());
        self.publish_avail_idx(vq, vq.avail_idx.wrapping_add(1));
    }

    /// Stores avail idx as is (any value) and kicks.
    fn publish_avail_idx(&self, vq: &mut Vq, idx: u16) {
        vq.avail_idx = idx;
        self.table
            .guest_slice(vq.avail(), 4)
            .unwrap()
            .store_u16_atomic(2, idx, std::sync::atomic::Ordering::Release)
            .unwrap();
        vq.kick.write(1).unwrap();
    }

    fn used_idx(&self, vq: &Vq) -> u16 {
        self.table
            .guest_slice(vq.used(), 4)
            .unwrap()
            .load_u16_atomic(2, std::sync::atomic::Ordering::Acquire)
            .unwrap()
    }

    /// Whether used idx reaches `want` within `timeout`.
    fn used_reaches(&self, vq: &Vq, want: u16, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.used_idx(vq) == want {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lays out a one-sector read of `sector` in descriptors 0, 1, 2 (header, data, status),
    /// without publishing it; returns the status byte's address.
    fn write_read_request(&self, vq: &Vq, sector: u64) -> u64 {
        let (header, data, status) = (vq.data(), vq.data() + 0x100, vq.data() + 0x80);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(header, &h);
        self.write(status, &[0xff]);
        self.write_desc(vq, 0, header, 16, F_NEXT, 1);
        self.write_desc(vq, 1, data, 512, F_WRITE | F_NEXT, 2);
        self.write_desc(vq, 2, status, 1, F_WRITE, 0);
        status
    }

    /// Submits a one-sector read and waits for its status; `None` if it is not completed.
    fn read_sector(&self, vq: &mut Vq, sector: u64, timeout: Duration) -> Option<u8> {
        let status = self.write_read_request(vq, sector);
        let want = self.used_idx(vq).wrapping_add(1);
        self.make_available(vq, 0);
        self.used_reaches(vq, want, timeout)
            .then(|| self.read_u8(status))
    }
}

/// One split virtqueue of the hostile guest (queue `index` in its own area of guest memory).
struct Vq {
    index: usize,
    avail_idx: u16,
    kick: EventFd,
    call: EventFd,
}

impl Vq {
    fn new(index: usize) -> Vq {
        Vq {
            index,
            avail_idx: 0,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    fn base(&self) -> u64 {
        GUEST_BASE + QUEUE_AREA * u64::try_from(self.index).unwrap()
    }
    fn desc(&self) -> u64 {
        self.base()
    }
    fn avail(&self) -> u64 {
        self.base() + 0x100
    }
    fn used(&self) -> u64 {
        self.base() + 0x1000
    }
    fn data(&self) -> u64 {
        self.base() + 0x2000
    }

    /// SET_VRING_ADDR's view: frontend-virtual addresses.
    fn config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: frontend_virtual(self.desc()),
            used_ring_addr: frontend_virtual(self.used()),
            avail_ring_addr: frontend_virtual(self.avail()),
            log_addr: None,
        }
    }
}

fn frontend_virtual(gpa: u64) -> u64 {
    gpa - GUEST_BASE + FRONTEND_BASE
}

// ---------------------------------------------------------------------------------------------
// The baseline every case relies on.

#[test]
fn exports_sharing_an_iothread_serve_side_by_side() {
    // Connections come and go on A while B is busy on the same iothread: each connection's
    // queues must be told apart on the ring that serves both exports.
    let pair = Pair::start(Iothreads::Shared);
    let b = pair.b.clone();
    let load = std::thread::spawn(move || {
        let j = job("[l]\nrw=randrw\nbs=4k\niodepth=8\nsize=4m\nruntime=2\ntime_based\n");
        run_job(&b, &j, &quiet()).map_err(|e| e.to_string())
    });
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        verify_job_passes(&pair.a, "export A beside a busy B");
    }
    let report = within(JOB_WAIT, "the load on B", move || load.join())
        .expect("load thread")
        .expect("the load job on B");
    assert!(report.passed(), "{report}");
}

// ---------------------------------------------------------------------------------------------
// 1. SET_VRING_NUM.

#[test]
fn absurd_vring_sizes_are_refused() {
    let pair = Pair::start(Iothreads::Separate);
    let guest = Guest::new(GUEST_BYTES);
    // 2^31 and 2^16 do not fit the vhost crate's u16 API: sent raw.
    for num in [1 << 31, u32::MAX, 1 << 16, 0, 3, 24] {
        let h = Hostile::with_memory(&pair.a, &guest);
        let answer = h.raw_request(FrontendReq::SET_VRING_NUM, &vring_state(0, num));
        let what = format!("SET_VRING_NUM {num}");
        assert_refused_and_closed(&h, answer, &what);
        pair.assert_unharmed(&what);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Vring indices beyond the device's queues.

type Request = Box<dyn FnOnce(&mut Frontend) -> vhost::Result<()> + Send>;

/// Every vring message, aimed at vring `index`.
fn vring_messages(index: usize) -> Vec<(&'static str, Request)> {
    let config = Vq::new(0).config();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    vec![
        (
            "SET_VRING_NUM",
            Box::new(move |fe| fe.set_vring_num(index, 16)),
        ),
        (
            "SET_VRING_ADDR",
            Box::new(move |fe| fe.set_vring_addr(index, &config)),
        ),
        (
            "SET_VRING_BASE",
            Box::new(move |fe| fe.set_vring_base(index, 0)),
        ),
        (
            "SET_VRING_KICK",
            Box::new(move |fe| fe.set_vring_kick(index, &kick)),
        ),
        (
            "SET_VRING_CALL",
            Box::new(move |fe| fe.set_vring_call(index, &call)),
        ),
        (
            "SET_VRING_ENABLE",
            Box::new(move |fe| fe.set_vring_enable(index, true)),
        ),
        (
            "GET_VRING_BASE",
            Box::new(move |fe| fe.get_vring_base(index).map(drop)),
        ),
    ]
}

#[test]
fn vring_indices_beyond_the_device_queues_are_refused() {
    let pair = Pair::start(Iothreads::Shared);
    let guest = Guest::new(GUEST_BYTES);
    // A has queues 0 and 1: 2 is the first index beyond them.
    for index in [2, 200] {
        for (name, request) in vring_messages(index) {
            let h = Hostile::with_memory(&pair.a, &guest);
            let answer = h.ask(request);
            let what = format!("{name} for vring {index}");
            assert_refused_and_closed(&h, answer, &what);
            pair.assert_unharmed(&what);
        }
    }
}

/// Requests refused without an answer (the vhost crate sends none when the handler fails a
/// request that has a reply of its own, or fails some before consulting it): the daemon must
/// end the connection rather than leave the frontend waiting forever.
#[test]
fn refusals_the_frontend_would_wait_for_forever_end_the_connection() {
    let pair = Pair::start(Iothreads::Separate);
    let guest = Guest::new(GUEST_BYTES);
    let cases: [(&str, FrontendReq, Vec<u8>); 3] = [
        (
            "GET_VRING_BASE for vring 2^32-1",
            FrontendReq::GET_VRING_BASE,
            vring_state(u32::MAX, 0),
        ),
        (
            "SET_VRING_ENABLE with 2 for enable",
            FrontendReq::SET_VRING_ENABLE,
            vring_state(0, 2),
        ),
        (
            "GET_INFLIGHT_FD without INFLIGHT_SHMFD",
            FrontendReq::GET_INFLIGHT_FD,
            vec![0; 24],
        ),
    ];
    for (what, request, body) in cases {
        let h = Hostile::with_memory(&pair.a, &guest);
        let answer = h.raw_request(request, &body);
        assert_refused_and_closed(&h, answer, what);
        pair.assert_unharmed(what);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. and 4. Memory tables.

#[test]
fn memory_regions_larger_than_their_file_are_refused() {
    let pair = Pair::start(Iothreads::Separate);
    let guest = Guest::new(GUEST_BYTES);
    let cases = [
        (
            "1 GiB region over a 1 MiB memfd",
            guest.region_claiming(GUEST_BASE, 1 << 30, FRONTEND_BASE, 0),
        ),
        (
            "region at an offset past the end of its memfd",
            guest.region_claiming(GUEST_BASE, 0x1000, FRONTEND_BASE, GUEST_BYTES),
        ),
        (
            "region whose offset + size runs past its memfd",
            guest.region_claiming(GUEST_BASE, GUEST_BYTES, FRONTEND_BASE, 0x1000),
        ),
    ];
    for (what, region) in cases {
        let h = Hostile::negotiated(&pair.a);
        let answer = h.ask(move |fe| fe.set_mem_table(&[region]));
        assert_refused_and_closed(&h, answer, &format!("SET_MEM_TABLE: {what}"));
        // The same region added on its own (CONFIGURE_MEM_SLOTS).
        let h = Hostile::negotiated(&pair.a);
        let answer = h.ask(move |fe| fe.add_mem_region(&region));
        assert_refused_and_closed(&h, answer, &format!("ADD_MEM_REG: {what}"));
        pair.assert_unharmed(what);
    }
}

#[test]
fn overlapping_and_wrapping_memory_regions_are_refused() {
    let pair = Pair::start(Iothreads::Shared);
    let guest = Guest::new(GUEST_BYTES);
    let half = GUEST_BYTES / 2;
    let honest = guest.region();
    let g = |gpa, size, uva, offset| guest.region_claiming(gpa, size, uva, offset);
    let tables = [
        (
            "guest-physical overlap",
            vec![
                honest,
                g(GUEST_BASE + half, half, FRONTEND_BASE + (1 << 30), 0),
            ],
        ),
        (
            "frontend-virtual overlap",
            vec![honest, g(1 << 40, half, FRONTEND_BASE + half, 0)],
        ),
        (
            "guest address + size wraps 2^64",
            vec![g(u64::MAX - 0xfff, GUEST_BYTES, FRONTEND_BASE, 0)],
        ),
        (
            "frontend address + size wraps 2^64",
            vec![g(GUEST_BASE, GUEST_BYTES, u64::MAX - 0xfff, 0)],
        ),
        (
            "offset + size wraps 2^64",
            vec![g(GUEST_BASE, GUEST_BYTES, FRONTEND_BASE, u64::MAX - 0xfff)],
        ),
    ];
    for (what, regions) in tables {
        let h = Hostile::negotiated(&pair.a);
        let answer = h.ask(move |fe| fe.set_mem_table(&regions));
        assert_refused_and_closed(&h, answer, &format!("SET_MEM_TABLE: {what}"));
        pair.assert_unharmed(what);
    }
    // An added region overlapping the table's.
    let h = Hostile::with_memory(&pair.a, &guest);
    let overlap = g(GUEST_BASE + half, half, 1 << 40, 0);
    let answer = h.ask(move |fe| fe.add_mem_region(&overlap));
    assert_refused_and_closed(&h, answer, "ADD_MEM_REG overlapping the table");
    pair.assert_unharmed("ADD_MEM_REG overlapping the table");
}

// ---------------------------------------------------------------------------------------------
// 5. Vring addresses.

#[test]
fn vrings_outside_guest_memory_do_not_start() {
    let pair = Pair::start(Iothreads::Separate);
    let guest = Guest::new(GUEST_BYTES);
    let honest = Vq::new(0).config();
    let with = |f: fn(&mut VringConfigData)| {
        let mut c = honest;
        f(&mut c);
        c
    };
    let cases = [
        (
            "descriptor table outside every region",
            with(|c| c.desc_table_addr = FRONTEND_BASE + (1 << 30)),
        ),
        (
            "descriptor table running past the region's end",
            with(|c| c.desc_table_addr = FRONTEND_BASE + GUEST_BYTES - 0x80),
        ),
        (
            "avail ring running past the region's end",
            with(|c| c.avail_ring_addr = FRONTEND_BASE + GUEST_BYTES - 0x10),
        ),
        (
            "used ring running past the region's end",
            with(|c| c.used_ring_addr = FRONTEND_BASE + GUEST_BYTES - 0x40),
        ),
        (
            "used ring below the region (guest-physical, not frontend-virtual)",
            with(|c| c.used_ring_addr = GUEST_BASE + 0x1000),
        ),
        (
            "avail ring wrapping 2^64",
            with(|c| c.avail_ring_addr = u64::MAX - 1),
        ),
        (
            "used ring wrapping 2^64",
            with(|c| c.used_ring_addr = u64::MAX - 3),
        ),
    ];
    for (what, config) in cases {
        let h = Hostile::with_memory(&pair.a, &guest);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let answer = h.ask(move |fe| {
            fe.set_vring_num(0, QUEUE_SIZE)?;
            fe.set_vring_addr(0, &config)?;
            fe.set_vring_base(0, 0)?;
            fe.set_vring_kick(0, &kick)?;
            // The queue starts here, and must not.
            fe.set_vring_enable(0, true)
        });
        assert_refused_and_closed(&h, answer, &format!("queue start with {what}"));
        pair.assert_unharmed(what);
    }
}

#[test]
fn memory_table_replaced_under_running_queues_breaks_them_cleanly() {
    let pair = Pair::start(Iothreads::Shared);
    let guest = Guest::new(GUEST_BYTES);
    let h = Hostile::with_memory(&pair.a, &guest);
    let mut q0 = Vq::new(0);
    assert_eq!(h.start_queue(&q0), Answer::Accepted);
    assert_eq!(guest.read_sector(&mut q0, 0, REPLY_WAIT), Some(S_OK));
    // A valid table, but elsewhere: the running queue's rings are no longer in guest memory.
    let moved = guest.region_claiming(GUEST_BASE << 4, GUEST_BYTES, FRONTEND_BASE << 1, 0);
    assert_eq!(
        h.ask(move |fe| fe.set_mem_table(&[moved])),
        Answer::Accepted
    );
    let status = guest.write_read_request(&q0, 0);
    let used = guest.used_idx(&q0);
    guest.make_available(&mut q0, 0);
    assert!(
        !guest.used_reaches(&q0, used.wrapping_add(1), QUIET),
        "a queue whose rings left guest memory completed a request"
    );
    assert_eq!(guest.read_u8(status), 0xff);
    drop(h);
    pair.assert_unharmed("a memory table that moved the rings");
}

// ---------------------------------------------------------------------------------------------
// 6. Descriptors.

/// What became of a hostile chain on queue 0.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Completed with this status byte; the queue serves on.
    Completed(u8),
    /// Completed with used length 0, status untouched (no status byte to write).
    CompletedEmpty,
    /// Not completed, and the queue serves nothing more: marked broken.
    QueueBroken,
}

/// A well-formed connection to A with queues 0 and 1 started and checked; `hostile` then
/// writes something bad to queue 0. Returns what became of it, after checking that queue 1
/// still serves.
fn descriptor_case(pair: &Pair, hostile: impl FnOnce(&Guest, &mut Vq)) -> Fate {
    let guest = Guest::new(GUEST_BYTES);
    let h = Hostile::with_memory(&pair.a, &guest);
    let (mut q0, mut q1) = (Vq::new(0), Vq::new(1));
    assert_eq!(h.start_queue(&q0), Answer::Accepted);
    assert_eq!(h.start_queue(&q1), Answer::Accepted);
    assert_eq!(guest.read_sector(&mut q0, 0, REPLY_WAIT), Some(S_OK));
    assert_eq!(guest.read_sector(&mut q1, 0, REPLY_WAIT), Some(S_OK));

    let status = q0.data() + 0x80;
    guest.write(status, &[0xff]);
    let used = guest.used_idx(&q0);
    hostile(&guest, &mut q0);
    std::thread::sleep(QUIET);
    let completed = guest.used_idx(&q0).wrapping_sub(used);
    assert!(completed <= 1, "{completed} chains completed for one");
    let fate = if completed == 1 {
        let len_at = q0.used() + 4 + 8 * u64::from(used % QUEUE_SIZE) + 4;
        let len = guest
            .table
            .guest_slice(len_at, 4)
            .unwrap()
            .load_u32(0)
            .unwrap();
        let fate = if len == 0 {
            Fate::CompletedEmpty
        } else {
            Fate::Completed(guest.read_u8(status))
        };
        // The queue serves on.
        assert_eq!(guest.read_sector(&mut q0, 0, REPLY_WAIT), Some(S_OK));
        fate
    } else {
        // Broken: a well-formed request is not served either.
        assert_eq!(guest.read_sector(&mut q0, 0, QUIET), None);
        Fate::QueueBroken
    };
    // Queue 1 keeps serving, and the connection is intact.
    assert_eq!(guest.read_sector(&mut q1, 8, REPLY_WAIT), Some(S_OK));
    assert_eq!(h.ask(|fe| fe.get_vring_base(1)), Answer::Accepted);
    fate
}

#[test]
fn hostile_descriptors_complete_with_ioerr_or_break_only_their_queue() {
    let pair = Pair::start(Iothreads::Shared);
    type Write = fn(&Guest, &mut Vq);
    let cases: [(&str, Write, Fate); 9] = [
        (
            "data buffer outside guest memory",
            |g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, 0xdead_0000_0000, 512, F_WRITE | F_NEXT, 2);
                g.make_available(q, 0);
            },
            Fate::QueueBroken,
        ),
        (
            "data buffer straddling the end of guest memory",
            |g, q| {
                g.write_read_request(q, 0);
                g.write_desc(
                    q,
                    1,
                    GUEST_BASE + GUEST_BYTES - 16,
                    512,
                    F_WRITE | F_NEXT,
                    2,
                );
                g.make_available(q, 0);
            },
            Fate::QueueBroken,
        ),
        (
            "data buffer whose address + length wraps 2^64",
            |g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, u64::MAX - 0xff, 512, F_WRITE | F_NEXT, 2);
                g.make_available(q, 0);
            },
            Fate::QueueBroken,
        ),
        (
            "descriptor loop",
            |g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, q.data() + 0x100, 512, F_WRITE | F_NEXT, 0);
                g.make_available(q, 0);
            },
            Fate::QueueBroken,
        ),
        (
            "next index beyond the table",
            |g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, q.data() + 0x100, 512, F_WRITE | F_NEXT, 999);
                g.make_available(q, 0);
            },
            Fate::QueueBroken,
        ),
        (
            "head index beyond the queue",
            |g, q| {
                g.write_read_request(q, 0);
                g.make_available(q, 200);
            },
            Fate::QueueBroken,
        ),
        (
            "avail idx jumping by 1000",
            |g, q| {
                g.write_read_request(q, 0);
                g.publish_avail_idx(q, q.avail_idx.wrapping_add(1000));
            },
            Fate::QueueBroken,
        ),
        (
            "read past the end of the disk",
            |g, q| {
                g.write_read_request(q, 1 << 40);
                g.make_available(q, 0);
            },
            Fate::Completed(S_IOERR),
        ),
        (
            "chain without a device-writable status byte",
            |g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 2, q.data() + 0x80, 1, 0, 0);
                g.make_available(q, 0);
            },
            Fate::CompletedEmpty,
        ),
    ];
    for (what, hostile, expected) in cases {
        let fate = descriptor_case(&pair, hostile);
        assert_eq!(fate, expected, "{what}");
        pair.assert_unharmed(what);
    }
}

// ---------------------------------------------------------------------------------------------
// Eventfds that would block.

#[test]
fn a_call_eventfd_that_would_block_does_not_stall_the_iothread() {
    // A and B on one iothread: a blocking write to A's call fd would stall B as well.
    let pair = Pair::start(Iothreads::Shared);
    let guest = Guest::new(GUEST_BYTES);
    let h = Hostile::with_memory(&pair.a, &guest);
    let mut q0 = Vq::new(0);
    // A blocking eventfd one signal short of its limit: a blocking write of 1 waits forever.
    q0.call = EventFd::new(0).unwrap();
    q0.call.write(u64::MAX - 1).unwrap();
    assert_eq!(h.start_queue(&q0), Answer::Accepted);
    assert_eq!(guest.read_sector(&mut q0, 0, REPLY_WAIT), Some(S_OK));
    assert_eq!(guest.read_sector(&mut q0, 8, REPLY_WAIT), Some(S_OK));
    pair.daemon.assert_responsive(REPLY_WAIT);
    verify_job_passes(&pair.b, "export B beside a full call eventfd");
    drop(h);
    pair.assert_unharmed("a full call eventfd");
}

// ---------------------------------------------------------------------------------------------
// 7. A frontend killed mid-I/O.

/// The ringblk-bench binary: `RINGBLK_BENCH`, or next to this test's target directory (build
/// it with `cargo build -p ringblk-bench`); built here if missing.
fn bench_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("RINGBLK_BENCH") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/hostile-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir.join("ringblk-bench");
    if !bin.exists() {
        let target_dir = profile_dir.parent().unwrap();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "ringblk-bench", "--target-dir"])
            .arg(target_dir)
            .status()
            .expect("run cargo build -p ringblk-bench");
        assert!(status.success(), "cargo build -p ringblk-bench failed");
    }
    bin
}

/// Starts `ringblk-bench run` against `socket` with a long time-based write job and returns
/// once it reports progress (its I/O is running).
fn start_bench_child(socket: &Path, jobfile: &Path) -> Child {
    let mut child = Command::new(bench_binary())
        .arg("run")
        .arg("--socket")
        .arg(socket)
        .arg(jobfile)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringblk-bench");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    // The first progress line comes after a second of I/O.
    let deadline = Instant::now() + JOB_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("IOPS") => return child,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("ringblk-bench reported no progress within {JOB_WAIT:?}");
            }
        }
    }
}

fn kill_mid_run(mut child: Child) {
    assert!(
        child.try_wait().unwrap().is_none(),
        "the 60 s job ended early"
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
}

#[test]
fn frontend_killed_mid_io_leaves_both_exports_serving() {
    let pair = Pair::start(Iothreads::Shared);
    let dir = tempfile::tempdir().unwrap();
    let jobfile = dir.path().join("write.fio");
    std::fs::write(
        &jobfile,
        "[w]\nrw=randwrite\nbs=4k\niodepth=32\nsize=8m\nnumjobs=2\nruntime=60\ntime_based\n",
    )
    .unwrap();
    let kill_then_reconnect = || {
        kill_mid_run(start_bench_child(&pair.a, &jobfile));
        pair.daemon.assert_responsive(REPLY_WAIT);
        verify_job_passes(&pair.a, "export A after its frontend was killed");
    };
    kill_then_reconnect();
    // Again, with B under load from another thread meanwhile (A and B share an iothread).
    let b = pair.b.clone();
    let load = std::thread::spawn(move || {
        let j = job("[l]\nrw=randrw\nbs=4k\niodepth=8\nsize=4m\nruntime=3\ntime_based\n");
        run_job(&b, &j, &quiet()).map_err(|e| e.to_string())
    });
    kill_then_reconnect();
    let report = within(JOB_WAIT, "the load on B", move || load.join())
        .expect("load thread")
        .expect("the load job on B");
    assert!(report.passed(), "{report}");
    pair.assert_unharmed("a frontend killed mid-I/O");
}

// ---------------------------------------------------------------------------------------------
// 8. Bytes that are not vhost-user.

#[test]
fn garbage_and_oversized_messages_close_only_their_connection() {
    let pair = Pair::start(Iothreads::Separate);
    let set_vring_num: u32 = FrontendReq::SET_VRING_NUM.into();
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "garbage bytes",
            (0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect(),
        ),
        (
            "a header announcing a 2 GiB payload",
            raw_message(set_vring_num, VERSION_1_FLAGS, &[])
                .into_iter()
                .take(8)
                .chain(0x8000_0000u32.to_le_bytes())
                .collect(),
        ),
        (
            "an unknown request code",
            raw_message(0xffff, VERSION_1_FLAGS | NEED_REPLY, &[0; 8]),
        ),
        (
            "a reply flag on a request",
            raw_message(set_vring_num, VERSION_1_FLAGS | 0x4, &vring_state(0, 16)),
        ),
    ];
    for (what, bytes) in cases {
        let h = Hostile::negotiated(&pair.a);
        h.send_raw(&bytes);
        assert!(h.closed_by_daemon(), "{what}: the connection stays open");
        pair.assert_unharmed(what);
    }
}

#[test]
fn a_frontend_stalling_mid_message_does_not_stall_the_daemon() {
    let pair = Pair::start(Iothreads::Shared);
    let set_mem_table: u32 = FrontendReq::SET_MEM_TABLE.into();
    let whole = raw_message(set_mem_table, VERSION_1_FLAGS | NEED_REPLY, &[0; 0x400]);
    let cases = [
        (
            "a header whose 1 KiB payload never comes",
            &whole[..HEADER_BYTES],
        ),
        ("half a payload", &whole[..HEADER_BYTES + 0x200]),
        ("five bytes of a header", &whole[..5]),
    ];
    for (what, bytes) in cases {
        let h = Hostile::negotiated(&pair.a);
        h.send_raw(bytes);
        // While the message is incomplete (the socket stays open), everything else goes on.
        pair.daemon.assert_responsive(REPLY_WAIT);
        verify_job_passes(
            &pair.b,
            &format!("export B while A's frontend sends {what}"),
        );
        assert!(h.closed_by_daemon(), "{what}: the connection stays open");
        pair.assert_unharmed(what);
    }
}

// ---------------------------------------------------------------------------------------------
// qemu-storage-daemon, for contrast.
//
// Measured with `cargo test -p ringblk-virtio --test hostile -- --ignored --nocapture` against
// qemu-storage-daemon 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1), each act on a fresh QSD
// with the same two exports, EVENT_IDX negotiated. QSD died, taking export B with it, on:
// - SET_VRING_NUM 2^31, then one request: SIGSEGV;
// - GET_VRING_BASE for vring 200: SIGABRT (libvhost-user's `qidx < dev->max_queues` assertion);
// - a 1 GiB region over a 1 MiB memfd with the rings past the end of the file: SIGBUS;
// - a used ring starting 4 bytes before the end of its region, then one request: SIGSEGV.
// It survived (B kept serving) SET_VRING_NUM 0, 3 and 2^16, the other vring messages for vring
// 200, the oversized region without rings in it, overlapping regions, a descriptor table running
// past its region (only its first entries were read), an avail ring wrapping 2^64, data buffers
// wrapping, straddling or outside guest memory, a descriptor loop, a head beyond the queue, an
// avail idx jump of 1000, garbage bytes and a header whose payload never comes. ringblk refuses
// or contains all of them, as the tests above assert.

/// QSD with the same two exports.
struct Qsd {
    child: Child,
    a: PathBuf,
    b: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qsd {
    fn start() -> Option<Qsd> {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.sock"), dir.path().join("b.sock"));
        let (ia, ib) = (dir.path().join("a.img"), dir.path().join("b.img"));
        for img in [&ia, &ib] {
            File::create(img).unwrap().set_len(16 << 20).unwrap();
        }
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=fa,filename={}", ia.display()))
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=fb,filename={}", ib.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=a,node-name=fa,addr.type=unix,addr.path={},writable=on,num-queues=2",
                a.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=b,node-name=fb,addr.type=unix,addr.path={},writable=on",
                b.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + REPLY_WAIT;
        while !(a.exists() && b.exists()) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Qsd {
            child,
            a,
            b,
            _dir: dir,
        })
    }

    /// How QSD fared: "alive, B serves", "alive, B fails: ...", or how it died.
    fn verdict(&mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = self.child.try_wait().unwrap() {
            let mut err = String::new();
            let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
            let last = err.lines().last().unwrap_or("").to_owned();
            return format!("DIED ({status}) {last}");
        }
        match run_verify_job(&self.b, "B on QSD") {
            Ok(r) if r.passed() => "alive, B serves".into(),
            Ok(r) => format!("alive, B verify failed: {r}"),
            Err(e) => format!("alive, B fails: {e}"),
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets queue 0 up with `num` entries (sent raw, any u32) at `config`, starts it and submits
/// one read, so that whatever the daemon believes about the queue gets used.
fn queue_then_read(a: &Path, num: u32, config: VringConfigData) {
    let guest = Guest::new(GUEST_BYTES);
    let h = Hostile::with_memory(a, &guest);
    let mut q0 = Vq::new(0);
    let _ = h.raw_request(FrontendReq::SET_VRING_NUM, &vring_state(0, num));
    let (kick, call) = (q0.kick.try_clone().unwrap(), q0.call.try_clone().unwrap());
    let _ = h.ask(move |fe| {
        fe.set_vring_addr(0, &config)?;
        fe.set_vring_base(0, 0)?;
        fe.set_vring_kick(0, &kick)?;
        fe.set_vring_call(0, &call)?;
        fe.set_vring_enable(0, true)
    });
    let _ = guest.read_sector(&mut q0, 0, QUIET);
}

/// The hostile acts of the tests above, each on a fresh QSD; prints what became of QSD.
#[test]
#[ignore = "contrast with qemu-storage-daemon; run by hand with --nocapture"]
fn qsd_contrast() {
    type Act = Box<dyn Fn(&Path)>;
    let honest = Vq::new(0).config();
    let with = |f: fn(&mut VringConfigData)| {
        let mut c = honest;
        f(&mut c);
        c
    };
    let num = |n: u32| -> Act { Box::new(move |a| queue_then_read(a, n, honest)) };
    let ring = |c: VringConfigData| -> Act { Box::new(move |a| queue_then_read(a, 16, c)) };
    let descriptor = |write: fn(&Guest, &mut Vq)| -> Act {
        Box::new(move |a| {
            let guest = Guest::new(GUEST_BYTES);
            let h = Hostile::with_memory(a, &guest);
            let mut q0 = Vq::new(0);
            let _ = h.start_queue(&q0);
            write(&guest, &mut q0);
            std::thread::sleep(QUIET);
        })
    };
    let table = |regions: fn(&Guest) -> Vec<VhostUserMemoryRegionInfo>| -> Act {
        Box::new(move |a| {
            let guest = Guest::new(GUEST_BYTES);
            let h = Hostile::negotiated(a);
            let regions = regions(&guest);
            let _ = h.ask(move |fe| fe.set_mem_table(&regions));
            let mut q0 = Vq::new(0);
            let _ = h.start_queue(&q0);
            let _ = guest.read_sector(&mut q0, 0, QUIET);
        })
    };
    let mut acts: Vec<(String, Act)> = vec![
        ("SET_VRING_NUM 2^31".into(), num(1 << 31)),
        ("SET_VRING_NUM 2^16".into(), num(1 << 16)),
        ("SET_VRING_NUM 0".into(), num(0)),
        ("SET_VRING_NUM 3".into(), num(3)),
    ];
    for (i, (name, _)) in vring_messages(200).into_iter().enumerate() {
        let act: Act = Box::new(move |a| {
            let guest = Guest::new(GUEST_BYTES);
            let h = Hostile::with_memory(a, &guest);
            let (_, request) = vring_messages(200).into_iter().nth(i).unwrap();
            let _ = h.ask(request);
        });
        acts.push((format!("{name} for vring 200"), act));
    }
    let more: Vec<(&str, Act)> = vec![
        (
            "1 GiB region over a 1 MiB memfd",
            table(|g| vec![g.region_claiming(GUEST_BASE, 1 << 30, FRONTEND_BASE, 0)]),
        ),
        (
            "1 GiB region over a 1 MiB memfd, rings past the file",
            Box::new(|a| {
                let guest = Guest::new(GUEST_BYTES);
                let h = Hostile::negotiated(a);
                let region = guest.region_claiming(GUEST_BASE, 1 << 30, FRONTEND_BASE, 0);
                let _ = h.ask(move |fe| fe.set_mem_table(&[region]));
                let mut config = Vq::new(0).config();
                let beyond = 512 << 20;
                config.desc_table_addr += beyond;
                config.avail_ring_addr += beyond;
                config.used_ring_addr += beyond;
                let kick = EventFd::new(EFD_NONBLOCK).unwrap();
                let _ = h.ask(move |fe| {
                    fe.set_vring_num(0, QUEUE_SIZE)?;
                    fe.set_vring_addr(0, &config)?;
                    fe.set_vring_base(0, 0)?;
                    fe.set_vring_kick(0, &kick)?;
                    fe.set_vring_enable(0, true)
                });
            }),
        ),
        (
            "overlapping regions",
            table(|g| {
                vec![
                    g.region(),
                    g.region_claiming(GUEST_BASE + 0x8_0000, 0x8_0000, 1 << 40, 0),
                ]
            }),
        ),
        (
            "used ring running past its region",
            ring(with(|c| c.used_ring_addr = FRONTEND_BASE + GUEST_BYTES - 4)),
        ),
        (
            "descriptor table running past its region",
            ring(with(|c| {
                c.desc_table_addr = FRONTEND_BASE + GUEST_BYTES - 0x10
            })),
        ),
        (
            "avail ring wrapping 2^64",
            ring(with(|c| c.avail_ring_addr = u64::MAX - 1)),
        ),
        (
            "data buffer wrapping 2^64",
            descriptor(|g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, u64::MAX - 0xff, 512, F_WRITE | F_NEXT, 2);
                g.make_available(q, 0);
            }),
        ),
        (
            "data buffer straddling the end of guest memory",
            descriptor(|g, q| {
                g.write_read_request(q, 0);
                g.write_desc(
                    q,
                    1,
                    GUEST_BASE + GUEST_BYTES - 16,
                    512,
                    F_WRITE | F_NEXT,
                    2,
                );
                g.make_available(q, 0);
            }),
        ),
        (
            "data buffer outside guest memory",
            descriptor(|g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, 0xdead_0000_0000, 512, F_WRITE | F_NEXT, 2);
                g.make_available(q, 0);
            }),
        ),
        (
            "descriptor loop",
            descriptor(|g, q| {
                g.write_read_request(q, 0);
                g.write_desc(q, 1, q.data() + 0x100, 512, F_WRITE | F_NEXT, 0);
                g.make_available(q, 0);
            }),
        ),
        (
            "head index beyond the queue",
            descriptor(|g, q| {
                g.write_read_request(q, 0);
                g.make_available(q, 200);
            }),
        ),
        (
            "avail idx jump of 1000",
            descriptor(|g, q| {
                g.write_read_request(q, 0);
                g.publish_avail_idx(q, q.avail_idx.wrapping_add(1000));
            }),
        ),
        (
            "garbage bytes",
            Box::new(|a| {
                let h = Hostile::negotiated(a);
                h.send_raw(&[0xa5; 64]);
                let _ = h.closed_by_daemon();
            }),
        ),
        (
            "a header whose payload never comes",
            Box::new(|a| {
                let h = Hostile::negotiated(a);
                let code: u32 = FrontendReq::SET_MEM_TABLE.into();
                h.send_raw(&raw_message(code, VERSION_1_FLAGS, &[0; 0x400])[..HEADER_BYTES]);
                std::thread::sleep(QUIET);
                // Kept open while B is tried.
                std::mem::forget(h);
            }),
        ),
    ];
    acts.extend(more.into_iter().map(|(w, a)| (w.to_owned(), a)));
    println!("\nqemu-storage-daemon against the hostile frontend:");
    for (what, act) in acts {
        let Some(mut qsd) = Qsd::start() else {
            println!("qemu-storage-daemon did not start; skipping");
            return;
        };
        let a = qsd.a.clone();
        let acted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| act(&a)));
        let verdict = qsd.verdict();
        let note = if acted.is_err() {
            " (frontend side panicked)"
        } else {
            ""
        };
        println!("  {what:<52} {verdict}{note}");
    }
}
