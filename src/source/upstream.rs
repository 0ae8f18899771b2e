//! Replica mode: follow an upstream Contrail's `/subscribe` instead of a relay, keeping the
//! upstream's `time_us` and bytes unchanged, so a cursor means the same event on the primary
//! and on every replica (clients fail over with the same cursor: no rewind, no gap, no
//! duplicate).
//!
//! - Resumes with `cursor` = the newest `time_us` in its own log; the inclusive cursor's
//!   repeat of that event is skipped. An empty log starts a `--retention` before the upstream's
//!   newest event (the whole upstream window when that is not known); an upstream that starts
//!   later than that is left for another that starts earlier, if one does.
//! - Every event must have a larger `time_us` than the one before; anything else is an error
//!   and the connection is reopened from the cursor.
//! - An upstream's gap message (its log no longer held events it came to) past our newest
//!   event is that upstream lacking what follows it, as when the first event after resuming
//!   is not the resumed-from one: another upstream is tried, or the gap is counted and stored
//!   as a hole in the log, which our own subscribers (and followers) are told of as a gap
//!   (`log::holes`).
//! - Asks for cursor messages (`informCursorSeconds`) and uses them as a heartbeat: an
//!   upstream that sends neither events nor cursor messages for the stale timeout is dropped
//!   for the next one in the list. Chains work: an upstream may itself be a replica.
//! - Prefers the freshest upstream: while connected, it asks every upstream's `/status` for
//!   its newest event; when another is ahead of the one in use by more than
//!   `--upstream-switch-lag`, it switches to it. A frozen middle replica still sends cursor
//!   messages, so staleness alone would never move its followers.

use super::backoff::{Backoff, Pauses};
use super::wsclient::{self, ClientError, WsUrl};
use super::Readiness;
use crate::event::{Event, EventKind};
use crate::metrics::{Metrics, RelayErrorKind};
use crate::sequencer::{IngestFrame, IngestSender};
use crate::transcode::DropReason;
use crate::units::{parse_duration, ser_duration};
use fastwebsockets::OpCode;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Largest event JSON accepted from an upstream once decompressed.
const MAX_EVENT_JSON: usize = 16 << 20;

/// Replica-mode settings (`contrail serve` flags; see `config/contrail.example.toml`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct ReplicaConfig {
    /// Replica mode: follow these upstream Contrails' /subscribe (in order, failing over)
    /// instead of a relay, keeping their time_us. Repeat the flag, or comma-separate.
    #[arg(long = "upstream-url", env = "CONTRAIL_UPSTREAM_URL", value_delimiter = ',', value_parser = parse_upstream_url)]
    pub upstream_url: Vec<WsUrl>,
    /// Replica mode: switch to the next upstream after this long with no event and no
    /// cursor message.
    #[arg(long, env = "CONTRAIL_UPSTREAM_STALE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub upstream_stale_timeout: Duration,
    /// Replica mode: how long an upstream that has our newest event but cannot be reached (it
    /// may be restarting), or sends nothing after it, holds up going on from one that no longer
    /// has it (a hole in our log, for ever). Never less than the stale timeout.
    #[arg(long, env = "CONTRAIL_UPSTREAM_HOLE_PATIENCE", default_value = "10m", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub upstream_hole_patience: Duration,
    /// Replica mode: subscribe compressed, with the dictionary the upstream serves.
    #[arg(long, env = "CONTRAIL_UPSTREAM_COMPRESS", default_value = "true", action = clap::ArgAction::Set)]
    pub upstream_compress: bool,
    /// Replica mode: switch to another upstream whose newest event is ahead of the one in use
    /// by more than this (checked every stale-timeout/3).
    #[arg(long, env = "CONTRAIL_UPSTREAM_SWITCH_LAG", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub upstream_switch_lag: Duration,
}

/// An upstream is a Contrail: a base URL gets `/subscribe`.
pub fn parse_upstream_url(url: &str) -> anyhow::Result<WsUrl> {
    Ok(WsUrl::parse_with_path(url, "/subscribe")?)
}

impl ReplicaConfig {
    /// How often the upstream is asked to send cursor messages (`informCursorSeconds`): a third
    /// of the stale timeout, whole seconds, 1 to 600.
    pub fn cursor_interval(&self) -> Duration {
        Duration::from_secs((self.upstream_stale_timeout.as_secs() / 3).clamp(1, 600))
    }

    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.upstream_switch_lag < Duration::from_secs(1) {
            // Another upstream is nearly always a little ahead of the one just read: below a
            // second the replica would switch at every probe.
            return Err(("upstream-switch-lag", "must be at least 1s".into()));
        }
        if self.upstream_stale_timeout < Duration::from_secs(3) {
            return Err((
                "upstream-stale-timeout",
                "must be at least 3s (cursor messages come every stale-timeout/3)".into(),
            ));
        }
        Ok(())
    }
}

/// How the reader connects and backs off (the relay group's timing applies to upstreams too).
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub replica: ReplicaConfig,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// A live-only node (`--store memory`) with an empty window starts at the upstream's live
    /// edge instead of replaying its whole history.
    pub live_when_empty: bool,
    /// `--retention`: an empty log starts this far before the upstream's newest event, not at
    /// its oldest (what its own retention would delete at once is not copied).
    pub retention: Duration,
}

/// Why an upstream session ended.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Connect(#[from] ClientError),
    #[error("the upstream's dictionary: {0}")]
    Dictionary(String),
    #[error("the upstream's dictionary: {0}")]
    DictionaryFetch(ClientError),
    #[error("stale: no event or cursor message for {0:?}")]
    Stale(Duration),
    #[error("reading: {0}")]
    Read(fastwebsockets::WebSocketError),
    #[error("the upstream closed the connection")]
    Closed,
    #[error("the upstream sent {0}")]
    Protocol(String),
    #[error("the sequencer stopped")]
    SequencerStopped,
    #[error("upstream {better} is ahead of this one by {ahead:?}")]
    Behind { better: usize, ahead: Duration },
    #[error("upstream {better}, listed before this one, answers again and is not behind it")]
    Preferred { better: usize },
    #[error("an upstream whose log no longer has our newest event ({cursor}): it starts at {first}")]
    Trimmed { cursor: u64, first: u64 },
    #[error("upstream {better} keeps more of our retention window (this one starts at {first})")]
    LongerWindow { better: usize, first: u64 },
}

impl UpstreamError {
    /// The `contrail_relay_errors_total` label (a replica's upstream stands in for the relay),
    /// for the ends that are failures: not a switch to a better upstream, nor one that lacks our
    /// position, nor an upstream's clean close.
    fn label(&self) -> Option<RelayErrorKind> {
        match self {
            UpstreamError::Connect(_) | UpstreamError::Dictionary(_) | UpstreamError::DictionaryFetch(_) => {
                Some(RelayErrorKind::Connect)
            }
            UpstreamError::Read(_) => Some(RelayErrorKind::Read),
            UpstreamError::Stale(_) => Some(RelayErrorKind::IdleTimeout),
            UpstreamError::Protocol(_) => Some(RelayErrorKind::Other),
            UpstreamError::Closed
            | UpstreamError::SequencerStopped
            | UpstreamError::Behind { .. }
            | UpstreamError::Preferred { .. }
            | UpstreamError::LongerWindow { .. }
            | UpstreamError::Trimmed { .. } => None,
        }
    }
}

impl UpstreamError {
    /// How long the upstream asked to be left alone (a refusal's `Retry-After`), if it did.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Connect(e) | UpstreamError::DictionaryFetch(e) => e.retry_after(),
            _ => None,
        }
    }
}

fn protocol(what: impl Into<String>) -> UpstreamError {
    UpstreamError::Protocol(what.into())
}

/// The fields a replica needs from an event line (owned: the line itself moves on into the
/// log).
struct Meta {
    kind: String,
    time_us: u64,
    /// A cursor message's: whether the upstream's stream for us is live (caught up with its
    /// log) or still reading it. Absent from Contrails before it.
    live: Option<bool>,
    /// A commit's collection.
    collection: Option<String>,
}

impl Meta {
    /// Reads a line, checking all of it, as a subscriber's JSON parser will: every string
    /// valid (UTF-8, escapes, no lone surrogate), numbers, and nesting (at most
    /// [`MAX_LINE_DEPTH`]). serde_json walks it without building anything ([`Checked`]), then
    /// reads the fields wanted. A line of up to 16 MiB costs
    /// about its own size; simd-json's tape cost ~20× it (BENCHMARKS.md, thirty-second
    /// session).
    fn read(line: &[u8]) -> Result<Meta, String> {
        Checked::line(line).map_err(|e| e.to_string())?;
        let m: MetaFields<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        Ok(Meta {
            kind: m.kind.to_string(),
            time_us: m.time_us,
            live: m.live,
            collection: m.commit.and_then(|c| c.collection).map(str::to_string),
        })
    }
}

/// How deeply an upstream line may nest. A primary's events reach 127 levels (a record of 125
/// at the event's third), serde_json's own limit; older versions stored events of 128 (a link
/// or a blob's reference in a record's deepest container) and deeper records before the limit
/// was made. 256 leaves room for them, while the walk's stack stays well within a runtime
/// thread's 2 MiB (a level costs 1–2 KB in a debug build). (simd-json's parse allowed 1,024.)
const MAX_LINE_DEPTH: u32 = 256;

/// Any JSON value, walked and checked throughout without being kept: unlike what serde_json
/// skips (`IgnoredAny`), its strings are decoded (so a lone surrogate escape, or bytes that
/// are not UTF-8, fail), and its nesting is counted (`depth`, up to [`MAX_LINE_DEPTH`]).
#[derive(Clone, Copy)]
struct Checked {
    depth: u32,
}

impl Checked {
    /// Reads `line` through, as a subscriber's JSON parser will.
    fn line(line: &[u8]) -> Result<(), serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(line);
        // Counted here instead, deeper than serde_json's limit.
        de.disable_recursion_limit();
        serde::de::DeserializeSeed::deserialize(Checked { depth: 0 }, &mut de)?;
        de.end()
    }

    fn inner<E: serde::de::Error>(self) -> Result<Checked, E> {
        if self.depth >= MAX_LINE_DEPTH {
            return Err(E::custom(format!("nested more than {MAX_LINE_DEPTH} levels deep")));
        }
        Ok(Checked { depth: self.depth + 1 })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Checked {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Checked {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.inner()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // (Keys are strings: decoded as any string is.)
        let inner = self.inner()?;
        while map.next_entry_seed(inner, inner)?.is_some() {}
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct MetaFields<'a> {
    kind: &'a str,
    time_us: u64,
    #[serde(default)]
    live: Option<bool>,
    #[serde(borrow)]
    commit: Option<CommitMeta<'a>>,
}

/// A gap message: the upstream's log no longer held the events after `after_us` through
/// `through_us` when its stream for us came to them.
#[derive(serde::Deserialize)]
struct GapMeta<'a> {
    kind: &'a str,
    through_us: u64,
}

#[derive(serde::Deserialize)]
struct CommitMeta<'a> {
    collection: Option<&'a str>,
}

/// What an upstream has shown about resuming from the replica's newest event.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Resume {
    /// Not asked yet.
    Unknown,
    /// It sent that event again: it may have what follows.
    HasIt,
    /// Its log no longer has that event (trimmed, or a live-only window): a hole, if used.
    Trimmed,
    /// It could not be reached, or sent nothing after that event, every time since then.
    Unreachable(std::time::Instant),
}

pub struct UpstreamReader {
    opts: UpstreamOptions,
    metrics: Arc<Metrics>,
    tx: IngestSender,
    last_time_us: u64,
    current: usize,
    /// This connection resumed from `last_time_us`, whose event the upstream sends first if
    /// its log still has it.
    expect_repeat: bool,
    /// The last line moved the stream on for `/ready` (an event stored, or a cursor message
    /// past the last one: an upstream whose own source stopped still sends cursor messages).
    moved_on: bool,
    /// The newest position a cursor message showed.
    last_cursor_us: u64,
    /// When the last event was stored (the lag is reset by cursor messages only once events have
    /// stopped coming: during a catch-up the cursor messages follow the events sent).
    last_event_at: std::time::Instant,
    /// The newest `time_us` of an event dropped and counted: an upstream sends the same bad
    /// events again after a reconnect (they never moved our position), counted once.
    dropped_through: u64,
    /// An event more than a day ahead of both our clock and our newest event, held until the
    /// next one says whether the stream really is there (see [`MAX_AHEAD_US`]): its `time_us`
    /// and line.
    held_ahead: Option<(u64, Vec<u8>)>,
    /// The `time_us` of the last held event dropped, counted once.
    dropped_ahead: u64,
    /// What each upstream (by its place in the list) has shown about resuming from
    /// `last_time_us` (forgotten once an event moves it): a hole is accepted only when none
    /// can fill it.
    resume: Vec<Resume>,
    /// A hole accepted on this connection, counted once its first event is passed on.
    gap: Option<(u64, u64)>,
    /// With nothing stored yet, the cursor this connection asked for (the start of our
    /// retention window on its clock), if it asked for one.
    empty_from: Option<u64>,
    /// With nothing stored yet, where each upstream that told us so starts, and how many
    /// times we went to another for a longer window ([`Self::longer_window`]).
    window_starts: Vec<Option<u64>>,
    window_moves: usize,
    /// Bad events from an upstream, logged at a bounded rate.
    log: crate::rate_limited_log::RateLimitedLog,
    /// Whether an upstream has been reached, and the last error (for `/ready`).
    pub readiness: Arc<Readiness>,
    /// The upstream in use, for `/status`.
    pub current_url: Arc<std::sync::Mutex<String>>,
    /// `last_time_us`, for the prober: it goes back to a preferred upstream only once caught up.
    position: Arc<std::sync::atomic::AtomicU64>,
    /// Per upstream, when it may be switched to again as preferred, and as fresher: the last
    /// time we switched to it so, it gave nothing (it answers `/status` but refuses
    /// subscribers, a proxy lets `/status` through and not the upgrade). Each holds back only
    /// its own kind of switch: one that gave nothing as preferred is still switched to when the
    /// one in use falls behind. Not for one whose window does not reach our position: see
    /// [`Resume`], whose hole patience such switches run down.
    switch_again_at: Vec<SwitchAgainAt>,
    /// Upstreams that refused us with a Retry-After: not asked again sooner (nor switched to by
    /// the prober); the others are used meanwhile.
    pauses: Pauses,
}

/// A session that ends sooner than this is followed by a backoff wait, events or not.
const BRIEF_SESSION: Duration = Duration::from_secs(1);

/// When an upstream may be switched to again, by kind of switch ([`UpstreamReader::switch_again_at`]).
#[derive(Debug, Clone, Copy, Default)]
struct SwitchAgainAt {
    preferred: Option<tokio::time::Instant>,
    fresher: Option<tokio::time::Instant>,
}

impl SwitchAgainAt {
    fn waiting(at: Option<tokio::time::Instant>) -> bool {
        at.is_some_and(|at| tokio::time::Instant::now() < at)
    }
}

/// How long a preferred upstream that gave nothing when we went back to it is not gone back to.
const PREFER_AGAIN_AFTER: Duration = Duration::from_secs(600);
/// How long a fresher upstream that gave nothing when we switched to it is not switched to
/// again: the one in use is behind, so it is tried again sooner than a preferred one.
const FRESHER_AGAIN_AFTER: Duration = Duration::from_secs(60);

impl UpstreamReader {
    /// `opts.replica.upstream_url` must not be empty.
    pub fn new(opts: UpstreamOptions, last_time_us: u64, metrics: Arc<Metrics>, tx: IngestSender) -> Self {
        assert!(!opts.replica.upstream_url.is_empty(), "replica mode needs an upstream URL");
        let first = opts.replica.upstream_url[0].to_string();
        let resume = vec![Resume::Unknown; opts.replica.upstream_url.len()];
        let upstreams = resume.len();
        let pauses = Pauses::new(opts.backoff_max);
        UpstreamReader {
            opts,
            metrics,
            tx,
            last_time_us,
            current: 0,
            expect_repeat: false,
            moved_on: false,
            last_cursor_us: 0,
            dropped_through: 0,
            held_ahead: None,
            dropped_ahead: 0,
            last_event_at: std::time::Instant::now(),
            resume,
            gap: None,
            empty_from: None,
            window_starts: vec![None; upstreams],
            window_moves: 0,
            log: crate::rate_limited_log::RateLimitedLog::new(Duration::from_secs(10)),
            readiness: Arc::default(),
            current_url: Arc::new(std::sync::Mutex::new(first)),
            position: Arc::new(last_time_us.into()),
            switch_again_at: vec![SwitchAgainAt::default(); upstreams],
            pauses,
        }
    }

    /// Goes on with upstream `i` (counted, and shown on `/status`).
    fn switch_to(&mut self, i: usize) {
        self.current = i;
        self.metrics.upstream_switches.inc();
        let now = self.urls()[i].to_string();
        *self.current_url.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }

    fn urls(&self) -> &[WsUrl] {
        &self.opts.replica.upstream_url
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.opts.backoff_min, self.opts.backoff_max);
        let mut failures_in_a_row = 0usize;
        // The upstream just switched to, and whether because it is preferred (else fresher).
        let mut switched: Option<(usize, bool)> = None;
        let mut first = true;
        loop {
            // Counted as the relay reader counts its own: dashboards and alerts read them alike.
            if !std::mem::take(&mut first) {
                self.metrics.relay_reconnects.inc();
            }
            // One that asked to be left alone is not asked before its time: another is, if one
            // may be.
            let (next, pause) = self.pauses.pick(self.current, self.urls().len());
            if next != self.current {
                self.switch_to(next);
                tracing::info!(upstream = %self.urls()[self.current], "switching upstream: the last one asked to be left alone a while");
            }
            if !pause.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let before = self.last_time_us;
            let began = tokio::time::Instant::now();
            let ended = tokio::select! {
                _ = cancel.cancelled() => {
                    // Stopped (shutdown, or the store failed): not connected, whatever happens next.
                    self.metrics.relay_connected.set(0);
                    return;
                }
                e = self.session() => e,
            };
            self.metrics.relay_connected.set(0);
            if self.tx.is_closed() || matches!(ended, UpstreamError::SequencerStopped) {
                return;
            }
            if let Some(kind) = ended.label() {
                self.metrics.relay_error(kind);
            }
            self.pauses.asked(self.current, ended.retry_after());
            // (Not when it lacks our position: switching back and forth then is how the hole
            // patience runs out, after which its oldest event is gone on from.)
            let gave_nothing = self.last_time_us == before && !matches!(ended, UpstreamError::Trimmed { .. });
            if let Some((i, preferred)) = switched.take().filter(|_| gave_nothing) {
                let again = &mut self.switch_again_at[i];
                if preferred {
                    again.preferred = Some(tokio::time::Instant::now() + PREFER_AGAIN_AFTER);
                } else {
                    again.fresher = Some(tokio::time::Instant::now() + FRESHER_AGAIN_AFTER);
                }
            }
            if self.last_time_us != before {
                failures_in_a_row = 0;
                backoff.reset();
            } else if !matches!(ended, UpstreamError::Trimmed { .. }) {
                // Nothing after our newest event from it: unreachable, or (having it) stale or
                // behind another. Either way it holds up accepting a hole only for a while.
                let state = self.resume_state();
                if let Resume::Unknown | Resume::HasIt = *state {
                    *state = Resume::Unreachable(std::time::Instant::now());
                }
            }
            failures_in_a_row += 1;
            self.readiness.set_error(format!("{}: {ended}", self.urls()[self.current]));
            tracing::warn!(upstream = %self.urls()[self.current], error = %ended, "upstream connection ended");
            if let UpstreamError::Behind { better, .. }
            | UpstreamError::Preferred { better }
            | UpstreamError::LongerWindow { better, .. } = ended
            {
                // Not a failure: go straight to the fresher, preferred or longer upstream. (A
                // move for a longer window keeps the count: one that then fails is not moved
                // to again and again without a wait.)
                switched = match ended {
                    UpstreamError::Preferred { .. } => Some((better, true)),
                    UpstreamError::Behind { .. } => Some((better, false)),
                    _ => None,
                };
                if !matches!(ended, UpstreamError::LongerWindow { .. }) {
                    failures_in_a_row = 0;
                }
                self.switch_to(better);
                tracing::info!(upstream = %self.urls()[self.current], "switching to a fresher, preferred or longer upstream");
                continue;
            }
            if self.urls().len() > 1 {
                // The next one, or the next after it that has not asked to be left alone: not
                // one switched to only to be switched away from (counted twice, and shown on
                // `/status` during the wait below).
                let (next, _) = self.pauses.pick((self.current + 1) % self.urls().len(), self.urls().len());
                if next != self.current {
                    self.switch_to(next);
                    tracing::info!(upstream = %self.urls()[self.current], "switching upstream");
                }
            }
            // Try every upstream once before waiting; then back off. So after a connection
            // that handed over events but ended within a second: upstreams that each do so (a
            // proxy's short connection life), or one while the others are paused, must not be
            // reconnected to in a loop without a pause.
            let brief = self.last_time_us != before && began.elapsed() < BRIEF_SESSION;
            if failures_in_a_row >= self.urls().len() || brief {
                let wait = backoff.next_wait();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// One connection, until it fails.
    async fn session(&mut self) -> UpstreamError {
        let url = self.urls()[self.current].clone();
        let replica = &self.opts.replica;
        let stale = replica.upstream_stale_timeout;
        let inform = self.cursor_interval().as_secs();
        // Every kind, sync included: a replica mirrors the whole log.
        // The primary's verification marks come along (each event's last field, taken off
        // again below: the stored JSON stays the primary's byte for byte).
        let mut params = vec![
            format!("informCursorSeconds={inform}"),
            "includeSync=true".to_string(),
            "includeVerification=true".to_string(),
        ];
        self.empty_from = None;
        if self.last_time_us > 0 {
            // Inclusive cursor: the event at `last_time_us` comes again and is skipped.
            params.push(format!("cursor={}", self.last_time_us));
        } else if !self.opts.live_when_empty {
            // (At least 2: a Contrail upstream tells no gap for 0 or 1, "from the start".)
            let from = self.empty_start(&url).await.max(2);
            self.empty_from = Some(from);
            params.push(format!("cursor={from}"));
        }
        self.expect_repeat = self.last_time_us > 0;
        // A cursor message moves the stream on past our own position, on this upstream: one
        // an earlier upstream showed (perhaps a bogus one) does not hold back this one's.
        self.last_cursor_us = self.last_time_us;
        // The upstream sends it again if it is there; what follows it on this connection says.
        self.held_ahead = None;
        self.gap = None;
        // Compressed links save most of the cross-region bandwidth; the dictionary is the one
        // the upstream itself uses, fetched fresh for each connection, and named in the
        // subscription: instances behind one address whose defaults differ, or a default
        // changed between the fetch and the upgrade, then refuse the link (a 400, tried again)
        // rather than send frames it cannot decompress.
        let mut decompressor = None;
        if replica.upstream_compress {
            let base = url.path.strip_suffix("/subscribe").unwrap_or("");
            let dict = match wsclient::http_get(&url, &url.at(&format!("{base}/dictionary")), self.opts.connect_timeout)
                .await
            {
                Ok(d) => d,
                Err(e) => return UpstreamError::DictionaryFetch(e),
            };
            match zstd::bulk::Decompressor::with_dictionary(&dict) {
                Ok(d) => decompressor = Some(d),
                Err(e) => return UpstreamError::Dictionary(e.to_string()),
            }
            params.push("compress=true".into());
            // (A raw-content dictionary has no id to name.)
            if let Some(id) = zstd::zstd_safe::get_dict_id_from_dict(&dict) {
                params.push(format!("zstdDictionary={id}"));
            }
        }
        let target = url.target_with(params.into_iter());
        let mut ws = match wsclient::connect(&url, target, self.opts.connect_timeout).await {
            Ok(ws) => ws,
            Err(e) => return e.into(),
        };
        self.readiness.set_reached();
        self.metrics.relay_connected.set(1);
        tracing::info!(upstream = %url, cursor = self.last_time_us, "upstream connected");
        let mut pieces = wsclient::Reassembler::new(wsclient::MAX_WS_MESSAGE_BYTES);
        // Watches the other upstreams while this one is in use; says which one to switch to.
        let (better_tx, mut better_rx) = tokio::sync::oneshot::channel();
        let probe = Probe {
            urls: self.urls().to_vec(),
            current: self.current,
            every: (stale / 3).max(Duration::from_secs(1)),
            lag: self.opts.replica.upstream_switch_lag,
            timeout: self.opts.connect_timeout,
            position: self.position.clone(),
            switch_again_at: self.switch_again_at.clone(),
            pauses: self.pauses.clone(),
        };
        let _prober = AbortOnDropHandle::new(tokio::spawn(probe_upstreams(probe, better_tx)));
        let clock = read_upstream_clock(url.clone(), self.opts.connect_timeout, self.metrics.clone());
        let _clock = AbortOnDropHandle::new(tokio::spawn(clock));
        // Only with a choice of upstreams; the prober then runs until it has something to say,
        // so the read below is abandoned only together with the connection.
        let probing = self.urls().len() > 1;
        // Only an event, the inclusive cursor's repeat or a cursor message keeps the upstream:
        // one sending lines that are all dropped (the wrong protocol, a proxy's pages) is as
        // stale as a silent one.
        let mut stale_at = tokio::time::Instant::now() + stale;
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout_at(stale_at, ws.read_frame()) => r,
                found = &mut better_rx, if probing => match found {
                    // The read in progress is abandoned with the connection.
                    Ok(Switch::Fresher(better, ahead)) => return UpstreamError::Behind { better, ahead },
                    Ok(Switch::Preferred(better)) => return UpstreamError::Preferred { better },
                    // The prober is gone (it never ends otherwise); the read it interrupted
                    // may have been half done, so this connection is not read again.
                    Err(_) => return UpstreamError::Protocol("an interrupted read (the upstream prober stopped)".into()),
                },
            };
            let frame = match read {
                Err(_) => return UpstreamError::Stale(stale),
                Ok(Err(e)) => return UpstreamError::Read(e),
                Ok(Ok(f)) => f,
            };
            let (opcode, payload) = match pieces.push(frame.opcode, frame.fin, &frame.payload) {
                Ok(wsclient::Assembled::Partial) => continue,
                Ok(wsclient::Assembled::Message(opcode, payload)) => (opcode, payload),
                Err(e) => return protocol(e.to_string()),
            };
            let result = match (opcode, decompressor.as_mut()) {
                (OpCode::Text, _) if payload.len() > MAX_EVENT_JSON => self.oversized(payload.len() as u64),
                (OpCode::Text, _) => self.handle(payload.to_vec()).await,
                (OpCode::Binary, Some(d)) => {
                    // Events are at most a few MB (a 1 MiB record rendered as JSON).
                    match d.decompress(payload, MAX_EVENT_JSON) {
                        Ok(mut json) => {
                            // A frame without its content size (another encoder than ours)
                            // decompresses into a buffer of the whole limit, which the event
                            // would keep: the ring's budget counts length, not capacity.
                            json.shrink_to_fit();
                            self.handle(json).await
                        }
                        Err(e) => match zstd::zstd_safe::get_frame_content_size(payload) {
                            Ok(Some(size)) if size > MAX_EVENT_JSON as u64 => self.oversized(size),
                            _ => Err(protocol(format!("a frame that does not decompress: {e}"))),
                        },
                    }
                }
                (OpCode::Binary, None) => Err(protocol("a binary frame to an uncompressed subscription")),
                (OpCode::Close, _) => Err(UpstreamError::Closed),
                _ => Ok(false),
            };
            match result {
                Ok(true) => {
                    let now = tokio::time::Instant::now();
                    stale_at = now + stale;
                    if std::mem::take(&mut self.moved_on) {
                        self.readiness.moved_on(now.into_std());
                    }
                }
                Ok(false) => {}
                Err(e) => return e,
            }
        }
    }

    /// Handles one event line; whether it kept the stream alive (an event stored, the cursor's
    /// repeat, a cursor message) rather than being dropped.
    async fn handle(&mut self, json: Vec<u8>) -> Result<bool, UpstreamError> {
        let meta = match Meta::read(&json) {
            Ok(meta) => meta,
            Err(e) => {
                if let Ok(gap) = serde_json::from_slice::<GapMeta<'_>>(&json) {
                    if gap.kind == "gap" {
                        return self.told_gap(gap.through_us).await;
                    }
                }
                return self.drop_event(DropReason::BadBody, format!("a line that is not a v1 event: {e}"));
            }
        };
        if meta.kind == "cursor" {
            if self.held_ahead.as_ref().is_some_and(|(held_at, _)| meta.time_us == *held_at) {
                // At the event held: the upstream is there, quiet. Alive; the position waits
                // for the next event.
                return Ok(true);
            }
            if meta.time_us >= crate::clock::MAX_TIME_US || self.far_ahead(meta.time_us) {
                // Taken, it would be a position nothing later could pass: no cursor message
                // would count as the upstream moving on again. (One far ahead may be real, a
                // primary's clock ahead of ours: the events it shows are held until confirmed,
                // and the next cursor messages are not far ahead of them.)
                let t = meta.time_us;
                return self.drop_event(DropReason::BadTime, format!("a cursor message at {t} (beyond any clock)"));
            }
            // The upstream's position for this stream: how far behind it we are (not known
            // while we hold nothing: the distance to 0 is the upstream's age since 1970).
            if self.last_time_us > 0 {
                let behind = meta.time_us.saturating_sub(self.last_time_us);
                self.metrics.upstream_tip_distance_seconds.set(behind as f64 / 1e6);
            }
            // At our position exactly (events dropped count: the upstream's newest may be one
            // we cannot store). One below it is an upstream behind us (a lagging replica we
            // rotated to, which has not got our newest event yet), not caught up.
            let here = meta.time_us == self.last_time_us.max(self.dropped_through);
            let caught_up = match meta.live {
                // The upstream says its stream for us is live: everything it holds up to here
                // was sent, and we have it all.
                Some(live) => live && here,
                // An upstream that does not say: nothing newer, and no event for a cursor
                // interval. (While events flow, a catch-up's cursor messages trail the events
                // sent.) A replay the upstream holds back that long looks the same: that is
                // why it now says.
                None => here && self.last_time_us > 0 && self.last_event_at.elapsed() >= self.cursor_interval(),
            };
            if caught_up {
                // Caught up with a quiet upstream, however long ago its last event was: the lag
                // is none; it grows again if these stop.
                self.metrics.replicated_time(self.metrics.upstream_now_us() as i64);
            }
            if meta.time_us > self.last_cursor_us {
                (self.last_cursor_us, self.moved_on) = (meta.time_us, true);
            }
            return Ok(true);
        }
        if meta.time_us >= crate::clock::MAX_TIME_US {
            // Bad upstream data is data (DESIGN.md invariant 6): dropped and counted, and the
            // position stays where it was, so the next real event is taken. An error would
            // resume from the same place and meet the same event again, forever.
            let t = meta.time_us;
            return self.drop_event(DropReason::BadTime, format!("an event with time_us {t} (beyond any clock)"));
        }
        let mut stored_held = false;
        if let Some((held_at, held)) = self.held_ahead.take() {
            if meta.time_us > held_at {
                // The stream goes on past it: real (a primary's clock ahead of ours, or ours
                // behind). Taken first.
                let held_meta = Meta::read(&held).map_err(protocol)?;
                stored_held = self.event(held_meta, held).await?;
            } else {
                if let Some((_, first)) = self.gap.as_mut().filter(|(_, first)| *first == held_at) {
                    // The hole's far edge is the first event this upstream really has.
                    *first = meta.time_us;
                }
                // (Counted once: the upstream sends it again after a reconnect.)
                if held_at != self.dropped_ahead {
                    self.dropped_ahead = held_at;
                    let what = format!(
                        "an event with time_us {held_at} (beyond any clock: the next, at {}, was not)",
                        meta.time_us
                    );
                    self.drop_event(DropReason::BadTime, what)?;
                }
            }
        }
        if self.far_ahead(meta.time_us) {
            // The first event after resuming, not the resumed-from one: whatever it is, this
            // upstream no longer has our newest event. Decided now, not once it is confirmed
            // (a quiet upstream would leave the hole undecided for ever).
            if self.expect_repeat {
                self.resumed_without_our_newest(meta.time_us)?;
            }
            self.held_ahead = Some((meta.time_us, json));
            return Ok(stored_held);
        }
        Ok(self.event(meta, json).await? || stored_held)
    }

    /// The upstream's log no longer held events its stream for us came to, up to `through`:
    /// retention overtook our catch-up, or our newest event is gone from it (told before the
    /// first event after resuming). Past our position, that upstream lacks what follows it
    /// and another may have it ([`Self::resumed_without_our_newest`]); up to it, only events
    /// we have are gone: nothing is missing, and the resumed-from event will not come again.
    /// Alive either way. With nothing stored yet, nothing is missing either, but this upstream
    /// starts later than our retention window: another may start earlier
    /// ([`Self::longer_window`]).
    async fn told_gap(&mut self, through: u64) -> Result<bool, UpstreamError> {
        if self.last_time_us > 0 && through > self.last_time_us.max(self.dropped_through) {
            if self.gap.is_none() {
                self.resumed_without_our_newest(through.saturating_add(1))?;
            }
        } else if self.last_time_us == 0 && self.empty_from.is_some_and(|from| through > from) {
            self.expect_repeat = false;
            self.longer_window(through.saturating_add(1)).await?;
        } else {
            self.expect_repeat = false;
        }
        Ok(true)
    }

    /// With nothing stored yet, this upstream starts at `first`, later than our retention
    /// window: a young log, or a shorter retention (a nearer replica listed first would then
    /// leave the older part out for good). Another upstream that starts earlier, by what it
    /// told us or else by its `/status`, and is not behind the freshest by more than the switch
    /// lag, is gone to; the earliest of them. Otherwise this one is copied from its start
    /// (nothing of ours is missing: not a hole). An upstream out of reach is not waited for: an
    /// empty log's history is what the upstreams have now. At most two moves per upstream are
    /// made: upstreams that trim as they are asked must not be chased. (A move costs a
    /// connection; one to an upstream that then fails, the usual backoff.)
    async fn longer_window(&mut self, first: u64) -> Result<(), UpstreamError> {
        self.window_starts[self.current] = Some(first);
        if self.urls().len() < 2 || self.window_moves >= 2 * self.urls().len() {
            return Ok(());
        }
        // Every upstream's `/status` (this one's too: the freshest newest).
        let (current, pauses) = (self.current, &self.pauses);
        let statuses =
            upstream_statuses(self.urls(), |i| i == current || pauses.left(i).is_zero(), self.opts.connect_timeout);
        let believable = |t: &u64| *t <= crate::clock::now_us().saturating_add(MAX_AHEAD_US);
        let mut windows = Vec::new();
        for (i, status) in statuses.await.into_iter().enumerate() {
            let Some(log) = status.map(|v| v["log"].clone()) else { continue };
            // (An empty log says 0 for both; a start after its own newest is no log's.)
            if let (Some(oldest), Some(newest)) = (log["oldest_time_us"].as_u64(), log["newest_time_us"].as_u64()) {
                if oldest > 0 && oldest <= newest && believable(&newest) {
                    windows.push((i, oldest, newest));
                }
            }
        }
        let freshest = windows.iter().map(|&(_, _, newest)| newest).max().unwrap_or(0);
        let lag = self.opts.replica.upstream_switch_lag.as_micros() as u64;
        // Where another starts: where it told us, if it did (a `/status` may be wrong); not one
        // behind the freshest by more than the switch lag (the prober would leave it, for
        // this one, which lacks what we would have copied by then: a hole).
        let best = windows
            .iter()
            .filter(|&&(i, _, newest)| i != self.current && newest.saturating_add(lag) >= freshest)
            .map(|&(i, oldest, _)| (self.window_starts[i].unwrap_or(oldest), i))
            .filter(|&(start, _)| start < first)
            .min();
        match best {
            Some((start, better)) => {
                self.window_moves += 1;
                tracing::info!(upstream = %self.urls()[self.current], first, better = %self.urls()[better], better_start = start, "empty log: another upstream keeps more of our retention window");
                Err(UpstreamError::LongerWindow { better, first })
            }
            None => Ok(()),
        }
    }

    /// Whether an upstream may still have what follows our position: one not asked since it
    /// moved, one that had it, or one out of reach for less than the hole patience (a hole is
    /// for ever; a replica that waits only lags).
    fn another_may_have_it(&self) -> bool {
        let patience = self.opts.replica.upstream_hole_patience.max(self.opts.replica.upstream_stale_timeout);
        !self.resume.iter().all(|r| match r {
            Resume::Trimmed => true,
            Resume::Unreachable(since) => since.elapsed() >= patience,
            Resume::Unknown | Resume::HasIt => false,
        })
    }

    /// The first event after resuming from `last_time_us`, at `first`, is not the resumed-from
    /// one, or the upstream told a gap past it: the upstream no longer has it (retention
    /// trimmed it, or a live-only window never reached back that far), and what it held after
    /// it may be gone too. Another upstream may still have it (or may again, once reachable):
    /// an error, to try it. When none can, go on, and say so (the hole is counted when the next
    /// event is stored).
    fn resumed_without_our_newest(&mut self, first: u64) -> Result<(), UpstreamError> {
        self.expect_repeat = false;
        let cursor = self.last_time_us;
        *self.resume_state() = Resume::Trimmed;
        if self.another_may_have_it() {
            return Err(UpstreamError::Trimmed { cursor, first });
        }
        self.gap = Some((cursor, first));
        Ok(())
    }

    /// Whether `time_us` is more than [`MAX_AHEAD_US`] past both this machine's clock and our
    /// newest event.
    fn far_ahead(&self, time_us: u64) -> bool {
        time_us > crate::clock::now_us().max(self.last_time_us).saturating_add(MAX_AHEAD_US)
    }

    /// Stores one event line (`meta` read from it), unless it is the cursor's repeat or cannot
    /// be stored; whether it kept the stream alive.
    async fn event(&mut self, meta: Meta, json: Vec<u8>) -> Result<bool, UpstreamError> {
        if meta.time_us <= self.last_time_us {
            if meta.time_us == self.last_time_us && !self.expect_repeat {
                // Not the resumed-from event (that comes first, if at all): a second event
                // stamped alike, which the log cannot hold beside the first. Dropped, counted.
                let t = meta.time_us;
                return self.drop_event_at(t, DropReason::BadTime, format!("a second event with time_us {t}"));
            }
            if meta.time_us == self.last_time_us {
                self.expect_repeat = false;
                let state = self.resume_state();
                if *state == Resume::Unknown {
                    // (One that had it before and gave nothing after keeps its clock running.)
                    *state = Resume::HasIt;
                }
                return Ok(true); // the inclusive cursor's repeat
            }
            return Err(protocol(format!("time_us {} after {}", meta.time_us, self.last_time_us)));
        }
        if self.expect_repeat {
            self.resumed_without_our_newest(meta.time_us)?;
        }
        // From here a bad event is dropped and counted, not an error: every upstream (all
        // replicas of one primary) would send it again at the same place, for ever.
        let kind = match meta.kind.as_str() {
            "commit" => EventKind::Commit,
            "identity" => EventKind::Identity,
            "account" => EventKind::Account,
            "sync" => EventKind::Sync,
            other => {
                let what = format!("an event of an unknown kind {other:?}");
                return self.drop_event_at(meta.time_us, DropReason::UnknownType, what);
            }
        };
        let collection = meta.collection;
        let time_us = meta.time_us;
        let (json, verification) = contrail_core::event::split_verification(json);
        let Some(mut event) = Event::from_json(json, kind, collection.as_deref()) else {
            return self.drop_event_at(time_us, DropReason::BadBody, "an event that is not in v1 shape".into());
        };
        // What the primary's transcoder checks of every event: a DID (at most 2,048 bytes; the
        // stored value's header holds its length) and a collection that are valid.
        if !contrail_core::syntax::is_valid_did(event.did())
            || collection.as_deref().is_some_and(|c| !contrail_core::syntax::is_valid_nsid(c))
        {
            return self.drop_event_at(
                time_us,
                DropReason::BadBody,
                "an event with an invalid DID or collection".into(),
            );
        }
        event.verification = verification;
        if event.time_us != time_us {
            let what = "an event whose time_us does not parse the same twice".into();
            return self.drop_event_at(time_us, DropReason::BadTime, what);
        }
        self.last_time_us = time_us;
        // A line dropped before it with a later time_us was out of order, so its time says
        // nothing of where the upstream is: kept, a bogus one hours ahead would pass for our
        // position (no gap below it seen as a hole, no cursor message as caught up) until then.
        self.dropped_through = self.dropped_through.min(time_us);
        self.position.store(time_us, std::sync::atomic::Ordering::Relaxed);
        self.last_event_at = std::time::Instant::now();
        self.metrics.replicated_time(time_us as i64);
        self.metrics.upstream_tip_distance_seconds.set(0.0);
        // A hole accepted goes into the log with this event, to be told to our subscribers.
        let hole_after = self.gap.map(|(cursor, _)| cursor);
        let frame = IngestFrame { events: vec![event], keep_time: true, hole_after, ..Default::default() };
        self.tx.send(frame).await.map_err(|_| UpstreamError::SequencerStopped)?;
        self.moved_on = true;
        // A new position: what the upstreams showed was about the old one.
        self.resume.fill(Resume::Unknown);
        self.window_starts.fill(None);
        if let Some((cursor, first)) = self.gap.take() {
            self.metrics.upstream_gaps.inc();
            tracing::error!(
                upstream = %self.urls()[self.current],
                cursor,
                first,
                "no upstream still has our newest event or the events after it: events between it and this upstream's next may be missing (a hole in the log, told to subscribers that pass it as a gap)"
            );
        }
        Ok(true)
    }

    /// Drops an event line of more than [`MAX_EVENT_JSON`] (`bytes` long): more than any event
    /// a primary makes, so a broken or lying upstream's. Taken, a follower of ours on a
    /// compressed link would refuse it as undecompressable, again at every reconnection, for
    /// ever; refused here as an error, so would we.
    fn oversized(&self, bytes: u64) -> Result<bool, UpstreamError> {
        self.drop_event(DropReason::FrameTooLarge, format!("an event line of {bytes} bytes (at most {MAX_EVENT_JSON})"))
    }

    /// Drops an event line that cannot be stored: counted, and said (rate-limited). The
    /// position stays, so the next good event is taken.
    fn drop_event(&self, reason: DropReason, what: String) -> Result<bool, UpstreamError> {
        self.metrics.drop_reason(reason);
        let upstream = &self.urls()[self.current];
        self.log.warn(reason.as_str(), || format!("dropped {what} from upstream {upstream}"));
        Ok(false)
    }

    /// [`UpstreamReader::drop_event`] for an event at `time_us` (a believable one), unless it
    /// was dropped and counted already.
    fn drop_event_at(&mut self, time_us: u64, reason: DropReason, what: String) -> Result<bool, UpstreamError> {
        if time_us <= self.dropped_through {
            return Ok(false);
        }
        self.dropped_through = time_us;
        self.drop_event(reason, what)
    }

    /// [`ReplicaConfig::cursor_interval`].
    fn cursor_interval(&self) -> Duration {
        self.opts.replica.cursor_interval()
    }

    /// Where an empty log starts on `url`: a retention before its newest event (read at its
    /// `/status`, so by its clock, not ours), or its oldest (0) when that is not known.
    async fn empty_start(&self, url: &WsUrl) -> u64 {
        // A reading beyond any clock is not believed (as the prober's): the window before it
        // would be skipped for good, or the cursor refused.
        let believable = |t: &u64| *t <= crate::clock::now_us().saturating_add(MAX_AHEAD_US);
        let newest = upstream_newest(url, self.opts.connect_timeout).await.filter(believable);
        let start =
            newest.map_or(0, |n| n.saturating_sub(self.opts.retention.as_micros().min(u64::MAX as u128) as u64));
        if start > 0 {
            tracing::info!(upstream = %url, cursor = start, retention = ?self.opts.retention, "empty log: copying the upstream's newest events within our retention");
        }
        start
    }

    /// What the upstream in use has shown about resuming from `last_time_us`.
    fn resume_state(&mut self) -> &mut Resume {
        &mut self.resume[self.current]
    }
}

/// How far past both this machine's clock and our newest event an upstream's `time_us` may be
/// and still be taken at once. Further is most likely a bogus value: stored as our newest, every
/// real event after it would be refused as older (and every honest upstream, asked for that
/// cursor, would start us live past them), for ever. But it may be real: a primary whose clock
/// was ahead keeps stamping ahead (`max(now, last + 1)`), and our own clock may be behind (a
/// boot before NTP). So such an event is held, and taken once the next one is newer still;
/// dropped (counted as `bad_time`) when the next is older.
const MAX_AHEAD_US: u64 = 24 * 3_600 * 1_000_000;

/// An upstream's `/status`.
async fn upstream_status(url: &WsUrl, timeout: Duration) -> Option<serde_json::Value> {
    let base = url.path.strip_suffix("/subscribe").unwrap_or("");
    let body = wsclient::http_get(url, &url.at(&format!("{base}/status")), timeout).await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// The newest `time_us` an upstream reports at `/status`.
async fn upstream_newest(url: &WsUrl, timeout: Duration) -> Option<u64> {
    upstream_status(url, timeout).await?["log"]["newest_time_us"].as_u64()
}

/// The `/status` of each of `urls` that `ask` picks, read at once (one after another, an
/// upstream read after a slow one, up to the timeout, would look ahead by that long); `None`
/// for the others and those that did not answer.
async fn upstream_statuses(
    urls: &[WsUrl],
    ask: impl Fn(usize) -> bool,
    timeout: Duration,
) -> Vec<Option<serde_json::Value>> {
    let mut readings = tokio::task::JoinSet::new();
    for (i, url) in urls.iter().enumerate().filter(|&(i, _)| ask(i)) {
        let url = url.clone();
        readings.spawn(async move { (i, upstream_status(&url, timeout).await) });
    }
    let mut statuses = vec![None; urls.len()];
    while let Some(reading) = readings.join_next().await {
        if let Ok((i, status)) = reading {
            statuses[i] = status;
        }
    }
    statuses
}

/// How often a replica reads the clock of the upstream in use, for its lag.
const CLOCK_READ_EVERY: Duration = Duration::from_secs(30);

/// A clock reading that took longer is not taken (the middle of the request stands for the
/// moment the upstream read its clock: off by up to half of it).
const CLOCK_READ_MAX_ROUND_TRIP: Duration = Duration::from_secs(1);

/// Reads `url`'s clock (`/status`'s `now_us`: its primary's, down a chain) into `metrics` at
/// once and every [`CLOCK_READ_EVERY`], for as long as the connection to it lasts: the
/// replication lag is measured by it (the events are stamped by the primary's clock, not by
/// ours, which may be minutes off). An upstream whose `/status` does not say (an older
/// Contrail) puts this machine's clock back in use, not the last upstream's; a `/status` that
/// cannot be read now (refused, slow), or a value no clock gives, keeps what was in use.
async fn read_upstream_clock(url: WsUrl, timeout: Duration, metrics: Arc<Metrics>) {
    let mut first = true;
    loop {
        let asked = std::time::Instant::now();
        let status = upstream_status(&url, timeout).await;
        let answered = std::time::Instant::now();
        // None: no answer; Some(None): an answer that does not say.
        match status.map(|v| v["now_us"].as_u64()) {
            Some(Some(now))
                if now > 0 && now < crate::clock::MAX_TIME_US && answered - asked <= CLOCK_READ_MAX_ROUND_TRIP =>
            {
                metrics.upstream_clock(Some((now, asked + (answered - asked) / 2)));
            }
            Some(None) if first => metrics.upstream_clock(None),
            _ => {}
        }
        first = false;
        tokio::time::sleep(CLOCK_READ_EVERY).await;
    }
}

/// Another upstream to read ([`probe_upstreams`]).
enum Switch {
    /// Ahead of the one in use by more than the switch lag, by this much.
    Fresher(usize, Duration),
    /// Listed before the one in use, and not behind it.
    Preferred(usize),
}

/// What [`probe_upstreams`] watches, and against what.
struct Probe {
    urls: Vec<WsUrl>,
    /// The upstream in use.
    current: usize,
    every: Duration,
    /// `--upstream-switch-lag`.
    lag: Duration,
    /// For each `/status` request.
    timeout: Duration,
    /// Our newest event's `time_us`, as it moves.
    position: Arc<std::sync::atomic::AtomicU64>,
    /// Per upstream, when it may be switched to again ([`UpstreamReader::switch_again_at`]).
    switch_again_at: Vec<SwitchAgainAt>,
    /// Upstreams that asked to be left alone a while, as at the session's start: not switched
    /// to before their time.
    pauses: Pauses,
}

/// Every `every`, compares the upstreams' newest events; reports (once, then ends) one ahead
/// of `current` by more than `lag` or, failing that, once our `position` is within `lag` of
/// `current`'s newest event, the first upstream listed before `current` that is not behind it
/// on two readings in a row: after a failover (a primary's restart), a replica goes back to
/// the upstream it prefers rather than staying a hop further away for good. (Not while it
/// catches up: the preferred one may be the one that no longer has our position; nor before
/// its `switch_again_at`, which holds back a switch to a fresher upstream likewise.)
async fn probe_upstreams(probe: Probe, better: tokio::sync::oneshot::Sender<Switch>) {
    let Probe { urls, current, every, lag, timeout, position, switch_again_at, pauses } = probe;
    if urls.len() < 2 {
        return;
    }
    let mut preferred_before = None;
    loop {
        tokio::time::sleep(every).await;
        let statuses = upstream_statuses(&urls, |i| i == current || pauses.left(i).is_zero(), timeout).await;
        let newest_of: Vec<Option<u64>> =
            statuses.iter().map(|s| s.as_ref().and_then(|v| v["log"]["newest_time_us"].as_u64())).collect();
        let Some(ours) = newest_of[current] else { continue };
        // A reading more than a day past this clock and the one in use is not believed: a
        // bogus one would look far ahead, and be switched to.
        let believable = |t: u64| t <= crate::clock::now_us().max(ours).saturating_add(MAX_AHEAD_US);
        let mut best: Option<(usize, u64)> = None;
        let mut preferred = None;
        for (i, newest) in newest_of.iter().enumerate() {
            if i == current {
                continue;
            }
            let again = switch_again_at[i];
            if let Some(newest) = newest.filter(|&t| believable(t)) {
                if !SwitchAgainAt::waiting(again.fresher) && best.is_none_or(|(_, b)| newest > b) {
                    best = Some((i, newest));
                }
                let caught_up =
                    position.load(std::sync::atomic::Ordering::Relaxed).saturating_add(lag.as_micros() as u64) >= ours;
                let may_prefer = !SwitchAgainAt::waiting(again.preferred);
                if i < current && newest >= ours && caught_up && may_prefer && preferred.is_none() {
                    preferred = Some(i);
                }
            }
        }
        if let Some((i, newest)) = best {
            let ahead = Duration::from_micros(newest.saturating_sub(ours));
            if ahead > lag {
                let _ = better.send(Switch::Fresher(i, ahead));
                return;
            }
        }
        match preferred {
            // One answer is not a recovery: the same upstream twice in a row.
            Some(i) if preferred_before == Some(i) => {
                let _ = better.send(Switch::Preferred(i));
                return;
            }
            p => preferred_before = p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Meta;

    /// All of a line is checked, the parts skipped too: what is stored is served as it came.
    #[test]
    fn a_line_is_read_only_when_all_of_it_is_json() {
        let line = br#"{"did":"did:plc:a","time_us":7,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k","record":{"a":[1,{"b":"\u00e9"}]}}}"#;
        let m = Meta::read(line).unwrap();
        assert_eq!((m.kind.as_str(), m.time_us, m.collection.as_deref()), ("commit", 7, Some("app.bsky.feed.like")));
        let cursor = Meta::read(br#"{"kind":"cursor","time_us":9,"live":true}"#).unwrap();
        assert_eq!((cursor.kind.as_str(), cursor.live, cursor.collection), ("cursor", Some(true), None));
        let mut bad_utf8 = line.to_vec();
        let at = bad_utf8.windows(3).position(|w| w == b"\"b\"").unwrap() + 1;
        bad_utf8[at] = 0xff; // inside a key of the record, which the reader skips
        let cut = &line[..line.len() - 1];
        let mut trailing = line.to_vec();
        trailing.extend_from_slice(b"x");
        let mut bad_number = line.to_vec();
        let at = bad_number.windows(2).position(|w| w == b"[1").unwrap() + 1;
        bad_number[at] = b'-';
        let lone = String::from_utf8_lossy(line).replace(r"\u00e9", r"\ud800").into_bytes();
        let lone_low = String::from_utf8_lossy(line).replace(r"\u00e9", r"\udc00x").into_bytes();
        let pair = String::from_utf8_lossy(line).replace(r"\u00e9", r"\ud83d\ude00").into_bytes();
        assert!(Meta::read(&pair).is_ok(), "a surrogate pair is a character");
        let nested = |levels: usize| {
            let mut l = br#"{"did":"did:plc:a","time_us":7,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k","record":"#.to_vec();
            l.extend(b"[".repeat(levels));
            l.extend(b"]".repeat(levels));
            l.extend(b"}}");
            l
        };
        // What older primaries stored at most (a record of 125 levels at the event's third,
        // with a link in its deepest container, one more) is read, and so are 256 levels.
        let mut deepest = nested(125);
        let at = deepest.windows(2).position(|w| w == b"[]").unwrap() + 1;
        deepest.splice(at..at, br#"{"$link":"bafyreih"}"#.iter().copied());
        assert!(Meta::read(&deepest).is_ok());
        // (On a thread with half a runtime thread's stack: 256 KiB overflowed in a debug build.)
        let deep_ok = std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(move || Meta::read(&nested(254)).is_ok())
            .unwrap()
            .join()
            .unwrap();
        assert!(deep_ok, "256 levels");
        let (deep, deeper) = (nested(255), nested(100_000));
        for (what, bad) in [
            ("bad UTF-8", &bad_utf8[..]),
            ("cut short", cut),
            ("trailing", &trailing),
            ("a bad number", &bad_number),
            ("a lone high surrogate", &lone),
            ("a lone low surrogate", &lone_low),
            ("more than 256 levels", &deep),
            ("a hundred thousand levels", &deeper),
        ] {
            assert!(Meta::read(bad).is_err(), "{what}");
        }
    }
}
