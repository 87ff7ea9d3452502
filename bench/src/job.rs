//! fio job files: the subset of keys the generator understands.
//!
//! A job file is `[global]` and job sections of `key=value` lines (fio's format). A section's
//! keys start from the `[global]` keys read before it; later lines win. Command-line overrides
//! (`--set key=value`) are applied to every job after its own lines. A key outside the list in
//! [`KEYS`] is an error naming the key and its line, never silently ignored.

use std::fmt;
use std::time::Duration;

/// Keys accepted in a job file, each with what it does here.
pub const KEYS: &[(&str, &str)] = &[
    (
        "bs",
        "block size, k/m/g suffixes (4k = 4096), a multiple of 512; alias blocksize",
    ),
    ("description", "free text, ignored"),
    ("direct", "ignored (the target is a vhost-user socket)"),
    ("do_verify", "0 skips the final verify pass (default 1)"),
    ("filename", "ignored (the target is the socket)"),
    (
        "group_reporting",
        "ignored (results are always reported as one group)",
    ),
    ("iodepth", "requests in flight per job thread"),
    ("ioengine", "ignored"),
    (
        "loops",
        "repeat a size-bound (not time_based) job this many times (default 1)",
    ),
    ("name", "job name"),
    ("numjobs", "threads of this job, one virtqueue each"),
    (
        "offset",
        "start of the region, bytes (suffixes) or a percentage of the device",
    ),
    (
        "runtime",
        "run time limit: seconds or with us/ms/s/m/h suffix; alias timeout",
    ),
    (
        "rw",
        "read, write, randread, randwrite or randrw; alias readwrite",
    ),
    ("rwmixread", "percentage of reads in randrw (default 50)"),
    (
        "rwmixwrite",
        "percentage of writes in randrw (sets rwmixread to 100 - value)",
    ),
    (
        "size",
        "region length, bytes (suffixes) or a percentage of the device",
    ),
    ("thread", "ignored (jobs are always threads)"),
    (
        "time_based",
        "run for `runtime` however many times the region is covered",
    ),
    ("verify", "generation-stamped verify on (any value but 0)"),
    ("verify_fatal", "stop at the first bad block"),
];

/// The I/O pattern of a job (fio's `rw`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Random mix of reads and writes, `rwmixread` percent reads.
    RandRw,
}

impl Rw {
    /// Whether offsets are chosen at random.
    pub fn is_random(self) -> bool {
        matches!(self, Rw::RandRead | Rw::RandWrite | Rw::RandRw)
    }

    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::RandRead => "randread",
            Rw::RandWrite => "randwrite",
            Rw::RandRw => "randrw",
        }
    }
}

impl fmt::Display for Rw {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A length or position: absolute bytes, or a percentage of the device's capacity.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Amount {
    /// Bytes.
    Bytes(u64),
    /// Percent of the device's capacity (0 to 100).
    Percent(f64),
}

impl Amount {
    /// The amount in bytes on a device of `capacity_bytes`.
    pub fn resolve(self, capacity_bytes: u64) -> u64 {
        match self {
            Amount::Bytes(b) => b,
            Amount::Percent(p) => {
                // Exact for every capacity below 2^53 bytes; the float is only a ratio here.
                let bytes = (capacity_bytes as f64 * p / 100.0).floor();
                if bytes >= u64::MAX as f64 {
                    u64::MAX
                } else {
                    // In range by the check above, not negative (p >= 0), already floored.
                    #[allow(clippy::cast_possible_truncation)]
                    let b = bytes as u64;
                    b
                }
            }
        }
    }
}

/// One job (a section of a job file, with `[global]` applied).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Job {
    /// Section name (or `name=`).
    pub name: String,
    /// I/O pattern.
    pub rw: Rw,
    /// Percentage of reads for [`Rw::RandRw`].
    pub rwmixread: u8,
    /// Block size in bytes.
    pub bs: u32,
    /// Requests in flight per thread.
    pub iodepth: u16,
    /// Threads (one virtqueue each).
    pub numjobs: u16,
    /// Run time limit.
    pub runtime: Option<Duration>,
    /// Keep going until `runtime` even after the region is covered.
    pub time_based: bool,
    /// Region length; `None` means from `offset` to the end of the device.
    pub size: Option<Amount>,
    /// Region start.
    pub offset: Amount,
    /// Passes over a size-bound job.
    pub loops: u32,
    /// Generation-stamped verify.
    pub verify: bool,
    /// Run the final verify pass (when `verify`).
    pub do_verify: bool,
    /// Stop at the first bad block.
    pub verify_fatal: bool,
}

impl Job {
    fn new(name: &str) -> Self {
        Job {
            name: name.to_string(),
            rw: Rw::Read,
            rwmixread: 50,
            bs: 4096,
            iodepth: 1,
            numjobs: 1,
            runtime: None,
            time_based: false,
            size: None,
            offset: Amount::Bytes(0),
            loops: 1,
            verify: false,
            do_verify: true,
            verify_fatal: false,
        }
    }

    /// Parses a job file that holds exactly one job section.
    pub fn parse(text: &str) -> Result<Job, ParseError> {
        let mut file = JobFile::parse(text)?;
        if file.jobs.len() != 1 {
            return Err(ParseError {
                line: 0,
                key: None,
                message: format!("expected one job section, found {}", file.jobs.len()),
            });
        }
        Ok(file.jobs.remove(0))
    }

    /// Sets one key as if it were a line of this job's section (`line` 0 = command line).
    pub fn set(&mut self, key: &str, value: Option<&str>, line: usize) -> Result<(), ParseError> {
        let err = |message: String| ParseError {
            line,
            key: Some(key.to_string()),
            message,
        };
        let need = || value.ok_or_else(|| err("needs a value".to_string()));
        match key {
            "filename" | "ioengine" | "direct" | "thread" | "group_reporting" | "description" => {}
            "name" => self.name = need()?.to_string(),
            "rw" | "readwrite" => {
                self.rw = match need()? {
                    "read" => Rw::Read,
                    "write" => Rw::Write,
                    "randread" => Rw::RandRead,
                    "randwrite" => Rw::RandWrite,
                    "randrw" => Rw::RandRw,
                    other => {
                        return Err(err(format!(
                            "unsupported value {other:?} (read, write, randread, randwrite, randrw)"
                        )));
                    }
                }
            }
            "rwmixread" | "rwmixwrite" => {
                let pct = parse_int(need()?).map_err(err)?;
                let pct = u8::try_from(pct)
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| err("must be 0 to 100".to_string()))?;
                self.rwmixread = if key == "rwmixread" { pct } else { 100 - pct };
            }
            "bs" | "blocksize" => {
                let v = need()?;
                if v.contains([',', '-', ':']) {
                    return Err(err(format!(
                        "unsupported value {v:?}: one block size for reads and writes"
                    )));
                }
                let bs = parse_size(v).map_err(err)?;
                self.bs = u32::try_from(bs)
                    .ok()
                    .filter(|b| *b >= 512 && b % 512 == 0)
                    .ok_or_else(|| err(format!("{bs} is not a multiple of 512 below 4 GiB")))?;
            }
            "iodepth" => {
                let d = parse_int(need()?).map_err(err)?;
                self.iodepth = u16::try_from(d)
                    .ok()
                    .filter(|d| *d >= 1)
                    .ok_or_else(|| err(format!("{d} is out of range")))?;
            }
            "numjobs" => {
                let n = parse_int(need()?).map_err(err)?;
                self.numjobs = u16::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| err(format!("{n} is out of range")))?;
            }
            "loops" => {
                let n = parse_int(need()?).map_err(err)?;
                self.loops = u32::try_from(n)
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| err(format!("{n} is out of range")))?;
            }
            "runtime" | "timeout" => {
                let d = parse_duration(need()?).map_err(err)?;
                self.runtime = if d.is_zero() { None } else { Some(d) };
            }
            "time_based" => self.time_based = parse_bool(value).map_err(err)?,
            "size" => self.size = Some(parse_amount(need()?).map_err(err)?),
            "offset" => self.offset = parse_amount(need()?).map_err(err)?,
            "verify" => self.verify = !matches!(need()?, "0"),
            "do_verify" => self.do_verify = parse_bool(value).map_err(err)?,
            "verify_fatal" => self.verify_fatal = parse_bool(value).map_err(err)?,
            _ => return Err(err("unknown key".to_string())),
        }
        Ok(())
    }

    /// Applies a `key=value` override (as given to `--set`).
    pub fn set_override(&mut self, assignment: &str) -> Result<(), ParseError> {
        let (key, value) = split_assignment(assignment);
        self.set(key, value, 0)
    }
}

/// A parsed job file: its jobs, each with `[global]` applied. They run at the same time.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct JobFile {
    /// Job sections in file order.
    pub jobs: Vec<Job>,
}

impl JobFile {
    /// Parses fio job-file text.
    pub fn parse(text: &str) -> Result<JobFile, ParseError> {
        let mut global: Vec<(usize, &str, Option<&str>)> = Vec::new();
        let mut jobs: Vec<Job> = Vec::new();
        let mut in_global = false;
        let mut in_job = false;
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with([';', '#']) {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let name = rest.strip_suffix(']').map(str::trim).ok_or(ParseError {
                    line: line_no,
                    key: None,
                    message: format!("malformed section header {line:?}"),
                })?;
                if name.is_empty() {
                    return Err(ParseError {
                        line: line_no,
                        key: None,
                        message: "empty section name".to_string(),
                    });
                }
                in_global = name == "global";
                in_job = !in_global;
                if in_job {
                    let mut job = Job::new(name);
                    for (l, k, v) in &global {
                        job.set(k, *v, *l)?;
                    }
                    jobs.push(job);
                }
                continue;
            }
            let (key, value) = split_assignment(line);
            if in_global {
                // Check the key now so the error points at this line.
                Job::new("global").set(key, value, line_no)?;
                global.push((line_no, key, value));
            } else if in_job {
                let job = jobs.last_mut().expect("in_job implies a job");
                job.set(key, value, line_no)?;
            } else {
                return Err(ParseError {
                    line: line_no,
                    key: Some(key.to_string()),
                    message: "key outside any section".to_string(),
                });
            }
        }
        if jobs.is_empty() {
            return Err(ParseError {
                line: 0,
                key: None,
                message: "no job section".to_string(),
            });
        }
        Ok(JobFile { jobs })
    }

    /// Applies a `key=value` override to every job.
    pub fn set_override(&mut self, assignment: &str) -> Result<(), ParseError> {
        for job in &mut self.jobs {
            job.set_override(assignment)?;
        }
        Ok(())
    }
}

/// A job-file error, with the line (0 = command line or whole file) and key it concerns.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    /// 1-based line, 0 when not from a line.
    pub line: usize,
    /// The key concerned, if any.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "job: ")?,
            n => write!(f, "job file line {n}: ")?,
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

fn split_assignment(line: &str) -> (&str, Option<&str>) {
    match line.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v.trim())),
        None => (line.trim(), None),
    }
}

fn parse_bool(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some(other) => Err(format!("{other:?} is not a boolean (0 or 1)")),
    }
}

fn parse_int(value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .map_err(|_| format!("{value:?} is not a non-negative integer"))
}

/// Bytes with an optional binary suffix: `512`, `4k`, `4K`, `4KiB`, `1m`, `2g`, `1t`.
pub(crate) fn parse_size(value: &str) -> Result<u64, String> {
    let bad = || format!("{value:?} is not a size (e.g. 4096, 4k, 1m, 2g)");
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let suffix = suffix.to_ascii_lowercase();
    let unit_letter = suffix
        .strip_suffix("ib")
        .or_else(|| suffix.strip_suffix('b'))
        .unwrap_or(&suffix);
    let shift = match unit_letter {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{value:?} is too large"))
}

fn parse_amount(value: &str) -> Result<Amount, String> {
    if let Some(pct) = value.strip_suffix('%') {
        let p: f64 = pct
            .parse()
            .ok()
            .filter(|p: &f64| (0.0..=100.0).contains(p))
            .ok_or_else(|| format!("{value:?} is not a percentage from 0 to 100"))?;
        return Ok(Amount::Percent(p));
    }
    parse_size(value).map(Amount::Bytes)
}

/// A duration: plain seconds, or with a `us`, `ms`, `s`, `m`, `h` or `d` suffix.
fn parse_duration(value: &str) -> Result<Duration, String> {
    let bad = || format!("{value:?} is not a duration (e.g. 10, 10s, 500ms, 2m)");
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, suffix) = value.split_at(digits_end);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let micros_per_unit: u64 = match suffix.to_ascii_lowercase().as_str() {
        "us" => 1,
        "ms" => 1_000,
        "" | "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(micros_per_unit)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("{value:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Job {
        Job::parse(text).unwrap()
    }

    #[test]
    fn global_keys_apply_to_later_jobs_and_job_keys_win() {
        let f = JobFile::parse(
            "; comment\n[global]\nbs=8k\niodepth=4\n\n[a]\niodepth=16\n# c\n[b]\nrw=randwrite\n",
        )
        .unwrap();
        assert_eq!(f.jobs.len(), 2);
        assert_eq!(
            (f.jobs[0].name.as_str(), f.jobs[0].bs, f.jobs[0].iodepth),
            ("a", 8192, 16)
        );
        assert_eq!(
            (f.jobs[1].bs, f.jobs[1].iodepth, f.jobs[1].rw),
            (8192, 4, Rw::RandWrite)
        );
    }

    #[test]
    fn every_rw_value_parses() {
        for (v, rw) in [
            ("read", Rw::Read),
            ("write", Rw::Write),
            ("randread", Rw::RandRead),
            ("randwrite", Rw::RandWrite),
            ("randrw", Rw::RandRw),
        ] {
            assert_eq!(one(&format!("[j]\nrw={v}")).rw, rw);
        }
        let e = Job::parse("[j]\nrw=trim").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (2, Some("rw")));
    }

    #[test]
    fn bs_suffixes_are_binary() {
        assert_eq!(one("[j]\nbs=512").bs, 512);
        assert_eq!(one("[j]\nbs=4k").bs, 4096);
        assert_eq!(one("[j]\nbs=4K").bs, 4096);
        assert_eq!(one("[j]\nbs=4KiB").bs, 4096);
        assert_eq!(one("[j]\nbs=1m").bs, 1 << 20);
        assert!(Job::parse("[j]\nbs=1000").is_err());
        assert!(Job::parse("[j]\nbs=4k,8k").is_err());
        assert!(Job::parse("[j]\nbs=4x").is_err());
    }

    #[test]
    fn size_and_offset_take_suffixes_and_percentages() {
        let j = one("[j]\nsize=1g\noffset=64m");
        assert_eq!(j.size, Some(Amount::Bytes(1 << 30)));
        assert_eq!(j.offset, Amount::Bytes(64 << 20));
        let j = one("[j]\nsize=50%\noffset=25%");
        assert_eq!(j.size.unwrap().resolve(1 << 30), 1 << 29);
        assert_eq!(j.offset.resolve(1 << 30), 1 << 28);
        assert!(Job::parse("[j]\nsize=150%").is_err());
    }

    #[test]
    fn runtime_units() {
        assert_eq!(one("[j]\nruntime=5").runtime, Some(Duration::from_secs(5)));
        assert_eq!(one("[j]\nruntime=5s").runtime, Some(Duration::from_secs(5)));
        assert_eq!(
            one("[j]\nruntime=250ms").runtime,
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            one("[j]\nruntime=2m").runtime,
            Some(Duration::from_secs(120))
        );
        assert_eq!(one("[j]\nruntime=0").runtime, None);
        assert!(Job::parse("[j]\nruntime=5x").is_err());
    }

    #[test]
    fn numeric_keys_and_limits() {
        let j = one("[j]\niodepth=32\nnumjobs=2\nrwmixread=70\nloops=3");
        assert_eq!((j.iodepth, j.numjobs, j.rwmixread, j.loops), (32, 2, 70, 3));
        assert_eq!(one("[j]\nrwmixwrite=30").rwmixread, 70);
        assert!(Job::parse("[j]\niodepth=0").is_err());
        assert!(Job::parse("[j]\nrwmixread=101").is_err());
        assert!(Job::parse("[j]\nnumjobs=-1").is_err());
    }

    #[test]
    fn booleans_bare_and_valued() {
        let j = one("[j]\ntime_based\nverify=crc32c\nverify_fatal=1\ndo_verify=0");
        assert!(j.time_based && j.verify && j.verify_fatal && !j.do_verify);
        assert!(!one("[j]\nverify=0").verify);
        assert!(!one("[j]\ntime_based=0").time_based);
        assert!(Job::parse("[j]\ntime_based=maybe").is_err());
    }

    #[test]
    fn ignored_keys_are_accepted() {
        let j = one(
            "[global]\nioengine=libblkio\ndirect=1\nfilename=/dev/vda\nthread\n\
             group_reporting\n[j]\nname=renamed\n",
        );
        assert_eq!(j.name, "renamed");
    }

    #[test]
    fn every_documented_key_is_accepted() {
        for (key, _) in KEYS {
            let value = match *key {
                "rw" => "randrw",
                "bs" => "4k",
                "size" | "offset" => "1m",
                "runtime" => "1s",
                "name" | "description" | "filename" | "ioengine" => "x",
                _ => "1",
            };
            let line = format!("[j]\n{key}={value}\n");
            assert!(Job::parse(&line).is_ok(), "{key}={value}");
        }
    }

    #[test]
    fn unknown_key_error_names_key_and_line() {
        let e = JobFile::parse("[global]\nbs=4k\n[j]\nrw=read\nfrobnicate=3\n").unwrap_err();
        assert_eq!(e.line, 5);
        assert_eq!(e.key.as_deref(), Some("frobnicate"));
        let shown = e.to_string();
        assert!(
            shown.contains("line 5") && shown.contains("frobnicate"),
            "{shown}"
        );
        // In [global] too, reported at its own line.
        let e = JobFile::parse("[global]\nnorandommap\n[j]\n").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (2, Some("norandommap")));
    }

    #[test]
    fn structure_errors() {
        assert!(JobFile::parse("bs=4k\n[j]\n").is_err());
        assert!(JobFile::parse("[global]\nbs=4k\n").is_err());
        assert!(JobFile::parse("[j\n").is_err());
        assert!(Job::parse("[a]\n[b]\n").is_err());
    }

    #[test]
    fn overrides_apply_to_every_job_after_its_lines() {
        let mut f = JobFile::parse("[a]\niodepth=8\n[b]\niodepth=16\n").unwrap();
        f.set_override("iodepth=1").unwrap();
        assert!(f.jobs.iter().all(|j| j.iodepth == 1));
        let e = f.set_override("bogus=1").unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (0, Some("bogus")));
    }
}
