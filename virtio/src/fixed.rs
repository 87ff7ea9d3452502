//! Guest memory as io_uring fixed buffers, registered lazily, one chunk at a time, per ring.
//!
//! Registering a buffer makes the kernel pin its pages, faulting in (and zero-filling) those the
//! guest never touched. Registering all guest RAM up front therefore costs seconds of CPU per
//! guest boot and makes all of it resident, again at every new memory table. Instead, a ring's
//! buffer table is sparse: one slot per chunk of the table ([`MemoryTable::fixed_chunk`]), filled
//! the first time a request whose data lies in that chunk is submitted on the ring. A request
//! whose data is not one segment inside one chunk, or whose chunk could not be registered, uses
//! readv/writev as before.
//!
//! # Invariants (the contract of [`GuestBuffers::assume_fixed_chunk_registered`])
//! - A ring's buffer table belongs to one memory table at a time, the *owner*; slot `c` is
//!   filled only with the owner's chunk `c` and never replaced while the owner stays.
//! - Buffers are vouched for only when their table is the owner and their chunk's slot is filled,
//!   and each vouched request holds a [`FixedUse`] until its completion has run, after the
//!   completions of its ops were reaped. (Requests run on the context that submitted them, so
//!   the buffers meet no other ring.)
//! - The owner changes, or the buffer table is dropped, only while no `FixedUse` exists on the
//!   ring. Whoever comes first claims a ring whose owner no longer lives (a new memory table,
//!   a disconnect): one live table keeps its ring, so a second export whose queues share the
//!   ring uses readv/writev rather than fight over it.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::{Arc, Weak};

use ringblk_ring::Context;

use crate::memory::{GuestBuffers, MemoryTable};

thread_local! {
    /// This context's fixed-buffer table.
    static RING: RefCell<RingBuffers> = const {
        RefCell::new(RingBuffers {
            owner: None,
            in_use: 0,
            warned: false,
        })
    };
}

/// What this context's ring has in its buffer table.
struct RingBuffers {
    owner: Option<Owner>,
    /// Live [`FixedUse`]s: requests vouched for and not yet completed.
    in_use: usize,
    /// A registration failed and was logged (once per ring).
    warned: bool,
}

/// The memory table whose chunks the ring's slots hold.
struct Owner {
    id: u64,
    table: Weak<MemoryTable>,
    /// One per chunk of the table; empty if the ring could not get a buffer table for it.
    slots: Vec<Slot>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Empty,
    Registered,
    /// Registration failed; requests in this chunk use readv/writev.
    Failed,
}

/// What to do next for a request in chunk `c` of table `id`.
enum Step {
    Use,
    Fallback,
    Claim,
    Fill,
}

impl RingBuffers {
    fn step(&self, id: u64, chunk: u16) -> Step {
        match &self.owner {
            Some(o) if o.id == id => match o.slots.get(usize::from(chunk)) {
                Some(Slot::Registered) => Step::Use,
                Some(Slot::Empty) => Step::Fill,
                Some(Slot::Failed) | None => Step::Fallback,
            },
            Some(o) if o.table.strong_count() > 0 => Step::Fallback,
            _ if self.in_use > 0 => Step::Fallback,
            _ => Step::Claim,
        }
    }

    fn warn_once(&mut self, what: &str, e: &std::io::Error) {
        if !self.warned {
            self.warned = true;
            eprintln!("ringblk: cannot register {what} as a fixed buffer, using readv/writev: {e}");
        }
    }
}

/// A vouched-for request's hold on its ring's buffer table; dropped when the request has
/// completed. Not `Send`: it counts on the context that made it.
pub(crate) struct FixedUse {
    _ring: PhantomData<*const ()>,
}

impl Drop for FixedUse {
    fn drop(&mut self) {
        // Fails only while the thread's locals are being destroyed, when the ring is gone.
        let _ = RING.try_with(|r| r.borrow_mut().in_use -= 1);
    }
}

/// Makes `data` use its chunk's fixed buffer on this context's ring, registering the chunk if
/// this is its first use here. `None` (and `data` unchanged) if it cannot: the request then uses
/// readv/writev. Keep the result until the request has completed.
pub(crate) fn vouch(data: &mut GuestBuffers) -> Option<FixedUse> {
    let chunk = data.fixed_buffer_chunk()?;
    let table = data.table();
    let id = table.id();
    loop {
        // No borrow is held across the syscalls below: registering first hands queued SQEs to
        // the kernel, which may reap completions that drop FixedUses.
        let step = RING.with_borrow_mut(|r| {
            let step = r.step(id, chunk);
            if let Step::Use = step {
                r.in_use += 1;
            }
            step
        });
        match step {
            Step::Use => break,
            Step::Fallback => return None,
            Step::Claim => claim(table),
            Step::Fill => fill(table, chunk),
        }
    }
    // SAFETY: `step` returned Use: this context's ring is owned by `data.table()` (same id) and
    // its slot `chunk` holds `fixed_chunk(chunk)` of that table (filled by `fill`, never replaced
    // while the owner stays); the owner does not change while the FixedUse made here lives, which
    // the caller keeps until the request has completed (`in_use` counts it from the same borrow
    // that saw Use); the request runs on this context only.
    unsafe { data.assume_fixed_chunk_registered() };
    Some(FixedUse { _ring: PhantomData })
}

/// Makes `table` the owner of this ring with a fresh sparse buffer table (nothing pinned).
fn claim(table: &Arc<MemoryTable>) {
    let ctx = Context::current();
    let chunks = table.fixed_chunks();
    let slots = if chunks == 0 {
        ctx.unregister_buffers();
        Vec::new()
    } else {
        match ctx.register_buffers_sparse(u32::from(chunks)) {
            Ok(()) => vec![Slot::Empty; usize::from(chunks)],
            Err(e) => {
                RING.with_borrow_mut(|r| r.warn_once("guest memory", &e));
                Vec::new()
            }
        }
    };
    RING.with_borrow_mut(|r| {
        r.owner = Some(Owner {
            id: table.id(),
            table: Arc::downgrade(table),
            slots,
        });
    });
}

/// Registers chunk `chunk` of the owner `table` in its slot.
fn fill(table: &Arc<MemoryTable>, chunk: u16) {
    let result = match table.fixed_chunk(chunk) {
        Some(iov) => Context::current().register_buffer(u32::from(chunk), iov),
        None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    RING.with_borrow_mut(|r| {
        let state = match &result {
            Ok(()) => Slot::Registered,
            Err(e) => {
                r.warn_once(&format!("guest memory chunk {chunk}"), e);
                Slot::Failed
            }
        };
        let slot = r
            .owner
            .as_mut()
            .filter(|o| o.id == table.id())
            .and_then(|o| o.slots.get_mut(usize::from(chunk)));
        if let Some(slot) = slot {
            *slot = state;
        }
    });
}

/// Drops this ring's buffer table if no request uses it: when the last queue on the context
/// stops, so the kernel unpins guest memory that nothing serves any more.
pub(crate) fn release() {
    let release = RING.with_borrow_mut(|r| {
        if r.in_use > 0 || r.owner.is_none() {
            return false;
        }
        r.owner = None;
        true
    });
    if release {
        Context::current().unregister_buffers();
    }
}

/// Drops this ring's buffer table if its owner is no longer alive (after a new memory table),
/// so that its pages are unpinned without waiting for the next claim.
pub(crate) fn release_if_dead() {
    let dead = RING.with_borrow(|r| {
        r.owner
            .as_ref()
            .is_some_and(|o| o.table.strong_count() == 0)
    });
    if dead {
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    use crate::memory::RegionDesc;

    const MIB: u64 = 1 << 20;

    /// A sparse memfd of `bytes` (nothing allocated) and a table of it at guest address 0.
    fn table(bytes: u64) -> (Arc<MemoryTable>, File) {
        let fd =
            nix::sys::memfd::memfd_create(c"ringblk-fixed", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create");
        let f = File::from(fd);
        f.set_len(bytes).unwrap();
        let region = RegionDesc {
            guest_phys_addr: 0,
            memory_size: bytes,
            userspace_addr: 0x7000_0000_0000,
            mmap_offset: 0,
        };
        let t = Arc::new(MemoryTable::new(&[(region, f.as_fd())]).unwrap());
        (t, f)
    }

    fn buffers(table: &Arc<MemoryTable>, gpa: u64, len: u64) -> GuestBuffers {
        let mut b = GuestBuffers::new(Arc::clone(table));
        b.push_guest(gpa, len).unwrap();
        b
    }

    /// Bytes the memfd has allocated (resident: a memfd has no other backing).
    fn allocated_bytes(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    fn on_context(test: impl FnOnce(&Context) + Send + 'static) {
        std::thread::spawn(move || {
            let ctx = Context::new(64).expect("io_uring_setup");
            test(&ctx);
            ctx.shutdown();
        })
        .join()
        .expect("test thread panicked");
    }

    fn state(id: u64, chunk: u16) -> (bool, Option<Slot>, usize) {
        RING.with_borrow(|r| {
            let owner = r.owner.as_ref().filter(|o| o.id == id);
            (
                owner.is_some(),
                owner.and_then(|o| o.slots.get(usize::from(chunk)).copied()),
                r.in_use,
            )
        })
    }

    #[test]
    fn first_use_of_a_chunk_registers_only_that_chunk() {
        on_context(|_| {
            let (t, f) = table(4 << 30);
            assert_eq!(allocated_bytes(&f), 0);
            let mut b = buffers(&t, 1000 * MIB, 4096);
            let u = vouch(&mut b).expect("registered");
            assert_eq!(ringblk_ring::buf::IoBuffers::fixed_index(&b), Some(500));
            assert_eq!(state(t.id(), 500), (true, Some(Slot::Registered), 1));
            assert_eq!(state(t.id(), 501), (true, Some(Slot::Empty), 1));
            // Pinning faulted in that one chunk, nothing else.
            assert_eq!(allocated_bytes(&f), 2 * MIB);
            let mut again = buffers(&t, 1001 * MIB, 512);
            let u2 = vouch(&mut again).expect("same chunk, no new registration");
            assert_eq!(allocated_bytes(&f), 2 * MIB);
            drop((u, u2));
            assert_eq!(state(t.id(), 500).2, 0);
            release();
            assert_eq!(state(t.id(), 500), (false, None, 0));
        });
    }

    #[test]
    fn buffers_that_straddle_chunks_are_not_vouched_for() {
        on_context(|_| {
            let (t, _f) = table(8 * MIB);
            let mut b = buffers(&t, 2 * MIB - 512, 1024);
            assert!(vouch(&mut b).is_none());
            assert_eq!(ringblk_ring::buf::IoBuffers::fixed_index(&b), None);
            let mut two = buffers(&t, 0, 512);
            two.push_guest(4096, 512).unwrap();
            assert!(vouch(&mut two).is_none(), "two segments");
        });
    }

    #[test]
    fn a_second_live_table_falls_back_until_the_first_is_gone() {
        on_context(|_| {
            let (a, _fa) = table(8 * MIB);
            let (b, _fb) = table(8 * MIB);
            let mut ba = buffers(&a, 0, 4096);
            let use_a = vouch(&mut ba).expect("a claims the ring");
            let mut bb = buffers(&b, 0, 4096);
            assert!(vouch(&mut bb).is_none(), "a is alive and owns the ring");
            // Gone as a table, but a request still holds a buffer of it: still not claimable.
            drop(a);
            assert!(vouch(&mut bb).is_none(), "a request of a is in flight");
            drop(use_a);
            drop(ba);
            let use_b = vouch(&mut bb).expect("b claims a ring whose owner is gone");
            assert_eq!(state(b.id(), 0), (true, Some(Slot::Registered), 1));
            drop(use_b);
        });
    }

    #[test]
    fn a_new_table_starts_with_every_slot_empty() {
        on_context(|_| {
            let (old, f) = table(8 * MIB);
            let mut b = buffers(&old, 2 * MIB, 4096);
            drop(vouch(&mut b).expect("registered"));
            drop(b);
            // The new table maps the same memfd: same chunk numbers, a new mapping.
            let region = old.regions().next().unwrap();
            let new = Arc::new(MemoryTable::new(&[(region, f.as_fd())]).unwrap());
            drop(old);
            release_if_dead();
            let id = new.id();
            assert_eq!(state(id, 1), (false, None, 0), "released with its owner");
            let mut b = buffers(&new, 4 * MIB, 4096);
            drop(vouch(&mut b).expect("claims"));
            assert_eq!(state(id, 1), (true, Some(Slot::Empty), 0), "no stale slot");
            assert_eq!(state(id, 2), (true, Some(Slot::Registered), 0));
        });
    }
}
