//! Helpers shared by blkgraph's tests.
#![allow(dead_code)]

use std::cell::RefCell;
use std::rc::Rc;

use ringblk_blkgraph::{BackendHandle, BlockResult, Node, Request};
use ringblk_ring::Context;
use ringblk_ring::buf::{self, OwnedBuf};

/// Runs `test` on a fresh thread with a fresh context.
pub fn on_context(test: impl FnOnce(&Context) + Send + 'static) {
    std::thread::spawn(move || {
        let ctx = Context::new(128).expect("io_uring_setup");
        test(&ctx);
        ctx.shutdown();
    })
    .join()
    .expect("test thread panicked");
}

/// Where a request's completion lands.
pub type Slot = Rc<RefCell<Option<(BlockResult, Request)>>>;

/// Submits `req` to `node`; the completion fills the returned slot.
pub fn start(node: &Node, req: Request) -> Slot {
    let slot: Slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    node.submit(
        req,
        Box::new(move |r, req| *s.borrow_mut() = Some((r, req))),
    );
    slot
}

/// Submits through a handle.
pub fn start_via(handle: &BackendHandle, req: Request) -> Slot {
    let slot: Slot = Rc::new(RefCell::new(None));
    let s = slot.clone();
    handle.submit(
        req,
        Box::new(move |r, req| *s.borrow_mut() = Some((r, req))),
    );
    slot
}

/// Submits and runs the context until the request completed.
pub fn run(ctx: &Context, node: &Node, req: Request) -> (BlockResult, Request) {
    let slot = start(node, req);
    ctx.run_until(|| slot.borrow().is_some());
    slot.take().unwrap()
}

pub fn write(offset: u64, data: &[u8]) -> Request {
    Request::Write {
        offset,
        buf: Box::new(OwnedBuf::from_slice(data)),
    }
}

pub fn read(offset: u64, len: usize) -> Request {
    Request::Read {
        offset,
        buf: Box::new(OwnedBuf::zeroed(len)),
    }
}

/// The data a completed read brought back.
pub fn data(req: Request) -> Vec<u8> {
    let b = req.into_buf().unwrap();
    let mut out = vec![0; buf::total_len(b.as_ref())];
    buf::copy_out(b.as_ref(), &mut out);
    out
}

/// A raw image file of `len` bytes filled with `fill`.
pub fn image(len: usize, fill: u8) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![fill; len]).unwrap();
    f
}
