//! Drained sections on null-co: begin/end with N requests in flight, and a pivot under drain.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::{BackendHandle, Node, Request, drained_begin};
use ringblk_ring::Context;
use ringblk_ring::buf::OwnedBuf;

fn null(name: &str) -> Node {
    Node::new(name, NullCo::new(NullOptions::default()))
}

fn drain(c: &mut Criterion) {
    let ctx = Context::new(256).unwrap();
    let node = null("n");
    let mut group = c.benchmark_group("drained_begin_end");
    group
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    for in_flight in [0u64, 1, 32, 128] {
        group.bench_with_input(
            BenchmarkId::from_parameter(in_flight),
            &in_flight,
            |b, &n| {
                b.iter(|| {
                    for i in 0..n {
                        let req = Request::Read {
                            offset: i * 4096,
                            buf: Box::new(OwnedBuf::zeroed(0)),
                        };
                        node.submit(req, Box::new(|_, _| {}));
                    }
                    drop(drained_begin(&node));
                });
            },
        );
    }
    group.finish();

    let (a, b) = (null("a"), null("b"));
    let handle = BackendHandle::new(&a);
    c.bench_function("replace_under_drain", |bench| {
        bench.iter(|| {
            let old = handle.root();
            let new = if old.same(&a) { &b } else { &a };
            let drained = drained_begin(&old);
            handle.replace(new);
            drop(drained);
        });
    });
    ctx.shutdown();
}

criterion_group!(benches, drain);
criterion_main!(benches);
