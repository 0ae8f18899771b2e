//! The status page's memory: one [`Sample`] every `--status-sample-interval` (5 s) for the
//! last [`KEEP`] samples (an hour at 5 s; a few hundred KB), taken from the metrics and the
//! log's tip, and the event mix of the last [`MIX_INTERVALS`] samples (a minute at 5 s). `GET /status/history` serves the samples, oldest first; the page draws
//! them. Nothing here is read back by the service itself.

use crate::log::Tip;
use crate::metrics::{Compression, Metrics, Wire};
use crate::mix::{EventMix, MixCounts};
use crate::transcode::DropReason;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Samples kept: one hour of them at the default interval.
pub const KEEP: usize = 720;
/// Intervals of event mix kept: the last minute at the default interval.
pub const MIX_INTERVALS: usize = 12;

/// The service at one moment (rates are over the interval since the previous sample).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub ingest_per_second: f64,
    pub delivered_per_second: f64,
    /// Relay lag (primary) or replication lag (replica), seconds.
    pub lag_seconds: f64,
    /// Replica: how far the upstream is ahead of this node, seconds.
    pub upstream_ahead_seconds: f64,
    /// Subscribers by wire, then compression.
    pub subscribers: BTreeMap<&'static str, BTreeMap<&'static str, i64>>,
    /// Drops per second by reason (reasons with none are left out).
    pub drops_per_second: BTreeMap<&'static str, f64>,
    pub log_span_seconds: f64,
    pub log_bytes: u64,
}

/// The counters a rate is computed from.
#[derive(Clone, Copy)]
struct Totals {
    at: Instant,
    ingested: u64,
    delivered: u64,
    drops: [u64; DropReason::ALL.len()],
}

fn totals(m: &Metrics) -> Totals {
    let mut drops = [0u64; DropReason::ALL.len()];
    for (d, n) in DropReason::ALL.iter().zip(drops.iter_mut()) {
        *n = m.drops.with_label_values(&[d.as_str()]).get();
    }
    let delivered = Wire::ALL
        .iter()
        .flat_map(|w| Compression::ALL.iter().map(move |c| (w, c)))
        .map(|(w, c)| m.events_sent.with_label_values(&[w.as_str(), c.as_str()]).get())
        .sum();
    Totals { at: Instant::now(), ingested: m.events_ingested_total(), delivered, drops }
}

#[derive(Default)]
struct State {
    samples: VecDeque<Sample>,
    mix: VecDeque<MixCounts>,
    /// What the routes serve, made once per sample (a request costs a copy of a handle, not
    /// a serialisation of 720 samples or a merge of a minute of collections: a client
    /// pipelining thousands of `HEAD /status/history` must not keep the cores busy).
    samples_json: Option<bytes::Bytes>,
    mix_json: Option<serde_json::Value>,
}

/// The history, shared by the sampler and the routes.
pub struct History {
    metrics: Arc<Metrics>,
    tip: Arc<Tip>,
    mix: Arc<EventMix>,
    replica: bool,
    every: Duration,
    state: Mutex<State>,
}

impl History {
    /// A history sampled every `every`.
    pub fn new(metrics: Arc<Metrics>, tip: Arc<Tip>, mix: Arc<EventMix>, replica: bool, every: Duration) -> Self {
        History { metrics, tip, mix, replica, every, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples every interval until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut prev = totals(&self.metrics);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.every) => {}
            }
            prev = self.sample(prev);
        }
    }

    /// Takes one sample against the previous totals; returns the new totals.
    fn sample(&self, prev: Totals) -> Totals {
        let m = &self.metrics;
        let now = totals(m);
        let secs = now.at.duration_since(prev.at).as_secs_f64().max(0.001);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let mut drops = BTreeMap::new();
        for (i, d) in DropReason::ALL.iter().enumerate() {
            if now.drops[i] > prev.drops[i] {
                drops.insert(d.as_str(), rate(now.drops[i], prev.drops[i]));
            }
        }
        let subscribers = Wire::ALL
            .iter()
            .map(|w| {
                let by_compression = Compression::ALL
                    .iter()
                    .map(|c| (c.as_str(), m.subscribers.with_label_values(&[w.as_str(), c.as_str()]).get()))
                    .collect();
                (w.as_str(), by_compression)
            })
            .collect();
        let span = match (self.tip.oldest(), self.tip.newest()) {
            (Some(o), Some(n)) => n.saturating_sub(o) as f64 / 1e6,
            _ => 0.0,
        };
        let sample = Sample {
            time_ms: crate::clock::now_us() / 1000,
            ingest_per_second: rate(now.ingested, prev.ingested),
            delivered_per_second: rate(now.delivered, prev.delivered),
            lag_seconds: if self.replica { m.replication_lag() } else { m.relay_lag() },
            upstream_ahead_seconds: if self.replica { m.upstream_tip_distance_seconds.get() } else { 0.0 },
            subscribers,
            drops_per_second: drops,
            log_span_seconds: span,
            log_bytes: self.tip.bytes(),
        };
        let mix = self.mix.take();
        let mut st = self.state();
        st.samples.push_back(sample);
        while st.samples.len() > KEEP {
            st.samples.pop_front();
        }
        st.mix.push_back(mix);
        while st.mix.len() > MIX_INTERVALS {
            st.mix.pop_front();
        }
        (st.samples_json, st.mix_json) = (None, None);
        now
    }

    /// Every sample, oldest first (`GET /status/history`).
    pub fn samples_json(&self) -> bytes::Bytes {
        let mut st = self.state();
        if st.samples_json.is_none() {
            let json = serde_json::to_vec(&st.samples).unwrap_or_else(|_| b"[]".to_vec());
            st.samples_json = Some(json.into());
        }
        st.samples_json.clone().expect("set above")
    }

    /// The event mix of the last minute: kinds and the ten busiest collections.
    pub fn mix_json(&self) -> serde_json::Value {
        let mut st = self.state();
        if st.mix_json.is_none() {
            let mut v = crate::mix::summarize(st.mix.iter(), 10);
            v["window_seconds"] = (st.mix.len() as f64 * self.every.as_secs_f64()).into();
            st.mix_json = Some(v);
        }
        st.mix_json.clone().expect("set above")
    }

    /// Replica catch-up: how far behind the upstream this node is and, from how fast that
    /// distance shrank over the last minute, an estimate of the time left.
    pub fn catchup_json(&self) -> serde_json::Value {
        if !self.replica {
            return serde_json::Value::Null;
        }
        let st = self.state();
        let recent: Vec<&Sample> = st.samples.iter().rev().take(MIX_INTERVALS + 1).collect();
        let behind = recent.first().map(|s| s.upstream_ahead_seconds).unwrap_or(0.0);
        let eta = match (recent.first(), recent.last()) {
            (Some(new), Some(old)) if new.time_ms > old.time_ms => {
                let gained = old.upstream_ahead_seconds - new.upstream_ahead_seconds;
                let per_second = gained / ((new.time_ms - old.time_ms) as f64 / 1000.0);
                (behind > 0.0 && per_second > 0.0).then(|| behind / per_second)
            }
            _ => None,
        };
        serde_json::json!({ "behind_seconds": behind, "eta_seconds": eta })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_bounded_to_an_hour_and_rates_come_from_deltas() {
        let m = Arc::new(Metrics::new());
        let h = History::new(m.clone(), Arc::default(), Arc::default(), false, Duration::from_secs(5));
        let mut prev = totals(&m);
        prev.at -= Duration::from_secs(5);
        m.events_ingested.with_label_values(&["commit"]).inc_by(50);
        m.drop_reason(DropReason::BadCar);
        let prev = h.sample(prev);
        let first: Vec<serde_json::Value> = serde_json::from_slice(&h.samples_json()).unwrap();
        assert!((first[0]["ingest_per_second"].as_f64().unwrap() - 10.0).abs() < 0.5, "{}", first[0]);
        assert!(first[0]["drops_per_second"]["bad_car"].as_f64().unwrap() > 0.0);
        assert_eq!(first[0]["subscribers"]["v1"]["zstd"], 0);
        let mut p = prev;
        for _ in 0..KEEP + 10 {
            p = h.sample(p);
        }
        let all: Vec<serde_json::Value> = serde_json::from_slice(&h.samples_json()).unwrap();
        assert_eq!(all.len(), KEEP);
        // Made once per sample: requests between two samples share the bytes.
        assert_eq!(h.samples_json().as_ptr(), h.samples_json().as_ptr());
        let before = h.samples_json();
        let _ = h.sample(p);
        assert_ne!(h.samples_json().as_ptr(), before.as_ptr(), "a new sample, made again");
        assert!(h.samples_json().len() < 400_000, "{} bytes", h.samples_json().len());
        assert_eq!(h.catchup_json(), serde_json::Value::Null, "a primary has no catch-up");
    }

    #[test]
    fn a_catching_up_replica_gets_an_estimate_of_the_time_left() {
        let m = Arc::new(Metrics::new());
        let h = History::new(m.clone(), Arc::default(), Arc::default(), true, Duration::from_secs(5));
        // From 600 s behind, 30 s of the gap closed per 5 s sample: 6 s per second.
        let mut p = totals(&m);
        for i in 0..13u64 {
            m.upstream_tip_distance_seconds.set(600.0 - 30.0 * i as f64);
            p = h.sample(p);
            h.state().samples.back_mut().unwrap().time_ms = 1_000_000 + i * 5_000;
        }
        let c = h.catchup_json();
        assert_eq!(c["behind_seconds"], 240.0);
        let eta = c["eta_seconds"].as_f64().expect("an estimate");
        assert!((eta - 40.0).abs() < 0.01, "{eta}");
        // Caught up: no estimate.
        m.upstream_tip_distance_seconds.set(0.0);
        let _ = h.sample(p);
        assert!(h.catchup_json()["eta_seconds"].is_null());
    }
}
