//! The durable log backend: RocksDB, embedded, in the data directory.
//!
//! Schema (column families):
//! - `events`: key = `time_us` as 8 bytes big-endian (byte order is time order, DESIGN.md
//!   invariant 1), value = a small metadata header (kind, DID and collection positions) and the
//!   event's v1 JSON ([`Event::encode_value`]), so filters never parse JSON.
//! - `meta`: the relay cursor (`relay` → seq + URL), the newest `time_us` ever written
//!   (`last_time_us`), which the sequencer resumes from even after retention empties the log,
//!   the newest event a trim deleted (`trimmed_through`), which replayers' gaps are told by,
//!   with unsynced batches, a floor for the next `time_us` (`stamp_floor`), and the log's
//!   holes (`hole/` + the first event after it, 8 bytes big-endian → the last event before it),
//!   each written with the event after it and deleted with it.
//! - `repos`: verification's per-repo chain state (DID → last verified rev and MST root), written
//!   in the same batch as the events it admits.
//! - `dids`: verification's DID → signing key cache (a cache: written on its own).
//! - `zframes`: stored compressed frames, ahead of compressed replay (`hub::precompress`): key
//!   = `time_us` as in `events`, value = checksums of the dictionary and of the event's JSON
//!   and the event's zstd frame. A cache of `events`, written without the WAL (a crash loses
//!   only its newest, which are compressed again), trimmed with them, dropped when the log is
//!   opened with stored frames off (so a version without this column family opens it again).
//!
//! Events and the relay seq they complete are written in one `WriteBatch` (invariant 2): after
//! a crash the cursor is never ahead of the data. Retention trims the oldest events by dropping
//! the files wholly older than its cutoff and ingesting one range tombstone for the rest: it
//! reads and writes only what it deletes, and holds the writer up for one MANIFEST write.

use crate::event::Event;
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode,
    Options, ReadOptions, WriteBatch, WriteBufferManager, WriteOptions, DB,
};
use std::path::{Path, PathBuf};

const CF_EVENTS: &str = "events";
/// A trim's range tombstone, written to a file of its own before it is ingested.
const TRIM_FILE_PREFIX: &str = "trim-";
const TRIM_FILE_SUFFIX: &str = ".sst.tmp";
const CF_META: &str = "meta";
const CF_REPOS: &str = "repos";
const CF_DIDS: &str = "dids";
const CF_ZFRAMES: &str = "zframes";
const KEY_RELAY: &[u8] = b"relay";
/// The log's newest `time_us` when the relay cursor was written ([`RelayCursor::at_time_us`]),
/// then the cursor's seq: a version that does not know this key moves the cursor without it,
/// and a seq that no longer matches makes the time unknown rather than wrong.
const KEY_RELAY_AT: &[u8] = b"relay_at_time_us";
const KEY_LAST_TIME: &[u8] = b"last_time_us";
/// The newest event a trim deletes, written (synced) before the trim deletes anything: a trim
/// is two steps (files dropped, then a tombstone), and a crash between them can leave a hole
/// in the middle of what is kept, which a restarted process tells replayers of only by this.
const KEY_TRIMMED_THROUGH: &[u8] = b"trimmed_through";
/// A `time_us` past every one stamped so far, written (synced) before a stamp passes it, when
/// batches are not synced: a power cut can then lose batches subscribers have seen, and a
/// clock behind at boot would stamp new events with the `time_us` (the cursors) they hold.
/// The sequencer resumes past it.
const KEY_STAMP_FLOOR: &[u8] = b"stamp_floor";
/// The prefix of a hole's key in `meta` ([`super::holes`]).
const HOLE_PREFIX: &[u8] = b"hole/";
/// The first key after every [`HOLE_PREFIX`] one (`0` follows `/`).
const HOLES_END: &[u8] = b"hole0";

fn hole_key(first: u64) -> Vec<u8> {
    [HOLE_PREFIX, &first.to_be_bytes()].concat()
}

use super::holes::{Hole, MAX_HOLES};
use super::{LogError, LogStats, RelayCursor, RepoStateWrite, Result};

/// How writes are made durable.
#[derive(Debug, Clone, Copy)]
pub struct RocksOptions {
    /// fsync the WAL on every batch. Off, a process crash still loses nothing (the WAL is in
    /// the page cache) but a power loss can lose the last batches — and subscribers may
    /// already have seen them.
    pub sync_writes: bool,
    /// Size of the events' memtables: how much is written before a flush to an SST file (and,
    /// every few flushes, a compaction).
    pub memtable_bytes: usize,
    /// Keep the stored compressed frames (`zframes`); off, they are dropped at open.
    pub compressed_frames: bool,
    /// How the verification state's entries age out (compaction drops those it meets).
    pub state_expiry: StateExpiry,
}

/// How entries of the verification state (`repos`: chain states; `dids`: resolved keys) age
/// out; `None`: kept for ever. Compaction drops the aged-out entries it meets, and looks at
/// these column families at least daily (RocksDB's periodic compaction). Keys starting with
/// `#` (the chain epoch) are always kept.
#[derive(Debug, Clone, Copy, Default)]
pub struct StateExpiry {
    pub repos: Option<Expiry>,
    pub dids: Option<Expiry>,
}

/// An entry's time, read from its value (unix µs; `None`: kept), and how long it is kept after.
#[derive(Debug, Clone, Copy)]
pub struct Expiry {
    pub time_of: fn(&[u8]) -> Option<u64>,
    pub keep_us: u64,
}

impl Expiry {
    fn expired(&self, key: &[u8], value: &[u8], now_us: u64) -> bool {
        !key.starts_with(b"#") && (self.time_of)(value).is_some_and(|t| t.saturating_add(self.keep_us) < now_us)
    }
}

/// RocksDB's block cache, one for all of a log's column families. It holds the blocks read
/// for lookups (replays read past it) and the files' index blocks, which otherwise stay in
/// memory for every file of the log, outside any bound: ~0.3 B per event, ~40 MB a day of
/// firehose (BENCHMARKS.md, thirty-third session). The indexes are partitioned, so a lookup
/// in a file whose index was evicted reads one 4 KiB partition of it.
const BLOCK_CACHE_BYTES: usize = 64 << 20;

/// Memtables beyond two of the events' (the one filled, the one flushed) that all column
/// families together may hold: past it, RocksDB flushes early, the column family whose
/// memtable is oldest first (a soft bound: without stalls, memtables being flushed may take
/// it past).
const MEMTABLES_BESIDE_EVENTS: usize = 64 << 20;

/// What bounds RocksDB's memory for one open log, shared by its column families.
struct MemoryBounds {
    cache: Cache,
    memtables: WriteBufferManager,
}

impl MemoryBounds {
    fn new(memtable_bytes: usize) -> MemoryBounds {
        MemoryBounds {
            cache: Cache::new_lru_cache(BLOCK_CACHE_BYTES),
            // Not charged to the cache; never stalls writes (a flush is enough).
            memtables: WriteBufferManager::new_write_buffer_manager(
                2 * memtable_bytes + MEMTABLES_BESIDE_EVENTS,
                false,
            ),
        }
    }
}

/// A column family's table options: `block_size` blocks, the shared cache holding its index.
fn table_options(cache: &Cache, block_size: usize) -> BlockBasedOptions {
    let mut t = BlockBasedOptions::default();
    t.set_block_size(block_size);
    t.set_block_cache(cache);
    t.set_cache_index_and_filter_blocks(true);
    t.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    t.set_metadata_block_size(4 << 10);
    // The top level of each file's index stays in the cache (a few hundred bytes a file): the
    // path to any block costs at most one read of a partition. Not level 0's whole index: a
    // flushed file's reader is opened at level 0 and kept (the files stay open), and the
    // events' files reach the bottom by trivial moves, which keep it, so every file flushed
    // since the start would keep its whole index pinned, as before the cache.
    t.set_pin_top_level_index_and_filter(true);
    t
}

/// Options for a small column family (`meta`, the verification state's): default blocks.
fn small_cf_options(cache: &Cache) -> Options {
    let mut o = Options::default();
    o.set_block_based_table_factory(&table_options(cache, 4 << 10));
    o
}

/// Options for a verification-state column family: `expiry`'s compaction filter, if any.
fn state_cf_options(name: &'static str, expiry: Option<Expiry>, cache: &Cache) -> Options {
    let mut o = small_cf_options(cache);
    if let Some(e) = expiry {
        o.set_compaction_filter(name, move |_level: u32, key: &[u8], value: &[u8]| {
            if e.expired(key, value, crate::clock::now_us()) {
                rocksdb::compaction_filter::Decision::Remove
            } else {
                rocksdb::compaction_filter::Decision::Keep
            }
        });
        // Files nothing is written over are compacted (and filtered) at least this often.
        o.set_periodic_compaction_seconds(24 * 3600);
    }
    o
}

/// The default memtable: a few seconds of a busy firehose, few flushes.
pub const DEFAULT_MEMTABLE_BYTES: usize = 64 << 20;

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            sync_writes: true,
            memtable_bytes: DEFAULT_MEMTABLE_BYTES,
            compressed_frames: true,
            state_expiry: StateExpiry::default(),
        }
    }
}

/// RocksDB's memory in bytes, by what holds it ([`RocksLog::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreMemory {
    pub table_readers: u64,
    pub memtables: u64,
    pub block_cache: u64,
    /// Of the block cache, what is pinned (cannot be evicted).
    pub block_cache_pinned: u64,
}

pub struct RocksLog {
    db: DB,
    path: PathBuf,
    write_opts: WriteOptions,
    /// Every batch is synced (`write_opts`): durable before its events are published.
    sync_writes: bool,
    /// Held for writing while a trim deletes events, for reading while a scan takes its view
    /// of the log: a scan sees a trim whole or not at all (its files dropped and its tombstone
    /// ingested are two steps), and reads [`Self::trimmed`] as it stands for that view.
    trim_gate: std::sync::RwLock<()>,
    /// The newest event a trim deleted (0: none known; kept in `meta`, so it outlives the
    /// process), shared with the log's tip ([`super::Tip::trimmed_through`]).
    trimmed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Opened for reading only (or as a secondary): nothing is written, not even the
    /// clean-ups that reads find to make.
    read_only: bool,
    /// A secondary instance's own state directory. Declared after `db` so it is removed only
    /// once the DB is closed (fields drop in order).
    _secondary_dir: RemoveOnDrop,
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn event_cf_options(memtable_bytes: usize, cache: &Cache) -> Options {
    let mut o = Options::default();
    tune_for_events(&mut o, cache);
    o.set_write_buffer_size(memtable_bytes);
    o
}

/// The options `open` gives the database and its events column family, as one default column
/// family: what a benchmark comparing with raw RocksDB puts opens its baseline with.
pub fn baseline_options() -> Options {
    let bounds = MemoryBounds::new(DEFAULT_MEMTABLE_BYTES);
    let mut o = db_options(&bounds);
    tune_for_events(&mut o, &bounds.cache);
    o
}

fn tune_for_events(o: &mut Options, cache: &Cache) {
    // zstd at level 1 on every level. Keys arrive in increasing order, so flushed files never
    // overlap and reach the bottom level by trivial moves, which RocksDB makes only when the
    // file's compression is the level's: with LZ4 above and zstd at the bottom, compaction
    // decompressed and compressed every byte a second time. Measured (BENCHMARKS.md, issue
    // 15): 0.76 µs of background CPU per event instead of 1.38, write amplification 1.0
    // instead of 1.4, and slightly smaller files.
    o.set_compression_type(DBCompressionType::Zstd);
    // (window bits, level, strategy, dictionary bytes): -14 and 0 are RocksDB's defaults.
    o.set_compression_options(-14, 1, 0, 0);
    o.set_write_buffer_size(DEFAULT_MEMTABLE_BYTES);
    // 32 KiB blocks: replay reads long sequential runs; larger blocks compress better.
    o.set_block_based_table_factory(&table_options(cache, 32 << 10));
}

/// Stored zstd frames do not compress again: no block compression, the events' block size.
fn zframe_cf_options(cache: &Cache) -> Options {
    let mut o = Options::default();
    o.set_compression_type(DBCompressionType::None);
    o.set_write_buffer_size(32 << 20);
    o.set_block_based_table_factory(&table_options(cache, 32 << 10));
    o
}

fn db_options(bounds: &MemoryBounds) -> Options {
    let mut o = Options::default();
    o.set_write_buffer_manager(&bounds.memtables);
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Background flush/compaction threads: this is a 2-core class of machine.
    o.increase_parallelism(2);
    // Bound the WAL so a quiet meta CF cannot pin old log files.
    o.set_max_total_wal_size(256 << 20);
    o
}

fn descriptors(memtable_bytes: usize, expiry: StateExpiry, cache: &Cache) -> Vec<ColumnFamilyDescriptor> {
    vec![
        ColumnFamilyDescriptor::new(CF_EVENTS, event_cf_options(memtable_bytes, cache)),
        ColumnFamilyDescriptor::new(CF_META, small_cf_options(cache)),
        ColumnFamilyDescriptor::new(CF_REPOS, state_cf_options("contrail-repos-expiry", expiry.repos, cache)),
        ColumnFamilyDescriptor::new(CF_DIDS, state_cf_options("contrail-dids-expiry", expiry.dids, cache)),
        ColumnFamilyDescriptor::new(CF_ZFRAMES, zframe_cf_options(cache)),
    ]
}

/// The column families a reader opens: ours that the log in `dir` has (one written by an
/// older version may lack the newer ones).
fn existing_descriptors(dir: &Path, cache: &Cache) -> Vec<ColumnFamilyDescriptor> {
    let existing = DB::list_cf(&Options::default(), dir).unwrap_or_default();
    descriptors(DEFAULT_MEMTABLE_BYTES, StateExpiry::default(), cache)
        .into_iter()
        .filter(|d| existing.iter().any(|n| n == d.name()))
        .collect()
}

/// Calls `f` with each key (a `time_us`) and value of `cf` from `from` on, in order, until it
/// returns false.
fn scan_cf(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    ro: ReadOptions,
    from: u64,
    f: impl FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<()> {
    scan_iter(db.raw_iterator_cf_opt(cf, ro), from, f)
}

/// Reads for replays and other long scans: they read long runs once, so they don't evict the
/// hot blocks for them.
fn replay_read_options() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.fill_cache(false);
    ro
}

/// Calls `f` with each event from `from` on, up to `limit` of them or until it returns false;
/// how many it was called with.
fn scan_limited(
    it: rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
    from: u64,
    limit: usize,
    mut f: impl FnMut(u64, &[u8]) -> bool,
) -> Result<usize> {
    if limit == 0 {
        return Ok(0);
    }
    let mut n = 0;
    // Stops on the limit-th event: the one after it is not read.
    scan_iter(it, from, |t, v| {
        n += 1;
        Ok(f(t, v) && n < limit)
    })?;
    Ok(n)
}

/// [`scan_cf`] with an iterator made already. Borrows each value from RocksDB's block (the
/// iterator that yields boxed pairs allocated and copied twice per event: a replay reads every
/// event of its run).
fn scan_iter(
    mut it: rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
    from: u64,
    mut f: impl FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<()> {
    it.seek(from.to_be_bytes());
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        let key: [u8; 8] = k.try_into().map_err(|_| LogError::Corrupt("key"))?;
        if !f(u64::from_be_bytes(key), v)? {
            return Ok(());
        }
        it.next();
    }
    // The iterator stops at the end or at an error (a read failure, a corrupt block).
    it.status()?;
    Ok(())
}

impl RocksLog {
    /// Opens (creating if needed) the log in `dir` for writing. One writer process at a time.
    pub fn open(dir: &Path, opts: RocksOptions) -> Result<RocksLog> {
        std::fs::create_dir_all(dir)?;
        let bounds = MemoryBounds::new(opts.memtable_bytes);
        let mut cfs = descriptors(opts.memtable_bytes, opts.state_expiry, &bounds.cache);
        // A log a newer version wrote may have column families this one does not know (RocksDB
        // refuses to open it without them all): they are opened, kept and left alone (no
        // compaction), so that going back a version starts.
        let unknown: Vec<String> = DB::list_cf(&Options::default(), dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|name| name != "default" && !cfs.iter().any(|d| d.name() == name))
            .collect();
        if !unknown.is_empty() {
            tracing::warn!(families = ?unknown, "the log has column families a newer version made: kept, not used");
        }
        cfs.extend(unknown.iter().map(|name| {
            let mut o = Options::default();
            o.set_disable_auto_compactions(true);
            ColumnFamilyDescriptor::new(name, o)
        }));
        let mut db = DB::open_cf_descriptors(&db_options(&bounds), dir, cfs)?;
        if !opts.compressed_frames {
            db.drop_cf(CF_ZFRAMES)?;
        }
        let mut write_opts = WriteOptions::default();
        write_opts.set_sync(opts.sync_writes);
        let log = RocksLog {
            db,
            path: dir.to_path_buf(),
            write_opts,
            sync_writes: opts.sync_writes,
            trim_gate: Default::default(),
            trimmed: Default::default(),
            read_only: false,
            _secondary_dir: RemoveOnDrop(None),
        };
        // Tombstone files a crash left before their ingestion ([`Self::trim_events_before`]).
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TRIM_FILE_PREFIX) && name.ends_with(TRIM_FILE_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        log.load_trimmed_mark()?;
        // A trim a crash cut short (some files dropped, the tombstone not yet in): finished,
        // so nothing up to the mark is left, in the middle of a hole, to be served.
        let mark = log.trimmed.load(std::sync::atomic::Ordering::Acquire);
        if mark > 0 && log.oldest_time_us()?.is_some_and(|oldest| oldest <= mark) {
            // Not a reason to refuse to start (a full disk): the mark tells replayers of the
            // hole meanwhile, and a later trim goes past it.
            if let Err(e) = log.trim_before(mark.saturating_add(1)) {
                tracing::warn!(error = %e, trimmed_through = mark, "cannot finish a trim a crash cut short; a later trim will");
            }
        }
        // Before anything is written: frames past the newest event (their events lost to a
        // power cut) must not stand for the events stamped with those keys next.
        log.trim_zframes_after(log.newest_time_us()?.unwrap_or(0))?;
        Ok(log)
    }

    /// Opens the log in `dir` for reading only, writing nothing to it: what a restart on a
    /// full disk can still do (a writable open first flushes what the write-ahead log holds
    /// to a new file). Events still only in the write-ahead log are read into memory.
    pub fn open_read_only(dir: &Path) -> Result<RocksLog> {
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let db = DB::open_cf_descriptors_read_only(&Options::default(), dir, existing_descriptors(dir, &cache), false)?;
        let log = RocksLog {
            db,
            path: dir.to_path_buf(),
            write_opts: WriteOptions::default(),
            sync_writes: false,
            trim_gate: Default::default(),
            trimmed: Default::default(),
            read_only: true,
            _secondary_dir: RemoveOnDrop(None),
        };
        log.load_trimmed_mark()?;
        Ok(log)
    }

    /// Opens a read-only view of a log that a running `contrail serve` may be writing
    /// (a RocksDB secondary instance; its own small state lives in a temporary directory).
    pub fn open_secondary(dir: &Path) -> Result<RocksLog> {
        let secondary =
            std::env::temp_dir().join(format!("contrail-secondary-{}-{}", std::process::id(), crate::clock::now_us()));
        let mut o = Options::default();
        o.set_max_open_files(-1);
        let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
        let db = DB::open_cf_descriptors_as_secondary(&o, dir, &secondary, existing_descriptors(dir, &cache))?;
        db.try_catch_up_with_primary()?;
        let log = RocksLog {
            db,
            path: dir.to_path_buf(),
            write_opts: WriteOptions::default(),
            sync_writes: false,
            trim_gate: Default::default(),
            trimmed: Default::default(),
            read_only: true,
            _secondary_dir: RemoveOnDrop(Some(secondary)),
        };
        log.load_trimmed_mark()?;
        Ok(log)
    }

    /// Sets the trim mark from `meta` (a log no trim of this version has touched has none).
    fn load_trimmed_mark(&self) -> Result<()> {
        let mark = self.meta_u64(KEY_TRIMMED_THROUGH, "trimmed_through")?;
        self.trimmed.fetch_max(mark, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Writes the trim mark `through` to `meta`, synced whatever `sync_writes` says: once a
    /// trim has deleted anything, a restart must find the mark (see [`KEY_TRIMMED_THROUGH`]).
    fn store_trimmed_mark(&self, through: u64) -> Result<()> {
        self.put_meta_u64_synced(KEY_TRIMMED_THROUGH, through)
    }

    /// A number kept in `meta` under `key` (0 when absent); `what` names it when corrupt.
    fn meta_u64(&self, key: &[u8], what: &'static str) -> Result<u64> {
        match self.db.get_cf(self.meta(), key)? {
            Some(v) => Ok(u64::from_be_bytes(v.as_slice().try_into().map_err(|_| LogError::Corrupt(what))?)),
            None => Ok(0),
        }
    }

    /// Writes a number to `meta` under `key`, synced whatever `sync_writes` says.
    fn put_meta_u64_synced(&self, key: &[u8], v: u64) -> Result<()> {
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        self.db.put_cf_opt(self.meta(), key, v.to_be_bytes(), &synced)?;
        Ok(())
    }

    fn events(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_EVENTS).expect("events column family is opened with the DB")
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_META).expect("meta column family is opened with the DB")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn relay_cursor(&self) -> Result<Option<RelayCursor>> {
        let Some(v) = self.db.get_cf(self.meta(), KEY_RELAY)? else { return Ok(None) };
        if v.len() < 8 {
            return Err(LogError::Corrupt("relay cursor"));
        }
        let seq = i64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
        let url = String::from_utf8(v[8..].to_vec()).map_err(|_| LogError::Corrupt("relay cursor"))?;
        let at_time_us = match self.db.get_cf(self.meta(), KEY_RELAY_AT)? {
            Some(v) if v.len() == 16 => {
                let (time, of_seq) = v.split_at(8);
                (of_seq == seq.to_be_bytes()).then(|| u64::from_be_bytes(time.try_into().expect("8 bytes")))
            }
            // Another version's form (this key exists so that versions can differ): unknown.
            Some(_) => None,
            None => None,
        };
        Ok(Some(RelayCursor { url, seq, at_time_us }))
    }

    /// The newest `time_us` ever written: the larger of the newest key and the remembered
    /// value (which survives retention emptying the log).
    pub fn last_time_us(&self) -> Result<u64> {
        let remembered = self.meta_u64(KEY_LAST_TIME, "last_time_us")?;
        Ok(remembered.max(self.newest_time_us()?.unwrap_or(0)))
    }

    /// The floor for the next `time_us` (0: none stored; see [`KEY_STAMP_FLOOR`]).
    pub fn stamp_floor(&self) -> Result<u64> {
        self.meta_u64(KEY_STAMP_FLOOR, "stamp_floor")
    }

    /// Stores `floor` as the floor for the next `time_us`, synced; nothing when every batch
    /// is synced (its events are durable before anyone sees them).
    pub fn store_stamp_floor(&self, floor: u64) -> Result<()> {
        if self.sync_writes {
            return Ok(());
        }
        self.put_meta_u64_synced(KEY_STAMP_FLOOR, floor)
    }

    /// Appends stamped events (in increasing `time_us`) and, in the same atomic batch, the
    /// relay cursor they complete, the repo chain states they move (in order: the last state
    /// of a repo wins) and the holes before some of them. `forget_holes_before`: the stored
    /// holes before this `first` go too (past [`MAX_HOLES`], no longer told), so an upstream
    /// that makes one hole per event leaves at most that many records.
    pub fn append(
        &self,
        events: &[Event],
        cursor: Option<&RelayCursor>,
        repo_states: &[RepoStateWrite],
        holes: &[Hole],
        forget_holes_before: Option<u64>,
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        if let Some(first) = forget_holes_before {
            batch.delete_range_cf(self.meta(), HOLE_PREFIX, &hole_key(first)[..]);
        }
        for h in holes {
            batch.put_cf(self.meta(), hole_key(h.first), h.after.to_be_bytes());
        }
        if !repo_states.is_empty() {
            let repos = self.cf(CF_REPOS)?;
            for (did, state) in repo_states {
                batch.put_cf(repos, did.as_bytes(), state);
            }
        }
        let mut value = Vec::new();
        let mut last = None;
        for e in events {
            e.encode_value(&mut value);
            batch.put_cf(self.events(), e.time_us.to_be_bytes(), &value);
            last = Some(e.time_us);
        }
        if let Some(t) = last {
            batch.put_cf(self.meta(), KEY_LAST_TIME, t.to_be_bytes());
        }
        if let Some(c) = cursor {
            let mut v = c.seq.to_be_bytes().to_vec();
            v.extend_from_slice(c.url.as_bytes());
            batch.put_cf(self.meta(), KEY_RELAY, v);
            if let Some(t) = c.at_time_us {
                let mut at = t.to_be_bytes().to_vec();
                at.extend_from_slice(&c.seq.to_be_bytes());
                batch.put_cf(self.meta(), KEY_RELAY_AT, at);
            }
        }
        self.db.write_opt(batch, &self.write_opts)?;
        Ok(())
    }

    /// The holes stored, oldest first (at most [`MAX_HOLES`], the newest), but those whose
    /// first event is gone: they go with it (a trim a crash cut short may have left them).
    pub fn holes(&self) -> Result<Vec<Hole>> {
        let oldest = self.oldest_time_us()?.unwrap_or(u64::MAX);
        let trimmed = self.trimmed.load(std::sync::atomic::Ordering::Acquire);
        // The newest MAX_HOLES whose first event is there. The others (their event gone, or
        // past the cap: never told) are the oldest keys, all before the first kept one: they
        // go in one range.
        let mut holes = std::collections::VecDeque::new();
        let mut gone = false;
        self.each_hole(|first, after| {
            if first < oldest || first <= trimmed {
                gone = true;
            } else {
                holes.push_back(Hole { after, first });
                if holes.len() > MAX_HOLES {
                    holes.pop_front();
                    gone = true;
                }
            }
        })?;
        // (A log open for reading leaves them: the next writable open deletes them.)
        if gone && !self.read_only {
            let end = holes.front().map_or_else(|| HOLES_END.to_vec(), |h| hole_key(h.first));
            self.db.delete_range_cf(self.meta(), HOLE_PREFIX, &end[..])?;
        }
        Ok(holes.into())
    }

    /// Calls `f` with each stored hole's `first` and `after`, oldest first.
    fn each_hole(&self, mut f: impl FnMut(u64, u64)) -> Result<()> {
        let mode = IteratorMode::From(HOLE_PREFIX, Direction::Forward);
        for item in self.db.iterator_cf(self.meta(), mode) {
            let (key, value) = item?;
            let Some(first) = key.strip_prefix(HOLE_PREFIX) else { break };
            let first: [u8; 8] = first.try_into().map_err(|_| LogError::Corrupt("hole key"))?;
            let after: [u8; 8] = value.as_ref().try_into().map_err(|_| LogError::Corrupt("hole"))?;
            f(u64::from_be_bytes(first), u64::from_be_bytes(after));
        }
        Ok(())
    }

    /// Deletes the holes whose first event is before `cutoff` (a trim deleted it): one range,
    /// whatever their number (their keys sort by `first`).
    fn trim_holes_before(&self, cutoff: u64) -> Result<()> {
        self.db.delete_range_cf(self.meta(), HOLE_PREFIX, &hole_key(cutoff)[..])?;
        Ok(())
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily> {
        self.db.cf_handle(name).ok_or(LogError::Corrupt("a column family is missing"))
    }

    /// A repo's stored chain state.
    pub fn repo_state(&self, did: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_REPOS)?, did.as_bytes())?)
    }

    /// A cached DID → key entry.
    pub fn did_entry(&self, did: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_DIDS)?, did.as_bytes())?)
    }

    /// Stores (`Some`) or forgets (`None`) a DID → key entry. Not synced: it is a cache.
    pub fn put_did_entry(&self, did: &str, value: Option<&[u8]>) -> Result<()> {
        let cf = self.cf(CF_DIDS)?;
        match value {
            Some(v) => self.db.put_cf(cf, did.as_bytes(), v)?,
            None => self.db.delete_cf(cf, did.as_bytes())?,
        }
        Ok(())
    }

    /// Calls `f` with each stored event with `time_us >= from`, oldest first, until `f` returns
    /// false or `limit` events were visited. Returns how many were visited.
    pub fn scan(&self, from: u64, limit: usize, f: impl FnMut(u64, &[u8]) -> bool) -> Result<usize> {
        // Not behind the trim gate: only a reader of the mark needs it, and the lowest-priority
        // thread (precompress) scans too, which must not hold up a trim (and the scans behind it).
        scan_limited(self.db.raw_iterator_cf_opt(self.events(), replay_read_options()), from, limit, f)
    }

    /// [`Self::scan`], and the newest event trimmed before the scan's view of the log was
    /// taken (0: none known): the scan lacks every event up to it, and has every later one.
    pub fn scan_after_trims(&self, from: u64, limit: usize, f: impl FnMut(u64, &[u8]) -> bool) -> Result<(usize, u64)> {
        // The iterator's view is fixed when it is made, between trims (none is half done).
        let (it, trimmed) = {
            let _between_trims = self.trim_gate.read().unwrap_or_else(|p| p.into_inner());
            let it = self.db.raw_iterator_cf_opt(self.events(), replay_read_options());
            (it, self.trimmed.load(std::sync::atomic::Ordering::Acquire))
        };
        Ok((scan_limited(it, from, limit, f)?, trimmed))
    }

    /// Up to `limit` events with `time_us >= from`, oldest first.
    pub fn read_from(&self, from: u64, limit: usize) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut bad = false;
        self.scan(from, limit, |t, v| match Event::decode_value(t, v) {
            Some(e) => {
                out.push(e);
                true
            }
            None => {
                bad = true;
                false
            }
        })?;
        if bad {
            return Err(LogError::Corrupt("event value"));
        }
        Ok(out)
    }

    /// Stores compressed frames (`(time_us, value)`, see the schema) without the WAL: after a
    /// crash the newest may be missing (never a wrong one), and are compressed again.
    pub fn put_zframes(&self, frames: &[(u64, Vec<u8>)]) -> Result<()> {
        let cf = self.cf(CF_ZFRAMES)?;
        let mut batch = WriteBatch::default();
        for (t, v) in frames {
            batch.put_cf(cf, t.to_be_bytes(), v);
        }
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Calls `f` with each stored compressed frame with `from <= time_us <= to`, oldest first,
    /// until it returns false. A log without the column family (a secondary view of an older
    /// log) has none.
    pub fn scan_zframes(&self, from: u64, to: u64, mut f: impl FnMut(u64, &[u8]) -> bool) -> Result<()> {
        let Some(cf) = self.db.cf_handle(CF_ZFRAMES) else { return Ok(()) };
        let mut ro = ReadOptions::default();
        ro.fill_cache(false);
        ro.set_iterate_upper_bound(to.saturating_add(1).to_be_bytes());
        scan_cf(&self.db, cf, ro, from, |t, v| Ok(f(t, v)))
    }

    /// Deletes stored compressed frames after `time_us` (at start: frames of events a power
    /// loss took back must not stand for the events stamped with those keys next).
    pub fn trim_zframes_after(&self, time_us: u64) -> Result<()> {
        let Some(cf) = self.db.cf_handle(CF_ZFRAMES) else { return Ok(()) };
        // Only when there are such frames: no tombstone on every open.
        if self.newest_zframe()?.is_some_and(|t| t > time_us) {
            self.db.delete_range_cf(cf, time_us.saturating_add(1).to_be_bytes(), u64::MAX.to_be_bytes())?;
        }
        Ok(())
    }

    /// Whether this log keeps stored compressed frames (opened with them on).
    pub fn has_zframes(&self) -> bool {
        self.db.cf_handle(CF_ZFRAMES).is_some()
    }

    /// Deletes stored compressed frames before `time_us` and compacts that range so the space
    /// comes back; nothing when none is that old (no tombstone, no compaction).
    pub fn trim_zframes_before(&self, time_us: u64) -> Result<()> {
        let Some(cf) = self.db.cf_handle(CF_ZFRAMES) else { return Ok(()) };
        self.trim_cf_before(cf, time_us)
    }

    /// Deletes the events before `cutoff` with the gate held (a scan sees all of it or none)
    /// and raises the mark of what was deleted; then compacts, the gate open again.
    fn trim_events_before(&self, cutoff: u64) -> Result<()> {
        let compact_to = {
            let _trimming = self.trim_gate.write().unwrap_or_else(|p| p.into_inner());
            let newest_deleted = self.newest_before(cutoff)?;
            // Stored before anything goes (a failure here trims nothing).
            if let Some(t) = newest_deleted.filter(|&t| t > self.trimmed.load(std::sync::atomic::Ordering::Acquire)) {
                self.store_trimmed_mark(t)?;
            }
            let deleted = self.delete_cf_before(self.events(), cutoff);
            // Raised even when a step failed: some of the events may be gone. (A reader takes
            // the mark with the first event it finds, so a mark past events still there does
            // not hide them.)
            if let Some(t) = newest_deleted {
                self.trimmed.fetch_max(t, std::sync::atomic::Ordering::AcqRel);
            }
            deleted?
        };
        if let Some(to) = compact_to {
            self.compact_range(self.events(), None::<[u8; 8]>, Some(to));
        }
        Ok(())
    }

    /// The mark of what trims deleted, for the log's tip to share.
    pub(super) fn trimmed_mark(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.trimmed.clone()
    }

    /// Deletes every key of `cf` (the events, or the stored frames) below `cutoff` and compacts
    /// that range so the space comes back, at a cost in proportion to what is deleted; nothing
    /// when no key is that old.
    ///
    /// Files wholly below the cutoff are dropped without being read. The rest is covered by a
    /// range tombstone in a file of its own, ingested beside the old keys, not written to the
    /// memtable: flushed with the newest keys there, the tombstone made one file spanning
    /// every key, and compacting it down rewrote every file of the level below, most of the
    /// column family at every trim (`cargo bench --bench retention`: ingest at 18k events/s
    /// instead of 337k–391k; BENCHMARKS.md). The ingestion holds RocksDB's write queue for one
    /// MANIFEST write (so it is never called from the lowest-priority thread); when it would
    /// have to flush the memtable first (a retention shorter than a memtable's worth of keys),
    /// the tombstone goes through the memtable after all.
    fn trim_cf_before(&self, cf: &rocksdb::ColumnFamily, cutoff: u64) -> Result<()> {
        if let Some(to) = self.delete_cf_before(cf, cutoff)? {
            self.compact_range(cf, None::<[u8; 8]>, Some(to));
        }
        Ok(())
    }

    /// [`Self::trim_cf_before`]'s deletion: where the compaction that brings the space back
    /// is to end, if a tombstone was written (files dropped whole need none).
    fn delete_cf_before(&self, cf: &rocksdb::ColumnFamily, cutoff: u64) -> Result<Option<[u8; 8]>> {
        if self.edge_key(cf, IteratorMode::Start)?.is_none_or(|oldest| oldest >= cutoff) {
            return Ok(None);
        }
        // (Its end is inclusive.) Level-0 files, and files being compacted, stay.
        self.db.delete_file_in_range_cf(cf, 0u64.to_be_bytes(), (cutoff - 1).to_be_bytes())?;
        // What is left below the cutoff, if anything. (A tombstone over nothing would be placed
        // at the bottom, where no compaction ever takes it away.)
        let Some(oldest) = self.edge_key(cf, IteratorMode::Start)?.filter(|&oldest| oldest < cutoff) else {
            return Ok(None);
        };
        let (from, to) = (oldest.to_be_bytes(), cutoff.to_be_bytes());
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.path.join(format!("{TRIM_FILE_PREFIX}{n}{TRIM_FILE_SUFFIX}"));
        let ingested = self.ingest_tombstone(cf, &path, from, to);
        let _ = std::fs::remove_file(&path);
        if let Err(e) = ingested {
            // Said (at most hourly): then each trim's compaction may rewrite far more. (A
            // retention shorter than a memtable's worth of events does this at every trim.)
            static WARN: std::sync::OnceLock<crate::rate_limited_log::RateLimitedLog> = std::sync::OnceLock::new();
            WARN.get_or_init(|| crate::rate_limited_log::RateLimitedLog::new(std::time::Duration::from_secs(3600)))
                .warn("trim tombstone", || {
                    format!(
                        "a trim's range tombstone could not be ingested as a file ({e}); it was written through \
                         the memtable (as at every trim when the retention is shorter than a memtable's worth of events)"
                    )
                });
            self.db.delete_range_cf(cf, from, to)?;
        }
        // The compaction goes from the start: a tombstone an earlier trim left uncompacted (a
        // crash, a shutdown) hides keys below the first one seen, which the space must come
        // back from too.
        Ok(Some(to))
    }

    /// Writes a file holding only the range tombstone `[from, to)` at `path` and ingests it
    /// into `cf`; an error when ingesting would need a memtable flush.
    fn ingest_tombstone(&self, cf: &rocksdb::ColumnFamily, path: &Path, from: [u8; 8], to: [u8; 8]) -> Result<()> {
        let options = Options::default();
        let mut file = rocksdb::SstFileWriter::create(&options);
        file.open(path)?;
        file.delete_range(from, to)?;
        file.finish()?;
        let mut ingest = rocksdb::IngestExternalFileOptions::default();
        ingest.set_move_files(true);
        ingest.set_allow_blocking_flush(false);
        self.db.ingest_external_file_cf_opts(cf, &ingest, vec![path])?;
        Ok(())
    }

    /// The newest stored compressed frame's `time_us`.
    pub fn newest_zframe(&self) -> Result<Option<u64>> {
        let Some(cf) = self.db.cf_handle(CF_ZFRAMES) else { return Ok(None) };
        self.edge_key(cf, IteratorMode::End)
    }

    /// The first key of `cf` the iterator `mode` meets.
    fn edge_key(&self, cf: &rocksdb::ColumnFamily, mode: IteratorMode) -> Result<Option<u64>> {
        match self.db.iterator_cf(cf, mode).next() {
            Some(item) => {
                let (k, _) = item?;
                let key: [u8; 8] = k.as_ref().try_into().map_err(|_| LogError::Corrupt("key"))?;
                Ok(Some(u64::from_be_bytes(key)))
            }
            None => Ok(None),
        }
    }

    pub fn oldest_time_us(&self) -> Result<Option<u64>> {
        self.edge_key(self.events(), IteratorMode::Start)
    }

    pub fn newest_time_us(&self) -> Result<Option<u64>> {
        self.edge_key(self.events(), IteratorMode::End)
    }

    /// The newest event with `time_us < cutoff`: what a trim at `cutoff` deletes last.
    pub fn newest_before(&self, cutoff: u64) -> Result<Option<u64>> {
        if cutoff == 0 {
            return Ok(None);
        }
        self.edge_key(self.events(), IteratorMode::From(&(cutoff - 1).to_be_bytes(), Direction::Reverse))
    }

    /// Deletes every event with `time_us < cutoff` (one range tombstone), then compacts that
    /// range so the space comes back.
    pub fn trim_before(&self, cutoff: u64) -> Result<()> {
        self.trim_events_before(cutoff)?;
        self.trim_holes_before(cutoff)?;
        self.trim_zframes_before(cutoff)
    }

    /// Bytes on disk of the events' SST files: what the disk budget trims events for. Not the
    /// WAL: trimming cannot shrink it (every batch also writes the meta column family, which
    /// keeps WAL files until `max_total_wal_size` forces a flush), and counting it would trim
    /// history for nothing.
    pub fn event_bytes(&self) -> u64 {
        // Live files only: ones a reader still holds are deleted when it lets go.
        self.int_property(self.events(), rocksdb::properties::LIVE_SST_FILES_SIZE)
    }

    /// The `time_us` below which about `fraction` of the events' file bytes lie, by the live
    /// files' key ranges (the disk budget's step: a share of the bytes, whatever the span of
    /// time they cover). `None` when no file says.
    pub fn time_at_bytes_fraction(&self, fraction: f64) -> Option<u64> {
        let key = |k: Option<Vec<u8>>| Some(u64::from_be_bytes(k?.try_into().ok()?));
        let mut files: Vec<(u64, u64, usize)> = self
            .db
            .live_files()
            .ok()?
            .into_iter()
            .filter(|f| f.column_family_name == CF_EVENTS)
            .filter_map(|f| Some((key(f.start_key)?, key(f.end_key)?, f.size)))
            .collect();
        files.sort_unstable();
        let total: usize = files.iter().map(|f| f.2).sum();
        let want = (total as f64 * fraction) as usize;
        let mut seen = 0;
        files.into_iter().find_map(|(_, end, size)| {
            seen += size;
            (seen >= want).then(|| end.saturating_add(1))
        })
    }

    /// Bytes on disk: SST files (events and stored compressed frames) plus the WAL.
    pub fn disk_bytes(&self) -> u64 {
        self.sst_bytes(self.events())
            + self.wal_bytes()
            + self.db.cf_handle(CF_ZFRAMES).map_or(0, |cf| self.sst_bytes(cf))
    }

    fn sst_bytes(&self, cf: &rocksdb::ColumnFamily) -> u64 {
        self.int_property(cf, rocksdb::properties::TOTAL_SST_FILES_SIZE)
    }

    fn int_property(&self, cf: &rocksdb::ColumnFamily, name: &rocksdb::properties::PropName) -> u64 {
        self.db.property_int_value_cf(cf, name).ok().flatten().unwrap_or(0)
    }

    /// The write-ahead log files' bytes.
    pub fn wal_bytes(&self) -> u64 {
        std::fs::read_dir(&self.path)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum::<u64>()
            })
            .unwrap_or(0)
    }

    /// Flushes and compactions running now (RocksDB's background work).
    pub fn background_jobs(&self) -> (u64, u64) {
        let int = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        (int("rocksdb.num-running-flushes"), int("rocksdb.num-running-compactions"))
    }

    /// RocksDB's own memory, summed over the column families: what its open files' index and
    /// filter blocks hold outside the block cache, what the memtables hold, and what the block
    /// cache holds.
    pub fn memory(&self) -> StoreMemory {
        let mut m = StoreMemory::default();
        for name in [CF_EVENTS, CF_META, CF_REPOS, CF_DIDS, CF_ZFRAMES] {
            let Some(cf) = self.db.cf_handle(name) else { continue };
            let int = |p: &str| self.db.property_int_value_cf(cf, p).ok().flatten().unwrap_or(0);
            m.table_readers += int("rocksdb.estimate-table-readers-mem");
            m.memtables += int("rocksdb.cur-size-all-mem-tables");
            // One cache shared by every family: counted once.
            m.block_cache = m.block_cache.max(int("rocksdb.block-cache-usage"));
            m.block_cache_pinned = m.block_cache_pinned.max(int("rocksdb.block-cache-pinned-usage"));
        }
        m
    }

    /// The estimated number of events (RocksDB's estimate; exact after a compaction).
    pub fn estimated_events(&self) -> u64 {
        self.db.property_int_value_cf(self.events(), "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0)
    }

    /// Exact figures; counting walks the log, so this is for tools, not for hot paths.
    pub fn stats(&self) -> Result<LogStats> {
        let cursor = self.relay_cursor()?;
        let mut events = 0u64;
        for item in self.db.iterator_cf(self.events(), IteratorMode::Start) {
            item?;
            events += 1;
        }
        Ok(LogStats {
            events,
            oldest_time_us: self.oldest_time_us()?,
            newest_time_us: self.newest_time_us()?,
            relay_url: cursor.as_ref().map(|c| c.url.clone()),
            relay_seq: cursor.map(|c| c.seq),
            disk_bytes: self.disk_bytes(),
        })
    }

    /// Compacts the verification state's column families now, dropping what has aged out
    /// (compaction does it by itself as it meets them; tests).
    pub fn compact_state(&self) -> Result<()> {
        for name in [CF_REPOS, CF_DIDS] {
            let cf = self.cf(name)?;
            self.db.flush_cf(cf)?;
            self.compact_range(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    /// Compacts the whole event range to the bottom level (tools and benchmarks).
    pub fn compact(&self) -> Result<()> {
        self.db.flush_cf(self.events())?;
        self.compact_range(self.events(), None::<&[u8]>, None::<&[u8]>);
        Ok(())
    }

    /// Compacts `[start, end)` of `cf` without pausing automatic compactions meanwhile (the
    /// default would: a retention pass compacting a day of events could leave level-0 files
    /// piling up behind it until RocksDB slowed, then stopped, ingest's writes).
    fn compact_range<S: AsRef<[u8]>, E: AsRef<[u8]>>(
        &self,
        cf: &impl rocksdb::AsColumnFamilyRef,
        start: Option<S>,
        end: Option<E>,
    ) {
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_exclusive_manual_compaction(false);
        self.db.compact_range_cf_opt(cf, start, end, &opts);
    }

    /// Flushes memtables (for a clean shutdown; the WAL already made writes durable).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(()); // nothing written, nothing to flush
        }
        self.db.flush_cf(self.events())?;
        self.db.flush_cf(self.meta())?;
        if let Some(cf) = self.db.cf_handle(CF_ZFRAMES) {
            self.db.flush_cf(cf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn events(from: u64, n: u64) -> Vec<Event> {
        (from..from + n)
            .map(|t| {
                let json = format!(r#"{{"did":"did:plc:a","time_us":{t},"kind":"identity","identity":{{"did":"did:plc:a","seq":{t}}}}}"#);
                Event::from_json(json.into_bytes(), EventKind::Identity, None).unwrap()
            })
            .collect()
    }

    /// The first event a scan from the start sees, and the trim mark it reports.
    fn first_and_mark(log: &RocksLog) -> (Option<u64>, u64) {
        let mut first = None;
        let (_, trimmed) = log
            .scan_after_trims(0, 1, |t, _| {
                first = Some(t);
                true
            })
            .unwrap();
        (first, trimmed)
    }

    /// The events' SST files: (name, smallest key, largest key).
    fn files(log: &RocksLog) -> Vec<(String, u64, u64)> {
        let key = |k: &Option<Vec<u8>>| u64::from_be_bytes(k.as_deref().unwrap().try_into().unwrap());
        let mut files: Vec<_> = log
            .db
            .live_files()
            .unwrap()
            .into_iter()
            .filter(|f| f.column_family_name == CF_EVENTS)
            .map(|f| (f.name.clone(), key(&f.start_key), key(&f.end_key)))
            .collect();
        files.sort_by_key(|f| f.1);
        files
    }

    /// A trim reads and writes only what it deletes: the files of newer events are left as
    /// they are, while newer events wait in the memtable (as under ingest). Before, the range
    /// tombstone was flushed with those events into one file spanning every key, and
    /// compacting it rewrote every file below.
    #[test]
    fn a_trim_rewrites_no_file_of_newer_events() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions {
            sync_writes: false,
            memtable_bytes: 64 << 20,
            compressed_frames: false,
            state_expiry: StateExpiry::default(),
        };
        // One a crash left before its ingestion goes at open.
        std::fs::write(dir.path().join("trim-7.sst.tmp"), b"partial").unwrap();
        let log = RocksLog::open(dir.path(), opts).unwrap();
        assert!(!dir.path().join("trim-7.sst.tmp").exists());
        for chunk in 0..5 {
            log.append(&events(1 + chunk * 1_000, 1_000), None, &[], &[], None).unwrap();
            log.flush().unwrap();
        }
        let before = files(&log);
        assert_eq!(before.len(), 5, "{before:?}");
        log.append(&events(5_001, 1_000), None, &[], &[], None).unwrap(); // in the memtable
        log.trim_before(1_500).unwrap();
        log.flush().unwrap();
        let after = files(&log);
        for newer in &before[2..] {
            assert!(after.contains(newer), "{newer:?} was rewritten: {after:?}");
        }
        assert!(!after.contains(&before[0]), "the oldest file is still there: {after:?}");
        // Nothing is left wholly below the cutoff: no old events, no tombstone file.
        assert!(after.iter().all(|f| f.2 >= 1_500), "{after:?}");
        // Again, at a file's edge.
        log.trim_before(3_001).unwrap();
        let again = files(&log);
        assert!(again.iter().all(|f| f.2 >= 3_001), "{again:?}");
        assert!(again.contains(&before[3]) && again.contains(&before[4]), "{again:?}");
        let kept: Vec<u64> = {
            let mut v = Vec::new();
            log.scan(0, usize::MAX, |t, _| {
                v.push(t);
                true
            })
            .unwrap();
            v
        };
        assert_eq!(kept, (3_001..6_001).collect::<Vec<_>>());
    }

    /// A scan's trim mark is the one of the log it sees: a trim that lands while it reads (its
    /// files dropped, its tombstone ingested) moves the tip's mark, not the scan's, and the
    /// scan still has those events. Read after the scan instead, the mark of the second trim
    /// hid that the first had deleted events the scan began before.
    #[test]
    fn a_scan_reports_the_trims_of_the_log_it_sees() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        let log = RocksLog::open(dir.path(), opts).unwrap();
        for chunk in 0..4 {
            log.append(&events(1 + chunk * 1_000, 1_000), None, &[], &[], None).unwrap();
            log.flush().unwrap(); // files a trim drops whole
        }
        assert_eq!(log.scan_after_trims(0, 1, |_, _| true).unwrap(), (1, 0), "nothing trimmed yet");
        log.trim_before(1_001).unwrap();
        let mut seen = Vec::new();
        let (n, trimmed) = log
            .scan_after_trims(500, 2_000, |t, _| {
                if seen.is_empty() {
                    log.trim_before(2_501).unwrap(); // a whole file and half of the next
                }
                seen.push(t);
                true
            })
            .unwrap();
        assert_eq!((n, trimmed), (2_000, 1_000), "the first trim's mark, with the events after it");
        assert_eq!(seen, (1_001..3_001).collect::<Vec<_>>(), "the scan's view is from before the second trim");
        assert_eq!(log.trimmed_mark().load(std::sync::atomic::Ordering::Acquire), 2_500);
        let mut first = 0;
        let (_, trimmed) = log
            .scan_after_trims(500, 1, |t, _| {
                first = t;
                true
            })
            .unwrap();
        assert_eq!((first, trimmed), (2_501, 2_500));
    }

    /// A hole is written with the event after it, outlives the process, and goes with that
    /// event when a trim deletes it.
    #[test]
    fn holes_outlive_the_process_and_go_with_the_event_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        let log = RocksLog::open(dir.path(), opts).unwrap();
        log.append(&events(1, 10), None, &[], &[], None).unwrap();
        let (a, b) = (Hole { after: 10, first: 100 }, Hole { after: 109, first: 200 });
        log.append(&events(100, 10), None, &[], &[a], None).unwrap();
        log.append(&events(200, 10), None, &[], &[b], None).unwrap();
        assert_eq!(log.holes().unwrap(), vec![a, b]);
        drop(log);
        let log = RocksLog::open(dir.path(), opts).unwrap();
        assert_eq!(log.holes().unwrap(), vec![a, b], "after a restart");
        log.trim_before(150).unwrap();
        assert_eq!(log.holes().unwrap(), vec![b], "the first went with its event");
        drop(log);
        let log = RocksLog::open(dir.path(), opts).unwrap();
        assert_eq!(log.holes().unwrap(), vec![b]);
        // One whose event a version that knows no holes trimmed (a downgrade, then an upgrade
        // back): dropped when read.
        log.db.put_cf(log.meta(), hole_key(50), 5u64.to_be_bytes()).unwrap();
        assert_eq!(log.holes().unwrap(), vec![b]);
        assert_eq!(log.db.get_cf(log.meta(), hole_key(50)).unwrap(), None);
    }

    /// The trim mark outlives the process, and a trim that a crash cut short between its two
    /// steps (the files of the oldest events dropped, the tombstone not yet in; a file being
    /// compacted was left, in the middle of the hole) is finished when the log opens again.
    /// Before, a restarted process knew no mark: a replayer read the events left and went on
    /// past the hole untold.
    #[test]
    fn the_trim_mark_outlives_the_process_and_a_trim_cut_short_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        {
            let log = RocksLog::open(dir.path(), opts).unwrap();
            for chunk in 0..4 {
                log.append(&events(1 + chunk * 1_000, 1_000), None, &[], &[], None).unwrap();
                log.flush().unwrap();
            }
            log.trim_before(1_001).unwrap();
            // A trim to 3,000 cut short: its mark stored, a hole above events still there.
            log.store_trimmed_mark(3_000).unwrap();
            log.db.delete_range_cf(log.events(), 2_001u64.to_be_bytes(), 3_001u64.to_be_bytes()).unwrap();
            assert_eq!(first_and_mark(&log), (Some(1_001), 1_000));
        }
        let log = RocksLog::open(dir.path(), opts).unwrap();
        assert_eq!(first_and_mark(&log), (Some(3_001), 3_000), "the mark, with nothing left up to it");
        assert_eq!(log.newest_time_us().unwrap(), Some(4_000));
        drop(log);
        // A read-only view (the tools) has the mark too.
        let view = RocksLog::open_secondary(dir.path()).unwrap();
        assert_eq!(first_and_mark(&view), (Some(3_001), 3_000));
    }

    /// A log a newer version gave a column family this one does not know still opens (RocksDB
    /// refuses a database unless all of its families are opened), and the family is kept.
    #[test]
    fn a_log_with_a_newer_versions_column_family_opens() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || RocksOptions { sync_writes: false, ..RocksOptions::default() };
        let log = RocksLog::open(dir.path(), opts()).unwrap();
        log.append(&events(1, 10), None, &[], &[], None).unwrap();
        drop(log);
        {
            let mut o = Options::default();
            o.create_missing_column_families(true);
            let names = DB::list_cf(&o, dir.path()).unwrap();
            let mut db = DB::open_cf(&o, dir.path(), &names).unwrap();
            db.create_cf("from_the_future", &Options::default()).unwrap();
            let cf = db.cf_handle("from_the_future").unwrap();
            db.put_cf(cf, b"k", b"v").unwrap();
        }
        let log = RocksLog::open(dir.path(), opts()).unwrap();
        assert_eq!(log.newest_time_us().unwrap(), Some(10));
        log.append(&events(11, 5), None, &[], &[], None).unwrap();
        drop(log);
        let names = DB::list_cf(&Options::default(), dir.path()).unwrap();
        assert!(names.iter().any(|n| n == "from_the_future"), "{names:?}");
    }

    /// A log whose stored holes include some a trim left behind (its tombstone not written: a
    /// full disk) opens for reading: they are left, not deleted, and not told.
    #[test]
    fn a_log_open_for_reading_leaves_the_holes_it_skips() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        let log = RocksLog::open(dir.path(), opts).unwrap();
        for i in 0..3u64 {
            let hole = Hole { after: 10 * i + 1, first: 10 * i + 5 };
            log.append(&events(10 * i + 5, 1), None, &[], &[hole], None).unwrap();
        }
        log.store_trimmed_mark(15).unwrap();
        drop(log);
        let read = RocksLog::open_read_only(dir.path()).unwrap();
        assert_eq!(read.holes().unwrap(), vec![Hole { after: 21, first: 25 }]);
        let mut stored = 0;
        read.each_hole(|_, _| stored += 1).unwrap();
        assert_eq!(stored, 3, "nothing deleted");
        assert!(super::super::Log::rocks(read).is_ok());
    }

    /// The holes read at open are the newest MAX_HOLES; the others are deleted (never told).
    #[test]
    fn holes_past_the_cap_are_deleted_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        let log = RocksLog::open(dir.path(), opts()).unwrap();
        let n = MAX_HOLES as u64 + 10;
        for i in 0..n {
            let hole = Hole { after: 10 * i + 1, first: 10 * i + 5 };
            log.append(&events(10 * i + 5, 1), None, &[], &[hole], None).unwrap();
        }
        let holes = log.holes().unwrap();
        assert_eq!(holes.len(), MAX_HOLES);
        assert_eq!(holes.first().map(|h| h.first), Some(10 * 10 + 5), "the newest are kept");
        assert_eq!(holes.last().map(|h| h.first), Some(10 * (n - 1) + 5));
        let mut stored = 0;
        log.each_hole(|_, _| stored += 1).unwrap();
        assert_eq!(stored, MAX_HOLES);
    }

    /// Past MAX_HOLES, the stored holes the tip forgets go as the new ones are written: an
    /// upstream that makes one hole per event leaves no more records than that (before, they
    /// piled up until the log was opened again, and every trim walked them all).
    #[test]
    fn holes_past_the_cap_are_deleted_as_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        let log = RocksLog::open(dir.path(), opts).unwrap();
        let tip = super::super::holes::Holes::default();
        let n = MAX_HOLES as u64 + 10;
        for i in 0..n {
            let hole = Hole { after: 10 * i + 1, first: 10 * i + 5 };
            let forget = tip.add(&[hole]);
            assert_eq!(forget, (i >= MAX_HOLES as u64).then(|| 10 * (i + 1 - MAX_HOLES as u64) + 5));
            log.append(&events(10 * i + 5, 1), None, &[], &[hole], forget).unwrap();
        }
        let mut stored = Vec::new();
        log.each_hole(|first, _| stored.push(first)).unwrap();
        assert_eq!(stored.len(), MAX_HOLES);
        assert_eq!(stored.first(), Some(&(10 * 10 + 5)), "the newest are kept");
        // A trim takes the holes before its cutoff in one range.
        log.trim_before(10 * 20 + 5).unwrap();
        stored.clear();
        log.each_hole(|first, _| stored.push(first)).unwrap();
        assert_eq!((stored.len(), stored.first()), (MAX_HOLES - 10, Some(&(10 * 20 + 5))));
    }

    /// Scans racing trims that drop files and then ingest a tombstone: every scan sees a log
    /// trimmed exactly up to the mark it reports. Without the trim gate, a scan between a
    /// trim's two steps saw files gone and the rest still there, under the old mark.
    #[test]
    fn scans_racing_trims_see_each_trim_whole() {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes: false, compressed_frames: false, ..RocksOptions::default() };
        let log = std::sync::Arc::new(RocksLog::open(dir.path(), opts).unwrap());
        for chunk in 0..60 {
            log.append(&events(1 + chunk * 100, 100), None, &[], &[], None).unwrap();
            log.flush().unwrap(); // a file per 100 events: most trims drop some whole
        }
        let trimmer = {
            let log = log.clone();
            std::thread::spawn(move || {
                for cutoff in (151..6_000).step_by(150) {
                    log.trim_before(cutoff).unwrap();
                }
            })
        };
        let mut scans = 0;
        while !trimmer.is_finished() {
            let (first, trimmed) = first_and_mark(&log);
            // Every event is there from 1 to 6,000 until a trim deletes a prefix of them.
            assert_eq!(first, Some(trimmed + 1), "after {scans} scans");
            scans += 1;
        }
        trimmer.join().unwrap();
        assert!(scans > 100, "only {scans} scans raced the trims");
    }
}
