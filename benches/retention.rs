//! Ingest while retention trims: what a trim costs the log, beside the same ingest without
//! trims in the same run. `cargo bench --bench retention`.
//!
//! Events from the test generator's frames (real-shaped: posts, likes, follows…), transcoded
//! once and stamped again in turn, are appended in batches of 400 with the log's production
//! options (fsync off, as the baseline's bytes are what is compared). Every
//! `RETENTION_TRIM_EVERY` events (50,000: a minute of firehose) the events older than the last
//! `RETENTION_WINDOW` (2,000,000) are trimmed, as `--retention` does; `RETENTION_EVENTS`
//! (6,000,000) in all. Each run waits for RocksDB's background work to settle, then reports the
//! ingest rate, the bytes the process wrote to storage (`/proc/self/io`), its CPU time and the
//! log's size. Not a criterion bench: each run is one long pass. The runs take one core for the
//! appends and RocksDB's background threads the other.
//!
//! `RETENTION_ZFRAMES=1`: the stored compressed frames' trim instead (`--precompress-window`):
//! a 220-byte frame is stored beside each event, and the frames, not the events, are trimmed.

#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;

use contrail::log::rocks::{RocksLog, RocksOptions};
use contrail::log::Log;
use contrail::transcode::Transcoder;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn written_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("/proc/self/io");
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

fn run(pool: &[contrail::event::Event], total: u64, window: u64, trim_every: u64, trim: bool) {
    let dir = tempfile::tempdir_in(std::env::var("RETENTION_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let zframes = std::env::var_os("RETENTION_ZFRAMES").is_some();
    let log = Log::rocks(
        RocksLog::open(
            dir.path(),
            RocksOptions { sync_writes: false, compressed_frames: zframes, ..Default::default() },
        )
        .unwrap(),
    )
    .unwrap();
    let base = contrail::clock::now_us() - 86_400_000_000;
    let (written, cpu, start) = (written_bytes(), cpu_seconds(), Instant::now());
    let mut batch = Vec::with_capacity(400);
    let mut trims = 0;
    for i in 0..total {
        let mut event = pool[i as usize % pool.len()].clone();
        event.stamp(base + i);
        batch.push(event);
        if batch.len() == 400 {
            log.append(&batch, None).unwrap();
            if zframes {
                let frames: Vec<(u64, Vec<u8>)> =
                    batch.iter().map(|e| (e.time_us, e.json()[..e.json().len().min(220)].to_vec())).collect();
                log.put_compressed_frames(&frames).unwrap();
            }
            batch.clear();
        }
        if trim && i % trim_every == 0 && i > window {
            if zframes {
                log.trim_compressed_frames_before(base + i - window).unwrap();
            } else {
                log.trim_before(base + i - window).unwrap();
            }
            trims += 1;
        }
    }
    log.append(&batch, None).unwrap();
    let ingest = start.elapsed().as_secs_f64();
    while log.background_jobs() != (0, 0) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "{:<9} {} events in {:.1} s = {:.0}k events/s; settled after {:.1} s; {} trims; written {:.0} MB = {:.0} B/event; CPU {:.1} s; log {:.0} MB",
        if trim { "trims" } else { "no trims" },
        total,
        ingest,
        total as f64 / ingest / 1e3,
        start.elapsed().as_secs_f64(),
        trims,
        (written_bytes() - written) as f64 / 1e6,
        (written_bytes() - written) as f64 / total as f64,
        cpu_seconds() - cpu,
        log.disk_bytes() as f64 / 1e6,
    );
    if !trim {
        // RocksDB's memory in the process that wrote the log (every file's reader opened as
        // it was flushed), then after a restart.
        let m = log.rocks_memory().unwrap();
        println!(
            "after ingest: RocksDB memory: table readers {:.1} MB, memtables {:.1} MB, block cache {:.1} MB ({:.1} MB pinned)",
            m.table_readers as f64 / 1e6,
            m.memtables as f64 / 1e6,
            m.block_cache as f64 / 1e6,
            m.block_cache_pinned as f64 / 1e6
        );
        reopened(log, dir.path(), base, total);
    }
}

/// The log of the run without trims, closed and opened again (as a restart does): RocksDB's
/// memory, then reads as replays make them — the whole log in pages of 1,024 events, each page
/// a new iterator and seek — and 10,000 single-event reads at random places.
fn reopened(log: Log, dir: &std::path::Path, base: u64, total: u64) {
    log.flush().unwrap();
    drop(log);
    let log =
        Log::rocks(RocksLog::open(dir, RocksOptions { sync_writes: false, ..Default::default() }).unwrap()).unwrap();
    let memory = |log: &Log| {
        let m = log.rocks_memory().unwrap();
        format!(
            "table readers {:.1} MB, memtables {:.1} MB, block cache {:.1} MB ({:.1} MB pinned)",
            m.table_readers as f64 / 1e6,
            m.memtables as f64 / 1e6,
            m.block_cache as f64 / 1e6,
            m.block_cache_pinned as f64 / 1e6
        )
    };
    let files = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sst"))
        .count();
    println!(
        "reopened: {} files, log {:.0} MB; RocksDB memory: {}",
        files,
        log.disk_bytes() as f64 / 1e6,
        memory(&log)
    );
    let (cpu, start) = (cpu_seconds(), Instant::now());
    let (mut from, mut read) = (0, 0u64);
    loop {
        let mut last = None;
        let (n, _) = log
            .scan_after_trims(from, 1024, |t, _| {
                last = Some(t);
                true
            })
            .unwrap();
        read += n as u64;
        match last {
            Some(t) => from = t + 1,
            None => break,
        }
    }
    assert_eq!(read, total);
    let wall = start.elapsed().as_secs_f64();
    println!(
        "paged scan: {read} events in {wall:.2} s = {:.0}k events/s, CPU {:.2} s; RocksDB memory: {}",
        read as f64 / wall / 1e3,
        cpu_seconds() - cpu,
        memory(&log)
    );
    let (cpu, start) = (cpu_seconds(), Instant::now());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        assert_eq!(log.scan(base + x % total, 1, |_, _| true).unwrap(), 1);
    }
    println!(
        "10,000 reads at random places: {:.2} s, CPU {:.2} s; RocksDB memory: {}",
        start.elapsed().as_secs_f64(),
        cpu_seconds() - cpu,
        memory(&log)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let (total, window, trim_every) =
        (env("RETENTION_EVENTS", 6_000_000), env("RETENTION_WINDOW", 2_000_000), env("RETENTION_TRIM_EVERY", 50_000));
    let mut transcoder = Transcoder::default();
    let mut pool = Vec::new();
    for g in frames::generate(1, 20_000, 5_000, 91) {
        transcoder.transcode(&g.frame, &mut pool, &mut Vec::new());
    }
    println!("{} real-shaped events, stamped again in turn; window {window}, a trim every {trim_every}", pool.len());
    // RETENTION_TRIM_RUN=0: the run without trims only (RocksDB's memory on a long log).
    let runs: &[bool] = if env("RETENTION_TRIM_RUN", 1) == 0 { &[false] } else { &[false, true] };
    for &trim in runs {
        run(&pool, total, window, trim_every, trim);
    }
}
