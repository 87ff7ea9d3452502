//! Block requests and their completions.

use ringblk_ring::buf::{self, IoBuffers};

use crate::error::BlockResult;

/// One request to a node. Data buffers travel with the request and come back in the completion.
pub enum Request {
    /// Read `buf`'s length at `offset`.
    Read {
        offset: u64,
        buf: Box<dyn IoBuffers>,
    },
    /// Write `buf` at `offset`.
    Write {
        offset: u64,
        buf: Box<dyn IoBuffers>,
    },
    /// Make every completed write durable.
    Flush,
    /// The range's contents may be dropped; reads of it return unspecified data.
    Discard { offset: u64, len: u64 },
    /// The range reads as zeroes afterwards; `unmap` allows deallocating it.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// Runs on the submitting context when the request completes; gets the request back.
pub type Done = Box<dyn FnOnce(BlockResult, Request)>;

impl Request {
    /// The byte range the request touches, `None` for a flush.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Request::Read { offset, buf } | Request::Write { offset, buf } => {
                Some((*offset, buf::total_len(buf.as_ref()) as u64))
            }
            Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
                Some((*offset, *len))
            }
            Request::Flush => None,
        }
    }

    /// Whether the request changes the node's contents.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Write { .. } | Request::Discard { .. } | Request::WriteZeroes { .. }
        )
    }

    /// The data buffers, for a read or a write.
    pub fn into_buf(self) -> Option<Box<dyn IoBuffers>> {
        match self {
            Request::Read { buf, .. } | Request::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}
