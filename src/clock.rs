//! Time: the wall clock in unix microseconds, the [`Stamper`] that turns clock readings into
//! unique, strictly increasing `time_us` values, and the calendar date for dictionary ids.
//!
//! The wall clock only stamps new events (DESIGN.md invariant 9): everything that asks "how
//! old" or "how far behind" is measured against the log's tip instead.

/// The wall clock in unix microseconds (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Above any `time_us` a clock can give (2^53 µs is the year 2255) and the largest integer a
/// JavaScript client reads exactly: an upstream's event beyond it is dropped, not stored, so a
/// corrupt one cannot become the log's newest (which every real event after it would then
/// fail to follow).
pub const MAX_TIME_US: u64 = 1 << 53;

/// How close to [`MAX_TIME_US`] a clock reading is taken for a wild one: 2^40 µs (12.7 days), so
/// the stamps after the last reading taken stay below it for 2^40 events.
pub const WILD_MARGIN_US: u64 = 1 << 40;

/// Assigns `time_us` values: `max(now, last + 1)`, so they never repeat or go backwards even
/// when the clock steps back. Pure: the caller passes the clock reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamper {
    last: u64,
}

impl Stamper {
    /// Starts after `last`, the newest `time_us` already handed out (0 for none).
    pub fn new(last: u64) -> Self {
        Stamper { last }
    }

    /// The next `time_us` for a clock reading of `now_us`. A reading within [`WILD_MARGIN_US`]
    /// of [`MAX_TIME_US`] or past it (a clock gone wild) is not taken: followed once, every
    /// later stamp would stay there, and reach past what a JavaScript client reads exactly (and
    /// what a replica takes) a few stamps on.
    pub fn next(&mut self, now_us: u64) -> u64 {
        let now_us = if now_us < MAX_TIME_US - WILD_MARGIN_US { now_us } else { 0 };
        self.last = now_us.max(self.last + 1);
        self.last
    }

    pub fn last(&self) -> u64 {
        self.last
    }
}

/// Today's UTC date as `YYYYMMDD`, the way Jetstream v2 names its dictionaries.
pub fn today_yyyymmdd() -> u32 {
    let d = time::OffsetDateTime::now_utc().date();
    d.year() as u32 * 10_000 + u8::from(d.month()) as u32 * 100 + d.day() as u32
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
        // A reading beyond any real clock, or close enough to it that the stamps after it
        // would pass it a few events on, is not followed.
        assert_eq!(s.next(MAX_TIME_US), 2_003);
        assert_eq!(s.next(u64::MAX), 2_004);
        assert_eq!(s.next(MAX_TIME_US - 1), 2_005);
        assert_eq!(s.next(MAX_TIME_US - WILD_MARGIN_US), 2_006);
        let latest = MAX_TIME_US - WILD_MARGIN_US - 1;
        assert_eq!(s.next(latest), latest);
        assert_eq!(s.next(MAX_TIME_US - 2), latest + 1);
    }

    #[test]
    fn today_is_a_plausible_date() {
        let d = today_yyyymmdd();
        assert!((20_240_101..21_000_101).contains(&d), "{d}");
        assert!((1..=12).contains(&(d / 100 % 100)) && (1..=31).contains(&(d % 100)));
    }
}
