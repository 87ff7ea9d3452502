//! I/O operations and their translation to submission queue entries.
//!
//! An [`Op`] owns everything the kernel may touch: its buffers (through [`IoBuffers`]) live in the
//! op, and the op lives in the context's in-flight table until its completion is reaped. The fd is
//! borrowed: whoever submits keeps it open until the completion runs (block nodes do so by holding
//! themselves alive in the completion closure).

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

use crate::buf::IoBuffers;

/// `fallocate` modes the block layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Deallocate the range; reads return zeroes afterwards.
    PunchHole,
    /// Make the range read as zeroes, keeping it allocated.
    ZeroRange,
}

/// One I/O operation.
pub enum Op {
    /// Does nothing; completes with 0. Used to measure the ring itself.
    Nop,
    /// Reads into `buf` from `fd` at `offset` (READ_FIXED when `buf` is in a registered buffer).
    Read {
        fd: RawFd,
        offset: u64,
        buf: Box<dyn IoBuffers>,
    },
    /// Writes `buf` to `fd` at `offset` (WRITE_FIXED when `buf` is in a registered buffer).
    Write {
        fd: RawFd,
        offset: u64,
        buf: Box<dyn IoBuffers>,
    },
    /// fsync, or fdatasync when `datasync`.
    Fsync { fd: RawFd, datasync: bool },
    /// fallocate with the given mode over `[offset, offset + len)`.
    Fallocate {
        fd: RawFd,
        mode: Fallocate,
        offset: u64,
        len: u64,
    },
    /// Single-shot POLLIN on an fd (external sources and the wake-up eventfd).
    PollIn { fd: RawFd },
    /// Cancels the in-flight op whose user data is `target`.
    Cancel { target: u64 },
    /// Completes after `after` has elapsed (with ETIME, which is its success).
    Timeout { after: Box<types::Timespec> },
}

impl Op {
    /// A timeout op firing after `after`.
    pub fn timeout(after: std::time::Duration) -> Op {
        Op::Timeout {
            after: Box::new(types::Timespec::from(after)),
        }
    }

    /// Gives back the buffers of a read or write.
    pub fn into_buf(self) -> Option<Box<dyn IoBuffers>> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The submission queue entry for this op, tagged with `user_data`.
    ///
    /// The entry points into the op's buffers; the caller must keep the op (and so the buffers)
    /// alive and unmoved-in-content until the completion for `user_data` is reaped. The buffers
    /// themselves are heap objects behind the Box, so moving the `Op` value is fine.
    pub(crate) fn sqe(&self, user_data: u64) -> squeue::Entry {
        let entry = match self {
            Op::Nop => opcode::Nop::new().build(),
            Op::Read { fd, offset, buf } => match single_fixed(buf.as_ref()) {
                Some((iov, index)) => {
                    opcode::ReadFixed::new(types::Fd(*fd), iov.iov_base.cast(), len32(iov), index)
                        .offset(*offset)
                        .build()
                }
                None => {
                    let iovs = buf.iovecs();
                    opcode::Readv::new(types::Fd(*fd), iovs.as_ptr(), count32(iovs))
                        .offset(*offset)
                        .build()
                }
            },
            Op::Write { fd, offset, buf } => match single_fixed(buf.as_ref()) {
                Some((iov, index)) => {
                    opcode::WriteFixed::new(types::Fd(*fd), iov.iov_base.cast(), len32(iov), index)
                        .offset(*offset)
                        .build()
                }
                None => {
                    let iovs = buf.iovecs();
                    opcode::Writev::new(types::Fd(*fd), iovs.as_ptr(), count32(iovs))
                        .offset(*offset)
                        .build()
                }
            },
            Op::Fsync { fd, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(*fd)).flags(flags).build()
            }
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => {
                let mode = match mode {
                    Fallocate::PunchHole => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    Fallocate::ZeroRange => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                };
                opcode::Fallocate::new(types::Fd(*fd), *len)
                    .offset(*offset)
                    .mode(mode)
                    .build()
            }
            Op::PollIn { fd } => {
                // Single-shot, so level-triggered: it completes at once if the fd is readable
                // when armed, and is re-armed by its owner after each completion.
                opcode::PollAdd::new(types::Fd(*fd), libc::POLLIN as u32).build()
            }
            Op::Cancel { target } => opcode::AsyncCancel::new(*target).build(),
            // The timespec is boxed inside the op, so it stays put until the completion.
            Op::Timeout { after } => opcode::Timeout::new(&raw const **after).build(),
        };
        entry.user_data(user_data)
    }
}

fn single_fixed(buf: &dyn IoBuffers) -> Option<(&libc::iovec, u16)> {
    match (buf.iovecs(), buf.fixed_index()) {
        ([iov], Some(index)) => Some((iov, index)),
        _ => None,
    }
}

fn len32(iov: &libc::iovec) -> u32 {
    u32::try_from(iov.iov_len).expect("a single I/O segment is below 4 GiB")
}

fn count32(iovs: &[libc::iovec]) -> u32 {
    u32::try_from(iovs.len()).expect("iovec count fits u32")
}
