//! The speed limit: a byte budget that refills at `speed` bytes per second.
//!
//! Each copy is charged when it is issued. Charges push a "paid until" instant forward by
//! `bytes / speed`; the job may issue while that instant is less than one slice (100 ms)
//! ahead of now, so it moves in bursts of at most a slice's worth and averages `speed`.

use std::time::{Duration, Instant};

/// How far ahead of the clock the budget may run.
pub const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub(crate) struct RateLimit {
    speed: u64,
    paid_until: Instant,
}

impl RateLimit {
    pub(crate) fn new(speed: u64) -> RateLimit {
        RateLimit {
            speed,
            paid_until: Instant::now(),
        }
    }

    pub(crate) fn speed(&self) -> u64 {
        self.speed
    }

    /// A new limit, with a fresh budget (`set-speed` while running).
    pub(crate) fn set_speed(&mut self, speed: u64) {
        *self = RateLimit::new(speed);
    }

    /// How long to wait before issuing more, if at all.
    pub(crate) fn delay(&self, now: Instant) -> Option<Duration> {
        if self.speed == 0 {
            return None;
        }
        let ahead = self.paid_until.checked_duration_since(now)?;
        ahead.checked_sub(SLICE).filter(|d| !d.is_zero())
    }

    /// Charges `bytes` issued at `now`.
    pub(crate) fn charge(&mut self, now: Instant, bytes: u64) {
        if self.speed == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.speed as f64);
        self.paid_until = self.paid_until.max(now) + cost;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new(0);
        let now = Instant::now();
        r.charge(now, 1 << 30);
        assert_eq!(r.delay(now), None);
    }

    #[test]
    fn a_second_of_bytes_waits_for_most_of_a_second() {
        let mut r = RateLimit::new(1 << 20);
        let now = Instant::now();
        assert_eq!(r.delay(now), None);
        r.charge(now, 1 << 20);
        let d = r.delay(now).expect("over budget");
        assert!(d >= Duration::from_millis(850) && d <= Duration::from_millis(950));
        assert_eq!(r.delay(now + Duration::from_millis(950)), None);
    }
}
