//! # ringblk-ring: the thread-per-context io_uring engine
//!
//! A [`Context`] is one thread's event loop around one io_uring. Everything that happens on
//! a thread happens in a loop turn of its context: I/O completions, deferred callbacks
//! ("bottom halves"), callbacks posted from other threads through a [`Remote`], and the dispatch
//! of external sources (eventfds such as a virtqueue's kick).
//!
//! ## Invariants
//! - **Ops own their buffers.** An [`Op`] holds its [`buf::IoBuffers`] from submission until its
//!   completion is reaped; the completion hands them back. Tearing a context down cancels what is
//!   in flight and waits for every completion before anything is freed.
//! - **Fixed buffers are resolved at submission.** A ring's buffer table is sparse and filled
//!   slot by slot ([`Context::register_buffers_sparse`], [`Context::register_buffer`]); the
//!   kernel resolves an op's slot when the op is handed to it and keeps that buffer until the op
//!   completes, and every change to the table first hands the turn's queued SQEs to the kernel.
//!   Which memory a slot holds is the business of the [`buf::IoBuffers`] that name it.
//! - **Deferred means later.** [`Context::defer`] and [`Remote::defer`] never run the callback
//!   inline; a deferred callback runs at a later loop turn. Callbacks posted from one thread run
//!   in posting order.
//! - **Mute is a counter per group and takes effect at a loop turn.** A [`Group`] collects the
//!   external sources feeding one device. While a group is muted on a context, its sources are
//!   neither consumed nor dispatched (their eventfd keeps the count); when the counter returns to
//!   zero, every source of the group is dispatched once even if nothing fired (the self-kick).
//!   [`Remote::mute`] returns only after the target context has acknowledged the increment.
//! - **Level-triggered sources.** Each source is watched by a single-shot POLL_ADD re-armed after
//!   each dispatch, so an event that arrives while the poll is unarmed is seen at the re-arm.
//! - **Lock-free counting.** [`InFlight`] is an atomic counter any thread may update; drains poll
//!   it with [`Context::run_until`].
//!
//! ## Who calls what
//! A `Context` (not `Send`) is used only on its own thread; other threads hold a [`Remote`].
//! [`Remote::mute`] blocks the caller until acknowledged: call it from the main context only,
//! never from an I/O context towards the main context.

pub mod buf;
mod context;
mod inflight;
mod op;
mod remote;
mod thread;

pub use context::{Context, Done, Poller, PollerId, Rejected, SourceId, Wait};
pub use inflight::InFlight;
pub use op::{Fallocate, Op};
pub use remote::{Remote, Sleep};
pub use thread::IoThread;

use std::os::fd::RawFd;

/// The atomics the crate uses, swapped for loom's under `--cfg loom`.
pub(crate) mod sync {
    #[cfg(loom)]
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    #[cfg(not(loom))]
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
}

/// A group of external sources muted together: everything that feeds one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Group(u64);

impl Group {
    /// A group distinct from every other created in this process.
    pub fn new() -> Group {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Group(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

impl Default for Group {
    fn default() -> Group {
        Group::new()
    }
}

/// Adds one to an eventfd's counter (a kick or a wake-up). An eventfd write fails only when the
/// counter would overflow, in which case the fd is already readable, which is all a kick needs.
pub fn eventfd_write(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; the fd is owned by the caller.
    let _ = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
}

/// Consumes an eventfd's counter without blocking (the fd is non-blocking); returns it.
pub fn eventfd_drain(fd: RawFd) -> u64 {
    let mut count: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local; the fd is owned by the caller.
    let n = unsafe { libc::read(fd, (&raw mut count).cast(), 8) };
    if n == 8 { count } else { 0 }
}
