//! ringblk's engine: one [`Context`] per thread, each owning one io_uring.
pub mod buf;
