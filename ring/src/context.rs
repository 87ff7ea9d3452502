//! The context: one thread, one io_uring, and the loop that dispatches everything on it.
//!
//! A loop turn runs, in this order: the deferred callbacks queued before the turn began, the
//! callbacks posted by other threads, and the completions the kernel has posted. If none of those
//! did anything, the context polls (pollers and the completion queue) for its poll window, which
//! adapts between zero and `poll_max` like QEMU's adaptive polling,
//! then sleeps in `io_uring_enter` until a completion arrives. The window adapts separately for
//! each kind of event that ends a sleep (external sources such as a guest's kick, completions of
//! submitted ops, wake-ups posted by other threads) and the loop polls for the largest: a device
//! whose completions come long after submission must not close the window that catches the
//! guest's next kick a few microseconds after its completions were published. The completions'
//! window counts only while ops are in flight.
//!
//! While it polls with I/O in flight, it yields the CPU between passes rather than spinning: I/O
//! the kernel cannot do without blocking (buffered files on tmpfs, for one) runs in an io-wq
//! worker thread that may share the CPU, and spinning would keep it from running until the
//! scheduler preempts the poller. External sources are polled with single-shot POLL_ADD ops that
//! are re-armed after each dispatch, which makes them level-triggered.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use io_uring::{IoUring, types};

use crate::op::Op;
use crate::remote::{Remote, RemoteTask, Shared};
use crate::sync::Ordering;
use crate::{Group, eventfd_drain};

thread_local! {
    static CURRENT: RefCell<Option<Context>> = const { RefCell::new(None) };
}

/// Context ids; std's atomic even under loom (loom's cannot live in a static).
static NEXT_CONTEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Completion callback of an op: gets the op back (with its buffers) and the result.
pub type Done = Box<dyn FnOnce(Op, io::Result<u32>)>;

type Handler = Rc<RefCell<dyn FnMut()>>;

/// An op the ring could not queue, handed back whole.
pub struct Rejected {
    /// Why it could not be queued.
    pub error: io::Error,
    /// The op, with its buffers.
    pub op: Op,
    /// Its completion, not yet called.
    pub done: Done,
}

impl Rejected {
    /// Completes the op with its error at the next loop turn.
    pub fn fail_later(self) {
        let Rejected { error, op, done } = self;
        Context::current().defer(move || done(op, Err(error)));
    }
}

/// Identifies an external source registered with [`Context::add_source`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SourceId(usize);

/// Identifies a poller registered with [`Context::add_poller`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId(usize);

enum Owner {
    User(Done),
    Source(usize),
    Wake,
    Cancel,
}

struct Slot {
    generation: u32,
    inflight: Option<(Op, Owner)>,
}

struct Source {
    group: Group,
    fd: RawFd,
    /// The context consumes the eventfd count before each dispatch; other fds (sockets) are
    /// consumed by their handler.
    eventfd: bool,
    handler: Handler,
    /// Its POLL_ADD is in flight (with this user data).
    armed: Option<u64>,
    /// Removed by its owner; the slot is freed once its poll has completed.
    removed: bool,
}

/// Work the loop looks for while it busy-polls (see [`Context::set_poll_max`]).
pub trait Poller: 'static {
    /// Looks for work and does it; returns whether there was any.
    fn poll(&mut self) -> bool;

    /// The loop stops polling and is about to sleep: re-enable the notifications that polling
    /// made unnecessary. Returns whether work turned up meanwhile (then the loop does not sleep).
    fn before_sleep(&mut self) -> bool {
        false
    }
}

impl<F: FnMut() -> bool + 'static> Poller for F {
    fn poll(&mut self) -> bool {
        self()
    }
}

struct PollerSlot {
    group: Group,
    poller: Rc<RefCell<dyn Poller>>,
}

struct Inner {
    id: u64,
    ring: RefCell<IoUring>,
    slots: RefCell<Vec<Slot>>,
    free_slots: RefCell<Vec<u32>>,
    ops_in_flight: Cell<usize>,
    /// Ops submitted through [`Context::submit`] not yet completed (no internal polls).
    user_in_flight: Cell<usize>,
    /// Passes of the busy-poll loop that yielded the CPU (see [`Context::poll_yields`]).
    poll_yields: Cell<u64>,
    unsubmitted: Cell<u32>,
    deferred: RefCell<VecDeque<Box<dyn FnOnce()>>>,
    deferred_spare: RefCell<VecDeque<Box<dyn FnOnce()>>>,
    sources: RefCell<Vec<Option<Source>>>,
    mutes: RefCell<HashMap<Group, u32>>,
    pollers: RefCell<Vec<Option<PollerSlot>>>,
    poll_max: Cell<Duration>,
    /// The busy-poll window of each event class (see [`EventClass`]), each adapted between zero
    /// and `poll_max`; the loop polls for the largest.
    poll_windows: [Cell<Duration>; EVENT_CLASSES],
    /// The event classes whose completions were dispatched since the loop last went idle
    /// (a bit per [`EventClass`]).
    events_seen: Cell<u8>,
    shared: Arc<Shared>,
    rx: Receiver<RemoteTask>,
    wake_armed: Cell<bool>,
    /// Loop turns in progress on this thread: 1 in a turn, more in a turn nested in a wait that
    /// a handler started (see [`Context::run_until`]).
    turn_depth: Cell<u32>,
    /// Sources that fired, or were kicked, during a nested turn: dispatched once the outermost
    /// turn is over.
    held: RefCell<Vec<usize>>,
}

/// How long a loop turn may block when there is nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Return at once.
    No,
    /// Block at most this long.
    For(Duration),
    /// Block until something happens.
    Forever,
}

/// A handle to the current thread's context. Cheap to clone; not `Send` (use [`Remote`]).
#[derive(Clone)]
pub struct Context(Rc<Inner>);

impl Context {
    /// Creates the context of the calling thread, with a submission queue of `entries`.
    ///
    /// Panics if the thread already has one: a thread runs exactly one context.
    pub fn new(entries: u32) -> io::Result<Context> {
        assert!(
            Context::try_current().is_none(),
            "this thread already has a ring context"
        );
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_single_issuer()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let id = NEXT_CONTEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (shared, rx) = Shared::new(id)?;
        let ctx = Context(Rc::new(Inner {
            id,
            ring: RefCell::new(ring),
            slots: RefCell::new(Vec::new()),
            free_slots: RefCell::new(Vec::new()),
            ops_in_flight: Cell::new(0),
            user_in_flight: Cell::new(0),
            poll_yields: Cell::new(0),
            unsubmitted: Cell::new(0),
            deferred: RefCell::new(VecDeque::new()),
            deferred_spare: RefCell::new(VecDeque::new()),
            sources: RefCell::new(Vec::new()),
            mutes: RefCell::new(HashMap::new()),
            pollers: RefCell::new(Vec::new()),
            poll_max: Cell::new(Duration::ZERO),
            poll_windows: Default::default(),
            events_seen: Cell::new(0),
            shared,
            rx,
            wake_armed: Cell::new(false),
            turn_depth: Cell::new(0),
            held: RefCell::new(Vec::new()),
        }));
        CURRENT.with(|c| *c.borrow_mut() = Some(ctx.clone()));
        Ok(ctx)
    }

    /// The calling thread's context. Panics if it has none.
    pub fn current() -> Context {
        Context::try_current().expect("no ring context on this thread")
    }

    /// The calling thread's context, if it has one.
    pub fn try_current() -> Option<Context> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// A number unique to this context.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// A `Send` handle for posting work to this context from other threads.
    pub fn remote(&self) -> Remote {
        Remote {
            shared: self.0.shared.clone(),
        }
    }

    /// Sets how long the loop busy-polls after its last activity before sleeping (0 disables).
    /// While ops are in flight, the polling loop yields the CPU between passes (see
    /// [`Context::poll_yields`]).
    pub fn set_poll_max(&self, poll_max: Duration) {
        self.0.poll_max.set(poll_max);
        for window in &self.0.poll_windows {
            window.set(window.get().min(poll_max));
        }
    }

    /// The current busy-poll window: the largest of the windows adapted per event class (each
    /// between zero and the poll maximum).
    pub fn poll_window(&self) -> Duration {
        self.0
            .poll_windows
            .iter()
            .map(Cell::get)
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Runs `f` at a later loop turn of this context, never inline.
    pub fn defer(&self, f: impl FnOnce() + 'static) {
        self.0.deferred.borrow_mut().push_back(Box::new(f));
    }

    /// Queues `op`; `done` runs on this context with the op and its result when it completes.
    /// SQEs are handed to the kernel in one batch at the end of the loop turn. If the op cannot
    /// be queued, it is handed back with its completion and the error, so nothing is lost.
    pub fn submit(
        &self,
        op: Op,
        done: impl FnOnce(Op, io::Result<u32>) + 'static,
    ) -> Result<(), Rejected> {
        match self.push(op, Owner::User(Box::new(done))) {
            Ok(_) => Ok(()),
            Err((error, op, Owner::User(done))) => Err(Rejected { error, op, done }),
            Err(_) => unreachable!("push hands back the owner it was given"),
        }
    }

    /// Number of ops (user I/O and internal polls) the kernel holds.
    pub fn ops_in_flight(&self) -> usize {
        self.0.ops_in_flight.get()
    }

    /// How many passes of the busy-poll loop yielded the CPU instead of spinning, since the
    /// context was created. The loop yields while ops submitted with [`Context::submit`] are in
    /// flight: the kernel may be running them in a worker thread on this CPU.
    pub fn poll_yields(&self) -> u64 {
        self.0.poll_yields.get()
    }

    // ---- fixed buffers ----------------------------------------------------------------------
    //
    // An op whose buffers report a `fixed_index` uses READ_FIXED/WRITE_FIXED with that slot of
    // the ring's buffer table. The kernel resolves the slot when the op is handed to it and keeps
    // the buffer referenced until the op completes, so changing the table affects only ops handed
    // over later. Each call below first hands this turn's queued SQEs to the kernel: they were
    // built against the table as it was.

    /// Replaces the ring's buffer table with `slots` empty slots (a sparse table; nothing is
    /// pinned until a slot is filled with [`Context::register_buffer`]). At most
    /// [`crate::buf::FIXED_BUFFER_SLOTS_MAX`] slots.
    pub fn register_buffers_sparse(&self, slots: u32) -> io::Result<()> {
        self.flush()?;
        let ring = self.0.ring.borrow();
        // ENXIO: there was no table.
        let _ = ring.submitter().unregister_buffers();
        ring.submitter().register_buffers_sparse(slots)
    }

    /// Fills slot `index` of the buffer table with `iov`, replacing what was there. The kernel
    /// pins the pages behind `iov` now (faulting in any not yet touched) and holds them until the
    /// slot is replaced or the table unregistered and the last op that used them has completed.
    pub fn register_buffer(&self, index: u32, iov: libc::iovec) -> io::Result<()> {
        self.flush()?;
        let ring = self.0.ring.borrow();
        // SAFETY: the kernel pins the pages mapped at `iov` now and only ever touches those pinned
        // pages through this slot, so the registration cannot outlive them even if the caller
        // unmaps `iov` later. Fixed ops are built only from IoBuffers whose contract makes their
        // single segment lie inside the buffer registered in the slot they name, from the same
        // memory, so what the kernel touches through the slot is that op's own buffer.
        unsafe {
            ring.submitter()
                .register_buffers_update(index, &[iov], None)
        }
    }

    /// Drops the ring's buffer table, if any.
    pub fn unregister_buffers(&self) {
        self.flush_or_panic();
        // ENXIO: there was no table.
        let _ = self.0.ring.borrow().submitter().unregister_buffers();
    }

    // ---- external sources -------------------------------------------------------------------

    /// Registers `fd` (an eventfd) as an external source in `group`. When it becomes readable and
    /// the group is not muted, the context consumes the eventfd count and calls `handler`.
    pub fn add_source(&self, group: Group, fd: RawFd, handler: impl FnMut() + 'static) -> SourceId {
        self.add(group, fd, true, Rc::new(RefCell::new(handler)))
    }

    /// Registers any pollable `fd` (a socket) as an external source in `group`. When it becomes
    /// readable and the group is not muted, the context calls `handler`, which must consume what
    /// made it readable (level-triggered: otherwise it is called again at once).
    pub fn add_fd_source(
        &self,
        group: Group,
        fd: RawFd,
        handler: impl FnMut() + 'static,
    ) -> SourceId {
        self.add(group, fd, false, Rc::new(RefCell::new(handler)))
    }

    fn add(&self, group: Group, fd: RawFd, eventfd: bool, handler: Handler) -> SourceId {
        let source = Source {
            group,
            fd,
            eventfd,
            handler,
            armed: None,
            removed: false,
        };
        let mut sources = self.0.sources.borrow_mut();
        let index = match sources.iter().position(Option::is_none) {
            Some(i) => {
                sources[i] = Some(source);
                i
            }
            None => {
                sources.push(Some(source));
                sources.len() - 1
            }
        };
        drop(sources);
        if !self.is_muted(group) {
            self.arm(index);
        }
        SourceId(index)
    }

    /// Unregisters a source. Its handler is never called again; its poll is cancelled.
    pub fn remove_source(&self, id: SourceId) {
        let armed = {
            let mut sources = self.0.sources.borrow_mut();
            let Some(source) = sources[id.0].as_mut() else {
                return;
            };
            source.removed = true;
            match source.armed {
                Some(user_data) => Some(user_data),
                None => {
                    sources[id.0] = None;
                    None
                }
            }
        };
        if let Some(target) = armed {
            let _ = self.push(Op::Cancel { target }, Owner::Cancel);
        }
    }

    /// Raises the mute counter of `group`: its sources are neither consumed nor dispatched until
    /// the counter is back at zero. Takes effect at once on this thread.
    pub fn mute(&self, group: Group) {
        *self.0.mutes.borrow_mut().entry(group).or_insert(0) += 1;
    }

    /// Lowers the mute counter of `group`. At zero, every source of the group is dispatched once
    /// at the next loop turn, whether or not its fd fired (the self-kick).
    pub fn unmute(&self, group: Group) {
        let mut mutes = self.0.mutes.borrow_mut();
        let count = mutes
            .get_mut(&group)
            .expect("unmute of a group that is not muted");
        *count -= 1;
        if *count == 0 {
            mutes.remove(&group);
            drop(mutes);
            let ctx = self.clone();
            self.defer(move || ctx.kick_group(group));
        }
    }

    /// Whether `group` is muted on this context.
    pub fn is_muted(&self, group: Group) -> bool {
        self.0.mutes.borrow().contains_key(&group)
    }

    /// Registers a poller the loop runs while it busy-polls (see [`Context::set_poll_max`]) and
    /// tells before it sleeps. Skipped while its group is muted.
    pub fn add_poller(&self, group: Group, poller: impl Poller) -> PollerId {
        let mut pollers = self.0.pollers.borrow_mut();
        pollers.push(Some(PollerSlot {
            group,
            poller: Rc::new(RefCell::new(poller)),
        }));
        PollerId(pollers.len() - 1)
    }

    /// Unregisters a poller.
    pub fn remove_poller(&self, id: PollerId) {
        self.0.pollers.borrow_mut()[id.0] = None;
    }

    fn kick_group(&self, group: Group) {
        if self.is_muted(group) {
            return;
        }
        let members: Vec<usize> = self
            .0
            .sources
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.group == group && !s.removed))
            .map(|(i, _)| i)
            .collect();
        if self.nested() {
            self.0.held.borrow_mut().extend(members);
            return;
        }
        for index in members {
            self.dispatch_source(index);
        }
    }

    /// Whether the current turn runs nested inside a wait that a handler started.
    fn nested(&self) -> bool {
        self.0.turn_depth.get() > 1
    }

    /// After the outermost turn: the sources held by nested turns are dispatched at the next
    /// turn, each once (a muted one waits for its unmute's self-kick instead).
    fn release_held(&self) {
        let mut held = std::mem::take(&mut *self.0.held.borrow_mut());
        if held.is_empty() {
            return;
        }
        held.sort_unstable();
        held.dedup();
        let ctx = self.clone();
        self.defer(move || {
            for index in held {
                let group = ctx.0.sources.borrow()[index].as_ref().map(|s| s.group);
                if group.is_some_and(|g| !ctx.is_muted(g)) {
                    ctx.dispatch_source(index);
                }
            }
        });
    }

    /// Consumes the source's eventfd, calls its handler and re-arms its poll.
    fn dispatch_source(&self, index: usize) {
        let (fd, eventfd, handler) = {
            let sources = self.0.sources.borrow();
            let Some(s) = sources[index].as_ref().filter(|s| !s.removed) else {
                return;
            };
            (s.fd, s.eventfd, s.handler.clone())
        };
        if eventfd {
            eventfd_drain(fd);
        }
        (handler.borrow_mut())();
        self.arm(index);
    }

    fn arm(&self, index: usize) {
        let fd = {
            let sources = self.0.sources.borrow();
            match sources[index].as_ref() {
                Some(s) if !s.removed && s.armed.is_none() => s.fd,
                _ => return,
            }
        };
        let user_data = self
            .push(Op::PollIn { fd }, Owner::Source(index))
            .unwrap_or_else(|(e, _, _)| {
                panic!("cannot arm an external source poll: {e}");
            });
        if let Some(s) = self.0.sources.borrow_mut()[index].as_mut() {
            s.armed = Some(user_data);
        }
    }

    fn source_polled(&self, index: usize, result: i32) {
        let group = {
            let mut sources = self.0.sources.borrow_mut();
            let Some(s) = sources[index].as_mut() else {
                return;
            };
            s.armed = None;
            if s.removed {
                sources[index] = None;
                return;
            }
            s.group
        };
        // While muted the event stays in the eventfd and the poll stays unarmed: the source is
        // neither consumed nor dispatched until the unmute's self-kick.
        if self.is_muted(group) {
            return;
        }
        if result < 0 {
            // The poll itself failed (not a cancel: removed sources returned above); re-arm
            // rather than dispatch a kick that did not happen.
            self.arm(index);
            return;
        }
        // Nested in a wait: the event stays in its fd, unconsumed, until the wait is over.
        if self.nested() {
            self.0.held.borrow_mut().push(index);
            return;
        }
        self.dispatch_source(index);
    }

    // ---- ops --------------------------------------------------------------------------------

    fn push(&self, op: Op, owner: Owner) -> Result<u64, (io::Error, Op, Owner)> {
        let index = match self.0.free_slots.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.0.slots.borrow_mut();
                slots.push(Slot {
                    generation: 0,
                    inflight: None,
                });
                u32::try_from(slots.len() - 1).expect("fewer than 2^32 ops in flight")
            }
        };
        let user_data = {
            let mut slots = self.0.slots.borrow_mut();
            let slot = &mut slots[index as usize];
            slot.generation = slot.generation.wrapping_add(1);
            (u64::from(slot.generation) << 32) | u64::from(index)
        };
        let entry = op.sqe(user_data);
        let mut pushed = self.push_sqe(&entry);
        if !pushed {
            // The submission queue is full: hand the batch to the kernel and try once more.
            if let Err(e) = self.flush() {
                self.0.free_slots.borrow_mut().push(index);
                return Err((e, op, owner));
            }
            pushed = self.push_sqe(&entry);
        }
        if !pushed {
            self.0.free_slots.borrow_mut().push(index);
            return Err((io::Error::from_raw_os_error(libc::EBUSY), op, owner));
        }
        if matches!(owner, Owner::User(_)) {
            self.0.user_in_flight.set(self.0.user_in_flight.get() + 1);
        }
        self.0.slots.borrow_mut()[index as usize].inflight = Some((op, owner));
        self.0.ops_in_flight.set(self.0.ops_in_flight.get() + 1);
        self.0.unsubmitted.set(self.0.unsubmitted.get() + 1);
        Ok(user_data)
    }

    fn push_sqe(&self, entry: &io_uring::squeue::Entry) -> bool {
        let mut ring = self.0.ring.borrow_mut();
        // SAFETY: the entry points only into the op's buffers (and iovec array), which are heap
        // memory owned by the op; the op is stored in its slot right after this push and stays
        // there until the completion carrying this user data is reaped (see `complete`), and
        // teardown waits for every completion before freeing any slot (see `shutdown`).
        unsafe { ring.submission().push(entry).is_ok() }
    }

    /// Hands queued SQEs to the kernel without waiting.
    fn flush(&self) -> io::Result<()> {
        if self.0.unsubmitted.get() == 0 {
            return Ok(());
        }
        self.0.unsubmitted.set(0);
        loop {
            match self.0.ring.borrow().submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: reap to make room, then retry.
                    self.reap();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Dispatches every completion the kernel has posted. Returns whether there was any.
    fn reap(&self) -> bool {
        let mut any = false;
        loop {
            let mut batch = [(0u64, 0i32); 32];
            let mut n = 0;
            {
                let mut ring = self.0.ring.borrow_mut();
                for cqe in ring.completion().take(batch.len()) {
                    batch[n] = (cqe.user_data(), cqe.result());
                    n += 1;
                }
            }
            if n == 0 {
                return any;
            }
            any = true;
            for &(user_data, result) in &batch[..n] {
                self.complete(user_data, result);
            }
        }
    }

    fn complete(&self, user_data: u64, result: i32) {
        let index32 = u32::try_from(user_data & 0xffff_ffff).expect("masked to 32 bits");
        let index = index32 as usize;
        let (op, owner) = {
            let mut slots = self.0.slots.borrow_mut();
            let slot = &mut slots[index];
            assert_eq!(
                u64::from(slot.generation),
                user_data >> 32,
                "completion for a stale op slot"
            );
            slot.inflight
                .take()
                .expect("completion for an op that is not in flight")
        };
        self.0.free_slots.borrow_mut().push(index32);
        self.0.ops_in_flight.set(self.0.ops_in_flight.get() - 1);
        let class = match owner {
            Owner::User(_) => EventClass::Completion,
            Owner::Source(_) => EventClass::Source,
            Owner::Wake | Owner::Cancel => EventClass::Wake,
        };
        self.0
            .events_seen
            .set(self.0.events_seen.get() | 1 << class as u8);
        match owner {
            Owner::User(done) => {
                self.0.user_in_flight.set(self.0.user_in_flight.get() - 1);
                let result = if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else {
                    Ok(result as u32)
                };
                done(op, result);
            }
            Owner::Source(source) => self.source_polled(source, result),
            Owner::Wake => {
                self.0.wake_armed.set(false);
                eventfd_drain(self.0.shared.wake_fd());
            }
            Owner::Cancel => {}
        }
    }

    // ---- the loop ---------------------------------------------------------------------------

    /// Runs one loop turn, blocking at most as `wait` says when there is nothing to do.
    /// Returns whether anything was dispatched.
    pub fn turn(&self, wait: Wait) -> bool {
        let depth = self.0.turn_depth.get();
        self.0.turn_depth.set(depth + 1);
        let progress = self.turn_once(wait);
        self.0.turn_depth.set(depth);
        if depth == 0 {
            self.release_held();
        }
        progress
    }

    fn turn_once(&self, wait: Wait) -> bool {
        if self.dispatch_ready() {
            self.flush_or_panic();
            return true;
        }
        // Idle from here: the time until the next event (polled or slept for) adapts the windows.
        let idle_from = Instant::now();
        if self.busy_poll() {
            self.flush_or_panic();
            return true;
        }
        if wait == Wait::No {
            self.flush_or_panic();
            return false;
        }
        let polling = self.polling();
        if polling && self.each_poller(|p| p.before_sleep()) {
            self.flush_or_panic();
            return true;
        }
        self.0.events_seen.set(0);
        self.sleep(wait);
        let progress = self.reap();
        if progress && polling {
            self.adapt_poll_windows(idle_from.elapsed(), self.0.events_seen.get());
        }
        self.flush_or_panic();
        progress
    }

    /// Runs loop turns until `pred` holds. Used by drains: the condition may depend on other
    /// threads, so each turn sleeps at most a short while before checking again.
    ///
    /// **The rule of nested waits** (design invariant 8). Called from inside a loop turn (by a
    /// handler: a QMP command beginning a drained section, a vhost-user message stopping a
    /// queue), the turns it runs are *nested*: they dispatch op completions, deferred callbacks
    /// and callbacks posted from other threads, but no external source and no poller. A source
    /// that fires meanwhile keeps its event and is dispatched once the outermost turn is over.
    /// Completions and callbacks never wait (they finish requests, pivot, unmute, release
    /// parked requests: what a wait waits for), while a source's handler may start a wait of its
    /// own (a vhost-user message stopping a queue waits for its requests): nested inside another
    /// wait, that one could wait for requests parked behind the outer one, forever. So a
    /// deferred callback must never wait for parked requests; drained sections wait only for
    /// requests in flight, which need nothing but completions and callbacks to finish.
    pub fn run_until(&self, mut pred: impl FnMut() -> bool) {
        while !pred() {
            self.turn(Wait::For(Duration::from_micros(50)));
        }
    }

    /// Runs loop turns until [`Remote::stop`] is called.
    pub fn run(&self) {
        while !self.0.shared.stop.load(Ordering::SeqCst) {
            self.turn(Wait::Forever);
        }
    }

    fn dispatch_ready(&self) -> bool {
        let mut progress = false;
        // Deferred callbacks queued before this turn; ones they queue run next turn.
        let mut batch = self.0.deferred_spare.take();
        std::mem::swap(&mut batch, &mut *self.0.deferred.borrow_mut());
        if !batch.is_empty() {
            progress = true;
            while let Some(f) = batch.pop_front() {
                f();
            }
        }
        *self.0.deferred_spare.borrow_mut() = batch;
        while let Ok(task) = self.0.rx.try_recv() {
            progress = true;
            task();
        }
        progress | self.reap()
    }

    /// The window to poll for now: the largest of the classes that can fire. Completions can
    /// only come while ops are in flight; without any, polling for them would spin after every
    /// request of a guest whose requests come far apart.
    fn poll_window_due(&self) -> Duration {
        let ops_in_flight = self.0.user_in_flight.get() > 0;
        self.0
            .poll_windows
            .iter()
            .enumerate()
            .filter(|&(class, _)| ops_in_flight || class != EventClass::Completion as usize)
            .map(|(_, window)| window.get())
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// Whether the loop busy-polls at all.
    fn polling(&self) -> bool {
        !self.0.poll_max.get().is_zero()
    }

    /// Polls for work for the current window (at least one pass when polling is on).
    fn busy_poll(&self) -> bool {
        if !self.polling() {
            return false;
        }
        let window = self.poll_window_due();
        let start = Instant::now();
        loop {
            if self.run_pollers() || self.completions_ready() || !self.0.rx.is_empty() {
                return self.dispatch_ready() | true;
            }
            if start.elapsed() >= window {
                return false;
            }
            if self.0.user_in_flight.get() > 0 {
                // An op the kernel punted to an io-wq worker completes only when that worker
                // runs, possibly on this CPU: let it (and anything else runnable) run now. With
                // nothing else runnable, the yield returns at once and polling goes on.
                self.0.poll_yields.set(self.0.poll_yields.get() + 1);
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    /// Adapts the poll windows after the loop was idle for `idle` (polling, then sleeping) until
    /// events of the classes in `seen` (a bit per [`EventClass`]) ended the sleep, as QEMU's
    /// adaptive polling does, but per class: for each class seen, an event that came within
    /// `poll_max` would have been caught by polling, so its window grows (doubling from 4 us up
    /// to `poll_max`); one that came later means polling for it only burns CPU at its rate, so
    /// its window drops to zero. The windows of classes not seen keep their size: a class that
    /// did not fire says nothing about how soon it will once it is due (a guest's kick comes
    /// soon after its completions are published, not while the device works on its requests).
    fn adapt_poll_windows(&self, idle: Duration, seen: u8) {
        let poll_max = self.0.poll_max.get();
        for (class, window) in self.0.poll_windows.iter().enumerate() {
            if seen & (1 << class) == 0 {
                continue;
            }
            window.set(if idle < poll_max {
                (window.get() * 2).max(POLL_WINDOW_MIN).min(poll_max)
            } else {
                Duration::ZERO
            });
        }
    }

    fn completions_ready(&self) -> bool {
        let mut ring = self.0.ring.borrow_mut();
        if ring.submission().taskrun() {
            // Completions are waiting for task work that only runs when we enter the kernel.
            let _ = ring.submit();
        }
        !ring.completion().is_empty()
    }

    /// Calls `f` on every poller whose group is not muted (none in a nested turn); returns
    /// whether any returned true.
    /// Pollers may add or remove pollers meanwhile: the slots are read one at a time.
    fn each_poller(&self, f: impl Fn(&mut dyn Poller) -> bool) -> bool {
        let mut progress = false;
        let mut index = 0;
        loop {
            let poller = {
                let pollers = self.0.pollers.borrow();
                let Some(slot) = pollers.get(index) else {
                    break;
                };
                slot.as_ref()
                    .filter(|p| !self.nested() && !self.is_muted(p.group))
                    .map(|p| p.poller.clone())
            };
            if let Some(poller) = poller {
                progress |= f(&mut *poller.borrow_mut());
            }
            index += 1;
        }
        progress
    }

    fn run_pollers(&self) -> bool {
        self.each_poller(|p| p.poll())
    }

    fn sleep(&self, wait: Wait) {
        if !self.0.wake_armed.get() {
            let fd = self.0.shared.wake_fd();
            if self.push(Op::PollIn { fd }, Owner::Wake).is_ok() {
                self.0.wake_armed.set(true);
            }
        }
        let sleep = &self.0.shared.sleep;
        sleep.begin();
        let idle = self.0.rx.is_empty()
            && self.0.deferred.borrow().is_empty()
            && !self.0.shared.stop.load(Ordering::SeqCst);
        if idle {
            self.0.unsubmitted.set(0);
            let ring = self.0.ring.borrow();
            let result = match wait {
                Wait::Forever => ring.submit_and_wait(1),
                Wait::For(d) => {
                    let ts = types::Timespec::from(d);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    ring.submitter().submit_with_args(1, &args)
                }
                Wait::No => unreachable!("turn returns before sleeping when told not to wait"),
            };
            match result {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => panic!("io_uring_enter failed: {e}"),
            }
        }
        sleep.end();
    }

    fn flush_or_panic(&self) {
        if let Err(e) = self.flush() {
            panic!("io_uring submit failed: {e}");
        }
    }

    // ---- teardown ---------------------------------------------------------------------------

    /// Tears the context down: cancels every op the kernel holds, waits until each completion
    /// has been reaped (user completions run with their result, often ECANCELED), drops sources,
    /// pollers and pending callbacks, and detaches the context from its thread. No buffer is
    /// released while the kernel may still touch it.
    pub fn shutdown(self) {
        let sources: Vec<SourceId> = (0..self.0.sources.borrow().len()).map(SourceId).collect();
        for id in sources {
            self.remove_source(id);
        }
        self.cancel_and_wait();
        self.0.sources.borrow_mut().clear();
        self.0.pollers.borrow_mut().clear();
        self.0.deferred.borrow_mut().clear();
        while self.0.rx.try_recv().is_ok() {}
        CURRENT.with(|c| c.borrow_mut().take());
    }

    fn cancel_and_wait(&self) {
        while self.0.ops_in_flight.get() > 0 {
            let targets: Vec<u64> = self
                .0
                .slots
                .borrow()
                .iter()
                .enumerate()
                .filter(
                    |(_, s)| matches!(s.inflight, Some((_, ref o)) if !matches!(o, Owner::Cancel)),
                )
                .map(|(i, s)| (u64::from(s.generation) << 32) | i as u64)
                .collect();
            for target in targets {
                let _ = self.push(Op::Cancel { target }, Owner::Cancel);
            }
            let _ = self.flush();
            // Completions may queue callbacks that release more work; run them too.
            let _ = self.dispatch_ready();
            if self.0.ops_in_flight.get() > 0 {
                let _ = self.0.ring.borrow().submit_and_wait(1);
                self.reap();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // `shutdown` normally emptied the table. If the last handle went away some other way,
        // still never free a buffer the kernel may touch: cancel what is in flight and wait for
        // every completion.
        let mut waiting: Vec<u64> = self
            .slots
            .get_mut()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.inflight.is_some())
            .map(|(i, s)| (u64::from(s.generation) << 32) | i as u64)
            .collect();
        let ring = self.ring.get_mut();
        for &target in &waiting {
            let cancel = Op::Cancel { target }.sqe(CANCEL_USER_DATA);
            // SAFETY: a cancel entry points to no memory.
            while unsafe { ring.submission().push(&cancel) }.is_err() {
                let _ = ring.submit();
            }
        }
        while !waiting.is_empty() {
            if ring.submit_and_wait(1).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            for cqe in ring.completion() {
                waiting.retain(|&u| u != cqe.user_data());
            }
        }
    }
}

/// The kinds of event whose poll windows adapt separately (see [`Context::poll_window`]).
#[derive(Clone, Copy)]
enum EventClass {
    /// An external source fired (a guest's kick, a socket).
    Source = 0,
    /// An op submitted with [`Context::submit`] completed.
    Completion = 1,
    /// Another thread posted work (or an internal op completed).
    Wake = 2,
}

/// How many [`EventClass`]es there are.
const EVENT_CLASSES: usize = 3;

/// The smallest nonzero busy-poll window.
const POLL_WINDOW_MIN: Duration = Duration::from_micros(4);

/// User data of cancel entries pushed during drop: matches no slot.
const CANCEL_USER_DATA: u64 = u64::MAX;
