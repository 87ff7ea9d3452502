//! Job states, verbs and events, named as QEMU's QAPI names them (`JobStatus`, `JobVerb`,
//! `BLOCK_JOB_*` events), so the daemon's QMP layer maps them one to one.

use std::fmt;

/// A job's status (QAPI `JobStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Created, not started.
    Created,
    /// Copying.
    Running,
    /// Paused before READY.
    Paused,
    /// In sync and mirroring; `complete` may be called.
    Ready,
    /// Paused after READY.
    Standby,
    /// Done with its work, waiting for others in its transaction (passed through at once here).
    Waiting,
    /// Waiting for `finalize`: still mirroring; finalize runs the drained final sync and pivot.
    Pending,
    /// Failing or cancelled; cleaning up.
    Aborting,
    /// Over; waiting for `dismiss`.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether the state machine allows `self -> to` (QEMU's transition table).
    pub fn may_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command on a job (QAPI `JobVerb`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

impl Verb {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
            Verb::Change => "change",
        }
    }

    /// Whether a job in `status` accepts the verb (QEMU's verb table).
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            Verb::Cancel => matches!(
                status,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Verb::Pause | Verb::Resume | Verb::SetSpeed | Verb::Change => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            // QEMU lets a job on standby take `complete`: it happens once the job resumes.
            Verb::Complete => matches!(status, Ready | Standby),
            Verb::Finalize => status == Pending,
            Verb::Dismiss => status == Concluded,
        }
    }
}

/// A job's I/O status (QAPI `BlockDeviceIoStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

impl IoStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// Which side of the copy failed (QAPI `IoOperationType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing (or flushing) the target.
    Write,
}

impl IoOperation {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            IoOperation::Read => "read",
            IoOperation::Write => "write",
        }
    }
}

/// What the job did about an error (QAPI `BlockErrorAction`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorAction {
    Ignore,
    Report,
    Stop,
}

impl ErrorAction {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Ignore => "ignore",
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
        }
    }
}

/// The fields BLOCK_JOB_READY, _COMPLETED and _CANCELLED share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobProgress {
    /// Always "mirror".
    pub job_type: &'static str,
    /// The job id (QMP calls it `device`).
    pub device: String,
    /// Estimated total bytes of work.
    pub len: u64,
    /// Bytes of work done.
    pub offset: u64,
    /// Speed limit in bytes per second (0: none).
    pub speed: u64,
}

/// Where a job's events go: called on the main context as each event happens.
pub type EventSink = Box<dyn Fn(JobEvent)>;

/// What a job tells its owner. Each variant is one QMP event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// JOB_STATUS_CHANGE.
    StatusChange { id: String, status: JobStatus },
    /// BLOCK_JOB_READY.
    Ready(JobProgress),
    /// BLOCK_JOB_COMPLETED; `error` set when the job failed.
    Completed {
        progress: JobProgress,
        error: Option<String>,
    },
    /// BLOCK_JOB_CANCELLED.
    Cancelled(JobProgress),
    /// BLOCK_JOB_PENDING: the job waits for `finalize` (only with auto-finalize off).
    Pending { id: String },
    /// BLOCK_JOB_ERROR.
    Error {
        device: String,
        operation: IoOperation,
        action: ErrorAction,
    },
}

impl JobEvent {
    /// The QMP event name.
    pub fn qmp_name(&self) -> &'static str {
        match self {
            JobEvent::StatusChange { .. } => "JOB_STATUS_CHANGE",
            JobEvent::Ready(_) => "BLOCK_JOB_READY",
            JobEvent::Completed { .. } => "BLOCK_JOB_COMPLETED",
            JobEvent::Cancelled(_) => "BLOCK_JOB_CANCELLED",
            JobEvent::Pending { .. } => "BLOCK_JOB_PENDING",
            JobEvent::Error { .. } => "BLOCK_JOB_ERROR",
        }
    }
}

/// What `query-block-jobs` returns for a mirror (QAPI `BlockJobInfo` with the mirror's
/// `actively-synced`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// Always "mirror".
    pub job_type: &'static str,
    /// The job id.
    pub device: String,
    pub len: u64,
    pub offset: u64,
    /// Copy I/O or a drained section is in progress.
    pub busy: bool,
    /// Paused by the user or by an error with the `stop` policy.
    pub paused: bool,
    pub speed: u64,
    pub io_status: IoStatus,
    /// READY or STANDBY.
    pub ready: bool,
    pub status: JobStatus,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Why the job failed, once it has.
    pub error: Option<String>,
    /// Write-blocking mode, in sync: every guest write completes only once on the target.
    pub actively_synced: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_point_and_completion_paths_are_allowed_transitions() {
        use JobStatus::*;
        for path in [
            &[Created, Running, Ready, Waiting, Pending, Concluded, Null][..],
            &[Running, Paused, Running, Aborting, Concluded],
            &[Ready, Standby, Ready],
            &[Created, Aborting],
        ] {
            for w in path.windows(2) {
                assert!(w[0].may_become(w[1]), "{} -> {}", w[0], w[1]);
            }
        }
        assert!(
            !Paused.may_become(Aborting),
            "a paused job resumes before it aborts"
        );
        assert!(!Running.may_become(Concluded));
    }

    #[test]
    fn verbs_follow_qemus_table() {
        assert!(Verb::Complete.allowed_in(JobStatus::Ready));
        assert!(Verb::Complete.allowed_in(JobStatus::Standby));
        assert!(!Verb::Complete.allowed_in(JobStatus::Paused));
        assert!(Verb::Cancel.allowed_in(JobStatus::Pending));
        assert!(!Verb::Cancel.allowed_in(JobStatus::Aborting));
        assert!(Verb::Dismiss.allowed_in(JobStatus::Concluded));
        assert!(!Verb::Pause.allowed_in(JobStatus::Pending));
    }
}
