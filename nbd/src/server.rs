//! The NBD server: a listener, its exports, and the connections that serve them.
//!
//! A listener thread accepts connections; each gets a handshake thread (control path, with a
//! timeout). A connection that picked an export moves to the export's ring context, where its
//! requests go to the export's [`BackendHandle`] (so a mirror's pivot moves them too), many in
//! flight at once, each replied to when it completes, in whatever order that is.
//!
//! A connection reads no further requests while [`IN_FLIGHT_MAX`] requests or
//! [`IN_FLIGHT_BYTES_MAX`] bytes are in flight, or while [`OUT_BYTES_MAX`] bytes of replies
//! wait to be sent: a client that sends without reading replies is held back, not buffered.
//! A malformed request closes that connection only; requests already in flight complete first.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{Shutdown, shutdown};
use ringblk_blkgraph::{BackendHandle, BlockError, BlockResult, Contents, Request};
use ringblk_ring::Remote;
use ringblk_ring::buf::{IoBuffers, OwnedBuf};

use crate::addr::{Address, Listener, Socket};
use crate::handshake::{self, Catalog, ExportInfo, Negotiated};
use crate::proto::*;
use crate::stream::{Peer, Stream};

/// Requests one connection may have in flight.
pub const IN_FLIGHT_MAX: usize = 128;
/// Payload bytes one connection may have in flight.
pub const IN_FLIGHT_BYTES_MAX: usize = 64 << 20;
/// Reply bytes one connection may have waiting to be sent.
pub const OUT_BYTES_MAX: usize = 64 << 20;
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most extents one BLOCK_STATUS reply describes.
const EXTENTS_MAX: usize = 1024;

/// An export's settings (QAPI's `BlockExportOptionsNbd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// The name clients ask for.
    pub name: String,
    /// Free text shown to clients that ask.
    pub description: String,
    /// Whether clients may write.
    pub writable: bool,
}

struct Export {
    config: ExportConfig,
    handle: BackendHandle,
    /// The ring context that serves its connections.
    ring: Remote,
    /// The sockets of its connections, to end them when the export goes away.
    sockets: Mutex<Vec<Arc<OwnedFd>>>,
}

impl Export {
    fn shut_down_connections(&self) {
        for fd in self.sockets.lock().unwrap().iter() {
            let _ = shutdown(fd.as_raw_fd(), Shutdown::Both);
        }
    }
}

struct Shared {
    exports: Mutex<BTreeMap<String, Arc<Export>>>,
    connections: AtomicUsize,
    /// 0: no limit.
    max_connections: usize,
    stopping: AtomicBool,
}

impl Catalog for Shared {
    type Export = Arc<Export>;

    fn list(&self) -> Vec<String> {
        self.exports.lock().unwrap().keys().cloned().collect()
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.lock().unwrap().get(name).cloned()
    }

    fn describe(&self, export: &Arc<Export>, structured: bool) -> ExportInfo {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_CACHE;
        if structured {
            flags |= FLAG_SEND_DF;
        }
        if !export.config.writable {
            // Every connection reads the same node: consistent across connections.
            flags |= FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN;
        }
        let root = export.handle.root();
        ExportInfo {
            size: root.size(),
            flags,
            description: export.config.description.clone(),
            block_min: root.limits().request_alignment,
        }
    }
}

/// A running NBD server (`nbd-server-start`). Dropping it stops it: the listener closes and
/// every export goes away with its connections.
pub struct NbdServer {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    address: Address,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on `address`; at most `max_connections` clients at once (0: no limit).
    pub fn start(address: &Address, max_connections: usize) -> io::Result<NbdServer> {
        let listener = Arc::new(address.listen()?);
        let shared = Arc::new(Shared {
            exports: Mutex::new(BTreeMap::new()),
            connections: AtomicUsize::new(0),
            max_connections,
            stopping: AtomicBool::new(false),
        });
        let thread = std::thread::Builder::new()
            .name("nbd-listen".into())
            .spawn({
                let shared = shared.clone();
                let listener = listener.clone();
                move || accept_loop(&listener, &shared)
            })?;
        Ok(NbdServer {
            shared,
            listener,
            address: address.clone(),
            thread: Some(thread),
        })
    }

    /// Exports `handle`'s node under `config.name`, served on `ring`.
    pub fn add_export(
        &self,
        config: ExportConfig,
        handle: BackendHandle,
        ring: Remote,
    ) -> Result<(), String> {
        if config.name.len() > STRING_BYTES_MAX {
            return Err("export name too long".into());
        }
        let mut exports = self.shared.exports.lock().unwrap();
        if exports.contains_key(&config.name) {
            return Err(format!(
                "NBD server already has export named '{}'",
                config.name
            ));
        }
        let name = config.name.clone();
        let export = Export {
            config,
            handle,
            ring,
            sockets: Mutex::new(Vec::new()),
        };
        exports.insert(name, Arc::new(export));
        Ok(())
    }

    /// Removes export `name` and ends its connections (their in-flight requests complete
    /// first). Returns whether it existed.
    pub fn remove_export(&self, name: &str) -> bool {
        let removed = self.shared.exports.lock().unwrap().remove(name);
        if let Some(export) = &removed {
            export.shut_down_connections();
        }
        removed.is_some()
    }

    /// The node an export serves now.
    pub fn export_node(&self, name: &str) -> Option<String> {
        let exports = self.shared.exports.lock().unwrap();
        exports.get(name).map(|e| e.handle.root().name().to_owned())
    }

    /// Clients connected now (handshakes included).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Where it listens.
    pub fn address(&self) -> &Address {
        &self.address
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept(), which then sees `stopping`.
        let _ = shutdown(self.listener.as_fd().as_raw_fd(), Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Address::Unix(path) = &self.address {
            let _ = std::fs::remove_file(path);
        }
        let exports = std::mem::take(&mut *self.shared.exports.lock().unwrap());
        for export in exports.values() {
            export.shut_down_connections();
        }
    }
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let socket = match accepted {
            Ok(socket) => socket,
            Err(e) => {
                eprintln!("ringblk: nbd: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let count = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        let slot = Slot {
            shared: shared.clone(),
            socket: None,
        };
        if shared.max_connections > 0 && count > shared.max_connections {
            continue; // dropping the socket and the slot refuses the client
        }
        let spawned = std::thread::Builder::new()
            .name("nbd-handshake".into())
            .spawn(move || handshake_then_serve(socket, slot));
        if let Err(e) = spawned {
            eprintln!("ringblk: nbd: cannot start a handshake: {e}");
        }
    }
}

fn handshake_then_serve(mut socket: Socket, mut slot: Slot) {
    let negotiated = socket
        .set_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(handshake::HandshakeError::from)
        .and_then(|()| handshake::serve(&mut socket, &*slot.shared));
    let negotiated = match negotiated {
        Ok(Some(negotiated)) => negotiated,
        Ok(None) => return,
        Err(e) => {
            eprintln!("ringblk: nbd: client handshake failed: {e}");
            return;
        }
    };
    if let Err(e) = socket.set_timeout(None) {
        eprintln!("ringblk: nbd: {e}");
        return;
    }
    let fd = Arc::new(socket.into_fd());
    let export = negotiated.export.clone();
    export.sockets.lock().unwrap().push(fd.clone());
    slot.socket = Some((export.clone(), fd.clone()));
    // Removed meanwhile: its sockets were shut down before ours was listed.
    if slot
        .shared
        .find(&export.config.name)
        .is_none_or(|e| !Arc::ptr_eq(&e, &export))
    {
        return;
    }
    let ring = export.ring.clone();
    ring.defer(move || Connection::start(fd, negotiated, slot));
}

/// One connection's place in the server's count and in its export's socket list; given back
/// when the connection ends.
struct Slot {
    shared: Arc<Shared>,
    socket: Option<(Arc<Export>, Arc<OwnedFd>)>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((export, fd)) = self.socket.take() {
            export
                .sockets
                .lock()
                .unwrap()
                .retain(|s| !Arc::ptr_eq(s, &fd));
        }
        self.shared.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One client in the transmission phase, on its export's ring context.
struct Connection {
    stream: Stream,
    export: Arc<Export>,
    size: u64,
    structured: bool,
    base_allocation: Option<u32>,
    in_flight: usize,
    in_flight_bytes: usize,
    /// No further requests are read (DISC, a protocol error, or the socket failed).
    closing: bool,
    /// The socket failed: nothing more is sent.
    broken: bool,
    _slot: Slot,
}

impl Peer for Connection {
    fn stream(&mut self) -> &mut Stream {
        &mut self.stream
    }

    fn received(this: &Rc<RefCell<Connection>>) {
        Connection::pump(this);
    }

    fn sent(this: &Rc<RefCell<Connection>>) {
        Connection::pump(this);
    }

    fn failed(this: &Rc<RefCell<Connection>>, error: io::Error) {
        let mut c = this.borrow_mut();
        if error.kind() != io::ErrorKind::UnexpectedEof && !c.closing {
            eprintln!(
                "ringblk: nbd: export '{}': connection failed: {error}",
                c.export.config.name
            );
        }
        c.closing = true;
        c.broken = true;
        c.stream.out.clear();
        c.stream.shutdown();
    }
}

impl Connection {
    fn start(fd: Arc<OwnedFd>, negotiated: Negotiated<Arc<Export>>, slot: Slot) {
        let export = negotiated.export;
        let size = export.handle.root().size();
        let conn = Rc::new(RefCell::new(Connection {
            stream: Stream::new(fd),
            export,
            size,
            structured: negotiated.structured,
            base_allocation: negotiated.base_allocation,
            in_flight: 0,
            in_flight_bytes: 0,
            closing: false,
            broken: false,
            _slot: slot,
        }));
        Connection::pump(&conn);
    }

    /// Starts the requests that have arrived, as far as the limits allow, sends what is
    /// queued, and reads on if it may; ends the connection once it is closing and idle.
    fn pump(this: &Rc<RefCell<Connection>>) {
        let mut c = this.borrow_mut();
        while !c.closing && !c.throttled() {
            let header = match parse_request(c.stream.unparsed()) {
                Ok(Some(header)) => header,
                Ok(None) => break,
                Err(e) => {
                    eprintln!(
                        "ringblk: nbd: export '{}': closing the connection: {e}",
                        c.export.config.name
                    );
                    c.closing = true;
                    break;
                }
            };
            let payload_len = header.payload_len();
            let payload =
                OwnedBuf::from_slice(&c.stream.unparsed()[REQUEST_HEADER_BYTES..][..payload_len]);
            c.stream.consume(REQUEST_HEADER_BYTES + payload_len);
            c.handle(this, header, payload);
        }
        if c.broken {
            return;
        }
        c.stream.flush(this);
        if !c.closing && !c.throttled() {
            c.stream.read(this);
        }
        if c.closing && c.in_flight == 0 && !c.stream.sending() {
            // Ends the read in flight, if any; the last op's completion drops the connection.
            c.stream.shutdown();
        }
    }

    fn throttled(&self) -> bool {
        self.in_flight >= IN_FLIGHT_MAX
            || self.in_flight_bytes >= IN_FLIGHT_BYTES_MAX
            || self.stream.out.len() >= OUT_BYTES_MAX
    }

    fn handle(&mut self, this: &Rc<RefCell<Connection>>, h: RequestHeader, payload: OwnedBuf) {
        let writable = self.export.config.writable;
        let range_ok = in_range(h.offset, h.len, self.size);
        let is_write = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if is_write && !writable {
            return self.reply_error(h, EPERM, "export is read-only");
        }
        let request = match h.kind {
            CMD_READ if !range_ok || h.len > REQUEST_BYTES_MAX => {
                return self.reply_error(h, EINVAL, "read beyond the end of the export");
            }
            CMD_READ if h.len == 0 => return self.reply_read(h, &[]),
            CMD_READ => Request::Read {
                offset: h.offset,
                buf: Box::new(OwnedBuf::zeroed(h.len as usize)),
            },
            CMD_WRITE | CMD_WRITE_ZEROES if !range_ok => {
                return self.reply_error(h, ENOSPC, "write beyond the end of the export");
            }
            CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM if h.len == 0 => return self.reply_ok(h),
            CMD_WRITE => Request::Write {
                offset: h.offset,
                buf: Box::new(payload),
            },
            CMD_WRITE_ZEROES => Request::WriteZeroes {
                offset: h.offset,
                len: u64::from(h.len),
                unmap: h.flags & CMD_FLAG_NO_HOLE == 0,
            },
            CMD_TRIM if !range_ok => return self.reply_error(h, EINVAL, "trim beyond the end"),
            CMD_TRIM => Request::Discard {
                offset: h.offset,
                len: u64::from(h.len),
            },
            CMD_FLUSH => Request::Flush,
            CMD_CACHE if !range_ok => return self.reply_error(h, EINVAL, "cache beyond the end"),
            CMD_CACHE => return self.reply_ok(h),
            CMD_BLOCK_STATUS => return self.block_status(h),
            CMD_DISC => {
                self.closing = true;
                return;
            }
            kind => return self.reply_error(h, EINVAL, &format!("unknown command {kind}")),
        };
        self.in_flight += 1;
        self.in_flight_bytes += h.len as usize;
        let conn = this.clone();
        let fua = h.flags & CMD_FLAG_FUA != 0 && is_write;
        self.export.handle.submit(
            request,
            Box::new(move |result, req| Connection::completed(&conn, h, fua, result, req)),
        );
    }

    /// A request completed: a FUA write still flushes; everything else is replied to.
    fn completed(
        this: &Rc<RefCell<Connection>>,
        h: RequestHeader,
        fua: bool,
        result: BlockResult,
        req: Request,
    ) {
        if fua && result.is_ok() {
            let handle = this.borrow().export.handle.clone();
            let conn = this.clone();
            let done = move |result, _| Connection::completed(&conn, h, false, result, req);
            return handle.submit(Request::Flush, Box::new(done));
        }
        {
            let mut c = this.borrow_mut();
            c.in_flight -= 1;
            c.in_flight_bytes -= h.len as usize;
            match result {
                Err(e) => {
                    let message = e.to_string();
                    c.reply_error(h, block_error(&e), &message);
                }
                Ok(()) => match req.into_buf() {
                    Some(buf) if h.kind == CMD_READ => c.reply_read(h, read_bytes(buf).as_slice()),
                    _ => c.reply_ok(h),
                },
            }
        }
        Connection::pump(this);
    }

    fn block_status(&mut self, h: RequestHeader) {
        let Some(context) = self.base_allocation else {
            return self.reply_error(h, EINVAL, "no metadata context was negotiated");
        };
        if h.len == 0 || !in_range(h.offset, h.len, self.size) {
            return self.reply_error(h, EINVAL, "block status beyond the end of the export");
        }
        let root = self.export.handle.root();
        let end = h.offset + u64::from(h.len);
        let most = if h.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            EXTENTS_MAX
        };
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut at = h.offset;
        while at < end && extents.len() < most {
            let extent = match root.block_status(at, end - at) {
                Ok(extent) => extent,
                Err(e) => {
                    let message = e.to_string();
                    return self.reply_error(h, block_error(&e), &message);
                }
            };
            let flags = match extent.contents {
                Contents::Zero => STATE_HOLE | STATE_ZERO,
                Contents::Data => 0,
            };
            // `extent.len` is at most `end - at`, which is at most `h.len`: a u32.
            let len = u32::try_from(extent.len).expect("extent within a u32 request");
            match extents.last_mut() {
                Some(last) if last.1 == flags => last.0 += len,
                _ => extents.push((len, flags)),
            }
            at += extent.len;
        }
        let out = &mut self.stream.out;
        let len = 4 + 8 * len32(extents.len());
        encode_chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h.cookie, len);
        out.extend_from_slice(&context.to_be_bytes());
        for (len, flags) in extents {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }

    fn reply_ok(&mut self, h: RequestHeader) {
        if !self.broken {
            encode_simple_reply(&mut self.stream.out, 0, h.cookie);
        }
    }

    fn reply_read(&mut self, h: RequestHeader, data: &[u8]) {
        if self.broken {
            return;
        }
        let out = &mut self.stream.out;
        if self.structured {
            let len = 8 + len32(data.len());
            encode_chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h.cookie, len);
            out.extend_from_slice(&h.offset.to_be_bytes());
        } else {
            encode_simple_reply(out, 0, h.cookie);
        }
        out.extend_from_slice(data);
    }

    fn reply_error(&mut self, h: RequestHeader, error: u32, message: &str) {
        if self.broken {
            return;
        }
        let out = &mut self.stream.out;
        if self.structured {
            encode_error_chunk(out, h.cookie, error, message);
        } else {
            encode_simple_reply(out, error, h.cookie);
        }
    }
}

fn block_error(e: &BlockError) -> u32 {
    match e {
        BlockError::OutOfRange { .. } | BlockError::Unaligned { .. } => EINVAL,
        BlockError::ReadOnly => EPERM,
        BlockError::NotSupported => ENOTSUP,
        BlockError::Io(io) => nbd_error(io),
    }
}

fn read_bytes(buf: Box<dyn IoBuffers>) -> OwnedBuf {
    OwnedBuf::from_boxed(buf)
        .ok()
        .expect("the server reads into OwnedBufs")
}
