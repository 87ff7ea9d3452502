//! Nodes: a driver plus the state every node shares (in-flight and quiesce counters, edges).
//!
//! A request enters a node through [`Node::submit`], on whatever context the caller runs on; the
//! driver performs it on that same context and completes it there. The entry is the gate of a
//! drained section: it counts the request in flight *first* and checks the quiesce counter
//! *second*, while `drained_begin` raises the quiesce counter first and waits for zero second
//! (both sequentially consistent), so a drain can never miss a request that got past the gate.
//! A request stopped at the gate is parked on its own context and resubmitted there when the
//! last drained section of the node ends: delayed, never failed, never lost. It resumes where
//! its submitter would send it *then*: a device's request through its backend handle, whose
//! root a pivot may have changed meanwhile (design invariant 7), anything else at the node.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use ringblk_ring::{Context, InFlight, Remote};

use crate::error::{BlockError, BlockResult};
use crate::handle::{BackendHandle, HandleInner};
use crate::request::{Done, Request};

/// Limits a node imposes on requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (1 = no constraint).
    pub request_alignment: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request_alignment: 1,
        }
    }
}

/// What a block driver implements. `submit` is called on the submitter's context after the
/// generic checks (range, alignment, read-only) passed; the driver must complete the request on
/// that context, and never inline: at a later loop turn, through an op or a deferred callback.
pub trait Driver: Send + Sync + 'static {
    /// QAPI name of the driver ("file", "null-co", "mirror_top").
    fn name(&self) -> &'static str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Request limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }
    /// Whether write-type requests are refused.
    fn read_only(&self) -> bool {
        false
    }
    /// Child edges, for drains and the graph.
    fn children(&self) -> Vec<Node> {
        Vec::new()
    }
    /// Performs `req` and calls `done` on this context when it completes.
    fn submit(&self, req: Request, done: Done);
    /// Changes the size to `size` bytes (QMP `block_resize`); the default cannot.
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        let _ = size;
        Err(BlockError::NotSupported)
    }
    /// What `[offset, offset + len)` (inside the node, `len > 0`) starts with: data, or a run
    /// known to read as zeroes, and how long that run is. A metadata lookup that returns at
    /// once (QEMU's block-status); the default knows nothing, so everything is data.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        let _ = offset;
        Ok(Extent {
            contents: Contents::Data,
            len,
        })
    }
}

/// What a run of a node holds, as far as its driver can tell without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contents {
    /// Possibly anything: read it to know.
    Data,
    /// Reads as zeroes (a hole, or beyond the end of the file).
    Zero,
}

/// A run of bytes with the same [`Contents`], starting where it was asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub contents: Contents,
    /// Bytes in the run: at least 1, at most what was asked for.
    pub len: u64,
}

pub(crate) struct NodeInner {
    name: String,
    driver: Box<dyn Driver>,
    in_flight: InFlight,
    quiesce: AtomicUsize,
    /// Contexts holding requests parked at the gate (touched only on the drained path).
    parked_on: Mutex<Vec<Remote>>,
    /// Backend handles whose root this node is (touched only on the control path).
    pub(crate) handles: Mutex<Vec<Weak<HandleInner>>>,
    /// Nodes that have this node as a child (touched only on the control path).
    parents: Mutex<Vec<Weak<NodeInner>>>,
    /// The first write ending past this offset calls `threshold_hit` and disarms it (0: off).
    write_threshold: AtomicU64,
    threshold_hit: Mutex<Option<WriteThresholdHit>>,
}

/// Called, on the writer's context, with the bytes by which a write went past the threshold
/// and the threshold (QEMU's BLOCK_WRITE_THRESHOLD `amount-exceeded`, `write-threshold`).
pub type WriteThresholdHit = Box<dyn FnOnce(u64, u64) + Send>;

/// A node of the block graph. Cheap to clone (shared), usable from any context.
#[derive(Clone)]
pub struct Node(pub(crate) Arc<NodeInner>);

/// Where a parked request goes when it resumes.
pub(crate) enum Resume {
    /// The node it was submitted to.
    Node,
    /// Whatever the handle's root is when it resumes.
    Handle(BackendHandle),
}

/// A request waiting at a node's gate.
struct Parked {
    /// The node whose gate it waits at (its release lets the request go).
    at: Node,
    resume: Resume,
    req: Request,
    done: Done,
}

thread_local! {
    /// Requests parked at a gate on this context.
    static PARKED: RefCell<Vec<Parked>> = const { RefCell::new(Vec::new()) };
}

impl Node {
    /// Wraps a driver into a node named `name`, recording it as the parent of its children.
    pub fn new(name: impl Into<String>, driver: impl Driver) -> Node {
        let node = Node(Arc::new(NodeInner {
            name: name.into(),
            driver: Box::new(driver),
            in_flight: InFlight::new(),
            quiesce: AtomicUsize::new(0),
            parked_on: Mutex::new(Vec::new()),
            handles: Mutex::new(Vec::new()),
            parents: Mutex::new(Vec::new()),
            write_threshold: AtomicU64::new(0),
            threshold_hit: Mutex::new(None),
        }));
        for child in node.children() {
            child
                .0
                .parents
                .lock()
                .unwrap()
                .push(Arc::downgrade(&node.0));
        }
        node
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The driver's QAPI name.
    pub fn driver_name(&self) -> &'static str {
        self.0.driver.name()
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.0.driver.size()
    }

    /// Request limits.
    pub fn limits(&self) -> Limits {
        self.0.driver.limits()
    }

    /// Whether write-type requests are refused.
    pub fn read_only(&self) -> bool {
        self.0.driver.read_only()
    }

    /// Changes the size to `size` bytes (`block_resize`): refused on a read-only node, and by
    /// drivers whose size is fixed. Requests are checked against the new size from then on;
    /// whoever shows the size to a guest (an export) must be told by the caller.
    pub fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.read_only() {
            return Err(BlockError::ReadOnly);
        }
        self.0.driver.truncate(size)
    }

    /// What `[offset, offset + len)` starts with, and for how long ([`Driver::block_status`]).
    /// Synchronous and cheap; the range must be inside the node and not empty.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        let size = self.size();
        if len == 0 || offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        let extent = self.0.driver.block_status(offset, len)?;
        assert!(
            (1..=len).contains(&extent.len),
            "{}: block status of [{offset}, +{len}) returned a run of {}",
            self.name(),
            extent.len
        );
        Ok(extent)
    }

    /// Child edges.
    pub fn children(&self) -> Vec<Node> {
        self.0.driver.children()
    }

    /// Requests in flight in this node (not counting its children's own count).
    pub fn in_flight(&self) -> usize {
        self.0.in_flight.get()
    }

    /// How many drained sections hold this node.
    pub fn quiesce_counter(&self) -> usize {
        self.0.quiesce.load(Ordering::SeqCst)
    }

    /// Whether two handles name the same node.
    pub fn same(&self, other: &Node) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether anything above uses this node: a parent node or a backend handle.
    pub fn has_users(&self) -> bool {
        let parents = self
            .0
            .parents
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.strong_count() > 0);
        parents
            || self
                .0
                .handles
                .lock()
                .unwrap()
                .iter()
                .any(|h| h.strong_count() > 0)
    }

    /// The backend handles whose root this node is (what a pivot away from it must `replace`).
    pub fn handles(&self) -> Vec<BackendHandle> {
        self.0
            .handles
            .lock()
            .unwrap()
            .iter()
            .filter_map(Weak::upgrade)
            .map(BackendHandle)
            .collect()
    }

    /// `block-set-write-threshold`: the first write-type request (write, write zeroes,
    /// discard) that ends past `threshold` bytes calls `hit` and disarms it, as QEMU checks
    /// when a write starts. 0 disarms.
    pub fn set_write_threshold(&self, threshold: u64, hit: WriteThresholdHit) {
        *self.0.threshold_hit.lock().unwrap() = (threshold > 0).then_some(hit);
        self.0.write_threshold.store(threshold, Ordering::SeqCst);
    }

    /// The armed write threshold (0: none).
    pub fn write_threshold(&self) -> u64 {
        self.0.write_threshold.load(Ordering::Relaxed)
    }

    /// One relaxed load per write while no threshold is armed.
    fn check_write_threshold(&self, req: &Request) {
        let threshold = self.0.write_threshold.load(Ordering::Relaxed);
        if threshold == 0 || !req.is_write() {
            return;
        }
        let Some((offset, len)) = req.range() else {
            return;
        };
        let end = offset.saturating_add(len);
        let disarmed = end > threshold
            && self
                .0
                .write_threshold
                .compare_exchange(threshold, 0, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok();
        if disarmed && let Some(hit) = self.0.threshold_hit.lock().unwrap().take() {
            hit(end - threshold, threshold);
        }
    }

    /// Submits a request on the current context. While the node is drained the request waits at
    /// the gate and runs after the last `drained_end`.
    pub fn submit(&self, req: Request, done: Done) {
        self.enter(req, done, Resume::Node);
    }

    /// Submits through the gate; a parked request resumes as `resume` says.
    pub(crate) fn enter(&self, req: Request, done: Done, resume: Resume) {
        self.0.in_flight.inc();
        if self.quiesce_counter() > 0 {
            self.0.in_flight.dec();
            self.park(Parked {
                at: self.clone(),
                resume,
                req,
                done,
            });
            return;
        }
        self.perform(req, done);
    }

    /// Submits past the gate: for the holder of a drained section (a job doing its final copy
    /// while the node is drained), which must not wait for its own drain.
    pub fn submit_drained(&self, req: Request, done: Done) {
        self.0.in_flight.inc();
        self.perform(req, done);
    }

    fn perform(&self, req: Request, done: Done) {
        self.check_write_threshold(&req);
        let node = self.clone();
        let done: Done = Box::new(move |result, req| {
            done(result, req);
            node.0.in_flight.dec();
        });
        match self.check(&req) {
            Ok(()) => self.0.driver.submit(req, done),
            Err(e) => Context::current().defer(move || done(Err(e), req)),
        }
    }

    fn check(&self, req: &Request) -> BlockResult {
        if req.is_write() && self.read_only() {
            return Err(BlockError::ReadOnly);
        }
        let Some((offset, len)) = req.range() else {
            return Ok(());
        };
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        let alignment = self.limits().request_alignment;
        if offset % u64::from(alignment) != 0 || len % u64::from(alignment) != 0 {
            return Err(BlockError::Unaligned {
                offset,
                len,
                alignment,
            });
        }
        Ok(())
    }

    fn park(&self, parked: Parked) {
        let ctx = Context::current();
        PARKED.with(|p| p.borrow_mut().push(parked));
        let mut parked_on = self.0.parked_on.lock().unwrap();
        if !parked_on.iter().any(|r| r.id() == ctx.id()) {
            parked_on.push(ctx.remote());
        }
        drop(parked_on);
        // The last drained_end may have run between our check and the push above: then nobody
        // will release us, so release ourselves.
        if self.quiesce_counter() == 0 {
            self.release_parked();
        }
    }

    /// Called when the quiesce counter drops to zero: every context holding parked requests
    /// for this node resubmits them (through the gate again), in the order they were parked.
    pub(crate) fn release_parked(&self) {
        let contexts = std::mem::take(&mut *self.0.parked_on.lock().unwrap());
        for remote in contexts {
            let node = self.clone();
            remote.defer(move || node.resubmit_parked_here());
        }
    }

    fn resubmit_parked_here(&self) {
        let mine: Vec<Parked> = PARKED.with(|p| {
            let mut all = p.borrow_mut();
            let (mine, others) = all.drain(..).partition(|p| p.at.same(self));
            *all = others;
            mine
        });
        for Parked {
            at,
            resume,
            req,
            done,
        } in mine
        {
            match resume {
                Resume::Node => at.submit(req, done),
                Resume::Handle(handle) => handle.submit(req, done),
            }
        }
    }

    pub(crate) fn quiesce_inc(&self) {
        self.0.quiesce.fetch_add(1, Ordering::SeqCst);
    }

    /// Returns whether the counter reached zero.
    pub(crate) fn quiesce_dec(&self) -> bool {
        let before = self.0.quiesce.fetch_sub(1, Ordering::SeqCst);
        assert!(
            before > 0,
            "drained_end without drained_begin on node '{}'",
            self.name()
        );
        before == 1
    }

    /// This node and every node below it, each once.
    pub(crate) fn subtree(&self) -> Vec<Node> {
        let mut out: Vec<Node> = Vec::new();
        let mut todo = vec![self.clone()];
        while let Some(n) = todo.pop() {
            if out.iter().any(|o| o.same(&n)) {
                continue;
            }
            todo.extend(n.children());
            out.push(n);
        }
        out
    }

    /// This node and every node above it, each once.
    pub(crate) fn ancestry(&self) -> Vec<Node> {
        let mut out: Vec<Node> = Vec::new();
        let mut todo = vec![self.clone()];
        while let Some(n) = todo.pop() {
            if out.iter().any(|o| o.same(&n)) {
                continue;
            }
            todo.extend(
                n.0.parents
                    .lock()
                    .unwrap()
                    .iter()
                    .filter_map(Weak::upgrade)
                    .map(Node),
            );
            out.push(n);
        }
        out
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({} {})", self.driver_name(), self.name())
    }
}
