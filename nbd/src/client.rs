//! The NBD client node (`driver=nbd`): a block driver whose storage is an export on an NBD
//! server.
//!
//! The connection belongs to its **home** context, the one that opened it (the main context
//! for `blockdev-add`); its state lives in that thread's [`CONNECTIONS`] and is touched only
//! there. A request submitted on the home context is sent at once; one submitted elsewhere is
//! posted to the home context, and its completion is posted back, so it completes on its
//! submitter's context as every request must (its `Done` waits in that thread's [`WAITING`]).
//!
//! Requests larger than the server's maximum are split into several commands; the request
//! completes when the last reply arrives, with the first error if any. Every command carries
//! a distinct cookie and replies are matched by it, in any order.
//!
//! A connection that fails (the server closed it, an I/O error, a malformed reply) fails every
//! request in flight and every later one with an error that says so: nothing waits for a
//! server that is gone, so a mirror job sees target errors and follows its error policy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ringblk_blkgraph::{BlockError, BlockResult, Done, Driver, Request};
use ringblk_ring::buf::{self, IoBuffers, Window};
use ringblk_ring::{Context, Remote};

use crate::addr::Address;
use crate::handshake;
use crate::proto::*;
use crate::stream::{Peer, Stream};

/// Options of an NBD client node, as QAPI names them (`BlockdevOptionsNbd`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    pub server: Address,
    /// The export's name (QEMU's default: the empty name).
    pub export: String,
    /// How long to keep trying to connect (0: once).
    pub open_timeout: Duration,
    /// Refuse writes even if the server takes them.
    pub read_only: bool,
}

/// Largest trim or write-zeroes one command carries.
const ZERO_BYTES_MAX: u64 = 1 << 30;
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The connections whose home context runs on this thread.
    static CONNECTIONS: RefCell<HashMap<u64, Rc<RefCell<Connection>>>> =
        RefCell::new(HashMap::new());
    /// Completions of requests submitted on this thread to a connection homed elsewhere.
    static WAITING: RefCell<HashMap<u64, Done>> = RefCell::new(HashMap::new());
}

/// The NBD client driver.
pub struct NbdClient {
    id: u64,
    home: Remote,
    size: u64,
    read_only: bool,
    export: Arc<str>,
}

impl NbdClient {
    /// Connects to the server and opens the export, blocking the calling thread (at most
    /// `open_timeout` to connect, then the handshake); the connection's home is the calling
    /// thread's context.
    pub fn connect(options: &ClientOptions) -> io::Result<NbdClient> {
        let ctx = Context::current();
        let mut socket = options.server.connect(options.open_timeout).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("Failed to connect to '{}': {e}", options.server),
            )
        })?;
        socket.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let opened = handshake::open(&mut socket, &options.export).map_err(|e| {
            io::Error::other(format!("NBD handshake with '{}': {e}", options.server))
        })?;
        socket.set_timeout(None)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let export: Arc<str> = Arc::from(options.export.as_str());
        let conn = Rc::new(RefCell::new(Connection {
            stream: Stream::new(Arc::new(socket.into_fd())),
            export: export.clone(),
            flags: opened.flags,
            max_len: opened.max_len,
            next_cookie: 1,
            pending: HashMap::new(),
            failure: None,
            disconnecting: false,
        }));
        conn.borrow_mut().stream.read(&conn);
        CONNECTIONS.with(|c| c.borrow_mut().insert(id, conn));
        Ok(NbdClient {
            id,
            home: ctx.remote(),
            size: opened.size,
            read_only: options.read_only || opened.flags & FLAG_READ_ONLY != 0,
            export,
        })
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let id = self.id;
        self.home.defer(move || {
            if let Some(conn) = CONNECTIONS.with(|c| c.borrow_mut().remove(&id)) {
                Connection::disconnect(&conn);
            }
        });
    }
}

impl Driver for NbdClient {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, req: Request, done: Done) {
        let id = self.id;
        if self.home.is_current() {
            return start(id, &self.export, req, Route::Here(done));
        }
        static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        WAITING.with(|w| w.borrow_mut().insert(token, done));
        let reply_to = Context::current().remote();
        let export = self.export.clone();
        self.home
            .defer(move || start(id, &export, req, Route::There { reply_to, token }));
    }
}

/// Where a request's completion goes.
enum Route {
    /// The submitter is the home context.
    Here(Done),
    /// The submitter's context, where the `Done` waits under `token`.
    There { reply_to: Remote, token: u64 },
}

impl Route {
    /// Completes the request; called on the home context, never inside `submit`.
    fn complete(self, result: BlockResult, req: Request) {
        match self {
            Route::Here(done) => done(result, req),
            Route::There { reply_to, token } => reply_to.defer(move || {
                let done = WAITING.with(|w| w.borrow_mut().remove(&token));
                done.expect("a posted request's completion waits on its submitter")(result, req);
            }),
        }
    }
}

/// A request split into commands, completed when its last command is.
struct Job {
    req: Option<Request>,
    route: Option<Route>,
    commands_left: usize,
    error: Option<BlockError>,
}

type JobRef = Rc<RefCell<Job>>;

/// A request whose last command completed, to complete once no borrow is held.
type Finished = (Route, BlockResult, Request);

/// A command sent and not yet replied to.
struct Command {
    job: JobRef,
    /// Where a READ's data goes in the request's buffer, and how much of it.
    read: Option<(usize, u32)>,
}

struct Connection {
    stream: Stream,
    export: Arc<str>,
    flags: u16,
    max_len: u32,
    next_cookie: u64,
    pending: HashMap<u64, Command>,
    /// Why the connection is unusable, once it is.
    failure: Option<String>,
    /// The node is gone: NBD_CMD_DISC is on its way, the socket closes once it is sent.
    disconnecting: bool,
}

fn failure_error(message: &str) -> BlockError {
    BlockError::Io(io::Error::new(
        io::ErrorKind::ConnectionAborted,
        message.to_owned(),
    ))
}

/// Sends `req` as one or more commands on the home context.
fn start(id: u64, export: &str, req: Request, route: Route) {
    let conn = CONNECTIONS.with(|c| c.borrow().get(&id).cloned());
    let Some(conn) = conn else {
        let message = format!("NBD export '{export}': the node was closed");
        return Context::current().defer(move || route.complete(Err(failure_error(&message)), req));
    };
    let mut c = conn.borrow_mut();
    if let Some(message) = c.failure.clone() {
        drop(c);
        return Context::current().defer(move || route.complete(Err(failure_error(&message)), req));
    }
    let mut req = req;
    let commands = c.commands(&req);
    if commands.is_empty() {
        // Nothing to send (a flush the server does not need, an empty range): still later.
        drop(c);
        return Context::current().defer(move || route.complete(Ok(()), req));
    }
    let job = Rc::new(RefCell::new(Job {
        req: None,
        route: Some(route),
        commands_left: commands.len(),
        error: None,
    }));
    for header in commands {
        c.send(&mut req, header, &job);
    }
    job.borrow_mut().req = Some(req);
    c.stream.flush(&conn);
}

impl Connection {
    /// Says goodbye (NBD_CMD_DISC) and closes the socket once that is sent. Nothing is in
    /// flight: the node is dropped only when nobody can submit to it.
    fn disconnect(this: &Rc<RefCell<Connection>>) {
        let mut c = this.borrow_mut();
        c.disconnecting = true;
        if c.failure.is_some() {
            return c.stream.shutdown();
        }
        let disc = RequestHeader {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        };
        disc.encode(&mut c.stream.out);
        c.stream.flush(this);
    }

    /// The commands that perform `req` (offsets are checked by the node against its size).
    fn commands(&self, req: &Request) -> Vec<RequestHeader> {
        let header = |kind, flags, offset, len| RequestHeader {
            flags,
            kind,
            cookie: 0,
            offset,
            len,
        };
        let split = |kind, flags, offset: u64, len: u64, most: u64| {
            let mut out = Vec::new();
            let mut at = 0;
            while at < len {
                let n = (len - at).min(most);
                let n32 = u32::try_from(n).expect("at most max_len or ZERO_BYTES_MAX");
                out.push(header(kind, flags, offset + at, n32));
                at += n;
            }
            out
        };
        let has = |flag| self.flags & flag != 0;
        let max = u64::from(self.max_len);
        match req {
            Request::Read { offset, buf } => split(
                CMD_READ,
                0,
                *offset,
                buf::total_len(buf.as_ref()) as u64,
                max,
            ),
            Request::Write { offset, buf } => split(
                CMD_WRITE,
                0,
                *offset,
                buf::total_len(buf.as_ref()) as u64,
                max,
            ),
            Request::Flush if has(FLAG_SEND_FLUSH) => vec![header(CMD_FLUSH, 0, 0, 0)],
            Request::Flush => Vec::new(),
            Request::Discard { offset, len } if has(FLAG_SEND_TRIM) => {
                split(CMD_TRIM, 0, *offset, *len, ZERO_BYTES_MAX)
            }
            // Discard is a hint: a server that cannot trim ignores it.
            Request::Discard { .. } => Vec::new(),
            Request::WriteZeroes { offset, len, unmap } => {
                let flags = if *unmap { 0 } else { CMD_FLAG_NO_HOLE };
                split(CMD_WRITE_ZEROES, flags, *offset, *len, ZERO_BYTES_MAX)
            }
        }
    }

    /// Queues one command (and a WRITE's payload) under a fresh cookie.
    fn send(&mut self, req: &mut Request, mut header: RequestHeader, job: &JobRef) {
        header.cookie = self.next_cookie;
        self.next_cookie += 1;
        let skip = match req.range() {
            Some((offset, _)) => {
                usize::try_from(header.offset - offset).expect("inside a request's buffer")
            }
            None => 0,
        };
        header.encode(&mut self.stream.out);
        if let Request::Write { buf, .. } = req {
            let out = &mut self.stream.out;
            let at = out.len();
            out.resize(at + header.len as usize, 0);
            at_offset(buf, skip, |part| buf::copy_out(part, &mut out[at..]));
        }
        let read = matches!(req, Request::Read { .. }).then_some((skip, header.len));
        let command = Command {
            job: job.clone(),
            read,
        };
        self.pending.insert(header.cookie, command);
    }

    /// Matches the replies that have arrived to their commands.
    fn parse_replies(&mut self, finished: &mut Vec<Finished>) -> Result<(), ProtocolError> {
        while let Some(reply) = parse_simple_reply(self.stream.unparsed())? {
            let Some(command) = self.pending.get(&reply.cookie) else {
                return Err(ProtocolError(format!(
                    "reply to unknown handle {:#x}",
                    reply.cookie
                )));
            };
            let data_len = match command.read {
                Some((_, len)) if reply.error == 0 => len as usize,
                _ => 0,
            };
            let Some(data) = self
                .stream
                .unparsed()
                .get(SIMPLE_REPLY_BYTES..SIMPLE_REPLY_BYTES + data_len)
            else {
                break;
            };
            let command = self.pending.remove(&reply.cookie).expect("found above");
            let mut job = command.job.borrow_mut();
            if reply.error != 0 {
                job.error
                    .get_or_insert(BlockError::Io(io_error(reply.error)));
            } else if let Some((skip, _)) = command.read {
                let req = job
                    .req
                    .as_mut()
                    .expect("the request is kept while in flight");
                if let Request::Read { buf, .. } = req {
                    at_offset(buf, skip, |part| buf::copy_in(part, data));
                }
            }
            job.commands_left -= 1;
            if job.commands_left == 0 {
                let result = job.error.take().map_or(Ok(()), Err);
                let route = job.route.take().expect("completed once");
                finished.push((route, result, job.req.take().expect("kept")));
            }
            drop(job);
            self.stream.consume(SIMPLE_REPLY_BYTES + data_len);
        }
        Ok(())
    }

    /// The connection is unusable: every command in flight fails with `message`.
    fn fail(&mut self, message: String) -> Vec<Finished> {
        if self.failure.is_none() {
            eprintln!("ringblk: {message}");
        }
        self.failure = Some(message.clone());
        self.stream.out.clear();
        self.stream.shutdown();
        let mut finished = Vec::new();
        for (_, command) in self.pending.drain() {
            let mut job = command.job.borrow_mut();
            job.commands_left -= 1;
            if job.commands_left == 0 {
                let route = job.route.take().expect("completed once");
                let req = job.req.take().expect("kept");
                finished.push((route, Err(failure_error(&message)), req));
            }
        }
        finished
    }
}

impl Peer for Connection {
    fn stream(&mut self) -> &mut Stream {
        &mut self.stream
    }

    fn received(this: &Rc<RefCell<Connection>>) {
        let mut finished = Vec::new();
        {
            let mut c = this.borrow_mut();
            match c.parse_replies(&mut finished) {
                Ok(()) => c.stream.read(this),
                Err(e) => {
                    let message = format!("NBD export '{}': malformed reply: {e}", c.export);
                    finished.extend(c.fail(message));
                }
            }
        }
        for (route, result, req) in finished {
            route.complete(result, req);
        }
    }

    fn sent(this: &Rc<RefCell<Connection>>) {
        let c = this.borrow();
        if c.disconnecting && !c.stream.sending() {
            c.stream.shutdown();
        }
    }

    fn failed(this: &Rc<RefCell<Connection>>, error: io::Error) {
        let finished = {
            let mut c = this.borrow_mut();
            if c.failure.is_some() && c.pending.is_empty() {
                return;
            }
            let why = match error.kind() {
                io::ErrorKind::UnexpectedEof => "the server closed the connection".to_owned(),
                _ => error.to_string(),
            };
            let message = format!("NBD export '{}': connection lost: {why}", c.export);
            c.fail(message)
        };
        for (route, result, req) in finished {
            route.complete(result, req);
        }
    }
}

/// Runs `f` on the part of `buf` after its first `skip` bytes.
fn at_offset<R>(
    buf: &mut Box<dyn IoBuffers>,
    skip: usize,
    f: impl FnOnce(&dyn IoBuffers) -> R,
) -> R {
    if skip == 0 {
        return f(buf.as_ref());
    }
    let whole = std::mem::replace(buf, Box::new(buf::OwnedBuf::zeroed(0)));
    let window = Window::new(whole, skip);
    let result = f(&window);
    *buf = window.into_inner();
    result
}
