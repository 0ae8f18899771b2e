//! What can go wrong, and whether trying again can help ([`Error::is_retryable`]).

use crate::transport::{ClientError, UrlError};

/// An error of a [`crate::Subscription`]. Connection failures are retried inside the
/// subscription (with backoff, across the host list) and reach the caller only as
/// [`Error::Unreachable`] when a limit of attempts was set, or as [`Error::Unreadable`] when
/// the server sends, again and again at one position, a message this client cannot read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A URL that cannot be used. Fix the configuration.
    #[error("bad URL: {0}")]
    Url(#[from] UrlError),
    /// The builder was given no URL.
    #[error("no server URL given")]
    NoUrl,
    /// A filter the server would refuse (too many, bad syntax). Fix the filter.
    #[error("invalid filter: {0}")]
    Filter(String),
    /// The server refused this subscription (HTTP 400 at the upgrade, a close frame saying the
    /// options were invalid), and so did every other host of the list since one last served it
    /// or its filters changed: retrying the same request gets the same answer.
    #[error("{url} refused the subscription: {reason}")]
    Refused { url: String, reason: String },
    /// Every host failed for the configured number of attempts in a row; the last failure.
    /// Retrying later may help.
    #[error("no server reachable after {attempts} attempts; last: {last}")]
    Unreachable { attempts: u32, last: String },
    /// The server sent, again and again at the same position, a message this client cannot
    /// read (over 16 MiB, or text that is not UTF-8) or take (a `time_us` more than a week past
    /// this machine's clock: check the clock; an event more than two hours before the position:
    /// the host's timeline went back, or a bogus `time_us` moved the position ahead). Start
    /// again from another position (a later cursor, or an earlier one) to go past it.
    #[error("{url} sends a message this client cannot read ({what}) after time_us {after:?}")]
    Unreadable { url: String, after: Option<u64>, what: String },
    /// The subscription's background task has ended (it was closed, or the runtime is
    /// shutting down).
    #[error("the subscription has ended")]
    Ended,
}

impl Error {
    /// Whether the same call could succeed later without a configuration change.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
}

/// Why one connection ended (retried inside the subscription unless fatal).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("the dictionary: {0}")]
    Dictionary(String),
    #[error("the dictionary: {0}")]
    DictionaryFetch(ClientError),
    #[error("nothing received for {0:?}")]
    Stale(std::time::Duration),
    /// Cursor messages, and the position not moved on for this long: see
    /// [`crate::Builder::stall_timeout`].
    #[error("cursor messages, and the position not moved on for {0:?}: trying another host, which may be ahead")]
    Stalled(std::time::Duration),
    #[error("reading: {0}")]
    Read(String),
    /// A message this client cannot read: after a few in a row at one position, the
    /// subscription ends with [`Error::Unreadable`].
    #[error("reading: {0}")]
    Unreadable(String),
    #[error("writing: {0}")]
    Write(String),
    #[error("the server closed the connection ({code}{})", if .reason.is_empty() { String::new() } else { format!(": {}", .reason) })]
    Closed { code: u16, reason: String },
    /// The server broke the protocol (time going backwards after the connection moved past its
    /// cursor: a clock stepped back on a server that starts such a cursor live). Retried; at
    /// once on every connection at one position (three, over a stale timeout at least), the
    /// subscription ends with [`Error::Unreadable`].
    #[error("{0}")]
    Protocol(String),
    /// A `time_us` more than a week past this machine's clock: after a few in a row at one
    /// position, the subscription ends with [`Error::Unreadable`] (check the clock).
    #[error("{0}")]
    Future(String),
    /// Not retryable when every host of the list says so: see [`Error::Refused`].
    #[error("{0}")]
    Refused(String),
    /// A refusal by this host while another of the list has not refused: retried there.
    #[error("refused: {0}")]
    RefusedHere(String),
    /// New filters on the v2 wire: reconnect with them (not a failure).
    #[error("the filters changed")]
    FiltersChanged,
    /// A v2 server refused the dictionary given to the builder: reconnect with the server's
    /// own (not a failure).
    #[error("the server refused the dictionary given to the builder")]
    GivenDictionaryRefused,
    /// The host no longer has the events after our position (it told a gap), and host `next`
    /// may: try it (not a failure).
    #[error("the host no longer has the events after {after} through {through}")]
    Lacks { after: u64, through: u64, next: usize },
    /// The consumer dropped the subscription.
    #[error("the subscription was dropped")]
    Dropped,
}

impl ConnectionError {
    /// How long the host asked to be left alone (a refusal's `Retry-After`), if it did.
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ConnectionError::Client(e) | ConnectionError::DictionaryFetch(e) => e.retry_after(),
            _ => None,
        }
    }
}
