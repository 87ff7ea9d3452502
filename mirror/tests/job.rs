//! The job's behaviour: error policies, cancel in every state, zero-aware copy, write-blocking
//! mode, the speed limit, pause/resume, manual finalize/dismiss, refused commands. Real files,
//! a real ring context, the model device on the main context.

// Test disks are a few MiB: every index and offset fits every integer type used here.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ringblk_blkgraph::testing::{FaultNode, Faults};
use ringblk_blkgraph::{BackendHandle, Node};
use ringblk_mirror::{
    CopyMode, ErrorAction, IoOperation, IoStatus, JobEvent, JobStatus, Mirror, MirrorError,
    MirrorOptions, OnError,
};
use ringblk_ring::Context;

const BLOCKS: u64 = 64;

struct Setup {
    source_file: tempfile::NamedTempFile,
    target_file: tempfile::NamedTempFile,
    source: Node,
    target: Node,
    handle: BackendHandle,
    device: Device,
    events: Events,
    mirror: Mirror,
}

/// A stamped source of `blocks`, a target file made by `target_file`, the target node wrapped
/// by `wrap`, a device on the source, and a created (not started) job.
fn setup(
    ctx: &Context,
    blocks: u64,
    target_file: tempfile::NamedTempFile,
    wrap: impl FnOnce(Node) -> Node,
    options: MirrorOptions,
) -> Setup {
    let source_file = stamped_image(blocks);
    let source = file_node("source", &source_file);
    let target = wrap(file_node("target", &target_file));
    let handle = BackendHandle::new(&source);
    let device = Device::attach(&handle, ctx.remote(), blocks, 7);
    let (tx, events) = Events::new();
    let mirror = Mirror::create(&source, &target, options, Some(tx)).unwrap();
    Setup {
        source_file,
        target_file,
        source,
        target,
        handle,
        device,
        events,
        mirror,
    }
}

fn options(id: &str) -> MirrorOptions {
    MirrorOptions {
        granularity: BLOCK,
        ..MirrorOptions::new(id)
    }
}

fn plain(ctx: &Context, options: MirrorOptions) -> Setup {
    setup(ctx, BLOCKS, zero_image(BLOCKS * BLOCK), |n| n, options)
}

fn faulty_target(ctx: &Context, options: MirrorOptions) -> (Setup, Arc<Faults>) {
    let mut faults = None;
    let s = setup(
        ctx,
        BLOCKS,
        zero_image(BLOCKS * BLOCK),
        |n| {
            let (f, switches) = FaultNode::new(n);
            faults = Some(switches);
            Node::new("faulty-target", f)
        },
        options,
    );
    (s, faults.unwrap())
}

fn error_events(events: &Events) -> Vec<(IoOperation, ErrorAction)> {
    events
        .seen
        .iter()
        .filter_map(|e| match e {
            JobEvent::Error {
                operation, action, ..
            } => Some((*operation, *action)),
            _ => None,
        })
        .collect()
}

/// The source and target files hold the same generation in every block.
fn assert_target_matches_source(s: &Setup, blocks: u64) {
    assert_eq!(
        file_generations(&s.target_file, blocks),
        file_generations(&s.source_file, blocks),
        "target is a consistent copy of the source"
    );
}

use JobStatus::*;

#[test]
fn complete_pivots_and_reports_qemus_event_sequence() {
    on_context(|ctx| {
        let mut s = plain(ctx, options("j"));
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        let info = s.mirror.query();
        assert_eq!((info.job_type, info.device.as_str()), ("mirror", "j"));
        assert!(info.ready && info.len == info.offset && info.offset == BLOCKS * BLOCK);
        s.device.write(Some(3));
        s.device.settle(ctx);
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.handle.root().same(&s.target));
        assert!(s.device.lost_writes(ctx).is_empty());
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Ready, Waiting, Pending, Concluded, Null]
        );
        let names = s.events.names();
        let at = |n| names.iter().position(|&x| x == n).unwrap();
        assert!(at("BLOCK_JOB_READY") < at("BLOCK_JOB_COMPLETED"));
        assert_eq!(names[names.len() - 3], "BLOCK_JOB_COMPLETED", "{names:?}");
    });
}

#[test]
fn target_write_error_with_report_fails_the_job_and_the_guest_keeps_the_source() {
    on_context(|ctx| {
        let (mut s, faults) = faulty_target(ctx, options("j"));
        Faults::set(&faults.fail_writes, true);
        s.mirror.start().unwrap();
        let error = s.events.wait_completed(ctx);
        assert_eq!(error.as_deref(), Some("Input/output error"));
        assert_eq!(
            error_events(&s.events),
            [(IoOperation::Write, ErrorAction::Report)]
        );
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Aborting, Concluded, Null]
        );
        assert!(s.handle.root().same(&s.source), "the filter is gone");
        s.device.write(Some(5));
        s.device.settle(ctx);
        assert!(s.device.lost_writes(ctx).is_empty(), "guest I/O unaffected");
        assert_eq!(file_generations(&s.source_file, BLOCKS)[5], Some(1));
    });
}

#[test]
fn target_write_error_with_stop_pauses_and_resume_finishes_cleanly() {
    on_context(|ctx| {
        let (mut s, faults) = faulty_target(
            ctx,
            MirrorOptions {
                on_target_error: OnError::Stop,
                ..options("j")
            },
        );
        Faults::set(&faults.fail_writes, true);
        s.mirror.start().unwrap();
        s.events.wait_status(ctx, Paused);
        let info = s.mirror.query();
        assert!(info.paused && info.io_status == IoStatus::Failed);
        assert!(error_events(&s.events).contains(&(IoOperation::Write, ErrorAction::Stop)));
        // The guest runs while the job is stopped.
        s.device.write(Some(9));
        s.device.settle(ctx);
        Faults::set(&faults.fail_writes, false);
        s.mirror.resume().unwrap();
        assert_eq!(s.mirror.query().io_status, IoStatus::Ok);
        s.events.wait_ready(ctx);
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.handle.root().same(&s.target));
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn target_write_error_with_ignore_retries_until_it_clears() {
    on_context(|ctx| {
        let (mut s, faults) = faulty_target(
            ctx,
            MirrorOptions {
                on_target_error: OnError::Ignore,
                ..options("j")
            },
        );
        Faults::set(&faults.fail_writes, true);
        s.mirror.start().unwrap();
        s.events.run_for(ctx, Duration::from_millis(50));
        assert_eq!(s.mirror.status(), Running, "not READY while chunks fail");
        let errors = error_events(&s.events);
        assert!(errors.len() >= 2, "retried: {errors:?}");
        assert!(
            errors
                .iter()
                .all(|&e| e == (IoOperation::Write, ErrorAction::Ignore))
        );
        Faults::set(&faults.fail_writes, false);
        s.events.wait_ready(ctx);
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn source_read_error_with_report_fails_the_job() {
    on_context(|ctx| {
        let source_file = stamped_image(BLOCKS);
        let (fault, faults) = FaultNode::new(file_node("source", &source_file));
        let source = Node::new("faulty-source", fault);
        let target_file = zero_image(BLOCKS * BLOCK);
        let target = file_node("target", &target_file);
        let handle = BackendHandle::new(&source);
        let (tx, mut events) = Events::new();
        Faults::set(&faults.fail_reads, true);
        let mirror = Mirror::create(&source, &target, options("j"), Some(tx)).unwrap();
        mirror.start().unwrap();
        assert!(events.wait_completed(ctx).is_some());
        assert_eq!(
            error_events(&events),
            [(IoOperation::Read, ErrorAction::Report)]
        );
        assert!(handle.root().same(&source));
    });
}

#[test]
fn cancel_while_created_concludes_silently_and_removes_the_filter() {
    on_context(|ctx| {
        let mut s = plain(ctx, options("j"));
        assert!(s.handle.root().same(s.mirror.filter()));
        s.mirror.cancel(false).unwrap();
        s.events.wait_status(ctx, Null);
        assert_eq!(s.events.statuses(), [Created, Aborting, Concluded, Null]);
        assert!(
            !s.events.names().contains(&"BLOCK_JOB_CANCELLED"),
            "a job that never started reports no cancel (as QEMU)"
        );
        assert!(s.handle.root().same(&s.source));
        s.device.write(Some(1));
        s.device.settle(ctx);
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn cancel_while_running_abandons_the_copy_and_keeps_the_source() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                speed: 64 << 10,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.run_for(ctx, Duration::from_millis(20));
        assert_eq!(s.mirror.status(), Running);
        s.mirror.cancel(false).unwrap();
        s.events
            .wait(ctx, "cancelled", |e| matches!(e, JobEvent::Cancelled(_)));
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Aborting, Concluded, Null]
        );
        assert!(s.handle.root().same(&s.source));
    });
}

#[test]
fn cancel_while_paused_resumes_on_its_way_out() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                speed: 64 << 10,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.mirror.pause().unwrap();
        s.events.wait_status(ctx, Paused);
        s.mirror.cancel(false).unwrap();
        s.events
            .wait(ctx, "cancelled", |e| matches!(e, JobEvent::Cancelled(_)));
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Paused, Running, Aborting, Concluded, Null]
        );
        assert!(s.handle.root().same(&s.source));
    });
}

#[test]
fn cancel_after_ready_completes_without_pivot_leaving_a_consistent_target() {
    on_context(|ctx| {
        let mut s = plain(ctx, options("j"));
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        for b in [2, 4, 8] {
            s.device.write(Some(b));
        }
        s.device.settle(ctx);
        s.mirror.cancel(false).unwrap();
        assert_eq!(
            s.events.wait_completed(ctx),
            None,
            "QEMU reports COMPLETED here"
        );
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Ready, Waiting, Pending, Concluded, Null]
        );
        assert!(s.handle.root().same(&s.source), "no pivot");
        assert_target_matches_source(&s, BLOCKS);
        assert_eq!(file_generations(&s.target_file, BLOCKS)[8], Some(3));
    });
}

#[test]
fn cancel_in_standby_also_syncs_the_target() {
    on_context(|ctx| {
        let mut s = plain(ctx, options("j"));
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.mirror.pause().unwrap();
        s.events.wait_status(ctx, Standby);
        s.device.write(Some(6));
        s.device.settle(ctx);
        s.mirror.cancel(false).unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.handle.root().same(&s.source));
        assert_target_matches_source(&s, BLOCKS);
    });
}

#[test]
fn force_cancel_after_ready_abandons_the_target() {
    on_context(|ctx| {
        let mut s = plain(ctx, options("j"));
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.mirror.cancel(true).unwrap();
        s.events
            .wait(ctx, "cancelled", |e| matches!(e, JobEvent::Cancelled(_)));
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Ready, Aborting, Concluded, Null]
        );
        assert!(s.handle.root().same(&s.source));
    });
}

#[test]
fn manual_finalize_keeps_mirroring_while_pending_and_manual_dismiss_ends_it() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                auto_finalize: false,
                auto_dismiss: false,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.mirror.complete().unwrap();
        s.events.wait_status(ctx, Pending);
        // Pending is not frozen: the guest writes, the job keeps the target in sync.
        for b in [1, 2, 3] {
            s.device.write(Some(b));
        }
        s.device.settle(ctx);
        s.events.run_for(ctx, Duration::from_millis(5));
        assert!(
            s.handle.root().same(s.mirror.filter()),
            "no pivot before finalize"
        );
        s.mirror.finalize().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert_eq!(s.mirror.status(), Concluded);
        assert!(s.handle.root().same(&s.target));
        s.mirror.dismiss().unwrap();
        assert_eq!(s.mirror.status(), Null);
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn cancel_while_pending_returns_to_the_source_and_reports_cancelled() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                auto_finalize: false,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.mirror.complete().unwrap();
        s.device.write(Some(10));
        s.device.settle(ctx);
        s.mirror.cancel(false).unwrap();
        s.events
            .wait(ctx, "cancelled", |e| matches!(e, JobEvent::Cancelled(_)));
        assert_eq!(
            s.events.statuses(),
            [
                Created, Running, Ready, Waiting, Pending, Aborting, Concluded, Null
            ]
        );
        assert!(s.handle.root().same(&s.source));
        assert_target_matches_source(&s, BLOCKS);
    });
}

#[test]
fn a_source_of_zeroes_is_copied_as_write_zeroes_and_stale_target_data_is_erased() {
    on_context(|ctx| {
        let source_file = zero_image(BLOCKS * BLOCK);
        let source = file_node("source", &source_file);
        let target_file = image(BLOCKS * BLOCK, |_| vec![0xab; BLOCK as usize]);
        let (target, counts) = Counting::over(file_node("target", &target_file));
        let (tx, mut events) = Events::new();
        let mirror = Mirror::create(&source, &target, options("j"), Some(tx)).unwrap();
        mirror.start().unwrap();
        events.wait_ready(ctx);
        assert_eq!(counts.writes.load(Ordering::SeqCst), 0, "no data writes");
        assert!(counts.write_zeroes.load(Ordering::SeqCst) > 0);
        mirror.cancel(false).unwrap();
        assert_eq!(events.wait_completed(ctx), None);
        let data = std::fs::read(target_file.path()).unwrap();
        assert!(
            data.iter().all(|&b| b == 0),
            "no stale byte survives a full copy"
        );
    });
}

#[test]
fn zero_chunks_are_not_written_at_all_to_a_target_known_to_be_zero() {
    on_context(|ctx| {
        let source_file = image(BLOCKS * BLOCK, |b| {
            if b % 2 == 0 {
                stamp(b, 0)
            } else {
                vec![0; BLOCK as usize]
            }
        });
        let source = file_node("source", &source_file);
        let target_file = zero_image(BLOCKS * BLOCK);
        let (target, counts) = Counting::over(file_node("target", &target_file));
        let (tx, mut events) = Events::new();
        let o = MirrorOptions {
            target_is_zero: true,
            ..options("j")
        };
        let mirror = Mirror::create(&source, &target, o, Some(tx)).unwrap();
        mirror.start().unwrap();
        events.wait_ready(ctx);
        assert_eq!(counts.write_zeroes.load(Ordering::SeqCst), 0);
        assert!(counts.writes.load(Ordering::SeqCst) > 0, "the data chunks");
        mirror.cancel(false).unwrap();
        events.wait_completed(ctx);
        assert_eq!(
            std::fs::read(target_file.path()).unwrap(),
            std::fs::read(source_file.path()).unwrap()
        );
    });
}

#[test]
fn holes_in_the_source_are_not_read_and_not_written_to_a_sparse_target() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    on_context(|ctx| {
        let data_blocks = [3, 17, 40, 41, 42, 43, BLOCKS - 1];
        let source_file = zero_image(BLOCKS * BLOCK);
        for b in data_blocks {
            source_file
                .as_file()
                .write_all_at(&stamp(b, 0), b * BLOCK)
                .unwrap();
        }
        let (source, source_counts) = Counting::over(file_node("source", &source_file));
        let target_file = zero_image(BLOCKS * BLOCK);
        let (target, target_counts) = Counting::over(file_node("target", &target_file));
        let (tx, mut events) = Events::new();
        // No `target_is_zero`: the target's block status says so.
        let mirror = Mirror::create(&source, &target, options("j"), Some(tx)).unwrap();
        mirror.start().unwrap();
        events.wait_ready(ctx);
        let data_bytes = data_blocks.len() as u64 * BLOCK;
        assert_eq!(
            source_counts.read_bytes.load(Ordering::SeqCst),
            data_bytes,
            "only the data is read"
        );
        assert_eq!(target_counts.write_zeroes.load(Ordering::SeqCst), 0);
        mirror.cancel(false).unwrap();
        assert_eq!(events.wait_completed(ctx), None);
        assert_eq!(
            std::fs::read(target_file.path()).unwrap(),
            std::fs::read(source_file.path()).unwrap()
        );
        let allocated = target_file.as_file().metadata().unwrap().blocks() * 512;
        assert!(
            allocated <= data_bytes,
            "the target stays sparse: {allocated} bytes allocated for {data_bytes} of data"
        );
    });
}

#[test]
fn in_write_blocking_mode_a_completed_guest_write_is_already_on_the_target() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                copy_mode: CopyMode::WriteBlocking,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.events.run_for(ctx, Duration::from_millis(2));
        assert!(s.mirror.query().actively_synced);
        for block in [9, 10, 11] {
            let w = s.device.write(Some(block));
            s.device.settle(ctx);
            assert_eq!(
                file_generations(&s.target_file, BLOCKS)[block as usize],
                Some(w.generation),
                "on the target file as soon as the guest saw it complete"
            );
        }
        let info = s.mirror.query();
        assert!(info.actively_synced && info.len == info.offset, "{info:?}");
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn write_blocking_writes_into_clean_chunks_leave_nothing_to_copy() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                copy_mode: CopyMode::WriteBlocking,
                // A 4 KiB write covers a quarter of a chunk.
                granularity: 4 * BLOCK,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.events.run_for(ctx, Duration::from_millis(2));
        let copied = s.mirror.query().offset;
        for block in [9, 21, 33, 34] {
            s.device.write(Some(block));
            s.device.settle(ctx);
        }
        s.events.run_for(ctx, Duration::from_millis(5));
        let info = s.mirror.query();
        assert_eq!(info.offset, copied, "no chunk was copied again: {info:?}");
        assert!(info.actively_synced && info.len == info.offset, "{info:?}");
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.device.lost_writes(ctx).is_empty());
        assert_target_matches_source(&s, BLOCKS);
    });
}

#[test]
fn a_write_blocking_write_overlapping_a_copy_leaves_its_chunk_dirty_for_another_copy() {
    on_context(|ctx| {
        let mut s = setup(
            ctx,
            BLOCKS,
            zero_image(BLOCKS * BLOCK),
            StallFirstWrite::over,
            MirrorOptions {
                copy_mode: CopyMode::WriteBlocking,
                // One copy in flight: the one whose write to the target is held back.
                buf_size: BLOCK,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let block = loop {
            if let Some(offset) = stalled_write_offset() {
                break offset / BLOCK;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no copy reached the target"
            );
            ctx.turn(ringblk_ring::Wait::For(Duration::from_millis(1)));
        };
        // The guest overwrites the chunk that copy read: both sides get the new data, and
        // then the copy's old data lands on the target.
        let w = s.device.write(Some(block));
        s.device.settle(ctx);
        release_stalled_write();
        s.events.wait_ready(ctx);
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert_eq!(
            file_generations(&s.target_file, BLOCKS)[block as usize],
            Some(w.generation),
            "the chunk was copied again after the overlapping copy"
        );
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}

#[test]
fn copy_mode_changes_from_background_to_write_blocking_only() {
    on_context(|ctx| {
        let mut s = plain(ctx, options("j"));
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        assert!(!s.mirror.query().actively_synced);
        s.mirror.change_copy_mode(CopyMode::WriteBlocking).unwrap();
        let w = s.device.write(Some(12));
        s.device.settle(ctx);
        assert_eq!(
            file_generations(&s.target_file, BLOCKS)[12],
            Some(w.generation)
        );
        assert_eq!(
            s.mirror.change_copy_mode(CopyMode::Background),
            Err(MirrorError::CopyModeChange {
                from: "write-blocking",
                to: "background"
            })
        );
        s.mirror.complete().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
    });
}

#[test]
fn speed_limit_holds_the_copy_back_and_set_speed_releases_it() {
    on_context(|ctx| {
        let blocks = 1024; // 4 MiB
        let mut s = setup(
            ctx,
            blocks,
            zero_image(blocks * BLOCK),
            |n| n,
            MirrorOptions {
                speed: 1 << 20,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.run_for(ctx, Duration::from_secs(1));
        let info = s.mirror.query();
        assert_eq!(
            info.status, Running,
            "4 MiB at 1 MiB/s is not READY after 1 s"
        );
        assert!(
            info.offset > 0 && info.offset <= 5 << 19,
            "about a second's worth, plus one slice: {}",
            info.offset
        );
        assert_eq!(info.speed, 1 << 20);
        s.mirror.set_speed(0).unwrap();
        s.events.wait_ready(ctx);
    });
}

#[test]
fn pause_and_resume_while_running() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                speed: 64 << 10,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.mirror.pause().unwrap();
        assert_eq!(s.mirror.pause(), Err(MirrorError::AlreadyPaused));
        s.events.wait_status(ctx, Paused);
        let offset = s.mirror.query().offset;
        s.events.run_for(ctx, Duration::from_millis(200));
        assert_eq!(s.mirror.query().offset, offset, "no copying while paused");
        s.mirror.resume().unwrap();
        s.mirror.set_speed(0).unwrap();
        s.events.wait_ready(ctx);
        assert_eq!(
            s.events.statuses(),
            [Created, Running, Paused, Running, Ready]
        );
    });
}

#[test]
fn commands_in_the_wrong_state_are_refused_with_qemus_messages() {
    on_context(|ctx| {
        let mut s = plain(
            ctx,
            MirrorOptions {
                speed: 64 << 10,
                ..options("j0")
            },
        );
        s.mirror.start().unwrap();
        let e = s.mirror.complete().unwrap_err();
        assert_eq!(
            e.to_string(),
            "Job 'j0' in state 'running' cannot accept command verb 'complete'"
        );
        assert_eq!(
            s.mirror.resume().unwrap_err().to_string(),
            "Can't resume a job that was not paused"
        );
        assert!(s.mirror.finalize().is_err() && s.mirror.dismiss().is_err());
        s.mirror.cancel(true).unwrap();
        s.events.wait_status(ctx, Null);
        assert!(s.mirror.cancel(false).is_err(), "nothing left to cancel");
    });
}

#[test]
fn bad_options_are_refused() {
    on_context(|ctx| {
        let s = plain(ctx, options("ok"));
        let bad = |o: MirrorOptions| Mirror::create(&s.target, &s.source, o, None).err();
        assert!(bad(MirrorOptions::default()).is_some(), "job id required");
        assert!(
            bad(MirrorOptions {
                granularity: 1000,
                ..options("g")
            })
            .unwrap()
            .to_string()
            .contains("power of 2")
        );
        let small_file = zero_image(BLOCK);
        let small = file_node("small", &small_file);
        assert!(Mirror::create(&s.source, &small, options("sz"), None).is_err());
        assert!(Mirror::create(&s.source, &s.source, options("self"), None).is_err());
    });
}

#[test]
fn a_stop_error_while_pending_retries_instead_of_pausing() {
    on_context(|ctx| {
        let (mut s, faults) = faulty_target(
            ctx,
            MirrorOptions {
                on_target_error: OnError::Stop,
                auto_finalize: false,
                ..options("j")
            },
        );
        s.mirror.start().unwrap();
        s.events.wait_ready(ctx);
        s.mirror.complete().unwrap();
        Faults::set(&faults.fail_writes, true);
        s.device.write(Some(4));
        s.device.settle(ctx);
        s.events.run_for(ctx, Duration::from_millis(30));
        assert_eq!(s.mirror.status(), Pending, "not stuck paused");
        assert!(
            error_events(&s.events).contains(&(IoOperation::Write, ErrorAction::Ignore)),
            "{:?}",
            s.events.seen
        );
        Faults::set(&faults.fail_writes, false);
        s.mirror.finalize().unwrap();
        assert_eq!(s.events.wait_completed(ctx), None);
        assert!(s.device.lost_writes(ctx).is_empty());
    });
}
