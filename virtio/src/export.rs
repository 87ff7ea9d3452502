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

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use ringblk_blkgraph::{BackendHandle, MuteTarget};
use ringblk_ring::{Context, Group, Remote, SourceId};
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use crate::backend::{BlkBackend, Device};
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

type Handler = BackendReqHandler<Mutex<BlkBackend>>;

struct Connection {
    handler: Handler,
    backend: Arc<Mutex<BlkBackend>>,
    source: SourceId,
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
            config: blk,
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
    });
}

fn serve_message(inner: &Rc<Inner>) {
    let result = match inner.connection.borrow_mut().as_mut() {
        Some(conn) => conn.handler.handle_request(),
        None => return,
    };
    match result {
        Ok(()) => {}
        Err(VhostError::Disconnected) => {
            disconnect(inner);
            listen(inner);
        }
        Err(e) if is_fatal(&e) => {
            eprintln!(
                "ringblk: export '{}': closing the connection: {e}",
                inner.device.export_id
            );
            disconnect(inner);
            listen(inner);
        }
        Err(e) => eprintln!(
            "ringblk: export '{}': vhost-user request refused: {e}",
            inner.device.export_id
        ),
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
