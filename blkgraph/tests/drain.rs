//! Drained sections and the pivot, in the spirit of QEMU's drain tests.

mod common;

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::testing::{FaultNode, release_held};
use ringblk_blkgraph::{BackendHandle, BlockError, MuteTarget, Node, drained_begin};
use ringblk_ring::{Context, Group, IoThread, Wait, eventfd_write};

fn null(name: &str, latency_ms: u64) -> Node {
    let options = NullOptions {
        latency: Duration::from_millis(latency_ms),
        ..NullOptions::default()
    };
    Node::new(name, NullCo::new(options))
}

fn file_node(name: &str, f: &tempfile::NamedTempFile) -> Node {
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: false,
        direct: false,
    };
    Node::new(name, FileNode::open(&options).unwrap())
}

#[test]
fn drained_section_waits_for_requests_in_flight() {
    on_context(|_| {
        let node = null("n", 20);
        let slots: Vec<_> = (0..4).map(|i| start(&node, read(i * 512, 512))).collect();
        assert_eq!(node.in_flight(), 4);
        let drained = drained_begin(&node);
        assert_eq!(node.in_flight(), 0);
        assert!(
            slots
                .iter()
                .all(|s| s.borrow().as_ref().is_some_and(|(r, _)| r.is_ok()))
        );
        drop(drained);
    });
}

#[test]
fn drained_section_drains_children_too() {
    on_context(|_| {
        let child = null("child", 20);
        let (fault, _) = FaultNode::new(child.clone());
        let top = Node::new("top", fault);
        let slot = start(&top, read(0, 512));
        let drained = drained_begin(&top);
        assert_eq!((top.in_flight(), child.in_flight()), (0, 0));
        assert_eq!(
            child.quiesce_counter(),
            1,
            "the child is part of the section"
        );
        assert!(slot.borrow().is_some());
        drop(drained);
        assert_eq!(child.quiesce_counter(), 0);
    });
}

#[test]
fn request_submitted_while_drained_waits_and_runs_after_drained_end() {
    on_context(|ctx| {
        let node = null("n", 0);
        let drained = drained_begin(&node);
        let slot = start(&node, read(0, 512));
        for _ in 0..5 {
            ctx.turn(Wait::No);
        }
        assert!(
            slot.borrow().is_none(),
            "a request must not run inside a drained section"
        );
        assert_eq!(node.in_flight(), 0, "a parked request is not in flight");
        drop(drained);
        ctx.run_until(|| slot.borrow().is_some());
        assert!(slot.borrow().as_ref().unwrap().0.is_ok(), "never failed");
    });
}

#[test]
fn nested_drains_end_at_the_outermost() {
    on_context(|ctx| {
        let node = null("n", 0);
        let outer = drained_begin(&node);
        let inner = drained_begin(&node);
        assert_eq!(node.quiesce_counter(), 2);
        let slot = start(&node, read(0, 512));
        drop(inner);
        for _ in 0..5 {
            ctx.turn(Wait::No);
        }
        assert!(
            slot.borrow().is_none(),
            "still drained by the outer section"
        );
        drop(outer);
        ctx.run_until(|| slot.borrow().is_some());
    });
}

#[test]
fn drain_holder_submits_past_the_gate() {
    on_context(|ctx| {
        let node = null("n", 0);
        let drained = drained_begin(&node);
        let slot: Slot = Default::default();
        let s = slot.clone();
        drained.node().submit_drained(
            read(0, 512),
            Box::new(move |r, q| *s.borrow_mut() = Some((r, q))),
        );
        ctx.run_until(|| slot.borrow().is_some());
        drop(drained);
    });
}

#[test]
fn replace_under_drain_sends_later_requests_to_the_new_root() {
    on_context(|ctx| {
        let (fa, fb) = (image(1 << 16, 0), image(1 << 16, 0));
        let (a, b) = (file_node("a", &fa), file_node("b", &fb));
        let handle = BackendHandle::new(&a);
        let first = start_via(&handle, write(0, b"AAAA"));
        let drained = drained_begin(&a);
        assert!(
            first.borrow().is_some(),
            "the drain completed the request in flight"
        );
        handle.replace(&b);
        drop(drained);
        let second = start_via(&handle, write(0, b"BBBB"));
        ctx.run_until(|| second.borrow().is_some());
        assert_eq!(&std::fs::read(fa.path()).unwrap()[..4], b"AAAA");
        assert_eq!(&std::fs::read(fb.path()).unwrap()[..4], b"BBBB");
        assert!(handle.root().same(&b));
        assert!(!a.has_users(), "the old root lost its handle");
    });
}

#[test]
#[should_panic(expected = "outside a drained section")]
fn replace_outside_a_drained_section_panics() {
    let a = null("a", 0);
    let b = null("b", 0);
    BackendHandle::new(&a).replace(&b);
}

#[test]
fn request_parked_at_a_handle_during_a_pivot_resumes_on_the_new_root() {
    // Design invariant 7: a device's request that reached the old root's gate during the drained
    // section goes, when it resumes, wherever the handle points then: the new root.
    on_context(|ctx| {
        let (fa, fb) = (image(1 << 16, 0), image(1 << 16, 0));
        let (a, b) = (file_node("a", &fa), file_node("b", &fb));
        let handle = BackendHandle::new(&a);
        let drained = drained_begin(&a);
        let slot = start_via(&handle, write(0, b"LATE"));
        handle.replace(&b);
        drop(drained);
        ctx.run_until(|| slot.borrow().is_some());
        assert_eq!(&std::fs::read(fb.path()).unwrap()[..4], b"LATE");
        assert_eq!(&std::fs::read(fa.path()).unwrap()[..4], [0; 4]);
    });
}

#[test]
fn with_parking_at_the_node_a_request_parked_during_a_pivot_runs_on_the_old_root() {
    // The test-only switch restores the hazard, so the mirror's tests can show they catch it.
    on_context(|ctx| {
        let (fa, fb) = (image(1 << 16, 0), image(1 << 16, 0));
        let (a, b) = (file_node("a", &fa), file_node("b", &fb));
        let handle = BackendHandle::new(&a);
        handle.set_park_at_node_for_test(true);
        let drained = drained_begin(&a);
        let slot = start_via(&handle, write(0, b"LATE"));
        handle.replace(&b);
        drop(drained);
        ctx.run_until(|| slot.borrow().is_some());
        assert_eq!(&std::fs::read(fa.path()).unwrap()[..4], b"LATE");
        assert_eq!(&std::fs::read(fb.path()).unwrap()[..4], [0; 4]);
    });
}

#[test]
fn request_submitted_to_a_node_resumes_at_that_node() {
    on_context(|ctx| {
        let fa = image(1 << 16, 0);
        let a = file_node("a", &fa);
        let drained = drained_begin(&a);
        let slot = start(&a, write(0, b"NODE"));
        ctx.turn(ringblk_ring::Wait::No);
        assert!(slot.borrow().is_none(), "waits at the gate");
        drop(drained);
        ctx.run_until(|| slot.borrow().is_some());
        assert_eq!(&std::fs::read(fa.path()).unwrap()[..4], b"NODE");
    });
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall, checked and owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[test]
fn drained_section_mutes_devices_above_and_unmutes_with_a_self_kick() {
    on_context(|ctx| {
        let source = null("source", 0);
        let (fault, _) = FaultNode::new(source.clone());
        let top = Node::new("top", fault);
        let handle = BackendHandle::new(&top);
        let group = Group::new();
        handle.add_mute_target(MuteTarget {
            group,
            rings: vec![ctx.remote()],
        });
        let kick = eventfd();
        let hits = Rc::new(Cell::new(0));
        let h = hits.clone();
        ctx.add_source(group, kick.as_raw_fd(), move || h.set(h.get() + 1));
        // Draining the node *below* the filter mutes the device above the filter.
        let drained = drained_begin(&source);
        assert!(ctx.is_muted(group));
        eventfd_write(kick.as_raw_fd());
        for _ in 0..5 {
            ctx.turn(Wait::For(Duration::from_millis(1)));
        }
        assert_eq!(
            hits.get(),
            0,
            "no kick dispatched inside the drained section"
        );
        drop(drained);
        ctx.run_until(|| hits.get() > 0);
        assert!(!ctx.is_muted(group));
    });
}

#[test]
fn drained_section_mutes_devices_served_by_another_context() {
    let iothread = IoThread::spawn("iot", Duration::ZERO).unwrap();
    let remote = iothread.remote().clone();
    on_context(move |_| {
        let node = null("n", 0);
        let handle = BackendHandle::new(&node);
        let group = Group::new();
        handle.add_mute_target(MuteTarget {
            group,
            rings: vec![remote.clone()],
        });
        let drained = drained_begin(&node);
        let muted = remote.call(move || Context::current().is_muted(group));
        assert_eq!(
            muted,
            Some(true),
            "muted and acknowledged before drained_begin returned"
        );
        drop(drained);
        let muted = remote.call(move || Context::current().is_muted(group));
        assert_eq!(muted, Some(false));
    });
}

#[test]
fn mute_disabled_for_test_leaves_devices_running() {
    on_context(|ctx| {
        let node = null("n", 0);
        let handle = BackendHandle::new(&node);
        let group = Group::new();
        handle.add_mute_target(MuteTarget {
            group,
            rings: vec![ctx.remote()],
        });
        handle.set_mute_enabled_for_test(false);
        let drained = drained_begin(&node);
        assert!(!ctx.is_muted(group));
        drop(drained);
    });
}

#[test]
fn eio_from_a_faulty_child_reaches_the_submitter() {
    on_context(|ctx| {
        let (fault, faults) = FaultNode::new(null("n", 0));
        let node = Node::new("fault", fault);
        faults.fail_writes.store(true, Ordering::SeqCst);
        let (result, _) = run(ctx, &node, write(0, &[1; 512]));
        match result {
            Err(BlockError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
            other => panic!("expected EIO, got {other:?}"),
        }
        let (result, _) = run(ctx, &node, read(0, 512));
        assert!(result.is_ok(), "reads are unaffected");
    });
}

#[test]
fn drain_waits_for_completions_held_by_a_child() {
    on_context(|ctx| {
        let (fault, faults) = FaultNode::new(null("n", 0));
        let node = Node::new("fault", fault);
        faults.hold.store(true, Ordering::SeqCst);
        let slot = start(&node, read(0, 512));
        ctx.run_until(|| ringblk_blkgraph::testing::held_count() == 1);
        assert_eq!(node.in_flight(), 1, "a held completion is still in flight");
        faults.hold.store(false, Ordering::SeqCst);
        assert_eq!(release_held(), 1);
        assert!(slot.borrow().is_some());
        let _drained = drained_begin(&node);
        assert_eq!(node.in_flight(), 0);
    });
}

/// A filter that forwards each request to its child a loop turn after admitting it.
struct ForwardLater(Node);

impl ringblk_blkgraph::Driver for ForwardLater {
    fn name(&self) -> &'static str {
        "forward-later"
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn children(&self) -> Vec<Node> {
        vec![self.0.clone()]
    }
    fn submit(&self, req: ringblk_blkgraph::Request, done: ringblk_blkgraph::Done) {
        let child = self.0.clone();
        Context::current().defer(move || child.submit_drained(req, done));
    }
}

#[test]
fn drain_of_a_filter_completes_a_request_it_admitted_before_the_gates_rose() {
    // The filter admitted the request; it reaches the child only after the child's gate rose.
    // It must pass that gate, or the drain would wait for a request that runs after it.
    on_context(|_| {
        let child = null("child", 0);
        let top = Node::new("top", ForwardLater(child.clone()));
        let slot = start(&top, read(0, 512));
        let drained = drained_begin(&top);
        assert!(slot.borrow().is_some(), "completed inside the drain");
        assert_eq!((top.in_flight(), child.in_flight()), (0, 0));
        drop(drained);
    });
}

#[test]
fn drain_of_a_child_closes_the_gates_above_and_waits_for_their_requests() {
    on_context(|ctx| {
        let child = null("child", 0);
        let top = Node::new("top", ForwardLater(child.clone()));
        let admitted = start(&top, read(0, 512));
        let drained = drained_begin(&child);
        assert_eq!(top.quiesce_counter(), 1, "the parent's gate is closed too");
        assert!(
            admitted.borrow().is_some(),
            "the parent's request was waited for"
        );
        let late = start(&top, read(0, 512));
        for _ in 0..5 {
            ctx.turn(Wait::No);
        }
        assert!(
            late.borrow().is_none(),
            "new requests wait at the topmost gate"
        );
        drop(drained);
        ctx.run_until(|| late.borrow().is_some());
    });
}
