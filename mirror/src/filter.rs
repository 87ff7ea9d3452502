//! `mirror_top`: the filter the job puts above the source, and the state it shares with the job.
//!
//! Every guest request reaches the source through this filter, on whatever I/O context the
//! device runs on. Reads and flushes pass through. Write-type requests (write, write-zeroes,
//! discard) are tracked:
//! - **background** mode: the touched chunks are marked dirty when the write completes, before
//!   the device sees the completion (as QEMU does). A copy that read the chunk while the write was
//!   in flight may have read old data, and that mark makes the job copy the chunk again. Marking
//!   at submission as well only made an idle job copy the chunk at once, while the write was
//!   still in flight, and then once more after it: a QD1 writer made the copy 30-50% longer.
//! - **write-blocking** mode: the data is copied into bounce buffers at submission (the guest
//!   may change its buffer while the request is in flight; source and target must get the same
//!   bytes), written to the source and the target at once, and completed to the device only when
//!   both are done. A chunk that was clean stays clean, and chunks the write covers entirely
//!   become clean, if no copy or other write overlapped it (see [`crate::overlap`]) and both
//!   writes succeeded; otherwise every chunk it touched is left dirty for the job. A failed target write leaves the chunks dirty and clears
//!   `actively-synced`; the device sees the source's result only.
//!
//! The filter wakes the job (an eventfd source on the main context) when it dirties a chunk
//! while the job is idle; see [`Shared::notify_job`].

use std::cell::RefCell;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};
use ringblk_blkgraph::{BlockError, BlockResult, Done, Driver, Extent, Limits, Node, Request};
use ringblk_ring::buf::{self, OwnedBuf};

use crate::bitmap::DirtyBitmap;
use crate::overlap::ChunkLocks;

/// What the filter (any context) and the job (main context) share. Atomics only.
pub(crate) struct Shared {
    /// Chunks where the target may differ from the source.
    pub(crate) dirty: DirtyBitmap,
    /// Chunks known to read as zeroes on the target (from `target_is_zero`, only ever cleared).
    pub(crate) target_zero: DirtyBitmap,
    pub(crate) locks: ChunkLocks,
    write_blocking: AtomicBool,
    /// Background-mode writes in flight (counted before the mode is read, see `submit`).
    background_writes: AtomicUsize,
    /// Bytes of write-blocking guest writes in flight (progress).
    pub(crate) active_bytes: AtomicU64,
    /// A write-blocking write failed on the target since the job last looked.
    pub(crate) active_target_failed: AtomicBool,
    /// The job has nothing to do and waits for the filter to wake it.
    pub(crate) job_idle: AtomicBool,
    wake: EventFd,
}

impl Shared {
    pub(crate) fn new(
        dirty: DirtyBitmap,
        target_zero: DirtyBitmap,
        write_blocking: bool,
    ) -> std::io::Result<Shared> {
        let locks = ChunkLocks::new(dirty.chunks());
        let wake =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Shared {
            dirty,
            target_zero,
            locks,
            write_blocking: AtomicBool::new(write_blocking),
            background_writes: AtomicUsize::new(0),
            active_bytes: AtomicU64::new(0),
            active_target_failed: AtomicBool::new(false),
            job_idle: AtomicBool::new(false),
            wake,
        })
    }

    /// The eventfd the job's wake-up source polls.
    pub(crate) fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.as_raw_fd()
    }

    pub(crate) fn set_write_blocking(&self) {
        self.write_blocking.store(true, Ordering::SeqCst);
    }

    pub(crate) fn background_writes(&self) -> usize {
        self.background_writes.load(Ordering::SeqCst)
    }

    /// Marks chunks dirty and wakes the job if it is idle and a chunk was clean.
    pub(crate) fn mark_dirty(&self, chunks: Range<u64>) {
        if self.dirty.set(chunks) > 0 {
            self.notify_job();
        }
    }

    /// Wakes the job if it is idle. Pairs with the job's "set idle, then re-scan": both sides
    /// change their own flag or bitmap first and read the other's second (all SeqCst), so either
    /// the job's re-scan sees the new dirt or this sees the idle flag.
    pub(crate) fn notify_job(&self) {
        if self.job_idle.load(Ordering::SeqCst) && self.job_idle.swap(false, Ordering::SeqCst) {
            ringblk_ring::eventfd_write(self.wake.as_raw_fd());
        }
    }
}

/// The `mirror_top` driver.
pub(crate) struct MirrorTop {
    source: Node,
    target: Node,
    shared: Arc<Shared>,
}

impl MirrorTop {
    pub(crate) fn new(source: Node, target: Node, shared: Arc<Shared>) -> MirrorTop {
        MirrorTop {
            source,
            target,
            shared,
        }
    }

    fn background_write(&self, req: Request, done: Done, chunks: Range<u64>) {
        let shared = self.shared.clone();
        self.source.submit_drained(
            req,
            Box::new(move |result, req| {
                shared.mark_dirty(chunks);
                shared.background_writes.fetch_sub(1, Ordering::SeqCst);
                done(result, req);
            }),
        );
    }

    fn active_write(&self, req: Request, done: Done) {
        let (offset, len) = req.range().expect("write-type requests have a range");
        let shared = &self.shared;
        // The dirty bits stay as they are: a clean chunk stays clean, since both sides get the
        // same bytes, and the writer's hold on the chunk keeps copies out until it is done.
        let chunks = shared.dirty.touched(offset, len);
        let mut conflict = false;
        for chunk in chunks.clone() {
            conflict |= shared.locks.writer_enter(chunk);
        }
        // A background write still in flight from before the mode change is not in the locks.
        conflict |= shared.background_writes() > 0;
        shared.target_zero.clear(chunks.clone());
        shared.active_bytes.fetch_add(len, Ordering::SeqCst);
        let (to_source, to_target, keep_dirty) = match &req {
            Request::Write { offset, buf } => {
                let mut data = OwnedBuf::zeroed(buf::total_len(buf.as_ref()));
                buf::copy_out(buf.as_ref(), data.as_mut_slice());
                let copy = OwnedBuf::from_slice(data.as_slice());
                let write = |b: OwnedBuf| Request::Write {
                    offset: *offset,
                    buf: Box::new(b),
                };
                (write(data), write(copy), false)
            }
            Request::WriteZeroes { offset, len, unmap } => {
                let zeroes = || Request::WriteZeroes {
                    offset: *offset,
                    len: *len,
                    unmap: *unmap,
                };
                (zeroes(), zeroes(), false)
            }
            // After a discard both sides read unspecified data: let the job copy the source's.
            Request::Discard { offset, len } => {
                let discard = || Request::Discard {
                    offset: *offset,
                    len: *len,
                };
                (discard(), discard(), true)
            }
            Request::Read { .. } | Request::Flush => unreachable!("only write-type requests"),
        };
        let write = Rc::new(RefCell::new(ActiveWrite {
            shared: self.shared.clone(),
            chunks: chunks.clone(),
            covered: shared.dirty.covered(offset, len),
            len,
            conflict: conflict || keep_dirty,
            source: None,
            target: None,
            guest: Some((req, done)),
        }));
        let w = write.clone();
        self.source.submit_drained(
            to_source,
            Box::new(move |result, _| ActiveWrite::side_done(&w, Side::Source, result)),
        );
        self.target.submit(
            to_target,
            Box::new(move |result, _| ActiveWrite::side_done(&write, Side::Target, result)),
        );
    }
}

enum Side {
    Source,
    Target,
}

/// A write-blocking guest write between submission and the completion of both sides.
struct ActiveWrite {
    shared: Arc<Shared>,
    chunks: Range<u64>,
    covered: Range<u64>,
    len: u64,
    conflict: bool,
    source: Option<BlockResult>,
    target: Option<BlockResult>,
    guest: Option<(Request, Done)>,
}

impl ActiveWrite {
    fn side_done(this: &Rc<RefCell<ActiveWrite>>, side: Side, result: BlockResult) {
        let mut w = this.borrow_mut();
        match side {
            Side::Source => w.source = Some(result),
            Side::Target => w.target = Some(result),
        }
        if w.source.is_none() || w.target.is_none() {
            return;
        }
        let shared = w.shared.clone();
        let mut tainted = false;
        for chunk in w.chunks.clone() {
            tainted |= shared.locks.writer_exit(chunk);
        }
        let source = w.source.take().expect("checked above");
        let target_ok = w.target.take().expect("checked above").is_ok();
        if !target_ok {
            shared.active_target_failed.store(true, Ordering::SeqCst);
        }
        if w.conflict || tainted || !target_ok || source.is_err() {
            shared.dirty.set(w.chunks.clone());
        } else {
            shared.dirty.clear(w.covered.clone());
        }
        shared.active_bytes.fetch_sub(w.len, Ordering::SeqCst);
        let (req, done) = w.guest.take().expect("completed once");
        drop(w);
        // Readiness, skipped chunks and re-dirtied ones all need the job to look again.
        shared.notify_job();
        done(source, req);
    }
}

impl Driver for MirrorTop {
    fn name(&self) -> &'static str {
        "mirror_top"
    }

    fn size(&self) -> u64 {
        self.source.size()
    }

    fn limits(&self) -> Limits {
        // Write-blocking writes go to the target as they are, so they must suit both.
        Limits {
            request_alignment: self
                .source
                .limits()
                .request_alignment
                .max(self.target.limits().request_alignment),
        }
    }

    fn read_only(&self) -> bool {
        self.source.read_only()
    }

    fn children(&self) -> Vec<Node> {
        vec![self.source.clone()]
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.source.block_status(offset, len)
    }

    fn submit(&self, req: Request, done: Done) {
        // Requests this node admitted go past the source's gate: a drain that includes the
        // source also includes this node and waits for them (see blkgraph's `drain`).
        if !req.is_write() {
            return self.source.submit_drained(req, done);
        }
        let (offset, len) = req.range().expect("write-type requests have a range");
        // Count first, read the mode second: a write-blocking write that reads the mode after a
        // switch then sees this write in the count and treats it as a conflict.
        self.shared.background_writes.fetch_add(1, Ordering::SeqCst);
        if self.shared.write_blocking.load(Ordering::SeqCst) {
            self.shared.background_writes.fetch_sub(1, Ordering::SeqCst);
            return self.active_write(req, done);
        }
        let chunks = self.shared.dirty.touched(offset, len);
        self.background_write(req, done, chunks);
    }
}
