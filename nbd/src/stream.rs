//! A connected socket driven by a ring context: at most one read and one write in flight.
//!
//! Reads and writes are io_uring READV/WRITEV ops on the (blocking) socket: the kernel waits
//! for the socket, the ring does not. One write at a time keeps the byte stream in order (a
//! short write is resubmitted for its rest before anything else is sent); everything queued
//! meanwhile goes out in the next write, so replies batch by themselves. One read at a time
//! appends what arrived to `rx`, where the owner parses whole messages from the front.
//!
//! Buffer ownership: the receive buffer and the send buffer belong to their op while it is in
//! flight and come back in its completion. The socket is an `Arc<OwnedFd>` the owner keeps;
//! every op's completion holds the owner (an `Rc`), so the fd outlives the ops that use it.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;

use nix::sys::socket::{Shutdown, shutdown};
use ringblk_ring::buf::{IoBuffers, OwnedBuf, Window};
use ringblk_ring::{Context, Op};

/// Bytes one read asks for.
const RECV_BYTES: usize = 1 << 20;

/// The owner of a [`Stream`]: told when bytes arrive, when the queue is sent, and when the
/// socket fails or the peer closes it.
pub(crate) trait Peer: Sized + 'static {
    fn stream(&mut self) -> &mut Stream;
    /// New bytes are in the stream's unparsed part.
    fn received(this: &Rc<RefCell<Self>>);
    /// Everything queued so far has been sent.
    fn sent(this: &Rc<RefCell<Self>>);
    /// A read or write failed, or the peer closed its end (`UnexpectedEof`).
    fn failed(this: &Rc<RefCell<Self>>, error: io::Error);
}

pub(crate) struct Stream {
    fd: Arc<OwnedFd>,
    rx: Vec<u8>,
    rx_start: usize,
    spare: Option<OwnedBuf>,
    reading: bool,
    /// Bytes queued for the next write.
    pub(crate) out: Vec<u8>,
    writing: bool,
}

impl Stream {
    pub(crate) fn new(fd: Arc<OwnedFd>) -> Stream {
        Stream {
            fd,
            rx: Vec::new(),
            rx_start: 0,
            spare: None,
            reading: false,
            out: Vec::new(),
            writing: false,
        }
    }

    /// Received bytes not consumed yet.
    pub(crate) fn unparsed(&self) -> &[u8] {
        &self.rx[self.rx_start..]
    }

    /// Drops the first `n` unparsed bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.rx_start += n;
        assert!(
            self.rx_start <= self.rx.len(),
            "consumed more than received"
        );
        if self.rx_start == self.rx.len() {
            self.rx.clear();
            self.rx_start = 0;
        } else if self.rx_start >= RECV_BYTES {
            self.rx.drain(..self.rx_start);
            self.rx_start = 0;
        }
    }

    /// Whether a write is in flight or bytes wait to be sent.
    pub(crate) fn sending(&self) -> bool {
        self.writing || !self.out.is_empty()
    }

    /// Ends both directions: an in-flight read completes (with end-of-file), later writes fail.
    pub(crate) fn shutdown(&self) {
        let _ = shutdown(self.fd.as_raw_fd(), Shutdown::Both);
    }

    /// Starts a read unless one is in flight.
    pub(crate) fn read<P: Peer>(&mut self, peer: &Rc<RefCell<P>>) {
        if self.reading {
            return;
        }
        self.reading = true;
        let buf = self
            .spare
            .take()
            .unwrap_or_else(|| OwnedBuf::zeroed(RECV_BYTES));
        let op = Op::Read {
            fd: self.fd.as_raw_fd(),
            offset: 0,
            buf: Box::new(buf),
        };
        let peer = peer.clone();
        submit(op, move |op, result| {
            let buf = owned(op.into_buf().expect("a read carries its buffer"));
            let result = {
                let mut p = peer.borrow_mut();
                let s = p.stream();
                s.reading = false;
                let result = match result {
                    Ok(0) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                    Ok(n) => {
                        s.rx.extend_from_slice(&buf.as_slice()[..n as usize]);
                        Ok(())
                    }
                    Err(e) => Err(e),
                };
                s.spare = Some(buf);
                result
            };
            match result {
                Ok(()) => P::received(&peer),
                Err(e) => P::failed(&peer, e),
            }
        });
    }

    /// Sends what is queued unless a write is in flight (its completion sends the rest).
    pub(crate) fn flush<P: Peer>(&mut self, peer: &Rc<RefCell<P>>) {
        if self.writing || self.out.is_empty() {
            return;
        }
        self.writing = true;
        let buf = Box::new(OwnedBuf::from_slice(&self.out));
        self.out.clear();
        write(self.fd.as_raw_fd(), buf, 0, peer.clone());
    }
}

/// Writes `buf` from byte `done_bytes` on; resubmits short writes.
fn write<P: Peer>(fd: i32, buf: Box<dyn IoBuffers>, done_bytes: usize, peer: Rc<RefCell<P>>) {
    let total = ringblk_ring::buf::total_len(buf.as_ref());
    let part: Box<dyn IoBuffers> = if done_bytes > 0 {
        Box::new(Window::new(buf, done_bytes))
    } else {
        buf
    };
    let op = Op::Write {
        fd,
        offset: 0,
        buf: part,
    };
    submit(op, move |op, result| {
        let part = op.into_buf().expect("a write carries its buffer");
        let buf = if done_bytes > 0 {
            Window::unwrap(part)
        } else {
            part
        };
        let progress = match result {
            Ok(0) => Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => Ok(done_bytes + n as usize),
            Err(e) => Err(e),
        };
        match progress {
            Ok(progress) if progress < total => write(fd, buf, progress, peer),
            Ok(_) => {
                {
                    let mut p = peer.borrow_mut();
                    let s = p.stream();
                    s.writing = false;
                    s.flush(&peer);
                }
                P::sent(&peer);
            }
            Err(e) => {
                peer.borrow_mut().stream().writing = false;
                P::failed(&peer, e);
            }
        }
    });
}

fn submit(op: Op, done: impl FnOnce(Op, io::Result<u32>) + 'static) {
    if let Err(rejected) = Context::current().submit(op, done) {
        rejected.fail_later();
    }
}

fn owned(buf: Box<dyn IoBuffers>) -> OwnedBuf {
    OwnedBuf::from_boxed(buf)
        .ok()
        .expect("the stream's ops carry OwnedBufs")
}
