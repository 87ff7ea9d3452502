//! Generation-stamped verify.
//!
//! Every block the generator writes starts with a stamp: a magic, the block's byte offset on
//! the device, a per-block **generation** and a checksum over the whole block; the rest is a
//! pattern derived from (offset, generation). The [`VerifyTable`] remembers, per block, the
//! latest generation the device acknowledged and the generation of a write whose outcome is not
//! known (in flight, or completed with an error). A read is good when the stamp is intact, names
//! the right offset, and carries the acknowledged generation or the unknown one; an older
//! generation means an acknowledged overwrite was lost, which a plain pattern check cannot see.
//!
//! The generator never has two requests on one block in flight at once while verifying (like
//! fio's `serialize_overlap`): a read racing a write could legitimately see a torn mix of both.

use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"RBLKVFY1");
/// Bytes of the stamp at the start of each block.
pub(crate) const STAMP_LEN: usize = 32;
const CHECKSUM_AT: usize = 24;

/// Why a block failed verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadReason {
    /// The block holds no stamp (never written, zeroed, or overwritten by someone else).
    NoStamp,
    /// The stamp names another offset (misdirected write or read).
    WrongOffset,
    /// The checksum does not match the contents (corrupt or torn block).
    BadChecksum,
    /// The stamp is older than the acknowledged generation: a lost overwrite.
    StaleGeneration,
    /// The stamp is newer than any generation written to the block.
    UnknownGeneration,
}

/// One bad block found by verify.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BadBlock {
    /// Byte offset of the block on the device.
    pub offset: u64,
    /// What was wrong.
    pub reason: BadReason,
    /// Generation acknowledged for the block.
    pub expected_generation: u32,
    /// Generation found in the stamp, if it had a readable one.
    pub found_generation: Option<u32>,
}

/// Per-block generations for one region (`start`, `block_len`), shared by the generator threads.
/// Each thread touches only the blocks of its own part of the region.
pub(crate) struct VerifyTable {
    pub(crate) start: u64,
    pub(crate) block_len: u32,
    /// Low 32 bits: acknowledged generation; high 32 bits: unknown-outcome generation (0 = none).
    entries: Vec<AtomicU64>,
}

fn pack(acked: u32, pending: u32) -> u64 {
    u64::from(acked) | (u64::from(pending) << 32)
}

fn unpack(v: u64) -> (u32, u32) {
    // Truncation is the point: the two halves.
    #[allow(clippy::cast_possible_truncation)]
    (v as u32, (v >> 32) as u32)
}

impl VerifyTable {
    pub(crate) fn new(start: u64, block_len: u32, blocks: usize) -> Self {
        VerifyTable {
            start,
            block_len,
            entries: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub(crate) fn blocks(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Byte range covered.
    pub(crate) fn end(&self) -> u64 {
        self.start + self.blocks() * u64::from(self.block_len)
    }

    pub(crate) fn offset_of(&self, block: u64) -> u64 {
        self.start + block * u64::from(self.block_len)
    }

    fn entry(&self, block: u64) -> &AtomicU64 {
        &self.entries[usize::try_from(block).expect("block index fits usize")]
    }

    /// Whether the block was ever written (so verify has something to check).
    pub(crate) fn written(&self, block: u64) -> bool {
        self.entry(block).load(Ordering::Relaxed) != 0
    }

    /// Starts a write to `block`; returns its generation.
    pub(crate) fn begin_write(&self, block: u64) -> u32 {
        let e = self.entry(block);
        let (acked, pending) = unpack(e.load(Ordering::Relaxed));
        let generation = acked
            .max(pending)
            .checked_add(1)
            .expect("generation overflow");
        e.store(pack(acked, generation), Ordering::Relaxed);
        generation
    }

    /// Ends a write: acknowledged (`ok`) or failed, in which case its data may or may not be on
    /// the device and both generations stay acceptable.
    pub(crate) fn end_write(&self, block: u64, generation: u32, ok: bool) {
        let e = self.entry(block);
        let (acked, pending) = unpack(e.load(Ordering::Relaxed));
        if ok {
            e.store(pack(generation.max(acked), 0), Ordering::Relaxed);
        } else {
            e.store(pack(acked, pending.max(generation)), Ordering::Relaxed);
        }
    }

    /// Checks a block read back from the device. `None` if the block was never written.
    pub(crate) fn check(&self, block: u64, data: &[u8]) -> Option<Result<(), BadBlock>> {
        let (acked, pending) = unpack(self.entry(block).load(Ordering::Relaxed));
        if acked == 0 && pending == 0 {
            return None;
        }
        let offset = self.offset_of(block);
        let bad = |reason, found_generation| {
            Some(Err(BadBlock {
                offset,
                reason,
                expected_generation: acked,
                found_generation,
            }))
        };
        let stamp = match read_stamp(data) {
            Ok(s) => s,
            Err(reason) => return bad(reason, None),
        };
        if stamp.offset != offset {
            return bad(BadReason::WrongOffset, Some(stamp.generation));
        }
        let g = stamp.generation;
        if g == acked || (pending != 0 && g > acked && g <= pending) {
            Some(Ok(()))
        } else if g < acked {
            bad(BadReason::StaleGeneration, Some(g))
        } else {
            bad(BadReason::UnknownGeneration, Some(g))
        }
    }
}

struct Stamp {
    offset: u64,
    generation: u32,
}

/// Fills `block` with the stamped contents for (`offset`, `generation`).
pub(crate) fn fill(block: &mut [u8], offset: u64, generation: u32) {
    assert!(block.len() >= STAMP_LEN && block.len().is_multiple_of(8));
    let block_len = u32::try_from(block.len()).expect("block below 4 GiB");
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&offset.to_le_bytes());
    block[16..20].copy_from_slice(&generation.to_le_bytes());
    block[20..24].copy_from_slice(&block_len.to_le_bytes());
    let mut x = offset ^ (u64::from(generation) << 32) ^ 0x9e37_79b9_7f4a_7c15;
    for w in block[STAMP_LEN..].chunks_exact_mut(8) {
        // xorshift64*: cheap, and different for every (offset, generation).
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    let sum = checksum(block);
    block[CHECKSUM_AT..STAMP_LEN].copy_from_slice(&sum.to_le_bytes());
}

fn read_stamp(block: &[u8]) -> Result<Stamp, BadReason> {
    let u64_at = |o: usize| u64::from_le_bytes(block[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(block[o..o + 4].try_into().expect("4 bytes"));
    if block.len() < STAMP_LEN || u64_at(0) != MAGIC || u32_at(20) as usize != block.len() {
        return Err(BadReason::NoStamp);
    }
    if u64_at(CHECKSUM_AT) != checksum(block) {
        return Err(BadReason::BadChecksum);
    }
    Ok(Stamp {
        offset: u64_at(8),
        generation: u32_at(16),
    })
}

/// A 64-bit checksum of the block with its checksum field taken as zero (not cryptographic:
/// it catches corruption, torn blocks and stale contents, not an adversary).
fn checksum(block: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, w) in block.chunks_exact(8).enumerate() {
        let v = if i == CHECKSUM_AT / 8 {
            0
        } else {
            u64::from_le_bytes(w.try_into().expect("8 bytes"))
        };
        h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
    }
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(table: &VerifyTable, block: u64) -> (Vec<u8>, u32) {
        let g = table.begin_write(block);
        let mut b = vec![0u8; table.block_len as usize];
        fill(&mut b, table.offset_of(block), g);
        table.end_write(block, g, true);
        (b, g)
    }

    #[test]
    fn fresh_block_is_good_and_unwritten_block_is_unchecked() {
        let t = VerifyTable::new(4096, 4096, 8);
        let (b, g) = written(&t, 3);
        assert_eq!(g, 1);
        assert_eq!(t.check(3, &b), Some(Ok(())));
        assert_eq!(t.check(4, &b), None);
    }

    #[test]
    fn older_generation_is_a_lost_overwrite() {
        let t = VerifyTable::new(0, 4096, 8);
        let (old, _) = written(&t, 2);
        let (new, g2) = written(&t, 2);
        assert_eq!(g2, 2);
        assert_eq!(t.check(2, &new), Some(Ok(())));
        let bad = t.check(2, &old).unwrap().unwrap_err();
        assert_eq!(bad.reason, BadReason::StaleGeneration);
        assert_eq!(
            (bad.expected_generation, bad.found_generation),
            (2, Some(1))
        );
        assert_eq!(bad.offset, 2 * 4096);
    }

    #[test]
    fn failed_write_leaves_both_generations_acceptable() {
        let t = VerifyTable::new(0, 4096, 4);
        let (old, _) = written(&t, 1);
        let g = t.begin_write(1);
        let mut new = vec![0u8; 4096];
        fill(&mut new, t.offset_of(1), g);
        t.end_write(1, g, false);
        assert_eq!(t.check(1, &old), Some(Ok(())));
        assert_eq!(t.check(1, &new), Some(Ok(())));
    }

    #[test]
    fn corruption_zeroes_and_misplacement_are_caught() {
        let t = VerifyTable::new(0, 4096, 4);
        let (mut b, _) = written(&t, 0);
        let (other, _) = written(&t, 1);
        assert_eq!(
            t.check(1, &b).unwrap().unwrap_err().reason,
            BadReason::WrongOffset
        );
        assert_eq!(
            t.check(0, &vec![0u8; 4096]).unwrap().unwrap_err().reason,
            BadReason::NoStamp
        );
        b[1000] ^= 1;
        assert_eq!(
            t.check(0, &b).unwrap().unwrap_err().reason,
            BadReason::BadChecksum
        );
        assert_eq!(t.check(1, &other), Some(Ok(())));
    }

    #[test]
    fn generation_from_the_future_is_caught() {
        let t = VerifyTable::new(0, 512, 2);
        let mut b = vec![0u8; 512];
        fill(&mut b, 0, 7);
        written(&t, 0);
        assert_eq!(
            t.check(0, &b).unwrap().unwrap_err().reason,
            BadReason::UnknownGeneration
        );
    }
}
