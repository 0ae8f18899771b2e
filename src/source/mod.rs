//! Sources: where events come from. A primary reads a relay ([`relay`]); a replica follows
//! other Contrails ([`upstream`]). Both use one websocket client ([`wsclient`]), one
//! [`backoff`], and hand frames to the sequencer; neither converts records itself (that is
//! the pure `transcode`).

pub mod relay;
pub(crate) mod seq;
pub mod upstream;
pub mod wsclient;

/// Exponential reconnect backoff with jitter (the client crate's).
pub(crate) use contrail_client::backoff;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Whether the source has reached its relay or upstream yet, and if not, why: `/ready` says
/// so, so an operator sees "TCP connect … timed out" rather than a bare 503. With
/// `--ready-stale-after`, also whether the source still moves on.
#[derive(Debug, Default)]
pub struct Readiness {
    reached: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The log could not be written: ingest stopped (set by the application, for `/ready`).
    store_failure: Mutex<Option<String>>,
    /// `--ready-stale-after` in milliseconds (0: off).
    stale_after_ms: AtomicU64,
    /// When the source last moved the stream on (or first reached its peer).
    moved_at: Mutex<Option<Instant>>,
    /// `--ready-max-lag` in milliseconds (0: off), and how far behind the source is, in seconds.
    max_lag_ms: AtomicU64,
    lag: std::sync::OnceLock<LagSource>,
}

/// How far behind the source is now, in seconds (the relay or replication lag); `None`: not
/// known yet.
pub struct LagSource(Box<dyn Fn() -> Option<f64> + Send + Sync>);

impl std::fmt::Debug for LagSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LagSource")
    }
}

impl Readiness {
    /// `/ready` says 503 once the source has moved nothing on for `after` (zero: never).
    pub fn set_stale_after(&self, after: Duration) {
        self.stale_after_ms.store(after.as_millis() as u64, Ordering::Relaxed);
    }

    /// `/ready` says 503 while `lag()` (seconds) is more than `max`, or not known yet (zero:
    /// never), so a load balancer sends new clients to a region that is not hours behind (a
    /// replica catching up, a node just restarted before its first event).
    pub fn set_max_lag(&self, max: Duration, lag: impl Fn() -> Option<f64> + Send + Sync + 'static) {
        self.max_lag_ms.store(max.as_millis() as u64, Ordering::Relaxed);
        let _ = self.lag.set(LagSource(Box::new(lag)));
    }

    /// How far behind the source is, when that is past `--ready-max-lag` (infinite: not known).
    fn behind(&self) -> Option<f64> {
        let max = self.max_lag_ms.load(Ordering::Relaxed);
        if max == 0 {
            return None;
        }
        let lag = (self.lag.get()?.0)().unwrap_or(f64::INFINITY);
        (lag * 1000.0 > max as f64).then_some(lag)
    }

    pub fn set_reached(&self) {
        // The silence is counted from the first connection, not from the process's start.
        self.moved_at.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(Instant::now);
        self.reached.store(true, Ordering::Relaxed);
    }

    /// The source moved the stream on at `at` (an instant its reader took anyway).
    pub fn moved_on(&self, at: Instant) {
        // Called for every frame that moves on: nothing to keep while the check is off.
        if self.stale_after_ms.load(Ordering::Relaxed) > 0 {
            *self.moved_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
        }
    }

    /// How long the source has moved nothing on, when that is past `--ready-stale-after`.
    fn stale_for(&self) -> Option<Duration> {
        let after = Duration::from_millis(self.stale_after_ms.load(Ordering::Relaxed));
        let moved = (*self.moved_at.lock().unwrap_or_else(|p| p.into_inner()))?;
        let silent = moved.elapsed();
        (!after.is_zero() && silent > after).then_some(silent)
    }

    /// The last connection attempt failed with `error`.
    pub fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    /// Ingest stopped because the log cannot be written.
    pub fn set_store_failure(&self, error: String) {
        *self.store_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
    }

    pub fn is_ready(&self) -> bool {
        self.reached.load(Ordering::Relaxed)
            && self.store_failure.lock().unwrap_or_else(|p| p.into_inner()).is_none()
            && self.stale_for().is_none()
            && self.behind().is_none()
    }

    /// Why `/ready` says 503, when it does.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(e) = self.store_failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(format!("the log cannot be written, ingest stopped ({e}); serving what is stored"));
        }
        if !self.reached.load(Ordering::Relaxed) {
            return Some(match self.last_error() {
                Some(e) => format!("the relay has not been reached yet (last attempt: {e})"),
                None => "the relay has not been reached yet".to_string(),
            });
        }
        if let Some(silent) = self.stale_for() {
            let after = Duration::from_millis(self.stale_after_ms.load(Ordering::Relaxed));
            let why = self.last_error().map(|e| format!("; last connection error: {e}")).unwrap_or_default();
            return Some(format!(
                "nothing new from the relay for {}s (--ready-stale-after {}s){why}; serving what is stored",
                silent.as_secs(),
                after.as_secs()
            ));
        }
        let lag = self.behind()?;
        let max = Duration::from_millis(self.max_lag_ms.load(Ordering::Relaxed)).as_secs_f64();
        Some(if lag.is_infinite() {
            format!("how far behind is not known yet: nothing stored since the start (--ready-max-lag {max}s)")
        } else {
            format!("{lag:.0}s behind (--ready-max-lag {max}s); serving what is stored")
        })
    }

    /// Why not ready: the last error, if there was one.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_further_behind_than_the_max_lag_or_not_known_is_not_ready() {
        let lag = std::sync::Arc::new(Mutex::new(None));
        let r = Readiness::default();
        r.set_reached();
        let l = lag.clone();
        r.set_max_lag(Duration::from_secs(60), move || *l.lock().unwrap());
        assert!(r.not_ready_reason().unwrap().contains("not known yet"), "before the first event");
        *lag.lock().unwrap() = Some(3_600.0);
        assert_eq!(r.not_ready_reason().unwrap(), "3600s behind (--ready-max-lag 60s); serving what is stored");
        *lag.lock().unwrap() = Some(59.0);
        assert!(r.is_ready() && r.not_ready_reason().is_none());
    }

    #[test]
    fn a_source_that_moves_nothing_on_for_too_long_is_not_ready() {
        // (Instants only from now on: `now - 2 minutes` panics on a machine booted just now.)
        let quiet = || std::thread::sleep(Duration::from_millis(250));
        let r = Readiness::default();
        r.set_stale_after(Duration::from_millis(200));
        assert!(!r.is_ready(), "not reached yet");
        r.set_reached();
        assert!(r.is_ready());
        // Silent past the threshold: stale, with the last connection error.
        r.set_error("connection reset".into());
        quiet();
        assert!(!r.is_ready());
        let why = r.not_ready_reason().unwrap();
        assert!(
            why.starts_with("nothing new from the relay for ")
                && why.contains("; last connection error: connection reset"),
            "{why}"
        );
        // Reaching the peer again does not count as a move; moving on makes it ready.
        r.set_reached();
        assert!(!r.is_ready());
        r.moved_on(Instant::now());
        assert!(r.is_ready() && r.not_ready_reason().is_none());
        // Off: never stale.
        r.set_stale_after(Duration::ZERO);
        quiet();
        assert!(r.is_ready());
    }
}
