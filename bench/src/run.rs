//! Running jobs: connection, memory, threads, CPU accounting, progress, the verify session.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nix::sys::resource::{UsageWho, getrusage};

use crate::device::{Connection, DeviceInfo};
use crate::job::{Job, Rw};
use crate::report::{CpuReport, Report, VerifyReport, dir_report, human};
use crate::verify::VerifyTable;
use crate::virtq::{MAX_QUEUE_SIZE, QueueLayout, SharedMemory};
use crate::worker::{self, Env, Outcome, Plan, Progress};
use crate::{Error, WaitMode};

/// Most blocks a verify table may track (8 bytes each).
const MAX_VERIFY_BLOCKS: u64 = 1 << 27;
/// Requests in flight per thread in the final verify pass.
const VERIFY_PASS_DEPTH: u16 = 32;

/// How to run (everything that is not in the job file).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Completions by polling the used ring (default) or by waiting on the call eventfd.
    pub wait_mode: WaitMode,
    /// CPUs to pin the generator threads to, round robin; empty: no pinning.
    pub cpus: Vec<usize>,
    /// Process whose CPU time (all threads) is charged to the backend.
    pub backend_pid: Option<i32>,
    /// Print a progress line to stderr every second on runs longer than 3 s.
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            wait_mode: WaitMode::Poll,
            cpus: Vec::new(),
            backend_pid: None,
            progress: true,
        }
    }
}

/// Runs `job` against the vhost-user-blk device at `socket`; with `verify` and `do_verify`, a
/// final verify pass reads back everything written.
pub fn run_job(socket: &Path, job: &Job, opts: &RunOptions) -> Result<Report, Error> {
    run_jobs(socket, std::slice::from_ref(job), opts)
}

/// Runs `jobs` at the same time (fio's default for the sections of one job file), then the
/// final verify pass when any of them verifies with `do_verify`.
pub fn run_jobs(socket: &Path, jobs: &[Job], opts: &RunOptions) -> Result<Report, Error> {
    let mut session = Session::new(socket, opts.clone());
    let mut report = session.run(jobs)?;
    let stopped_fatal = jobs.iter().any(|j| j.verify_fatal)
        && report.verify.as_ref().is_some_and(|v| v.bad_blocks > 0);
    if jobs.iter().any(|j| j.verify && j.do_verify) && !stopped_fatal {
        let pass = session.verify()?;
        report
            .verify
            .get_or_insert_with(VerifyReport::default)
            .absorb(pass);
    }
    Ok(report)
}

/// Several runs against one device sharing one verify table, so that a later run or the final
/// [`Session::verify`] knows every generation acknowledged before. Each call opens its own
/// vhost-user connection; the data stays on the device in between.
pub struct Session {
    socket: PathBuf,
    opts: RunOptions,
    table: Option<VerifyTable>,
    threads: usize,
}

struct Resolved {
    start: u64,
    blocks: u64,
}

impl Session {
    /// A session against `socket`; nothing is connected until [`Session::run`].
    pub fn new(socket: &Path, opts: RunOptions) -> Session {
        Session {
            socket: socket.to_path_buf(),
            opts,
            table: None,
            threads: 1,
        }
    }

    /// Runs `jobs` at the same time. Verify reads during the run are checked; the final pass
    /// is [`Session::verify`].
    pub fn run(&mut self, jobs: &[Job]) -> Result<Report, Error> {
        if jobs.is_empty() {
            return Err(Error::Job("no job to run".to_string()));
        }
        let conn = Connection::connect(&self.socket)?;
        let info = conn.info().clone();
        let regions = jobs
            .iter()
            .map(|j| resolve(j, &info))
            .collect::<Result<Vec<_>, _>>()?;
        self.prepare_table(jobs, &regions)?;
        let mut plans = Vec::new();
        for (ji, (job, region)) in jobs.iter().zip(&regions).enumerate() {
            let parts = u64::from(job.numjobs);
            for clone in 0..parts {
                let (start, blocks) = if job.verify {
                    // Verify clones split the region: one owner per block.
                    let per = region.blocks / parts;
                    if per == 0 {
                        return Err(Error::Job(format!(
                            "{}: {} blocks cannot be split among numjobs={}",
                            job.name, region.blocks, job.numjobs
                        )));
                    }
                    let blocks = if clone + 1 == parts {
                        region.blocks - per * clone
                    } else {
                        per
                    };
                    (region.start + per * clone * u64::from(job.bs), blocks)
                } else {
                    (region.start, region.blocks)
                };
                let (read_pct, random) = match job.rw {
                    Rw::Read => (100, false),
                    Rw::Write => (0, false),
                    Rw::RandRead => (100, true),
                    Rw::RandWrite => (0, true),
                    Rw::RandRw => (job.rwmixread, true),
                };
                plans.push(Plan {
                    read_pct,
                    random,
                    permute: random && !job.time_based,
                    start,
                    blocks,
                    block_len: job.bs,
                    iodepth: job.iodepth,
                    io_limit: (!job.time_based).then(|| blocks * u64::from(job.loops)),
                    runtime: job.runtime,
                    seed: 0x5eed_0000 ^ ((ji as u64) << 32) ^ clone,
                    verify_pass: false,
                    verify_fatal: job.verify_fatal,
                    cpu: None,
                });
            }
        }
        self.threads = self.threads.max(plans.len());
        let verifying = jobs.iter().any(|j| j.verify);
        let table = if verifying { self.table.as_ref() } else { None };
        let (outcomes, elapsed_s, cpu) = execute(conn, plans, table, &self.opts)?;
        let mut report = build_report(&info, &self.opts, outcomes, elapsed_s, cpu);
        report.jobs = jobs
            .iter()
            .map(|j| {
                format!(
                    "{}: (rw={}, bs={}, iodepth={}, numjobs={}{})",
                    j.name,
                    j.rw,
                    j.bs,
                    j.iodepth,
                    j.numjobs,
                    if j.verify { ", verify" } else { "" }
                )
            })
            .collect();
        if !verifying {
            report.verify = None;
        }
        Ok(report)
    }

    /// Reads back every block written with verify in this session and checks its stamp.
    pub fn verify(&mut self) -> Result<VerifyReport, Error> {
        let Some(table) = self.table.as_ref() else {
            return Ok(VerifyReport::default());
        };
        let conn = Connection::connect(&self.socket)?;
        let threads = self.threads.min(usize::from(conn.info().num_queues)).max(1) as u64;
        let threads = threads.min(table.blocks());
        let per = table.blocks() / threads;
        let plans = (0..threads)
            .map(|i| {
                let blocks = if i + 1 == threads {
                    table.blocks() - per * i
                } else {
                    per
                };
                Plan {
                    read_pct: 100,
                    random: false,
                    permute: false,
                    start: table.offset_of(per * i),
                    blocks,
                    block_len: table.block_len,
                    iodepth: VERIFY_PASS_DEPTH,
                    io_limit: None,
                    runtime: None,
                    seed: 0,
                    verify_pass: true,
                    verify_fatal: false,
                    cpu: None,
                }
            })
            .collect();
        let mut opts = self.opts.clone();
        opts.progress = false;
        let (outcomes, _, _) = execute(conn, plans, Some(table), &opts)?;
        let mut v = VerifyReport::default();
        for o in outcomes {
            v.absorb(VerifyReport {
                blocks_checked: o.blocks_checked,
                bad_blocks: o.bad_count,
                bad: o.bad,
            });
            if o.io_errors > 0 {
                return Err(Error::Job(format!(
                    "{} reads failed during the verify pass",
                    o.io_errors
                )));
            }
        }
        Ok(v)
    }

    /// Creates the verify table on first use, or checks that the jobs fit the existing one.
    fn prepare_table(&mut self, jobs: &[Job], regions: &[Resolved]) -> Result<(), Error> {
        let verify: Vec<(&Job, &Resolved)> =
            jobs.iter().zip(regions).filter(|(j, _)| j.verify).collect();
        let span = |(j, r): &(&Job, &Resolved)| (r.start, r.start + r.blocks * u64::from(j.bs));
        for (i, a) in verify.iter().enumerate() {
            for b in &verify[i + 1..] {
                let ((a0, a1), (b0, b1)) = (span(a), span(b));
                if a0 < b1 && b0 < a1 {
                    return Err(Error::Job(format!(
                        "verify jobs {} and {} overlap",
                        a.0.name, b.0.name
                    )));
                }
            }
        }
        if let Some((first, _)) = verify.first() {
            let bs = first.bs;
            if verify.iter().any(|(j, _)| j.bs != bs) {
                return Err(Error::Job("verify jobs must share one bs".to_string()));
            }
            if self.table.is_none() {
                let start = verify.iter().map(|v| span(v).0).min().expect("non-empty");
                let end = verify.iter().map(|v| span(v).1).max().expect("non-empty");
                let blocks = (end - start) / u64::from(bs);
                if blocks > MAX_VERIFY_BLOCKS {
                    return Err(Error::Job(format!(
                        "verify would track {blocks} blocks (at most {MAX_VERIFY_BLOCKS}): set size"
                    )));
                }
                let blocks = usize::try_from(blocks).expect("bounded above");
                self.table = Some(VerifyTable::new(start, bs, blocks));
            }
            let t = self.table.as_ref().expect("created above");
            for v in &verify {
                let (s, e) = span(v);
                if v.0.bs != t.block_len
                    || s < t.start
                    || e > t.end()
                    || !(s - t.start).is_multiple_of(u64::from(t.block_len))
                {
                    return Err(Error::Job(format!(
                        "{}: verify region or bs differs from the earlier runs of this session",
                        v.0.name
                    )));
                }
            }
        }
        if let Some(t) = &self.table {
            for (j, r) in jobs.iter().zip(regions) {
                let writes = !matches!(j.rw, Rw::Read | Rw::RandRead);
                let (s, e) = (r.start, r.start + r.blocks * u64::from(j.bs));
                if writes && !j.verify && s < t.end() && t.start < e {
                    return Err(Error::Job(format!(
                        "{}: writes without verify into the verified region",
                        j.name
                    )));
                }
            }
        }
        Ok(())
    }
}

fn resolve(job: &Job, info: &DeviceInfo) -> Result<Resolved, Error> {
    let err = |m: String| Error::Job(format!("{}: {m}", job.name));
    let cap = info.capacity_bytes;
    let bs = u64::from(job.bs);
    if !bs.is_multiple_of(u64::from(info.blk_size)) {
        return Err(err(format!(
            "bs={bs} is not a multiple of the device's blk_size {}",
            info.blk_size
        )));
    }
    let start = job.offset.resolve(cap);
    if !start.is_multiple_of(u64::from(info.blk_size)) {
        return Err(err(format!(
            "offset {start} is not aligned to the block size"
        )));
    }
    let size = match job.size {
        Some(s) => s.resolve(cap),
        None => cap.saturating_sub(start),
    };
    if start.checked_add(size).is_none_or(|e| e > cap) {
        return Err(err(format!(
            "offset {start} + size {size} exceeds the device's {cap} bytes"
        )));
    }
    let blocks = size / bs;
    if blocks == 0 {
        return Err(err(format!("size {size} holds no block of {bs} bytes")));
    }
    if info.read_only && !matches!(job.rw, Rw::Read | Rw::RandRead) {
        return Err(err("the device is read-only".to_string()));
    }
    if job.time_based && job.runtime.is_none() {
        return Err(err("time_based needs a runtime".to_string()));
    }
    if u32::from(job.iodepth) * 3 > u32::from(MAX_QUEUE_SIZE) {
        return Err(err(format!(
            "iodepth={} exceeds {} (three descriptors per request in a queue of {})",
            job.iodepth,
            MAX_QUEUE_SIZE / 3,
            MAX_QUEUE_SIZE
        )));
    }
    Ok(Resolved { start, blocks })
}

struct CpuSample {
    own_s: f64,
    backend_s: Option<f64>,
    machine_busy_s: Option<f64>,
}

/// The machine's busy CPU time over `window`, in cores (1.0 = one CPU fully busy), from
/// /proc/stat. Use it to wait for a quiet machine before measuring.
pub fn machine_busy_cores(window: Duration) -> Option<f64> {
    let before = machine_busy_s()?;
    std::thread::sleep(window);
    Some((machine_busy_s()? - before) / window.as_secs_f64())
}

/// Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait).
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - ticks.get(3)? - ticks.get(4)?;
    Some(busy as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn cpu_sample(backend_pid: Option<i32>) -> CpuSample {
    let own_s = getrusage(UsageWho::RUSAGE_SELF)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0);
    CpuSample {
        own_s,
        backend_s: backend_pid.and_then(proc_cpu_s),
        machine_busy_s: machine_busy_s(),
    }
}

/// utime + stime of a process (all its threads) from /proc/PID/stat, in seconds.
pub(crate) fn proc_cpu_s(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line; `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// Starts the queues, runs one thread per plan and collects their outcomes.
fn execute(
    mut conn: Connection,
    mut plans: Vec<Plan>,
    table: Option<&VerifyTable>,
    opts: &RunOptions,
) -> Result<(Vec<Outcome>, f64, CpuReport), Error> {
    let mut layouts = Vec::with_capacity(plans.len());
    let mut end = 0usize;
    for p in &plans {
        let l = QueueLayout::new(end, p.iodepth, p.block_len)
            .ok_or_else(|| Error::Job(format!("iodepth={} does not fit a queue", p.iodepth)))?;
        end = l.end;
        layouts.push(l);
    }
    for (i, p) in plans.iter_mut().enumerate() {
        if !opts.cpus.is_empty() {
            p.cpu = Some(opts.cpus[i % opts.cpus.len()]);
        }
    }
    let mem = Arc::new(SharedMemory::new(end).map_err(|source| Error::Io {
        context: "creating the shared memory",
        source,
    })?);
    let handles = conn.start(&mem, &layouts)?;
    let stop = AtomicBool::new(false);
    let env = Env {
        stop: &stop,
        table,
        wait: opts.wait_mode,
    };
    let progress: Vec<Progress> = plans.iter().map(|_| Progress::default()).collect();
    let barrier = Barrier::new(plans.len() + 1);
    let planned = plans.iter().filter_map(|p| p.runtime).max();
    let (results, elapsed, before, after) = std::thread::scope(|s| {
        let threads: Vec<_> = handles
            .into_iter()
            .zip(&plans)
            .zip(&progress)
            .map(|((q, plan), prog)| {
                let env = &env;
                let barrier = &barrier;
                s.spawn(move || {
                    let r = worker::run(q, plan, env, prog, barrier);
                    if r.is_err() {
                        env.stop.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let before = cpu_sample(opts.backend_pid);
        barrier.wait();
        let t0 = Instant::now();
        if opts.progress {
            print_progress(&threads, &progress, t0, planned);
        }
        let results: Vec<_> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        (results, t0.elapsed(), before, cpu_sample(opts.backend_pid))
    });
    drop(conn);
    let outcomes = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    let ios: u64 = outcomes.iter().map(|o| o.ios[0] + o.ios[1]).sum();
    let per_io = |s: f64| if ios > 0 { s * 1e6 / ios as f64 } else { 0.0 };
    let generator_s = after.own_s - before.own_s;
    // Share of the threads' wall time not spent spinning, applied to their CPU time: unlike
    // `cpu - spin`, this stays right when other processes preempt the threads (preemption then
    // falls on both parts in proportion).
    let idle_s: f64 = outcomes.iter().map(|o| o.idle.as_secs_f64()).sum();
    let thread_s: f64 = outcomes
        .iter()
        .map(|o| o.finished.duration_since(o.started).as_secs_f64())
        .sum();
    let busy_share = if thread_s > 0.0 {
        (1.0 - idle_s / thread_s).clamp(0.0, 1.0)
    } else {
        1.0
    };
    let backend_s = before.backend_s.zip(after.backend_s).map(|(b, a)| a - b);
    let cpu = CpuReport {
        generator_s,
        generator_us_per_io: per_io(generator_s),
        generator_busy_us_per_io: per_io(generator_s * busy_share),
        backend_s,
        backend_us_per_io: backend_s.map(per_io),
        others_s: before
            .machine_busy_s
            .zip(after.machine_busy_s)
            .map(|(b, a)| (a - b - generator_s - backend_s.unwrap_or(0.0)).max(0.0)),
    };
    // The I/O phase: from the first thread's start to the last one's end.
    let first = outcomes.iter().map(|o| o.started).min();
    let last = outcomes.iter().map(|o| o.finished).max();
    let io_s = first.zip(last).map_or(elapsed.as_secs_f64(), |(a, b)| {
        b.duration_since(a).as_secs_f64()
    });
    Ok((outcomes, io_s, cpu))
}

fn print_progress<T>(
    threads: &[std::thread::ScopedJoinHandle<'_, T>],
    progress: &[Progress],
    t0: Instant,
    planned: Option<Duration>,
) {
    let long = planned.is_some_and(|p| p > Duration::from_secs(3));
    let (mut last_ios, mut last_bytes, mut last_t) = (0u64, 0u64, t0);
    let mut tick = 1u64;
    while !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        if now < t0 + Duration::from_secs(tick) {
            continue;
        }
        tick += 1;
        let ios: u64 = progress.iter().map(|p| p.ios.load(Ordering::Relaxed)).sum();
        let bytes: u64 = progress
            .iter()
            .map(|p| p.bytes.load(Ordering::Relaxed))
            .sum();
        let dt = now.duration_since(last_t).as_secs_f64();
        if long || now.duration_since(t0) > Duration::from_secs(3) {
            eprintln!(
                "[{:>4}s] {} IOPS, {:.1} MB/s, {} I/Os done",
                tick - 1,
                human((ios - last_ios) as f64 / dt),
                (bytes - last_bytes) as f64 / dt / 1e6,
                ios
            );
        }
        (last_ios, last_bytes, last_t) = (ios, bytes, now);
    }
}

fn build_report(
    info: &DeviceInfo,
    opts: &RunOptions,
    outcomes: Vec<Outcome>,
    elapsed_s: f64,
    cpu: CpuReport,
) -> Report {
    let mut hist = [worker::new_histogram(), worker::new_histogram()];
    let mut total_hist = worker::new_histogram();
    let (mut ios, mut bytes) = ([0u64; 2], [0u64; 2]);
    let mut io_errors = 0;
    let mut verify = VerifyReport::default();
    for o in outcomes {
        for d in 0..2 {
            ios[d] += o.ios[d];
            bytes[d] += o.bytes[d];
            hist[d].add(&o.lat_ns[d]).expect("same histogram bounds");
            total_hist.add(&o.lat_ns[d]).expect("same histogram bounds");
        }
        io_errors += o.io_errors;
        verify.absorb(VerifyReport {
            blocks_checked: o.blocks_checked,
            bad_blocks: o.bad_count,
            bad: o.bad,
        });
    }
    Report {
        jobs: Vec::new(),
        wait_mode: opts.wait_mode,
        device: info.clone(),
        elapsed_s,
        read: dir_report(ios[0], bytes[0], &hist[0], elapsed_s),
        write: dir_report(ios[1], bytes[1], &hist[1], elapsed_s),
        total: dir_report(ios[0] + ios[1], bytes[0] + bytes[1], &total_hist, elapsed_s),
        io_errors,
        cpu,
        verify: Some(verify),
    }
}
