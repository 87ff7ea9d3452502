//! ringblk-bench: a vhost-user-blk *frontend* load generator that runs fio job files.
//!
//! It plays the part fio with libblkio plays: it connects to any vhost-user-blk unix socket
//! (ringblk's or qemu-storage-daemon's), shares a memfd with the device, drives one split
//! virtqueue per job thread and reports IOPS, bandwidth, latency percentiles and CPU per I/O.
//!
//! # Design
//! - [`job`]: the fio job-file subset ([`JobFile::parse`], [`Job::parse`], `--set` overrides).
//! - `device`: the vhost-user handshake through the rust-vmm `vhost` crate (frontend side).
//! - `virtq`: the shared memory and the driver side of the split virtqueue. **All raw-pointer
//!   access of the crate is in that module**; everything the device writes (used ring ids and
//!   lengths, status bytes) is checked against what was submitted before it is believed.
//! - `worker`: the per-thread hot loop (batched avail updates, one kick per batch and only if
//!   the device wants one, no allocation per I/O, completions by polling or by the call eventfd).
//! - `verify`: generation-stamped blocks and the per-block generation table.
//! - [`run_job`] / [`run_jobs`] / [`Session`]: runs, CPU accounting, progress, the final verify.
//!
//! Invariants: at most `iodepth` requests per queue are in flight and every used entry must
//! name one of them (else [`Error::DeviceProtocol`]); with verify on, one block never has two
//! requests in flight; a device that stops completing is reported ([`Error::DeviceStall`]),
//! not waited for forever.
//!
//! ```no_run
//! use ringblk_bench::{Job, RunOptions, run_job};
//! let job = Job::parse("[j]\nrw=randread\nbs=4k\niodepth=32\nruntime=5\ntime_based\n")?;
//! let report = run_job("/tmp/vhost.sock".as_ref(), &job, &RunOptions::default())?;
//! println!("{report}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

mod device;
pub mod job;
mod report;
mod run;
mod verify;
mod virtq;
mod worker;

use std::fmt;
use std::str::FromStr;

pub use device::DeviceInfo;
pub use job::{Amount, Job, JobFile, ParseError, Rw};
pub use report::{CpuReport, DirReport, LatencyReport, NOISE_CORES, Report, VerifyReport, human};
pub use run::{RunOptions, Session, machine_busy_cores, run_job, run_jobs};
pub use verify::{BadBlock, BadReason};

/// Reads a process's CPU time (utime + stime of all threads, seconds) from /proc/PID/stat.
pub fn process_cpu_s(pid: i32) -> Option<f64> {
    run::proc_cpu_s(pid)
}

/// How the generator learns about completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    /// Spin on the used ring with device notifications suppressed (libblkio's poll mode).
    #[default]
    Poll,
    /// Sleep on the call eventfd until the device signals (interrupt-driven, like a guest).
    Event,
}

impl fmt::Display for WaitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WaitMode::Poll => "poll",
            WaitMode::Event => "event",
        })
    }
}

impl FromStr for WaitMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "poll" => Ok(WaitMode::Poll),
            "event" => Ok(WaitMode::Event),
            _ => Err(format!("{s:?}: expected poll or event")),
        }
    }
}

/// Everything that can stop a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device wrote something a correct device cannot (bad used id or length, ...).
    #[error("device broke the protocol: {0}")]
    DeviceProtocol(String),
    /// Requests in flight and no completion for a long time.
    #[error("device stalled: {0}")]
    DeviceStall(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The job cannot run on this device (too large, misaligned, too many threads, ...).
    #[error("job: {0}")]
    Job(String),
    /// The job file is malformed.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A vhost-user message failed.
    #[error("vhost-user {step}: {source}")]
    Vhost {
        /// The message or step.
        step: &'static str,
        /// The error from the vhost crate.
        source: vhost::Error,
    },
}
