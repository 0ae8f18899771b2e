//! Live dispatch by index: one thread reads the ring and hands each event only to the live
//! subscribers whose filters can match it, found through an index (by DID, by collection and
//! collection prefix, plus a list looked at for every event), each into its own bounded
//! [`Queue`]. A subscriber whose filter matches nothing is never woken: live cost follows what
//! is delivered, not the number of subscribers.
//!
//! A filter of many DIDs (up to 10,000) enters and leaves the index [`DIDS_PER_LOCK`] DIDs per
//! hold of its lock, so live dispatch never waits for the whole set: while its DIDs are moving
//! in, it is looked at for every event; once it has ended, its DIDs still in the index find
//! nothing (the entry is kept, detached, until its registration takes them out).
//!
//! Why this is exact (DESIGN.md invariant 4). Events reach the ring only after they are
//! persisted (invariant 3) and the dispatcher hands them out in `time_us` order. A stream joins
//! with [`Dispatcher::register`], which returns, under the index lock, `dispatched_up_to` D:
//! every event ≤ D was handed out before the stream was in the index, and every later event its
//! filter matches will be in its queue. So the stream reads the log up to D, then takes its
//! queue, skipping what it already has (`time_us` ≤ its position).
//!
//! Bounded memory. A queue holds at most [`QUEUE_EVENTS`] events and [`QUEUE_BYTES`] bytes of
//! JSON, and all queues together at most the budget given to [`Dispatcher::start`] plus one
//! event per queue (an empty queue takes its next event whatever its size; the events are the
//! ring's, shared by `Arc`, but a queue can keep one alive after the ring let it go). Half the budget is a pool any queue may fill; the other half is shared out (half the
//! budget ÷ the queues in the index), so a few stuck clients holding megabytes each cannot push
//! busy, healthy subscribers to the log: once the pool is full, only a queue past its share
//! ends — until the whole budget is reached, where any queue that holds something ends (shares
//! were larger when fewer queues were in the index: the budget is the bound). A queue that
//! would pass any of these, or a dispatcher that fell behind the ring, *ends* the queue: it is
//! emptied, the subscriber leaves the index and reads the log from its position (counted in
//! `contrail_hub_live_queue_overflows_total`), and joins again when it has caught up. An event
//! the ring did not hold ([`Published::InLog`]) ends the queues that want it after what they
//! hold: those subscribers read it (and what follows) from the log. A session takes its events as fast as its socket accepts them,
//! so a queue fills only while a write is blocked (a slow reader's, which then reads the log).

use crate::event::{Event, EventKind};
use crate::log::Tip;
use crate::options::Filter;
use crate::sequencer::{Published, Ring};
use indexmap::IndexSet;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{broadcast, Notify};

/// Most events one subscriber's queue holds before it ends (~1 s of the whole firehose, 2–5 s
/// of a busy collection).
pub const QUEUE_EVENTS: usize = 1024;
/// Most event JSON one subscriber's queue holds before it ends.
pub const QUEUE_BYTES: usize = 4 << 20;
/// DIDs a filter puts into (or takes out of) the index per hold of its lock: a 10,000-DID
/// filter takes ~1.5 ms to index, which live dispatch must not wait for at once. Smaller
/// filters go in and out in one hold. (Looking at big filters for every event instead cost
/// ~0.9 ms per event with 10,000 subscribers of 101 DIDs: below the firehose's rate.)
pub const DIDS_PER_LOCK: usize = 256;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Read the log from your position, then register again.
    Overflowed,
    /// The queue's events are followed by this event, which the ring did not hold: read the
    /// log from it (nothing the filter matched before it is missing from the queue).
    InLog(u64),
    /// The log lacks events before the next one (a hole, `log::holes`): read the log from
    /// your position, which tells the hole whatever your filter, then register again.
    Hole,
    /// The ring is gone (the server is stopping).
    Closed,
}

/// What [`Queue::take`] found.
pub enum Take {
    Event(Arc<Event>),
    Empty,
    Ended(Ended),
}

#[derive(Default)]
struct QueueState {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    ended: Option<Ended>,
}

/// One live subscriber's events, filled by the dispatcher and taken by its stream.
pub struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
    /// Events up to here are not queued: the stream has them (it registered past the
    /// dispatcher's point, e.g. live from the log's newest event while the dispatcher trails).
    skip_until: u64,
    /// The bytes queued in every queue (see [`Dispatcher::start`]).
    all_queued: Arc<AtomicUsize>,
    budget: usize,
}

impl Queue {
    pub fn take(&self) -> Take {
        let mut s = lock(&self.state);
        if let Some(ev) = s.events.pop_front() {
            let size = ev.json().len();
            s.bytes -= size;
            self.all_queued.fetch_sub(size, Ordering::Relaxed);
            return Take::Event(ev);
        }
        s.ended.map_or(Take::Empty, Take::Ended)
    }

    /// Resolves after the queue went from empty to not (or ended) since the last call.
    /// Cancel-safe: a notification not consumed stays for the next call.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Ended: the stream reads the log next (after what the queue still holds).
    fn has_ended(&self) -> bool {
        lock(&self.state).ended.is_some()
    }

    /// Nothing waiting and not ended.
    fn is_idle(&self) -> bool {
        let s = lock(&self.state);
        s.events.is_empty() && s.ended.is_none()
    }

    /// Adds `ev`; `false` when the queue is (now) ended. `share` is this queue's guaranteed
    /// part of the byte budget, which it may fill once the shared pool is full.
    fn push(&self, ev: &Arc<Event>, share: usize) -> bool {
        if ev.time_us <= self.skip_until {
            return true;
        }
        let mut s = lock(&self.state);
        if s.ended.is_some() {
            return false;
        }
        let size = ev.json().len();
        // The pool is the budget's first half; the shares (half ÷ queues) are the second; the
        // budget itself holds whatever the shares were when the queues grew.
        let queued = self.all_queued.load(Ordering::Relaxed) + size;
        let past_share = (queued > self.budget / 2 && s.bytes + size > share) || queued > self.budget;
        if s.events.len() >= QUEUE_EVENTS || (!s.events.is_empty() && (s.bytes + size > QUEUE_BYTES || past_share)) {
            drop(s);
            self.end(Ended::Overflowed);
            return false;
        }
        let was_empty = s.events.is_empty();
        s.events.push_back(ev.clone());
        s.bytes += size;
        self.all_queued.fetch_add(size, Ordering::Relaxed);
        drop(s);
        if was_empty {
            self.ready.notify_one();
        }
        true
    }

    fn end(&self, how: Ended) {
        let mut s = lock(&self.state);
        if s.ended.is_some() {
            return;
        }
        s.ended = Some(how);
        if !matches!(how, Ended::InLog(_)) {
            // The stream reads these from the log: free them now.
            s.events = VecDeque::new();
            self.all_queued.fetch_sub(std::mem::take(&mut s.bytes), Ordering::Relaxed);
        }
        drop(s);
        self.ready.notify_one();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        self.all_queued.fetch_sub(s.bytes, Ordering::Relaxed);
    }
}

struct Entry {
    filter: Arc<Filter>,
    queue: Arc<Queue>,
    /// The last event this entry was looked at for: a subscriber found under two keys (a
    /// collection and a prefix of it) gets the event once.
    visited: u64,
    /// Of a filter of more than [`DIDS_PER_LOCK`] DIDs, how many are in `by_did` (the first
    /// ones in its set's order); until all are, it is also in `every`.
    dids_indexed: usize,
    /// Ended by the dispatcher while some of its DIDs were in the index: it gets nothing, and
    /// its slot stays taken until its registration has taken them out.
    detached: bool,
}

/// Whether `filter`'s DIDs move into the index a chunk at a time.
fn many_dids(filter: &Filter) -> bool {
    filter.dids().is_some_and(|d| d.len() > DIDS_PER_LOCK)
}

/// Where a filter is found in the index.
enum Key<'a> {
    Did(&'a str),
    Collection(&'a str),
    Prefix(&'a str),
    /// Collection-filtered: looked at for events without a collection (identity, account,
    /// sync), which bypass `wantedCollections` as in v1.
    NoCollection,
    /// Looked at for every event: no filter, or many DIDs not all in the index yet.
    Every,
}

/// The keys a filter is found under when it joins; a filter of many DIDs joins under
/// [`Key::Every`] and its DIDs follow in chunks ([`Dispatcher::register`]).
fn keys(filter: &Filter, mut f: impl FnMut(Key<'_>)) {
    match (filter.dids(), filter.collections()) {
        (Some(dids), _) if dids.len() <= DIDS_PER_LOCK => dids.iter().for_each(|d| f(Key::Did(d))),
        (None, Some(collections)) => {
            collections.iter().for_each(|c| f(Key::Collection(c)));
            filter.prefixes().iter().for_each(|p| f(Key::Prefix(p)));
            f(Key::NoCollection);
        }
        _ => f(Key::Every),
    }
}

/// About what one key costs the index beside its string: its map entry (the boxed key, the
/// bucket's tables) and the subscriber's place in the bucket.
const KEY_OVERHEAD: usize = 128;

/// About what `filter` adds to the index when its stream is live: a copy of each DID,
/// collection and prefix it is found under. Counted with the filter itself against the filter
/// budget ([`filter_bytes`]); a key other streams share is counted for each (an upper bound).
/// A filter looked at for every event, or for every event without a collection, adds one
/// id to a list: not counted.
pub fn index_bytes(filter: &Filter) -> usize {
    if let Some(dids) = filter.dids() {
        return dids.iter().map(|d| d.len() + KEY_OVERHEAD).sum();
    }
    let mut n = 0;
    keys(filter, |k| match k {
        Key::Did(key) | Key::Collection(key) | Key::Prefix(key) => n += key.len() + KEY_OVERHEAD,
        Key::NoCollection | Key::Every => {}
    });
    n
}

/// What a subscriber's filter holds, as the filter budget counts it: the filter and its copy
/// in the live index.
pub fn filter_bytes(filter: &Filter) -> usize {
    filter.heap_bytes() + index_bytes(filter)
}

/// Subscribers by key; a bucket is an ordered set, so leaving is O(1) whatever its size.
type Bucket = IndexSet<u32>;
type Buckets = HashMap<Box<str>, Bucket>;

fn bucket_add(b: &mut Buckets, key: &str, id: u32) {
    match b.get_mut(key) {
        Some(ids) => {
            ids.insert(id);
        }
        None => {
            b.insert(key.into(), Bucket::from([id]));
        }
    }
}

fn bucket_remove(b: &mut Buckets, key: &str, id: u32) {
    if let Some(ids) = b.get_mut(key) {
        ids.swap_remove(&id);
        if ids.is_empty() {
            b.remove(key);
        }
    }
}

#[derive(Default)]
struct Index {
    /// Slots; a free slot is `None` and listed in `free`.
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
    by_did: Buckets,
    by_collection: Buckets,
    by_prefix: Buckets,
    no_collection: Bucket,
    every: Bucket,
    /// Entries detached (see [`Entry::detached`]).
    detached: usize,
    /// The ring closed: nobody registers any more.
    closed: bool,
}

impl Index {
    fn insert(&mut self, filter: Arc<Filter>, queue: Arc<Queue>) -> u32 {
        let id = self.free.pop().unwrap_or_else(|| {
            self.entries.push(None);
            (self.entries.len() - 1) as u32
        });
        keys(&filter, |k| match k {
            Key::Did(d) => bucket_add(&mut self.by_did, d, id),
            Key::Collection(c) => bucket_add(&mut self.by_collection, c, id),
            Key::Prefix(p) => bucket_add(&mut self.by_prefix, p, id),
            Key::NoCollection => {
                self.no_collection.insert(id);
            }
            Key::Every => {
                self.every.insert(id);
            }
        });
        self.entries[id as usize] = Some(Entry { filter, queue, visited: 0, dids_indexed: 0, detached: false });
        id
    }

    /// Entries in the index (detached ones aside).
    fn len(&self) -> usize {
        self.entries.len() - self.free.len() - self.detached
    }

    /// The entry in slot `id`, if it still holds `queue`: the slot may have been freed and
    /// reused, or the whole index emptied (a lag), since its registration last looked.
    fn entry_of(&mut self, id: u32, queue: &Arc<Queue>) -> Option<&mut Entry> {
        match self.entries.get_mut(id as usize) {
            Some(Some(e)) if Arc::ptr_eq(&e.queue, queue) => Some(e),
            _ => None,
        }
    }

    /// Detaches slot `id` (see [`Entry::detached`]), once.
    fn detach(&mut self, id: u32) {
        if let Some(Some(e)) = self.entries.get_mut(id as usize) {
            if !e.detached {
                e.detached = true;
                self.detached += 1;
                self.every.swap_remove(&id);
            }
        }
    }

    /// Ends slot `id`'s membership: removed, or, with DIDs of it in the index still, detached
    /// (found under them, it gets nothing; its registration takes them out). O(1) for a filter
    /// of many DIDs: this runs on the dispatcher's thread.
    fn end(&mut self, id: u32) -> Option<Entry> {
        let e = self.entries.get_mut(id as usize)?.as_mut()?;
        if e.detached {
            return None;
        }
        if e.dids_indexed == 0 {
            return self.remove(id);
        }
        self.detach(id);
        None
    }

    /// Takes slot `id` out of the index and frees it. A filter of many DIDs must have none
    /// left in `by_did` ([`Registration`]'s drop takes them out first).
    fn remove(&mut self, id: u32) -> Option<Entry> {
        let e = self.entries.get_mut(id as usize)?.take()?;
        if e.detached {
            self.detached -= 1;
        }
        keys(&e.filter, |k| match k {
            Key::Did(d) => bucket_remove(&mut self.by_did, d, id),
            Key::Collection(c) => bucket_remove(&mut self.by_collection, c, id),
            Key::Prefix(p) => bucket_remove(&mut self.by_prefix, p, id),
            Key::NoCollection => {
                self.no_collection.swap_remove(&id);
            }
            Key::Every => {
                self.every.swap_remove(&id);
            }
        });
        self.free.push(id);
        Some(e)
    }

    /// The whole index, leaving it empty.
    fn drain(&mut self) -> Index {
        let closed = self.closed;
        std::mem::replace(self, Index { closed, ..Index::default() })
    }

    /// Calls `f` once for each entry whose filter might match an event with these fields (a
    /// superset: `f` checks the filter).
    fn candidates(
        &mut self,
        t: u64,
        kind: EventKind,
        did: &str,
        collection: Option<&str>,
        mut f: impl FnMut(u32, &Entry),
    ) {
        let Index { entries, by_did, by_collection, by_prefix, no_collection, every, .. } = self;
        let mut visit = |id: u32| {
            if let Some(Some(e)) = entries.get_mut(id as usize) {
                if e.visited != t && !e.detached {
                    e.visited = t;
                    f(id, e);
                }
            }
        };
        if let Some(ids) = by_did.get(did) {
            ids.iter().for_each(|&id| visit(id));
        }
        match (kind, collection) {
            (EventKind::Commit, Some(c)) => {
                if let Some(ids) = by_collection.get(c) {
                    ids.iter().for_each(|&id| visit(id));
                }
                if !by_prefix.is_empty() {
                    // A prefix ends with `.`, so it is `c` up to one of its dots.
                    for (i, _) in c.match_indices('.') {
                        if let Some(ids) = by_prefix.get(&c[..=i]) {
                            ids.iter().for_each(|&id| visit(id));
                        }
                    }
                }
            }
            _ => no_collection.iter().for_each(|&id| visit(id)),
        }
        every.iter().for_each(|&id| visit(id));
    }
}

/// The index of live subscribers and the thread that fills their queues.
pub struct Dispatcher {
    index: Mutex<Index>,
    /// Every event up to here has been handed out (see the module comment).
    dispatched_up_to: AtomicU64,
    overflows: prometheus::IntCounter,
    /// Bytes of event JSON in all queues, and their cap.
    queued: Arc<AtomicUsize>,
    budget: usize,
}

/// A stream's place in the index; dropping it leaves the index.
pub struct Registration {
    dispatcher: Arc<Dispatcher>,
    id: u32,
    queue: Arc<Queue>,
}

impl Registration {
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Nothing waiting in the queue and no event a dispatch is still placing: the position may
    /// move to `dispatched_up_to` (read first, then this).
    pub fn is_idle(&self) -> bool {
        self.queue.is_idle()
    }

    /// The queue ended (overflowed, an event only the log holds, a hole, the ring gone).
    pub fn has_ended(&self) -> bool {
        self.queue.has_ended()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let index = &self.dispatcher.index;
        let (filter, indexed) = {
            let mut index = lock(index);
            let Some(e) = index.entry_of(self.id, &self.queue) else { return };
            let (filter, indexed) = (e.filter.clone(), e.dids_indexed);
            if indexed == 0 {
                let removed = index.remove(self.id);
                drop(index);
                // Freed outside the index's lock: the last reference to a filter of 10,000
                // DIDs frees 10,000 strings, which live dispatch need not wait for.
                drop(removed);
                return;
            }
            // Many DIDs in the index: detached first (it gets nothing), then taken out a
            // chunk per hold, its slot kept until the last (so no one else takes it meanwhile).
            index.detach(self.id);
            (filter, indexed)
        };
        // Each later hold checks the slot is still ours first ([`Index::entry_of`]).
        let dids: Vec<&String> = filter.dids().into_iter().flatten().take(indexed).collect();
        for chunk in dids.chunks(DIDS_PER_LOCK) {
            let mut index = lock(index);
            if index.entry_of(self.id, &self.queue).is_none() {
                return;
            }
            chunk.iter().for_each(|d| bucket_remove(&mut index.by_did, d, self.id));
        }
        let removed = {
            let mut index = lock(index);
            let Some(e) = index.entry_of(self.id, &self.queue) else { return };
            e.dids_indexed = 0;
            index.remove(self.id)
        };
        drop(removed);
    }
}

impl Dispatcher {
    /// Starts the dispatcher on `ring`'s events, on a thread of its own that ends when the ring
    /// closes (every queue then ends with [`Ended::Closed`]). All queues together hold at most
    /// `budget` bytes of event JSON.
    pub fn start(
        ring: &Ring,
        tip: Arc<Tip>,
        budget: usize,
        overflows: prometheus::IntCounter,
    ) -> std::io::Result<Arc<Dispatcher>> {
        // Subscribed before the tip is read: events after it come through the ring.
        let rx = ring.subscribe();
        let dispatcher = Arc::new(Dispatcher::new(tip.newest().unwrap_or(0), budget, overflows));
        let d = dispatcher.clone();
        std::thread::Builder::new().name("contrail-dispatch".into()).spawn(move || d.run(rx, &tip))?;
        Ok(dispatcher)
    }

    fn new(dispatched_up_to: u64, budget: usize, overflows: prometheus::IntCounter) -> Dispatcher {
        Dispatcher {
            index: Mutex::new(Index::default()),
            dispatched_up_to: AtomicU64::new(dispatched_up_to),
            overflows,
            queued: Arc::new(AtomicUsize::new(0)),
            budget,
        }
    }

    /// Adds a stream with `filter` whose position is `has_up_to`; returns its registration
    /// and `dispatched_up_to` at that moment (the stream reads the log up to there, its queue
    /// has what comes after).
    pub fn register(self: &Arc<Self>, filter: Arc<Filter>, has_up_to: u64) -> (Registration, u64) {
        let queue = Arc::new(Queue {
            state: Mutex::default(),
            ready: Notify::new(),
            skip_until: has_up_to,
            all_queued: self.queued.clone(),
            budget: self.budget,
        });
        let mut index = lock(&self.index);
        let id = if index.closed {
            queue.end(Ended::Closed);
            u32::MAX
        } else {
            index.insert(filter.clone(), queue.clone())
        };
        let up_to = self.dispatched_up_to.load(Ordering::Acquire);
        drop(index);
        let registration = Registration { dispatcher: self.clone(), id, queue };
        if id != u32::MAX && many_dids(&filter) {
            self.index_dids(&registration, &filter);
        }
        (registration, up_to)
    }

    /// Moves a filter of many DIDs into `by_did` a chunk per hold of the index's lock, then
    /// out of `every` (which found it meanwhile). Stops if its queue ends on the way.
    fn index_dids(&self, r: &Registration, filter: &Filter) {
        let dids: Vec<&String> = filter.dids().into_iter().flatten().collect();
        for chunk in dids.chunks(DIDS_PER_LOCK) {
            let mut index = lock(&self.index);
            match index.entry_of(r.id, &r.queue) {
                Some(e) if !e.detached => e.dids_indexed += chunk.len(),
                _ => return,
            }
            chunk.iter().for_each(|d| bucket_add(&mut index.by_did, d, r.id));
        }
        let mut index = lock(&self.index);
        if index.entry_of(r.id, &r.queue).is_some_and(|e| !e.detached) {
            index.every.swap_remove(&r.id);
        }
    }

    pub fn dispatched_up_to(&self) -> u64 {
        self.dispatched_up_to.load(Ordering::Acquire)
    }

    fn run(&self, mut rx: broadcast::Receiver<Published>, tip: &Tip) {
        // However this thread ends, no stream waits on it for ever; and a panic here (a bug)
        // takes the process down rather than leave it serving no live events: the log is
        // crash-safe, and the supervisor restarts it.
        struct CloseOnExit<'a>(&'a Dispatcher);
        impl Drop for CloseOnExit<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    tracing::error!("the live dispatcher panicked: aborting");
                    std::process::abort();
                }
                self.0.end_all(Ended::Closed, None);
            }
        }
        let _guard = CloseOnExit(self);
        loop {
            match rx.blocking_recv() {
                Ok(item) => self.dispatch_after_holes(&item, tip),
                // Events were missed: every live stream reads them from the log.
                Err(broadcast::error::RecvError::Lagged(_)) => self.end_all(Ended::Overflowed, tip.newest()),
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Dispatches `item`; when it is the first event after a hole in the log, every queue ends
    /// first, before anything moves past the hole: every live stream, whatever its filter,
    /// reads the log from its position and is told of the hole there (the dispatcher tells
    /// queues only of events). Holes are rare (a replica whose upstreams lost events).
    fn dispatch_after_holes(&self, item: &Published, tip: &Tip) {
        let mut index = lock(&self.index);
        // In the same hold of the lock as the dispatch: a stream registering in between would
        // join at a point before the hole and be handed only what comes after it.
        let old = tip.holes().ends_at(item.time_us()).then(|| self.end_queues(&mut index, Ended::Hole));
        self.dispatch_locked(&mut index, item);
        drop(index);
        drop(old);
    }

    #[cfg(test)]
    fn dispatch(&self, item: &Published) {
        self.dispatch_locked(&mut lock(&self.index), item);
    }

    fn dispatch_locked(&self, index: &mut Index, item: &Published) {
        let t = item.time_us();
        let mut ended = Vec::new();
        match item {
            Published::Event(ev) => {
                let (kind, did, collection) = (ev.kind, ev.did(), ev.collection());
                let share = self.budget / 2 / index.len().max(1);
                index.candidates(t, kind, did, collection, |id, e| {
                    if e.filter.matches(kind, did, collection) && !e.queue.push(ev, share) {
                        ended.push(id);
                    }
                });
            }
            Published::InLog(k) => {
                let (kind, did, collection) = (k.kind, &*k.did, k.collection.as_deref());
                index.candidates(t, kind, did, collection, |id, e| {
                    if t > e.queue.skip_until && e.filter.matches(kind, did, collection) {
                        e.queue.end(Ended::InLog(t));
                        ended.push(id);
                    }
                });
            }
        }
        for id in ended {
            index.end(id);
            if matches!(item, Published::Event(_)) {
                self.overflows.inc();
            }
        }
        self.dispatched_up_to.fetch_max(t, Ordering::Release);
    }

    /// Ends every queue; with `up_to`, moves `dispatched_up_to` there (after a lag: everything
    /// up to the log's newest event is in the log, what is newer comes through the ring).
    fn end_all(&self, how: Ended, up_to: Option<u64>) {
        let mut index = lock(&self.index);
        let old = self.end_queues(&mut index, how);
        if let Some(t) = up_to {
            self.dispatched_up_to.fetch_max(t, Ordering::Release);
        }
        drop(index);
        // Its keys (up to millions, with many-DID filters) are freed outside the lock.
        drop(old);
    }

    /// Ends every queue in `index` and empties it; returns what it held, to be freed once the
    /// lock is let go.
    fn end_queues(&self, index: &mut Index, how: Ended) -> Index {
        if how == Ended::Closed {
            index.closed = true;
        }
        let old = index.drain();
        for e in old.entries.iter().flatten().filter(|e| !e.detached) {
            e.queue.end(how);
            if how == Ended::Overflowed {
                self.overflows.inc();
            }
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(t: u64, kind: EventKind, did: &str, collection: &str) -> Arc<Event> {
        let mut out = Vec::new();
        Event::begin(&mut out, did, kind);
        out.extend_from_slice(b",\"commit\":{\"collection\":\"");
        let at = out.len();
        out.extend_from_slice(collection.as_bytes());
        out.extend_from_slice(b"\"}}");
        let mut e = Event::from_parts(out, kind, did.len(), at..at + collection.len());
        e.stamp(t);
        Arc::new(e)
    }

    fn taken(q: &Queue) -> Vec<u64> {
        let mut out = Vec::new();
        while let Take::Event(e) = q.take() {
            out.push(e.time_us);
        }
        out
    }

    fn dispatcher() -> Arc<Dispatcher> {
        Arc::new(Dispatcher::new(0, 64 << 20, prometheus::IntCounter::new("o", "o").unwrap()))
    }

    const A: &str = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn each_event_reaches_exactly_the_filters_that_match_it_once() {
        let d = dispatcher();
        let f = |c: &[&str], dids: &[&str]| {
            let c: Vec<String> = c.iter().map(|s| s.to_string()).collect();
            let dids: Vec<String> = dids.iter().map(|s| s.to_string()).collect();
            Arc::new(Filter::new(&c, &dids).unwrap())
        };
        let everything = d.register(f(&[], &[]), 0).0;
        let posts = d.register(f(&["app.bsky.feed.post"], &[]), 0).0;
        // Found under the collection and under two prefixes of it: still once per event.
        let feed = d.register(f(&["app.bsky.feed.post", "app.bsky.feed.*", "app.*"], &[]), 0).0;
        let did_b = d.register(f(&[], &[B]), 0).0;
        let did_b_likes = d.register(f(&["app.bsky.feed.like"], &[B]), 0).0;
        let nobody = d.register(f(&["org.example.nobody"], &[]), 0).0;
        // More DIDs than one hold of the index's lock takes: indexed a chunk at a time.
        let many: Vec<String> = (0..3 * DIDS_PER_LOCK).map(|i| format!("did:plc:{i:0>24}")).chain([B.into()]).collect();
        let many_dids = d.register(Arc::new(Filter::new(&[], &many).unwrap()), 0).0;
        let commits_only = d
            .register(
                Arc::new(
                    Filter::new(&["app.bsky.feed.like".into()], &[])
                        .unwrap()
                        .with_kinds(crate::options::Kinds::NONE.with(EventKind::Commit)),
                ),
                0,
            )
            .0;
        let events = [
            event(1, EventKind::Commit, A, "app.bsky.feed.post"),
            event(2, EventKind::Commit, B, "app.bsky.feed.like"),
            event(3, EventKind::Identity, B, ""),
            event(4, EventKind::Commit, A, "app.bsky.graph.follow"),
            event(5, EventKind::Sync, A, ""),
        ];
        for e in &events {
            d.dispatch(&Published::Event(e.clone()));
        }
        assert_eq!(taken(everything.queue()), vec![1, 2, 3, 4], "sync only when asked");
        assert_eq!(taken(posts.queue()), vec![1, 3], "identity bypasses wantedCollections");
        assert_eq!(taken(feed.queue()), vec![1, 2, 3, 4]);
        assert_eq!(taken(did_b.queue()), vec![2, 3]);
        assert_eq!(taken(did_b_likes.queue()), vec![2, 3]);
        assert_eq!(taken(nobody.queue()), vec![3]);
        assert_eq!(taken(many_dids.queue()), vec![2, 3]);
        assert_eq!(lock(&d.index).every.len(), 1, "the unfiltered one (the many DIDs are indexed)");
        assert_eq!(taken(commits_only.queue()), vec![2]);
        assert_eq!(d.dispatched_up_to(), 5);
        // Leaving empties the index.
        drop((everything, posts, feed, did_b, did_b_likes, nobody, commits_only, many_dids));
        let index = lock(&d.index);
        assert!(index.by_did.is_empty() && index.by_collection.is_empty() && index.by_prefix.is_empty());
        assert!(index.every.is_empty() && index.no_collection.is_empty());
        assert_eq!(index.free.len(), index.entries.len());
        assert_eq!(index.detached, 0);
    }

    #[test]
    fn a_registration_leaving_after_the_index_was_emptied_leaves_its_slots_new_owner_alone() {
        let d = dispatcher();
        let mine = "did:plc:000000000000000000000042";
        let many: Vec<String> = (0..4 * DIDS_PER_LOCK).map(|i| format!("did:plc:{i:0>24}")).collect();
        let (r, _) = d.register(Arc::new(Filter::new(&[], &many).unwrap()), 0);
        // A lag empties the index; a newcomer with one of its DIDs takes its slot number.
        d.end_all(Ended::Overflowed, None);
        let (other, _) = d.register(Arc::new(Filter::new(&[], &many).unwrap()), 0);
        assert_eq!(other.id, r.id);
        drop(r);
        d.dispatch(&Published::Event(event(1, EventKind::Commit, mine, "app.bsky.feed.post")));
        assert_eq!(taken(other.queue()), vec![1], "the newcomer still gets its events");
        assert_eq!(lock(&d.index).by_did.len(), 4 * DIDS_PER_LOCK);
    }

    #[test]
    fn a_filter_of_many_dids_is_indexed_in_chunks_and_an_ended_one_finds_nothing_until_it_leaves() {
        let d = dispatcher();
        let many: Vec<String> = (0..10_000).map(|i| format!("did:plc:{i:0>24}")).collect();
        let (r, _) = d.register(Arc::new(Filter::new(&[], &many).unwrap()), 0);
        {
            let index = lock(&d.index);
            assert_eq!(index.by_did.len(), 10_000);
            assert!(index.every.is_empty(), "out of the every-event list once its DIDs are in");
            assert_eq!(index.len(), 1);
        }
        let mine = "did:plc:000000000000000000000042";
        d.dispatch(&Published::Event(event(1, EventKind::Commit, mine, "app.bsky.feed.post")));
        d.dispatch(&Published::Event(event(2, EventKind::Commit, A, "app.bsky.feed.post")));
        assert_eq!(taken(r.queue()), vec![1]);
        // An event the ring did not hold ends its queue: detached at once (its 10,000 DIDs are
        // not taken out on the dispatcher's thread), it gets nothing more.
        let k = Published::in_log(&event(3, EventKind::Commit, mine, "app.bsky.feed.post"));
        d.dispatch(&k);
        d.dispatch(&Published::Event(event(4, EventKind::Commit, mine, "app.bsky.feed.post")));
        assert!(matches!(r.queue().take(), Take::Ended(Ended::InLog(3))));
        assert!(matches!(r.queue().take(), Take::Ended(Ended::InLog(3))), "nothing after the end");
        {
            let index = lock(&d.index);
            assert_eq!((index.len(), index.detached, index.by_did.len()), (0, 1, 10_000));
        }
        // Its slot stays taken until it leaves: a newcomer with one of its DIDs gets its own.
        let (other, _) = d.register(Arc::new(Filter::new(&[], &[mine.to_string()]).unwrap()), 0);
        assert_ne!(other.id, r.id);
        drop(r);
        let index = lock(&d.index);
        assert_eq!(index.by_did.len(), 1, "only the newcomer's DID is left");
        assert_eq!((index.len(), index.detached), (1, 0));
        drop(index);
        d.dispatch(&Published::Event(event(5, EventKind::Commit, mine, "app.bsky.feed.post")));
        assert_eq!(taken(other.queue()), vec![5]);
    }

    #[test]
    fn the_filter_budget_counts_the_index_copy_of_what_the_index_holds() {
        let dids = |n: usize| (0..n).map(|i| format!("did:web:{i:0>200}.example")).collect::<Vec<_>>();
        for n in [DIDS_PER_LOCK, 4 * DIDS_PER_LOCK] {
            let by_did = Filter::new(&[], &dids(n)).unwrap();
            let strings: usize = dids(n).iter().map(String::len).sum();
            assert_eq!(index_bytes(&by_did), strings + n * KEY_OVERHEAD);
            assert_eq!(filter_bytes(&by_did), by_did.heap_bytes() + index_bytes(&by_did));
        }
        let feed = Filter::new(&["app.bsky.feed.post".into(), "app.bsky.graph.*".into()], &[]).unwrap();
        assert_eq!(index_bytes(&feed), "app.bsky.feed.post".len() + "app.bsky.graph.".len() + 2 * KEY_OVERHEAD);
        assert_eq!(index_bytes(&Filter::default()), 0);
    }

    #[test]
    fn a_full_queue_ends_and_leaves_the_index_and_others_go_on() {
        let d = dispatcher();
        let (slow, _) = d.register(Arc::new(Filter::default()), 0);
        let (fast, _) = d.register(Arc::new(Filter::default()), 0);
        for t in 1..=QUEUE_EVENTS as u64 + 1 {
            d.dispatch(&Published::Event(event(t, EventKind::Commit, A, "app.bsky.feed.post")));
            assert!(matches!(fast.queue().take(), Take::Event(e) if e.time_us == t));
        }
        assert!(matches!(slow.queue().take(), Take::Ended(Ended::Overflowed)), "emptied and ended");
        assert_eq!(d.overflows.get(), 1);
        assert_eq!(lock(&d.index).every.len(), 1, "the overflowed one left the index");
        // Its registration dropping later does not disturb whoever took the slot.
        let (again, _) = d.register(Arc::new(Filter::default()), 0);
        drop(slow);
        d.dispatch(&Published::Event(event(5000, EventKind::Commit, A, "x.y.z")));
        assert_eq!(taken(again.queue()), vec![5000]);
        assert_eq!(taken(fast.queue()), vec![5000]);
    }

    #[test]
    fn a_queue_skips_what_its_stream_has_and_every_byte_is_given_back() {
        let d = dispatcher();
        let (ahead, _) = d.register(Arc::new(Filter::default()), 3);
        let (a, _) = d.register(Arc::new(Filter::default()), 0);
        let (b, _) = d.register(Arc::new(Filter::default()), 0);
        for t in 1..=5 {
            d.dispatch(&Published::Event(event(t, EventKind::Commit, A, "app.bsky.feed.post")));
        }
        assert_eq!(taken(ahead.queue()), vec![4, 5], "the stream had up to 3 already");
        assert_eq!(taken(a.queue()), vec![1, 2, 3, 4, 5]);
        assert!(d.queued.load(Ordering::Relaxed) > 0, "`b` holds its five");
        drop((ahead, a, b));
        assert_eq!(d.queued.load(Ordering::Relaxed), 0, "every byte given back");
    }

    #[test]
    fn stuck_queues_fill_only_the_pool_and_busy_ones_keep_their_share() {
        // A budget of 2,000 bytes: a pool of 1,000, and 1,000 ÷ 3 queues = 333 each.
        let budget = 2000;
        let d = Arc::new(Dispatcher::new(0, budget, prometheus::IntCounter::new("o", "o").unwrap()));
        let filter = |c: &str| Arc::new(Filter::new(&[c.to_string()], &[]).unwrap());
        let (stuck, _) = d.register(filter("app.bsky.feed.post"), 0);
        let (busy, _) = d.register(filter("app.bsky.feed.like"), 0);
        let (_bystander, _) = d.register(filter("org.example.nobody"), 0);
        // Times of one width: every event's JSON has the same size.
        let mut t = 1_000_000;
        let mut ev = |c: &str| {
            t += 1;
            Published::Event(event(t, EventKind::Commit, A, c))
        };
        let size = match ev("x") {
            Published::Event(e) => e.json().len() - 1 + "app.bsky.feed.post".len(),
            _ => unreachable!(),
        };
        let share = budget / 2 / 3;
        assert!(share >= 2 * size, "the test needs room for two events in a share");
        // The stuck client's queue takes the pool while it is not full...
        while d.queued.load(Ordering::Relaxed) + size <= budget / 2 {
            d.dispatch(&ev("app.bsky.feed.post"));
        }
        assert!(matches!(stuck.queue().take(), Take::Event(_)), "it holds what it was given");
        d.dispatch(&ev("app.bsky.feed.post"));
        assert_eq!(d.overflows.get(), 0, "one event made room for one more");
        // ...but with the pool full, a busy queue still fills its share (before, its second
        // event over the budget ended it: one stuck client sent every busy one to the log).
        let in_share = share / size;
        for _ in 0..in_share {
            d.dispatch(&ev("app.bsky.feed.like"));
            assert!(d.queued.load(Ordering::Relaxed) <= budget, "the budget holds");
        }
        assert_eq!(d.overflows.get(), 0, "the busy queue kept its share");
        assert_eq!(taken(busy.queue()).len(), in_share);
        for _ in 0..=in_share {
            d.dispatch(&ev("app.bsky.feed.like"));
        }
        assert!(matches!(busy.queue().take(), Take::Ended(Ended::Overflowed)), "past its share with the pool full");
        assert_eq!(d.overflows.get(), 1);
        // The stuck queue, past its share, ends at its next event and frees the pool.
        d.dispatch(&ev("app.bsky.feed.post"));
        assert!(matches!(stuck.queue().take(), Take::Ended(Ended::Overflowed)));
        assert_eq!(d.overflows.get(), 2);
        assert_eq!(d.queued.load(Ordering::Relaxed), 0);
        // Stuck clients joining one after another each fill the share of their moment (larger
        // while fewer were in the index): the budget still bounds them all (one event over it
        // at most: a queue's first event always goes in). A budget of 20,000 bytes here; the
        // shares alone would add up to 28,000.
        let budget = 20_000;
        let d = Arc::new(Dispatcher::new(0, budget, prometheus::IntCounter::new("o", "o").unwrap()));
        let (_bystander, _) = d.register(filter("org.example.nobody"), 0);
        let mut stuck = Vec::new();
        for k in 0..40 {
            let collection = format!("app.bsky.stuck{k:0>2}");
            stuck.push(d.register(filter(&collection), 0).0);
            // Events for it up to what its share allows now (the bystander and the stuck
            // ones before it are in the index too), then none: its DID goes quiet.
            let share_now = budget / 2 / (k + 2);
            let mut held = 0;
            loop {
                let pool_full = d.queued.load(Ordering::Relaxed) + size > budget / 2;
                if held >= 100 * size || (pool_full && held + size > share_now) {
                    break;
                }
                d.dispatch(&ev(&collection));
                held += size;
                let queued = d.queued.load(Ordering::Relaxed);
                assert!(queued <= budget + size, "{queued} bytes queued, budget {budget}");
            }
        }
    }

    #[test]
    fn an_event_the_ring_did_not_hold_ends_only_the_queues_that_want_it_after_what_they_hold() {
        let d = dispatcher();
        let (posts, _) = d.register(Arc::new(Filter::new(&["app.bsky.feed.post".into()], &[]).unwrap()), 0);
        let (likes, _) = d.register(Arc::new(Filter::new(&["app.bsky.feed.like".into()], &[]).unwrap()), 0);
        d.dispatch(&Published::Event(event(6, EventKind::Commit, A, "app.bsky.feed.post")));
        let big = event(7, EventKind::Commit, A, "app.bsky.feed.post");
        d.dispatch(&Published::in_log(&big));
        assert!(matches!(posts.queue().take(), Take::Event(e) if e.time_us == 6), "what came before stays");
        assert!(matches!(posts.queue().take(), Take::Ended(Ended::InLog(7))));
        assert!(matches!(likes.queue().take(), Take::Empty));
        let (_, up_to) = d.register(Arc::new(Filter::default()), 0);
        assert_eq!(up_to, 7);
    }

    #[test]
    fn the_event_after_a_hole_ends_every_queue_first_whatever_its_filter() {
        use crate::log::{holes::Hole, memory::MemoryLog, Log};
        let d = dispatcher();
        let log = Log::memory(MemoryLog::new(64 << 20));
        let filter = |c: &str| Arc::new(Filter::new(&[c.to_string()], &[]).unwrap());
        let posts = d.register(filter("app.bsky.feed.post"), 0).0;
        let nobody = d.register(filter("org.example.nobody"), 0).0;
        let post = |t| event(t, EventKind::Commit, A, "app.bsky.feed.post");
        log.append(&[(*post(1)).clone()], None).unwrap();
        d.dispatch_after_holes(&Published::Event(post(1)), &log.tip());
        assert_eq!(taken(posts.queue()), vec![1]);
        log.append_batch(&[(*post(5)).clone()], None, &[], &[Hole { after: 1, first: 5 }]).unwrap();
        d.dispatch_after_holes(&Published::Event(post(5)), &log.tip());
        assert!(matches!(posts.queue().take(), Take::Ended(Ended::Hole)), "not the event: the log, first");
        assert!(matches!(nobody.queue().take(), Take::Ended(Ended::Hole)), "it wanted nothing, and is told");
        assert_eq!((d.dispatched_up_to(), d.overflows.get()), (5, 0), "not an overflow");
        // Whoever registers next reads the log up to the hole's event, then takes the queue.
        let (again, up_to) = d.register(filter("app.bsky.feed.post"), 1);
        assert_eq!(up_to, 5);
        log.append(&[(*post(6)).clone()], None).unwrap();
        d.dispatch_after_holes(&Published::Event(post(6)), &log.tip());
        assert_eq!(taken(again.queue()), vec![6]);
    }
}
