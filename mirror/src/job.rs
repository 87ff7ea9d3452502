//! The job: its state, the commands the QMP layer calls, and the pump that drives it.
//!
//! The job lives on the main context and never blocks it, except inside `drained_begin`
//! (which runs loop turns until the source is idle). It advances whenever something happens:
//! one of its copy ops completes, its timer fires, the filter wakes it, or a command arrives.
//! Each of those calls [`Job::pump`], which looks at the state and does the next step.
//!
//! `phase` is the job's own progress, finer than the QAPI `status` it reports:
//! - `Copying`: the copy loop runs (RUNNING, PAUSED, READY, STANDBY, and PENDING before
//!   finalize);
//! - `Draining`: inside a `drained_begin` call (nested loop turns: pumps do nothing);
//! - `FinalSync`: the drained section is held; dirty chunks are copied past the gate, then
//!   the target is flushed ([`crate::switch`]);
//! - `PivotDeferred`: the pivot callback is queued on the main context with the guard;
//! - `Aborting`: waiting for copy ops before taking the filter out;
//! - `Done`: concluded.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use ringblk_blkgraph::{Drained, Node, drained_begin};
use ringblk_ring::{Context, Group, Op, SourceId};

use crate::bitmap::DirtyBitmap;
use crate::error::MirrorError;
use crate::filter::{MirrorTop, Shared};
use crate::options::{CopyMode, MirrorOptions, OP_BYTES_MAX, OnError};
use crate::ratelimit::RateLimit;
use crate::status::{
    ErrorAction, IoOperation, IoStatus, JobEvent, JobInfo, JobProgress, JobStatus, Verb,
};

/// How long an ignored error keeps the job from retrying.
pub(crate) const RETRY_DELAY: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Created,
    Copying,
    Draining,
    FinalSync,
    PivotDeferred,
    Aborting,
    Done,
}

/// What the end of a successful job does with the devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Goal {
    /// `complete`: the devices move to the target.
    Pivot,
    /// `cancel` after READY: the devices stay on the source; the target is a consistent copy.
    KeepTarget,
}

/// Fixed at creation.
pub(crate) struct Config {
    pub(crate) buf_size: u64,
    pub(crate) op_bytes_max: u64,
    pub(crate) on_source_error: OnError,
    pub(crate) on_target_error: OnError,
    pub(crate) auto_finalize: bool,
    pub(crate) auto_dismiss: bool,
    pub(crate) unmap: bool,
}

pub(crate) struct State {
    pub(crate) status: JobStatus,
    pub(crate) phase: Phase,
    pub(crate) started: bool,
    pub(crate) user_paused: bool,
    pub(crate) io_status: IoStatus,
    pub(crate) limit: RateLimit,
    pub(crate) timer_armed: bool,
    pub(crate) retry_at: Option<Instant>,
    pub(crate) cursor: u64,
    pub(crate) ops: usize,
    pub(crate) bytes_in_flight: u64,
    pub(crate) offset: u64,
    pub(crate) copy_mode: CopyMode,
    pub(crate) goal: Option<Goal>,
    /// Finalize requested: drain, final sync, pivot as soon as the copy ops are done.
    pub(crate) finalizing: bool,
    /// Report BLOCK_JOB_CANCELLED at the end.
    pub(crate) cancelled: bool,
    pub(crate) error: Option<String>,
    /// The worst error action seen during the final sync.
    pub(crate) final_sync_error: Option<(ErrorAction, String)>,
    pub(crate) flushed: bool,
    pub(crate) drained: Option<Drained>,
    pub(crate) actively_synced: bool,
}

pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) ctx: Context,
    pub(crate) source: Node,
    pub(crate) target: Node,
    pub(crate) filter: Node,
    pub(crate) shared: Arc<Shared>,
    pub(crate) cfg: Config,
    events: Option<Sender<JobEvent>>,
    pub(crate) st: RefCell<State>,
    wake_source: Cell<Option<SourceId>>,
    pub(crate) pool: RefCell<Vec<Vec<u8>>>,
    pub(crate) pivot_hook: RefCell<Option<Box<dyn FnOnce()>>>,
}

/// A mirror job (QEMU's `blockdev-mirror` with `sync=full`), driven on the main context.
///
/// Cheap to clone; every method must be called on the context that created it.
#[derive(Clone)]
pub struct Mirror(pub(crate) Rc<Job>);

impl Mirror {
    /// Creates the job (status CREATED): checks the options, puts the `mirror_top` filter above
    /// `source` (every backend handle on `source` moves to the filter inside a drained section
    /// of `source`) and starts tracking guest writes. Copying begins with [`Mirror::start`].
    ///
    /// Events go to `events` in the order they happen. Call on the main context.
    pub fn create(
        source: &Node,
        target: &Node,
        options: MirrorOptions,
        events: Option<Sender<JobEvent>>,
    ) -> Result<Mirror, MirrorError> {
        let buf_size = options.validate()?;
        let invalid = |m: &str| Err(MirrorError::InvalidParameter(m.to_owned()));
        if source.same(target) {
            return invalid("Can't mirror node into itself");
        }
        if target.read_only() {
            return invalid("Target is read-only");
        }
        if source.size() != target.size() {
            return invalid("Source and target image have different sizes");
        }
        let Some(ctx) = Context::try_current() else {
            return invalid("A mirror job must be created on a ring context");
        };
        let size = source.size();
        let g = options.granularity;
        let dirty = DirtyBitmap::new(size, g);
        dirty.set(0..dirty.chunks()); // sync=full: everything is to be copied
        let target_zero = DirtyBitmap::new(size, g);
        if options.target_is_zero {
            target_zero.set(0..target_zero.chunks());
        }
        let write_blocking = options.copy_mode == CopyMode::WriteBlocking;
        let shared = Shared::new(dirty, target_zero, write_blocking)
            .map_err(|e| MirrorError::InvalidParameter(format!("eventfd: {e}")))?;
        let shared = Arc::new(shared);
        let filter = Node::new(
            format!("{}-mirror-top", options.job_id),
            MirrorTop::new(source.clone(), target.clone(), shared.clone()),
        );
        insert_above(source, &filter);
        let job = Rc::new(Job {
            id: options.job_id.clone(),
            ctx: ctx.clone(),
            source: source.clone(),
            target: target.clone(),
            filter,
            shared,
            cfg: Config {
                buf_size,
                op_bytes_max: OP_BYTES_MAX.min(buf_size).max(g),
                on_source_error: options.on_source_error,
                on_target_error: options.on_target_error,
                auto_finalize: options.auto_finalize,
                auto_dismiss: options.auto_dismiss,
                unmap: options.unmap,
            },
            events,
            st: RefCell::new(State {
                status: JobStatus::Created,
                phase: Phase::Created,
                started: false,
                user_paused: false,
                io_status: IoStatus::Ok,
                limit: RateLimit::new(options.speed),
                timer_armed: false,
                retry_at: None,
                cursor: 0,
                ops: 0,
                bytes_in_flight: 0,
                offset: 0,
                copy_mode: options.copy_mode,
                goal: None,
                finalizing: false,
                cancelled: false,
                error: None,
                final_sync_error: None,
                flushed: false,
                drained: None,
                actively_synced: false,
            }),
            wake_source: Cell::new(None),
            pool: RefCell::new(Vec::new()),
            pivot_hook: RefCell::new(None),
        });
        // The filter's wake-ups: an eventfd in a group of the job's own, never muted. The
        // handler defers the pump rather than running it: the pump may begin a drained section,
        // whose nested loop turns must not find this handler still running.
        // The handler holds `shared`, so the eventfd stays open for as long as the ring polls it
        // (also for a job dropped before it concluded, until its context is torn down).
        let weak = Rc::downgrade(&job);
        let keep_open = job.shared.clone();
        let source_id = ctx.add_source(Group::new(), job.shared.wake_fd(), move || {
            let _ = &keep_open;
            if let Some(job) = weak.upgrade() {
                let ctx = job.ctx.clone();
                ctx.defer(move || job.pump());
            }
        });
        job.wake_source.set(Some(source_id));
        job.emit(JobEvent::StatusChange {
            id: job.id.clone(),
            status: JobStatus::Created,
        });
        Ok(Mirror(job))
    }

    /// CREATED -> RUNNING: the copy begins.
    pub fn start(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        let status = job.status();
        if status != JobStatus::Created {
            return Err(job.verb_error(status, "start"));
        }
        {
            let mut st = job.st.borrow_mut();
            st.started = true;
            st.phase = Phase::Copying;
        }
        job.set_status(JobStatus::Running);
        job.pump();
        Ok(())
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The QAPI status.
    pub fn status(&self) -> JobStatus {
        self.0.status()
    }

    /// The `mirror_top` filter node (for `query-named-block-nodes`).
    pub fn filter(&self) -> &Node {
        &self.0.filter
    }

    /// `query-block-jobs` for this job.
    pub fn query(&self) -> JobInfo {
        let job = &self.0;
        let st = job.st.borrow();
        JobInfo {
            job_type: "mirror",
            device: job.id.clone(),
            len: job.len_locked(&st),
            offset: st.offset,
            busy: st.ops > 0 || !matches!(st.phase, Phase::Copying | Phase::Created | Phase::Done),
            paused: st.user_paused,
            speed: st.limit.speed(),
            io_status: st.io_status,
            ready: matches!(st.status, JobStatus::Ready | JobStatus::Standby),
            status: st.status,
            auto_finalize: job.cfg.auto_finalize,
            auto_dismiss: job.cfg.auto_dismiss,
            error: st.error.clone(),
            actively_synced: st.actively_synced
                && !job
                    .shared
                    .active_target_failed
                    .load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// `job-complete` (READY only): PENDING at once; with auto-finalize the drained final sync
    /// and the pivot follow, ending in BLOCK_JOB_COMPLETED.
    pub fn complete(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Complete)?;
        if job.st.borrow().user_paused {
            return Err(MirrorError::CannotComplete(job.id.clone()));
        }
        job.to_pending(Goal::Pivot);
        job.pump();
        Ok(())
    }

    /// `job-finalize` (PENDING only): the drained final sync, then the pivot (or, after a
    /// cancel, the return of the devices to the source).
    pub fn finalize(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Finalize)?;
        job.st.borrow_mut().finalizing = true;
        job.pump();
        Ok(())
    }

    /// `job-cancel`. Before READY (or with `force`): the copy stops, the devices stay on the
    /// source, the target is abandoned as it is; BLOCK_JOB_CANCELLED. After READY without
    /// `force` (QEMU's semantics for a mirror): the job completes *without* the pivot: a
    /// drained final sync leaves the target a consistent copy of the source as of that
    /// moment, the devices stay on the source, and the event is BLOCK_JOB_COMPLETED. In
    /// PENDING: like after READY but reported as BLOCK_JOB_CANCELLED.
    pub fn cancel(&self, force: bool) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Cancel)?;
        let (status, phase) = {
            let st = job.st.borrow();
            (st.status, st.phase)
        };
        match status {
            JobStatus::Created | JobStatus::Running | JobStatus::Paused => {
                job.st.borrow_mut().cancelled = true;
                job.begin_abort(None);
            }
            JobStatus::Ready | JobStatus::Standby if force => {
                job.st.borrow_mut().cancelled = true;
                job.begin_abort(None);
            }
            JobStatus::Ready | JobStatus::Standby => {
                job.st.borrow_mut().user_paused = false;
                if status == JobStatus::Standby {
                    job.set_status(JobStatus::Ready);
                }
                job.to_pending(Goal::KeepTarget);
                job.pump();
            }
            JobStatus::Waiting | JobStatus::Pending => {
                let mut st = job.st.borrow_mut();
                st.cancelled = true;
                st.goal = Some(Goal::KeepTarget);
                if phase != Phase::Copying {
                    // The final sync is under way: its pivot callback sees `cancelled`.
                    return Ok(());
                }
                if force {
                    drop(st);
                    job.begin_abort(None);
                } else {
                    st.finalizing = true;
                    drop(st);
                    job.set_status(JobStatus::Aborting);
                    job.pump();
                }
            }
            _ => unreachable!("the verb table refuses cancel in {status}"),
        }
        Ok(())
    }

    /// `job-pause`: no new copy I/O; PAUSED (or STANDBY after READY) once the copy I/O in flight
    /// has completed. Guest writes keep being tracked (and, in write-blocking mode, mirrored).
    pub fn pause(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Pause)?;
        if job.st.borrow().user_paused {
            return Err(MirrorError::AlreadyPaused);
        }
        job.st.borrow_mut().user_paused = true;
        job.pump();
        Ok(())
    }

    /// `job-resume`: also the retry after an error with the `stop` policy.
    pub fn resume(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        if !job.st.borrow().user_paused {
            return Err(MirrorError::NotPaused);
        }
        job.check_verb(Verb::Resume)?;
        let status = {
            let mut st = job.st.borrow_mut();
            st.user_paused = false;
            st.io_status = IoStatus::Ok;
            st.retry_at = None;
            st.status
        };
        match status {
            JobStatus::Paused => job.set_status(JobStatus::Running),
            JobStatus::Standby => job.set_status(JobStatus::Ready),
            _ => {}
        }
        job.pump();
        Ok(())
    }

    /// `job-dismiss` (CONCLUDED only, with auto-dismiss off).
    pub fn dismiss(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Dismiss)?;
        job.set_status(JobStatus::Null);
        Ok(())
    }

    /// `block-job-set-speed`, in bytes per second (0: unlimited); takes effect at once.
    pub fn set_speed(&self, speed: u64) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::SetSpeed)?;
        job.st.borrow_mut().limit.set_speed(speed);
        job.pump();
        Ok(())
    }

    /// `block-job-change` of the copy mode: only background -> write-blocking.
    pub fn change_copy_mode(&self, mode: CopyMode) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Change)?;
        let current = job.st.borrow().copy_mode;
        match (current, mode) {
            (a, b) if a == b => return Ok(()),
            (CopyMode::Background, CopyMode::WriteBlocking) => {
                job.shared.set_write_blocking();
                job.st.borrow_mut().copy_mode = mode;
            }
            (from, to) => {
                return Err(MirrorError::CopyModeChange {
                    from: from.as_str(),
                    to: to.as_str(),
                });
            }
        }
        job.pump();
        Ok(())
    }

    /// TEST ONLY: `hook` runs once, right before the job defers the pivot callback (the drained
    /// section is held, the final sync and flush are done). The race tests write a device's kick
    /// eventfd there to put a guest write into the window the mute closes.
    pub fn set_before_pivot_hook_for_test(&self, hook: impl FnOnce() + 'static) {
        *self.0.pivot_hook.borrow_mut() = Some(Box::new(hook));
    }
}

/// Moves every backend handle on `source` to `filter`, inside a drained section of `source`.
fn insert_above(source: &Node, filter: &Node) {
    let drained = drained_begin(source);
    for handle in source.handles() {
        handle.replace(filter);
    }
    drop(drained);
}

impl Job {
    pub(crate) fn status(&self) -> JobStatus {
        self.st.borrow().status
    }

    fn verb_error(&self, status: JobStatus, verb: &'static str) -> MirrorError {
        MirrorError::VerbNotAllowed {
            id: self.id.clone(),
            status: status.as_str(),
            verb,
        }
    }

    fn check_verb(&self, verb: Verb) -> Result<(), MirrorError> {
        let status = self.status();
        if verb.allowed_in(status) {
            Ok(())
        } else {
            Err(self.verb_error(status, verb.as_str()))
        }
    }

    pub(crate) fn emit(&self, event: JobEvent) {
        if let Some(tx) = &self.events {
            let _ = tx.send(event);
        }
    }

    /// Moves to `to` (asserting QEMU's transition table) and reports it.
    pub(crate) fn set_status(&self, to: JobStatus) {
        let from = std::mem::replace(&mut self.st.borrow_mut().status, to);
        assert!(
            from.may_become(to),
            "job '{}': transition {from} -> {to}",
            self.id
        );
        if from != to {
            self.emit(JobEvent::StatusChange {
                id: self.id.clone(),
                status: to,
            });
        }
    }

    fn len_locked(&self, st: &State) -> u64 {
        st.offset
            + st.bytes_in_flight
            + self.shared.dirty.dirty_bytes()
            + self
                .shared
                .active_bytes
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn progress(&self) -> JobProgress {
        let st = self.st.borrow();
        JobProgress {
            job_type: "mirror",
            device: self.id.clone(),
            len: self.len_locked(&st),
            offset: st.offset,
            speed: st.limit.speed(),
        }
    }

    /// READY -> WAITING -> PENDING with what the end should do; finalize at once if automatic.
    fn to_pending(&self, goal: Goal) {
        {
            let mut st = self.st.borrow_mut();
            st.goal = Some(goal);
            st.finalizing = self.cfg.auto_finalize;
        }
        self.set_status(JobStatus::Waiting);
        self.set_status(JobStatus::Pending);
    }

    /// Does the next step, whatever woke the job.
    pub(crate) fn pump(self: &Rc<Self>) {
        let phase = self.st.borrow().phase;
        match phase {
            Phase::Copying => self.pump_copying(),
            Phase::FinalSync => self.continue_final_sync(),
            Phase::Aborting => self.continue_abort(),
            Phase::Created | Phase::Draining | Phase::PivotDeferred | Phase::Done => {}
        }
    }

    fn pump_copying(self: &Rc<Self>) {
        let (paused, finalizing, ops, retry_at) = {
            let st = self.st.borrow();
            (st.user_paused, st.finalizing, st.ops, st.retry_at)
        };
        if paused {
            if ops == 0 {
                self.enter_pause_status();
            }
            return;
        }
        if finalizing {
            // No new copies: wait for the ones in flight, then drain (the guest runs meanwhile).
            if ops > 0 {
                return;
            }
            if let Some(at) = retry_at.filter(|&at| at > Instant::now()) {
                self.arm_timer(at - Instant::now());
                return;
            }
            return self.defer_drain(Job::begin_final_sync);
        }
        self.issue_copies(crate::copy::Gate::Open);
        self.check_ready();
        self.maybe_idle();
    }

    fn enter_pause_status(&self) {
        match self.status() {
            JobStatus::Running => self.set_status(JobStatus::Paused),
            JobStatus::Ready => self.set_status(JobStatus::Standby),
            _ => {}
        }
    }

    /// RUNNING -> READY once nothing is dirty and nothing is in flight; keeps
    /// `actively-synced` up to date in write-blocking mode.
    fn check_ready(&self) {
        let shared = &self.shared;
        let (status, ops, mode) = {
            let st = self.st.borrow();
            (st.status, st.ops, st.copy_mode)
        };
        if shared
            .active_target_failed
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.st.borrow_mut().actively_synced = false;
        }
        let clean = ops == 0 && shared.dirty.count() == 0 && shared.dirty.is_clean();
        if !clean {
            return;
        }
        if status == JobStatus::Running {
            self.set_status(JobStatus::Ready);
            self.emit(JobEvent::Ready(self.progress()));
        }
        if mode == CopyMode::WriteBlocking && shared.background_writes() == 0 {
            self.st.borrow_mut().actively_synced = true;
        }
    }

    /// With nothing in flight and no timer, waits for the filter's wake-up; re-scans after
    /// raising the idle flag so a chunk dirtied meanwhile is not missed.
    fn maybe_idle(self: &Rc<Self>) {
        {
            let st = self.st.borrow();
            if st.ops > 0 || st.timer_armed {
                return;
            }
        }
        let shared = &self.shared;
        shared
            .job_idle
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if self.has_claimable_dirt() {
            shared
                .job_idle
                .store(false, std::sync::atomic::Ordering::SeqCst);
            let job = self.clone();
            self.ctx.defer(move || job.pump());
        }
    }

    /// Runs `pump` after `wait`, unless a timer is already armed.
    pub(crate) fn arm_timer(self: &Rc<Self>, wait: Duration) {
        {
            let mut st = self.st.borrow_mut();
            if st.timer_armed {
                return;
            }
            st.timer_armed = true;
        }
        let weak = Rc::downgrade(self);
        let submitted = self.ctx.submit(Op::timeout(wait), move |_, _| {
            if let Some(job) = weak.upgrade() {
                job.st.borrow_mut().timer_armed = false;
                job.pump();
            }
        });
        if let Err(rejected) = submitted {
            rejected.fail_later();
        }
    }

    /// Applies the error policy of `operation` to a failed copy (or flush).
    pub(crate) fn copy_failed(
        self: &Rc<Self>,
        operation: IoOperation,
        error: &str,
        errno: Option<i32>,
    ) {
        let policy = match operation {
            IoOperation::Read => self.cfg.on_source_error,
            IoOperation::Write => self.cfg.on_target_error,
        };
        let action = policy.action(errno);
        self.emit(JobEvent::Error {
            device: self.id.clone(),
            operation,
            action,
        });
        let phase = self.st.borrow().phase;
        match phase {
            Phase::FinalSync => {
                let mut st = self.st.borrow_mut();
                let worse = match &st.final_sync_error {
                    None => true,
                    Some((a, _)) => *a != ErrorAction::Report && action == ErrorAction::Report,
                };
                if worse {
                    st.final_sync_error = Some((action, error.to_owned()));
                }
            }
            Phase::Copying => match action {
                ErrorAction::Report => self.begin_abort(Some(error.to_owned())),
                ErrorAction::Ignore => {
                    self.st.borrow_mut().retry_at = Some(Instant::now() + RETRY_DELAY);
                }
                ErrorAction::Stop => {
                    let mut st = self.st.borrow_mut();
                    st.user_paused = true;
                    st.io_status = if errno == Some(libc::ENOSPC) {
                        IoStatus::Nospace
                    } else {
                        IoStatus::Failed
                    };
                }
            },
            Phase::Aborting
            | Phase::Done
            | Phase::Created
            | Phase::Draining
            | Phase::PivotDeferred => {}
        }
    }

    /// Stops copying and takes the filter out, leaving the devices on the source. Reports
    /// BLOCK_JOB_CANCELLED if `cancelled`, else BLOCK_JOB_COMPLETED with `error`.
    pub(crate) fn begin_abort(self: &Rc<Self>, error: Option<String>) {
        let status = {
            let mut st = self.st.borrow_mut();
            if st.error.is_none() {
                st.error = error;
            }
            st.user_paused = false;
            st.finalizing = false;
            st.phase = Phase::Aborting;
            st.status
        };
        // A paused job resumes on its way out (QEMU's transition table).
        match status {
            JobStatus::Paused => self.set_status(JobStatus::Running),
            JobStatus::Standby => self.set_status(JobStatus::Ready),
            _ => {}
        }
        self.set_status(JobStatus::Aborting);
        self.continue_abort();
    }

    fn continue_abort(self: &Rc<Self>) {
        if self.st.borrow().ops > 0 {
            return;
        }
        let held = self.st.borrow_mut().drained.take();
        match held {
            Some(drained) => self.remove_filter(drained),
            None => self.defer_drain(|job| {
                let drained = drained_begin(&job.filter);
                job.remove_filter(drained);
            }),
        }
    }

    /// Inside a drained section of the filter: the devices go back to the source.
    fn remove_filter(self: &Rc<Self>, drained: Drained) {
        for handle in self.filter.handles() {
            handle.replace(&self.source);
        }
        drop(drained);
        self.finish();
    }

    /// Runs `step`, which begins a drained section, from a deferred callback. Never from where
    /// the pump usually runs: inside the completion of one of the job's own requests, which
    /// its node counts in flight until the callback returns, so the drain would wait for
    /// itself. Pumps meanwhile do nothing (phase `Draining`).
    pub(crate) fn defer_drain(self: &Rc<Self>, step: fn(&Rc<Job>)) {
        self.st.borrow_mut().phase = Phase::Draining;
        let job = self.clone();
        self.ctx.defer(move || step(&job));
    }

    /// The end: events, CONCLUDED, and NULL unless dismissal is manual.
    pub(crate) fn finish(self: &Rc<Self>) {
        let (cancelled, error, started) = {
            let mut st = self.st.borrow_mut();
            st.phase = Phase::Done;
            (st.cancelled, st.error.clone(), st.started)
        };
        if let Some(id) = self.wake_source.take() {
            self.ctx.remove_source(id);
        }
        self.shared
            .job_idle
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.pool.borrow_mut().clear();
        if cancelled && self.status() != JobStatus::Aborting {
            self.set_status(JobStatus::Aborting);
        }
        // Like QEMU, a job cancelled before it started concludes silently.
        if started {
            let progress = self.progress();
            self.emit(if cancelled {
                JobEvent::Cancelled(progress)
            } else {
                JobEvent::Completed { progress, error }
            });
        }
        self.set_status(JobStatus::Concluded);
        if self.cfg.auto_dismiss || !started {
            self.set_status(JobStatus::Null);
        }
    }

    /// Whether some dirty chunk could be claimed now.
    fn has_claimable_dirt(&self) -> bool {
        let dirty = &self.shared.dirty;
        let mut chunk = 0;
        while let Some(found) = dirty.next_set(chunk, dirty.chunks()) {
            if self.shared.locks.is_free(found) {
                return true;
            }
            chunk = found + 1;
        }
        false
    }
}
