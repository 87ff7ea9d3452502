//! Helpers shared by the mirror's tests: real ring contexts, real files, and a model guest device.
//!
//! The device is modelled the way the virtio device works: its requests sit in a queue (the
//! test's stand-in for the avail ring), a kick is an eventfd registered with
//! `ctx.add_source(group, fd, handler)` in a group that is the handle's `MuteTarget`, and the
//! handler pops the queued requests and submits them through the `BackendHandle`, acknowledging
//! each to the model only when its completion runs. A request counts as outstanding from the
//! moment it is queued until it is acknowledged.
#![allow(dead_code)]
// Test disks are a few MiB: block indexes and offsets fit every integer type used here.
#![allow(clippy::cast_possible_truncation)]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::{
    BackendHandle, BlockError, BlockResult, Driver, Extent, Limits, MuteTarget, Node, Request,
};
use ringblk_mirror::{EventSink, JobEvent, JobStatus};
use ringblk_ring::buf::{self, OwnedBuf};
use ringblk_ring::{Context, Group, Op, Remote, Wait};

/// Bytes per guest block.
pub const BLOCK: u64 = 4096;

/// Runs `test` on a fresh thread with a fresh context (the "main context").
pub fn on_context<R: Send + 'static>(test: impl FnOnce(&Context) -> R + Send + 'static) -> R {
    std::thread::spawn(move || {
        let ctx = Context::new(256).expect("io_uring_setup");
        let result = test(&ctx);
        ctx.shutdown();
        result
    })
    .join()
    .expect("test thread panicked")
}

/// A file of `len` bytes in /dev/shm (or the default temp dir), filled by `fill`.
pub fn image(len: u64, fill: impl Fn(u64) -> Vec<u8>) -> tempfile::NamedTempFile {
    image_in("/dev/shm", len, fill)
}

/// A file of `len` bytes in `dir` (or the default temp dir), filled by `fill`.
pub fn image_in(dir: &str, len: u64, fill: impl Fn(u64) -> Vec<u8>) -> tempfile::NamedTempFile {
    use std::io::Write;
    let mut f = tempfile::Builder::new()
        .prefix("ringblk-mirror-")
        .tempfile_in(dir)
        .or_else(|_| tempfile::NamedTempFile::new())
        .unwrap();
    for block in 0..len / BLOCK {
        f.write_all(&fill(block)).unwrap();
    }
    f.as_file().set_len(len).unwrap();
    f
}

/// A file whose every block is stamped with generation 0.
pub fn stamped_image(blocks: u64) -> tempfile::NamedTempFile {
    image(blocks * BLOCK, |b| stamp(b, 0))
}

/// A sparse file of zeroes.
pub fn zero_image(len: u64) -> tempfile::NamedTempFile {
    image(len, |_| Vec::new())
}

pub fn file_node(name: &str, f: &tempfile::NamedTempFile) -> Node {
    file_node_with(name, f, false)
}

/// A file node, opened with O_DIRECT (`cache.direct=on`) if `direct`.
pub fn file_node_with(name: &str, f: &tempfile::NamedTempFile, direct: bool) -> Node {
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: false,
        direct,
    };
    Node::new(name, FileNode::open(&options).unwrap())
}

/// A block of guest data: its index and generation, then a pattern derived from both.
pub fn stamp(block: u64, generation: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    data[..8].copy_from_slice(&block.to_le_bytes());
    data[8..16].copy_from_slice(&generation.to_le_bytes());
    for (i, b) in data[16..].iter_mut().enumerate() {
        *b = (block.wrapping_mul(31) ^ generation.wrapping_mul(7) ^ i as u64) as u8 | 1;
    }
    data
}

/// The generation a block holds, or `None` if it is not a well-formed stamp of `block`.
pub fn generation_of(block: u64, data: &[u8]) -> Option<u64> {
    let generation = u64::from_le_bytes(data[8..16].try_into().unwrap());
    (data == stamp(block, generation).as_slice()).then_some(generation)
}

/// The generation of each block in a file read directly.
pub fn file_generations(f: &tempfile::NamedTempFile, blocks: u64) -> Vec<Option<u64>> {
    let data = std::fs::read(f.path()).unwrap();
    (0..blocks)
        .map(|b| generation_of(b, &data[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]))
        .collect()
}

/// A tiny seeded PRNG (xorshift64*), so failures replay from the printed seed.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Job events, collected as the main context runs.
pub struct Events {
    rx: Receiver<JobEvent>,
    pub seen: Vec<JobEvent>,
}

impl Events {
    pub fn new() -> (EventSink, Events) {
        let (tx, rx) = channel::<JobEvent>();
        (
            Box::new(move |e| {
                let _ = tx.send(e);
            }),
            Events {
                rx,
                seen: Vec::new(),
            },
        )
    }

    fn collect(&mut self) {
        self.seen.extend(self.rx.try_iter());
    }

    /// Runs the context until an event matching `want` has been seen (now or earlier).
    pub fn wait(
        &mut self,
        ctx: &Context,
        what: &str,
        want: impl Fn(&JobEvent) -> bool,
    ) -> JobEvent {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.collect();
            if let Some(e) = self.seen.iter().find(|e| want(e)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events: {:?}",
                self.seen
            );
            ctx.turn(Wait::For(Duration::from_millis(1)));
        }
    }

    pub fn wait_status(&mut self, ctx: &Context, status: JobStatus) {
        self.wait(
            ctx,
            status.as_str(),
            |e| matches!(e, JobEvent::StatusChange { status: s, .. } if *s == status),
        );
    }

    pub fn wait_ready(&mut self, ctx: &Context) {
        self.wait(ctx, "BLOCK_JOB_READY", |e| matches!(e, JobEvent::Ready(_)));
    }

    /// Waits for BLOCK_JOB_COMPLETED and returns its error.
    pub fn wait_completed(&mut self, ctx: &Context) -> Option<String> {
        match self.wait(ctx, "BLOCK_JOB_COMPLETED", |e| {
            matches!(e, JobEvent::Completed { .. })
        }) {
            JobEvent::Completed { error, .. } => error,
            _ => unreachable!(),
        }
    }

    /// The statuses reported so far, in order.
    pub fn statuses(&mut self) -> Vec<JobStatus> {
        self.collect();
        self.seen
            .iter()
            .filter_map(|e| match e {
                JobEvent::StatusChange { status, .. } => Some(*status),
                _ => None,
            })
            .collect()
    }

    /// QMP names of the events so far.
    pub fn names(&mut self) -> Vec<&'static str> {
        self.collect();
        self.seen.iter().map(|e| e.qmp_name()).collect()
    }

    /// Runs turns for `d`, collecting events.
    pub fn run_for(&mut self, ctx: &Context, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            ctx.turn(Wait::For(Duration::from_millis(1)));
        }
        self.collect();
    }
}

/// A block that does not read back its latest acknowledged write:
/// `(block, acknowledged generation, generation found)`.
pub type Lost = (u64, u64, Option<u64>);

/// One guest write: a stamped block, or a hole punched (write-zeroes with unmap).
#[derive(Clone, Copy, Debug)]
pub struct GuestWrite {
    pub block: u64,
    pub generation: u64,
    pub zero: bool,
}

/// The acknowledged "generation" of a block whose latest write punched a hole.
pub const ZEROED: u64 = u64::MAX;

/// What the guest saw acknowledged, and what it has outstanding.
pub struct Model {
    /// Latest acknowledged generation per block (0: the initial stamp; [`ZEROED`]: a hole).
    pub acked: Vec<u64>,
    /// Blocks with a write outstanding (a guest never overlaps its own writes here).
    pub busy: Vec<bool>,
    pub next_generation: u64,
    /// The random writer punches a hole instead of writing once in this many (0: never).
    pub holes_one_in: u64,
    pub rng: XorShift,
}

/// The paced random writer that keeps `depth` writes outstanding while `running`.
pub struct Writer {
    pub running: AtomicBool,
    pub depth: AtomicU64,
    /// Pause between an acknowledgement and the next write, in microseconds (0: none).
    pub gap_us: AtomicU64,
}

/// The state a device shares between the thread that serves it and the test.
pub struct DeviceState {
    pub queue: Mutex<VecDeque<GuestWrite>>,
    pub model: Mutex<Model>,
    pub queued: AtomicU64,
    pub dispatched: AtomicU64,
    pub acked: AtomicU64,
    /// Name of the handle's root node when each request was dispatched.
    pub roots: Mutex<Vec<(u64, String)>>,
    pub writer: Writer,
    kick: EventFd,
}

/// A model guest device on one ring context.
#[derive(Clone)]
pub struct Device {
    pub handle: BackendHandle,
    pub state: Arc<DeviceState>,
    pub ring: Remote,
    /// The mute group of its kick.
    pub group: Group,
}

impl Device {
    /// Attaches a device to `handle`, served by the context behind `ring`.
    pub fn attach(handle: &BackendHandle, ring: Remote, blocks: u64, seed: u64) -> Device {
        let kick = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .unwrap();
        let state = Arc::new(DeviceState {
            queue: Mutex::new(VecDeque::new()),
            model: Mutex::new(Model {
                acked: vec![0; blocks as usize],
                busy: vec![false; blocks as usize],
                next_generation: 1,
                holes_one_in: 0,
                rng: XorShift::new(seed),
            }),
            queued: AtomicU64::new(0),
            dispatched: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            roots: Mutex::new(Vec::new()),
            writer: Writer {
                running: AtomicBool::new(false),
                depth: AtomicU64::new(0),
                gap_us: AtomicU64::new(0),
            },
            kick,
        });
        let group = Group::new();
        handle.add_mute_target(MuteTarget {
            group,
            rings: vec![ring.clone()],
        });
        let device = Device {
            handle: handle.clone(),
            state,
            ring: ring.clone(),
            group,
        };
        let d = device.clone();
        ring.call(move || {
            let fd = d.state.kick.as_raw_fd();
            let me = d.clone();
            Context::current().add_source(group, fd, move || me.on_kick());
        })
        .unwrap();
        device
    }

    /// The kick handler: pops every queued request and submits it through the handle.
    fn on_kick(&self) {
        loop {
            let Some(w) = self.state.queue.lock().unwrap().pop_front() else {
                break;
            };
            // Submitted through the handle, with the root of the moment recorded; the request
            // counts as dispatched once it is submitted (a drained root parks it at the handle).
            let root = self.handle.root();
            let me = self.clone();
            let req = if w.zero {
                Request::WriteZeroes {
                    offset: w.block * BLOCK,
                    len: BLOCK,
                    unmap: true,
                }
            } else {
                Request::Write {
                    offset: w.block * BLOCK,
                    buf: Box::new(OwnedBuf::from_slice(&stamp(w.block, w.generation))),
                }
            };
            self.handle
                .submit(req, Box::new(move |result, _| me.on_complete(w, result)));
            let name = root.name().to_owned();
            self.state.roots.lock().unwrap().push((w.block, name));
            self.state.dispatched.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn on_complete(&self, w: GuestWrite, result: BlockResult) {
        result.expect("a guest write failed");
        {
            let mut model = self.state.model.lock().unwrap();
            model.acked[w.block as usize] = if w.zero { ZEROED } else { w.generation };
            model.busy[w.block as usize] = false;
        }
        self.state.acked.fetch_add(1, Ordering::SeqCst);
        if self.state.writer.running.load(Ordering::SeqCst) {
            let gap = self.state.writer.gap_us.load(Ordering::SeqCst);
            if gap == 0 {
                self.write_random();
            } else {
                let me = self.clone();
                let op = Op::timeout(Duration::from_micros(gap));
                let _ = Context::current().submit(op, move |_, _| me.write_random());
            }
        }
    }

    /// Queues a write of the next generation of `block` (or of a random idle block) and kicks.
    /// Callable from any thread.
    pub fn write(&self, block: Option<u64>) -> GuestWrite {
        self.queue_write(block, false)
    }

    /// Makes the random writer punch a hole (unmapping write-zeroes) once in `one_in` writes.
    pub fn punch_holes(&self, one_in: u64) {
        self.state.model.lock().unwrap().holes_one_in = one_in;
    }

    fn queue_write(&self, block: Option<u64>, may_punch: bool) -> GuestWrite {
        let w = {
            let mut model = self.state.model.lock().unwrap();
            let blocks = model.acked.len() as u64;
            let block = match block {
                Some(b) => b,
                None => loop {
                    let b = model.rng.below(blocks);
                    if !model.busy[b as usize] {
                        break b;
                    }
                },
            };
            assert!(!model.busy[block as usize], "overlapping guest writes");
            model.busy[block as usize] = true;
            let generation = model.next_generation;
            model.next_generation += 1;
            let one_in = model.holes_one_in;
            let zero = may_punch && one_in > 0 && model.rng.below(one_in) == 0;
            GuestWrite {
                block,
                generation,
                zero,
            }
        };
        self.state.queued.fetch_add(1, Ordering::SeqCst);
        self.state.queue.lock().unwrap().push_back(w);
        ringblk_ring::eventfd_write(self.state.kick.as_raw_fd());
        w
    }

    fn write_random(&self) {
        if self.state.writer.running.load(Ordering::SeqCst) {
            self.queue_write(None, true);
        }
    }

    /// Starts the random writer with `depth` writes outstanding.
    pub fn start_writer(&self, depth: u64, gap_us: u64) {
        let w = &self.state.writer;
        w.depth.store(depth, Ordering::SeqCst);
        w.gap_us.store(gap_us, Ordering::SeqCst);
        w.running.store(true, Ordering::SeqCst);
        for _ in 0..depth {
            self.queue_write(None, true);
        }
    }

    pub fn stop_writer(&self) {
        self.state.writer.running.store(false, Ordering::SeqCst);
    }

    /// Requests queued but not yet acknowledged.
    pub fn outstanding(&self) -> u64 {
        self.state.queued.load(Ordering::SeqCst) - self.state.acked.load(Ordering::SeqCst)
    }

    pub fn dispatched(&self) -> u64 {
        self.state.dispatched.load(Ordering::SeqCst)
    }

    /// Runs the main context until nothing is outstanding.
    pub fn settle(&self, ctx: &Context) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.outstanding() > 0 {
            assert!(Instant::now() < deadline, "guest writes never completed");
            ctx.turn(Wait::For(Duration::from_micros(200)));
        }
    }

    /// The root each write to `block` was dispatched against.
    pub fn roots_of(&self, block: u64) -> Vec<String> {
        let roots = self.state.roots.lock().unwrap();
        roots
            .iter()
            .filter(|(b, _)| *b == block)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Reads every block through the handle (on the main context) and returns the blocks
    /// whose content is not the latest acknowledged generation.
    pub fn lost_writes(&self, ctx: &Context) -> Vec<Lost> {
        let acked = self.state.model.lock().unwrap().acked.clone();
        let results: Rc<RefCell<Vec<Option<Vec<u8>>>>> =
            Rc::new(RefCell::new(vec![None; acked.len()]));
        for block in 0..acked.len() as u64 {
            let r = results.clone();
            self.handle.submit(
                Request::Read {
                    offset: block * BLOCK,
                    buf: Box::new(OwnedBuf::zeroed(BLOCK as usize)),
                },
                Box::new(move |result, req| {
                    result.expect("verify read");
                    let b = req.into_buf().unwrap();
                    let mut data = vec![0; BLOCK as usize];
                    buf::copy_out(b.as_ref(), &mut data);
                    r.borrow_mut()[block as usize] = Some(data);
                }),
            );
        }
        ctx.run_until(|| results.borrow().iter().all(Option::is_some));
        let results = results.borrow();
        acked
            .iter()
            .enumerate()
            .filter_map(|(b, &expected)| {
                let data = results[b].as_ref().unwrap();
                let found = generation_of(b as u64, data);
                let intact = if expected == ZEROED {
                    data.iter().all(|&x| x == 0)
                } else {
                    found == Some(expected)
                };
                (!intact).then_some((b as u64, expected, found))
            })
            .collect()
    }
}

/// A filter that counts the requests it forwards, by kind.
pub struct Counting {
    pub child: Node,
    pub counts: Arc<Counts>,
}

#[derive(Default)]
pub struct Counts {
    pub writes: AtomicU64,
    pub write_zeroes: AtomicU64,
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub flushes: AtomicU64,
}

impl Counting {
    pub fn over(child: Node) -> (Node, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        let node = Node::new(
            "counting",
            Counting {
                child,
                counts: counts.clone(),
            },
        );
        (node, counts)
    }
}

impl Driver for Counting {
    fn name(&self) -> &'static str {
        "counting"
    }
    fn size(&self) -> u64 {
        self.child.size()
    }
    fn limits(&self) -> Limits {
        self.child.limits()
    }
    fn children(&self) -> Vec<Node> {
        vec![self.child.clone()]
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.child.block_status(offset, len)
    }
    fn submit(&self, req: Request, done: ringblk_blkgraph::Done) {
        if let Request::Read { .. } = req {
            let (_, len) = req.range().expect("reads have a range");
            self.counts.read_bytes.fetch_add(len, Ordering::SeqCst);
        }
        let c = match req {
            Request::Write { .. } => &self.counts.writes,
            Request::WriteZeroes { .. } => &self.counts.write_zeroes,
            Request::Read { .. } => &self.counts.reads,
            Request::Flush => &self.counts.flushes,
            Request::Discard { .. } => &self.counts.write_zeroes,
        };
        c.fetch_add(1, Ordering::SeqCst);
        self.child.submit(req, done);
    }
}

thread_local! {
    /// The write a [`StallFirstWrite`] holds back on this thread.
    static STALLED: RefCell<Option<(Node, Request, ringblk_blkgraph::Done)>> =
        const { RefCell::new(None) };
}

/// A filter that holds back the first data write it is given, before it reaches the child,
/// until [`release_stalled_write`] runs on the same thread; everything else passes.
pub struct StallFirstWrite {
    pub child: Node,
    armed: AtomicBool,
}

impl StallFirstWrite {
    pub fn over(child: Node) -> Node {
        Node::new(
            "stall",
            StallFirstWrite {
                child,
                armed: AtomicBool::new(true),
            },
        )
    }
}

/// The offset of the write held back on this thread, if one is.
pub fn stalled_write_offset() -> Option<u64> {
    STALLED.with(|s| {
        s.borrow()
            .as_ref()
            .and_then(|(_, req, _)| req.range())
            .map(|(offset, _)| offset)
    })
}

/// Lets the held write go on to its node.
pub fn release_stalled_write() {
    let (child, req, done) = STALLED
        .with(|s| s.borrow_mut().take())
        .expect("a write is held");
    child.submit_drained(req, done);
}

impl Driver for StallFirstWrite {
    fn name(&self) -> &'static str {
        "stall"
    }
    fn size(&self) -> u64 {
        self.child.size()
    }
    fn limits(&self) -> Limits {
        self.child.limits()
    }
    fn children(&self) -> Vec<Node> {
        vec![self.child.clone()]
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        self.child.block_status(offset, len)
    }
    fn submit(&self, req: Request, done: ringblk_blkgraph::Done) {
        if matches!(req, Request::Write { .. }) && self.armed.swap(false, Ordering::SeqCst) {
            STALLED.with(|s| *s.borrow_mut() = Some((self.child.clone(), req, done)));
            return;
        }
        self.child.submit_drained(req, done);
    }
}
