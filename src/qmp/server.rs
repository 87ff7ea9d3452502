//! The QMP sockets on the main context: listening chardevs and client connections.
//!
//! ## Input
//! A client socket is an external source of the main context (level-triggered). Its handler
//! reads with `MSG_DONTWAIT` until the socket is empty (at most [`READS_PER_DISPATCH`] reads,
//! so one busy client cannot hold the loop), cuts the bytes into texts and answers each in
//! order. A client whose stream breaks the bounds of [`super::stream`] gets an error and is
//! disconnected.
//!
//! ## Output
//! A message is first sent directly with `MSG_DONTWAIT`. What the socket does not take is queued
//! and written by an io_uring write op, which waits for the socket to become writable without
//! blocking the thread; one write is in flight per client, and short writes continue with the
//! rest. A client that lets more than [`OUTPUT_LEN_MAX`] bytes pile up is disconnected. The
//! write's completion holds the client, so its fd stays open while the kernel may use it.
//! Client sockets stay in blocking mode for that reason: with `O_NONBLOCK` some kernels fail an
//! io_uring write with EAGAIN instead of waiting.
//!
//! ## Ownership
//! [`QmpServer`] owns the listeners and the clients; sources and events hold weak references.
//! Dropping the server disconnects every client and removes the socket files.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::{Rc, Weak};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv, send};
use ringblk_ring::buf::{IoBuffers, OwnedBuf, Window, total_len};
use ringblk_ring::{Context, Group, Op, SourceId};
use serde_json::{Map, Value};

use super::QmpError;
use super::commands::{Handler, State};
use super::events::{Event, Events, Subscriber};
use super::monitor::Session;
use super::stream::Splitter;
use crate::daemon::{Daemon, DaemonError};
use crate::options::{ChardevBackend, ChardevOptions, MonitorOptions};

/// Most reads of one client per dispatch.
const READS_PER_DISPATCH: usize = 16;

/// Size of one read.
const READ_LEN: usize = 16 * 1024;

/// Most bytes queued for a client that does not read its replies and events.
const OUTPUT_LEN_MAX: usize = 8 << 20;

/// The QMP server: every `--chardev` socket and `--monitor` of the daemon.
pub struct QmpServer {
    shared: Rc<Shared>,
}

struct Shared {
    state: RefCell<State>,
    events: Rc<Events>,
    /// Every QMP socket, muted while a command runs.
    group: Group,
    chardevs: RefCell<BTreeMap<String, Chardev>>,
    clients: RefCell<Vec<Rc<Client>>>,
}

/// A listening socket; served once a monitor uses it.
struct Chardev {
    listener: UnixListener,
    path: PathBuf,
    source: Option<SourceId>,
    pretty: bool,
}

struct Client {
    me: Weak<Client>,
    server: Weak<Shared>,
    stream: UnixStream,
    session: Session,
    splitter: RefCell<Splitter>,
    output: RefCell<Output>,
    source: Cell<Option<SourceId>>,
    closed: Cell<bool>,
}

#[derive(Default)]
struct Output {
    /// Bytes waiting for the write in flight to complete.
    queued: Vec<u8>,
    /// A write op is in flight.
    writing: bool,
}

impl QmpServer {
    /// A server without sockets, on the current (main) context. Commands act on `daemon`;
    /// events emitted on `events` reach every negotiated client.
    pub fn new(daemon: Rc<RefCell<Daemon>>, events: Rc<Events>) -> QmpServer {
        Events::install(&events);
        let state = State {
            daemon,
            events: events.clone(),
            main: Context::current().remote(),
        };
        QmpServer {
            shared: Rc::new(Shared {
                state: RefCell::new(state),
                events,
                group: Group::new(),
                chardevs: RefCell::new(BTreeMap::new()),
                clients: RefCell::new(Vec::new()),
            }),
        }
    }

    /// `--chardev socket,path=P,server=on,wait=off`: listens on `P`, replacing whatever file
    /// is there (as QEMU does).
    pub fn add_chardev(&self, options: &ChardevOptions) -> Result<(), DaemonError> {
        let ChardevBackend::Socket(socket) = &options.backend;
        let path = socket.path.clone();
        let bind_error = |e: io::Error| {
            let reason = Errno::from_raw(e.raw_os_error().unwrap_or(0)).desc();
            DaemonError::Generic(format!(
                "Failed to bind socket to {}: {reason}",
                path.display()
            ))
        };
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        let chardev = Chardev {
            listener,
            path,
            source: None,
            pretty: false,
        };
        self.shared
            .chardevs
            .borrow_mut()
            .insert(options.id.clone(), chardev);
        Ok(())
    }

    /// `--monitor chardev=ID`: serves QMP on the chardev's socket.
    pub fn add_monitor(&self, options: &MonitorOptions) -> Result<(), DaemonError> {
        let mut chardevs = self.shared.chardevs.borrow_mut();
        let chardev = chardevs.get_mut(&options.chardev).ok_or_else(|| {
            DaemonError::Generic(format!("chardev \"{}\" not found", options.chardev))
        })?;
        let weak = Rc::downgrade(&self.shared);
        let id = options.chardev.clone();
        let source = Context::current().add_fd_source(
            self.shared.group,
            chardev.listener.as_raw_fd(),
            move || {
                if let Some(shared) = weak.upgrade() {
                    accept(&shared, &id);
                }
            },
        );
        chardev.source = Some(source);
        chardev.pretty = options.pretty;
        Ok(())
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let clients = std::mem::take(&mut *self.shared.clients.borrow_mut());
        for client in clients {
            client.close();
        }
        let ctx = Context::current();
        for chardev in self.shared.chardevs.borrow_mut().values_mut() {
            if let Some(source) = chardev.source.take() {
                ctx.remove_source(source);
            }
            let _ = std::fs::remove_file(&chardev.path);
        }
    }
}

impl Shared {
    /// Runs a command with every QMP socket muted (see the module docs of [`super`]).
    fn execute(&self, handler: Handler, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        let ctx = Context::current();
        ctx.mute(self.group);
        let result = handler(&mut self.state.borrow_mut(), arguments);
        ctx.unmute(self.group);
        result
    }
}

/// Accepts every pending connection on chardev `id`.
fn accept(shared: &Rc<Shared>, id: &str) {
    loop {
        let (accepted, pretty) = {
            let chardevs = shared.chardevs.borrow();
            let Some(chardev) = chardevs.get(id) else {
                return;
            };
            (chardev.listener.accept(), chardev.pretty)
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("ringblk: chardev '{id}': accept failed: {e}");
                return;
            }
        };
        let client = Rc::new_cyclic(|me| Client {
            me: me.clone(),
            server: Rc::downgrade(shared),
            stream,
            session: Session::new(pretty),
            splitter: RefCell::new(Splitter::default()),
            output: RefCell::new(Output::default()),
            source: Cell::new(None),
            closed: Cell::new(false),
        });
        shared
            .events
            .subscribe(Rc::downgrade(&client) as Weak<dyn Subscriber>);
        shared.clients.borrow_mut().push(client.clone());
        client.send(&client.session.greeting());
        let weak = Rc::downgrade(&client);
        let source =
            Context::current().add_fd_source(shared.group, client.stream.as_raw_fd(), move || {
                if let Some(client) = weak.upgrade() {
                    client.readable();
                }
            });
        client.source.set(Some(source));
    }
}

impl Client {
    /// Reads what the client sent and answers every complete text.
    fn readable(&self) {
        let Some(shared) = self.server.upgrade() else {
            return;
        };
        let mut buf = vec![0u8; READ_LEN];
        for _ in 0..READS_PER_DISPATCH {
            if self.closed.get() {
                return;
            }
            let n = match recv(self.stream.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return self.close(),
                Ok(n) => n,
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(_) => return self.close(),
            };
            let mut texts = Vec::new();
            let pushed = self.splitter.borrow_mut().push(&buf[..n], &mut texts);
            for text in texts {
                if self.closed.get() {
                    return;
                }
                let reply = self
                    .session
                    .handle(&text, |handler, args| shared.execute(handler, args));
                self.send(&reply);
            }
            if let Err(error) = pushed {
                self.send(&self.session.stream_error(error));
                return self.close();
            }
        }
    }

    /// Sends one message, or queues it behind those not yet written.
    fn send(&self, message: &str) {
        if self.closed.get() {
            return;
        }
        let mut output = self.output.borrow_mut();
        let mut bytes = message.as_bytes();
        if !output.writing {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match send(self.stream.as_raw_fd(), bytes, flags) {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(_) => {
                    drop(output);
                    return self.close();
                }
            }
            if bytes.is_empty() {
                return;
            }
        }
        if output.queued.len() + bytes.len() > OUTPUT_LEN_MAX {
            drop(output);
            eprintln!("ringblk: QMP client does not read its replies; disconnecting it");
            return self.close();
        }
        output.queued.extend_from_slice(bytes);
        if !output.writing {
            output.writing = true;
            let queued = OwnedBuf::from_slice(&output.queued);
            output.queued.clear();
            drop(output);
            self.write(Box::new(queued));
        }
    }

    /// Submits a write of `buf`; its completion continues with the rest and the queue.
    fn write(&self, buf: Box<dyn IoBuffers>) {
        let Some(client) = self.me.upgrade() else {
            return;
        };
        let op = Op::Write {
            fd: self.stream.as_raw_fd(),
            offset: 0,
            buf,
        };
        let submitted = Context::current().submit(op, move |op, result| client.written(op, result));
        if let Err(rejected) = submitted {
            rejected.fail_later();
        }
    }

    fn written(&self, op: Op, result: io::Result<u32>) {
        let buf = op.into_buf().expect("a write op has buffers");
        if self.closed.get() {
            return;
        }
        let len = total_len(buf.as_ref());
        match result {
            Ok(n) if (n as usize) < len && n > 0 => {
                self.write(Box::new(Window::new(buf, n as usize)))
            }
            Ok(n) if n as usize == len => {
                let mut output = self.output.borrow_mut();
                if output.queued.is_empty() {
                    output.writing = false;
                } else {
                    let queued = OwnedBuf::from_slice(&output.queued);
                    output.queued.clear();
                    drop(output);
                    self.write(Box::new(queued));
                }
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {
                self.write(buf);
            }
            _ => self.close(),
        }
    }

    /// Disconnects: no more input, output dropped, the peer sees end of file.
    fn close(&self) {
        if self.closed.replace(true) {
            return;
        }
        if let Some(source) = self.source.take() {
            Context::current().remove_source(source);
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(shared) = self.server.upgrade() {
            let me = self.me.as_ptr();
            shared
                .clients
                .borrow_mut()
                .retain(|c| !std::ptr::eq(Rc::as_ptr(c), me));
        }
    }
}

impl Subscriber for Client {
    fn deliver(&self, event: &Event) {
        if self.session.negotiated() {
            self.send(&event.render(self.session.pretty()));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::time::{Duration, Instant};

    use ringblk_ring::Wait;
    use serde_json::json;

    use super::*;
    use crate::options::ChardevSocket;

    fn serve(dir: &Path) -> QmpServer {
        let server = QmpServer::new(
            Rc::new(RefCell::new(Daemon::new())),
            Rc::new(Events::default()),
        );
        let chardev = ChardevOptions {
            id: "m".to_owned(),
            backend: ChardevBackend::Socket(ChardevSocket {
                path: dir.join("qmp.sock"),
                server: true,
                wait: false,
            }),
        };
        server.add_chardev(&chardev).unwrap();
        let monitor = MonitorOptions {
            id: None,
            chardev: "m".to_owned(),
            pretty: false,
        };
        server.add_monitor(&monitor).unwrap();
        server
    }

    /// Runs loop turns until `stream` has delivered a whole line; returns it.
    fn read_line(ctx: &Context, stream: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut byte = [0u8];
        while !line.ends_with(b"\n") {
            assert!(Instant::now() < deadline, "no reply");
            match stream.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                Ok(_) => panic!("end of stream"),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ctx.turn(Wait::For(Duration::from_millis(1)));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        String::from_utf8(line).unwrap()
    }

    /// A command that runs nested loop turns, as stopping an export does.
    fn nested_turns(_: &mut State, _: Map<String, Value>) -> Result<Value, QmpError> {
        let ctx = Context::current();
        for _ in 0..20 {
            ctx.turn(Wait::For(Duration::from_millis(1)));
        }
        Ok(json!({}))
    }

    #[test]
    fn no_qmp_input_is_dispatched_while_a_command_runs() {
        let ctx = Context::new(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = serve(dir.path());
        let mut client = UnixStream::connect(dir.path().join("qmp.sock")).unwrap();
        client.set_nonblocking(true).unwrap();
        assert!(read_line(&ctx, &mut client).starts_with("{\"QMP\""));
        client
            .write_all(br#"{"execute": "qmp_capabilities"}"#)
            .unwrap();
        assert_eq!(read_line(&ctx, &mut client), "{\"return\": {}}\r\n");

        client
            .write_all(br#"{"execute": "query-version", "id": 1}"#)
            .unwrap();
        // Without the mute, the nested turns would dispatch the request and its handler would
        // find the command state borrowed.
        assert_eq!(
            server.shared.execute(nested_turns, Map::new()),
            Ok(json!({}))
        );
        let mut byte = [0u8];
        assert_eq!(
            client.read(&mut byte).unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "a request was answered in the middle of another command"
        );
        assert!(read_line(&ctx, &mut client).ends_with("\"id\": 1}\r\n"));
        drop(server);
        ctx.shutdown();
    }

    #[test]
    fn dropping_the_server_disconnects_clients_and_removes_the_socket() {
        let ctx = Context::new(64).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let server = serve(dir.path());
        let mut client = UnixStream::connect(dir.path().join("qmp.sock")).unwrap();
        client.set_nonblocking(true).unwrap();
        read_line(&ctx, &mut client);
        drop(server);
        client.set_nonblocking(false).unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).unwrap(), 0);
        assert!(!dir.path().join("qmp.sock").exists());
        ctx.shutdown();
    }
}
