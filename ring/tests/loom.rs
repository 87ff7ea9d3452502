//! Loom models of the ring's two cross-thread handshakes: the in-flight counter against a drain,
//! and the wake-up of a sleeping context by [`Remote::defer`](ringblk_ring::Remote::defer).
//!
//! Run them with
//!
//! ```text
//! cargo test -p ringblk-ring --test loom --release -- --ignored
//! ```
//!
//! (under `--cfg loom` they are not ignored, so `RUSTFLAGS="--cfg loom" cargo test -p
//! ringblk-ring --test loom --release` runs them too, once the library builds that way).
//!
//! ## What is under test
//! The production sources `src/inflight.rs` and `src/remote.rs` are compiled into this test crate
//! with `crate::sync` pointing at loom's atomics, so [`InFlight`] and [`Sleep`] here are the
//! library's code, not copies. The library itself is not used under loom because it does not
//! build with `--cfg loom`: `static NEXT_CONTEXT_ID` in `src/context.rs` is a `crate::sync`
//! atomic, and loom's atomics have no `const fn new`. The few crate items `remote.rs` names
//! besides `Sleep` are stubbed below; the stubs are never called.
//!
//! ## SeqCst and loom
//! Loom 0.7 treats SeqCst loads, stores and read-modify-writes as AcqRel (its README lists this
//! under "Unsupported features"), so it lets both sides of a store-buffering pair read the old
//! value, which the single total order of SeqCst operations forbids. Both handshakes here are
//! exactly that pair (write my location, then read yours). The models therefore put a
//! `fence(SeqCst)`, which loom does model, between each side's SeqCst write and SeqCst read:
//! for this two-location pattern that gives the same guarantee as the SeqCst accesses in the
//! production code, no more. The `*_fails_with_acq_rel_only` tests run the same models without
//! the fence and require loom to find the failure: the orderings are load-bearing, and the
//! models can see a drain that finished early or a lost wake-up when there is one.
//!
//! ## The models
//! - In-flight: two submitters (inc, check the quiesce counter, then either dec and park, or run
//!   and dec) race a drain (raise the quiesce counter, wait for zero, then replace the node's
//!   child), as blkgraph's gate and `drained_begin` do. Exhaustive.
//!   `drain_model_catches_checking_before_counting` shows the model finds the overlap when the
//!   gate checks before it counts.
//! - Wake-up: posters push and then ask [`Sleep::needs_wake`]; the context loops as
//!   `Context::run` does (run what was posted; `begin`, re-check, block on the wake eventfd,
//!   `end`). With a locked queue (one poster exhaustive, two posters bounded) the mutex itself
//!   orders the flag against the queue, so these check the protocol's steps and the length of
//!   the sleep window, not the flag's orderings; with a queue synchronized as crossbeam's channel
//!   is (SeqCst tail index, two posters bounded) they check the orderings too.
//!   `wakeup_model_catches_checking_before_pushing` shows the model finds a lost wake-up when
//!   the poster asks before pushing.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicUsize, fence};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

// ---- the production code, compiled against loom -------------------------------------------------

/// What `crate::sync` is under `--cfg loom` in the library.
mod sync {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
}

#[path = "../src/inflight.rs"]
mod inflight;

#[allow(dead_code, unused_imports)]
#[path = "../src/remote.rs"]
mod remote;

use inflight::InFlight;
use remote::Sleep;

// Items of the library crate root that `remote.rs` names. Only `Sleep` is exercised.
#[allow(unused_imports)]
use ringblk_ring::{Group, eventfd_write};

/// Stands in for the library's `Context` in `remote.rs` (`Remote::mute`, `unmute`, `is_current`),
/// none of which the models call.
#[allow(dead_code)]
struct Context;

#[allow(dead_code)]
impl Context {
    fn current() -> Context {
        unreachable!("the loom models never reach a context")
    }

    fn try_current() -> Option<Context> {
        None
    }

    fn run_until(&self, _pred: impl FnMut() -> bool) {
        unreachable!("the loom models never reach a context")
    }

    fn id(&self) -> u64 {
        unreachable!("the loom models never reach a context")
    }

    fn mute(&self, _group: Group) {
        unreachable!("the loom models never reach a context")
    }

    fn unmute(&self, _group: Group) {
        unreachable!("the loom models never reach a context")
    }
}

// ---- harness ------------------------------------------------------------------------------------

/// How the model orders each side's SeqCst write before its SeqCst read of the other location.
#[derive(Clone, Copy, Debug)]
enum Order {
    /// As the production code's SeqCst accesses guarantee (a `fence(SeqCst)` in the model, see
    /// the module docs).
    SeqCst,
    /// What loom makes of SeqCst accesses on their own: AcqRel. The models must fail.
    AcqRelOnly,
}

impl Order {
    /// Between a thread's write of its own location and its read of the other side's.
    fn between_write_and_read(self) {
        match self {
            Order::SeqCst => fence(SeqCst),
            Order::AcqRelOnly => {}
        }
    }
}

/// Explores the executions of `model` and returns how many it ran: all of them, or with
/// `preemption_bound` those with at most that many preemptions (`LOOM_MAX_PREEMPTIONS`, if set,
/// overrides either).
fn explore(
    name: &str,
    preemption_bound: Option<usize>,
    model: impl Fn() + Sync + Send + 'static,
) -> usize {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = preemption_bound;
    }
    let bound = builder.preemption_bound;
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    builder.check(move || {
        counter.fetch_add(1, Relaxed);
        model();
    });
    let n = executions.load(Relaxed);
    match bound {
        None => eprintln!("{name}: all {n} executions explored"),
        Some(b) => eprintln!("{name}: {n} executions with at most {b} preemptions explored"),
    }
    n
}

/// Runs `model` expecting loom to find an execution that panics; returns the panic message.
fn find_failure(name: &str, model: impl Fn() + Sync + Send + 'static) -> String {
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = executions.clone();
    let result = catch_unwind(AssertUnwindSafe(|| {
        loom::model(move || {
            counter.fetch_add(1, Relaxed);
            model();
        })
    }));
    let n = executions.load(Relaxed);
    let payload = match result {
        Ok(()) => panic!("{name}: loom explored all {n} executions and found no failure"),
        Err(payload) => payload,
    };
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    eprintln!("{name}: failure found in execution {n}: {message}");
    message
}

// ---- the in-flight counter against a drain ------------------------------------------------------

/// One node with its request accounting, as blkgraph's drain gate uses [`InFlight`]
/// (`Node::submit`, `drained_begin`): a submitter counts its request in flight, then checks the
/// quiesce counter; a drain raises the quiesce counter, then waits for zero in flight.
struct Node {
    in_flight: InFlight,
    /// The node's quiesce counter.
    quiesce: AtomicUsize,
    /// What requests read while in flight and a drained section may replace (the node's child).
    /// Loom reports any write here that is not ordered after every in-flight read.
    child: UnsafeCell<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Submitted {
    /// Went ahead; completed before the submitter returned.
    Admitted,
    /// Saw the quiesce counter raised, undid its increment and was parked for `drained_end`.
    Parked,
}

/// How the submitter passes the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// As `Node::submit`: count the request in flight, then check the quiesce counter.
    CountThenCheck,
    /// Broken on purpose: check the quiesce counter, then count.
    CheckThenCount,
}

fn submit(node: &Node, gate: Gate, order: Order) -> Submitted {
    let quiesced = match gate {
        Gate::CountThenCheck => {
            node.in_flight.inc();
            order.between_write_and_read();
            node.quiesce.load(SeqCst) > 0
        }
        Gate::CheckThenCount => {
            let quiesced = node.quiesce.load(SeqCst) > 0;
            node.in_flight.inc();
            quiesced
        }
    };
    if quiesced {
        node.in_flight.dec();
        return Submitted::Parked;
    }
    // In flight: the request goes to the node's child and completes.
    // SAFETY: loom checks that this read is ordered against the drained section's write.
    let child = node.child.with(|child| unsafe { *child });
    assert_eq!(
        child, 0,
        "an admitted request reached the replacement child"
    );
    node.in_flight.dec();
    Submitted::Admitted
}

/// `drained_begin` followed by a drained section that replaces the child.
fn drain(node: &Node, order: Order) {
    node.quiesce.fetch_add(1, SeqCst);
    order.between_write_and_read();
    while node.in_flight.get() != 0 {
        thread::yield_now();
    }
    // SAFETY: loom checks that this write is ordered after every in-flight read.
    node.child.with_mut(|child| unsafe { *child = 1 });
}

/// Two submitters (one request each) race a drain.
fn in_flight_model(gate: Gate, order: Order) {
    let node = Arc::new(Node {
        in_flight: InFlight::new(),
        quiesce: AtomicUsize::new(0),
        child: UnsafeCell::new(0),
    });
    let submitters: Vec<_> = (0..2)
        .map(|_| {
            let node = node.clone();
            thread::spawn(move || submit(&node, gate, order))
        })
        .collect();
    drain(&node, order);
    for s in submitters {
        s.join().expect("submitter panicked");
    }
    assert_eq!(node.in_flight.get(), 0);
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn drain_never_sees_zero_while_an_admitted_request_is_in_flight() {
    let n = explore("in_flight_drain", None, || {
        in_flight_model(Gate::CountThenCheck, Order::SeqCst);
    });
    assert!(n > 1);
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn drain_model_fails_with_acq_rel_only() {
    let message = find_failure("in_flight_drain_acq_rel", || {
        in_flight_model(Gate::CountThenCheck, Order::AcqRelOnly);
    });
    assert_drain_failure(&message);
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn drain_model_catches_checking_before_counting() {
    let message = find_failure("in_flight_drain_check_first", || {
        in_flight_model(Gate::CheckThenCount, Order::SeqCst);
    });
    assert_drain_failure(&message);
}

/// The ways the in-flight model fails when a drained section overlaps a request: loom sees the
/// section's write race the request's read, or the request reads the replacement.
fn assert_drain_failure(message: &str) {
    assert!(
        message.contains("replacement child") || message.contains("Causality violation"),
        "unexpected failure: {message}"
    );
}

// ---- the wake-up handshake of Remote ------------------------------------------------------------

/// With two posters the full state space is beyond a CI budget (each further preemption costs
/// about 5x: 4 explore ~60-75k executions in about 2 s, 5 explore ~300-400k in about 10 s, and an
/// unbounded run did not end within minutes), so those models stop at 4 preemptions. The
/// one-poster and in-flight models are explored exhaustively.
const TWO_POSTERS_PREEMPTION_BOUND: Option<usize> = Some(4);

/// How the poster side orders its two steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Poster {
    /// As `Remote::defer`: push, then ask `needs_wake`.
    PushThenCheck,
    /// Broken on purpose: ask `needs_wake` before pushing.
    CheckThenPush,
}

/// The queue between posters and the context.
trait Queue: Send + Sync + 'static {
    fn push(&self);
    /// Context side: takes every queued callback; returns how many.
    fn take_all(&self) -> usize;
    fn is_empty(&self) -> bool;
}

/// The defer queue as a locked deque (lock order alone then decides who sees whom).
#[derive(Default)]
struct LockedQueue(Mutex<VecDeque<()>>);

impl Queue for LockedQueue {
    fn push(&self) {
        self.0.lock().expect("poisoned").push_back(());
    }

    fn take_all(&self) -> usize {
        self.0.lock().expect("poisoned").drain(..).count()
    }

    fn is_empty(&self) -> bool {
        self.0.lock().expect("poisoned").is_empty()
    }
}

/// The defer queue as the production channel synchronizes it: crossbeam's unbounded channel
/// claims a slot with a SeqCst read-modify-write of its tail index, and `is_empty` compares SeqCst
/// loads of head and tail. Only the context consumes, so the head is the context's own count.
#[derive(Default)]
struct LockFreeQueue {
    tail: AtomicUsize,
    head: AtomicUsize,
}

impl Queue for LockFreeQueue {
    fn push(&self) {
        self.tail.fetch_add(1, SeqCst);
    }

    fn take_all(&self) -> usize {
        let tail = self.tail.load(SeqCst);
        let head = self.head.swap(tail, SeqCst);
        tail - head
    }

    fn is_empty(&self) -> bool {
        self.head.load(SeqCst) == self.tail.load(SeqCst)
    }
}

/// The context's wake eventfd: a counter the kernel updates under a lock, so a locked counter;
/// a context blocked on it waits on the condition variable. It also counts the posters that have
/// finished, so that a context left asleep when nobody can wake it any more is seen as such
/// rather than spinning forever. (A loom atomic written by `store` and consumed by `swap` would
/// also hit loom's known mis-modelling of a read-modify-write racing a plain store,
/// tokio-rs/loom#254.)
#[derive(Default)]
struct EventFd {
    state: Mutex<EventFdState>,
    changed: Condvar,
}

#[derive(Default)]
struct EventFdState {
    count: u64,
    posters_finished: usize,
}

impl EventFd {
    /// `eventfd_write`.
    fn write(&self) {
        self.state.lock().expect("poisoned").count += 1;
        self.changed.notify_one();
    }

    /// A poster has returned and will not write again.
    fn poster_finished(&self) {
        self.state.lock().expect("poisoned").posters_finished += 1;
        self.changed.notify_one();
    }

    /// Blocks until the counter is nonzero, then consumes it (the wake poll completes and
    /// `eventfd_drain` runs). Panics if every poster has finished without writing.
    fn wait_and_drain(&self, posters: usize) {
        let mut state = self.state.lock().expect("poisoned");
        while state.count == 0 {
            assert!(
                state.posters_finished < posters,
                "lost wake-up: the context sleeps with a callback queued and nobody will wake it"
            );
            state = self.changed.wait(state).expect("poisoned");
        }
        state.count = 0;
    }
}

struct Wakeup<Q> {
    sleep: Sleep,
    queue: Q,
    wake_fd: EventFd,
}

/// `Remote::defer`, or with [`Poster::CheckThenPush`] a broken version of it.
fn post<Q: Queue>(w: &Wakeup<Q>, poster: Poster, order: Order) {
    let wake = match poster {
        Poster::PushThenCheck => {
            w.queue.push();
            order.between_write_and_read();
            w.sleep.needs_wake()
        }
        Poster::CheckThenPush => {
            let wake = w.sleep.needs_wake();
            w.queue.push();
            wake
        }
    };
    if wake {
        w.wake_fd.write();
    }
    w.wake_fd.poster_finished();
}

/// The context's loop as `Context::run` drives it: run what was posted, and when nothing was,
/// `sleep`: `Sleep::begin`, re-check the queue, block until the wake eventfd fires, `Sleep::end`.
fn run_context<Q: Queue>(w: &Wakeup<Q>, posters: usize, order: Order) {
    let mut ran = 0;
    loop {
        ran += w.queue.take_all();
        if ran == posters {
            return;
        }
        w.sleep.begin();
        order.between_write_and_read();
        if w.queue.is_empty() {
            // Asleep in io_uring_enter until the wake eventfd's poll completes; the flag stays
            // up for as long as the context sleeps.
            w.wake_fd.wait_and_drain(posters);
        }
        w.sleep.end();
    }
}

fn wakeup_model<Q: Queue + Default>(posters: usize, poster: Poster, order: Order) {
    let w = Arc::new(Wakeup {
        sleep: Sleep::default(),
        queue: Q::default(),
        wake_fd: EventFd::default(),
    });
    let handles: Vec<_> = (0..posters)
        .map(|_| {
            let w = w.clone();
            thread::spawn(move || post(&w, poster, order))
        })
        .collect();
    run_context(&w, posters, order);
    for h in handles {
        h.join().expect("poster panicked");
    }
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn remote_defer_wakes_a_sleeping_context_one_poster() {
    let n = explore("wakeup_locked_1", None, || {
        wakeup_model::<LockedQueue>(1, Poster::PushThenCheck, Order::SeqCst);
    });
    assert!(n > 1);
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn remote_defer_wakes_a_sleeping_context_two_posters() {
    let n = explore("wakeup_locked_2", TWO_POSTERS_PREEMPTION_BOUND, || {
        wakeup_model::<LockedQueue>(2, Poster::PushThenCheck, Order::SeqCst);
    });
    assert!(n > 1);
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn remote_defer_wakes_a_sleeping_context_lock_free_queue_two_posters() {
    let n = explore("wakeup_lock_free_2", TWO_POSTERS_PREEMPTION_BOUND, || {
        wakeup_model::<LockFreeQueue>(2, Poster::PushThenCheck, Order::SeqCst);
    });
    assert!(n > 1);
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn wakeup_model_catches_checking_before_pushing() {
    let message = find_failure("wakeup_locked_check_first", || {
        wakeup_model::<LockedQueue>(1, Poster::CheckThenPush, Order::SeqCst);
    });
    assert!(
        message.contains("lost wake-up"),
        "unexpected failure: {message}"
    );
}

#[test]
#[cfg_attr(not(loom), ignore = "loom model: run with -- --ignored")]
fn wakeup_lock_free_queue_fails_with_acq_rel_only() {
    let message = find_failure("wakeup_lock_free_acq_rel", || {
        wakeup_model::<LockFreeQueue>(1, Poster::PushThenCheck, Order::AcqRelOnly);
    });
    assert!(
        message.contains("lost wake-up"),
        "unexpected failure: {message}"
    );
}
