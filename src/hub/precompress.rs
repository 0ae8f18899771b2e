//! Compressed frames stored ahead of replay: a background thread compresses the stored events
//! of the last `--precompress-window` (1h by default) with the default dictionary (what
//! `compress=true` gets) and stores each frame beside its event in the log, so a compressed
//! replay of that stretch reads frames instead of compressing them.
//!
//! Why: compressing bounds a compressed replay (2.2 µs per event at zstd level 1, one core
//! ≈ 450k events/s), while a plain one reads and writes over a million events/s; with stored
//! frames a lone compressed replayer runs at 0.8 of plain (BENCHMARKS.md). At a live
//! firehose's rate (a few thousand events/s) the thread costs well under 1% of a core; during
//! a backfill it runs at the lowest CPU priority, so ingest keeps the cores and the frames
//! catch up afterwards. A window, not the whole log: a stored frame takes ~220 B on disk
//! against ~135 B for its compacted event, and replays are mostly reconnects from a recent
//! cursor. Replay compresses whatever has no stored frame (older than the window, the log's
//! newest events, a frame that does not check out) and the few events of a narrow filter's
//! page (cheaper than reading the page's frames), so nothing depends on the thread.
//!
//! The frames are a cache of the events (DESIGN.md invariant 5: compressed at most once per
//! dictionary, now also across restarts): written without the WAL, trimmed with the events and
//! past the window, and each one carries a checksum of the dictionary's content and a CRC-32
//! of the JSON it was made from, which replay checks.

use super::compress::Dictionary;
use crate::event::{view_value, EventKind};
use crate::log::Log;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Events compressed per log read and write: small writes (~55 KB), since this thread's write
/// can hold up the sequencer's in RocksDB's write queue while it is not scheduled.
const BATCH: usize = 256;
/// Ingest faster than this (events/s) is a backfill, not the live firehose: the thread waits
/// for it to end (ingest keeps both cores; the frames catch up afterwards).
const BUSY_INGEST: u64 = 20_000;
/// How long a caught-up (or waiting) thread sleeps before looking at the log again.
const IDLE: Duration = Duration::from_millis(200);
/// How long it waits after the log failed it (a full disk) before trying again.
const AFTER_ERROR: Duration = Duration::from_secs(5);
/// How often the frames older than the window are deleted.
const TRIM_EVERY: Duration = Duration::from_secs(60);
/// The thread's nice value: the lowest priority, so it takes only cores nothing else wants.
const NICE: i32 = 19;

/// A stored frame's value: the dictionary's fingerprint, a CRC-32 of the event's JSON (both
/// 4 bytes LE), then the frame.
pub fn stored_value(dictionary: &Dictionary, json: &[u8], frame: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + frame.len());
    v.extend_from_slice(&dictionary.fingerprint.to_le_bytes());
    v.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
    v.extend_from_slice(frame);
    v
}

/// Whether a stored value was made with the dictionary of fingerprint `dictionary`.
pub fn made_with(value: &[u8], dictionary: u32) -> bool {
    value.get(..4) == Some(&dictionary.to_le_bytes()[..])
}

/// The frame in a stored value, if it was made with the dictionary of fingerprint
/// `dictionary` from exactly `json` (a frame for another dictionary or another event is never
/// sent).
pub fn stored_frame<'v>(value: &'v [u8], dictionary: u32, json: &[u8]) -> Option<&'v [u8]> {
    let crc = u32::from_le_bytes(value.get(4..8)?.try_into().ok()?);
    (made_with(value, dictionary) && crc == crc32fast::hash(json) && value.len() > 8).then(|| &value[8..])
}

/// Deletes the stored frames of events older than `window_us` before the log's newest.
pub fn trim_window(log: &Log, window_us: u64) -> crate::log::Result<()> {
    let newest = log.tip().newest().unwrap_or(0);
    log.trim_compressed_frames_before(newest.saturating_sub(window_us))
}

/// What the compressing thread keeps: the frames of the events within `window` of the log's
/// newest (in the log's `time_us`, DESIGN.md invariant 9), and where it is.
pub struct Precompressor {
    log: Arc<Log>,
    dictionary: Arc<Dictionary>,
    metrics: Arc<Metrics>,
    window_us: u64,
    /// The next `time_us` to compress; unknown until the first step.
    next: Option<u64>,
    /// Events ingested, per kind; the total when last measured, when, and the verdict.
    ingested: Vec<prometheus::IntCounter>,
    last_ingested: Option<(u64, Instant, bool)>,
    /// Where the frames are written when the compressing thread runs at the lowest priority: a
    /// thread of the runtime's blocking pool, at normal priority (a write may lead RocksDB's
    /// write queue, with the sequencer's batch behind it, while this thread is not scheduled).
    writes: Option<tokio::runtime::Handle>,
}

impl Precompressor {
    pub fn new(log: Arc<Log>, dictionary: Arc<Dictionary>, metrics: Arc<Metrics>, window: Duration) -> Precompressor {
        let window_us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        let ingested =
            EventKind::ALL.iter().map(|k| metrics.events_ingested.with_label_values(&[k.as_str()])).collect();
        Precompressor { log, dictionary, metrics, window_us, next: None, ingested, last_ingested: None, writes: None }
    }

    /// Runs the compressing thread until `cancel` fires. Its own errors never stop the app
    /// (the frames are a cache); a full disk stops ingest through RocksDB as any write would.
    pub async fn run(mut self, cancel: CancellationToken) {
        if !self.log.stores_compressed_frames() || self.window_us == 0 {
            return;
        }
        // The trim at normal priority, on a thread of the blocking pool: it ingests a tombstone,
        // which holds RocksDB's write queue for a moment, and this thread at the lowest
        // priority could hold it (and the sequencer behind it) for long while not scheduled.
        let (log, window_us, trim_cancel) = (self.log.clone(), self.window_us, cancel.clone());
        let metrics = self.metrics.clone();
        // It ends at `cancel`, after the trim in flight (awaited below: a trim is not left
        // running past the store's last flush).
        let trims = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut every = tokio::time::interval(TRIM_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = trim_cancel.cancelled() => return,
                    _ = every.tick() => {}
                }
                let log = log.clone();
                match tokio::task::spawn_blocking(move || trim_window(&log, window_us)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        metrics.precompress_errors.inc();
                        tracing::warn!(error = %e, "trimming compressed frames failed; trying again later");
                    }
                    // A panic: said, and tried again (left, the frames would pile up to the
                    // whole retention).
                    Err(e) if e.is_panic() => {
                        metrics.precompress_errors.inc();
                        tracing::error!("trimming compressed frames panicked; trying again later");
                    }
                    Err(_) => return, // the runtime is shutting down
                }
            }
        }));
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_cancel = cancel.clone();
        self.writes = Some(tokio::runtime::Handle::current());
        let spawned = std::thread::Builder::new().name("contrail-precompress".into()).spawn(move || {
            lower_priority();
            self.run_until(&thread_cancel);
            let _ = done_tx.send(());
        });
        match spawned {
            Ok(_) => {
                if done_rx.await.is_err() {
                    tracing::error!("the compressing thread panicked; compressed replays compress");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not start the compressing thread; compressed replays compress"),
        }
        // Frames stored before still leave the window until the app stops.
        let _ = trims.await;
    }

    fn run_until(&mut self, cancel: &CancellationToken) {
        while !cancel.is_cancelled() {
            if self.ingest_is_busy() {
                self.report_behind();
                sleep_unless_cancelled(IDLE, cancel);
                continue;
            }
            let pause = match self.step() {
                Ok(true) => continue,
                Ok(false) => IDLE,
                Err(e) => {
                    self.metrics.precompress_errors.inc();
                    tracing::warn!(error = %e, "storing compressed frames failed; trying again later");
                    AFTER_ERROR
                }
            };
            sleep_unless_cancelled(pause, cancel);
        }
    }

    /// How far the frames are behind the log's newest event (while waiting for ingest too).
    fn report_behind(&self) {
        if self.next.is_some() {
            if let Some(newest) = self.log.tip().newest() {
                self.set_behind(newest);
            }
        }
    }

    fn set_behind(&self, newest: u64) {
        let done = self.next.unwrap_or(0).saturating_sub(1);
        self.metrics.precompress_behind_seconds.set(newest.saturating_sub(done) as f64 / 1e6);
    }

    /// Whether ingest runs faster than [`BUSY_INGEST`]: measured over at least [`IDLE`]
    /// (the verdict holds in between), not busy until first measured.
    fn ingest_is_busy(&mut self) -> bool {
        let total: u64 = self.ingested.iter().map(|c| c.get()).sum();
        let now = Instant::now();
        match self.last_ingested {
            Some((before, at, busy)) => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs < IDLE.as_secs_f64() {
                    return busy;
                }
                let busy = total.saturating_sub(before) as f64 / secs > BUSY_INGEST as f64;
                self.last_ingested = Some((total, now, busy));
                busy
            }
            None => {
                self.last_ingested = Some((total, now, false));
                false
            }
        }
    }

    /// Compresses and stores up to [`BATCH`] events; whether there may be more. The first step
    /// finds where the stored frames end (the log dropped any past its newest event when it
    /// was opened). (The frames older than the window go in [`trim_window`], every
    /// [`TRIM_EVERY`], not on this thread.)
    pub fn step(&mut self) -> crate::log::Result<bool> {
        let log = &self.log;
        // The tip, not a read: it moves with every append (DESIGN.md invariant 9).
        let newest = log.tip().newest().unwrap_or(0);
        let window_start = newest.saturating_sub(self.window_us);
        let next = match self.next {
            Some(t) => t,
            None => log.newest_compressed_frame()?.map_or(0, |t| t + 1),
        };
        let from = next.max(window_start);
        let (dictionary, mut frames, mut last) = (&self.dictionary, Vec::new(), None);
        let scanned = log.scan(from, BATCH, |t, value| {
            // A corrupt value is replay's to report; here it simply gets no frame.
            if let Some(view) = view_value(value) {
                frames.push((t, stored_value(dictionary, view.json, &dictionary.compress(view.json))));
            }
            last = Some(t);
            true
        })?;
        let stored = frames.len() as u64;
        if !frames.is_empty() {
            match &self.writes {
                Some(runtime) => {
                    let log = log.clone();
                    let write = runtime.spawn_blocking(move || log.put_compressed_frames(&frames));
                    runtime.block_on(write).map_err(|e| std::io::Error::other(e.to_string()))??;
                }
                None => log.put_compressed_frames(&frames)?,
            }
        }
        let next = last.map_or(from, |t| t + 1);
        self.next = Some(next);
        // The gauge first, so a later scrape than one that saw the count sees it too.
        self.set_behind(newest);
        self.metrics.precompressed_events.inc_by(stored);
        Ok(scanned == BATCH)
    }
}

/// This thread only (on Linux a thread id is a process id to `setpriority`).
fn lower_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
        tracing::debug!(error = %e, "could not lower the compressing thread's priority");
    }
}

fn sleep_unless_cancelled(pause: Duration, cancel: &CancellationToken) {
    let until = Instant::now() + pause;
    while !cancel.is_cancelled() {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind};
    use crate::log::rocks::{RocksLog, RocksOptions};

    /// Event `i` at `time_us` 1000 + i.
    fn event(i: u64) -> Event {
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let mut out = Vec::new();
        Event::begin(&mut out, did, EventKind::Identity);
        out.extend_from_slice(format!(",\"identity\":{{\"n\":{i},\"handle\":\"user{i}.example.com\"}}}}").as_bytes());
        let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
        e.stamp(1000 + i);
        e
    }

    fn rocks(dir: &std::path::Path) -> Arc<Log> {
        Arc::new(
            Log::rocks(RocksLog::open(dir, RocksOptions { sync_writes: false, ..Default::default() }).unwrap())
                .unwrap(),
        )
    }

    fn dictionary() -> Arc<Dictionary> {
        Dictionary::new(super::super::compress::JETSTREAM_V1.to_vec(), 0).unwrap()
    }

    /// A precompressor keeping the whole log, and the metrics it counts in.
    fn whole(log: &Arc<Log>) -> (Precompressor, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        (Precompressor::new(log.clone(), dictionary(), metrics.clone(), Duration::MAX), metrics)
    }

    fn stored(log: &Log) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        log.scan_compressed_frames(0, u64::MAX, |t, v| {
            out.push((t, v.to_vec()));
            true
        })
        .unwrap();
        out
    }

    fn run_to_end(p: &mut Precompressor) {
        while p.step().unwrap() {}
    }

    #[test]
    fn every_stored_event_gets_its_frame_and_a_restart_resumes_after_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let log = rocks(dir.path());
        let dict = dictionary();
        // An operator's file may carry a known id with other content.
        let mut other = super::super::compress::JETSTREAM_V1.to_vec();
        *other.last_mut().unwrap() ^= 1;
        let same_id_other_content = Dictionary::new(other, 1).unwrap();
        assert_eq!(same_id_other_content.id, dict.id);
        let (mut p, metrics) = whole(&log);
        let events: Vec<Event> = (0..2500).map(event).collect();
        log.append(&events, None).unwrap();
        run_to_end(&mut p);
        let frames = stored(&log);
        assert_eq!(frames.len(), 2500);
        let mut dec = zstd::bulk::Decompressor::with_dictionary(&dict.raw).unwrap();
        for ((t, v), e) in frames.iter().zip(&events) {
            assert_eq!(*t, e.time_us);
            let frame = stored_frame(v, dict.fingerprint, e.json()).expect("made with this dictionary from this JSON");
            assert_eq!(dec.decompress(frame, 1 << 20).unwrap(), e.json());
            assert_eq!(stored_frame(v, same_id_other_content.fingerprint, e.json()), None, "another dictionary's");
            assert_eq!(stored_frame(v, dict.fingerprint, b"{}"), None, "another event's");
        }
        assert_eq!(metrics.precompressed_events.get(), 2500);
        assert_eq!(metrics.precompress_behind_seconds.get(), 0.0);

        // New events: the next step takes only them.
        log.append(&(2500..2510).map(event).collect::<Vec<_>>(), None).unwrap();
        assert!(!p.step().unwrap(), "fewer than a batch: caught up");
        assert_eq!((stored(&log).len(), metrics.precompressed_events.get()), (2510, 2510));

        // Retention trims the frames with the events.
        log.trim_before(1000 + 2000).unwrap();
        let left = stored(&log);
        assert_eq!((left.len(), left[0].0), (510, 1000 + 2000));

        // A frame past the log's newest event (its event lost to a power cut) goes when the
        // log is opened; the next run resumes after the newest stored frame.
        log.put_compressed_frames(&[(1000 + 2600, stored_value(&dict, b"{}", b"bad"))]).unwrap();
        drop((p, log));
        let log = rocks(dir.path());
        assert_eq!(log.newest_compressed_frame().unwrap(), Some(1000 + 2509));
        let (mut p, metrics) = whole(&log);
        run_to_end(&mut p);
        assert_eq!(metrics.precompressed_events.get(), 0, "nothing compressed again");
    }

    #[test]
    fn the_disk_budget_trims_events_for_events_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = rocks(dir.path());
        log.append(&(0..5000).map(event).collect::<Vec<_>>(), None).unwrap();
        run_to_end(&mut whole(&log).0);
        log.flush().unwrap();
        let (events, all) = (log.event_bytes(), log.disk_bytes());
        assert!(all > events + 100_000, "the frames take disk: {all} in all, {events} for events");
        let opts = crate::log::retention::RetentionConfig {
            retention: Duration::from_secs(3600),
            max_disk_bytes: events + 1,
            trim_interval: Duration::from_secs(60),
        };
        crate::log::retention::enforce(&log, &Metrics::new(), &opts, 10_000, crate::log::retention::ByArrival::UNKNOWN)
            .unwrap();
        assert_eq!(log.oldest_time_us().unwrap(), Some(1000), "no event trimmed for the cache's sake");
    }

    #[test]
    fn a_log_opened_with_stored_frames_off_drops_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = rocks(dir.path());
        log.append(&(0..100).map(event).collect::<Vec<_>>(), None).unwrap();
        run_to_end(&mut whole(&log).0);
        drop(log);
        let off = RocksOptions { sync_writes: false, compressed_frames: false, ..Default::default() };
        let log = Arc::new(Log::rocks(RocksLog::open(dir.path(), off).unwrap()).unwrap());
        assert_eq!(log.newest_compressed_frame().unwrap(), None);
        assert_eq!(log.read_from(0, 1000).unwrap().len(), 100, "the events stay");
        drop(log);
        let log = rocks(dir.path());
        assert_eq!(stored(&log).len(), 0, "on again: none until compressed again");
    }

    #[test]
    fn the_frames_survive_a_clean_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = rocks(dir.path());
            log.append(&(0..100).map(event).collect::<Vec<_>>(), None).unwrap();
            run_to_end(&mut whole(&log).0);
            log.flush().unwrap();
        }
        let log = rocks(dir.path());
        assert_eq!(stored(&log).len(), 100, "written without the WAL, flushed at shutdown");
        let (mut p, metrics) = whole(&log);
        run_to_end(&mut p);
        assert_eq!(metrics.precompressed_events.get(), 0, "nothing compressed twice");
    }

    #[test]
    fn only_the_window_before_the_newest_event_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let log = rocks(dir.path());
        // Events at 1000..3500 µs; a window of 1 ms: the frames of 2499..3499 only.
        log.append(&(0..2500).map(event).collect::<Vec<_>>(), None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut p = Precompressor::new(log.clone(), dictionary(), metrics.clone(), Duration::from_millis(1));
        run_to_end(&mut p);
        let frames = stored(&log);
        assert_eq!((frames.len(), frames[0].0), (1001, 3499 - 1000));
        // The log moves on by 500 µs: the next trim drops what left the window.
        log.append(&(2500..3000).map(event).collect::<Vec<_>>(), None).unwrap();
        trim_window(&log, 1_000).unwrap();
        run_to_end(&mut p);
        let frames = stored(&log);
        assert_eq!((frames.len(), frames[0].0, frames.last().unwrap().0), (1001, 3999 - 1000, 3999));
        assert_eq!(metrics.precompressed_events.get(), 1501);
        // Off: no thread at all.
        let off = Precompressor::new(log.clone(), dictionary(), metrics.clone(), Duration::ZERO);
        let cancel = CancellationToken::new();
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(off.run(cancel));
    }

    #[test]
    fn the_thread_waits_while_ingest_is_busy_and_still_says_how_far_behind() {
        let dir = tempfile::tempdir().unwrap();
        let log = rocks(dir.path());
        log.append(&(0..100).map(event).collect::<Vec<_>>(), None).unwrap();
        let (mut p, metrics) = whole(&log);
        run_to_end(&mut p);
        assert!(!p.ingest_is_busy(), "not busy until measured");
        // 100,000 events ingested in the last second: a backfill.
        p.last_ingested = Some((0, Instant::now() - Duration::from_secs(1), false));
        metrics.events_ingested.with_label_values(&["commit"]).inc_by(100_000);
        assert!(p.ingest_is_busy());
        assert!(p.ingest_is_busy(), "the verdict holds until the next measurement");
        log.append(&(100..150).map(event).collect::<Vec<_>>(), None).unwrap();
        p.report_behind();
        assert_eq!(metrics.precompress_behind_seconds.get(), 50e-6, "50 µs of log time not stored yet");
        // A quiet second later: not busy.
        p.last_ingested = Some((100_000, Instant::now() - Duration::from_secs(1), true));
        assert!(!p.ingest_is_busy());
    }

    #[test]
    fn a_memory_log_stores_nothing() {
        let log = Log::memory(crate::log::memory::MemoryLog::new(1 << 20));
        assert!(!log.stores_compressed_frames());
        log.put_compressed_frames(&[(1, vec![1, 2, 3])]).unwrap();
        assert_eq!(log.newest_compressed_frame().unwrap(), None);
    }
}
