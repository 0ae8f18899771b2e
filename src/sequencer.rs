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
//!
//! Both queues around it are bounded in bytes as well as in items: the [`ingest_channel`]
//! from the readers (a burst of huge frames waits at the socket instead of filling memory),
//! and the ring, which holds an event itself only while its recent events fit the ring's byte
//! budget; past it, it carries just what filters look at ([`Published::InLog`]) and live
//! subscribers that want that event read it from the log.

use crate::clock::{now_us, Stamper};
use crate::event::{Event, EventKind};
use crate::log::holes::Hole;
use crate::log::{Log, LogError, RelayCursor, RepoStateWrite};
use crate::metrics::Metrics;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, OwnedSemaphorePermit, Semaphore};

/// Upper bound on one write batch: ~4 MB of JSON, a few milliseconds of RocksDB work.
pub const MAX_BATCH_EVENTS: usize = 4096;

/// What a reader hands over for one frame: its events and the relay seq that, once they are
/// written, the cursor may advance to.
#[derive(Debug, Default)]
pub struct IngestFrame {
    /// The relay seq; `None` from an upstream Contrail (a replica resumes from its log).
    pub seq: Option<i64>,
    pub relay_time_us: Option<i64>,
    pub events: Vec<Event>,
    /// The events already carry their `time_us` (a replica keeps the primary's) instead of
    /// being stamped here. The upstream reader guarantees they increase.
    pub keep_time: bool,
    /// The relay frame itself, kept only for the verification stage (which drops it).
    pub raw: Option<bytes::Bytes>,
    /// The transcoder dropped part of the frame (an op) or all of it: its events are not all it
    /// says, so the verification stage claims no more than its signature for them.
    pub incomplete: bool,
    /// The relay reader knows frames may be missing just before this one (a seq jump, a frame
    /// skipped for its seq, a relay reset, a live start): repos may have moved on unseen.
    pub after_gap: bool,
    /// Repo chain states the verification stage moved for this frame, written with its events.
    pub repo_states: Vec<RepoStateWrite>,
    /// With `keep_time`: the source lost events after this `time_us` (the log's newest) and
    /// before this frame's first event, which is stored with the hole (`log::holes`).
    pub hole_after: Option<u64>,
}

impl IngestFrame {
    /// Memory the frame holds (its events' JSON, raw frame and repo chain states), for the byte
    /// bound of the ingest queue.
    pub fn bytes(&self) -> usize {
        let states: usize = self.repo_states.iter().map(|(did, state)| did.len() + state.len()).sum();
        self.events.iter().map(|e| e.json().len()).sum::<usize>()
            + self.raw.as_ref().map_or(0, |r| r.len())
            + states
            + 64
    }
}

/// The sending half of the queue from a reader to the sequencer.
#[derive(Clone)]
pub struct IngestSender {
    tx: mpsc::Sender<(IngestFrame, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    max_bytes: usize,
}

/// The sequencer stopped: nothing can be handed over any more.
#[derive(Debug, thiserror::Error)]
#[error("the sequencer stopped")]
pub struct SequencerStopped;

impl IngestSender {
    /// Waits for room (in frames and in bytes), then queues `frame`.
    pub async fn send(&self, frame: IngestFrame) -> Result<(), SequencerStopped> {
        // A frame larger than the whole budget takes all of it (and waits for an empty queue).
        let n = frame.bytes().clamp(1, self.max_bytes) as u32;
        let permit = self.budget.clone().acquire_many_owned(n).await.map_err(|_| SequencerStopped)?;
        self.tx.send((frame, permit)).await.map_err(|_| SequencerStopped)
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving half; the sequencer holds each frame's share of the byte budget until the
/// frame is written.
pub struct IngestReceiver {
    rx: mpsc::Receiver<(IngestFrame, OwnedSemaphorePermit)>,
    max_bytes: usize,
}

impl IngestReceiver {
    /// The next frame with its share of the budget (a stage between the reader and the
    /// sequencer holds it until it passes the frame on); `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<(IngestFrame, OwnedSemaphorePermit)> {
        self.rx.recv().await
    }

    /// The queue's byte budget (what the permits of all its frames may add up to).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

/// A queue of at most `frames` frames and about `max_bytes` bytes of events.
pub fn ingest_channel(frames: usize, max_bytes: usize) -> (IngestSender, IngestReceiver) {
    let max_bytes = max_bytes.clamp(1, u32::MAX as usize);
    let (tx, rx) = mpsc::channel(frames);
    (IngestSender { tx, budget: Arc::new(Semaphore::new(max_bytes)), max_bytes }, IngestReceiver { rx, max_bytes })
}

/// What the ring carries for each persisted event.
#[derive(Debug, Clone)]
pub enum Published {
    /// The event itself, shared by every live subscriber.
    Event(Arc<Event>),
    /// Only what filters look at: the event did not fit the ring's byte budget. A live
    /// subscriber whose filter matches it reads the event from the log (where it already is:
    /// invariant 3).
    InLog(Arc<EventKey>),
}

/// What subscribers' filters look at in an event, without its JSON.
#[derive(Debug)]
pub struct EventKey {
    pub time_us: u64,
    pub kind: EventKind,
    pub did: Box<str>,
    pub collection: Option<Box<str>>,
}

impl Published {
    pub fn time_us(&self) -> u64 {
        match self {
            Published::Event(e) => e.time_us,
            Published::InLog(k) => k.time_us,
        }
    }

    /// The ring's entry for an event it does not hold.
    pub fn in_log(e: &Event) -> Published {
        Published::InLog(Arc::new(EventKey {
            time_us: e.time_us,
            kind: e.kind,
            did: e.did().into(),
            collection: e.collection().map(Into::into),
        }))
    }
}

/// The shared broadcast ring the hub reads live events from.
pub type Ring = broadcast::Sender<Published>;

/// The ring's default byte budget: its recent events are held up to this much JSON (a
/// typical event is 0.5–1 KiB, so 65,536 of them take ~65 MB; this leaves room for bursts of
/// large records without letting them take the process's memory).
pub const DEFAULT_RING_MAX_BYTES: usize = 256 << 20;

/// Keeps the ring's share of memory under its byte budget: the sizes of the last
/// `capacity` events published (the ones the ring still holds).
struct RingBudget {
    capacity: usize,
    max_bytes: usize,
    sizes: VecDeque<usize>,
    bytes: usize,
}

impl RingBudget {
    /// Whether an event of `size` bytes may go into the ring itself.
    fn admit(&mut self, size: usize) -> bool {
        // The new item pushes the oldest out of a full ring.
        while self.sizes.len() >= self.capacity.max(1) {
            self.bytes -= self.sizes.pop_front().unwrap_or(0);
        }
        let fits = self.bytes + size <= self.max_bytes;
        let held = if fits { size } else { 0 };
        self.sizes.push_back(held);
        self.bytes += held;
        fits
    }
}

/// How far past the newest stamp the durable floor is set: at most one synced write a second
/// (of the clock), and a restart stamps at most this far ahead of the clock.
const STAMP_FLOOR_STEP_US: u64 = 1_000_000;

pub struct Sequencer {
    /// `contrail_events_ingested_total` per kind, resolved once (a label lookup per event
    /// costs a hash and a lock).
    ingested: Vec<prometheus::IntCounter>,
    log: Arc<Log>,
    ring: Ring,
    metrics: Arc<Metrics>,
    relay_url: String,
    stamper: Stamper,
    /// The durable floor for the next `time_us` ([`Log::stamp_floor`]): a stamp past it
    /// stores a new one first.
    stamp_floor: u64,
    /// The newest `time_us` in the log: what an upstream's event (kept as it is) must follow.
    /// Below the stamper's start when that is the floor.
    last_written: u64,
    clock: Box<dyn FnMut() -> u64 + Send>,
    ring_budget: RingBudget,
    /// What was ingested recently, for the status page.
    mix: Option<Arc<crate::mix::EventMix>>,
}

impl Sequencer {
    /// Resumes after the newest `time_us` ever written to `log`, and stamps past its floor.
    pub fn new(log: Arc<Log>, ring: Ring, metrics: Arc<Metrics>, relay_url: String) -> Result<Self, LogError> {
        let (last_written, stamp_floor) = (log.last_time_us()?, log.stamp_floor()?);
        // No stamp or event gets past MAX_TIME_US (a replica drops one): a stored one is a
        // corrupt value, and every stamp after it would be past what replicas take.
        if last_written.max(stamp_floor) >= crate::clock::MAX_TIME_US {
            return Err(LogError::Corrupt("newest time_us or stamp floor past any clock"));
        }
        let stamper = Stamper::new(last_written.max(stamp_floor));
        let ingested =
            EventKind::ALL.iter().map(|k| metrics.events_ingested.with_label_values(&[k.as_str()])).collect();
        let ring_budget =
            RingBudget { capacity: 65_536, max_bytes: DEFAULT_RING_MAX_BYTES, sizes: VecDeque::new(), bytes: 0 };
        Ok(Sequencer {
            ingested,
            log,
            ring,
            metrics,
            relay_url,
            stamper,
            stamp_floor,
            last_written,
            clock: Box::new(now_us),
            ring_budget,
            mix: None,
        })
    }

    /// Counts every persisted batch into `mix` (the status page's event mix).
    pub fn with_mix(mut self, mix: Arc<crate::mix::EventMix>) -> Self {
        self.mix = Some(mix);
        self
    }

    /// The ring holds `capacity` items and at most `max_bytes` of event JSON.
    pub fn with_ring_budget(mut self, capacity: usize, max_bytes: usize) -> Self {
        // tokio's broadcast rounds its capacity up to a power of two: the ring holds that many.
        let capacity = capacity.next_power_of_two();
        self.ring_budget = RingBudget { capacity, max_bytes, sizes: VecDeque::new(), bytes: 0 };
        self
    }

    /// Replaces the wall clock (tests step it backwards).
    pub fn with_clock(mut self, clock: impl FnMut() -> u64 + Send + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// The newest `time_us` in the log.
    pub fn last_time_us(&self) -> u64 {
        self.last_written
    }

    /// Stamps, persists and publishes the events of `frames` (in order), with the cursor of
    /// the last frame. Store failure is fatal to the caller (DESIGN.md invariant 6).
    pub fn write(&mut self, frames: &mut Vec<IngestFrame>) -> Result<(), LogError> {
        if frames.is_empty() {
            return Ok(());
        }
        let relay_time = frames.iter().rev().find_map(|f| f.relay_time_us);
        let frames_seq = frames.iter().rev().find_map(|f| f.seq);
        let mut events: Vec<Event> = Vec::with_capacity(frames.iter().map(|f| f.events.len()).sum());
        let mut repo_states = Vec::new();
        let mut holes = Vec::new();
        // One clock reading for the batch: its events are stored, and become visible, together
        // (the stamper still makes each `time_us` unique), and a reading per event was 6% of
        // this thread's time in the ingest bench.
        let mut now = None;
        for mut f in frames.drain(..) {
            repo_states.append(&mut f.repo_states);
            let mut hole_after = f.hole_after.filter(|&after| f.keep_time && after > 0);
            for mut e in f.events {
                if f.keep_time {
                    if e.time_us <= self.last_written {
                        // The upstream reader checks this; never write a key out of order.
                        tracing::error!(
                            time_us = e.time_us,
                            last = self.last_written,
                            "upstream event out of order, skipped"
                        );
                        continue;
                    }
                    self.stamper = Stamper::new(e.time_us);
                    // (With nothing between the two, nothing is missing.)
                    if let Some(after) = hole_after.take().filter(|&after| e.time_us > after.saturating_add(1)) {
                        holes.push(Hole { after, first: e.time_us });
                    }
                } else {
                    let now = *now.get_or_insert_with(|| (self.clock)());
                    e.stamp(self.stamper.next(now));
                }
                self.last_written = e.time_us;
                events.push(e);
            }
        }
        // Written with the log's newest time_us as of this batch: a node that later takes
        // events without a relay seq (as a replica) leaves the cursor behind, and knows it.
        let cursor =
            frames_seq.map(|seq| RelayCursor { url: self.relay_url.clone(), seq, at_time_us: Some(self.last_written) });
        if self.stamper.last() > self.stamp_floor {
            // Before the batch: unsynced, it could be lost once subscribers have seen it. Below
            // MAX_TIME_US, which a start refuses: a replica keeping an upstream's time_us close to
            // it must still start again.
            let floor = self.stamper.last().saturating_add(STAMP_FLOOR_STEP_US).min(crate::clock::MAX_TIME_US - 1);
            self.log.store_stamp_floor(floor)?;
            self.stamp_floor = floor;
        }
        let started = std::time::Instant::now();
        self.log.append_batch(&events, cursor.as_ref(), &repo_states, &holes)?;
        let m = &self.metrics;
        m.store_write_seconds.observe(started.elapsed().as_secs_f64());
        m.store_batch_events.observe(events.len() as f64);
        if let Some(c) = &cursor {
            m.relay_last_seq.set(c.seq);
        }
        if let Some(mix) = &self.mix {
            mix.record(&events);
        }
        if let Some(t) = relay_time {
            m.relay_time(t);
        }
        let mut ingested = [0u64; EventKind::ALL.len()];
        for e in events {
            ingested[e.kind as usize] += 1;
            // (What its buffer holds, not its length: the memory the ring keeps.)
            let item = if self.ring_budget.admit(e.json_capacity()) {
                Published::Event(Arc::new(e))
            } else {
                Published::in_log(&e)
            };
            // No receivers is fine: nobody is subscribed live right now.
            let _ = self.ring.send(item);
        }
        for (counter, n) in self.ingested.iter().zip(ingested) {
            counter.inc_by(n);
        }
        Ok(())
    }

    /// Runs until every sender is gone and the queue is drained. Call on a blocking thread.
    pub fn run(mut self, mut rx: IngestReceiver) -> Result<(), LogError> {
        let mut batch = Vec::new();
        // Each frame's share of the queue's byte budget, given back once it is written.
        let mut permits = Vec::new();
        while let Some((first, permit)) = rx.rx.blocking_recv() {
            let mut n = first.events.len();
            batch.push(first);
            permits.push(permit);
            while n < MAX_BATCH_EVENTS {
                match rx.rx.try_recv() {
                    Ok((f, permit)) => {
                        n += f.events.len();
                        batch.push(f);
                        permits.push(permit);
                    }
                    Err(_) => break,
                }
            }
            self.write(&mut batch)?;
            permits.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_time_us_past_any_clock_is_a_corrupt_log_not_a_start_for_stamps() {
        let log = Arc::new(Log::memory(crate::log::memory::MemoryLog::new(1 << 20)));
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let mut out = Vec::new();
        Event::begin(&mut out, did, EventKind::Identity);
        out.extend_from_slice(b",\"identity\":{}}");
        let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
        e.stamp(crate::clock::MAX_TIME_US + 5);
        log.append(&[e], None).unwrap();
        let (ring, _) = broadcast::channel(16);
        let made = Sequencer::new(log, ring, Arc::new(Metrics::new()), "ws://relay".into());
        assert!(matches!(made, Err(LogError::Corrupt(_))));
    }

    /// A replica keeping time_us just below MAX_TIME_US (a lying upstream's, confirmed by the
    /// next event) stores a stamp floor below it too, so it starts again. Before, the floor
    /// (a second past the event) was past it, and every start refused the log as corrupt.
    #[test]
    fn a_kept_time_us_near_the_limit_leaves_a_floor_a_start_takes() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let opts = crate::log::rocks::RocksOptions { sync_writes: false, ..Default::default() };
            Arc::new(Log::rocks(crate::log::rocks::RocksLog::open(dir.path(), opts).unwrap()).unwrap())
        };
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let mut out = Vec::new();
        Event::begin(&mut out, did, EventKind::Identity);
        out.extend_from_slice(b",\"identity\":{}}");
        let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
        e.stamp(crate::clock::MAX_TIME_US - 10);
        let frame = IngestFrame {
            seq: None,
            relay_time_us: None,
            events: vec![e],
            keep_time: true,
            raw: None,
            incomplete: false,
            after_gap: false,
            repo_states: Vec::new(),
            hole_after: None,
        };
        let (ring, _) = broadcast::channel(16);
        let log = open();
        let mut sequencer =
            Sequencer::new(log.clone(), ring.clone(), Arc::new(Metrics::new()), "ws://relay".into()).unwrap();
        sequencer.write(&mut vec![frame]).unwrap();
        drop(sequencer);
        drop(log);
        let log = open();
        assert!(log.stamp_floor().unwrap() < crate::clock::MAX_TIME_US);
        Sequencer::new(log, ring, Arc::new(Metrics::new()), "ws://relay".into()).expect("a start");
    }

    #[test]
    fn the_ring_holds_events_only_within_its_byte_budget() {
        let mut b = RingBudget { capacity: 4, max_bytes: 1000, sizes: VecDeque::new(), bytes: 0 };
        assert!(b.admit(600));
        assert!(!b.admit(600), "over the budget: published as InLog");
        assert!(b.admit(400));
        assert!(!b.admit(1));
        // The first event leaves the ring (capacity 4): its bytes are free again.
        assert!(b.admit(500));
        assert_eq!(b.bytes, 900);
    }
}
