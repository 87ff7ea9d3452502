//! The commands the daemon's QMP layer calls on a mirror job, one method each, and the job's
//! creation (which puts the `mirror_top` filter above the source).
//!
//! Every command checks QEMU's verb table first, changes the state, and lets the pump
//! ([`crate::job`]) do the rest; none blocks, except `create`, whose drained section of the
//! source moves the devices onto the filter.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use ringblk_blkgraph::{Contents, Node, drained_begin};
use ringblk_ring::{Context, Group};

use crate::bitmap::DirtyBitmap;
use crate::error::MirrorError;
use crate::filter::{MirrorTop, Shared};
use crate::job::{Config, Goal, Job, Phase, State};
use crate::options::{CopyMode, MirrorOptions, OP_BYTES_MAX};
use crate::ratelimit::RateLimit;
use crate::status::{EventSink, IoStatus, JobEvent, JobInfo, JobStatus, Verb};

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
    /// Events go to `events` in the order they happen, each as it happens (the daemon turns
    /// them into QMP events at once: pivot latency is measured to BLOCK_JOB_COMPLETED).
    /// Call on the main context.
    pub fn create(
        source: &Node,
        target: &Node,
        options: MirrorOptions,
        events: Option<EventSink>,
    ) -> Result<Mirror, MirrorError> {
        let buf_size = options.validate()?;
        let invalid = |m: &str| Err(MirrorError::InvalidParameter(m.to_owned()));
        if source.same(target) {
            return invalid("Can't mirror node into itself");
        }
        if target.read_only() {
            return invalid("Block node is read-only");
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
        } else {
            mark_known_zero(target, &target_zero);
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
                complete_requested: false,
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

    /// The node being copied.
    pub fn source(&self) -> &Node {
        &self.0.source
    }

    /// The node being copied to.
    pub fn target(&self) -> &Node {
        &self.0.target
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

    /// `job-complete` (READY or STANDBY): PENDING at once; with auto-finalize the drained final
    /// sync and the pivot follow, ending in BLOCK_JOB_COMPLETED. A paused job (STANDBY, or READY
    /// with its pause under way) takes the request and carries it out when it resumes, as QEMU
    /// does.
    pub fn complete(&self) -> Result<(), MirrorError> {
        let job = &self.0;
        job.check_verb(Verb::Complete)?;
        {
            let mut st = job.st.borrow_mut();
            if st.cancelled {
                return Err(MirrorError::CannotComplete(job.id.clone()));
            }
            if st.user_paused {
                st.complete_requested = true;
                return Ok(());
            }
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
        let complete = std::mem::take(&mut job.st.borrow_mut().complete_requested);
        if complete && job.status() == JobStatus::Ready {
            job.to_pending(Goal::Pivot);
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

/// Sets the chunks of `bitmap` that `node`'s block status says read as zeroes (holes of a
/// sparse target need no write-zeroes). A status error leaves the rest unmarked: copied in full.
fn mark_known_zero(node: &Node, bitmap: &DirtyBitmap) {
    let size = node.size();
    let mut offset = 0;
    while offset < size {
        let Ok(extent) = node.block_status(offset, size - offset) else {
            return;
        };
        if extent.contents == Contents::Zero {
            bitmap.set(bitmap.covered(offset, extent.len));
        }
        offset += extent.len;
    }
}
