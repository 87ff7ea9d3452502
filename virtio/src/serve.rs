//! Serving one virtqueue on the ring context that owns it: the I/O hot path.
//!
//! On a kick (or while the context busy-polls), available chains are popped, parsed and
//! submitted to the export's backend handle [`POP_CHUNK`] at a time; the ring hands each chunk
//! to the kernel in one `io_uring_enter` at the end of the turn, and the next chunk is popped at
//! the next turn, after the used entries added meanwhile have been published (and the guest
//! signalled if EVENT_IDX says it wants to be). Notifications stay disabled until the queue has
//! been popped empty. A guest that sleeps until it is signalled thereby wakes after the first
//! chunk and refills the ring while the rest of its batch is served, instead of the two sides
//! taking turns with the whole queue depth. Completions write the status byte and add a used
//! entry; the used index is published once per loop turn (a deferred flush, or the next chunk's
//! turn, whichever comes first), not once per request.
//!
//! A request is in flight (`QueueServer::in_flight`) from `pop` until its used entry is added;
//! stopping a queue (GET_VRING_BASE, disconnect) waits for that count to reach zero before the
//! queue's memory may go away.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use crate::blk::{self, Completion, RequestKind, S_IOERR, S_OK, S_UNSUPP, SECTOR_BYTES, Segment};
use crate::config::RequestLimits;
use crate::fixed;
use crate::memory::MemoryTable;
use crate::queue::SplitQueue;
use ringblk_blkgraph::{BackendHandle, BlockError, BlockResult, Request};
use ringblk_ring::{Context, Group, PollerId, SourceId, buf, eventfd_write};

/// The status byte for a block request's result: the one place block errors become virtio
/// statuses (request-parsing errors go through [`blk::status`]).
pub fn block_status(result: &BlockResult) -> u8 {
    match result {
        Ok(()) => S_OK,
        Err(BlockError::NotSupported) => S_UNSUPP,
        Err(_) => S_IOERR,
    }
}

/// Everything a queue needs to start serving, sent to its context.
pub(crate) struct QueueStart {
    pub name: String,
    pub queue: SplitQueue,
    pub limits: RequestLimits,
    pub handle: BackendHandle,
    pub group: Group,
    pub kick: File,
    pub call: Option<File>,
    pub device_id: [u8; 20],
}

struct QueueServer {
    name: String,
    queue: SplitQueue,
    limits: RequestLimits,
    handle: BackendHandle,
    kick: File,
    call: Option<File>,
    device_id: [u8; 20],
    source: Option<SourceId>,
    poller: Option<PollerId>,
    in_flight: usize,
    flush_scheduled: bool,
    group: Group,
    /// A deferred pop of the next chunk is pending (see [`POP_CHUNK`]).
    continuation_scheduled: bool,
}

type Server = Rc<RefCell<QueueServer>>;

thread_local! {
    /// The queues this context serves, by key.
    static SERVERS: RefCell<HashMap<u64, Server>> = RefCell::new(HashMap::new());
}

/// Starts serving a queue on the current context under `key`.
pub(crate) fn start(key: u64, start: QueueStart) {
    let ctx = Context::current();
    let server = Rc::new(RefCell::new(QueueServer {
        name: start.name,
        queue: start.queue,
        limits: start.limits,
        handle: start.handle,
        kick: start.kick,
        call: start.call,
        device_id: start.device_id,
        source: None,
        poller: None,
        in_flight: 0,
        flush_scheduled: false,
        group: start.group,
        continuation_scheduled: false,
    }));
    let fd = server.borrow().kick.as_raw_fd();
    let group = start.group;
    let s = server.clone();
    let source = ctx.add_source(group, fd, move || {
        process(&s);
    });
    let poller = ctx.add_poller(start.group, QueuePoller(server.clone()));
    {
        let mut srv = server.borrow_mut();
        srv.source = Some(source);
        srv.poller = Some(poller);
    }
    SERVERS.with(|m| m.borrow_mut().insert(key, server.clone()));
    // Chains made available before the kick fd was ours would otherwise wait for the next kick.
    // Not while the device is muted (a drained section, a mirror's final sync): the unmute's
    // self-kick dispatches the new source, so the queue pops its first chain only then.
    let c = ctx.clone();
    ctx.defer(move || {
        if !c.is_muted(group) {
            process(&server);
        }
    });
}

/// Stops serving the queue `key`: no more pops; waits until every popped request has its used
/// entry, publishes, and returns the next avail index (for GET_VRING_BASE).
pub(crate) fn stop(key: u64) -> Option<u16> {
    let server = SERVERS.with(|m| m.borrow_mut().remove(&key))?;
    let ctx = Context::current();
    {
        let mut srv = server.borrow_mut();
        if let Some(source) = srv.source.take() {
            ctx.remove_source(source);
        }
        if let Some(poller) = srv.poller.take() {
            ctx.remove_poller(poller);
        }
    }
    ctx.run_until(|| server.borrow().in_flight == 0);
    flush_used(&server);
    let next_avail = server.borrow().queue.next_avail();
    if SERVERS.with(|m| m.borrow().is_empty()) {
        fixed::release();
    }
    Some(next_avail)
}

/// Points a running queue at a new memory table (SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG).
pub(crate) fn set_memory(key: u64, table: Arc<MemoryTable>) {
    let Some(server) = SERVERS.with(|m| m.borrow().get(&key).cloned()) else {
        return;
    };
    {
        let mut srv = server.borrow_mut();
        if let Err(e) = srv.queue.set_memory(table) {
            eprintln!(
                "ringblk: {}: queue broken by the new memory table: {e}",
                srv.name
            );
        }
    }
    // The ring's slots hold chunks of the old table until requests of the new one claim it;
    // once no queue holds the old table, they need not keep its memory pinned meanwhile.
    fixed::release_if_dead();
}

/// Checks a running queue's next requests against new limits (the capacity changed).
pub(crate) fn set_limits(key: u64, limits: RequestLimits) {
    if let Some(server) = SERVERS.with(|m| m.borrow().get(&key).cloned()) {
        server.borrow_mut().limits = limits;
    }
}

/// Replaces a running queue's call eventfd (SET_VRING_CALL).
pub(crate) fn set_call(key: u64, call: Option<File>) {
    if let Some(server) = SERVERS.with(|m| m.borrow().get(&key).cloned()) {
        server.borrow_mut().call = call;
    }
}

/// While its context busy-polls, a queue is polled with the guest's kicks suppressed (a kick
/// would only wake a context that is awake anyway); they are re-enabled before it sleeps.
struct QueuePoller(Server);

impl ringblk_ring::Poller for QueuePoller {
    fn poll(&mut self) -> bool {
        let progress = process_chains(&self.0);
        let mut srv = self.0.borrow_mut();
        if !srv.queue.is_broken()
            && let Err(e) = srv.queue.disable_notification()
        {
            eprintln!("ringblk: {}: queue broken: {e}", srv.name);
        }
        progress
    }

    fn before_sleep(&mut self) -> bool {
        process(&self.0)
    }
}

/// Pops and submits every available chain, a chunk per loop turn; once none is left, re-enables
/// the guest's notifications (with the re-check that catches a chain added meanwhile). Returns
/// whether there was any.
fn process(server: &Server) -> bool {
    let mut progress = false;
    loop {
        progress |= process_chains(server);
        let mut srv = server.borrow_mut();
        if srv.queue.is_broken() || srv.continuation_scheduled {
            return progress;
        }
        // Re-enable notifications and check once more, or a chain made available in between
        // would wait for a kick that the guest decided not to send.
        match srv.queue.enable_notification() {
            Ok(true) => continue,
            Ok(false) => return progress,
            Err(e) => {
                eprintln!("ringblk: {}: queue broken: {e}", srv.name);
                return progress;
            }
        }
    }
}

/// How many chains are popped per loop turn. The completions of instantly served requests
/// (null-co, a page-cache hit) are published at the next turn, before the next chunk is popped,
/// so a sleeping guest is woken while the rest of its batch is still being served. Measured
/// (BENCHMARKS.md): 4 was as good on null-co but entered the kernel twice as often on a tmpfs
/// file (0.87x); 16 and above left the guest waiting for more of the batch.
pub(crate) const POP_CHUNK: usize = 8;

/// Pops and submits up to [`POP_CHUNK`] available chains; if there may be more, pops the next
/// chunk at the next loop turn. Returns whether there was any.
fn process_chains(server: &Server) -> bool {
    let mut progress = false;
    for _ in 0..POP_CHUNK {
        let popped = {
            let mut srv = server.borrow_mut();
            if srv.queue.is_broken() {
                return progress;
            }
            srv.queue.pop()
        };
        let chain = match popped {
            Ok(Some(chain)) => chain,
            Ok(None) => return progress,
            Err(e) => {
                eprintln!("ringblk: {}: queue broken: {e}", server.borrow().name);
                return progress;
            }
        };
        progress = true;
        server.borrow_mut().in_flight += 1;
        let limits = server.borrow().limits;
        match blk::parse_request(&chain, &limits) {
            Err(e) => {
                eprintln!("ringblk: {}: {e}", server.borrow().name);
                add_used(server, e.head(), 0);
            }
            Ok(request) => match request.body {
                Err(e) => complete(server, request.completion, blk::status(&e)),
                Ok(kind) => submit(server, kind, request.completion),
            },
        }
    }
    schedule_continuation(server);
    progress
}

/// Pops the next chunk at the next loop turn: after this turn's submissions have gone to the
/// kernel and the completions already there have been published. Not while the device is muted
/// (the unmute's self-kick re-scans the queue) and not once the queue is stopped.
fn schedule_continuation(server: &Server) {
    let mut srv = server.borrow_mut();
    if srv.continuation_scheduled {
        return;
    }
    srv.continuation_scheduled = true;
    let s = server.clone();
    Context::current().defer(move || {
        let (group, served) = {
            let mut srv = s.borrow_mut();
            srv.continuation_scheduled = false;
            (srv.group, srv.source.is_some())
        };
        // The completions that came since the last chunk go to the guest first.
        flush_used(&s);
        if served && !Context::current().is_muted(group) {
            process(&s);
        }
    });
}

fn submit(server: &Server, kind: RequestKind, completion: Completion) {
    let handle = server.borrow().handle.clone();
    let s = server.clone();
    let done = move |result: BlockResult| complete(&s, completion, block_status(&result));
    match kind {
        RequestKind::In { sector, mut data } => {
            let fixed = fixed::vouch(&mut data);
            handle.submit(
                Request::Read {
                    offset: sector * SECTOR_BYTES,
                    buf: Box::new(data),
                },
                Box::new(move |r, _| {
                    done(r);
                    drop(fixed);
                }),
            );
        }
        RequestKind::Out { sector, mut data } => {
            let fixed = fixed::vouch(&mut data);
            handle.submit(
                Request::Write {
                    offset: sector * SECTOR_BYTES,
                    buf: Box::new(data),
                },
                Box::new(move |r, _| {
                    done(r);
                    drop(fixed);
                }),
            );
        }
        RequestKind::Flush => handle.submit(Request::Flush, Box::new(move |r, _| done(r))),
        RequestKind::GetId { data } => {
            let id = server.borrow().device_id;
            buf::copy_in(&data, &id);
            Context::current().defer(move || done(Ok(())));
        }
        RequestKind::Discard { segments } => submit_segments(&handle, segments, false, done),
        RequestKind::WriteZeroes { segments } => submit_segments(&handle, segments, true, done),
    }
}

/// Discard and write-zeroes: one block request per segment; the worst result wins.
fn submit_segments(
    handle: &BackendHandle,
    segments: Vec<Segment>,
    zeroes: bool,
    done: impl FnOnce(BlockResult) + 'static,
) {
    struct Pending<F> {
        left: usize,
        result: BlockResult,
        done: Option<F>,
    }
    if segments.is_empty() {
        Context::current().defer(move || done(Ok(())));
        return;
    }
    let pending = Rc::new(RefCell::new(Pending {
        left: segments.len(),
        result: Ok(()),
        done: Some(done),
    }));
    for seg in segments {
        let offset = seg.sector * SECTOR_BYTES;
        let len = u64::from(seg.num_sectors) * SECTOR_BYTES;
        let req = if zeroes {
            Request::WriteZeroes {
                offset,
                len,
                unmap: seg.unmap,
            }
        } else {
            Request::Discard { offset, len }
        };
        let p = pending.clone();
        handle.submit(
            req,
            Box::new(move |result, _| {
                let mut p = p.borrow_mut();
                if result.is_err() && p.result.is_ok() {
                    p.result = result;
                }
                p.left -= 1;
                if p.left == 0 {
                    let result = std::mem::replace(&mut p.result, Ok(()));
                    let done = p.done.take().expect("segments complete once");
                    drop(p);
                    done(result);
                }
            }),
        );
    }
}

fn complete(server: &Server, completion: Completion, status: u8) {
    let (head, len) = completion.complete(status);
    add_used(server, head, len);
}

fn add_used(server: &Server, head: u16, len: u32) {
    let mut srv = server.borrow_mut();
    srv.in_flight -= 1;
    if let Err(e) = srv.queue.add_used(head, len) {
        eprintln!("ringblk: {}: queue broken: {e}", srv.name);
        return;
    }
    if !srv.flush_scheduled {
        srv.flush_scheduled = true;
        let s = server.clone();
        Context::current().defer(move || flush_used(&s));
    }
}

/// Publishes the used entries added since the last flush and signals the guest if it asked.
fn flush_used(server: &Server) {
    let mut srv = server.borrow_mut();
    srv.flush_scheduled = false;
    let notify = srv
        .queue
        .publish_used()
        .and_then(|_| srv.queue.needs_notification());
    match notify {
        Ok(true) => {
            if let Some(call) = &srv.call {
                eventfd_write(call.as_raw_fd());
            }
        }
        Ok(false) => {}
        Err(e) => eprintln!("ringblk: {}: queue broken: {e}", srv.name),
    }
}
