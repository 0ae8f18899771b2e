//! Every Prometheus metric Contrail exports, in one place.
//!
//! Names follow the Prometheus conventions: `contrail_` prefix, `_total` counters, base units
//! (`_seconds`, `_bytes`). Labels come only from small fixed enums (frame type, drop reason,
//! compression, close reason) — never a DID, collection, IP or user agent.

use crate::transcode::{DropReason, FrameType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

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
    pub store_oldest_time_us: IntGauge,
    pub store_newest_time_us: IntGauge,
    pub store_trims: IntCounter,
    // hub
    pub subscribers: IntGaugeVec,
    pub events_sent: IntCounterVec,
    pub bytes_sent: IntCounterVec,
    pub closes: IntCounterVec,
    pub replay_reads: IntCounter,
    pub lagging_subscribers: IntGauge,
    pub rejected_requests: IntCounterVec,
    // replica mode
    pub replication_lag_seconds: prometheus::Gauge,
    pub upstream_tip_distance_seconds: prometheus::Gauge,
    pub upstream_switches: IntCounter,
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
                "Relay connection attempts after the first.",
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
                "Relay error frames and connection failures, by kind.",
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
            store_oldest_time_us: gauge(&r, "contrail_store_oldest_time_us", "time_us of the oldest event in the log."),
            store_newest_time_us: gauge(&r, "contrail_store_newest_time_us", "time_us of the newest event in the log."),
            store_trims: counter(&r, "contrail_store_trims_total", "Retention trims (range deletes) run."),
            subscribers: {
                let g = IntGaugeVec::new(
                    Opts::new("contrail_hub_subscribers", "Connected subscribers, by compression."),
                    &["compression"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric name");
                g
            },
            events_sent: counter_vec(
                &r,
                "contrail_hub_events_sent_total",
                "Events sent to subscribers.",
                &["compression"],
            ),
            bytes_sent: counter_vec(
                &r,
                "contrail_hub_bytes_sent_total",
                "Bytes sent to subscribers.",
                &["compression"],
            ),
            closes: counter_vec(
                &r,
                "contrail_hub_closes_total",
                "Subscriber connections closed, by reason.",
                &["reason"],
            ),
            replay_reads: counter(&r, "contrail_hub_replay_reads_total", "Batches read from the log for subscribers."),
            lagging_subscribers: gauge(
                &r,
                "contrail_hub_lagging_subscribers",
                "Subscribers reading from the log instead of the ring.",
            ),
            rejected_requests: counter_vec(
                &r,
                "contrail_hub_rejected_requests_total",
                "Subscribe requests refused, by reason.",
                &["reason"],
            ),
            replication_lag_seconds: float_gauge(
                &r,
                "contrail_replication_lag_seconds",
                "Replica: now minus the time_us of the last event received from the upstream.",
            ),
            upstream_tip_distance_seconds: float_gauge(
                &r,
                "contrail_upstream_tip_distance_seconds",
                "Replica: how far the upstream's last cursor message is ahead of our newest event.",
            ),
            upstream_switches: counter(
                &r,
                "contrail_upstream_switches_total",
                "Replica: switches to the next upstream in the list.",
            ),
            registry: r,
        };
        // Pre-create every label value so dashboards see zeros instead of gaps.
        for t in FrameType::ALL {
            m.relay_frames.with_label_values(&[t.as_str()]);
        }
        for d in DropReason::ALL {
            m.drops.with_label_values(&[d.as_str()]);
        }
        for k in ["commit", "identity", "account"] {
            m.events_ingested.with_label_values(&[k]);
        }
        for k in ["connect", "read", "idle_timeout", "future_cursor", "consumer_too_slow", "other", "seq_reset"] {
            m.relay_errors.with_label_values(&[k]);
        }
        for r in crate::hub::CloseReason::ALL {
            m.closes.with_label_values(&[r.as_str()]);
        }
        for r in ["bad_request", "not_websocket", "too_many_subscribers", "too_many_from_ip"] {
            m.rejected_requests.with_label_values(&[r]);
        }
        for c in ["none", "zstd"] {
            m.subscribers.with_label_values(&[c]);
            m.events_sent.with_label_values(&[c]);
            m.bytes_sent.with_label_values(&[c]);
        }
        m
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
