//! # ringblk-mirror: the mirror job
//!
//! A [`Mirror`] copies a source node to a target node of the same size while the guest keeps
//! writing to the source, and ends with a **pivot**: every device that wrote to the source now
//! writes to the target, and no write the guest saw completed is missing from it.
//!
//! ## What it owns
//! - the `mirror_top` filter (`filter`) that it puts above the source at creation: every
//!   backend handle on the source moves to the filter, which marks the chunks that guest writes
//!   touch in the **dirty bitmap** ([`bitmap`]), or in write-blocking mode writes them to both
//!   sides before completing them;
//! - the copy loop (`copy`): `MirrorOp`s read dirty chunks from the source (skipping what its
//!   block status knows to be zeroes) and write them (or write-zeroes) to the target, bounded by buf-size, rate limited (`ratelimit`), never two
//!   at once on a chunk, never at once with a write-blocking guest write (`overlap`);
//! - the job state machine with QEMU's names, commands and events ([`status`], `command`,
//!   `job`);
//! - the completion (`switch`): drained final sync, deferred pivot, unmute.
//!
//! ## Invariants
//! 1. **A chunk where the target may differ from the source is dirty, or a copy or a
//!    write-blocking write holds it, or a background write to it is in flight.** Background
//!    guest writes mark dirty at completion (before the device sees the completion), and drains
//!    wait for them; a copy clears the bits *before* it reads the source; a write-blocking write holds its chunks while it writes both sides, and
//!    leaves them dirty if anyone overlapped it or a side failed; otherwise it leaves them as
//!    they were and cleans the ones it covered.
//! 2. **The pivot happens inside the drained section that saw the bitmap clean and flushed the
//!    target**, and the devices above stay muted from `drained_begin` until after `replace`.
//!    So no guest write can reach the source after the final copy: a kick in that window is
//!    not dispatched; it runs after the unmute, against the target (design invariant 1).
//! 3. **The job's own final copies pass the gate** (`submit_drained`), so its drain never waits
//!    for itself.
//! 4. **Nothing blocks the main loop** except `drained_begin`'s polling; everything else is
//!    completions, timers, deferred callbacks and the filter's wake-up eventfd. Drained sections
//!    begin only from deferred callbacks, never inside one of the job's own completions (its
//!    node counts that request in flight until the callback returns).
//! 5. **The filter forwards what it admitted past the source's gate**: a drain that reaches the
//!    source also closes the filter's gate and waits for the filter's requests (blkgraph).
//!
//! ## Who calls what
//! The daemon's QMP layer, on the main context: [`Mirror::create`], [`Mirror::start`],
//! [`Mirror::complete`], [`Mirror::cancel`], [`Mirror::pause`], [`Mirror::resume`],
//! [`Mirror::finalize`], [`Mirror::dismiss`], [`Mirror::set_speed`],
//! [`Mirror::change_copy_mode`], [`Mirror::query`]; it drains [`JobEvent`]s from the channel it
//! passed in and turns each into the QMP event [`JobEvent::qmp_name`] names. The filter runs
//! on whichever I/O context the device submits from; it shares only atomics with the job.
//!
//! ## Where ringblk differs from QEMU
//! - PENDING is not frozen: the job keeps mirroring, and `finalize` (automatic by default)
//!   performs the drained final sync and the pivot. QEMU syncs before PENDING and keeps the
//!   source drained until finalize, which with `auto-finalize=false` stalls the guest.
//! - An idle READY job sleeps until the filter wakes it (no 100 ms polling).
//! - An error with the `stop` policy while PENDING retries like `ignore` (PENDING cannot pause).
//! - `cancel` in PENDING first syncs the target (drained), then reports BLOCK_JOB_CANCELLED.
//! - Block status decides what is read: the source's holes are not read, and the target's
//!   holes (asked once, at creation) are not zeroed again. A full copy writes every other chunk
//!   of the target, as data or as write-zeroes (also a chunk of data that reads as zeroes).
#![forbid(unsafe_code)]

pub mod bitmap;
mod command;
mod copy;
mod error;
mod filter;
mod job;
mod options;
mod overlap;
mod ratelimit;
pub mod status;
mod switch;

pub use command::Mirror;
pub use error::MirrorError;
pub use options::{BUF_SIZE_DEFAULT, CopyMode, MirrorOptions, OP_BYTES_MAX, OnError};
pub use status::{
    ErrorAction, EventSink, IoOperation, IoStatus, JobEvent, JobInfo, JobProgress, JobStatus, Verb,
};
