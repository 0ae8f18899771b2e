//! A subscription: one background task keeps a connection to one of the hosts, reconnects with
//! backoff and jitter, resumes from the last event it delivered, fails over along the host list
//! and hands [`Message`]s to the consumer through a bounded channel (so a slow consumer slows
//! the connection, and the server's slow-client rule takes over, instead of memory growing).
//!
//! Resuming:
//! - **Same host, or [`Failover::ExactCursor`]** (one Contrail primary and its replicas, which
//!   keep the primary's `time_us`): `cursor` = the last delivered `time_us`; the inclusive
//!   repeat and anything older is dropped.
//! - **Another host with [`Failover::Rewind`]** (Jetstream instances, or Contrails that are not
//!   replicas of one primary: their `time_us` differ by the time each stamped the event):
//!   `cursor` = last − rewind, and events already delivered are recognised by their identity
//!   (DID, rev, collection, rkey, operation; `seq` for identity and account events) and dropped.
//! - **A host that no longer has what follows the position** (it tells a gap: its retention
//!   deleted it, or its log starts later) is left at once for each other host in turn; one
//!   not heard yet that is out of reach is waited for (with the usual backoff, not counted
//!   against `max_attempts`) for a stale timeout. When none has the events, the host that told
//!   the smallest gap goes on (going back to hosts that told one at most once per host), and
//!   its gap is handed over ([`Message::Gap`]). With [`Failover::Rewind`], a gap that ends
//!   within the rewind after a switch to another host may cover events already delivered: it
//!   is only counted and logged, and no other host is tried for it.

use crate::backoff::{Backoff, Pauses};
use crate::error::{ConnectionError, Error};
use crate::event::{Event, V2Message, Wire};
use crate::transport::{self, Assembled, ClientError, Reassembler, WsUrl};
use crate::Filters;
use fastwebsockets::{Frame, OpCode, Payload};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Largest event accepted once decompressed (a 1 MiB record rendered as JSON is ~3 MB).
const MAX_EVENT_BYTES: usize = 16 << 20;
/// Above this query length the filters go in an `options_update` after the upgrade
/// (`requireHello`) instead of the URL.
const MAX_QUERY_BYTES: usize = 4096;
/// A write (ping, pong, `options_update`) that takes longer means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames read ahead of the driver (each at most [`MAX_EVENT_BYTES`]).
const READ_AHEAD_FRAMES: usize = 16;
/// Connections in a row that end on an unreadable message at one position before the
/// subscription ends with [`Error::Unreadable`].
const UNREADABLE_TRIES: u32 = 3;

/// The longest a search for a host that has what follows the position waits for one out of
/// reach (otherwise a stale timeout).
const SEARCH_PATIENCE_MAX: Duration = Duration::from_secs(3600);

/// The longest timeout a subscription keeps (a century: none, in practice); longer ones, such
/// as `Duration::MAX` for "never", are taken for it (deadlines are instants: they must exist).
const LONGEST_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Binary messages in a row that do not decompress, after which the connection ends as
/// unreadable: the dictionary is the wrong one (a stale file given to the builder, a proxy's
/// stale `/dictionary`), not a message damaged here and there. Skipped one by one, every message
/// was lost and the subscription delivered nothing, without an error, for ever.
const UNDECOMPRESSABLE_IN_A_ROW: u32 = 16;
/// How far before its cursor a connection's first events may be and be skipped as a replay
/// from earlier than asked (Jetstream v2 replays up to its active segment, an hour).
const REPLAY_BEFORE_CURSOR: Duration = Duration::from_secs(2 * 3600);
/// A connection that ends sooner than this after it was made is followed by a wait, even when
/// it moved the position on.
const BRIEF_CONNECTION: Duration = Duration::from_secs(1);
/// Bytes of event JSON buffered for the consumer, unless the builder says otherwise.
const DEFAULT_BUFFER_BYTES: usize = 64 << 20;

/// How to resume on another host of the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// The hosts share one timeline (a Contrail primary and its replicas): resume with the
    /// exact cursor. The default.
    ExactCursor,
    /// The hosts stamp `time_us` independently (Jetstream instances): resume this far back
    /// and drop what was already delivered.
    Rewind(Duration),
}

/// What the subscription hands out.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    Event(Event),
    /// The server has passed every event up to this `time_us` for this subscription's filters
    /// (Contrail's `informCursorSeconds`): nothing was missed but the gaps it told
    /// ([`Message::Gap`]), and a cursor saved here is valid. Arrives on quiet filters too.
    Cursor(u64),
    /// The server's log no longer held the events after `after_us` through `through_us` when
    /// this subscription came to them (its retention or disk budget deleted them first, or
    /// the cursor was older than its log): they are lost to this subscription, whether its
    /// filters wanted any of them or not, and it goes on after them. Contrail tells it on
    /// `/subscribe` with cursor messages on (this client asks for them). Before handing it
    /// over, the subscription tries the other hosts of its list for the events (a primary with
    /// more history than the replica listed first), waiting a stale timeout for one out of
    /// reach; when none has them, it hands over the smallest gap a host told, counted in
    /// [`Stats::gaps`]. A consumer that must not miss an event backfills that range from
    /// elsewhere (the accounts' repositories).
    Gap {
        after_us: u64,
        through_us: u64,
    },
}

impl Message {
    /// The position this message moves the consumer to.
    pub fn time_us(&self) -> u64 {
        match self {
            Message::Event(e) => e.time_us(),
            Message::Cursor(t) | Message::Gap { through_us: t, .. } => *t,
        }
    }
}

/// Counters of a subscription (for progress lines, tests and metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections opened (the first one included).
    pub connections: AtomicU64,
    /// Events dropped because they were already delivered (the inclusive cursor's repeat, a
    /// rewind, a server replaying from before the cursor).
    pub duplicates_dropped: AtomicU64,
    /// Messages that were not event JSON (skipped, logged).
    pub malformed: AtomicU64,
    /// Gaps taken: handed over as [`Message::Gap`] once no other host had the events, or,
    /// within a rewind onto another host (where they may be events already delivered), only
    /// logged.
    pub gaps: AtomicU64,
    /// Index of the host in use.
    pub host: AtomicUsize,
}

/// Builds a [`Subscription`]. (Its `Debug` shows the URLs without their queries, which may
/// hold access tokens.)
#[derive(Clone)]
pub struct Builder {
    urls: Vec<String>,
    filters: Filters,
    cursor: Option<u64>,
    compress: bool,
    dictionary: Option<Vec<u8>>,
    failover: Failover,
    wire: Wire,
    include_sync: bool,
    stale_timeout: Duration,
    stall_timeout: Duration,
    connect_timeout: Duration,
    backoff: (Duration, Duration),
    max_attempts: Option<u32>,
    buffer: usize,
    buffer_bytes: usize,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<&str> = self.urls.iter().map(|u| crate::transport::without_query(u)).collect();
        f.debug_struct("Builder")
            .field("urls", &urls)
            .field("filters", &self.filters)
            .field("cursor", &self.cursor)
            .field("compress", &self.compress)
            .field("dictionary", &self.dictionary.as_ref().map(Vec::len))
            .field("failover", &self.failover)
            .field("wire", &self.wire)
            .field("include_sync", &self.include_sync)
            .field("stale_timeout", &self.stale_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff", &self.backoff)
            .field("max_attempts", &self.max_attempts)
            .field("buffer", &self.buffer)
            .field("buffer_bytes", &self.buffer_bytes)
            .finish()
    }
}

impl Builder {
    /// Base URLs (`wss://host`, `ws://127.0.0.1:6008`) or `/subscribe` URLs, tried in order.
    pub fn new<I, S>(urls: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Builder {
            urls: urls.into_iter().map(Into::into).collect(),
            filters: Filters::default(),
            cursor: None,
            compress: false,
            dictionary: None,
            failover: Failover::ExactCursor,
            wire: Wire::V1,
            include_sync: false,
            stale_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(10),
            backoff: (Duration::from_millis(250), Duration::from_secs(30)),
            max_attempts: None,
            buffer: 1024,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
        }
    }

    /// Only these collections (NSIDs, or prefixes ending in `.*`).
    pub fn collections<I: IntoIterator<Item = S>, S: Into<String>>(mut self, c: I) -> Self {
        self.filters.collections = c.into_iter().map(Into::into).collect();
        self
    }

    /// Only these repos.
    pub fn dids<I: IntoIterator<Item = S>, S: Into<String>>(mut self, d: I) -> Self {
        self.filters.dids = d.into_iter().map(Into::into).collect();
        self
    }

    pub fn filters(mut self, f: Filters) -> Self {
        self.filters = f;
        self
    }

    /// Start after this position (a saved cursor: the event at it is not delivered again).
    /// Without one, the subscription starts live (and a reconnect before anything arrived
    /// resumes from a second before it started, so nothing in between is missed).
    pub fn cursor(mut self, cursor: Option<u64>) -> Self {
        self.cursor = cursor;
        self
    }

    /// zstd-compressed messages (about a third of the bytes). The dictionary is fetched from
    /// the server's `/dictionary` unless given with [`Builder::dictionary`] (Jetstream serves
    /// none: give its `zstd_dictionary`).
    pub fn compress(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// The subscription names the dictionary in its query (`zstdDictionary`, v2's, which a
    /// Contrail takes on v1 too: it compresses with that one rather than its default; Jetstream
    /// v1 ignores it). A server that does not have this one (it rotated to another) refuses it:
    /// the subscription then fetches the server's own (`/dictionary`, v2's
    /// `getZstdDictionary`), as when none is given, and goes on.
    pub fn dictionary(mut self, dict: Vec<u8>) -> Self {
        self.dictionary = Some(dict);
        self
    }

    /// How to resume on another host. A rewind longer than a century is taken for a century.
    pub fn failover(mut self, f: Failover) -> Self {
        self.failover = match f {
            Failover::Rewind(d) => Failover::Rewind(d.min(LONGEST_TIMEOUT)),
            exact => exact,
        };
        self
    }

    /// Which Jetstream wire to speak: v1 `/subscribe` (the default: filters change without
    /// reconnecting, cursor messages) or v2 `subscribeEvents` (server-push only: a filter
    /// change reconnects from the last position; the ping is the only heartbeat). Events
    /// keep the text of their wire ([`Event::json`]); the accessors read both.
    pub fn wire(mut self, wire: Wire) -> Self {
        self.wire = wire;
        self
    }

    /// Contrail's `#sync` events too (`includeSync=true`).
    pub fn include_sync(mut self, on: bool) -> Self {
        self.include_sync = on;
        self
    }

    /// Reconnect (to the next host) after this long with nothing received. The client pings
    /// every third of it, so a quiet filter on a live connection never trips it. It also asks
    /// a v1 server for a cursor message every third of it (`informCursorSeconds`); once one
    /// has come on a connection, only messages count, not pongs: a Contrail whose socket
    /// answers pings while its stream for this client has stopped is left (from 3 s up).
    /// At least a second; one longer than a century (`Duration::MAX` for "never") is taken
    /// for a century.
    pub fn stale_timeout(mut self, t: Duration) -> Self {
        self.stale_timeout = t.clamp(Duration::from_secs(1), LONGEST_TIMEOUT);
        self
    }

    /// With more than one host: leave a host that sends cursor messages but does not move the
    /// position on for this long (default two minutes), for the next. A Contrail's cursor
    /// message moves with its log whatever the filter, so one that stays put is a server no
    /// longer taking events (a replica whose upstream is gone keeps serving what it has, and
    /// answers as a live one would), while another host may be ahead: with
    /// [`Failover::ExactCursor`] nothing is lost going there. (When every host is stuck, the
    /// subscription moves between them, waiting twice as long after each round of them, up to
    /// 16 times this, until the position moves again.) At least a second; one longer than a
    /// century is taken for a century.
    pub fn stall_timeout(mut self, t: Duration) -> Self {
        self.stall_timeout = t.clamp(Duration::from_secs(1), LONGEST_TIMEOUT);
        self
    }

    /// Deadline of each connection step (TCP, TLS, upgrade, dictionary fetch); one longer than
    /// a century is taken for a century.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t.min(LONGEST_TIMEOUT);
        self
    }

    /// Reconnect waits: exponential from `min` (at least 10 ms) to `max` (at most an hour).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        let min = min.clamp(Duration::from_millis(10), Duration::from_secs(3600));
        self.backoff = (min, max.clamp(min, Duration::from_secs(3600)));
        self
    }

    /// Give up with [`Error::Unreachable`] after this many failed connections in a row
    /// (default: never). A connection that delivered something, or stayed up for the stale
    /// timeout, is not a failure. A host that refused with a `Retry-After`, and was not asked
    /// again while the others failed, is asked once more (after its wait) before giving up.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n.max(1));
        self
    }

    /// Messages buffered between the connection and the consumer.
    pub fn buffer(mut self, n: usize) -> Self {
        self.buffer = n.max(1);
        self
    }

    /// Bytes of event JSON buffered between the connection and the consumer (default 64 MiB):
    /// a count alone would let a server whose small compressed frames each decompress to
    /// 16 MiB fill gigabytes before a slow consumer takes them. An event larger than this
    /// waits for an empty buffer.
    pub fn buffer_bytes(mut self, n: usize) -> Self {
        self.buffer_bytes = n.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// Whether the subscription sets query parameter `key` itself, on its wire. Given in a URL
    /// as well, the server saw both: a `compress=true` the builder did not ask for made every
    /// message "malformed", a `requireHello=true` it never answers left it waiting for ever, a
    /// filter in the URL was added to the builder's. A filter the builder does not set may stay
    /// in the URL (a Jetstream URL copied with its `wantedCollections`). (`cursor` is taken out
    /// of a URL: the position is the subscription's.)
    fn sets(&self, key: &str) -> bool {
        let f = &self.filters;
        match self.wire {
            Wire::V1 => match key {
                // Always sent, or managed with the dictionary and the hello the client sends.
                "compress" | "requireHello" | "informCursorSeconds" | "zstdDictionary" => true,
                "wantedCollections" => !f.collections.is_empty(),
                "wantedDids" => !f.dids.is_empty(),
                "includeSync" => self.include_sync,
                _ => false,
            },
            Wire::V2 => match key {
                "zstdDictionary" => true,
                "collections" => !f.collections.is_empty(),
                "dids" => !f.dids.is_empty(),
                "kinds" => !self.include_sync,
                _ => false,
            },
        }
    }

    /// Starts the background task (on the current tokio runtime).
    pub fn start(self) -> Result<Subscription, Error> {
        if self.urls.is_empty() {
            return Err(Error::NoUrl);
        }
        let urls = self
            .urls
            .iter()
            .map(|u| WsUrl::parse_with_path(&ws_scheme(u), endpoint(self.wire)))
            .collect::<Result<Vec<_>, _>>()?;
        for url in &urls {
            let conflict = url.query.iter().map(|kv| kv.split('=').next().unwrap_or_default()).find(|k| self.sets(k));
            if let Some(key) = conflict {
                let msg = format!(
                    "{url} sets {key}, which this subscription sets itself: give it to the builder (or the command's flag) instead"
                );
                return Err(crate::transport::UrlError::new(msg).into());
            }
        }
        // A filter left in a URL comes back at every reconnect, under whatever `set_filters`
        // set meanwhile: that is refused then.
        let filter_keys: &[&str] = match self.wire {
            Wire::V1 => &["wantedCollections", "wantedDids"],
            Wire::V2 => &["collections", "dids"],
        };
        let url_filter = urls.iter().find_map(|u| {
            let key =
                u.query.iter().map(|kv| kv.split('=').next().unwrap_or_default()).find(|k| filter_keys.contains(k));
            key.map(|k| format!("{u} carries {k}: give the filters to the builder to change them later"))
        });
        self.filters.validate()?;
        let (out_tx, out_rx) = mpsc::channel(self.buffer);
        let budget =
            Arc::new(Buffered { bytes: tokio::sync::Semaphore::new(self.buffer_bytes), max: self.buffer_bytes });
        let (filters_tx, filters_rx) = tokio::sync::watch::channel(None);
        let stats = Arc::new(Stats::default());
        let driver = Driver {
            started_us: None,
            start_cursor: None,
            upgrade_cursor: None,
            origin: self.cursor.map(|_| Origin::Stored),
            last: self.cursor,
            dedupe: match self.failover {
                Failover::Rewind(d) => Some(Dedupe::new(d)),
                Failover::ExactCursor => None,
            },
            current: 0,
            urls,
            opts: self,
            out: out_tx,
            budget: budget.clone(),
            new_filters: filters_rx,
            stats: stats.clone(),
            connected_at: None,
            last_heard: None,
            informs: false,
            resumed_at: None,
            warned_replay: false,
            at_last: Vec::new(),
            at_last_known: false,
            lacking: None,
            given_dictionary_refused: false,
            v1_pin_refused: false,
            refused: Vec::new(),
            moved_at: tokio::time::Instant::now(),
            stalls: 0,
        };
        // Every log line of this subscription carries its first host.
        let span = tracing::info_span!("contrail_client", host = %driver.urls[0]);
        let task = tokio::spawn(tracing::Instrument::instrument(driver.run(), span));
        Ok(Subscription { rx: out_rx, new_filters: filters_tx, stats, task, budget: Some(budget), url_filter })
    }
}

const V1_ENDPOINT: &str = "/subscribe";
/// The most events stamped alike whose identities are kept (a commit has at most 200 ops):
/// past it, every further event at that `time_us` is taken for a repeat.
const MOST_AT_ONE_TIME: usize = 1024;
const V2_ENDPOINT: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";

fn endpoint(wire: Wire) -> &'static str {
    match wire {
        Wire::V1 => V1_ENDPOINT,
        Wire::V2 => V2_ENDPOINT,
    }
}

/// The dictionary's own id, from its header (zstd magic `0xEC30A437`, then the id, LE).
fn dictionary_id(dict: &[u8]) -> Option<u32> {
    if dict.len() < 8 || dict[..4] != [0x37, 0xA4, 0x30, 0xEC] {
        return None;
    }
    Some(u32::from_le_bytes([dict[4], dict[5], dict[6], dict[7]]))
}

/// `http(s)://` is accepted for `ws(s)://`.
fn ws_scheme(url: &str) -> String {
    if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url.to_string()
    }
}

/// A running subscription (see the module doc). Dropping it stops the background task.
pub struct Subscription {
    rx: mpsc::Receiver<Result<Message, Error>>,
    /// The filters last given to [`Subscription::set_filters`]: only the latest is kept, so
    /// calls made while the driver is busy neither pile up nor each cost a reconnect (v2).
    new_filters: tokio::sync::watch::Sender<Option<Filters>>,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
    /// The bytes of the events in `rx` (`None`: fed by the caller, not counted).
    budget: Option<Arc<Buffered>>,
    /// Why [`Subscription::set_filters`] is refused: a URL carries a filter of its own.
    url_filter: Option<String>,
}

/// The bytes of event JSON between the driver and the consumer, and their cap: the driver
/// takes an event's share before handing it over, the consumer gives it back on taking it.
struct Buffered {
    bytes: tokio::sync::Semaphore,
    max: usize,
}

impl Buffered {
    /// An event's share: its JSON, at least 1 and at most the whole cap.
    fn share(&self, message: &Message) -> u32 {
        match message {
            Message::Event(e) => e.json().len().clamp(1, self.max).min(u32::MAX as usize) as u32,
            Message::Cursor(_) | Message::Gap { .. } => 0,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    pub fn builder<I, S>(urls: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Builder::new(urls)
    }

    /// The next message. Cancel-safe. After an `Err`, the subscription has ended and returns
    /// [`Error::Ended`].
    pub async fn next(&mut self) -> Result<Message, Error> {
        let message = self.rx.recv().await.unwrap_or(Err(Error::Ended));
        if let (Ok(m), Some(budget)) = (&message, &self.budget) {
            budget.bytes.add_permits(budget.share(m) as usize);
        }
        message
    }

    /// Changes the filters without reconnecting (`options_update`); later reconnects use them
    /// too. Events already buffered were selected by the old filters. Refused when a URL
    /// carries a filter of its own (it would come back at the next reconnect).
    pub fn set_filters(&self, filters: Filters) -> Result<(), Error> {
        if let Some(why) = &self.url_filter {
            return Err(Error::Filter(why.clone()));
        }
        filters.validate()?;
        self.new_filters.send(Some(filters)).map_err(|_| Error::Ended)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A subscription fed by the caller (tests of code that consumes subscriptions).
    #[doc(hidden)]
    pub fn from_channel(rx: mpsc::Receiver<Result<Message, Error>>) -> Subscription {
        let (new_filters, _) = tokio::sync::watch::channel(None);
        Subscription {
            rx,
            new_filters,
            stats: Arc::default(),
            task: tokio::spawn(async {}),
            budget: None,
            url_filter: None,
        }
    }
}

/// Where `Driver::last` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The cursor the subscription was started with: its host is unknown.
    Stored,
    Host(usize),
}

struct Driver {
    opts: Builder,
    urls: Vec<WsUrl>,
    current: usize,
    /// The position of the last message delivered (or the starting cursor).
    last: Option<u64>,
    /// For a subscription started live: a second before its first connection was tried, by
    /// this machine's clock.
    started_us: Option<u64>,
    /// For a subscription started live: the cursor from its start that the first connection's
    /// upgrade gave (Contrail's [`transport::START_CURSOR_HEADER`]), on the server's clock, and
    /// that host. Taken over `started_us` on that host, and on a host of the same timeline
    /// when it is a position (an empty log's "from the start" is that log's own).
    start_cursor: Option<(usize, u64)>,
    /// What the last upgrade gave in [`transport::START_CURSOR_HEADER`].
    upgrade_cursor: Option<u64>,
    origin: Option<Origin>,
    dedupe: Option<Dedupe>,
    out: mpsc::Sender<Result<Message, Error>>,
    /// The bytes `out` may hold ([`Buffered`]).
    budget: Arc<Buffered>,
    /// What [`Subscription::set_filters`] gave last (see its sender).
    new_filters: tokio::sync::watch::Receiver<Option<Filters>>,
    stats: Arc<Stats>,
    /// The last connection's upgrade, and when the server was last heard on it (a pong, a
    /// message): whether it was healthy, for [`Driver::run`].
    connected_at: Option<tokio::time::Instant>,
    last_heard: Option<tokio::time::Instant>,
    /// Whether the last connection's server sends the cursor messages this client asks for
    /// (it sent one) often enough to be its heartbeat ([`Driver::messages_are_heartbeat`]):
    /// then only messages, not pongs, show it alive. A server whose socket answers pings while
    /// its stream for us has stopped (a stuck session) is left at the stale timeout.
    informs: bool,
    /// The cursor this connection asked for, until it delivers a message: events a little
    /// before it are then the server replaying from earlier than asked, and skipped.
    resumed_at: Option<u64>,
    /// Whether this connection has logged skipping a replay from before its cursor.
    warned_replay: bool,
    /// The identities ([`Event::sibling_key`]) of the events this run handed over at `last`,
    /// when `at_last_known` (not when `last` is a stored cursor, or more than
    /// [`MOST_AT_ONE_TIME`] were). More than one where a server stamps events alike: Jetstream
    /// v2 gives every op of a commit its frame's `time_us`. An event at `last` is a repeat (the
    /// inclusive cursor's, or one a server sends twice) when it is among them, or when they are
    /// not known. (One list, cleared and reused: not an allocation per event.)
    at_last: Vec<u64>,
    at_last_known: bool,
    /// A search for a host that still has the events after the position, which the current
    /// one told a gap for ([`Driver::host_for_gap`]).
    lacking: Option<Lacking>,
    /// A v2 server refused the dictionary given to the builder (a stale file, after the server
    /// moved to another): every connection fetches its host's own instead.
    given_dictionary_refused: bool,
    /// A v1 server refused the dictionary named in the query (`zstdDictionary`, which a
    /// Contrail compresses with): it is not named again.
    v1_pin_refused: bool,
    /// Per host, its refusal of this subscription since one last served it (see
    /// [`Driver::refused_by_every_host`]).
    refused: Vec<Option<String>>,
    /// When this connection last moved the position on (or began): see
    /// [`Builder::stall_timeout`].
    moved_at: tokio::time::Instant,
    /// Hosts left for a stall since the position last moved ([`Driver::stall_timeout`]).
    stalls: u32,
}

/// How many times longer than [`Builder::stall_timeout`] a host is waited for, at most, once
/// every host has been left for a stall in turn without the position moving.
const STALL_ROUNDS_DOUBLED: u32 = 4;

/// What each host said of the events after one position.
#[derive(Debug)]
struct Lacking {
    after: Option<u64>,
    /// Per host: not tried yet (`None`), the end of the gap it told, or [`UNREACHED`].
    told: Vec<Option<u64>>,
    /// When the search began: a host is taken for lacking the events only once it has been
    /// out of reach for a stale timeout since (a restart passes sooner; a gap is for ever).
    since: tokio::time::Instant,
    /// Moves back to a host that had told a gap (its retention may have moved on since):
    /// bounded, so two hosts trimming as they are asked cannot keep it going.
    returns: u32,
}

/// [`Lacking::told`] for a host that stayed out of reach.
const UNREACHED: u64 = u64::MAX;

impl Lacking {
    /// The host to try after `here`: the next one not tried yet (or out of reach for less than
    /// the patience), else the one that told the smallest gap (`here` on a tie).
    fn next(&self, here: usize) -> usize {
        let n = self.told.len();
        (1..n)
            .map(|i| (here + i) % n)
            .find(|&i| self.told[i].is_none())
            .or_else(|| (0..n).min_by_key(|&i| (self.told[i], i != here)))
            .unwrap_or(here)
    }
}

type Upgraded = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;
type WsWrite = fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<Upgraded>>;

impl Driver {
    async fn run(mut self) {
        let (min, max) = self.opts.backoff;
        let mut backoff = Backoff::new(min, max);
        // Hosts that refused us with a Retry-After are not asked again before their time; the
        // others are asked meanwhile.
        let mut pauses = Pauses::new(max);
        let mut failures: u32 = 0;
        // Once `max_attempts` failed in a row: the hosts that had asked to be left alone a
        // while and were not asked since, each asked once more before giving up (the others'
        // failures during their pause must not use the attempts up).
        let mut last_turns: Option<Vec<usize>> = None;
        // Connections that ended at one position on a message this client cannot read.
        let mut unreadable: (Option<u64>, u32) = (None, 0);
        // When time first went backwards at once at the current unreadable position: that ends
        // the subscription only once it has lasted a stale timeout too (a clock corrected
        // back and forth within seconds passes).
        let mut backwards_since: Option<tokio::time::Instant> = None;
        // The host chosen for the next connection is asked, after its pause if it has one.
        let mut keep_host = false;
        loop {
            // The host meant, or the next that may be asked; at the end of `max_attempts`, the
            // last turns. (Not while looking for a host that has what follows our position:
            // that search picks the host, and one that told a gap would be asked again and
            // again; nor after an unreadable message, which picked another host.)
            let searching = self.lacking.as_ref().is_some_and(|l| l.after == self.last);
            let keep = std::mem::take(&mut keep_host);
            let turn = last_turns.as_ref().and_then(|turns| turns.iter().copied().min_by_key(|&h| pauses.left(h)));
            let pause = if let Some(host) = turn.filter(|_| !searching) {
                self.current = host;
                self.stats.host.store(self.current, Ordering::Relaxed);
                pauses.left(host)
            } else if !searching && !keep {
                let (next, pause) = pauses.pick(self.current, self.urls.len());
                self.current = next;
                self.stats.host.store(self.current, Ordering::Relaxed);
                pause
            } else {
                pauses.left(self.current)
            };
            if !pause.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.out.closed() => return,
                }
            }
            let delivered_before = self.last;
            let attempt_us = now_us().saturating_sub(1_000_000);
            let began = tokio::time::Instant::now();
            let ended = self.connection().await;
            // A host served this subscription: earlier refusals were the hosts' own trouble.
            if self.last != delivered_before || self.heard_for_a_stale_timeout() {
                self.refused.clear();
            }
            // One host's refusal, while another may serve us, is that host's failure.
            let ended = match ended {
                ConnectionError::Refused(reason) if !self.refused_by_every_host(&reason) => {
                    ConnectionError::RefusedHere(reason)
                }
                other => other,
            };
            pauses.asked(self.current, ended.retry_after());
            if let Some(turns) = &mut last_turns {
                turns.retain(|&h| h != self.current);
            }
            if self.last.is_none() && self.started_us.is_none() {
                self.started_us = Some(attempt_us);
                // The server's own, when it gave one: its time_us need not follow this clock
                // (a replica catching up is behind it, a server whose clock stepped back ahead),
                // and this clock would skip, or replay, the difference.
                let given = self.upgrade_cursor.take().filter(|&c| c > 0 && plausible(c));
                self.start_cursor = given.map(|c| (self.current, c));
                if let Some(c) = given {
                    tracing::info!(url = %self.urls[self.current], cursor = c, "started live; a reconnect resumes from the server's start cursor");
                }
            }
            if matches!(ended, ConnectionError::Stalled(_)) {
                self.stalls = self.stalls.saturating_add(1);
            }
            let url = self.urls[self.current].to_string();
            let backwards = matches!(ended, ConnectionError::Protocol(_));
            match ended {
                ConnectionError::Dropped => return,
                // Ended by this client (new filters; the host's own dictionary to fetch), not
                // by the host: one that served us counts as below, so a long session's end by
                // `set_filters` leaves no failures from before it to add up to `max_attempts`.
                ConnectionError::FiltersChanged | ConnectionError::GivenDictionaryRefused => {
                    // Refusals were of the old filters, or of the dictionary.
                    self.refused.clear();
                    if self.last != delivered_before || self.heard_for_a_stale_timeout() {
                        (failures, unreadable, last_turns) = (0, (None, 0), None);
                        backoff.reset();
                    }
                    continue;
                }
                // The host answered, without the events after our position: the host that may
                // still have them, at once. Answering is not failing: the count starts again
                // (the search that follows waits with backoff for a host that does not answer,
                // and returns to hosts that answered a bounded number of times). Not the count
                // of unreadable messages at the position: the host that has what follows it
                // may be the one that sends one, and the two would be asked in turn for ever.
                ConnectionError::Lacks { after, through, next } => {
                    (failures, last_turns) = (0, None);
                    backoff.reset();
                    self.current = next;
                    self.stats.host.store(self.current, Ordering::Relaxed);
                    tracing::info!(%url, after, through, next = %self.urls[self.current], "this host no longer has the events after our position; trying another");
                    continue;
                }
                ConnectionError::Refused(reason) => {
                    tracing::error!(%url, %reason, "the server refused the subscription");
                    let _ = self.out.send(Err(Error::Refused { url, reason })).await;
                    return;
                }
                // The same unreadable message at the same position, again and again: every
                // reconnect would meet it. The caller is told instead of a silent loop. So with
                // a time_us a week past this machine's clock (a clock far behind would loop for
                // ever), and with time going backwards at once on every connection: events more
                // than two hours before the position (nearer ones are skipped as a replay), from
                // a host whose timeline went back, or after a bogus time_us up to a week ahead
                // moved the position there (every later event would be "backwards" until the
                // clock caught up, days later). Going backwards after delivering is retried.
                ConnectionError::Unreadable(what) | ConnectionError::Future(what) | ConnectionError::Protocol(what)
                    if self.last == delivered_before =>
                {
                    unreadable = match unreadable {
                        (at, n) if at == self.last && n > 0 => (at, n + 1),
                        _ => {
                            backwards_since = None;
                            (self.last, 1)
                        }
                    };
                    if backwards {
                        backwards_since.get_or_insert_with(tokio::time::Instant::now);
                    }
                    let patience_over =
                        !backwards || backwards_since.is_some_and(|t| t.elapsed() >= self.opts.stale_timeout);
                    tracing::warn!(%url, %what, after = ?self.last, "a message this client cannot read");
                    if unreadable.1 >= UNREADABLE_TRIES && patience_over {
                        let err = Error::Unreadable { url, after: self.last, what };
                        let _ = self.out.send(Err(err)).await;
                        return;
                    }
                    if self.urls.len() > 1 {
                        // Another host may not send it: the next that may be asked, else the
                        // one whose pause ends first, waited for (not this one again meanwhile,
                        // which would use the tries up on the host that sends it).
                        self.current = pauses.pick_other(self.current, self.urls.len()).unwrap_or(self.current);
                        self.stats.host.store(self.current, Ordering::Relaxed);
                        keep_host = true;
                    }
                    // The longer of the backoff and the chosen host's pause (waited next), not both.
                    let wait = backoff.next_wait().saturating_sub(pauses.left(self.current));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.out.closed() => return,
                    }
                }
                // Looking for a host that still has what follows the position, which one that
                // answered no longer has: this one, not heard yet, did not answer. It is tried
                // again, with the usual backoff, until it has been out of reach for a stale
                // timeout since the search began (a restart passes sooner; a gap is for ever);
                // then the others, and at last the host that told the smallest gap. Not counted
                // against `max_attempts`: a host answered. (A host that told a gap and is now
                // out of reach too counts as usual.)
                e if self.lacking.as_ref().is_some_and(|l| l.after == self.last && l.told[self.current].is_none()) => {
                    let search = self.lacking.as_mut().expect("checked above");
                    // (At most an hour: a stale timeout of "never" must not make the search wait
                    // for ever for a host that is down.)
                    let patience = self.opts.stale_timeout.min(SEARCH_PATIENCE_MAX);
                    if search.told[self.current].is_none() && search.since.elapsed() >= patience {
                        search.told[self.current] = Some(UNREACHED);
                    }
                    self.current = search.next(self.current);
                    self.stats.host.store(self.current, Ordering::Relaxed);
                    tracing::warn!(%url, error = %e, next = %self.urls[self.current], "connection ended while looking for a host that has the events after our position");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = self.out.closed() => return,
                    }
                }
                e => {
                    // A connection that moved the position on starts the counting again, and
                    // the next host is tried at once, unless it ended within a second: hosts
                    // that each hand over an event and drop us must not be reconnected to in
                    // a loop without a pause. So does one that stayed up for a stale timeout
                    // and was heard on (alive: it answered our pings) with nothing to deliver:
                    // a quiet filter's routine server restarts, a week apart, must not add up
                    // to `max_attempts`, nor wait the longest backoff. (A server that hangs
                    // after the upgrade, never heard, still counts.)
                    let progressed = self.last != delivered_before;
                    let brief = began.elapsed() < BRIEF_CONNECTION;
                    let alive_long = self.heard_for_a_stale_timeout();
                    if progressed || alive_long {
                        failures = 0;
                        backoff.reset();
                        last_turns = None;
                    } else {
                        failures = failures.saturating_add(1);
                    }
                    // Unreadable messages count at one position, so moving on starts the
                    // count again, and so does a host that served us for a stale timeout (one
                    // that ends now and then while nothing moves a quiet filter on); a host
                    // of the list out of reach in between does not (the count would never
                    // reach its end: back and forth for ever).
                    if progressed || alive_long {
                        unreadable = (None, 0);
                    }
                    tracing::warn!(%url, error = %e, "connection ended; reconnecting");
                    if self.opts.max_attempts.is_some_and(|m| failures >= m) {
                        let turns = last_turns
                            .get_or_insert_with(|| (0..self.urls.len()).filter(|&h| pauses.owed(h)).collect());
                        // (This one was just asked: its pause, if it asked for one, began now.)
                        turns.retain(|&h| h != self.current);
                        if turns.is_empty() {
                            let err = Error::Unreachable { attempts: failures, last: format!("{url}: {e}") };
                            let _ = self.out.send(Err(err)).await;
                            return;
                        }
                        tracing::info!(%url, attempts = failures, "waiting for the hosts that asked to be left alone before giving up");
                    }
                    if self.urls.len() > 1 {
                        self.current = (self.current + 1) % self.urls.len();
                        self.stats.host.store(self.current, Ordering::Relaxed);
                    }
                    // Every host once before waiting.
                    if failures as usize >= self.urls.len() || (progressed && brief) {
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_wait()) => {}
                            _ = self.out.closed() => return,
                        }
                    }
                }
            }
        }
    }

    /// Whether a refusal by the current host ends the subscription: when every host of the
    /// list has refused it since one last served it (moved the position on, or stayed up for a
    /// stale timeout) or its filters changed. A refusal (an HTTP 400 at the upgrade,
    /// a close saying the options are invalid) is about the request — the filters, the cursor
    /// — when every host gives it; one host's alone may be its own trouble (a proxy's, a
    /// deploy's, an older version's), and another host is tried.
    fn refused_by_every_host(&mut self, reason: &str) -> bool {
        self.refused.resize(self.urls.len(), None);
        self.refused[self.current] = Some(reason.to_string());
        self.refused.iter().all(Option::is_some)
    }

    /// Whether the last connection's server was heard from for a stale timeout at least, not
    /// once and then silent.
    fn heard_for_a_stale_timeout(&self) -> bool {
        match (self.connected_at, self.last_heard) {
            (Some(c), Some(h)) => h.duration_since(c) >= self.opts.stale_timeout,
            _ => false,
        }
    }

    /// The cursor to ask the current host for, and whether it is a rewind.
    fn resume_cursor(&self) -> Option<u64> {
        // Started live and nothing received yet: a reconnect resumes from when the
        // subscription started, not from the new live edge: by the server's start cursor on a
        // host of its timeline, else by this clock (a second early, for clock skew).
        let Some(last) = self.last else {
            return match self.start_cursor {
                Some((host, c)) if host == self.current => Some(c),
                Some((_, c)) if self.opts.failover == Failover::ExactCursor && c >= MIN_POSITION => Some(c),
                _ => self.started_us,
            };
        };
        match (self.opts.failover, self.origin) {
            (Failover::Rewind(d), Some(o)) if o != Origin::Host(self.current) => {
                Some(last.saturating_sub(d.as_micros() as u64).max(1))
            }
            _ => Some(last),
        }
    }

    fn target(&self, url: &WsUrl, hello: bool, dictionary_id: Option<u32>) -> String {
        if self.opts.wire == Wire::V2 {
            return self.target_v2(url, dictionary_id);
        }
        let mut params = Vec::new();
        if !hello {
            params.extend(self.opts.filters.query_params());
        } else {
            params.push("requireHello=true".to_string());
        }
        if let Some(c) = self.resume_cursor() {
            params.push(format!("cursor={c}"));
        }
        if self.opts.compress {
            params.push("compress=true".into());
            if let Some(id) = dictionary_id {
                params.push(format!("zstdDictionary={id}"));
            }
        }
        if self.opts.include_sync {
            params.push("includeSync=true".into());
        }
        params.push(format!("informCursorSeconds={}", self.inform_seconds()));
        url.target_with(params.into_iter())
    }

    /// v2's parameters: `dids`, `collections`, `kinds` (sync only when asked, as on v1),
    /// `cursor` (= seq), `zstdDictionary`.
    fn target_v2(&self, url: &WsUrl, dictionary_id: Option<u32>) -> String {
        let f = &self.opts.filters;
        let mut params: Vec<String> = f.dids.iter().map(|d| format!("dids={}", crate::encode(d))).collect();
        params.extend(f.collections.iter().map(|c| format!("collections={}", crate::encode(c))));
        if !self.opts.include_sync {
            params.extend(["kinds=commit", "kinds=identity", "kinds=account"].map(String::from));
        }
        if let Some(c) = self.resume_cursor() {
            params.push(format!("cursor={c}"));
        }
        if let Some(id) = dictionary_id {
            params.push(format!("zstdDictionary={id}"));
        }
        url.target_with(params.into_iter())
    }

    /// How often a v1 server is asked for cursor messages: three in a stale timeout.
    fn inform_seconds(&self) -> u64 {
        (self.opts.stale_timeout.as_secs() / 3).clamp(1, 600)
    }

    /// Whether the cursor messages asked for come often enough to tell a live stream on their
    /// own: at least three in a stale timeout (not with a stale timeout under 3 s, where one
    /// a second is the most a server sends).
    fn messages_are_heartbeat(&self) -> bool {
        Duration::from_secs(self.inform_seconds() * 3) <= self.opts.stale_timeout
    }

    async fn connection(&mut self) -> ConnectionError {
        (self.connected_at, self.last_heard, self.informs) = (None, None, false);
        // Filters given while no connection was up: this one asks with them (refusals were of
        // the old ones).
        if let Some(f) = self.new_filters.borrow_and_update().clone() {
            self.opts.filters = f;
            self.refused.clear();
        }
        let url = self.urls[self.current].clone();
        let timeout = self.opts.connect_timeout;
        let mut decompressor = None;
        let mut dict_id = None;
        let given = self.opts.dictionary.as_ref().filter(|_| !self.given_dictionary_refused);
        let using_given = self.opts.compress && given.is_some();
        if self.opts.compress {
            let dict = match given {
                Some(d) => d.clone(),
                None => {
                    let base = url.path.strip_suffix(endpoint(self.opts.wire)).unwrap_or("");
                    let path = match self.opts.wire {
                        Wire::V1 => format!("{base}/dictionary"),
                        Wire::V2 => format!("{base}/xrpc/network.bsky.jetstream.getZstdDictionary"),
                    };
                    // With the URL's own query, as the upgrade has it: a proxy in front of the
                    // server that wants a `?token=` on every request lets this one through too.
                    match transport::http_get(&url, &url.at(&path), timeout).await {
                        Ok(d) => d,
                        // A host failing, as a proxy's 404 is (during a deploy); said plainly,
                        // since it is most often a server that has none.
                        Err(e @ ClientError::Status { status: 404, .. }) => {
                            tracing::warn!(%url, %path, "no zstd dictionary there (Jetstream serves none: give its own with Builder::dictionary)");
                            return ConnectionError::DictionaryFetch(e);
                        }
                        Err(e) => return ConnectionError::DictionaryFetch(e),
                    }
                }
            };
            // v2 names the dictionary in the query (`zstdDictionary`); its id is in its header.
            // So does v1 here, unless a server refused it: a Contrail then compresses with this
            // one, not its default (servers behind one address whose defaults differ, a default
            // changed between the fetch and the upgrade); Jetstream v1 ignores the parameter.
            match (dictionary_id(&dict), self.opts.wire) {
                (Some(id), Wire::V2) => dict_id = Some(id),
                (Some(id), Wire::V1) => dict_id = Some(id).filter(|_| !self.v1_pin_refused),
                (None, Wire::V2) => {
                    return ConnectionError::Dictionary("a dictionary without an id in its header".into())
                }
                (None, Wire::V1) => {}
            }
            match zstd::bulk::Decompressor::with_dictionary(&dict) {
                Ok(d) => decompressor = Some(d),
                Err(e) => return ConnectionError::Dictionary(e.to_string()),
            }
        }
        let hello = self.opts.wire == Wire::V1
            && self.opts.filters.query_params().map(|p| p.len() + 1).sum::<usize>() > MAX_QUERY_BYTES;
        let mut ws = match transport::connect_with_start_cursor(&url, self.target(&url, hello, dict_id), timeout).await
        {
            Ok((ws, start_cursor)) => {
                self.upgrade_cursor = start_cursor;
                ws
            }
            // 400 is an answer about the request itself (the filters, the cursor): every host
            // would give it. Other statuses (a proxy's 403 or 404, 429, 5xx) are this host's.
            Err(ClientError::Status { status: 400, body, .. }) => {
                // Unless it is the dictionary given to the builder that v2 names in the query:
                // a server that moved to another says `UnknownZstdDictionary`, fetch mine. (The
                // body is not trusted to name it: a 400 for anything else comes again, with the
                // server's own dictionary, and is then refused.)
                if using_given && self.opts.wire == Wire::V2 {
                    self.given_dictionary_refused = true;
                    tracing::warn!(%url, dictionary = ?dict_id, "the server refused the zstd dictionary given to the builder (not the one it uses now?): fetching its own");
                    return ConnectionError::GivenDictionaryRefused;
                }
                // On v1, the dictionary named without being asked to, when the 400 says so (a
                // Contrail's does: "unknown zstdDictionary …"; any other 400 is a refusal, the
                // given dictionary kept): not named again, and one given to the builder, which
                // the server lacks, no longer used (the server's own is fetched).
                if dict_id.is_some() && self.opts.wire == Wire::V1 && body.contains("zstdDictionary") {
                    self.v1_pin_refused = true;
                    self.given_dictionary_refused |= using_given;
                    tracing::warn!(%url, dictionary = ?dict_id, "the server refused the zstd dictionary named in the query: going on with its default");
                    return ConnectionError::GivenDictionaryRefused;
                }
                let reason = if body.is_empty() {
                    "HTTP 400 at the upgrade".into()
                } else {
                    format!("HTTP 400 at the upgrade: {body}")
                };
                return ConnectionError::Refused(reason);
            }
            Err(e) => return e.into(),
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.connected_at = Some(tokio::time::Instant::now());
        self.moved_at = tokio::time::Instant::now();
        (self.resumed_at, self.warned_replay) = (self.resume_cursor(), false);
        tracing::info!(%url, cursor = ?self.resume_cursor(), "connected");
        ws.set_max_message_size(MAX_EVENT_BYTES);
        let (read, write_half) = ws.split(tokio::io::split);
        let writer = Arc::new(tokio::sync::Mutex::new(write_half));
        if hello {
            if let Err(e) = send_text(&writer, self.opts.filters.options_update()).await {
                return e;
            }
        }
        // The reader runs on its own so that this loop can wait on frames, commands and the
        // ping timer at once without abandoning a half-read frame.
        let (frames_tx, mut frames) = mpsc::channel::<Result<(OpCode, Vec<u8>), ReadFailure>>(READ_AHEAD_FRAMES);
        let reader = tokio::spawn(read_frames(read, writer.clone(), frames_tx));
        let _reader = AbortOnDrop(reader);
        let stale = self.opts.stale_timeout;
        let mut ping = tokio::time::interval(stale / 3);
        // Pings missed while a slow consumer held this loop are not sent all at once (a burst
        // past the server's ping rate closes the connection).
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        // Stale: nothing heard for `stale` while waiting on the server (pings sent and commands
        // taken meanwhile do not move it; time spent handing a message to a slow consumer
        // does not count against the server).
        let mut stale_at = tokio::time::Instant::now() + stale;
        let mut undecompressable: u32 = 0;
        loop {
            let frame = tokio::select! {
                // New filters first: they apply before more buffered frames.
                biased;
                changed = self.new_filters.changed() => {
                    // The subscription is gone.
                    if changed.is_err() {
                        return ConnectionError::Dropped;
                    }
                    let Some(f) = self.new_filters.borrow_and_update().clone() else { continue };
                    self.opts.filters = f;
                    self.refused.clear();
                    if self.opts.wire == Wire::V2 {
                        // No client messages on v2: reconnect from here with them.
                        return ConnectionError::FiltersChanged;
                    }
                    if let Err(e) = send_text(&writer, self.opts.filters.options_update()).await {
                        return e;
                    }
                    continue;
                }
                _ = ping.tick() => {
                    if let Some(stalled) = self.stalled() {
                        return stalled;
                    }
                    if let Err(e) = write(&writer, Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"contrail-client"))).await {
                        return e;
                    }
                    continue;
                }
                f = tokio::time::timeout_at(stale_at, frames.recv()) => f,
            };
            let (opcode, payload) = match frame {
                Err(_) => return ConnectionError::Stale(stale),
                Ok(None) => return ConnectionError::Read("the connection ended".into()),
                Ok(Some(Err(ReadFailure::Unreadable(what)))) => return ConnectionError::Unreadable(what),
                Ok(Some(Err(ReadFailure::Other(e)))) => return ConnectionError::Read(e),
                Ok(Some(Ok(f))) => f,
            };
            // A pong or a ping from a server that sends cursor messages says only that its
            // socket is served, not that its stream for us goes on.
            if !(self.informs && matches!(opcode, OpCode::Pong | OpCode::Ping)) {
                stale_at = tokio::time::Instant::now() + stale;
                self.last_heard = Some(tokio::time::Instant::now());
            }
            let text = match (opcode, decompressor.as_mut()) {
                // (Only a fragmented one gets here: fastwebsockets fails a whole frame's read.
                // Alike, it ends the connection, as RFC 6455 says.)
                (OpCode::Text, _) => match String::from_utf8(payload) {
                    Ok(t) => t,
                    Err(_) => return ConnectionError::Unreadable("a text message that is not UTF-8".into()),
                },
                (OpCode::Binary, Some(d)) => match d.decompress(&payload, MAX_EVENT_BYTES) {
                    Ok(mut bytes) => {
                        undecompressable = 0;
                        // A frame that does not record its size (a streaming compressor's) is
                        // decompressed into the largest buffer a message may need, 16 MiB:
                        // kept as the event's, each buffered event would hold that much.
                        if bytes.capacity() > bytes.len() * 2 + 4096 {
                            bytes.shrink_to_fit();
                        }
                        match String::from_utf8(bytes) {
                            Ok(t) => t,
                            Err(_) => {
                                self.malformed("a compressed message that is not UTF-8");
                                continue;
                            }
                        }
                    }
                    Err(e) => {
                        self.malformed(&format!("a binary message that does not decompress: {e}"));
                        undecompressable += 1;
                        if undecompressable >= UNDECOMPRESSABLE_IN_A_ROW {
                            return ConnectionError::Unreadable(format!(
                                "{undecompressable} binary messages in a row that do not decompress with the dictionary (the wrong one?): {e}"
                            ));
                        }
                        continue;
                    }
                },
                (OpCode::Binary, None) => {
                    self.malformed("a binary message on an uncompressed subscription");
                    continue;
                }
                (OpCode::Close, _) => return closed(&payload),
                // Pongs and pings: the connection is alive.
                _ => continue,
            };
            if let Err(e) = self.deliver(text).await {
                return e;
            }
            stale_at = tokio::time::Instant::now() + stale;
        }
    }

    /// With other hosts to go to, a server whose cursor messages have not moved the position
    /// on for the stall timeout ([`Builder::stall_timeout`]). (Looked at on every ping tick,
    /// a third of the stale timeout.)
    /// (Not within a rewind onto another host, where cursor messages count only once they are a
    /// rewind past the position: a quiet filter's would look stuck for that long.)
    fn stalled(&self) -> Option<ConnectionError> {
        let stuck = self.moved_at.elapsed();
        let same_timeline =
            self.opts.failover == Failover::ExactCursor || self.origin == Some(Origin::Host(self.current));
        (self.urls.len() > 1 && self.informs && same_timeline && stuck >= self.stall_timeout())
            .then(|| ConnectionError::Stalled(stuck))
    }

    /// The stall timeout, doubled for each round of hosts all left for a stall since the
    /// position last moved (up to [`STALL_ROUNDS_DOUBLED`] times): when every host is stuck
    /// (the relay behind them all is down), the subscription still tries the others, less
    /// and less often, rather than moving every stall timeout for as long as it lasts.
    fn stall_timeout(&self) -> Duration {
        let rounds = (self.stalls / self.urls.len().max(1) as u32).min(STALL_ROUNDS_DOUBLED);
        self.opts.stall_timeout.saturating_mul(1 << rounds)
    }

    fn malformed(&self, what: &str) {
        let n = self.stats.malformed.fetch_add(1, Ordering::Relaxed);
        // The first few, then one in a thousand: a misbehaving server does not flood the log.
        if n < 5 || n.is_multiple_of(1000) {
            tracing::warn!(url = %self.urls[self.current], total = n + 1, "skipped {what}");
        }
    }

    async fn deliver(&mut self, text: String) -> Result<(), ConnectionError> {
        let here = Origin::Host(self.current);
        let same_timeline = self.origin == Some(here) || self.opts.failover == Failover::ExactCursor;
        let rewind_us = match self.opts.failover {
            Failover::Rewind(d) => d.as_micros() as u64,
            Failover::ExactCursor => 0,
        };
        let v1_text = match self.opts.wire {
            Wire::V1 => text,
            Wire::V2 => match Event::from_v2_json(text) {
                Ok(V2Message::Event(e)) => return self.deliver_event(e, same_timeline).await,
                Ok(V2Message::Info { name, message }) => {
                    tracing::info!(url = %self.urls[self.current], %name, %message, "the server says");
                    return Ok(());
                }
                Ok(V2Message::Gap { after, through, .. }) => {
                    return match self.told_gap(after, through, same_timeline, rewind_us)? {
                        Some(gap) => self.send(gap).await,
                        None => Ok(()),
                    };
                }
                Ok(V2Message::Error { error, message }) => {
                    return Err(ConnectionError::Closed { code: 1011, reason: format!("{error}: {message}") });
                }
                Err(e) => {
                    self.malformed(&format!("a message that is not a v2 event ({e})"));
                    return Ok(());
                }
            },
        };
        let message = match control_message(&v1_text) {
            Some(Control::Cursor(cursor)) => {
                self.informs = self.messages_are_heartbeat();
                check_not_future(cursor)?;
                if cursor == 0 {
                    // A server with an empty log: no position (a store saving 0 would read it
                    // back as "no cursor", and start live).
                    return Ok(());
                }
                // A position in this host's timeline. After a rewind onto another host it is
                // comparable only once it is a whole rewind past the last position (the hosts'
                // clocks differ by less), or once an event from this host has arrived.
                let comparable = same_timeline || self.last.is_none_or(|l| cursor >= l.saturating_add(rewind_us));
                if !comparable || self.last.is_some_and(|l| cursor <= l) {
                    return Ok(());
                }
                Message::Cursor(cursor)
            }
            Some(Control::Gap { after, through }) => match self.told_gap(after, through, same_timeline, rewind_us)? {
                Some(gap) => gap,
                None => return Ok(()),
            },
            None => {
                let event = match Event::from_json(v1_text) {
                    Ok(e) => e,
                    Err(e) => {
                        self.malformed(&format!("a message that is not an event ({e})"));
                        return Ok(());
                    }
                };
                return self.deliver_event(event, same_timeline).await;
            }
        };
        self.send(message).await
    }

    /// The server told of events after `after` through `through` it no longer held (v1's gap
    /// message, v2's `#info OutdatedCursor` with its range): the gap to hand over, if any;
    /// [`ConnectionError::Lacks`] to try another host that may still have them.
    fn told_gap(
        &mut self,
        after: u64,
        through: u64,
        same_timeline: bool,
        rewind_us: u64,
    ) -> Result<Option<Message>, ConnectionError> {
        check_not_future(through)?;
        // Its far edge is a position, taken as a cursor message's is; a gap entirely
        // before the last position lost nothing this subscription had not passed.
        let comparable = same_timeline || self.last.is_none_or(|l| through >= l.saturating_add(rewind_us));
        if comparable && self.last.is_some_and(|l| through <= l) {
            return Ok(None);
        }
        if comparable {
            if let Some(next) = self.host_for_gap(through) {
                return Err(ConnectionError::Lacks { after, through, next });
            }
        }
        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            url = %self.urls[self.current],
            after_us = after,
            through_us = through,
            "the server no longer held the events in this range when this subscription came to them; going on after them"
        );
        if !comparable {
            // Within a rewind onto another host: events of this range may be ones
            // already delivered, or lost. Said and counted; not a position.
            return Ok(None);
        }
        let after = self.last.map_or(after, |l| after.max(l));
        Ok(Some(Message::Gap { after_us: after, through_us: through }))
    }

    /// This host told a gap after the position, up to `through`: the host to try for those
    /// events instead, if any. Each other host of the list is tried once (one out of reach
    /// counts as lacking them once it has been for a stale timeout); when every host has told
    /// a gap, the one that told the smallest serves the rest, and its gap is handed over.
    fn host_for_gap(&mut self, through: u64) -> Option<usize> {
        let (n, here) = (self.urls.len(), self.current);
        if n < 2 {
            return None;
        }
        let search = match &mut self.lacking {
            Some(l) if l.after == self.last && l.told.len() == n => l,
            other => other.insert(Lacking {
                after: self.last,
                told: vec![None; n],
                since: tokio::time::Instant::now(),
                returns: 0,
            }),
        };
        search.told[here] = Some(through);
        let next = search.next(here);
        if next == here || (search.told[next].is_some() && search.returns >= n as u32) {
            return None;
        }
        if search.told[next].is_some() {
            search.returns += 1;
        }
        Some(next)
    }

    /// Checks an event against the position (future, duplicate, backwards) and hands it over.
    async fn deliver_event(&mut self, event: Event, same_timeline: bool) -> Result<(), ConnectionError> {
        check_not_future(event.time_us())?;
        if event.time_us() == 0 {
            // Not a position: a cursor store would save 0 and a later run ask for `cursor=0`,
            // a replay of everything (a store reads 0 back as "none" only sometimes).
            self.malformed("an event with time_us 0");
            return Ok(());
        }
        // Before this connection delivered anything: an event from before the cursor it asked
        // for is the server replaying from earlier than asked (Jetstream v2 with a timestamp
        // cursor starts up to an hour early, bluesky-social/jetstream#343): a reconnect would
        // meet the same replay, for ever. Skipped, up to two hours back; older is time going
        // backwards (below).
        if let Some(c) = self.resumed_at {
            let t = event.time_us();
            if t < c && t.saturating_add(REPLAY_BEFORE_CURSOR.as_micros() as u64) >= c {
                self.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut self.warned_replay, true) {
                    tracing::warn!(
                        url = %self.urls[self.current],
                        cursor = c,
                        first = t,
                        "the server sends events from before the cursor (a replay from earlier than asked, or its clock stepped back); skipping them"
                    );
                }
                return Ok(());
            }
        }
        let key = self.dedupe.as_ref().map(|_| event.identity_key());
        if let (Some(d), Some(key)) = (&self.dedupe, key) {
            if d.seen(key) {
                self.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        if same_timeline {
            match self.last {
                // The inclusive cursor's repeat, or a server sending an event again. Another
                // event stamped alike is handed over.
                Some(l)
                    if event.time_us() == l && (!self.at_last_known || self.at_last.contains(&event.sibling_key())) =>
                {
                    self.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // Dropping it would hide a server that went back in time (a restored backup, a
                // replica of another primary); reconnect, fail over, and say so.
                Some(l) if event.time_us() < l => {
                    return Err(ConnectionError::Protocol(format!(
                        "an event at time_us {} after {l}: this host's timeline went backwards",
                        event.time_us()
                    )));
                }
                _ => {}
            }
        }
        if let (Some(d), Some(key)) = (&mut self.dedupe, key) {
            d.remember(key, event.time_us());
        }
        self.send_event(event).await
    }

    /// Hands over an event, remembered among those at its `time_us`.
    async fn send_event(&mut self, event: Event) -> Result<(), ConnectionError> {
        self.move_to(event.time_us());
        if self.at_last.len() < MOST_AT_ONE_TIME {
            self.at_last.push(event.sibling_key());
        } else {
            self.at_last_known = false;
        }
        self.send(Message::Event(event)).await
    }

    /// Moves the position to `t`: a new one has nothing handed over at it yet.
    fn move_to(&mut self, t: u64) {
        if self.last != Some(t) {
            self.last = Some(t);
            self.at_last.clear();
            self.at_last_known = true;
        }
    }

    async fn send(&mut self, message: Message) -> Result<(), ConnectionError> {
        self.origin = Some(Origin::Host(self.current));
        self.move_to(message.time_us());
        self.resumed_at = None;
        // Room in the consumer's buffer first, in bytes (given back when the consumer takes
        // the message); then a place in the channel.
        let share = self.budget.share(&message);
        if share > 0 {
            let room = self.budget.bytes.acquire_many(share).await.map_err(|_| ConnectionError::Dropped)?;
            room.forget();
        }
        self.out.send(Ok(message)).await.map_err(|_| ConnectionError::Dropped)?;
        // (After the wait for the consumer: a slow one does not make the server look stuck.)
        self.moved_at = tokio::time::Instant::now();
        // The position moved: a host that stalls from here is left after the stall timeout
        // itself, however many rounds of stuck hosts came before.
        self.stalls = 0;
        Ok(())
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// How far ahead of this machine's clock a `time_us` may be. Generous on purpose: a client
/// whose clock is hours behind must still work; what this catches is a broken server's absurd
/// value, which taken as a position would make every later event look old.
const FUTURE_SLACK_US: u64 = 7 * 24 * 3_600_000_000;

/// The lowest start cursor taken as a position on another host: a `time_us` plus one (10^15
/// µs is 2001); below it, a log's "from the start".
const MIN_POSITION: u64 = 1_000_000_000_000_000;

/// A position no further ahead of this clock than a `time_us` may be.
fn plausible(time_us: u64) -> bool {
    time_us <= now_us().saturating_add(FUTURE_SLACK_US)
}

fn check_not_future(time_us: u64) -> Result<(), ConnectionError> {
    if !plausible(time_us) {
        return Err(ConnectionError::Future(format!("a time_us ({time_us}) more than a week in the future")));
    }
    Ok(())
}

/// A message of Contrail's that is not an event. Control messages are short; events rarely are.
#[derive(Debug, PartialEq, Eq)]
enum Control {
    /// `{"kind":"cursor","time_us":T,…}`
    Cursor(u64),
    /// `{"kind":"gap","after_us":A,"through_us":B}`, with A < B.
    Gap { after: u64, through: u64 },
}

fn control_message(text: &str) -> Option<Control> {
    #[derive(serde::Deserialize)]
    struct Fields<'a> {
        kind: &'a str,
        time_us: Option<u64>,
        after_us: Option<u64>,
        through_us: Option<u64>,
    }
    if text.len() > 128 {
        return None;
    }
    let f = serde_json::from_str::<Fields<'_>>(text).ok()?;
    match (f.kind, f.time_us, f.after_us, f.through_us) {
        ("cursor", Some(t), ..) => Some(Control::Cursor(t)),
        ("gap", _, Some(after), Some(through)) if after < through => Some(Control::Gap { after, through }),
        _ => None,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads frames (pongs answered), puts fragmented messages together with their total capped
/// at [`MAX_EVENT_BYTES`] ([`Reassembler`]), and forwards owned payloads.
/// Why the reader stopped.
enum ReadFailure {
    /// A message this client cannot read, which ends the connection.
    Unreadable(String),
    Other(String),
}

async fn read_frames(
    mut read: fastwebsockets::WebSocketRead<tokio::io::ReadHalf<Upgraded>>,
    writer: Arc<tokio::sync::Mutex<WsWrite>>,
    out: mpsc::Sender<Result<(OpCode, Vec<u8>), ReadFailure>>,
) {
    let mut pieces = Reassembler::new(MAX_EVENT_BYTES);
    loop {
        let mut send = |frame: Frame<'_>| {
            let writer = writer.clone();
            let frame = Frame::new(frame.fin, frame.opcode, None, Payload::Owned(frame.payload.to_vec()));
            async move {
                match tokio::time::timeout(WRITE_TIMEOUT, async { writer.lock().await.write_frame(frame).await }).await
                {
                    Ok(r) => r,
                    Err(_) => Err(fastwebsockets::WebSocketError::ConnectionClosed),
                }
            }
        };
        let item = match read.read_frame(&mut send).await {
            // A message the connection cannot carry on past: the server sends it again after
            // a reconnect at the same position.
            Err(fastwebsockets::WebSocketError::FrameTooLarge) => {
                Err(ReadFailure::Unreadable(format!("a message over {} MiB", MAX_EVENT_BYTES >> 20)))
            }
            Err(fastwebsockets::WebSocketError::InvalidUTF8) => {
                // A text frame, or a close frame's reason (fastwebsockets tells them apart no
                // further).
                Err(ReadFailure::Unreadable("a text message or close reason that is not UTF-8".into()))
            }
            Err(e) => Err(ReadFailure::Other(e.to_string())),
            Ok(f) => match pieces.push(f.opcode, f.fin, &f.payload) {
                Ok(Assembled::Partial) => continue,
                Ok(Assembled::Message(opcode, payload)) => Ok((opcode, payload.to_vec())),
                Err(e @ crate::transport::ReassemblyError::TooBig(_)) => Err(ReadFailure::Unreadable(e.to_string())),
                Err(e) => Err(ReadFailure::Other(e.to_string())),
            },
        };
        let last = item.is_err() || matches!(item, Ok((OpCode::Close, _)));
        if out.send(item).await.is_err() || last {
            return;
        }
    }
}

async fn send_text(writer: &tokio::sync::Mutex<WsWrite>, text: String) -> Result<(), ConnectionError> {
    write(writer, Frame::text(Payload::Owned(text.into_bytes()))).await
}

/// One write, within [`WRITE_TIMEOUT`]: a peer that stops reading must not hang the driver.
async fn write(writer: &tokio::sync::Mutex<WsWrite>, frame: Frame<'_>) -> Result<(), ConnectionError> {
    let write = async { writer.lock().await.write_frame(frame).await };
    match tokio::time::timeout(WRITE_TIMEOUT, write).await {
        Ok(r) => r.map_err(|e| ConnectionError::Write(e.to_string())),
        Err(_) => Err(ConnectionError::Write(format!("not done within {WRITE_TIMEOUT:?}"))),
    }
}

/// A close frame: invalid options or a bad message from us are not worth retrying. Jetstream
/// v1 says so with 1000 and its reason (`failed to parse subscriber options: …`, `failed to
/// unmarshal subscriber …`): read as a normal close, the same hello would be sent for ever.
fn closed(payload: &[u8]) -> ConnectionError {
    let code = if payload.len() >= 2 { u16::from_be_bytes([payload[0], payload[1]]) } else { 1005 };
    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
    let legacy = ["failed to parse subscriber options", "failed to unmarshal subscriber"];
    let ours = code == 1007
        || (code == 1008 && reason.to_ascii_lowercase().contains("invalid"))
        || (code == 1000 && legacy.iter().any(|l| reason.starts_with(l)));
    if ours {
        return ConnectionError::Refused(format!("closed with {code}: {reason}"));
    }
    ConnectionError::Closed { code, reason }
}

/// Identities of recently delivered events, kept for twice the rewind (servers' clocks differ
/// by milliseconds, not seconds), so that a rewound replay on another host drops what was
/// delivered. A 64-bit hash per event: two events colliding is a 2⁻⁶⁴ chance per pair.
struct Dedupe {
    keep_us: u64,
    order: VecDeque<(u64, u64)>,
    keys: HashSet<u64>,
}

impl Dedupe {
    fn new(rewind: Duration) -> Dedupe {
        Dedupe { keep_us: 2 * rewind.as_micros() as u64 + 1_000_000, order: VecDeque::new(), keys: HashSet::new() }
    }

    /// Whether an event of identity `key` ([`Event::identity_key`]) was handed over.
    fn seen(&self, key: u64) -> bool {
        self.keys.contains(&key)
    }

    fn remember(&mut self, key: u64, time_us: u64) {
        if self.keys.insert(key) {
            self.order.push_back((time_us, key));
        }
        let horizon = time_us.saturating_sub(self.keep_us);
        // Kept: what is within the window of this event, on either side. An event further
        // ahead of it than another host's rewind can be (one a server's clock stepped forward
        // stamped) goes too: kept at the front, it would hold every later one for as long.
        let ahead = time_us.saturating_add(self.keep_us);
        while let Some(&(t, k)) = self.order.front() {
            if (horizon..=ahead).contains(&t) {
                break;
            }
            self.keys.remove(&k);
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_search_for_the_events_after_a_gap_tries_every_host_then_the_smallest_gap() {
        let search =
            |told: Vec<Option<u64>>| Lacking { after: Some(1), told, since: tokio::time::Instant::now(), returns: 0 };
        // Hosts not tried yet come first, in list order after this one.
        assert_eq!(search(vec![Some(9), None, None]).next(0), 1);
        assert_eq!(search(vec![None, Some(9), None]).next(1), 2);
        assert_eq!(search(vec![None, None, Some(9)]).next(2), 0);
        // One out of reach, not yet for the patience: tried again.
        assert_eq!(search(vec![Some(9), None]).next(1), 1);
        // Every host said: the smallest gap, this host on a tie, never one out of reach.
        assert_eq!(search(vec![Some(9), Some(5), Some(7)]).next(0), 1);
        assert_eq!(search(vec![Some(5), Some(5)]).next(1), 1);
        assert_eq!(search(vec![Some(9), Some(UNREACHED)]).next(1), 0);
    }

    /// One event stamped a day ahead (a server's clock that stepped forward) does not hold the
    /// de-duplication window open behind it: what is remembered stays within the window.
    #[test]
    fn one_event_far_ahead_does_not_keep_every_later_one() {
        let event = |time_us: u64, n: u64| {
            let line = format!(
                r#"{{"did":"did:plc:a","time_us":{time_us},"kind":"commit","commit":{{"rev":"r{n}","operation":"create","collection":"app.bsky.feed.like","rkey":"k{n}","record":{{}}}}}}"#
            );
            Event::from_json(line).unwrap()
        };
        let mut d = Dedupe::new(Duration::from_secs(1)); // keeps 3 s
        let t0 = 1_800_000_000_000_000u64;
        let mut remember = |e: Event| d.remember(e.identity_key(), e.time_us());
        remember(event(t0 + 86_400_000_000, 0));
        for n in 1..=10_000u64 {
            remember(event(t0 + n * 1_000, n)); // 1,000 a second: 10 s in all
        }
        assert!(d.keys.len() <= 3_001 && d.order.len() == d.keys.len(), "{} kept", d.keys.len());
        let seen = |e: Event| d.seen(e.identity_key());
        assert!(seen(event(t0 + 10_000_000, 10_000)) && !seen(event(t0 + 1_000, 1)));
    }

    /// URLs may hold an access token in their query: the builder's `Debug` and the errors about
    /// a URL show them without it.
    #[test]
    fn a_urls_query_is_not_shown_in_debug_or_errors() {
        let b = Builder::new(["ws://h/?token=secret&compress=true"]).failover(Failover::Rewind(Duration::MAX));
        assert!(!format!("{b:?}").contains("secret"), "{b:?}");
        assert_eq!(b.failover, Failover::Rewind(LONGEST_TIMEOUT), "a rewind of Duration::MAX is a century");
        let e = b.start().err().expect("compress in the URL is refused").to_string();
        assert!(e.contains("sets compress") && !e.contains("secret"), "{e}");
        let b = Builder::new(["ws://h/?token=secret&wantedDids=did:plc:a"]);
        let sub = tokio::runtime::Runtime::new().unwrap().block_on(async { b.start().unwrap() });
        let e = sub.set_filters(Filters::default()).unwrap_err().to_string();
        assert!(e.contains("carries wantedDids") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn control_messages_are_told_from_events() {
        assert_eq!(control_message(r#"{"kind":"cursor","time_us":5,"live":true}"#), Some(Control::Cursor(5)));
        let gap = r#"{"kind":"gap","after_us":5,"through_us":9}"#;
        assert_eq!(control_message(gap), Some(Control::Gap { after: 5, through: 9 }));
        for not_one in [
            r#"{"kind":"gap","after_us":9,"through_us":9}"#,
            r#"{"kind":"gap","after_us":5}"#,
            r#"{"kind":"cursor","after_us":5,"through_us":9}"#,
            r#"{"did":"did:plc:a","time_us":5,"kind":"identity","identity":{"did":"did:plc:a","seq":1}}"#,
        ] {
            assert_eq!(control_message(not_one), None, "{not_one}");
        }
    }
}
