//! Driver side of a split virtqueue, for tests and benches (feature `test-utils`).
//!
//! [`MockDriver`] owns a memfd mapped as one guest memory region, lays a split queue out in it and
//! plays the guest driver: writes descriptors (well-formed or hostile), publishes heads and reads
//! the used ring. It writes through the same [`MemoryTable`] the device side reads, so it needs
//! no mapping of its own. Panics on misuse: it is test code.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use crate::memory::{GuestSlice, MemoryTable, RegionDesc};
use crate::narrow_u16;
use crate::queue::{AddressSpace, QueueConfig, SplitQueue};

/// Guest-physical address of the mock's single region (address 0 is deliberately unmapped).
pub const GUEST_BASE: u64 = 0x10_0000;
/// Where the mock pretends the frontend has the region mapped.
pub const FRONTEND_BASE: u64 = 0x7f00_0000_0000;

pub const F_NEXT: u16 = narrow_u16(VRING_DESC_F_NEXT);
pub const F_WRITE: u16 = narrow_u16(VRING_DESC_F_WRITE);
pub const F_INDIRECT: u16 = narrow_u16(VRING_DESC_F_INDIRECT);

/// A descriptor exactly as the driver writes it, hostile values allowed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One buffer of a chain the mock builds: `write` for device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// Addresses of a virtio-blk request laid out by [`MockDriver::add_blk_request`].
#[derive(Clone, Copy, Debug)]
pub struct BlkLayout {
    pub head: u16,
    pub data: u64,
    pub status: u64,
}

/// The guest driver of one split queue in a memfd-backed guest memory. See the module docs.
pub struct MockDriver {
    _file: File,
    table: Arc<MemoryTable>,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    mem_end: u64,
    next_free: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl MockDriver {
    /// A queue of `queue_size` entries at the start of `mem_bytes` of guest memory.
    pub fn new(queue_size: u16, mem_bytes: u64) -> MockDriver {
        let fd = nix::sys::memfd::memfd_create(c"ringblk-mock", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd_create");
        let file = File::from(fd);
        file.set_len(mem_bytes).expect("size the memfd");
        let region = RegionDesc {
            guest_phys_addr: GUEST_BASE,
            memory_size: mem_bytes,
            userspace_addr: FRONTEND_BASE,
            mmap_offset: 0,
        };
        let table = Arc::new(MemoryTable::new(&[(region, file.as_fd())]).expect("mock table"));
        let n = u64::from(queue_size);
        let desc_table = GUEST_BASE;
        let avail_ring = desc_table + 16 * n;
        let used_ring = (avail_ring + 6 + 2 * n).next_multiple_of(4096);
        let next_free = (used_ring + 6 + 8 * n).next_multiple_of(4096);
        assert!(
            next_free < GUEST_BASE + mem_bytes,
            "guest memory too small for the queue"
        );
        MockDriver {
            _file: file,
            table,
            size: queue_size,
            desc_table,
            avail_ring,
            used_ring,
            mem_end: GUEST_BASE + mem_bytes,
            next_free,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    pub fn table(&self) -> &Arc<MemoryTable> {
        &self.table
    }

    /// The queue's addresses, guest-physical.
    pub fn queue_config(&self, event_idx: bool, indirect_desc: bool) -> QueueConfig {
        QueueConfig {
            size: u32::from(self.size),
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
            addresses: AddressSpace::GuestPhysical,
            event_idx,
            indirect_desc,
        }
    }

    /// The device side, with EVENT_IDX and INDIRECT_DESC negotiated.
    pub fn device_queue(&self) -> SplitQueue {
        SplitQueue::new(Arc::clone(&self.table), self.queue_config(true, true)).expect("mock queue")
    }

    fn slice(&self, addr: u64, len: u64) -> GuestSlice<'_> {
        self.table
            .guest_slice(addr, len)
            .expect("mock access inside guest memory")
    }

    /// `len` bytes of fresh guest memory, 16-byte aligned. Wraps around to the first free byte
    /// after the rings when memory runs out (old buffers get reused).
    pub fn alloc(&mut self, len: u64) -> u64 {
        let start = (self.used_ring + 6 + 8 * u64::from(self.size)).next_multiple_of(4096);
        if self.next_free + len > self.mem_end {
            self.next_free = start;
        }
        let addr = self.next_free;
        assert!(
            addr + len <= self.mem_end,
            "allocation larger than guest memory"
        );
        self.next_free = (addr + len).next_multiple_of(16);
        addr
    }

    pub fn write(&self, addr: u64, bytes: &[u8]) {
        self.slice(addr, bytes.len() as u64)
            .copy_from(0, bytes)
            .unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.slice(addr, len as u64).copy_to(0, &mut v).unwrap();
        v
    }

    /// Writes descriptor `index` of the queue's table.
    pub fn write_descriptor(&self, index: u16, d: RawDesc) {
        self.write(self.desc_table + 16 * u64::from(index), &encode(d));
    }

    /// Writes `descs` as an indirect table in fresh memory; returns its address and length.
    pub fn write_indirect_table(&mut self, descs: &[RawDesc]) -> (u64, u32) {
        let len = 16 * descs.len();
        let addr = self.alloc(len as u64);
        for (i, d) in descs.iter().enumerate() {
            self.write(addr + 16 * i as u64, &encode(*d));
        }
        (addr, u32::try_from(len).unwrap())
    }

    fn take_descriptor(&mut self) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % self.size;
        i
    }

    /// Writes `bufs` as a direct chain in the next free descriptors and publishes its head.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= usize::from(self.size));
        let indices: Vec<u16> = bufs.iter().map(|_| self.take_descriptor()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let more = i + 1 < bufs.len();
            self.write_descriptor(
                indices[i],
                RawDesc {
                    addr: b.addr,
                    len: b.len,
                    flags: if b.write { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 },
                    next: if more { indices[i + 1] } else { 0 },
                },
            );
        }
        self.publish(indices[0]);
        indices[0]
    }

    /// Writes `bufs` as an indirect table behind one descriptor and publishes its head.
    pub fn add_indirect_chain(&mut self, bufs: &[Buf]) -> u16 {
        let descs: Vec<RawDesc> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let more = i + 1 < bufs.len();
                RawDesc {
                    addr: b.addr,
                    len: b.len,
                    flags: if b.write { F_WRITE } else { 0 } | if more { F_NEXT } else { 0 },
                    next: if more {
                        u16::try_from(i + 1).unwrap()
                    } else {
                        0
                    },
                }
            })
            .collect();
        let (addr, len) = self.write_indirect_table(&descs);
        let head = self.take_descriptor();
        self.write_descriptor(
            head,
            RawDesc {
                addr,
                len,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        self.publish(head);
        head
    }

    /// Puts `head` in the next avail slot and bumps avail idx.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.slice(self.avail_ring + 4 + 2 * slot, 2)
            .store_u16(0, head)
            .unwrap();
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// Stores avail idx as is (hostile values allowed).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.slice(self.avail_ring, 4)
            .store_u16_atomic(2, idx, Ordering::Release)
            .unwrap();
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    pub fn set_avail_flags(&self, flags: u16) {
        self.slice(self.avail_ring, 2).store_u16(0, flags).unwrap();
    }

    pub fn set_used_event(&self, event: u16) {
        let at = self.avail_ring + 4 + 2 * u64::from(self.size);
        self.slice(at, 2).store_u16(0, event).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.slice(self.used_ring, 4)
            .load_u16_atomic(2, Ordering::Acquire)
            .unwrap()
    }

    pub fn used_flags(&self) -> u16 {
        self.slice(self.used_ring, 2).load_u16(0).unwrap()
    }

    pub fn avail_event(&self) -> u16 {
        let at = self.used_ring + 4 + 8 * u64::from(self.size);
        self.slice(at, 2).load_u16(0).unwrap()
    }

    /// Used entry `i` (modulo the size): (id, len).
    pub fn used_entry(&self, i: u16) -> (u32, u32) {
        let at = self.used_ring + 4 + 8 * u64::from(i % self.size);
        let s = self.slice(at, 8);
        (s.load_u32(0).unwrap(), s.load_u32(4).unwrap())
    }

    /// Lays out a virtio-blk request (header, `data_len` bytes of data, status), `indirect` or
    /// direct with three descriptors, and publishes it. Data is device-writable for IN and
    /// GET_ID, readable otherwise.
    pub fn add_blk_request(
        &mut self,
        request_type: u32,
        sector: u64,
        data_len: u32,
        indirect: bool,
    ) -> BlkLayout {
        let header = self.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(header, &h);
        let data = self.alloc(u64::from(data_len));
        let status = self.alloc(1);
        self.write(status, &[0xff]);
        let data_write = matches!(
            request_type,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN
                | virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID
        );
        let mut bufs = vec![Buf {
            addr: header,
            len: 16,
            write: false,
        }];
        if data_len > 0 {
            bufs.push(Buf {
                addr: data,
                len: data_len,
                write: data_write,
            });
        }
        bufs.push(Buf {
            addr: status,
            len: 1,
            write: true,
        });
        let head = if indirect {
            self.add_indirect_chain(&bufs)
        } else {
            self.add_chain(&bufs)
        };
        BlkLayout { head, data, status }
    }
}

fn encode(d: RawDesc) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..].copy_from_slice(&d.next.to_le_bytes());
    b
}
