//! `null-co`: a node that stores nothing, for measuring everything above the storage.

use std::time::Duration;

use ringblk_ring::{Context, Op, buf};

use crate::error::BlockError;
use crate::node::{Contents, Driver, Extent};
use crate::request::{Done, Request};

/// QEMU's default null-co size: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Options of a null-co node, as QSD names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NullOptions {
    /// Size in bytes.
    pub size: u64,
    /// Reads fill the buffer with zeroes (otherwise it is left as it was).
    pub read_zeroes: bool,
    /// Every request completes after this long (0: at the next loop turn).
    pub latency: Duration,
}

impl Default for NullOptions {
    fn default() -> NullOptions {
        NullOptions {
            size: DEFAULT_SIZE,
            read_zeroes: false,
            latency: Duration::ZERO,
        }
    }
}

/// The null-co driver. Requests complete asynchronously: through a deferred callback, or a
/// timeout op when a latency is set; never inline.
pub struct NullCo(NullOptions);

impl NullCo {
    /// A null-co driver with these options.
    pub fn new(options: NullOptions) -> NullCo {
        NullCo(options)
    }
}

impl Driver for NullCo {
    fn name(&self) -> &'static str {
        "null-co"
    }

    fn size(&self) -> u64 {
        self.0.size
    }

    fn block_status(&self, _offset: u64, len: u64) -> Result<Extent, BlockError> {
        let contents = if self.0.read_zeroes {
            Contents::Zero
        } else {
            Contents::Data
        };
        Ok(Extent { contents, len })
    }

    fn submit(&self, req: Request, done: Done) {
        if let (Request::Read { buf, .. }, true) = (&req, self.0.read_zeroes) {
            buf::fill_zero(buf.as_ref());
        }
        let ctx = Context::current();
        if self.0.latency.is_zero() {
            ctx.defer(move || done(Ok(()), req));
            return;
        }
        let submitted = ctx.submit(Op::timeout(self.0.latency), move |_, _| done(Ok(()), req));
        if let Err(rejected) = submitted {
            // The timer could not be queued: complete without the latency rather than lose it.
            rejected.fail_later();
        }
    }
}
