//! `ringblk-bench`: run fio job files against a vhost-user-blk socket, or compare two daemons.

mod compare;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ringblk_bench::{JobFile, RunOptions, WaitMode, run_jobs};

#[derive(Parser)]
#[command(
    version,
    about = "vhost-user-blk load generator that runs fio job files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job file against a vhost-user-blk socket.
    Run {
        /// Job file (fio format).
        jobfile: PathBuf,
        /// The device's vhost-user unix socket.
        #[arg(long)]
        socket: PathBuf,
        /// Process whose CPU time is reported per I/O (the daemon serving the socket).
        #[arg(long, value_name = "PID")]
        backend_pid: Option<i32>,
        /// CPUs to pin the generator threads to, round robin (e.g. `0` or `0,1`).
        #[arg(long, value_delimiter = ',', value_name = "LIST")]
        cpus: Vec<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Run a profile against two daemons, alternating A B A B, and report medians and ratios.
    Compare(compare::CompareArgs),
}

/// Options of both subcommands.
#[derive(Args, Clone)]
pub(crate) struct Common {
    /// Override a job-file key in every job, e.g. `--set iodepth=1` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) overrides: Vec<String>,
    /// How completions are waited for: `poll` spins on the used ring, `event` sleeps on the call
    /// eventfd as a guest does. `run` polls unless told; `compare` runs both (event first) unless
    /// told.
    #[arg(long, value_name = "poll|event")]
    pub(crate) wait_mode: Option<WaitMode>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub(crate) no_progress: bool,
}

/// Loads a job file and applies the `--set` overrides.
pub(crate) fn load_jobs(path: &Path, overrides: &[String]) -> Result<JobFile, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut file = JobFile::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for o in overrides {
        file.set_override(o)
            .map_err(|e| format!("--set {o}: {e}"))?;
    }
    Ok(file)
}

pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            jobfile,
            socket,
            backend_pid,
            cpus,
            common,
        } => run(&jobfile, &socket, backend_pid, cpus, &common),
        Command::Compare(args) => compare::main(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ringblk-bench: {e}");
            ExitCode::from(2)
        }
    }
}

/// Returns whether the run passed (no I/O error, no bad block).
fn run(
    jobfile: &Path,
    socket: &Path,
    backend_pid: Option<i32>,
    cpus: Vec<usize>,
    common: &Common,
) -> Result<bool, String> {
    let file = load_jobs(jobfile, &common.overrides)?;
    let opts = RunOptions {
        wait_mode: common.wait_mode.unwrap_or(WaitMode::Poll),
        cpus,
        backend_pid,
        progress: !common.no_progress,
    };
    let report = run_jobs(socket, &file.jobs, &opts).map_err(|e| e.to_string())?;
    print!("{report}");
    if let Some(path) = &common.json {
        write_json(path, &report)?;
    }
    Ok(report.passed())
}
