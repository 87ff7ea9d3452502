//! The backend handle: what a device submits to, and the one place a pivot happens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use ringblk_ring::{Group, Remote};

use crate::node::{Node, NodeInner, Resume};
use crate::request::{Done, Request};

/// The external sources of one device: a mute group and the contexts that poll its sources.
#[derive(Clone)]
pub struct MuteTarget {
    /// The device's group.
    pub group: Group,
    /// Every context serving one of the device's queues.
    pub rings: Vec<Remote>,
}

pub(crate) struct HandleInner {
    root: ArcSwap<NodeInner>,
    pub(crate) mute_targets: Mutex<Vec<MuteTarget>>,
    pub(crate) mute_enabled: AtomicBool,
    park_at_node: AtomicBool,
}

/// A device's reference to its root node. Reading the root is lock-free; `replace` swaps it.
#[derive(Clone)]
pub struct BackendHandle(pub(crate) Arc<HandleInner>);

impl BackendHandle {
    /// A handle on `root`, registered with it so drains of `root` (or of anything below it)
    /// mute this handle's devices.
    pub fn new(root: &Node) -> BackendHandle {
        let handle = BackendHandle(Arc::new(HandleInner {
            root: ArcSwap::new(root.0.clone()),
            mute_targets: Mutex::new(Vec::new()),
            mute_enabled: AtomicBool::new(true),
            park_at_node: AtomicBool::new(false),
        }));
        root.0
            .handles
            .lock()
            .unwrap()
            .push(Arc::downgrade(&handle.0));
        handle
    }

    /// The current root node.
    pub fn root(&self) -> Node {
        Node(self.0.root.load_full())
    }

    /// Submits a request to the current root, on the current context. If the root is drained,
    /// the request waits here, at the handle, and goes to whatever the root is when the drained
    /// section ends (after a pivot: the new root).
    pub fn submit(&self, req: Request, done: Done) {
        let resume = if self.0.park_at_node.load(Ordering::Relaxed) {
            Resume::Node
        } else {
            Resume::Handle(self.clone())
        };
        self.root().enter(req, done, resume);
    }

    /// Makes `new_root` the root: the pivot. Call it inside a drained section of the old root,
    /// so no request is in flight through the old root and none can enter it meanwhile.
    pub fn replace(&self, new_root: &Node) {
        let old = self.root();
        assert!(
            old.quiesce_counter() > 0,
            "replace of node '{}' outside a drained section",
            old.name()
        );
        old.0
            .handles
            .lock()
            .unwrap()
            .retain(|h| h.upgrade().is_some_and(|h| !Arc::ptr_eq(&h, &self.0)));
        new_root
            .0
            .handles
            .lock()
            .unwrap()
            .push(Arc::downgrade(&self.0));
        self.0.root.store(new_root.0.clone());
    }

    /// Registers a device's external sources, muted by every drained section of the root.
    pub fn add_mute_target(&self, target: MuteTarget) {
        self.0.mute_targets.lock().unwrap().push(target);
    }

    /// Unregisters the device's sources of `group`.
    pub fn remove_mute_target(&self, group: Group) {
        self.0
            .mute_targets
            .lock()
            .unwrap()
            .retain(|t| t.group != group);
    }

    /// TEST ONLY: with `false`, drained sections stop muting this handle's devices, which
    /// reopens the race the mute exists to close. The mirror's integrity tests use it to prove
    /// that their check catches lost writes. Never turn it off in production.
    pub fn set_mute_enabled_for_test(&self, enabled: bool) {
        self.0.mute_enabled.store(enabled, Ordering::SeqCst);
    }

    /// TEST ONLY: with `true`, a request parked at a drained root resumes at that node rather
    /// than at the handle's root of the moment: after a pivot, at the old root, where an
    /// acknowledged write is lost to the new one. Tests use it to prove they catch that.
    pub fn set_park_at_node_for_test(&self, at_node: bool) {
        self.0.park_at_node.store(at_node, Ordering::Relaxed);
    }
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        let root = self.root.load();
        root.handles
            .lock()
            .unwrap()
            .retain(|h| h.strong_count() > 0);
    }
}
