//! The sequencer: the single writer between the relay reader and the log.
//!
//! It gives every event its `time_us` — `max(now_us, last + 1)`, with `last` recovered from
//! the log at startup, so it is unique and strictly increasing even when the wall clock steps
//! back or the process restarts (DESIGN.md invariant 1) — writes the events with the relay
//! seq they complete in one batch (invariant 2), and only then publishes each event, encoded
//! once and shared by `Arc`, to the hub's broadcast ring (invariant 3).
//!
//! Batching is group commit: the thread blocks for the first frame, then takes whatever else
//! is already queued (up to [`MAX_BATCH_EVENTS`]) and writes it all at once. An idle firehose
//! gets per-frame latency; a busy one gets big batches, without a timer.

use crate::event::{Event, EventKind};
use crate::metrics::Metrics;
use crate::store::{Log, RelayCursor, StoreError};
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};

/// Upper bound on one write batch: ~4 MB of JSON, a few milliseconds of RocksDB work.
pub const MAX_BATCH_EVENTS: usize = 4096;

/// Assigns `time_us` values. Pure: the caller passes the clock reading.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stamper {
    last: u64,
}

impl Stamper {
    /// Starts after `last`, the newest `time_us` already handed out (0 for none).
    pub fn new(last: u64) -> Self {
        Stamper { last }
    }

    /// The next `time_us` for a clock reading of `now_us`.
    pub fn next(&mut self, now_us: u64) -> u64 {
        self.last = now_us.max(self.last + 1);
        self.last
    }

    pub fn last(&self) -> u64 {
        self.last
    }
}

/// The wall clock in unix microseconds.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// What a reader hands over for one frame: its events and the relay seq that, once they are
/// written, the cursor may advance to.
#[derive(Debug)]
pub struct IngestFrame {
    /// The relay seq; `None` from an upstream Contrail (a replica resumes from its log).
    pub seq: Option<i64>,
    pub relay_time_us: Option<i64>,
    pub events: Vec<Event>,
    /// The events already carry their `time_us` (a replica keeps the primary's) instead of
    /// being stamped here. The upstream reader guarantees they increase.
    pub keep_time: bool,
}

/// The shared broadcast ring the hub reads live events from.
pub type Ring = broadcast::Sender<Arc<Event>>;

pub struct Sequencer {
    /// `contrail_events_ingested_total` per kind, resolved once (a label lookup per event
    /// costs a hash and a lock).
    ingested: [prometheus::IntCounter; 3],
    store: Arc<Log>,
    ring: Ring,
    metrics: Arc<Metrics>,
    relay_url: String,
    stamper: Stamper,
    clock: Box<dyn FnMut() -> u64 + Send>,
}

impl Sequencer {
    /// Resumes after the newest `time_us` in `store`.
    pub fn new(store: Arc<Log>, ring: Ring, metrics: Arc<Metrics>, relay_url: String) -> Result<Self, StoreError> {
        let stamper = Stamper::new(store.last_time_us()?);
        let ingested = [EventKind::Commit, EventKind::Identity, EventKind::Account]
            .map(|k| metrics.events_ingested.with_label_values(&[k.as_str()]));
        Ok(Sequencer { ingested, store, ring, metrics, relay_url, stamper, clock: Box::new(now_us) })
    }

    /// Replaces the wall clock (tests step it backwards).
    pub fn with_clock(mut self, clock: impl FnMut() -> u64 + Send + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    pub fn last_time_us(&self) -> u64 {
        self.stamper.last()
    }

    /// Stamps, persists and publishes the events of `frames` (in order), with the cursor of
    /// the last frame. Store failure is fatal to the caller (DESIGN.md invariant 6).
    pub fn write(&mut self, frames: &mut Vec<IngestFrame>) -> Result<(), StoreError> {
        if frames.is_empty() {
            return Ok(());
        }
        let cursor =
            frames.iter().rev().find_map(|f| f.seq).map(|seq| RelayCursor { url: self.relay_url.clone(), seq });
        let relay_time = frames.iter().rev().find_map(|f| f.relay_time_us);
        let mut events: Vec<Event> = Vec::with_capacity(frames.iter().map(|f| f.events.len()).sum());
        for f in frames.drain(..) {
            for mut e in f.events {
                if f.keep_time {
                    if e.time_us <= self.stamper.last() {
                        // The upstream reader checks this; never write a key out of order.
                        tracing::error!(
                            time_us = e.time_us,
                            last = self.stamper.last(),
                            "upstream event out of order, skipped"
                        );
                        continue;
                    }
                    self.stamper = Stamper::new(e.time_us);
                } else {
                    let now = (self.clock)();
                    e.stamp(self.stamper.next(now));
                }
                events.push(e);
            }
        }
        let started = std::time::Instant::now();
        self.store.append(events.iter(), cursor.as_ref())?;
        let m = &self.metrics;
        m.store_write_seconds.observe(started.elapsed().as_secs_f64());
        m.store_batch_events.observe(events.len() as f64);
        if let Some(c) = &cursor {
            m.relay_last_seq.set(c.seq);
        }
        if let Some(t) = relay_time {
            m.relay_lag_seconds.set((now_us() as i64 - t) as f64 / 1e6);
        }
        if let Some(e) = events.last() {
            m.store_newest_time_us.set(e.time_us as i64);
        }
        if let Log::Memory(mem) = &*self.store {
            // A live-only window moves with every append (cheap in memory; RocksDB's figures
            // are refreshed by the retention loop instead).
            m.store_oldest_time_us.set(mem.oldest_time_us().unwrap_or(0) as i64);
            m.store_disk_bytes.set(mem.bytes() as i64);
        }
        for e in events {
            self.ingested[e.kind as usize].inc();
            // No receivers is fine: nobody is subscribed live right now.
            let _ = self.ring.send(Arc::new(e));
        }
        Ok(())
    }

    /// Runs until the reader side of `rx` is closed and drained. Call on a blocking thread.
    pub fn run(mut self, mut rx: mpsc::Receiver<IngestFrame>) -> Result<(), StoreError> {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut n = first.events.len();
            batch.push(first);
            while n < MAX_BATCH_EVENTS {
                match rx.try_recv() {
                    Ok(f) => {
                        n += f.events.len();
                        batch.push(f);
                    }
                    Err(_) => break,
                }
            }
            self.write(&mut batch)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_regresses_when_the_clock_steps_back() {
        let mut s = Stamper::new(1_000);
        assert_eq!(s.next(500), 1_001);
        assert_eq!(s.next(2_000), 2_000);
        assert_eq!(s.next(2_000), 2_001);
        assert_eq!(s.next(10), 2_002);
    }
}
