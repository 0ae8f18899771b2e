//! Replay pages: a run of up to [`REPLAY_BATCH`] stored events rendered once as one
//! subscriber encoding's websocket frames, ready to write, and shared by every subscriber
//! replaying the same run with the same filter and [`Encoding`].
//!
//! Why pages: twenty clients replaying the log at once used to cost twenty times one, each
//! reading, decoding, filtering, compressing and framing every event for itself; sharing the
//! decoded events (compressed once) still left 7× (BENCHMARKS.md). A page is read, filtered,
//! encoded and framed once; each replayer then writes its bytes with one `write` per chunk.
//!
//! Pages are found by position: a page built from `from` covers every stored event with
//! `from <= time_us <= end` (the log is append-only in `time_us` order), so a replayer whose
//! position falls inside a page takes it and skips what it had. A page being built is shared
//! too: the second replayer asking for it waits for the first one's build instead of building
//! its own. Bounded by bytes (`--replay-cache-bytes`), oldest built first out; short pages
//! (the log's end, still growing) are built for their asker and not kept.
//!
//! The pages in subscribers' hands are bounded apart from these: see [`super::replay_budget`].

use super::encode::{append_frame, frame, Encoding};
use crate::event::{view_value, Event};
use crate::log::holes::Hole;
use crate::log::{Log, LogError};
use crate::options::Filter;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Events read from the log per page: large enough to amortise the read and a write per
/// chunk, small enough (~1 MB) to keep a replaying subscriber's memory flat.
pub const REPLAY_BATCH: usize = 1024;

/// A page's scan stops early before its values pass this (a run of very large events); a
/// first value larger than this is a page of its own.
pub const PAGE_MAX_BYTES: usize = 4 << 20;

/// A page whose filter wants fewer than one event in this many compresses them rather than
/// reading its run's stored frames.
const SPARSE: usize = 8;

/// Events a compressed page must have before half of them are compressed on another thread.
const PARALLEL_EVENTS: usize = 128;

/// How often a build queued for a slot checks that someone still wants it.
const ABANDONED_BUILD_CHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// The machine's cores, read once (on Linux each read goes to the cgroup files).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// An event a page sends: its `time_us`, its stored value (one [`view_value`] reads), and
/// its stored compressed frame when it has one.
type Wanted<'r> = (u64, &'r [u8], Option<&'r [u8]>);

/// `events` as `encoding`'s frames, back to back (events over its size cap are skipped), each
/// with its stored compressed frame when it has one; and how many stored frames went in.
fn encode(events: &[Wanted<'_>], encoding: &Encoding) -> (Vec<u8>, Vec<PageFrame>, usize) {
    let (mut bytes, mut frames, mut stored_used) = (Vec::new(), Vec::with_capacity(events.len()), 0);
    let json_alone = encoding.json_alone();
    let mut scratch = Vec::new();
    for &(time_us, value, stored) in events {
        let mut push = |opcode, payload: std::borrow::Cow<'_, [u8]>| {
            let len = payload.len();
            stored_used += stored.is_some() as usize;
            append_frame(&mut bytes, frame(opcode, payload));
            frames.push(PageFrame { time_us, end: bytes.len(), payload: len });
        };
        if json_alone {
            // Most replays: the stored JSON is the message, or what is compressed; rebuilding
            // the event would copy it for nothing.
            let json = view_value(value).expect("only viewed values are wanted").json;
            if let Some((opcode, payload)) = encoding.message_of_json(json, stored, &mut scratch) {
                push(opcode, std::borrow::Cow::Borrowed(payload));
            }
        } else {
            let ev = Event::decode_value(time_us, value).expect("a value that views decodes");
            if let Some((opcode, payload)) = encoding.message_stored(&ev, stored) {
                push(opcode, payload);
            }
        }
    }
    (bytes, frames, stored_used)
}

/// Per-page overhead counted besides its bytes and frame list.
const PAGE_OVERHEAD: usize = 256;

/// One frame of a page.
#[derive(Debug, Clone, Copy)]
struct PageFrame {
    time_us: u64,
    /// Where the frame (header and payload) ends in the page's bytes.
    end: usize,
    /// The payload's length (what `bytes_sent` counts).
    payload: usize,
}

/// What one scan of the log returned: every value, in order. A page keeps it, so a stream
/// that changes filters in the middle of a page renders the rest of it again without reading
/// the log again (a client sending `options_update` over and over must not multiply reads).
#[derive(Debug, Default)]
pub struct RawRun {
    values: Vec<u8>,
    /// `(time_us, range in values)`, oldest first.
    items: Vec<(u64, std::ops::Range<usize>)>,
    /// Every stored event after the scan's start up to here was scanned: the last one, or at
    /// the log's end the log's newest event when the scan began (which may be later, when
    /// that is before the start).
    covered_to: u64,
    /// The scan found fewer events than it asked for: it reached the log's end.
    at_log_end: bool,
    /// The newest event deleted from the log before the scan's view of it
    /// ([`Log::scan_after_trims`]): the scan lacks the events up to it.
    trimmed_through: u64,
    /// The holes whose first event the scan holds, oldest first: a trim that deletes such an
    /// event forgets its hole from the log's list while a stream may still have the event in
    /// a page, and must be told of the hole before it.
    holes: Vec<Hole>,
}

/// The compressed frames stored for some events of a [`RawRun`] ([`super::precompress`]), all
/// made with one dictionary from the JSON of the item at the index beside them. Read for a
/// page's build and dropped with it: the page's bytes hold them from then on (the rest of a
/// run rendered after a filter change compresses its few frames).
#[derive(Debug, Default)]
struct StoredFrames {
    bytes: Vec<u8>,
    items: Vec<(usize, std::ops::Range<usize>)>,
}

impl RawRun {
    /// Reads up to `limit` events from `from` (fewer past [`PAGE_MAX_BYTES`] of values).
    fn scan(log: &Log, from: u64, limit: usize) -> Result<RawRun, LogError> {
        // Before the scan: the scan then sees every event up to it (the tip moves after an
        // append is readable).
        let newest_before = log.tip().newest().unwrap_or(0);
        // Before and after the scan: a hole is in the list before its events are readable, and
        // leaves it when a trim deletes its first event, which the scan may still see. (At
        // most one per event scanned.)
        let mut holes = log.tip().holes().from(from, limit);
        let mut run = RawRun::default();
        let mut full = false;
        let (_, trimmed_through) = log.scan_after_trims(from, limit, |t, v| {
            // A page's size is bounded (what `replay_budget` reserves for it): a value that
            // would take the page past the bound starts the next page, unless it is the first.
            if !run.items.is_empty() && run.values.len() + v.len() > PAGE_MAX_BYTES {
                full = true;
                return false;
            }
            let start = run.values.len();
            run.values.extend_from_slice(v);
            run.items.push((t, start..run.values.len()));
            full = run.values.len() >= PAGE_MAX_BYTES;
            !full
        })?;
        run.trimmed_through = trimmed_through;
        if let Some(&(first, _)) = run.items.first() {
            holes.extend(log.tip().holes().from(first, run.items.len()));
            holes.retain(|h| run.items.binary_search_by_key(&h.first, |(t, _)| *t).is_ok());
            holes.sort_unstable_by_key(|h| h.first);
            holes.dedup();
            holes.shrink_to_fit();
            run.holes = holes;
        }
        run.values.shrink_to_fit(); // kept with its page, maybe for a while
        run.items.shrink_to_fit();
        run.at_log_end = run.items.len() < limit && !full;
        let last = run.items.last().map_or(0, |(t, _)| *t);
        run.covered_to = if run.at_log_end { last.max(newest_before) } else { last };
        Ok(run)
    }

    /// The events after `position` that the log had deleted before this scan's view of it
    /// (retention, the disk budget, a memory window's bound): up to the `time_us` returned, if
    /// any. Never past the first event the scan has after `position`, so an event the scan
    /// holds is never said lost.
    pub fn missing_after(&self, position: u64) -> Option<u64> {
        let first_after = self.items.get(self.items.partition_point(|(t, _)| *t <= position)).map(|(t, _)| *t);
        let through = first_after.map_or(self.trimmed_through, |t| self.trimmed_through.min(t - 1));
        (through > position).then_some(through)
    }

    fn bytes(&self) -> usize {
        self.values.capacity()
            + self.items.capacity() * std::mem::size_of::<(u64, std::ops::Range<usize>)>()
            + self.holes.capacity() * std::mem::size_of::<Hole>()
    }

    /// The rest of this scan after `position`, rendered for another filter or encoding, no
    /// log read: a piece of at most `max_frames` frames and, past the first, at most
    /// `max_bytes` of stored values (it is rendered on the subscriber's own task).
    pub fn rest(
        self: &Arc<Self>,
        position: u64,
        (max_frames, max_bytes): (usize, usize),
        filter: &Filter,
        encoding: &Encoding,
    ) -> Page {
        Page::render(self.clone(), None, position.saturating_add(1), (max_frames, max_bytes), filter, encoding)
    }

    /// The first hole whose first event this scan holds that a reader at `position` has not
    /// passed (as [`crate::log::holes::Holes::ahead_of`]).
    pub fn hole_ahead_of(&self, position: u64) -> Option<Hole> {
        let i = self.holes.partition_point(|h| h.first <= position.saturating_add(1));
        self.holes.get(i).copied()
    }

    /// Whether this scan has events after `position`, or covers further.
    pub fn has_rest(&self, position: u64) -> bool {
        self.covered_to > position
    }
}

impl StoredFrames {
    /// The stored compressed frames of `run`'s events that `filter` wants, made with the
    /// dictionary of fingerprint `id` from their JSON; none when it wants fewer than one in
    /// [`SPARSE`] (measured: reading a run's frames for a few costs more). The read stops at the first frame made
    /// with another dictionary (older frames, from before the default changed: the rest are
    /// then compressed as they go, rather than read through).
    fn read(log: &Log, run: &RawRun, id: u32, filter: &Filter) -> Result<StoredFrames, LogError> {
        let mut out = StoredFrames::default();
        let (Some((first, _)), Some((last, _))) = (run.items.first(), run.items.last()) else { return Ok(out) };
        let wanted: Vec<bool> = run
            .items
            .iter()
            .map(|(_, range)| {
                view_value(&run.values[range.clone()]).is_some_and(|v| filter.matches(v.kind, v.did, v.collection))
            })
            .collect();
        if wanted.iter().filter(|w| **w).count() * SPARSE < run.items.len() {
            return Ok(out); // a few events: compressing them costs less than reading the run's frames
        }
        let mut i = 0;
        log.scan_compressed_frames(*first, *last, |t, value| {
            if !super::precompress::made_with(value, id) {
                return false;
            }
            i += run.items[i..].partition_point(|(it, _)| *it < t);
            let Some((it, range)) = run.items.get(i) else { return false };
            if *it != t {
                return true; // a frame of an event this run does not have (trimmed since)
            }
            if !wanted[i] {
                return true;
            }
            let json = view_value(&run.values[range.clone()]).map(|v| v.json);
            // Not this event's JSON (never expected): it is compressed afresh instead.
            if let Some(frame) = json.and_then(|json| super::precompress::stored_frame(value, id, json)) {
                let start = out.bytes.len();
                out.bytes.extend_from_slice(frame);
                out.items.push((i, start..out.bytes.len()));
            }
            true
        })?;
        Ok(out)
    }

    /// The stored frame of item `i`.
    fn get(&self, i: usize) -> Option<&[u8]> {
        let at = self.items.binary_search_by_key(&i, |(j, _)| *j).ok()?;
        Some(&self.bytes[self.items[at].1.clone()])
    }
}

/// A run of the log as one encoding's frames.
#[derive(Debug)]
pub struct Page {
    /// Every stored event with `from <= time_us <= end` was scanned for this page.
    pub from: u64,
    pub end: u64,
    /// Events scanned (delivered or filtered out).
    pub scanned: usize,
    /// A corrupt value was found after `end`: the page stops before it.
    pub corrupt: bool,
    /// The page reached the log's end.
    pub at_log_end: bool,
    /// Every stored event after `from - 1` up to here was scanned (see [`RawRun`]): a stream
    /// that finishes the page has passed everything up to here.
    pub covered_to: u64,
    /// Frames taken as they were stored, not compressed for this page.
    pub stored_frames: usize,
    /// The frames, back to back, as they go on the wire.
    bytes: Vec<u8>,
    frames: Vec<PageFrame>,
    /// The scan the page was rendered from.
    raw: Arc<RawRun>,
}

impl Page {
    /// Reads up to `limit` events from `from` and renders those `filter` wants as
    /// `encoding`'s frames (events over its size cap are skipped, as live).
    pub fn build(log: &Log, from: u64, limit: usize, filter: &Filter, encoding: &Encoding) -> Result<Page, LogError> {
        let raw = RawRun::scan(log, from, limit)?;
        let stored = match encoding.stored_frame_dictionary() {
            Some(id) => Some(StoredFrames::read(log, &raw, id, filter)?),
            None => None,
        };
        let page = Page::render(Arc::new(raw), stored.as_ref(), from, (usize::MAX, usize::MAX), filter, encoding);
        if page.scanned == 0 && page.corrupt {
            return Err(LogError::Corrupt("event value"));
        }
        Ok(page)
    }

    /// The scan this page was rendered from.
    pub fn raw(&self) -> &Arc<RawRun> {
        &self.raw
    }

    /// Renders the events of `raw` from `from`, up to `max_frames` wanted ones and, past the
    /// first, `max_bytes` of their stored values, taking their `stored` compressed frames
    /// (made for `encoding`'s dictionary) where there are some.
    fn render(
        raw: Arc<RawRun>,
        stored: Option<&StoredFrames>,
        from: u64,
        (max_frames, max_bytes): (usize, usize),
        filter: &Filter,
        encoding: &Encoding,
    ) -> Page {
        let mut page = Page {
            from,
            end: 0,
            scanned: 0,
            corrupt: false,
            at_log_end: false,
            covered_to: 0,
            stored_frames: 0,
            bytes: Vec::new(),
            frames: Vec::new(),
            raw: raw.clone(),
        };
        let start = raw.items.partition_point(|(t, _)| *t < from);
        let (mut wanted, mut wanted_bytes) = (Vec::new(), 0);
        for (i, (t, range)) in raw.items.iter().enumerate().skip(start) {
            if wanted.len() == max_frames {
                break;
            }
            let value = &raw.values[range.clone()];
            let Some(view) = view_value(value) else {
                page.corrupt = true;
                break;
            };
            if filter.matches(view.kind, view.did, view.collection) {
                // One large event must not overshoot the bound.
                if !wanted.is_empty() && wanted_bytes + value.len() > max_bytes {
                    break;
                }
                wanted_bytes += value.len();
                wanted.push((*t, value, stored.and_then(|s| s.get(i))));
            }
            page.scanned += 1;
            page.end = *t;
        }
        let all = start + page.scanned == raw.items.len() && !page.corrupt;
        page.at_log_end = all && raw.at_log_end;
        page.covered_to = if all { raw.covered_to.max(page.end) } else { page.end };
        // Compressing is most of a page's cost, and a lone replayer waits for it: with a
        // dictionary and many frames not stored, half of those are compressed on a thread of
        // its own (BENCHMARKS.md).
        let to_compress =
            if encoding.dictionary.is_some() { wanted.iter().filter(|(_, _, s)| s.is_none()).count() } else { 0 };
        if to_compress >= PARALLEL_EVENTS && cores() > 1 {
            // Split where half of what is to compress is on each side (stored frames cluster).
            let mut left = to_compress / 2;
            let at = wanted
                .iter()
                .position(|(_, _, s)| {
                    left -= s.is_none() as usize;
                    left == 0
                })
                .map_or(wanted.len() / 2, |p| p + 1);
            let (first, second) = wanted.split_at(at);
            let (a, b) = std::thread::scope(|scope| {
                let b = scope.spawn(|| encode(second, encoding));
                (encode(first, encoding), b.join())
            });
            let b = b.unwrap_or_else(|p| std::panic::resume_unwind(p));
            (page.bytes, page.frames, page.stored_frames) = a;
            let offset = page.bytes.len();
            page.bytes.extend_from_slice(&b.0);
            page.frames.extend(b.1.into_iter().map(|f| PageFrame { end: f.end + offset, ..f }));
            page.stored_frames += b.2;
        } else {
            (page.bytes, page.frames, page.stored_frames) = encode(&wanted, encoding);
        }
        // Kept for a while, maybe: not with up to twice its size in spare capacity.
        page.bytes.shrink_to_fit();
        page.frames.shrink_to_fit();
        page
    }

    pub fn frame_count(&self) -> usize {
        self.frames.len()
    }

    /// The index of the first frame of an event after `position`.
    pub fn first_after(&self, position: u64) -> usize {
        self.frames.partition_point(|f| f.time_us <= position)
    }

    /// The events after `position` this page scanned and did not render (filtered out, or
    /// over the size cap): what a stream that came to it at `position` passes over in it. (A
    /// stream may join a page another built, at a position inside it.)
    pub fn passed_over_after(&self, position: u64) -> usize {
        let start = self.raw.items.partition_point(|(t, _)| *t < self.from);
        let scanned = &self.raw.items[start..start + self.scanned];
        let scanned_after = self.scanned - scanned.partition_point(|(t, _)| *t <= position);
        let frames_after = self.frame_count() - self.first_after(position);
        scanned_after.saturating_sub(frames_after)
    }

    /// The bytes of frames `range`.
    pub fn bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        if range.is_empty() {
            return &[];
        }
        let start = if range.start == 0 { 0 } else { self.frames[range.start - 1].end };
        &self.bytes[start..self.frames[range.end - 1].end]
    }

    /// Where a write of frames from `start` ends: at most `max` frames and, past the first,
    /// about `max_bytes` (a write's time limit grows with its length, from a floor).
    pub fn chunk_end(&self, start: usize, max: usize, max_bytes: usize) -> usize {
        let limit = (start + max.max(1)).min(self.frames.len());
        let base = if start == 0 { 0 } else { self.frames[start - 1].end };
        let within = self.frames[start..limit].partition_point(|f| f.end - base <= max_bytes);
        start + within.max(1)
    }

    /// The payload bytes of frames `range` (headers not counted).
    pub fn payload_bytes(&self, range: std::ops::Range<usize>) -> usize {
        self.frames[range].iter().map(|f| f.payload).sum()
    }

    /// The `time_us` of frame `i`'s event.
    pub fn time_of(&self, i: usize) -> u64 {
        self.frames[i].time_us
    }

    /// What a kept page holds: its frames and the scan it keeps beside them.
    pub(super) fn counted_bytes(&self) -> usize {
        self.bytes.capacity()
            + self.frames.capacity() * std::mem::size_of::<PageFrame>()
            + self.raw.bytes()
            + PAGE_OVERHEAD
    }
}

/// What a page build ends with, as its waiters see it.
pub type Built = Result<Arc<Page>, Arc<LogError>>;

/// A page being built or built: waiting on it is cancel-safe (keep it and wait again).
pub enum PageFetch {
    Ready(Built),
    Building(watch::Receiver<Option<Built>>),
}

impl PageFetch {
    pub async fn wait(&mut self) -> Built {
        match self {
            PageFetch::Ready(b) => b.clone(),
            PageFetch::Building(rx) => match rx.wait_for(Option::is_some).await {
                Ok(b) => b.clone().expect("waited for Some"),
                // The build's task was dropped before it finished (the runtime is stopping).
                Err(_) => Err(Arc::new(LogError::Io(std::io::Error::other("building a replay page failed")))),
            },
        }
    }
}

/// What makes two replayers' pages the same: the filter and the encoding (hashed once, not
/// per page: a filter may hold 10,000 DIDs).
#[derive(Clone)]
pub struct Rendering {
    filter: Arc<Filter>,
    encoding: Encoding,
    hash: u64,
}

impl Rendering {
    pub fn new(filter: Arc<Filter>, encoding: Encoding) -> Rendering {
        // Keyed per process: collisions (which cost sharing) cannot be prepared offline.
        static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
        let hash = KEYS.get_or_init(Default::default).hash_one((&filter, &encoding));
        Rendering { filter, encoding, hash }
    }

    pub fn filter(&self) -> &Arc<Filter> {
        &self.filter
    }

    pub fn encoding(&self) -> &Encoding {
        &self.encoding
    }
}

impl PartialEq for Rendering {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.filter == other.filter && self.encoding == other.encoding
    }
}

/// A page in the map, built or being built.
struct Slot {
    rendering: Rendering,
    page: watch::Receiver<Option<Built>>,
}

impl Slot {
    /// Its page, if built and holding events from `from` on.
    fn built_from(&self, from: u64) -> Option<Arc<Page>> {
        self.page.borrow().clone().and_then(Result::ok).filter(|p| p.end >= from)
    }
}

#[derive(Default)]
struct Pages {
    /// By (rendering's hash, `from`): the page that may hold a position is the last one
    /// starting at or before it.
    map: BTreeMap<(u64, u64), Slot>,
    /// Built pages kept, oldest first, with their counted bytes and their filter's address.
    order: VecDeque<((u64, u64), usize, usize)>,
    /// The filters kept pages hold (a client's may be 10 MB), by address: how many kept pages
    /// hold it and its bytes, counted once while any does. The `Arc` keeps the address from
    /// being reused while it is counted.
    filters: HashMap<usize, (usize, usize, Arc<Filter>)>,
    bytes: usize,
}

impl Pages {
    /// The slot that may hold position `from` in the rendering of `hash`: the last one
    /// starting at or before it, and where it starts.
    fn slot_at(&self, hash: u64, from: u64) -> Option<(u64, &Slot)> {
        self.map.range((hash, 0)..=(hash, from)).next_back().map(|(&(_, start), slot)| (start, slot))
    }
}

/// The pages recently built, shared by replayers.
pub struct ReplayPages {
    max_bytes: usize,
    pages: Mutex<Pages>,
    /// Builds running at once: two per core (they read the log, then compress, a compressed
    /// page on two threads); a burst of replayers with distinct filters queues here instead of
    /// filling the blocking pool.
    building: Arc<tokio::sync::Semaphore>,
    counters: PageCounters,
}

/// What replay pages count (metrics).
#[derive(Clone)]
pub struct PageCounters {
    /// Pages built, and pages taken from another replayer's build.
    pub built: prometheus::IntCounter,
    pub shared: prometheus::IntCounter,
    /// Frames built pages took as they were stored ([`super::precompress`]).
    pub stored_frames: prometheus::IntCounter,
}

impl PageCounters {
    pub fn of(m: &crate::metrics::Metrics) -> PageCounters {
        PageCounters {
            built: m.replay_pages_built.clone(),
            shared: m.replay_pages_shared.clone(),
            stored_frames: m.replay_stored_frames.clone(),
        }
    }
}

impl ReplayPages {
    /// `max_bytes` 0: nothing is kept or shared (each replayer builds its own pages).
    pub fn new(max_bytes: usize, counters: PageCounters) -> ReplayPages {
        let building = Arc::new(tokio::sync::Semaphore::new(2 * cores()));
        ReplayPages { max_bytes, pages: Mutex::default(), building, counters }
    }

    /// The page holding the events after `position` in `rendering`: a kept page that covers
    /// `position + 1`, one being built from there, or a new build of up to `limit` events (on
    /// a blocking thread: it reads the log and compresses). A stream whose filter matched a
    /// kept one's takes that one's `Arc`, so later comparisons are a pointer's.
    pub fn fetch(
        self: &Arc<Self>,
        log: &Arc<Log>,
        position: u64,
        limit: usize,
        rendering: &mut Rendering,
    ) -> PageFetch {
        let from = position.saturating_add(1);
        if self.max_bytes == 0 {
            return self.build(log, from, limit, rendering.clone(), None);
        }
        let hash = rendering.hash;
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((start, slot)) = pages.slot_at(hash, from) {
            if slot.rendering == *rendering {
                rendering.filter = slot.rendering.filter.clone();
                if let Some(page) = slot.built_from(from) {
                    self.counters.shared.inc();
                    return PageFetch::Ready(Ok(page));
                }
                // A build's result is sent under this lock (see `finish`): `None` is a build
                // still running, or one whose thread died (its sender is gone).
                if start == from && slot.page.borrow().is_none() && slot.page.has_changed().is_ok() {
                    self.counters.shared.inc();
                    return PageFetch::Building(slot.page.clone());
                }
            } else if start == from {
                // Two renderings with one hash: this one goes without sharing.
                drop(pages);
                return self.build(log, from, limit, rendering.clone(), None);
            }
        }
        // A new build, in the map while it runs so that others wait for it (replacing a
        // finished short page or a failed build at the same place).
        let (tx, rx) = watch::channel(None);
        pages.map.insert((hash, from), Slot { rendering: rendering.clone(), page: rx });
        drop(pages);
        self.build(log, from, limit, rendering.clone(), Some(tx))
    }

    /// A built page holding the events after `position` in `rendering`, if there is one; no
    /// build is started. `take` decides whether it is taken (counted as shared).
    pub fn peek<T>(
        &self,
        position: u64,
        rendering: &mut Rendering,
        take: impl FnOnce(&Arc<Page>) -> Option<T>,
    ) -> Option<T> {
        if self.max_bytes == 0 {
            return None;
        }
        let from = position.saturating_add(1);
        let pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let (_, slot) = pages.slot_at(rendering.hash, from)?;
        if slot.rendering != *rendering {
            return None;
        }
        let page = slot.built_from(from)?;
        let filter = slot.rendering.filter.clone();
        drop(pages);
        let taken = take(&page)?;
        rendering.filter = filter;
        self.counters.shared.inc();
        Some(taken)
    }

    /// Builds the page from `from` on a blocking thread, when a build slot is free. `shared`:
    /// it was put in the map as being built, with this sender.
    fn build(
        self: &Arc<Self>,
        log: &Arc<Log>,
        from: u64,
        limit: usize,
        rendering: Rendering,
        shared: Option<watch::Sender<Option<Built>>>,
    ) -> PageFetch {
        let (log, me) = (log.clone(), self.clone());
        let key = shared.is_some().then_some((rendering.hash, from));
        let tx = shared.unwrap_or_else(|| watch::channel(None).0);
        let rx = tx.subscribe();
        tokio::spawn(async move {
            // Queued for a build slot, the build holds its filter (up to megabytes) and its
            // place in the map: one whose askers left lets them go within a check, not when
            // its turn comes.
            let acquire = me.building.clone().acquire_owned();
            tokio::pin!(acquire);
            let _permit = loop {
                tokio::select! {
                    permit = &mut acquire => match permit {
                        Ok(permit) => break permit,
                        Err(_) => return,
                    },
                    () = tokio::time::sleep(ABANDONED_BUILD_CHECK) => {
                        if !me.still_wanted(key, &tx) {
                            return;
                        }
                    }
                }
            };
            if !me.still_wanted(key, &tx) {
                return;
            }
            me.counters.built.inc();
            let (page_log, r) = (log.clone(), rendering.clone());
            let built =
                tokio::task::spawn_blocking(move || Page::build(&page_log, from, limit, &r.filter, &r.encoding))
                    .await
                    .unwrap_or_else(|_| Err(LogError::Io(std::io::Error::other("building a replay page panicked"))))
                    .map(Arc::new)
                    .map_err(Arc::new);
            if let Ok(page) = &built {
                me.counters.stored_frames.inc_by(page.stored_frames as u64);
            }
            // Counted outside the pages' lock: a filter may hold 10,000 DIDs.
            let filter_bytes = if key.is_some() { rendering.filter.heap_bytes() } else { 0 };
            me.finish(key, &tx, built, (&rendering.filter, filter_bytes));
        });
        PageFetch::Building(rx)
    }

    /// Whether anyone still waits for a build about to start: its asker may have gone while
    /// it queued (a disconnect, a filter change, going live). A shared build no one waits for
    /// leaves the map, under its lock (where others would join it).
    fn still_wanted(&self, key: Option<(u64, u64)>, tx: &watch::Sender<Option<Built>>) -> bool {
        let Some(key) = key else { return !tx.is_closed() };
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        // The map's own receiver is one.
        if tx.receiver_count() > 1 {
            return true;
        }
        pages.map.remove(&key);
        false
    }

    /// A build finished: its waiters get it. A shared full page is kept (evicting the oldest
    /// past the budget); anything else leaves the map. Under the map's lock, so a fetch sees
    /// either the slot being built or the result.
    /// The page's filter counts too, once for all the kept pages that hold it (`filter`: it
    /// and its [`Filter::heap_bytes`]).
    fn finish(
        &self,
        key: Option<(u64, u64)>,
        tx: &watch::Sender<Option<Built>>,
        built: Built,
        filter: (&Arc<Filter>, usize),
    ) {
        let Some(key) = key else {
            tx.send_replace(Some(built)); // stored even when no one waits now
            return;
        };
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        let size = match &built {
            Ok(page) if !page.at_log_end && !page.corrupt => page.counted_bytes(),
            _ => usize::MAX,
        };
        tx.send_replace(Some(built));
        let (filter, filter_bytes) = filter;
        let address = Arc::as_ptr(filter) as usize;
        let filter_new = if pages.filters.contains_key(&address) { 0 } else { filter_bytes };
        if size.saturating_add(filter_new) > self.max_bytes / 4 {
            pages.map.remove(&key);
            return;
        }
        pages.order.push_back((key, size, address));
        pages.filters.entry(address).or_insert_with(|| (0, filter_bytes, filter.clone())).0 += 1;
        pages.bytes += size + filter_new;
        // What eviction lets go is freed after the lock: a page's bytes, or a 10 MB filter.
        let mut evicted = Vec::new();
        while pages.bytes > self.max_bytes {
            let Some((old, s, address)) = pages.order.pop_front() else { break };
            evicted.push((pages.map.remove(&old), None));
            pages.bytes -= s;
            if let std::collections::hash_map::Entry::Occupied(mut held) = pages.filters.entry(address) {
                held.get_mut().0 -= 1;
                if held.get().0 == 0 {
                    let (_, bytes, filter) = held.remove();
                    pages.bytes -= bytes;
                    evicted.push((None, Some(filter)));
                }
            }
        }
        drop(pages);
        drop(evicted);
    }

    /// Bytes of pages kept now.
    pub fn bytes(&self) -> usize {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Pages kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.pages.lock().unwrap_or_else(|p| p.into_inner()).order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;
    use crate::log::memory::MemoryLog;

    const DIDS: [&str; 2] = ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb"];

    /// Event `i` at `time_us` 1000 + i, its DID alternating, `pad` bytes of padding.
    fn event(i: u64, pad: usize) -> Event {
        let did = DIDS[(i % 2) as usize];
        let mut out = Vec::new();
        Event::begin(&mut out, did, EventKind::Identity);
        out.extend_from_slice(format!(",\"identity\":{{\"n\":{i},\"pad\":\"{}\"}}}}", "x".repeat(pad)).as_bytes());
        let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
        e.stamp(1000 + i);
        e
    }

    fn log_of(n: u64, pad: usize) -> Arc<Log> {
        let log = Arc::new(Log::memory(MemoryLog::new(1 << 30)));
        let events: Vec<Event> = (0..n).map(|i| event(i, pad)).collect();
        log.append(&events, None).unwrap();
        log
    }

    fn pages(max_bytes: usize) -> (Arc<ReplayPages>, prometheus::IntCounter, prometheus::IntCounter) {
        let built = prometheus::IntCounter::new("built", "h").unwrap();
        let shared = prometheus::IntCounter::new("shared", "h").unwrap();
        let stored_frames = prometheus::IntCounter::new("stored", "h").unwrap();
        let counters = PageCounters { built: built.clone(), shared: shared.clone(), stored_frames };
        (Arc::new(ReplayPages::new(max_bytes, counters)), built, shared)
    }

    /// The page holding the events after `position`, as a replayer fetches it.
    async fn page_at(
        cache: &Arc<ReplayPages>,
        log: &Arc<Log>,
        position: u64,
        filter: &Arc<Filter>,
        encoding: &Encoding,
    ) -> Arc<Page> {
        cache
            .fetch(log, position, REPLAY_BATCH, &mut Rendering::new(filter.clone(), encoding.clone()))
            .wait()
            .await
            .unwrap()
    }

    /// The payloads of a page's frames `range`, parsed back from its wire bytes.
    fn payloads(page: &Page, range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
        let mut bytes = page.bytes(range);
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0x81, "a final text frame");
            let (len, head) = match bytes[1] {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                127 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize, 10),
                n => (n as usize, 2),
            };
            out.push(bytes[head..head + len].to_vec());
            bytes = &bytes[head + len..];
        }
        out
    }

    #[test]
    fn a_page_holds_what_each_event_is_sent_live_under_every_encoding() {
        // Pages send a stored value's JSON without rebuilding the event where the encoding
        // allows: the bytes must be those of the live path's message, whatever the encoding.
        use super::super::compress::{Dictionary, JETSTREAM_V1};
        let log = log_of(300, 0);
        let mut events: Vec<Event> = (0..300).map(|i| event(i, (i as usize * 7) % 50 * 4)).collect();
        events.iter_mut().for_each(|e| e.verification = crate::event::Verification::Full);
        let log_with_padding = Arc::new(Log::memory(MemoryLog::new(1 << 30)));
        log_with_padding.append(&events, None).unwrap();
        let dict = Dictionary::new(JETSTREAM_V1.to_vec(), 0).unwrap();
        // Some padded events are over the cap under every wire, more with the verification field.
        let v2 =
            Encoding { wire: crate::metrics::Wire::V2, dictionary: None, include_verification: false, max_size: 0 };
        let cap = v2.message(&event(0, 100)).unwrap().1.len() as u64;
        let mut encodings = Vec::new();
        for wire in [crate::metrics::Wire::V1, crate::metrics::Wire::V2] {
            for dictionary in [None, Some(dict.clone())] {
                for include_verification in [false, true] {
                    for max_size in [0, cap] {
                        encodings.push(Encoding {
                            wire,
                            dictionary: dictionary.clone(),
                            include_verification,
                            max_size,
                        });
                    }
                }
            }
        }
        let did_a = Filter::new(&[], &[DIDS[0].into()]).unwrap();
        for (log, events) in [(&log, (0..300).map(|i| event(i, 0)).collect::<Vec<_>>()), (&log_with_padding, events)] {
            for encoding in &encodings {
                for filter in [Filter::default(), did_a.clone()] {
                    let page = Page::build(log, 0, REPLAY_BATCH, &filter, encoding).unwrap();
                    let mut want = Vec::new();
                    for ev in events.iter().filter(|e| filter.matches(e.kind, e.did(), e.collection())) {
                        if let Some((opcode, payload)) = encoding.message(ev) {
                            append_frame(&mut want, frame(opcode, payload));
                        }
                    }
                    assert!(!want.is_empty(), "{encoding:?} {filter:?}");
                    assert_eq!(page.bytes(0..page.frame_count()), &want[..], "{encoding:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_page_is_the_run_of_the_log_as_frames_filtered_and_capped() {
        let log = log_of(3000, 0);
        let did_a = Arc::new(Filter::new(&[], &[DIDS[0].into()]).unwrap());
        let page = Page::build(&log, 1100, REPLAY_BATCH, &did_a, &Encoding::plain_v1()).unwrap();
        assert_eq!(
            (page.from, page.end, page.scanned, page.corrupt, page.at_log_end),
            (1100, 1100 + 1023, 1024, false, false)
        );
        assert_eq!(page.frame_count(), 512, "did a's half");
        let all = payloads(&page, 0..page.frame_count());
        let want: Vec<Vec<u8>> = (100..1124).step_by(2).map(|i| event(i, 0).json().to_vec()).collect();
        assert_eq!(all, want, "each frame's payload is the event's JSON, in order");
        assert_eq!(page.payload_bytes(0..512), want.iter().map(Vec::len).sum::<usize>());
        assert_eq!(payloads(&page, 10..12), want[10..12].to_vec());
        assert_eq!(page.first_after(1104), 3, "events 1100, 1102, 1104 are at or before it");
        // Over the size cap: skipped, still scanned.
        let big = log_of(10, 0);
        big.append(&[event(10, 500)], None).unwrap();
        let capped = Encoding { max_size: 200, ..Encoding::plain_v1() };
        let page = Page::build(&big, 0, REPLAY_BATCH, &Arc::new(Filter::default()), &capped).unwrap();
        assert_eq!((page.scanned, page.frame_count(), page.end, page.at_log_end), (11, 10, 1010, true));
        // A run of very large events: the page stops at its byte bound, not at the log's end.
        let huge = log_of(100, 100_000);
        let page = Page::build(&huge, 0, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        let about = PAGE_MAX_BYTES / 100_000;
        assert!((about - 2..=about + 1).contains(&page.scanned), "{} scanned", page.scanned);
        assert!(!page.at_log_end && page.end == 1000 + page.scanned as u64 - 1);
    }

    #[tokio::test]
    async fn replayers_share_pages_found_by_any_position_inside_them() {
        let log = log_of(5000, 0);
        let (cache, built, shared) = pages(64 << 20);
        let every = Arc::new(Filter::default());
        let plain = Encoding::plain_v1();
        let first = page_at(&cache, &log, 999, &every, &plain).await;
        assert_eq!((first.from, first.end), (1000, 2023));
        // A second replayer at the same place, and one inside the page: the same page.
        let again = page_at(&cache, &log, 999, &every, &plain).await;
        let inside = page_at(&cache, &log, 1500, &every, &plain).await;
        assert!(Arc::ptr_eq(&first, &again) && Arc::ptr_eq(&first, &inside));
        assert_eq!((built.get(), shared.get()), (1, 2));
        // Another filter or encoding is another page.
        let did_b = Arc::new(Filter::new(&[], &[DIDS[1].into()]).unwrap());
        let other = page_at(&cache, &log, 999, &did_b, &plain).await;
        assert_eq!(other.frame_count(), 512);
        let capped = Encoding { max_size: 10, ..Encoding::plain_v1() };
        let none = page_at(&cache, &log, 999, &every, &capped).await;
        assert_eq!(none.frame_count(), 0);
        assert_eq!(built.get(), 3);
        // Asked at once, before either is built: one build.
        let (mut a, mut b) = (
            cache.fetch(&log, 2023, REPLAY_BATCH, &mut Rendering::new(every.clone(), plain.clone())),
            cache.fetch(&log, 2023, REPLAY_BATCH, &mut Rendering::new(every.clone(), plain.clone())),
        );
        let (a, b) = (a.wait().await.unwrap(), b.wait().await.unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(built.get(), 4);
        // The log's end: built for its asker, not kept (the log grows).
        let tail = page_at(&cache, &log, 5500, &every, &plain).await;
        assert_eq!((tail.scanned, tail.end), (499, 5999));
        let tail2 = page_at(&cache, &log, 5500, &every, &plain).await;
        assert!(!Arc::ptr_eq(&tail, &tail2));
        assert_eq!(built.get(), 6);
        assert_eq!(tail.covered_to, 5999);
        // Past the end (a cursor ahead of this node's log): an empty page, covering the log as
        // it was when its scan began — not up to the cursor.
        let empty =
            cache.fetch(&log, 7000, 64, &mut Rendering::new(every.clone(), plain.clone())).wait().await.unwrap();
        assert_eq!((empty.scanned, empty.at_log_end, empty.covered_to), (0, true, 5999));
        // A page of `limit` events that found that many is not at the log's end.
        let small = cache.fetch(&log, 999, 64, &mut Rendering::new(every.clone(), plain.clone())).wait().await.unwrap();
        assert_eq!((small.scanned, small.at_log_end, small.covered_to), (1024, false, 2023), "the kept page");
        let small =
            cache.fetch(&log, 4500, 64, &mut Rendering::new(every.clone(), plain.clone())).wait().await.unwrap();
        assert_eq!((small.scanned, small.at_log_end, small.covered_to), (64, false, 4564));
    }

    #[test]
    fn the_rest_of_a_scan_renders_for_another_filter_in_pieces_without_the_log() {
        let log = log_of(3000, 0);
        let page = Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        assert_eq!((page.end, page.covered_to), (2023, 2023));
        let did_b = Filter::new(&[], &[DIDS[1].into()]).unwrap();
        // After event 1100: did b's events from 1101, 64 at a time.
        let first = page.raw().rest(1100, (64, usize::MAX), &did_b, &Encoding::plain_v1());
        let want: Vec<Vec<u8>> = (101..229).step_by(2).map(|i| event(i, 0).json().to_vec()).collect();
        assert_eq!(payloads(&first, 0..first.frame_count()), want);
        assert_eq!((first.from, first.end, first.covered_to, first.at_log_end), (1101, 1227, 1227, false));
        assert!(page.raw().has_rest(first.covered_to));
        // The last piece covers what the scan covered.
        let last = page.raw().rest(2000, (64, usize::MAX), &did_b, &Encoding::plain_v1());
        assert_eq!((last.frame_count(), last.covered_to), (12, 2023));
        assert!(!page.raw().has_rest(last.covered_to));
        // A scan that reached the log's end: its last piece does too.
        let tail = Page::build(&log, 3900, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        let piece = tail.raw().rest(3950, (64, usize::MAX), &did_b, &Encoding::plain_v1());
        assert_eq!((piece.frame_count(), piece.covered_to, piece.at_log_end), (25, 3999, true));
        // Large events (~10 KB stored): a piece stops before its byte bound, with at least one.
        let big = log_of(100, 10_000);
        let page = Page::build(&big, 0, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        let piece = page.raw().rest(1009, (64, 25_000), &Filter::default(), &Encoding::plain_v1());
        assert_eq!((piece.frame_count(), piece.from, piece.end), (2, 1010, 1011));
        assert_eq!(page.raw().rest(1009, (64, 1), &Filter::default(), &Encoding::plain_v1()).frame_count(), 1);
    }

    #[test]
    fn a_write_is_a_chunk_of_frames_bounded_by_count_and_bytes() {
        let log = log_of(100, 1000);
        let page = Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        assert_eq!(page.chunk_end(0, 10, usize::MAX), 10);
        assert_eq!(page.chunk_end(95, 10, usize::MAX), 100);
        let one = page.bytes(0..1).len();
        assert_eq!(page.chunk_end(0, 100, 3 * one), 3, "three frames' bytes");
        assert_eq!(page.chunk_end(5, 100, 10), 6, "at least one frame");
    }

    #[tokio::test]
    async fn a_build_no_one_waits_for_any_more_is_not_done() {
        let log = log_of(3000, 0);
        let (cache, built, _) = pages(64 << 20);
        let every = Arc::new(Filter::default());
        // Every build slot taken: fetches queue.
        let all = cache.building.clone().acquire_many_owned(2 * cores() as u32).await.unwrap();
        let shared = cache.fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()));
        let (off, off_built, _) = pages(0);
        let off_all = off.building.clone().acquire_many_owned(2 * cores() as u32).await.unwrap();
        let private = off.fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()));
        // Their askers go (a disconnect, a filter change, a page fetched ahead).
        drop((shared, private));
        // While they still queue, the builds let their filter (and the map its slot) go.
        tokio::time::sleep(ABANDONED_BUILD_CHECK * 3).await;
        assert_eq!(Arc::strong_count(&every), 1, "the queued builds let the filter go");
        assert_eq!(cache.pages.lock().unwrap().map.len(), 0, "the abandoned slot left the map");
        drop((all, off_all));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!((built.get(), off_built.get()), (0, 0), "nothing built for no one");
        // The abandoned slot left the map: the next asker builds.
        let page = cache
            .fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every, Encoding::plain_v1()))
            .wait()
            .await
            .unwrap();
        assert_eq!((page.scanned, built.get()), (1024, 1));
    }

    #[tokio::test]
    async fn kept_pages_count_their_filter_once_and_a_filter_over_a_quarter_is_not_kept() {
        let log = log_of(20_000, 2_000);
        // 2,000 DIDs of about 1,000 characters, none in the log: a filter of about 2 MB that
        // a client could send in one `options_update`. Its pages hold no frames, only the
        // scan kept beside them.
        let dids: Vec<String> = (0..2_000).map(|i| format!("did:web:{i:0>990}.example")).collect();
        let big = Arc::new(Filter::new(&[], &dids).unwrap());
        let filter_bytes = big.heap_bytes();
        assert!(filter_bytes > 2_000 * 990, "{filter_bytes}");
        let plain = Encoding::plain_v1();
        let page_bytes = Page::build(&log, 0, REPLAY_BATCH, &big, &plain).unwrap().counted_bytes();
        // Room for the filter and a few of its pages.
        let budget = 4 * (filter_bytes + page_bytes);
        let (cache, _, _) = pages(budget);
        let a = page_at(&cache, &log, 999, &big, &plain).await;
        // The same filter in another `Arc` is the kept one's (counted once, not twice).
        let same = Arc::new(Filter::new(&[], &dids).unwrap());
        let b = page_at(&cache, &log, a.end, &same, &plain).await;
        assert_eq!(cache.kept(), 2);
        assert_eq!(cache.bytes(), a.counted_bytes() + b.counted_bytes() + filter_bytes);
        // Many more pages: the oldest go, the filter stays counted while any page holds it.
        let mut kept = vec![a, b];
        for _ in 0..15 {
            let position = kept.last().unwrap().end;
            kept.push(page_at(&cache, &log, position, &big, &plain).await);
            assert!(cache.bytes() <= budget, "{} bytes kept, budget {budget}", cache.bytes());
        }
        let n = cache.kept();
        assert!((1..17).contains(&n), "{n} kept");
        let newest: usize = kept[kept.len() - n..].iter().map(|p| p.counted_bytes()).sum();
        assert_eq!(cache.bytes(), newest + filter_bytes);
        // A filter over a quarter of the budget: its pages are built, not kept.
        let (small, built, _) = pages(4 * filter_bytes - 1);
        page_at(&small, &log, 999, &big, &plain).await;
        page_at(&small, &log, 999, &big, &plain).await;
        assert_eq!((small.kept(), small.bytes(), built.get()), (0, 0, 2));
    }

    #[tokio::test]
    async fn the_budget_holds_and_zero_keeps_nothing() {
        let log = log_of(20_000, 100);
        let page_bytes =
            Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap().counted_bytes();
        let budget = 5 * page_bytes + page_bytes / 2;
        let (cache, built, _) = pages(budget);
        let every = Arc::new(Filter::default());
        let mut position = 999;
        for _ in 0..10 {
            position = cache
                .fetch(&log, position, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
                .wait()
                .await
                .unwrap()
                .end;
            assert!(cache.bytes() <= budget, "{} bytes kept", cache.bytes());
        }
        assert_eq!(cache.kept(), 5, "the newest five");
        // The oldest went first: the first page is built again, the last is shared.
        cache
            .fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
            .wait()
            .await
            .unwrap();
        assert_eq!(built.get(), 11);
        cache
            .fetch(&log, position - 1, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
            .wait()
            .await
            .unwrap();
        assert_eq!(built.get(), 11);

        let (off, built, shared) = pages(0);
        let a = off
            .fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
            .wait()
            .await
            .unwrap();
        let b = off
            .fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
            .wait()
            .await
            .unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!((built.get(), shared.get(), off.bytes()), (2, 0, 0));
    }

    #[tokio::test]
    async fn a_corrupt_value_ends_the_page_before_it() {
        let memory = MemoryLog::new(1 << 30);
        memory.append(&(0..10).map(|i| event(i, 0)).collect::<Vec<_>>(), None, &[]);
        memory.put_raw_for_test(1010, b"garbage");
        memory.append(&[event(11, 0)], None, &[]);
        let log = Arc::new(Log::memory(memory));
        let (cache, _, _) = pages(64 << 20);
        let every = Arc::new(Filter::default());
        let page = cache
            .fetch(&log, 999, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
            .wait()
            .await
            .unwrap();
        assert_eq!((page.scanned, page.end, page.corrupt, page.frame_count()), (10, 1009, true, 10));
        assert!(cache
            .fetch(&log, 1009, REPLAY_BATCH, &mut Rendering::new(every.clone(), Encoding::plain_v1()))
            .wait()
            .await
            .is_err());
    }

    /// The payloads of a page's binary frames (compressed ones).
    fn binary_payloads(page: &Page) -> Vec<Vec<u8>> {
        let mut bytes = page.bytes(0..page.frame_count());
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(bytes[0], 0x82, "a final binary frame");
            let (len, head) = match bytes[1] {
                126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
                n => (n as usize, 2),
            };
            out.push(bytes[head..head + len].to_vec());
            bytes = &bytes[head + len..];
        }
        out
    }

    /// A RocksDB log in `dir` (stored compressed frames need one).
    fn rocks_log(dir: &std::path::Path) -> Log {
        let opts = crate::log::rocks::RocksOptions { sync_writes: false, ..Default::default() };
        Log::rocks(crate::log::rocks::RocksLog::open(dir, opts).unwrap()).unwrap()
    }

    #[test]
    fn a_compressed_page_takes_the_frames_stored_for_its_dictionary() {
        use super::super::compress::{Dictionary, JETSTREAM_V1};
        use super::super::precompress::stored_value;
        let dir = tempfile::tempdir().unwrap();
        let log = rocks_log(dir.path());
        let events: Vec<Event> = (0..300).map(|i| event(i, 0)).collect();
        log.append(&events, None).unwrap();
        let dict = Dictionary::new(JETSTREAM_V1.to_vec(), 0).unwrap();
        // Stored frames that differ from what the page would compress (no dictionary), for
        // events 0..200 but 50 (none) and 60 (made from another JSON: not used).
        let marked = |e: &Event| zstd::bulk::compress(e.json(), 1).unwrap();
        let frames: Vec<(u64, Vec<u8>)> = events[..200]
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 50)
            .map(|(i, e)| {
                let json: &[u8] = if i == 60 { b"{}" } else { e.json() };
                (e.time_us, stored_value(&dict, json, &marked(e)))
            })
            .collect();
        log.put_compressed_frames(&frames).unwrap();
        let compressed = Encoding { dictionary: Some(dict.clone()), ..Encoding::plain_v1() };
        let page = Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &compressed).unwrap();
        let got = binary_payloads(&page);
        assert_eq!(got.len(), 300);
        for (i, (frame, e)) in got.iter().zip(&events).enumerate() {
            let want = if i < 200 && i != 50 && i != 60 { marked(e) } else { dict.compress(e.json()) };
            assert_eq!(*frame, want, "event {i}");
        }
        assert_eq!(page.stored_frames, 198);
        // The stored frames went with the build (the page's bytes hold them): the rest of the
        // run rendered for another filter compresses its frames.
        let did_a = Filter::new(&[], &[DIDS[0].into()]).unwrap();
        let rest = page.raw().rest(1099, (usize::MAX, usize::MAX), &did_a, &compressed);
        assert_eq!(binary_payloads(&rest)[0], dict.compress(events[100].json()));
        assert_eq!(rest.stored_frames, 0);
        // Other encodings never take them: plain, the verification field, another dictionary.
        let plain = Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &Encoding::plain_v1()).unwrap();
        assert_eq!((plain.stored_frames, plain.frame_count()), (0, 300));
        let verified = Encoding { include_verification: true, ..compressed.clone() };
        let page = Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &verified).unwrap();
        assert_eq!(page.stored_frames, 0);
        let other = Dictionary::new(super::super::compress::CONTRAIL_V1.to_vec(), 1).unwrap();
        let page = Page::build(
            &log,
            0,
            REPLAY_BATCH,
            &Filter::default(),
            &Encoding { dictionary: Some(other), ..Encoding::plain_v1() },
        )
        .unwrap();
        assert_eq!(page.stored_frames, 0);
        // The size cap counts the JSON, as live.
        let capped = Encoding { max_size: events[0].json().len() as u64 - 1, ..compressed };
        let page = Page::build(&log, 0, REPLAY_BATCH, &Filter::default(), &capped).unwrap();
        assert_eq!(page.frame_count(), events.iter().filter(|e| e.json().len() < events[0].json().len()).count());
    }

    #[test]
    fn a_narrow_compressed_page_compresses_its_few_events_instead_of_reading_frames() {
        use super::super::compress::{Dictionary, JETSTREAM_V1};
        use super::super::precompress::stored_value;
        let dir = tempfile::tempdir().unwrap();
        let log = rocks_log(dir.path());
        // 400 events; every 50th (8 of them) by a third DID.
        let rare = "did:plc:cccccccccccccccccccccccc";
        let events: Vec<Event> = (0..400)
            .map(|i| {
                let did = if i % 50 == 0 { rare } else { DIDS[(i % 2) as usize] };
                let mut out = Vec::new();
                Event::begin(&mut out, did, EventKind::Identity);
                out.extend_from_slice(format!(",\"identity\":{{\"n\":{i}}}}}").as_bytes());
                let mut e = Event::from_parts(out, EventKind::Identity, did.len(), 0..0);
                e.stamp(1000 + i);
                e
            })
            .collect();
        log.append(&events, None).unwrap();
        let dict = Dictionary::new(JETSTREAM_V1.to_vec(), 0).unwrap();
        let marked = |e: &Event| zstd::bulk::compress(e.json(), 1).unwrap();
        let frames: Vec<(u64, Vec<u8>)> =
            events.iter().map(|e| (e.time_us, stored_value(&dict, e.json(), &marked(e)))).collect();
        log.put_compressed_frames(&frames).unwrap();
        let compressed = Encoding { dictionary: Some(dict.clone()), ..Encoding::plain_v1() };
        // 8 of 400 wanted (fewer than one in SPARSE): compressed, the run's frames not read.
        let only_rare = Filter::new(&[], &[rare.into()]).unwrap();
        let page = Page::build(&log, 0, REPLAY_BATCH, &only_rare, &compressed).unwrap();
        let want: Vec<Vec<u8>> = events.iter().step_by(50).map(|e| dict.compress(e.json())).collect();
        assert_eq!(binary_payloads(&page), want);
        assert_eq!((page.stored_frames, page.scanned), (0, 400));
        // About half wanted: the stored frames of those.
        let did_a = Filter::new(&[], &[DIDS[0].into()]).unwrap();
        let page = Page::build(&log, 0, REPLAY_BATCH, &did_a, &compressed).unwrap();
        let want: Vec<Vec<u8>> = events.iter().filter(|e| e.did() == DIDS[0]).map(marked).collect();
        assert_eq!(binary_payloads(&page), want);
        assert_eq!(page.stored_frames, want.len());
    }
}
