//! What `blockdev-mirror` takes, with QEMU's defaults, and their validation.

use crate::bitmap::{GRANULARITY_DEFAULT, GRANULARITY_MAX, GRANULARITY_MIN};
use crate::error::MirrorError;
use crate::status::ErrorAction;

/// Default bound on bytes of copy I/O in flight (QEMU's buf-size default).
pub const BUF_SIZE_DEFAULT: u64 = 16 << 20;
/// Largest single copy operation.
pub const OP_BYTES_MAX: u64 = 1 << 20;

/// How guest writes reach the target (QAPI `MirrorCopyMode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Guest writes go to the source and dirty the bitmap; the job copies them later.
    #[default]
    Background,
    /// A guest write completes only once it is on source and target ("active" mirror).
    WriteBlocking,
}

impl CopyMode {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Background => "background",
            CopyMode::WriteBlocking => "write-blocking",
        }
    }
}

/// The error policy for one side (QAPI `BlockdevOnError`; `auto` is not offered, it means
/// what the device's rerror/werror say, and a job has no device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the job.
    #[default]
    Report,
    /// Keep the chunk dirty and retry it later.
    Ignore,
    /// Pause the job with io-status failed; `resume` retries.
    Stop,
    /// `Stop` on ENOSPC, `Report` otherwise.
    Enospc,
}

impl OnError {
    /// The action this policy takes for an error with `errno`.
    pub fn action(self, errno: Option<i32>) -> ErrorAction {
        match self {
            OnError::Report => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Stop => ErrorAction::Stop,
            OnError::Enospc if errno == Some(libc::ENOSPC) => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
        }
    }
}

/// Options of a mirror job. Only `sync=full` exists: the whole source is copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorOptions {
    /// The job id (QMP `job-id`), also the `device` of its events.
    pub job_id: String,
    /// Bytes per dirty-bitmap chunk: a power of two in 512 B ..= 64 MiB. Default 64 KiB.
    pub granularity: u64,
    /// Bound on bytes of copy I/O in flight; rounded up to the granularity. Default 16 MiB.
    pub buf_size: u64,
    /// Bytes per second (0: unlimited). Changeable with `set_speed`.
    pub speed: u64,
    /// Background or write-blocking; `change_copy_mode` may go to write-blocking later.
    pub copy_mode: CopyMode,
    pub on_source_error: OnError,
    pub on_target_error: OnError,
    /// Finalize (the drained final sync and the pivot) as soon as the job is PENDING.
    pub auto_finalize: bool,
    /// Go from CONCLUDED to NULL without `dismiss`.
    pub auto_dismiss: bool,
    /// The caller promises the target reads as zeroes (e.g. it was just created): zero chunks
    /// of the source are then not written at all. Otherwise they are written as write-zeroes,
    /// so no stale data of the target survives a full copy.
    pub target_is_zero: bool,
    /// Zero chunks may be deallocated on the target (write-zeroes with unmap).
    pub unmap: bool,
}

impl Default for MirrorOptions {
    fn default() -> MirrorOptions {
        MirrorOptions {
            job_id: String::new(),
            granularity: GRANULARITY_DEFAULT,
            buf_size: BUF_SIZE_DEFAULT,
            speed: 0,
            copy_mode: CopyMode::Background,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            auto_finalize: true,
            auto_dismiss: true,
            target_is_zero: false,
            unmap: true,
        }
    }
}

impl MirrorOptions {
    /// Options with this job id and the defaults.
    pub fn new(job_id: impl Into<String>) -> MirrorOptions {
        MirrorOptions {
            job_id: job_id.into(),
            ..MirrorOptions::default()
        }
    }

    /// Checks the options; returns buf-size rounded up to the granularity.
    pub(crate) fn validate(&self) -> Result<u64, MirrorError> {
        if self.job_id.is_empty() {
            return Err(MirrorError::InvalidParameter(
                "An explicit job ID is required".into(),
            ));
        }
        let g = self.granularity;
        if !g.is_power_of_two() || !(GRANULARITY_MIN..=GRANULARITY_MAX).contains(&g) {
            return Err(MirrorError::InvalidParameter(format!(
                "Parameter 'granularity' expects a power of 2 between {GRANULARITY_MIN} and \
                 {GRANULARITY_MAX}"
            )));
        }
        if self.buf_size == 0 {
            return Err(MirrorError::InvalidParameter(
                "Parameter 'buf-size' must be greater than 0".into(),
            ));
        }
        Ok(self.buf_size.div_ceil(g) * g)
    }
}
