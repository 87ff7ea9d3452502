//! The NBD wire format: magic numbers, option and command codes, and the parsing of the
//! transmission-phase messages. Names are the protocol document's (`NBD_OPT_GO` is
//! [`OPT_GO`]); every field is big-endian.
//!
//! Parsing never trusts a number from the peer: lengths are checked against the export's size
//! and [`REQUEST_BYTES_MAX`] with overflow-checked arithmetic before anything is allocated.

use std::io;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

// Information types of NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context ringblk serves.
pub const BASE_ALLOCATION: &str = "base:allocation";

// Errors, as numbered by the protocol (the same numbers as Linux's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ or WRITE payload (QEMU's NBD_MAX_BUFFER_SIZE).
pub const REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Largest option payload a peer may send during the handshake.
pub const OPTION_BYTES_MAX: u32 = 64 << 10;
/// Longest export name or string (the protocol's limit).
pub const STRING_BYTES_MAX: usize = 4096;

pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;

/// A length this side put in a message, all of which are bounded far below 4 GiB.
pub fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("message lengths fit 32 bits")
}

/// The errno of an I/O error as an NBD error (EIO for anything the protocol has no name for).
pub fn nbd_error(e: &io::Error) -> u32 {
    match e.raw_os_error().and_then(|n| u32::try_from(n).ok()) {
        Some(n @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN)) => n,
        Some(n) if n == libc::EDQUOT as u32 || n == libc::EFBIG as u32 => ENOSPC,
        _ => EIO,
    }
}

/// An NBD error from the peer as an I/O error (unknown numbers become EIO).
pub fn io_error(nbd: u32) -> io::Error {
    let errno = match nbd {
        EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN => nbd,
        _ => EIO,
    };
    io::Error::from_raw_os_error(errno as i32)
}

/// A peer broke the protocol; the connection closes.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One transmission-phase request, its header checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow the header (only a WRITE has one).
    pub fn payload_len(&self) -> usize {
        if self.kind == CMD_WRITE {
            self.len as usize
        } else {
            0
        }
    }

    /// The header as it goes on the wire.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }
}

/// Reads a request header from the front of `bytes`: `Ok(None)` if the header and its payload
/// have not all arrived yet. Errors are what the connection cannot survive: a wrong magic, or a
/// WRITE payload longer than [`REQUEST_BYTES_MAX`] (it cannot be skipped safely). A request
/// that is merely invalid (out of range, unknown command) parses and gets an error reply.
pub fn parse_request(bytes: &[u8]) -> Result<Option<RequestHeader>, ProtocolError> {
    if bytes.len() < REQUEST_HEADER_BYTES {
        return Ok(None);
    }
    let magic = be_u32(bytes, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError(format!("bad request magic {magic:#x}")));
    }
    let header = RequestHeader {
        flags: be_u16(bytes, 4),
        kind: be_u16(bytes, 6),
        cookie: be_u64(bytes, 8),
        offset: be_u64(bytes, 16),
        len: be_u32(bytes, 24),
    };
    if header.kind == CMD_WRITE && header.len > REQUEST_BYTES_MAX {
        return Err(ProtocolError(format!(
            "write of {} bytes exceeds the maximum of {REQUEST_BYTES_MAX}",
            header.len
        )));
    }
    if bytes.len() - REQUEST_HEADER_BYTES < header.payload_len() {
        return Ok(None);
    }
    Ok(Some(header))
}

/// Whether `[offset, offset + len)` lies inside an export of `size` bytes.
pub fn in_range(offset: u64, len: u32, size: u64) -> bool {
    offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= size)
}

/// A simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// A structured reply chunk header; `len` bytes of payload follow.
pub fn encode_chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A final NBD_REPLY_TYPE_ERROR chunk with a message.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let message = &message.as_bytes()[..message.len().min(STRING_BYTES_MAX)];
    let len = 6 + len32(message.len());
    encode_chunk(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len);
    out.extend_from_slice(&error.to_be_bytes());
    let message_len = u16::try_from(message.len()).expect("cut to STRING_BYTES_MAX");
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message);
}

/// A simple reply as the client reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

/// Reads a simple reply header from the front of `bytes` (`Ok(None)`: not all there yet).
pub fn parse_simple_reply(bytes: &[u8]) -> Result<Option<SimpleReply>, ProtocolError> {
    if bytes.len() < SIMPLE_REPLY_BYTES {
        return Ok(None);
    }
    match be_u32(bytes, 0) {
        SIMPLE_REPLY_MAGIC => Ok(Some(SimpleReply {
            error: be_u32(bytes, 4),
            cookie: be_u64(bytes, 8),
        })),
        STRUCTURED_REPLY_MAGIC => Err(ProtocolError(
            "structured reply that was not negotiated".into(),
        )),
        magic => Err(ProtocolError(format!("bad reply magic {magic:#x}"))),
    }
}

/// A cursor over an option's payload whose every read is bounds-checked.
pub struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(bytes: &'a [u8]) -> Fields<'a> {
        Fields { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.bytes.len() < n {
            return Err(ProtocolError("option payload too short".into()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(be_u16(self.take(2)?, 0))
    }

    pub fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(be_u32(self.take(4)?, 0))
    }

    pub fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(be_u64(self.take(8)?, 0))
    }

    /// A string of `len` bytes, at most [`STRING_BYTES_MAX`], valid UTF-8.
    pub fn string(&mut self, len: usize) -> Result<String, ProtocolError> {
        if len > STRING_BYTES_MAX {
            return Err(ProtocolError(format!("string of {len} bytes is too long")));
        }
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| ProtocolError("string is not UTF-8".into()))
    }

    /// A string preceded by its 32-bit length.
    pub fn string32(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        self.string(len)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// What is left, unread.
    pub fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_header(len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            cookie: 7,
            offset: 512,
            len,
        }
        .encode(&mut out);
        out
    }

    #[test]
    fn write_request_waits_for_its_payload() {
        let mut bytes = write_header(4);
        assert_eq!(parse_request(&bytes).unwrap(), None);
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let header = parse_request(&bytes).unwrap().unwrap();
        assert_eq!((header.cookie, header.offset, header.len), (7, 512, 4));
    }

    #[test]
    fn bad_magic_and_huge_write_are_protocol_errors() {
        let mut bytes = write_header(REQUEST_BYTES_MAX + 1);
        assert!(parse_request(&bytes).is_err());
        bytes[0] ^= 1;
        assert!(parse_request(&bytes).is_err());
    }

    #[test]
    fn range_check_does_not_overflow() {
        assert!(in_range(0, 10, 10));
        assert!(!in_range(1, 10, 10));
        assert!(!in_range(u64::MAX, 1, u64::MAX));
    }

    #[test]
    fn unnegotiated_structured_reply_is_refused() {
        let mut bytes = Vec::new();
        encode_chunk(&mut bytes, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, 0);
        assert!(parse_simple_reply(&bytes).is_err());
    }

    #[test]
    fn fields_refuse_reads_past_the_end() {
        let mut f = Fields::new(&[0, 0, 0, 9, b'a']);
        assert!(f.string32().is_err());
    }
}
