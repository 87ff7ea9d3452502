//! # ringblk-blkgraph: block nodes, drained sections and the backend handle
//!
//! A [`Node`] is a driver ([`file`], [`null`], or a filter such as the mirror's) plus the state
//! every node shares: an in-flight counter, a quiesce counter, and edges to its children and
//! parents. Devices do not hold nodes directly: they submit through a [`BackendHandle`], whose
//! root can be swapped by [`BackendHandle::replace`] (the pivot of a mirror).
//!
//! ## Invariants
//! - **Requests run on their submitter's context** and complete there, never inline.
//! - **Drained means empty** (design invariant 2): between [`drained_begin`] returning and the
//!   guard being dropped, the node, its children and its parents have nothing in flight, the
//!   external sources of every device above are muted on every context serving them, and any
//!   other request waits at a gate. Sections nest. A filter forwards the requests it admitted
//!   past its child's gate ([`Node::submit_drained`]); only the topmost gate holds new ones.
//! - **In flight until completed**: a request counts in its node from the gate until its
//!   completion callback has returned, so a device's "status written to the used ring" happens
//!   inside the count.
//! - **No lock on the I/O path**: the gate is two atomics; the root of a handle is read through
//!   an `ArcSwap`; mutexes guard only control-path lists (handles, parents, parked contexts).
//!
//! ## Who calls what
//! `submit` from any ring context. `drained_begin`, `replace` and graph changes from the main
//! context (a drained section may block the caller while other contexts acknowledge mutes).
#![forbid(unsafe_code)]

mod drain;
mod error;
pub mod file;
mod handle;
mod node;
pub mod null;
mod request;
#[cfg(feature = "test-utils")]
pub mod testing;

pub use drain::{Drained, drained_begin};
pub use error::{BlockError, BlockResult};
pub use handle::{BackendHandle, MuteTarget};
pub use node::{Contents, Driver, Extent, Limits, Node, WriteThresholdHit};
pub use request::{Done, Request};
