//! A daemon in miniature for end-to-end tests: a main context serving vhost-user-blk exports,
//! their queues on iothreads (or on the main context), driven over unix sockets by real
//! frontends. Shared by `export.rs` and `hostile.rs`.

// Each test crate uses its own part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use ringblk_bench::Job;
use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::{BackendHandle, Node};
use ringblk_ring::{Context, IoThread, Remote};
use ringblk_virtio::{Export, ExportConfig};

/// The iothreads poll like production ones (QSD's default poll-max-ns), so the queues run in
/// polling mode with the guest's kicks suppressed, then fall back to kicks before sleeping.
pub const POLL_MAX: Duration = Duration::from_nanos(32768);

/// How long a stopping daemon may take before the test gives up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// One export of a [`Daemon`].
pub struct ExportSpec {
    pub id: String,
    pub node: Box<dyn FnOnce() -> Node + Send>,
    /// Indices of the iothreads serving its queues (round-robin); empty: the main context.
    pub iothreads: Vec<usize>,
    pub num_queues: u16,
    pub writable: bool,
}

/// A daemon in miniature: a main context serving exports, queues on `iothreads` threads (or on
/// the main context). Stopped and joined on drop.
pub struct Daemon {
    main: Remote,
    rings: Vec<Remote>,
    thread: Option<std::thread::JoinHandle<()>>,
    exited: mpsc::Receiver<()>,
    /// The first export's socket.
    pub socket: PathBuf,
    pub sockets: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// One export, `e0`, on `iothreads` threads (the main context when 0).
    pub fn start(
        node: impl FnOnce() -> Node + Send + 'static,
        iothreads: usize,
        num_queues: u16,
        writable: bool,
    ) -> Daemon {
        Daemon::start_exports(
            iothreads,
            vec![ExportSpec {
                id: "e0".into(),
                node: Box::new(node),
                iothreads: (0..iothreads).collect(),
                num_queues,
                writable,
            }],
        )
    }

    /// Several exports on one main context, each with its own socket (`<id>.sock`).
    pub fn start_exports(iothreads: usize, exports: Vec<ExportSpec>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let sockets: Vec<PathBuf> = exports
            .iter()
            .map(|e| dir.path().join(format!("{}.sock", e.id)))
            .collect();
        let paths = sockets.clone();
        let (tx, rx) = mpsc::channel();
        let (exited_tx, exited) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ctx = Context::new(256).unwrap();
            let threads: Vec<IoThread> = (0..iothreads)
                .map(|i| IoThread::spawn(&format!("iot{i}"), POLL_MAX).unwrap())
                .collect();
            let mut running = Vec::new();
            for (spec, path) in exports.into_iter().zip(&paths) {
                let rings = if spec.iothreads.is_empty() {
                    vec![ctx.remote()]
                } else {
                    spec.iothreads
                        .iter()
                        .map(|&i| threads[i].remote().clone())
                        .collect()
                };
                let handle = BackendHandle::new(&(spec.node)());
                let config = ExportConfig {
                    id: spec.id,
                    path: path.clone(),
                    writable: spec.writable,
                    num_queues: spec.num_queues,
                    logical_block_size: 512,
                };
                running.push((Export::start(&config, handle, rings).unwrap(), path));
            }
            let remotes: Vec<Remote> = threads.iter().map(|t| t.remote().clone()).collect();
            tx.send((ctx.remote(), remotes)).unwrap();
            ctx.run();
            for (export, path) in running {
                export.stop(path);
            }
            drop(threads);
            ctx.shutdown();
            let _ = exited_tx.send(());
        });
        let (main, rings) = rx.recv().unwrap();
        Daemon {
            main,
            rings,
            thread: Some(thread),
            exited,
            socket: sockets[0].clone(),
            sockets,
            _dir: dir,
        }
    }

    /// Panics unless the main context and every iothread run a callback within `timeout`: none
    /// of them is dead or stuck.
    pub fn assert_responsive(&self, timeout: Duration) {
        let thread = self.thread.as_ref().expect("daemon running");
        assert!(!thread.is_finished(), "the daemon thread has exited");
        for (name, remote) in std::iter::once(("main context", &self.main))
            .chain(self.rings.iter().map(|r| ("an iothread", r)))
        {
            let (tx, rx) = mpsc::channel();
            remote.defer(move || {
                let _ = tx.send(());
            });
            assert!(
                rx.recv_timeout(timeout).is_ok(),
                "{name} did not run a callback within {timeout:?}"
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.main.stop();
        let Some(thread) = self.thread.take() else {
            return;
        };
        // A daemon stuck in a test that already failed must not hang the test binary too.
        match self.exited.recv_timeout(STOP_TIMEOUT) {
            Ok(()) => thread.join().expect("daemon thread panicked"),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                thread.join().expect("daemon thread panicked")
            }
            Err(mpsc::RecvTimeoutError::Timeout) if std::thread::panicking() => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the daemon did not stop within {STOP_TIMEOUT:?}")
            }
        }
    }
}

pub fn null_node() -> Node {
    Node::new(
        "null",
        NullCo::new(NullOptions {
            size: 64 << 20,
            read_zeroes: true,
            ..NullOptions::default()
        }),
    )
}

pub fn file_node(path: &Path) -> impl FnOnce() -> Node + Send + 'static {
    let path = path.to_owned();
    move || {
        let options = FileOptions {
            filename: path,
            read_only: false,
            direct: false,
        };
        Node::new("file", FileNode::open(&options).unwrap())
    }
}

pub fn image(len: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
    f.as_file().set_len(len).unwrap();
    f
}

pub fn job(text: &str) -> Job {
    Job::parse(text).unwrap()
}
