//! Copy operations (`MirrorOp`): read a run of dirty chunks from the source, write it to the
//! target.
//!
//! A run is claimed in the chunk locks before its dirty bits are cleared and the source is read,
//! so a guest write that lands after the read re-dirties it (see [`crate::filter`]), and no other
//! copy or write-blocking write overlaps it. The source's block status trims a run to one
//! extent. A run the source knows to be zeroes is not read; it, and a run that was read and
//! turned out all zeroes, become a write-zeroes, or nothing at all where the target is known to
//! read as zeroes already. Bytes in flight stay below buf-size; the speed limit is charged for
//! data when a run is issued. Buffers are pooled.

use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

use ringblk_blkgraph::{BlockError, BlockResult, Contents, Done, Request};
use ringblk_ring::buf::OwnedBuf;

use crate::job::Job;
use crate::status::IoOperation;

/// Whether a copy goes through the source's drain gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Normal copying: waits at the gate like anyone else; rate limited.
    Open,
    /// The final sync, inside the job's own drained section: past the gate, unlimited.
    Drained,
}

/// One copy in flight.
pub(crate) struct MirrorOp {
    chunks: Range<u64>,
    offset: u64,
    len: u64,
}

impl Job {
    /// Issues copies of dirty chunks until buf-size, the speed limit or the dirt runs out.
    /// Returns how many were issued.
    pub(crate) fn issue_copies(self: &Rc<Self>, gate: Gate) -> usize {
        let mut issued = 0;
        loop {
            let now = Instant::now();
            let budget = {
                let st = self.st.borrow();
                if st.bytes_in_flight >= self.cfg.buf_size {
                    break;
                }
                if gate == Gate::Open {
                    let retry = st.retry_at.and_then(|at| at.checked_duration_since(now));
                    if let Some(wait) = retry.or_else(|| st.limit.delay(now)) {
                        drop(st);
                        self.arm_timer(wait);
                        break;
                    }
                }
                self.cfg.buf_size - st.bytes_in_flight
            };
            let Some(chunks) = self.claim_run(budget.min(self.op_bytes_max())) else {
                break;
            };
            self.issue(chunks, gate, now);
            issued += 1;
        }
        issued
    }

    /// The largest copy to issue now: under a speed limit, one slice's worth, so the limit
    /// holds even for a single operation.
    fn op_bytes_max(&self) -> u64 {
        let speed = self.st.borrow().limit.speed();
        if speed == 0 {
            return self.cfg.op_bytes_max;
        }
        let slice = u64::try_from(u128::from(speed) * crate::ratelimit::SLICE.as_millis() / 1000)
            .unwrap_or(u64::MAX);
        slice.min(self.cfg.op_bytes_max)
    }

    /// Claims the first claimable dirty chunk at or after the cursor (wrapping) and the dirty,
    /// claimable chunks right after it, up to `max_bytes`; clears their dirty bits.
    fn claim_run(&self, max_bytes: u64) -> Option<Range<u64>> {
        let dirty = &self.shared.dirty;
        let locks = &self.shared.locks;
        let n = dirty.chunks();
        let cursor = self.st.borrow().cursor;
        let max_chunks = (max_bytes / dirty.granularity()).max(1);
        for (from, to) in [(cursor, n), (0, cursor)] {
            let mut chunk = from;
            while let Some(first) = dirty.next_set(chunk, to) {
                chunk = first + 1;
                if !locks.try_claim(first) {
                    continue;
                }
                let mut end = first + 1;
                while end < n
                    && end - first < max_chunks
                    && dirty.is_set(end)
                    && locks.try_claim(end)
                {
                    end += 1;
                }
                dirty.clear(first..end);
                self.st.borrow_mut().cursor = if end == n { 0 } else { end };
                return Some(first..end);
            }
        }
        None
    }

    fn issue(self: &Rc<Self>, chunks: Range<u64>, gate: Gate, now: Instant) {
        let (chunks, contents) = self.trim_to_source_extent(chunks);
        let bytes = self.shared.dirty.byte_range(chunks.clone());
        let len = bytes.end - bytes.start;
        {
            let mut st = self.st.borrow_mut();
            st.ops += 1;
            st.bytes_in_flight += len;
            // Like QEMU, only copied data counts against the speed limit.
            if gate == Gate::Open && contents == Contents::Data {
                st.limit.charge(now, len);
            }
        }
        let op = MirrorOp {
            chunks,
            offset: bytes.start,
            len,
        };
        if contents == Contents::Zero {
            return self.zero_target(op);
        }
        let req = Request::Read {
            offset: op.offset,
            buf: Box::new(self.take_buf(len)),
        };
        let job = self.clone();
        let done: Done = Box::new(move |result, req| job.read_done(op, result, req));
        match gate {
            Gate::Open => self.source.submit(req, done),
            Gate::Drained => self.source.submit_drained(req, done),
        }
    }

    /// Asks the source what the claimed run starts with and keeps only that extent: the zero
    /// chunks at its start, or the chunks holding its data (a chunk partly data is data). The
    /// chunks cut off are released, dirty again. Asked after the dirty bits were cleared, so a
    /// guest write that lands after the answer re-dirties its chunks like one after a read.
    fn trim_to_source_extent(&self, chunks: Range<u64>) -> (Range<u64>, Contents) {
        let dirty = &self.shared.dirty;
        let bytes = dirty.byte_range(chunks.clone());
        let Ok(extent) = self
            .source
            .block_status(bytes.start, bytes.end - bytes.start)
        else {
            return (chunks, Contents::Data); // unknown: read it
        };
        let (keep, contents) = match extent.contents {
            Contents::Zero => {
                let zero = dirty.covered(bytes.start, extent.len);
                if zero.is_empty() {
                    (1, Contents::Data)
                } else {
                    (zero.end - zero.start, Contents::Zero)
                }
            }
            Contents::Data => {
                let data = dirty.touched(bytes.start, extent.len);
                (data.end - data.start, Contents::Data)
            }
        };
        let end = chunks.start + keep;
        if end < chunks.end {
            dirty.set(end..chunks.end);
            for chunk in end..chunks.end {
                self.shared.locks.release(chunk);
            }
            self.st.borrow_mut().cursor = end;
        }
        (chunks.start..end, contents)
    }

    fn read_done(self: &Rc<Self>, op: MirrorOp, result: BlockResult, req: Request) {
        let buf = owned(req);
        if let Err(e) = result {
            self.put_buf(buf);
            return self.op_failed(op, IoOperation::Read, &e);
        }
        if is_zero(buf.as_slice()) {
            self.put_buf(buf);
            return self.zero_target(op);
        }
        self.shared.target_zero.clear(op.chunks.clone());
        let req = Request::Write {
            offset: op.offset,
            buf: Box::new(buf),
        };
        let job = self.clone();
        self.target.submit(
            req,
            Box::new(move |result, req| {
                job.put_buf(owned(req));
                job.target_done(op, result);
            }),
        );
    }

    /// Makes the op's range read as zeroes on the target: a write-zeroes, or nothing where the
    /// target is known to read as zeroes already (the op still completes in a later turn, like
    /// every other).
    fn zero_target(self: &Rc<Self>, op: MirrorOp) {
        let job = self.clone();
        if self.shared.target_zero.all_set(op.chunks.clone()) {
            return self.ctx.defer(move || job.op_done(op));
        }
        let req = Request::WriteZeroes {
            offset: op.offset,
            len: op.len,
            unmap: self.cfg.unmap,
        };
        self.target
            .submit(req, Box::new(move |result, _| job.target_done(op, result)));
    }

    fn target_done(self: &Rc<Self>, op: MirrorOp, result: BlockResult) {
        match result {
            Ok(()) => self.op_done(op),
            Err(e) => self.op_failed(op, IoOperation::Write, &e),
        }
    }

    fn op_done(self: &Rc<Self>, op: MirrorOp) {
        self.release(&op);
        self.st.borrow_mut().offset += op.len;
        self.pump();
    }

    fn op_failed(self: &Rc<Self>, op: MirrorOp, operation: IoOperation, error: &BlockError) {
        self.release(&op);
        self.shared.dirty.set(op.chunks.clone());
        let (text, errno) = describe(error);
        self.copy_failed(operation, &text, errno);
        self.pump();
    }

    fn release(&self, op: &MirrorOp) {
        for chunk in op.chunks.clone() {
            self.shared.locks.release(chunk);
        }
        let mut st = self.st.borrow_mut();
        st.ops -= 1;
        st.bytes_in_flight -= op.len;
    }

    /// A buffer of `len` bytes from the pool (contents unspecified: a read fills it).
    fn take_buf(&self, len: u64) -> OwnedBuf {
        let len = usize::try_from(len).expect("a copy fits in memory");
        let mut buf = self
            .pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| OwnedBuf::zeroed(0));
        buf.resize(len);
        buf
    }

    fn put_buf(&self, buf: OwnedBuf) {
        let mut pool = self.pool.borrow_mut();
        let pooled: u64 = pool.iter().map(|b| b.capacity() as u64).sum();
        if pooled < self.cfg.buf_size {
            pool.push(buf);
        }
    }

    /// Flushes the target as part of the final sync.
    pub(crate) fn flush_target(self: &Rc<Self>) {
        self.st.borrow_mut().ops += 1;
        let job = self.clone();
        self.target.submit(
            Request::Flush,
            Box::new(move |result, _| {
                {
                    let mut st = job.st.borrow_mut();
                    st.ops -= 1;
                    st.flushed = result.is_ok();
                }
                if let Err(e) = result {
                    let (text, errno) = describe(&e);
                    job.copy_failed(IoOperation::Write, &text, errno);
                }
                job.pump();
            }),
        );
    }
}

/// QEMU-style error text ("Input/output error") and the errno, if there is one.
fn describe(error: &BlockError) -> (String, Option<i32>) {
    match error {
        BlockError::Io(e) => {
            let text = e.to_string();
            let text = match text.find(" (os error") {
                Some(i) => text[..i].to_owned(),
                None => text,
            };
            (text, e.raw_os_error())
        }
        other => (other.to_string(), None),
    }
}

fn owned(req: Request) -> OwnedBuf {
    let buf = req
        .into_buf()
        .expect("copies read and write through a buffer");
    OwnedBuf::from_boxed(buf).unwrap_or_else(|_| panic!("the job's copies use OwnedBuf"))
}

/// Whether every byte is zero.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(16);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .map(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")))
            .all(|w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection_sees_a_single_byte_anywhere() {
        let mut data = vec![0u8; 4099];
        assert!(is_zero(&data));
        for at in [0, 15, 16, 4095, 4098] {
            data[at] = 1;
            assert!(!is_zero(&data), "byte {at}");
            data[at] = 0;
        }
    }
}
