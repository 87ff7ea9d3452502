//! The mirror's completion and its copy loop, on null-co nodes.
//!
//! - `switch/{local,iothread}/N`: from `complete()` on a READY job to BLOCK_JOB_COMPLETED:
//!   mute (the device's ring is this context, or an I/O thread that must acknowledge), drain with
//!   N guest writes in flight (each dirtying a chunk the final sync then copies), flush, the
//!   deferred pivot, unmute. Job creation and the first copy are outside the measurement.
//! - `copy/64MiB`: a full background copy of a 64 MiB null source to a null target (creation
//!   to READY), as throughput.
//!
//! Run: `cargo bench -p ringblk-mirror --bench switch`.

use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::{BackendHandle, MuteTarget, Node, Request};
use ringblk_mirror::{JobEvent, Mirror, MirrorOptions};
use ringblk_ring::buf::OwnedBuf;
use ringblk_ring::{Context, Group, IoThread, Remote, Wait};

fn null(name: &str, size: u64) -> Node {
    let options = NullOptions {
        size,
        ..NullOptions::default()
    };
    Node::new(name, NullCo::new(options))
}

fn run_until_event(ctx: &Context, rx: &Receiver<JobEvent>, want: fn(&JobEvent) -> bool) {
    loop {
        if rx.try_iter().any(|e| want(&e)) {
            return;
        }
        ctx.turn(Wait::For(Duration::from_millis(1)));
    }
}

/// One READY job over null nodes with a device muted on `ring`; returns the time from
/// `complete()` to BLOCK_JOB_COMPLETED with `in_flight` guest writes outstanding.
fn one_switch(ctx: &Context, ring: &Remote, in_flight: u64) -> Duration {
    const SIZE: u64 = 16 << 20;
    let (source, target) = (null("source", SIZE), null("target", SIZE));
    let handle = BackendHandle::new(&source);
    handle.add_mute_target(MuteTarget {
        group: Group::new(),
        rings: vec![ring.clone()],
    });
    let (tx, rx) = channel();
    let mirror = Mirror::create(
        &source,
        &target,
        MirrorOptions::new("bench"),
        Some(Box::new(move |e| {
            let _ = tx.send(e);
        })),
    )
    .unwrap();
    mirror.start().unwrap();
    run_until_event(ctx, &rx, |e| matches!(e, JobEvent::Ready(_)));
    for i in 0..in_flight {
        let req = Request::Write {
            offset: i * (64 << 10),
            buf: Box::new(OwnedBuf::zeroed(4096)),
        };
        handle.submit(req, Box::new(|r, _| r.unwrap()));
    }
    let start = Instant::now();
    mirror.complete().unwrap();
    run_until_event(ctx, &rx, |e| matches!(e, JobEvent::Completed { .. }));
    let elapsed = start.elapsed();
    assert!(handle.root().same(&target));
    elapsed
}

fn switch(c: &mut Criterion) {
    let ctx = Context::new(256).unwrap();
    let iothread = IoThread::spawn("device", Duration::ZERO).unwrap();
    let mut group = c.benchmark_group("switch");
    group
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    for (name, ring) in [
        ("local", ctx.remote()),
        ("iothread", iothread.remote().clone()),
    ] {
        for in_flight in [0u64, 32] {
            group.bench_with_input(BenchmarkId::new(name, in_flight), &in_flight, |b, &n| {
                b.iter_custom(|iters| (0..iters).map(|_| one_switch(&ctx, &ring, n)).sum());
            });
        }
    }
    group.finish();

    const COPY: u64 = 64 << 20;
    let mut group = c.benchmark_group("copy");
    group
        .throughput(Throughput::Bytes(COPY))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    group.bench_function("64MiB", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (source, target) = (null("source", COPY), null("target", COPY));
                    let (tx, rx) = channel();
                    let start = Instant::now();
                    let mirror = Mirror::create(
                        &source,
                        &target,
                        MirrorOptions::new("copy"),
                        Some(Box::new(move |e| {
                            let _ = tx.send(e);
                        })),
                    )
                    .unwrap();
                    mirror.start().unwrap();
                    run_until_event(&ctx, &rx, |e| matches!(e, JobEvent::Ready(_)));
                    let elapsed = start.elapsed();
                    mirror.cancel(true).unwrap();
                    run_until_event(&ctx, &rx, |e| matches!(e, JobEvent::Cancelled(_)));
                    elapsed
                })
                .sum()
        });
    });
    group.finish();
    drop(iothread);
    ctx.shutdown();
}

criterion_group!(benches, switch);
criterion_main!(benches);
