//! End to end: guest memory becomes io_uring fixed buffers lazily, one chunk at its first use,
//! and every byte still goes where the guest asked.
//!
//! A small vhost-user frontend shares two memfds as guest memory: a small one with the virtqueue,
//! request headers and status bytes, and a large sparse one for data, so that what the daemon
//! makes resident is visible as the data memfd's allocated blocks (a memfd has no other backing).
//! The queue runs on an iothread, in front of a file in /dev/shm.

mod common;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Daemon, file_node, image};
use ringblk_virtio::memory::{FIXED_CHUNK_MIN_BYTES, MemoryTable, RegionDesc};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The chunk size for the tables below (they are far from needing larger chunks).
const CHUNK: u64 = FIXED_CHUNK_MIN_BYTES;

/// Guest-physical address of the queue memory (1 MiB).
const QUEUE_GPA: u64 = 0x10_0000;
const QUEUE_MEM_BYTES: u64 = MIB;
/// Guest-physical address of the data memory.
const DATA_GPA: u64 = 0x1_0000_0000;
/// Where the frontend claims to have guest memory mapped (vring addresses are in this space).
const FRONTEND_OFFSET: u64 = 0x7f00_0000_0000;

const QUEUE_SIZE: u16 = 16;
const DESC: u64 = QUEUE_GPA;
const AVAIL: u64 = QUEUE_GPA + 0x100;
const USED: u64 = QUEUE_GPA + 0x1000;
const HEADER: u64 = QUEUE_GPA + 0x2000;
const STATUS: u64 = QUEUE_GPA + 0x2100;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const S_OK: u8 = 0;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const WAIT: Duration = Duration::from_secs(10);

const IMAGE_BYTES: u64 = 64 * MIB;

fn memfd(name: &std::ffi::CStr, bytes: u64) -> File {
    let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::empty())
        .expect("memfd_create");
    let f = File::from(fd);
    f.set_len(bytes).unwrap();
    f
}

/// Bytes of `f` (a memfd) that exist in memory.
fn allocated_bytes(f: &File) -> u64 {
    f.metadata().unwrap().blocks() * 512
}

/// The guest: its memory, its one virtqueue, and the frontend connection that shares them.
struct Guest {
    queue_mem: File,
    data_mem: File,
    /// The test's own view of guest memory, through which it plays the driver.
    view: MemoryTable,
    fe: Frontend,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
}

impl Guest {
    /// Connects to `socket`, shares the memory (data memory of `data_bytes`) and starts queue 0.
    fn connect(socket: &std::path::Path, data_bytes: u64) -> Guest {
        let sock = UnixStream::connect(socket).expect("connect to the export");
        let mut fe = Frontend::from_stream(sock, 1);
        let offered = fe.get_features().unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto & VhostUserProtocolFeatures::REPLY_ACK)
            .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_owner().unwrap();
        fe.set_features(offered & ((1 << VIRTIO_F_VERSION_1) | F_PROTOCOL_FEATURES))
            .unwrap();
        let queue_mem = memfd(c"fixed-queue", QUEUE_MEM_BYTES);
        let data_mem = memfd(c"fixed-data", data_bytes);
        let view = MemoryTable::empty();
        let mut guest = Guest {
            queue_mem,
            data_mem,
            view,
            fe,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
        };
        guest.share_memory();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: DESC + FRONTEND_OFFSET,
            used_ring_addr: USED + FRONTEND_OFFSET,
            avail_ring_addr: AVAIL + FRONTEND_OFFSET,
            log_addr: None,
        };
        guest.fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        guest.fe.set_vring_addr(0, &config).unwrap();
        guest.fe.set_vring_base(0, 0).unwrap();
        guest.fe.set_vring_kick(0, &guest.kick).unwrap();
        guest.fe.set_vring_call(0, &guest.call).unwrap();
        guest.fe.set_vring_enable(0, true).unwrap();
        guest
    }

    fn regions(&self) -> [(RegionDesc, &File); 2] {
        let region = |gpa: u64, f: &File| RegionDesc {
            guest_phys_addr: gpa,
            memory_size: f.metadata().unwrap().len(),
            userspace_addr: gpa + FRONTEND_OFFSET,
            mmap_offset: 0,
        };
        [
            (region(QUEUE_GPA, &self.queue_mem), &self.queue_mem),
            (region(DATA_GPA, &self.data_mem), &self.data_mem),
        ]
    }

    /// SET_MEM_TABLE with the current memfds.
    fn share_memory(&mut self) {
        let regions = self.regions();
        let info: Vec<VhostUserMemoryRegionInfo> = regions
            .iter()
            .map(|(d, f)| VhostUserMemoryRegionInfo {
                guest_phys_addr: d.guest_phys_addr,
                memory_size: d.memory_size,
                userspace_addr: d.userspace_addr,
                mmap_offset: d.mmap_offset,
                mmap_handle: f.as_raw_fd(),
            })
            .collect();
        let view = MemoryTable::new(&regions.map(|(d, f)| (d, f.as_fd()))).unwrap();
        self.fe
            .set_mem_table(&info)
            .expect("SET_MEM_TABLE accepted");
        self.view = view;
    }

    /// Swaps in `data_mem` as the data memory (same guest addresses) with a new memory table,
    /// while the queue runs; returns the old data memfd.
    fn replace_data_memory(&mut self, data_mem: File) -> File {
        let old = std::mem::replace(&mut self.data_mem, data_mem);
        self.share_memory();
        old
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap();
        self.view
            .guest_slice(gpa, len)
            .unwrap()
            .copy_from(0, bytes)
            .unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        let slice = self.view.guest_slice(gpa, len as u64).unwrap();
        slice.copy_to(0, &mut out).unwrap();
        out
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.write(DESC + 16 * u64::from(index), &d);
    }

    fn used_idx(&self) -> u16 {
        self.view
            .guest_slice(USED, 4)
            .unwrap()
            .load_u16_atomic(2, std::sync::atomic::Ordering::Acquire)
            .unwrap()
    }

    /// One request of `kind` on `sector` with its data at `data_gpa`; waits for it and returns
    /// its status byte.
    fn request(&mut self, kind: u32, sector: u64, data_gpa: u64, len: u32) -> u8 {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.write(HEADER, &h);
        self.write(STATUS, &[0xff]);
        let data_flags = if kind == VIRTIO_BLK_T_IN {
            F_WRITE | F_NEXT
        } else {
            F_NEXT
        };
        self.write_desc(0, HEADER, 16, F_NEXT, 1);
        self.write_desc(1, data_gpa, len, data_flags, 2);
        self.write_desc(2, STATUS, 1, F_WRITE, 0);
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.write(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.view
            .guest_slice(AVAIL, 4)
            .unwrap()
            .store_u16_atomic(2, self.avail_idx, std::sync::atomic::Ordering::Release)
            .unwrap();
        self.kick.write(1).unwrap();
        let deadline = Instant::now() + WAIT;
        while self.used_idx() != self.avail_idx {
            assert!(
                Instant::now() < deadline,
                "request not completed in {WAIT:?}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        self.read(STATUS, 1)[0]
    }

    /// Writes `bytes` at `data_gpa` of guest memory, then to `sector` of the disk from there.
    fn write_sector(&mut self, sector: u64, data_gpa: u64, bytes: &[u8]) {
        self.write(data_gpa, bytes);
        let len = u32::try_from(bytes.len()).unwrap();
        assert_eq!(self.request(VIRTIO_BLK_T_OUT, sector, data_gpa, len), S_OK);
    }

    /// Reads `len` bytes at `sector` of the disk into `data_gpa` of guest memory; returns them.
    fn read_sector(&mut self, sector: u64, data_gpa: u64, len: usize) -> Vec<u8> {
        self.write(data_gpa, &vec![0xee; len]);
        let len32 = u32::try_from(len).unwrap();
        assert_eq!(self.request(VIRTIO_BLK_T_IN, sector, data_gpa, len32), S_OK);
        self.read(data_gpa, len)
    }
}

/// `len` bytes that differ from those of any other `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| i.to_le_bytes()[0].wrapping_mul(31) ^ seed.wrapping_mul(0x5b) ^ i.to_le_bytes()[1])
        .collect()
}

fn image_bytes(img: &tempfile::NamedTempFile, sector: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    img.as_file().read_exact_at(&mut out, sector * 512).unwrap();
    out
}

#[test]
fn a_large_guest_memory_is_served_without_becoming_resident() {
    let img = image(IMAGE_BYTES);
    let daemon = Daemon::start(file_node(img.path()), 1, 1, true);
    let mut guest = Guest::connect(&daemon.socket, 4 * GIB);
    let data = 64 * 1024;
    // Eight requests in eight chunks spread over the 4 GiB.
    for i in 0..8u64 {
        let gpa = DATA_GPA + i * (GIB / 2) + 3 * MIB;
        let before = allocated_bytes(&guest.data_mem);
        let bytes = pattern(u8::try_from(i).unwrap(), data);
        guest.write_sector(i * 1024, gpa, &bytes);
        // The first use of the chunk registered (and so faulted in) exactly that chunk: the
        // request went through a fixed buffer.
        assert_eq!(
            allocated_bytes(&guest.data_mem) - before,
            CHUNK,
            "request {i} in a fresh chunk"
        );
        assert_eq!(guest.read_sector(i * 1024, gpa + 8192, data), bytes);
        assert_eq!(image_bytes(&img, i * 1024, data), bytes);
    }
    let resident = allocated_bytes(&guest.data_mem);
    assert_eq!(resident, 8 * CHUNK, "only the chunks used are resident");
}

#[test]
fn data_goes_to_the_right_guest_bytes_within_and_across_chunks() {
    let img = image(IMAGE_BYTES);
    let daemon = Daemon::start(file_node(img.path()), 1, 1, true);
    let data_bytes = 64 * MIB;
    let mut guest = Guest::connect(&daemon.socket, data_bytes);
    let boundary = DATA_GPA + 5 * CHUNK;
    let last = DATA_GPA + data_bytes;
    // (sector, where the data lies, length): inside a chunk, ending and starting at a chunk
    // boundary, straddling one (readv/writev), and at the very end of guest memory.
    let cases: [(u64, u64, usize); 6] = [
        (0, DATA_GPA + 4096, 4096),
        (8, boundary - 16384, 16384),
        (40, boundary, 16384),
        (80, boundary - 4096, 12288),
        (120, boundary - 512, 1 << 20),
        (4000, last - 131072, 131072),
    ];
    for (seed, &(sector, gpa, len)) in (1u8..).zip(&cases) {
        let bytes = pattern(seed, len);
        guest.write_sector(sector, gpa, &bytes);
        assert_eq!(
            image_bytes(&img, sector, len),
            bytes,
            "write of case {seed}"
        );
    }
    // Read each back into another case's place: crossing chunks the other way round.
    for (i, &(sector, _, len)) in cases.iter().enumerate() {
        let (_, gpa, _) = cases[(i + 1) % cases.len()];
        let gpa = gpa.min(last - len as u64);
        let seed = u8::try_from(i + 1).unwrap();
        assert_eq!(
            guest.read_sector(sector, gpa, len),
            pattern(seed, len),
            "read of case {seed} at {gpa:#x}"
        );
    }
}

#[test]
fn a_new_memory_table_does_not_reuse_stale_slots() {
    let img = image(IMAGE_BYTES);
    img.as_file()
        .write_all_at(&pattern(7, 4096), 64 * 512)
        .unwrap();
    let daemon = Daemon::start(file_node(img.path()), 1, 1, true);
    let data_bytes = 16 * MIB;
    let mut guest = Guest::connect(&daemon.socket, data_bytes);
    let gpa = DATA_GPA + 3 * MIB;
    // Registers the chunk of `gpa` in the first table.
    assert_eq!(guest.read_sector(64, gpa, 4096), pattern(7, 4096));
    // New table: the same guest addresses, other memory behind the data.
    let old = guest.replace_data_memory(memfd(c"fixed-data-2", data_bytes));
    old.write_all_at(&[0xee; 4096], gpa - DATA_GPA).unwrap();
    for round in 0..3 {
        assert_eq!(
            guest.read_sector(64, gpa, 4096),
            pattern(7, 4096),
            "read {round} after the new table"
        );
        let mut stale = [0u8; 4096];
        old.read_exact_at(&mut stale, gpa - DATA_GPA).unwrap();
        assert_eq!(stale, [0xee; 4096], "a read went to the old table's memory");
    }
    // Writes take their data from the new memory too.
    let bytes = pattern(9, 4096);
    guest.write_sector(72, gpa, &bytes);
    assert_eq!(image_bytes(&img, 72, 4096), bytes);
}
