//! The live-only log backend (`--store memory`): a bounded in-memory window of recent events for
//! cheap, stateless fan-out nodes. Bounded by age (`--retention`) and by bytes
//! (`--memory-bytes`): appending past the byte budget drops the oldest events at once. The
//! verification state counts in the same budget (each of its two maps at most an eighth of it),
//! so `--memory-bytes` bounds all the log holds.
//! Nothing survives a restart; a cursor older than the window starts at its oldest event.

use super::{LogStats, RelayCursor, RepoStateWrite};
use crate::event::Event;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// Per-event bookkeeping cost counted against the budget (B-tree node share, key, box).
const ENTRY_OVERHEAD: u64 = 64;

pub struct MemoryLog {
    max_bytes: u64,
    inner: RwLock<Inner>,
    /// The newest event evicted or trimmed so far (0: none), shared with the log's tip
    /// ([`super::Tip::trimmed_through`]). Raised under the window's lock before an event goes,
    /// so a reader that finds an event gone sees the mark past it once it has let go of the
    /// lock (raised after the eviction, a replayer the window overtook could read the old mark
    /// and go uncounted).
    trimmed: Arc<AtomicU64>,
}

struct Inner {
    events: BTreeMap<u64, Box<[u8]>>,
    /// The events' bytes, with [`ENTRY_OVERHEAD`] each.
    bytes: u64,
    last_time_us: u64,
    cursor: Option<RelayCursor>,
    /// Verification state (see the RocksDB backend), bounded: a live-only node forgets the
    /// chain of the repo written least recently (its next commit anchors anew).
    repos: StateMap,
    dids: StateMap,
    /// Tests only: reading a repo's chain state fails, as a disk's read error would.
    #[cfg(test)]
    repo_states_unreadable: bool,
}

/// One verification map: by key, least recently written first out, held to
/// [`MAX_STATE_ENTRIES`] entries and `max_bytes`.
struct StateMap {
    /// Unbounded in the cache's own terms (nothing allocated up front); bounded by `put`.
    entries: lru::LruCache<String, Vec<u8>>,
    /// What the entries cost, counted as [`state_entry_bytes`].
    bytes: u64,
    max_bytes: u64,
}

impl StateMap {
    fn new(max_bytes: u64) -> Self {
        StateMap { entries: lru::LruCache::unbounded(), bytes: 0, max_bytes }
    }

    fn put(&mut self, key: &str, value: &[u8]) {
        self.bytes += state_entry_bytes(key, value);
        if let Some((k, v)) = self.entries.push(key.to_string(), value.to_vec()) {
            self.bytes -= state_entry_bytes(&k, &v);
        }
        while self.entries.len() > MAX_STATE_ENTRIES || self.bytes > self.max_bytes {
            let Some((k, v)) = self.entries.pop_lru() else { break };
            self.bytes -= state_entry_bytes(&k, &v);
        }
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.entries.peek(key).cloned()
    }

    fn remove(&mut self, key: &str) {
        if let Some((k, v)) = self.entries.pop_entry(key) {
            self.bytes -= state_entry_bytes(&k, &v);
        }
    }
}

/// Entries each verification map keeps at most on a live-only node.
const MAX_STATE_ENTRIES: usize = 1_000_000;
/// Per-entry cost of a verification map beyond its key and value (the cache's node and
/// links, its hash table's slot, two heap blocks).
const STATE_ENTRY_OVERHEAD: u64 = 96;

fn state_entry_bytes(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + STATE_ENTRY_OVERHEAD
}

impl Inner {
    /// All the window holds: its events and the verification state.
    fn held_bytes(&self) -> u64 {
        self.bytes + self.repos.bytes + self.dids.bytes
    }

    /// Lets the oldest event go, `trimmed` raised past it first.
    fn pop_oldest(&mut self, trimmed: &AtomicU64) {
        if let Some((&t, _)) = self.events.first_key_value() {
            trimmed.fetch_max(t, Ordering::AcqRel);
        }
        if let Some((_, v)) = self.events.pop_first() {
            self.bytes -= v.len() as u64 + ENTRY_OVERHEAD;
        }
    }
}

impl MemoryLog {
    pub fn new(max_bytes: u64) -> Self {
        let inner = Inner {
            events: BTreeMap::new(),
            bytes: 0,
            last_time_us: 0,
            cursor: None,
            repos: StateMap::new(max_bytes / 8),
            dids: StateMap::new(max_bytes / 8),
            #[cfg(test)]
            repo_states_unreadable: false,
        };
        MemoryLog { max_bytes, inner: RwLock::new(inner), trimmed: Arc::default() }
    }

    /// The mark of what was evicted or trimmed, for the log's tip to share.
    pub(super) fn trimmed_mark(&self) -> Arc<AtomicU64> {
        self.trimmed.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn relay_cursor(&self) -> Option<RelayCursor> {
        self.read().cursor.clone()
    }

    pub fn last_time_us(&self) -> u64 {
        self.read().last_time_us
    }

    pub fn append(&self, events: &[Event], cursor: Option<&RelayCursor>, repo_states: &[RepoStateWrite]) {
        let mut value = Vec::new();
        let mut g = self.write();
        for (did, state) in repo_states {
            g.repos.put(did, state);
        }
        for e in events {
            e.encode_value(&mut value);
            g.bytes += value.len() as u64 + ENTRY_OVERHEAD;
            g.events.insert(e.time_us, value.as_slice().into());
            g.last_time_us = g.last_time_us.max(e.time_us);
        }
        // Never the batch just written: its events may be published as "read it from the log"
        // (a window smaller than a batch, or than one large event, holds the batch until the next).
        // (A write without events, a cursor alone, evicts nothing.)
        let batch_start = events.first().map_or(0, |e| e.time_us);
        while g.held_bytes() > self.max_bytes && g.events.first_key_value().is_some_and(|(t, _)| *t < batch_start) {
            g.pop_oldest(&self.trimmed);
        }
        if let Some(c) = cursor {
            g.cursor = Some(c.clone());
        }
    }

    /// Stores `value` as it is at `time_us` (a corrupt value, for tests of how readers fail).
    #[cfg(test)]
    pub fn put_raw_for_test(&self, time_us: u64, value: &[u8]) {
        let mut g = self.write();
        g.events.insert(time_us, value.into());
        g.last_time_us = g.last_time_us.max(time_us);
    }

    pub fn repo_state(&self, did: &str) -> super::Result<Option<Vec<u8>>> {
        #[cfg(test)]
        if self.read().repo_states_unreadable {
            return Err(super::LogError::Io(std::io::Error::other("a read error (a test's)")));
        }
        Ok(self.read().repos.get(did))
    }

    /// Tests only: from now on, reading a repo's chain state fails.
    #[cfg(test)]
    pub fn make_repo_states_unreadable_for_test(&self) {
        self.write().repo_states_unreadable = true;
    }

    pub fn did_entry(&self, did: &str) -> Option<Vec<u8>> {
        self.read().dids.get(did)
    }

    pub fn put_did_entry(&self, did: &str, value: Option<&[u8]>) {
        let mut g = self.write();
        match value {
            Some(v) => g.dids.put(did, v),
            None => g.dids.remove(did),
        }
    }

    /// Calls `f` with each event from `from` on, up to `limit` of them or until it returns
    /// false: how many it was called with, and the newest event evicted or trimmed before (the
    /// scan holds the window's lock, under which the mark moves).
    pub fn scan_after_trims(&self, from: u64, limit: usize, mut f: impl FnMut(u64, &[u8]) -> bool) -> (usize, u64) {
        let g = self.read();
        let trimmed = self.trimmed.load(Ordering::Acquire);
        let mut n = 0;
        for (t, v) in g.events.range(from..).take(limit) {
            n += 1;
            if !f(*t, v) {
                break;
            }
        }
        (n, trimmed)
    }

    pub fn read_from(&self, from: u64, limit: usize) -> Vec<Event> {
        let g = self.read();
        g.events.range(from..).take(limit).filter_map(|(t, v)| Event::decode_value(*t, v)).collect()
    }

    pub fn oldest_time_us(&self) -> Option<u64> {
        self.read().events.keys().next().copied()
    }

    pub fn newest_time_us(&self) -> Option<u64> {
        self.read().events.keys().next_back().copied()
    }

    pub fn trim_before(&self, cutoff: u64) {
        let mut g = self.write();
        while g.events.first_key_value().is_some_and(|(t, _)| *t < cutoff) {
            g.pop_oldest(&self.trimmed);
        }
    }

    pub fn bytes(&self) -> u64 {
        self.read().bytes
    }

    /// The newest event evicted (past `--memory-bytes`) or trimmed so far (0: none).
    pub fn evicted_through(&self) -> u64 {
        self.trimmed.load(Ordering::Acquire)
    }

    /// What the tip follows, read under one lock (after every append): the oldest and newest
    /// events, and the bytes held.
    pub fn edges(&self) -> (Option<u64>, Option<u64>, u64) {
        let g = self.read();
        let (oldest, newest) = (g.events.keys().next().copied(), g.events.keys().next_back().copied());
        (oldest, newest, g.bytes)
    }

    pub fn stats(&self) -> LogStats {
        let g = self.read();
        LogStats {
            events: g.events.len() as u64,
            oldest_time_us: g.events.keys().next().copied(),
            newest_time_us: g.events.keys().next_back().copied(),
            relay_url: g.cursor.as_ref().map(|c| c.url.clone()),
            relay_seq: g.cursor.as_ref().map(|c| c.seq),
            disk_bytes: g.bytes,
        }
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::event::EventKind;

    fn event(t: u64, pad: usize) -> Event {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", EventKind::Identity);
        out.extend_from_slice(format!(",\"pad\":\"{}\"}}", "x".repeat(pad)).as_bytes());
        let mut e = Event::from_parts(out, EventKind::Identity, 32, 0..0);
        e.stamp(t);
        e
    }

    #[test]
    fn a_window_smaller_than_a_batch_keeps_the_batch_until_the_next() {
        let log = MemoryLog::new(1 << 20);
        log.append(&[event(1, 1000)], None, &[]);
        // One event larger than the window: kept (it may be published as one to read from the
        // log); what came before it goes.
        log.append(&[event(2, 2 << 20)], None, &[]);
        assert_eq!((log.oldest_time_us(), log.newest_time_us()), (Some(2), Some(2)));
        log.append(&[], None, &[]);
        assert_eq!(log.oldest_time_us(), Some(2), "a write without events evicts nothing");
        log.append(&[event(3, 1000), event(4, 1000)], None, &[]);
        assert_eq!((log.oldest_time_us(), log.newest_time_us()), (Some(3), Some(4)));
    }

    /// The verification state keeps its last MAX_STATE_ENTRIES repos, the least recently
    /// written going first; a repo written again stays.
    #[test]
    fn the_verification_state_lets_the_least_recently_written_repo_go() {
        // (A budget whose eighth holds a million small entries.)
        let log = MemoryLog::new(1 << 30);
        let did = |n: usize| format!("did:plc:{n}");
        let writes: Vec<(String, Vec<u8>)> = (0..MAX_STATE_ENTRIES).map(|n| (did(n), vec![1])).collect();
        log.append(&[], None, &writes);
        log.append(&[], None, &[(did(0), vec![2])]);
        log.append(&[], None, &[(did(MAX_STATE_ENTRIES), vec![3])]);
        assert_eq!(log.repo_state(&did(0)).unwrap(), Some(vec![2]), "written again: kept");
        assert_eq!(log.repo_state(&did(1)).unwrap(), None, "the least recently written went");
        assert_eq!(log.repo_state(&did(MAX_STATE_ENTRIES)).unwrap(), Some(vec![3]));
        assert_eq!(log.read().repos.entries.len(), MAX_STATE_ENTRIES);
        log.put_did_entry("did:plc:x", Some(b"k"));
        log.put_did_entry("did:plc:x", None);
        assert_eq!(log.did_entry("did:plc:x"), None);
    }

    /// The verification state counts in `--memory-bytes`: each of its maps holds at most an
    /// eighth of it (the least recently written going first), and the events get what is
    /// left. Before, a million entries per map were held beyond the budget.
    #[test]
    fn the_verification_state_counts_in_the_memory_budget() {
        let log = MemoryLog::new(1 << 20);
        let events: Vec<Event> = (1..=10).map(|t| event(t, 100_000)).collect();
        log.append(&events, None, &[]);
        assert_eq!(log.oldest_time_us(), Some(1), "the events alone fit");
        let state = vec![7u8; 1_000];
        let did = |n: usize| format!("did:plc:{n:024}");
        let writes: Vec<(String, Vec<u8>)> = (0..1_000).map(|n| (did(n), state.clone())).collect();
        log.append(&[event(11, 10)], None, &writes);
        for n in 0..1_000 {
            log.put_did_entry(&did(n), Some(&state));
        }
        log.append(&[event(12, 10)], None, &[]);
        let g = log.read();
        for map in [&g.repos, &g.dids] {
            let counted: u64 = map.entries.iter().map(|(k, v)| state_entry_bytes(k, v)).sum();
            assert_eq!(map.bytes, counted);
            assert!(map.bytes <= 1 << 17 && map.bytes > (1 << 17) - 2_000, "an eighth, full: {}", map.bytes);
            assert!(map.entries.peek(&did(999)).is_some() && map.entries.peek(&did(0)).is_none());
        }
        assert!(g.held_bytes() <= 1 << 20, "{} held", g.held_bytes());
        assert_eq!(g.events.first_key_value().map(|(t, _)| *t), Some(4), "the oldest events made room");
        drop(g);
        log.put_did_entry(&did(999), None);
        let g = log.read();
        assert_eq!(g.dids.bytes, g.dids.entries.iter().map(|(k, v)| state_entry_bytes(k, v)).sum::<u64>());
    }

    #[test]
    fn the_shared_trim_mark_passes_an_event_as_it_goes() {
        let log = MemoryLog::new(1 << 20);
        let mark = log.trimmed_mark();
        log.append(&[event(1, 1000), event(2, 1000)], None, &[]);
        assert_eq!(mark.load(Ordering::Acquire), 0);
        // Evicted by the bound in the append itself: the mark the tip shares moved with it.
        log.append(&[event(3, 2 << 20)], None, &[]);
        assert_eq!((log.oldest_time_us(), mark.load(Ordering::Acquire)), (Some(3), 2));
        log.append(&[event(4, 10), event(5, 10)], None, &[]);
        log.trim_before(5);
        assert_eq!((log.oldest_time_us(), mark.load(Ordering::Acquire)), (Some(5), 4));
    }
}
