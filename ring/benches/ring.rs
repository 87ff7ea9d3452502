//! Hot paths of the ring engine: an op's round trip through io_uring, callbacks posted across
//! threads, mute/unmute, and the in-flight counter.
//!
//! Run pinned (see BENCHMARKS.md, `## ring`):
//!
//! ```text
//! taskset -c 0 cargo bench -p ringblk-ring --bench ring
//! ```
//!
//! The bench thread stays where `taskset` put it. Benches with an I/O thread pin that thread
//! themselves and say where in their name: `same_cpu` (CPU 0, beside the bench thread, so each
//! hand-over is a context switch) or `cross_cpu` (CPU 1, so each hand-over to a sleeping thread
//! is a cross-CPU wake-up, unless the I/O thread is still busy-polling: `pollmax50us`). Benches
//! on CPU 1 are skipped where the thread cannot be pinned there.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringblk_ring::{Context, Group, InFlight, IoThread, Op, Wait};

const NOP_BATCH: u32 = 32;
const DEFER_BATCH: u64 = 1000;
/// The poll maximum of the `pollmax50us` I/O thread variants; the context adapts its busy-poll
/// window between zero and this (doubling from 4 us while events come within it).
const POLL_MAX: Duration = Duration::from_micros(50);

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .without_plots()
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Pins the calling thread to `cpu`; false if the machine does not let it run there.
fn pin_current_thread(cpu: usize) -> bool {
    // SAFETY: cpu_set_t is a plain bit array for which all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    assert!(
        cpu < 8 * size_of::<libc::cpu_set_t>(),
        "CPU {cpu} beyond cpu_set_t"
    );
    // SAFETY: `cpu` indexes a bit inside `set` (asserted above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live local of the size passed; pid 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) == 0 }
}

/// An I/O thread pinned to `cpu`, or None (with a note) where that CPU is not available.
fn iothread_on(cpu: usize, poll_max: Duration) -> Option<IoThread> {
    let thread = IoThread::spawn("bench-iot", poll_max).expect("iothread");
    if thread.remote().call(move || pin_current_thread(cpu)) == Some(true) {
        Some(thread)
    } else {
        eprintln!("skipping: cannot pin an I/O thread to CPU {cpu}");
        None
    }
}

/// The placements of the I/O thread that the cross-thread benches run with.
fn placements() -> [(&'static str, usize, Duration); 3] {
    [
        ("same_cpu", 0, Duration::ZERO),
        ("cross_cpu", 1, Duration::ZERO),
        ("cross_cpu_pollmax50us", 1, POLL_MAX),
    ]
}

/// A context on the bench thread for the duration of `f`.
fn with_context(f: impl FnOnce(&Context)) {
    let ctx = Context::new(256).expect("io_uring_setup");
    f(&ctx);
    ctx.shutdown();
}

fn nop(c: &mut Criterion) {
    with_context(|ctx| {
        let mut group = c.benchmark_group("nop");
        let completed = Rc::new(Cell::new(0u32));

        group.bench_function("round_trip", |b| {
            b.iter(|| {
                completed.set(0);
                let done = completed.clone();
                let submitted = ctx.submit(Op::Nop, move |_, result| {
                    result.expect("nop");
                    done.set(done.get() + 1);
                });
                assert!(submitted.is_ok(), "nop not queued");
                while completed.get() == 0 {
                    ctx.turn(Wait::Forever);
                }
            });
        });

        group.throughput(Throughput::Elements(u64::from(NOP_BATCH)));
        group.bench_function("batch32", |b| {
            b.iter(|| {
                completed.set(0);
                for _ in 0..NOP_BATCH {
                    let done = completed.clone();
                    let submitted = ctx.submit(Op::Nop, move |_, result| {
                        result.expect("nop");
                        done.set(done.get() + 1);
                    });
                    assert!(submitted.is_ok(), "nop not queued");
                }
                while completed.get() < NOP_BATCH {
                    ctx.turn(Wait::Forever);
                }
            });
        });

        group.throughput(Throughput::Elements(1));
        group.bench_function("idle_turn", |b| b.iter(|| ctx.turn(Wait::No)));
        group.finish();
    });
}

fn remote(c: &mut Criterion) {
    let mut group = c.benchmark_group("remote");
    for (placement, cpu, poll_max) in placements() {
        let Some(thread) = iothread_on(cpu, poll_max) else {
            continue;
        };
        let remote = thread.remote().clone();
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("call_round_trip/{placement}"), |b| {
            b.iter(|| remote.call(|| ()).expect("iothread stopped"));
        });
        // One-way posts; each sample ends with a call, so every post counted has also run.
        group.throughput(Throughput::Elements(DEFER_BATCH));
        group.bench_function(format!("defer_x1000/{placement}"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..DEFER_BATCH {
                        remote.defer(|| ());
                    }
                }
                remote.call(|| ()).expect("iothread stopped");
                start.elapsed()
            });
        });
    }
    group.finish();
}

fn mute(c: &mut Criterion) {
    let mut group = c.benchmark_group("mute");
    let efd = eventfd();
    let fd = efd.as_raw_fd();

    with_context(|ctx| {
        let device = Group::new();
        ctx.add_source(device, fd, || {});
        ctx.turn(Wait::No); // submits the source's poll
        // The unmute's self-kick runs at the next turn; run that turn inside the iteration so
        // deferred kicks do not pile up. It costs one eventfd read (the source is drained).
        group.bench_function("local_mute_unmute_turn", |b| {
            b.iter(|| {
                ctx.mute(device);
                ctx.unmute(device);
                ctx.turn(Wait::No);
            });
        });
    });

    for (placement, cpu, poll_max) in placements() {
        let Some(thread) = iothread_on(cpu, poll_max) else {
            continue;
        };
        let remote = thread.remote().clone();
        let device = Group::new();
        remote
            .call(move || {
                Context::current().add_source(device, fd, || {});
            })
            .expect("iothread stopped");
        // mute waits for the I/O thread's acknowledgement; unmute is posted (one way).
        group.bench_function(format!("remote_mute_unmute/{placement}"), |b| {
            b.iter(|| {
                remote.mute(device);
                remote.unmute(device);
            });
        });
        drop(thread);
    }
    group.finish();
    drop(efd);
}

fn in_flight(c: &mut Criterion) {
    let counter = InFlight::new();
    c.bench_function("in_flight/inc_dec", |b| {
        b.iter(|| {
            counter.inc();
            std::hint::black_box(counter.dec())
        });
    });
}

criterion_group! {
    name = benches;
    config = config();
    targets = nop, remote, mute, in_flight
}
criterion_main!(benches);
