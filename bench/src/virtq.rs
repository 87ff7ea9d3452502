//! Shared memory and the driver side of split virtqueues (virtio 1.2, 2.7 "Split Virtqueues").
//!
//! **This module is the only place in the crate that touches raw pointers.** Everything the
//! device can see lives in one memfd mapped `MAP_SHARED` here and in the device's process:
//!
//! | area (per queue)        | written by | read by | when |
//! |-------------------------|------------|---------|------|
//! | descriptor table        | driver     | device  | written once at setup; a data descriptor's flags change only while its slot is free |
//! | avail ring              | driver     | device  | entries before `idx` is published |
//! | used ring               | device     | driver  | entries before `idx` are final |
//! | slot meta: request header | driver   | device  | while the slot is free / in flight |
//! | slot meta: status byte  | device     | driver  | while in flight / after its used entry is seen |
//! | slot data buffer        | both       | both    | driver fills (writes) or reads (reads) only while the slot is free |
//!
//! A slot is one request: descriptors `3*slot` (header, device-readable), `3*slot+1` (data) and
//! `3*slot+2` (status, device-writable), chained with `NEXT`; the chain head `3*slot` is what goes
//! into the avail ring and what the device must return in the used ring.
//!
//! The device is another process and may misbehave, so no Rust reference to shared bytes is ever
//! formed: every access is a volatile read/write, an atomic on the ring indexes, or a byte copy
//! through raw pointers. Every area is checked to lie inside the mapping when the queue is
//! created, and every per-slot accessor asserts its slot index, so no access leaves the mapping
//! whatever the device writes. Ids and lengths the device puts in the used ring are returned as
//! plain numbers for the caller to check against what it submitted.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering, fence};

use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
};

/// Guest-physical address of the first byte of the shared region. Deliberately far from the
/// region's user address so that mixing up the two address spaces fails loudly.
pub(crate) const GUEST_PHYS_BASE: u64 = 1 << 32;
/// Largest queue the generator asks for (libvhost-user's limit).
pub(crate) const MAX_QUEUE_SIZE: u16 = 1024;
/// Descriptors per request: header, data, status.
pub(crate) const DESCS_PER_REQUEST: u16 = 3;
/// Bytes of the virtio-blk request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u32 = 16;
/// Bytes per slot of request header + status, one cache line so slots do not share lines.
const META_STRIDE: usize = 64;
const STATUS_AT: usize = HEADER_LEN as usize;
const PAGE: usize = 4096;

const F_NEXT: u16 = flag16(VRING_DESC_F_NEXT);
const F_WRITE: u16 = flag16(VRING_DESC_F_WRITE);
const F_NO_INTERRUPT: u16 = flag16(VRING_AVAIL_F_NO_INTERRUPT);
const F_NO_NOTIFY: u16 = flag16(VRING_USED_F_NO_NOTIFY);

/// A virtio-bindings flag (u32) as the 16-bit field it goes in; checked at compile time.
const fn flag16(flag: u32) -> u16 {
    assert!(flag <= 0xffff);
    // Cannot truncate: checked just above.
    #[allow(clippy::cast_possible_truncation)]
    let f = flag as u16;
    f
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// A memfd mapped shared into this process, to be handed to the device with SET_MEM_TABLE.
pub(crate) struct SharedMemory {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory that stays valid until `drop`; this type hands out no
// references to it, only the accessors below, which are volatile, atomic or raw copies.
unsafe impl Send for SharedMemory {}
// SAFETY: as for Send; concurrent use from several threads touches disjoint queue areas, and the
// areas themselves are only reached through `SplitQueue`, which is not Sync.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates a zero-filled shared region of `len` bytes (rounded up to a page), faulted in.
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        let len = round_up(len.max(1), PAGE);
        let fd = memfd_create(c"ringblk-bench", MFdFlags::MFD_CLOEXEC)?;
        let file_len = i64::try_from(len).map_err(|_| io::Error::other("region too large"))?;
        nix::unistd::ftruncate(&fd, file_len)?;
        let length = NonZeroUsize::new(len).expect("len >= PAGE");
        // SAFETY: a new shared mapping of a memfd we own and just sized to `len`; the kernel picks
        // the address, so it overlaps nothing else in this process. It is unmapped in `drop`.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_POPULATE,
                &fd,
                0,
            )
        }?;
        Ok(SharedMemory {
            fd,
            base: ptr.cast(),
            len,
        })
    }

    /// The memfd, for SET_MEM_TABLE.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Length of the mapping in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// This process's address of the region's first byte (vhost-user "user address").
    pub(crate) fn user_addr(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    /// Pointer to `offset`, after checking that `offset..offset + size` lies in the mapping.
    fn ptr_at(&self, offset: usize, size: usize) -> *mut u8 {
        let end = offset.checked_add(size).expect("offset overflow");
        assert!(
            end <= self.len,
            "area {offset}+{size} outside the region of {}",
            self.len
        );
        // SAFETY: `offset <= len` (checked above), so the result stays within the mapping (or one
        // past its end when size is 0), which `self` keeps alive.
        unsafe { self.base.as_ptr().add(offset) }
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are the mapping made in `new`; every `SplitQueue` holds an `Arc` to
        // this object, so none is left that could use the pointers after this.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}

/// Where one queue's areas lie in the shared region (byte offsets from its start).
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueLayout {
    /// Ring entries (a power of two).
    pub(crate) size: u16,
    /// Requests that can be in flight (the job's iodepth).
    pub(crate) slots: u16,
    /// Bytes per data buffer.
    pub(crate) block_len: u32,
    desc: usize,
    avail: usize,
    used: usize,
    meta: usize,
    data: usize,
    data_stride: usize,
    /// First byte after this queue's areas.
    pub(crate) end: usize,
}

impl QueueLayout {
    /// Lays out a queue for `slots` requests of `block_len` bytes, starting at `start`.
    /// `None` if the slots need more descriptors than [`MAX_QUEUE_SIZE`].
    pub(crate) fn new(start: usize, slots: u16, block_len: u32) -> Option<QueueLayout> {
        let descs = slots.checked_mul(DESCS_PER_REQUEST)?;
        let size = descs.checked_next_power_of_two()?.max(8);
        if slots == 0 || size > MAX_QUEUE_SIZE {
            return None;
        }
        let n = usize::from(size);
        let desc = round_up(start, PAGE);
        let avail = round_up(desc + 16 * n, PAGE);
        // flags, idx, ring[n], used_event
        let used = round_up(avail + 6 + 2 * n, PAGE);
        // flags, idx, ring[n] of (id, len), avail_event
        let meta = round_up(used + 6 + 8 * n, PAGE);
        let data = round_up(meta + META_STRIDE * usize::from(slots), PAGE);
        let data_stride = round_up(usize::try_from(block_len).ok()?, PAGE);
        let end = data.checked_add(data_stride.checked_mul(usize::from(slots))?)?;
        Some(QueueLayout {
            size,
            slots,
            block_len,
            desc,
            avail,
            used,
            meta,
            data,
            data_stride,
            end,
        })
    }
}

/// Ring addresses of a queue, as SET_VRING_ADDR wants them (user addresses).
pub(crate) struct RingAddrs {
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
}

/// The driver side of one split virtqueue with its request slots.
///
/// Single-threaded by construction (it is `Send`, not `Sync`): one generator thread owns it.
pub(crate) struct SplitQueue {
    mem: Arc<SharedMemory>,
    layout: QueueLayout,
    event_idx: bool,
    /// Next avail index to fill (not yet visible to the device until `publish`).
    avail_next: u16,
    /// Avail index last published to the device.
    avail_published: u16,
    /// `used_event` as last written while suppressing notifications (EVENT_IDX), if it was.
    suppressed_at: Option<u16>,
    /// Per slot: whether its data descriptor is currently device-writable. The flags are only
    /// rewritten when the direction changes, so the descriptor table's cache lines stay shared.
    data_writable: Vec<bool>,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    meta: *mut u8,
    data: *mut u8,
}

// SAFETY: the raw pointers point into `mem`, which the `Arc` keeps mapped wherever the queue goes;
// nothing else in this process uses this queue's areas.
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Takes ownership of the areas of `layout` in `mem` and writes the fixed descriptor chains.
    /// Panics if `layout` does not lie inside `mem` (a bug in the caller, not device input).
    pub(crate) fn new(mem: Arc<SharedMemory>, layout: QueueLayout, event_idx: bool) -> Self {
        let n = usize::from(layout.size);
        let slots = usize::from(layout.slots);
        let desc = mem.ptr_at(layout.desc, 16 * n);
        let avail = mem.ptr_at(layout.avail, 6 + 2 * n);
        let used = mem.ptr_at(layout.used, 6 + 8 * n);
        let meta = mem.ptr_at(layout.meta, META_STRIDE * slots);
        let data = mem.ptr_at(layout.data, layout.data_stride * slots);
        let _ = mem.ptr_at(0, layout.end);
        assert!(usize::from(DESCS_PER_REQUEST) * slots <= n);
        let mut q = SplitQueue {
            mem,
            layout,
            event_idx,
            avail_next: 0,
            avail_published: 0,
            suppressed_at: None,
            data_writable: vec![false; slots],
            desc,
            avail,
            used,
            meta,
            data,
        };
        for slot in 0..layout.slots {
            let head = slot * DESCS_PER_REQUEST;
            let meta_gpa = q.gpa(layout.meta + META_STRIDE * usize::from(slot));
            let data_gpa = q.gpa(layout.data + layout.data_stride * usize::from(slot));
            q.write_desc(head, meta_gpa, HEADER_LEN, F_NEXT, head + 1);
            q.write_desc(head + 1, data_gpa, layout.block_len, F_NEXT, head + 2);
            q.write_desc(head + 2, meta_gpa + STATUS_AT as u64, 1, F_WRITE, 0);
        }
        q
    }

    fn gpa(&self, offset: usize) -> u64 {
        GUEST_PHYS_BASE + offset as u64
    }

    /// Ring addresses for SET_VRING_ADDR.
    pub(crate) fn ring_addrs(&self) -> RingAddrs {
        let base = self.mem.user_addr();
        RingAddrs {
            desc: base + self.layout.desc as u64,
            avail: base + self.layout.avail as u64,
            used: base + self.layout.used as u64,
        }
    }

    /// Ring entries.
    pub(crate) fn size(&self) -> u16 {
        self.layout.size
    }

    fn write_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.layout.size);
        // SAFETY: `index < size`, so the 16-byte descriptor lies in the table checked in `new`;
        // volatile because the device reads it concurrently. The table is 16-byte aligned (page).
        unsafe {
            let d = self.desc.add(16 * usize::from(index));
            d.cast::<u64>().write_volatile(addr.to_le());
            d.add(8).cast::<u32>().write_volatile(len.to_le());
            d.add(12).cast::<u16>().write_volatile(flags.to_le());
            d.add(14).cast::<u16>().write_volatile(next.to_le());
        }
    }

    /// Fills slot `slot`'s request (type and sector) and resets its status byte.
    /// The slot must not be in flight.
    pub(crate) fn prepare(
        &mut self,
        slot: u16,
        request_type: u32,
        sector: u64,
        device_writes: bool,
    ) {
        assert!(slot < self.layout.slots);
        // SAFETY: slot < slots, so the meta line lies in the area checked in `new`; the slot is
        // free, so the device does not read it now. (The reserved field stays 0 from creation.)
        unsafe {
            let m = self.meta.add(META_STRIDE * usize::from(slot));
            m.cast::<u32>().write_volatile(request_type.to_le());
            m.add(8).cast::<u64>().write_volatile(sector.to_le());
            m.add(STATUS_AT).write_volatile(0xff);
        }
        let writable = &mut self.data_writable[usize::from(slot)];
        if *writable != device_writes {
            *writable = device_writes;
            let flags = if device_writes {
                F_NEXT | F_WRITE
            } else {
                F_NEXT
            };
            let data_desc = slot * DESCS_PER_REQUEST + 1;
            // SAFETY: data_desc < 3 * slots <= size, so the flags field lies in the descriptor
            // table checked in `new`; the slot is free, so the device does not read it now.
            unsafe {
                let f = self
                    .desc
                    .add(16 * usize::from(data_desc) + 12)
                    .cast::<u16>();
                f.write_volatile(flags.to_le());
            }
        }
    }

    /// Puts slot `slot`'s chain head in the next avail entry (not yet published).
    pub(crate) fn push_avail(&mut self, slot: u16) {
        assert!(slot < self.layout.slots);
        let pos = usize::from(self.avail_next & (self.layout.size - 1));
        // SAFETY: pos < size, inside the avail ring checked in `new`; entries at and past the
        // published idx are not read by the device until the idx store in `publish`.
        unsafe {
            let e = self.avail.add(4 + 2 * pos).cast::<u16>();
            e.write_volatile((slot * DESCS_PER_REQUEST).to_le());
        }
        self.avail_next = self.avail_next.wrapping_add(1);
    }

    /// Makes the pushed entries visible to the device and tells whether it wants a kick
    /// (virtio 1.2, 2.7.13 "Supplying Buffers to The Device" and 2.7.10 "Available Buffer
    /// Notification Suppression").
    pub(crate) fn publish(&mut self) -> bool {
        let old = self.avail_published;
        let new = self.avail_next;
        if old == new {
            return false;
        }
        // SAFETY: the avail idx field (offset 2, 2-byte aligned) lies in the avail ring checked in
        // `new`; it is only ever accessed atomically by us, and the device reads it.
        let idx = unsafe { AtomicU16::from_ptr(self.avail.add(2).cast::<u16>()) };
        // 2.7.13.3.1: the ring entries must be visible before the idx that covers them (release).
        idx.store(new.to_le(), Ordering::Release);
        self.avail_published = new;
        // 2.7.13.4.1: the idx update must be visible before we read the suppression fields, or
        // the device could go to sleep between our read and its check (full barrier).
        fence(Ordering::SeqCst);
        if self.event_idx {
            // SAFETY: avail_event follows the used ring's `size` entries, inside the area
            // checked in `new`; the device writes it, so read it volatile.
            let event = unsafe {
                let p = self.used.add(4 + 8 * usize::from(self.layout.size));
                u16::from_le(p.cast::<u16>().read_volatile())
            };
            need_event(event, new, old)
        } else {
            // SAFETY: used flags at offset 0 of the used ring checked in `new`.
            let flags = unsafe { u16::from_le(self.used.cast::<u16>().read_volatile()) };
            flags & F_NO_NOTIFY == 0
        }
    }

    /// The device's used idx (2.7.14 "Receiving Used Buffers From The Device"). Entries before it
    /// may be read after this returns (acquire).
    pub(crate) fn used_idx(&self) -> u16 {
        // SAFETY: used idx (offset 2, aligned) inside the used ring checked in `new`; the device
        // updates it, only atomic access here.
        let idx = unsafe { AtomicU16::from_ptr(self.used.add(2).cast::<u16>()) };
        u16::from_le(idx.load(Ordering::Acquire))
    }

    /// The used entry at ring index `idx` (wrapped): `(id, len)` exactly as the device wrote them.
    pub(crate) fn used_elem(&self, idx: u16) -> (u32, u32) {
        let pos = usize::from(idx & (self.layout.size - 1));
        // SAFETY: pos < size, inside the used ring checked in `new`; the device wrote the entry
        // before publishing the used idx we loaded with acquire.
        unsafe {
            let e = self.used.add(4 + 8 * pos);
            (
                u32::from_le(e.cast::<u32>().read_volatile()),
                u32::from_le(e.add(4).cast::<u32>().read_volatile()),
            )
        }
    }

    /// The status byte of `slot` (valid after its used entry was seen).
    pub(crate) fn status(&self, slot: u16) -> u8 {
        assert!(slot < self.layout.slots);
        // SAFETY: slot < slots, so the byte lies in the meta area checked in `new`.
        unsafe {
            self.meta
                .add(META_STRIDE * usize::from(slot) + STATUS_AT)
                .read_volatile()
        }
    }

    /// Slot that chain head `id` from the used ring names, if it is one of ours.
    pub(crate) fn slot_of(&self, id: u32) -> Option<u16> {
        let id = u16::try_from(id).ok()?;
        (id % DESCS_PER_REQUEST == 0 && id / DESCS_PER_REQUEST < self.layout.slots)
            .then_some(id / DESCS_PER_REQUEST)
    }

    /// Copies `src` (at most one block) into `slot`'s data buffer. The slot must not be in flight.
    pub(crate) fn write_data(&mut self, slot: u16, src: &[u8]) {
        assert!(slot < self.layout.slots && src.len() <= self.layout.data_stride);
        // SAFETY: the destination lies in slot's data buffer (slot < slots, len <= stride) inside
        // the area checked in `new`; `src` is private memory, so the two cannot overlap. A copy
        // through raw pointers makes no claim about the device not touching the bytes.
        unsafe {
            let dst = self.data.add(self.layout.data_stride * usize::from(slot));
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        }
    }

    /// Copies `slot`'s data buffer into `dst` (at most one block). Use after the slot completed.
    pub(crate) fn read_data(&self, slot: u16, dst: &mut [u8]) {
        assert!(slot < self.layout.slots && dst.len() <= self.layout.data_stride);
        // SAFETY: as in `write_data`, with source and destination swapped.
        unsafe {
            let src = self.data.add(self.layout.data_stride * usize::from(slot));
            std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len());
        }
    }

    /// Asks the device not to signal completions (2.7.7 "Used Buffer Notification
    /// Suppression"); `last_used` is the used idx consumed so far. Used by the poll mode.
    pub(crate) fn suppress_notifications(&mut self, last_used: u16) {
        if self.event_idx {
            // An event index behind everything the device has used is not crossed until the
            // used idx runs 2^16 entries past it; rewrite it every 2^14 entries (rather than on
            // every reap: the device reads that cache line on every completion).
            let stale = self
                .suppressed_at
                .is_none_or(|at| last_used.wrapping_sub(at) >= 1 << 14);
            if stale {
                let event = last_used.wrapping_sub(1);
                self.write_used_event(event);
                self.suppressed_at = Some(event);
            }
        } else {
            self.write_avail_flags(F_NO_INTERRUPT);
        }
    }

    /// Asks the device to signal the next completion after `last_used`, then re-reads the used
    /// idx (full barrier between) so that a completion that raced with this is not missed.
    pub(crate) fn request_notification(&mut self, last_used: u16) -> u16 {
        self.suppressed_at = None;
        if self.event_idx {
            self.write_used_event(last_used);
        } else {
            self.write_avail_flags(0);
        }
        fence(Ordering::SeqCst);
        self.used_idx()
    }

    fn write_used_event(&mut self, value: u16) {
        // SAFETY: used_event follows the avail ring's `size` entries, inside the area checked in
        // `new`; the device reads it, so write it volatile.
        unsafe {
            let p = self.avail.add(4 + 2 * usize::from(self.layout.size));
            p.cast::<u16>().write_volatile(value.to_le());
        }
    }

    fn write_avail_flags(&mut self, flags: u16) {
        // SAFETY: avail flags at offset 0 of the avail ring checked in `new`.
        unsafe { self.avail.cast::<u16>().write_volatile(flags.to_le()) }
    }
}

/// The device's side of a queue, for tests: pops avail entries and pushes used entries into
/// the same shared memory, well-behaved or not.
#[cfg(test)]
pub(crate) struct DeviceSide {
    _mem: Arc<SharedMemory>,
    layout: QueueLayout,
    avail: *mut u8,
    used: *mut u8,
    meta: *mut u8,
    last_avail: u16,
    used_idx: u16,
}

// SAFETY: as for `SplitQueue`: pointers into the `Arc`-held mapping, used by one thread.
#[cfg(test)]
unsafe impl Send for DeviceSide {}

#[cfg(test)]
impl DeviceSide {
    pub(crate) fn new(q: &SplitQueue) -> Self {
        DeviceSide {
            _mem: Arc::clone(&q.mem),
            layout: q.layout,
            avail: q.avail,
            used: q.used,
            meta: q.meta,
            last_avail: 0,
            used_idx: 0,
        }
    }

    /// The next available chain head and its request type, if the driver published one.
    pub(crate) fn pop(&mut self) -> Option<(u16, u32)> {
        // SAFETY: avail idx and ring entries lie in the avail ring checked in `SplitQueue::new`.
        let (idx, head) = unsafe {
            let idx = AtomicU16::from_ptr(self.avail.add(2).cast::<u16>()).load(Ordering::Acquire);
            if idx == self.last_avail {
                return None;
            }
            let pos = usize::from(self.last_avail & (self.layout.size - 1));
            (
                idx,
                self.avail.add(4 + 2 * pos).cast::<u16>().read_volatile(),
            )
        };
        let _ = idx;
        self.last_avail = self.last_avail.wrapping_add(1);
        let slot = usize::from(head / DESCS_PER_REQUEST);
        assert!(slot < usize::from(self.layout.slots));
        // SAFETY: the slot's meta line lies in the meta area checked in `SplitQueue::new`.
        let request_type = unsafe {
            self.meta
                .add(META_STRIDE * slot)
                .cast::<u32>()
                .read_volatile()
        };
        Some((head, request_type))
    }

    /// Writes the status byte of the request whose chain starts at `head`.
    pub(crate) fn set_status(&mut self, head: u16, status: u8) {
        let slot = usize::from(head / DESCS_PER_REQUEST);
        assert!(slot < usize::from(self.layout.slots));
        // SAFETY: as in `pop`.
        unsafe {
            self.meta
                .add(META_STRIDE * slot + STATUS_AT)
                .write_volatile(status)
        }
    }

    /// Writes used entries and publishes them at once, moving the idx by `advance` (normally
    /// `entries.len()`).
    pub(crate) fn push_used(&mut self, entries: &[(u32, u32)], advance: u16) {
        for (i, (id, len)) in entries.iter().enumerate() {
            let i = u16::try_from(i).unwrap();
            let pos = usize::from(self.used_idx.wrapping_add(i) & (self.layout.size - 1));
            // SAFETY: the entry lies in the used ring checked in `SplitQueue::new`.
            unsafe {
                let e = self.used.add(4 + 8 * pos);
                e.cast::<u32>().write_volatile(*id);
                e.add(4).cast::<u32>().write_volatile(*len);
            }
        }
        self.used_idx = self.used_idx.wrapping_add(advance);
        // SAFETY: the used idx lies in the used ring checked in `SplitQueue::new`.
        let idx = unsafe { AtomicU16::from_ptr(self.used.add(2).cast::<u16>()) };
        idx.store(self.used_idx, Ordering::Release);
    }
}

/// `vring_need_event` of the virtio spec (2.7.10): whether moving an index from `old` to `new`
/// crosses `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_fires_only_when_the_event_index_is_crossed() {
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(10, 9, 3));
        // Across the 2^16 wrap.
        assert!(need_event(0xffff, 2, 0xfff0));
        assert!(!need_event(3, 2, 0xfff0));
    }

    #[test]
    fn layout_fits_slots_and_rejects_too_many() {
        let l = QueueLayout::new(0, 32, 4096).unwrap();
        assert_eq!(l.size, 128);
        assert!(l.end >= l.data + 32 * 4096);
        assert_eq!(QueueLayout::new(0, 341, 4096).unwrap().size, 1024);
        assert!(QueueLayout::new(0, 342, 4096).is_none());
        assert!(QueueLayout::new(0, 0, 4096).is_none());
    }

    #[test]
    fn queue_round_trip_through_shared_memory() {
        let layout = QueueLayout::new(0, 4, 4096).unwrap();
        let mem = Arc::new(SharedMemory::new(layout.end).unwrap());
        let mut q = SplitQueue::new(mem, layout, false);
        q.prepare(2, 0, 8, true);
        q.push_avail(2);
        // Nobody has set NO_NOTIFY: a kick is wanted.
        assert!(q.publish());
        assert!(!q.publish(), "nothing new, no kick");
        assert_eq!(q.used_idx(), 0);
        assert_eq!(q.status(2), 0xff);
        assert_eq!(q.slot_of(6), Some(2));
        assert_eq!(q.slot_of(7), None);
        assert_eq!(q.slot_of(12), None);
        q.write_data(1, &[7u8; 4096]);
        let mut back = [0u8; 4096];
        q.read_data(1, &mut back);
        assert!(back.iter().all(|b| *b == 7));
    }
}
