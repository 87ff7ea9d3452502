//! Test nodes: a fault-injecting filter (feature `test-utils`).

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::BlockError;
use crate::node::{Driver, Extent, Node};
use crate::request::{Done, Request};

/// Switches of a [`FaultNode`], shared with the test.
#[derive(Default)]
pub struct Faults {
    /// Reads complete with EIO.
    pub fail_reads: AtomicBool,
    /// Write-type requests complete with EIO (after reaching the child or not: see `drop_writes`).
    pub fail_writes: AtomicBool,
    /// Failing writes fail with ENOSPC instead of EIO (a target that ran out of space).
    pub no_space: AtomicBool,
    /// Completions are held until [`release_held`] runs on the completing thread.
    pub hold: AtomicBool,
}

impl Faults {
    /// Turns a switch on or off.
    pub fn set(flag: &AtomicBool, on: bool) {
        flag.store(on, Ordering::SeqCst);
    }
}

thread_local! {
    static HELD: RefCell<Vec<Box<dyn FnOnce()>>> = const { RefCell::new(Vec::new()) };
}

/// Completions held on this thread.
pub fn held_count() -> usize {
    HELD.with(|h| h.borrow().len())
}

/// Runs every completion held on this thread; returns how many.
pub fn release_held() -> usize {
    let held = HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
    let n = held.len();
    for complete in held {
        complete();
    }
    n
}

/// A filter that forwards to its child and injects faults on the way back.
pub struct FaultNode {
    child: Node,
    faults: Arc<Faults>,
}

impl FaultNode {
    /// A fault filter over `child`, controlled through the returned switches.
    pub fn new(child: Node) -> (FaultNode, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            FaultNode {
                child,
                faults: faults.clone(),
            },
            faults,
        )
    }
}

impl Driver for FaultNode {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn size(&self) -> u64 {
        self.child.size()
    }

    fn children(&self) -> Vec<Node> {
        vec![self.child.clone()]
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.child.block_status(offset, len)
    }

    fn submit(&self, req: Request, done: Done) {
        let faults = self.faults.clone();
        // Admitted by this node's gate: past the child's (see `drain`).
        self.child.submit_drained(
            req,
            Box::new(move |result, req| {
                let fail = if req.is_write() {
                    &faults.fail_writes
                } else {
                    &faults.fail_reads
                };
                let result = if fail.load(Ordering::SeqCst) && !matches!(req, Request::Flush) {
                    let errno = if req.is_write() && faults.no_space.load(Ordering::SeqCst) {
                        libc::ENOSPC
                    } else {
                        libc::EIO
                    };
                    Err(io::Error::from_raw_os_error(errno).into())
                } else {
                    result
                };
                if faults.hold.load(Ordering::SeqCst) {
                    HELD.with(|h| h.borrow_mut().push(Box::new(move || done(result, req))));
                } else {
                    done(result, req);
                }
            }),
        );
    }
}
