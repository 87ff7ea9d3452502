//! The job: its state, and the pump that drives it (the commands are in [`crate::command`]).
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
use std::time::{Duration, Instant};

use ringblk_blkgraph::{Drained, Node, drained_begin};
use ringblk_ring::buf::OwnedBuf;
use ringblk_ring::{Context, Op, SourceId};

use crate::error::MirrorError;
use crate::filter::Shared;
use crate::options::{CopyMode, OnError};
use crate::ratelimit::RateLimit;
use crate::status::{
    ErrorAction, EventSink, IoOperation, IoStatus, JobEvent, JobProgress, JobStatus, Verb,
};

/// Copy buffers an idle job keeps.
const IDLE_POOL_BYTES: u64 = 2 << 20;

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
    /// `complete` arrived while paused: it takes effect at `resume`.
    pub(crate) complete_requested: bool,
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
    pub(crate) events: Option<EventSink>,
    pub(crate) st: RefCell<State>,
    pub(crate) wake_source: Cell<Option<SourceId>>,
    pub(crate) pool: RefCell<Vec<OwnedBuf>>,
    pub(crate) pivot_hook: RefCell<Option<Box<dyn FnOnce()>>>,
}

impl Job {
    pub(crate) fn status(&self) -> JobStatus {
        self.st.borrow().status
    }

    pub(crate) fn verb_error(&self, status: JobStatus, verb: &'static str) -> MirrorError {
        MirrorError::VerbNotAllowed {
            id: self.id.clone(),
            status: status.as_str(),
            verb,
        }
    }

    pub(crate) fn check_verb(&self, verb: Verb) -> Result<(), MirrorError> {
        let status = self.status();
        if verb.allowed_in(status) {
            Ok(())
        } else {
            Err(self.verb_error(status, verb.as_str()))
        }
    }

    pub(crate) fn emit(&self, event: JobEvent) {
        if let Some(sink) = &self.events {
            sink(event);
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

    pub(crate) fn len_locked(&self, st: &State) -> u64 {
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
    pub(crate) fn to_pending(&self, goal: Goal) {
        {
            let mut st = self.st.borrow_mut();
            st.goal = Some(goal);
            st.finalizing = self.cfg.auto_finalize;
        }
        self.set_status(JobStatus::Waiting);
        self.set_status(JobStatus::Pending);
        if !self.cfg.auto_finalize {
            self.emit(JobEvent::Pending {
                id: self.id.clone(),
            });
        }
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
        // Nothing to copy: keep a small reserve of copy buffers (a final sync of a few dozen
        // chunks needs no fresh memory) and give the rest back rather than hold buf-size idle.
        self.trim_pool(IDLE_POOL_BYTES);
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
        let mut action = policy.action(errno);
        // PENDING (and WAITING) cannot pause or resume (QEMU's verb table): a stop there would
        // leave the job stuck, so it retries like ignore, and says so in the event.
        if action == ErrorAction::Stop
            && matches!(self.status(), JobStatus::Pending | JobStatus::Waiting)
        {
            action = ErrorAction::Ignore;
        }
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
        // Freeing buffers (munmap) costs tens of µs: not in the turn that reports the end.
        let pool = std::mem::take(&mut *self.pool.borrow_mut());
        self.ctx.defer(move || drop(pool));
    }

    /// Frees pooled copy buffers beyond `keep_bytes`.
    fn trim_pool(&self, keep_bytes: u64) {
        let mut pool = self.pool.borrow_mut();
        let mut kept = 0;
        pool.retain(|b| {
            kept += b.capacity() as u64;
            kept <= keep_bytes
        });
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
