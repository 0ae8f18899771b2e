//! The event mix: how many events of each kind and collection were ingested recently, for the
//! status page ("what is the firehose made of right now"). The sequencer records every
//! batch; the status history takes the counts every few seconds.
//!
//! Bounded: at most [`MAX_COLLECTIONS`] distinct collections per interval are counted by
//! name (a hostile stream of made-up NSIDs cannot grow the map); the rest count as "other".

use crate::event::{Event, EventKind};
use std::collections::HashMap;
use std::sync::Mutex;

/// Distinct collections counted by name per interval (~100 bytes each).
pub const MAX_COLLECTIONS: usize = 1_000;

/// Counts for one interval.
#[derive(Debug, Default, Clone)]
pub struct MixCounts {
    pub kinds: [u64; EventKind::ALL.len()],
    pub collections: HashMap<String, u64>,
    /// Commits whose collection did not fit in the map.
    pub other: u64,
}

#[derive(Debug, Default)]
pub struct EventMix {
    current: Mutex<MixCounts>,
}

impl EventMix {
    /// Counts a persisted batch (one lock per batch).
    pub fn record(&self, events: &[Event]) {
        let mut c = self.current.lock().unwrap_or_else(|p| p.into_inner());
        for e in events {
            c.kinds[e.kind as usize] += 1;
            let Some(coll) = e.collection() else { continue };
            if let Some(n) = c.collections.get_mut(coll) {
                *n += 1;
            } else if c.collections.len() < MAX_COLLECTIONS {
                c.collections.insert(coll.to_string(), 1);
            } else {
                c.other += 1;
            }
        }
    }

    /// The counts since the last call, starting a new interval.
    pub fn take(&self) -> MixCounts {
        std::mem::take(&mut *self.current.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Kinds and the busiest collections over several intervals.
pub fn summarize<'a>(intervals: impl Iterator<Item = &'a MixCounts>, top: usize) -> serde_json::Value {
    let mut kinds = [0u64; EventKind::ALL.len()];
    let mut by_collection: HashMap<&str, u64> = HashMap::new();
    let mut other = 0;
    for c in intervals {
        for (k, n) in kinds.iter_mut().zip(c.kinds) {
            *k += n;
        }
        for (name, n) in &c.collections {
            *by_collection.entry(name).or_default() += n;
        }
        other += c.other;
    }
    let mut list: Vec<(&str, u64)> = by_collection.into_iter().collect();
    list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    list.truncate(top);
    let kinds: serde_json::Map<String, serde_json::Value> =
        EventKind::ALL.iter().map(|k| (k.as_str().to_string(), kinds[*k as usize].into())).collect();
    serde_json::json!({
        "kinds": kinds,
        "top_collections": list.iter().map(|(c, n)| serde_json::json!([c, n])).collect::<Vec<_>>(),
        "other_collections": other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(coll: &str) -> Event {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:abc", EventKind::Commit);
        out.extend_from_slice(b",\"commit\":{\"collection\":\"");
        let at = out.len();
        out.extend_from_slice(coll.as_bytes());
        out.extend_from_slice(b"\"}}");
        Event::from_parts(out, EventKind::Commit, 11, at..at + coll.len())
    }

    #[test]
    fn counts_kinds_and_top_collections_within_a_bound() {
        let mix = EventMix::default();
        let mut batch: Vec<Event> = (0..5).map(|_| commit("app.bsky.feed.like")).collect();
        batch.push(commit("app.bsky.feed.post"));
        mix.record(&batch);
        let hostile: Vec<Event> = (0..MAX_COLLECTIONS + 50).map(|i| commit(&format!("x.y.z{i}"))).collect();
        mix.record(&hostile);
        let c = mix.take();
        assert_eq!(c.kinds, [6 + MAX_COLLECTIONS as u64 + 50, 0, 0, 0]);
        assert_eq!(c.collections.len(), MAX_COLLECTIONS);
        assert_eq!(c.other, 52);
        let s = summarize([c].iter(), 2);
        assert_eq!(s["top_collections"][0], serde_json::json!(["app.bsky.feed.like", 5]));
        assert_eq!(s["kinds"]["commit"], 6 + MAX_COLLECTIONS as u64 + 50);
        assert_eq!(mix.take().kinds, [0; 4], "a new interval starts empty");
    }
}
