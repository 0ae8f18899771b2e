//! Holes: stretches in the middle of the log where its source lost events before they reached
//! it. A replica whose upstreams no longer had what followed its newest event goes on from the
//! next event one of them has (`source::upstream`): the events in between, if there were any,
//! are in no log it can reach. The hole is stored with the event after it and told, as a gap,
//! to every stream that passes it — on replay, live, and on followers of that replica — just
//! as a stream is told of events retention deleted before it read them.
//!
//! Retention forgets a hole with the event after it: a reader from further back is then told
//! the events deleted, up to the trim mark, which covers it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// No event is stored after `after` and before `first` (the event stored with the hole), and
/// the source may have had some there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    pub after: u64,
    pub first: u64,
}

/// Most holes kept. Past it the oldest are forgotten (said in the log): an upstream that lies
/// about what it lacks could make one per event, and a hole costs every live stream a read of
/// the log.
pub const MAX_HOLES: usize = 4096;

/// The log's holes, by `first`, readable by every stream without a lock while there is none
/// ahead of it.
#[derive(Debug, Default)]
pub struct Holes {
    list: RwLock<VecDeque<Hole>>,
    /// The newest hole's `first` (0: none): a stream past it looks no further.
    newest_first: AtomicU64,
}

impl Holes {
    /// The first hole a reader at `position` has not passed: one with events it has not been
    /// told of between `position` and the hole's `first`.
    pub fn ahead_of(&self, position: u64) -> Option<Hole> {
        if self.newest_first.load(Ordering::Acquire) <= position.saturating_add(1) {
            return None;
        }
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        let i = list.partition_point(|h| h.first <= position.saturating_add(1));
        list.get(i).copied()
    }

    /// The first `n` holes whose `first` is at or after `from`, oldest first.
    pub fn from(&self, from: u64, n: usize) -> Vec<Hole> {
        if self.newest_first.load(Ordering::Acquire) < from {
            return Vec::new();
        }
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        let i = list.partition_point(|h| h.first < from);
        list.range(i..).take(n).copied().collect()
    }

    /// Whether the event at `time_us` is the first after a hole.
    pub fn ends_at(&self, time_us: u64) -> bool {
        if self.newest_first.load(Ordering::Acquire) < time_us {
            return false;
        }
        let list = self.list.read().unwrap_or_else(|p| p.into_inner());
        list.binary_search_by_key(&time_us, |h| h.first).is_ok()
    }

    /// How many holes the log has.
    pub fn count(&self) -> usize {
        self.list.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Adds holes newer than any held (a write's), before the events after them are seen.
    /// When that forgot the oldest (past [`MAX_HOLES`]): the oldest `first` still held, before
    /// which the stored records may go too.
    pub(super) fn add(&self, holes: &[Hole]) -> Option<u64> {
        if holes.is_empty() {
            return None;
        }
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        for &h in holes {
            if list.back().is_some_and(|last| last.first >= h.first) {
                continue; // (never: writes are in time order)
            }
            list.push_back(h);
        }
        let mut forgot = None;
        while list.len() > MAX_HOLES {
            forgot = list.pop_front();
        }
        if let Some(h) = forgot {
            tracing::warn!(
                first = h.first,
                "more than {MAX_HOLES} holes in the log: the oldest are no longer told to subscribers"
            );
        }
        self.newest_first.store(list.back().map_or(0, |h| h.first), Ordering::Release);
        forgot.and(list.front().map(|h| h.first))
    }

    /// Forgets the holes whose first event is at or before `time_us` (deleted by a trim).
    pub(super) fn forget_through(&self, time_us: u64) {
        // Called on every memory-window append: no lock while there is no hole at all.
        if self.newest_first.load(Ordering::Acquire) == 0 {
            return;
        }
        if self.list.read().unwrap_or_else(|p| p.into_inner()).front().is_none_or(|h| h.first > time_us) {
            return;
        }
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        while list.front().is_some_and(|h| h.first <= time_us) {
            list.pop_front();
        }
        self.newest_first.store(list.back().map_or(0, |h| h.first), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_meets_each_hole_ahead_of_it_once_and_trims_forget_them() {
        let holes = Holes::default();
        assert_eq!(holes.ahead_of(0), None);
        holes.add(&[Hole { after: 10, first: 20 }, Hole { after: 30, first: 40 }]);
        assert_eq!(holes.ahead_of(5), Some(Hole { after: 10, first: 20 }), "before it");
        assert_eq!(holes.ahead_of(15), Some(Hole { after: 10, first: 20 }), "inside it");
        assert_eq!(holes.ahead_of(19), Some(Hole { after: 30, first: 40 }), "told (at first - 1)");
        assert_eq!(holes.ahead_of(20), Some(Hole { after: 30, first: 40 }));
        assert_eq!(holes.ahead_of(39), None);
        assert!(holes.ends_at(20) && holes.ends_at(40) && !holes.ends_at(30) && !holes.ends_at(41));
        assert_eq!(holes.from(20, 9), vec![Hole { after: 10, first: 20 }, Hole { after: 30, first: 40 }]);
        assert_eq!(holes.from(20, 1), vec![Hole { after: 10, first: 20 }]);
        assert_eq!((holes.from(21, 9), holes.from(41, 9)), (vec![Hole { after: 30, first: 40 }], vec![]));
        holes.forget_through(20);
        assert_eq!((holes.count(), holes.ahead_of(0)), (1, Some(Hole { after: 30, first: 40 })));
        holes.forget_through(u64::MAX);
        assert_eq!((holes.count(), holes.ahead_of(0)), (0, None));
    }

    #[test]
    fn past_the_cap_the_oldest_holes_are_forgotten() {
        let holes = Holes::default();
        let many: Vec<Hole> = (1..=MAX_HOLES as u64 + 5).map(|i| Hole { after: i * 10, first: i * 10 + 5 }).collect();
        holes.add(&many);
        assert_eq!(holes.count(), MAX_HOLES);
        assert_eq!(holes.ahead_of(0), Some(many[5]));
    }
}
