//! Rate-limited logging: at most one line per key per interval, with the count of lines
//! suppressed since, so a hostile upstream or client cannot flood the log (DESIGN.md
//! invariant 6).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Logs at most one line per key per interval, and says how many were suppressed: a hostile
/// upstream or client cannot flood the log.
pub struct RateLimitedLog {
    interval: Duration,
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog { interval, last: Mutex::new(HashMap::new()) }
    }

    /// Whether a line for `key` may be written now; returns the number suppressed since the
    /// last one that was.
    pub fn allow(&self, key: &'static str) -> Option<u64> {
        let mut map = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match map.get_mut(key) {
            Some((at, suppressed)) if now.duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                map.insert(key, (now, 0));
                Some(0)
            }
        }
    }

    pub fn warn(&self, key: &'static str, msg: impl FnOnce() -> String) {
        if let Some(suppressed) = self.allow(key) {
            tracing::warn!(kind = key, suppressed, "{}", msg());
        }
    }

    pub fn error(&self, key: &'static str, msg: impl FnOnce() -> String) {
        if let Some(suppressed) = self.allow(key) {
            tracing::error!(kind = key, suppressed, "{}", msg());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_suppresses_and_counts() {
        let l = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(l.allow("x"), Some(0));
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("x"), None);
        assert_eq!(l.allow("y"), Some(0));
    }
}
