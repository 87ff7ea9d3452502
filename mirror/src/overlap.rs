//! Chunk locks: how the job's copies and write-blocking guest writes keep out of each other.
//!
//! One atomic word per chunk (striped over at most [`STRIPES_MAX`] words for huge disks: two
//! chunks sharing a word only cause false conflicts, which are safe) holds:
//! - `COPYING`: the job is copying the chunk (a [`crate::copy`] op claimed it);
//! - a count of write-blocking guest writes in flight on the chunk;
//! - `TAINT`: a second writer or a copy overlapped some writer while it was in flight.
//!
//! Rules, each one atomic compare-and-swap:
//! - the job claims a chunk only when no copy and no writer holds it (otherwise it leaves the
//!   chunk dirty and comes back later), so a chunk is never copied twice at once and never
//!   copied while a guest write to it is in flight;
//! - a writer always enters, but if a copy or another writer holds the chunk it enters
//!   *conflicted* and taints the word; a writer that entered conflicted, or finds the word
//!   tainted when it leaves, must leave the chunk dirty, because its write to the target may
//!   have been reordered against the other one. Only an unconflicted writer may clean.

use std::sync::atomic::{AtomicU32, Ordering};

/// Upper bound on lock words (256 KiB).
pub const STRIPES_MAX: u64 = 1 << 16;

const COPYING: u32 = 1 << 31;
const TAINT: u32 = 1 << 30;
const WRITERS: u32 = TAINT - 1;

/// The lock words.
pub(crate) struct ChunkLocks {
    words: Box<[AtomicU32]>,
}

impl ChunkLocks {
    pub(crate) fn new(chunks: u64) -> ChunkLocks {
        let n = chunks.clamp(1, STRIPES_MAX);
        ChunkLocks {
            words: (0..n).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn word(&self, chunk: u64) -> &AtomicU32 {
        let index = chunk % self.words.len() as u64;
        &self.words[usize::try_from(index).expect("below STRIPES_MAX")]
    }

    fn update(&self, chunk: u64, f: impl Fn(u32) -> Option<u32>) -> Result<u32, u32> {
        self.word(chunk)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, f)
    }

    /// The job claims `chunk` for a copy; fails if a copy or a writer holds it.
    pub(crate) fn try_claim(&self, chunk: u64) -> bool {
        self.update(chunk, |w| {
            (w & (COPYING | WRITERS) == 0).then_some(w | COPYING)
        })
        .is_ok()
    }

    /// Whether the job could claim `chunk` now.
    pub(crate) fn is_free(&self, chunk: u64) -> bool {
        self.word(chunk).load(Ordering::SeqCst) & (COPYING | WRITERS) == 0
    }

    /// The job's copy of `chunk` is over.
    pub(crate) fn release(&self, chunk: u64) {
        let old = self.word(chunk).fetch_and(!COPYING, Ordering::SeqCst);
        assert!(
            old & COPYING != 0,
            "release of chunk {chunk} that was not claimed"
        );
    }

    /// A write-blocking guest write enters `chunk`; returns whether it entered conflicted.
    pub(crate) fn writer_enter(&self, chunk: u64) -> bool {
        let old = self
            .update(chunk, |w| {
                assert!(w & WRITERS < WRITERS, "writer count overflow");
                let conflict = w & (COPYING | WRITERS) != 0;
                Some((w + 1) | if conflict { TAINT } else { 0 })
            })
            .expect("writer_enter always updates");
        old & (COPYING | WRITERS) != 0
    }

    /// The writer leaves `chunk`; returns whether the word was tainted during its stay.
    pub(crate) fn writer_exit(&self, chunk: u64) -> bool {
        let old = self
            .update(chunk, |w| {
                assert!(w & WRITERS > 0, "writer_exit without writer_enter");
                let left = w - 1;
                Some(if left & WRITERS == 0 {
                    left & !TAINT
                } else {
                    left
                })
            })
            .expect("writer_exit always updates");
        old & TAINT != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_and_a_writer_exclude_each_other() {
        let l = ChunkLocks::new(8);
        assert!(l.try_claim(3));
        assert!(!l.try_claim(3), "never copied twice at once");
        assert!(l.writer_enter(3), "a writer during a copy is conflicted");
        l.release(3);
        assert!(!l.try_claim(3), "no copy while a writer is in flight");
        assert!(l.writer_exit(3), "and it leaves tainted");
        assert!(l.try_claim(3));
    }

    #[test]
    fn overlapping_writers_taint_each_other_and_the_taint_ends_with_the_last() {
        let l = ChunkLocks::new(8);
        assert!(!l.writer_enter(1));
        assert!(l.writer_enter(1));
        assert!(l.writer_exit(1), "the first sees the second's taint");
        assert!(l.writer_exit(1));
        assert!(!l.writer_enter(1), "a later writer starts clean");
        assert!(!l.writer_exit(1));
    }
}
