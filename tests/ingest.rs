//! Live ingest through the real binary: a fake relay speaking the real wire, `contrail serve`,
//! a real RocksDB in a temp dir, `contrail inspect` to read it back.

mod common;

use common::frames::{self, generate, GenFrame};
use common::process::{inspect_log, inspect_stats, Serve};
use common::relay::{ConnFault, FakeRelay, Faults};
use std::collections::HashMap;
use std::time::Duration;

/// The identity of an event for exactly-once checks: the rkey for commits (unique in the
/// generator), the relay seq for identity/account.
fn event_key(v: &serde_json::Value) -> String {
    match v["kind"].as_str().unwrap() {
        "commit" => format!("commit/{}", v["commit"]["rkey"].as_str().unwrap()),
        k => format!("{k}/{}", v[k]["seq"]),
    }
}

fn expected_keys(gen: &[GenFrame]) -> Vec<String> {
    let mut keys = Vec::new();
    for g in gen {
        for (_, kind, _, rkey) in &g.expected {
            keys.push(if *kind == "commit" { format!("commit/{rkey}") } else { format!("{kind}/{}", g.seq) });
        }
    }
    keys
}

/// Every expected event exactly once, nothing else, `time_us` strictly increasing.
fn assert_log_exact(lines: &[String], expected: &[String]) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last = 0u64;
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON {e}: {l}"));
        let t = v["time_us"].as_u64().unwrap();
        assert!(t > last, "time_us not strictly increasing: {t} after {last}");
        last = t;
        *seen.entry(event_key(&v)).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).take(5).collect();
    assert!(dups.is_empty(), "duplicated events: {dups:?}");
    let missing: Vec<_> = expected.iter().filter(|k| !seen.contains_key(*k)).take(5).collect();
    assert!(missing.is_empty(), "missing events (of {}): {missing:?}", expected.len());
    assert_eq!(lines.len(), expected.len(), "unexpected extra events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_kill_9_during_fast_ingest() {
    let relay = FakeRelay::start().await;
    let gen = generate(1_000, 30_000, 200, 1);
    relay.push_all(&gen);
    // About 10,000 frames/s: fast ingest, yet slow enough that kills land mid-stream.
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), burst: 10, ..Faults::default() });
    let last_seq = gen.last().unwrap().seq;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = frames::Lcg::new(42);
    let mut kills = 0;
    for round in 0..40 {
        let connections = relay.connections();
        let mut serve = Serve::start(dir.path(), &relay.url(), &[]);
        // Once it reads the relay (the listeners are up before the log is open), kill it at a
        // random moment while frames are still flowing.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while relay.connections() == connections {
            assert!(std::time::Instant::now() < deadline, "round {round}: the relay was never reached");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(30 + rng.below(150)));
        let seq = serve.metric("contrail_relay_last_seq").unwrap_or(0.0) as i64;
        serve.kill9();
        if seq < last_seq {
            kills += 1;
        }
        if kills >= 20 {
            eprintln!("{kills} kills in {} rounds", round + 1);
            break;
        }
    }
    assert!(kills >= 20, "only {kills} kills landed mid-ingest");
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(last_seq, Duration::from_secs(120));
    drop(serve);
    let lines = inspect_log(dir.path());
    assert_log_exact(&lines, &expected_keys(&gen));
    let stats = inspect_stats(dir.path());
    assert_eq!(stats["relay_seq"], last_seq);
    assert_eq!(stats["events"].as_u64().unwrap() as usize, lines.len());
    // Each restart resumed from the stored cursor.
    assert!(relay.cursors().iter().skip(1).filter(|c| c.is_some()).count() >= 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_drops_lose_and_duplicate_nothing() {
    let relay = FakeRelay::start().await;
    let gen = generate(500, 3_000, 50, 2);
    relay.push_all(&gen);
    let last_seq = gen.last().unwrap().seq;
    // Three connections in a row are dropped part-way; the fourth runs to the end.
    relay.plan(vec![ConnFault::drop_after(700), ConnFault::drop_after(600), ConnFault::drop_after(600)]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(last_seq, Duration::from_secs(60));
    assert_eq!(relay.connections(), 4, "three drops, three reconnects");
    assert!(
        serve.metric("contrail_relay_duplicate_frames_total").unwrap() >= 1.0,
        "inclusive replays were not skipped"
    );
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
    // A restart resumes from the cursor: nothing new is written.
    let before = inspect_log(dir.path()).len();
    let connections = relay.connections();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    relay.wait_for_connections_above(connections, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    drop(serve);
    assert_eq!(inspect_log(dir.path()).len(), before);
    assert_eq!(relay.cursors().last().unwrap(), &Some(last_seq));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_counted_and_skipped() {
    let relay = FakeRelay::start().await;
    let good = generate(10, 40, 5, 3);
    let mut expected = Vec::new();
    let mut seq = 0;
    for (i, g) in good.into_iter().enumerate() {
        seq = 10 + 2 * i as i64;
        // Re-seq the generated frame by regenerating it would change nothing we check; push
        // it under its own seq and a bad frame before it.
        let bad: Vec<u8> = match i % 5 {
            0 => vec![0xff, 0x00, 0x13],                    // undecodable header
            1 => frames::unknown_frame(seq - 1, "#handle"), // unknown type
            2 => [frames::identity_frame(seq - 1, "did:plc:x", None), vec![0]].concat(), // trailing bytes
            // (a valid #sync is an event now: tests/subscribe_v2.rs)
            3 => frames::sync_frame(seq - 1, "not-a-did"),
            _ => frames::info_frame("OutdatedCursor"),
        };
        relay.push(seq - 1, bad);
        let renumbered = renumber(&g, seq);
        expected.push(renumbered.clone());
        relay.push(seq, renumbered.frame);
    }
    // An oversized frame (over --max-frame-bytes) and then one more good frame.
    let big = frames::commit_frame(
        seq + 1,
        "did:plc:q6gjnaw2blty4crticxkmujt",
        "3mptbypluud2a",
        &[frames::TestOp::create(
            "app.bsky.feed.post/3zzzzzzzzzz22",
            &frames::map(vec![("$type", frames::s("app.bsky.feed.post")), ("text", frames::s(&"x".repeat(300_000)))]),
        )],
    );
    relay.push(seq + 1, big);
    let tail = renumber(&generate(0, 1, 1, 99)[0], seq + 2);
    expected.push(tail.clone());
    relay.push(seq + 2, tail.frame);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--max-frame-bytes", "100KiB"]);
    serve.wait_for_seq(seq + 2, Duration::from_secs(30));
    let m = |n: &str| serve.metric(n).unwrap_or(0.0);
    assert!(m("contrail_drops_total{reason=\"bad_header\"}") >= 1.0);
    assert!(m("contrail_drops_total{reason=\"unknown_type\"}") >= 1.0);
    assert!(m("contrail_drops_total{reason=\"trailing_bytes\"}") >= 1.0);
    assert!(m("contrail_drops_total{reason=\"bad_did\"}") >= 1.0);
    assert!(m("contrail_drops_total{reason=\"info\"}") >= 1.0);
    assert_eq!(m("contrail_drops_total{reason=\"frame_too_large\"}"), 1.0);
    assert_eq!(relay.connections(), 1, "a bad frame must not cost the connection");
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&expected));
}

/// The same generated frame with another seq (identity/account carry the seq inside).
fn renumber(g: &GenFrame, seq: i64) -> GenFrame {
    use ipld_core::ipld::Ipld;
    use serde::Deserialize;
    let mut de = serde_ipld_dagcbor::de::Deserializer::from_slice(&g.frame);
    let header = Ipld::deserialize(&mut de).unwrap();
    let Ipld::Map(mut body) = Ipld::deserialize(&mut de).unwrap() else { panic!() };
    body.insert("seq".into(), Ipld::Integer(seq as i128));
    let mut frame = frames::dag_cbor(&header);
    frame.extend(frames::dag_cbor(&Ipld::Map(body)));
    GenFrame { seq, frame, expected: g.expected.clone() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_counted_and_silence_reconnects() {
    let relay = FakeRelay::start().await;
    let gen = generate(100, 20, 5, 4);
    for (i, g) in gen.iter().enumerate() {
        let seq = if i < 10 { g.seq } else { g.seq + 1000 };
        relay.push(seq, renumber(g, seq).frame);
    }
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", "1s"]);
    serve.wait_for_seq(gen.last().unwrap().seq + 1000, Duration::from_secs(30));
    assert!(serve.metric("contrail_relay_seq_gaps_total").unwrap() >= 1.0);
    relay.set_faults(Faults { silent: true, ..Faults::default() });
    // The relay goes quiet: the reader reconnects instead of waiting forever or exiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while relay.connections() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(relay.connections() >= 3, "no reconnect after silence");
    assert!(serve.metric("contrail_relay_errors_total{kind=\"idle_timeout\"}").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_log_reads_while_serve_runs() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 4_000, 30, 5);
    relay.push_all(&gen);
    relay.set_faults(Faults { frame_interval: Some(Duration::from_micros(500)), ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(500, Duration::from_secs(30));
    let partial = inspect_log(dir.path());
    assert!(!partial.is_empty());
    let mut last = 0;
    for l in &partial {
        let t = serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap();
        assert!(t > last);
        last = t;
    }
    let stats = inspect_stats(dir.path());
    assert!(stats["events"].as_u64().unwrap() >= partial.len() as u64);
    // --cursor is inclusive, --limit bounds the output.
    let out = std::process::Command::new(common::process::bin())
        .args(["inspect", "log", "--limit", "3", "--cursor"])
        .arg(last.to_string())
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let lines: Vec<_> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    assert!(!lines.is_empty() && lines.len() <= 3);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&lines[0]).unwrap()["time_us"].as_u64().unwrap(), last);
    serve.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_old_events_only() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 200, 10, 6);
    relay.push_all(&gen[..100]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--retention", "3s", "--trim-interval", "200ms"]);
    serve.wait_for_seq(100, Duration::from_secs(30));
    // Retention counts back from the newest event: a quiet log keeps what it has.
    std::thread::sleep(Duration::from_millis(3_500));
    assert_eq!(serve.metric("contrail_store_trims_total"), Some(0.0), "a quiet log was trimmed");
    // A second batch lands more than 3 s after the first: the first ages out and is trimmed.
    relay.push_all(&gen[100..]);
    serve.wait_for_seq(200, Duration::from_secs(30));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while serve.metric("contrail_store_trims_total").unwrap() < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no trim ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = inspect_log(dir.path());
    drop(serve);
    assert_log_exact(&lines, &expected_keys(&gen[100..]));
}

/// A relay holding seqs 50,000..=50,049 (generated with `seed`) and a server that has ingested
/// them, with `--relay-idle-timeout idle`. Seqs here are small: a reset is anything more than
/// 10,000 (the least `--relay-reset-threshold` takes) below the cursor.
async fn serving_up_to_50_049(seed: u64, idle: &str) -> (FakeRelay, tempfile::TempDir, Serve, Vec<GenFrame>) {
    let relay = FakeRelay::start().await;
    let before = generate(50_000, 50, 10, seed);
    relay.push_all(&before);
    let dir = tempfile::tempdir().unwrap();
    let serve =
        Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", idle, "--relay-reset-threshold", "10000"]);
    serve.wait_for_seq(50_049, Duration::from_secs(30));
    (relay, dir, serve, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_seq_reset_is_followed_not_skipped() {
    let (relay, dir, serve, before) = serving_up_to_50_049(41, "1s").await;
    // The relay restarts without its history and with a new, lower seq space: once the
    // reader has reconnected (the relay went quiet), new frames start at seq 1.
    relay.clear();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while relay.connections() < 3 {
        assert!(std::time::Instant::now() < deadline, "no reconnect");
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = generate(1, 30, 10, 42);
    relay.push_all(&after);
    assert_new_space_followed(serve, dir.path(), before, after);
}

/// Waits for the relay's new seq space to reach its last frame; one reset counted; the log
/// holds the events of both spaces, once each.
fn assert_new_space_followed(serve: Serve, dir: &std::path::Path, before: Vec<GenFrame>, after: Vec<GenFrame>) {
    serve.wait_for_seq_exactly(after.last().unwrap().seq, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"seq_reset\"}"), Some(1.0));
    drop(serve);
    let all: Vec<GenFrame> = before.into_iter().chain(after).collect();
    assert_log_exact(&inspect_log(dir), &expected_keys(&all));
}

/// A relay that restarted with a lower seq space and refuses our cursor as in its future (an
/// error frame, then a close, as the TypeScript PDS does): the reader asks next without a
/// cursor and follows the new space, instead of asking for the refused cursor forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_our_cursor_as_future_is_followed_live() {
    let (relay, dir, serve, before) = serving_up_to_50_049(46, "1s").await;
    relay.set_faults(Faults { refuse_future_cursor: true, ..Faults::default() });
    relay.clear();
    let after = generate(1, 30, 10, 47);
    relay.push_all(&after);
    serve.wait_for_seq_exactly(30, Duration::from_secs(30));
    assert!(serve.metric("contrail_relay_errors_total{kind=\"future_cursor\"}").unwrap() >= 1.0);
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"seq_reset\"}"), Some(1.0));
    // The refused cursor asked for three times (it might have been one lagging instance), then
    // a connection without one. (The fake then replays its new space from the first frame; a
    // real relay would send only what comes after.)
    let cursors = relay.cursors();
    let refused = cursors.iter().position(|c| *c == Some(50_049)).unwrap();
    assert_eq!(cursors[refused..refused + 3], [Some(50_049); 3], "{cursors:?}");
    assert_eq!(cursors[refused + 3], None, "{cursors:?}");
    drop(serve);
    let mut all = before.clone();
    all.extend(after);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&all));
}

/// The relay lag grows while nothing arrives (it used to stay at its value from the last frame,
/// so a stopped relay looked current on the status page and dashboards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_lag_grows_while_the_relay_is_silent() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 10, 5, 71);
    relay.push_all(&gen);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq_exactly(10, Duration::from_secs(30));
    let lag = || serve.metric("contrail_relay_lag_seconds").unwrap();
    let first = lag();
    std::thread::sleep(Duration::from_millis(1_200));
    let later = lag();
    assert!(later >= first + 1.0, "the lag stayed at {first} (now {later}) with nothing arriving");
    let (_, status) = common::process::http_get(serve.public, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(status["relay"]["lag_seconds"].as_f64().unwrap() >= later);
}

/// A PDS read directly, wiped (or restored from a backup): its seqs restart far less than the
/// default threshold below our cursor, so its new events would be skipped as duplicates until
/// they passed it. With `--relay-reset-threshold 1` (a PDS replays exactly from the cursor, no
/// fan-out daemon a little behind) its new seq space is followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pds_wiped_to_lower_seqs_is_followed_with_a_reset_threshold_of_one() {
    let relay = FakeRelay::start().await;
    let before = generate(1, 300, 10, 61);
    relay.push_all(&before);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--relay-idle-timeout", "1s", "--relay-reset-threshold", "1"];
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    serve.wait_for_seq_exactly(300, Duration::from_secs(30));
    // Wiped: it refuses our cursor as in its future (as the TypeScript PDS does), and its new
    // events start at seq 1 again.
    relay.set_faults(Faults { refuse_future_cursor: true, ..Faults::default() });
    relay.clear();
    let after = generate(1, 30, 10, 62);
    relay.push_all(&after);
    assert_new_space_followed(serve, dir.path(), before, after);
}

/// A relay behind a load balancer whose lagging instance refuses our cursor three times, then
/// a live connection reaches an instance ahead of us: the reader asks again with its cursor and
/// gets the frames in between, instead of taking them as a gap (they would be lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_refused_our_cursor_then_runs_ahead_is_asked_for_it_again() {
    let (relay, frames) = refusing_then_running_ahead().await;
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-reset-threshold", "10000"]);
    serve.wait_for_seq_exactly(50_099, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_relay_seq_gaps_total"), Some(0.0));
    let cursors = relay.cursors();
    assert_eq!(cursors[..6], [None, Some(50_049), Some(50_049), Some(50_049), None, Some(50_049)], "{cursors:?}");
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&frames));
}

/// A relay of seqs 50,000–50,099 whose first connection drops after 50 frames, whose next three
/// refuse our cursor (a lagging instance), and whose fifth, live, starts ahead of us at 50,080.
async fn refusing_then_running_ahead() -> (FakeRelay, Vec<GenFrame>) {
    let relay = FakeRelay::start().await;
    let frames = generate(50_000, 100, 10, 49);
    relay.push_all(&frames);
    let refuse = ConnFault { refuse_cursor: true, ..ConnFault::default() };
    relay.plan(vec![
        ConnFault::drop_after(50),
        refuse.clone(),
        refuse.clone(),
        refuse,
        ConnFault { live_from: Some(50_080), ..ConnFault::default() },
    ]);
    (relay, frames)
}

/// A relay that was just asked again for our cursor (it showed, by running ahead of it, that it
/// is reachable and serving) is asked at once: the wait starts again from
/// `--relay-backoff-min` instead of growing on from the refusals before it. Otherwise a load
/// balancer that sends every cursor request to a lagging instance holds ingest for as long as
/// the backoff has grown (minutes) before each new try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_asked_again_for_our_cursor_is_asked_without_the_grown_backoff() {
    let (relay, _) = refusing_then_running_ahead().await;
    let dir = tempfile::tempdir().unwrap();
    let args = ["--relay-reset-threshold", "10000", "--relay-backoff-min", "300ms", "--relay-backoff-max", "60s"];
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    serve.wait_for_seq_exactly(50_099, Duration::from_secs(30));
    // Each ended connection's error and the wait before the next one, in order.
    let ended: Vec<(String, u64)> = serve
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "relay connection ended")
        .map(|v| (v["error"].as_str().unwrap_or("").to_string(), v["retry_in_ms"].as_u64().unwrap()))
        .collect();
    let asked = ended.iter().position(|(e, _)| e.contains("asking for it again")).expect("asked again");
    assert!(asked >= 1, "{ended:?}");
    // Three refusals in a row grew the wait to 1.2–2.4 s (300 ms, doubled each time, jittered
    // down by up to half); asking again waits at most the minimum.
    assert!(ended[asked - 1].1 >= 1_200, "the refusals grew the wait: {ended:?}");
    assert!(ended[asked].1 <= 300, "asked again without the grown wait: {ended:?}");
    assert_eq!(serve.metric("contrail_relay_seq_gaps_total"), Some(0.0));
}

/// A relay whose seq space restarts lower in the middle of a connection (a fan-out daemon whose
/// upstream restarted, keeping our connection open): a run of frames far below our cursor is
/// kept aside and then followed from its first frame, on the same connection. Before, every
/// frame was skipped as a duplicate for as long as the relay kept sending, so the idle timeout
/// never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_seq_space_restarting_mid_connection_is_followed() {
    let (relay, dir, serve, before) = serving_up_to_50_049(48, "10s").await;
    let connections = relay.connections();
    // The open connection goes on with the new space from its seq 1, a frame a millisecond.
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), ..Faults::default() });
    let after = generate(1, 3_000, 10, 49);
    relay.restart_seq_space(&after);
    serve.wait_for_seq_exactly(3_000, Duration::from_secs(40));
    assert_eq!(relay.connections(), connections, "followed on the same connection");
    assert_eq!(serve.metric("contrail_relay_duplicate_frames_total"), Some(0.0), "nothing skipped");
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"seq_reset\"}"), Some(1.0));
    assert!(serve.logs().contains("for a run of frames: treating it as a relay reset"), "{}", serve.logs());
    drop(serve);
    let mut all = before.clone();
    all.extend(after);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&all));
}

/// The same, when the new space starts with frames too large to keep aside (over 16 MiB before
/// the run is long enough to follow): they are dropped to bound memory, and once the run is a new
/// space the relay is asked for it again from its first seq, so none of it is lost. Before, the
/// reader followed from the frames left and the dropped ones were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_seq_space_too_large_to_keep_aside_is_asked_for_again() {
    use common::frames::{commit_frame, did_for, map, s, tid_for, TestOp};
    let (relay, dir, serve, before) = serving_up_to_50_049(48, "10s").await;
    // The new space: seqs 5.. , its first twenty frames each two 0.9 MB posts (36 MB in all).
    let mut after = generate(5, 150, 10, 51);
    for (i, g) in after.iter_mut().take(20).enumerate() {
        let did = did_for(i as u64);
        let (ops, expected): (Vec<TestOp>, Vec<_>) = (0..2u64)
            .map(|k| {
                let rkey = tid_for(9_000 + 2 * i as u64 + k);
                let post = map(vec![
                    ("$type", s("app.bsky.feed.post")),
                    ("text", s(&"x".repeat(900_000))),
                    ("createdAt", s("2024-11-29T12:00:00.000Z")),
                ]);
                let op = TestOp::create(&format!("app.bsky.feed.post/{rkey}"), &post);
                (op, (did.clone(), "commit", "app.bsky.feed.post".to_string(), rkey))
            })
            .unzip();
        g.frame = commit_frame(g.seq, &did, &tid_for(9_500 + i as u64), &ops);
        g.expected = expected;
    }
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), ..Faults::default() });
    let connections = relay.connections();
    relay.restart_seq_space(&after);
    serve.wait_for_seq_exactly(after.last().unwrap().seq, Duration::from_secs(60));
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"seq_reset\"}"), Some(1.0));
    assert_eq!(serve.metric("contrail_relay_seq_gaps_total"), Some(0.0));
    // Asked again from the first seq of the new space, less one (the cursor is what we have).
    let cursors = relay.cursors();
    assert_eq!(cursors[connections..], [Some(4)], "{cursors:?} {}", serve.logs());
    drop(serve);
    let mut all = before.clone();
    all.extend(after);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_a_little_behind_on_reconnect_is_not_a_reset() {
    let relay = FakeRelay::start().await;
    let mut gen = generate(1_000, 400, 10, 43);
    // Every 20th frame of a type unknown to us (no event; a drop, "unknown_type"): the ones
    // sent again must not be counted again.
    for g in gen.iter_mut().step_by(20) {
        (g.frame, g.expected) = (frames::unknown_frame(g.seq, "#future"), Vec::new());
    }
    relay.push_all(&gen);
    let last_seq = gen.last().unwrap().seq;
    // The first connection drops after 300 frames; the next starts 100 seqs below our cursor,
    // as a public relay's fan-out daemon that is a little behind does.
    relay.plan(vec![ConnFault::drop_after(300), ConnFault { start_behind: Some(100), ..ConnFault::default() }]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(last_seq, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"seq_reset\"}"), Some(0.0));
    assert!(serve.metric("contrail_relay_duplicate_frames_total").unwrap() >= 100.0);
    assert_eq!(
        serve.metric("contrail_drops_total{reason=\"unknown_type\"}"),
        Some(20.0),
        "each frame's drops counted once"
    );
    drop(serve);
    // Nothing was ingested twice (a reset would have stored those 100 frames again).
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
}

/// Serves `frames` (one a millisecond, on every connection) to a reader with a 1 s idle
/// timeout and `args`; returns once it has left its first connection for a second, which the
/// frames alone (10 s or more of them) would not end within the 8 s allowed.
async fn left_at_the_idle_timeout(frames: Vec<(i64, Vec<u8>)>, args: &[&str]) -> (Serve, FakeRelay, tempfile::TempDir) {
    let relay = FakeRelay::start().await;
    for (seq, frame) in frames {
        relay.push(seq, frame);
    }
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&str> = ["--relay-idle-timeout", "1s"].iter().chain(args).copied().collect();
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    relay.wait_for_connections_above(0, Duration::from_secs(20));
    relay.wait_for_connections_above(1, Duration::from_secs(8));
    (serve, relay, dir)
}

/// A peer that keeps sending frames without a seq (here binary frames that are not CBOR, as a
/// broken proxy or a buggy relay might), or the same frame again and again, is as dead as a
/// silent one: the idle timeout counts only frames whose seq moves the stream on, so the reader
/// reconnects instead of staying on it while the junk lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_sending_only_frames_without_a_seq_is_left_at_the_idle_timeout() {
    // Binary frames that are not CBOR.
    let (serve, _relay, _dir) =
        left_at_the_idle_timeout((0..10_000).map(|i| (i + 1, vec![0xff; 64])).collect(), &[]).await;
    assert!(serve.metric("contrail_relay_errors_total{kind=\"idle_timeout\"}").unwrap() >= 1.0);
    assert_eq!(serve.metric("contrail_relay_last_seq"), Some(0.0));
    drop(serve);
    // One frame again and again: repeats do not move the stream on.
    let one = generate(7, 1, 10, 52).remove(0);
    let (serve, _relay, _dir) = left_at_the_idle_timeout(vec![(one.seq, one.frame); 10_000], &[]).await;
    assert_eq!(serve.metric("contrail_relay_last_seq"), Some(7.0));
    assert!(serve.metric("contrail_relay_duplicate_frames_total").unwrap() >= 100.0);
    drop(serve);
    // A loop of frames we have (7, 8, 7, 8, …): each 8 is above the frame before it, but
    // nothing is new.
    let two = generate(7, 2, 10, 53);
    let looped = (0..5_000).flat_map(|_| two.iter().map(|g| (g.seq, g.frame.clone()))).collect();
    let (serve, _relay, _dir) = left_at_the_idle_timeout(looped, &[]).await;
    assert_eq!(serve.metric("contrail_relay_last_seq"), Some(8.0));
    drop(serve);
    // Our position and a frame far below it, in turn (each far-below frame a new run of one:
    // only a run growing above the connection's highest counts).
    let base = generate(1, 2, 10, 54);
    let (ours, low) = (renumber(&base[0], 20_000), renumber(&base[1], 1));
    let looped = (0..5_000).flat_map(|_| [(ours.seq, ours.frame.clone()), (low.seq, low.frame.clone())]).collect();
    let (serve, _relay, _dir) = left_at_the_idle_timeout(looped, &["--relay-reset-threshold", "10000"]).await;
    assert_eq!(serve.metric("contrail_relay_last_seq"), Some(20_000.0));
}

/// A frame whose seq jumps far ahead is held until the next one says whether it was real; a
/// bogus one is not the connection's highest seq, so the real frames after it still keep the
/// connection (they used to look like no progress, and the idle timeout dropped it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bogus_far_jumps_do_not_make_a_healthy_relay_look_idle() {
    let relay = FakeRelay::start().await;
    let gen = generate(11, 16, 10, 55);
    for (i, g) in gen.iter().enumerate() {
        relay.push(g.seq, g.frame.clone());
        if i == 0 {
            let bogus = renumber(&gen[0], 2_000_000_000 + g.seq);
            relay.push(bogus.seq, bogus.frame);
        }
    }
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(150)), ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", "1s"]);
    serve.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"idle_timeout\"}"), Some(0.0), "{}", serve.logs());
    assert_eq!(relay.connections(), 1);
}

/// One frame whose seq is bogus but not far ahead (under the reset threshold): taken at once,
/// it made the real frames up to it duplicates of our position, skipped for good. Held until
/// the next frame says whether it was real, it is dropped, and nothing is lost, across a
/// restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_seq_a_little_ahead_loses_nothing() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 300, 10, 56);
    for g in &gen {
        relay.push(g.seq, g.frame.clone());
        if g.seq == 100 {
            let bogus = renumber(&gen[0], 500_000);
            relay.push(bogus.seq, bogus.frame);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq_exactly(300, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_drops_total{reason=\"bad_seq\"}"), Some(1.0));
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
    // Restarted, it resumes from 300: the relay's next frames are taken.
    let more = generate(301, 20, 10, 57);
    relay.push_all(&more);
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq_exactly(320, Duration::from_secs(30));
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&[gen, more].concat()));
}

/// A real jump ahead on a quiet source (a PDS read directly): nothing follows the held frame,
/// so the idle timeout ends the connection, and the next one, asking for our cursor, gets it
/// first above our position: nothing lies between. Nothing follows it there either, so it is
/// taken at that connection's idle timeout. It used to be held again on every connection until
/// the source sent something else, maybe hours later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jump_on_a_quiet_source_is_taken_after_a_reconnect() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 100, 10, 58);
    relay.push_all(&gen);
    let jumped = renumber(&generate(101, 1, 10, 59)[0], 5_000);
    relay.push(jumped.seq, jumped.frame.clone());
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", "1s"]);
    serve.wait_for_seq_exactly(5_000, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_drops_total{reason=\"bad_seq\"}").unwrap_or(0.0), 0.0);
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&[gen, vec![jumped]].concat()));
}

/// The quiet that confirms a jump sent first again counts from it: a relay that repeats our
/// cursor's frame for most of the idle timeout, then sends the bogus seq it keeps in front of
/// the real frames and drops the connection, has not confirmed it (the real frames come next
/// time, and refute it). Counted from the connection's start, it was taken and they were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_sent_first_again_just_before_a_connection_drops_is_not_taken() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 150, 10, 64);
    relay.push_all(&gen[..100]);
    let bogus = renumber(&generate(0, 1, 1, 65)[0], 50_000);
    relay.push(bogus.seq, bogus.frame);
    relay.push_all(&gen[100..]);
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(50)), ..Faults::default() });
    // First: up to the bogus frame. Then: our cursor's frame 91 times (4.5 s: past half the
    // idle timeout, with 1.5 s to spare either way), the bogus one, and the connection drops.
    let repeating = ConnFault { repeat_first: 90, drop_after: Some(92), ..ConnFault::default() };
    relay.plan(vec![ConnFault::drop_after(101), repeating]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", "6s"]);
    serve.wait_for_seq_exactly(150, Duration::from_secs(40));
    assert_eq!(relay.cursors()[..3], [None, Some(100), Some(100)]);
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
}

/// The same quiet source behind a proxy that closes idle connections a little before the
/// reader's own idle timeout: a connection that ends having moved nothing on for half that
/// timeout takes the jump sent first again, as the timeout would. Otherwise it waited for the
/// source's next frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jump_on_a_quiet_source_behind_a_proxy_that_closes_idle_connections_is_taken() {
    let relay = FakeRelay::start().await;
    relay.set_faults(Faults { close_when_quiet: Some(Duration::from_secs(3)), ..Faults::default() });
    let gen = generate(1, 100, 10, 62);
    relay.push_all(&gen);
    let jumped = renumber(&generate(101, 1, 10, 63)[0], 5_000);
    relay.push(jumped.seq, jumped.frame.clone());
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", "4s"]);
    serve.wait_for_seq_exactly(5_000, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"idle_timeout\"}").unwrap_or(0.0), 0.0);
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&[gen, vec![jumped]].concat()));
}

/// A relay that replays from its history in the order frames came (a fan-out daemon's ring)
/// and keeps a bogus seq, far ahead, in front of the real frames after our position: the
/// connection ends right after it, and the next one, asking for our cursor, sends it first
/// again. Taken then, it made every real frame after it a duplicate of our position, skipped
/// and lost; held again, the real frames that follow refute it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_seq_a_replaying_relay_sends_first_again_loses_nothing() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 150, 10, 60);
    relay.push_all(&gen[..100]);
    let bogus = renumber(&generate(0, 1, 1, 61)[0], 50_000);
    relay.push(bogus.seq, bogus.frame);
    relay.push_all(&gen[100..]);
    // The first connection ends right after the bogus frame (100 frames, then it).
    relay.plan(vec![ConnFault::drop_after(101)]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--relay-idle-timeout", "5s"]);
    serve.wait_for_seq_exactly(150, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_drops_total{reason=\"bad_seq\"}"), Some(1.0), "{}", serve.logs());
    assert_eq!(relay.cursors()[1], Some(100), "the second connection asked for our cursor");
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_accepts_and_never_answers_is_retried_and_ready_says_why() {
    // A load balancer that takes the TCP connection and then says nothing at all.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = held.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            h2.lock().unwrap().push(conn); // keep it open, never read or write
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &format!("ws://{addr}"), &["--connect-timeout", "300ms"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while held.lock().unwrap().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "the reader hung on a silent listener; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(serve.metric("contrail_relay_errors_total{kind=\"connect\"}").unwrap() >= 2.0);
    let (status, body) = common::process::http_get(serve.public, "/ready").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("websocket handshake did not finish within 300ms"), "{body}");
}

/// `--ready-stale-after`: `/ready` says 503 once the relay, still connected, has moved nothing
/// on for that long (so a load balancer sends new clients to a region with live events), and
/// 200 again once frames flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_503_while_the_relay_moves_nothing_on_past_ready_stale_after() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 20, 5, 46));
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--ready-stale-after", "3s"]);
    serve.wait_for_seq(20, Duration::from_secs(30));
    let ready_until = |want: u16| ready_until(&serve, want);
    let body = ready_until(503);
    assert!(body.contains("nothing new from the relay for") && body.contains("(--ready-stale-after 3s)"), "{body}");
    assert_eq!(relay.connections(), 1, "the relay was not left (its idle timeout is 60s)");
    let (_, status) = common::process::http_get(serve.public, "/status").unwrap();
    assert!(status.contains("\"ready\":false") && status.contains("nothing new from the relay"), "{status}");
    relay.push_all(&generate(21, 5, 5, 47));
    serve.wait_for_seq(25, Duration::from_secs(30));
    assert_eq!(ready_until(200), "ready\n");
}

/// `/ready`'s body once it says `want` (within 20 s).
fn ready_until(serve: &Serve, want: u16) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = common::process::http_get(serve.public, "/ready").unwrap();
        if status == want {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "/ready stayed {status} ({body}); logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stopped relay that sends our cursor's frame again on every connection (it replays
/// inclusively, as the public relays do) moves nothing on either: `/ready` says 503 past
/// `--ready-stale-after`, however often the idle timeout reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_503_for_a_stopped_relay_that_only_repeats_our_cursors_frame() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 20, 5, 48));
    let dir = tempfile::tempdir().unwrap();
    let reconnecting = ["--relay-idle-timeout", "1s", "--relay-backoff-min", "100ms", "--relay-backoff-max", "300ms"];
    let serve = Serve::start(dir.path(), &relay.url(), &[&["--ready-stale-after", "3s"][..], &reconnecting].concat());
    serve.wait_for_seq(20, Duration::from_secs(30));
    // Reconnected twice, frame 20 sent again each time (then /ready may have said 503 already).
    relay.wait_for_connections_above(2, Duration::from_secs(20));
    let body = ready_until(&serve, 503);
    assert!(body.contains("nothing new from the relay for"), "{body}");
    relay.push_all(&generate(21, 5, 5, 49));
    serve.wait_for_seq(25, Duration::from_secs(30));
    assert_eq!(ready_until(&serve, 200), "ready\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_url_spelled_differently_resumes_from_the_stored_cursor() {
    let relay = FakeRelay::start().await;
    let gen = generate(100, 50, 5, 44);
    relay.push_all(&gen);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(149, Duration::from_secs(30));
    drop(serve);
    // The same relay with a trailing slash, the full endpoint path, or another query (a rotated
    // access token): resume, not live.
    for url in [
        format!("{}/", relay.url()),
        format!("{}/xrpc/com.atproto.sync.subscribeRepos", relay.url()),
        format!("{}/?token=rotated", relay.url()),
    ] {
        let connections = relay.connections();
        let serve = Serve::start(dir.path(), &url, &[]);
        relay.wait_for_connections_above(connections, Duration::from_secs(30));
        drop(serve);
        assert_eq!(relay.cursors().last().unwrap(), &Some(149), "{url} started live");
    }
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_info_and_error_frames_is_logged_at_a_bounded_rate() {
    let relay = FakeRelay::start().await;
    for i in 0..2_000 {
        let frame = if i % 2 == 0 { frames::info_frame("OutdatedCursor") } else { frames::error_frame("Weird") };
        relay.push(i + 1, frame);
    }
    let gen = generate(3_000, 20, 5, 45);
    relay.push_all(&gen);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(3_019, Duration::from_secs(30));
    let logs = serve.logs();
    let lines = logs.lines().filter(|l| l.contains("relay info") || l.contains("error frame")).count();
    assert!(lines <= 4, "{lines} log lines for 2,000 info and error frames");
    assert_eq!(serve.metric("contrail_relay_frames_total{type=\"info\"}"), Some(1000.0));
}

/// A tmpfs of a given size mounted for the test, unmounted when dropped. `None` (after saying
/// why) where the test cannot mount (not root, no tmpfs).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        SmallDisk::mount_with(&format!("size={size}"))
    }

    /// A tmpfs mounted with these options (`size=…,nr_inodes=…`).
    fn mount_with(options: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIP: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }

    fn remount(&self, options: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The log fills its disk: ingest stops loudly — a log line, `contrail_store_write_failed` 1,
/// `/ready` 503 with the reason — while what is stored is still served; once the disk has room
/// again the process exits by itself (non-zero, for its supervisor), and the restart resumes
/// exactly: nothing acknowledged lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_ingest_loudly_and_a_restart_resumes_exactly() {
    let Some(disk) = SmallDisk::mount("12m") else { return };
    let relay = FakeRelay::start().await;
    let gen = generate(1, 40_000, 500, 71);
    relay.push_all(&gen);
    let last_seq = gen.last().unwrap().seq;
    let mut serve = Serve::start(disk.dir.path(), &relay.url(), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while serve.metric("contrail_store_write_failed") != Some(1.0) {
        assert!(serve.child.try_wait().unwrap().is_none(), "exited with a full disk; logs:\n{}", serve.logs());
        assert!(std::time::Instant::now() < deadline, "ingest went on with a full disk; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = serve.logs();
    assert!(logs.contains("No space left") || logs.contains("IO error"), "no log line says why:\n{logs}");
    let (status, body) = common::process::http_get(serve.public, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the log cannot be written") && body.contains("No space left"), "{body}");
    // Ingest stopped: the relay connection is not shown as open.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while serve.metric("contrail_relay_connected") != Some(0.0) {
        assert!(std::time::Instant::now() < deadline, "contrail_relay_connected stays 1 with ingest stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
    // What is stored is still served: a replay from the start.
    let expected = expected_keys(&gen);
    let mut ws = common::client::connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let got = common::client::collect(&mut ws, 500, Duration::from_secs(10)).await;
    let keys: Vec<String> = got.iter().map(event_key).collect();
    assert_eq!(keys, expected[..500], "the replay of what is stored");
    // Room again: the process exits by itself, non-zero, for its supervisor to restart it.
    disk.resize("512m");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running with room again; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a failed log write must not end in exit 0");
    drop(serve);
    // What it acknowledged is intact: a prefix of the stream, exactly once, in order.
    let before = inspect_log(disk.dir.path());
    let stats = inspect_stats(disk.dir.path());
    let stored_seq = stats["relay_seq"].as_i64().unwrap_or(0);
    assert!(stored_seq > 0 && stored_seq < last_seq, "stored seq {stored_seq}");
    let upto: Vec<GenFrame> = gen.iter().filter(|g| g.seq <= stored_seq).cloned().collect();
    assert_log_exact(&before, &expected_keys(&upto));
    // The restart resumes from the stored cursor and finishes the stream.
    let serve = Serve::start(disk.dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(last_seq, Duration::from_secs(120));
    drop(serve);
    assert_log_exact(&inspect_log(disk.dir.path()), &expected);
}

/// A disk out of files (inodes) with bytes to spare: a log write fails as on a full disk, and
/// the process waits for files to be free before it exits for its restart, as it waits for
/// bytes (it once looked at bytes only, and exited at once, to fail again on restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_out_of_files_stops_ingest_until_files_are_free() {
    let Some(disk) = SmallDisk::mount_with("size=512m,nr_inodes=48") else { return };
    let relay = FakeRelay::start().await;
    let gen = generate(1, 40_000, 500, 76);
    relay.push_all(&gen);
    let last_seq = gen.last().unwrap().seq;
    // Small memtables: a file per 64 KiB written.
    let flags = ["--memtable-bytes", "64KiB"];
    let mut serve = Serve::start(disk.dir.path(), &relay.url(), &flags);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while serve.metric("contrail_store_write_failed") != Some(1.0) {
        assert!(serve.child.try_wait().unwrap().is_none(), "exited; logs:\n{}", serve.logs());
        assert!(std::time::Instant::now() < deadline, "ingest went on with no files free; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(serve.child.try_wait().unwrap().is_none(), "exited with no files free; logs:\n{}", serve.logs());
    disk.remount("nr_inodes=100000");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running with files free; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    drop(serve);
    let serve = Serve::start(disk.dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last_seq, Duration::from_secs(120));
    drop(serve);
    assert_log_exact(&inspect_log(disk.dir.path()), &expected_keys(&gen));
}

/// A crash on a full disk, then a restart with the disk still full: RocksDB cannot open the log
/// for writing (its recovery writes a file first). The restart serves what is stored — read
/// only, `/ready` 503 with the reason — instead of exiting and being restarted every few
/// seconds with nothing served; once there is room it exits by itself, and the next start
/// resumes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_still_full_disk_serves_what_is_stored_until_there_is_room() {
    let Some(disk) = SmallDisk::mount("12m") else { return };
    let relay = FakeRelay::start().await;
    let gen = generate(1, 40_000, 500, 75);
    relay.push_all(&gen);
    let last_seq = gen.last().unwrap().seq;
    let mut serve = Serve::start(disk.dir.path(), &relay.url(), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while serve.metric("contrail_store_write_failed") != Some(1.0) {
        assert!(std::time::Instant::now() < deadline, "ingest went on with a full disk; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    serve.kill9();
    drop(serve);
    let stats = inspect_stats(disk.dir.path());
    let stored = stats["events"].as_u64().unwrap() as usize;
    let stored_seq = stats["relay_seq"].as_i64().unwrap_or(0);
    assert!(stored > 0 && stored_seq > 0 && stored_seq < last_seq, "{stats}");

    let mut serve = Serve::start(disk.dir.path(), &relay.url(), &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while serve.metric("contrail_store_write_failed") != Some(1.0) {
        assert!(serve.child.try_wait().unwrap().is_none(), "exited on a full disk; logs:\n{}", serve.logs());
        assert!(std::time::Instant::now() < deadline, "no store failure shown; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The case under test: the disk was too full for a writable open.
    assert!(serve.logs().contains("opening the log for reading only"), "{}", serve.logs());
    let (status, body) = common::process::http_get(serve.public, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the log cannot be written") && body.contains("No space left"), "{body}");
    // Everything stored is served, the events only in the write-ahead log too.
    let upto: Vec<GenFrame> = gen.iter().filter(|g| g.seq <= stored_seq).cloned().collect();
    let expected_stored = expected_keys(&upto);
    assert_eq!(expected_stored.len(), stored);
    let mut ws = common::client::connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let got = common::client::collect(&mut ws, stored + 1, Duration::from_secs(3)).await;
    let keys: Vec<String> = got.iter().map(event_key).collect();
    assert_eq!(keys, expected_stored, "the replay of what is stored");
    // Room again: the process exits by itself, non-zero, for its supervisor to restart it.
    disk.resize("512m");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = serve.child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "still running with room again; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a log that cannot be written must not end in exit 0");
    drop(serve);
    // Nothing was written meanwhile, and the next start resumes exactly.
    assert_log_exact(&inspect_log(disk.dir.path()), &expected_stored);
    let serve = Serve::start(disk.dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(last_seq, Duration::from_secs(120));
    drop(serve);
    assert_log_exact(&inspect_log(disk.dir.path()), &expected_keys(&gen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_dir_is_refused_at_start_with_the_reason() {
    let Some(disk) = SmallDisk::mount("64m") else { return };
    let relay = FakeRelay::start().await;
    let gen = generate(1, 200, 20, 72);
    relay.push_all(&gen);
    let serve = Serve::start(disk.dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(200, Duration::from_secs(30));
    drop(serve);
    let status = std::process::Command::new("mount").args(["-o", "remount,ro"]).arg(disk.dir.path()).status().unwrap();
    assert!(status.success());
    let out = std::process::Command::new(common::process::bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--relay-url", &relay.url()])
        .arg("--data-dir")
        .arg(disk.dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started on a read-only data dir");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("opening the log") && err.to_lowercase().contains("read-only"), "{err}");
    // Nothing was lost: the log still reads back whole.
    assert_log_exact(&inspect_log(disk.dir.path()), &expected_keys(&gen));
}

/// kill -9 while retention trims under ingest: after every restart the log is a contiguous
/// suffix of the stream — old events gone from the front only, nothing missing inside what is
/// kept, nothing twice — and the relay cursor resumes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_retention_trims_keeps_a_contiguous_suffix() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 12_000, 200, 73);
    relay.push_all(&gen);
    // About 2,000 frames/s for ~6 s, with a 1 s retention trimmed every 50 ms.
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), burst: 2, ..Faults::default() });
    let flags = ["--retention", "1s", "--trim-interval", "50ms"];
    let last_seq = gen.last().unwrap().seq;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = frames::Lcg::new(74);
    let mut trimmed_kills = 0;
    for _ in 0..12 {
        let mut serve = Serve::start(dir.path(), &relay.url(), &flags);
        // Once retention has trimmed (the log open: a loaded machine opens it slowly), then a
        // moment more.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while serve.metric("contrail_store_trims_total").unwrap_or(0.0) == 0.0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        let trims = serve.metric("contrail_store_trims_total").unwrap_or(0.0);
        let seq = serve.metric("contrail_relay_last_seq").unwrap_or(0.0) as i64;
        serve.kill9();
        if trims > 0.0 && seq < last_seq {
            trimmed_kills += 1;
        }
        // After each kill: a contiguous suffix of what was ingested so far.
        assert_suffix(&inspect_log(dir.path()), &expected_keys(&gen));
    }
    assert!(trimmed_kills >= 3, "only {trimmed_kills} kills landed while retention was trimming");
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last_seq, Duration::from_secs(60));
    drop(serve);
    let lines = inspect_log(dir.path());
    assert_suffix(&lines, &expected_keys(&gen));
    assert!(lines.len() < expected_keys(&gen).len(), "retention removed nothing");
}

/// kill -9 aimed at RocksDB's background work: tiny memtables make the log flush every hundred
/// events or so, and the server is killed right after `/metrics` shows a flush or a compaction
/// running. After every kill the log is an exact prefix of the stream holding at least every
/// event stored before the kill (none rolled back); in the end it is the whole stream, nothing
/// lost or twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_rocksdb_flushes_and_compactions_loses_and_duplicates_nothing() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 8_000, 200, 75);
    relay.push_all(&gen);
    // About 1,000 frames/s: ~8 s of ingest, a flush every ~0.1 s.
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), burst: 1, ..Faults::default() });
    let flags = ["--memtable-bytes", "64KiB"];
    let last_seq = gen.last().unwrap().seq;
    let expected = expected_keys(&gen);
    let dir = tempfile::tempdir().unwrap();
    let (mut during_flush, mut during_compaction) = (0, 0);
    for _ in 0..12 {
        let mut serve = Serve::start(dir.path(), &relay.url(), &flags);
        // Three seconds of ingest to catch background work in (from the relay connected: a
        // loaded machine opens the log slowly).
        let began = std::time::Instant::now();
        let mut deadline = None;
        let (mut seq, mut stored) = (0, 0);
        while deadline.is_none_or(|d| std::time::Instant::now() < d) && began.elapsed() < Duration::from_secs(20) {
            let body = common::process::http_get(serve.metrics, "/metrics").map(|r| r.1).unwrap_or_default();
            let metric = |name| common::process::metric_value(&body, name).unwrap_or(0.0);
            if deadline.is_none() && metric("contrail_relay_connected") == 1.0 {
                deadline = Some(std::time::Instant::now() + Duration::from_secs(3));
            }
            seq = metric("contrail_relay_last_seq") as i64;
            stored = metric("contrail_store_newest_time_us") as u64;
            let (flushes, compactions) =
                (metric("contrail_store_flushes_running"), metric("contrail_store_compactions_running"));
            if flushes + compactions > 0.0 {
                serve.kill9();
                if compactions > 0.0 {
                    during_compaction += 1;
                } else {
                    during_flush += 1;
                }
                break;
            }
        }
        serve.kill9();
        let lines = inspect_log(dir.path());
        assert_suffix(&lines, &expected);
        if let Some(first) = lines.first() {
            assert_eq!(&event_key(&serde_json::from_str(first).unwrap()), &expected[0], "the log lost its front");
        }
        let newest = lines
            .last()
            .map_or(0, |l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap());
        assert!(newest >= stored, "events stored before the kill are gone: newest {newest}, had {stored}");
        if seq >= last_seq || during_flush + during_compaction >= 6 {
            break;
        }
    }
    eprintln!("killed right after a flush was seen running: {during_flush}; a compaction: {during_compaction}");
    assert!(
        during_flush + during_compaction >= 3,
        "only {} kills aimed at background work",
        during_flush + during_compaction
    );
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last_seq, Duration::from_secs(60));
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected);
}

/// The log is `expected[k..m]` for some k ≤ m (a prefix of the stream with its front trimmed),
/// `time_us` strictly increasing.
fn assert_suffix(lines: &[String], expected: &[String]) {
    let keys: Vec<String> = lines.iter().map(|l| event_key(&serde_json::from_str(l).unwrap())).collect();
    let times: Vec<u64> = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "time_us not strictly increasing");
    let Some(first) = keys.first() else { return };
    let k = expected.iter().position(|e| e == first).unwrap_or_else(|| panic!("{first} is not an expected event"));
    assert!(expected.len() - k >= keys.len(), "more events than the stream has after {first}");
    if let Some(i) = keys.iter().zip(&expected[k..]).position(|(a, b)| a != b) {
        panic!(
            "the log is not contiguous: {} where {} was expected (position {i} after {first})",
            keys[i],
            expected[k + i]
        );
    }
}

/// A relay that sends one message in fragments without end: the reader cuts it off at the
/// transport's limit (32 MiB; fastwebsockets' collector only limits each fragment), reconnects,
/// and ingests what the relay sends next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_message_in_endless_fragments_is_cut_off_at_the_limit() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 50, 5, 45);
    relay.push_all(&gen);
    relay.plan(vec![ConnFault { endless_fragments: true, ..ConnFault::default() }]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &[]);
    serve.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(60));
    // The limit, plus what the two loopback socket buffers held when the reader hung up.
    let taken = relay.fragment_bytes();
    let most = (33 << 20) + common::loopback_buffers();
    assert!((32 << 20..=most).contains(&taken), "the reader took {taken} bytes of one message (at most {most})");
    assert!(serve.metric("contrail_relay_errors_total{kind=\"read\"}").unwrap() >= 1.0);
    assert!(serve.logs().contains("a fragmented message larger than"), "{}", serve.logs());
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
}

/// A relay whose next frame is larger than the websocket layer reads (33 MiB): the connection
/// ends before its seq is known, and asking for the same cursor again gets the same frame. After
/// a few tries the reader asks past it: ingest goes on, the skip counted as a gap and a drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_frame_too_large_to_read_is_skipped_after_a_few_tries() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 20, 5, 46);
    for g in &gen {
        if g.seq == 11 {
            relay.push(11, vec![0xa5; 33 << 20]);
        } else {
            relay.push(g.seq, g.frame.clone());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let args = ["--relay-backoff-min", "100ms", "--relay-backoff-max", "200ms"];
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    serve.wait_for_seq(20, Duration::from_secs(60));
    assert!(serve.metric("contrail_relay_seq_gaps_total").unwrap() >= 1.0);
    assert_eq!(serve.metric("contrail_drops_total{reason=\"frame_too_large\"}"), Some(1.0), "once for the one frame");
    assert!(serve.logs().contains("skipping past it"), "{}", serve.logs());
    drop(serve);
    let readable: Vec<GenFrame> = gen.iter().filter(|g| g.seq != 11).cloned().collect();
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&readable));
}

/// A relay connection that dies in the middle of a frame (TCP cut after an arbitrary number of
/// bytes), again and again: the reader reconnects from its cursor each time, and the log ends
/// exactly whole — nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_mid_frame_loses_and_duplicates_nothing() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 3_000, 40, 11);
    relay.push_all(&gen);
    let proxy = common::proxy::Proxy::start(relay.addr).await;
    // Each connection forwards a different, odd number of bytes: cuts land inside frames.
    let budgets = [70_001u64, 123_457, 99_991, 211_111, 50_021, 177_777];
    proxy.cut_after(budgets[0]);
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &format!("ws://{}", proxy.addr), &[]);
    for &budget in &budgets[1..] {
        let before = relay.connections();
        relay.wait_for_connections_above(before, Duration::from_secs(30));
        proxy.cut_after(budget);
    }
    let before = relay.connections();
    relay.wait_for_connections_above(before, Duration::from_secs(30));
    proxy.cut_after(0);
    serve.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(60));
    // Every cut came before the end, and each reconnect resumed further on.
    let cursors: Vec<i64> = relay.cursors().into_iter().flatten().collect();
    assert!(cursors.len() >= budgets.len(), "cursors {cursors:?}");
    assert!(cursors.windows(2).all(|w| w[0] < w[1]), "no progress between cuts: {cursors:?}");
    assert!(*cursors.last().unwrap() < gen.last().unwrap().seq);
    drop(serve);
    assert_log_exact(&inspect_log(dir.path()), &expected_keys(&gen));
}

/// A relay that sheds load answers the upgrade with 429 (or 503) and `Retry-After`: the reader
/// is not back sooner than asked (here 2 s, with a backoff that alone would wait 50 ms), and its
/// log says what the relay said, not only the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refusing_with_retry_after_is_not_asked_again_sooner() {
    use common::relay::Refusal;
    let relay = FakeRelay::start().await;
    let gen = generate(1, 20, 5, 47);
    relay.push_all(&gen);
    relay.refuse_next(Refusal { status: 429, retry_after_secs: Some(2), body: "rate limited:\n slow down".into() });
    let dir = tempfile::tempdir().unwrap();
    let args = ["--relay-backoff-min", "50ms", "--relay-backoff-max", "10s"];
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    serve.wait_for_seq(20, Duration::from_secs(30));
    let attempts = relay.attempts();
    assert!(attempts.len() >= 2, "{attempts:?}");
    let waited = attempts[1] - attempts[0];
    assert!(waited >= Duration::from_millis(1_900), "asked again after {waited:?}");
    assert!(serve.logs().contains("HTTP 429: rate limited: slow down"), "{}", serve.logs());
    assert_eq!(serve.metric("contrail_relay_errors_total{kind=\"connect\"}"), Some(1.0));
    // A longer ask than --relay-backoff-max is cut to it: a relay asking for an hour does not
    // stop the reader for one.
    relay.refuse_next(Refusal { status: 503, retry_after_secs: Some(3_600), body: String::new() });
    relay.refuse_next(Refusal { status: 503, retry_after_secs: Some(3_600), body: String::new() });
    drop(serve);
    let before = relay.connections();
    let args = ["--relay-backoff-min", "50ms", "--relay-backoff-max", "1s"];
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    relay.wait_for_connections_above(before, Duration::from_secs(10));
    let attempts = relay.attempts();
    let last_three = &attempts[attempts.len() - 3..];
    for pair in last_three.windows(2) {
        let waited = pair[1] - pair[0];
        assert!(waited < Duration::from_secs(5), "waited {waited:?} for a refusal asking an hour");
        assert!(waited >= Duration::from_millis(900), "asked again after {waited:?}");
    }
    drop(serve);
}
