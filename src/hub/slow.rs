//! The slow-subscriber rule (DESIGN.md invariant 7): a subscriber is closed only when it is
//! reading the log (not live), further behind the log's newest event than `behind`, and
//! passed fewer than `min_rate` events/s over the last `window`. A slow reader that makes
//! progress is never closed: it simply keeps reading the log.
//!
//! The clock is injected: [`SlowWatch::check`] takes `now`, so tests drive it with tokio's
//! paused clock.

use std::time::Duration;
use tokio::time::Instant;

/// The rule's thresholds, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SlowRule {
    pub window: Duration,
    pub min_rate: f64,
    pub behind: Duration,
}

/// One subscriber's progress over the current window.
#[derive(Debug, Clone)]
pub struct SlowWatch {
    rule: SlowRule,
    window_start: Instant,
    passed_at_start: u64,
}

/// Where the subscriber is, as the rule needs it.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Events passed (delivered or filtered out) since the stream started.
    pub passed: u64,
    /// How far its position is behind the log's newest event.
    pub behind: Duration,
    /// Reading the ring (caught up) rather than the log.
    pub live: bool,
}

impl SlowWatch {
    pub fn new(rule: SlowRule, now: Instant) -> Self {
        SlowWatch { rule, window_start: now, passed_at_start: 0 }
    }

    /// Starts a new window at `now` (the subscriber just went back to reading the log).
    pub fn restart(&mut self, now: Instant, passed: u64) {
        self.window_start = now;
        self.passed_at_start = passed;
    }

    /// True when the subscriber should be closed as too slow. Looked at once per tick; a
    /// window is judged when it is complete, then the next one starts.
    pub fn check(&mut self, now: Instant, p: Progress) -> bool {
        let elapsed = now.duration_since(self.window_start);
        if elapsed < self.rule.window {
            return false;
        }
        let rate = p.passed.saturating_sub(self.passed_at_start) as f64 / elapsed.as_secs_f64();
        if !p.live && p.behind > self.rule.behind && rate < self.rule.min_rate {
            return true;
        }
        self.window_start = now;
        self.passed_at_start = p.passed;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: SlowRule =
        SlowRule { window: Duration::from_secs(60), min_rate: 5.0, behind: Duration::from_secs(600) };
    const FAR: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn a_stuck_log_reader_far_behind_is_closed_after_one_window() {
        let mut w = SlowWatch::new(RULE, Instant::now());
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(!w.check(Instant::now(), Progress { passed: 10, behind: FAR, live: false }), "window not complete");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(w.check(Instant::now(), Progress { passed: 10, behind: FAR, live: false }), "10 events in 60 s");
    }

    #[tokio::test(start_paused = true)]
    async fn progress_live_or_near_the_tip_keeps_a_subscriber() {
        let mut w = SlowWatch::new(RULE, Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!w.check(Instant::now(), Progress { passed: 400, behind: FAR, live: false }), "≥ 5/s");
        tokio::time::advance(Duration::from_secs(60)).await;
        // The next window is judged on its own count (400 → 401: 1 event in 60 s)...
        assert!(!w.check(Instant::now(), Progress { passed: 401, behind: FAR, live: true }), "live");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(!w.check(Instant::now(), Progress { passed: 402, behind: Duration::from_secs(5), live: false }));
        tokio::time::advance(Duration::from_secs(60)).await;
        // ...and the same subscriber, now stuck far behind, is closed.
        assert!(w.check(Instant::now(), Progress { passed: 403, behind: FAR, live: false }));
    }
}
