//! Block status: what the file and null drivers report about holes, data and ranges.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use ringblk_blkgraph::Request;

use ringblk_blkgraph::file::{FileNode, FileOptions};
use ringblk_blkgraph::null::{NullCo, NullOptions};
use ringblk_blkgraph::{BlockError, Contents, Extent, Node};

const KIB: u64 = 1024;
const SIZE: u64 = 1024 * KIB;

/// A sparse file in /dev/shm (tmpfs reports holes per page): data at 64..128 KiB and in the
/// last 4 KiB, holes elsewhere.
fn sparse_file() -> (tempfile::NamedTempFile, Node) {
    let f = tempfile::Builder::new()
        .prefix("ringblk-status-")
        .tempfile_in("/dev/shm")
        .or_else(|_| tempfile::NamedTempFile::new())
        .unwrap();
    f.as_file().set_len(SIZE).unwrap();
    f.as_file()
        .write_all_at(&[7u8; 64 * 1024], 64 * KIB)
        .unwrap();
    f.as_file()
        .write_all_at(&[9u8; 4096], SIZE - 4 * KIB)
        .unwrap();
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: false,
        direct: false,
    };
    let node = Node::new("sparse", FileNode::open(&options).unwrap());
    (f, node)
}

fn extent(contents: Contents, len: u64) -> Extent {
    Extent { contents, len }
}

#[test]
fn a_file_reports_its_holes_as_zero_and_its_data_as_data_up_to_the_next_change() {
    let (_f, node) = sparse_file();
    use Contents::*;
    assert_eq!(node.block_status(0, SIZE).unwrap(), extent(Zero, 64 * KIB));
    assert_eq!(
        node.block_status(4 * KIB, SIZE - 4 * KIB).unwrap(),
        extent(Zero, 60 * KIB)
    );
    assert_eq!(
        node.block_status(64 * KIB, SIZE - 64 * KIB).unwrap(),
        extent(Data, 64 * KIB)
    );
    assert_eq!(
        node.block_status(128 * KIB, SIZE - 128 * KIB).unwrap(),
        extent(Zero, SIZE - 132 * KIB)
    );
    assert_eq!(
        node.block_status(SIZE - 4 * KIB, 4 * KIB).unwrap(),
        extent(Data, 4 * KIB)
    );
}

#[test]
fn a_run_never_reaches_past_the_range_asked_for() {
    let (_f, node) = sparse_file();
    assert_eq!(
        node.block_status(0, 512).unwrap(),
        extent(Contents::Zero, 512)
    );
    assert_eq!(
        node.block_status(70 * KIB, 10).unwrap(),
        extent(Contents::Data, 10)
    );
}

#[test]
fn a_hole_reaching_the_end_of_the_file_is_zero_to_the_end() {
    let f = tempfile::NamedTempFile::new_in("/dev/shm")
        .or_else(|_| tempfile::NamedTempFile::new())
        .unwrap();
    f.as_file().write_all_at(&[1u8; 4096], 0).unwrap();
    f.as_file().set_len(SIZE).unwrap();
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: true,
        direct: false,
    };
    let node = Node::new("tail-hole", FileNode::open(&options).unwrap());
    assert_eq!(
        node.block_status(8 * KIB, SIZE - 8 * KIB).unwrap(),
        extent(Contents::Zero, SIZE - 8 * KIB)
    );
}

#[test]
fn ranges_outside_the_node_or_empty_are_refused() {
    let (_f, node) = sparse_file();
    for (offset, len) in [
        (SIZE, 1),
        (0, SIZE + 1),
        (0, 0),
        (u64::MAX, 2),
        (SIZE - 1, u64::MAX),
    ] {
        assert!(
            matches!(
                node.block_status(offset, len),
                Err(BlockError::OutOfRange { .. })
            ),
            "[{offset}, +{len})"
        );
    }
}

#[test]
fn null_co_reads_as_zeroes_only_with_read_zeroes() {
    let plain = Node::new(
        "null",
        NullCo::new(NullOptions {
            size: SIZE,
            ..NullOptions::default()
        }),
    );
    assert_eq!(
        plain.block_status(0, SIZE).unwrap(),
        extent(Contents::Data, SIZE)
    );
    let zeroes = Node::new(
        "zeroes",
        NullCo::new(NullOptions {
            size: SIZE,
            read_zeroes: true,
            ..NullOptions::default()
        }),
    );
    assert_eq!(
        zeroes.block_status(4096, 8192).unwrap(),
        extent(Contents::Zero, 8192)
    );
}

#[test]
fn a_hole_punched_inside_a_known_data_extent_is_seen() {
    let (_f, node) = sparse_file();
    // The first answer is remembered and serves later ones inside the extent.
    assert_eq!(
        node.block_status(64 * KIB, 4 * KIB).unwrap(),
        extent(Contents::Data, 4 * KIB)
    );
    assert_eq!(
        node.block_status(96 * KIB, 4 * KIB).unwrap(),
        extent(Contents::Data, 4 * KIB)
    );
    on_context(move |ctx| {
        for (offset, unmapping) in [
            (
                96 * KIB,
                Request::Discard {
                    offset: 96 * KIB,
                    len: 32 * KIB,
                },
            ),
            (
                64 * KIB,
                Request::WriteZeroes {
                    offset: 64 * KIB,
                    len: 32 * KIB,
                    unmap: true,
                },
            ),
        ] {
            let slot = start(&node, unmapping);
            ctx.run_until(|| slot.borrow().is_some());
            assert_eq!(
                node.block_status(offset, 32 * KIB).unwrap(),
                extent(Contents::Zero, 32 * KIB),
                "punched at {offset}"
            );
        }
    });
}

#[test]
fn truncate_moves_the_end_that_block_status_and_requests_are_checked_against() {
    let (f, node) = sparse_file();
    node.truncate(2 * SIZE).unwrap();
    assert_eq!(node.size(), 2 * SIZE);
    assert_eq!(f.as_file().metadata().unwrap().len(), 2 * SIZE);
    assert_eq!(
        node.block_status(SIZE, SIZE).unwrap(),
        extent(Contents::Zero, SIZE),
        "the grown part reads as zeroes"
    );
    node.truncate(96 * KIB).unwrap();
    assert_eq!(
        node.block_status(64 * KIB, 32 * KIB).unwrap(),
        extent(Contents::Data, 32 * KIB),
        "the remembered data extent ends at the new end"
    );
    assert!(matches!(
        node.block_status(96 * KIB, 4 * KIB),
        Err(BlockError::OutOfRange { .. })
    ));
}

#[test]
fn truncate_is_refused_by_read_only_and_fixed_size_nodes() {
    let (f, _) = sparse_file();
    let options = FileOptions {
        filename: f.path().to_owned(),
        read_only: true,
        direct: false,
    };
    let read_only = Node::new("ro", FileNode::open(&options).unwrap());
    assert!(matches!(
        read_only.truncate(SIZE / 2),
        Err(BlockError::ReadOnly)
    ));
    let null = Node::new("null", NullCo::new(NullOptions::default()));
    assert!(matches!(null.truncate(SIZE), Err(BlockError::NotSupported)));
    assert_eq!(f.as_file().metadata().unwrap().len(), SIZE);
}
