//! The log and the sequencer, on a real RocksDB in a temp dir.

mod common;

use common::frames::{commit_frame, like_record, TestOp};
use contrail::event::Event;
use contrail::metrics::Metrics;
use contrail::sequencer::{IngestFrame, Sequencer};
use contrail::store::{Log, RelayCursor, Store, StoreOptions};
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

#[test]
fn time_us_never_regresses_when_the_clock_steps_back_or_the_process_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Log::Rocks(Store::open(dir.path(), StoreOptions::default()).unwrap()));
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
            keep_time: false,
        }])
        .unwrap();
    }
    let stored = store.read_from(0, 1000).unwrap();
    assert_eq!(stored.len(), 30);
    assert!(stored.windows(2).all(|w| w[0].time_us < w[1].time_us));
    // Published after persisting, in the same order.
    for e in &stored {
        assert_eq!(rx.try_recv().unwrap().time_us, e.time_us);
    }
    assert_eq!(store.relay_cursor().unwrap(), Some(RelayCursor { url: "ws://relay".into(), seq: 10 }));
    let last = stored.last().unwrap().time_us;
    drop(seq);
    drop(store);

    // Restart with the clock still in the past: stamping continues after the last event.
    let store = Arc::new(Log::Rocks(Store::open(dir.path(), StoreOptions::default()).unwrap()));
    let mut seq = Sequencer::new(store.clone(), ring, Arc::new(Metrics::new()), "ws://relay".into())
        .unwrap()
        .with_clock(|| 1_000);
    seq.write(&mut vec![IngestFrame { seq: Some(11), relay_time_us: None, events: events(2, 11), keep_time: false }])
        .unwrap();
    let after = store.read_from(last + 1, 10).unwrap();
    assert_eq!(after.iter().map(|e| e.time_us).collect::<Vec<_>>(), vec![last + 1, last + 2]);

    // Retention emptying the log does not reset the clock either.
    store.trim_before(u64::MAX).unwrap();
    assert_eq!(store.oldest_time_us().unwrap(), None);
    assert_eq!(store.last_time_us().unwrap(), last + 2);
}

#[test]
fn trim_removes_older_events_and_nothing_newer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let mut evs = events(100, 1);
    for (i, e) in evs.iter_mut().enumerate() {
        e.stamp(1_000_000 + i as u64);
    }
    store.append(evs.iter(), None).unwrap();
    store.trim_before(1_000_050).unwrap();
    let left = store.read_from(0, 1000).unwrap();
    assert_eq!(left.len(), 50);
    assert_eq!(left[0].time_us, 1_000_050);
    assert_eq!(left[0].json(), evs[50].json());
    assert_eq!(store.oldest_time_us().unwrap(), Some(1_000_050));
    assert_eq!(store.newest_time_us().unwrap(), Some(1_000_099));
}
