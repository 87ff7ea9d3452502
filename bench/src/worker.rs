//! One generator thread driving one virtqueue: the hot loop.
//!
//! Each turn: fill every free slot (one clock read for the batch), publish the avail idx once
//! and kick only if the device asked for it; then wait for the used idx to move (spinning in
//! poll mode, sleeping on the call eventfd in event mode), reap everything that is there (one
//! clock read for the batch), check each used entry against what was submitted, and go again.
//! Nothing is allocated per I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::Pid;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

use crate::device::QueueHandle;
use crate::verify::{self, BadBlock, VerifyTable};
use crate::{Error, WaitMode};

/// With requests in flight and no completion for this long, the device is declared stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bad blocks kept in detail (all are counted).
pub(crate) const BAD_BLOCKS_KEPT: usize = 64;
/// Attempts at a random block that has no request in flight (verify only).
const PICK_ATTEMPTS: u32 = 8;
const READ: usize = 0;
const WRITE: usize = 1;

/// What one thread does.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// Percentage of reads (100: only reads, 0: only writes).
    pub(crate) read_pct: u8,
    pub(crate) random: bool,
    /// Random order without repeats: each pass touches every block once (fio's random map);
    /// otherwise random blocks are drawn with replacement (time-based runs).
    pub(crate) permute: bool,
    /// First byte of this thread's region.
    pub(crate) start: u64,
    /// Blocks in the region (at least 1).
    pub(crate) blocks: u64,
    pub(crate) block_len: u32,
    pub(crate) iodepth: u16,
    /// I/Os to issue; `None` runs until the run time is over or the run is stopped.
    pub(crate) io_limit: Option<u64>,
    pub(crate) runtime: Option<Duration>,
    pub(crate) seed: u64,
    /// Only read blocks the verify table knows as written, once each (the final verify pass).
    pub(crate) verify_pass: bool,
    pub(crate) verify_fatal: bool,
    pub(crate) cpu: Option<usize>,
}

/// Live counters of one thread, read by the progress printer.
#[repr(align(64))]
#[derive(Default)]
pub(crate) struct Progress {
    pub(crate) ios: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

/// What the threads share.
pub(crate) struct Env<'a> {
    pub(crate) stop: &'a AtomicBool,
    pub(crate) table: Option<&'a VerifyTable>,
    pub(crate) wait: WaitMode,
}

/// Results of one thread.
pub(crate) struct Outcome {
    pub(crate) ios: [u64; 2],
    pub(crate) bytes: [u64; 2],
    pub(crate) lat_ns: [Histogram<u64>; 2],
    pub(crate) io_errors: u64,
    /// When the thread started and finished issuing I/O.
    pub(crate) started: Instant,
    pub(crate) finished: Instant,
    /// Time spent spinning for completions with nothing to do (poll mode; asleep is not CPU).
    pub(crate) idle: Duration,
    pub(crate) blocks_checked: u64,
    pub(crate) bad_count: u64,
    pub(crate) bad: Vec<BadBlock>,
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

#[derive(Clone, Copy)]
struct SlotState {
    block: u64,
    write: bool,
    in_flight: bool,
    generation: u32,
    submitted: Instant,
}

/// SplitMix64: small, fast, and reproducible from the seed (fio's randrepeat=1 spirit).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), by the multiply-high method.
    fn below(&mut self, n: u64) -> u64 {
        let wide = u128::from(self.next()) * u128::from(n);
        // The high half of a 64x64 product fits in 64 bits.
        #[allow(clippy::cast_possible_truncation)]
        let high = (wide >> 64) as u64;
        high
    }
}

/// A pseudo-random permutation of `0..n` walked one element at a time, without memory: a
/// bijective scramble of a counter over the next power of two, skipping values `>= n`
/// (at most half of them), so every pass yields each block exactly once.
struct Permutation {
    n: u64,
    bits: u32,
    seed: u64,
    counter: u64,
}

impl Permutation {
    fn new(n: u64, seed: u64) -> Self {
        let bits = n.max(1).next_power_of_two().trailing_zeros();
        Permutation {
            n: n.max(1),
            bits,
            seed,
            counter: 0,
        }
    }

    fn mask(&self) -> u64 {
        if self.bits >= 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }

    /// A bijection of `0..2^bits`: xor, odd multiplies and xor-shifts, each invertible mod 2^bits.
    fn scramble(&self, x: u64) -> u64 {
        let mask = self.mask();
        let shift = self.bits.div_ceil(2).max(1);
        let mut x = (x ^ self.seed) & mask;
        for k in [
            0x9e37_79b9_7f4a_7c15u64,
            0xbf58_476d_1ce4_e5b9,
            0x94d0_49bb_1331_11eb,
        ] {
            x = x.wrapping_mul(k) & mask;
            x ^= x >> shift;
        }
        x
    }

    fn next(&mut self) -> u64 {
        loop {
            let i = self.counter;
            self.counter = (i + 1) & self.mask();
            let y = self.scramble(i);
            if y < self.n {
                return y;
            }
        }
    }
}

struct Worker<'a> {
    plan: &'a Plan,
    env: &'a Env<'a>,
    progress: &'a Progress,
    q: QueueHandle,
    slots: Vec<SlotState>,
    free: Vec<u16>,
    in_flight: usize,
    issued: u64,
    cursor: u64,
    rng: Rng,
    perm: Permutation,
    /// The next block of the permutation, drawn but not yet issued.
    perm_next: Option<u64>,
    /// Index in the verify table of the region's first block.
    table_first: u64,
    scratch: Vec<u8>,
    out: Outcome,
}

pub(crate) fn run(
    q: QueueHandle,
    plan: &Plan,
    env: &Env<'_>,
    progress: &Progress,
    start: &std::sync::Barrier,
) -> Result<Outcome, Error> {
    if let Some(cpu) = plan.cpu {
        let mut set = CpuSet::new();
        set.set(cpu)
            .and_then(|()| sched_setaffinity(Pid::from_raw(0), &set))
            .map_err(|e| Error::Io {
                context: "pinning the generator thread",
                source: e.into(),
            })?;
    }
    let table_first = match env.table {
        Some(t) => {
            assert!(plan.start >= t.start && plan.block_len == t.block_len);
            (plan.start - t.start) / u64::from(t.block_len)
        }
        None => 0,
    };
    let now = Instant::now();
    let slot = SlotState {
        block: 0,
        write: false,
        in_flight: false,
        generation: 0,
        submitted: now,
    };
    let depth = usize::from(plan.iodepth);
    let mut w = Worker {
        plan,
        env,
        progress,
        q,
        slots: vec![slot; depth],
        free: (0..plan.iodepth).rev().collect(),
        in_flight: 0,
        issued: 0,
        cursor: 0,
        rng: Rng(plan.seed),
        perm: Permutation::new(plan.blocks, plan.seed),
        perm_next: None,
        table_first,
        scratch: if env.table.is_some() {
            vec![0u8; plan.block_len as usize]
        } else {
            Vec::new()
        },
        out: Outcome {
            ios: [0; 2],
            bytes: [0; 2],
            lat_ns: [new_histogram(), new_histogram()],
            io_errors: 0,
            idle: Duration::ZERO,
            started: now,
            finished: now,
            blocks_checked: 0,
            bad_count: 0,
            bad: Vec::new(),
        },
    };
    if env.wait == WaitMode::Poll {
        w.q.queue.suppress_notifications(0);
    }
    start.wait();
    w.out.started = Instant::now();
    w.main_loop()?;
    w.out.finished = Instant::now();
    Ok(w.out)
}

impl Worker<'_> {
    fn main_loop(&mut self) -> Result<(), Error> {
        let deadline = self.plan.runtime.map(|r| Instant::now() + r);
        let mut last_used: u16 = 0;
        let mut draining = false;
        loop {
            if !draining {
                let exhausted = self.fill()?;
                if exhausted && self.in_flight == 0 {
                    break;
                }
            } else if self.in_flight == 0 {
                break;
            }
            if self.in_flight == 0 {
                // Every candidate block was busy; cannot happen with nothing in flight.
                unreachable!("fill issued nothing with no request in flight");
            }
            let (used, now) = self.wait_used(last_used)?;
            let new = usize::from(used.wrapping_sub(last_used));
            if new > self.in_flight {
                return Err(Error::DeviceProtocol(format!(
                    "used idx moved by {new} with {} requests in flight",
                    self.in_flight
                )));
            }
            while last_used != used {
                let (id, len) = self.q.queue.used_elem(last_used);
                self.complete(id, len, now)?;
                last_used = last_used.wrapping_add(1);
            }
            if self.env.wait == WaitMode::Poll {
                self.q.queue.suppress_notifications(last_used);
            }
            let done = self.out.ios[READ] + self.out.ios[WRITE];
            self.progress.ios.store(done, Ordering::Relaxed);
            self.progress.bytes.store(
                self.out.bytes[READ] + self.out.bytes[WRITE],
                Ordering::Relaxed,
            );
            if deadline.is_some_and(|d| now >= d) || self.env.stop.load(Ordering::Relaxed) {
                draining = true;
            }
        }
        Ok(())
    }

    /// Issues requests into every free slot; returns true when no more will ever be issued.
    fn fill(&mut self) -> Result<bool, Error> {
        let now = Instant::now();
        let mut exhausted = false;
        while let Some(&slot) = self.free.last() {
            if self.plan.io_limit.is_some_and(|l| self.issued >= l) {
                exhausted = true;
                break;
            }
            let Some((block, write)) = self.next_io() else {
                exhausted = self.plan.verify_pass && self.cursor >= self.plan.blocks;
                break;
            };
            self.free.pop();
            self.submit(slot, block, write, now);
        }
        if self.q.queue.publish() {
            self.q.kick.write(1).map_err(|source| Error::Io {
                context: "kicking the device",
                source,
            })?;
        }
        Ok(exhausted)
    }

    /// The next (block, is_write), or `None` if nothing can be issued now.
    fn next_io(&mut self) -> Option<(u64, bool)> {
        let plan = self.plan;
        if plan.verify_pass {
            let table = self.env.table.expect("verify pass has a table");
            while self.cursor < plan.blocks {
                let b = self.cursor;
                self.cursor += 1;
                if table.written(self.table_first + b) {
                    return Some((b, false));
                }
            }
            return None;
        }
        let write = match plan.read_pct {
            100 => false,
            0 => true,
            pct => self.rng.below(100) >= u64::from(pct),
        };
        let verifying = self.env.table.is_some();
        if plan.permute {
            let b = match self.perm_next {
                Some(b) => b,
                None => self.perm.next(),
            };
            if verifying && self.busy(b) {
                self.perm_next = Some(b);
                return None;
            }
            self.perm_next = None;
            Some((b, write))
        } else if plan.random {
            for _ in 0..if verifying { PICK_ATTEMPTS } else { 1 } {
                let b = self.rng.below(plan.blocks);
                if !verifying || !self.busy(b) {
                    return Some((b, write));
                }
            }
            None
        } else {
            let b = self.cursor;
            if verifying && self.busy(b) {
                return None;
            }
            self.cursor = if b + 1 == plan.blocks { 0 } else { b + 1 };
            Some((b, write))
        }
    }

    fn busy(&self, block: u64) -> bool {
        self.slots.iter().any(|s| s.in_flight && s.block == block)
    }

    fn submit(&mut self, slot: u16, block: u64, write: bool, now: Instant) {
        let offset = self.plan.start + block * u64::from(self.plan.block_len);
        let mut generation = 0;
        if let Some(table) = self.env.table
            && write
        {
            generation = table.begin_write(self.table_first + block);
            verify::fill(&mut self.scratch, offset, generation);
            self.q.queue.write_data(slot, &self.scratch);
        }
        let request_type = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        self.q
            .queue
            .prepare(slot, request_type, offset / 512, !write);
        self.q.queue.push_avail(slot);
        self.slots[usize::from(slot)] = SlotState {
            block,
            write,
            in_flight: true,
            generation,
            submitted: now,
        };
        self.in_flight += 1;
        self.issued += 1;
    }

    fn complete(&mut self, id: u32, len: u32, now: Instant) -> Result<(), Error> {
        let slot = self
            .q
            .queue
            .slot_of(id)
            .filter(|s| self.slots[usize::from(*s)].in_flight)
            .ok_or_else(|| {
                Error::DeviceProtocol(format!("used ring names id {id}, not a request in flight"))
            })?;
        let s = self.slots[usize::from(slot)];
        // Bytes the device may have written: the data buffer for reads, and the status byte.
        let writable = if s.write {
            1
        } else {
            u64::from(self.plan.block_len) + 1
        };
        if u64::from(len) > writable {
            return Err(Error::DeviceProtocol(format!(
                "used len {len} for id {id} exceeds the {writable} writable bytes"
            )));
        }
        self.slots[usize::from(slot)].in_flight = false;
        self.in_flight -= 1;
        self.free.push(slot);

        let ok = u32::from(self.q.queue.status(slot)) == VIRTIO_BLK_S_OK;
        let dir = if s.write { WRITE } else { READ };
        if let Some(table) = self.env.table {
            let tb = self.table_first + s.block;
            if s.write {
                table.end_write(tb, s.generation, ok);
            } else if ok {
                self.q.queue.read_data(slot, &mut self.scratch);
                match table.check(tb, &self.scratch) {
                    None => {}
                    Some(Ok(())) => self.out.blocks_checked += 1,
                    Some(Err(bad)) => {
                        self.out.blocks_checked += 1;
                        self.out.bad_count += 1;
                        if self.out.bad.len() < BAD_BLOCKS_KEPT {
                            self.out.bad.push(bad);
                        }
                        if self.plan.verify_fatal {
                            self.env.stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        if ok {
            self.out.ios[dir] += 1;
            self.out.bytes[dir] += u64::from(self.plan.block_len);
            let ns = now.saturating_duration_since(s.submitted).as_nanos();
            self.out.lat_ns[dir].saturating_record(u64::try_from(ns).unwrap_or(u64::MAX));
        } else {
            self.out.io_errors += 1;
        }
        Ok(())
    }

    /// Waits until the used idx differs from `last_used`; returns it and the time it was seen.
    fn wait_used(&mut self, last_used: u16) -> Result<(u16, Instant), Error> {
        let used = self.q.queue.used_idx();
        if used != last_used {
            return Ok((used, Instant::now()));
        }
        let since = Instant::now();
        match self.env.wait {
            WaitMode::Poll => {
                let mut spins: u32 = 0;
                loop {
                    let used = self.q.queue.used_idx();
                    if used != last_used {
                        let now = Instant::now();
                        self.out.idle += now.duration_since(since);
                        return Ok((used, now));
                    }
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(65_536) && since.elapsed() > STALL_TIMEOUT {
                        return Err(self.stalled());
                    }
                }
            }
            WaitMode::Event => loop {
                let used = self.q.queue.request_notification(last_used);
                if used != last_used {
                    return Ok((used, Instant::now()));
                }
                let mut fds = [PollFd::new(self.q.call_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(1000u16)) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        return Err(Error::Io {
                            context: "waiting on the call eventfd",
                            source: e.into(),
                        });
                    }
                }
                // Non-blocking: clears the counter if it fired, EAGAIN otherwise.
                let _ = self.q.call.read();
                if since.elapsed() > STALL_TIMEOUT {
                    return Err(self.stalled());
                }
            },
        }
    }

    fn stalled(&self) -> Error {
        Error::DeviceStall(format!(
            "{} requests in flight and no completion for {} s",
            self.in_flight,
            STALL_TIMEOUT.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtq::{DeviceSide, QueueLayout, SharedMemory, SplitQueue};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    /// How the test device answers request number `n` (chain head, block length): used
    /// entries `(id, len)` and how far to move the used idx, or `None` to answer correctly.
    type Misbehave = fn(u64, u16, u32) -> Option<(Vec<(u32, u32)>, u16)>;

    /// Runs a 4-deep random-read worker for 64 I/Os against an in-memory device thread.
    fn run_against(misbehave: Misbehave) -> Result<Outcome, Error> {
        let layout = QueueLayout::new(0, 4, 4096).unwrap();
        let mem = Arc::new(SharedMemory::new(layout.end).unwrap());
        let queue = SplitQueue::new(mem, layout, false);
        let mut dev = DeviceSide::new(&queue);
        let handle = QueueHandle {
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let plan = Plan {
            read_pct: 100,
            random: true,
            permute: true,
            start: 0,
            blocks: 256,
            block_len: 4096,
            iodepth: 4,
            io_limit: Some(64),
            runtime: None,
            seed: 1,
            verify_pass: false,
            verify_fatal: false,
            cpu: None,
        };
        let stop = AtomicBool::new(false);
        let env = Env {
            stop: &stop,
            table: None,
            wait: WaitMode::Poll,
        };
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let Some((head, _)) = dev.pop() else {
                        std::thread::yield_now();
                        continue;
                    };
                    dev.set_status(head, 0);
                    match misbehave(n, head, 4096) {
                        Some((entries, advance)) => dev.push_used(&entries, advance),
                        None => dev.push_used(&[(u32::from(head), 4097)], 1),
                    }
                    n += 1;
                }
            });
            let r = run(
                handle,
                &plan,
                &env,
                &Progress::default(),
                &std::sync::Barrier::new(1),
            );
            done.store(true, Ordering::Relaxed);
            r
        })
    }

    fn protocol_error(r: Result<Outcome, Error>) -> String {
        match r {
            Err(Error::DeviceProtocol(m)) => m,
            Err(e) => panic!("expected a protocol error, got {e}"),
            Ok(_) => panic!("expected a protocol error, got success"),
        }
    }

    #[test]
    fn well_behaved_device_completes_every_request() {
        let o = run_against(|_, _, _| None).unwrap();
        assert_eq!((o.ios, o.bytes), ([64, 0], [64 * 4096, 0]));
        assert_eq!(o.io_errors, 0);
    }

    #[test]
    fn used_id_that_is_not_a_chain_head_is_rejected() {
        let m = protocol_error(run_against(|n, head, _| {
            (n == 10).then(|| (vec![(u32::from(head) + 1, 1)], 1))
        }));
        assert!(m.contains("not a request in flight"), "{m}");
    }

    #[test]
    fn used_id_out_of_range_is_rejected() {
        protocol_error(run_against(|n, _, _| {
            (n == 3).then(|| (vec![(u32::MAX, 1)], 1))
        }));
    }

    #[test]
    fn completing_a_request_twice_is_rejected() {
        // Both entries are published together, so the slot cannot be reused in between.
        let m = protocol_error(run_against(|n, head, _| {
            (n == 5).then(|| (vec![(u32::from(head), 1), (u32::from(head), 1)], 2))
        }));
        assert!(m.contains("in flight"), "{m}");
    }

    #[test]
    fn used_len_beyond_the_buffers_is_rejected() {
        let m = protocol_error(run_against(|n, head, bs| {
            (n == 7).then(|| (vec![(u32::from(head), bs + 2)], 1))
        }));
        assert!(m.contains("exceeds"), "{m}");
    }

    #[test]
    fn used_idx_jumping_past_the_requests_in_flight_is_rejected() {
        let m = protocol_error(run_against(|n, head, _| {
            (n == 2).then(|| (vec![(u32::from(head), 1)], 100))
        }));
        assert!(m.contains("in flight"), "{m}");
    }

    #[test]
    fn permutation_yields_every_block_once_per_pass() {
        for n in [1u64, 2, 3, 7, 8, 1000, 4096, 5000] {
            let mut p = Permutation::new(n, 0x1234 + n);
            for _pass in 0..2 {
                let mut seen = vec![false; usize::try_from(n).unwrap()];
                for _ in 0..n {
                    let b = usize::try_from(p.next()).unwrap();
                    assert!(!seen[b], "n={n}: block {b} twice in one pass");
                    seen[b] = true;
                }
                assert!(seen.iter().all(|s| *s));
            }
        }
    }

    #[test]
    fn permutation_is_not_sequential() {
        let mut p = Permutation::new(1 << 16, 7);
        let first: Vec<u64> = (0..8).map(|_| p.next()).collect();
        assert!(
            first.windows(2).filter(|w| w[1] == w[0] + 1).count() < 2,
            "{first:?}"
        );
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = Rng(1);
        assert!((0..10_000).all(|_| r.below(3) < 3));
    }
}
