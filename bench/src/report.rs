//! Results of a run: numbers, JSON shape and the fio-like text.

use std::fmt;

use hdrhistogram::Histogram;

use crate::WaitMode;
use crate::device::DeviceInfo;
use crate::verify::BadBlock;

/// Other processes' CPU use (in cores) above which a run is flagged as disturbed.
pub const NOISE_CORES: f64 = 0.05;

/// Results of one run (all jobs of a job file together, like fio's group reporting).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Job names, with their pattern, e.g. `randread-4k (randread bs=4096 iodepth=32 numjobs=1)`.
    pub jobs: Vec<String>,
    /// How completions were waited for.
    pub wait_mode: WaitMode,
    /// What the device offered.
    pub device: DeviceInfo,
    /// Wall time of the I/O phase.
    pub elapsed_s: f64,
    /// Reads.
    pub read: DirReport,
    /// Writes.
    pub write: DirReport,
    /// Reads and writes together.
    pub total: DirReport,
    /// Requests completed with a status other than VIRTIO_BLK_S_OK.
    pub io_errors: u64,
    /// CPU time per completed I/O.
    pub cpu: CpuReport,
    /// Verify results, when the job verifies.
    pub verify: Option<VerifyReport>,
}

impl Report {
    /// True when there were no I/O errors and no bad blocks.
    pub fn passed(&self) -> bool {
        self.io_errors == 0 && self.verify.as_ref().is_none_or(|v| v.bad_blocks == 0)
    }
}

/// Numbers for one direction.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DirReport {
    /// Completed I/Os.
    pub ios: u64,
    /// Bytes transferred.
    pub bytes: u64,
    /// I/Os per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Completion latency (submission to seen in the used ring).
    pub lat_us: LatencyReport,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LatencyReport {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Maximum.
    pub max: f64,
}

/// CPU use over the I/O phase, per completed I/O.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuReport {
    /// The generator's own CPU seconds (getrusage, user + system).
    pub generator_s: f64,
    /// Generator CPU microseconds per I/O. In poll mode this includes spinning, so it is the
    /// generator's wall time per I/O; see `generator_busy_us_per_io` for the work.
    pub generator_us_per_io: f64,
    /// Generator CPU per I/O less the time its threads spent spinning for completions
    /// (poll mode): what generating one I/O costs.
    pub generator_busy_us_per_io: f64,
    /// Backend CPU seconds (/proc/PID/stat utime + stime), if a backend pid was given.
    pub backend_s: Option<f64>,
    /// Backend CPU microseconds per I/O.
    pub backend_us_per_io: Option<f64>,
    /// CPU seconds the rest of the machine used meanwhile (/proc/stat busy time less the
    /// generator and the backend): other work competing for the cores makes numbers unreliable.
    pub others_s: Option<f64>,
}

/// Verify results (in-run read checks and the final pass together).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Blocks whose contents were checked against the generation table.
    pub blocks_checked: u64,
    /// Blocks that failed.
    pub bad_blocks: u64,
    /// The first bad blocks in detail.
    pub bad: Vec<BadBlock>,
}

impl VerifyReport {
    pub(crate) fn absorb(&mut self, other: VerifyReport) {
        self.blocks_checked += other.blocks_checked;
        self.bad_blocks += other.bad_blocks;
        let room = crate::worker::BAD_BLOCKS_KEPT.saturating_sub(self.bad.len());
        self.bad.extend(other.bad.into_iter().take(room));
    }
}

pub(crate) fn dir_report(ios: u64, bytes: u64, hist: &Histogram<u64>, secs: f64) -> DirReport {
    let us = |ns: u64| ns as f64 / 1000.0;
    let lat_us = if hist.is_empty() {
        LatencyReport::default()
    } else {
        LatencyReport {
            mean: hist.mean() / 1000.0,
            p50: us(hist.value_at_quantile(0.50)),
            p99: us(hist.value_at_quantile(0.99)),
            p99_9: us(hist.value_at_quantile(0.999)),
            max: us(hist.max()),
        }
    };
    let per_s = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    DirReport {
        ios,
        bytes,
        iops: per_s(ios),
        mb_per_s: per_s(bytes) / 1e6,
        lat_us,
    }
}

/// `1234567.0` as `1.23M`, `12345.0` as `12.3k`.
pub fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for j in &self.jobs {
            writeln!(f, "{j}")?;
        }
        writeln!(
            f,
            "  device: {} MiB, blk_size {}, {} queues, event_idx {}, wait-mode {}",
            self.device.capacity_bytes >> 20,
            self.device.blk_size,
            self.device.num_queues,
            self.device.event_idx,
            self.wait_mode
        )?;
        for (name, d) in [("read", &self.read), ("write", &self.write)] {
            if d.ios == 0 {
                continue;
            }
            writeln!(
                f,
                "  {name}: IOPS={}, BW={:.1}MiB/s ({:.1}MB/s)({:.1}MiB/{:.0}msec)",
                human(d.iops),
                d.mb_per_s * 1e6 / 1048576.0,
                d.mb_per_s,
                d.bytes as f64 / 1048576.0,
                self.elapsed_s * 1000.0
            )?;
            let l = &d.lat_us;
            writeln!(
                f,
                "    lat (usec): p50={:.1}, p99={:.1}, p99.9={:.1}, max={:.1}, mean={:.1}",
                l.p50, l.p99, l.p99_9, l.max, l.mean
            )?;
        }
        write!(
            f,
            "  cpu: generator {:.2} us/IO ({:.2} busy)",
            self.cpu.generator_us_per_io, self.cpu.generator_busy_us_per_io
        )?;
        if let Some(b) = self.cpu.backend_us_per_io {
            write!(f, ", backend {b:.2} us/IO")?;
        }
        writeln!(f)?;
        if let Some(o) = self.cpu.others_s
            && self.elapsed_s > 0.0
            && o / self.elapsed_s > NOISE_CORES
        {
            writeln!(
                f,
                "  warning: other processes used {:.0}% of a CPU during the run",
                100.0 * o / self.elapsed_s
            )?;
        }
        if self.io_errors > 0 {
            writeln!(f, "  errors: {} I/Os failed", self.io_errors)?;
        }
        if let Some(v) = &self.verify {
            writeln!(
                f,
                "  verify: {} blocks checked, {} bad",
                v.blocks_checked, v.bad_blocks
            )?;
            for b in &v.bad {
                writeln!(
                    f,
                    "    bad block at offset {}: {:?} (expected generation {}, found {})",
                    b.offset,
                    b.reason,
                    b.expected_generation,
                    b.found_generation
                        .map_or_else(|| "none".to_string(), |g| g.to_string())
                )?;
            }
        }
        Ok(())
    }
}
