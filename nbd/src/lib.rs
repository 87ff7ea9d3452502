//! # ringblk-nbd: the NBD protocol, an NBD server for block nodes, and an NBD client node
//!
//! NBD (the Network Block Device protocol, `doc/proto.md` of the NetworkBlockDevice project)
//! carries block requests over a stream socket. This crate owns:
//! - the wire format (`proto`): fixed newstyle handshake, options GO, INFO, LIST, ABORT,
//!   STRUCTURED_REPLY, LIST/SET_META_CONTEXT (`base:allocation`); commands READ, WRITE (+FUA),
//!   FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE, FAST_ZERO), BLOCK_STATUS, CACHE, DISC;
//! - [`NbdServer`]: a listener with named exports of block nodes (QSD's `nbd-server-start`
//!   and `block-export-add type=nbd`);
//! - [`NbdClient`]: a `blkgraph` driver whose storage is an export on a server (QSD's
//!   `blockdev-add driver=nbd`), usable as a mirror target or behind an export.
//!
//! ## Invariants
//! - **Every number from the peer is checked** before use: magic numbers, option and string
//!   lengths, request ranges against the export's size and [`proto::REQUEST_BYTES_MAX`],
//!   reply handles against the commands in flight; arithmetic on them is overflow-checked. A
//!   malformed request closes that connection only; a malformed reply fails that client
//!   node's requests, with a message that says what was wrong.
//! - **Requests complete on their submitter's context**, never inline (blkgraph's rule).
//! - **No lock and no blocking thread on the I/O path.** In the transmission phase a socket is
//!   read and written by io_uring ops on one ring context (`stream`: one read and one write in
//!   flight, so the byte stream stays ordered); the handshake, a few small messages per
//!   connection, is control path and runs on a blocking socket with a timeout (the server's
//!   on a thread per connection, the client's on the thread that opens the node). Mutexes
//!   guard only the server's export list and each export's socket list (control path).
//! - **Nothing is buffered without bound**: a server connection stops reading requests while
//!   its in-flight requests, bytes or unsent replies are at their limits.
//!
//! ## Who calls what
//! The daemon, on its main context: [`NbdServer::start`], [`NbdServer::add_export`],
//! [`NbdServer::remove_export`], dropping the server to stop it; [`NbdClient::connect`] to open
//! a node (the calling context becomes the connection's home). Block requests reach the client
//! through `blkgraph` from any ring context.
//!
//! ## Where ringblk differs from QEMU
//! - The client negotiates simple replies only and reports everything as data in block status
//!   (blkgraph's block status is synchronous; asking the server is a round trip).
//! - The client does not reconnect: after the server goes away every request fails at once
//!   (QEMU's `reconnect-delay=0`, its default).
//! - Export connections are not muted by a mirror's drain; their requests wait at the drained
//!   gate of the export's backend handle and follow the pivot.
#![forbid(unsafe_code)]

mod addr;
mod client;
mod handshake;
pub mod proto;
mod server;
mod stream;

pub use addr::Address;
pub use client::{ClientOptions, NbdClient};
pub use server::{ExportConfig, NbdServer};
