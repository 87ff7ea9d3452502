//! The contract every driver keeps, run against each driver, plus driver-specific behaviour.

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::*;
use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::testing::FaultNode;
use ringblk_blkgraph::{BlockError, Node, Request};
use ringblk_ring::{Context, Wait};

const SIZE_BYTES: usize = 1 << 20;
const SIZE: u64 = SIZE_BYTES as u64;

/// One node per driver, each `SIZE` bytes; the temp file must outlive the file node.
fn every_driver() -> Vec<(Node, Option<tempfile::NamedTempFile>)> {
    let f = image(SIZE_BYTES, 0);
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: false,
        direct: false,
    };
    let file = Node::new("file", FileNode::open(&options).unwrap());
    let null = |latency_ms| {
        let o = NullOptions {
            size: SIZE,
            read_zeroes: true,
            latency: Duration::from_millis(latency_ms),
        };
        Node::new("null", NullCo::new(o))
    };
    let (fault, _) = FaultNode::new(null(0));
    vec![
        (file, Some(f)),
        (null(0), None),
        (null(1), None),
        (Node::new("fault", fault), None),
    ]
}

fn each_driver(check: fn(&Context, &Node)) {
    on_context(move |ctx| {
        for (node, _file) in every_driver() {
            check(ctx, &node);
            assert_eq!(
                node.in_flight(),
                0,
                "{node:?}: in-flight back to zero after completion"
            );
        }
    });
}

#[test]
fn completion_never_runs_inline() {
    each_driver(|ctx, node| {
        for req in [
            read(0, 512),
            write(0, &[7; 512]),
            Request::Flush,
            Request::Discard {
                offset: 0,
                len: 4096,
            },
        ] {
            let slot = start(node, req);
            assert!(slot.borrow().is_none(), "{node:?}: completed inside submit");
            ctx.run_until(|| slot.borrow().is_some());
        }
    });
}

#[test]
fn request_past_the_end_fails_out_of_range() {
    each_driver(|ctx, node| {
        let (r, _) = run(ctx, node, read(SIZE - 512, 1024));
        assert!(
            matches!(r, Err(BlockError::OutOfRange { .. })),
            "{node:?}: {r:?}"
        );
        let (r, _) = run(
            ctx,
            node,
            Request::WriteZeroes {
                offset: u64::MAX - 10,
                len: 20,
                unmap: false,
            },
        );
        assert!(
            matches!(r, Err(BlockError::OutOfRange { .. })),
            "{node:?}: overflow is out of range, got {r:?}"
        );
    });
}

#[test]
fn read_of_written_zeroes_reads_zeroes() {
    each_driver(|ctx, node| {
        assert!(run(ctx, node, write(4096, &[9; 4096])).0.is_ok());
        let (r, _) = run(
            ctx,
            node,
            Request::WriteZeroes {
                offset: 4096,
                len: 4096,
                unmap: false,
            },
        );
        assert!(r.is_ok(), "{node:?}: {r:?}");
        let (r, req) = run(ctx, node, read(4096, 4096));
        assert!(r.is_ok());
        assert!(data(req).iter().all(|&b| b == 0), "{node:?}");
    });
}

#[test]
fn flush_completes_ok() {
    each_driver(|ctx, node| assert!(run(ctx, node, Request::Flush).0.is_ok(), "{node:?}"));
}

#[test]
fn many_requests_in_one_turn_all_complete_once() {
    each_driver(|ctx, node| {
        let slots: Vec<_> = (0..200u8)
            .map(|i| start(node, write(u64::from(i % 64) * 4096, &[i; 4096])))
            .collect();
        ctx.run_until(|| slots.iter().all(|s| s.borrow().is_some()));
        assert!(slots.iter().all(|s| s.borrow().as_ref().unwrap().0.is_ok()));
    });
}

#[test]
fn file_write_then_read_round_trips() {
    on_context(|ctx| {
        let f = image(SIZE_BYTES, 0);
        let options = FileOptions {
            filename: f.path().to_owned(),
            read_only: false,
            direct: false,
        };
        let node = Node::new("f", FileNode::open(&options).unwrap());
        assert_eq!(node.size(), SIZE);
        assert!(run(ctx, &node, write(8192, b"round trip")).0.is_ok());
        let (_, req) = run(ctx, &node, read(8192, 10));
        assert_eq!(data(req), b"round trip");
        let mut on_disk = [0u8; 10];
        f.as_file().read_exact_at(&mut on_disk, 8192).unwrap();
        assert_eq!(&on_disk, b"round trip");
    });
}

#[test]
fn file_read_past_a_shrunk_end_is_resubmitted_then_zero_filled() {
    on_context(|ctx| {
        let f = image(8192, 0xCC);
        let options = FileOptions {
            filename: f.path().to_owned(),
            read_only: false,
            direct: false,
        };
        let node = Node::new("f", FileNode::open(&options).unwrap());
        f.as_file().set_len(6144).unwrap();
        let (r, req) = run(ctx, &node, read(4096, 4096));
        assert!(r.is_ok());
        let got = data(req);
        assert!(
            got[..2048].iter().all(|&b| b == 0xCC),
            "the part before the end is the file's"
        );
        assert!(
            got[2048..].iter().all(|&b| b == 0),
            "the part after the end reads as zeroes"
        );
    });
}

#[test]
fn file_read_only_refuses_writes_and_serves_reads() {
    on_context(|ctx| {
        let f = image(SIZE_BYTES, 0x11);
        let options = FileOptions {
            filename: f.path().to_owned(),
            read_only: true,
            direct: false,
        };
        let node = Node::new("ro", FileNode::open(&options).unwrap());
        for req in [
            write(0, &[1; 512]),
            Request::Discard {
                offset: 0,
                len: 512,
            },
        ] {
            let (r, _) = run(ctx, &node, req);
            assert!(matches!(r, Err(BlockError::ReadOnly)), "{r:?}");
        }
        let (r, req) = run(ctx, &node, read(0, 512));
        assert!(r.is_ok());
        assert!(data(req).iter().all(|&b| b == 0x11));
    });
}

#[test]
fn file_missing_image_error_names_the_file() {
    let options = FileOptions {
        filename: "/nonexistent/disk.img".into(),
        read_only: false,
        direct: false,
    };
    let err = FileNode::open(&options)
        .err()
        .expect("opening a missing image fails");
    assert_eq!(
        err.to_string(),
        "Could not open '/nonexistent/disk.img': No such file or directory"
    );
}

#[test]
fn file_direct_refuses_unaligned_requests() {
    on_context(|ctx| {
        // /dev/shm is tmpfs, which supports O_DIRECT on the kernels ringblk targets.
        let f = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        f.as_file().set_len(SIZE).unwrap();
        let options = FileOptions {
            filename: f.path().to_owned(),
            read_only: false,
            direct: true,
        };
        let node = match FileNode::open(&options) {
            Ok(driver) => Node::new("direct", driver),
            Err(e) => {
                eprintln!("SKIP: O_DIRECT not supported on /dev/shm here: {e}");
                return;
            }
        };
        let alignment = node.limits().request_alignment;
        assert!(alignment == 512 || alignment == 4096, "{alignment}");
        let (r, _) = run(ctx, &node, read(1, 512));
        assert!(matches!(r, Err(BlockError::Unaligned { .. })), "{r:?}");
        ctx.turn(Wait::No);
    });
}

/// An O_DIRECT image of `len` bytes of 0xaa (allocated: no holes, which O_DIRECT reads without
/// checking alignment) on the disk the tests run from (the work tree: ext4 or xfs, not tmpfs),
/// or `None` with a loud line where the file system refuses O_DIRECT.
fn direct_image_on_disk(len: usize) -> Option<(Node, tempfile::NamedTempFile)> {
    let f = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    f.as_file().write_all_at(&vec![0xaa; len], 0).unwrap();
    f.as_file().sync_all().unwrap();
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: false,
        direct: true,
    };
    match FileNode::open(&options) {
        Ok(driver) => Some((Node::new("direct", driver), f)),
        Err(e) => {
            eprintln!(
                "SKIP: O_DIRECT refused under {}: {e}",
                env!("CARGO_TARGET_TMPDIR")
            );
            None
        }
    }
}

#[test]
fn file_direct_takes_misaligned_memory_through_a_bounce_buffer() {
    on_context(|ctx| {
        let Some((node, f)) = direct_image_on_disk(SIZE_BYTES) else {
            return;
        };
        let block = node.limits().request_alignment as usize;
        let pattern: Vec<u8> = (0..16 * block)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        // 16 bytes into a page-aligned buffer, where malloc puts a large Vec's data: misaligned
        // for any DMA alignment above 16.
        let misaligned = |data: &[u8]| {
            let mut whole = vec![0u8; data.len() + 16];
            whole[16..].copy_from_slice(data);
            Box::new(ringblk_ring::buf::Window::new(
                Box::new(ringblk_ring::buf::OwnedBuf::from_slice(&whole)),
                16,
            ))
        };
        let offset = 3 * block as u64;
        let w = Request::Write {
            offset,
            buf: misaligned(&pattern),
        };
        let (r, _) = run(ctx, &node, w);
        r.expect("a misaligned write to an O_DIRECT file succeeds");
        let mut on_disk = vec![0u8; pattern.len()];
        f.as_file().read_exact_at(&mut on_disk, offset).unwrap();
        assert_eq!(on_disk, pattern, "the write reached the file");
        let r = Request::Read {
            offset,
            buf: misaligned(&vec![0; pattern.len()]),
        };
        let (r, req) = run(ctx, &node, r);
        r.expect("a misaligned read from an O_DIRECT file succeeds");
        assert_eq!(
            data(req),
            pattern,
            "the read came back into the caller's memory"
        );
    });
}
