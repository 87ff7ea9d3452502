//! A/B of the virtqueue hot path against rust-vmm's `virtio-queue` (design.md: our own hot path
//! stays only if it beats it). Same work on both sides, per request: the driver bumps avail idx
//! (the avail ring is pre-filled with the head of one 3-descriptor blk chain: 16-byte header,
//! 4 KiB data, 1-byte status); the device pops the chain, checks each buffer lies inside one
//! guest memory region, and adds a used entry, publishing the used idx every time (what
//! `virtio-queue`'s `add_used` does).

use std::hint::black_box;
use std::sync::atomic::Ordering;

use criterion::{Criterion, criterion_group, criterion_main};
use ringblk_virtio::testing::MockDriver;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const QUEUE_SIZE: u16 = 256;
const BASE: u64 = 0x10_0000;
const MEM: usize = 1 << 20;

fn ours(c: &mut Criterion) {
    let mut d = MockDriver::new(QUEUE_SIZE, MEM as u64);
    let mut q = d.device_queue();
    let head = d.add_blk_request(VIRTIO_BLK_T_IN, 0, 4096, false).head;
    for _ in 1..QUEUE_SIZE {
        d.publish(head);
    }
    let mut idx = 1u16;
    d.set_avail_idx(idx);
    c.bench_function("ab_ringblk_pop_check_add_used", |b| {
        b.iter(|| {
            let chain = q.pop().unwrap().unwrap();
            // pop already checked every buffer against the memory table.
            let len = black_box(chain.descriptors()).len();
            q.add_used(chain.head(), u32::try_from(len).unwrap())
                .unwrap();
            q.publish_used().unwrap();
            idx = idx.wrapping_add(1);
            d.set_avail_idx(idx);
        })
    });
}

fn theirs(c: &mut Criterion) {
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(BASE), MEM)]).unwrap();
    let n = u64::from(QUEUE_SIZE);
    let (desc, avail) = (BASE, BASE + 16 * n);
    let used = (avail + 6 + 2 * n).next_multiple_of(4096);
    let data = (used + 6 + 8 * n).next_multiple_of(4096);
    // Descriptors 0 -> 1 -> 2: header (readable), data and status (writable).
    let bufs = [
        (data, 16u32, 0u16),
        (data + 4096, 4096, 2),
        (data + 8192, 1, 2),
    ];
    for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
        let at = GuestAddress(desc + 16 * i as u64);
        let more = i + 1 < bufs.len();
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags | u16::from(more), at.unchecked_add(12))
            .unwrap();
        mem.write_obj(
            if more {
                u16::try_from(i + 1).unwrap()
            } else {
                0
            },
            at.unchecked_add(14),
        )
        .unwrap();
    }
    for slot in 0..n {
        mem.write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
    }
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(u32::try_from(desc).unwrap()), Some(0));
    q.set_avail_ring_address(Some(u32::try_from(avail).unwrap()), Some(0));
    q.set_used_ring_address(Some(u32::try_from(used).unwrap()), Some(0));
    q.set_event_idx(true);
    q.set_ready(true);
    assert!(q.is_valid(&mem));
    let mut idx = 1u16;
    let avail_idx = GuestAddress(avail + 2);
    mem.store(idx, avail_idx, Ordering::Release).unwrap();
    c.bench_function("ab_virtio_queue_pop_check_add_used", |b| {
        b.iter(|| {
            let chain = q.iter(&mem).unwrap().next().unwrap();
            let head = chain.head_index();
            let mut count = 0u32;
            for d in chain {
                // What a device does before building an iovec: one region, whole range.
                black_box(mem.get_slice(d.addr(), d.len() as usize).unwrap());
                count += 1;
            }
            q.add_used(&mem, head, count).unwrap();
            idx = idx.wrapping_add(1);
            mem.store(idx, avail_idx, Ordering::Release).unwrap();
        })
    });
}

criterion_group!(benches, ours, theirs);
criterion_main!(benches);
