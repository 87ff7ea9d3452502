//! Randomized stress: a guest device on an I/O thread keeps generation-stamped 4k writes in
//! flight while mirror after mirror runs on the main context (source -> target, then that
//! target -> a new one, ...), each completed at a random moment after READY. After every pivot
//! the guest is stopped and every block must read back, through the handle, the latest
//! generation the guest saw acknowledged.
//!
//! At random iterations the job's test hook also injects a guest write into the window between
//! the final copy and the pivot. With the mute disabled and parked requests resuming at the
//! node they parked at (the protections that window has, both switched off by test-only
//! switches), the same loop must report a lost write: the check is shown to catch what they
//! prevent.
//!
//! `RINGBLK_STRESS_ITERATIONS` sets the number of mirrors (default 200), `RINGBLK_STRESS_SEED`
//! replays a run; the seed is printed (and shown by the test harness on failure).

// Test disks are a few MiB: every index and offset fits every integer type used here.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use ringblk_blkgraph::BackendHandle;
use ringblk_mirror::{CopyMode, JobEvent, Mirror, MirrorOptions};
use ringblk_ring::{Context, IoThread, Wait};

const BLOCKS: u64 = 256; // 1 MiB
const QUEUE_DEPTH: u64 = 16;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn seed() -> u64 {
    env_u64("RINGBLK_STRESS_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    })
}

struct Report {
    completions: u64,
    /// Guest writes acknowledged over the run.
    writes: u64,
    /// From `complete()` to BLOCK_JOB_COMPLETED, per mirror without an injected write.
    pivots: Vec<Duration>,
    injected: u64,
    /// The first iteration whose check found lost writes, with them.
    lost: Option<(u64, Vec<Lost>)>,
}

/// Waits for READY; a background mirror that cannot converge under the writer switches to
/// write-blocking (which always converges).
fn wait_ready(ctx: &Context, events: &mut Events, mirror: &Mirror, seed: u64) {
    let switch_at = Instant::now() + Duration::from_millis(100);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        events.run_for(ctx, Duration::ZERO);
        if events.seen.iter().any(|e| matches!(e, JobEvent::Ready(_))) {
            return;
        }
        assert!(Instant::now() < deadline, "seed {seed}: never READY");
        if Instant::now() > switch_at {
            mirror.change_copy_mode(CopyMode::WriteBlocking).unwrap();
        }
        ctx.turn(Wait::For(Duration::from_millis(1)));
    }
}

/// `protected: false` switches off the mute and the handle's parking (see the module doc).
fn stress(iterations: u64, protected: bool, seed: u64) -> Report {
    eprintln!("stress seed = {seed} (RINGBLK_STRESS_SEED to replay), protected = {protected}");
    let iothread = IoThread::spawn("guest", Duration::ZERO).unwrap();
    let ring = iothread.remote().clone();
    let report = on_context(move |ctx| {
        let mut rng = XorShift::new(seed);
        let mut current_file = stamped_image(BLOCKS);
        let mut current = file_node("disk-0", &current_file);
        let handle = BackendHandle::new(&current);
        let device = Device::attach(&handle, ring, BLOCKS, seed ^ 0x5eed);
        handle.set_mute_enabled_for_test(protected);
        handle.set_park_at_node_for_test(!protected);
        // Holes on the source race the copy loop's block status as writes race its reads.
        device.punch_holes(4);
        device.start_writer(QUEUE_DEPTH, rng.below(2) * 20);
        let mut report = Report {
            completions: 0,
            writes: 0,
            pivots: Vec::new(),
            injected: 0,
            lost: None,
        };
        for i in 1..=iterations {
            let target_file = zero_image(BLOCKS * BLOCK);
            let target = file_node(&format!("disk-{i}"), &target_file);
            let (tx, mut events) = Events::new();
            let options = MirrorOptions {
                granularity: BLOCK,
                buf_size: [BLOCK, 16 * BLOCK, 16 << 20][rng.below(3) as usize],
                copy_mode: if rng.below(4) == 0 {
                    CopyMode::WriteBlocking
                } else {
                    CopyMode::Background
                },
                target_is_zero: rng.below(2) == 0,
                ..MirrorOptions::new(format!("m{i}"))
            };
            let mirror = Mirror::create(&current, &target, options, Some(tx)).unwrap();
            mirror.start().unwrap();
            wait_ready(ctx, &mut events, &mirror, seed);
            // Complete at a random moment while the guest writes.
            events.run_for(ctx, Duration::from_micros(rng.below(2000)));
            let inject = rng.below(2) == 0;
            if inject {
                report.injected += 1;
                let d = device.clone();
                mirror.set_before_pivot_hook_for_test(move || {
                    let before = d.dispatched();
                    d.write(None);
                    // Give the device's thread the chance to dispatch it inside the window
                    // (it will unless muted; unprotected, its write then parks at the filter).
                    let until = Instant::now() + Duration::from_millis(2);
                    while d.dispatched() == before && Instant::now() < until {
                        std::hint::spin_loop();
                    }
                });
            }
            let started = Instant::now();
            mirror.complete().unwrap();
            let error = events.wait_completed(ctx);
            if !inject {
                // (An injected write makes the hook wait up to 2 ms: not a pivot cost.)
                report.pivots.push(started.elapsed());
            }
            assert_eq!(error, None, "seed {seed}, iteration {i}");
            assert!(handle.root().same(&target), "seed {seed}: pivoted");
            report.completions += 1;

            device.stop_writer();
            device.settle(ctx);
            let lost = device.lost_writes(ctx);
            if !lost.is_empty() {
                report.lost = Some((i, lost));
                break;
            }
            device.start_writer(QUEUE_DEPTH, rng.below(2) * 20);
            current = target;
            current_file = target_file;
        }
        device.stop_writer();
        device.settle(ctx);
        report.writes = device.state.acked.load(std::sync::atomic::Ordering::SeqCst);
        drop(current_file);
        report
    });
    drop(iothread);
    report
}

#[test]
fn every_acknowledged_write_survives_hundreds_of_pivots_under_load() {
    let seed = seed();
    let iterations = env_u64("RINGBLK_STRESS_ITERATIONS").unwrap_or(200);
    let started = Instant::now();
    let report = stress(iterations, true, seed);
    if let Some((i, lost)) = &report.lost {
        panic!("seed {seed}: lost writes after mirror {i}: {lost:?}");
    }
    assert_eq!(report.completions, iterations);
    assert!(
        report.injected > 0,
        "seed {seed}: some writes were put in the window"
    );
    let elapsed = started.elapsed();
    let mut pivots = report.pivots.clone();
    pivots.sort();
    let at = |q: f64| pivots[((pivots.len() - 1) as f64 * q) as usize];
    eprintln!(
        "pivot (complete -> COMPLETED, debug build, guest writing): p50 {:?}, p90 {:?}, max {:?}",
        at(0.5),
        at(0.9),
        at(1.0)
    );
    eprintln!(
        "{} mirrors completed in {elapsed:?}; {} guest writes ({:.0}/s), {} injected into the \
         window",
        report.completions,
        report.writes,
        report.writes as f64 / elapsed.as_secs_f64(),
        report.injected
    );
}

#[test]
fn without_mute_or_handle_parking_the_same_stress_reports_lost_writes() {
    let seed = seed();
    let report = stress(40, false, seed);
    let Some((i, lost)) = report.lost else {
        panic!(
            "seed {seed}: {} unprotected mirrors and no lost write detected",
            report.completions
        );
    };
    eprintln!("unprotected: lost {lost:?} after mirror {i}");
}
