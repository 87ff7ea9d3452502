//! A failing mirror never hurts the guest (design invariant 6): the fault matrix.
//!
//! Every way a job can end badly — an error at creation; a copy read or write failing under each
//! `on-source-error`/`on-target-error` policy; a target out of space or failing with EIO, in both
//! copy modes, while copying and during the final sync; `cancel` in every state — runs while a
//! guest device on an I/O thread keeps writing (generation-stamped 4k blocks, 8 in flight), on
//! images opened with O_DIRECT on the disk the tests run from (the work tree: ext4 or xfs, as
//! users run it, not tmpfs). A
//! guest write that fails panics the device's thread (so a target failure that reaches the
//! guest fails the test). After the job's end event each case asserts that:
//! - the device completes new requests within 1 s (nothing left muted, drained or parked);
//! - no node is drained and the device's group is not muted on its ring;
//! - the device's root is the source (or the target, for a successful pivot);
//! - every acknowledged write reads back through the device.

// Test disks are a few MiB: every index and offset fits every integer type used here.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ringblk_blkgraph::testing::{FaultNode, Faults};
use ringblk_blkgraph::{BackendHandle, Node};
use ringblk_mirror::{CopyMode, JobEvent, JobStatus, Mirror, MirrorOptions, OnError};
use ringblk_ring::{Context, IoThread, Remote};

const BLOCKS: u64 = 256;
const WRITER_DEPTH: u64 = 8;

/// How long after the job's end the guest must have completed new requests.
const SERVED_WITHIN: Duration = Duration::from_secs(1);

struct Run {
    source_node: Node,
    target_node: Node,
    handle: BackendHandle,
    device: Device,
    events: Events,
    mirror: Mirror,
    source_faults: Arc<Faults>,
    target_faults: Arc<Faults>,
    _files: (tempfile::NamedTempFile, tempfile::NamedTempFile),
}

/// A stamped source and a zero target, each behind a fault node; a writing device on `ring`
/// attached to the source; a started job with `options`.
fn start(ctx: &Context, ring: Remote, options: MirrorOptions) -> Run {
    let on_disk = env!("CARGO_TARGET_TMPDIR");
    let source_file = image_in(on_disk, BLOCKS * BLOCK, |b| stamp(b, 0));
    let target_file = image_in(on_disk, BLOCKS * BLOCK, |_| Vec::new());
    let faulty = |name: &str, file: &tempfile::NamedTempFile| {
        let file = file_node_with(&format!("{name}-file"), file, true);
        let (fault, switches) = FaultNode::new(file);
        (Node::new(name, fault), switches)
    };
    let (source_node, source_faults) = faulty("source", &source_file);
    let (target_node, target_faults) = faulty("target", &target_file);
    let handle = BackendHandle::new(&source_node);
    let device = Device::attach(&handle, ring, BLOCKS, 11);
    device.start_writer(WRITER_DEPTH, 0);
    let (tx, events) = Events::new();
    let mirror = Mirror::create(&source_node, &target_node, options, Some(tx)).unwrap();
    mirror.start().unwrap();
    let _ = ctx;
    Run {
        source_node,
        target_node,
        handle,
        device,
        events,
        mirror,
        source_faults,
        target_faults,
        _files: (source_file, target_file),
    }
}

fn options(mode: CopyMode) -> MirrorOptions {
    MirrorOptions {
        granularity: BLOCK,
        buf_size: 8 * BLOCK,
        copy_mode: mode,
        ..MirrorOptions::new("m")
    }
}

/// Runs the main context until the job has ended (BLOCK_JOB_COMPLETED or _CANCELLED); returns
/// the completion's error (None for a cancel).
fn wait_end(ctx: &Context, run: &mut Run) -> Option<String> {
    let end = run.events.wait(ctx, "the job's end", |e| {
        matches!(e, JobEvent::Completed { .. } | JobEvent::Cancelled(_))
    });
    match end {
        JobEvent::Completed { error, .. } => error,
        _ => None,
    }
}

/// The guest is served: new requests complete within [`SERVED_WITHIN`] (the main context keeps
/// running meanwhile), nothing is drained or muted.
fn assert_guest_served(ctx: &Context, run: &mut Run, what: &str) {
    let acked = || {
        run.device
            .state
            .acked
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = acked();
    let deadline = Instant::now() + SERVED_WITHIN;
    while acked() < before + 2 * WRITER_DEPTH {
        assert!(
            Instant::now() < deadline,
            "{what}: the guest completed {} requests in {SERVED_WITHIN:?}",
            acked() - before
        );
        ctx.turn(ringblk_ring::Wait::For(Duration::from_millis(1)));
    }
    for node in [&run.source_node, &run.target_node] {
        assert_eq!(node.quiesce_counter(), 0, "{what}: {node:?} left drained");
    }
    let group = run.device.group;
    let muted = run
        .device
        .ring
        .call(move || Context::current().is_muted(group));
    assert_eq!(muted, Some(false), "{what}: the device left muted");
}

/// Stops the writer, waits for its requests and checks every acknowledged write reads back
/// through the device, which is on `root`.
fn assert_nothing_lost(ctx: &Context, run: &mut Run, root: &Node, what: &str) {
    assert!(
        run.handle.root().same(root),
        "{what}: the device is on {root:?}"
    );
    run.device.stop_writer();
    run.device.settle(ctx);
    Faults::set(&run.source_faults.fail_reads, false);
    assert!(
        run.device.lost_writes(ctx).is_empty(),
        "{what}: acknowledged writes lost"
    );
}

/// Which node the device must be on after the job's end.
#[derive(Clone, Copy)]
enum Root {
    Source,
    Target,
}

/// After the job's end: the guest is served, and nothing acknowledged is lost on `root`.
fn assert_served_and_intact(ctx: &Context, run: &mut Run, root: Root, what: &str) {
    assert_guest_served(ctx, run, what);
    let root = match root {
        Root::Source => run.source_node.clone(),
        Root::Target => run.target_node.clone(),
    };
    assert_nothing_lost(ctx, run, &root, what);
}

/// Runs `case` on a fresh main context with the device on an I/O thread.
fn with_device_on_iothread(case: impl FnOnce(&Context, Remote) + Send + 'static) {
    let iothread = IoThread::spawn("guest", Duration::ZERO).unwrap();
    let ring = iothread.remote().clone();
    on_context(move |ctx| case(ctx, ring));
    drop(iothread);
}

const MODES: [CopyMode; 2] = [CopyMode::Background, CopyMode::WriteBlocking];

#[test]
fn creation_that_fails_leaves_the_guest_served() {
    with_device_on_iothread(|ctx, ring| {
        let source_file = stamped_image(BLOCKS);
        let source = file_node("source", &source_file);
        let small_file = zero_image(BLOCKS * BLOCK / 2);
        let small = file_node("small", &small_file);
        let handle = BackendHandle::new(&source);
        let device = Device::attach(&handle, ring, BLOCKS, 3);
        device.start_writer(WRITER_DEPTH, 0);
        let refused = Mirror::create(&source, &small, options(CopyMode::Background), None);
        assert!(refused.is_err(), "a target of another size is refused");
        let acked = || device.state.acked.load(std::sync::atomic::Ordering::SeqCst);
        let before = acked();
        let deadline = Instant::now() + SERVED_WITHIN;
        while acked() < before + 2 * WRITER_DEPTH {
            assert!(Instant::now() < deadline, "the guest stalled");
            ctx.turn(ringblk_ring::Wait::For(Duration::from_millis(1)));
        }
        assert_eq!(source.quiesce_counter(), 0);
        assert!(handle.root().same(&source));
        device.stop_writer();
        device.settle(ctx);
        assert!(device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn target_errors_with_report_fail_the_job_never_the_guest() {
    for mode in MODES {
        for no_space in [false, true] {
            with_device_on_iothread(move |ctx, ring| {
                let what = format!("{mode:?}, ENOSPC {no_space}");
                let mut run = start(ctx, ring, options(mode));
                Faults::set(&run.target_faults.no_space, no_space);
                Faults::set(&run.target_faults.fail_writes, true);
                let error = wait_end(ctx, &mut run);
                assert!(error.is_some(), "{what}: the job reports the error");
                assert_served_and_intact(ctx, &mut run, Root::Source, &what);
            });
        }
    }
}

#[test]
fn source_read_errors_with_report_fail_the_job_never_the_guest() {
    for mode in MODES {
        with_device_on_iothread(move |ctx, ring| {
            let what = format!("{mode:?}");
            let mut run = start(ctx, ring, options(mode));
            Faults::set(&run.source_faults.fail_reads, true);
            let error = wait_end(ctx, &mut run);
            assert!(error.is_some(), "{what}: the job reports the error");
            assert_served_and_intact(ctx, &mut run, Root::Source, &what);
        });
    }
}

#[test]
fn target_out_of_space_with_enospc_pauses_the_job_and_the_guest_keeps_writing() {
    for mode in MODES {
        with_device_on_iothread(move |ctx, ring| {
            let what = format!("{mode:?}");
            let mut run = start(
                ctx,
                ring,
                MirrorOptions {
                    on_target_error: OnError::Enospc,
                    ..options(mode)
                },
            );
            Faults::set(&run.target_faults.no_space, true);
            Faults::set(&run.target_faults.fail_writes, true);
            run.events.wait_status(ctx, JobStatus::Paused);
            assert_eq!(
                run.mirror.query().io_status,
                ringblk_mirror::IoStatus::Nospace
            );
            assert_guest_served(ctx, &mut run, &format!("{what}, paused"));
            // The volume was extended: resume, finish and pivot.
            Faults::set(&run.target_faults.fail_writes, false);
            run.mirror.resume().unwrap();
            run.events.wait_ready(ctx);
            run.mirror.complete().unwrap();
            assert_eq!(wait_end(ctx, &mut run), None, "{what}");
            assert_served_and_intact(ctx, &mut run, Root::Target, &what);
        });
    }
}

#[test]
fn target_errors_with_ignore_retry_while_the_guest_writes_then_pivot() {
    for mode in MODES {
        with_device_on_iothread(move |ctx, ring| {
            let what = format!("{mode:?}");
            let mut run = start(
                ctx,
                ring,
                MirrorOptions {
                    on_target_error: OnError::Ignore,
                    ..options(mode)
                },
            );
            Faults::set(&run.target_faults.fail_writes, true);
            run.events.wait(ctx, "BLOCK_JOB_ERROR", |e| {
                matches!(e, JobEvent::Error { .. })
            });
            assert_guest_served(ctx, &mut run, &format!("{what}, failing"));
            Faults::set(&run.target_faults.fail_writes, false);
            run.events.wait_ready(ctx);
            run.mirror.complete().unwrap();
            assert_eq!(wait_end(ctx, &mut run), None, "{what}");
            assert_served_and_intact(ctx, &mut run, Root::Target, &what);
        });
    }
}

#[test]
fn target_errors_with_stop_pause_then_cancel_leaves_the_guest_on_the_source() {
    for mode in MODES {
        with_device_on_iothread(move |ctx, ring| {
            let what = format!("{mode:?}");
            let mut run = start(
                ctx,
                ring,
                MirrorOptions {
                    on_target_error: OnError::Stop,
                    ..options(mode)
                },
            );
            Faults::set(&run.target_faults.fail_writes, true);
            run.events.wait_status(ctx, JobStatus::Paused);
            assert_guest_served(ctx, &mut run, &format!("{what}, paused"));
            run.mirror.cancel(false).unwrap();
            wait_end(ctx, &mut run);
            assert_served_and_intact(ctx, &mut run, Root::Source, &what);
        });
    }
}

#[test]
fn a_target_failing_during_the_final_sync_fails_the_job_and_the_guest_stays_on_the_source() {
    for mode in MODES {
        with_device_on_iothread(move |ctx, ring| {
            let what = format!("{mode:?}");
            let mut run = start(ctx, ring, options(mode));
            run.events.wait_ready(ctx);
            // The flush of the final sync fails too: every write-type request does.
            Faults::set(&run.target_faults.fail_writes, true);
            run.mirror.complete().unwrap();
            let error = wait_end(ctx, &mut run);
            assert!(error.is_some(), "{what}: the job reports the error");
            assert_served_and_intact(ctx, &mut run, Root::Source, &what);
        });
    }
}

/// Where a cancel is sent.
#[derive(Clone, Copy, Debug)]
enum CancelIn {
    Running,
    Paused,
    Ready,
    Standby,
    Pending,
}

#[test]
fn cancel_in_every_state_leaves_the_guest_served() {
    use CancelIn::*;
    for mode in MODES {
        for state in [Running, Paused, Ready, Standby, Pending] {
            with_device_on_iothread(move |ctx, ring| {
                let what = format!("{mode:?}, cancel while {state:?}");
                let opts = MirrorOptions {
                    // Slow enough to still be running when cancelled.
                    speed: if matches!(state, Running | Paused) {
                        64 * BLOCK
                    } else {
                        0
                    },
                    auto_finalize: !matches!(state, Pending),
                    ..options(mode)
                };
                let mut run = start(ctx, ring, opts);
                match state {
                    Running => run.events.wait_status(ctx, JobStatus::Running),
                    Paused => {
                        run.mirror.pause().unwrap();
                        run.events.wait_status(ctx, JobStatus::Paused);
                    }
                    Ready => run.events.wait_ready(ctx),
                    Standby => {
                        run.events.wait_ready(ctx);
                        run.mirror.pause().unwrap();
                        run.events.wait_status(ctx, JobStatus::Standby);
                    }
                    Pending => {
                        run.events.wait_ready(ctx);
                        run.mirror.complete().unwrap();
                        run.events.wait_status(ctx, JobStatus::Pending);
                    }
                }
                run.mirror.cancel(false).unwrap();
                wait_end(ctx, &mut run);
                assert_served_and_intact(ctx, &mut run, Root::Source, &what);
            });
        }
    }
}
