//! virtio-blk device configuration (virtio 1.2 §5.2.4), the feature bits the device offers
//! (§5.2.3) and the GET_ID string (§5.2.6).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::queue::INDIRECT_DESCRIPTORS_MAX;

/// Bytes of `struct virtio_blk_config` in virtio 1.2, up to and including the zoned
/// characteristics (the fields past `unused1` are features we do not offer and read as zero).
/// GET_CONFIG may read any range inside it.
pub const CONFIG_LEN: usize = 96;

/// Length of the GET_ID string.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Offset of `writeback`, the only field the driver writes (VIRTIO_BLK_F_CONFIG_WCE).
const WRITEBACK_OFFSET: usize = 32;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
}

/// Errors of the configuration space. Sorted by name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config field {0} is invalid: {1}")]
    Invalid(&'static str, &'static str),
    #[error("config access {offset}+{len} beyond the {CONFIG_LEN}-byte config space")]
    OutOfRange { offset: u32, len: usize },
    #[error("config bytes {offset}+{len} are not writable")]
    ReadOnlyField { offset: u32, len: usize },
    #[error("writeback value {0} is neither 0 nor 1")]
    WritebackValue(u8),
}

/// The device's configuration: what GET_CONFIG returns and what requests are checked against.
///
/// Discard is offered when `max_discard_sectors > 0`, write-zeroes when
/// `max_write_zeroes_sectors > 0`, neither on a read-only device. `writeback == false` asks for
/// write-through: a write's data is stable when it completes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors, whatever the block size.
    pub capacity_sectors: u64,
    /// Largest segment, bytes.
    pub size_max: u32,
    /// Most data segments in a request; at most `INDIRECT_DESCRIPTORS_MAX - 2`.
    pub seg_max: u32,
    pub geometry: Geometry,
    /// Logical block size, bytes: a power of two of at least 512.
    pub blk_size: u32,
    pub topology: Topology,
    pub writeback: bool,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
    pub read_only: bool,
}

/// Limits of discard or write-zeroes requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLimits {
    pub max_sectors: u32,
    pub max_segments: u32,
}

/// What a request is checked against, derived from a [`BlkConfig`]; small and `Copy`, so each
/// queue's context can keep its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    pub capacity_sectors: u64,
    /// Lengths and sectors of reads and writes are multiples of this (bytes).
    pub logical_block_size: u32,
    /// Most data bytes in one read or write: `size_max * seg_max`.
    pub max_data_bytes: u64,
    pub max_data_segments: u32,
    pub read_only: bool,
    /// `None` when the feature is not offered.
    pub discard: Option<SegmentLimits>,
    pub write_zeroes: Option<SegmentLimits>,
}

const fn bit(b: u32) -> u64 {
    1 << b
}

impl BlkConfig {
    /// A writable disk of `capacity_sectors` with 512-byte blocks and `num_queues` queues, and
    /// this crate's defaults for the rest: segments of up to 1 MiB, 254 of them, discard and
    /// write-zeroes of up to 2 GiB in one segment, a write-back cache.
    pub fn new(capacity_sectors: u64, num_queues: u16) -> BlkConfig {
        BlkConfig {
            capacity_sectors,
            size_max: 1 << 20,
            seg_max: 254,
            geometry: Geometry::default(),
            blk_size: 512,
            topology: Topology {
                min_io_size: 1,
                ..Topology::default()
            },
            writeback: true,
            num_queues,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 1,
            discard_sector_alignment: 1,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 1,
            write_zeroes_may_unmap: true,
            read_only: false,
        }
    }

    /// Checks the values a driver relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, why| Err(ConfigError::Invalid(field, why));
        if !self.blk_size.is_power_of_two() || self.blk_size < 512 {
            return invalid("blk_size", "not a power of two of at least 512");
        }
        if !(1..=INDIRECT_DESCRIPTORS_MAX - 2).contains(&self.seg_max) {
            return invalid("seg_max", "not in 1..=INDIRECT_DESCRIPTORS_MAX - 2");
        }
        if self.size_max < self.blk_size {
            return invalid("size_max", "smaller than blk_size");
        }
        if self.num_queues == 0 {
            return invalid("num_queues", "zero");
        }
        if self.max_discard_sectors > 0 && self.max_discard_seg == 0 {
            return invalid("max_discard_seg", "zero with discard offered");
        }
        if self.max_write_zeroes_sectors > 0 && self.max_write_zeroes_seg == 0 {
            return invalid("max_write_zeroes_seg", "zero with write-zeroes offered");
        }
        Ok(())
    }

    fn offers_discard(&self) -> bool {
        !self.read_only && self.max_discard_sectors > 0
    }

    fn offers_write_zeroes(&self) -> bool {
        !self.read_only && self.max_write_zeroes_sectors > 0
    }

    /// The feature bits the device offers (virtio-blk's §5.2.3 and the ring's §6).
    pub fn device_features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            // §5.2.5.2: devices SHOULD offer FLUSH, and MUST if they offer CONFIG_WCE.
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        if self.offers_discard() {
            f |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if self.offers_write_zeroes() {
            f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// The limits requests are checked against.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            capacity_sectors: self.capacity_sectors,
            logical_block_size: self.blk_size,
            max_data_bytes: u64::from(self.size_max) * u64::from(self.seg_max),
            max_data_segments: self.seg_max,
            read_only: self.read_only,
            discard: self.offers_discard().then_some(SegmentLimits {
                max_sectors: self.max_discard_sectors,
                max_segments: self.max_discard_seg,
            }),
            write_zeroes: self.offers_write_zeroes().then_some(SegmentLimits {
                max_sectors: self.max_write_zeroes_sectors,
                max_segments: self.max_write_zeroes_seg,
            }),
        }
    }

    /// The config space, little-endian (§5.2.4); the padding (`unused0`, `unused1`) and the
    /// fields of features not offered are zero.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &self.size_max.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        put(16, &self.geometry.cylinders.to_le_bytes());
        put(18, &[self.geometry.heads, self.geometry.sectors]);
        put(20, &self.blk_size.to_le_bytes());
        put(
            24,
            &[
                self.topology.physical_block_exp,
                self.topology.alignment_offset,
            ],
        );
        put(26, &self.topology.min_io_size.to_le_bytes());
        put(28, &self.topology.opt_io_size.to_le_bytes());
        put(WRITEBACK_OFFSET, &[u8::from(self.writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        if self.offers_discard() {
            put(36, &self.max_discard_sectors.to_le_bytes());
            put(40, &self.max_discard_seg.to_le_bytes());
            put(44, &self.discard_sector_alignment.to_le_bytes());
        }
        if self.offers_write_zeroes() {
            put(48, &self.max_write_zeroes_sectors.to_le_bytes());
            put(52, &self.max_write_zeroes_seg.to_le_bytes());
            put(56, &[u8::from(self.write_zeroes_may_unmap)]);
        }
        b
    }

    /// GET_CONFIG: fills `out` with the config bytes at `offset`; the range must lie inside
    /// the config space.
    pub fn read(&self, offset: u32, out: &mut [u8]) -> Result<(), ConfigError> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start
            .checked_add(out.len())
            .filter(|&end| end <= CONFIG_LEN)
            .ok_or(ConfigError::OutOfRange {
                offset,
                len: out.len(),
            })?;
        out.copy_from_slice(&self.to_bytes()[start..end]);
        Ok(())
    }

    /// SET_CONFIG: the driver may write only `writeback` (0 write-through, 1 write-back).
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        match (usize::try_from(offset), data) {
            (Ok(WRITEBACK_OFFSET), &[v @ (0 | 1)]) => {
                self.writeback = v == 1;
                Ok(())
            }
            (Ok(WRITEBACK_OFFSET), &[v]) => Err(ConfigError::WritebackValue(v)),
            _ => Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            }),
        }
    }
}

/// The GET_ID reply for `serial`: its first 20 bytes, NUL-padded (not NUL-terminated when it
/// has 20 bytes or more).
pub fn device_id(serial: &str) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = serial.len().min(ID_BYTES);
    id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use virtio_bindings::virtio_blk::virtio_blk_config as C;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn config_layout_matches_the_kernel_struct() {
        let mut c = BlkConfig::new(0x1122_3344_5566, 4);
        c.blk_size = 4096;
        c.topology = Topology {
            physical_block_exp: 3,
            alignment_offset: 1,
            min_io_size: 8,
            opt_io_size: 64,
        };
        c.geometry = Geometry {
            cylinders: 7,
            heads: 8,
            sectors: 9,
        };
        let b = c.to_bytes();
        assert_eq!(std::mem::size_of::<C>(), CONFIG_LEN);
        assert_eq!(
            u64::from_le_bytes(b[offset_of!(C, capacity)..][..8].try_into().unwrap()),
            0x1122_3344_5566
        );
        assert_eq!(u32_at(&b, offset_of!(C, size_max)), 1 << 20);
        assert_eq!(u32_at(&b, offset_of!(C, seg_max)), 254);
        assert_eq!(b[offset_of!(C, geometry) + 2], 8);
        assert_eq!(u32_at(&b, offset_of!(C, blk_size)), 4096);
        assert_eq!(b[offset_of!(C, physical_block_exp)], 3);
        assert_eq!(b[offset_of!(C, alignment_offset)], 1);
        assert_eq!(u32_at(&b, offset_of!(C, opt_io_size)), 64);
        assert_eq!(b[offset_of!(C, wce)], 1);
        assert_eq!(offset_of!(C, wce), WRITEBACK_OFFSET);
        assert_eq!(
            u16::from_le_bytes(b[offset_of!(C, num_queues)..][..2].try_into().unwrap()),
            4
        );
        assert_eq!(u32_at(&b, offset_of!(C, max_discard_sectors)), 1 << 22);
        assert_eq!(u32_at(&b, offset_of!(C, max_discard_seg)), 1);
        assert_eq!(u32_at(&b, offset_of!(C, discard_sector_alignment)), 1);
        assert_eq!(u32_at(&b, offset_of!(C, max_write_zeroes_sectors)), 1 << 22);
        assert_eq!(u32_at(&b, offset_of!(C, max_write_zeroes_seg)), 1);
        assert_eq!(b[offset_of!(C, write_zeroes_may_unmap)], 1);
        assert!(
            b[offset_of!(C, max_secure_erase_sectors)..]
                .iter()
                .all(|&x| x == 0)
        );
    }

    #[test]
    fn config_read_checks_offset_and_length() {
        let c = BlkConfig::new(8, 1);
        let mut out = [0u8; 8];
        c.read(0, &mut out).unwrap();
        assert_eq!(u64::from_le_bytes(out), 8);
        let mut whole = [0u8; CONFIG_LEN];
        c.read(0, &mut whole).unwrap();
        assert!(c.read(92, &mut out).is_err());
        assert!(c.read(u32::MAX, &mut out).is_err());
        assert!(c.read(96, &mut []).is_ok());
    }

    #[test]
    fn config_write_changes_only_writeback() {
        let mut c = BlkConfig::new(8, 1);
        c.write(32, &[0]).unwrap();
        assert!(!c.writeback);
        assert_eq!(c.write(32, &[2]), Err(ConfigError::WritebackValue(2)));
        assert!(matches!(
            c.write(0, &[0; 8]),
            Err(ConfigError::ReadOnlyField { .. })
        ));
        assert!(matches!(
            c.write(32, &[1, 0]),
            Err(ConfigError::ReadOnlyField { .. })
        ));
    }

    #[test]
    fn read_only_device_offers_ro_and_no_discard_or_write_zeroes() {
        let mut c = BlkConfig::new(8, 1);
        let rw = c.device_features();
        assert_ne!(rw & bit(VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(rw & bit(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(rw & bit(VIRTIO_BLK_F_RO), 0);
        c.read_only = true;
        let ro = c.device_features();
        assert_ne!(ro & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            ro & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
            0
        );
        assert_eq!(c.request_limits().discard, None);
        assert_eq!(u32_at(&c.to_bytes(), 36), 0);
    }

    #[test]
    fn features_include_ring_and_version_bits() {
        let f = BlkConfig::new(8, 1).device_features();
        for b in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
    }

    #[test]
    fn validate_rejects_inconsistent_values() {
        assert_eq!(BlkConfig::new(8, 1).validate(), Ok(()));
        let mut c = BlkConfig::new(8, 1);
        c.blk_size = 1000;
        assert!(c.validate().is_err());
        let mut c = BlkConfig::new(8, 1);
        c.seg_max = INDIRECT_DESCRIPTORS_MAX;
        assert!(c.validate().is_err());
        let mut c = BlkConfig::new(8, 0);
        assert!(c.validate().is_err());
        c.num_queues = 1;
        c.max_discard_seg = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn device_id_pads_and_truncates() {
        assert_eq!(&device_id("disk0")[..6], b"disk0\0");
        assert_eq!(
            &device_id("0123456789abcdefghijXYZ"),
            b"0123456789abcdefghij"
        );
    }
}
