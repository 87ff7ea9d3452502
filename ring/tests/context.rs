//! Behaviour of one context: sources and mutes, deferred callbacks, ops, teardown.

use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use ringblk_ring::buf::{self, OwnedBuf};
use ringblk_ring::{Context, Fallocate, Group, IoThread, Op, Wait, eventfd_write};

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; the result is checked and owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A fresh context on a fresh thread, so tests never share a thread-local context.
fn on_context(test: impl FnOnce(&Context) + Send + 'static) {
    std::thread::spawn(move || {
        let ctx = Context::new(64).expect("io_uring_setup");
        test(&ctx);
        ctx.shutdown();
    })
    .join()
    .expect("test thread panicked");
}

fn turns(ctx: &Context, n: usize) {
    for _ in 0..n {
        ctx.turn(Wait::For(Duration::from_millis(1)));
    }
}

fn counting_source(ctx: &Context, group: Group, fd: RawFd) -> Rc<Cell<u32>> {
    let hits = Rc::new(Cell::new(0));
    let h = hits.clone();
    ctx.add_source(group, fd, move || h.set(h.get() + 1));
    hits
}

#[test]
fn kick_is_dispatched_once_per_event() {
    on_context(|ctx| {
        let efd = eventfd();
        let hits = counting_source(ctx, Group::new(), efd.as_raw_fd());
        turns(ctx, 3);
        assert_eq!(hits.get(), 0, "nothing fired yet");
        eventfd_write(efd.as_raw_fd());
        turns(ctx, 3);
        assert_eq!(hits.get(), 1);
    });
}

#[test]
fn kick_while_muted_is_not_dispatched() {
    on_context(|ctx| {
        let efd = eventfd();
        let group = Group::new();
        let hits = counting_source(ctx, group, efd.as_raw_fd());
        turns(ctx, 2);
        ctx.mute(group);
        eventfd_write(efd.as_raw_fd());
        turns(ctx, 5);
        assert_eq!(hits.get(), 0, "a muted source must not be dispatched");
        let mut count = [0u8; 8];
        let mut f = std::fs::File::from(efd.try_clone().unwrap());
        f.read_exact(&mut count)
            .expect("the kick must stay in the eventfd while muted");
        assert_eq!(u64::from_ne_bytes(count), 1);
        ctx.unmute(group);
    });
}

#[test]
fn kick_while_muted_is_dispatched_after_unmute() {
    on_context(|ctx| {
        let efd = eventfd();
        let group = Group::new();
        let hits = counting_source(ctx, group, efd.as_raw_fd());
        ctx.mute(group);
        eventfd_write(efd.as_raw_fd());
        turns(ctx, 3);
        ctx.unmute(group);
        turns(ctx, 3);
        assert_eq!(hits.get(), 1);
        eventfd_write(efd.as_raw_fd());
        turns(ctx, 3);
        assert_eq!(hits.get(), 2, "the source is re-armed after the unmute");
    });
}

#[test]
fn nested_mutes_need_as_many_unmutes() {
    on_context(|ctx| {
        let efd = eventfd();
        let group = Group::new();
        let hits = counting_source(ctx, group, efd.as_raw_fd());
        ctx.mute(group);
        ctx.mute(group);
        eventfd_write(efd.as_raw_fd());
        ctx.unmute(group);
        turns(ctx, 3);
        assert_eq!(hits.get(), 0, "still muted once");
        assert!(ctx.is_muted(group));
        ctx.unmute(group);
        turns(ctx, 3);
        assert_eq!(hits.get(), 1);
    });
}

#[test]
fn unmute_self_kicks_without_new_event() {
    on_context(|ctx| {
        let efd = eventfd();
        let group = Group::new();
        let hits = counting_source(ctx, group, efd.as_raw_fd());
        ctx.mute(group);
        turns(ctx, 2);
        ctx.unmute(group);
        turns(ctx, 2);
        assert_eq!(hits.get(), 1, "unmute to zero re-scans every source once");
    });
}

#[test]
fn mute_of_one_group_leaves_other_groups_running() {
    on_context(|ctx| {
        let (a, b) = (eventfd(), eventfd());
        let (ga, gb) = (Group::new(), Group::new());
        let hits_a = counting_source(ctx, ga, a.as_raw_fd());
        let hits_b = counting_source(ctx, gb, b.as_raw_fd());
        ctx.mute(ga);
        eventfd_write(a.as_raw_fd());
        eventfd_write(b.as_raw_fd());
        turns(ctx, 3);
        assert_eq!((hits_a.get(), hits_b.get()), (0, 1));
        ctx.unmute(ga);
    });
}

#[test]
fn removed_source_is_never_dispatched_again() {
    on_context(|ctx| {
        let efd = eventfd();
        turns(ctx, 1);
        let baseline = ctx.ops_in_flight();
        let hits = Rc::new(Cell::new(0));
        let h = hits.clone();
        let id = ctx.add_source(Group::new(), efd.as_raw_fd(), move || h.set(h.get() + 1));
        turns(ctx, 1);
        ctx.remove_source(id);
        eventfd_write(efd.as_raw_fd());
        turns(ctx, 3);
        assert_eq!(hits.get(), 0);
        assert_eq!(
            ctx.ops_in_flight(),
            baseline,
            "its poll was cancelled and reaped"
        );
    });
}

#[test]
fn cross_thread_mute_is_acknowledged_before_it_returns() {
    let thread = IoThread::spawn("iot", Duration::ZERO).unwrap();
    let efd = eventfd();
    let group = Group::new();
    let fd = efd.as_raw_fd();
    let (hits_tx, hits_rx) = crossbeam_channel::unbounded();
    thread.remote().call(move || {
        Context::current().add_source(group, fd, move || hits_tx.send(()).unwrap());
    });
    thread.remote().mute(group);
    // The mute is in force now: a kick must not be dispatched however long we wait.
    eventfd_write(fd);
    assert!(
        hits_rx.recv_timeout(Duration::from_millis(100)).is_err(),
        "kick dispatched while muted"
    );
    assert_eq!(
        thread
            .remote()
            .call(move || Context::current().is_muted(group)),
        Some(true)
    );
    thread.remote().unmute(group);
    hits_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("kick dispatched after the unmute");
    drop(thread);
    drop(efd);
}

#[test]
fn defer_never_runs_inline() {
    on_context(|ctx| {
        let ran = Rc::new(Cell::new(false));
        let r = ran.clone();
        ctx.defer(move || r.set(true));
        assert!(!ran.get());
        ctx.turn(Wait::No);
        assert!(ran.get());
    });
}

#[test]
fn callbacks_deferred_by_a_callback_run_in_a_later_turn() {
    on_context(|ctx| {
        let log = Rc::new(RefCell::new(Vec::new()));
        let (l, c) = (log.clone(), ctx.clone());
        ctx.defer(move || {
            l.borrow_mut().push(1);
            let l2 = l.clone();
            c.defer(move || l2.borrow_mut().push(2));
        });
        ctx.turn(Wait::No);
        assert_eq!(*log.borrow(), vec![1]);
        ctx.turn(Wait::No);
        assert_eq!(*log.borrow(), vec![1, 2]);
    });
}

#[test]
fn remote_defers_run_in_posting_order() {
    let thread = IoThread::spawn("iot", Duration::ZERO).unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..1000 {
        let tx = tx.clone();
        thread.remote().defer(move || tx.send(i).unwrap());
    }
    let got: Vec<i32> = (0..1000)
        .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
        .collect();
    assert_eq!(got, (0..1000).collect::<Vec<_>>());
}

#[test]
fn remote_defer_wakes_a_sleeping_context() {
    let thread = IoThread::spawn("iot", Duration::ZERO).unwrap();
    for _ in 0..200 {
        // Give the thread time to go to sleep, then check a single post wakes it.
        std::thread::sleep(Duration::from_micros(200));
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread.remote().defer(move || tx.send(()).unwrap());
        rx.recv_timeout(Duration::from_secs(5))
            .expect("lost wake-up");
    }
}

fn image(len: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&vec![0xAA; len]).unwrap();
    f
}

fn run_op(ctx: &Context, op: Op) -> (Op, std::io::Result<u32>) {
    let out = Rc::new(RefCell::new(None));
    let o = out.clone();
    ctx.submit(op, move |op, res| *o.borrow_mut() = Some((op, res)))
        .map_err(|r| r.error)
        .unwrap();
    ctx.run_until(|| out.borrow().is_some());
    out.take().unwrap()
}

#[test]
fn write_then_read_round_trips_through_a_file() {
    on_context(|ctx| {
        let f = image(8192);
        let fd = f.as_file().as_raw_fd();
        let data = OwnedBuf::from_slice(&b"ringblk!".repeat(512));
        let (_, res) = run_op(
            ctx,
            Op::Write {
                fd,
                offset: 4096,
                buf: Box::new(data),
            },
        );
        assert_eq!(res.unwrap(), 4096);
        let (op, res) = run_op(
            ctx,
            Op::Read {
                fd,
                offset: 4096,
                buf: Box::new(OwnedBuf::zeroed(8)),
            },
        );
        assert_eq!(res.unwrap(), 8);
        let mut got = [0u8; 8];
        buf::copy_out(op.into_buf().unwrap().as_ref(), &mut got);
        assert_eq!(&got, b"ringblk!");
    });
}

#[test]
fn read_past_end_of_file_is_short() {
    on_context(|ctx| {
        let f = image(4096);
        let fd = f.as_file().as_raw_fd();
        let (_, res) = run_op(
            ctx,
            Op::Read {
                fd,
                offset: 2048,
                buf: Box::new(OwnedBuf::zeroed(4096)),
            },
        );
        assert_eq!(res.unwrap(), 2048, "a short read is reported, not hidden");
    });
}

#[test]
fn fsync_and_fallocate_complete() {
    on_context(|ctx| {
        let f = image(1 << 20);
        let fd = f.as_file().as_raw_fd();
        assert!(run_op(ctx, Op::Fsync { fd, datasync: true }).1.is_ok());
        assert!(
            run_op(
                ctx,
                Op::Fsync {
                    fd,
                    datasync: false
                }
            )
            .1
            .is_ok()
        );
        let zero = Op::Fallocate {
            fd,
            mode: Fallocate::ZeroRange,
            offset: 0,
            len: 4096,
        };
        assert!(run_op(ctx, zero).1.is_ok());
        let punch = Op::Fallocate {
            fd,
            mode: Fallocate::PunchHole,
            offset: 65536,
            len: 4096,
        };
        assert!(run_op(ctx, punch).1.is_ok());
        let mut contents = Vec::new();
        std::fs::File::open(f.path())
            .unwrap()
            .read_to_end(&mut contents)
            .unwrap();
        assert!(
            contents[..4096].iter().all(|&b| b == 0),
            "zero range reads as zeroes"
        );
        assert!(
            contents[65536..69632].iter().all(|&b| b == 0),
            "punched hole reads as zeroes"
        );
        assert!(
            contents[4096..65536].iter().all(|&b| b == 0xAA),
            "the rest is untouched"
        );
    });
}

#[test]
fn error_from_the_kernel_reaches_the_completion() {
    on_context(|ctx| {
        let (_, res) = run_op(
            ctx,
            Op::Fsync {
                fd: -1,
                datasync: false,
            },
        );
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EBADF));
    });
}

/// A buffer that names slot `slot` of the ring's buffer table, to exercise READ_FIXED /
/// WRITE_FIXED.
struct Fixed {
    iov: [libc::iovec; 1],
    slot: u16,
    _not_sync: Rc<()>,
}
// SAFETY: test-only: the iovec points into a leaked Vec that is never freed, registered in `slot`
// whenever an op carrying it succeeds; the one op built on an empty slot is refused by the kernel
// (what that test checks) without touching memory.
unsafe impl ringblk_ring::buf::IoBuffers for Fixed {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }
    fn fixed_index(&self) -> Option<u16> {
        Some(self.slot)
    }
}
// SAFETY: test-only, see above; the Rc is never touched.
unsafe impl Send for Fixed {}

/// 64 KiB that live as long as the process.
fn leaked_region() -> *mut u8 {
    Box::leak(vec![0u8; 1 << 16].into_boxed_slice()).as_mut_ptr()
}

fn fixed_at(base: *mut u8, slot: u16, off: usize, len: usize) -> Box<Fixed> {
    Box::new(Fixed {
        iov: [libc::iovec {
            iov_base: base.wrapping_add(off).cast(),
            iov_len: len,
        }],
        slot,
        _not_sync: Rc::new(()),
    })
}

fn region_iovec(base: *mut u8) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: 1 << 16,
    }
}

#[test]
fn fixed_ops_through_a_filled_sparse_slot_round_trip() {
    on_context(|ctx| {
        let base = leaked_region();
        ctx.register_buffers_sparse(8).unwrap();
        ctx.register_buffer(5, region_iovec(base)).unwrap();
        // SAFETY: the region is 64 KiB and only this test touches it, between ops.
        unsafe { std::ptr::copy_nonoverlapping(b"fixd".as_ptr(), base, 4) };
        let f = image(8192);
        let fd = f.as_file().as_raw_fd();
        let write = Op::Write {
            fd,
            offset: 0,
            buf: fixed_at(base, 5, 0, 512),
        };
        assert_eq!(run_op(ctx, write).1.unwrap(), 512);
        let read = Op::Read {
            fd,
            offset: 0,
            buf: fixed_at(base, 5, 4096, 512),
        };
        assert_eq!(run_op(ctx, read).1.unwrap(), 512);
        let mut check = [0u8; 4];
        std::fs::File::open(f.path())
            .unwrap()
            .read_exact(&mut check)
            .unwrap();
        assert_eq!(&check, b"fixd");
        let mut back = [0u8; 4];
        // SAFETY: as above; the read has completed.
        unsafe { std::ptr::copy_nonoverlapping(base.wrapping_add(4096), back.as_mut_ptr(), 4) };
        assert_eq!(&back, b"fixd");
        ctx.unregister_buffers();
    });
}

#[test]
fn a_new_sparse_table_empties_every_slot() {
    on_context(|ctx| {
        let base = leaked_region();
        let f = image(8192);
        let fd = f.as_file().as_raw_fd();
        let read = || Op::Read {
            fd,
            offset: 0,
            buf: fixed_at(base, 1, 0, 512),
        };
        ctx.register_buffers_sparse(4).unwrap();
        assert!(run_op(ctx, read()).1.is_err(), "slot 1 was never filled");
        ctx.register_buffer(1, region_iovec(base)).unwrap();
        assert_eq!(run_op(ctx, read()).1.unwrap(), 512);
        // Replacing the table (no EBUSY: the old one is dropped first) leaves slot 1 empty again.
        ctx.register_buffers_sparse(4).unwrap();
        assert!(
            run_op(ctx, read()).1.is_err(),
            "slot 1 survived a new table"
        );
        ctx.unregister_buffers();
        assert!(
            run_op(ctx, read()).1.is_err(),
            "slot 1 survived unregistering"
        );
    });
}

#[test]
fn teardown_with_ops_in_flight_cancels_and_waits() {
    let (completed_tx, completed_rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        let ctx = Context::new(64).unwrap();
        let mut fds = [0; 2];
        // SAFETY: plain syscall into a live local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // A read from an empty pipe never completes on its own.
        for _ in 0..4 {
            let tx = completed_tx.clone();
            let op = Op::Read {
                fd: fds[0],
                offset: u64::MAX,
                buf: Box::new(OwnedBuf::zeroed(4096)),
            };
            ctx.submit(op, move |op, res| {
                tx.send((op.into_buf().is_some(), res.map_err(|e| e.raw_os_error())))
                    .unwrap()
            })
            .map_err(|r| r.error)
            .unwrap();
        }
        ctx.turn(Wait::No);
        assert_eq!(ctx.ops_in_flight(), 4);
        ctx.shutdown();
        // SAFETY: closing fds this thread opened.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1])
        };
    })
    .join()
    .unwrap();
    let results: Vec<_> = completed_rx.try_iter().collect();
    assert_eq!(
        results.len(),
        4,
        "every in-flight op completed before teardown returned"
    );
    for (had_buf, res) in results {
        assert!(had_buf, "the buffer came back with the completion");
        assert_eq!(res, Err(Some(libc::ECANCELED)));
    }
}

#[test]
fn poller_runs_while_busy_polling_and_not_while_muted() {
    on_context(|ctx| {
        ctx.set_poll_max(Duration::from_millis(1));
        let group = Group::new();
        let calls = Rc::new(Cell::new(0u32));
        let c = calls.clone();
        ctx.add_poller(group, move || {
            c.set(c.get() + 1);
            false
        });
        ctx.turn(Wait::No);
        assert!(calls.get() > 0);
        ctx.mute(group);
        let before = calls.get();
        ctx.turn(Wait::No);
        assert_eq!(calls.get(), before, "muted pollers are skipped");
        ctx.unmute(group);
    });
}

#[test]
fn fd_source_is_left_for_its_handler_to_consume() {
    on_context(|ctx| {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let got = Rc::new(RefCell::new(Vec::new()));
        let g = got.clone();
        let mut reader = b.try_clone().unwrap();
        ctx.add_fd_source(Group::new(), b.as_raw_fd(), move || {
            let mut buf = [0u8; 64];
            if let Ok(n) = reader.read(&mut buf) {
                g.borrow_mut().extend_from_slice(&buf[..n]);
            }
        });
        a.write_all(b"0123456789abcdef").unwrap();
        ctx.run_until(|| got.borrow().len() == 16);
        assert_eq!(
            &*got.borrow(),
            b"0123456789abcdef",
            "no byte taken by the context itself"
        );
    });
}

/// Counts its calls; its `before_sleep` reports work once, as if a kick raced the sleep.
struct RacingPoller {
    polls: Rc<Cell<u32>>,
    before_sleeps: Rc<Cell<u32>>,
}

impl ringblk_ring::Poller for RacingPoller {
    fn poll(&mut self) -> bool {
        self.polls.set(self.polls.get() + 1);
        false
    }
    fn before_sleep(&mut self) -> bool {
        self.before_sleeps.set(self.before_sleeps.get() + 1);
        self.before_sleeps.get() == 1
    }
}

#[test]
fn poller_is_told_before_the_loop_sleeps_and_work_found_then_prevents_the_sleep() {
    on_context(|ctx| {
        ctx.set_poll_max(Duration::from_micros(100));
        let (polls, before_sleeps) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        ctx.add_poller(
            Group::new(),
            RacingPoller {
                polls: polls.clone(),
                before_sleeps: before_sleeps.clone(),
            },
        );
        let start = std::time::Instant::now();
        assert!(
            ctx.turn(Wait::For(Duration::from_secs(5))),
            "work found before sleeping counts as progress"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "the loop must not have slept"
        );
        assert!(polls.get() > 0);
        assert_eq!(before_sleeps.get(), 1);
        assert!(
            !ctx.turn(Wait::For(Duration::from_millis(20))),
            "nothing to do: it sleeps the full wait"
        );
        assert_eq!(before_sleeps.get(), 2);
    });
}

fn sleep_until_timer(ctx: &Context, after: Duration) {
    let fired = Rc::new(Cell::new(false));
    let f = fired.clone();
    ctx.submit(Op::timeout(after), move |_, _| f.set(true))
        .map_err(|r| r.error)
        .unwrap();
    while !fired.get() {
        ctx.turn(Wait::Forever);
    }
}

#[test]
fn poll_window_grows_when_events_come_quickly_and_drops_when_they_come_slowly() {
    on_context(|ctx| {
        ctx.set_poll_max(Duration::from_millis(2));
        assert_eq!(ctx.poll_window(), Duration::ZERO);
        sleep_until_timer(ctx, Duration::from_micros(20));
        let grown = ctx.poll_window();
        assert!(
            grown > Duration::ZERO,
            "an event within poll_max grows the window"
        );
        sleep_until_timer(ctx, Duration::from_micros(20));
        assert!(
            ctx.poll_window() > grown,
            "and keeps growing while events keep coming quickly"
        );
        sleep_until_timer(ctx, Duration::from_millis(30));
        assert_eq!(
            ctx.poll_window(),
            Duration::ZERO,
            "an event after poll_max drops it to zero"
        );
    });
}

#[test]
fn busy_poll_yields_the_cpu_only_while_ops_are_in_flight() {
    on_context(|ctx| {
        ctx.set_poll_max(Duration::from_millis(2));
        ctx.add_poller(Group::new(), || false);
        // An event well within poll_max opens the poll window (retried: on a loaded machine
        // a timer can fire late and close it again).
        for _ in 0..100 {
            sleep_until_timer(ctx, Duration::from_micros(20));
            if ctx.poll_window() > Duration::ZERO {
                break;
            }
        }
        assert!(ctx.poll_window() > Duration::ZERO);
        let before = ctx.poll_yields();
        ctx.turn(Wait::No);
        assert_eq!(
            ctx.poll_yields(),
            before,
            "nothing in flight: the loop spins, it does not yield"
        );
        let fired = Rc::new(Cell::new(false));
        let f = fired.clone();
        ctx.submit(Op::timeout(Duration::from_secs(10)), move |_, _| {
            f.set(true)
        })
        .map_err(|r| r.error)
        .unwrap();
        // A pass normally yields at once; a preemption could use up the window before the
        // first check, so allow a few turns.
        for _ in 0..100 {
            ctx.turn(Wait::No);
            if ctx.poll_yields() > before {
                break;
            }
        }
        assert!(
            ctx.poll_yields() > before,
            "an op in flight (which a kernel worker on this CPU may be running): it yields"
        );
        assert!(!fired.get());
    });
}

/// Writes `fd` from another thread `after` from now (a kick arriving while the loop sleeps).
fn kick_later(fd: RawFd, after: Duration) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        eventfd_write(fd);
    })
}

/// Turns until the source has fired once more (and the kicking thread is done).
fn sleep_until_kick(ctx: &Context, fd: RawFd, hits: &Cell<u32>, after: Duration) {
    let before = hits.get();
    let kicker = kick_later(fd, after);
    while hits.get() == before {
        ctx.turn(Wait::Forever);
    }
    kicker.join().unwrap();
}

#[test]
fn slow_completions_do_not_close_the_poll_window_of_quick_kicks() {
    on_context(|ctx| {
        ctx.set_poll_max(Duration::from_millis(2));
        let kick = eventfd();
        let hits = counting_source(ctx, Group::new(), kick.as_raw_fd());
        turns(ctx, 2);
        // Kicks that come soon after the loop went idle open the window (retried: on a loaded
        // machine the kicking thread may run late).
        for _ in 0..100 {
            sleep_until_kick(ctx, kick.as_raw_fd(), &hits, Duration::from_micros(50));
            if ctx.poll_window() > Duration::ZERO {
                break;
            }
        }
        let opened = ctx.poll_window();
        assert!(opened > Duration::ZERO, "quick kicks open the window");
        // A completion long after submission (a device's latency far beyond poll_max) says
        // nothing about when the next kick comes.
        sleep_until_timer(ctx, Duration::from_millis(30));
        assert_eq!(
            ctx.poll_window(),
            opened,
            "a slow completion leaves the kicks' window as it was"
        );
        // A kick that itself comes late closes it.
        sleep_until_kick(ctx, kick.as_raw_fd(), &hits, Duration::from_millis(30));
        assert_eq!(
            ctx.poll_window(),
            Duration::ZERO,
            "a kick after poll_max drops the window to zero"
        );
    });
}

/// Counts its polls; never finds work.
struct CountingPoller(Rc<Cell<u32>>);

impl ringblk_ring::Poller for CountingPoller {
    fn poll(&mut self) -> bool {
        self.0.set(self.0.get() + 1);
        false
    }
    fn before_sleep(&mut self) -> bool {
        false
    }
}

#[test]
fn with_no_op_in_flight_the_completions_window_does_not_keep_the_loop_polling() {
    on_context(|ctx| {
        ctx.set_poll_max(Duration::from_millis(2));
        // Quick completions open the completions' window (retried: a loaded machine may delay).
        for _ in 0..50 {
            sleep_until_timer(ctx, Duration::from_micros(20));
            if ctx.poll_window() >= Duration::from_millis(1) {
                break;
            }
        }
        assert!(ctx.poll_window() >= Duration::from_millis(1));
        let polls = Rc::new(Cell::new(0));
        ctx.add_poller(Group::new(), CountingPoller(polls.clone()));
        assert!(!ctx.turn(Wait::For(Duration::from_millis(5))));
        assert!(
            polls.get() < 10,
            "nothing can complete: one pass, then sleep (polled {} times)",
            polls.get()
        );
    });
}

#[test]
fn a_wait_nested_in_a_handler_runs_callbacks_but_holds_sources_until_the_outer_turn_ends() {
    on_context(|ctx| {
        let efd = eventfd();
        let fd = efd.as_raw_fd();
        let hits = counting_source(ctx, Group::new(), fd);
        turns(ctx, 2);
        let outer_done = Rc::new(Cell::new(false));
        let (hits_in, done) = (hits.clone(), outer_done.clone());
        let c = ctx.clone();
        ctx.defer(move || {
            // A handler that waits: the kick arrives during its wait, and so does a callback.
            eventfd_write(fd);
            let callback_ran = Rc::new(Cell::new(false));
            let r = callback_ran.clone();
            c.defer(move || r.set(true));
            let deadline = std::time::Instant::now() + Duration::from_millis(50);
            c.run_until(|| callback_ran.get() && std::time::Instant::now() > deadline);
            assert_eq!(
                hits_in.get(),
                0,
                "a source was dispatched inside a nested wait"
            );
            done.set(true);
        });
        ctx.run_until(|| outer_done.get());
        ctx.run_until(|| hits.get() == 1);
        turns(ctx, 3);
        assert_eq!(hits.get(), 1, "the held kick is dispatched exactly once");
    });
}

#[test]
fn a_call_from_a_context_keeps_running_its_callbacks_while_it_waits() {
    let thread = IoThread::spawn("iot", Duration::ZERO).unwrap();
    on_context(move |ctx| {
        // The callee waits for something only the caller's context can do (as a queue's stop
        // waits for requests that a drained section on the main context releases).
        let (tx, rx) = crossbeam_channel::bounded::<()>(1);
        let me = ctx.remote();
        let got = thread.remote().call(move || {
            me.defer(move || tx.send(()).unwrap());
            rx.recv_timeout(Duration::from_secs(5)).is_ok()
        });
        assert_eq!(
            got,
            Some(true),
            "the caller ran the callee's callback while it waited"
        );
    });
}
