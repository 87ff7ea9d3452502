//! Errors a block request can complete with.

use std::io;

/// Why a block request failed. Devices map these to their status codes in one place.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the node.
    #[error("request [{offset}, +{len}) is beyond the node's size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Offset or length is not a multiple of the node's request alignment.
    #[error("request [{offset}, +{len}) is not aligned to {alignment} bytes")]
    Unaligned {
        offset: u64,
        len: u64,
        alignment: u32,
    },
    /// A write-type request to a read-only node.
    #[error("node is read-only")]
    ReadOnly,
    /// The driver does not implement this request type.
    #[error("operation not supported")]
    NotSupported,
    /// The backing storage failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Result of a block request.
pub type BlockResult = Result<(), BlockError>;
