//! Property tests: random descriptor tables, chains and request headers from a hostile guest.
//! Whatever the guest writes, popping and parsing never panic, and every buffer of an accepted
//! chain or request lies inside guest memory.

use std::ops::Range;
use std::sync::Arc;

use proptest::prelude::*;
use ringblk_ring::buf::IoBuffers;
use ringblk_virtio::blk::{self, RequestKind};
use ringblk_virtio::config::BlkConfig;
use ringblk_virtio::memory::MemoryTable;
use ringblk_virtio::queue::{INDIRECT_DESCRIPTORS_MAX, SplitQueue};
use ringblk_virtio::testing::{Buf, F_INDIRECT, F_NEXT, F_WRITE, GUEST_BASE, MockDriver, RawDesc};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

const MEM: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 16;
const CAPACITY: u64 = 1 << 16;

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        16 => (0..MEM - 8192).prop_map(|o| GUEST_BASE + o),
        1 => (0..64u64).prop_map(|o| GUEST_BASE + MEM - o),
        1 => (0..64u64).prop_map(|o| GUEST_BASE.wrapping_sub(o)),
        1 => (0..64u64).prop_map(|o| u64::MAX - o),
        1 => any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        8 => 0..4097u32,
        1 => Just(16u32),
        1 => Just(1u32),
        1 => any::<u32>(),
        1 => (0..64u32).prop_map(|o| u32::MAX - o),
    ]
}

fn flags() -> impl Strategy<Value = u16> {
    prop_oneof![
        8 => prop::sample::select(vec![0, F_NEXT, F_WRITE, F_NEXT | F_WRITE]),
        1 => Just(F_INDIRECT),
        1 => any::<u16>(),
    ]
}

fn next() -> impl Strategy<Value = u16> {
    prop_oneof![5 => 0..QUEUE_SIZE, 1 => any::<u16>()]
}

fn raw_desc() -> impl Strategy<Value = RawDesc> {
    (addr(), len(), flags(), next()).prop_map(|(addr, len, flags, next)| RawDesc {
        addr,
        len,
        flags,
        next,
    })
}

/// A descriptor, or a pointer to one of the indirect tables (by index, with a length fudge).
#[derive(Clone, Debug)]
enum Slot {
    Raw(RawDesc),
    Indirect {
        table: usize,
        extra_flags: u16,
        len_delta: i8,
    },
}

fn slot() -> impl Strategy<Value = Slot> {
    prop_oneof![
        4 => raw_desc().prop_map(Slot::Raw),
        1 => (0..3usize, prop::sample::select(vec![0, F_WRITE, F_NEXT]), prop_oneof![4 => Just(0i8), 1 => any::<i8>()])
            .prop_map(|(table, extra_flags, len_delta)| Slot::Indirect { table, extra_flags, len_delta }),
    ]
}

#[derive(Clone, Debug)]
struct Ring {
    slots: Vec<Slot>,
    indirect_tables: Vec<Vec<RawDesc>>,
    heads: Vec<u16>,
    avail_idx: u16,
    event_idx: bool,
    indirect_desc: bool,
}

fn ring() -> impl Strategy<Value = Ring> {
    (
        prop::collection::vec(slot(), usize::from(QUEUE_SIZE)),
        prop::collection::vec(prop::collection::vec(raw_desc(), 1..8), 3),
        prop::collection::vec(
            prop_oneof![6 => 0..QUEUE_SIZE, 1 => any::<u16>()],
            usize::from(QUEUE_SIZE),
        ),
        prop_oneof![6 => 1..=QUEUE_SIZE, 1 => QUEUE_SIZE..=QUEUE_SIZE + 2, 1 => any::<u16>()],
        any::<bool>(),
        prop_oneof![4 => Just(true), 1 => Just(false)],
    )
        .prop_map(
            |(slots, indirect_tables, heads, avail_idx, event_idx, indirect_desc)| Ring {
                slots,
                indirect_tables,
                heads,
                avail_idx,
                event_idx,
                indirect_desc,
            },
        )
}

/// Host addresses of the mock's guest memory.
fn host_memory(table: &MemoryTable) -> Range<usize> {
    table.guest_slice(GUEST_BASE, MEM).unwrap().host_range()
}

fn assert_iovecs_inside(bufs: &dyn IoBuffers, host: &Range<usize>) {
    for v in bufs.iovecs() {
        let start = v.iov_base as usize;
        assert!(
            host.start <= start && start + v.iov_len <= host.end,
            "iovec outside guest memory"
        );
        assert!(v.iov_len > 0);
    }
}

fn check_request(r: blk::Request, host: &Range<usize>) {
    let Ok(kind) = r.body else { return };
    match &kind {
        RequestKind::In { sector, data } | RequestKind::Out { sector, data } => {
            assert_iovecs_inside(data, host);
            assert_eq!(data.len() % 512, 0);
            assert!(sector + (data.len() as u64) / 512 <= CAPACITY);
        }
        RequestKind::GetId { data } => {
            assert_iovecs_inside(data, host);
            assert!(data.len() <= 20);
        }
        RequestKind::Discard { segments } | RequestKind::WriteZeroes { segments } => {
            for s in segments {
                assert!(s.sector + u64::from(s.num_sectors) <= CAPACITY);
            }
        }
        RequestKind::Flush => {}
    }
    let (head, _) = r.completion.complete(blk::S_OK);
    assert!(head < QUEUE_SIZE);
}

fn limits() -> ringblk_virtio::config::RequestLimits {
    let mut c = BlkConfig::new(CAPACITY, 1);
    c.max_discard_seg = 4;
    c.max_write_zeroes_seg = 4;
    c.request_limits()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_rings_never_panic_and_accepted_chains_stay_inside_memory(r in ring()) {
        let mut d = MockDriver::new(QUEUE_SIZE, MEM);
        let tables: Vec<(u64, u32)> = r.indirect_tables.iter().map(|t| d.write_indirect_table(t)).collect();
        for (i, s) in r.slots.iter().enumerate() {
            let desc = match *s {
                Slot::Raw(desc) => desc,
                Slot::Indirect { table, extra_flags, len_delta } => {
                    let (addr, len) = tables[table];
                    RawDesc {
                        addr,
                        len: len.wrapping_add_signed(i32::from(len_delta)),
                        flags: F_INDIRECT | extra_flags,
                        next: 0,
                    }
                }
            };
            d.write_descriptor(u16::try_from(i).unwrap(), desc);
        }
        for &h in &r.heads {
            d.publish(h);
        }
        d.set_avail_idx(r.avail_idx);
        let mut q = SplitQueue::new(Arc::clone(d.table()), d.queue_config(r.event_idx, r.indirect_desc)).unwrap();
        let host = host_memory(d.table());
        let limits = limits();
        for _ in 0..2 * QUEUE_SIZE {
            match q.pop() {
                Ok(Some(chain)) => {
                    prop_assert!(chain.head() < QUEUE_SIZE);
                    let max = usize::from(QUEUE_SIZE) + INDIRECT_DESCRIPTORS_MAX as usize;
                    prop_assert!(chain.descriptors().len() <= max);
                    let mut total = 0u64;
                    for desc in chain.descriptors() {
                        let end = desc.addr().checked_add(u64::from(desc.len()));
                        prop_assert!(desc.addr() >= GUEST_BASE && end.is_some_and(|e| e <= GUEST_BASE + MEM));
                        total += u64::from(desc.len());
                    }
                    prop_assert!(total <= u64::from(u32::MAX));
                    match blk::parse_request(&chain, &limits) {
                        Ok(req) => check_request(req, &host),
                        Err(e) => prop_assert_eq!(e.head(), chain.head()),
                    }
                    q.add_used(chain.head(), 0).unwrap();
                }
                Ok(None) => break,
                Err(_) => {
                    prop_assert!(q.is_broken());
                    prop_assert!(q.pop().unwrap().is_none());
                    break;
                }
            }
        }
        q.publish_used().unwrap();
        q.needs_notification().unwrap();
        q.enable_notification().unwrap();
        q.disable_notification().unwrap();
    }

    #[test]
    fn random_request_headers_never_panic_and_accepted_requests_stay_in_bounds(
        request_type in prop_oneof![
            8 => prop::sample::select(vec![
                VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES,
            ]),
            1 => any::<u32>(),
        ],
        sector in prop_oneof![6 => 0..CAPACITY + 16, 1 => (0..16u64).prop_map(|o| u64::MAX - o), 1 => any::<u64>()],
        reserved in any::<u32>(),
        // Header split point; data pieces (length, device-writable, or the request type's
        // direction when `None`); discard/write-zeroes segments (sector, sectors, flags).
        split in 0..=16u32,
        data in prop::collection::vec((
            prop_oneof![6 => (0..5u32).prop_map(|k| 512 * k), 2 => (1..3u32).prop_map(|k| 16 * k), 1 => 0..2048u32],
            prop_oneof![6 => Just(None), 1 => any::<bool>().prop_map(Some)],
        ), 0..3),
        segments in prop::collection::vec((
            prop_oneof![3 => 0..CAPACITY, 1 => any::<u64>()],
            prop_oneof![3 => 0..64u32, 1 => any::<u32>()],
            prop_oneof![3 => Just(0u32), 1 => Just(1u32), 1 => any::<u32>()],
        ), 4),
        status_len in prop_oneof![4 => Just(1u32), 1 => 0..4u32],
        status_write in prop_oneof![4 => Just(true), 1 => Just(false)],
        indirect in any::<bool>(),
    ) {
        let mut d = MockDriver::new(QUEUE_SIZE, MEM);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[4..8].copy_from_slice(&reserved.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let mut bufs = Vec::new();
        for part in [&header[..split as usize], &header[split as usize..]] {
            let a = d.alloc(16);
            d.write(a, part);
            bufs.push(Buf { addr: a, len: u32::try_from(part.len()).unwrap(), write: false });
        }
        let seg_list: Vec<u8> = segments
            .iter()
            .flat_map(|&(sector, n, flags)| {
                let mut b = sector.to_le_bytes().to_vec();
                b.extend(n.to_le_bytes());
                b.extend(flags.to_le_bytes());
                b
            })
            .collect();
        let reads_data = matches!(request_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        for &(len, write) in &data {
            let a = d.alloc(u64::from(len.max(1)));
            let n = seg_list.len().min(len as usize);
            d.write(a, &seg_list[..n]);
            bufs.push(Buf { addr: a, len, write: write.unwrap_or(reads_data) });
        }
        let st = d.alloc(4);
        bufs.push(Buf { addr: st, len: status_len, write: status_write });
        if indirect { d.add_indirect_chain(&bufs) } else { d.add_chain(&bufs) };
        let mut q = d.device_queue();
        let host = host_memory(d.table());
        let chain = q.pop().unwrap().expect("a well-formed chain");
        match blk::parse_request(&chain, &limits()) {
            Ok(req) => {
                prop_assert!(status_write && status_len > 0);
                check_request(req, &host);
            }
            Err(e) => {
                prop_assert_eq!(e.head(), chain.head());
                prop_assert!(!status_write || status_len == 0);
            }
        }
    }
}
