//! The race the project exists to get right, made deterministic.
//!
//! After the final copy, the job holds the source drained and defers the pivot to a later turn
//! of the main context. A guest kick dispatched in that window submits a write against the
//! filter, which forwards it to the source after the drained section ends: acknowledged, and
//! missing from the target the device pivots to. The mute keeps the kick in its eventfd until
//! after the pivot.
//!
//! The job's test hook runs right before it defers the pivot. There the test queues a write and
//! kicks the device, and gives the device's ring every chance to dispatch it before the pivot:
//! - **same turn**: inside the turn that defers the pivot (nested loop turns run by the hook);
//! - **next turn**: in the next turn of the main context, before the pivot callback (a callback
//!   the hook defers is queued ahead of the pivot, and deferred callbacks run in order).
//!
//! Each ordering runs with the device on the main context and on an I/O thread, with the mute
//! (the write must land on the target and read back through the handle) and without it. Two
//! more layers then stand in the way, and the tests take them away one at a time:
//! - on the main context the hook's turns are nested in the job's turn, and nested turns hold
//!   external sources until the outer turn is over (`Context::run_until`): the kick still waits
//!   for the pivot;
//! - on an I/O thread the kick is dispatched in the window and its write meets the drained
//!   filter's gate. It waits at the device's backend handle and resumes on the root of the
//!   moment, the target: not lost. With parking at the node restored (a test-only switch) it
//!   resumes on the filter, i.e. the old source: lost, and the integrity check must say so.

// Test disks are a few MiB: every index and offset fits every integer type used here.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use ringblk_blkgraph::BackendHandle;
use ringblk_mirror::{Mirror, MirrorOptions};
use ringblk_ring::{Context, IoThread, Wait};

const BLOCKS: u64 = 64;
const RACING_BLOCK: u64 = 7;

#[derive(Clone, Copy, Debug)]
enum Ordering {
    SameTurn,
    NextTurn,
}

#[derive(Clone, Copy, Debug)]
enum Topology {
    MainContext,
    IoThread,
}

struct Outcome {
    lost: Vec<Lost>,
    /// The root the racing write was dispatched against.
    dispatched_against: Vec<String>,
    /// Whether the device had dispatched the racing write when the pivot callback began.
    dispatched_before_pivot: bool,
    /// The racing write's generation as found in the source file.
    on_source: Option<u64>,
    racing_generation: u64,
}

/// Queues the racing write, kicks, and gives the device's ring the chance to dispatch it.
fn kick_in_window(ctx: &Context, device: &Device, topology: Topology) -> u64 {
    let before = device.dispatched();
    let w = device.write(Some(RACING_BLOCK));
    let deadline = Instant::now() + Duration::from_millis(30);
    while device.dispatched() == before && Instant::now() < deadline {
        match topology {
            // The device's ring is this one: run it (nested turns, as a drain does).
            Topology::MainContext => {
                ctx.turn(Wait::For(Duration::from_millis(1)));
            }
            Topology::IoThread => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    w.generation
}

/// Which of the protections a run keeps.
#[derive(Clone, Copy, Debug)]
struct Protection {
    mute: bool,
    park_at_handle: bool,
}

const FULL: Protection = Protection {
    mute: true,
    park_at_handle: true,
};
const NO_MUTE: Protection = Protection {
    mute: false,
    park_at_handle: true,
};
const NONE: Protection = Protection {
    mute: false,
    park_at_handle: false,
};

fn race(ordering: Ordering, topology: Topology, protection: Protection) -> Outcome {
    let iothread = match topology {
        Topology::IoThread => Some(IoThread::spawn("device", Duration::ZERO).unwrap()),
        Topology::MainContext => None,
    };
    let device_ring = iothread.as_ref().map(|t| t.remote().clone());
    on_context(move |ctx| {
        let (fs, ft) = (stamped_image(BLOCKS), zero_image(BLOCKS * BLOCK));
        let (source, target) = (file_node("source", &fs), file_node("target", &ft));
        let handle = BackendHandle::new(&source);
        let ring = device_ring.unwrap_or_else(|| ctx.remote());
        let device = Device::attach(&handle, ring, BLOCKS, 1);
        handle.set_mute_enabled_for_test(protection.mute);
        handle.set_park_at_node_for_test(!protection.park_at_handle);

        let (tx, mut events) = Events::new();
        let options = MirrorOptions {
            granularity: BLOCK,
            ..MirrorOptions::new("race")
        };
        let mirror = Mirror::create(&source, &target, options, Some(tx)).unwrap();
        mirror.start().unwrap();
        events.wait_ready(ctx);
        // An ordinary write while READY: tracked and copied, never at risk.
        device.write(Some(3));
        device.settle(ctx);

        let racing = std::rc::Rc::new(std::cell::Cell::new(0));
        let dispatched_at_pivot = std::rc::Rc::new(std::cell::Cell::new(None));
        let (r, d, c) = (racing.clone(), device.clone(), ctx.clone());
        let at_pivot = dispatched_at_pivot.clone();
        let d2 = device.clone();
        mirror.set_before_pivot_hook_for_test(move || {
            let before = d2.dispatched();
            match ordering {
                Ordering::SameTurn => r.set(kick_in_window(&c, &d, topology)),
                Ordering::NextTurn => {
                    let c2 = c.clone();
                    c.defer(move || r.set(kick_in_window(&c2, &d, topology)));
                }
            }
            // Queued after the above, so it runs right before the pivot callback (which the
            // job defers next): records whether the racing write was dispatched by then.
            c.defer(move || at_pivot.set(Some(d2.dispatched() > before)));
        });
        mirror.complete().unwrap();
        assert_eq!(events.wait_completed(ctx), None);
        device.settle(ctx);
        assert!(handle.root().same(&target), "pivoted");

        Outcome {
            lost: device.lost_writes(ctx),
            dispatched_against: device.roots_of(RACING_BLOCK),
            dispatched_before_pivot: dispatched_at_pivot.get().expect("hook ran"),
            on_source: file_generations(&fs, BLOCKS)[usize::try_from(RACING_BLOCK).unwrap()],
            racing_generation: racing.get(),
        }
    })
}

fn assert_write_lands_on_the_target_after_the_pivot(o: &Outcome, what: &str) {
    assert!(
        !o.dispatched_before_pivot,
        "{what}: the kick was dispatched before the pivot"
    );
    assert_eq!(
        o.dispatched_against,
        ["target"],
        "{what}: dispatched after the pivot"
    );
    assert!(o.lost.is_empty(), "{what}: lost writes: {:?}", o.lost);
    assert_eq!(
        o.on_source,
        Some(0),
        "{what}: the source never saw the write"
    );
}

fn assert_muted_write_lands_on_the_target(ordering: Ordering, topology: Topology) {
    let o = race(ordering, topology, FULL);
    assert_write_lands_on_the_target_after_the_pivot(&o, &format!("{ordering:?}/{topology:?}"));
}

/// Main context, no mute, parking at the node: only the nested-wait rule is left, and it holds.
fn assert_nested_turn_holds_the_kick(ordering: Ordering) {
    let o = race(ordering, Topology::MainContext, NONE);
    assert_write_lands_on_the_target_after_the_pivot(&o, &format!("{ordering:?}, no mute"));
}

/// I/O thread, no mute: the kick is dispatched in the window and its write parks at the gate.
fn assert_parked_write_resumes_on_the_target(ordering: Ordering) {
    let o = race(ordering, Topology::IoThread, NO_MUTE);
    assert!(
        o.dispatched_before_pivot,
        "{ordering:?}: without the mute the kick runs in the window"
    );
    assert_eq!(o.dispatched_against, ["race-mirror-top"]);
    assert!(o.lost.is_empty(), "lost writes: {:?}", o.lost);
    assert_eq!(
        o.on_source,
        Some(0),
        "the parked write went to the target, not the source"
    );
}

fn assert_unprotected_write_is_lost_and_detected(ordering: Ordering) {
    let o = race(ordering, Topology::IoThread, NONE);
    assert!(
        o.dispatched_before_pivot,
        "{ordering:?}: without the mute the kick runs in the window"
    );
    assert_eq!(o.dispatched_against, ["race-mirror-top"]);
    assert_eq!(
        o.lost,
        [(RACING_BLOCK, o.racing_generation, Some(0))],
        "the integrity check must report exactly the racing write"
    );
    assert_eq!(
        o.on_source,
        Some(o.racing_generation),
        "the write went to the source"
    );
}

#[test]
fn kick_in_the_turn_that_defers_the_pivot_lands_on_the_target() {
    assert_muted_write_lands_on_the_target(Ordering::SameTurn, Topology::MainContext);
}

#[test]
fn kick_in_the_next_turn_before_the_pivot_lands_on_the_target() {
    assert_muted_write_lands_on_the_target(Ordering::NextTurn, Topology::MainContext);
}

#[test]
fn kick_on_an_iothread_in_the_turn_that_defers_the_pivot_lands_on_the_target() {
    assert_muted_write_lands_on_the_target(Ordering::SameTurn, Topology::IoThread);
}

#[test]
fn kick_on_an_iothread_in_the_next_turn_lands_on_the_target() {
    assert_muted_write_lands_on_the_target(Ordering::NextTurn, Topology::IoThread);
}

#[test]
fn without_the_mute_a_nested_turn_still_holds_the_kick_until_after_the_pivot() {
    assert_nested_turn_holds_the_kick(Ordering::SameTurn);
}

#[test]
fn without_the_mute_a_nested_turn_of_the_next_turn_still_holds_the_kick() {
    assert_nested_turn_holds_the_kick(Ordering::NextTurn);
}

#[test]
fn without_the_mute_a_write_parked_at_the_gate_in_the_same_turn_resumes_on_the_target() {
    assert_parked_write_resumes_on_the_target(Ordering::SameTurn);
}

#[test]
fn without_the_mute_a_write_parked_at_the_gate_in_the_next_turn_resumes_on_the_target() {
    assert_parked_write_resumes_on_the_target(Ordering::NextTurn);
}

#[test]
fn without_mute_or_handle_parking_a_kick_in_the_same_turn_is_lost_and_detected() {
    assert_unprotected_write_is_lost_and_detected(Ordering::SameTurn);
}

#[test]
fn without_mute_or_handle_parking_a_kick_in_the_next_turn_is_lost_and_detected() {
    assert_unprotected_write_is_lost_and_detected(Ordering::NextTurn);
}
