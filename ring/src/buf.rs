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

/// Alignment of an [`OwnedBuf`]'s memory: a page, which satisfies every O_DIRECT file and block
/// device (their memory alignment is at most the logical block size, at most a page).
pub const OWNED_BUF_ALIGN: usize = 4096;

/// A page-aligned heap buffer owned by an op: the simplest [`IoBuffers`], and the one to use
/// for memory the kernel transfers to or from an O_DIRECT file.
pub struct OwnedBuf {
    /// The allocation: `capacity` bytes at [`OWNED_BUF_ALIGN`], or dangling when `capacity == 0`.
    ptr: ptr::NonNull<u8>,
    capacity: usize,
    /// The buffer: the first `iov[0].iov_len` bytes of the allocation.
    iov: [libc::iovec; 1],
}

// SAFETY: the iovec points into the allocation `ptr`, which is `capacity >= iov_len` bytes long
// (or the length is 0), is replaced only through `&mut self` (`resize`), and is freed only when
// the OwnedBuf is dropped. Moving the OwnedBuf does not move the heap block.
unsafe impl IoBuffers for OwnedBuf {
    fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }
}

// SAFETY: the raw pointers refer to memory owned by this value alone.
unsafe impl Send for OwnedBuf {}

impl OwnedBuf {
    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> OwnedBuf {
        let ptr = if len == 0 {
            ptr::NonNull::<u8>::dangling()
        } else {
            let layout = Self::layout(len);
            // SAFETY: `layout` has a non-zero size (len > 0) and a valid power-of-two alignment.
            let raw = unsafe { std::alloc::alloc_zeroed(layout) };
            ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        };
        OwnedBuf {
            ptr,
            capacity: len,
            iov: [libc::iovec {
                iov_base: ptr.as_ptr().cast(),
                iov_len: len,
            }],
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> OwnedBuf {
        let mut buf = OwnedBuf::zeroed(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    /// Takes the buffer back from a request or op that carried it; gives `bufs` back if it is
    /// not an `OwnedBuf`.
    pub fn from_boxed(bufs: Box<dyn IoBuffers>) -> Result<OwnedBuf, Box<dyn IoBuffers>> {
        if !(&*bufs as &dyn std::any::Any).is::<OwnedBuf>() {
            return Err(bufs);
        }
        let any: Box<dyn std::any::Any> = bufs;
        Ok(*any.downcast::<OwnedBuf>().expect("checked above"))
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, OWNED_BUF_ALIGN).expect("buffer size fits isize")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov[0].iov_len
    }

    /// Bytes the allocation holds (what `resize` can grow to without reallocating).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the buffer `len` bytes long: the first `min(len, old len)` bytes keep their value;
    /// bytes beyond the old length are unspecified (a read fills them). Reuses the allocation
    /// when it is large enough.
    pub fn resize(&mut self, len: usize) {
        if len > self.capacity {
            let mut bigger = OwnedBuf::zeroed(len);
            bigger.as_mut_slice()[..self.len()].copy_from_slice(self.as_slice());
            *self = bigger;
            return;
        }
        self.iov[0].iov_len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len() <= capacity` bytes (dangling only when the length is
        // 0, which a slice allows) and `&self` excludes writers through this value.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// The bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for OwnedBuf {
    fn drop(&mut self) {
        if self.capacity > 0 {
            // SAFETY: `ptr` was allocated by `zeroed` with this exact layout and not freed since.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) };
        }
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
    fn owned_buffers_are_page_aligned_and_keep_their_bytes_when_resized() {
        let mut b = OwnedBuf::from_slice(b"abc");
        assert_eq!(b.iovecs()[0].iov_base as usize % OWNED_BUF_ALIGN, 0);
        b.resize(10_000);
        assert_eq!(b.iovecs()[0].iov_base as usize % OWNED_BUF_ALIGN, 0);
        assert_eq!(&b.as_slice()[..3], b"abc");
        b.resize(2);
        assert_eq!(b.as_slice(), b"ab");
        assert_eq!(total_len(&b), 2);
        let back = OwnedBuf::from_boxed(Box::new(b)).ok().unwrap();
        assert_eq!(back.as_slice(), b"ab");
        assert!(OwnedBuf::from_boxed(Box::new(Window::new(Box::new(back), 1))).is_err());
    }

    #[test]
    #[should_panic(expected = "window skips past the end")]
    fn window_past_the_end_panics() {
        let _ = Window::new(Box::new(OwnedBuf::zeroed(4)), 5);
    }
}
