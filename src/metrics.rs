//! Every Prometheus metric Contrail exports, in one place.
//!
//! Names follow the Prometheus conventions: `contrail_` prefix, `_total` counters, base units
//! (`_seconds`, `_bytes`). Labels come only from small fixed enums (frame type, drop reason,
//! compression, close reason) — never a DID, collection, IP or user agent.

use crate::event::EventKind;
use crate::transcode::{DropReason, FrameType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

contrail_core::label_enum! {
    /// `contrail_relay_errors_total{kind}`: relay error frames and connection failures.
    pub enum RelayErrorKind {
        Connect => "connect",
        Read => "read",
        IdleTimeout => "idle_timeout",
        FutureCursor => "future_cursor",
        ConsumerTooSlow => "consumer_too_slow",
        Other => "other",
        SeqReset => "seq_reset",
    }
}

contrail_core::label_enum! {
    /// `contrail_hub_closes_total{reason}`: why a subscriber's connection ended (its close
    /// code and text are in `hub::close`).
    pub enum CloseReason {
        ClientClosed => "client_closed",
        Shutdown => "shutdown",
        TooSlow => "too_slow",
        PingTimeout => "ping_timeout",
        WriteTimeout => "write_timeout",
        WriteError => "write_error",
        ReadError => "read_error",
        InvalidOptions => "invalid_options",
        BadMessage => "bad_message",
        MessageTooBig => "message_too_big",
        /// A data frame on the v2 wire, which is server-push only.
        UnexpectedMessage => "unexpected_message",
        /// More pings in a second than a keep-alive needs.
        PingFlood => "ping_flood",
        /// More messages the server ignores (pongs, binary messages, text that is not an
        /// `options_update`), or more frames, in a second than any client needs.
        MessageFlood => "message_flood",
        /// An `options_update` whose filter would take the filters' memory past
        /// `--max-filter-bytes` (or its IP's share).
        FilterBudget => "filter_budget",
        /// A message that would take incoming messages' memory past
        /// `--max-client-message-bytes` (or its IP's share) while it arrived.
        MessageBudget => "message_budget",
        /// A replayer waited longer than `--replay-room-timeout` for room under
        /// `--replay-held-bytes`.
        ReplayBudget => "replay_budget",
        /// A frame no client may send (unmasked, reserved bits, an unknown opcode, a bad
        /// fragment or control frame): RFC 6455 says fail the connection.
        ProtocolError => "protocol_error",
        Internal => "internal",
    }
}

contrail_core::label_enum! {
    /// `contrail_hub_rejected_requests_total{reason}`: why a subscribe request was refused.
    pub enum Refusal {
        BadRequest => "bad_request",
        NotWebsocket => "not_websocket",
        TooManySubscribers => "too_many_subscribers",
        TooManyFromIp => "too_many_from_ip",
        /// Its IPv6 /48 holds a quarter of `--max-subscribers` already.
        TooManyFromSite => "too_many_from_site",
        /// Over `--max-connects-per-second-per-ip`, refused at accept.
        ConnectRate => "connect_rate",
        /// Its client already holds `--max-connections-per-ip` connections still in plain
        /// HTTP, refused at accept.
        TooManyOpen => "too_many_open",
        /// The metrics listener's: its client already holds 8 connections, or all clients
        /// 64, refused at accept.
        MetricsTooManyOpen => "metrics_too_many_open",
        /// Its filter would take the filters' memory past `--max-filter-bytes` (or its IP's
        /// share).
        FilterBudget => "filter_budget",
    }
}

contrail_core::label_enum! {
    /// The `wire` label of the per-subscriber metrics: Jetstream v1's `/subscribe`, or v2's
    /// `subscribeEvents`.
    pub enum Wire {
        V1 => "v1",
        V2 => "v2",
    }
}

contrail_core::label_enum! {
    /// The `compression` label of the per-subscriber metrics.
    pub enum Compression {
        None => "none",
        Zstd => "zstd",
    }
}

contrail_core::label_enum! {
    /// `contrail_verify_commits_total{result}`: what verification (`crate::verify`) made of
    /// each commit or sync.
    pub enum Outcome {
        /// Everything the mode checks held.
        Verified => "verified",
        Failed => "failed",
        /// The repo's DID could not be resolved in time.
        Unresolved => "unresolved",
    }
}

contrail_core::label_enum! {
    /// `contrail_did_resolutions_total{result}`.
    pub enum ResolveResult {
        Ok => "ok",
        NotFound => "not_found",
        BadDocument => "bad_document",
        Error => "error",
        Timeout => "timeout",
        /// Every request slot stayed taken until the deadline (not remembered as a failure).
        Busy => "busy",
        Unsupported => "unsupported",
    }
}

impl Compression {
    pub fn of(compress: bool) -> Compression {
        if compress {
            Compression::Zstd
        } else {
            Compression::None
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    // relay
    pub relay_frames: IntCounterVec,
    pub relay_bytes: IntCounter,
    pub drops: IntCounterVec,
    pub relay_reconnects: IntCounter,
    pub relay_connected: IntGauge,
    pub relay_last_seq: IntGauge,
    pub relay_lag_seconds: prometheus::Gauge,
    pub relay_seq_gaps: IntCounter,
    pub relay_duplicates: IntCounter,
    pub relay_errors: IntCounterVec,
    // sequencer + store
    pub events_ingested: IntCounterVec,
    pub store_write_seconds: Histogram,
    pub store_batch_events: Histogram,
    pub store_disk_bytes: IntGauge,
    pub store_disk_free_bytes: IntGauge,
    pub store_memory_bytes: IntGaugeVec,
    pub store_flushes_running: IntGauge,
    pub store_write_failed: IntGauge,
    pub store_compactions_running: IntGauge,
    pub store_oldest_time_us: IntGauge,
    pub store_newest_time_us: IntGauge,
    pub store_trims: IntCounter,
    pub precompressed_events: IntCounter,
    pub precompress_errors: IntCounter,
    pub precompress_behind_seconds: prometheus::Gauge,
    // hub
    pub subscribers: IntGaugeVec,
    pub events_sent: IntCounterVec,
    pub bytes_sent: IntCounterVec,
    pub socket_writes: IntCounter,
    pub live_delay: Histogram,
    pub closes: IntCounterVec,
    pub replay_reads: IntCounter,
    pub lagging_subscribers: IntGauge,
    pub filter_bytes: IntGauge,
    pub client_message_bytes: IntGauge,
    pub live_queue_overflows: IntCounter,
    pub replay_pages_built: IntCounter,
    pub replay_pages_shared: IntCounter,
    pub replay_stored_frames: IntCounter,
    pub replay_held_bytes: IntGauge,
    pub replay_overtaken: IntCounter,
    pub cursors_before_log: IntCounter,
    pub holes_told: IntCounter,
    pub replay_held_waits: IntCounter,
    pub rejected_requests: IntCounterVec,
    // verification
    pub verify_commits: IntCounterVec,
    pub verify_failures: IntCounterVec,
    pub verify_dropped_events: IntCounter,
    pub verify_desynchronized: IntCounter,
    pub verify_seconds: Histogram,
    pub did_resolutions: IntCounterVec,
    pub did_key_histories: IntCounterVec,
    pub did_resolve_seconds: Histogram,
    pub did_cache_entries: IntGauge,
    // replica mode
    pub replication_lag_seconds: prometheus::Gauge,
    pub upstream_tip_distance_seconds: prometheus::Gauge,
    pub upstream_switches: IntCounter,
    pub upstream_gaps: IntCounter,
    /// The times the two lag gauges are measured from (unix µs; 0: none yet): the lag is
    /// worked out again whenever it is read, so it grows while nothing arrives instead of
    /// staying at its last value.
    relay_time_us: std::sync::atomic::AtomicI64,
    replicated_time_us: std::sync::atomic::AtomicI64,
    /// A replica's reading of its upstream's clock (`/status`'s `now_us`), as its unix µs minus
    /// the µs of this process's monotonic clock at that moment: carried on by the monotonic
    /// clock, so a step of this machine's wall clock moves nothing. `i64::MIN`: none (this
    /// machine's clock stands in).
    upstream_clock_offset_us: std::sync::atomic::AtomicI64,
    /// The monotonic clock's zero for that offset.
    created: std::time::Instant,
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric name");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric name");
    h
}

/// The parts of `contrail_store_memory_bytes`.
pub const STORE_MEMORY_PARTS: [&str; 3] = ["table_readers", "memtables", "block_cache"];

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("contrail_build_info", "Always 1; labels carry the version and commit."),
            &["version", "commit"],
        )
        .expect("valid metric");
        r.register(Box::new(build.clone())).expect("unique metric name");
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), option_env!("CONTRAIL_GIT_COMMIT").unwrap_or("unknown")])
            .set(1);
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).ok();

        let m = Metrics {
            relay_frames: counter_vec(&r, "contrail_relay_frames_total", "Relay frames received, by type.", &["type"]),
            relay_bytes: counter(&r, "contrail_relay_bytes_total", "Relay frame bytes received."),
            drops: counter_vec(
                &r,
                "contrail_drops_total",
                "Frames or ops that produced no event, by reason.",
                &["reason"],
            ),
            relay_reconnects: counter(
                &r,
                "contrail_relay_reconnects_total",
                "Relay (a replica: upstream) connection attempts after the first.",
            ),
            relay_connected: gauge(&r, "contrail_relay_connected", "1 while the relay socket is open."),
            relay_last_seq: gauge(&r, "contrail_relay_last_seq", "Last relay seq persisted."),
            relay_lag_seconds: float_gauge(
                &r,
                "contrail_relay_lag_seconds",
                "Now minus the relay time of the last frame persisted.",
            ),
            relay_seq_gaps: counter(&r, "contrail_relay_seq_gaps_total", "Frames whose seq skipped ahead of last + 1."),
            relay_duplicates: counter(
                &r,
                "contrail_relay_duplicate_frames_total",
                "Frames with seq <= the last persisted seq, skipped.",
            ),
            relay_errors: counter_vec(
                &r,
                "contrail_relay_errors_total",
                "Relay error frames and connection failures (a replica: its upstreams'), by kind.",
                &["kind"],
            ),
            events_ingested: counter_vec(
                &r,
                "contrail_events_ingested_total",
                "Events persisted to the log, by kind.",
                &["kind"],
            ),
            store_write_seconds: histogram(
                &r,
                "contrail_store_write_seconds",
                "Time to write one batch to RocksDB.",
                prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
            ),
            store_batch_events: histogram(
                &r,
                "contrail_store_batch_events",
                "Events per write batch.",
                prometheus::exponential_buckets(1.0, 2.0, 14).expect("valid buckets"),
            ),
            store_disk_bytes: gauge(&r, "contrail_store_disk_bytes", "Size of the log's SST and WAL files."),
            store_disk_free_bytes: gauge(
                &r,
                "contrail_store_disk_free_bytes",
                "Space left for Contrail on the filesystem holding the data dir (not exported with --store memory).",
            ),
            store_memory_bytes: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "contrail_store_memory_bytes",
                        "RocksDB's memory: its open files' indexes outside the block cache (table_readers), the memtables, the block cache (not exported with --store memory).",
                    ),
                    &["part"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric name");
                for part in STORE_MEMORY_PARTS {
                    g.with_label_values(&[part]).set(0);
                }
                g
            },
            store_flushes_running: gauge(&r, "contrail_store_flushes_running", "RocksDB memtable flushes running now."),
            store_write_failed: gauge(
                &r,
                "contrail_store_write_failed",
                "1 when the log could not be written: ingest stopped, stored events still served.",
            ),
            store_compactions_running: gauge(
                &r,
                "contrail_store_compactions_running",
                "RocksDB compactions running now.",
            ),
            store_oldest_time_us: gauge(&r, "contrail_store_oldest_time_us", "time_us of the oldest event in the log."),
            store_newest_time_us: gauge(&r, "contrail_store_newest_time_us", "time_us of the newest event in the log."),
            store_trims: counter(&r, "contrail_store_trims_total", "Retention trims (range deletes) run."),
            precompressed_events: counter(
                &r,
                "contrail_store_precompressed_events_total",
                "Stored events compressed ahead of replay (with the default dictionary) and stored beside them.",
            ),
            precompress_errors: counter(
                &r,
                "contrail_store_precompress_errors_total",
                "Failed reads or writes of the thread storing compressed frames (it tries again later).",
            ),
            precompress_behind_seconds: float_gauge(
                &r,
                "contrail_store_precompress_behind_seconds",
                "How far the stored compressed frames are behind the log's newest event, in its time_us.",
            ),
            subscribers: {
                let g = IntGaugeVec::new(
                    Opts::new("contrail_hub_subscribers", "Connected subscribers, by wire and compression."),
                    &["wire", "compression"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric name");
                g
            },
            events_sent: counter_vec(
                &r,
                "contrail_hub_events_sent_total",
                "Events sent to subscribers.",
                &["wire", "compression"],
            ),
            bytes_sent: counter_vec(
                &r,
                "contrail_hub_bytes_sent_total",
                "Bytes sent to subscribers.",
                &["wire", "compression"],
            ),
            socket_writes: counter(
                &r,
                "contrail_hub_socket_writes_total",
                "Writes subscriber sockets took (send calls that sent something: events, pings, cursor messages); events sent per write is roughly how many each carried.",
            ),
            live_delay: histogram(
                &r,
                "contrail_hub_live_delay_seconds",
                "Per flush of live events to a subscriber: wall-clock time from the oldest event's time_us (when it was stored) to the socket taking the flush. Includes waiting for the client's socket, rate pacing and --write-linger; events read from the log are not timed.",
                vec![0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0],
            ),
            closes: counter_vec(
                &r,
                "contrail_hub_closes_total",
                "Subscriber connections closed, by reason.",
                &["reason"],
            ),
            replay_reads: counter(&r, "contrail_hub_replay_reads_total", "Replay pages taken by subscribers (batches of the log, built or shared)."),
            lagging_subscribers: gauge(
                &r,
                "contrail_hub_lagging_subscribers",
                "Subscribers reading from the log instead of their live queue.",
            ),
            filter_bytes: gauge(
                &r,
                "contrail_hub_filter_bytes",
                "Memory subscribers' filters hold (wantedDids, wantedCollections), counted against --max-filter-bytes.",
            ),
            client_message_bytes: gauge(
                &r,
                "contrail_hub_client_message_bytes",
                "Memory subscribers' incoming messages hold beyond each connection's first 64 KiB, counted against --max-client-message-bytes.",
            ),
            live_queue_overflows: counter(
                &r,
                "contrail_hub_live_queue_overflows_total",
                "Live subscribers sent back to the log because their queue filled (or the dispatcher fell behind the ring).",
            ),
            replay_pages_built: counter(
                &r,
                "contrail_hub_replay_pages_built_total",
                "Replay pages (up to 1,024 stored events rendered as one filter and encoding's frames) built from the log.",
            ),
            replay_pages_shared: counter(
                &r,
                "contrail_hub_replay_pages_shared_total",
                "Replay pages a subscriber took from another one's build instead of building its own.",
            ),
            replay_stored_frames: counter(
                &r,
                "contrail_hub_replay_stored_frames_total",
                "Compressed frames replay pages took as stored ahead of replay instead of compressing them.",
            ),
            replay_held_bytes: gauge(
                &r,
                "contrail_hub_replay_held_bytes",
                "Bytes of replay pages in subscribers' hands, each page counted once however many share it (bounded by --replay-held-bytes).",
            ),
            replay_overtaken: counter(
                &r,
                "contrail_hub_replay_overtaken_total",
                "Times retention or the disk budget trimmed events a replaying subscriber had not read yet (it goes on from the oldest event left; Jetstream does the same, silently).",
            ),
            cursors_before_log: counter(
                &r,
                "contrail_hub_cursors_before_log_total",
                "Subscriptions whose cursor was older than the log (not 0 or 1): they start at the oldest event, told the gap if they take cursor messages.",
            ),
            holes_told: counter(
                &r,
                "contrail_hub_holes_told_total",
                "Times a subscriber's stream passed a hole in the log (events a replica's upstreams lost before it had them), telling it as a gap if it takes cursor messages.",
            ),
            replay_held_waits: counter(
                &r,
                "contrail_hub_replay_held_waits_total",
                "Times a replaying subscriber waited for room under --replay-held-bytes before taking its next page.",
            ),
            rejected_requests: counter_vec(
                &r,
                "contrail_hub_rejected_requests_total",
                "Subscribe requests refused, by reason.",
                &["reason"],
            ),
            verify_commits: counter_vec(
                &r,
                "contrail_verify_commits_total",
                "Commits and syncs verified (--verify), by result.",
                &["result"],
            ),
            verify_failures: counter_vec(
                &r,
                "contrail_verify_failures_total",
                "Verification failures, by reason.",
                &["reason"],
            ),
            verify_dropped_events: counter(
                &r,
                "contrail_verify_dropped_events_total",
                "Events dropped because their commit failed verification (--on-verify-failure drop).",
            ),
            verify_desynchronized: counter(
                &r,
                "contrail_verify_desynchronized_total",
                "Repos' chains lost (their next commit anchors again): a commit that did not continue its repo's last verified one, failed or was not checked, was not seen whole by subscribers, or was signed only by a key the repo rotated away from.",
            ),
            verify_seconds: histogram(
                &r,
                "contrail_verify_seconds",
                "CPU time to verify one commit (signature, proof).",
                prometheus::exponential_buckets(0.00001, 2.0, 16).expect("valid buckets"),
            ),
            did_resolutions: counter_vec(
                &r,
                "contrail_did_resolutions_total",
                "DID documents fetched for verification, by result.",
                &["result"],
            ),
            did_key_histories: counter_vec(
                &r,
                "contrail_did_key_histories_total",
                "PLC audit logs fetched after a signature failed against a repo's current key (a commit signed before a key rotation), by result (ok, error; busy: not fetched, as more repos' were asked for within ten minutes than are kept).",
                &["result"],
            ),
            did_resolve_seconds: histogram(
                &r,
                "contrail_did_resolve_seconds",
                "Time to fetch one DID document.",
                prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets"),
            ),
            did_cache_entries: gauge(&r, "contrail_did_cache_entries", "Signing keys cached in memory."),
            replication_lag_seconds: float_gauge(
                &r,
                "contrail_replication_lag_seconds",
                "Replica: now, by the upstream's clock (its /status now_us; this machine's until it says), minus the time_us of the last event received from the upstream, or of the last cursor message saying there is nothing newer.",
            ),
            upstream_tip_distance_seconds: float_gauge(
                &r,
                "contrail_upstream_tip_distance_seconds",
                "Replica: how far the upstream's last cursor message is ahead of our newest event.",
            ),
            upstream_gaps: counter(
                &r,
                "contrail_upstream_gaps_total",
                "Replica: resumptions where no upstream still had our newest event (their logs were trimmed past it), so events after it may be missing here.",
            ),
            upstream_switches: counter(
                &r,
                "contrail_upstream_switches_total",
                "Replica: switches to the next upstream in the list.",
            ),
            registry: r,
            relay_time_us: Default::default(),
            replicated_time_us: Default::default(),
            upstream_clock_offset_us: std::sync::atomic::AtomicI64::new(i64::MIN),
            created: std::time::Instant::now(),
        };
        // Pre-create every label value so dashboards see zeros instead of gaps.
        for t in FrameType::ALL {
            m.relay_frames.with_label_values(&[t.as_str()]);
        }
        for d in DropReason::ALL {
            m.drops.with_label_values(&[d.as_str()]);
        }
        for k in EventKind::ALL {
            m.events_ingested.with_label_values(&[k.as_str()]);
        }
        for k in RelayErrorKind::ALL {
            m.relay_errors.with_label_values(&[k.as_str()]);
        }
        for r in CloseReason::ALL {
            m.closes.with_label_values(&[r.as_str()]);
        }
        for r in Refusal::ALL {
            m.rejected_requests.with_label_values(&[r.as_str()]);
        }
        for o in Outcome::ALL {
            m.verify_commits.with_label_values(&[o.as_str()]);
        }
        for r in contrail_core::verify::Reason::ALL {
            m.verify_failures.with_label_values(&[r.as_str()]);
        }
        for r in ResolveResult::ALL {
            m.did_resolutions.with_label_values(&[r.as_str()]);
        }
        for r in ["ok", "error"] {
            m.did_key_histories.with_label_values(&[r]);
        }
        for w in Wire::ALL {
            for c in Compression::ALL {
                m.subscribers.with_label_values(&[w.as_str(), c.as_str()]);
                m.events_sent.with_label_values(&[w.as_str(), c.as_str()]);
                m.bytes_sent.with_label_values(&[w.as_str(), c.as_str()]);
            }
        }
        m
    }

    pub fn relay_error(&self, kind: RelayErrorKind) {
        self.relay_errors.with_label_values(&[kind.as_str()]).inc();
    }

    pub fn drop_reason(&self, reason: DropReason) {
        self.drops.with_label_values(&[reason.as_str()]).inc();
    }

    /// Events ingested so far, all kinds.
    pub fn events_ingested_total(&self) -> u64 {
        EventKind::ALL.iter().map(|k| self.events_ingested.with_label_values(&[k.as_str()]).get()).sum()
    }

    /// The relay time of the last frame persisted (unix µs).
    pub fn relay_time(&self, t: i64) {
        self.relay_time_us.store(t, std::sync::atomic::Ordering::Relaxed);
        self.relay_lag();
    }

    /// Replica: the `time_us` of the last event received from the upstream.
    pub fn replicated_time(&self, t: i64) {
        self.replicated_time_us.store(t, std::sync::atomic::Ordering::Relaxed);
        self.replication_lag();
    }

    /// `contrail_relay_lag_seconds` now: how long ago, by the relay's time, its last persisted
    /// frame was sent (0 before any).
    pub fn relay_lag(&self) -> f64 {
        Self::lag(&self.relay_time_us, &self.relay_lag_seconds)
    }

    /// `contrail_replication_lag_seconds` now: by the upstream's clock, once it has said what
    /// it reads (the events' `time_us` are its primary's stamps; this machine's clock may be
    /// minutes off both, which made a caught-up replica look that far behind, or ahead).
    pub fn replication_lag(&self) -> f64 {
        Self::lag_at(self.upstream_now_us(), &self.replicated_time_us, &self.replication_lag_seconds)
    }

    /// A replica: its upstream's clock read `upstream_now_us` at `at` (`None`: it does not say;
    /// this machine's clock stands in again, not the last upstream's).
    pub fn upstream_clock(&self, reading: Option<(u64, std::time::Instant)>) {
        let Some((upstream_now_us, at)) = reading else {
            self.upstream_clock_offset_us.store(i64::MIN, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let mono = at.saturating_duration_since(self.created).as_micros() as i64;
        let offset = (upstream_now_us.min(i64::MAX as u64) as i64).saturating_sub(mono);
        self.upstream_clock_offset_us.store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    /// The upstream's clock now, as last read and carried on since; this machine's clock before
    /// any reading (or from an upstream that does not say). On a primary, this machine's.
    pub fn upstream_now_us(&self) -> u64 {
        match self.upstream_clock_offset_us.load(std::sync::atomic::Ordering::Relaxed) {
            i64::MIN => crate::clock::now_us(),
            offset => offset.saturating_add(self.created.elapsed().as_micros() as i64).max(0) as u64,
        }
    }

    /// The relay lag (a replica: the replication lag) now, or `None` before the first sample
    /// since the process started (the gauge's 0 then means "not known", not "caught up").
    pub fn source_lag(&self, replica: bool) -> Option<f64> {
        let since = if replica { &self.replicated_time_us } else { &self.relay_time_us };
        let known = since.load(std::sync::atomic::Ordering::Relaxed) > 0;
        let lag = if replica { self.replication_lag() } else { self.relay_lag() };
        known.then_some(lag)
    }

    fn lag(since: &std::sync::atomic::AtomicI64, gauge: &prometheus::Gauge) -> f64 {
        Self::lag_at(crate::clock::now_us(), since, gauge)
    }

    fn lag_at(now_us: u64, since: &std::sync::atomic::AtomicI64, gauge: &prometheus::Gauge) -> f64 {
        let t = since.load(std::sync::atomic::Ordering::Relaxed);
        if t > 0 {
            gauge.set((now_us as i64 - t) as f64 / 1e6);
        }
        gauge.get()
    }

    /// Copies the log's tip into its gauges, and works the lags out again (called before each
    /// scrape: the gauges are fed from the tip, never read back).
    pub fn set_log_gauges(
        &self,
        oldest: Option<u64>,
        newest: Option<u64>,
        bytes: u64,
        (flushes, compactions): (u64, u64),
    ) {
        self.store_oldest_time_us.set(oldest.unwrap_or(0) as i64);
        self.store_newest_time_us.set(newest.unwrap_or(0) as i64);
        self.store_disk_bytes.set(bytes as i64);
        self.store_flushes_running.set(flushes as i64);
        self.store_compactions_running.set(compactions as i64);
        self.relay_lag();
        self.replication_lag();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
