//! `--store memory`: a bounded in-memory window, replayable inside it, that starts at the
//! upstream's live edge (a fan-out node has no history to restore).

mod common;

use common::client::{collect, connect};
use common::frames::generate;
use common::process::{inspect_log, Serve};
use common::relay::FakeRelay;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_only_replica_keeps_a_bounded_window() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 6_000, 40, 31);
    relay.push_all(&gen[..1_000]);
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(1_000, Duration::from_secs(60));
    let before_replica = primary.metric("contrail_store_newest_time_us").unwrap() as u64;
    let rd = tempfile::tempdir().unwrap();
    let upstream = format!("ws://{}", primary.public);
    let replica = Serve::start(
        rd.path(),
        "ws://127.0.0.1:9",
        &[
            "--store",
            "memory",
            "--memory-bytes",
            "1MiB",
            // The plain (uncompressed) replica link; tests/replica.rs covers the compressed one.
            "--upstream-compress",
            "false",
            "--upstream-url",
            &upstream,
            "--upstream-stale-timeout",
            "3s",
            "--max-events-per-second-per-ip",
            "0",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while replica.metric("contrail_relay_connected") != Some(1.0) {
        assert!(Instant::now() < deadline, "the replica did not connect; logs:\n{}", replica.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only now does the primary get the rest of the traffic.
    relay.push_all(&gen[1_000..]);
    primary.wait_for_seq(6_000, Duration::from_secs(60));
    let log: Vec<serde_json::Value> = inspect_log(pd.path()).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let newest = log.last().unwrap()["time_us"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut peak = 0.0f64;
    while replica.metric("contrail_store_newest_time_us").unwrap_or(0.0) as u64 != newest {
        assert!(Instant::now() < deadline, "live-only replica did not catch up");
        peak = peak.max(replica.metric("contrail_store_disk_bytes").unwrap_or(0.0));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The window stays within its budget.
    assert!(peak <= (1 << 20) as f64, "window held {peak} bytes");
    // Free disk space is the data dir's: the primary's, and none for the memory window.
    assert!(primary.metric("contrail_store_disk_free_bytes").unwrap() > 0.0);
    assert_eq!(replica.metric("contrail_store_disk_free_bytes"), None);
    // RocksDB's memory, by part (the memtables hold the events written).
    assert!(primary.metric("contrail_store_memory_bytes{part=\"memtables\"}").unwrap() > 0.0);
    assert_eq!(replica.metric("contrail_store_memory_bytes"), None);
    let oldest = replica.metric("contrail_store_oldest_time_us").unwrap() as u64;
    let start =
        log.iter().position(|e| e["time_us"].as_u64().unwrap() == oldest).expect("window starts at a primary event");
    let first_live = log.iter().position(|e| e["time_us"].as_u64().unwrap() > before_replica).unwrap();
    assert!(oldest > before_replica, "the live-only replica replayed the upstream's history");
    assert!(start > first_live, "nothing was dropped from a 1 MiB window of {} events", log.len() - first_live);
    // A cursor older than the window starts at the window's oldest event...
    let mut ws = connect(replica.public, "/subscribe?cursor=1", &[]).await.unwrap();
    let got = collect(&mut ws, log.len() - start, Duration::from_secs(5)).await;
    assert!(got == log[start..], "replay from before the window differs from the primary's log");
    // A client with cursor messages is told the events it asked for that the window no longer
    // holds, before the first one it holds (a cursor of 1 is "from the start": nothing told).
    let asked = log[first_live]["time_us"].as_u64().unwrap();
    let q = format!("/subscribe?cursor={asked}&informCursorSeconds=1");
    let mut ws = connect(replica.public, &q, &[]).await.unwrap();
    let told: Vec<serde_json::Value> = collect(&mut ws, 2, Duration::from_secs(5)).await;
    assert_eq!(
        told[0],
        serde_json::json!({"kind": "gap", "after_us": asked - 1, "through_us": log[start - 1]["time_us"]})
    );
    assert_eq!(told[1], log[start]);
    // ...and one inside it replays from there, with the primary's time_us.
    let mid = start + (log.len() - start) / 2;
    let cursor = log[mid]["time_us"].as_u64().unwrap();
    let mut ws = connect(replica.public, &format!("/subscribe?cursor={cursor}"), &[]).await.unwrap();
    let got = collect(&mut ws, log.len() - mid, Duration::from_secs(5)).await;
    assert!(got == log[mid..]);
    // Nothing was written to disk.
    assert!(std::fs::read_dir(rd.path()).unwrap().next().is_none(), "live-only mode wrote to its data dir");
}
