//! Wiring: builds every part from its configuration group, runs the long-lived tasks in one
//! `JoinSet`, and shuts them down in order (DESIGN.md invariant 8).
//!
//! One root cancellation token, with a child per shutdown phase, in this order: `accept`
//! (listeners), `reader` (the relay or upstream reader; the sequencer then writes and
//! publishes its last batch and ends) with `background` (retention, the status history,
//! precompression), the hub's (subscribers are sent what the log holds, then 1001), the hub's
//! writes (abandoned where a client is not reading). Cancelling the root stops them all.
//! Phases wait at most `--shutdown-drain-timeout` each; the log is flushed last.

use crate::config::ServeConfig;
use crate::hub::compress::Dictionaries;
use crate::hub::precompress::Precompressor;
use crate::hub::Hub;
use crate::log::{retention, RelayCursor, StoreKind};
use crate::metrics::Metrics;
use crate::sequencer::{ingest_channel, Sequencer};
use crate::server;
use crate::server::history::History;
use crate::server::public::Public;
use crate::source::relay;
use crate::source::upstream::{UpstreamOptions, UpstreamReader};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tokio_util::task::TaskTracker;

/// Frames queued between the reader and the sequencer. Bounded so a slow disk pushes back on
/// the relay socket instead of growing memory (~1,024 frames ≈ a few MB)...
const FRAME_QUEUE: usize = 1024;
/// ...and in bytes, so 1,024 frames of hostile-sized events cannot take gigabytes.
const FRAME_QUEUE_BYTES: usize = 64 << 20;

/// Where events come from: a relay (primary) or upstream Contrails (replica).
enum Reader {
    Relay(Box<relay::Reader>),
    Upstream(Box<UpstreamReader>),
}

type TaskResult = (&'static str, anyhow::Result<()>);

/// Runs `contrail serve` until SIGINT/SIGTERM or a critical task fails.
pub async fn run(config: ServeConfig) -> anyhow::Result<()> {
    raise_open_file_limit(config.limits.max_subscribers);
    // The listeners first: a port already taken ends the process before it opens the log or
    // connects to the relay (connections that arrive meanwhile wait in the backlog).
    let public_listener = server::bind(config.ops.listen, "public").await?;
    let metrics_listener = server::bind(config.ops.metrics_listen, "metrics").await?;
    let metrics = Arc::new(Metrics::new());
    // Some(why) when the log could be opened only for reading: nothing is ingested.
    let (log, store_failure) = open_log(&config)?;
    let log = Arc::new(log);
    let ingest = store_failure.is_none();
    // Before anything is ingested: what arrives from here on is this process's to age by arrival.
    let arrivals = retention::Arrivals::new(Instant::now(), crate::clock::now_us(), log.newest_time_us()?.unwrap_or(0));
    let arrivals = if config.replica.upstream_url.is_empty() { arrivals } else { arrivals.for_replica() };
    let relay_url = config.relay.relay_url.to_string();
    // Stored cursors are compared by the URL's canonical spelling (older logs stored the URL
    // as written; it is parsed and compared the same way).
    let relay_key = config.relay.relay_url.canonical();
    let same_relay =
        |stored: &str| crate::source::wsclient::WsUrl::parse(stored).is_ok_and(|u| u.canonical() == relay_key);
    let newest_written = log.last_time_us()?;
    let start_seq = match log.relay_cursor()? {
        Some(c) if !same_relay(&c.url) => {
            // Each relay has its own seq space: a cursor for another relay means nothing here.
            tracing::warn!(stored_url = %c.url, stored_seq = c.seq, relay_url = %relay_key, "relay URL changed; starting live");
            None
        }
        Some(RelayCursor { seq, at_time_us: Some(at), .. }) if newest_written > at => {
            // The log took events after the cursor without moving it: this node ran as a
            // replica since. Resuming the relay from the old seq would store again, under new
            // time_us, every event since; starting live loses only what the relay sent between
            // the replica's newest event and now.
            tracing::warn!(
                stored_seq = seq,
                cursor_at_time_us = at,
                last_time_us = newest_written,
                "the log has events newer than its relay cursor (it ran as a replica since): starting live"
            );
            None
        }
        Some(c) => Some(c.seq),
        None => None,
    };
    if config.limits.trusted_proxies.iter().any(|p| p.is_everything()) {
        tracing::warn!("--trusted-proxies lists a block of every address: any client's X-Forwarded-For is believed, so the per-client limits can be dodged by any client");
    }
    tracing::info!(store = ?config.log.store, data_dir = %config.log.data_dir.display(), relay_seq = start_seq, last_time_us = log.last_time_us()?, "log opened");
    if let Some(seq) = start_seq {
        metrics.relay_last_seq.set(seq);
    }

    if !config.replica.upstream_url.is_empty() && ingest {
        // A relay cursor written before cursors kept their time: marked now, before this
        // replica takes newer events, so that a later start as a primary sees it is stale.
        if let Some(c) = log.relay_cursor()?.filter(|c| c.at_time_us.is_none()) {
            log.append(&[], Some(&RelayCursor { at_time_us: Some(newest_written), ..c }))?;
        }
    }

    let (ring, _) = broadcast::channel(config.hub.ring_capacity);
    // Events' cached encodings (zstd frames, v2 messages) are bounded by the budgets of what
    // holds the events: the ring, the live queues (mostly the ring's own events, shared; up to
    // as much again when queues keep events the ring let go), and the events decoded while
    // replay pages are built (held only during a build; the pages' own frames are bounded by
    // --replay-cache-bytes, which serves as their margin here too).
    crate::event::set_encoding_cache_cap(2 * config.hub.ring_max_bytes + config.hub.replay_cache_bytes);
    let (frames_tx, frames_rx) = ingest_channel(FRAME_QUEUE, FRAME_QUEUE_BYTES);
    let mix = Arc::new(crate::mix::EventMix::default());
    let sequencer = Sequencer::new(log.clone(), ring.clone(), metrics.clone(), relay_key)?
        .with_ring_budget(config.hub.ring_capacity, config.hub.ring_max_bytes as usize)
        .with_mix(mix.clone());
    let replica = !config.replica.upstream_url.is_empty();
    // Every run says whether it checks chains, so a later `full` run knows what it missed.
    let chain_epochs = if ingest { Some(crate::verify::start_epoch(&log, config.verify.verify)?) } else { None };
    let mut verify_stage = None;
    let reader = if replica {
        tracing::info!(upstreams = ?config.replica.upstream_url.iter().map(ToString::to_string).collect::<Vec<_>>(), "replica mode");
        let opts = UpstreamOptions {
            replica: config.replica.clone(),
            backoff_min: config.relay.relay_backoff_min,
            backoff_max: config.relay.relay_backoff_max,
            connect_timeout: config.relay.connect_timeout,
            live_when_empty: config.log.store == crate::log::StoreKind::Memory,
            retention: config.retention.retention,
        };
        Reader::Upstream(Box::new(UpstreamReader::new(opts, log.last_time_us()?, metrics.clone(), frames_tx)))
    } else if let Some(chain_epochs) = chain_epochs.filter(|_| config.verify.verify != crate::verify::VerifyMode::Off) {
        // relay reader → verification stage → sequencer; the reader's queue bounds the frames
        // (and their bytes) the stage holds.
        let (verify_tx, verify_rx) = ingest_channel(FRAME_QUEUE, FRAME_QUEUE_BYTES);
        let stage = crate::verify::Stage::new(config.verify.clone(), log.clone(), metrics.clone(), chain_epochs)?;
        verify_stage = Some((stage, verify_rx, frames_tx));
        tracing::info!(mode = ?config.verify.verify, plc = %config.verify.plc_url, "verifying commits");
        Reader::Relay(Box::new(
            relay::Reader::new(config.relay.clone(), start_seq, metrics.clone(), verify_tx).with_raw_frames(true),
        ))
    } else {
        Reader::Relay(Box::new(relay::Reader::new(config.relay.clone(), start_seq, metrics.clone(), frames_tx)))
    };
    let (readiness, upstream) = match &reader {
        Reader::Relay(r) => (r.readiness.clone(), None),
        Reader::Upstream(u) => (u.readiness.clone(), Some(u.current_url.clone())),
    };
    readiness.set_stale_after(config.ops.ready_stale_after);
    {
        let (m, replica) = (metrics.clone(), upstream.is_some());
        readiness.set_max_lag(config.ops.ready_max_lag, move || m.source_lag(replica));
    }
    let dictionaries = Arc::new(Dictionaries::load(&config.hub.zstd_dictionary, config.hub.zstd_default_dictionary)?);
    tracing::info!(ids = dictionaries.ids(), default = dictionaries.default().id, "zstd dictionaries loaded");

    let root = CancellationToken::new();
    let accept = root.child_token();
    let stop_reader = root.child_token();
    let background = root.child_token();
    // Held for the whole run: if the sequencer stops (the log cannot be written), the hub's
    // dispatcher stays up and subscribers keep what is stored.
    let _ring = ring.clone();
    let hub = Arc::new(
        Hub::new(
            log.clone(),
            ring,
            metrics.clone(),
            dictionaries,
            config.hub.clone(),
            config.limits.clone(),
            root.child_token(),
        )?
        .with_shutdown_drain(config.ops.shutdown_drain_timeout),
    );
    let history = Arc::new(History::new(metrics.clone(), log.tip(), mix, replica, config.ops.status_sample_interval));
    let public = Arc::new(Public {
        history: history.clone(),
        hub: hub.clone(),
        metrics: metrics.clone(),
        relay_url: (!replica).then(|| relay_url.clone()),
        upstream,
        readiness: readiness.clone(),
        retention: config.retention.retention,
        verify: (config.verify.verify, config.verify.on_verify_failure, config.verify.on_resolve_failure),
        started: Instant::now(),
    });
    let render_metrics: Arc<dyn Fn() -> String + Send + Sync> = {
        let (m, tip, log) = (metrics.clone(), log.tip(), log.clone());
        let data_dir = (config.log.store == StoreKind::Rocksdb).then(|| config.log.data_dir.clone());
        if data_dir.is_none() {
            // No disk to fill: no free-space figure (a 0 would read as a full disk); no RocksDB.
            let _ = metrics.registry.unregister(Box::new(metrics.store_disk_free_bytes.clone()));
            let _ = metrics.registry.unregister(Box::new(metrics.store_memory_bytes.clone()));
        }
        Arc::new(move || {
            m.set_log_gauges(tip.oldest(), tip.newest(), tip.bytes(), log.background_jobs());
            if let Some(free) = data_dir.as_deref().and_then(free_bytes) {
                m.store_disk_free_bytes.set(free.min(i64::MAX as u64) as i64);
            }
            if let Some(memory) = log.rocks_memory() {
                let parts = [memory.table_readers, memory.memtables, memory.block_cache];
                for (part, bytes) in crate::metrics::STORE_MEMORY_PARTS.into_iter().zip(parts) {
                    m.store_memory_bytes.with_label_values(&[part]).set(bytes.min(i64::MAX as u64) as i64);
                }
            }
            m.render()
        })
    };

    let connections = TaskTracker::new();
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();
    {
        let cancel = background.clone();
        tasks.spawn(async move { ("status history", history.run(cancel).await) });
    }
    // Ingest, and what writes the log beside it: none when the log is open for reading only.
    if ingest {
        tasks.spawn_blocking(move || ("sequencer", sequencer.run(frames_rx).map_err(anyhow::Error::from)));
        if let Some((stage, rx, tx)) = verify_stage {
            // Stops with the reader, at once: frames it still holds were not passed on, so their
            // relay seq was not stored and the relay sends them again after a restart.
            let cancel = stop_reader.clone();
            tasks.spawn(async move {
                if let Err(e) = stage.run(rx, tx, cancel.clone()).await {
                    return ("verification", Err(e));
                }
                // It also ends when the sequencer stops: the sequencer's own result says why.
                cancel.cancelled().await;
                ("verification", Ok(()))
            });
        }
        {
            let cancel = stop_reader.clone();
            tasks.spawn(async move {
                match reader {
                    Reader::Relay(r) => r.run(cancel.clone()).await,
                    Reader::Upstream(u) => u.run(cancel.clone()).await,
                }
                // It also ends when the sequencer stops: the sequencer's own result says why.
                cancel.cancelled().await;
                ("reader", Ok(()))
            });
        }
        {
            let (log, metrics, cancel, opts) =
                (log.clone(), metrics.clone(), background.clone(), config.retention.clone());
            tasks.spawn(async move { ("retention", retention::run(log, metrics, opts, arrivals, cancel).await) });
        }
        {
            let (log, metrics, cancel) = (log.clone(), metrics.clone(), background.clone());
            let dictionary = hub.dictionaries.default().clone();
            let precompressor = Precompressor::new(log, dictionary, metrics, config.log.precompress_window);
            tasks.spawn(async move {
                precompressor.run(cancel.clone()).await;
                // Off, or a thread that could not start: no reason to stop the app.
                cancel.cancelled().await;
                ("precompress", Ok(()))
            });
        }
    }
    {
        let (cancel, conns, public) = (accept.clone(), connections.clone(), public.clone());
        let refusals = |r: crate::metrics::Refusal| metrics.rejected_requests.with_label_values(&[r.as_str()]);
        let (refused, refused_open) =
            (refusals(crate::metrics::Refusal::ConnectRate), refusals(crate::metrics::Refusal::TooManyOpen));
        let gate = Some(crate::hub::limits::ConnectGate::new(&config.limits, refused, refused_open));
        let sockets = listener_sockets(&config.hub);
        tasks.spawn(async move {
            server::serve(public_listener, server::public::handler(public), cancel, conns, gate, sockets).await;
            ("public listener", Ok(()))
        });
    }
    {
        let (cancel, conns) = (accept.clone(), connections.clone());
        // As the public listener's: a scraper that stops reading is closed by the kernel. Its
        // requests are short: no share of the long lines' budget for strangers reaching it.
        let options = server::SocketOptions { long_request_lines: false, ..listener_sockets(&config.hub) };
        let refused =
            metrics.rejected_requests.with_label_values(&[crate::metrics::Refusal::MetricsTooManyOpen.as_str()]);
        let gate = Some(crate::hub::limits::ConnectGate::for_metrics(&config.limits, refused));
        tasks.spawn(async move {
            let handler = server::metrics_handler(render_metrics);
            server::serve(metrics_listener, handler, cancel, conns, gate, options).await;
            ("metrics listener", Ok(()))
        });
    }

    notify_systemd(sd_notify::NotifyState::Ready);

    // Wait for a signal or for any task to end (each is critical while we run).
    let mut failure: Option<anyhow::Error> = None;
    let store_failure = match store_failure {
        Some(e) => Some(e),
        None => tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("shutdown requested");
                None
            }
            Some(done) = tasks.join_next() => {
                let (name, result) = flatten(done);
                match result {
                    Ok(()) => {
                        tracing::error!(task = name, "task stopped unexpectedly; shutting down");
                        None
                    }
                    // Retention writes the log too (its trims): on a full disk while ingest is
                    // quiet (a relay in backoff, a quiet upstream) its write fails first.
                    Err(e) if matches!(name, "sequencer" | "retention") && config.log.store == StoreKind::Rocksdb => {
                        Some(e.context(name))
                    }
                    Err(e) => {
                        tracing::error!(task = name, error = %format!("{e:#}"), "task failed; shutting down");
                        failure = Some(e.context(name));
                        None
                    }
                }
            }
        },
    };
    if let Some(e) = store_failure {
        // The log cannot be written (a full disk, most often). RocksDB will not take writes
        // again in this process, so ingest stops (or never started); but what is stored is
        // still served, and /ready says why, until there is room to resume.
        let error = format!("{e:#}");
        tracing::error!(error = %error, "the log cannot be written: ingest stopped; serving what is stored; exiting once the data dir has free space again, so a restart resumes ingest");
        readiness.set_store_failure(error);
        metrics.store_write_failed.set(1);
        stop_reader.cancel();
        // Room for the restart's recovery (its write-ahead log written to a file) and more.
        let room = FREE_SPACE_TO_RESUME + 2 * config.log.memtable_bytes + log.wal_bytes();
        // Room there already: what is full does not show in the free space (a quota), and the
        // restart may fail the same way. It waits a while, rather than every few seconds.
        let least = match has_room(&config.log.data_dir, room) {
            true => FULL_BUT_NOT_SHOWN_STAY,
            false => std::time::Duration::ZERO,
        };
        tokio::select! {
            _ = shutdown_signal() => tracing::info!("shutdown requested"),
            _ = async { tokio::join!(wait_for_free_space(&config.log.data_dir, room), tokio::time::sleep(least)) } => {
                tracing::warn!("the data dir has free space again: exiting so a restart resumes ingest");
            }
        }
        failure = Some(e);
    }
    // A second signal exits at once.
    let _second_signal = AbortOnDropHandle::new(tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    }));

    notify_systemd(sd_notify::NotifyState::Stopping);
    // In order (DESIGN.md invariant 8): no new connections; the reader stops, so the
    // sequencer writes and publishes what it has and ends; subscribers are sent what the log
    // holds (a live one its last batch; at most a second of it), then 1001, and a moment to
    // drain; then the log is flushed.
    let drain = config.ops.shutdown_drain_timeout;
    accept.cancel();
    stop_reader.cancel();
    background.cancel();
    let drained = tokio::time::timeout(drain, async {
        while let Some(done) = tasks.join_next().await {
            let (name, result) = flatten(done);
            if let Err(e) = result {
                tracing::error!(task = name, error = %format!("{e:#}"), "task failed during shutdown");
                failure.get_or_insert(e.context(name));
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown drain timed out");
    }
    hub.shutdown.cancel();
    hub.tasks.close();
    connections.close();
    let closed = async { tokio::join!(hub.tasks.wait(), connections.wait()) };
    tokio::pin!(closed);
    // Subscribers are sent what is stored, then 1001; writes still under way after a moment
    // (to clients not reading) are abandoned, and the close frames get the rest of the drain.
    let writing = crate::hub::shutdown_windows(drain).1;
    if tokio::time::timeout(writing, &mut closed).await.is_err() {
        hub.stop_writes.cancel();
        if tokio::time::timeout(drain - writing, &mut closed).await.is_err() {
            tracing::warn!("subscribers did not drain in time");
        }
    }
    root.cancel();
    let flush_log = log.clone();
    let flushed = tokio::task::spawn_blocking(move || flush_log.flush()).await.map_err(anyhow::Error::from);
    if let Err(e) = flushed.and_then(|r| r.map_err(anyhow::Error::from)) {
        // After a failed write (a full disk) the flush fails too: the first failure is the
        // one to report.
        tracing::error!(error = %format!("{e:#}"), "flushing the log failed");
        failure.get_or_insert(e.context("flushing the log"));
    }
    tracing::info!(
        last_time_us = log.last_time_us().ok(),
        relay_seq = log.relay_cursor().ok().flatten().map(|c| c.seq),
        "stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Opens the configured log for writing, or, when the disk is too full for that (a restart
/// after a crash on a full disk: RocksDB's recovery writes a file before the open returns), for
/// reading only, with why: what is stored is then served until there is room again, rather
/// than nothing while the process exits and is restarted every few seconds.
fn open_log(config: &ServeConfig) -> anyhow::Result<(crate::log::Log, Option<anyhow::Error>)> {
    let opening = || format!("opening the log in {}", config.log.data_dir.display());
    match config.log.open(config.verify.state_expiry()) {
        Ok(log) => Ok((log, None)),
        Err(e) if config.log.store == StoreKind::Rocksdb && e.is_out_of_space() => {
            let e = anyhow::Error::from(e).context(opening());
            tracing::error!(error = %format!("{e:#}"), "the disk is full: opening the log for reading only");
            match config.log.open_read_only() {
                Ok(log) => Ok((log, Some(e))),
                // (A new data dir on a full disk: nothing to read.) The full disk is the cause.
                Err(read) => Err(e.context(format!("opening it for reading only failed too ({read})"))),
            }
        }
        Err(e) => Err(anyhow::Error::from(e).context(opening())),
    }
}

/// Free space (beyond two memtables) that lets a process stopped by a failed log write exit
/// for its restart: room for the flush and the writes that follow.
const FREE_SPACE_TO_RESUME: u64 = 64 << 20;

/// How long a process whose log cannot be written stays when its disk shows room already.
const FULL_BUT_NOT_SHOWN_STAY: std::time::Duration = std::time::Duration::from_secs(60);

/// Files that must be free (inodes) for a restart: RocksDB's recovery makes a few.
const FREE_FILES_TO_RESUME: u64 = 64;

/// Whether the filesystem holding `dir` has `bytes` available, and files (or cannot be asked).
fn has_room(dir: &std::path::Path, bytes: u64) -> bool {
    let files = match rustix::fs::statvfs(dir) {
        // (Filesystems without a fixed number of files say 0 of them.)
        Ok(s) => s.f_files == 0 || s.f_favail >= FREE_FILES_TO_RESUME,
        Err(_) => true,
    };
    files && free_bytes(dir).is_none_or(|free| free >= bytes)
}

/// Returns once [`has_room`] says so.
async fn wait_for_free_space(dir: &std::path::Path, bytes: u64) {
    while !has_room(dir, bytes) {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Raises the soft limit on open files to the hard one, as Go's runtime does for Jetstream:
/// every subscriber is a socket and the log keeps its files open, and a container runtime's
/// soft limit of 1,024 would otherwise end in a failed write to the log (and a restart) under
/// a load the hard limit allows. Warns when even that is below what `max_subscribers` needs.
fn raise_open_file_limit(max_subscribers: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    // The subscribers' sockets, and room for the log's files, the relay, the metrics listener's
    // connections and the rest.
    let needed = max_subscribers as u64 + OPEN_FILES_BESIDE_SUBSCRIBERS;
    // No hard limit: as many as the kernel lets one process have. At most 2^20 either way (a
    // systemd sets nr_open to 2^30): what the unit and the compose files give.
    let most = limit
        .maximum
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(1 << 20)
        })
        .min(1 << 20);
    let mut now = limit.current.unwrap_or(u64::MAX);
    // The most, or (where that is refused: a system whose per-process cap is below the hard
    // limit) what is needed.
    for to in [most, needed.min(most)] {
        if now >= to {
            break;
        }
        match setrlimit(Resource::Nofile, rustix::process::Rlimit { current: Some(to), ..limit }) {
            Ok(()) => {
                tracing::info!(from = now, to, "raised the soft limit on open files");
                now = to;
            }
            Err(e) => tracing::warn!(error = %e, soft = now, to, "cannot raise the soft limit on open files"),
        }
    }
    if now < needed {
        tracing::warn!(
            limit = now,
            needed,
            "the limit on open files is below --max-subscribers plus {OPEN_FILES_BESIDE_SUBSCRIBERS}: raise it (systemd's LimitNOFILE, docker's --ulimit nofile, ulimit -n), or lower --max-subscribers"
        );
    }
}

/// Open files a server needs beside its subscribers' sockets, at most: the log's files (kept
/// open), the relay or upstream connection, the metrics listener's connections.
const OPEN_FILES_BESIDE_SUBSCRIBERS: u64 = 4096;

/// The space an unprivileged process may still use on the filesystem holding `dir`; `None`
/// (with a rate-limited warning) if it cannot be asked.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    static WARN: std::sync::OnceLock<crate::rate_limited_log::RateLimitedLog> = std::sync::OnceLock::new();
    match rustix::fs::statvfs(dir) {
        Ok(s) => Some(s.f_bavail.saturating_mul(s.f_frsize)),
        Err(e) => {
            WARN.get_or_init(|| crate::rate_limited_log::RateLimitedLog::new(std::time::Duration::from_secs(60)))
                .warn("statvfs", || format!("cannot read the free space of {}: {e}", dir.display()));
            None
        }
    }
}

/// Tells systemd (`Type=notify`) about our state; a no-op when not started by systemd.
fn notify_systemd(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::warn!(error = %e, "sd_notify failed");
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

/// The kernel options every connection to the listeners gets: the kernel judges a
/// subscriber's progress (`TCP_USER_TIMEOUT` = `--write-timeout`) and keeps its backlog in the
/// log (`TCP_NOTSENT_LOWAT`); see `hub::liveness`.
fn listener_sockets(hub: &crate::hub::HubConfig) -> server::SocketOptions {
    server::SocketOptions {
        progress_timeout: Some(hub.write_timeout),
        notsent_lowat: Some(crate::hub::liveness::NOTSENT_LOWAT),
        long_request_lines: true,
    }
}
