//! The fixed newstyle handshake, both sides, on a blocking socket with a timeout.
//!
//! The handshake is control path: a few small messages per connection. The server runs it on
//! a thread of its own per connection (so one slow or hostile client delays nobody), the
//! client node on the thread that opens it (`blockdev-add`); the transmission phase then moves
//! to a ring context.

use std::io::{self, Read, Write};

use crate::proto::*;

/// What the server offers to a connecting client: the exports by name.
pub(crate) trait Catalog {
    type Export;
    /// Names and descriptions of the exports, for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
    /// The export named `name`.
    fn find(&self, name: &str) -> Option<Self::Export>;
    /// Size, transmission flags, description and minimum block size of an export.
    fn describe(&self, export: &Self::Export, structured: bool) -> ExportInfo;
}

pub(crate) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub description: String,
    pub block_min: u32,
}

/// What the client chose.
pub(crate) struct Negotiated<E> {
    pub export: E,
    pub structured: bool,
    /// The id of `base:allocation` if the client selected it.
    pub base_allocation: Option<u32>,
}

/// The id ringblk gives `base:allocation`.
const BASE_ALLOCATION_ID: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(s: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&len32(data.len()).to_be_bytes());
    msg.extend_from_slice(data);
    s.write_all(&msg)
}

fn string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&len32(s.len()).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Server side: greets, answers options until the client picks an export (`Some`) or aborts
/// (`None`). Anything malformed is an error and the connection closes.
pub(crate) fn serve<S: Read + Write, C: Catalog>(
    s: &mut S,
    catalog: &C,
) -> Result<Option<Negotiated<C::Export>>, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    let client_flags = read_u32(s)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError(format!("unknown client flags {client_flags:#x}")).into());
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation: Option<(String, u32)> = None;
    loop {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            return Err(ProtocolError(format!("bad option magic {magic:#x}")).into());
        }
        let option = read_u32(s)?;
        let len = read_u32(s)?;
        if len > OPTION_BYTES_MAX {
            return Err(ProtocolError(format!("option of {len} bytes is too long")).into());
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        let mut fields = Fields::new(&data);
        match option {
            OPT_EXPORT_NAME => {
                let name = fields.string(data.len())?;
                let Some(export) = catalog.find(&name) else {
                    return Err(ProtocolError(format!("no export named '{name}'")).into());
                };
                let info = catalog.describe(&export, false);
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&info.size.to_be_bytes());
                reply.extend_from_slice(&info.flags.to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0; 124]);
                }
                s.write_all(&reply)?;
                return Ok(Some(Negotiated {
                    export,
                    structured: false,
                    base_allocation: None,
                }));
            }
            OPT_ABORT => {
                let _ = option_reply(s, option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !fields.is_empty() {
                    option_reply(s, option, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in catalog.list() {
                    let mut entry = Vec::new();
                    string32(&mut entry, &name);
                    option_reply(s, option, REP_SERVER, &entry)?;
                }
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !fields.is_empty() || structured {
                    option_reply(
                        s,
                        option,
                        REP_ERR_INVALID,
                        b"structured replies: bad request",
                    )?;
                    continue;
                }
                structured = true;
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let name = fields.string32()?;
                let count = fields.u16()?;
                let mut requests = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    requests.push(fields.u16()?);
                }
                if !fields.is_empty() {
                    return Err(ProtocolError("trailing bytes after INFO/GO".into()).into());
                }
                let Some(export) = catalog.find(&name) else {
                    let msg = format!("export '{name}' not present");
                    option_reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let info = catalog.describe(&export, structured);
                let mut reply = Vec::new();
                reply.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                reply.extend_from_slice(&info.size.to_be_bytes());
                reply.extend_from_slice(&info.flags.to_be_bytes());
                option_reply(s, option, REP_INFO, &reply)?;
                if requests.contains(&INFO_NAME) {
                    let mut reply = INFO_NAME.to_be_bytes().to_vec();
                    reply.extend_from_slice(name.as_bytes());
                    option_reply(s, option, REP_INFO, &reply)?;
                }
                if requests.contains(&INFO_DESCRIPTION) && !info.description.is_empty() {
                    let mut reply = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    reply.extend_from_slice(info.description.as_bytes());
                    option_reply(s, option, REP_INFO, &reply)?;
                }
                let mut reply = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                reply.extend_from_slice(&info.block_min.to_be_bytes());
                reply.extend_from_slice(&4096u32.max(info.block_min).to_be_bytes());
                reply.extend_from_slice(&REQUEST_BYTES_MAX.to_be_bytes());
                option_reply(s, option, REP_INFO, &reply)?;
                option_reply(s, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    let base_allocation = base_allocation
                        .filter(|(export, _)| *export == name)
                        .map(|(_, id)| id);
                    return Ok(Some(Negotiated {
                        export,
                        structured,
                        base_allocation,
                    }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let name = fields.string32()?;
                let count = fields.u32()?;
                let mut queries = Vec::new();
                for _ in 0..count {
                    queries.push(fields.string32()?);
                }
                if !fields.is_empty() {
                    return Err(ProtocolError("trailing bytes after META_CONTEXT".into()).into());
                }
                if !structured {
                    option_reply(s, option, REP_ERR_INVALID, b"structured replies first")?;
                    continue;
                }
                if catalog.find(&name).is_none() {
                    let msg = format!("export '{name}' not present");
                    option_reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                }
                let set = option == OPT_SET_META_CONTEXT;
                let matches =
                    |q: &str| q == BASE_ALLOCATION || (!set && (q == "base:" || q.is_empty()));
                let selected = if set {
                    queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    queries.is_empty() || queries.iter().any(|q| matches(q))
                };
                if set {
                    base_allocation = selected.then(|| (name.clone(), BASE_ALLOCATION_ID));
                }
                if selected {
                    let mut reply = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    reply.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(s, option, REP_META_CONTEXT, &reply)?;
                }
                option_reply(s, option, REP_ACK, &[])?;
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// What a server told the client about its export.
pub(crate) struct Opened {
    pub size: u64,
    pub flags: u16,
    /// Largest payload the server takes.
    pub max_len: u32,
}

/// Client side: negotiates `export` with NBD_OPT_GO (simple replies only).
pub(crate) fn open<S: Read + Write>(s: &mut S, export: &str) -> Result<Opened, HandshakeError> {
    let magic = read_u64(s)?;
    if magic != NBDMAGIC {
        return Err(ProtocolError(format!("not an NBD server (magic {magic:#x})")).into());
    }
    let magic = read_u64(s)?;
    if magic != IHAVEOPT {
        return Err(ProtocolError("server does not speak the newstyle protocol".into()).into());
    }
    let mut flags = [0; 2];
    s.read_exact(&mut flags)?;
    let flags = u16::from_be_bytes(flags);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError("server does not speak fixed newstyle".into()).into());
    }
    let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        client_flags |= FLAG_C_NO_ZEROES;
    }
    if export.len() > STRING_BYTES_MAX {
        return Err(ProtocolError("export name too long".into()).into());
    }
    let mut msg = client_flags.to_be_bytes().to_vec();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(4 + len32(export.len()) + 2 + 2).to_be_bytes());
    string32(&mut msg, export);
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&msg)?;
    let mut opened = None;
    let mut max_len = REQUEST_BYTES_MAX;
    loop {
        if read_u64(s)? != OPTION_REPLY_MAGIC {
            return Err(ProtocolError("bad option reply magic".into()).into());
        }
        let option = read_u32(s)?;
        let kind = read_u32(s)?;
        let len = read_u32(s)?;
        if option != OPT_GO || len > OPTION_BYTES_MAX {
            return Err(
                ProtocolError(format!("bad reply to GO (option {option}, {len} bytes)")).into(),
            );
        }
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data)?;
        let mut fields = Fields::new(&data);
        match kind {
            REP_ACK => break,
            REP_INFO => match fields.u16()? {
                INFO_EXPORT => opened = Some((fields.u64()?, fields.u16()?)),
                INFO_BLOCK_SIZE => {
                    let _min = fields.u32()?;
                    let _preferred = fields.u32()?;
                    max_len = fields.u32()?.clamp(4096, REQUEST_BYTES_MAX);
                }
                _ => {}
            },
            kind if kind & REP_FLAG_ERROR != 0 => {
                let message = String::from_utf8_lossy(fields.rest());
                return Err(io::Error::other(format!(
                    "server refused export '{export}': {message} (error {:#x})",
                    kind & !REP_FLAG_ERROR
                ))
                .into());
            }
            kind => {
                return Err(ProtocolError(format!("unexpected reply {kind} to GO")).into());
            }
        }
    }
    let Some((size, flags)) = opened else {
        return Err(ProtocolError("server sent no export information".into()).into());
    };
    Ok(Opened {
        size,
        flags,
        max_len,
    })
}
