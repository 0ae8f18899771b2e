//! The log and the sequencer, on both backends: a real RocksDB in a temp dir, and the
//! bounded in-memory window.

mod common;

use common::frames::{commit_frame, like_record, TestOp};
use contrail::event::Event;
use contrail::log::memory::MemoryLog;
use contrail::log::rocks::{RocksLog, RocksOptions};
use contrail::log::{Log, RelayCursor};
use contrail::metrics::Metrics;
use contrail::sequencer::{IngestFrame, Sequencer};
use contrail::transcode::Transcoder;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn events(n: usize, seq: i64) -> Vec<Event> {
    let ops: Vec<TestOp> = (0..n)
        .map(|i| TestOp::create(&format!("app.bsky.feed.like/3l{seq:05}{i:06}"), &like_record(i as u64)))
        .collect();
    let frame = commit_frame(seq, "did:plc:q6gjnaw2blty4crticxkmujt", "3mptbypluud2a", &ops);
    let mut out = Vec::new();
    Transcoder::default().transcode(&frame, &mut out, &mut Vec::new());
    assert_eq!(out.len(), n);
    out
}

/// Both backends, each with the directory a RocksDB one lives in.
fn backends() -> Vec<(&'static str, tempfile::TempDir, Log)> {
    let rocks_dir = tempfile::tempdir().unwrap();
    let rocks = Log::rocks(RocksLog::open(rocks_dir.path(), RocksOptions::default()).unwrap()).unwrap();
    let memory = Log::memory(MemoryLog::new(64 << 20));
    vec![("rocksdb", rocks_dir, rocks), ("memory", tempfile::tempdir().unwrap(), memory)]
}

#[test]
fn time_us_never_regresses_when_the_clock_steps_back_or_the_process_restarts() {
    for (name, dir, log) in backends() {
        eprintln!("backend {name}");
        stamps_never_regress(dir, log, name == "rocksdb");
    }
}

fn stamps_never_regress(dir: tempfile::TempDir, log: Log, durable: bool) {
    let store = Arc::new(log);
    let (ring, mut rx) = tokio::sync::broadcast::channel(1024);
    // A clock that jumps back by an hour halfway through.
    let clock = Arc::new(AtomicU64::new(1_800_000_000_000_000));
    let c2 = clock.clone();
    let mut seq = Sequencer::new(store.clone(), ring.clone(), Arc::new(Metrics::new()), "ws://relay".into())
        .unwrap()
        .with_clock(move || c2.fetch_add(1, Ordering::SeqCst));
    for i in 0..10 {
        if i == 5 {
            clock.store(1_800_000_000_000_000 - 3_600_000_000, Ordering::SeqCst);
        }
        seq.write(&mut vec![IngestFrame {
            seq: Some(i + 1),
            relay_time_us: None,
            events: events(3, i + 1),
            ..Default::default()
        }])
        .unwrap();
    }
    let stored = store.read_from(0, 1000).unwrap();
    assert_eq!(stored.len(), 30);
    assert!(stored.windows(2).all(|w| w[0].time_us < w[1].time_us));
    // Published after persisting, in the same order.
    for e in &stored {
        assert_eq!(rx.try_recv().unwrap().time_us(), e.time_us);
    }
    let last = stored.last().unwrap().time_us;
    let cursor = RelayCursor { url: "ws://relay".into(), seq: 10, at_time_us: Some(last) };
    assert_eq!(store.relay_cursor().unwrap(), Some(cursor.clone()));
    if durable {
        // A version that keeps no time moves the cursor on (a downgrade): the time kept for
        // the old seq is not taken for the new one.
        let moved = RelayCursor { seq: 11, at_time_us: None, ..cursor.clone() };
        store.append(&[], Some(&moved)).unwrap();
        assert_eq!(store.relay_cursor().unwrap(), Some(moved));
        store.append(&[], Some(&cursor)).unwrap();
    }
    let tip = store.tip();
    assert_eq!((tip.oldest(), tip.newest()), (Some(stored[0].time_us), Some(last)), "the tip moves with appends");
    drop(seq);
    let store = if durable {
        // Restart with the clock still in the past: stamping continues after the last event.
        drop(store);
        Arc::new(Log::rocks(RocksLog::open(dir.path(), RocksOptions::default()).unwrap()).unwrap())
    } else {
        store // nothing survives a restart of a memory log: go on with the same one
    };
    let mut seq = Sequencer::new(store.clone(), ring, Arc::new(Metrics::new()), "ws://relay".into())
        .unwrap()
        .with_clock(|| 1_000);
    seq.write(&mut vec![IngestFrame { seq: Some(11), events: events(2, 11), ..Default::default() }]).unwrap();
    let after = store.read_from(last + 1, 10).unwrap();
    assert_eq!(after.iter().map(|e| e.time_us).collect::<Vec<_>>(), vec![last + 1, last + 2]);

    // Retention emptying the log does not reset the clock either.
    store.trim_before(u64::MAX).unwrap();
    assert_eq!(store.oldest_time_us().unwrap(), None);
    assert_eq!(store.tip().oldest(), None);
    assert_eq!(store.last_time_us().unwrap(), last + 2);
}

/// With unsynced batches a power cut can lose batches subscribers have already seen; a clock
/// behind at boot then stamped new events with the `time_us` those subscribers hold as cursors
/// (a client resuming there skipped the new events, and one `time_us` named two). The sequencer
/// stores a floor past its stamps, synced, before a batch that passes it, and resumes past it.
#[test]
fn stamps_resume_past_a_durable_floor_when_batches_are_not_synced() {
    let t0 = 1_800_000_000_000_000u64;
    for sync_writes in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let opts = RocksOptions { sync_writes, ..RocksOptions::default() };
        let open = || Arc::new(Log::rocks(RocksLog::open(dir.path(), opts).unwrap()).unwrap());
        let sequencer = |store: &Arc<Log>, clock: u64| {
            let (ring, _) = tokio::sync::broadcast::channel(1024);
            Sequencer::new(store.clone(), ring, Arc::new(Metrics::new()), "ws://relay".into())
                .unwrap()
                .with_clock(move || clock)
        };
        let store = open();
        let mut seq = sequencer(&store, t0);
        seq.write(&mut vec![IngestFrame { seq: Some(1), events: events(3, 1), ..Default::default() }]).unwrap();
        let last = store.last_time_us().unwrap();
        assert_eq!(last, t0 + 2);
        let floor = store.stamp_floor().unwrap();
        if sync_writes {
            assert_eq!(floor, 0, "synced batches are durable before they are seen: no floor");
            continue;
        }
        assert!(floor > last, "the floor {floor} is past the stamps, {last}");
        // Later stamps up to the floor store nothing more (a second a write at most); a batch
        // lost to a power cut had stamps up to it.
        seq.write(&mut vec![IngestFrame { seq: Some(2), events: events(1, 2), ..Default::default() }]).unwrap();
        assert_eq!(store.stamp_floor().unwrap(), floor);
        drop((seq, store));
        // Back with the clock an hour behind.
        let store = open();
        let mut seq = sequencer(&store, t0 - 3_600_000_000);
        seq.write(&mut vec![IngestFrame { seq: Some(3), events: events(1, 3), ..Default::default() }]).unwrap();
        let after = store.read_from(last + 2, 10).unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].time_us, floor + 1, "stamped past the floor");
        assert!(store.stamp_floor().unwrap() > floor + 1);
    }
}

/// What replay pages and every reader of the log rely on: a scan hands over each stored value
/// from its position on, in order, and stops at its limit (the event after it is not read) or
/// when the callback says so, returning how many it handed over; stored frames are scanned up to
/// an inclusive bound.
#[test]
fn a_scan_stops_at_its_limit_or_its_callback_and_hands_over_values_in_order() {
    for (name, _dir, store) in backends() {
        eprintln!("backend {name}");
        let mut evs = events(20, 1);
        for (i, e) in evs.iter_mut().enumerate() {
            e.stamp(2_000_000 + i as u64);
        }
        store.append(&evs, None).unwrap();
        // RocksDB: half from a table file, half from the memtable.
        store.flush().unwrap();
        let mut more = events(20, 2);
        for (i, e) in more.iter_mut().enumerate() {
            e.stamp(2_000_020 + i as u64);
        }
        store.append(&more, None).unwrap();
        evs.extend(more);
        let collect = |from: u64, limit: usize, stop_after: usize| {
            let mut seen = Vec::new();
            let n = store
                .scan(from, limit, |t, v| {
                    seen.push((t, Event::decode_value(t, v).unwrap().json().to_vec()));
                    seen.len() < stop_after
                })
                .unwrap();
            assert_eq!(n, seen.len());
            seen
        };
        let want = |range: std::ops::Range<usize>| -> Vec<(u64, Vec<u8>)> {
            evs[range].iter().map(|e| (e.time_us, e.json().to_vec())).collect()
        };
        assert_eq!(collect(0, usize::MAX, usize::MAX), want(0..40));
        assert_eq!(collect(2_000_015, 10, usize::MAX), want(15..25), "across the flush, to the limit");
        assert_eq!(collect(2_000_015, 10, 4), want(15..19), "the callback stops it");
        assert_eq!(collect(2_000_035, 10, usize::MAX), want(35..40), "the end before the limit");
        assert!(collect(2_000_000, 0, usize::MAX).is_empty());
        assert!(collect(2_000_040, 10, usize::MAX).is_empty());
    }
    // Stored frames (RocksDB only): from..=to, in order, until the callback stops.
    let dir = tempfile::tempdir().unwrap();
    let store = Log::rocks(RocksLog::open(dir.path(), RocksOptions::default()).unwrap()).unwrap();
    let frames: Vec<(u64, Vec<u8>)> = (0..10u64).map(|i| (3_000_000 + i, vec![i as u8; 3])).collect();
    store.put_compressed_frames(&frames).unwrap();
    let mut seen = Vec::new();
    store
        .scan_compressed_frames(3_000_002, 3_000_006, |t, v| {
            seen.push((t, v.to_vec()));
            true
        })
        .unwrap();
    assert_eq!(seen, frames[2..7].to_vec());
    seen.clear();
    store
        .scan_compressed_frames(3_000_002, 3_000_006, |t, v| {
            seen.push((t, v.to_vec()));
            seen.len() < 2
        })
        .unwrap();
    assert_eq!(seen, frames[2..4].to_vec());
}

#[test]
fn trim_removes_older_events_and_nothing_newer() {
    for (name, _dir, store) in backends() {
        eprintln!("backend {name}");
        trims_exactly(store);
    }
}

fn trims_exactly(store: Log) {
    let mut evs = events(100, 1);
    for (i, e) in evs.iter_mut().enumerate() {
        e.stamp(1_000_000 + i as u64);
    }
    store.append(&evs, None).unwrap();
    store.trim_before(1_000_050).unwrap();
    let left = store.read_from(0, 1000).unwrap();
    assert_eq!(left.len(), 50);
    assert_eq!(left[0].time_us, 1_000_050);
    assert_eq!(left[0].json(), evs[50].json());
    assert_eq!(store.oldest_time_us().unwrap(), Some(1_000_050));
    assert_eq!(store.newest_time_us().unwrap(), Some(1_000_099));
    assert_eq!((store.tip().oldest(), store.tip().newest()), (Some(1_000_050), Some(1_000_099)));
    // The tip names the newest event deleted (what replayers behind it lost), not the cutoff;
    // a trim that deletes nothing leaves it.
    assert_eq!(store.tip().trimmed_through(), 1_000_049);
    store.trim_before(1_000_050).unwrap();
    assert_eq!(store.tip().trimmed_through(), 1_000_049);
}

#[test]
fn retention_never_trusts_a_clock_that_stepped_forward() {
    use contrail::log::retention::{enforce, ByArrival, RetentionConfig};
    use std::time::Duration;
    let hour = 3_600_000_000u64;
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}");
        let t0 = 1_800_000_000_000_000u64;
        let mut evs = events(100, 1);
        for (i, e) in evs.iter_mut().enumerate() {
            e.stamp(t0 + i as u64 * 60_000_000); // one a minute: 99 minutes of events
        }
        log.append(&evs, None).unwrap();
        let cfg = RetentionConfig {
            retention: Duration::from_secs(3600),
            max_disk_bytes: 0,
            trim_interval: Duration::from_secs(60),
        };
        let metrics = Metrics::new();
        // The clock jumps ten years ahead: retention counts back from the newest event.
        enforce(&log, &metrics, &cfg, t0 + 10 * 365 * 24 * hour, ByArrival::UNKNOWN).unwrap();
        assert_eq!(log.read_from(0, 1000).unwrap().len(), 61, "events within an hour of the newest stay");
        assert_eq!(log.oldest_time_us().unwrap(), Some(t0 + 39 * 60_000_000));
        // The clock behind the log: retention counts back from the clock (never more).
        enforce(&log, &metrics, &cfg, t0, ByArrival::UNKNOWN).unwrap();
        assert_eq!(log.read_from(0, 1000).unwrap().len(), 61);
        // A retention shorter than the gap between events still keeps the newest.
        let tiny = RetentionConfig { retention: Duration::from_millis(1), ..cfg };
        enforce(&log, &metrics, &tiny, u64::MAX, ByArrival::UNKNOWN).unwrap();
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].time_us, t0 + 99 * 60_000_000);
    }
}

/// Retention of an hour, trimming every minute.
fn an_hours_retention() -> contrail::log::retention::RetentionConfig {
    contrail::log::retention::RetentionConfig {
        retention: std::time::Duration::from_secs(3600),
        max_disk_bytes: 0,
        trim_interval: std::time::Duration::from_secs(60),
    }
}

/// A start with the clock already hours ahead of the log (a host booting with its RTC in local
/// time, before NTP): its first trim used to count back from that clock, and delete the
/// history from before the start (all of it, with the clock a retention or more ahead).
/// That history is aged from the log's newest event instead.
#[test]
fn retention_keeps_the_history_from_before_a_start_with_the_clock_ahead() {
    use contrail::log::retention::{enforce, Arrivals};
    use std::time::{Duration, Instant};
    let minute = 60_000_000u64;
    let cfg = an_hours_retention();
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}");
        // The last hour before the restart, an event a minute, the newest at W0.
        let w0 = 1_800_000_000_000_000u64;
        let mut evs = events(61, 6);
        for (i, e) in evs.iter_mut().enumerate().take(60) {
            e.stamp(w0 - (59 - i as u64) * minute);
        }
        log.append(&evs[..60], None).unwrap();
        // It starts at W0 (a quick restart) with the clock reading ten hours ahead; a minute
        // later an event is stamped by that clock, and retention runs.
        let ahead = w0 + 600 * minute;
        let start = Instant::now();
        let mut arrivals = Arrivals::new(start, ahead, w0);
        evs[60].stamp(ahead + minute);
        log.append(&evs[60..], None).unwrap();
        let now = start + Duration::from_secs(60);
        arrivals.record(now, ahead + minute, ahead + minute, cfg.retention);
        let by_arrival = arrivals.by_arrival(now, ahead + minute, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, ahead + minute, by_arrival).unwrap();
        // Aged from W0 plus a step's allowance (a minute) and the minute since the start: what
        // is younger than an hour then (W0 − 57 min and after) stays, with the new event.
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 58 + 1, "kept {} events", left.len());
        assert_eq!(left[0].time_us, w0 - 57 * minute);
    }
}

/// A clock that steps years forward while ingest goes on stamps new events years ahead, and
/// counting back from them would reach every event before the step. Age trims only what
/// arrived more than a retention ago by the monotonic clock ([`Arrivals`]), so the log keeps
/// what it received within the retention on both sides of the step.
#[test]
fn retention_keeps_what_arrived_within_it_when_the_clock_steps_forward_during_ingest() {
    use contrail::log::retention::{enforce, Arrivals};
    use std::time::{Duration, Instant};
    let minute = 60_000_000u64;
    let cfg = an_hours_retention();
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}");
        // The process starts with an empty log; an event arrives every (monotonic) minute for
        // 100 minutes, noted as retention notes them.
        let start = Instant::now();
        let t0 = 1_800_000_000_000_000u64;
        let mut arrivals = Arrivals::new(start, t0, 0);
        let mut evs = events(110, 1);
        for (i, e) in evs.iter_mut().enumerate().take(100) {
            e.stamp(t0 + i as u64 * minute);
            log.append(std::slice::from_ref(e), None).unwrap();
            let at = Duration::from_secs(60 * i as u64);
            arrivals.record(start + at, t0 + i as u64 * minute, t0 + i as u64 * minute, cfg.retention);
        }
        // Then the wall clock jumps ten years ahead, and the last ten events are stamped there.
        let jumped = t0 + 10 * 365 * 24 * 60 * minute;
        for (i, e) in evs.iter_mut().enumerate().skip(100) {
            e.stamp(jumped + i as u64);
            log.append(std::slice::from_ref(e), None).unwrap();
        }
        let now = start + Duration::from_secs(60 * 100);
        arrivals.record(now, jumped + 150, jumped + 109, cfg.retention);
        let by_arrival = arrivals.by_arrival(now, jumped + 200, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, jumped + 200, by_arrival).unwrap();
        // What arrived within the last hour (minutes 41–99, and the ten after the step) is
        // kept; minutes 0–40 arrived an hour ago or more.
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 69, "kept {} events", left.len());
        assert_eq!(left[0].time_us, t0 + 41 * minute);
    }
    // A process younger than the retention, whose log holds what came before it started (a
    // deploy): after a step forward, those events are aged by the wall clock as it would read
    // without the step, not all trimmed because they came before the first mark.
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}, a young process");
        let start = Instant::now();
        let w0 = 1_800_000_000_000_000u64;
        let mut evs = events(62, 5);
        for (i, e) in evs.iter_mut().enumerate().take(60) {
            e.stamp(w0 - (59 - i as u64) * minute);
        }
        log.append(&evs[..60], None).unwrap();
        let mut arrivals = Arrivals::new(start, w0, w0);
        // Ten minutes in, one more event; then the clock jumps a year ahead and one is stamped
        // there.
        evs[60].stamp(w0 + 10 * minute);
        log.append(&evs[60..61], None).unwrap();
        arrivals.record(start + Duration::from_secs(600), w0 + 10 * minute, w0 + 10 * minute, cfg.retention);
        let jumped = w0 + 10 * minute + 365 * 24 * 60 * minute;
        evs[61].stamp(jumped);
        log.append(&evs[61..], None).unwrap();
        let now = start + Duration::from_secs(660);
        arrivals.record(now, jumped, jumped, cfg.retention);
        let by_arrival = arrivals.by_arrival(now, jumped + 1, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, jumped + 1, by_arrival).unwrap();
        // Without the step the clock would read W0 + 11 min: after W0 − 49 min is within the
        // hour. Before, every event from before the start went.
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 49 + 2, "kept {} events", left.len());
        assert_eq!(left[0].time_us, w0 - 48 * minute);
    }
    // Without a step, events are aged by time_us however fast they came: a new replica
    // replaying a hundred hours of its upstream's log keeps the last hour of it.
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}, replaying");
        let start = Instant::now();
        let wall = 1_800_000_000_000_000u64;
        let mut arrivals = Arrivals::new(start, wall, 0);
        let hour = 60 * minute;
        let mut evs = events(100, 2);
        for (i, e) in evs.iter_mut().enumerate() {
            e.stamp(wall - (99 - i as u64) * hour);
        }
        log.append(&evs, None).unwrap();
        arrivals.record(start + Duration::from_secs(60), wall + minute, wall, cfg.retention);
        let by_arrival = arrivals.by_arrival(start + Duration::from_secs(60), wall + minute, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, wall + minute, by_arrival).unwrap();
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 2, "kept {} events", left.len());
    }
    // A log stamped a year ahead (the clock jumped, stamped, and came back: each new event is
    // stamped just after the last) still ages: what arrived an hour ago or more goes.
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}, stamped ahead");
        let start = Instant::now();
        let wall = 1_800_000_000_000_000u64;
        let ahead = wall + 365 * 24 * 60 * minute;
        let mut arrivals = Arrivals::new(start, wall, 0);
        let mut evs = events(100, 3);
        for (i, e) in evs.iter_mut().enumerate() {
            e.stamp(ahead + i as u64);
            log.append(std::slice::from_ref(e), None).unwrap();
            let at = Duration::from_secs(60 * i as u64);
            arrivals.record(start + at, wall + i as u64 * minute, ahead + i as u64, cfg.retention);
        }
        let now = start + Duration::from_secs(60 * 100);
        let by_arrival = arrivals.by_arrival(now, wall + 100 * minute, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, wall + 100 * minute, by_arrival).unwrap();
        // The newest arrived at minute 99: what arrived by minute 39 is over an hour older.
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 60, "kept {} events", left.len());
        assert_eq!(left[0].time_us, ahead + 40);
        // Quiet for days after that: nothing more goes (age counts back from the newest).
        let by_arrival = arrivals.by_arrival(now + Duration::from_secs(3 * 86_400), wall + 100 * minute, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, wall + 3 * 24 * 60 * minute, by_arrival).unwrap();
        assert_eq!(log.read_from(0, 1000).unwrap().len(), 60, "a quiet log was trimmed");
    }
    // A replica falling behind its primary (its events' time_us, the primary's, lag more and
    // more behind their arrival) keeps what time_us says is within the retention: age by
    // arrival does not trim more while the log is not stamped ahead of the clock.
    for (name, _dir, log) in backends() {
        eprintln!("backend {name}, a replica falling behind");
        let start = Instant::now();
        let wall = 1_800_000_000_000_000u64;
        let mut arrivals = Arrivals::new(start, wall, 0).for_replica();
        let mut evs = events(100, 4);
        let stamp = |i: u64| wall + i * 42_000_000; // arrives at minute i, 18 s more behind each minute
        for (i, e) in evs.iter_mut().enumerate() {
            let i = i as u64;
            e.stamp(stamp(i));
            log.append(std::slice::from_ref(e), None).unwrap();
            arrivals.record(start + Duration::from_secs(60 * i), wall + i * minute, stamp(i), cfg.retention);
        }
        let now = start + Duration::from_secs(60 * 100);
        let by_arrival = arrivals.by_arrival(now, wall + 100 * minute, cfg.retention);
        enforce(&log, &Metrics::new(), &cfg, wall + 100 * minute, by_arrival).unwrap();
        // By time_us the newest is minute 99's (wall + 4,158 s): an hour back keeps minutes 14–99.
        let left = log.read_from(0, 1000).unwrap();
        assert_eq!(left.len(), 86, "kept {} events", left.len());
    }
}

/// The disk budget counts the events' files, which trimming can shrink, not the write-ahead
/// log, which it cannot (every batch also writes the meta column family, so WAL files stay
/// until RocksDB's WAL limit forces a flush): a budget above the events' files trims nothing,
/// however large the WAL; one below them trims the oldest events until under it.
/// A RocksDB log with 1 MiB memtables, so appended events soon reach files.
fn small_memtable_log(dir: &std::path::Path) -> Log {
    let opts = RocksOptions { memtable_bytes: 1 << 20, ..RocksOptions::default() };
    Log::rocks(RocksLog::open(dir, opts).unwrap()).unwrap()
}

/// Appends one batch of 100 events for each of `batches`, stamped 1 ms apart from `*t` on.
fn append_stamped(log: &Log, batches: std::ops::Range<i64>, t: &mut u64) {
    for batch in batches {
        let mut evs = events(100, batch + 1);
        for e in &mut evs {
            e.stamp(*t);
            *t += 1_000;
        }
        log.append(&evs, None).unwrap();
    }
}

/// Waits until RocksDB's flushes and compactions have finished: idle for five checks in a row,
/// since a flush may be scheduled but not yet running.
fn settle(log: &Log) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut idle = 0;
    while idle < 5 {
        assert!(std::time::Instant::now() < deadline, "RocksDB's background work never finished");
        idle = if log.background_jobs() == (0, 0) { idle + 1 } else { 0 };
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_disk_budget_counts_the_events_files_not_the_wal() {
    use contrail::log::retention::{enforce, ByArrival, RetentionConfig};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    // Small memtables: the events reach files while the WAL keeps growing.
    let log = small_memtable_log(dir.path());
    let t0 = 1_800_000_000_000_000u64;
    let mut t = t0;
    append_stamped(&log, 0..500, &mut t);
    let newest = t - 1_000;
    settle(&log);
    // Read from the directory, not from what the log reports: the events' SST files (nothing
    // else is in files yet) and the WAL.
    let bytes_of = |ext: &str| -> u64 {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == ext))
            .filter_map(|p| std::fs::metadata(p).ok()) // a file compaction just deleted
            .map(|m| m.len())
            .sum()
    };
    let (files, wal) = (bytes_of("sst"), bytes_of("log"));
    eprintln!("events' files {files} B, WAL {wal} B");
    assert!(files > 0 && wal > 4 * files, "the scenario: a WAL much larger than the events' files");
    let metrics = Metrics::new();
    let budget = |max_disk_bytes| RetentionConfig {
        retention: Duration::from_secs(86_400),
        max_disk_bytes,
        trim_interval: Duration::from_secs(60),
    };
    enforce(&log, &metrics, &budget(files + wal / 2), newest, ByArrival::UNKNOWN).unwrap();
    assert_eq!(log.oldest_time_us().unwrap(), Some(t0), "a budget the events' files fit trimmed them");
    enforce(&log, &metrics, &budget(files / 2), newest, ByArrival::UNKNOWN).unwrap();
    let oldest = log.oldest_time_us().unwrap().unwrap();
    assert!(oldest > t0, "a budget below the events' files trimmed nothing");
    assert!(log.event_bytes() <= files / 2, "still over the budget: {} B", log.event_bytes());
    assert_eq!(log.newest_time_us().unwrap(), Some(newest));
    assert_eq!(log.read_from(oldest, usize::MAX).unwrap().len() as u64, (newest - oldest) / 1_000 + 1);
}

/// After the clock stepped a year forward, the log's span of time is mostly the step: a tenth of
/// it would be all history from before the step. The disk budget trims by bytes where the
/// files tell, so a budget exceeded by a little costs a little.
#[test]
fn the_disk_budget_trims_a_share_of_the_bytes_not_of_a_span_a_clock_step_stretched() {
    use contrail::log::retention::{enforce, ByArrival, RetentionConfig};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let log = small_memtable_log(dir.path());
    let t0 = 1_800_000_000_000_000u64;
    let year = 365 * 86_400 * 1_000_000u64;
    let mut t = t0;
    append_stamped(&log, 0..200, &mut t);
    t += year; // the clock steps forward; stamping goes on from there
    append_stamped(&log, 200..400, &mut t);
    let newest = t - 1_000;
    log.flush().unwrap();
    settle(&log);
    let files = log.event_bytes();
    let metrics = Metrics::new();
    let config = RetentionConfig {
        retention: Duration::from_secs(100 * 365 * 86_400),
        max_disk_bytes: files - files / 20, // 5% over
        trim_interval: Duration::from_secs(60),
    };
    enforce(&log, &metrics, &config, newest, ByArrival::UNKNOWN).unwrap();
    let kept = log.read_from(0, usize::MAX).unwrap();
    assert!(log.event_bytes() <= config.max_disk_bytes, "still over the budget: {} B", log.event_bytes());
    // About a tenth went (a file's worth more or less), not the half from before the step.
    assert!(kept.len() >= 30_000, "{} of 40,000 events kept", kept.len());
    assert!(kept[0].time_us < t0 + year, "history from before the step is still there");
    assert_eq!(kept.last().unwrap().time_us, newest);
}
