//! The `/subscribe` hub: Jetstream v1's wire, without v1's bugs, plus cursor messages.
//!
//! - [`handshake`]: query → options → admission → upgrade (400 / 429 / 503 before the upgrade).
//! - [`session`]: one subscriber's socket loop (reads, buffered writes, timers, closes).
//! - [`stream`]: one subscriber's position, walking log → live queue → log (DESIGN.md
//!   invariant 4); [`dispatch`]: the index that fills live queues with only what each wants.
//! - [`slow`]: the slow-subscriber rule; [`liveness`]: what a subscriber's socket shows of its
//!   progress, and how long a write may wait; [`close`]: close reasons with their codes.
//! - [`limits`]: admission and fairness (the filters' memory budget too); [`compress`]: zstd
//!   with shared dictionaries; [`encode`]: what a subscriber is sent for an event;
//!   [`replay_pages`]: runs of the log rendered once as ready frames and shared by replayers
//!   close to each other; [`replay_budget`]: the memory the pages in replayers' hands may hold;
//!   [`precompress`]: compressed frames stored beside the log ahead of replay;
//!   [`options`]: the query and `options_update` (in the pure core crate).
//!
//! The hub is built from what it needs — the log and its tip, the ring, metrics, the
//! dictionary and its settings — not from the application's shared state.
//!
//! The v1 contract, one bullet per behaviour, with the test that pins it
//! (`tests/subscribe.rs` unless named otherwise):
//! - Query: `wantedCollections` (repeated, ≤ 100, NSIDs or `prefix.*`), `wantedDids`
//!   (repeated, ≤ 10,000 unique, strict syntax), `cursor` (unix µs, inclusive; future = live;
//!   older than the log = from the oldest event), `compress=true` or a `Socket-Encoding`
//!   header containing `zstd`, `requireHello=true`, `maxMessageSizeBytes` — `query_errors_are_400s`,
//!   `replay_returns_the_log_and_filters_select_events`, `options` unit tests.
//! - Bad input is an HTTP 400 with v1's plain-text reason before the upgrade —
//!   `query_errors_are_400s`.
//! - Identity and account events bypass `wantedCollections`, not `wantedDids` —
//!   `replay_returns_the_log_and_filters_select_events`, `options::tests::filters_match_like_v1`.
//! - `options_update` replaces the filters and the size cap; invalid → close 1008 with the
//!   reason; bad JSON → 1007; unknown types ignored; messages over 10 MB → 1009 —
//!   `live_then_options_update_replaces_filters`, `bad_client_messages_close_with_codes`.
//! - `requireHello` holds all delivery until the first valid `options_update`; nothing is
//!   buffered before it — `require_hello_holds_delivery`.
//! - Text frames carry JSON; with compression, Binary frames each carry one independent zstd
//!   frame, built once per event and dictionary and shared; `compress=true` uses Jetstream's
//!   v1 dictionary, so existing clients decode it unmodified; `zstdDictionary=<id>` picks
//!   another served one (an unknown id is a 400 naming the ids served) —
//!   `compressed_frames_decode_with_the_dictionary`, `tests/third_party.rs`.
//! - Replay → live with no gap, duplicate or reordering under ingest —
//!   `handoff_under_ingest_is_exact`, `hub::stream` unit tests.
//! - Ping every 30 s; a peer that answers nothing is closed after the pong timeout
//!   (`a_reader_that_never_answers_pings_is_closed`); a connection making no progress for the
//!   write timeout (the kernel's judgement) is closed
//!   (`a_client_that_stops_reading_is_closed_by_the_write_timeout`); a reader slow but steady
//!   is kept (`a_slow_steady_reader_is_kept`); a log reader far behind and not progressing is
//!   closed with 1008 — `dead_and_slow_peers_are_closed_without_hurting_others`, `hub::slow`
//!   unit tests.
//!
//! Beyond v1 (opt-in, so strict v1 clients never see them): `informCursorSeconds=N` sends
//! `{"kind":"cursor","time_us":T,"live":L}` every N s, T being the last event this stream has
//! passed (delivered or filtered out), L whether it is live (caught up with the log) or still
//! reading it — `cursor_messages_report_progress`. With it, events the log no longer held
//! when the stream came to them (retention overtook a replay, or the cursor is older than the
//! log; not for cursors 0 and 1, "from the start"), or that it never had (a hole: a replica's
//! upstreams lost them, `log::holes`), are told first as
//! `{"kind":"gap","after_us":A,"through_us":B}`, exactly those after A up to B; v2 tells them
//! in an `#info OutdatedCursor`, the range also in its fields `afterSeq` and `throughSeq` —
//! `replayers_that_retention_overtakes_are_told_the_gap_in_order`, `hub::stream` unit tests.
//! An upgrade without a cursor carries `contrail-start-cursor`, a cursor from where the
//! subscription starts — `a_live_upgrade_says_its_start_cursor_on_both_wires`,
//! `a_live_start_resumes_from_the_servers_start_cursor_not_this_clock`.
//!
//! The v2 wire (`GET /xrpc/network.bsky.jetstream.subscribeEvents`, [`handshake::subscribe_events`],
//! messages in `contrail_core::v2`), served by the same sessions and streams:
//! - `seq` is `time_us`; a cursor ≥ 10¹⁵ resumes inclusively, an older one than the log gets
//!   `#info OutdatedCursor` first (with the range lost, but for 10¹⁵, "from the start"), one
//!   below 10¹⁵ is a 400 `CursorTooOld`; `kinds`, `dids`,
//!   `collections` (non-commit kinds bypass them), `maxMessageSizeBytes` on the whole message;
//!   v2's named 400s — `tests/subscribe_v2.rs` (`v2_refuses_bad_requests_with_named_xrpc_errors`,
//!   `v2_streams_the_log_as_v2_messages_with_filters_and_resume`), `v2` unit tests.
//! - `zstdDictionary=<id>` compresses every message with that dictionary, served at
//!   `getZstdDictionary`; the `xrpc.v1.json` subprotocol is echoed —
//!   `v2_compression_uses_the_dictionary_from_get_zstd_dictionary`.
//! - Server-push only: a client data frame closes 1008 `unexpected data message`; a slow
//!   reader gets a `ConsumerTooSlow` error frame before the close.
//! - A real v2 client (the Python `atproto` SDK) receives the corpus and resumes across a
//!   server restart — `tests/third_party.rs`.
//! - `#sync` events: v2 `kinds=sync`; v1 only with `includeSync` —
//!   `sync_events_reach_v1_clients_only_when_asked`.
//!
//! Deliberate differences from v1 are listed in the README's compatibility section.

pub mod close;
pub mod compress;
pub mod dispatch;
pub mod encode;
pub(crate) mod handshake;
pub(crate) mod inbound;
pub mod limits;
pub(crate) mod liveness;
pub mod precompress;
pub mod replay_budget;
pub mod replay_pages;
pub(crate) mod session;
pub(crate) mod slow;
pub(crate) mod stream;

pub use contrail_core::options;

use crate::log::{Log, Tip};
use crate::metrics::Metrics;
use crate::sequencer::Ring;
use crate::units::{parse_duration, ser_duration};
use compress::Dictionaries;
use limits::{Admission, LimitsConfig};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The hub's settings (`contrail serve` flags; see `config/contrail.example.toml`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct HubConfig {
    /// Live events kept in memory for subscribers (each ~0.5–1 KiB); a subscriber further
    /// behind reads the log instead.
    #[arg(long, env = "CONTRAIL_RING_CAPACITY", default_value = "65536")]
    pub ring_capacity: usize,
    /// Most event JSON the ring holds in memory; past it, recent large events stay only in the
    /// log and live subscribers read them from there. Live subscribers' queues together hold
    /// at most 4× this (counting an event once per queue holding it).
    #[arg(long, env = "CONTRAIL_RING_MAX_BYTES", default_value = "256MiB", value_parser = crate::units::parse_size)]
    pub ring_max_bytes: u64,
    /// Replay pages kept: runs of the log rendered as ready frames, shared by subscribers
    /// replaying close to each other with the same filter and encoding (so concurrent
    /// replayers read, filter, compress and frame each event once); 0 turns the sharing off.
    #[arg(long, env = "CONTRAIL_REPLAY_CACHE_BYTES", default_value = "64MiB", value_parser = crate::units::parse_size)]
    pub replay_cache_bytes: u64,
    /// Most memory the replay pages in subscribers' hands hold together (a page of up to
    /// 1,024 events is ~1 MB, ~8.5 MB at most unless one event is over 4 MiB; counted once
    /// however many subscribers write it), a quarter of it per client IP. A replayer reserves
    /// room for the largest page before it fetches one, and waits for room holding no page.
    /// Live subscribers wait only once they fall back to the log.
    #[arg(long, env = "CONTRAIL_REPLAY_HELD_BYTES", default_value = "1GiB", value_parser = crate::units::parse_size)]
    pub replay_held_bytes: u64,
    /// Close a replayer that has waited this long for room under --replay-held-bytes, with
    /// 1013 "try again later" (its client reconnects from its cursor): the room is in other
    /// subscribers' hands, and clients that read their pages very slowly can keep it for many
    /// minutes. Without this the replayer waited for as long as they did, silent.
    #[arg(long, env = "CONTRAIL_REPLAY_ROOM_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub replay_room_timeout: Duration,
    /// More zstd dictionaries to serve (files, or directories of *.zdict; repeat the flag or
    /// comma-separate), besides the shipped Jetstream v1 and Contrail v1 ones. Clients pick one
    /// with zstdDictionary=<id>.
    #[arg(long, env = "CONTRAIL_ZSTD_DICTIONARY", value_delimiter = ',')]
    pub zstd_dictionary: Vec<PathBuf>,
    /// The id of the dictionary compress=true uses when the client names none (default:
    /// Jetstream v1's, 1612007021, which every existing Jetstream client embeds).
    #[arg(long, env = "CONTRAIL_ZSTD_DEFAULT_DICTIONARY")]
    pub zstd_default_dictionary: Option<u32>,
    /// Ping subscribers this often.
    #[arg(long, env = "CONTRAIL_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub ping_interval: Duration,
    /// Close a subscriber that has sent nothing (not even a pong) for this long, counted from
    /// when its connection was last backed up if that is later (its pings wait behind data it
    /// has not read; while it is behind, --write-timeout judges it).
    #[arg(long, env = "CONTRAIL_PONG_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub pong_timeout: Duration,
    /// Close a subscriber whose connection makes no progress for this long: what was sent stays
    /// unacknowledged, or its receive window stays shut (the kernel's TCP_USER_TIMEOUT, Linux
    /// 5.11 or later for the window). A reader of a few KB/s reopens its window only every
    /// several seconds, so keep this well above that. A write that drains less than ~64 KiB in
    /// the longer of this and --slow-window, or outlasts that plus its length at 1 KB/s, also
    /// ends the subscriber.
    #[arg(long, env = "CONTRAIL_WRITE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub write_timeout: Duration,
    /// Live subscribers get at most one write per this long: events that arrive within it of
    /// the last write wait for the rest of it and leave together. Trades up to this much
    /// latency for fewer syscalls per delivered event (BENCHMARKS.md); 0 writes at once.
    #[arg(long, env = "CONTRAIL_WRITE_LINGER", default_value = "0ms", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub write_linger: Duration,
    /// Slow-client rule: a subscriber reading the log, more than --slow-behind behind the
    /// newest event and passing fewer than --slow-min-rate events/s over this window, is closed.
    #[arg(long, env = "CONTRAIL_SLOW_WINDOW", default_value = "60s", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub slow_window: Duration,
    /// See --slow-window.
    #[arg(long, env = "CONTRAIL_SLOW_MIN_RATE", default_value = "5")]
    pub slow_min_rate: f64,
    /// See --slow-window.
    #[arg(long, env = "CONTRAIL_SLOW_BEHIND", default_value = "10m", value_parser = parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub slow_behind: Duration,
    /// `options_update` messages one connection may send per second (ten seconds' worth
    /// banked; a large update counts one per 64 KiB of the message and the two filters); one
    /// sent faster is applied when its tokens come, not closed.
    #[arg(long, env = "CONTRAIL_MAX_OPTIONS_UPDATES_PER_SECOND", default_value = "10")]
    pub max_options_updates_per_second: u32,
}

/// The most ring slots `--ring-capacity` may ask for (~640 MiB of slots).
pub const MAX_RING_CAPACITY: usize = 1 << 24;

impl HubConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(16..=MAX_RING_CAPACITY).contains(&self.ring_capacity) {
            // The ring's slots are allocated at start, ~40 B each, whatever they hold.
            return Err(("ring-capacity", format!("must be between 16 and {MAX_RING_CAPACITY}")));
        }
        if !(1 << 20..=1 << 40).contains(&self.ring_max_bytes) {
            // Below an event's size every event would go to subscribers through the log; the
            // live queues' budget is 4× this.
            return Err(("ring-max-bytes", "must be between 1MiB and 1TiB".into()));
        }
        if self.replay_cache_bytes > 1 << 40 {
            return Err(("replay-cache-bytes", "must be at most 1TiB".into()));
        }
        if !(1 << 20..=1 << 40).contains(&self.replay_held_bytes) {
            return Err(("replay-held-bytes", "must be between 1MiB and 1TiB".into()));
        }
        if self.replay_room_timeout.is_zero() {
            return Err(("replay-room-timeout", "must be more than 0".into()));
        }
        if self.ping_interval.is_zero() || self.pong_timeout <= self.ping_interval {
            return Err(("pong-timeout", "must be longer than ping-interval, which must be more than 0".into()));
        }
        if self.max_options_updates_per_second == 0 {
            return Err(("max-options-updates-per-second", "must be more than 0".into()));
        }
        if self.write_linger > Duration::from_millis(100) {
            // Longer would hold more than a live queue takes of a busy stream.
            return Err(("write-linger", "must be at most 100ms".into()));
        }
        if self.write_timeout < Duration::from_millis(1) || self.slow_window.is_zero() {
            // The kernel takes the write timeout in milliseconds; 0 would turn it off.
            return Err(("write-timeout", "write-timeout must be at least 1ms and slow-window more than 0".into()));
        }
        if self.write_timeout.as_millis() > i32::MAX as u128 {
            // TCP_USER_TIMEOUT is a C int of milliseconds: the kernel refuses more.
            return Err(("write-timeout", "must be at most 24d".into()));
        }
        if !(self.slow_min_rate.is_finite() && self.slow_min_rate >= 0.0) {
            return Err((
                "slow-min-rate",
                "must be a number of 0 or more (events a second; 0 turns the rule off)".into(),
            ));
        }
        for p in &self.zstd_dictionary {
            if !p.is_file() && !p.is_dir() {
                return Err(("zstd-dictionary", format!("{} is not a file or a directory", p.display())));
            }
        }
        // What start-up would refuse (a file zstd cannot load, an id taken with other content,
        // too many, a default not loaded) is named here.
        if let Err(e) = compress::Dictionaries::checked(&self.zstd_dictionary, self.zstd_default_dictionary) {
            return Err(("zstd-dictionary", format!("{e:#}")));
        }
        Ok(())
    }

    pub fn slow_rule(&self) -> slow::SlowRule {
        slow::SlowRule { window: self.slow_window, min_rate: self.slow_min_rate, behind: self.slow_behind }
    }
}

/// At shutdown, how long a subscriber is still sent what the log holds (the last batch, for a
/// live one; more of its replay, for one behind) before its 1001: at most this, and a quarter
/// of `--shutdown-drain-timeout` ([`shutdown_windows`]).
pub const SENDING_AT_SHUTDOWN: Duration = Duration::from_secs(1);
/// At shutdown, how long writes under way may go on: the sending above, and the last write it
/// began (a replay page, at a client reading at a normal pace), before they are abandoned: at
/// most this, and half of `--shutdown-drain-timeout`. The rest of the drain is for the close
/// frames.
pub const WRITES_AT_SHUTDOWN: Duration = Duration::from_secs(2);

/// What is sent at shutdown, and how long writes may go on, within a drain of `drain`.
pub fn shutdown_windows(drain: Duration) -> (Duration, Duration) {
    (SENDING_AT_SHUTDOWN.min(drain / 4), WRITES_AT_SHUTDOWN.min(drain / 2))
}

/// Everything a subscriber needs, shared by all of them.
pub struct Hub {
    pub log: Arc<Log>,
    pub tip: Arc<Tip>,
    /// Hands live events to the subscribers that want them.
    pub dispatcher: Arc<dispatch::Dispatcher>,
    pub metrics: Arc<Metrics>,
    pub dictionaries: Arc<Dictionaries>,
    pub admission: Arc<Admission>,
    pub config: HubConfig,
    pub limits: LimitsConfig,
    /// Cancelled at shutdown, once the sequencer has published its last batch: each subscriber
    /// is sent what the log holds, up to its last event, for at most `sending_at_shutdown`,
    /// then closes with 1001.
    pub shutdown: CancellationToken,
    /// See [`shutdown_windows`].
    pub sending_at_shutdown: Duration,
    /// Cancelled [`WRITES_AT_SHUTDOWN`] after `shutdown` (or with the root): a write still under
    /// way (to a client not reading) is abandoned, and that client gets no close frame.
    pub stop_writes: CancellationToken,
    /// Every subscriber task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    /// Replay pages, shared by replayers close to each other with the same filter and encoding.
    pub replay_pages: Arc<replay_pages::ReplayPages>,
    /// What the pages in replayers' hands may hold (`--replay-held-bytes`).
    pub replay_budget: Arc<replay_budget::ReplayBudget>,
}

impl Hub {
    pub fn new(
        log: Arc<Log>,
        ring: Ring,
        metrics: Arc<Metrics>,
        dictionaries: Arc<Dictionaries>,
        config: HubConfig,
        limits: LimitsConfig,
        stop_writes: CancellationToken,
    ) -> std::io::Result<Hub> {
        let admission = Admission::new(&limits, [metrics.filter_bytes.clone(), metrics.client_message_bytes.clone()]);
        // Live queues together: 4 × --ring-max-bytes, counting each event once per queue
        // holding it (most are shared with the ring and each other, so this bounds the worst
        // case — queues keeping events the ring let go — without ending queues in normal use;
        // half of it is shared out per queue, so stuck clients cannot take it all).
        let dispatcher = dispatch::Dispatcher::start(
            &ring,
            log.tip(),
            4 * config.ring_max_bytes as usize,
            metrics.live_queue_overflows.clone(),
        )?;
        Ok(Hub {
            tip: log.tip(),
            log,
            dispatcher,
            dictionaries,
            admission,
            limits,
            // Stopping writes stops the subscribers too.
            shutdown: stop_writes.child_token(),
            stop_writes,
            sending_at_shutdown: SENDING_AT_SHUTDOWN,
            tasks: TaskTracker::new(),
            replay_budget: replay_budget::ReplayBudget::new(
                config.replay_held_bytes as usize,
                metrics.replay_held_bytes.clone(),
                metrics.replay_held_waits.clone(),
            ),
            replay_pages: Arc::new(replay_pages::ReplayPages::new(
                config.replay_cache_bytes as usize,
                replay_pages::PageCounters::of(&metrics),
            )),
            metrics,
            config,
        })
    }

    /// What is sent at shutdown within `--shutdown-drain-timeout` ([`shutdown_windows`]).
    pub fn with_shutdown_drain(mut self, drain: Duration) -> Hub {
        self.sending_at_shutdown = shutdown_windows(drain).0;
        self
    }
}
