//! Split virtqueue, device side (virtio 1.2 §2.7).
//!
//! A [`SplitQueue`] owns the device's view of one virtqueue: where its three parts lie in guest
//! memory (checked once against the memory table, then resolved through it on every access), the
//! next avail entry to consume, and the used entries written but not yet published. It is used
//! by exactly one context (no lock, no atomics of its own); only the ring index fields shared with
//! the driver are accessed atomically, with the fences the spec requires.
//!
//! Everything read from the rings is untrusted. A violation of the ring rules (avail idx jumping
//! by more than the queue size, a head or next index out of range, a chain that loops or is too
//! long, an address outside guest memory, a malformed indirect table) makes [`SplitQueue::pop`]
//! return an error once and marks the queue **broken**: later pops return nothing until the
//! frontend resets the queue. Other queues are unaffected.

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};

use crate::memory::{GuestRange, GuestSlice, MemoryError, MemoryTable};
use crate::narrow_u16;
use crate::small::SmallList;

/// Largest queue size (§2.7: "The maximum Queue Size value is 32768").
pub const QUEUE_SIZE_MAX: u32 = 32768;

/// Indirect tables may hold up to `max(queue size, INDIRECT_DESCRIPTORS_MAX)` descriptors.
///
/// §2.7.5.3.1 bounds a chain by the queue size, but Linux builds indirect tables of up to
/// `seg_max + 2` entries whatever the queue size, and a device "MAY have a reasonable limit"
/// (§2.7.4.1). This one matches IOV_MAX, the most segments one io_uring op takes; advertise
/// `seg_max <= INDIRECT_DESCRIPTORS_MAX - 2`.
pub const INDIRECT_DESCRIPTORS_MAX: u32 = 1024;

const F_NEXT: u16 = narrow_u16(VRING_DESC_F_NEXT);
const F_WRITE: u16 = narrow_u16(VRING_DESC_F_WRITE);
const F_INDIRECT: u16 = narrow_u16(VRING_DESC_F_INDIRECT);
const USED_F_NO_NOTIFY: u16 = narrow_u16(VRING_USED_F_NO_NOTIFY);
const AVAIL_F_NO_INTERRUPT: u16 = narrow_u16(VRING_AVAIL_F_NO_INTERRUPT);

const DESC_BYTES: usize = 16;
/// Offsets of the fields in the avail and used rings (§2.7.6, §2.7.8).
const RING_FLAGS: usize = 0;
const RING_IDX: usize = 2;
const RING_ENTRIES: usize = 4;
const AVAIL_ENTRY_BYTES: usize = 2;
const USED_ENTRY_BYTES: usize = 8;

/// Which address space the vring addresses are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// Guest-physical, like descriptor addresses.
    GuestPhysical,
    /// The frontend's virtual addresses (`userspace_addr` of the regions): what vhost-user's
    /// SET_VRING_ADDR carries.
    FrontendVirtual,
}

/// Where a queue lives and what was negotiated for it, as the frontend said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Number of entries (SET_VRING_NUM), validated by [`SplitQueue::new`].
    pub size: u32,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub addresses: AddressSpace,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_RING_F_INDIRECT_DESC negotiated.
    pub indirect_desc: bool,
}

/// Ring-level errors. Every one returned by `pop` leaves the queue broken. Sorted by name.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "avail idx {avail_idx} is more than the queue size {size} past next_avail {next_avail}"
    )]
    AvailIdxJump {
        avail_idx: u16,
        next_avail: u16,
        size: u16,
    },
    #[error("chain at head {head}: {source}")]
    BadAddress { head: u16, source: MemoryError },
    #[error("chain at head {head} holds more than 2^32 - 1 bytes")]
    ChainTooLarge { head: u16 },
    #[error("chain at head {head} is longer than {max} descriptors (a loop?)")]
    ChainTooLong { head: u16, max: u32 },
    #[error("avail ring slot {slot} holds head {head}, beyond the queue size {size}")]
    HeadOutOfRange { slot: u16, head: u16, size: u16 },
    #[error("chain at head {head}: an indirect table refers to another")]
    IndirectInIndirect { head: u16 },
    #[error("chain at head {head}: indirect descriptor, but VIRTIO_RING_F_INDIRECT_DESC is off")]
    IndirectNotNegotiated { head: u16 },
    #[error(
        "chain at head {head}: indirect table of {len} bytes (want a nonzero multiple of 16, at most {max} entries)"
    )]
    IndirectTableLen { head: u16, len: u32, max: u32 },
    #[error("chain at head {head}: descriptor with both INDIRECT and NEXT")]
    IndirectWithNext { head: u16 },
    #[error("queue size {0} is not a power of two in 1..=32768")]
    InvalidSize(u32),
    #[error("chain at head {head}: next index {next} beyond a table of {len}")]
    NextOutOfRange { head: u16, next: u16, len: u32 },
    #[error("{ring}: {source}")]
    Ring {
        ring: &'static str,
        source: MemoryError,
    },
    #[error("{ring} at {addr:#x} is not aligned to {align} bytes")]
    RingMisaligned {
        ring: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("{in_flight} chains popped and not used, the queue size is {size}")]
    TooManyInFlight { in_flight: u16, size: u16 },
    #[error("used head {head} beyond the queue size {size}")]
    UsedHeadOutOfRange { head: u16, size: u16 },
}

/// One buffer of a chain: a guest-physical range, checked to lie inside one memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    addr: u64,
    len: u32,
    write_only: bool,
}

impl Descriptor {
    const EMPTY: Descriptor = Descriptor {
        addr: 0,
        len: 0,
        write_only: false,
    };

    /// Guest-physical address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device-writable (VIRTQ_DESC_F_WRITE); otherwise device-readable.
    pub fn is_write_only(&self) -> bool {
        self.write_only
    }
}

/// A chain popped from the avail ring, flattened (indirect tables expanded) and with every
/// buffer checked against the memory table it holds.
#[derive(Debug)]
pub struct DescriptorChain {
    head: u16,
    descs: SmallList<Descriptor, 4>,
    table: Arc<MemoryTable>,
}

impl DescriptorChain {
    /// Index of the head descriptor: what [`SplitQueue::add_used`] takes back.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The buffers, in chain order.
    pub fn descriptors(&self) -> &[Descriptor] {
        self.descs.as_slice()
    }

    /// The memory table the buffers were checked against.
    pub fn table(&self) -> &Arc<MemoryTable> {
        &self.table
    }
}

/// A descriptor as read from guest memory, not yet checked.
struct RawDescriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_descriptor(table: &GuestSlice<'_>, index: u16) -> Result<RawDescriptor, MemoryError> {
    // One private copy, parsed once (the guest may be rewriting it).
    let b: [u8; DESC_BYTES] = table.read_array(usize::from(index) * DESC_BYTES)?;
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        l0,
        l1,
        l2,
        l3,
        f0,
        f1,
        n0,
        n1,
    ] = b;
    Ok(RawDescriptor {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    })
}

/// Whether a notification is due when the used idx moves from `old` to `new` and the driver
/// asked for one at `event` (§2.7.7.2 with VIRTIO_F_EVENT_IDX: notify if the entry at index
/// `event` was written in this step). Wrap-safe: all arithmetic is modulo 2^16.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The device side of one split virtqueue. See the module documentation.
#[derive(Debug)]
pub struct SplitQueue {
    table: Arc<MemoryTable>,
    config: QueueConfig,
    size: u16,
    desc: GuestRange,
    avail: GuestRange,
    used: GuestRange,
    /// Next avail ring entry to consume (free-running, modulo 2^16).
    next_avail: u16,
    /// Last avail idx read from the ring; entries below it need no new read of idx.
    avail_idx_seen: u16,
    /// Next used ring entry to write.
    next_used: u16,
    /// Used idx last stored to the ring.
    published_used: u16,
    /// Used idx at the last notification decision; `None` forces the next one to notify.
    signalled_used: Option<u16>,
    broken: bool,
}

impl SplitQueue {
    /// Checks `config` against `table` and sets the queue up. The used idx is read from the ring
    /// (so a reconnecting backend continues where the last one stopped); next_avail is 0 until
    /// [`SplitQueue::set_next_avail`] (SET_VRING_BASE).
    pub fn new(table: Arc<MemoryTable>, config: QueueConfig) -> Result<SplitQueue, QueueError> {
        if !(1..=QUEUE_SIZE_MAX).contains(&config.size) || !config.size.is_power_of_two() {
            return Err(QueueError::InvalidSize(config.size));
        }
        let size = u16::try_from(config.size).map_err(|_| QueueError::InvalidSize(config.size))?;
        let (desc, avail, used) = Self::locate(&table, &config, size)?;
        let mut q = SplitQueue {
            table,
            config,
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            avail_idx_seen: 0,
            next_used: 0,
            published_used: 0,
            signalled_used: None,
            broken: false,
        };
        let used_idx = q.used_ring()?.load_u16_atomic(RING_IDX, Ordering::Relaxed);
        let used_idx = used_idx.map_err(|source| QueueError::Ring {
            ring: "used ring",
            source,
        })?;
        q.avail_ring()?
            .load_u16_atomic(RING_IDX, Ordering::Relaxed)
            .map_err(|source| QueueError::Ring {
                ring: "avail ring",
                source,
            })?;
        q.set_next_used(used_idx);
        Ok(q)
    }

    /// Translates and checks the three parts (sizes and alignments of §2.7's table).
    fn locate(
        table: &MemoryTable,
        config: &QueueConfig,
        size: u16,
    ) -> Result<(GuestRange, GuestRange, GuestRange), QueueError> {
        let n = u64::from(size);
        let part = |ring: &'static str, addr: u64, align: u64, len: u64| {
            if addr % align != 0 {
                return Err(QueueError::RingMisaligned { ring, addr, align });
            }
            match config.addresses {
                AddressSpace::GuestPhysical => table.gpa_range(addr, len),
                AddressSpace::FrontendVirtual => table.uva_range(addr, len),
            }
            .map_err(|source| QueueError::Ring { ring, source })
        };
        Ok((
            part("descriptor table", config.desc_table, 16, 16 * n)?,
            part("avail ring", config.avail_ring, 2, 6 + 2 * n)?,
            part("used ring", config.used_ring, 4, 6 + 8 * n)?,
        ))
    }

    /// Moves the queue to a new memory table (after SET_MEM_TABLE or ADD/REM_MEM_REG), finding
    /// its rings again. Chains popped before keep the old table alive. On error the queue is
    /// broken.
    pub fn set_memory(&mut self, table: Arc<MemoryTable>) -> Result<(), QueueError> {
        match Self::locate(&table, &self.config, self.size) {
            Ok((desc, avail, used)) => {
                (self.desc, self.avail, self.used) = (desc, avail, used);
                self.table = table;
                Ok(())
            }
            Err(e) => {
                self.broken = true;
                Err(e)
            }
        }
    }

    fn ring(&self, range: &GuestRange, ring: &'static str) -> Result<GuestSlice<'_>, QueueError> {
        self.table
            .resolve(range)
            .map_err(|source| QueueError::Ring { ring, source })
    }

    fn avail_ring(&self) -> Result<GuestSlice<'_>, QueueError> {
        self.ring(&self.avail, "avail ring")
    }

    fn used_ring(&self) -> Result<GuestSlice<'_>, QueueError> {
        self.ring(&self.used, "used ring")
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    pub fn table(&self) -> &Arc<MemoryTable> {
        &self.table
    }

    /// Whether a ring-level violation stopped the queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The next avail entry the device will consume (GET_VRING_BASE).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Sets where consumption resumes (SET_VRING_BASE). Entries between the used idx found in
    /// the ring and `value` count as in flight until they are used; the previous backend should
    /// have completed them before reporting its base.
    pub fn set_next_avail(&mut self, value: u16) {
        self.next_avail = value;
        self.avail_idx_seen = value;
        self.signalled_used = None;
    }

    /// The next used entry the device will write; used entries below it may be unpublished.
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Sets where used entries resume, taking it as already published (the ring is not written).
    pub fn set_next_used(&mut self, value: u16) {
        self.next_used = value;
        self.published_used = value;
        self.signalled_used = None;
    }

    /// Chains popped and not yet given back with `add_used`.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.next_used)
    }

    /// Takes the next chain the driver made available, if any. An error is a ring-level
    /// violation: it is returned once and the queue is broken from then on (pops return
    /// `Ok(None)`); the caller logs it.
    pub fn pop(&mut self) -> Result<Option<DescriptorChain>, QueueError> {
        if self.broken {
            return Ok(None);
        }
        let popped = self.pop_inner();
        if popped.is_err() {
            self.broken = true;
        }
        popped
    }

    fn pop_inner(&mut self) -> Result<Option<DescriptorChain>, QueueError> {
        if self.next_avail == self.avail_idx_seen {
            let avail = self.avail_ring()?;
            let idx = avail
                .load_u16_atomic(RING_IDX, Ordering::Relaxed)
                .map_err(|source| QueueError::Ring {
                    ring: "avail ring",
                    source,
                })?;
            if idx.wrapping_sub(self.next_avail) > self.size {
                return Err(QueueError::AvailIdxJump {
                    avail_idx: idx,
                    next_avail: self.next_avail,
                    size: self.size,
                });
            }
            if idx == self.next_avail {
                return Ok(None);
            }
            self.avail_idx_seen = idx;
            // §2.7.13.3.1: the driver makes ring entries and descriptors visible before it
            // updates idx; this acquire orders our reads of them after our read of idx.
            fence(Ordering::Acquire);
        }
        // A driver reuses a head only after we return it, so at most `size` chains are out.
        if self.in_flight() >= self.size {
            return Err(QueueError::TooManyInFlight {
                in_flight: self.in_flight(),
                size: self.size,
            });
        }
        let slot = self.next_avail & (self.size - 1);
        let head = self
            .avail_ring()?
            .load_u16(RING_ENTRIES + AVAIL_ENTRY_BYTES * usize::from(slot))
            .map_err(|source| QueueError::Ring {
                ring: "avail ring",
                source,
            })?;
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange {
                slot,
                head,
                size: self.size,
            });
        }
        let chain = self.read_chain(head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Walks the chain at `head` (§2.7.5): zero or more direct descriptors, possibly ending in
    /// one that refers to an indirect table (§2.7.5.3.2).
    fn read_chain(&self, head: u16) -> Result<DescriptorChain, QueueError> {
        let table = self.ring(&self.desc, "descriptor table")?;
        let mut chain = DescriptorChain {
            head,
            descs: SmallList::new(Descriptor::EMPTY),
            table: Arc::clone(&self.table),
        };
        let mut bytes = 0u64;
        let mut index = head;
        // A direct chain longer than the table must visit some descriptor twice: a loop.
        for _ in 0..self.size {
            let d = read_descriptor(&table, index).map_err(|source| QueueError::Ring {
                ring: "descriptor table",
                source,
            })?;
            if d.flags & F_INDIRECT != 0 {
                // §2.7.5.3.1: the driver MUST NOT set INDIRECT without the feature, nor with NEXT.
                // §2.7.5.3.2: the WRITE flag of this descriptor is ignored.
                if !self.config.indirect_desc {
                    return Err(QueueError::IndirectNotNegotiated { head });
                }
                if d.flags & F_NEXT != 0 {
                    return Err(QueueError::IndirectWithNext { head });
                }
                self.read_indirect(head, &d, &mut chain, &mut bytes)?;
                return Ok(chain);
            }
            self.push(head, &d, &mut chain, &mut bytes)?;
            if d.flags & F_NEXT == 0 {
                return Ok(chain);
            }
            if d.next >= self.size {
                return Err(QueueError::NextOutOfRange {
                    head,
                    next: d.next,
                    len: u32::from(self.size),
                });
            }
            index = d.next;
        }
        Err(QueueError::ChainTooLong {
            head,
            max: u32::from(self.size),
        })
    }

    /// Appends the chain of the indirect table `d` refers to (§2.7.5.3).
    fn read_indirect(
        &self,
        head: u16,
        d: &RawDescriptor,
        chain: &mut DescriptorChain,
        bytes: &mut u64,
    ) -> Result<(), QueueError> {
        let max = INDIRECT_DESCRIPTORS_MAX.max(u32::from(self.size));
        let entries = d.len / 16;
        if d.len == 0 || d.len % 16 != 0 || entries > max {
            return Err(QueueError::IndirectTableLen {
                head,
                len: d.len,
                max,
            });
        }
        let table = self
            .table
            .guest_slice(d.addr, u64::from(d.len))
            .map_err(|source| QueueError::BadAddress { head, source })?;
        let mut index = 0u16;
        for _ in 0..entries {
            let e = read_descriptor(&table, index)
                .map_err(|source| QueueError::BadAddress { head, source })?;
            // §2.7.5.3.1: only one table per descriptor.
            if e.flags & F_INDIRECT != 0 {
                return Err(QueueError::IndirectInIndirect { head });
            }
            self.push(head, &e, chain, bytes)?;
            if e.flags & F_NEXT == 0 {
                return Ok(());
            }
            if u32::from(e.next) >= entries {
                return Err(QueueError::NextOutOfRange {
                    head,
                    next: e.next,
                    len: entries,
                });
            }
            index = e.next;
        }
        Err(QueueError::ChainTooLong { head, max: entries })
    }

    fn push(
        &self,
        head: u16,
        d: &RawDescriptor,
        chain: &mut DescriptorChain,
        bytes: &mut u64,
    ) -> Result<(), QueueError> {
        self.table
            .gpa_range(d.addr, u64::from(d.len))
            .map_err(|source| QueueError::BadAddress { head, source })?;
        // §2.7.5.2: a chain holds less than 2^32 bytes, so a used length always fits.
        *bytes += u64::from(d.len);
        if *bytes > u64::from(u32::MAX) {
            return Err(QueueError::ChainTooLarge { head });
        }
        chain.descs.push(Descriptor {
            addr: d.addr,
            len: d.len,
            write_only: d.flags & F_WRITE != 0,
        });
        Ok(())
    }

    /// Writes a used entry for the chain at `head`, `len` bytes written into it (§2.7.8). The
    /// driver sees it only after [`SplitQueue::publish_used`]. Works on a broken queue too.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        if head >= self.size {
            return Err(QueueError::UsedHeadOutOfRange {
                head,
                size: self.size,
            });
        }
        let slot = usize::from(self.next_used & (self.size - 1));
        let used = self.used_ring()?;
        let at = RING_ENTRIES + USED_ENTRY_BYTES * slot;
        used.store_u32(at, u32::from(head))
            .and_then(|()| used.store_u32(at + 4, len))
            .map_err(|source| QueueError::Ring {
                ring: "used ring",
                source,
            })?;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Makes every entry added since the last call visible to the driver by storing the used
    /// idx. Returns whether there was anything to publish.
    pub fn publish_used(&mut self) -> Result<bool, QueueError> {
        if self.next_used == self.published_used {
            return Ok(false);
        }
        // §2.7.8.2: the device MUST set len (and id) prior to updating the used idx.
        fence(Ordering::Release);
        self.used_ring()?
            .store_u16_atomic(RING_IDX, self.next_used, Ordering::Relaxed)
            .map_err(|source| QueueError::Ring {
                ring: "used ring",
                source,
            })?;
        self.published_used = self.next_used;
        Ok(true)
    }

    /// Whether the driver wants a used buffer notification for what was published since the
    /// last call (§2.7.7.2): with EVENT_IDX, if the used idx passed `used_event`; otherwise, if
    /// anything was published and VIRTQ_AVAIL_F_NO_INTERRUPT is clear.
    pub fn needs_notification(&mut self) -> Result<bool, QueueError> {
        // Our used idx store must be visible before we read the driver's suppression fields, or
        // we could read a stale "no interrupt" while the driver, having seen the old idx, waits
        // for a notification (the device-side mirror of §2.7.13.4.1's barrier).
        fence(Ordering::SeqCst);
        let ring = |source| QueueError::Ring {
            ring: "avail ring",
            source,
        };
        let avail = self.avail_ring()?;
        let suppression = if self.config.event_idx {
            avail.load_u16(RING_ENTRIES + AVAIL_ENTRY_BYTES * usize::from(self.size))
        } else {
            avail.load_u16(RING_FLAGS)
        }
        .map_err(ring)?;
        let new = self.published_used;
        let old = self.signalled_used.replace(new);
        if self.config.event_idx {
            Ok(old.is_none_or(|old| need_event(suppression, new, old)))
        } else {
            Ok(old != Some(new) && suppression & AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to notify us of new avail entries (§2.7.10), then checks for entries the
    /// driver added while notifications were off. Returns whether there are entries to pop: if
    /// so, the caller keeps processing instead of waiting for a notification that may not come.
    /// A broken queue has nothing to pop: `Ok(false)`, so that a caller looping on this cannot
    /// spin.
    pub fn enable_notification(&mut self) -> Result<bool, QueueError> {
        if self.broken {
            return Ok(false);
        }
        let used = self.used_ring()?;
        let stored = if self.config.event_idx {
            // "Notify when you write the entry at next_avail", i.e. on any new entry.
            let at = RING_ENTRIES + USED_ENTRY_BYTES * usize::from(self.size);
            used.store_u16(at, self.next_avail)
        } else {
            used.store_u16(RING_FLAGS, 0)
        };
        stored.map_err(|source| QueueError::Ring {
            ring: "used ring",
            source,
        })?;
        // The enable must be visible before we look at avail idx again; otherwise the driver may
        // add an entry, still see notifications off, and never notify, while we saw no entry
        // (the device-side form of the re-check pattern in §2.7.14's note).
        fence(Ordering::SeqCst);
        let idx = self
            .avail_ring()?
            .load_u16_atomic(RING_IDX, Ordering::Relaxed)
            .map_err(|source| QueueError::Ring {
                ring: "avail ring",
                source,
            })?;
        Ok(idx != self.next_avail)
    }

    /// Tells the driver it need not notify us of new avail entries (§2.7.10). Only a hint: the
    /// driver may still notify.
    pub fn disable_notification(&mut self) -> Result<(), QueueError> {
        let used = self.used_ring()?;
        let stored = if self.config.event_idx {
            // An avail_event the driver has already passed: its need_event check stays false
            // until its idx wraps 2^16 entries later (and enable rewrites it long before).
            let at = RING_ENTRIES + USED_ENTRY_BYTES * usize::from(self.size);
            used.store_u16(at, self.next_avail.wrapping_sub(1))
        } else {
            used.store_u16(RING_FLAGS, USED_F_NO_NOTIFY)
        };
        stored.map_err(|source| QueueError::Ring {
            ring: "used ring",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        Buf, F_INDIRECT, F_NEXT, F_WRITE, FRONTEND_BASE, GUEST_BASE, MockDriver, RawDesc,
    };

    const MEM: u64 = 1 << 20;

    fn driver() -> MockDriver {
        MockDriver::new(16, MEM)
    }

    fn bufs(d: &mut MockDriver, lens: &[(u32, bool)]) -> Vec<Buf> {
        lens.iter()
            .map(|&(len, write)| Buf {
                addr: d.alloc(u64::from(len)),
                len,
                write,
            })
            .collect()
    }

    fn as_descs(b: &[Buf]) -> Vec<(u64, u32, bool)> {
        b.iter().map(|b| (b.addr, b.len, b.write)).collect()
    }

    fn chain_descs(c: &DescriptorChain) -> Vec<(u64, u32, bool)> {
        c.descriptors()
            .iter()
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect()
    }

    #[test]
    fn pop_returns_direct_chain_in_order() {
        let mut d = driver();
        let mut q = d.device_queue();
        let b = bufs(&mut d, &[(16, false), (4096, true), (1, true)]);
        let head = d.add_chain(&b);
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(chain_descs(&c), as_descs(&b));
        assert!(q.pop().unwrap().is_none());
        assert_eq!(q.in_flight(), 1);
    }

    #[test]
    fn pop_expands_indirect_chain() {
        let mut d = driver();
        let mut q = d.device_queue();
        let b = bufs(&mut d, &[(16, false), (512, true), (512, true), (1, true)]);
        let head = d.add_indirect_chain(&b);
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(chain_descs(&c), as_descs(&b));
    }

    #[test]
    fn pop_follows_direct_descriptors_into_a_final_indirect_table() {
        // §2.7.5.3.2: zero or more direct descriptors, then one indirect.
        let mut d = driver();
        let mut q = d.device_queue();
        let b = bufs(&mut d, &[(16, false), (512, true), (1, true)]);
        let (table, len) = d.write_indirect_table(&[
            RawDesc {
                addr: b[1].addr,
                len: 512,
                flags: F_WRITE | F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: b[2].addr,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ]);
        d.write_descriptor(
            0,
            RawDesc {
                addr: b[0].addr,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
        );
        d.write_descriptor(
            1,
            RawDesc {
                addr: table,
                len,
                flags: F_INDIRECT | F_WRITE,
                next: 0,
            },
        );
        d.publish(0);
        assert_eq!(chain_descs(&q.pop().unwrap().unwrap()), as_descs(&b));
    }

    #[test]
    fn pop_on_empty_queue_returns_none() {
        let d = driver();
        let mut q = d.device_queue();
        assert!(q.pop().unwrap().is_none());
        assert!(!q.is_broken());
    }

    fn assert_breaks(d: &mut MockDriver, q: &mut SplitQueue, check: impl Fn(&QueueError) -> bool) {
        let e = q.pop().unwrap_err();
        assert!(check(&e), "unexpected error: {e}");
        assert!(q.is_broken());
        // Broken: even a good chain is not popped any more.
        let b = bufs(d, &[(16, false), (1, true)]);
        d.add_chain(&b);
        assert!(q.pop().unwrap().is_none());
    }

    #[test]
    fn descriptor_loop_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        let a = d.alloc(16);
        d.write_descriptor(
            3,
            RawDesc {
                addr: a,
                len: 16,
                flags: F_NEXT,
                next: 4,
            },
        );
        d.write_descriptor(
            4,
            RawDesc {
                addr: a,
                len: 16,
                flags: F_NEXT,
                next: 3,
            },
        );
        d.publish(3);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::ChainTooLong { head: 3, .. })
        });
    }

    #[test]
    fn indirect_loop_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        let a = d.alloc(16);
        let (t, len) = d.write_indirect_table(&[
            RawDesc {
                addr: a,
                len: 16,
                flags: F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: a,
                len: 16,
                flags: F_NEXT,
                next: 0,
            },
        ]);
        d.write_descriptor(
            0,
            RawDesc {
                addr: t,
                len,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::ChainTooLong { .. })
        });
    }

    #[test]
    fn avail_idx_jumping_by_more_than_size_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        d.set_avail_idx(17);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::AvailIdxJump { avail_idx: 17, .. })
        });
    }

    #[test]
    fn avail_idx_exactly_size_ahead_is_accepted() {
        let mut d = driver();
        let mut q = d.device_queue();
        for _ in 0..16 {
            let b = bufs(&mut d, &[(16, false), (1, true)]);
            d.add_chain(&b);
        }
        for _ in 0..16 {
            // add_chain reuses descriptors round robin: each pair was rewritten, still valid.
            assert!(q.pop().unwrap().is_some());
            let head = q.next_used() & 15;
            q.add_used(head, 1).unwrap();
        }
        assert!(!q.is_broken());
    }

    #[test]
    fn head_out_of_range_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        d.publish(16);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::HeadOutOfRange { head: 16, .. })
        });
    }

    #[test]
    fn next_out_of_range_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        let a = d.alloc(16);
        d.write_descriptor(
            0,
            RawDesc {
                addr: a,
                len: 16,
                flags: F_NEXT,
                next: 16,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::NextOutOfRange { next: 16, .. })
        });
    }

    #[test]
    fn descriptor_outside_memory_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        d.write_descriptor(
            0,
            RawDesc {
                addr: GUEST_BASE + MEM - 8,
                len: 16,
                flags: 0,
                next: 0,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::BadAddress { .. })
        });
    }

    #[test]
    fn descriptor_wrapping_2_pow_64_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        d.write_descriptor(
            0,
            RawDesc {
                addr: GUEST_BASE + 0x10_000,
                len: u32::MAX,
                flags: 0,
                next: 0,
            },
        );
        d.write_descriptor(
            1,
            RawDesc {
                addr: u64::MAX - 0x10,
                len: 0x20,
                flags: 0,
                next: 0,
            },
        );
        d.publish(1);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::BadAddress { head: 1, .. })
        });
    }

    #[test]
    fn nested_indirect_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        let (inner, len) = d.write_indirect_table(&[RawDesc {
            addr: GUEST_BASE,
            len: 16,
            ..Default::default()
        }]);
        let (outer, olen) = d.write_indirect_table(&[RawDesc {
            addr: inner,
            len,
            flags: F_INDIRECT,
            next: 0,
        }]);
        d.write_descriptor(
            0,
            RawDesc {
                addr: outer,
                len: olen,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::IndirectInIndirect { .. })
        });
    }

    #[test]
    fn indirect_with_next_marks_queue_broken() {
        let mut d = driver();
        let mut q = d.device_queue();
        let (t, len) = d.write_indirect_table(&[RawDesc {
            addr: GUEST_BASE,
            len: 16,
            ..Default::default()
        }]);
        d.write_descriptor(
            0,
            RawDesc {
                addr: t,
                len,
                flags: F_INDIRECT | F_NEXT,
                next: 1,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::IndirectWithNext { .. })
        });
    }

    #[test]
    fn indirect_without_the_feature_marks_queue_broken() {
        let mut d = driver();
        let mut q = SplitQueue::new(Arc::clone(d.table()), d.queue_config(true, false)).unwrap();
        let (t, len) = d.write_indirect_table(&[RawDesc {
            addr: GUEST_BASE,
            len: 16,
            ..Default::default()
        }]);
        d.write_descriptor(
            0,
            RawDesc {
                addr: t,
                len,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::IndirectNotNegotiated { .. })
        });
    }

    #[test]
    fn indirect_table_length_not_a_multiple_of_16_marks_queue_broken() {
        for len in [0, 15, 17] {
            let mut d = driver();
            let mut q = d.device_queue();
            let (t, _) = d.write_indirect_table(
                &[RawDesc {
                    addr: GUEST_BASE,
                    len: 16,
                    ..Default::default()
                }; 2],
            );
            d.write_descriptor(
                0,
                RawDesc {
                    addr: t,
                    len,
                    flags: F_INDIRECT,
                    next: 0,
                },
            );
            d.publish(0);
            assert_breaks(&mut d, &mut q, |e| {
                matches!(e, QueueError::IndirectTableLen { .. })
            });
        }
    }

    #[test]
    fn indirect_table_longer_than_the_limit_marks_queue_broken() {
        let mut d = MockDriver::new(16, 1 << 20);
        let mut q = d.device_queue();
        let len = 16 * (INDIRECT_DESCRIPTORS_MAX + 1);
        let t = d.alloc(u64::from(len));
        d.write_descriptor(
            0,
            RawDesc {
                addr: t,
                len,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::IndirectTableLen { .. })
        });
    }

    #[test]
    fn chain_of_4_gib_or_more_marks_queue_broken() {
        // §2.7.5.2: a chain holds less than 2^32 bytes. A sparse 5 GiB memfd holds two buffers of
        // 2^32 - 1 bytes each, overlapping (nothing forbids that), together too large.
        let mut d = MockDriver::new(16, 5 << 30);
        let mut q = d.device_queue();
        d.write_descriptor(
            0,
            RawDesc {
                addr: GUEST_BASE,
                len: u32::MAX,
                flags: F_NEXT,
                next: 1,
            },
        );
        d.write_descriptor(
            1,
            RawDesc {
                addr: GUEST_BASE,
                len: u32::MAX,
                flags: F_WRITE,
                next: 0,
            },
        );
        d.publish(0);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::ChainTooLarge { head: 0 })
        });
    }

    #[test]
    fn too_many_chains_in_flight_marks_queue_broken() {
        let mut d = MockDriver::new(2, MEM);
        let mut q = d.device_queue();
        let b = bufs(&mut d, &[(16, false)]);
        d.add_chain(&b);
        d.add_chain(&b);
        assert!(q.pop().unwrap().is_some());
        assert!(q.pop().unwrap().is_some());
        d.add_chain(&b);
        assert_breaks(&mut d, &mut q, |e| {
            matches!(e, QueueError::TooManyInFlight { .. })
        });
    }

    #[test]
    fn invalid_queue_sizes_are_rejected() {
        let d = driver();
        for size in [0, 3, 24, 65536, u32::MAX] {
            let mut c = d.queue_config(true, true);
            c.size = size;
            assert!(
                matches!(SplitQueue::new(Arc::clone(d.table()), c), Err(QueueError::InvalidSize(s)) if s == size)
            );
        }
    }

    #[test]
    fn misaligned_ring_is_rejected() {
        let d = driver();
        let mut c = d.queue_config(true, true);
        c.used_ring += 2;
        assert!(matches!(
            SplitQueue::new(Arc::clone(d.table()), c),
            Err(QueueError::RingMisaligned { .. })
        ));
    }

    #[test]
    fn ring_outside_memory_is_rejected() {
        let d = driver();
        let mut c = d.queue_config(true, true);
        c.desc_table = GUEST_BASE + MEM - 16;
        assert!(matches!(
            SplitQueue::new(Arc::clone(d.table()), c),
            Err(QueueError::Ring { .. })
        ));
        let mut c = d.queue_config(true, true);
        c.avail_ring = u64::MAX - 1;
        assert!(matches!(
            SplitQueue::new(Arc::clone(d.table()), c),
            Err(QueueError::Ring { .. })
        ));
    }

    #[test]
    fn frontend_virtual_ring_addresses_translate() {
        let mut d = driver();
        let mut c = d.queue_config(true, true);
        for a in [&mut c.desc_table, &mut c.avail_ring, &mut c.used_ring] {
            *a = *a - GUEST_BASE + FRONTEND_BASE;
        }
        c.addresses = AddressSpace::FrontendVirtual;
        let mut q = SplitQueue::new(Arc::clone(d.table()), c).unwrap();
        let b = bufs(&mut d, &[(16, false), (1, true)]);
        d.add_chain(&b);
        assert_eq!(chain_descs(&q.pop().unwrap().unwrap()), as_descs(&b));
    }

    #[test]
    fn used_entries_are_invisible_until_published() {
        let mut d = driver();
        let mut q = d.device_queue();
        for _ in 0..3 {
            let b = bufs(&mut d, &[(16, false), (1, true)]);
            d.add_chain(&b);
        }
        let heads: Vec<u16> = (0..3).map(|_| q.pop().unwrap().unwrap().head()).collect();
        for &h in &heads {
            q.add_used(h, 1).unwrap();
        }
        assert_eq!(d.used_idx(), 0);
        assert!(q.publish_used().unwrap());
        assert_eq!(d.used_idx(), 3);
        assert!(!q.publish_used().unwrap());
        let got: Vec<(u32, u32)> = (0..3).map(|i| d.used_entry(i)).collect();
        assert_eq!(
            got,
            heads.iter().map(|&h| (u32::from(h), 1)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn add_used_rejects_head_beyond_size() {
        let d = driver();
        let mut q = d.device_queue();
        assert!(matches!(
            q.add_used(16, 0),
            Err(QueueError::UsedHeadOutOfRange { .. })
        ));
    }

    #[test]
    fn need_event_is_wrap_safe() {
        // Crossing the event exactly.
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        // Across the 2^16 wrap: old 65535, new 1 crosses events 65535 and 0.
        assert!(need_event(65535, 1, 65535));
        assert!(need_event(0, 1, 65535));
        assert!(!need_event(1, 1, 65535));
        assert!(!need_event(65534, 1, 65535));
        // Nothing published: never.
        assert!(!need_event(5, 5, 5));
    }

    #[test]
    fn needs_notification_with_event_idx_at_wrap_boundary() {
        let mut d = driver();
        let mut q = d.device_queue();
        // Resume at used idx 65534 (as after SET_VRING_BASE on a long-running queue).
        q.set_next_avail(65534);
        d.set_avail_idx(65534);
        q.set_next_used(65534);
        // First decision after a (re)start always notifies.
        assert!(q.needs_notification().unwrap());
        let complete = |d: &mut MockDriver, q: &mut SplitQueue| {
            let b = bufs(d, &[(16, false), (1, true)]);
            d.add_chain(&b);
            let h = q.pop().unwrap().unwrap().head();
            q.add_used(h, 1).unwrap();
            q.publish_used().unwrap();
        };
        d.set_used_event(65535);
        complete(&mut d, &mut q); // used idx 65534 -> 65535: entry 65534 written, event is 65535
        assert!(!q.needs_notification().unwrap());
        complete(&mut d, &mut q); // 65535 -> 0: entry 65535 written
        assert!(q.needs_notification().unwrap());
        d.set_used_event(1);
        complete(&mut d, &mut q); // 0 -> 1: entry 0
        assert!(!q.needs_notification().unwrap());
        complete(&mut d, &mut q); // 1 -> 2: entry 1
        assert!(q.needs_notification().unwrap());
        assert!(!q.needs_notification().unwrap(), "nothing new published");
    }

    #[test]
    fn needs_notification_without_event_idx_follows_no_interrupt_flag() {
        let mut d = driver();
        let mut q = SplitQueue::new(Arc::clone(d.table()), d.queue_config(false, true)).unwrap();
        let b = bufs(&mut d, &[(16, false), (1, true)]);
        d.add_chain(&b);
        d.add_chain(&b);
        let h = q.pop().unwrap().unwrap().head();
        q.add_used(h, 1).unwrap();
        q.publish_used().unwrap();
        d.set_avail_flags(1);
        assert!(!q.needs_notification().unwrap());
        d.set_avail_flags(0);
        assert!(
            !q.needs_notification().unwrap(),
            "nothing new since the last decision"
        );
        let h = q.pop().unwrap().unwrap().head();
        q.add_used(h, 1).unwrap();
        q.publish_used().unwrap();
        assert!(q.needs_notification().unwrap());
    }

    #[test]
    fn enable_notification_writes_avail_event_and_reports_pending_entries() {
        let mut d = driver();
        let mut q = d.device_queue();
        q.disable_notification().unwrap();
        assert_eq!(
            d.avail_event(),
            65535,
            "an event the driver has already passed"
        );
        assert!(!q.enable_notification().unwrap());
        assert_eq!(d.avail_event(), 0);
        let b = bufs(&mut d, &[(16, false), (1, true)]);
        d.add_chain(&b);
        assert!(
            q.enable_notification().unwrap(),
            "an entry arrived while we were not looking"
        );
        q.pop().unwrap().unwrap();
        assert!(!q.enable_notification().unwrap());
        assert_eq!(d.avail_event(), 1);
    }

    #[test]
    fn enable_notification_on_a_broken_queue_reports_nothing_to_pop() {
        let mut d = driver();
        let mut q = d.device_queue();
        d.publish(16);
        assert!(q.pop().is_err());
        let b = bufs(&mut d, &[(16, false), (1, true)]);
        d.add_chain(&b);
        assert!(!q.enable_notification().unwrap());
    }

    #[test]
    fn notification_flags_without_event_idx() {
        let d = driver();
        let mut q = SplitQueue::new(Arc::clone(d.table()), d.queue_config(false, true)).unwrap();
        q.disable_notification().unwrap();
        assert_eq!(d.used_flags(), USED_F_NO_NOTIFY);
        assert!(!q.enable_notification().unwrap());
        assert_eq!(d.used_flags(), 0);
    }

    #[test]
    fn set_memory_to_a_table_without_the_rings_marks_queue_broken() {
        let d = driver();
        let mut q = d.device_queue();
        assert!(q.set_memory(Arc::new(MemoryTable::empty())).is_err());
        assert!(q.is_broken());
    }

    #[test]
    fn chains_keep_their_table_after_set_memory() {
        let mut d = driver();
        let mut q = d.device_queue();
        let b = bufs(&mut d, &[(16, false), (1, true)]);
        d.add_chain(&b);
        let c = q.pop().unwrap().unwrap();
        let old = Arc::clone(c.table());
        q.set_memory(Arc::clone(d.table())).unwrap();
        assert!(Arc::ptr_eq(c.table(), &old));
    }
}
