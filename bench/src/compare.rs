//! `compare`: the same profile against two daemons started with identical arguments, pinned
//! (daemon on one CPU, generator on another), alternating A B A B; medians and ratios A/B.
//! Unless `--wait-mode` picks one, each wait mode gets its own runs and table: first `event`
//! (the generator sleeps on the call eventfd, as a guest does), then `poll`.
//!
//! Each run starts a fresh daemon and stops it afterwards, so the two never hold the same image
//! open at once (QEMU's image locking would refuse that) and every run starts from the same state.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ringblk_bench::{
    JobFile, NOISE_CORES, Report, RunOptions, WaitMode, human, machine_busy_cores, run_jobs,
};

use crate::{Common, load_jobs, write_json};

const QSD: &str = "qemu-storage-daemon";
const SOCKET_WAIT: Duration = Duration::from_secs(30);
const STOP_WAIT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub(crate) struct CompareArgs {
    /// Job file (fio format).
    profile: PathBuf,
    /// Runs per daemon.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The ringblk daemon (side A unless --a-cmd is given).
    #[arg(long, default_value = "target/release/ringblk")]
    ringblk: PathBuf,
    /// qemu-storage-daemon (side B unless --b-cmd is given).
    #[arg(long, default_value = QSD)]
    qsd: PathBuf,
    /// The --blockdev both daemons get; its node-name is exported.
    #[arg(long, default_value = "driver=null-co,node-name=disk0,size=1073741824")]
    blockdev: String,
    /// Serve the export from each daemon's main loop instead of an iothread. By default both
    /// get `--object iothread,id=iot0` and export with `iothread=iot0`, the setup QSD is run
    /// with for performance (QSD polls only in iothreads, and so does ringblk).
    #[arg(long)]
    main_loop: bool,
    /// Side A's command (program and leading arguments, split on spaces).
    #[arg(long, value_name = "CMD")]
    a_cmd: Option<String>,
    /// Side B's command.
    #[arg(long, value_name = "CMD")]
    b_cmd: Option<String>,
    /// Side A's name in the table.
    #[arg(long)]
    a_name: Option<String>,
    /// Side B's name in the table.
    #[arg(long)]
    b_name: Option<String>,
    /// Run qemu-storage-daemon against itself (A/A), to prove the machinery and the noise level.
    #[arg(long)]
    self_test: bool,
    /// CPU the daemons are pinned to (taskset).
    #[arg(long, default_value_t = 1)]
    daemon_cpu: usize,
    /// CPU the generator threads are pinned to.
    #[arg(long, default_value_t = 0)]
    generator_cpu: usize,
    /// Before each run, wait up to this many seconds for the machine to be quiet (other
    /// processes below 5% of a CPU over one second); 0 does not wait.
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    settle: u64,
    /// Repeat a run disturbed by other processes (above 5% of a CPU) up to this many times.
    #[arg(long, default_value_t = 0)]
    retries: usize,
    #[command(flatten)]
    common: Common,
}

struct Side {
    name: String,
    cmd: Vec<String>,
}

#[derive(serde::Serialize)]
struct RunRecord {
    side: String,
    run: usize,
    report: Report,
}

#[derive(serde::Serialize, Clone, Copy)]
struct Medians {
    iops: f64,
    p50_us: f64,
    daemon_cpu_us_per_io: Option<f64>,
    generator_cpu_us_per_io: f64,
    generator_busy_us_per_io: f64,
    /// Other processes' CPU use during the runs, in cores.
    others_cores: f64,
}

#[derive(serde::Serialize)]
struct SideSummary {
    name: String,
    cmd: Vec<String>,
    median: Medians,
}

#[derive(serde::Serialize)]
struct Ratio {
    iops: f64,
    p50_us: f64,
    daemon_cpu_us_per_io: Option<f64>,
}

#[derive(serde::Serialize)]
struct CompareReport {
    profile: String,
    blockdev: String,
    runs_per_side: usize,
    daemon_cpu: usize,
    generator_cpu: usize,
    wait_mode: String,
    a: SideSummary,
    b: SideSummary,
    /// A / B.
    ratio: Ratio,
    runs: Vec<RunRecord>,
}

/// What `--json` writes: a report per wait mode, in the order they ran.
#[derive(serde::Serialize)]
struct CompareOutput {
    modes: Vec<CompareReport>,
}

fn split_cmd(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Returns whether every run passed.
pub(crate) fn main(args: &CompareArgs) -> Result<bool, String> {
    if args.runs == 0 {
        return Err("--runs must be at least 1".to_string());
    }
    let file = load_jobs(&args.profile, &args.common.overrides)?;
    let node = args
        .blockdev
        .split(',')
        .find_map(|kv| kv.strip_prefix("node-name="))
        .ok_or_else(|| format!("--blockdev {:?} has no node-name=", args.blockdev))?
        .to_string();
    let qsd = args.qsd.display().to_string();
    let (default_a, default_b) = if args.self_test {
        (
            Side {
                name: "qsd-a".into(),
                cmd: vec![qsd.clone()],
            },
            Side {
                name: "qsd-b".into(),
                cmd: vec![qsd.clone()],
            },
        )
    } else {
        (
            Side {
                name: "ringblk".into(),
                cmd: vec![args.ringblk.display().to_string()],
            },
            Side {
                name: "qsd".into(),
                cmd: vec![qsd],
            },
        )
    };
    let side = |default: Side, cmd: &Option<String>, name: &Option<String>| Side {
        name: name.clone().unwrap_or(default.name),
        cmd: cmd.as_deref().map(split_cmd).unwrap_or(default.cmd),
    };
    let sides = [
        side(default_a, &args.a_cmd, &args.a_name),
        side(default_b, &args.b_cmd, &args.b_name),
    ];
    for s in &sides {
        if s.cmd.is_empty() {
            return Err(format!("{}: empty command", s.name));
        }
    }

    let modes = match args.common.wait_mode {
        Some(mode) => vec![mode],
        None => vec![WaitMode::Event, WaitMode::Poll],
    };
    let mut out = CompareOutput { modes: Vec::new() };
    for mode in modes {
        out.modes
            .push(compare_mode(args, &file, &sides, &node, mode)?);
    }
    if let Some(path) = &args.common.json {
        write_json(path, &out)?;
    }
    Ok(out
        .modes
        .iter()
        .all(|m| m.runs.iter().all(|r| r.report.passed())))
}

/// The A B A B runs in one wait mode, their medians and ratios, printed as a table.
fn compare_mode(
    args: &CompareArgs,
    file: &JobFile,
    sides: &[Side; 2],
    node: &str,
    mode: WaitMode,
) -> Result<CompareReport, String> {
    let mut records: Vec<RunRecord> = Vec::new();
    for run in 1..=args.runs {
        for s in sides {
            let mut attempt = 0;
            let report = loop {
                settle(Duration::from_secs(args.settle));
                let daemon =
                    Daemon::start(s, &args.blockdev, node, args.daemon_cpu, !args.main_loop)?;
                let opts = RunOptions {
                    wait_mode: mode,
                    cpus: vec![args.generator_cpu],
                    backend_pid: Some(daemon.pid()),
                    progress: !args.common.no_progress,
                };
                let result = run_jobs(&daemon.socket, &file.jobs, &opts);
                let log = daemon.stop();
                let report = result.map_err(|e| format!("{} run {run}: {e}\n{log}", s.name))?;
                let others = others_cores(&report);
                let disturbed = others > NOISE_CORES;
                println!(
                    "run {run} {mode:<5} {:<10} {:>8} IOPS  p50 {:>7.1} us  daemon {:>6} us/IO  generator {:.2} us/IO ({:.2} busy)  others {:>3.0}%{}{}",
                    s.name,
                    human(report.total.iops),
                    report.total.lat_us.p50,
                    report
                        .cpu
                        .backend_us_per_io
                        .map_or("-".to_string(), |c| format!("{c:.2}")),
                    report.cpu.generator_us_per_io,
                    report.cpu.generator_busy_us_per_io,
                    others * 100.0,
                    match (disturbed, attempt < args.retries) {
                        (true, true) => " (disturbed, again)",
                        (true, false) => " (disturbed)",
                        _ => "",
                    },
                    if report.passed() { "" } else { "  FAILED" }
                );
                if !disturbed || attempt >= args.retries {
                    break report;
                }
                attempt += 1;
            };
            records.push(RunRecord {
                side: s.name.clone(),
                run,
                report,
            });
        }
    }

    let medians = |name: &str| {
        let reports: Vec<&Report> = records
            .iter()
            .filter(|r| r.side == name)
            .map(|r| &r.report)
            .collect();
        let daemon: Option<Vec<f64>> = reports.iter().map(|r| r.cpu.backend_us_per_io).collect();
        Medians {
            iops: median(reports.iter().map(|r| r.total.iops).collect()),
            p50_us: median(reports.iter().map(|r| r.total.lat_us.p50).collect()),
            daemon_cpu_us_per_io: daemon.map(median),
            generator_cpu_us_per_io: median(
                reports.iter().map(|r| r.cpu.generator_us_per_io).collect(),
            ),
            generator_busy_us_per_io: median(
                reports
                    .iter()
                    .map(|r| r.cpu.generator_busy_us_per_io)
                    .collect(),
            ),
            others_cores: median(reports.iter().map(|r| others_cores(r)).collect()),
        }
    };
    let (ma, mb) = (medians(&sides[0].name), medians(&sides[1].name));
    let ratio = Ratio {
        iops: ma.iops / mb.iops,
        p50_us: ma.p50_us / mb.p50_us,
        daemon_cpu_us_per_io: ma
            .daemon_cpu_us_per_io
            .zip(mb.daemon_cpu_us_per_io)
            .map(|(a, b)| a / b),
    };
    let profile = args.profile.display().to_string();
    println!();
    println!(
        "{profile}, wait mode {mode}: medians of {} runs each, daemon on CPU {}, generator on CPU {}",
        args.runs, args.daemon_cpu, args.generator_cpu
    );
    println!(
        "{:<24} {:>12} {:>12} {:>12}",
        "",
        sides[0].name,
        sides[1].name,
        format!("{}/{}", sides[0].name, sides[1].name)
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    println!(
        "{:<24} {:>12} {:>12} {:>12.2}",
        "IOPS",
        human(ma.iops),
        human(mb.iops),
        ratio.iops
    );
    println!(
        "{:<24} {:>12.1} {:>12.1} {:>12.2}",
        "p50 latency (us)", ma.p50_us, mb.p50_us, ratio.p50_us
    );
    println!(
        "{:<24} {:>12} {:>12} {:>12}",
        "daemon CPU (us/IO)",
        opt(ma.daemon_cpu_us_per_io),
        opt(mb.daemon_cpu_us_per_io),
        opt(ratio.daemon_cpu_us_per_io)
    );
    println!(
        "{:<24} {:>12.2} {:>12.2}",
        "generator CPU (us/IO)", ma.generator_cpu_us_per_io, mb.generator_cpu_us_per_io
    );
    println!(
        "{:<24} {:>12.2} {:>12.2}",
        "generator busy (us/IO)", ma.generator_busy_us_per_io, mb.generator_busy_us_per_io
    );
    println!(
        "{:<24} {:>11.0}% {:>11.0}%",
        "other processes (CPU)",
        ma.others_cores * 100.0,
        mb.others_cores * 100.0
    );
    let [sa, sb] = sides;
    println!();
    Ok(CompareReport {
        profile,
        blockdev: args.blockdev.clone(),
        runs_per_side: args.runs,
        daemon_cpu: args.daemon_cpu,
        generator_cpu: args.generator_cpu,
        wait_mode: mode.to_string(),
        a: SideSummary {
            name: sa.name.clone(),
            cmd: sa.cmd.clone(),
            median: ma,
        },
        b: SideSummary {
            name: sb.name.clone(),
            cmd: sb.cmd.clone(),
            median: mb,
        },
        ratio,
        runs: records,
    })
}

fn others_cores(r: &Report) -> f64 {
    match r.cpu.others_s {
        Some(o) if r.elapsed_s > 0.0 => o / r.elapsed_s,
        _ => 0.0,
    }
}

/// Waits (up to `max`) until other processes use less than NOISE_CORES of a CPU.
fn settle(max: Duration) {
    if max.is_zero() {
        return;
    }
    let t0 = Instant::now();
    loop {
        let busy = machine_busy_cores(Duration::from_secs(1)).unwrap_or(0.0);
        if busy < NOISE_CORES {
            return;
        }
        if t0.elapsed() >= max {
            eprintln!(
                "compare: the machine is still busy ({:.0}% of a CPU), measuring anyway",
                busy * 100.0
            );
            return;
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A daemon started for one run, stopped (SIGTERM, then SIGKILL) by `stop` or on drop.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(
        side: &Side,
        blockdev: &str,
        node: &str,
        cpu: usize,
        iothread: bool,
    ) -> Result<Daemon, String> {
        let dir = unique_dir()?;
        let socket = dir.join("vhost.sock");
        let log = dir.join("daemon.log");
        let log_file = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let log_err = log_file.try_clone().map_err(|e| e.to_string())?;
        let mut export = format!(
            "type=vhost-user-blk,id=e,node-name={node},addr.type=unix,addr.path={},writable=on",
            socket.display()
        );
        let mut daemon_args = vec!["--blockdev".to_owned(), blockdev.to_owned()];
        if iothread {
            daemon_args.extend(["--object".to_owned(), "iothread,id=iot0".to_owned()]);
            export.push_str(",iothread=iot0");
        }
        daemon_args.extend(["--export".to_owned(), export]);
        let mut command = Command::new("taskset");
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                // The daemon dies with us, even if we are killed (taskset and the daemon keep
                // the setting across exec).
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command
            .arg("-c")
            .arg(cpu.to_string())
            .args(&side.cmd)
            .args(&daemon_args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("starting {}: {e} (is taskset installed?)", side.cmd[0]))?;
        let mut d = Daemon {
            child: Some(child),
            dir,
            socket,
            log,
        };
        let t0 = Instant::now();
        while !d.socket.exists() {
            let exited = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                return Err(format!(
                    "{} exited ({status}) before creating its socket:\n{}",
                    side.name,
                    d.read_log()
                ));
            }
            if t0.elapsed() > SOCKET_WAIT {
                return Err(format!(
                    "{} created no socket within {} s:\n{}",
                    side.name,
                    SOCKET_WAIT.as_secs(),
                    d.read_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(d)
    }

    fn pid(&self) -> i32 {
        let id = self.child.as_ref().expect("running").id();
        i32::try_from(id).expect("pids fit i32")
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the daemon and returns its log.
    fn stop(mut self) -> String {
        self.terminate();
        self.read_log()
    }

    fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(id) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(id), Signal::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < STOP_WAIT {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique_dir() -> Result<PathBuf, String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("ringblk-bench-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
}
