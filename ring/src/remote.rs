//! Cross-thread access to a context: deferred callbacks posted from any thread.
//!
//! A [`Remote`] pushes a `Send` closure into the context's channel and wakes the context only if
//! it is (about to be) asleep. The wake-up protocol ([`Sleep`]) is the classic flag handshake:
//! the context publishes "sleeping" and then re-checks the channel; a poster pushes and then
//! reads the flag. With sequentially consistent ordering one of the two always sees the other, so
//! no callback is left in the channel of a sleeping context (the loom model in `tests/loom.rs`
//! checks exactly this).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::Group;
use crate::sync::{AtomicBool, Ordering};

/// A closure posted from another thread.
pub(crate) type RemoteTask = Box<dyn FnOnce() + Send>;

/// The sleeping flag of the wake-up handshake.
#[derive(Default)]
pub struct Sleep {
    sleeping: AtomicBool,
}

impl Sleep {
    /// Context side, before re-checking its queues and blocking.
    pub fn begin(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Context side, after waking (or deciding not to sleep).
    pub fn end(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Poster side, after pushing: whether the context must be woken.
    pub fn needs_wake(&self) -> bool {
        self.sleeping.load(Ordering::SeqCst)
    }
}

pub(crate) struct Shared {
    pub(crate) id: u64,
    tx: Sender<RemoteTask>,
    wake_fd: OwnedFd,
    pub(crate) sleep: Sleep,
    pub(crate) stop: AtomicBool,
}

impl Shared {
    pub(crate) fn new(id: u64) -> io::Result<(Arc<Shared>, Receiver<RemoteTask>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Shared {
            id,
            tx,
            wake_fd,
            sleep: Sleep::default(),
            stop: AtomicBool::new(false),
        };
        Ok((Arc::new(shared), rx))
    }

    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake_fd.as_raw_fd()
    }

    fn wake(&self) {
        crate::eventfd_write(self.wake_fd.as_raw_fd());
    }
}

/// A `Send` handle to a context, usable from any thread.
#[derive(Clone)]
pub struct Remote {
    pub(crate) shared: Arc<Shared>,
}

impl Remote {
    /// Runs `f` on the context at a later loop turn. Callbacks posted from one thread run in the
    /// order they were posted. A callback posted after the context stopped is dropped unrun.
    pub fn defer(&self, f: impl FnOnce() + Send + 'static) {
        if self.shared.tx.send(Box::new(f)).is_ok() && self.shared.sleep.needs_wake() {
            self.shared.wake();
        }
    }

    /// Runs `f` on the context and waits for its result. On the context's own thread it runs
    /// inline. Returns `None` if the context stopped before running it.
    ///
    /// A caller that has a context of its own keeps running it meanwhile, in nested turns
    /// (see [`crate::Context::run_until`]): `f` may wait for something only the caller's
    /// context can finish, such as requests parked behind a drained section it holds.
    pub fn call<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        if self.is_current() {
            return Some(f());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.defer(move || {
            let _ = tx.send(f());
        });
        let Some(ctx) = crate::Context::try_current() else {
            return rx.recv().ok();
        };
        let mut result = None;
        ctx.run_until(|| match rx.try_recv() {
            Ok(r) => {
                result = Some(r);
                true
            }
            Err(e) => e.is_disconnected(),
        });
        result
    }

    /// Mutes `group` on the context. Returns once the mute is in force: the context has run a
    /// callback posted after the increment, so no source of the group is being dispatched and
    /// none will be until the matching [`Remote::unmute`].
    pub fn mute(&self, group: Group) {
        self.call(move || crate::Context::current().mute(group));
    }

    /// Lowers the mute counter of `group`; at zero every source of the group is dispatched once.
    pub fn unmute(&self, group: Group) {
        if self.is_current() {
            crate::Context::current().unmute(group);
        } else {
            self.defer(move || crate::Context::current().unmute(group));
        }
    }

    /// Asks the context's `run` loop to return.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
    }

    /// Whether the calling thread is this context's thread.
    pub fn is_current(&self) -> bool {
        crate::Context::try_current().is_some_and(|c| c.id() == self.shared.id)
    }

    /// A number unique to the context.
    pub fn id(&self) -> u64 {
        self.shared.id
    }
}
