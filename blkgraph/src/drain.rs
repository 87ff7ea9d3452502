//! Drained sections.
//!
//! `drained_begin(node)` first mutes the external sources of every device above `node` (on each
//! context that serves them, acknowledged), then raises the quiesce counter of `node`, of every
//! node below it and of every node above it, then runs the current context until none of them
//! has a request in flight. Until the returned [`Drained`] is dropped, nothing is in flight in
//! those nodes and nothing new enters them: devices are muted, and any other submitter is parked
//! at the gate.
//!
//! Why the nodes above: a request a filter has admitted is already in flight in the filter, and
//! the filter forwards it to its child past the child's gate (`submit_drained`); parking it
//! there would make a drain of the filter wait for a request that only runs after the drain
//! ends. So the gate that holds new requests is the topmost one, and a drain of a child closes
//! its parents' gates and waits for their requests too (as QEMU drains the parents of a node).
//! Dropping it (drained_end) lowers the counters, releases parked requests and unmutes, in that
//! order. Sections nest: each level is a counter.

use std::time::Duration;

use ringblk_ring::{Context, Group, Remote};

use crate::handle::BackendHandle;
use crate::node::Node;

/// A drained section; dropping it ends the section.
#[must_use = "dropping the guard ends the drained section at once"]
pub struct Drained {
    nodes: Vec<Node>,
    muted: Vec<(Group, Remote)>,
}

/// Begins a drained section of `node`, everything below it and everything above it; returns
/// when it is drained.
pub fn drained_begin(node: &Node) -> Drained {
    let muted = mute_devices_above(node);
    let mut nodes = node.subtree();
    for n in node.ancestry() {
        if !nodes.iter().any(|o| o.same(&n)) {
            nodes.push(n);
        }
    }
    for n in &nodes {
        n.quiesce_inc();
    }
    let idle = || nodes.iter().all(|n| n.in_flight() == 0);
    match Context::try_current() {
        Some(ctx) => ctx.run_until(idle),
        None => {
            while !idle() {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
    Drained { nodes, muted }
}

impl Drained {
    /// The node the section was begun on.
    pub fn node(&self) -> &Node {
        &self.nodes[0]
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        for n in &self.nodes {
            if n.quiesce_dec() {
                n.release_parked();
            }
        }
        for (group, ring) in self.muted.drain(..).rev() {
            ring.unmute(group);
        }
    }
}

fn mute_devices_above(node: &Node) -> Vec<(Group, Remote)> {
    let mut muted = Vec::new();
    for n in node.ancestry() {
        let handles: Vec<BackendHandle> =
            n.0.handles
                .lock()
                .unwrap()
                .iter()
                .filter_map(|h| h.upgrade())
                .map(BackendHandle)
                .collect();
        for handle in handles {
            if !handle
                .0
                .mute_enabled
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                continue;
            }
            let targets = handle.0.mute_targets.lock().unwrap().clone();
            for target in targets {
                for ring in target.rings {
                    ring.mute(target.group);
                    muted.push((target.group, ring));
                }
            }
        }
    }
    muted
}
