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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Whether the source has reached its relay or upstream yet, and if not, why: `/ready` says
/// so, so an operator sees "TCP connect … timed out" rather than a bare 503.
#[derive(Debug, Default)]
pub struct Readiness {
    reached: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// The log could not be written: ingest stopped (set by the application, for `/ready`).
    store_failure: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_reached(&self) {
        self.reached.store(true, Ordering::Relaxed);
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
        self.reached.load(Ordering::Relaxed) && self.store_failure.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// Why `/ready` says 503, when it does.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(e) = self.store_failure.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Some(format!("the log cannot be written, ingest stopped ({e}); serving what is stored"));
        }
        if self.is_ready() {
            return None;
        }
        Some(match self.last_error() {
            Some(e) => format!("the relay has not been reached yet (last attempt: {e})"),
            None => "the relay has not been reached yet".to_string(),
        })
    }

    /// Why not ready: the last error, if there was one.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
