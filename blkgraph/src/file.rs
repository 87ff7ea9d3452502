//! `file`: a raw image (regular file or block device) through io_uring.
//!
//! Short reads and writes are resubmitted for the rest, at the offset advanced by what was
//! done, until the request is complete; a read that hits end-of-file fills the rest with zeroes
//! (as QEMU does), a write that makes no progress fails with EIO.
//!
//! With `cache.direct=on` (O_DIRECT) the kernel refuses, with EINVAL, a transfer whose offset
//! or length is not a multiple of the file's logical block size (the node's request alignment,
//! which the generic checks enforce) or whose memory is not aligned to its DMA alignment. The
//! node learns both from `statx(STATX_DIOALIGN)` (or the block device's sector size) and gives
//! a request whose memory is misaligned an aligned bounce buffer, as QEMU does: any caller may
//! hand any memory.
//!
//! Block status comes from `lseek(SEEK_DATA/SEEK_HOLE)`: holes read as zeroes. Where the file
//! system cannot tell (or for a block device, which has no holes), everything is data. Finding
//! the next hole walks the file's pages or extents (tmpfs: every page up to it), so the last data
//! extent found is remembered and answers the next questions inside it; "data" is always a safe
//! answer, so only a hole punched inside it (discard, write-zeroes with unmap) forgets it.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use ringblk_ring::buf::{self, IoBuffers, OwnedBuf, Window};
use ringblk_ring::{Context, Fallocate, Op};

use crate::error::{BlockError, BlockResult};
use crate::node::{Contents, Driver, Extent, Limits};
use crate::request::{Done, Request};

/// Options of a file node, as QSD names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// The image.
    pub filename: PathBuf,
    /// `read-only=on`: open O_RDONLY and refuse writes.
    pub read_only: bool,
    /// `cache.direct=on`: open O_DIRECT; requests must then be aligned to the logical block size.
    pub direct: bool,
}

/// The file driver.
pub struct FileNode {
    file: File,
    /// Changes only at `truncate`, on the main context; read by every request's range check.
    size: AtomicU64,
    read_only: bool,
    alignment: DirectAlignment,
    /// The last data extent block status found (empty: none).
    data_extent: Mutex<Range<u64>>,
}

impl FileNode {
    /// Opens the image. The error reads like QSD's: `Could not open 'F': <reason>`.
    pub fn open(options: &FileOptions) -> io::Result<FileNode> {
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let path = options.filename.display();
        let context = |e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("Could not open '{path}': {}", strip_os(&e)),
            )
        };
        let file = open.open(&options.filename).map_err(context)?;
        let metadata = file.metadata().map_err(context)?;
        let kind = metadata.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{path}' is not a file"),
            ));
        }
        let size = end_offset(&file).map_err(context)?;
        let alignment = if options.direct {
            DirectAlignment::of(&file)
        } else {
            DirectAlignment::NONE
        };
        Ok(FileNode {
            file,
            size: AtomicU64::new(size),
            read_only: options.read_only,
            alignment,
            data_extent: Mutex::new(0..0),
        })
    }
}

/// "No such file or directory" rather than "No such file or directory (os error 2)".
fn strip_os(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

/// The size: the end offset, which works for regular files and block devices alike.
fn end_offset(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

/// What O_DIRECT requires of a transfer (all 1 without O_DIRECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectAlignment {
    /// Offsets and the length of every segment: the logical block size.
    offset: u32,
    /// Addresses of the memory: the DMA alignment.
    memory: u32,
}

impl DirectAlignment {
    const NONE: DirectAlignment = DirectAlignment {
        offset: 1,
        memory: 1,
    };

    /// Asks the kernel (`statx` DIOALIGN, or a block device's logical sector size); where it
    /// cannot tell, probes which of 512 and 4096 an O_DIRECT read accepts, for both.
    fn of(file: &File) -> DirectAlignment {
        use rustix::fs::{AtFlags, StatxFlags, statx};
        if let Ok(st) = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)
            && st.stx_mask & StatxFlags::DIOALIGN.bits() != 0
            && st.stx_dio_offset_align > 0
        {
            return DirectAlignment {
                offset: st.stx_dio_offset_align,
                memory: st.stx_dio_mem_align.max(1),
            };
        }
        let probed = match rustix::fs::ioctl_blksszget(file) {
            Ok(sector) if sector > 0 => sector,
            _ => probe_direct_alignment(file),
        };
        DirectAlignment {
            offset: probed,
            memory: probed,
        }
    }

    /// Whether the kernel takes `bufs` as they are (else they need a bounce buffer).
    fn accepts(&self, bufs: &dyn IoBuffers) -> bool {
        let memory = self.memory as usize;
        let offset = self.offset as usize;
        bufs.iovecs().iter().all(|v| {
            (v.iov_base as usize).is_multiple_of(memory) && v.iov_len.is_multiple_of(offset)
        })
    }
}

/// The smallest of 512 and 4096 that an O_DIRECT read at offset 0 accepts.
fn probe_direct_alignment(file: &File) -> u32 {
    use std::os::unix::fs::FileExt;
    let mut block = AlignedBlock([0; 4096]);
    for alignment in [512u32, 4096] {
        match file.read_at(&mut block.0[..alignment as usize], 0) {
            Ok(_) => return alignment,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => return alignment,
        }
    }
    4096
}

/// `lseek(2)` with a u64 offset; the file position it moves is used by nothing else (all I/O
/// is positional).
fn seek(file: &File, offset: u64, whence: Whence) -> Result<u64, Errno> {
    let offset = i64::try_from(offset).map_err(|_| Errno::EOVERFLOW)?;
    let at = lseek(file, offset, whence)?;
    u64::try_from(at).map_err(|_| Errno::EOVERFLOW)
}

#[repr(align(4096))]
struct AlignedBlock([u8; 4096]);

impl Driver for FileNode {
    fn name(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// `ftruncate`, as QEMU's file driver does for a regular file (shrinking too); a block
    /// device's size is not the node's to change. Errors read like QSD's.
    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        let kind = self.file.metadata()?.file_type();
        if !kind.is_file() {
            return Err(BlockError::NotSupported);
        }
        self.file.set_len(size).map_err(|e| {
            io::Error::new(e.kind(), format!("Could not resize file: {}", strip_os(&e)))
        })?;
        self.forget_data_extent();
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.alignment.offset,
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent, BlockError> {
        let known = self.data_extent.lock().unwrap().clone();
        if known.contains(&offset) {
            return Ok(Extent {
                contents: Contents::Data,
                len: (known.end - offset).min(len),
            });
        }
        let (contents, end) = match seek(&self.file, offset, Whence::SeekData) {
            // A hole up to the end of the file (or the file shrank under us).
            Err(Errno::ENXIO) => (Contents::Zero, u64::MAX),
            Err(_) => (Contents::Data, u64::MAX),
            Ok(data) if data > offset => (Contents::Zero, data),
            Ok(_) => match seek(&self.file, offset, Whence::SeekHole) {
                Ok(hole) if hole > offset => {
                    *self.data_extent.lock().unwrap() = offset..hole;
                    (Contents::Data, hole)
                }
                _ => (Contents::Data, u64::MAX),
            },
        };
        Ok(Extent {
            contents,
            len: (end - offset).min(len),
        })
    }

    fn submit(&self, req: Request, done: Done) {
        let fd = self.file.as_raw_fd();
        match req {
            Request::Read { offset, buf } => self.transfer(fd, Direction::Read, offset, buf, done),
            Request::Write { offset, buf } => {
                self.transfer(fd, Direction::Write, offset, buf, done)
            }
            Request::Flush => submit_op(Op::Fsync { fd, datasync: true }, Request::Flush, done),
            Request::Discard { offset, len } => {
                self.forget_data_extent();
                let op = Op::Fallocate {
                    fd,
                    mode: Fallocate::PunchHole,
                    offset,
                    len,
                };
                submit_op(
                    op,
                    Request::Discard { offset, len },
                    Box::new(move |result, req| {
                        // Discard is a hint: storage that cannot deallocate may ignore it.
                        done(result.or_else(ignore_unsupported), req)
                    }),
                );
            }
            Request::WriteZeroes { offset, len, unmap } => {
                if unmap {
                    self.forget_data_extent();
                }
                let mode = if unmap {
                    Fallocate::PunchHole
                } else {
                    Fallocate::ZeroRange
                };
                let op = Op::Fallocate {
                    fd,
                    mode,
                    offset,
                    len,
                };
                submit_op(op, Request::WriteZeroes { offset, len, unmap }, done);
            }
        }
    }
}

impl FileNode {
    /// Reads or writes `buf` at `offset`, through an aligned bounce buffer if O_DIRECT would
    /// refuse its memory.
    fn transfer(
        &self,
        fd: RawFd,
        dir: Direction,
        offset: u64,
        buf: Box<dyn IoBuffers>,
        done: Done,
    ) {
        if self.alignment.accepts(buf.as_ref()) {
            return transfer(fd, dir, offset, buf, 0, done);
        }
        let mut bounce = OwnedBuf::zeroed(buf::total_len(buf.as_ref()));
        if let Direction::Write = dir {
            buf::copy_out(buf.as_ref(), bounce.as_mut_slice());
        }
        let bounced: Done = Box::new(move |result, req| {
            if let (Direction::Read, Ok(())) = (dir, &result) {
                let bounce = req.into_buf().and_then(|b| OwnedBuf::from_boxed(b).ok());
                let bounce = bounce.expect("the bounce buffer comes back with its request");
                buf::copy_in(buf.as_ref(), bounce.as_slice());
            }
            done(result, dir.request(offset, buf));
        });
        transfer(fd, dir, offset, Box::new(bounce), 0, bounced);
    }

    /// A hole may be punched: block status asks the file again.
    fn forget_data_extent(&self) {
        *self.data_extent.lock().unwrap() = 0..0;
    }
}

fn ignore_unsupported(e: BlockError) -> BlockResult {
    match e {
        BlockError::Io(ref io) if io.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        e => Err(e),
    }
}

/// Submits an op whose completion carries no data; `req` comes back through `done`.
fn submit_op(op: Op, req: Request, done: Done) {
    let submitted = Context::current().submit(op, move |_, result| {
        done(result.map(drop).map_err(BlockError::from), req)
    });
    if let Err(rejected) = submitted {
        rejected.fail_later();
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl Direction {
    fn request(self, offset: u64, buf: Box<dyn IoBuffers>) -> Request {
        match self {
            Direction::Read => Request::Read { offset, buf },
            Direction::Write => Request::Write { offset, buf },
        }
    }
}

/// Reads or writes `buf` at `offset`, of which the first `done_bytes` are already done.
fn transfer(
    fd: RawFd,
    dir: Direction,
    offset: u64,
    buf: Box<dyn IoBuffers>,
    done_bytes: usize,
    done: Done,
) {
    let total = buf::total_len(buf.as_ref());
    let windowed = done_bytes > 0;
    let part: Box<dyn IoBuffers> = if windowed {
        Box::new(Window::new(buf, done_bytes))
    } else {
        buf
    };
    let at = offset + done_bytes as u64;
    let op = match dir {
        Direction::Read => Op::Read {
            fd,
            offset: at,
            buf: part,
        },
        Direction::Write => Op::Write {
            fd,
            offset: at,
            buf: part,
        },
    };
    let submitted = Context::current().submit(op, move |op, result| {
        let part = op.into_buf().expect("read and write ops carry buffers");
        let buf = if windowed { Window::unwrap(part) } else { part };
        let req = |buf| dir.request(offset, buf);
        let n = match result {
            Ok(n) => n as usize,
            Err(e) => return done(Err(e.into()), req(buf)),
        };
        let progress = done_bytes + n;
        if progress >= total {
            return done(Ok(()), req(buf));
        }
        match (dir, n) {
            (Direction::Read, 0) => {
                // End of file inside the node (the file shrank): the rest reads as zeroes.
                let rest = Window::new(buf, progress);
                buf::fill_zero(&rest);
                done(Ok(()), req(rest.into_inner()))
            }
            (Direction::Write, 0) => done(
                Err(io::Error::from_raw_os_error(libc::EIO).into()),
                req(buf),
            ),
            _ => transfer(fd, dir, offset, buf, progress, done),
        }
    });
    if let Err(rejected) = submitted {
        rejected.fail_later();
    }
}
