//! The dirty bitmap: one bit per chunk of `granularity` bytes, in atomic words.
//!
//! Guest writes set bits on whatever I/O context they run on while the job clears and scans
//! them on the main context, so every operation is a single atomic read-modify-write per word
//! and needs no lock. The count of set bits is kept beside the words; it is updated right after
//! the word, so a reader may briefly see a count that lags the words by the bits of one call.
//! Exact questions ("is anything dirty?" inside a drained section) scan the words instead.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Smallest granularity QEMU accepts, and ours.
pub const GRANULARITY_MIN: u64 = 512;
/// Largest granularity.
pub const GRANULARITY_MAX: u64 = 64 << 20;
/// The default granularity.
pub const GRANULARITY_DEFAULT: u64 = 64 << 10;

const WORD_BITS: u64 = 64;

/// A bitmap of chunks over a disk of `size` bytes.
pub struct DirtyBitmap {
    size: u64,
    shift: u32,
    chunks: u64,
    words: Box<[AtomicU64]>,
    count: AtomicU64,
}

impl DirtyBitmap {
    /// A clean bitmap. `granularity` must be a power of two in
    /// [`GRANULARITY_MIN`, `GRANULARITY_MAX`] (checked by the caller's options; asserted here).
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        assert!(
            granularity.is_power_of_two()
                && (GRANULARITY_MIN..=GRANULARITY_MAX).contains(&granularity),
            "bad granularity {granularity}"
        );
        let chunks = size.div_ceil(granularity);
        let words = chunks.div_ceil(WORD_BITS);
        DirtyBitmap {
            size,
            shift: granularity.trailing_zeros(),
            chunks,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
        }
    }

    /// Bytes per chunk.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of chunks (the last one may be short).
    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    /// Byte range of `chunks`, clipped to the disk.
    pub fn byte_range(&self, chunks: Range<u64>) -> Range<u64> {
        (chunks.start << self.shift).min(self.size)..(chunks.end << self.shift).min(self.size)
    }

    /// The chunks that `[offset, offset + len)` touches.
    pub fn touched(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.size);
        (offset >> self.shift)..end.div_ceil(self.granularity()).min(self.chunks)
    }

    /// The chunks that `[offset, offset + len)` covers entirely (the short last chunk counts
    /// as covered when the range reaches the end of the disk).
    pub fn covered(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.size);
        let first = offset.div_ceil(self.granularity());
        let last = if end == self.size {
            self.chunks
        } else {
            end >> self.shift
        };
        if first >= last { 0..0 } else { first..last }
    }

    /// Sets the bits of `chunks`; returns how many were clean before.
    pub fn set(&self, chunks: Range<u64>) -> u64 {
        let mut newly = 0;
        self.for_each_word(chunks, |word, mask| {
            let old = word.fetch_or(mask, Ordering::SeqCst);
            newly += u64::from((mask & !old).count_ones());
        });
        if newly > 0 {
            self.count.fetch_add(newly, Ordering::SeqCst);
        }
        newly
    }

    /// Clears the bits of `chunks`; returns how many were dirty before.
    pub fn clear(&self, chunks: Range<u64>) -> u64 {
        let mut cleared = 0;
        self.for_each_word(chunks, |word, mask| {
            let old = word.fetch_and(!mask, Ordering::SeqCst);
            cleared += u64::from((mask & old).count_ones());
        });
        if cleared > 0 {
            self.count.fetch_sub(cleared, Ordering::SeqCst);
        }
        cleared
    }

    /// Whether every bit of `chunks` is set.
    pub fn all_set(&self, chunks: Range<u64>) -> bool {
        let mut all = true;
        self.for_each_word(chunks, |word, mask| {
            all &= word.load(Ordering::SeqCst) & mask == mask;
        });
        all
    }

    /// Whether `chunk` is dirty.
    pub fn is_set(&self, chunk: u64) -> bool {
        self.all_set(chunk..chunk + 1)
    }

    /// Dirty chunks, as counted beside the words.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Dirty bytes (the short last chunk counted at its real size is not worth the scan: this
    /// is a progress figure).
    pub fn dirty_bytes(&self) -> u64 {
        (self.count() << self.shift).min(self.size)
    }

    /// The first dirty chunk in `from..to`, scanning whole words.
    pub fn next_set(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.chunks);
        let mut chunk = from;
        while chunk < to {
            let index = word_index(chunk);
            let bit = chunk % WORD_BITS;
            let word = self.words[index].load(Ordering::SeqCst) >> bit;
            if word != 0 {
                let found = chunk + u64::from(word.trailing_zeros());
                return (found < to).then_some(found);
            }
            chunk += WORD_BITS - bit;
        }
        None
    }

    /// Whether no bit is set, by scanning the words (exact when nobody sets bits concurrently).
    pub fn is_clean(&self) -> bool {
        self.words.iter().all(|w| w.load(Ordering::SeqCst) == 0)
    }

    fn for_each_word(&self, chunks: Range<u64>, mut f: impl FnMut(&AtomicU64, u64)) {
        let end = chunks.end.min(self.chunks);
        let mut chunk = chunks.start;
        while chunk < end {
            let bit = chunk % WORD_BITS;
            let n = (WORD_BITS - bit).min(end - chunk);
            let mask = if n == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            f(&self.words[word_index(chunk)], mask);
            chunk += n;
        }
    }
}

fn word_index(chunk: u64) -> usize {
    usize::try_from(chunk / WORD_BITS).expect("the bitmap fits in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_clear_count_only_changed_bits_across_words() {
        let b = DirtyBitmap::new(200 * 512, 512);
        assert_eq!(b.set(60..130), 70);
        assert_eq!(b.set(0..64), 60, "60..64 were already set");
        assert_eq!(b.count(), 130);
        assert_eq!(b.clear(100..200), 30);
        assert_eq!(b.count(), 100);
        assert!(b.all_set(0..100) && !b.is_set(100));
    }

    #[test]
    fn next_set_finds_bits_past_word_boundaries_and_respects_the_end() {
        let b = DirtyBitmap::new(300 * 512, 512);
        b.set(130..131);
        assert_eq!(b.next_set(0, 300), Some(130));
        assert_eq!(b.next_set(131, 300), None);
        assert_eq!(b.next_set(0, 130), None);
        b.set(299..300);
        assert_eq!(b.next_set(131, 300), Some(299));
    }

    #[test]
    fn covered_chunks_exclude_partial_ones_except_the_short_tail() {
        let b = DirtyBitmap::new(10_000, 4096);
        assert_eq!(b.chunks(), 3);
        assert_eq!(b.covered(0, 4096), 0..1);
        assert_eq!(b.covered(1, 8192), 1..2);
        assert_eq!(b.covered(4000, 100), 0..0);
        assert_eq!(b.covered(8192, 10_000 - 8192), 2..3, "the short tail chunk");
        assert_eq!(b.touched(4000, 200), 0..2);
        assert_eq!(b.byte_range(2..3), 8192..10_000);
    }

    #[test]
    fn clean_scan_and_count_agree() {
        let b = DirtyBitmap::new(1 << 20, 4096);
        assert!(b.is_clean());
        b.set(255..256);
        assert!(!b.is_clean());
        assert_eq!(b.dirty_bytes(), 4096);
    }
}
