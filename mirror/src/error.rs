//! Errors of the job's commands. Messages read like QEMU's, so QMP can pass them through.

/// Why a command on a mirror job was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MirrorError {
    /// The job's state does not accept the command (QEMU's verb table).
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    VerbNotAllowed {
        id: String,
        status: &'static str,
        verb: &'static str,
    },
    /// An option is out of range or the nodes do not fit together.
    #[error("{0}")]
    InvalidParameter(String),
    /// `pause` of a paused job.
    #[error("Job is already paused")]
    AlreadyPaused,
    /// `resume` of a job that is not paused.
    #[error("Can't resume a job that was not paused")]
    NotPaused,
    /// `complete` while paused, or after cancel.
    #[error("The active block job '{0}' cannot be completed")]
    CannotComplete(String),
    /// A copy-mode change that is not background to write-blocking.
    #[error("Change to copy mode '{to}' is not implemented")]
    CopyModeChange {
        from: &'static str,
        to: &'static str,
    },
}
