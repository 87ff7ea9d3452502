//! Memory the kernel reads or writes on behalf of an op.
//!
//! Ownership rule: an op owns its buffers from submission until its completion is reaped. The ring
//! keeps the `Box<dyn IoBuffers>` in the op's slot and hands it back only in the completion, so
//! nothing can free or reuse the memory while the kernel may still touch it.
//!
//! This module is the only place in ringblk that dereferences the raw pointers an [`IoBuffers`]
//! describes; everyone else copies through the safe helpers below.

use std::ptr;

/// A scatter-gather list of memory that stays valid while the value lives.
///
/// # Safety
/// Implementors promise that every `iovec` returned by [`IoBuffers::iovecs`] points to memory that
/// is valid for reads and writes of `iov_len` bytes, and that this memory is neither freed,
/// unmapped nor moved for as long as the value lives. The memory may be shared with another
/// process (guest memory): readers must not assume it is stable, only that it is mapped.
/// If [`IoBuffers::fixed_index`] returns `Some(i)`, there is exactly one iovec, and for every op
/// that carries the buffers, from its submission until its completion is reaped, slot `i` of the
/// buffer table of the ring it is submitted to holds a buffer that contains the iovec entirely and
/// was registered from the memory mapped there now (not from an earlier mapping at the same
/// addresses: the kernel uses the pages it pinned at registration).
pub unsafe trait IoBuffers: std::any::Any + Send {
    /// The segments, in order.
    fn iovecs(&self) -> &[libc::iovec];

    /// Index of the registered (fixed) buffer containing the single segment, if any.
    fn fixed_index(&self) -> Option<u16> {
        None
    }
}

/// Most slots a ring's buffer table may have (the kernel's IORING_MAX_REG_BUFFERS).
pub const FIXED_BUFFER_SLOTS_MAX: u32 = 1 << 14;

/// Largest buffer one slot may hold.
pub const FIXED_BUFFER_BYTES_MAX: u64 = 1 << 30;

/// Total length in bytes of the segments.
pub fn total_len(bufs: &dyn IoBuffers) -> usize {
    bufs.iovecs().iter().map(|v| v.iov_len).sum()
}

/// Copies the segments, in order, into `dst`, stopping at whichever ends first. Returns the
/// number of bytes copied.
pub fn copy_out(bufs: &dyn IoBuffers, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for v in bufs.iovecs() {
        let n = v.iov_len.min(dst.len() - done);
        // SAFETY: the IoBuffers contract keeps `v` valid for reads of iov_len bytes while `bufs`
        // lives (it is borrowed for this call); `dst[done..done + n]` is in bounds by the min above.
        // The source may be guest memory changed concurrently by the guest: the copy then sees
        // some mix of old and new bytes, which is what a device may return.
        unsafe { ptr::copy_nonoverlapping(v.iov_base as *const u8, dst[done..].as_mut_ptr(), n) };
        done += n;
        if done == dst.len() {
            break;
        }
    }
    done
}

/// Copies `src` into the segments, in order, stopping at whichever ends first. Returns the number
/// of bytes copied.
pub fn copy_in(bufs: &dyn IoBuffers, src: &[u8]) -> usize {
    let mut done = 0;
    for v in bufs.iovecs() {
        let n = v.iov_len.min(src.len() - done);
        // SAFETY: the IoBuffers contract keeps `v` valid for writes of iov_len bytes while `bufs`
        // lives; `src[done..done + n]` is in bounds by the min above; `src` is a Rust slice and
        // cannot overlap memory the caller handed to us as exclusively writable buffers.
        unsafe { ptr::copy_nonoverlapping(src[done..].as_ptr(), v.iov_base as *mut u8, n) };
        done += n;
        if done == src.len() {
            break;
        }
    }
    done
}

/// Fills the segments with zeroes.
pub fn fill_zero(bufs: &dyn IoBuffers) {
    for v in bufs.iovecs() {
        // SAFETY: the IoBuffers contract keeps `v` valid for writes of iov_len bytes while `bufs`
        // lives.
        unsafe { ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

/// A heap buffer owned by an op: the simplest [`IoBuffers`].
pub struct OwnedBuf {
    data: Vec<u8>,
    iov: [libc::iovec; 1],
}

// SAFETY: the iovec points into `data`'s heap allocation, which is never reallocated (OwnedBuf
// exposes no way to grow it) and is freed only when the OwnedBuf is dropped. Moving the OwnedBuf
// moves the Vec header, not the heap block, so the pointer stays valid.
unsafe impl IoBuffers for OwnedBuf {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }
}

// SAFETY: the raw pointer in `iov` refers to memory owned by this value alone.
unsafe impl Send for OwnedBuf {}

impl OwnedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> OwnedBuf {
        OwnedBuf::from_vec(vec![0; len])
    }

    /// Takes ownership of `data`.
    pub fn from_vec(mut data: Vec<u8>) -> OwnedBuf {
        let iov = [libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        }];
        OwnedBuf { data, iov }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// Gives the Vec back.
    pub fn into_vec(self) -> Vec<u8> {
        self.data
    }
}

/// A window `[skip, skip + len)` of another buffer list, used to resubmit the rest of a short
/// read or write.
pub struct Window {
    inner: Box<dyn IoBuffers>,
    iov: Vec<libc::iovec>,
}

// SAFETY: every iovec in `iov` is a sub-range of one of `inner`'s iovecs (checked in `new`), and
// `inner` is owned by the window, so its contract keeps them valid while the window lives.
unsafe impl IoBuffers for Window {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }
}

impl Window {
    /// The part of `inner` after its first `skip` bytes. `skip` must be at most its length.
    pub fn new(inner: Box<dyn IoBuffers>, skip: usize) -> Window {
        let mut left = skip;
        let mut iov = Vec::with_capacity(inner.iovecs().len());
        for v in inner.iovecs() {
            if left >= v.iov_len {
                left -= v.iov_len;
                continue;
            }
            // left < iov_len, so the result stays inside the segment.
            let base = (v.iov_base as *mut u8).wrapping_add(left);
            iov.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: v.iov_len - left,
            });
            left = 0;
        }
        assert_eq!(left, 0, "window skips past the end of its buffers");
        Window { inner, iov }
    }

    /// The buffers the window was cut from.
    pub fn into_inner(self) -> Box<dyn IoBuffers> {
        self.inner
    }

    /// Unwraps `bufs` if it is a window, giving back the buffers it was cut from.
    pub fn unwrap(bufs: Box<dyn IoBuffers>) -> Box<dyn IoBuffers> {
        let any: Box<dyn std::any::Any> = bufs;
        match any.downcast::<Window>() {
            Ok(window) => window.inner,
            Err(_) => panic!("Window::unwrap of buffers that are not a window"),
        }
    }
}

// SAFETY: the raw pointers in `iov` refer into `inner`, which is Send.
unsafe impl Send for Window {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_in_then_out_round_trips_across_segments() {
        let b = OwnedBuf::zeroed(8);
        let w = Window::new(Box::new(b), 3);
        assert_eq!(total_len(&w), 5);
        assert_eq!(copy_in(&w, b"hello world"), 5);
        let mut out = [0u8; 5];
        assert_eq!(copy_out(&w, &mut out), 5);
        assert_eq!(&out, b"hello");
    }

    #[test]
    #[should_panic(expected = "window skips past the end")]
    fn window_past_the_end_panics() {
        let _ = Window::new(Box::new(OwnedBuf::zeroed(4)), 5);
    }
}
