//! virtio-blk requests (virtio 1.2 §5.2.6): a descriptor chain parsed into what to do, where the
//! data is, and where the status goes.
//!
//! Layout of a request, as a byte stream over the chain (§2.7.4: the device makes no assumption
//! about how the driver splits it into descriptors):
//!
//! ```text
//!   device-readable:  type: le32 | reserved: le32 | sector: le64 | data (OUT, DISCARD, WRITE_ZEROES)
//!   device-writable:  data (IN, GET_ID) | status: u8
//! ```
//!
//! The status byte is the last byte of the chain, which must be device-writable; a chain without
//! one cannot be answered and is a [`ChainError`] (complete it with used length 0). Any other
//! defect is a [`RequestError`], answered through [`status`], the one place that maps errors to
//! `VIRTIO_BLK_S_*`.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use crate::config::{ID_BYTES, RequestLimits, SegmentLimits};
use crate::memory::{GuestBuffers, GuestByte, MemoryError, MemoryTable};
use crate::narrow_u8;
use crate::queue::{Descriptor, DescriptorChain};

pub const S_OK: u8 = narrow_u8(VIRTIO_BLK_S_OK);
pub const S_IOERR: u8 = narrow_u8(VIRTIO_BLK_S_IOERR);
pub const S_UNSUPP: u8 = narrow_u8(VIRTIO_BLK_S_UNSUPP);

/// Sector unit of the protocol, whatever the block size (§5.2.5).
pub const SECTOR_BYTES: u64 = 512;

const HEADER_BYTES: u64 = 16;
const SEGMENT_BYTES: u64 = 16;

/// A chain that cannot carry a status. Complete it with used length 0 and log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("chain at head {head} does not end in a device-writable status byte")]
    NoStatus { head: u16 },
}

impl ChainError {
    pub fn head(&self) -> u16 {
        match self {
            ChainError::NoStatus { head } => *head,
        }
    }
}

/// A request the device answers with an error status. Sorted by name; [`status`] maps each.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("discard segment with the unmap flag")]
    DiscardUnmap,
    #[error("guest memory: {0}")]
    GuestMemory(#[from] MemoryError),
    #[error("the header needs 16 device-readable bytes, the chain has {0}")]
    HeaderTooShort(u64),
    #[error("length {len} is not a multiple of the logical block size {block}")]
    MisalignedLength { len: u64, block: u32 },
    #[error("sector {sector} is not aligned to the logical block size {block}")]
    MisalignedSector { sector: u64, block: u32 },
    #[error("sectors {sector}+{sectors} are beyond the capacity of {capacity}")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("segment flags {0:#x} have reserved bits set")]
    ReservedFlags(u32),
    #[error("segment list of {0} bytes is not a nonzero multiple of 16")]
    SegmentListLength(u64),
    #[error("segment of {sectors} sectors, the limit is {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
    #[error("{len} data bytes, the limit is {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("{count} segments, the limit is {max}")]
    TooManySegments { count: u64, max: u32 },
    #[error("a device-readable descriptor follows a device-writable one")]
    UnorderedDescriptors,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("data descriptors point the wrong way for the request type")]
    WrongDirection,
}

/// The status byte for a failed request: the one place errors become `VIRTIO_BLK_S_*`.
pub fn status(error: &RequestError) -> u8 {
    use RequestError::*;
    match error {
        // §5.2.6.2: UNSUPP for unknown flags, for unmap on discard, and for unknown types.
        DiscardUnmap | ReservedFlags(_) | Unsupported(_) => S_UNSUPP,
        GuestMemory(_)
        | HeaderTooShort(_)
        | MisalignedLength { .. }
        | MisalignedSector { .. }
        | OutOfRange { .. }
        | ReadOnly
        | SegmentListLength(_)
        | SegmentTooLarge { .. }
        | TooLarge { .. }
        | TooManySegments { .. }
        | UnorderedDescriptors
        | WrongDirection => S_IOERR,
    }
}

/// One range of a discard or write-zeroes request (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub unmap: bool,
}

/// What a valid request asks for. Data buffers point into guest memory and keep it mapped.
#[derive(Debug)]
pub enum RequestKind {
    /// Read into `data`, device-writable.
    In {
        sector: u64,
        data: GuestBuffers,
    },
    /// Write `data`, device-readable.
    Out {
        sector: u64,
        data: GuestBuffers,
    },
    Flush,
    /// Fill `data` (at most [`ID_BYTES`]) with the device ID.
    GetId {
        data: GuestBuffers,
    },
    Discard {
        segments: Vec<Segment>,
    },
    WriteZeroes {
        segments: Vec<Segment>,
    },
}

/// How to answer a chain: its head, the used length and its status byte.
#[derive(Debug)]
pub struct Completion {
    head: u16,
    used_len: u32,
    status: GuestByte,
}

impl Completion {
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The used length: every device-writable byte of the chain, status included (what QEMU
    /// reports; the spec allows an underestimate, and drivers read only the status for blk).
    pub fn used_len(&self) -> u32 {
        self.used_len
    }

    /// Writes `status` to the guest; returns `(head, used_len)` for [`SplitQueue::add_used`].
    ///
    /// [`SplitQueue::add_used`]: crate::queue::SplitQueue::add_used
    pub fn complete(self, status: u8) -> (u16, u32) {
        self.status.write(status);
        (self.head, self.used_len)
    }
}

/// A parsed chain: `body` is what to do, or why not; either way answer through `completion`.
#[derive(Debug)]
pub struct Request {
    pub completion: Completion,
    pub body: Result<RequestKind, RequestError>,
}

/// Parses `chain` as a virtio-blk request checked against `limits`.
pub fn parse_request(
    chain: &DescriptorChain,
    limits: &RequestLimits,
) -> Result<Request, ChainError> {
    let head = chain.head();
    let descs = chain.descriptors();
    let no_status = ChainError::NoStatus { head };
    let last = descs
        .last()
        .filter(|d| d.is_write_only() && !d.is_empty())
        .ok_or(no_status)?;
    // No overflow: pop checked that the descriptor lies inside guest memory.
    let status_addr = last.addr() + u64::from(last.len()) - 1;
    let status = chain
        .table()
        .guest_byte(status_addr)
        .map_err(|_| ChainError::NoStatus { head })?;
    let writable: u64 = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    // pop bounds a chain below 2^32 bytes.
    let used_len = u32::try_from(writable).unwrap_or(u32::MAX);
    let completion = Completion {
        head,
        used_len,
        status,
    };
    let body = parse_body(chain.table(), descs, limits);
    Ok(Request { completion, body })
}

fn parse_body(
    table: &Arc<MemoryTable>,
    descs: &[Descriptor],
    limits: &RequestLimits,
) -> Result<RequestKind, RequestError> {
    // §2.7.4.2: device-writable descriptors come after every device-readable one.
    let first_write = descs
        .iter()
        .position(Descriptor::is_write_only)
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(first_write);
    if writable.iter().any(|d| !d.is_write_only()) {
        return Err(RequestError::UnorderedDescriptors);
    }
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len())).sum();
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len())).sum();
    if readable_len < HEADER_BYTES {
        return Err(RequestError::HeaderTooShort(readable_len));
    }
    let mut header = [0u8; 16];
    copy_out(table, readable, 0, &mut header)?;
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
    let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
    let sector = u64::from_le_bytes(s);
    // Bytes after the header, and before the status byte (parse_request checked there is one).
    let out_len = readable_len - HEADER_BYTES;
    let in_len = writable_len - 1;
    match request_type {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            check_rw(limits, sector, in_len)?;
            let data = buffers(table, writable, 0, in_len, limits)?;
            Ok(RequestKind::In { sector, data })
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            // §5.2.6.2: IOERR for a write to a read-only device.
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            check_rw(limits, sector, out_len)?;
            let data = buffers(table, readable, HEADER_BYTES, out_len, limits)?;
            Ok(RequestKind::Out { sector, data })
        }
        // §5.2.6.1: the sector is 0 and there is no data; neither is worth failing a flush for.
        VIRTIO_BLK_T_FLUSH => Ok(RequestKind::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            let len = in_len.min(ID_BYTES as u64);
            let data = buffers(table, writable, 0, len, limits)?;
            Ok(RequestKind::GetId { data })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            let seg_limits = if discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            let seg_limits = seg_limits.ok_or(RequestError::Unsupported(request_type))?;
            if in_len != 0 {
                return Err(RequestError::WrongDirection);
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let segments = segments(table, readable, out_len, discard, &seg_limits, limits)?;
            Ok(if discard {
                RequestKind::Discard { segments }
            } else {
                RequestKind::WriteZeroes { segments }
            })
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Checks a read or write of `len` bytes at `sector`.
fn check_rw(limits: &RequestLimits, sector: u64, len: u64) -> Result<(), RequestError> {
    let block = limits.logical_block_size;
    // §5.2.6.1: a multiple of 512 bytes; also of the logical block size, which the device
    // advertised and the backend may need (O_DIRECT).
    if len % u64::from(block) != 0 {
        return Err(RequestError::MisalignedLength { len, block });
    }
    if len > limits.max_data_bytes {
        return Err(RequestError::TooLarge {
            len,
            max: limits.max_data_bytes,
        });
    }
    check_range(limits, sector, len / SECTOR_BYTES)
}

/// Checks that sectors `[sector, sector + sectors)` are aligned and inside the capacity.
fn check_range(limits: &RequestLimits, sector: u64, sectors: u64) -> Result<(), RequestError> {
    let block = limits.logical_block_size;
    let block_sectors = u64::from(block) / SECTOR_BYTES;
    if sector % block_sectors != 0 {
        return Err(RequestError::MisalignedSector { sector, block });
    }
    if sectors % block_sectors != 0 {
        return Err(RequestError::MisalignedLength {
            len: sectors * SECTOR_BYTES,
            block,
        });
    }
    // §5.2.6.1: no access beyond capacity.
    let capacity = limits.capacity_sectors;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// The bytes `[skip, skip + len)` of the stream `descs`, as guest buffers.
fn buffers(
    table: &Arc<MemoryTable>,
    descs: &[Descriptor],
    skip: u64,
    len: u64,
    limits: &RequestLimits,
) -> Result<GuestBuffers, RequestError> {
    let mut bufs = GuestBuffers::new(Arc::clone(table));
    for_each_piece(descs, skip, len, |addr, n| bufs.push_guest(addr, n))?;
    let count = bufs.segments() as u64;
    if count > u64::from(limits.max_data_segments) {
        return Err(RequestError::TooManySegments {
            count,
            max: limits.max_data_segments,
        });
    }
    Ok(bufs)
}

/// Copies the bytes `[skip, skip + out.len())` of the stream `descs` into `out`.
fn copy_out(
    table: &MemoryTable,
    descs: &[Descriptor],
    skip: u64,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for_each_piece(descs, skip, out.len() as u64, |addr, n| {
        let n = usize::try_from(n).expect("a piece is at most out.len()");
        table
            .guest_slice(addr, n as u64)?
            .copy_to(0, &mut out[done..done + n])?;
        done += n;
        Ok(())
    })
}

/// Calls `f(addr, n)` for each piece of the stream `descs` in `[skip, skip + len)`. The range
/// must lie inside the stream (callers compute it from the stream's length).
fn for_each_piece(
    descs: &[Descriptor],
    skip: u64,
    len: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), MemoryError>,
) -> Result<(), RequestError> {
    let (mut skip, mut left) = (skip, len);
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len());
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = (dlen - skip).min(left);
        f(d.addr() + skip, n)?;
        left -= n;
        skip = 0;
    }
    debug_assert_eq!(left, 0, "range past the end of the descriptors");
    Ok(())
}

/// Reads and checks the segments of a discard or write-zeroes request (§5.2.6).
fn segments(
    table: &MemoryTable,
    readable: &[Descriptor],
    len: u64,
    discard: bool,
    seg_limits: &SegmentLimits,
    limits: &RequestLimits,
) -> Result<Vec<Segment>, RequestError> {
    if len == 0 || len % SEGMENT_BYTES != 0 {
        return Err(RequestError::SegmentListLength(len));
    }
    let count = len / SEGMENT_BYTES;
    if count > u64::from(seg_limits.max_segments) {
        return Err(RequestError::TooManySegments {
            count,
            max: seg_limits.max_segments,
        });
    }
    let mut segments = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..count {
        let mut raw = [0u8; 16];
        copy_out(table, readable, HEADER_BYTES + i * SEGMENT_BYTES, &mut raw)?;
        let [
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            s6,
            s7,
            n0,
            n1,
            n2,
            n3,
            f0,
            f1,
            f2,
            f3,
        ] = raw;
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        // §5.2.6.2: UNSUPP if any unknown flag is set, and for unmap on a discard.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(RequestError::ReservedFlags(flags));
        }
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if discard && unmap {
            return Err(RequestError::DiscardUnmap);
        }
        segments.push(Segment {
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            num_sectors: u32::from_le_bytes([n0, n1, n2, n3]),
            unmap,
        });
    }
    // Ranges after flags, so that a request with both defects gets UNSUPP as §5.2.6.2 demands.
    for s in &segments {
        if s.num_sectors > seg_limits.max_sectors {
            return Err(RequestError::SegmentTooLarge {
                sectors: s.num_sectors,
                max: seg_limits.max_sectors,
            });
        }
        check_range(limits, s.sector, u64::from(s.num_sectors))?;
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BlkConfig;
    use crate::queue::SplitQueue;
    use crate::testing::{Buf, MockDriver};
    use ringblk_ring::buf::{IoBuffers, copy_in, copy_out as buf_copy_out};

    const CAPACITY: u64 = 1 << 20; // sectors

    struct Fixture {
        d: MockDriver,
        q: SplitQueue,
        limits: RequestLimits,
    }

    fn fixture() -> Fixture {
        let d = MockDriver::new(64, 4 << 20);
        let q = d.device_queue();
        Fixture {
            d,
            q,
            limits: BlkConfig::new(CAPACITY, 1).request_limits(),
        }
    }

    impl Fixture {
        fn header(&mut self, request_type: u32, sector: u64) -> u64 {
            let a = self.d.alloc(16);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.d.write(a, &h);
            a
        }

        fn buf(&mut self, len: u32, write: bool) -> Buf {
            Buf {
                addr: self.d.alloc(u64::from(len.max(1))),
                len,
                write,
            }
        }

        fn parse(&mut self, bufs: &[Buf]) -> Result<Request, ChainError> {
            self.d.add_chain(bufs);
            let chain = self.q.pop().unwrap().unwrap();
            parse_request(&chain, &self.limits)
        }

        /// header + data + status, laid out by the mock.
        fn simple(&mut self, request_type: u32, sector: u64, data_len: u32) -> Request {
            let l = self
                .d
                .add_blk_request(request_type, sector, data_len, false);
            let chain = self.q.pop().unwrap().unwrap();
            assert_eq!(chain.head(), l.head);
            parse_request(&chain, &self.limits).unwrap()
        }

        fn error_status(&mut self, request_type: u32, sector: u64, data_len: u32) -> u8 {
            let r = self.simple(request_type, sector, data_len);
            status(&r.body.expect_err("request should be rejected"))
        }

        fn segments_request(&mut self, request_type: u32, segs: &[(u64, u32, u32)]) -> Request {
            let h = self.header(request_type, 0);
            let len = u32::try_from(16 * segs.len()).unwrap();
            let list = self.buf(len, false);
            for (i, &(sector, n, flags)) in segs.iter().enumerate() {
                let mut b = [0u8; 16];
                b[..8].copy_from_slice(&sector.to_le_bytes());
                b[8..12].copy_from_slice(&n.to_le_bytes());
                b[12..].copy_from_slice(&flags.to_le_bytes());
                self.d.write(list.addr + 16 * i as u64, &b);
            }
            let st = self.buf(1, true);
            self.parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                list,
                st,
            ])
            .unwrap()
        }
    }

    fn data_of(kind: &RequestKind) -> &GuestBuffers {
        match kind {
            RequestKind::In { data, .. }
            | RequestKind::Out { data, .. }
            | RequestKind::GetId { data } => data,
            other => panic!("no data in {other:?}"),
        }
    }

    #[test]
    fn in_request_parses_with_writable_data() {
        let mut f = fixture();
        let r = f.simple(VIRTIO_BLK_T_IN, 8, 4096);
        let kind = r.body.unwrap();
        assert!(matches!(kind, RequestKind::In { sector: 8, .. }));
        assert_eq!(data_of(&kind).len(), 4096);
        assert_eq!(r.completion.used_len(), 4097);
    }

    #[test]
    fn out_request_parses_with_readable_data() {
        let mut f = fixture();
        let l = f.d.add_blk_request(VIRTIO_BLK_T_OUT, 16, 1024, false);
        f.d.write(l.data, &[7u8; 1024]);
        let r = parse_request(&f.q.pop().unwrap().unwrap(), &f.limits).unwrap();
        let kind = r.body.unwrap();
        assert!(matches!(kind, RequestKind::Out { sector: 16, .. }));
        let mut out = vec![0u8; 1024];
        assert_eq!(buf_copy_out(data_of(&kind), &mut out), 1024);
        assert!(out.iter().all(|&b| b == 7));
        assert_eq!(r.completion.used_len(), 1);
    }

    #[test]
    fn flush_request_parses() {
        let mut f = fixture();
        assert!(matches!(
            f.simple(VIRTIO_BLK_T_FLUSH, 0, 0).body,
            Ok(RequestKind::Flush)
        ));
    }

    #[test]
    fn get_id_request_parses_and_is_capped_at_20_bytes() {
        let mut f = fixture();
        let r = f.simple(VIRTIO_BLK_T_GET_ID, 0, 64);
        let kind = r.body.unwrap();
        assert!(matches!(kind, RequestKind::GetId { .. }));
        assert_eq!(data_of(&kind).len(), ID_BYTES);
    }

    #[test]
    fn discard_request_parses_segments() {
        let mut f = fixture();
        f.limits.discard = Some(SegmentLimits {
            max_sectors: 1024,
            max_segments: 4,
        });
        let r = f.segments_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (100, 1024, 0)]);
        let RequestKind::Discard { segments } = r.body.unwrap() else {
            panic!("not a discard")
        };
        assert_eq!(
            segments,
            vec![
                Segment {
                    sector: 0,
                    num_sectors: 8,
                    unmap: false
                },
                Segment {
                    sector: 100,
                    num_sectors: 1024,
                    unmap: false
                },
            ]
        );
    }

    #[test]
    fn write_zeroes_request_parses_unmap_flag() {
        let mut f = fixture();
        let r = f.segments_request(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(64, 64, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        );
        let RequestKind::WriteZeroes { segments } = r.body.unwrap() else {
            panic!("not write-zeroes")
        };
        assert_eq!(
            segments,
            vec![Segment {
                sector: 64,
                num_sectors: 64,
                unmap: true
            }]
        );
    }

    #[test]
    fn indirect_request_parses() {
        let mut f = fixture();
        f.d.add_blk_request(VIRTIO_BLK_T_IN, 0, 512, true);
        let r = parse_request(&f.q.pop().unwrap().unwrap(), &f.limits).unwrap();
        assert!(matches!(r.body, Ok(RequestKind::In { sector: 0, .. })));
    }

    #[test]
    fn header_split_across_descriptors_and_merged_with_data_parses() {
        let mut f = fixture();
        // 6 bytes of header, then 10 bytes of header followed by 512 bytes of data, then status.
        let a = f.d.alloc(6);
        let b = f.d.alloc(10 + 512);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&3u64.to_le_bytes());
        f.d.write(a, &h[..6]);
        f.d.write(b, &h[6..]);
        f.d.write(b + 10, &[9u8; 512]);
        let st = f.buf(1, true);
        let r = f
            .parse(&[
                Buf {
                    addr: a,
                    len: 6,
                    write: false,
                },
                Buf {
                    addr: b,
                    len: 522,
                    write: false,
                },
                st,
            ])
            .unwrap();
        let kind = r.body.unwrap();
        assert!(matches!(kind, RequestKind::Out { sector: 3, .. }));
        let data = data_of(&kind);
        assert_eq!(data.len(), 512);
        let mut out = [0u8; 512];
        buf_copy_out(data, &mut out);
        assert_eq!(out, [9u8; 512]);
    }

    #[test]
    fn status_sharing_a_descriptor_with_data_parses() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_IN, 0);
        let w = f.buf(513, true);
        let r = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                w,
            ])
            .unwrap();
        let kind = r.body.unwrap();
        assert_eq!(data_of(&kind).len(), 512);
        let (head, used) = r.completion.complete(S_OK);
        assert_eq!(used, 513);
        assert_eq!(f.d.read(w.addr + 512, 1), [S_OK]);
        let _ = head;
    }

    #[test]
    fn completion_writes_status_and_returns_head_and_used_len() {
        let mut f = fixture();
        let l = f.d.add_blk_request(VIRTIO_BLK_T_IN, 0, 512, false);
        let r = parse_request(&f.q.pop().unwrap().unwrap(), &f.limits).unwrap();
        let kind = r.body.unwrap();
        assert_eq!(copy_in(data_of(&kind), &[5u8; 512]), 512);
        assert_eq!(r.completion.complete(S_OK), (l.head, 513));
        assert_eq!(f.d.read(l.status, 1), [S_OK]);
        assert_eq!(f.d.read(l.data, 512), vec![5u8; 512]);
    }

    #[test]
    fn chain_ending_in_a_readable_descriptor_is_a_chain_error() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_OUT, 0);
        let d = f.buf(512, false);
        let e = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                d,
            ])
            .unwrap_err();
        assert!(matches!(e, ChainError::NoStatus { .. }));
    }

    #[test]
    fn chain_ending_in_an_empty_writable_descriptor_is_a_chain_error() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_FLUSH, 0);
        let st = f.buf(0, true);
        let e = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                st,
            ])
            .unwrap_err();
        assert!(matches!(e, ChainError::NoStatus { .. }));
    }

    #[test]
    fn unknown_request_type_is_unsupp() {
        let mut f = fixture();
        assert_eq!(f.error_status(2, 0, 0), S_UNSUPP); // SCSI_CMD
        assert_eq!(f.error_status(0xdead, 0, 0), S_UNSUPP);
    }

    #[test]
    fn header_too_short_is_ioerr() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_IN, 0);
        let st = f.buf(1, true);
        let r = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 15,
                    write: false,
                },
                st,
            ])
            .unwrap();
        assert!(matches!(r.body, Err(RequestError::HeaderTooShort(15))));
        assert_eq!(status(&r.body.unwrap_err()), S_IOERR);
    }

    #[test]
    fn in_request_with_readable_data_is_ioerr() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_IN, 0);
        let d = f.buf(512, false);
        let st = f.buf(1, true);
        let r = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                d,
                st,
            ])
            .unwrap();
        assert!(matches!(r.body, Err(RequestError::WrongDirection)));
    }

    #[test]
    fn out_request_with_writable_data_is_ioerr() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_OUT, 0);
        let d = f.buf(512, true);
        let st = f.buf(1, true);
        let r = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                d,
                st,
            ])
            .unwrap();
        assert!(matches!(r.body, Err(RequestError::WrongDirection)));
        assert_eq!(status(&r.body.unwrap_err()), S_IOERR);
    }

    #[test]
    fn readable_descriptor_after_writable_is_ioerr() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_IN, 0);
        let w = f.buf(512, true);
        let r_ = f.buf(16, false);
        let st = f.buf(1, true);
        let r = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                w,
                r_,
                st,
            ])
            .unwrap();
        assert!(matches!(r.body, Err(RequestError::UnorderedDescriptors)));
    }

    #[test]
    fn write_to_read_only_device_is_ioerr() {
        let mut f = fixture();
        f.limits.read_only = true;
        assert_eq!(f.error_status(VIRTIO_BLK_T_OUT, 0, 512), S_IOERR);
    }

    #[test]
    fn access_beyond_capacity_is_ioerr() {
        let mut f = fixture();
        assert_eq!(f.error_status(VIRTIO_BLK_T_IN, CAPACITY, 512), S_IOERR);
        assert_eq!(f.error_status(VIRTIO_BLK_T_IN, CAPACITY - 1, 1024), S_IOERR);
        // sector * 512 + len would overflow 2^64.
        assert_eq!(f.error_status(VIRTIO_BLK_T_OUT, u64::MAX, 512), S_IOERR);
        assert!(f.simple(VIRTIO_BLK_T_IN, CAPACITY - 1, 512).body.is_ok());
    }

    #[test]
    fn length_not_a_multiple_of_the_block_size_is_ioerr() {
        let mut f = fixture();
        assert!(matches!(
            f.simple(VIRTIO_BLK_T_IN, 0, 100).body,
            Err(RequestError::MisalignedLength { .. })
        ));
        f.limits.logical_block_size = 4096;
        assert!(matches!(
            f.simple(VIRTIO_BLK_T_OUT, 0, 512).body,
            Err(RequestError::MisalignedLength { .. })
        ));
    }

    #[test]
    fn sector_not_aligned_to_the_block_size_is_ioerr() {
        let mut f = fixture();
        f.limits.logical_block_size = 4096;
        assert!(matches!(
            f.simple(VIRTIO_BLK_T_IN, 1, 4096).body,
            Err(RequestError::MisalignedSector { .. })
        ));
        assert!(f.simple(VIRTIO_BLK_T_IN, 8, 4096).body.is_ok());
    }

    #[test]
    fn request_larger_than_the_maximum_is_ioerr() {
        let mut f = fixture();
        f.limits.max_data_bytes = 4096;
        assert!(matches!(
            f.simple(VIRTIO_BLK_T_IN, 0, 8192).body,
            Err(RequestError::TooLarge { .. })
        ));
    }

    #[test]
    fn more_data_segments_than_seg_max_is_ioerr() {
        let mut f = fixture();
        f.limits.max_data_segments = 2;
        let h = f.header(VIRTIO_BLK_T_IN, 0);
        let mut bufs = vec![Buf {
            addr: h,
            len: 16,
            write: false,
        }];
        for _ in 0..3 {
            bufs.push(f.buf(512, true));
        }
        bufs.push(f.buf(1, true));
        let r = f.parse(&bufs).unwrap();
        assert!(matches!(
            r.body,
            Err(RequestError::TooManySegments { count: 3, max: 2 })
        ));
    }

    #[test]
    fn discard_with_unmap_is_unsupp() {
        let mut f = fixture();
        let r = f.segments_request(
            VIRTIO_BLK_T_DISCARD,
            &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
        );
        assert_eq!(status(&r.body.unwrap_err()), S_UNSUPP);
    }

    #[test]
    fn segment_with_reserved_flags_is_unsupp_even_if_also_out_of_range() {
        let mut f = fixture();
        let r = f.segments_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX, 8, 0x2)]);
        assert!(matches!(r.body, Err(RequestError::ReservedFlags(2))));
        assert_eq!(status(&r.body.unwrap_err()), S_UNSUPP);
    }

    #[test]
    fn discard_when_not_offered_is_unsupp() {
        let mut f = fixture();
        f.limits.discard = None;
        let r = f.segments_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]);
        assert!(matches!(
            r.body,
            Err(RequestError::Unsupported(VIRTIO_BLK_T_DISCARD))
        ));
    }

    #[test]
    fn segment_list_not_a_multiple_of_16_is_ioerr() {
        let mut f = fixture();
        let h = f.header(VIRTIO_BLK_T_DISCARD, 0);
        let list = f.buf(20, false);
        let st = f.buf(1, true);
        let r = f
            .parse(&[
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                list,
                st,
            ])
            .unwrap();
        assert!(matches!(r.body, Err(RequestError::SegmentListLength(20))));
        assert_eq!(status(&r.body.unwrap_err()), S_IOERR);
    }

    #[test]
    fn more_discard_segments_than_allowed_is_ioerr() {
        let mut f = fixture();
        let r = f.segments_request(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (8, 8, 0)]);
        assert!(matches!(
            r.body,
            Err(RequestError::TooManySegments { count: 2, max: 1 })
        ));
    }

    #[test]
    fn discard_segment_over_max_sectors_is_ioerr() {
        let mut f = fixture();
        f.limits.discard = Some(SegmentLimits {
            max_sectors: 8,
            max_segments: 1,
        });
        let r = f.segments_request(VIRTIO_BLK_T_DISCARD, &[(0, 16, 0)]);
        assert!(matches!(
            r.body,
            Err(RequestError::SegmentTooLarge {
                sectors: 16,
                max: 8
            })
        ));
    }

    #[test]
    fn write_zeroes_beyond_capacity_is_ioerr() {
        let mut f = fixture();
        let r = f.segments_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(CAPACITY - 4, 8, 0)]);
        assert!(matches!(r.body, Err(RequestError::OutOfRange { .. })));
        let r = f.segments_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(u64::MAX - 1, 8, 0)]);
        assert_eq!(status(&r.body.unwrap_err()), S_IOERR);
    }

    #[test]
    fn write_zeroes_on_read_only_device_is_ioerr() {
        let mut f = fixture();
        f.limits.read_only = true;
        let r = f.segments_request(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]);
        assert!(matches!(r.body, Err(RequestError::ReadOnly)));
    }

    #[test]
    fn single_segment_data_reports_its_fixed_buffer_chunk() {
        let mut f = fixture();
        let kind = f.simple(VIRTIO_BLK_T_IN, 0, 4096).body.unwrap();
        let data = data_of(&kind);
        assert_eq!(data.fixed_buffer_chunk(), Some(0));
        assert_eq!(data.fixed_index(), None, "not vouched for");
    }
}
