//! Events read back from the log, shared by the subscribers replaying them at about the same
//! time. Each replayer used to decode its own copy of every event, so each compressed replayer
//! compressed every event again; with the decoded event shared, its compressed frames (cached
//! on the event, DESIGN.md invariant 5) are built once for all of them.
//!
//! Bounded by bytes (`--replay-cache-bytes`, 64 MiB: a few seconds of a fast replay), oldest
//! inserted first out: replayers that move together (a burst of
//! clients reconnecting with about the same cursor, or many starting at the oldest event) hit
//! it; a lone replayer far from the others costs one map lookup per event.

use crate::event::Event;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Per-entry overhead counted besides the JSON (the event struct, map and queue entries).
const ENTRY_OVERHEAD: usize = 128;

pub struct ReplayCache {
    events: DashMap<u64, Arc<Event>>,
    /// Insertion order with each entry's counted size, for eviction.
    order: Mutex<VecDeque<(u64, usize)>>,
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl ReplayCache {
    pub fn new(max_bytes: usize) -> ReplayCache {
        ReplayCache { events: DashMap::new(), order: Mutex::default(), bytes: AtomicUsize::new(0), max_bytes }
    }

    /// The event stored at `time_us` as `value`: the shared copy if another replayer decoded it
    /// recently, else decoded now (and shared). `None` when the value is corrupt.
    pub fn get_or_decode(&self, time_us: u64, value: &[u8]) -> Option<Arc<Event>> {
        if self.max_bytes == 0 {
            return Event::decode_value(time_us, value).map(Arc::new);
        }
        if let Some(e) = self.events.get(&time_us) {
            return Some(e.clone());
        }
        let decoded = Arc::new(Event::decode_value(time_us, value)?);
        let size = decoded.json().len() + ENTRY_OVERHEAD;
        if size > self.max_bytes / 4 {
            return Some(decoded); // a giant event is not worth evicting everything for
        }
        // Two replayers may decode the same event at once: the first insert wins for both.
        let shared = match self.events.entry(time_us) {
            dashmap::Entry::Occupied(o) => return Some(o.get().clone()),
            dashmap::Entry::Vacant(v) => v.insert(decoded).clone(),
        };
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.push_back((time_us, size));
        let mut bytes = self.bytes.fetch_add(size, Ordering::Relaxed) + size;
        while bytes > self.max_bytes {
            let Some((t, s)) = order.pop_front() else { break };
            self.events.remove(&t);
            bytes = self.bytes.fetch_sub(s, Ordering::Relaxed) - s;
        }
        Some(shared)
    }

    /// Bytes counted now (for tests and the status page).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn stored(i: u64) -> Vec<u8> {
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        let mut out = Vec::new();
        Event::begin(&mut out, did, EventKind::Identity);
        out.extend_from_slice(format!(",\"identity\":{{\"n\":{i}}}}}").as_bytes());
        let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
        e.stamp(1000 + i);
        let mut v = Vec::new();
        e.encode_value(&mut v);
        v
    }

    #[test]
    fn replayers_share_one_decoded_event_and_the_budget_holds() {
        let cache = ReplayCache::new(4 * (ENTRY_OVERHEAD + 200));
        let v = stored(1);
        let a = cache.get_or_decode(1001, &v).unwrap();
        let b = cache.get_or_decode(1001, &v).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the second replayer gets the first one's event");
        assert_eq!(a.time_us, 1001);
        for i in 2..50 {
            cache.get_or_decode(1000 + i, &stored(i)).unwrap();
        }
        assert!(cache.bytes() <= 4 * (ENTRY_OVERHEAD + 200), "{} bytes", cache.bytes());
        let per_entry = ENTRY_OVERHEAD + a.json().len();
        assert!(cache.len() <= 4 * (ENTRY_OVERHEAD + 200) / per_entry, "{} entries", cache.len());
        // The oldest went first.
        let c = cache.get_or_decode(1001, &v).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(cache.get_or_decode(5, b"garbage").is_none());
    }
}
