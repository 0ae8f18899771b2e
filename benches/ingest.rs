//! End-to-end ingest: relay frames already in memory → transcode → stamp → RocksDB write
//! batch (the production write options, fsync included) → publish, on one thread
//! (`contrail_*`) and as `serve` pipelines it (`pipeline_*`: transcoding on one thread, the
//! sequencer on another); beside the raw baseline measured in the same run: RocksDB WriteBatch
//! puts of the same keys and value bytes.
//!
//! `pipeline_sync_*` times one round (a burst) from its first frame to its last event published,
//! so each round pays the pipeline's fill and drain: its first batch is one frame, and its last
//! write and fsync start after the last frame. `pipeline_stream_sync_*` times ingest as a relay's
//! catch-up drives it: many rounds back to back, the queue never empty, drained once at the end
//! (the time per round is the throughput); after it, a line gives each thread's CPU per round
//! (transcoding, the sequencer, RocksDB's flush and compaction threads).
//! `cargo bench --bench ingest`.

#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;

use contrail::log::rocks::{baseline_options, RocksLog, RocksOptions};
use contrail::log::Log;
use contrail::metrics::Metrics;
use contrail::sequencer::{IngestFrame, Sequencer};
use contrail::transcode::Transcoder;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::collections::HashMap;
use std::sync::Arc;

/// Frames per measured iteration, written as the sequencer would batch them: 2,000 by default
/// (one relay burst); `INGEST_FRAMES=20000` measures a longer run, where the pipeline's start
/// (a first batch of one frame) and end weigh less.
/// `contrail`'s allocator (`src/main.rs`), so the pipeline is measured as `serve` runs it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn frames_per_round() -> usize {
    std::env::var("INGEST_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

/// The frames one iteration ingests: a quarter of `gen`, in turn (each copied, as a socket
/// read would hand them over).
fn frames_of_round(gen: &[frames::GenFrame], round: usize) -> Vec<(i64, Vec<u8>)> {
    let n = gen.len() / 4;
    gen[(round % 4) * n..(round % 4 + 1) * n].iter().map(|g| (g.seq, g.frame.clone())).collect()
}

/// Transcodes `frames` and hands them to the sequencer over the ingest queue, as the relay
/// reader does; returns once the ring has published every event of them (read as they come,
/// as the dispatcher does).
async fn feed(
    frames: impl IntoIterator<Item = (i64, Vec<u8>)>,
    transcoder: &mut Transcoder,
    ingest: &contrail::sequencer::IngestSender,
    published: &mut tokio::sync::broadcast::Receiver<contrail::sequencer::Published>,
) {
    let mut n = 0;
    for (s, f) in frames {
        let mut events = Vec::new();
        let info = transcoder.transcode(&f, &mut events, &mut Vec::new());
        n += events.len();
        let frame = IngestFrame { seq: Some(s), relay_time_us: info.relay_time_us, events, ..Default::default() };
        ingest.send(frame).await.unwrap();
        while published.try_recv().is_ok() {
            n -= 1;
        }
    }
    for _ in 0..n {
        published.recv().await.expect("the ring keeps up with one reader");
    }
}

fn bench(c: &mut Criterion) {
    let per_round = frames_per_round();
    let gen = frames::generate(1, per_round * 4, 5_000, 77);
    let events: usize = gen[..per_round].iter().map(|g| g.expected.len()).sum();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(events as u64));
    group.sample_size(20);

    // The transcoding share of the pipeline (the raw baseline starts from encoded values).
    {
        let mut tx = Transcoder::default();
        let frames: Vec<Vec<u8>> = gen[..per_round].iter().map(|g| g.frame.clone()).collect();
        group.bench_function("transcode_only", |b| {
            b.iter(|| {
                let (mut events, mut drops) = (Vec::new(), Vec::new());
                for f in &frames {
                    events.clear();
                    tx.transcode(f, &mut events, &mut drops);
                }
                events.len()
            })
        });
    }

    for sync in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Log::rocks(RocksLog::open(dir.path(), RocksOptions { sync_writes: sync, ..Default::default() }).unwrap())
                .unwrap(),
        );
        let (ring, _) = tokio::sync::broadcast::channel(65_536);
        let mut seq = Sequencer::new(store.clone(), ring, Arc::new(Metrics::new()), "ws://bench".into()).unwrap();
        let mut tx = Transcoder::default();
        let mut round = 0usize;
        group.bench_function(format!("contrail_sync_{sync}"), |b| {
            b.iter_batched(
                || {
                    round += 1;
                    frames_of_round(&gen, round)
                },
                |frames| {
                    // Batches of up to the sequencer's limit, as its group commit forms them.
                    let mut batch = Vec::new();
                    let mut n = 0;
                    for (s, f) in frames {
                        let mut events = Vec::new();
                        let info = tx.transcode(&f, &mut events, &mut Vec::new());
                        n += events.len();
                        batch.push(IngestFrame {
                            seq: Some(s),
                            relay_time_us: info.relay_time_us,
                            events,
                            ..Default::default()
                        });
                        if n >= contrail::sequencer::MAX_BATCH_EVENTS {
                            seq.write(&mut batch).unwrap();
                            n = 0;
                        }
                    }
                    seq.write(&mut batch).unwrap();
                },
                BatchSize::PerIteration,
            )
        });

        // As `contrail serve` runs it: the reader transcodes on one thread and hands frames
        // over the real ingest queue to the sequencer on another (its group commit forming the
        // batches), so transcoding and writing overlap on the two cores. The sequencer thread
        // and its ring live across iterations, as in `serve`; an iteration ends when the ring
        // has published the round's last event (written, fsynced, then published).
        let (ingest, queue) = contrail::sequencer::ingest_channel(1024, 64 << 20);
        let (ring, mut published) = tokio::sync::broadcast::channel(65_536);
        let seq = Sequencer::new(store.clone(), ring, Arc::new(Metrics::new()), "ws://bench".into()).unwrap();
        let writer = std::thread::Builder::new().name("sequencer".into()).spawn(move || seq.run(queue)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut transcoder = Transcoder::default();
        let mut round = 0usize;
        group.bench_function(format!("pipeline_sync_{sync}"), |b| {
            b.iter_batched(
                || {
                    round += 1;
                    frames_of_round(&gen, round)
                },
                |frames| rt.block_on(feed(frames, &mut transcoder, &ingest, &mut published)),
                BatchSize::PerIteration,
            )
        });
        let mut cpu = ThreadCpu::default();
        group.bench_function(format!("pipeline_stream_sync_{sync}"), |b| {
            b.iter_custom(|rounds| {
                // The frames are copied before the clock starts, as `pipeline_*` copies them
                // outside its timing.
                let all: Vec<_> = (0..rounds)
                    .map(|_| {
                        round += 1;
                        frames_of_round(&gen, round)
                    })
                    .collect();
                let before = thread_cpu();
                let started = std::time::Instant::now();
                rt.block_on(feed(all.into_iter().flatten(), &mut transcoder, &ingest, &mut published));
                let elapsed = started.elapsed();
                cpu.add(rounds, elapsed, &before, &thread_cpu());
                elapsed
            })
        });
        cpu.print(&format!("pipeline_stream_sync_{sync}"));
        drop(ingest);
        writer.join().unwrap().unwrap();

        // Baselines: the same keys and stored values, put with a plain WriteBatch into RocksDB
        // with its default options and with the options Contrail opens its log with (zstd
        // level 1 on every level, 64 MiB memtables: the background compression both then pay).
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(sync);
        let mut values = Vec::new();
        let mut t = 1_700_000_000_000_000u64;
        for g in &gen[..per_round] {
            let mut evs = Vec::new();
            Transcoder::default().transcode(&g.frame, &mut evs, &mut Vec::new());
            for mut e in evs {
                e.stamp(t);
                t += 1;
                let mut v = Vec::new();
                e.encode_value(&mut v);
                values.push(v);
            }
        }
        for (name, opts) in [("raw_writebatch", None), ("raw_writebatch_log_options", Some(baseline_options()))] {
            let raw_dir = tempfile::tempdir().unwrap();
            let opts = opts.unwrap_or_else(|| {
                let mut o = rocksdb::Options::default();
                o.create_if_missing(true);
                o
            });
            let db = rocksdb::DB::open(&opts, raw_dir.path()).unwrap();
            let mut key = 1_800_000_000_000_000u64;
            group.bench_function(format!("{name}_sync_{sync}"), |b| {
                b.iter(|| {
                    for chunk in values.chunks(contrail::sequencer::MAX_BATCH_EVENTS) {
                        let mut batch = rocksdb::WriteBatch::default();
                        for v in chunk {
                            key += 1;
                            batch.put(key.to_be_bytes(), v);
                        }
                        db.write_opt(batch, &wo).unwrap();
                    }
                })
            });
        }
    }
    group.finish();
    scan(c, &gen);
}

/// Each thread's CPU time so far, by thread id, with its name (the main thread's is
/// "transcoding"): nanoseconds on a CPU from `/proc/self/task/*/schedstat` (Linux); empty where
/// that cannot be read.
fn thread_cpu() -> HashMap<String, (String, u64)> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return HashMap::new() };
    let mut out = HashMap::new();
    for task in tasks.flatten() {
        let read = |file| std::fs::read_to_string(task.path().join(file)).ok();
        let (Some(stat), Some(name)) = (read("schedstat"), read("comm")) else { continue };
        let tid = task.file_name().to_string_lossy().into_owned();
        // The process's own thread is named after the binary: here it is the one transcoding.
        let name = if tid == std::process::id().to_string() { "transcoding".into() } else { name.trim().to_string() };
        if let Some(ns) = stat.split_whitespace().next().and_then(|n| n.parse().ok()) {
            out.insert(tid, (name, ns));
        }
    }
    out
}

/// Where the stream's time goes: each thread's CPU over the timed rounds, by thread name.
/// Transcoding alone and raw puts do not add up to the stream (BENCHMARKS.md, eighteenth
/// session): this says which thread spends the difference.
#[derive(Default)]
struct ThreadCpu {
    rounds: u64,
    wall: std::time::Duration,
    by_name: std::collections::BTreeMap<String, u64>,
}

impl ThreadCpu {
    fn add(
        &mut self,
        rounds: u64,
        wall: std::time::Duration,
        before: &HashMap<String, (String, u64)>,
        after: &HashMap<String, (String, u64)>,
    ) {
        self.rounds += rounds;
        self.wall += wall;
        for (tid, (name, ns)) in after {
            let was = before.get(tid).map_or(0, |(_, ns)| *ns);
            *self.by_name.entry(name.clone()).or_default() += ns.saturating_sub(was);
        }
    }

    fn print(&self, bench: &str) {
        if self.rounds == 0 || self.by_name.is_empty() {
            return;
        }
        let per_round = |ns: f64| ns / self.rounds as f64 / 1e6;
        let threads: Vec<String> = self
            .by_name
            .iter()
            .filter(|(_, ns)| per_round(**ns as f64) >= 0.01)
            .map(|(name, ns)| format!("{name} {:.2} ms", per_round(*ns as f64)))
            .collect();
        println!(
            "{bench}: {:.2} ms per round over {} rounds (warm-up included); CPU per round by thread: {}",
            per_round(self.wall.as_nanos() as f64),
            self.rounds,
            threads.join(", ")
        );
    }
}

/// Reading the log back, as replay pages do (`Log::scan`, values copied into the page's
/// buffer): every event of a flushed log, so each block is read and decompressed; beside it,
/// in the same run, RocksDB's boxed-pair iterator over the same column family (what the scan
/// used before it borrowed values from the iterator). `cargo bench --bench ingest -- log_scan`.
fn scan(c: &mut Criterion, gen: &[frames::GenFrame]) {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::rocks(RocksLog::open(dir.path(), RocksOptions::default()).unwrap()).unwrap();
    let mut tx = Transcoder::default();
    let mut t = 1_800_000_000_000_000u64;
    for chunk in gen.chunks(1_000) {
        let mut events = Vec::new();
        for g in chunk {
            tx.transcode(&g.frame, &mut events, &mut Vec::new());
        }
        for e in &mut events {
            t += 1;
            e.stamp(t);
        }
        log.append(&events, None).unwrap();
    }
    log.flush().unwrap();
    let n = (t - 1_800_000_000_000_000) as usize;
    let mut group = c.benchmark_group("log_scan");
    group.throughput(Throughput::Elements(n as u64));
    group.sample_size(20);
    let mut buf = Vec::with_capacity(64 << 20);
    group.bench_function("contrail_scan", |b| {
        b.iter(|| {
            buf.clear();
            log.scan(0, usize::MAX, |_, v| {
                buf.extend_from_slice(v);
                true
            })
            .unwrap()
        })
    });
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
    let db = rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), dir.path(), &cfs, false).unwrap();
    let events = db.cf_handle("events").unwrap();
    group.bench_function("baseline_boxed_iterator", |b| {
        b.iter(|| {
            buf.clear();
            let mut ro = rocksdb::ReadOptions::default();
            ro.fill_cache(false);
            let mut n = 0;
            for item in db.iterator_cf_opt(events, ro, rocksdb::IteratorMode::Start) {
                let (_, v) = item.unwrap();
                buf.extend_from_slice(&v);
                n += 1;
            }
            n
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
