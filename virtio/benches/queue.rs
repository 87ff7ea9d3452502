//! Hot path of a virtqueue: per iteration the mock driver republishes a 3-descriptor virtio-blk
//! read (header, 4 KiB data, status), and the device pops it, (optionally) parses it, and
//! returns it to the used ring, publishing the used idx every 32 requests as a batch would.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ringblk_virtio::blk::{self, S_OK};
use ringblk_virtio::config::BlkConfig;
use ringblk_virtio::testing::MockDriver;
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

const BATCH: u64 = 32;

fn pop_add_used(c: &mut Criterion) {
    for indirect in [false, true] {
        let mut d = MockDriver::new(256, 1 << 20);
        let mut q = d.device_queue();
        let head = d.add_blk_request(VIRTIO_BLK_T_IN, 0, 4096, indirect).head;
        let mut n = 0u64;
        let name = if indirect {
            "pop_add_used_blk_indirect"
        } else {
            "pop_add_used_blk_3desc"
        };
        c.bench_function(name, |b| {
            b.iter(|| {
                if n > 0 {
                    d.publish(head);
                }
                let chain = q.pop().unwrap().unwrap();
                q.add_used(black_box(&chain).head(), 4097).unwrap();
                n += 1;
                if n % BATCH == 0 {
                    q.publish_used().unwrap();
                }
            })
        });
    }
}

fn pop_parse_complete(c: &mut Criterion) {
    let mut d = MockDriver::new(256, 1 << 20);
    let mut q = d.device_queue();
    let limits = BlkConfig::new(1 << 20, 1).request_limits();
    let head = d.add_blk_request(VIRTIO_BLK_T_IN, 0, 4096, false).head;
    let mut n = 0u64;
    c.bench_function("pop_parse_complete_blk_3desc", |b| {
        b.iter(|| {
            if n > 0 {
                d.publish(head);
            }
            let chain = q.pop().unwrap().unwrap();
            let req = blk::parse_request(&chain, &limits).unwrap();
            let kind = black_box(req.body.unwrap());
            let (h, len) = req.completion.complete(S_OK);
            drop(kind);
            q.add_used(h, len).unwrap();
            n += 1;
            if n % BATCH == 0 {
                q.publish_used().unwrap();
            }
        })
    });
}

criterion_group!(benches, pop_add_used, pop_parse_complete);
criterion_main!(benches);
