//! The event log: every event by `time_us`, with the relay cursor it completes.
//!
//! Two backends behind one [`Log`]: [`rocks`] (RocksDB in the data directory, durable) and
//! [`memory`] (a bounded live-only window). The sequencer appends without knowing which one it
//! has; the hub reads ranges; [`retention`] trims the oldest events.
//!
//! The log keeps a [`Tip`] — newest and oldest `time_us` and the bytes held — as atomics that
//! appends and trims update and everyone else reads: the hub's slow-client rule, `/status`, and
//! the metrics gauges (which are fed from the tip, never read back). Decisions about the log
//! are taken against the tip, not the wall clock (DESIGN.md invariant 9).

pub mod holes;
pub mod memory;
pub mod retention;
pub mod rocks;

use crate::event::Event;
use crate::units::parse_size;
use holes::{Hole, Holes};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where the event log lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// RocksDB in --data-dir: durable, replayable for --retention.
    Rocksdb,
    /// A bounded in-memory window (live-only fan-out nodes): nothing survives a restart.
    Memory,
}

/// The log's settings (`contrail serve` flags; see `config/contrail.example.toml`).
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct LogConfig {
    /// Where the log lives: rocksdb (durable) or memory (a bounded live-only window).
    #[arg(long, env = "CONTRAIL_STORE", default_value = "rocksdb", value_enum)]
    pub store: StoreKind,
    /// With --store memory: most bytes the window holds (the oldest events go first), with
    /// verification's state (at most a quarter of it, the repos written least recently going
    /// first).
    #[arg(long, env = "CONTRAIL_MEMORY_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub memory_bytes: u64,
    /// Directory of the embedded RocksDB event log.
    #[arg(long, env = "CONTRAIL_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// fsync every write batch (a power loss then loses nothing a subscriber has seen).
    #[arg(long, env = "CONTRAIL_SYNC_WRITES", default_value = "true", action = clap::ArgAction::Set)]
    pub sync_writes: bool,
    /// RocksDB memtable size for events: written this much, it is flushed to a file (and every
    /// few flushes compacted). Larger: fewer flushes, more memory.
    #[arg(long, env = "CONTRAIL_MEMTABLE_BYTES", default_value = "64MiB", value_parser = parse_size)]
    pub memtable_bytes: u64,
    /// Compress the stored events of this last stretch of the log with the default zstd
    /// dictionary in the background (lowest CPU priority, paused while ingest is busy) and
    /// store the frames beside them, so compressed replays of it read frames instead of
    /// compressing (about twice as fast). Costs ~220 B of disk per event in the window, on top
    /// of --max-disk-bytes. 0: off, and frames stored earlier are deleted.
    #[arg(long, env = "CONTRAIL_PRECOMPRESS_WINDOW", default_value = "1h", value_parser = crate::units::parse_duration)]
    #[serde(serialize_with = "crate::units::ser_duration")]
    pub precompress_window: std::time::Duration,
}

impl LogConfig {
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.store == StoreKind::Memory && self.memory_bytes < 1 << 20 {
            return Err(("memory-bytes", "must be at least 1MiB".into()));
        }
        // Above the WAL cap (256 MiB) a memtable is flushed early anyway.
        if !(64 << 10..=256 << 20).contains(&self.memtable_bytes) {
            return Err(("memtable-bytes", "must be between 64KiB and 256MiB".into()));
        }
        Ok(())
    }

    /// Opens the configured log; `expiry`: how the verification state ages out.
    pub fn open(&self, expiry: rocks::StateExpiry) -> Result<Log> {
        match self.store {
            StoreKind::Rocksdb => Log::rocks(rocks::RocksLog::open(
                &self.data_dir,
                rocks::RocksOptions {
                    sync_writes: self.sync_writes,
                    memtable_bytes: self.memtable_bytes as usize,
                    compressed_frames: !self.precompress_window.is_zero(),
                    state_expiry: expiry,
                },
            )?),
            StoreKind::Memory => Ok(Log::memory(memory::MemoryLog::new(self.memory_bytes))),
        }
    }

    /// Opens the configured RocksDB log for reading only (see [`rocks::RocksLog::open_read_only`]).
    pub fn open_read_only(&self) -> Result<Log> {
        Log::rocks(rocks::RocksLog::open_read_only(&self.data_dir)?)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt {0} in the log")]
    Corrupt(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl LogError {
    /// Whether the disk (or the user's quota on it) is full.
    pub fn is_out_of_space(&self) -> bool {
        match self {
            LogError::Io(e) => matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded),
            // RocksDB's errors carry the system's message (strerror) in their text.
            LogError::Rocks(e) => {
                let text = e.to_string();
                text.contains("No space left on device") || text.contains("Disk quota exceeded")
            }
            LogError::Corrupt(_) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, LogError>;

/// Where the relay reader resumes: the last relay seq whose events are all in the log.
/// A repo's chain state to store with a batch: DID and its encoded state.
pub type RepoStateWrite = (String, Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayCursor {
    pub url: String,
    pub seq: i64,
    /// The log's newest `time_us` when the cursor was written (`None`: written by a version
    /// that did not keep it). A log with newer events has taken events the cursor does not
    /// describe (it ran as a replica since), and the cursor is stale.
    pub at_time_us: Option<u64>,
}

/// Figures for `inspect stats` and `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LogStats {
    pub events: u64,
    pub oldest_time_us: Option<u64>,
    pub newest_time_us: Option<u64>,
    pub relay_url: Option<String>,
    pub relay_seq: Option<i64>,
    pub disk_bytes: u64,
}

/// The log's edges and size, readable without a lock or a blocking call. 0 means "none"
/// (no event has `time_us` 0).
#[derive(Debug, Default)]
pub struct Tip {
    newest: AtomicU64,
    oldest: AtomicU64,
    bytes: AtomicU64,
    /// The newest event trimmed or evicted (0: none known): RocksDB's mark, kept across
    /// restarts, or a memory window's since the process started; shared with the backend,
    /// which raises it as it deletes.
    trimmed_through: Arc<AtomicU64>,
    /// Where the source lost events in the middle of the log ([`holes`]).
    holes: Holes,
}

impl Tip {
    /// The newest event's `time_us`, if the log has one.
    pub fn newest(&self) -> Option<u64> {
        Some(self.newest.load(Ordering::Acquire)).filter(|&t| t > 0)
    }

    /// The oldest event's `time_us`, if the log has one.
    pub fn oldest(&self) -> Option<u64> {
        Some(self.oldest.load(Ordering::Acquire)).filter(|&t| t > 0)
    }

    /// Bytes held: on disk for RocksDB (refreshed by retention), in memory for a window.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The newest event deleted by retention, the disk budget or a memory window's bound (0:
    /// none known; a memory window's since the process started, RocksDB's since the first trim
    /// of a version that keeps it). A page scanned after it was deleted lacks the events up to
    /// it: a replayer whose position was further back lost those it had not read.
    pub fn trimmed_through(&self) -> u64 {
        self.trimmed_through.load(Ordering::Acquire)
    }

    /// The log's holes: where its source lost events before they reached it.
    pub fn holes(&self) -> &Holes {
        &self.holes
    }

    /// Whether events after `position` may have been deleted, for a reader starting there
    /// below the oldest event: yes unless a deletion is known and the newest event it deleted
    /// is at or before `position`. Deletions take the oldest events and `time_us` only grows,
    /// so no event was ever between that one and the oldest kept. (With no mark known, what
    /// happened earlier is not.)
    pub fn deleted_after(&self, position: u64) -> bool {
        let mark = self.trimmed_through();
        mark == 0 || mark > position
    }

    /// Where the events lost to a reader starting at `position`, below the oldest event, end:
    /// at the newest event deleted, when a deletion is known (nothing was ever between it and
    /// the oldest kept), else just before the oldest kept. Read after the oldest edge that put
    /// the reader below it: the mark is raised before that edge moves, so it covers what the
    /// edge shows deleted. (What a trim deletes after this is the first scan's to tell.)
    pub fn lost_through(&self, position: u64) -> u64 {
        let before_oldest = self.oldest().map_or(0, |t| t - 1);
        match self.trimmed_through() {
            0 => before_oldest,
            mark => mark.max(position),
        }
    }

    /// The edges and size as read from the backend, the oldest edge having been `seen`
    /// before they were read. The oldest edge only moves forward while the log has events, so
    /// a reading that raced an append or a trim never moves it back; "empty" (a memory window
    /// emptied) is stored only if nothing moved it since `seen` (an append to an empty log,
    /// racing this refresh, stays).
    fn set(&self, seen: u64, oldest: Option<u64>, newest: Option<u64>, bytes: u64) {
        match oldest {
            Some(t) => {
                self.oldest.fetch_max(t, Ordering::AcqRel);
            }
            None => {
                let _ = self.oldest.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
        // Never backwards: a refresh that read the edges just before an append must not undo
        // it (trims never remove the newest event, so the newest only grows).
        self.newest.fetch_max(newest.unwrap_or(0), Ordering::AcqRel);
        self.bytes.store(bytes, Ordering::Relaxed);
    }
}

enum Backend {
    Rocks(rocks::RocksLog),
    Memory(memory::MemoryLog),
}

/// The log, on disk (RocksDB) or — for live-only nodes — a bounded window in memory.
pub struct Log {
    backend: Backend,
    tip: Arc<Tip>,
}

impl Log {
    pub fn rocks(log: rocks::RocksLog) -> Result<Log> {
        Self::with(Backend::Rocks(log))
    }

    pub fn memory(log: memory::MemoryLog) -> Log {
        Self::with(Backend::Memory(log)).expect("the memory log cannot fail")
    }

    fn with(backend: Backend) -> Result<Log> {
        // The backend raises the mark as it deletes (see `scan_after_trims`).
        let tip = Tip {
            trimmed_through: match &backend {
                Backend::Rocks(s) => s.trimmed_mark(),
                Backend::Memory(m) => m.trimmed_mark(),
            },
            ..Tip::default()
        };
        if let Backend::Rocks(s) = &backend {
            let _ = tip.holes.add(&s.holes()?); // (at most MAX_HOLES: none forgotten)
        }
        let log = Log { backend, tip: Arc::new(tip) };
        log.refresh_tip()?;
        Ok(log)
    }

    /// The tip, shared: it moves with every append and trim.
    pub fn tip(&self) -> Arc<Tip> {
        self.tip.clone()
    }

    /// Re-reads the tip from the backend (RocksDB's disk size moves with flushes and
    /// compactions, not with appends).
    pub fn refresh_tip(&self) -> Result<()> {
        // The slow part (listing the data directory) first, the edges last.
        let bytes = self.disk_bytes();
        let seen = self.tip.oldest.load(Ordering::Acquire);
        self.tip.set(seen, self.oldest_time_us()?, self.newest_time_us()?, bytes);
        Ok(())
    }

    pub fn relay_cursor(&self) -> Result<Option<RelayCursor>> {
        match &self.backend {
            Backend::Rocks(s) => s.relay_cursor(),
            Backend::Memory(m) => Ok(m.relay_cursor()),
        }
    }

    /// The newest `time_us` ever written, even if retention has since emptied the log.
    pub fn last_time_us(&self) -> Result<u64> {
        match &self.backend {
            Backend::Rocks(s) => s.last_time_us(),
            Backend::Memory(m) => Ok(m.last_time_us()),
        }
    }

    /// A floor for the next `time_us` stamped, past any handed out before a power cut lost
    /// them (0: none; only RocksDB with unsynced batches keeps one).
    pub fn stamp_floor(&self) -> Result<u64> {
        match &self.backend {
            Backend::Rocks(s) => s.stamp_floor(),
            Backend::Memory(_) => Ok(0),
        }
    }

    /// Makes `floor` durable as the floor for the next `time_us`, before any stamp passes it.
    pub fn store_stamp_floor(&self, floor: u64) -> Result<()> {
        match &self.backend {
            Backend::Rocks(s) => s.store_stamp_floor(floor),
            Backend::Memory(_) => Ok(()),
        }
    }

    /// Appends stamped events (in increasing `time_us`) and, atomically with them, the relay
    /// cursor they complete; then moves the tip.
    pub fn append(&self, events: &[Event], cursor: Option<&RelayCursor>) -> Result<()> {
        self.append_with_states(events, cursor, &[])
    }

    /// [`append`](Self::append), with the repo chain states the events move (verification),
    /// in the same atomic write.
    pub fn append_with_states(
        &self,
        events: &[Event],
        cursor: Option<&RelayCursor>,
        repo_states: &[RepoStateWrite],
    ) -> Result<()> {
        self.append_batch(events, cursor, repo_states, &[])
    }

    /// [`append_with_states`](Self::append_with_states), with the holes just before some of
    /// the events (each with its `first` among them), in the same atomic write. The holes are
    /// in the tip before the events are written: a stream that sees an event sees the hole
    /// before it.
    pub fn append_batch(
        &self,
        events: &[Event],
        cursor: Option<&RelayCursor>,
        repo_states: &[RepoStateWrite],
        holes: &[Hole],
    ) -> Result<()> {
        // Before the write: a replayer's scan reads the backend, and must find the hole as soon
        // as it can find the event after it. (Nothing passes a hole before that event is
        // there: after a failed write, which stops the sequencer, the hole stays in the tip
        // past everything stored, told to no one.)
        let forget_holes_before = self.tip.holes.add(holes);
        match &self.backend {
            Backend::Rocks(s) => s.append(events, cursor, repo_states, holes, forget_holes_before)?,
            Backend::Memory(m) => m.append(events, cursor, repo_states),
        }
        if let Some(last) = events.last() {
            if self.tip.oldest().is_none() {
                self.tip.oldest.store(events[0].time_us, Ordering::Release);
            }
            self.tip.newest.fetch_max(last.time_us, Ordering::AcqRel);
        }
        if let Backend::Memory(m) = &self.backend {
            // A live-only window moves its oldest edge with every append (cheap in memory).
            let seen = self.tip.oldest.load(Ordering::Acquire);
            // (What the window's bound evicted is in the tip's trim mark already.)
            let (oldest, newest, bytes) = m.edges();
            self.tip.set(seen, oldest, newest, bytes);
            self.tip.holes.forget_through(self.tip.trimmed_through());
        }
        Ok(())
    }

    /// A repo's stored chain state (verification).
    pub fn repo_state(&self, did: &str) -> Result<Option<Vec<u8>>> {
        match &self.backend {
            Backend::Rocks(s) => s.repo_state(did),
            Backend::Memory(m) => m.repo_state(did),
        }
    }

    /// A cached DID → signing key entry (verification).
    pub fn did_entry(&self, did: &str) -> Result<Option<Vec<u8>>> {
        match &self.backend {
            Backend::Rocks(s) => s.did_entry(did),
            Backend::Memory(m) => Ok(m.did_entry(did)),
        }
    }

    /// Stores or (`None`) forgets a cached DID → signing key entry.
    pub fn put_did_entry(&self, did: &str, value: Option<&[u8]>) -> Result<()> {
        match &self.backend {
            Backend::Rocks(s) => s.put_did_entry(did, value),
            Backend::Memory(m) => {
                m.put_did_entry(did, value);
                Ok(())
            }
        }
    }

    /// Calls `f` with each stored event with `time_us >= from`, oldest first, until `f` returns
    /// false or `limit` events were visited. Returns how many were visited.
    pub fn scan(&self, from: u64, limit: usize, f: impl FnMut(u64, &[u8]) -> bool) -> Result<usize> {
        match &self.backend {
            Backend::Rocks(s) => s.scan(from, limit, f),
            Backend::Memory(m) => Ok(m.scan_after_trims(from, limit, f).0),
        }
    }

    /// [`Self::scan`], and [`Tip::trimmed_through`] as it stood for the scan's view of the
    /// log: the scan lacks every event up to that mark and has every later one (a trim is
    /// seen whole or not at all), so a scan from further back knows the events it lost.
    pub fn scan_after_trims(&self, from: u64, limit: usize, f: impl FnMut(u64, &[u8]) -> bool) -> Result<(usize, u64)> {
        match &self.backend {
            Backend::Rocks(s) => s.scan_after_trims(from, limit, f),
            Backend::Memory(m) => Ok(m.scan_after_trims(from, limit, f)),
        }
    }

    /// Up to `limit` events with `time_us >= from`, oldest first.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<Event>> {
        match &self.backend {
            Backend::Rocks(s) => s.read_from(from, limit),
            Backend::Memory(m) => Ok(m.read_from(from, limit)),
        }
    }

    /// Whether the log holds compressed frames (RocksDB opened with them on; a memory window
    /// does not).
    pub fn stores_compressed_frames(&self) -> bool {
        match &self.backend {
            Backend::Rocks(s) => s.has_zframes(),
            Backend::Memory(_) => false,
        }
    }

    /// Stores compressed frames, `(time_us, value)` (see [`rocks`]'s schema); nothing in memory.
    pub fn put_compressed_frames(&self, frames: &[(u64, Vec<u8>)]) -> Result<()> {
        match &self.backend {
            Backend::Rocks(s) => s.put_zframes(frames),
            Backend::Memory(_) => Ok(()),
        }
    }

    /// Calls `f` with each stored compressed frame with `from <= time_us <= to`, oldest first,
    /// until it returns false.
    pub fn scan_compressed_frames(&self, from: u64, to: u64, f: impl FnMut(u64, &[u8]) -> bool) -> Result<()> {
        match &self.backend {
            Backend::Rocks(s) => s.scan_zframes(from, to, f),
            Backend::Memory(_) => Ok(()),
        }
    }

    /// The newest stored compressed frame's `time_us`.
    pub fn newest_compressed_frame(&self) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Rocks(s) => s.newest_zframe(),
            Backend::Memory(_) => Ok(None),
        }
    }

    /// Deletes stored compressed frames before `time_us`.
    pub fn trim_compressed_frames_before(&self, time_us: u64) -> Result<()> {
        match &self.backend {
            Backend::Rocks(s) => s.trim_zframes_before(time_us),
            Backend::Memory(_) => Ok(()),
        }
    }

    pub fn oldest_time_us(&self) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Rocks(s) => s.oldest_time_us(),
            Backend::Memory(m) => Ok(m.oldest_time_us()),
        }
    }

    pub fn newest_time_us(&self) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Rocks(s) => s.newest_time_us(),
            Backend::Memory(m) => Ok(m.newest_time_us()),
        }
    }

    /// Deletes every event with `time_us < cutoff`, then refreshes the tip.
    pub fn trim_before(&self, cutoff: u64) -> Result<()> {
        match &self.backend {
            // Each raises the mark it shares with the tip.
            Backend::Rocks(s) => s.trim_before(cutoff)?,
            Backend::Memory(m) => m.trim_before(cutoff),
        }
        // (RocksDB deleted the holes' records with their first events.)
        self.tip.holes.forget_through(self.tip.trimmed_through());
        self.refresh_tip()
    }

    /// Bytes of events held (the stored compressed frames aside): what `--max-disk-bytes`
    /// trims events for. The frames are a cache bounded by their window, not by trimming
    /// events (which would trade history for a cache).
    pub fn event_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Rocks(s) => s.event_bytes(),
            Backend::Memory(m) => m.bytes(),
        }
    }

    /// The `time_us` below which about `fraction` of [`event_bytes`](Self::event_bytes) lie,
    /// when the backend can tell (RocksDB, by its files).
    pub fn time_at_bytes_fraction(&self, fraction: f64) -> Option<u64> {
        match &self.backend {
            Backend::Rocks(s) => s.time_at_bytes_fraction(fraction),
            Backend::Memory(_) => None,
        }
    }

    /// Bytes held: on disk for RocksDB (stored compressed frames included), in memory for a
    /// live-only window.
    pub fn disk_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Rocks(s) => s.disk_bytes(),
            Backend::Memory(m) => m.bytes(),
        }
    }

    /// The bytes of RocksDB's write-ahead log (a restart's recovery writes them to a file
    /// before the log opens); 0 for a live-only window.
    pub fn wal_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Rocks(s) => s.wal_bytes(),
            Backend::Memory(_) => 0,
        }
    }

    /// RocksDB's own memory ([`rocks::RocksLog::memory`]); `None` for a live-only window.
    pub fn rocks_memory(&self) -> Option<rocks::StoreMemory> {
        match &self.backend {
            Backend::Rocks(s) => Some(s.memory()),
            Backend::Memory(_) => None,
        }
    }

    /// RocksDB flushes and compactions running now; `(0, 0)` for a live-only window.
    pub fn background_jobs(&self) -> (u64, u64) {
        match &self.backend {
            Backend::Rocks(s) => s.background_jobs(),
            Backend::Memory(_) => (0, 0),
        }
    }

    /// Flushes memtables at shutdown (the WAL already made every write durable).
    pub fn flush(&self) -> Result<()> {
        match &self.backend {
            Backend::Rocks(s) => s.flush(),
            Backend::Memory(_) => Ok(()),
        }
    }

    pub fn stats(&self) -> Result<LogStats> {
        match &self.backend {
            Backend::Rocks(s) => s.stats(),
            Backend::Memory(m) => Ok(m.stats()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_that_read_an_empty_log_does_not_undo_the_first_append() {
        let tip = Tip {
            newest: AtomicU64::new(0),
            oldest: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            trimmed_through: Arc::default(),
            holes: Holes::default(),
        };
        // A refresh sees the log empty; the first append lands before its store.
        let seen = tip.oldest.load(Ordering::Acquire);
        tip.oldest.store(1_000, Ordering::Release);
        tip.newest.fetch_max(1_005, Ordering::AcqRel);
        tip.set(seen, None, None, 4096);
        assert_eq!((tip.oldest(), tip.newest(), tip.bytes()), (Some(1_000), Some(1_005), 4096));
        // Trims move the oldest edge forward; a reading from before a trim does not move it
        // back; a window emptied says so.
        tip.set(1_000, Some(1_003), Some(1_005), 2048);
        tip.set(1_000, Some(1_001), Some(1_005), 2048);
        assert_eq!((tip.oldest(), tip.newest()), (Some(1_003), Some(1_005)));
        tip.set(1_003, None, None, 0);
        assert_eq!(tip.oldest(), None);
    }
}
