//! The sequencer: the single writer that gives every event its `time_us`.
//!
//! `time_us = max(now_us, last + 1)`: unique and strictly increasing even when the wall clock
//! steps back, and — with `last` recovered from the log at startup — across restarts too
//! (DESIGN.md invariant 1).

/// Assigns `time_us` values. Pure: the caller passes the clock reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamper {
    last: u64,
}

impl Stamper {
    /// Starts after `last`, the newest `time_us` already handed out (0 for none).
    pub fn new(last: u64) -> Self {
        Stamper { last }
    }

    /// The next `time_us` for a clock reading of `now_us`.
    pub fn next(&mut self, now_us: u64) -> u64 {
        self.last = now_us.max(self.last + 1);
        self.last
    }

    pub fn last(&self) -> u64 {
        self.last
    }
}

/// The wall clock in unix microseconds.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_regresses_when_the_clock_steps_back() {
        let mut s = Stamper::new(1_000);
        assert_eq!(s.next(500), 1_001);
        assert_eq!(s.next(2_000), 2_000);
        assert_eq!(s.next(2_000), 2_001);
        assert_eq!(s.next(10), 2_002);
    }
}
