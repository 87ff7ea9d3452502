//! The vhost-user-blk export: a unix socket, one frontend at a time, its queues on ring contexts.
//!
//! The listening socket and the connection are external sources of the main context in the
//! export's *control* group, which drains never mute; the queues' kicks are sources of the
//! export's *device* group on the rings that serve them, which the export registers with its
//! backend handle as a [`MuteTarget`]: draining the export's node (or anything below it) mutes
//! exactly this device.
//!
//! One frontend at a time: while one is connected the listening socket is not polled, so the
//! next connection waits in the backlog; after a disconnect (or a frontend killed mid-I/O) every
//! queue is stopped, each waiting for its in-flight requests, and the memory is unmapped only
//! then; the export then accepts the next connection (QEMU's reconnect).
//!
//! The frontend is untrusted (design invariant 4), and the main context serves every export, so
//! no frontend may block it: a message is handed to the vhost crate, whose reads block, only
//! once the socket holds all of it. A frontend that stops halfway through a message is given
//! [`PARTIAL_MESSAGE_TIMEOUT`] to finish, its connection muted meanwhile, then disconnected.
//! A refused request that the frontend waits on (one with a reply, or NEED_REPLY) ends the
//! connection too: the vhost crate answers some refusals and not others, and a frontend left
//! waiting for an answer would hang.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv};
use ringblk_blkgraph::{BackendHandle, MuteTarget};
use ringblk_ring::{Context, Group, Op, Remote, SourceId};
use vhost::vhost_user::message::{FrontendReq, MAX_MSG_SIZE, VhostUserHeaderFlag};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::backend::{BlkBackend, Device, VHOST_USER_VERSION};
use crate::config::{BlkConfig, device_id};

/// How an export is set up, as QSD's `--export type=vhost-user-blk` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// `id`.
    pub id: String,
    /// `addr.path`.
    pub path: PathBuf,
    /// `writable` (QSD's default: off).
    pub writable: bool,
    /// `num-queues` (default 1).
    pub num_queues: u16,
    /// `logical-block-size` (512 or 4096; default 512).
    pub logical_block_size: u32,
}

/// How long a frontend may take to send the rest of a message it has begun.
const PARTIAL_MESSAGE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a partly received message is looked at again meanwhile.
const PARTIAL_MESSAGE_RECHECK: Duration = Duration::from_millis(10);
/// Bytes of a vhost-user message header: request, flags, size (native endian u32s).
const HEADER_BYTES: usize = 12;

/// Requests that are always answered with a message of their own (not a REPLY_ACK).
const ANSWERED: [FrontendReq; 12] = [
    FrontendReq::GET_FEATURES,
    FrontendReq::GET_PROTOCOL_FEATURES,
    FrontendReq::GET_VRING_BASE,
    FrontendReq::GET_QUEUE_NUM,
    FrontendReq::GET_CONFIG,
    FrontendReq::GET_INFLIGHT_FD,
    FrontendReq::GET_MAX_MEM_SLOTS,
    FrontendReq::GET_STATUS,
    FrontendReq::GET_SHARED_OBJECT,
    FrontendReq::SET_DEVICE_STATE_FD,
    FrontendReq::CHECK_DEVICE_STATE,
    FrontendReq::GET_SHMEM_CONFIG,
];

type Handler = BackendReqHandler<Mutex<BlkBackend>>;

struct Connection {
    handler: Handler,
    backend: Arc<Mutex<BlkBackend>>,
    source: SourceId,
    /// When the message now partly received began to arrive.
    partial_since: Option<Instant>,
}

struct Inner {
    device: Arc<Device>,
    control: Group,
    listener: UnixListener,
    listening: RefCell<Option<SourceId>>,
    connection: RefCell<Option<Connection>>,
}

/// A running export. Lives on the main context; dropping it does not stop it, [`Export::stop`]
/// does.
pub struct Export(Rc<Inner>);

impl Export {
    /// Binds the socket (replacing a stale one at the path, as QEMU does) and starts listening
    /// on the current (main) context. Queues will be served by `rings`, round-robin.
    pub fn start(
        config: &ExportConfig,
        handle: BackendHandle,
        rings: Vec<Remote>,
    ) -> io::Result<Export> {
        assert!(!rings.is_empty(), "an export needs at least one ring");
        let root = handle.root();
        if config.writable && root.read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "export '{}': node '{}' is read-only, it cannot be exported writable",
                    config.id,
                    root.name()
                ),
            ));
        }
        let mut blk = BlkConfig::new(root.size() / 512, config.num_queues);
        blk.blk_size = config.logical_block_size;
        blk.read_only = !config.writable;
        blk.validate().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("export '{}': {e}", config.id),
            )
        })?;
        let _ = std::fs::remove_file(&config.path);
        let listener = UnixListener::bind(&config.path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Failed to bind socket to {}: {e}", config.path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let group = Group::new();
        handle.add_mute_target(MuteTarget {
            group,
            rings: rings.clone(),
        });
        let device = Arc::new(Device {
            export_id: config.id.clone(),
            capacity_sectors: AtomicU64::new(blk.capacity_sectors),
            initial_config: blk,
            handle,
            group,
            rings,
            device_id: device_id(&config.id),
        });
        let export = Export(Rc::new(Inner {
            device,
            control: Group::new(),
            listener,
            listening: RefCell::new(None),
            connection: RefCell::new(None),
        }));
        listen(&export.0);
        Ok(export)
    }

    /// The export's id.
    pub fn id(&self) -> &str {
        &self.0.device.export_id
    }

    /// The handle the export's device submits to.
    pub fn handle(&self) -> &BackendHandle {
        &self.0.device.handle
    }

    /// The node behind the export changed size (`block_resize`): the device's capacity follows
    /// it (whole 512-byte sectors), and a connected frontend is told at once.
    pub fn capacity_changed(&self) {
        let sectors = self.0.device.handle.root().size() / 512;
        self.0
            .device
            .capacity_sectors
            .store(sectors, Ordering::Relaxed);
        if let Some(conn) = self.0.connection.borrow().as_ref() {
            conn.backend
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .capacity_changed();
        }
    }

    /// Whether a frontend is connected.
    pub fn is_connected(&self) -> bool {
        self.0.connection.borrow().is_some()
    }

    /// Stops the export: disconnects the frontend (its queues stop after their in-flight
    /// requests complete), stops listening and removes the socket file.
    pub fn stop(self, path: &std::path::Path) {
        disconnect(&self.0);
        if let Some(source) = self.0.listening.borrow_mut().take() {
            Context::current().remove_source(source);
        }
        self.0.device.handle.remove_mute_target(self.0.device.group);
        let _ = std::fs::remove_file(path);
    }
}

fn listen(inner: &Rc<Inner>) {
    let weak = Rc::downgrade(inner);
    let fd = inner.listener.as_raw_fd();
    let source = Context::current().add_fd_source(inner.control, fd, move || {
        if let Some(inner) = weak.upgrade() {
            accept(&inner);
        }
    });
    *inner.listening.borrow_mut() = Some(source);
}

fn accept(inner: &Rc<Inner>) {
    let stream = match inner.listener.accept() {
        Ok((stream, _)) => stream,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
        Err(e) => {
            eprintln!(
                "ringblk: export '{}': accept failed: {e}",
                inner.device.export_id
            );
            return;
        }
    };
    let ctx = Context::current();
    if let Some(source) = inner.listening.borrow_mut().take() {
        ctx.remove_source(source);
    }
    let backend = Arc::new(Mutex::new(BlkBackend::new(inner.device.clone())));
    let handler = BackendReqHandler::from_stream(stream, backend.clone());
    let weak = Rc::downgrade(inner);
    let source = ctx.add_fd_source(inner.control, handler.as_raw_fd(), move || {
        if let Some(inner) = weak.upgrade() {
            serve_message(&inner);
        }
    });
    *inner.connection.borrow_mut() = Some(Connection {
        handler,
        backend,
        source,
        partial_since: None,
    });
}

fn serve_message(inner: &Rc<Inner>) {
    let buffered = match inner.connection.borrow().as_ref() {
        Some(conn) => buffered(conn.handler.as_raw_fd()),
        None => return,
    };
    let header = match buffered {
        Buffered::Nothing => return,
        Buffered::Part => return wait_for_rest(inner),
        Buffered::Whole(header) => header,
    };
    let result = match inner.connection.borrow_mut().as_mut() {
        Some(conn) => {
            conn.partial_since = None;
            match header {
                Some(h) if h.request == u32::from(FrontendReq::SET_BACKEND_REQ_FD) => {
                    take_backend_channel(conn, h)
                }
                _ => conn.handler.handle_request(),
            }
        }
        None => return,
    };
    match result {
        Ok(()) => {}
        Err(VhostError::Disconnected) => reconnectable(inner),
        Err(e) if is_fatal(&e) => {
            eprintln!(
                "ringblk: export '{}': closing the connection: {e}",
                inner.device.export_id
            );
            reconnectable(inner);
        }
        Err(e) if header.is_some_and(|h| h.awaits_answer()) => {
            eprintln!(
                "ringblk: export '{}': closing the connection: request {} refused while the frontend waits for an answer: {e}",
                inner.device.export_id,
                header.map_or(0, |h| h.request),
            );
            reconnectable(inner);
        }
        Err(e) => eprintln!(
            "ringblk: export '{}': vhost-user request refused: {e}",
            inner.device.export_id
        ),
    }
}

/// SET_BACKEND_REQ_FD, read here instead of by the vhost crate: the crate wraps the channel in
/// a `Backend` that cannot send CONFIG_CHANGE_MSG (vhost 0.18), so the backend keeps the
/// socket itself. Answers NEED_REPLY as the crate would (REPLY_ACK, 0 for success).
fn take_backend_channel(conn: &Connection, header: Header) -> Result<(), VhostError> {
    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    let fd = conn.handler.as_raw_fd();
    let size = usize::try_from(header.size).map_err(|_| VhostError::InvalidMessage)?;
    let mut bytes = vec![0u8; HEADER_BYTES + size];
    let mut iov = [io::IoSliceMut::new(&mut bytes)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), flags)
        .map_err(|e| VhostError::SocketError(e.into()))?;
    let received: Vec<RawFd> = msg
        .cmsgs()
        .map_err(|e| VhostError::SocketError(e.into()))?
        .flat_map(|cmsg| match cmsg {
            ControlMessageOwned::ScmRights(fds) => fds,
            _ => Vec::new(),
        })
        .collect();
    let owned: Vec<OwnedFd> = received
        .into_iter()
        // SAFETY: recvmsg has just created these descriptors in this process for this message;
        // nothing else knows them, so each OwnedFd is their only owner.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let Ok([channel]) = <[OwnedFd; 1]>::try_from(owned) else {
        return Err(VhostError::IncorrectFds);
    };
    if msg.bytes != bytes.len() {
        return Err(VhostError::PartialMessage);
    }
    if header.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0 {
        let mut reply = Vec::with_capacity(HEADER_BYTES + 8);
        reply.extend_from_slice(&header.request.to_ne_bytes());
        let flags = VHOST_USER_VERSION | VhostUserHeaderFlag::REPLY.bits();
        reply.extend_from_slice(&flags.to_ne_bytes());
        reply.extend_from_slice(&8u32.to_ne_bytes());
        reply.extend_from_slice(&0u64.to_ne_bytes());
        let sent = nix::sys::socket::send(fd, &reply, MsgFlags::MSG_NOSIGNAL)
            .map_err(|e| VhostError::SocketError(e.into()))?;
        if sent != reply.len() {
            return Err(VhostError::PartialMessage);
        }
    }
    conn.backend
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_backend_channel(UnixStream::from(channel));
    Ok(())
}

/// Drops the connection and listens for the next frontend.
fn reconnectable(inner: &Rc<Inner>) {
    disconnect(inner);
    listen(inner);
}

/// What a vhost-user message header says about its request.
#[derive(Clone, Copy, Debug)]
struct Header {
    request: u32,
    flags: u32,
    size: u32,
}

impl Header {
    fn parse(b: [u8; HEADER_BYTES]) -> Header {
        let [r0, r1, r2, r3, f0, f1, f2, f3, s0, s1, s2, s3] = b;
        Header {
            request: u32::from_ne_bytes([r0, r1, r2, r3]),
            flags: u32::from_ne_bytes([f0, f1, f2, f3]),
            size: u32::from_ne_bytes([s0, s1, s2, s3]),
        }
    }

    /// Whether the frontend waits for an answer to this request.
    fn awaits_answer(&self) -> bool {
        self.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
            || ANSWERED.iter().any(|&r| u32::from(r) == self.request)
    }
}

/// How much of the next message the connection's socket holds.
enum Buffered {
    /// Nothing to read (a wake-up without data).
    Nothing,
    /// The beginning of a message: reading it now would block.
    Part,
    /// A whole message (its header, when it could be peeked), or the end of the stream, or a
    /// socket error: the vhost crate reads it without blocking.
    Whole(Option<Header>),
}

fn buffered(fd: RawFd) -> Buffered {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD stores one c_int, the bytes queued on the socket, into the live local.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut queued) } < 0 {
        return Buffered::Whole(None);
    }
    let queued = usize::try_from(queued).unwrap_or(0);
    let mut header = [0u8; HEADER_BYTES];
    match recv(fd, &mut header, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Err(Errno::EAGAIN) => Buffered::Nothing,
        Err(_) | Ok(0) => Buffered::Whole(None),
        Ok(_) if queued < HEADER_BYTES => Buffered::Part,
        // The header is all there, split where file descriptors were attached: a peek stops
        // there, a read does not.
        Ok(n) if n < HEADER_BYTES => Buffered::Whole(None),
        Ok(_) => {
            let h = Header::parse(header);
            let size = usize::try_from(h.size).unwrap_or(usize::MAX);
            // An oversized message is refused from its header alone.
            if size > MAX_MSG_SIZE || queued >= HEADER_BYTES + size {
                Buffered::Whole(Some(h))
            } else {
                Buffered::Part
            }
        }
    }
}

/// A message has begun to arrive but is not whole: looks again a little later, the connection
/// muted meanwhile (its socket stays readable, which would otherwise dispatch it in a busy
/// loop); disconnects a frontend that has not finished within PARTIAL_MESSAGE_TIMEOUT.
fn wait_for_rest(inner: &Rc<Inner>) {
    let since = match inner.connection.borrow_mut().as_mut() {
        Some(conn) => *conn.partial_since.get_or_insert_with(Instant::now),
        None => return,
    };
    if since.elapsed() >= PARTIAL_MESSAGE_TIMEOUT {
        eprintln!(
            "ringblk: export '{}': closing the connection: a message left incomplete for {PARTIAL_MESSAGE_TIMEOUT:?}",
            inner.device.export_id
        );
        return reconnectable(inner);
    }
    let ctx = Context::current();
    ctx.mute(inner.control);
    let control = inner.control;
    let unmute = move |_op, _result| Context::current().unmute(control);
    if let Err(rejected) = ctx.submit(Op::timeout(PARTIAL_MESSAGE_RECHECK), unmute) {
        rejected.fail_later();
    }
}

/// Errors after which the byte stream cannot be trusted to be in step any more.
fn is_fatal(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::PartialMessage
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_)
            | VhostError::InvalidMessage
            | VhostError::OversizedMsg
            | VhostError::IncorrectFds
    )
}

fn disconnect(inner: &Rc<Inner>) {
    let Some(conn) = inner.connection.borrow_mut().take() else {
        return;
    };
    Context::current().remove_source(conn.source);
    conn.backend
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stop_all();
}
