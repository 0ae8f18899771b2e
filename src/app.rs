//! Wiring: builds every part, runs them as tasks in one `JoinSet`, and shuts them down in
//! order (DESIGN.md invariant 8): stop accepting, stop the relay reader, let the sequencer
//! write its last batch and cursor, close subscribers, flush the store.

use crate::config::ServeConfig;
use crate::metrics::Metrics;
use crate::relay;
use crate::sequencer::{now_us, Ring, Sequencer};
use crate::server;
use crate::store::{Log, Store, StoreOptions};
use anyhow::Context;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Frames queued between the relay reader and the sequencer. Bounded so a slow disk pushes
/// back on the relay socket instead of growing memory (~1,024 frames ≈ a few MB).
const FRAME_QUEUE: usize = 1024;

/// What request handlers share.
pub struct Shared {
    pub config: ServeConfig,
    pub hub: crate::hub::Hub,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Log>,
    pub ring: Ring,
    pub relay_reached: Arc<AtomicBool>,
    /// Replica mode: the upstream in use.
    pub upstream: Option<Arc<std::sync::Mutex<String>>>,
    pub started: Instant,
}

/// Where events come from: a relay (primary) or upstream Contrails (replica).
enum Reader {
    Relay(Box<relay::Reader>),
    Upstream(crate::upstream::UpstreamReader),
}

type TaskResult = (&'static str, anyhow::Result<()>);

/// Runs `contrail serve` until SIGINT/SIGTERM or a critical task fails.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let store = Arc::new(match config.store {
        crate::config::StoreKind::Rocksdb => Log::Rocks(
            Store::open(&config.data_dir, StoreOptions { sync_writes: config.sync_writes })
                .with_context(|| format!("opening the log in {}", config.data_dir.display()))?,
        ),
        crate::config::StoreKind::Memory => Log::Memory(crate::memlog::MemoryLog::new(config.memory_bytes)),
    });
    let start_seq = match store.relay_cursor()? {
        Some(c) if c.url == config.relay_url => Some(c.seq),
        Some(c) => {
            // Each relay has its own seq space: a cursor for another relay means nothing here.
            tracing::warn!(stored_url = %c.url, stored_seq = c.seq, relay_url = %config.relay_url, "relay URL changed; starting live");
            None
        }
        None => None,
    };
    tracing::info!(store = ?config.store, data_dir = %config.data_dir.display(), relay_seq = start_seq, last_time_us = store.last_time_us()?, "log opened");
    update_store_gauges(&store, &metrics);
    if let Some(seq) = start_seq {
        metrics.relay_last_seq.set(seq);
    }

    let (ring, _) = broadcast::channel(config.ring_capacity);
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    let sequencer = Sequencer::new(store.clone(), ring.clone(), metrics.clone(), config.relay_url.clone())?;
    let reader = if config.upstream_url.is_empty() {
        let r = relay::Reader::new(
            relay::RelayOptions {
                url: config.relay_url.clone(),
                max_frame_bytes: config.max_frame_bytes as usize,
                idle_timeout: config.relay_idle_timeout,
                backoff_min: config.relay_backoff_min,
                backoff_max: config.relay_backoff_max,
            },
            start_seq,
            metrics.clone(),
            frames_tx,
        )?;
        Reader::Relay(Box::new(r))
    } else {
        let r = crate::upstream::UpstreamReader::new(
            crate::upstream::UpstreamOptions {
                urls: config.upstream_url.clone(),
                stale_timeout: config.upstream_stale_timeout,
                compress: config.upstream_compress,
                backoff_min: config.relay_backoff_min,
                backoff_max: config.relay_backoff_max,
            },
            store.last_time_us()?,
            metrics.clone(),
            frames_tx,
        )?;
        tracing::info!(upstreams = ?config.upstream_url, "replica mode");
        Reader::Upstream(r)
    };
    let (relay_reached, upstream) = match &reader {
        Reader::Relay(r) => (r.reached.clone(), None),
        Reader::Upstream(u) => (u.reached.clone(), Some(u.current_url.clone())),
    };
    let dictionary = crate::hub::compress::Dictionary::load(config.zstd_dictionary.as_deref())?;
    tracing::info!(dictionary_id = dictionary.id, bytes = dictionary.raw.len(), "zstd dictionary loaded");
    let hub = crate::hub::Hub {
        dictionary,
        admission: crate::hub::limits::Admission::new(
            config.max_subscribers,
            config.max_connections_per_ip,
            config.max_events_per_second_per_ip,
        ),
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        opts: crate::hub::HubOptions {
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            write_timeout: config.write_timeout,
            slow_window: config.slow_window,
            slow_min_rate: config.slow_min_rate,
            slow_behind: config.slow_behind,
            trusted_proxies: config.trusted_proxies.clone(),
        },
    };
    let shared = Arc::new(Shared {
        config: config.clone(),
        hub,
        metrics: metrics.clone(),
        store: store.clone(),
        ring,
        relay_reached,
        upstream,
        started: Instant::now(),
    });

    let stop_accepting = CancellationToken::new();
    let stop_reader = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();

    tasks.spawn_blocking(move || ("sequencer", sequencer.run(frames_rx).map_err(anyhow::Error::from)));
    {
        let cancel = stop_reader.clone();
        tasks.spawn(async move {
            match reader {
                Reader::Relay(r) => r.run(cancel).await,
                Reader::Upstream(u) => u.run(cancel).await,
            }
            ("reader", Ok(()))
        });
    }
    {
        let (store, metrics, cancel, cfg) = (store.clone(), metrics.clone(), stop_background.clone(), config.clone());
        tasks.spawn(async move { ("retention", retention_loop(store, metrics, cfg, cancel).await) });
    }
    let public = server::bind(config.listen, "public").await?;
    let metrics_l = server::bind(config.metrics_listen, "metrics").await?;
    {
        let (cancel, conns, sh) = (stop_accepting.clone(), connections.clone(), shared.clone());
        tasks.spawn(async move {
            server::serve(public, crate::public::handler(sh), cancel, conns).await;
            ("public listener", Ok(()))
        });
    }
    {
        let (cancel, conns, m) = (stop_accepting.clone(), connections.clone(), metrics.clone());
        tasks.spawn(async move {
            server::serve(metrics_l, server::metrics_handler(m), cancel, conns).await;
            ("metrics listener", Ok(()))
        });
    }

    crate::util::sd_notify("READY=1");

    // Wait for a signal or for any task to end (each is critical while we run).
    let mut failure: Option<anyhow::Error> = None;
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("shutdown requested"),
        Some(done) = tasks.join_next() => {
            let (name, result) = flatten(done);
            match result {
                Ok(()) => tracing::error!(task = name, "task stopped unexpectedly; shutting down"),
                Err(e) => {
                    tracing::error!(task = name, error = %format!("{e:#}"), "task failed; shutting down");
                    failure = Some(e.context(name));
                }
            }
        }
    }
    // A second signal exits at once.
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });

    crate::util::sd_notify("STOPPING=1");
    // In order: no new connections; subscribers get 1001 and a moment to drain; the reader
    // stops, so the sequencer writes what it has and ends; then the store is flushed.
    stop_accepting.cancel();
    shared.hub.shutdown.cancel();
    shared.hub.tasks.close();
    connections.close();
    if tokio::time::timeout(config.shutdown_drain_timeout, shared.hub.tasks.wait()).await.is_err() {
        tracing::warn!("subscribers did not drain in time");
    }
    stop_reader.cancel();
    stop_background.cancel();
    let drain = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = tasks.join_next().await {
            let (name, result) = flatten(done);
            if let Err(e) = result {
                tracing::error!(task = name, error = %format!("{e:#}"), "task failed during shutdown");
                failure.get_or_insert(e.context(name));
            }
        }
        connections.wait().await;
    })
    .await;
    if drain.is_err() {
        tracing::warn!("shutdown drain timed out");
    }
    let flush_store = store.clone();
    tokio::task::spawn_blocking(move || flush_store.flush()).await??;
    tracing::info!(last_time_us = store.last_time_us()?, relay_seq = store.relay_cursor()?.map(|c| c.seq), "stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn flatten(done: Result<TaskResult, tokio::task::JoinError>) -> TaskResult {
    match done {
        Ok(r) => r,
        Err(e) => ("task", Err(anyhow::anyhow!("panicked or was cancelled: {e}"))),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn update_store_gauges(store: &Log, metrics: &Metrics) {
    metrics.store_disk_bytes.set(store.disk_bytes() as i64);
    if let Ok(Some(t)) = store.oldest_time_us() {
        metrics.store_oldest_time_us.set(t as i64);
    }
    if let Ok(Some(t)) = store.newest_time_us() {
        metrics.store_newest_time_us.set(t as i64);
    }
}

/// Retention by age, then by disk budget, on a blocking thread every `trim_interval`; the
/// log gauges (size, oldest and newest event) are refreshed every few seconds in between.
async fn retention_loop(
    store: Arc<Log>,
    metrics: Arc<Metrics>,
    cfg: ServeConfig,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    const GAUGES_EVERY: Duration = Duration::from_secs(5);
    let mut next_trim = Instant::now() + cfg.trim_interval;
    loop {
        let wait = GAUGES_EVERY.min(next_trim.saturating_duration_since(Instant::now()));
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        let trim = Instant::now() >= next_trim;
        if trim {
            next_trim = Instant::now() + cfg.trim_interval;
        }
        let (store, metrics, cfg) = (store.clone(), metrics.clone(), cfg.clone());
        tokio::task::spawn_blocking(move || {
            if trim {
                enforce_retention(&store, &metrics, &cfg)
            } else {
                update_store_gauges(&store, &metrics);
                Ok(())
            }
        })
        .await??;
    }
}

/// One retention pass. Public for tests.
pub fn enforce_retention(store: &Log, metrics: &Metrics, cfg: &ServeConfig) -> anyhow::Result<()> {
    let cutoff = now_us().saturating_sub(cfg.retention.as_micros() as u64);
    if store.oldest_time_us()?.is_some_and(|t| t < cutoff) {
        store.trim_before(cutoff)?;
        metrics.store_trims.inc();
        tracing::info!(cutoff_time_us = cutoff, "trimmed events older than retention");
    }
    // Disk budget: drop the oldest tenth of the time span per step until under budget.
    for _ in 0..10 {
        if cfg.max_disk_bytes == 0 || store.disk_bytes() <= cfg.max_disk_bytes {
            break;
        }
        let (Some(old), Some(new)) = (store.oldest_time_us()?, store.newest_time_us()?) else { break };
        let cut = old + (new - old) / 10 + 1;
        store.trim_before(cut.min(new))?;
        metrics.store_trims.inc();
        tracing::warn!(
            cutoff_time_us = cut,
            disk_bytes = store.disk_bytes(),
            budget = cfg.max_disk_bytes,
            "trimmed oldest events for the disk budget"
        );
    }
    update_store_gauges(store, metrics);
    Ok(())
}
