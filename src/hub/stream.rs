//! One subscriber's position in the event sequence: an [`EventStream`] walks the log from its
//! cursor, then the broadcast ring, and back to the log whenever the ring has moved past it
//! (DESIGN.md invariant 4). It is the only owner of the position (`last_seen`), of whether the
//! subscriber is live, and of its share of the lagging-subscribers gauge.
//!
//! Why this is exact: the ring receiver is created before the start position is read, and
//! events reach the ring only after they are persisted (invariant 3), so log ∪ ring covers
//! every event. The only rule is "the next event has `time_us` > `last_seen`": no gap, no
//! duplicate, no reordering. No subscriber has a queue of its own: a slow one reads the log.

use crate::event::{view_value, Event};
use crate::log::{Log, LogError, Tip};
use crate::options::Filter;
use crate::sequencer::Published;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Events read from the log per batch: large enough to amortise the read, small enough
/// (~1 MB) to keep a replaying subscriber's memory flat.
pub const REPLAY_BATCH: usize = 1024;

/// A batch read from the log for one subscriber: every stored value scanned, copied into one
/// buffer, in order. Filtering happens as events are taken from it, with the filter of that
/// moment, so a filter change never needs a new read (a client sending `options_update` in a
/// loop cannot multiply log reads).
#[derive(Default)]
struct LogBatch {
    values: Vec<u8>,
    /// `(time_us, range in values)`, oldest first.
    items: VecDeque<(u64, std::ops::Range<usize>)>,
}

/// Reads up to [`REPLAY_BATCH`] events with `time_us >= from`.
fn read_log(log: &Log, from: u64) -> Result<LogBatch, LogError> {
    let mut batch = LogBatch::default();
    log.scan(from, REPLAY_BATCH, |t, v| {
        let start = batch.values.len();
        batch.values.extend_from_slice(v);
        batch.items.push_back((t, start..batch.values.len()));
        true
    })?;
    Ok(batch)
}

/// The counters a stream moves, resolved once.
#[derive(Clone)]
pub struct StreamMetrics {
    pub replay_reads: prometheus::IntCounter,
    pub lagging: prometheus::IntGauge,
}

/// Where a new stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Replay from the first event with `time_us >= cursor`.
    From(u64),
    /// Live: only events newer than the log's newest at the start.
    Live,
}

/// How far past both the log's newest event and the wall clock a cursor may be and still be
/// taken literally. Replicas carry the primary's `time_us`, so a client failing over brings a
/// cursor that may be ahead of this node's clock (skew) or of its log (replication lag); it
/// must resume exactly there. Only a cursor far beyond both is "the future" (live, as v1).
pub const FUTURE_CURSOR_SLACK: std::time::Duration = std::time::Duration::from_secs(600);

impl Start {
    /// Decides by the log, not the clock (DESIGN.md invariant 9): an inclusive cursor resumes
    /// exactly, unless it is more than [`FUTURE_CURSOR_SLACK`] beyond both the newest event and
    /// `now_us`. A cursor older than the log, 0 or negative starts at the oldest event.
    pub fn for_cursor(cursor: Option<i64>, newest: Option<u64>, now_us: u64) -> Start {
        let Some(c) = cursor else { return Start::Live };
        let c = c.max(0) as u64;
        let horizon = newest.unwrap_or(0).max(now_us).saturating_add(FUTURE_CURSOR_SLACK.as_micros() as u64);
        if c > horizon {
            Start::Live
        } else {
            Start::From(c)
        }
    }
}

pub struct EventStream {
    log: Arc<Log>,
    ring: broadcast::Receiver<Published>,
    filter: Arc<Filter>,
    /// The stream position: every event up to here was delivered or filtered out.
    last_seen: u64,
    /// Reading the ring (true) or the log (false).
    live: bool,
    /// What the last log read returned and has not been passed yet.
    batch: LogBatch,
    fetch: Option<tokio::task::JoinHandle<Result<LogBatch, LogError>>>,
    /// Events passed (delivered or filtered out), for the slow rule.
    passed: u64,
    metrics: StreamMetrics,
    /// Decoded log events shared with the other replayers (see `replay_cache`).
    shared: Option<Arc<super::replay_cache::ReplayCache>>,
}

impl EventStream {
    /// Starts a stream. `ring` must have been subscribed before this call reads the tip,
    /// which is what makes the handoff exact.
    pub fn new(
        log: Arc<Log>,
        tip: &Tip,
        ring: broadcast::Receiver<Published>,
        filter: Arc<Filter>,
        start: Start,
        metrics: StreamMetrics,
    ) -> Self {
        let (last_seen, live) = match start {
            Start::From(cursor) => (cursor.max(1) - 1, false),
            Start::Live => (tip.newest().unwrap_or(0), true),
        };
        if !live {
            metrics.lagging.inc();
        }
        EventStream {
            log,
            ring,
            filter,
            last_seen,
            live,
            batch: LogBatch::default(),
            fetch: None,
            passed: 0,
            metrics,
            shared: None,
        }
    }

    /// Takes the events it replays from (and gives them to) `cache`, so replayers close to each
    /// other decode and compress each event once.
    pub fn with_replay_cache(mut self, cache: Arc<super::replay_cache::ReplayCache>) -> Self {
        self.shared = Some(cache);
        self
    }

    /// Every event up to here was delivered or filtered out.
    pub fn last_seen(&self) -> u64 {
        self.last_seen
    }

    pub fn is_live(&self) -> bool {
        self.live
    }

    pub fn passed(&self) -> u64 {
        self.passed
    }

    /// The event at `time_us` was delivered, or deliberately skipped (over the size cap).
    pub fn advance(&mut self, time_us: u64) {
        self.last_seen = self.last_seen.max(time_us);
    }

    /// New filters, for every event after the position (the batch in hand is filtered as it
    /// is taken, so nothing is read again).
    pub fn set_filter(&mut self, filter: Arc<Filter>) {
        self.filter = filter;
    }

    /// The next event of the batch in hand that the filter wants; the others are passed.
    fn next_from_batch(&mut self) -> Result<Option<Arc<Event>>, LogError> {
        while let Some((t, range)) = self.batch.items.front().cloned() {
            let value = &self.batch.values[range];
            // A corrupt value stays at the front, so whoever asks next sees the error too.
            let view = view_value(value).ok_or(LogError::Corrupt("event value"))?;
            self.batch.items.pop_front();
            self.passed += 1;
            if self.filter.matches(view.kind, view.did, view.collection) {
                let ev = match &self.shared {
                    // Sharing pays only when another stream reads the log too (measured: it
                    // costs a lone replayer ~1 µs per event).
                    Some(cache) if self.metrics.lagging.get() > 1 => cache.get_or_decode(t, value),
                    _ => Event::decode_value(t, value).map(Arc::new),
                };
                return ev.ok_or(LogError::Corrupt("event value")).map(Some);
            }
            self.last_seen = t;
        }
        Ok(None)
    }

    /// The next event this subscriber should get, from its log batch or the ring. Cancel-safe:
    /// a pending log read is kept and picked up again. `None` when the log cannot be read or
    /// the ring is closed.
    pub async fn next_event(&mut self) -> Option<Arc<Event>> {
        loop {
            match self.next_from_batch() {
                Ok(Some(ev)) => return Some(ev),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "reading the log for a subscriber failed");
                    return None;
                }
            }
            if !self.live {
                let handle = self.fetch.get_or_insert_with(|| {
                    let (log, from) = (self.log.clone(), self.last_seen + 1);
                    tokio::task::spawn_blocking(move || read_log(&log, from))
                });
                let result = handle.await;
                self.fetch = None;
                let batch = match result {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "reading the log for a subscriber failed");
                        return None;
                    }
                    Err(_) => return None,
                };
                self.metrics.replay_reads.inc();
                if batch.items.is_empty() {
                    // Caught up with the log: the ring has everything newer.
                    self.live = true;
                    self.metrics.lagging.dec();
                }
                self.batch = batch;
                continue;
            }
            match self.ring.recv().await {
                Ok(item) => {
                    if let Some(ev) = self.accept(item) {
                        return Some(ev);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.fall_back_to_log(),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next event if one is available right now (from the log batch or the ring).
    pub fn next_ready(&mut self) -> Option<Arc<Event>> {
        loop {
            // A corrupt value surfaces in next_event, which closes the subscriber.
            if let Ok(Some(ev)) = self.next_from_batch() {
                return Some(ev);
            }
            if !self.live || !self.batch.items.is_empty() {
                return None; // the next log read happens in next_event
            }
            match self.ring.try_recv() {
                Ok(item) => {
                    if let Some(ev) = self.accept(item) {
                        return Some(ev);
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    self.fall_back_to_log();
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// A ring item: `Some` if this subscriber should get it; otherwise it is passed (or, for
    /// an event the ring did not hold, the stream goes to the log for it).
    fn accept(&mut self, item: Published) -> Option<Arc<Event>> {
        if item.time_us() <= self.last_seen {
            return None; // already read from the log
        }
        let ev = match item {
            Published::Event(ev) => ev,
            Published::InLog(_) => {
                self.fall_back_to_log();
                return None;
            }
        };
        self.passed += 1;
        if self.filter.matches(ev.kind, ev.did(), ev.collection()) {
            Some(ev)
        } else {
            self.last_seen = ev.time_us;
            None
        }
    }

    /// The ring moved past us: back to the log, from where we are.
    fn fall_back_to_log(&mut self) {
        self.live = false;
        self.metrics.lagging.inc();
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.live {
            self.metrics.lagging.dec();
        }
        if let Some(f) = self.fetch.take() {
            f.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::log::memory::MemoryLog;
    use std::time::Duration;

    const DIDS: [&str; 2] = ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"];

    /// Event `i`: DID alternating, collection alternating post/like, time_us 1000 + i.
    fn event(i: u64) -> Event {
        let coll = if i.is_multiple_of(2) { "app.bsky.feed.post" } else { "app.bsky.feed.like" };
        let mut out = Vec::new();
        let did = DIDS[(i / 2 % 2) as usize];
        Event::begin(&mut out, did, EventKind::Commit);
        out.extend_from_slice(b",\"commit\":{\"collection\":\"");
        let at = out.len();
        out.extend_from_slice(coll.as_bytes());
        out.extend_from_slice(b"\"}}");
        let mut e = Event::from_parts(out, EventKind::Commit, did.len(), at..at + coll.len());
        e.stamp(1000 + i);
        e
    }

    struct Fixture {
        log: Arc<Log>,
        ring: broadcast::Sender<Published>,
        metrics: StreamMetrics,
    }

    impl Fixture {
        fn new(ring_capacity: usize) -> Self {
            let m = crate::metrics::Metrics::new();
            Fixture {
                log: Arc::new(Log::memory(MemoryLog::new(64 << 20))),
                ring: broadcast::channel(ring_capacity).0,
                metrics: StreamMetrics { replay_reads: m.replay_reads.clone(), lagging: m.lagging_subscribers.clone() },
            }
        }

        /// Persists events `range`, then publishes them (the sequencer's order).
        fn ingest(&self, range: std::ops::Range<u64>) {
            let events: Vec<Event> = range.map(event).collect();
            self.log.append(&events, None).unwrap();
            for e in events {
                let _ = self.ring.send(Published::Event(Arc::new(e)));
            }
        }

        fn stream(&self, filter: Filter, start: Start) -> EventStream {
            let rx = self.ring.subscribe();
            EventStream::new(self.log.clone(), &self.log.tip(), rx, Arc::new(filter), start, self.metrics.clone())
        }
    }

    async fn take(s: &mut EventStream, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < n {
            let ev = tokio::time::timeout(Duration::from_secs(5), s.next_event()).await.expect("an event").unwrap();
            s.advance(ev.time_us);
            out.push(ev.time_us);
        }
        out
    }

    #[tokio::test]
    async fn replays_the_log_then_hands_off_to_the_ring_exactly() {
        let f = Fixture::new(1024);
        f.ingest(0..3000);
        let mut s = f.stream(Filter::default(), Start::From(1010));
        assert!(!s.is_live());
        assert_eq!(f.metrics.lagging.get(), 1);
        let got = take(&mut s, 2990).await;
        assert_eq!(got, (1010..4000).collect::<Vec<_>>(), "the log from the cursor, inclusive");
        f.ingest(3000..3100); // persisted (and published) while the stream still reads the log
        let got = take(&mut s, 100).await;
        assert_eq!(got, (4000..4100).collect::<Vec<_>>());
        // Nothing more in the log: the stream goes live and waits on the ring.
        assert!(tokio::time::timeout(Duration::from_millis(200), s.next_event()).await.is_err());
        assert!(s.is_live(), "caught up: reading the ring");
        assert_eq!(f.metrics.lagging.get(), 0);
        f.ingest(3100..3110);
        assert_eq!(take(&mut s, 10).await, (4100..4110).collect::<Vec<_>>());
        assert!(f.metrics.replay_reads.get() >= 3);
    }

    #[tokio::test]
    async fn a_stream_the_ring_left_behind_goes_back_to_the_log_without_a_gap() {
        let f = Fixture::new(16);
        let mut s = f.stream(Filter::default(), Start::Live);
        assert!(s.is_live());
        f.ingest(0..500); // 500 events through a 16-slot ring: this receiver lags
        let got = take(&mut s, 500).await;
        assert_eq!(got, (1000..1500).collect::<Vec<_>>());
        f.ingest(500..510);
        assert_eq!(take(&mut s, 10).await, (1500..1510).collect::<Vec<_>>());
        drop(s);
        assert_eq!(f.metrics.lagging.get(), 0, "the gauge is given back");
    }

    #[tokio::test]
    async fn live_starts_after_the_newest_event_and_filters_apply_on_both_paths() {
        let f = Fixture::new(1024);
        f.ingest(0..100);
        let only_posts = Filter::new(&["app.bsky.feed.post".into()], &[]).unwrap();
        let mut live = f.stream(only_posts.clone(), Start::Live);
        let mut replay = f.stream(only_posts, Start::From(0));
        f.ingest(100..110);
        assert_eq!(take(&mut live, 5).await, vec![1100, 1102, 1104, 1106, 1108]);
        let got = take(&mut replay, 55).await;
        assert_eq!(got, (1000..1110).step_by(2).collect::<Vec<_>>());
        // A filtered-out tail still moves the position (what cursor messages report).
        f.ingest(110..112); // a post, then a like
        assert_eq!(take(&mut live, 1).await, vec![1110]);
        assert!(tokio::time::timeout(Duration::from_millis(200), live.next_event()).await.is_err());
        assert_eq!(live.last_seen(), 1111);
    }

    #[test]
    fn cursors_are_judged_against_the_log_not_the_clock() {
        let (newest, now) = (Some(5_000_000_000), 1_000_000_000);
        // Ahead of this node's clock but inside its log (a replica whose clock is behind).
        assert_eq!(Start::for_cursor(Some(4_000_000_000), newest, now), Start::From(4_000_000_000));
        // Ahead of both by a little (the log is a few events behind the primary's).
        assert_eq!(Start::for_cursor(Some(5_000_100_000), newest, now), Start::From(5_000_100_000));
        // Far in the future: live, as v1.
        assert_eq!(Start::for_cursor(Some(5_000_000_000 + 601_000_000), newest, now), Start::Live);
        assert_eq!(Start::for_cursor(Some(i64::MAX), newest, now), Start::Live);
        assert_eq!(Start::for_cursor(Some(-3), newest, now), Start::From(0));
        assert_eq!(Start::for_cursor(None, newest, now), Start::Live);
        assert_eq!(Start::for_cursor(Some(700_000_000), None, now), Start::From(700_000_000));
    }

    #[tokio::test]
    async fn a_cursor_ahead_of_the_clock_inside_the_log_gets_every_event_after_it() {
        let f = Fixture::new(1024);
        // Events stamped an hour ahead of this machine's clock (a primary whose clock is ahead).
        let ahead = crate::clock::now_us() + 3_600_000_000;
        let events: Vec<Event> = (0..822)
            .map(|i| {
                let mut e = event(i);
                e.stamp(ahead + i);
                e
            })
            .collect();
        f.log.append(&events, None).unwrap();
        let cursor = ahead + 100;
        let start = Start::for_cursor(Some(cursor as i64), f.log.tip().newest(), crate::clock::now_us());
        let mut s = f.stream(Filter::default(), start);
        assert_eq!(take(&mut s, 722).await, (ahead + 100..ahead + 822).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn events_the_ring_did_not_hold_are_read_from_the_log() {
        let f = Fixture::new(1024);
        let mut s = f.stream(Filter::default(), Start::Live);
        let events: Vec<Event> = (0..10).map(event).collect();
        f.log.append(&events, None).unwrap();
        for e in events {
            // As the sequencer publishes past the ring's byte budget.
            let item = if e.time_us % 3 == 0 { Published::InLog(e.time_us) } else { Published::Event(Arc::new(e)) };
            let _ = f.ring.send(item);
        }
        assert_eq!(take(&mut s, 10).await, (1000..1010).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_new_filter_applies_from_the_current_position() {
        let f = Fixture::new(1024);
        f.ingest(0..20);
        let mut s = f.stream(Filter::default(), Start::From(1000));
        assert_eq!(take(&mut s, 4).await, vec![1000, 1001, 1002, 1003]);
        let did_b = Filter::new(&[], &[DIDS[1].into()]).unwrap();
        s.set_filter(Arc::new(did_b));
        // Events 2,3 (did b) were already delivered; next did-b events are 6,7,10,11,…
        assert_eq!(take(&mut s, 4).await, vec![1006, 1007, 1010, 1011]);
    }
}
