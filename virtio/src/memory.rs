//! The guest memory table: the only module of this crate that holds raw pointers into guest
//! memory.
//!
//! # Ownership model
//!
//! The frontend (QEMU, cloud-hypervisor) shares the guest's RAM with us as a set of regions, each
//! a file descriptor plus the region's place in three address spaces: guest-physical (what
//! descriptors contain), frontend-virtual (what vhost-user vring addresses contain) and the
//! offset into the fd. A [`MemoryTable`] maps every region once (shared, read-write, with
//! memmap2) and is **immutable** from then on: a memory update (SET_MEM_TABLE, ADD_MEM_REG,
//! REM_MEM_REG) builds a new table, reusing the mappings of the regions it keeps. Tables are
//! shared as `Arc<MemoryTable>`, and a mapping is unmapped only when the last table that holds it
//! is dropped.
//!
//! Every pointer this module hands out is tied to a table:
//! - [`GuestSlice<'a>`] borrows the table (`'a`): a checked range for short accesses (ring
//!   fields, request headers, status bytes) through volatile or atomic loads and stores and
//!   byte copies. It cannot outlive the borrow.
//! - [`GuestBuffers`] and [`GuestByte`] own an `Arc<MemoryTable>`: the buffers of a request
//!   handed to io_uring, and its status byte. Whatever happens to the device meanwhile (a new
//!   table, a disconnect, a reset), the memory an in-flight op may touch stays mapped until the op
//!   drops its buffers, which the ring does only after reaping the op's completion.
//!
//! # Checks
//!
//! Every address and length comes from an untrusted party (the frontend or the guest). A range is
//! valid only if it lies entirely inside one region; `addr + len` overflowing 2^64 is invalid.
//! Region building checks, with overflow-checked arithmetic, that the fd is large enough for
//! `mmap_offset + memory_size` (mapping past the end of a file turns every access there into a
//! SIGBUS), that no two regions overlap in guest-physical or frontend-virtual space, and that
//! there are at most [`MAX_REGIONS`].
//!
//! # Access discipline
//!
//! Guest memory changes under our feet. Typed loads and stores are volatile (or atomic, for the
//! ring indices), and byte copies go to or from private buffers: callers parse a private copy,
//! never guest memory twice, so a guest changing a value between check and use changes nothing.
//! A frontend that shrinks a region's file after we mapped it can still make an access fault; a
//! memfd sealed against shrinking (QEMU's default for `memory-backend-memfd`) rules that out,
//! see [`MemoryTable::is_shrink_sealed`].

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::BorrowedFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use ringblk_ring::buf::{FIXED_BUFFER_BYTES_MAX, FIXED_BUFFER_SLOTS_MAX, IoBuffers};

use crate::small::SmallList;

/// Most regions a table may hold (vhost-user's memory slots).
pub const MAX_REGIONS: usize = 512;

/// Smallest fixed-buffer chunk. A ring registers guest memory lazily, one chunk at its first use,
/// so this is about what one request pins (and makes resident) beyond its own buffer.
pub const FIXED_CHUNK_MIN_BYTES: u64 = 2 << 20;

/// One memory region as the frontend describes it (vhost-user `VhostUserMemoryRegion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegionDesc {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    /// Where the frontend has the region mapped in its own address space.
    pub userspace_addr: u64,
    /// Offset of the region in the file behind its fd.
    pub mmap_offset: u64,
}

/// Errors of building a table or translating an address. Variants sorted by name.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "region {desc:x?}: its file has {file_size} bytes, less than mmap_offset + memory_size"
    )]
    BeyondFile { desc: RegionDesc, file_size: u64 },
    #[error("region {0:x?} is empty")]
    EmptyRegion(RegionDesc),
    #[error("region {desc:x?}: fstat: {source}")]
    Fstat {
        desc: RegionDesc,
        source: nix::Error,
    },
    #[error("region {desc:x?}: mmap: {source}")]
    Map { desc: RegionDesc, source: io::Error },
    #[error("offset {offset:#x} in guest memory is not aligned to {align} bytes")]
    Misaligned { offset: usize, align: usize },
    #[error("no region {0:x?} to remove")]
    NoSuchRegion(RegionDesc),
    #[error("range {addr:#x}+{len:#x} is not inside one memory region")]
    OutOfRange { addr: u64, len: u64 },
    #[error("region {0:x?}: address arithmetic overflows")]
    Overflow(RegionDesc),
    #[error("region {new:x?} overlaps region {old:x?}")]
    Overlap { new: RegionDesc, old: RegionDesc },
    #[error("access {offset:#x}+{len:#x} past the end of a {slice_len:#x}-byte guest slice")]
    SliceBounds {
        offset: usize,
        len: usize,
        slice_len: usize,
    },
    #[error("more than {MAX_REGIONS} memory regions")]
    TooManyRegions,
}

/// A region, mapped.
struct MappedRegion {
    desc: RegionDesc,
    /// Shared read-write mapping of `memory_size` bytes at `mmap_offset` of the region's fd.
    /// Unmapped when the last table holding this region drops it.
    map: MmapRaw,
    shrink_sealed: bool,
}

impl MappedRegion {
    fn map(desc: RegionDesc, fd: BorrowedFd<'_>) -> Result<MappedRegion, MemoryError> {
        if desc.memory_size == 0 {
            return Err(MemoryError::EmptyRegion(desc));
        }
        let overflow = || MemoryError::Overflow(desc);
        desc.guest_phys_addr
            .checked_add(desc.memory_size)
            .ok_or_else(overflow)?;
        desc.userspace_addr
            .checked_add(desc.memory_size)
            .ok_or_else(overflow)?;
        let file_end = desc
            .mmap_offset
            .checked_add(desc.memory_size)
            .ok_or_else(overflow)?;
        let len = usize::try_from(desc.memory_size)
            .ok()
            .filter(|&l| isize::try_from(l).is_ok())
            .ok_or_else(overflow)?;
        // Mapping past the end of the file would make accesses there SIGBUS (QSD dies on that).
        let stat =
            nix::sys::stat::fstat(fd).map_err(|source| MemoryError::Fstat { desc, source })?;
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        if file_size < file_end {
            return Err(MemoryError::BeyondFile { desc, file_size });
        }
        let map = MmapOptions::new()
            .offset(desc.mmap_offset)
            .len(len)
            .map_raw(&fd)
            .map_err(|source| MemoryError::Map { desc, source })?;
        let shrink_sealed = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .is_ok_and(|seals| seals & libc::F_SEAL_SHRINK != 0);
        Ok(MappedRegion {
            desc,
            map,
            shrink_sealed,
        })
    }

    fn gpa_end(&self) -> u64 {
        // Checked not to overflow in `map`.
        self.desc.guest_phys_addr + self.desc.memory_size
    }

    fn uva_end(&self) -> u64 {
        // Checked not to overflow in `map`.
        self.desc.userspace_addr + self.desc.memory_size
    }
}

/// A validated place in one region of a table: region index, offset and length, no pointer.
/// The queue keeps its rings as these and resolves them against its table on each access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GuestRange {
    region: u16,
    offset: usize,
    len: usize,
}

static NEXT_TABLE_ID: AtomicU64 = AtomicU64::new(1);

/// The guest's memory regions, mapped; immutable. See the module documentation.
pub struct MemoryTable {
    /// Sorted by guest-physical address; the index is the region's index everywhere.
    regions: Vec<Arc<MappedRegion>>,
    /// How the regions are cut into fixed-buffer chunks; `None` if they cannot be within the
    /// ring's slot limit.
    chunks: Option<Chunks>,
    id: u64,
}

/// The table's memory cut into fixed-buffer chunks, numbered region after region: chunk `i` of
/// region `r` is `[i * bytes, (i + 1) * bytes)` of the region (the last one may be shorter), and
/// its number is `first[r] + i`.
#[derive(Debug)]
struct Chunks {
    /// A power of two, at least [`FIXED_CHUNK_MIN_BYTES`], at most io_uring's largest buffer.
    bytes: u64,
    /// log2 of `bytes`: the hot path shifts rather than divides.
    shift: u32,
    /// First chunk number of each region.
    first: Vec<u16>,
    /// Number of chunks, at most the ring's slot limit.
    count: u16,
}

impl Chunks {
    /// Regions of these sizes cut with the smallest chunk size that keeps the chunk count within
    /// the ring's slot limit; `None` if even the largest does not.
    fn cut(region_bytes: &[u64]) -> Option<Chunks> {
        let mut bytes = FIXED_CHUNK_MIN_BYTES;
        while bytes <= FIXED_BUFFER_BYTES_MAX {
            let mut first = Vec::with_capacity(region_bytes.len());
            let mut count = 0u64;
            for size in region_bytes {
                first.push(count);
                count = count.checked_add(size.div_ceil(bytes))?;
            }
            if count <= u64::from(FIXED_BUFFER_SLOTS_MAX) {
                return Some(Chunks {
                    bytes,
                    shift: bytes.trailing_zeros(),
                    first: first
                        .into_iter()
                        .map(u16::try_from)
                        .collect::<Result<_, _>>()
                        .ok()?,
                    count: u16::try_from(count).ok()?,
                });
            }
            bytes = bytes.checked_mul(2)?;
        }
        None
    }
}

impl fmt::Debug for MemoryTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTable")
            .field("id", &self.id)
            .field(
                "regions",
                &self.regions.iter().map(|r| r.desc).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl MemoryTable {
    /// A table with no region: every translation fails.
    pub fn empty() -> MemoryTable {
        MemoryTable::assemble(Vec::new()).expect("an empty table is valid")
    }

    /// Maps `regions` (SET_MEM_TABLE). The fds may be closed afterwards: mappings outlive them.
    pub fn new(regions: &[(RegionDesc, BorrowedFd<'_>)]) -> Result<MemoryTable, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions);
        }
        let mapped = regions
            .iter()
            .map(|&(desc, fd)| MappedRegion::map(desc, fd).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        MemoryTable::assemble(mapped)
    }

    /// This table plus one region (ADD_MEM_REG); the regions kept share their mappings.
    pub fn with_region_added(
        &self,
        desc: RegionDesc,
        fd: BorrowedFd<'_>,
    ) -> Result<MemoryTable, MemoryError> {
        if self.regions.len() >= MAX_REGIONS {
            return Err(MemoryError::TooManyRegions);
        }
        let mut regions = self.regions.clone();
        regions.push(Arc::new(MappedRegion::map(desc, fd)?));
        MemoryTable::assemble(regions)
    }

    /// This table less the region matching `desc` in guest address, size and frontend address
    /// (REM_MEM_REG; the offset is not compared).
    pub fn with_region_removed(&self, desc: &RegionDesc) -> Result<MemoryTable, MemoryError> {
        let same = |r: &MappedRegion| {
            r.desc.guest_phys_addr == desc.guest_phys_addr
                && r.desc.memory_size == desc.memory_size
                && r.desc.userspace_addr == desc.userspace_addr
        };
        let pos = self
            .regions
            .iter()
            .position(|r| same(r))
            .ok_or(MemoryError::NoSuchRegion(*desc))?;
        let mut regions = self.regions.clone();
        regions.remove(pos);
        MemoryTable::assemble(regions)
    }

    fn assemble(mut regions: Vec<Arc<MappedRegion>>) -> Result<MemoryTable, MemoryError> {
        if regions.len() > MAX_REGIONS {
            return Err(MemoryError::TooManyRegions);
        }
        regions.sort_by_key(|r| r.desc.guest_phys_addr);
        for pair in regions.windows(2) {
            if pair[0].gpa_end() > pair[1].desc.guest_phys_addr {
                return Err(MemoryError::Overlap {
                    new: pair[1].desc,
                    old: pair[0].desc,
                });
            }
        }
        let mut by_uva: Vec<&MappedRegion> = regions.iter().map(|r| &**r).collect();
        by_uva.sort_by_key(|r| r.desc.userspace_addr);
        for pair in by_uva.windows(2) {
            if pair[0].uva_end() > pair[1].desc.userspace_addr {
                return Err(MemoryError::Overlap {
                    new: pair[1].desc,
                    old: pair[0].desc,
                });
            }
        }
        let sizes: Vec<u64> = regions.iter().map(|r| r.desc.memory_size).collect();
        let chunks = Chunks::cut(&sizes);
        let id = NEXT_TABLE_ID.fetch_add(1, Ordering::Relaxed);
        Ok(MemoryTable {
            regions,
            chunks,
            id,
        })
    }

    /// A number no other table of this process has: tells whether a ring's registered fixed
    /// buffers came from this table.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> impl ExactSizeIterator<Item = RegionDesc> + '_ {
        self.regions.iter().map(|r| r.desc)
    }

    /// Whether every region's fd is a memfd sealed against shrinking, so that the frontend cannot
    /// make our accesses fault by truncating it.
    pub fn is_shrink_sealed(&self) -> bool {
        self.regions.iter().all(|r| r.shrink_sealed)
    }

    /// Number of fixed-buffer chunks the table is cut into: the slots of a ring's buffer table
    /// for it. 0 if it cannot be cut within the ring's slot limit (then no fixed buffers).
    pub fn fixed_chunks(&self) -> u16 {
        self.chunks.as_ref().map_or(0, |c| c.count)
    }

    /// Size of the table's fixed-buffer chunks (the last chunk of a region may be shorter).
    pub fn fixed_chunk_bytes(&self) -> Option<u64> {
        self.chunks.as_ref().map(|c| c.bytes)
    }

    /// Fixed-buffer chunk `index`, to register in slot `index` of a ring's buffer table. The
    /// pointer stays valid while this table lives.
    pub fn fixed_chunk(&self, index: u16) -> Option<libc::iovec> {
        let chunks = self.chunks.as_ref().filter(|c| index < c.count)?;
        // The region holding the chunk: the last whose first chunk is at most `index`.
        let region = chunks
            .first
            .partition_point(|&f| f <= index)
            .checked_sub(1)?;
        let r = &self.regions[region];
        let offset = u64::from(index - chunks.first[region]) * chunks.bytes;
        // The region's size fits usize (checked in `map`) and the chunk starts inside it.
        let offset = usize::try_from(offset).ok()?;
        let len = r.map.len().checked_sub(offset)?;
        let len = len.min(usize::try_from(chunks.bytes).unwrap_or(usize::MAX));
        Some(libc::iovec {
            // In bounds of the mapping: offset < map.len().
            iov_base: r.map.as_mut_ptr().wrapping_add(offset).cast(),
            iov_len: len,
        })
    }

    /// Region index and offset of the guest-physical range `[addr, addr + len)`.
    fn find_gpa(&self, addr: u64, len: u64) -> Result<(usize, u64), MemoryError> {
        let out = || MemoryError::OutOfRange { addr, len };
        let end = addr.checked_add(len).ok_or_else(out)?;
        let idx = self
            .regions
            .partition_point(|r| r.desc.guest_phys_addr <= addr);
        let idx = idx.checked_sub(1).ok_or_else(out)?;
        let r = &self.regions[idx];
        if end > r.gpa_end() {
            return Err(out());
        }
        Ok((idx, addr - r.desc.guest_phys_addr))
    }

    /// Region index and offset of the frontend-virtual range `[addr, addr + len)`.
    fn find_uva(&self, addr: u64, len: u64) -> Result<(usize, u64), MemoryError> {
        let out = || MemoryError::OutOfRange { addr, len };
        let end = addr.checked_add(len).ok_or_else(out)?;
        self.regions
            .iter()
            .position(|r| r.desc.userspace_addr <= addr && end <= r.uva_end())
            .map(|idx| (idx, addr - self.regions[idx].desc.userspace_addr))
            .ok_or_else(out)
    }

    fn range(&self, (idx, offset): (usize, u64), len: u64) -> GuestRange {
        // Both fit: the range lies inside a region, whose size fits isize (checked in `map`),
        // and there are at most MAX_REGIONS regions.
        GuestRange {
            region: u16::try_from(idx).expect("region count bounded by MAX_REGIONS"),
            offset: usize::try_from(offset).expect("offset inside a mapped region"),
            len: usize::try_from(len).expect("length inside a mapped region"),
        }
    }

    pub(crate) fn gpa_range(&self, addr: u64, len: u64) -> Result<GuestRange, MemoryError> {
        Ok(self.range(self.find_gpa(addr, len)?, len))
    }

    pub(crate) fn uva_range(&self, addr: u64, len: u64) -> Result<GuestRange, MemoryError> {
        Ok(self.range(self.find_uva(addr, len)?, len))
    }

    /// The slice a range made from this table designates; fails for a range of another table
    /// that does not fit this one.
    pub(crate) fn resolve(&self, range: &GuestRange) -> Result<GuestSlice<'_>, MemoryError> {
        let bad = || MemoryError::SliceBounds {
            offset: range.offset,
            len: range.len,
            slice_len: 0,
        };
        let r = self
            .regions
            .get(usize::from(range.region))
            .ok_or_else(bad)?;
        let end = range.offset.checked_add(range.len).ok_or_else(bad)?;
        if end > r.map.len() {
            return Err(bad());
        }
        Ok(GuestSlice {
            // In bounds of the mapping by the check above.
            ptr: r.map.as_mut_ptr().wrapping_add(range.offset),
            len: range.len,
            _table: PhantomData,
        })
    }

    /// The guest-physical range `[addr, addr + len)`, if it lies inside one region.
    pub fn guest_slice(&self, addr: u64, len: u64) -> Result<GuestSlice<'_>, MemoryError> {
        self.resolve(&self.gpa_range(addr, len)?)
    }

    /// The frontend-virtual range `[addr, addr + len)`, if it lies inside one region.
    pub fn frontend_slice(&self, addr: u64, len: u64) -> Result<GuestSlice<'_>, MemoryError> {
        self.resolve(&self.uva_range(addr, len)?)
    }

    /// The guest byte at `addr`, as a handle that keeps the memory mapped (a status byte).
    pub fn guest_byte(self: &Arc<Self>, addr: u64) -> Result<GuestByte, MemoryError> {
        let ptr = self.guest_slice(addr, 1)?.ptr;
        Ok(GuestByte {
            ptr: NonNull::new(ptr).expect("mapping pointers are not null"),
            _table: Arc::clone(self),
        })
    }
}

/// A range of guest memory that lies inside one mapped region of a table borrowed for `'a`.
///
/// Accessors take an offset into the slice and fail, rather than touch anything outside, if the
/// access does not fit.
#[derive(Clone, Copy, Debug)]
pub struct GuestSlice<'a> {
    /// Invariant: `[ptr, ptr + len)` lies inside one mapping of the table borrowed for `'a`.
    ptr: *mut u8,
    len: usize,
    _table: PhantomData<&'a MemoryTable>,
}

macro_rules! typed_access {
    ($load:ident, $store:ident, $ty:ty) => {
        #[doc = concat!("Volatile little-endian load of a `", stringify!($ty), "` at `offset`.")]
        pub fn $load(&self, offset: usize) -> Result<$ty, MemoryError> {
            let p = self.at(offset, size_of::<$ty>())?;
            if p.cast::<$ty>().is_aligned() {
                // SAFETY: `at` checked that the bytes lie inside the slice, whose mapping is
                // kept alive by the table borrowed for 'a; the pointer is aligned (just
                // checked). The guest may write concurrently: the value read is then one of the
                // values the guest wrote, all of which are acceptable untrusted input.
                Ok(<$ty>::from_le(unsafe {
                    ptr::read_volatile(p.cast::<$ty>())
                }))
            } else {
                let mut b = [0u8; size_of::<$ty>()];
                for (i, byte) in b.iter_mut().enumerate() {
                    // SAFETY: as above; byte accesses need no alignment.
                    *byte = unsafe { ptr::read_volatile(p.wrapping_add(i)) };
                }
                Ok(<$ty>::from_le_bytes(b))
            }
        }

        #[doc = concat!("Volatile little-endian store of a `", stringify!($ty), "` at `offset`.")]
        pub fn $store(&self, offset: usize, value: $ty) -> Result<(), MemoryError> {
            let p = self.at(offset, size_of::<$ty>())?;
            if p.cast::<$ty>().is_aligned() {
                // SAFETY: `at` checked that the bytes lie inside the slice, whose mapping is
                // kept alive by the table borrowed for 'a; the pointer is aligned. The mapping
                // is shared read-write, and no Rust reference to guest memory exists to alias.
                unsafe { ptr::write_volatile(p.cast::<$ty>(), value.to_le()) };
            } else {
                for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
                    // SAFETY: as above; byte accesses need no alignment.
                    unsafe { ptr::write_volatile(p.wrapping_add(i), byte) };
                }
            }
            Ok(())
        }
    };
}

impl<'a> GuestSlice<'a> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to `[offset, offset + n)`, which must lie inside the slice.
    fn at(&self, offset: usize, n: usize) -> Result<*mut u8, MemoryError> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(self.ptr.wrapping_add(offset)),
            _ => Err(MemoryError::SliceBounds {
                offset,
                len: n,
                slice_len: self.len,
            }),
        }
    }

    /// The part `[offset, offset + len)` of this slice.
    pub fn subslice(&self, offset: usize, len: usize) -> Result<GuestSlice<'a>, MemoryError> {
        let ptr = self.at(offset, len)?;
        Ok(GuestSlice {
            ptr,
            len,
            _table: PhantomData,
        })
    }

    typed_access!(load_u16, store_u16, u16);
    typed_access!(load_u32, store_u32, u32);
    typed_access!(load_u64, store_u64, u64);

    /// Volatile load of the byte at `offset`.
    pub fn load_u8(&self, offset: usize) -> Result<u8, MemoryError> {
        let p = self.at(offset, 1)?;
        // SAFETY: `at` checked the byte lies inside the slice, kept mapped by the table borrowed
        // for 'a.
        Ok(unsafe { ptr::read_volatile(p) })
    }

    /// Volatile store of the byte at `offset`.
    pub fn store_u8(&self, offset: usize, value: u8) -> Result<(), MemoryError> {
        let p = self.at(offset, 1)?;
        // SAFETY: `at` checked the byte lies inside the slice, kept mapped by the table borrowed
        // for 'a; the mapping is shared read-write.
        unsafe { ptr::write_volatile(p, value) };
        Ok(())
    }

    fn atomic_u16(&self, offset: usize) -> Result<&'a AtomicU16, MemoryError> {
        let p = self.at(offset, 2)?;
        if !p.cast::<u16>().is_aligned() {
            return Err(MemoryError::Misaligned { offset, align: 2 });
        }
        // SAFETY: the two bytes lie inside the slice (checked by `at`), which the table borrowed
        // for 'a keeps mapped for all of 'a; aligned (checked above). This process accesses ring
        // index fields only through these atomics, never non-atomically.
        Ok(unsafe { AtomicU16::from_ptr(p.cast::<u16>()) })
    }

    /// Atomic little-endian load of the `u16` at `offset` (a ring index), which must be aligned.
    pub fn load_u16_atomic(&self, offset: usize, order: Ordering) -> Result<u16, MemoryError> {
        Ok(u16::from_le(self.atomic_u16(offset)?.load(order)))
    }

    /// Atomic little-endian store of the `u16` at `offset` (a ring index), which must be aligned.
    pub fn store_u16_atomic(
        &self,
        offset: usize,
        value: u16,
        order: Ordering,
    ) -> Result<(), MemoryError> {
        self.atomic_u16(offset)?.store(value.to_le(), order);
        Ok(())
    }

    /// Copies `dst.len()` bytes from `offset` into `dst`.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.at(offset, dst.len())?;
        // SAFETY: the source lies inside the slice (checked by `at`), kept mapped by the table
        // borrowed for 'a; `dst` is a private Rust buffer, which cannot overlap guest memory
        // since this module never makes references into it. A concurrent guest write yields some
        // mix of old and new bytes, which the caller parses once from its private copy.
        unsafe { ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the slice at `offset`.
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> Result<(), MemoryError> {
        let p = self.at(offset, src.len())?;
        // SAFETY: the destination lies inside the slice (checked by `at`), kept mapped by the
        // table borrowed for 'a, and the mapping is shared read-write; `src` is a Rust slice,
        // which cannot overlap guest memory (no references into it exist).
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// A private copy of the `N` bytes at `offset`.
    pub fn read_array<const N: usize>(&self, offset: usize) -> Result<[u8; N], MemoryError> {
        let mut b = [0u8; N];
        self.copy_to(offset, &mut b)?;
        Ok(b)
    }

    /// Start of the slice in our address space, for tests that check where buffers point.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn host_range(&self) -> std::ops::Range<usize> {
        let start = self.ptr as usize;
        start..start + self.len
    }
}

const IOVEC_EMPTY: libc::iovec = libc::iovec {
    iov_base: ptr::null_mut(),
    iov_len: 0,
};

/// Guest buffers handed to io_uring: a list of checked guest ranges that owns a reference to its
/// table, so the memory stays mapped for as long as an op holds the value.
pub struct GuestBuffers {
    /// Each iovec lies inside one mapping of `table`.
    iovs: SmallList<libc::iovec, 3>,
    /// Fixed-buffer chunk of `table` holding the single segment, when there is exactly one and
    /// it lies in one chunk.
    chunk: Option<u16>,
    /// Whether the submitter vouched that its ring registered that chunk in the slot of the same
    /// number (unsafe `assume_fixed_chunk_registered`).
    fixed_registered: bool,
    len: usize,
    /// Keeps every mapping `iovs` points into alive. No Drop code uses `iovs`, so field order
    /// does not matter.
    table: Arc<MemoryTable>,
}

impl fmt::Debug for GuestBuffers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestBuffers")
            .field("segments", &self.iovs.len())
            .field("len", &self.len)
            .field("table", &self.table.id)
            .finish()
    }
}

impl GuestBuffers {
    /// An empty list over `table`'s memory.
    pub fn new(table: Arc<MemoryTable>) -> GuestBuffers {
        GuestBuffers {
            iovs: SmallList::new(IOVEC_EMPTY),
            chunk: None,
            fixed_registered: false,
            len: 0,
            table,
        }
    }

    /// Appends the guest-physical range `[addr, addr + len)`, which must lie inside one region.
    /// An empty range is checked but adds no segment.
    pub fn push_guest(&mut self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let range = self.table.gpa_range(addr, len)?;
        if range.len == 0 {
            return Ok(());
        }
        let slice = self.table.resolve(&range)?;
        self.iovs.push(libc::iovec {
            iov_base: slice.ptr.cast(),
            iov_len: slice.len,
        });
        self.len += slice.len;
        self.chunk = if self.iovs.len() == 1 {
            self.chunk_of(&range)
        } else {
            None
        };
        Ok(())
    }

    fn chunk_of(&self, range: &GuestRange) -> Option<u16> {
        let chunks = self.table.chunks.as_ref()?;
        // `range` is non-empty and inside its region, so neither end overflows.
        let first = range.offset >> chunks.shift;
        let last = (range.offset + range.len - 1) >> chunks.shift;
        if first != last {
            return None;
        }
        let index = usize::from(chunks.first[usize::from(range.region)]) + first;
        u16::try_from(index).ok().filter(|&i| i < chunks.count)
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.iovs.len()
    }

    /// The table the buffers point into.
    pub fn table(&self) -> &Arc<MemoryTable> {
        &self.table
    }

    /// The fixed-buffer chunk of [`Self::table`] ([`MemoryTable::fixed_chunk`]) holding the
    /// single segment, whether or not any ring registered it.
    pub fn fixed_buffer_chunk(&self) -> Option<u16> {
        self.chunk
    }

    /// Makes [`IoBuffers::fixed_index`] report [`Self::fixed_buffer_chunk`] as the slot.
    ///
    /// # Safety
    /// The buffers must be submitted only to one ring, and from now until the completion of
    /// every op carrying them is reaped, slot `c` of that ring's buffer table must hold exactly
    /// `self.table().fixed_chunk(c)`, registered from this table (the same [`MemoryTable::id`],
    /// not merely the same addresses), where `c` is [`Self::fixed_buffer_chunk`].
    pub unsafe fn assume_fixed_chunk_registered(&mut self) {
        self.fixed_registered = true;
    }
}

// SAFETY: every iovec lies inside a mapping of `self.table` (push_guest translates through it),
// and the Arc keeps that mapping in place, neither unmapped nor moved, while the value lives. A
// fixed index is reported only when the submitter has vouched (unsafe
// `assume_fixed_chunk_registered`) that its ring holds this table's chunk `c` in slot `c`, and
// then only for a single segment that lies inside chunk `c` (chunk_of), which is registered from
// this table's mapping, so from the memory the segment points to.
unsafe impl IoBuffers for GuestBuffers {
    fn iovecs(&self) -> &[libc::iovec] {
        self.iovs.as_slice()
    }

    fn fixed_index(&self) -> Option<u16> {
        if self.fixed_registered {
            self.chunk
        } else {
            None
        }
    }
}

// SAFETY: the raw pointers point into mappings owned by `table`, an Arc of a Send + Sync table;
// nothing in the value is tied to the creating thread.
unsafe impl Send for GuestBuffers {}

/// One byte of guest memory (a request's status byte) that keeps its table alive.
pub struct GuestByte {
    /// Inside a mapping of `_table`.
    ptr: NonNull<u8>,
    _table: Arc<MemoryTable>,
}

impl fmt::Debug for GuestByte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestByte")
            .field("table", &self._table.id)
            .finish()
    }
}

impl GuestByte {
    /// Volatile store.
    pub fn write(&self, value: u8) {
        // SAFETY: `ptr` was translated through `_table` (guest_byte), whose Arc keeps the shared
        // read-write mapping alive while self lives.
        unsafe { ptr::write_volatile(self.ptr.as_ptr(), value) }
    }

    /// Volatile load.
    pub fn read(&self) -> u8 {
        // SAFETY: as in `write`.
        unsafe { ptr::read_volatile(self.ptr.as_ptr()) }
    }
}

// SAFETY: the pointer points into a mapping owned by `_table` (Send + Sync).
unsafe impl Send for GuestByte {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::AsFd;

    fn memfd(size: u64) -> File {
        let fd = nix::sys::memfd::memfd_create(c"ringblk-test", nix::sys::memfd::MFdFlags::empty())
            .expect("memfd_create");
        let f = File::from(fd);
        f.set_len(size).expect("set_len");
        f
    }

    fn desc(gpa: u64, size: u64, uva: u64, off: u64) -> RegionDesc {
        RegionDesc {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: uva,
            mmap_offset: off,
        }
    }

    fn two_region_table() -> (MemoryTable, File) {
        let f = memfd(0x4000);
        let t = MemoryTable::new(&[
            (desc(0x1000, 0x1000, 0x7000_0000, 0), f.as_fd()),
            (desc(0x2000, 0x1000, 0x8000_0000, 0x1000), f.as_fd()),
        ])
        .unwrap();
        (t, f)
    }

    #[test]
    fn range_inside_one_region_translates() {
        let (t, _f) = two_region_table();
        let s = t.guest_slice(0x1ff0, 0x10).unwrap();
        s.store_u64(0, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(s.load_u64(0).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(
            t.frontend_slice(0x7000_0ff0, 8)
                .unwrap()
                .load_u64(0)
                .unwrap(),
            0x1122_3344_5566_7788
        );
    }

    #[test]
    fn range_outside_table_is_rejected() {
        let (t, _f) = two_region_table();
        assert!(matches!(
            t.guest_slice(0x0, 1),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.guest_slice(0x3000, 1),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn range_straddling_two_regions_is_rejected() {
        // The two regions are adjacent in guest-physical space but separate mappings.
        let (t, _f) = two_region_table();
        assert!(matches!(
            t.guest_slice(0x1ff8, 0x10),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn range_wrapping_2_pow_64_is_rejected() {
        // The highest region whose end is representable: [2^64 - 0x1001, 2^64 - 1).
        let f = memfd(0x1000);
        let top = u64::MAX - 0x1000;
        let t = MemoryTable::new(&[(desc(top, 0x1000, 0x1000, 0), f.as_fd())]).unwrap();
        assert!(t.guest_slice(top, 0x1000).is_ok());
        assert!(matches!(
            t.guest_slice(top + 0x10, u64::MAX - 0x8),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.guest_slice(u64::MAX, 2),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            t.guest_slice(top, u64::MAX),
            Err(MemoryError::OutOfRange { .. })
        ));
    }

    #[test]
    fn region_ending_at_2_pow_64_is_rejected() {
        let f = memfd(0x1000);
        let e = MemoryTable::new(&[(desc(u64::MAX - 0xfff, 0x1000, 0x1000, 0), f.as_fd())])
            .unwrap_err();
        assert!(matches!(e, MemoryError::Overflow(_)), "{e}");
    }

    #[test]
    fn region_larger_than_its_file_is_rejected() {
        let f = memfd(0x1000);
        let e = MemoryTable::new(&[(desc(0, 0x2000, 0, 0), f.as_fd())]).unwrap_err();
        assert!(
            matches!(
                e,
                MemoryError::BeyondFile {
                    file_size: 0x1000,
                    ..
                }
            ),
            "{e}"
        );
        let e = MemoryTable::new(&[(desc(0, 0x1000, 0, 0x1000), f.as_fd())]).unwrap_err();
        assert!(matches!(e, MemoryError::BeyondFile { .. }), "{e}");
    }

    #[test]
    fn region_with_overflowing_offset_is_rejected() {
        let f = memfd(0x1000);
        let e = MemoryTable::new(&[(desc(0, 0x1000, 0, u64::MAX - 0x10), f.as_fd())]).unwrap_err();
        assert!(matches!(e, MemoryError::Overflow(_)), "{e}");
        let e = MemoryTable::new(&[(desc(u64::MAX, 0x1000, 0, 0), f.as_fd())]).unwrap_err();
        assert!(matches!(e, MemoryError::Overflow(_)), "{e}");
    }

    #[test]
    fn overlapping_regions_are_rejected() {
        let f = memfd(0x4000);
        let e = MemoryTable::new(&[
            (desc(0x1000, 0x2000, 0x10_0000, 0), f.as_fd()),
            (desc(0x2000, 0x1000, 0x20_0000, 0), f.as_fd()),
        ])
        .unwrap_err();
        assert!(matches!(e, MemoryError::Overlap { .. }), "{e}");
        let e = MemoryTable::new(&[
            (desc(0x1000, 0x1000, 0x10_0000, 0), f.as_fd()),
            (desc(0x8000, 0x1000, 0x10_0800, 0), f.as_fd()),
        ])
        .unwrap_err();
        assert!(
            matches!(e, MemoryError::Overlap { .. }),
            "frontend-virtual overlap: {e}"
        );
    }

    #[test]
    fn empty_region_is_rejected() {
        let f = memfd(0x1000);
        let e = MemoryTable::new(&[(desc(0, 0, 0, 0), f.as_fd())]).unwrap_err();
        assert!(matches!(e, MemoryError::EmptyRegion(_)));
    }

    #[test]
    fn added_and_removed_regions_share_mappings() {
        let (t, f) = two_region_table();
        let s = t.guest_slice(0x2000, 1).unwrap();
        s.store_u8(0, 0xab).unwrap();
        let t2 = t
            .with_region_added(desc(0x10_0000, 0x1000, 0x9000_0000, 0x2000), f.as_fd())
            .unwrap();
        assert_eq!(t2.regions().len(), 3);
        assert_ne!(t.id(), t2.id());
        let t3 = t2
            .with_region_removed(&desc(0x1000, 0x1000, 0x7000_0000, 0))
            .unwrap();
        assert_eq!(t3.guest_slice(0x2000, 1).unwrap().load_u8(0).unwrap(), 0xab);
        assert!(t3.guest_slice(0x1000, 1).is_err());
        assert!(matches!(
            t3.with_region_removed(&desc(0x1000, 0x1000, 0x7000_0000, 0)),
            Err(MemoryError::NoSuchRegion(_))
        ));
    }

    #[test]
    fn slice_accessors_stay_inside_the_slice() {
        let (t, _f) = two_region_table();
        let s = t.guest_slice(0x1000, 16).unwrap();
        assert!(s.load_u64(9).is_err());
        assert!(s.load_u64(usize::MAX).is_err());
        assert!(s.subslice(8, 9).is_err());
        assert!(s.copy_from(15, &[1, 2]).is_err());
        assert!(matches!(
            s.load_u16_atomic(1, Ordering::Relaxed),
            Err(MemoryError::Misaligned { .. })
        ));
        // Misaligned typed access goes byte by byte.
        s.store_u32(3, 0xdead_beef).unwrap();
        assert_eq!(s.load_u32(3).unwrap(), 0xdead_beef);
        assert_eq!(s.read_array::<4>(3).unwrap(), 0xdead_beef_u32.to_le_bytes());
    }

    #[test]
    fn guest_buffers_report_fixed_index_only_when_vouched_for_one_segment() {
        let (t, _f) = two_region_table();
        let t = Arc::new(t);
        let mut b = GuestBuffers::new(Arc::clone(&t));
        b.push_guest(0x2010, 0x100).unwrap();
        assert_eq!(b.fixed_buffer_chunk(), Some(1));
        assert_eq!(b.fixed_index(), None);
        // SAFETY: the buffers are never submitted to a ring in this test.
        unsafe { b.assume_fixed_chunk_registered() };
        assert_eq!(b.fixed_index(), Some(1));
        b.push_guest(0x1000, 0x10).unwrap();
        assert_eq!(b.fixed_index(), None);
        assert_eq!(b.len(), 0x110);
        assert_eq!(b.segments(), 2);
        assert_eq!(t.fixed_chunks(), 2);
    }

    #[test]
    fn chunks_are_2_mib_until_the_slot_limit_makes_them_larger() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        let c = Chunks::cut(&[GIB]).unwrap();
        assert_eq!((c.bytes, c.count), (2 * MIB, 512));
        // 32 GiB in 2 MiB chunks is exactly the limit; one more byte doubles the chunk.
        let c = Chunks::cut(&[16 * GIB, 16 * GIB]).unwrap();
        assert_eq!(
            (c.bytes, c.count, c.first.as_slice()),
            (2 * MIB, 16384, &[0, 8192][..])
        );
        let c = Chunks::cut(&[16 * GIB, 16 * GIB + 1]).unwrap();
        assert_eq!((c.bytes, c.count), (4 * MIB, 8193));
        let c = Chunks::cut(&[3 * MIB, 4096, 5 * MIB]).unwrap();
        assert_eq!(
            (c.bytes, c.count, c.first.as_slice()),
            (2 * MIB, 6, &[0, 2, 3][..])
        );
        // 16 TiB in 1 GiB buffers is the most a ring can register.
        assert_eq!(Chunks::cut(&[16384 * GIB]).unwrap().bytes, GIB);
        assert!(Chunks::cut(&[16384 * GIB + 1]).is_none());
        assert!(Chunks::cut(&[u64::MAX, u64::MAX]).is_none(), "no overflow");
    }

    #[test]
    fn fixed_chunks_cover_each_region_and_stop_at_its_end() {
        const MIB: u64 = 1 << 20;
        let f = memfd(8 * MIB);
        let t = MemoryTable::new(&[
            (desc(0, 3 * MIB, 0x7000_0000, 0), f.as_fd()),
            (desc(0x1000_0000, 4 * MIB, 0x8000_0000, 4 * MIB), f.as_fd()),
        ])
        .unwrap();
        assert_eq!(
            (t.fixed_chunks(), t.fixed_chunk_bytes()),
            (4, Some(2 * MIB))
        );
        let host = |gpa: u64| t.guest_slice(gpa, 1).unwrap().host_range().start;
        let expect = [
            (host(0), 2 * MIB),
            (host(2 * MIB), MIB),
            (host(0x1000_0000), 2 * MIB),
            (host(0x1000_0000 + 2 * MIB), 2 * MIB),
        ];
        for (i, (base, len)) in (0u16..).zip(expect) {
            let iov = t.fixed_chunk(i).unwrap();
            assert_eq!(
                (iov.iov_base as usize, iov.iov_len as u64),
                (base, len),
                "chunk {i}"
            );
        }
        assert!(t.fixed_chunk(4).is_none());
    }

    #[test]
    fn a_segment_reports_its_chunk_only_if_it_lies_inside_one() {
        const MIB: u64 = 1 << 20;
        let f = memfd(8 * MIB);
        let t = Arc::new(
            MemoryTable::new(&[
                (desc(0, 3 * MIB, 0x7000_0000, 0), f.as_fd()),
                (desc(0x1000_0000, 4 * MIB, 0x8000_0000, 4 * MIB), f.as_fd()),
            ])
            .unwrap(),
        );
        let chunk = |gpa: u64, len: u64| {
            let mut b = GuestBuffers::new(Arc::clone(&t));
            b.push_guest(gpa, len).unwrap();
            b.fixed_buffer_chunk()
        };
        assert_eq!(chunk(0, 4096), Some(0));
        assert_eq!(chunk(2 * MIB - 4096, 4096), Some(0));
        assert_eq!(
            chunk(2 * MIB - 4096, 8192),
            None,
            "straddles chunks 0 and 1"
        );
        assert_eq!(chunk(2 * MIB, MIB), Some(1));
        assert_eq!(chunk(0x1000_0000 + 2 * MIB + 512, 512), Some(3));
    }

    #[test]
    fn guest_buffers_keep_the_mapping_after_the_table_is_replaced() {
        let (t, _f) = two_region_table();
        let t = Arc::new(t);
        let mut b = GuestBuffers::new(Arc::clone(&t));
        b.push_guest(0x1000, 4).unwrap();
        drop(t);
        assert_eq!(ringblk_ring::buf::copy_in(&b, b"abcd"), 4);
        let mut out = [0u8; 4];
        assert_eq!(ringblk_ring::buf::copy_out(&b, &mut out), 4);
        assert_eq!(&out, b"abcd");
    }
}
