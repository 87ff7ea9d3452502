//! The lock-free in-flight counter.

use crate::sync::{AtomicUsize, Ordering};

/// Counts requests in flight for one owner (a node, a device). Any thread may increment and
/// decrement it; a drain reads it. Sequentially consistent, so that "increment, then check the
/// quiesce counter" on the submit side and "raise the quiesce counter, then wait for zero" on the
/// drain side cannot both miss each other.
#[derive(Debug, Default)]
pub struct InFlight(AtomicUsize);

impl InFlight {
    /// A counter at zero.
    pub fn new() -> InFlight {
        InFlight(AtomicUsize::new(0))
    }

    /// One more request in flight.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// One request fewer; returns how many are left. Panics on underflow (an unbalanced
    /// decrement is a broken invariant, not an expected failure).
    pub fn dec(&self) -> usize {
        let before = self.0.fetch_sub(1, Ordering::SeqCst);
        assert!(before > 0, "in-flight counter decremented below zero");
        before - 1
    }

    /// Requests in flight now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
