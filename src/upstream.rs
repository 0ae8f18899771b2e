//! Replica mode: follow an upstream Contrail's `/subscribe` instead of a relay, keeping the
//! upstream's `time_us` and bytes unchanged, so a cursor means the same event on the primary
//! and on every replica (clients fail over with the same cursor: no rewind, no gap, no
//! duplicate).
//!
//! - Resumes with `cursor` = the newest `time_us` in its own log (0 when empty: the whole
//!   upstream window); the inclusive cursor's repeat of that event is skipped.
//! - Every event must have a larger `time_us` than the one before; anything else is an error
//!   and the connection is reopened from the cursor.
//! - Asks for cursor messages (`informCursorSeconds`) and uses them as a heartbeat: an
//!   upstream that sends neither events nor cursor messages for the stale timeout is dropped
//!   for the next one in the list. Chains work: an upstream may itself be a replica.

use crate::event::{Event, EventKind};
use crate::metrics::Metrics;
use crate::relay::{connect, RelayUrl};
use crate::sequencer::{now_us, IngestFrame};
use anyhow::{bail, Context};
use fastwebsockets::{FragmentCollector, OpCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest event JSON accepted from an upstream once decompressed.
const MAX_EVENT_JSON: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    pub urls: Vec<String>,
    /// Switch upstreams after this long without an event or a cursor message.
    pub stale_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Subscribe compressed, with the dictionary the upstream serves at `/dictionary`.
    pub compress: bool,
}

/// The fields a replica needs from an event line; simd-json reads them in place.
#[derive(serde::Deserialize)]
struct Meta<'a> {
    kind: &'a str,
    time_us: u64,
    #[serde(borrow)]
    commit: Option<CommitMeta<'a>>,
}

#[derive(serde::Deserialize)]
struct CommitMeta<'a> {
    collection: Option<&'a str>,
}

pub struct UpstreamReader {
    opts: UpstreamOptions,
    urls: Vec<RelayUrl>,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<IngestFrame>,
    last_time_us: u64,
    current: usize,
    pub reached: Arc<AtomicBool>,
    /// Index of the upstream in use, for `/status`.
    pub current_url: Arc<std::sync::Mutex<String>>,
}

impl UpstreamReader {
    pub fn new(
        opts: UpstreamOptions,
        last_time_us: u64,
        metrics: Arc<Metrics>,
        tx: mpsc::Sender<IngestFrame>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(!opts.urls.is_empty(), "no upstream URL");
        let urls =
            opts.urls.iter().map(|u| RelayUrl::parse_with_path(u, "/subscribe")).collect::<anyhow::Result<Vec<_>>>()?;
        let first = opts.urls[0].clone();
        Ok(UpstreamReader {
            opts,
            urls,
            metrics,
            tx,
            last_time_us,
            current: 0,
            reached: Arc::new(AtomicBool::new(false)),
            current_url: Arc::new(std::sync::Mutex::new(first)),
        })
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = self.opts.backoff_min;
        let mut failures_in_a_row = 0usize;
        loop {
            let before = self.last_time_us;
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.session() => r,
            };
            self.metrics.relay_connected.set(0);
            if self.tx.is_closed() {
                return;
            }
            let e = result.err().unwrap_or_else(|| anyhow::anyhow!("upstream closed the connection"));
            if self.last_time_us != before {
                failures_in_a_row = 0;
                backoff = self.opts.backoff_min;
            }
            failures_in_a_row += 1;
            tracing::warn!(upstream = %self.opts.urls[self.current], error = %format!("{e:#}"), "upstream connection ended");
            if self.urls.len() > 1 {
                self.current = (self.current + 1) % self.urls.len();
                self.metrics.upstream_switches.inc();
                *self.current_url.lock().unwrap_or_else(|p| p.into_inner()) = self.opts.urls[self.current].clone();
                tracing::info!(upstream = %self.opts.urls[self.current], "switching upstream");
            }
            // Try every upstream once before waiting; then back off.
            if failures_in_a_row >= self.urls.len() {
                let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(self.opts.backoff_max);
            }
        }
    }

    async fn session(&mut self) -> anyhow::Result<()> {
        let url = &self.urls[self.current];
        let inform = (self.opts.stale_timeout.as_secs() / 3).clamp(1, 600);
        // Inclusive cursor: the event at `last_time_us` comes again and is skipped.
        let mut params = vec![format!("cursor={}", self.last_time_us), format!("informCursorSeconds={inform}")];
        // Compressed links save most of the cross-region bandwidth; the dictionary is the one
        // the upstream itself uses, fetched fresh for each connection.
        let mut decompressor = None;
        if self.opts.compress {
            let base = url.path.strip_suffix("/subscribe").unwrap_or("");
            let dict = crate::relay::http_get(url, &format!("{base}/dictionary"))
                .await
                .context("fetching the upstream's dictionary")?;
            decompressor = Some(zstd::bulk::Decompressor::with_dictionary(&dict)?);
            params.push("compress=true".into());
        }
        let target = url.target_with(params.into_iter());
        let mut ws = connect(url, target).await?;
        ws.set_auto_pong(true);
        self.reached.store(true, Ordering::Relaxed);
        self.metrics.relay_connected.set(1);
        tracing::info!(upstream = %self.opts.urls[self.current], cursor = self.last_time_us, "upstream connected");
        let mut ws = FragmentCollector::new(ws);
        loop {
            let frame = tokio::time::timeout(self.opts.stale_timeout, ws.read_frame())
                .await
                .map_err(|_| {
                    anyhow::anyhow!("upstream stale: no event or cursor message for {:?}", self.opts.stale_timeout)
                })?
                .context("reading from upstream")?;
            match (frame.opcode, decompressor.as_mut()) {
                (OpCode::Text, _) => self.handle(frame.payload.to_vec()).await?,
                (OpCode::Binary, Some(d)) => {
                    // Events are at most a few MB (a 1 MiB record rendered as JSON).
                    let json =
                        d.decompress(&frame.payload, MAX_EVENT_JSON).context("decompressing an upstream event")?;
                    self.handle(json).await?
                }
                (OpCode::Binary, None) => bail!("upstream sent a binary frame to an uncompressed subscription"),
                (OpCode::Close, _) => bail!("upstream closed the connection"),
                _ => {}
            }
        }
    }

    async fn handle(&mut self, json: Vec<u8>) -> anyhow::Result<()> {
        let mut scratch = json.clone();
        let meta: Meta<'_> =
            simd_json::serde::from_slice(&mut scratch).context("upstream sent an event that is not v1 JSON")?;
        if meta.kind == "cursor" {
            // The upstream's position for this stream: how far behind it we are.
            let behind = meta.time_us.saturating_sub(self.last_time_us);
            self.metrics.upstream_tip_distance_seconds.set(behind as f64 / 1e6);
            return Ok(());
        }
        if meta.time_us <= self.last_time_us {
            if meta.time_us == self.last_time_us {
                return Ok(()); // the inclusive cursor's repeat
            }
            bail!("upstream time_us {} is not after {}", meta.time_us, self.last_time_us);
        }
        let kind = match meta.kind {
            "commit" => EventKind::Commit,
            "identity" => EventKind::Identity,
            "account" => EventKind::Account,
            other => bail!("upstream sent an unknown event kind {other:?}"),
        };
        let collection = meta.commit.and_then(|c| c.collection).map(str::to_string);
        let time_us = meta.time_us;
        let event = Event::from_json(json, kind, collection.as_deref()).context("upstream event is not in v1 shape")?;
        anyhow::ensure!(event.time_us == time_us, "upstream event time_us mismatch");
        self.last_time_us = time_us;
        self.metrics.replication_lag_seconds.set((now_us() as f64 - time_us as f64) / 1e6);
        self.metrics.upstream_tip_distance_seconds.set(0.0);
        let frame = IngestFrame { seq: None, relay_time_us: None, events: vec![event], keep_time: true };
        if self.tx.send(frame).await.is_err() {
            bail!("sequencer stopped");
        }
        Ok(())
    }
}
