//! ringblk's virtio-blk device: guest memory, split virtqueues, requests and config space.
//!
//! # What this crate owns
//! - [`memory`]: the guest memory table built from vhost-user's memory messages, and the only
//!   raw pointers into guest memory. Everything else reaches guest memory through its checked
//!   handles: [`memory::GuestSlice`] for short accesses, [`memory::GuestBuffers`] (an
//!   `ringblk_ring::buf::IoBuffers`) for data handed to io_uring, [`memory::GuestByte`] for a
//!   status byte.
//! - [`queue`]: the device side of a split virtqueue (virtio 1.2 §2.7): popping descriptor
//!   chains, returning used entries, notification suppression with and without EVENT_IDX.
//! - [`blk`]: parsing a chain into a virtio-blk request (§5.2.6) and answering it; the one
//!   place request errors become status bytes ([`blk::status`]).
//! - [`config`]: the config space (§5.2.4), the feature bits offered, the GET_ID string.
//! - `fixed`: guest memory registered with each ring as io_uring fixed buffers, lazily, one
//!   chunk at its first use, and the bookkeeping that lets a request claim its chunk's slot.
//! - `testing` (feature `test-utils`): a driver-side mock queue for tests and benches.
//!
//! # Invariants
//! - **Guest memory is untrusted** (design invariant 4). Every address from the frontend or the
//!   guest is checked against the memory table with overflow-checked arithmetic before use; a
//!   range must lie inside one region. Values are read once into private copies and parsed
//!   from there. A bad request completes with IOERR or UNSUPP; a ring-level violation marks its
//!   queue broken (the caller logs one line) and touches nothing else. No input from the
//!   frontend or the guest panics.
//! - **Memory outlives its users.** A `MemoryTable` is immutable and shared as an `Arc`; updates
//!   build a new table. Buffers and status bytes of in-flight requests hold the table they were
//!   checked against, so an op's memory stays mapped until the op is dropped, whatever the
//!   frontend does meanwhile.
//! - **No lock on the I/O path** (invariant 5). A `SplitQueue` is plain data owned by the one
//!   context serving it; only ring index fields shared with the driver are atomic, with the
//!   fences the spec requires.
//!
//! # Who calls what
//! The vhost-user backend (main context) builds `Arc<MemoryTable>`s from SET_MEM_TABLE /
//! ADD_MEM_REG / REM_MEM_REG, the `BlkConfig` and its features, and a `SplitQueue` per vring
//! (`SplitQueue::new`, `set_next_avail` from SET_VRING_BASE), then hands each queue to its I/O
//! context, posting later table updates there (`SplitQueue::set_memory`). The I/O context, on a
//! kick: `pop` (a chunk of chains per loop turn) → `blk::parse_request` → submit `RequestKind`'s
//! buffers to io_uring → on completion `Completion::complete(status)` → `add_used`; once per
//! turn `publish_used` and, if `needs_notification`, signal the call eventfd. It counts a request in flight from `pop` until
//! `add_used`.

mod backend;
pub mod blk;
pub mod config;
mod export;
mod fixed;
pub mod memory;
pub mod queue;
mod serve;

pub use export::{Export, ExportConfig};
pub use serve::block_status;
mod small;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

/// `v` as a u16, checked at compile time when used in a const (binding constants are u32).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn narrow_u16(v: u32) -> u16 {
    assert!(v <= u16::MAX as u32);
    v as u16
}

/// `v` as a u8, checked at compile time when used in a const.
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn narrow_u8(v: u32) -> u8 {
    assert!(v <= u8::MAX as u32);
    v as u8
}

#[cfg(test)]
mod tests {
    fn assert_send<T: Send>() {}

    #[test]
    fn handles_that_cross_contexts_are_send() {
        assert_send::<std::sync::Arc<crate::memory::MemoryTable>>();
        assert_send::<crate::queue::SplitQueue>();
        assert_send::<crate::queue::DescriptorChain>();
        assert_send::<crate::blk::Request>();
        assert_send::<crate::memory::GuestBuffers>();
    }
}
