//! Replicas keep the primary's `time_us`: logs identical byte for byte, clients fail over
//! with the same cursor, replicas survive a primary restart and switch upstreams.

mod common;

use common::client::{collect, connect, next, Msg};
use common::frames::generate;
use common::process::{http_get, inspect_log, Serve};
use common::relay::{ConnFault, FakeRelay, Faults, Refusal};
use common::{like_line, now_us};
use std::time::{Duration, Instant};

fn newest(s: &Serve) -> u64 {
    s.metric("contrail_store_newest_time_us").unwrap_or(0.0) as u64
}

/// Waits until `replica` has the newest event `primary` has.
fn wait_caught_up(primary: &Serve, replica: &Serve, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let p = newest(primary);
        if p > 0 && newest(replica) == p {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replica at {} never reached {p}; logs:\n{}",
            newest(replica),
            replica.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to 30 s until `metric` on `serve` reaches `at_least`; else fails with `what`.
fn wait_metric(serve: &Serve, metric: &str, at_least: f64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while serve.metric(metric).unwrap_or(0.0) < at_least {
        assert!(Instant::now() < deadline, "{what}; logs:\n{}", serve.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn replica(dir: &std::path::Path, upstreams: &[&Serve]) -> Serve {
    let list: Vec<String> = upstreams.iter().map(|u| format!("ws://{}", u.public)).collect();
    replica_of(dir, &list.join(","), &[])
}

/// A replica of `urls` (comma-separated), with `extra` flags.
fn replica_of(dir: &std::path::Path, urls: &str, extra: &[&str]) -> Serve {
    let mut args = vec!["--upstream-url", urls, "--upstream-hole-patience", "12s"];
    if !extra.contains(&"--upstream-stale-timeout") {
        args.extend_from_slice(&["--upstream-stale-timeout", "3s"]);
    }
    args.extend_from_slice(&["--max-events-per-second-per-ip", "0"]);
    args.extend_from_slice(extra);
    Serve::start(dir, "ws://127.0.0.1:9", &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_and_chains_mirror_the_primary_exactly() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 1_500, 40, 21);
    relay.push_all(&gen[..700]);
    let (pd, ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(700, Duration::from_secs(30));
    let a = replica(ad.path(), &[&primary]);
    let b = replica(bd.path(), &[&a]); // a replica of a replica
                                       // More events while the replicas follow live.
    relay.push_all(&gen[700..]);
    primary.wait_for_seq(1_500, Duration::from_secs(30));
    wait_caught_up(&primary, &a, Duration::from_secs(30));
    wait_caught_up(&primary, &b, Duration::from_secs(30));
    // The primary gets nothing more: a caught-up replica's lag stays near 0 (its upstream's
    // cursor messages say there is nothing newer), though its last event grows old.
    // (Polled: a cursor message a loaded machine delays lets the lag grow for a moment; a
    // replica measuring the age of its last event would read 3 s and more throughout.)
    std::thread::sleep(Duration::from_millis(3_000));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lag = a.metric("contrail_replication_lag_seconds").unwrap();
        if lag < 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "a caught-up replica of a quiet primary shows a lag of {lag} s");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Replica links are compressed by default (A on the primary, B on A).
    assert_eq!(primary.metric("contrail_hub_subscribers{compression=\"zstd\",wire=\"v1\"}"), Some(1.0));
    assert_eq!(a.metric("contrail_hub_subscribers{compression=\"zstd\",wire=\"v1\"}"), Some(1.0));
    let (_, status) = http_get(b.public, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["role"], "replica");
    drop((a, b));
    let p = inspect_log(pd.path());
    assert!(p.len() > 1_500);
    assert!(inspect_log(ad.path()) == p, "replica A's log differs from the primary's");
    assert!(inspect_log(bd.path()) == p, "replica B's log differs from the primary's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_fails_over_to_another_replica_with_its_cursor() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 4_000, 40, 22);
    relay.push_all(&gen);
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), burst: 2, ..Faults::default() });
    let (pd, ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let mut a = replica(ad.path(), &[&primary]);
    let b = replica(bd.path(), &[&primary]);
    let mut ws = connect(a.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let mut got: Vec<serde_json::Value> = Vec::new();
    while got.len() < 1_000 {
        match next(&mut ws, Duration::from_secs(10)).await {
            Some(Msg::Text(t)) => got.push(serde_json::from_str(&t).unwrap()),
            other => panic!("from A: {other:?}"),
        }
    }
    a.kill9(); // replica A dies mid-stream
    let cursor = got.last().unwrap()["time_us"].as_u64().unwrap();
    let mut ws = connect(b.public, &format!("/subscribe?cursor={cursor}"), &[]).await.unwrap();
    primary.wait_for_seq(4_000, Duration::from_secs(60));
    let final_time = newest(&primary);
    loop {
        match next(&mut ws, Duration::from_secs(10)).await {
            Some(Msg::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                let time = v["time_us"].as_u64().unwrap();
                // The cursor is inclusive: the event we already have comes first again.
                if time == cursor {
                    continue;
                }
                got.push(v);
                if time == final_time {
                    break;
                }
            }
            other => panic!("from B: {other:?} after {} events", got.len()),
        }
    }
    let log: Vec<serde_json::Value> = inspect_log(pd.path()).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), log.len(), "gap or duplicate across the failover");
    assert!(got == log, "the client's stream differs from the primary's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_a_primary_restart_and_switch_upstreams() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 3_000, 40, 23);
    relay.push_all(&gen[..1_000]);
    let (pd, ad, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(1_000, Duration::from_secs(30));
    let a = replica(ad.path(), &[&primary]);
    // C prefers the primary and falls back to A.
    let c = replica(cd.path(), &[&primary, &a]);
    wait_caught_up(&primary, &c, Duration::from_secs(30));
    let public = primary.public;
    primary.kill9();
    // C notices (connection gone) and switches to A.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.metric("contrail_upstream_switches_total").unwrap_or(0.0) < 1.0 {
        assert!(Instant::now() < deadline, "C never switched upstream");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The primary comes back on the same address with the same log, and ingests the rest.
    relay.push_all(&gen[1_000..]);
    let primary = Serve::start(
        pd.path(),
        &relay.url(),
        &["--max-events-per-second-per-ip", "0", "--listen", &public.to_string()],
    );
    primary.wait_for_seq(3_000, Duration::from_secs(60));
    wait_caught_up(&primary, &a, Duration::from_secs(60));
    wait_caught_up(&primary, &c, Duration::from_secs(60));
    // C goes back to the upstream it prefers (not a hop further away for good).
    let upstream = |r: &Serve| {
        let (_, status) = http_get(r.public, "/status").unwrap();
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["upstream"].as_str().unwrap().to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while upstream(&c) != format!("ws://{public}") {
        assert!(Instant::now() < deadline, "C stayed on {}: {}", upstream(&c), c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((a, c));
    let p = inspect_log(pd.path());
    assert!(inspect_log(ad.path()) == p, "replica A differs after the primary restart");
    assert!(inspect_log(cd.path()) == p, "replica C differs after switching upstreams");
}

/// Events a node has stored since it started, all kinds.
fn ingested(s: &Serve) -> f64 {
    ["commit", "identity", "account", "sync"]
        .map(|k| s.metric(&format!("contrail_events_ingested_total{{kind=\"{k}\"}}")).unwrap_or(0.0))
        .iter()
        .sum()
}

/// An empty replica copies what its own retention keeps (a retention before the upstream's
/// newest event, by the upstream's clock), not the upstream's whole window, which its trims
/// would delete at once. And an upstream that tells it the events before what it asked for are
/// gone (its retention is shorter) tells an empty log of no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_replica_copies_only_what_its_retention_keeps() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 300, 40, 33);
    relay.push_all(&gen[..100]);
    let (pd, ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(
        pd.path(),
        &relay.url(),
        &["--max-events-per-second-per-ip", "0", "--retention", "5s", "--trim-interval", "100ms"],
    );
    primary.wait_for_seq(100, Duration::from_secs(30));
    let (first_newest, first_count) = (newest(&primary), ingested(&primary));
    // (Each wait is a second or two longer or shorter than the retentions it is measured
    // against: a slow machine's delays do not turn one outcome into the other.)
    std::thread::sleep(Duration::from_millis(3_000));
    relay.push_all(&gen[100..200]);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let second_count = ingested(&primary) - first_count;
    assert!(
        primary.metric("contrail_store_oldest_time_us").unwrap() as u64 <= first_newest,
        "the primary still has the first batch"
    );
    // A keeps 2 s: the second batch, not the first, 3 s older.
    let a = replica_of(ad.path(), &format!("ws://{}", primary.public), &["--retention", "2s"]);
    wait_caught_up(&primary, &a, Duration::from_secs(30));
    assert_eq!(ingested(&a), second_count, "{}", a.logs());
    assert!(a.metric("contrail_store_oldest_time_us").unwrap() as u64 > first_newest);
    assert_eq!(a.metric("contrail_upstream_gaps_total"), Some(0.0));
    // The primary's retention deletes the first batch once the third is 5 s past it (and
    // keeps the second, 3 s before the third).
    std::thread::sleep(Duration::from_millis(3_000));
    relay.push_all(&gen[200..]);
    primary.wait_for_seq(300, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.metric("contrail_store_oldest_time_us").unwrap_or(0.0) as u64 <= first_newest {
        assert!(Instant::now() < deadline, "the primary never trimmed the first batch");
        std::thread::sleep(Duration::from_millis(50));
    }
    // B keeps a day: it asks for more than the primary has left, and is told those are gone.
    let b = replica(bd.path(), &[&primary]);
    wait_caught_up(&primary, &b, Duration::from_secs(30));
    assert_eq!(b.metric("contrail_upstream_gaps_total"), Some(0.0), "{}", b.logs());
    assert_eq!(b.metric("contrail_store_oldest_time_us"), primary.metric("contrail_store_oldest_time_us"));
}

/// A primary (in `dir`) keeping 2 s, fed `gen`'s first 100 events, then, 3 s later, the rest,
/// once it has trimmed the first batch; `meanwhile` runs once the first batch is in (a replica
/// copying it, say), and what it returns is handed back with the primary and the first batch's
/// newest event.
async fn primary_that_trimmed<R>(
    relay: &FakeRelay,
    gen: &[common::frames::GenFrame],
    dir: &std::path::Path,
    meanwhile: impl AsyncFnOnce(&Serve) -> R,
) -> (Serve, u64, R) {
    relay.push_all(&gen[..100]);
    let primary = Serve::start(
        dir,
        &relay.url(),
        &["--max-events-per-second-per-ip", "0", "--retention", "2s", "--trim-interval", "200ms"],
    );
    primary.wait_for_seq(100, Duration::from_secs(30));
    let first_newest = newest(&primary);
    let made = meanwhile(&primary).await;
    std::thread::sleep(Duration::from_millis(3_000));
    relay.push_all(&gen[100..]);
    primary.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.metric("contrail_store_oldest_time_us").unwrap_or(0.0) as u64 <= first_newest {
        assert!(Instant::now() < deadline, "the primary never trimmed the first batch");
        std::thread::sleep(Duration::from_millis(50));
    }
    (primary, first_newest, made)
}

/// An empty replica copies its retention window from an upstream that still has its start:
/// the primary listed first keeps two seconds and tells it the rest is gone, a replica of it
/// listed second keeps everything. Before, it took the first listed one's two seconds (an
/// empty log counts no gap): the older events were left out for good, silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_replica_copies_from_the_upstream_that_keeps_the_most_history() {
    let relay = FakeRelay::start().await;
    let (pd, fd, nd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let copy_all = async |primary: &Serve| {
        let full = replica(fd.path(), &[primary]);
        wait_caught_up(primary, &full, Duration::from_secs(30));
        full
    };
    let (primary, _, full) = primary_that_trimmed(&relay, &generate(1, 200, 40, 35), pd.path(), copy_all).await;
    wait_caught_up(&primary, &full, Duration::from_secs(30));
    let upstreams = format!("ws://{},ws://{}", primary.public, full.public);
    let fresh = replica_of(nd.path(), &upstreams, &[]);
    wait_caught_up(&full, &fresh, Duration::from_secs(30));
    let oldest = |s: &Serve| s.metric("contrail_store_oldest_time_us");
    assert_eq!(oldest(&fresh), oldest(&full), "{}", fresh.logs());
    assert_eq!(fresh.metric("contrail_upstream_gaps_total"), Some(0.0));
    drop(fresh);
    assert!(inspect_log(nd.path()) == inspect_log(fd.path()), "the fresh replica's log is not the full one's");
    // With the other upstream down, the one that answers is copied at once: an empty log's
    // history is what the upstreams have now (not left, for the one down, as a hole would be).
    let od = tempfile::tempdir().unwrap();
    // (A long stale timeout: a session ended by a starved machine would count a switch.)
    let upstreams = format!("ws://{},ws://127.0.0.1:9", primary.public);
    let other = replica_of(od.path(), &upstreams, &["--upstream-stale-timeout", "30s"]);
    wait_caught_up(&primary, &other, Duration::from_secs(30));
    assert_eq!(oldest(&other), oldest(&primary));
    assert_eq!(other.metric("contrail_upstream_switches_total"), Some(0.0), "{}", other.logs());
}

/// An empty replica does not copy the longer window of an upstream behind the freshest by more
/// than the switch lag: the prober would leave it for the fresher one, which lacks what was
/// copied from it by then (a hole). Here a replica that keeps everything stopped ingesting
/// before the primary's second batch, and the primary (2 s) is copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_replica_does_not_copy_the_longer_window_of_an_upstream_left_behind() {
    let relay = FakeRelay::start().await;
    let (pd, md, nd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // M follows the primary through a proxy the test freezes once M has the first batch.
    let frozen_copy = async |primary: &Serve| {
        let proxy = common::proxy::Proxy::start(primary.public).await;
        let middle = replica_of(md.path(), &format!("ws://{}", proxy.addr), &["--connect-timeout", "1s"]);
        wait_caught_up(primary, &middle, Duration::from_secs(30));
        proxy.freeze(true);
        (proxy, middle)
    };
    let (primary, first_newest, (_proxy, middle)) =
        primary_that_trimmed(&relay, &generate(1, 200, 40, 39), pd.path(), frozen_copy).await;
    assert_eq!(newest(&middle), first_newest, "the middle replica was not frozen");
    let upstreams = format!("ws://{},ws://{}", primary.public, middle.public);
    let fresh = replica_of(nd.path(), &upstreams, &["--upstream-switch-lag", "1s"]);
    wait_caught_up(&primary, &fresh, Duration::from_secs(30));
    let oldest = |s: &Serve| s.metric("contrail_store_oldest_time_us");
    assert_eq!(oldest(&fresh), oldest(&primary), "{}", fresh.logs());
    assert_eq!(fresh.metric("contrail_upstream_switches_total"), Some(0.0), "{}", fresh.logs());
    assert_eq!(fresh.metric("contrail_upstream_gaps_total"), Some(0.0));
}

/// A preferred upstream that answers `/status` but refuses subscribers (here: its one slot
/// taken) is gone back to once, not every few seconds: each try cut the working stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preferred_upstream_that_refuses_subscribers_is_not_tried_again_and_again() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 500, 40, 29));
    let (pd, ad, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(500, Duration::from_secs(30));
    let a = replica(ad.path(), &[&primary]);
    let c = replica(cd.path(), &[&primary, &a]);
    wait_caught_up(&primary, &c, Duration::from_secs(30));
    let public = primary.public;
    primary.kill9();
    // Back with one subscriber slot, which A takes.
    let listen = public.to_string();
    let flags = ["--max-events-per-second-per-ip", "0", "--max-subscribers", "1", "--max-connections-per-ip", "1"];
    let flags = [&flags[..], &["--listen", &listen]].concat();
    let primary = Serve::start(pd.path(), &relay.url(), &flags);
    wait_metric(&primary, "contrail_hub_subscribers{compression=\"zstd\",wire=\"v1\"}", 1.0, "A never came back");
    wait_caught_up(&primary, &c, Duration::from_secs(30));
    // C, on A and caught up, tries the primary once (refused), and not again for a while.
    // Counted in C's own log, one line per switch to it (as preferred, or in the list's turn;
    // it was on A when the primary came back): the primary's refusal counters also count the
    // plain HTTP requests it refuses while another from this address is open (A's dictionary
    // GET, C's `/status` probes: all three processes are 127.0.0.1 to it, allowed one at once).
    let primary_url = format!("\"upstream\":\"ws://{public}\"");
    let tries =
        || c.logs().lines().filter(|l| l.contains(r#""message":"switching"#) && l.contains(&primary_url)).count();
    let refused = || {
        ["too_many_subscribers", "too_many_from_ip", "too_many_open"]
            .map(|r| primary.metric(&format!("contrail_hub_rejected_requests_total{{reason=\"{r}\"}}")).unwrap_or(0.0))
            .iter()
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while tries() < 1 || refused() < 1.0 {
        assert!(Instant::now() < deadline, "C never tried the primary again: {}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(tries(), 1, "{}", c.logs());
    wait_caught_up(&a, &c, Duration::from_secs(10));
    // A replica's upstream connections count where a primary's relay connections do (the
    // dashboard and the alerts read them alike): the primary's end (a read error), its refusal
    // (a failed connect), and the reconnects after them.
    assert!(c.metric("contrail_relay_reconnects_total").unwrap() >= 2.0);
    assert!(c.metric("contrail_relay_errors_total{kind=\"read\"}").unwrap() >= 1.0);
    assert!(c.metric("contrail_relay_errors_total{kind=\"connect\"}").unwrap() >= 1.0);
}

/// A primary with 500 of `n` frames, M (a replica of it through a proxy the test can freeze),
/// and R (a replica preferring M, knowing the primary), caught up, R following M.
struct FrozenMiddle {
    relay: FakeRelay,
    gen: Vec<common::frames::GenFrame>,
    primary: Serve,
    proxy: common::proxy::Proxy,
    middle: Serve,
    follower: Serve,
    dirs: [tempfile::TempDir; 3],
}

async fn frozen_middle(n: usize, seed: u64, primary_flags: &[&str]) -> FrozenMiddle {
    let relay = FakeRelay::start().await;
    let gen = generate(1, n, 40, seed);
    relay.push_all(&gen[..500]);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let flags = [&["--max-events-per-second-per-ip", "0"], primary_flags].concat();
    let primary = Serve::start(dirs[0].path(), &relay.url(), &flags);
    primary.wait_for_seq(500, Duration::from_secs(30));
    let proxy = common::proxy::Proxy::start(primary.public).await;
    let middle = replica_of(dirs[1].path(), &format!("ws://{}", proxy.addr), &["--connect-timeout", "1s"]);
    // (M first: it holds its link to the primary before R may try the primary.)
    wait_caught_up(&primary, &middle, Duration::from_secs(30));
    let list = format!("ws://{},ws://{}", middle.public, primary.public);
    let follower = replica_of(dirs[2].path(), &list, &["--upstream-switch-lag", "1s"]);
    wait_caught_up(&primary, &follower, Duration::from_secs(30));
    let upstream = || {
        let (_, status) = http_get(follower.public, "/status").unwrap();
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["upstream"].as_str().unwrap().to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while upstream() != format!("ws://{}", middle.public) {
        assert!(Instant::now() < deadline, "R stayed on {}: {}", upstream(), follower.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    FrozenMiddle { relay, gen, primary, proxy, middle, follower, dirs }
}

impl FrozenMiddle {
    /// M stops ingesting but keeps serving (and sending cursor messages, and its connection to
    /// the primary); the primary takes the rest of the frames, its newest event soon more than
    /// the follower's switch lag ahead of M's.
    fn freeze_the_middle(&self) {
        self.proxy.freeze(true);
        std::thread::sleep(Duration::from_millis(1_500));
        self.relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(2)), ..Faults::default() });
        self.relay.push_all(&self.gen[500..]);
        self.primary.wait_for_seq(self.gen.len() as i64, Duration::from_secs(30));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_leaves_a_frozen_middle_replica_for_a_fresher_upstream() {
    let m = frozen_middle(1_500, 25, &[]).await;
    assert_eq!(m.follower.metric("contrail_upstream_switches_total"), Some(0.0));
    m.freeze_the_middle();
    // R notices the primary is ahead of M and switches to it.
    wait_caught_up(&m.primary, &m.follower, Duration::from_secs(30));
    assert!(m.follower.metric("contrail_upstream_switches_total").unwrap() >= 1.0);
    assert!(newest(&m.middle) < newest(&m.primary), "the middle replica was not frozen");
    let FrozenMiddle { follower, middle, dirs, .. } = m;
    drop((follower, middle));
    assert!(
        inspect_log(dirs[2].path()) == inspect_log(dirs[0].path()),
        "the follower's log differs from the primary's"
    );
}

/// A fresher upstream that gives nothing when switched to (here a primary whose one subscriber
/// slot the frozen middle replica holds) is not switched to again for a while: before, the
/// follower left the middle replica for it at every probe once its pause ended, cutting its
/// stream and asking the full primary again, for as long as the middle stayed behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresher_upstream_that_refuses_subscribers_is_not_switched_to_again_and_again() {
    // M takes the primary's one subscriber slot, and keeps it once frozen.
    let m = frozen_middle(1_000, 41, &["--max-subscribers", "1"]).await;
    let (primary, follower) = (&m.primary, &m.follower);
    let primary_url = format!("\"upstream\":\"ws://{}\"", primary.public);
    // Counted from the freeze: R may have tried the primary at its start (refused, M holding
    // the slot) before it settled on M.
    let switches = || {
        let logs = follower.logs();
        logs.lines().filter(|l| l.contains(r#""message":"switching"#) && l.contains(&primary_url)).count()
    };
    let refusals = || -> f64 {
        ["too_many_subscribers", "too_many_from_ip", "too_many_open"]
            .map(|r| primary.metric(&format!("contrail_hub_rejected_requests_total{{reason=\"{r}\"}}")).unwrap_or(0.0))
            .iter()
            .sum()
    };
    let (switches_before, refusals_before) = (switches(), refusals());
    let tries = || switches() - switches_before;
    m.freeze_the_middle();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tries() < 1 {
        assert!(Instant::now() < deadline, "the follower never tried the primary: {}", follower.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Probes every second; the primary's refusal asks for 5 s: before, another try came here.
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(tries(), 1, "{}", follower.logs());
    // It was refused (by whichever limit the primary met first: all three processes are
    // 127.0.0.1 to it), and stayed on the frozen middle replica.
    assert!(refusals() > refusals_before, "the primary refused nothing; the follower's logs:\n{}", follower.logs());
    assert!(newest(follower) < newest(primary), "the follower went on from the primary: {}", follower.logs());
}

/// The prober reads the upstreams' `/status` at once: read one after another, an upstream read
/// after one that hangs (here until the 2 s timeout) looked ahead of ours by that long while
/// events flowed, and the follower switched to it for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_hangs_does_not_make_the_next_look_ahead() {
    let relay = FakeRelay::start().await;
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(5)), ..Faults::default() });
    relay.push_all(&generate(1, 4_000, 40, 37));
    let (pd, ad, fd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(100, Duration::from_secs(30));
    let a = replica(ad.path(), &[&primary]);
    // An upstream that accepts connections and never answers.
    let hangs = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hangs_url = format!("ws://{}", hangs.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = hangs.accept() {
            held.push(tcp);
        }
    });
    let list = format!("ws://{},{hangs_url},ws://{}", primary.public, a.public);
    let flags = ["--upstream-switch-lag", "1s", "--connect-timeout", "2s"];
    let follower = replica_of(fd.path(), &list, &flags);
    wait_metric(&follower, "contrail_events_ingested_total{kind=\"commit\"}", 1.0, "the follower took nothing");
    // Probes every second while events flow (for ~20 s in all): none switches.
    let before = follower.metric("contrail_events_ingested_total{kind=\"commit\"}").unwrap();
    std::thread::sleep(Duration::from_secs(6));
    assert!(follower.metric("contrail_events_ingested_total{kind=\"commit\"}").unwrap() > before, "events stopped");
    assert_eq!(follower.metric("contrail_upstream_switches_total"), Some(0.0), "{}", follower.logs());
}

/// A replica keeps the primary's verification marks: what a subscriber asking for them sees is
/// the same on both, and the stored JSON is still the primary's byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_the_primarys_verification_marks() {
    use common::signed::{record, with_seq, Answer, Op, Plc, SignedRepo, Signer, Tamper};
    let plc = Plc::start().await;
    let relay = FakeRelay::start().await;
    let mut alice = SignedRepo::new("did:plc:aliceaaaaaaaaaaaaaaaaaaa", Signer::k256(1));
    let mut carol = SignedRepo::new("did:plc:carolcccccccccccccccccccc", Signer::k256(3));
    plc.set(&alice.did, Answer::Doc(alice.did_doc()));
    let post = |n: &str| vec![Op::Create(format!("app.bsky.feed.post/{n}"), record(n))];
    let frames = [
        alice.commit(0, &post("a1"), Tamper::None),
        alice.commit(0, &post("ax"), Tamper::FlipSig),
        carol.commit(0, &post("c1"), Tamper::None),
        alice.commit(0, &post("a2"), Tamper::None),
        alice.commit(0, &post("a3"), Tamper::None),
    ];
    for (i, f) in frames.iter().enumerate() {
        relay.push(i as i64 + 1, with_seq(f, i as i64 + 1));
    }
    let (pd, rd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let flags = [
        "--verify",
        "full",
        "--on-verify-failure",
        "pass",
        "--plc-url",
        &plc.url(),
        "--max-events-per-second-per-ip",
        "0",
    ];
    let primary = Serve::start(pd.path(), &relay.url(), &flags);
    primary.wait_for_seq(5, Duration::from_secs(30));
    let r = replica(rd.path(), &[&primary]);
    wait_caught_up(&primary, &r, Duration::from_secs(30));
    let marks = |s: &Serve| {
        let addr = s.public;
        async move {
            let mut ws = connect(addr, "/subscribe?cursor=0&includeVerification=true", &[]).await.unwrap();
            let mut out = Vec::new();
            while out.len() < 5 {
                let Some(Msg::Text(t)) = next(&mut ws, Duration::from_secs(5)).await else { panic!("no event") };
                out.push(t);
            }
            out
        }
    };
    let on_primary = marks(&primary).await;
    assert_eq!(marks(&r).await, on_primary);
    let got: Vec<String> = on_primary
        .iter()
        .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap()["verification"].as_str().unwrap().to_string())
        .collect();
    // Alice's first commit, and the one after her failed one, anchor her chain (`signature`);
    // a3 continues it (`full`).
    assert_eq!(got, ["signature", "failed", "unresolved", "signature", "full"]);
    drop(r);
    assert!(inspect_log(rd.path()) == inspect_log(pd.path()), "the replica's stored JSON differs");
}

/// A replica resuming from an upstream whose retention trimmed past its newest event would get
/// a hole in its log. It leaves that upstream for one that still has the event; when none does
/// (the others trimmed too, or unreachable for a few rounds), it goes on and counts the possible
/// gap (`contrail_upstream_gaps_total`) instead of hiding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_resuming_past_an_upstreams_retention_prefers_a_complete_upstream_and_counts_a_gap() {
    let time_us = |line: &String| serde_json::from_str::<serde_json::Value>(line).unwrap()["time_us"].as_u64().unwrap();
    let relay = FakeRelay::start().await;
    let gen = generate(1, 600, 40, 25);
    relay.push_all(&gen[..300]);
    let (pd, fd, td, ud) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (vd, wd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The primary keeps two seconds of events; `full` (a replica of it) keeps everything.
    let primary = Serve::start(
        pd.path(),
        &relay.url(),
        &["--max-events-per-second-per-ip", "0", "--retention", "2s", "--trim-interval", "1s"],
    );
    primary.wait_for_seq(300, Duration::from_secs(30));
    let full = replica(fd.path(), &[&primary]);
    let (t, u) = (replica(td.path(), &[&primary]), replica(ud.path(), &[&primary]));
    let (v, w) = (replica(vd.path(), &[&primary]), replica(wd.path(), &[&primary]));
    for r in [&full, &t, &u, &v, &w] {
        wait_caught_up(&primary, r, Duration::from_secs(30));
    }
    drop((t, u, v, w));
    let last = time_us(inspect_log(td.path()).last().unwrap());
    // Events the stopped replicas miss, later events, and the primary's retention passes both
    // (a hole: were only the replicas' newest event trimmed, with nothing after it until the
    // oldest left, the primary would tell them so, and nothing would be missing).
    relay.push_all(&gen[300..350]);
    primary.wait_for_seq(350, Duration::from_secs(30));
    let missed = time_us(inspect_log(pd.path()).last().unwrap());
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    relay.push_all(&gen[350..]);
    primary.wait_for_seq(600, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary.metric("contrail_store_oldest_time_us").unwrap_or(0.0) as u64 <= missed {
        assert!(Instant::now() < deadline, "the primary never trimmed past {missed}");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_caught_up(&primary, &full, Duration::from_secs(30));
    // With the complete replica listed second, the trimmed primary is left for it: no gap, even
    // though it is down (restarting) when the replica resumes.
    let full_addr = full.public.to_string();
    drop(full);
    let both = format!("ws://{},ws://{full_addr}", primary.public);
    let t = replica_of(td.path(), &both, &[]);
    // It tries both (the trimmed primary, then the down replica) before the replica is back;
    // polled, not slept on: a loaded machine starts the process slowly.
    wait_metric(&t, "contrail_upstream_switches_total", 2.0, "it never tried both");
    let full = replica_of(fd.path(), &format!("ws://{}", primary.public), &["--listen", &full_addr]);
    wait_caught_up(&full, &t, Duration::from_secs(30));
    assert_eq!(t.metric("contrail_upstream_gaps_total"), Some(0.0));
    drop(t);
    assert!(inspect_log(td.path()) == inspect_log(fd.path()), "the replica's log has a hole");
    // With the trimmed primary and an upstream that never answers, it waits for the second
    // (four stale timeouts: 12 s here), then goes on from the primary's oldest event and says so.
    let upstreams = format!("ws://{},ws://127.0.0.1:9", primary.public);
    let u = replica_of(ud.path(), &upstreams, &[]);
    wait_caught_up(&primary, &u, Duration::from_secs(30));
    assert_eq!(u.metric("contrail_upstream_gaps_total"), Some(1.0), "logs:\n{}", u.logs());
    // The primary told the gap before its first event: a message the replica knows, not a
    // line it drops.
    let bad_lines = u.metric("contrail_drops_total{reason=\"bad_body\"}").unwrap_or(0.0);
    assert_eq!(bad_lines, 0.0, "logs:\n{}", u.logs());
    drop(u);
    // Its log: what it had, then the primary's whole log (which starts after the hole).
    let p_log = inspect_log(pd.path());
    assert!(time_us(&p_log[0]) > last);
    let then_the_primarys = |dir: &std::path::Path| {
        let log = inspect_log(dir);
        let after: Vec<&String> = log.iter().filter(|l| time_us(l) > last).collect();
        after.len() == p_log.len() && after.iter().zip(&p_log).all(|(a, b)| *a == b)
    };
    assert!(then_the_primarys(ud.path()), "not the primary's log");
    // An upstream that has the event but is frozen there (it follows nothing) holds up the
    // hole only as long as an unreachable one would: the replica does not wait on it forever.
    let frozen = replica_of(wd.path(), "ws://127.0.0.1:9", &[]);
    let both = format!("ws://{},ws://{}", primary.public, frozen.public);
    let v = replica_of(vd.path(), &both, &["--upstream-switch-lag", "1s"]);
    wait_caught_up(&primary, &v, Duration::from_secs(40));
    assert_eq!(v.metric("contrail_upstream_gaps_total"), Some(1.0), "logs:\n{}", v.logs());
    drop(v);
    assert!(then_the_primarys(vd.path()), "not the primary's log");
}

/// A replica catching up more slowly than its upstream's retention deletes: the upstream tells
/// it the events it deleted ahead of it, and the replica, whose only upstream lacks them, counts
/// the hole and goes on from the oldest event left — its log the upstream's first page, then
/// the upstream's log as it now is. Before, it took the gap message for a bad line and stored a
/// log with a hole nothing counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_overtaken_by_its_upstreams_retention_counts_the_hole() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 1_500, 20, 7));
    let (pd, rd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // 100 events/s for the replica: its first page (1,024 events) takes about ten seconds, the
    // trim comes some 1.5 s in (the margin is for a loaded machine's slow ingest).
    let flags = ["--max-events-per-second-per-ip", "100", "--retention", "1s", "--trim-interval", "100ms"];
    let primary = Serve::start(pd.path(), &relay.url(), &flags);
    primary.wait_for_seq(1_500, Duration::from_secs(60));
    let before = inspect_log(pd.path());
    let r = replica(rd.path(), &[&primary]);
    // Its first page taken (scanned before any trim), and the first batch a retention old.
    wait_metric(&primary, "contrail_hub_replay_reads_total", 1.0, "the replica never started its replay");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    relay.push_all(&generate(10_000, 50, 20, 8));
    primary.wait_for_seq(10_049, Duration::from_secs(30));
    wait_caught_up(&primary, &r, Duration::from_secs(30));
    assert_eq!(r.metric("contrail_upstream_gaps_total"), Some(1.0), "logs:\n{}", r.logs());
    assert_eq!(r.metric("contrail_drops_total{reason=\"bad_body\"}").unwrap_or(0.0), 0.0);
    let (r_log, p_log) = (inspect_log(rd.path()), inspect_log(pd.path()));
    let time_us = |line: &String| serde_json::from_str::<serde_json::Value>(line).unwrap()["time_us"].as_u64().unwrap();
    assert!(time_us(&p_log[0]) > time_us(before.last().unwrap()), "retention left some of the first batch");
    assert!(r_log.len() > p_log.len(), "{} events, the upstream {}", r_log.len(), p_log.len());
    let kept = r_log.len() - p_log.len();
    assert!(kept >= 1_024 && r_log[..kept] == before[..kept], "the first page, whole ({kept} events)");
    assert!(r_log[kept..] == p_log[..], "then the upstream's log");
    // Its subscribers are told of the hole where it is, as a gap, and so after a restart.
    let (before_hole, after_hole) = (time_us(&r_log[kept - 1]), time_us(&r_log[kept]));
    let from = time_us(&r_log[kept - 2]);
    let told = |addr| async move {
        let query = format!("/subscribe?cursor={from}&informCursorSeconds=1");
        let mut ws = connect(addr, &query, &[]).await.unwrap();
        let got = collect(&mut ws, 4, Duration::from_secs(5)).await;
        got.iter().map(|v| if v["kind"] == "gap" { v.clone() } else { v["time_us"].clone() }).collect::<Vec<_>>()
    };
    let want = vec![
        serde_json::json!(from),
        serde_json::json!(before_hole),
        serde_json::json!({"kind": "gap", "after_us": before_hole, "through_us": after_hole - 1}),
        serde_json::json!(after_hole),
    ];
    assert_eq!(told(r.public).await, want);
    assert_eq!(r.metric("contrail_hub_holes_told_total"), Some(1.0));
    drop(r);
    let r = replica(rd.path(), &[&primary]);
    assert_eq!(told(r.public).await, want, "after a restart");
    let status: serde_json::Value = serde_json::from_str(&http_get(r.public, "/status").unwrap().1).unwrap();
    assert_eq!(status["log"]["holes"], 1, "{status}");
    // A follower of the replica finds the hole too: it counts it, and its log is the same.
    let fd = tempfile::tempdir().unwrap();
    let follower = replica(fd.path(), &[&r]);
    wait_caught_up(&r, &follower, Duration::from_secs(30));
    assert_eq!(follower.metric("contrail_upstream_gaps_total"), Some(1.0), "logs:\n{}", follower.logs());
    assert_eq!(told(follower.public).await, want);
    drop(follower);
    assert!(inspect_log(fd.path()) == r_log, "the follower's log is the replica's");
}

/// An upstream that sends one message in fragments without end: the replica cuts it off at the
/// transport's limit (32 MiB) and connects again, rather than growing the message until memory
/// runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_message_in_endless_fragments_is_cut_off_at_the_limit() {
    let upstream = FakeRelay::start().await;
    upstream.plan(vec![ConnFault { endless_fragments: true, ..ConnFault::default() }]);
    let dir = tempfile::tempdir().unwrap();
    // Uncompressed: the fragments are of a text message.
    let replica = replica_of(dir.path(), &upstream.url(), &["--upstream-compress", "false"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream.connections() < 2 {
        assert!(Instant::now() < deadline, "no second connection; logs:\n{}", replica.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The limit, plus what the two loopback socket buffers held when the reader hung up.
    let taken = upstream.fragment_bytes();
    let most = (33 << 20) + common::loopback_buffers();
    assert!((32 << 20..=most).contains(&taken), "the replica took {taken} bytes of one message (at most {most})");
    assert!(replica.logs().contains("a fragmented message larger than"), "{}", replica.logs());
}

/// An upstream that sends an event with a `time_us` beyond any clock (corrupt, or hostile;
/// past 2^53, or more than a day past ours and not followed by a newer one): the replica drops
/// and counts it rather than store it as its newest, which would make it refuse every real
/// event after (each must be newer), and goes on with the next. Events more than a day ahead
/// that go on from there (a primary whose clock is ahead, or ours behind) are taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_event_beyond_any_clock_is_dropped_not_stored() {
    let upstream = FakeRelay::start().await;
    upstream.set_faults(Faults { text: true, ..Faults::default() });
    let now = now_us();
    let t = now - 3_600_000_000;
    let a_year_ahead = now + 365 * 24 * 3_600_000_000;
    let two_days_ahead = now + 2 * 24 * 3_600_000_000;
    // The fake orders frames by the "seq" given here: the bogus one sits between two real ones,
    // and a second event stamped like the one before it (not the resumed-from event) follows.
    for (seq, time_us) in [
        (t, t),
        (t + 1, t + 1),
        (t + 2, 1i64 << 60),
        (t + 3, t + 3),
        (t + 4, t + 3),
        (t + 5, a_year_ahead),
        (t + 6, t + 6),
    ] {
        upstream.push(seq, like_line(time_us));
    }
    // Cursor messages beyond any clock too: taken, no later one would count as moving on.
    upstream.push(t + 7, format!(r#"{{"kind":"cursor","time_us":{}}}"#, 1i64 << 60).into_bytes());
    upstream.push(t + 8, format!(r#"{{"kind":"cursor","time_us":{a_year_ahead}}}"#).into_bytes());
    // Ahead, and the stream goes on from there: both taken.
    upstream.push(t + 9, like_line(two_days_ahead));
    upstream.push(t + 10, like_line(two_days_ahead + 1));
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(dir.path(), &upstream.url(), &["--upstream-compress", "false"]);
    wait_metric(&replica, "contrail_drops_total{reason=\"bad_time\"}", 5.0, "the bogus events were not dropped");
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 6.0, "the events after them never came");
    assert!(replica.logs().contains("beyond any clock"), "{}", replica.logs());
    assert_eq!(upstream.connections(), 1, "no reconnect: the bad event did not end the connection");
    let replica_bad_time = replica.metric("contrail_drops_total{reason=\"bad_time\"}").unwrap();
    drop(replica);
    let stored: Vec<u64> = inspect_log(dir.path())
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap())
        .collect();
    let (t, ahead) = (t as u64, two_days_ahead as u64);
    assert_eq!(stored, vec![t, t + 1, t + 3, t + 6, ahead, ahead + 1]);
    assert_eq!(replica_bad_time, 5.0, "2^60, the second t+3, the year ahead, two cursor messages");
}

/// A replica measures its lag by its upstream's clock (`/status`'s `now_us`), not by its own:
/// the events' `time_us` are stamped by the upstream's kind of clock. Here the upstream's reads
/// ten minutes behind this machine's (or this one's is ahead): a replica holding everything it
/// has, as it arrives, reads a lag of seconds, not ten minutes, and `/ready` says 200 under
/// `--ready-max-lag 60s` (it said 503 for as long as the clocks differed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_measures_its_lag_by_its_upstreams_clock() {
    let upstream = FakeRelay::start().await;
    upstream.set_faults(Faults { text: true, ..Faults::default() });
    let skew = -600_000_000i64;
    upstream.serve_status(skew);
    let t = now_us() + skew; // the upstream's now
    for i in 0..5 {
        let line = format!(
            r#"{{"did":"did:plc:a","time_us":{},"kind":"commit","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k{i}","record":{{}}}}}}"#,
            t + i
        );
        upstream.push(t + i, line.into_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--upstream-compress", "false", "--ready-max-lag", "60s"];
    let replica = replica_of(dir.path(), &upstream.url(), &flags);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 5.0, "the replica took nothing");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lag = replica.metric("contrail_replication_lag_seconds").unwrap();
        let ready = http_get(replica.public, "/ready").unwrap().0;
        if lag < 30.0 && ready == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "lag {lag} s, /ready {ready}: measured by this machine's clock");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Caught up with a quiet upstream (its cursor message at our newest event, live): no lag,
    // by its clock too (by this machine's it read ten minutes ahead of its own events: -600 s).
    let cursor = format!(r#"{{"kind":"cursor","time_us":{},"live":true}}"#, t + 4);
    upstream.push(t + 5, cursor.into_bytes());
    std::thread::sleep(Duration::from_millis(1_000));
    let lag = replica.metric("contrail_replication_lag_seconds").unwrap();
    assert!((-5.0..30.0).contains(&lag), "lag {lag} s after a live cursor message");
    assert_eq!(http_get(replica.public, "/ready").unwrap().0, 200);
}

/// An upstream shedding load (a Contrail at its subscriber cap, a proxy) answers the upgrade
/// with 503 and `Retry-After`: the replica is not back sooner than asked, and its log says what
/// the upstream said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_refused_with_retry_after_is_not_back_sooner() {
    let upstream = FakeRelay::start().await;
    upstream.set_faults(Faults { text: true, ..Faults::default() });
    let t = now_us();
    upstream.push(t, like_line(t));
    let says = "too many subscribers; try another instance or later";
    upstream.refuse_next(Refusal { status: 503, retry_after_secs: Some(2), body: says.into() });
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--upstream-compress", "false", "--relay-backoff-min", "50ms", "--relay-backoff-max", "10s"];
    let replica = replica_of(dir.path(), &upstream.url(), &flags);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 1.0, "the replica took nothing");
    let attempts = upstream.attempts();
    let waited = attempts[1] - attempts[0];
    assert!(waited >= Duration::from_millis(1_900), "asked again after {waited:?}");
    assert!(replica.logs().contains(&format!("HTTP 503: {says}")), "{}", replica.logs());
    drop(replica);
    // Compressed (the dictionary is asked for first, and refused), with a second upstream that
    // is down: the one that asked is not asked again before its time, though the other was
    // tried and failed meanwhile.
    // (A pause of 3 s: room for the other's tries on a busy machine; CI once saw one in 2 s.)
    upstream.refuse_next(Refusal { status: 429, retry_after_secs: Some(3), body: "slow down".into() });
    let dir = tempfile::tempdir().unwrap();
    // (The second: a listener that hangs up at once.)
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let both = format!("{},ws://{}", upstream.url(), down.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = down.accept().await {
            drop(tcp);
        }
    });
    let flags = ["--relay-backoff-min", "50ms", "--relay-backoff-max", "10s"];
    let before = upstream.attempts().len();
    let replica = replica_of(dir.path(), &both, &flags);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 1.0, "the replica took nothing");
    // Its refused dictionary request, then (the other tried) the next one.
    let attempts = upstream.attempts();
    let waited = attempts[before + 1] - attempts[before];
    assert!(waited >= Duration::from_millis(2_900), "asked again after {waited:?}");
    assert!(replica.logs().contains("the upstream's dictionary: HTTP 429: slow down"), "{}", replica.logs());
    // The refusal, and the second upstream tried more than once meanwhile: the pause held up
    // the upstream that asked, not the others.
    let failed = replica.metric("contrail_relay_errors_total{kind=\"connect\"}").unwrap_or(0.0);
    assert!(
        failed >= 3.0,
        "the second upstream was not tried meanwhile: {failed} connect errors; logs:\n{}",
        replica.logs()
    );
    // Switched to the second once, and back once the pause was over: not to the paused one
    // and away again at every retry.
    let switches = replica.metric("contrail_upstream_switches_total").unwrap();
    assert!(switches <= 2.0, "{switches} switches for {failed} failed connections");
}

/// Upstreams that each hand over an event and drop the connection (a proxy with a short
/// connection life) are not reconnected to in a loop without a pause: a session that ended
/// within a second is followed by a backoff wait, though it moved the log on. Before, with two
/// upstreams the replica went from one to the other at once, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_that_each_hand_over_an_event_and_drop_us_are_not_reconnected_to_in_a_loop() {
    let t = now_us();
    let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
    for upstream in [&a, &b] {
        upstream.set_faults(Faults { text: true, ..Faults::default() });
        // Each connection: the repeat of our newest event, one new one, then a cut.
        upstream.plan(vec![ConnFault::drop_after(2); 1_000]);
        for i in 0..1_000 {
            upstream.push(t + i, like_line(t + i));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--upstream-compress", "false", "--relay-backoff-min", "300ms", "--relay-backoff-max", "300ms"];
    let replica = replica_of(dir.path(), &format!("{},{}", a.url(), b.url()), &flags);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 2.0, "the replica took nothing");
    let before = a.connections() + b.connections();
    std::thread::sleep(Duration::from_secs(3));
    // A wait of 150-300 ms after each: at most 20 in 3 s (before: hundreds).
    let connections = a.connections() + b.connections() - before;
    assert!(connections <= 22, "{connections} connections in 3 s");
    assert!(replica.metric("contrail_events_ingested_total{kind=\"commit\"}").unwrap() >= 5.0, "it went on");
}

/// Events this version cannot store as they are — a kind it does not know, a line that is not an
/// event, a verification label from a newer primary — must not wedge a replica: every upstream
/// (all replicas of one primary) would send them again at the same place. The first two are
/// dropped and counted, the third is kept without the label it cannot vouch for, and the events
/// after them are taken on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_newer_or_broken_upstream_sends_do_not_wedge_the_replica() {
    let upstream = FakeRelay::start().await;
    upstream.set_faults(Faults { text: true, ..Faults::default() });
    let t = now_us() - 3_600_000_000;
    let event = |time_us: i64, kind: &str, tail: &str| {
        format!(
            r#"{{"did":"did:plc:a","time_us":{time_us},"kind":"{kind}","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k{time_us}","record":{{}}}}{tail}}}"#
        )
        .into_bytes()
    };
    upstream.push(t, event(t, "commit", ""));
    upstream.push(t + 1, event(t + 1, "hologram", ""));
    upstream.push(t + 2, b"<html>502 Bad Gateway</html>".to_vec());
    upstream.push(t + 3, event(t + 3, "commit", r#","verification":"quantum""#));
    upstream.push(t + 4, event(t + 4, "commit", ""));
    // A DID longer than any (the stored value's header holds 16 bits of its length: 65,537
    // bytes were stored as 1, half a character), and a collection that is not an NSID.
    let long_did = format!("did:plc:{}a", "é".repeat(32_764));
    let with = |time_us: i64, from: &str, to: &str| {
        String::from_utf8(event(time_us, "commit", "")).unwrap().replace(from, to).into_bytes()
    };
    upstream.push(t + 5, with(t + 5, "did:plc:a", &long_did));
    upstream.push(t + 6, with(t + 6, "app.bsky.feed.like", "app..like"));
    upstream.push(t + 7, event(t + 7, "commit", ""));
    // The first connection ends after the two bad lines: the next one (from cursor t) sends
    // them again. The event is counted once; the line without a time_us cannot be told from
    // a new one, and is counted again.
    upstream.plan(vec![ConnFault::drop_after(3)]);
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(dir.path(), &upstream.url(), &["--upstream-compress", "false"]);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 4.0, "the replica stopped at a bad event");
    assert_eq!(replica.metric("contrail_drops_total{reason=\"unknown_type\"}"), Some(1.0));
    assert_eq!(replica.metric("contrail_drops_total{reason=\"bad_body\"}"), Some(4.0));
    assert_eq!(upstream.connections(), 2, "one reconnect, the planned one: no bad event ended a connection");
    drop(replica);
    let stored: Vec<serde_json::Value> =
        inspect_log(dir.path()).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let times: Vec<u64> = stored.iter().map(|v| v["time_us"].as_u64().unwrap()).collect();
    assert_eq!(times, vec![t as u64, t as u64 + 3, t as u64 + 4, t as u64 + 7]);
    assert!(stored[1].get("verification").is_none(), "the unknown label is not stored: {}", stored[1]);
}

/// A compressed link names the dictionary it fetched: behind one address, the instance that
/// answers `/dictionary` (Jetstream's by default) and the one that takes the upgrade (whose
/// default is Contrail's own) may differ. Unnamed, every frame failed to decompress, at every
/// reconnection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_link_names_the_dictionary_it_fetched() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 300, 20, 5));
    let (ad, bd, rd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Serve::start(ad.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    let flags = ["--max-events-per-second-per-ip", "0", "--zstd-default-dictionary", "20261125"];
    let b = Serve::start(bd.path(), &relay.url(), &flags);
    b.wait_for_seq(300, Duration::from_secs(30));
    let proxy = common::proxy::Proxy::start_routing(b.public, "/dictionary", a.public).await;
    let replica = replica_of(rd.path(), &format!("ws://{}", proxy.addr), &[]);
    wait_caught_up(&b, &replica, Duration::from_secs(30));
    assert_eq!(b.metric("contrail_hub_subscribers{compression=\"zstd\",wire=\"v1\"}"), Some(1.0));
    drop(replica);
    assert!(inspect_log(rd.path()) == inspect_log(bd.path()), "the replica's log differs from its upstream's");
}

/// An event line larger than any a primary makes (a lying upstream's), as text or compressed, is
/// dropped and counted, and the next one is taken on the same connection. Stored, it would be
/// served to followers of ours, whose compressed links refuse it at every reconnection, for
/// ever; refused as an error here, the same for us.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_event_larger_than_any_primary_makes_is_dropped_not_stored() {
    for compressed in [false, true] {
        let upstream = FakeRelay::start().await;
        upstream.set_faults(Faults { text: !compressed, ..Faults::default() });
        let t = now_us() - 3_600_000_000;
        let line = |time_us: i64, text: &str| {
            let line = format!(
                r#"{{"did":"did:plc:a","time_us":{time_us},"kind":"commit","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.post","rkey":"k{time_us}","record":{{"text":"{text}"}}}}}}"#
            );
            // (zstd's frames say their content size: one over the limit is known as such.)
            if compressed {
                zstd::bulk::compress(line.as_bytes(), 1).unwrap()
            } else {
                line.into_bytes()
            }
        };
        upstream.push(t, line(t, "a"));
        upstream.push(t + 1, line(t + 1, &"x".repeat(17 << 20)));
        upstream.push(t + 2, line(t + 2, "c"));
        let dir = tempfile::tempdir().unwrap();
        let flags = ["--upstream-compress", if compressed { "true" } else { "false" }];
        let replica = replica_of(dir.path(), &upstream.url(), &flags);
        let what = format!("compressed: {compressed}");
        wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 2.0, &what);
        assert_eq!(replica.metric("contrail_drops_total{reason=\"frame_too_large\"}"), Some(1.0), "{what}");
        assert_eq!(upstream.connections(), 1, "{what}: the oversized event ended no connection");
        drop(replica);
        let stored: Vec<serde_json::Value> =
            inspect_log(dir.path()).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let times: Vec<i64> = stored.iter().map(|v| v["time_us"].as_i64().unwrap()).collect();
        assert_eq!(times, [t, t + 2], "{what}");
    }
}

/// An upstream whose every line is dropped (the wrong protocol, a proxy's error pages) is as
/// stale as a silent one: only stored events, the cursor's repeat and cursor messages keep it,
/// so the replica leaves it at the stale timeout instead of staying while the lines last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_sending_only_lines_it_drops_is_left_as_stale() {
    let upstream = FakeRelay::start().await;
    // 20 s or more of junk lines, one a millisecond, on every connection.
    for i in 0..20_000 {
        upstream.push(i + 1, b"<html>502 Bad Gateway</html>".to_vec());
    }
    upstream.set_faults(Faults { text: true, frame_interval: Some(Duration::from_millis(1)), ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(dir.path(), &upstream.url(), &["--upstream-compress", "false"]);
    upstream.wait_for_connections_above(0, Duration::from_secs(20));
    // Left after the 3 s stale timeout, while the first connection's junk still flows (a
    // replica staying while it lasts would reconnect no sooner than 23 s).
    upstream.wait_for_connections_above(1, Duration::from_secs(15));
    assert!(replica.metric("contrail_drops_total{reason=\"bad_body\"}").unwrap() >= 100.0);
    assert!(replica.logs().contains("stale: no event or cursor message"), "{}", replica.logs());
}

/// A node that ran as a replica and is made a primary again does not resume the relay from the
/// cursor it wrote as a primary before: its log has taken its upstream's events since, and the
/// relay replaying from that old seq would store them all again under new `time_us`. It starts
/// live, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_made_primary_again_does_not_resume_from_its_stale_relay_cursor() {
    promoted_replica_starts_live(false).await;
    // The same with a cursor written before cursors kept their time (an older version): the
    // replica marks it when it starts, before it takes newer events.
    promoted_replica_starts_live(true).await;
}

async fn promoted_replica_starts_live(cursor_without_time: bool) {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 200, 40, 23);
    relay.push_all(&gen[..100]);
    let (nd, pd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The node as a primary: seqs 1–100, then stopped.
    let node = Serve::start(nd.path(), &relay.url(), &[]);
    node.wait_for_seq(100, Duration::from_secs(30));
    drop(node);
    if cursor_without_time {
        let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), nd.path()).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), nd.path(), &cfs).unwrap();
        db.delete_cf(db.cf_handle("meta").unwrap(), b"relay_at_time_us").unwrap();
    }
    // Another primary takes the relay on to seq 200, and the node follows it as a replica.
    relay.push_all(&gen[100..]);
    let primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let node = replica(nd.path(), &[&primary]);
    wait_caught_up(&primary, &node, Duration::from_secs(30));
    drop(node);
    let before = inspect_log(nd.path()).len();
    // Made a primary again. The relay's live edge is past seq 200 (the fake relay replays its
    // whole buffer to a connection without a cursor otherwise).
    relay.plan(vec![ConnFault { live_from: Some(201), ..ConnFault::default() }]);
    let connections = relay.connections();
    let node = Serve::start(nd.path(), &relay.url(), &[]);
    relay.wait_for_connections_above(connections, Duration::from_secs(30));
    assert_eq!(relay.cursors().last(), Some(&None), "started live, not from seq 100");
    assert!(node.logs().contains("newer than its relay cursor"), "{}", node.logs());
    std::thread::sleep(Duration::from_millis(500));
    drop(node);
    assert_eq!(inspect_log(nd.path()).len(), before, "nothing stored again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_an_upstream_behind_a_proxy_that_wants_a_token_asks_everything_with_it() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 300, 20, 43));
    let (pd, rd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    primary.wait_for_seq(300, Duration::from_secs(30));
    // Every request without the token gets a 403: the upgrade, the dictionary, the status.
    let gate = common::proxy::Proxy::start_gated(primary.public, "token=s3cret").await;
    let r = replica_of(rd.path(), &format!("ws://{}/subscribe?token=s3cret", gate.addr), &[]);
    wait_caught_up(&primary, &r, Duration::from_secs(30));
    assert!(inspect_log(rd.path()) == inspect_log(pd.path()), "the replica's log differs");
    assert_eq!(r.metric("contrail_upstream_switches_total"), Some(0.0), "logs:\n{}", r.logs());
}

/// An upstream URL's query may hold an access token: `/ready` and `/status` (public) and the
/// logs name the upstream without it. Before, `/ready` said the whole URL of a failed attempt.
#[test]
fn an_upstream_token_is_not_shown_on_ready_or_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let r = replica_of(dir.path(), "ws://127.0.0.1:9/subscribe?token=s3cret", &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = http_get(r.public, "/ready").unwrap();
        assert_eq!(status, 503, "{body}");
        if body.contains("last attempt") {
            break body;
        }
        assert!(Instant::now() < deadline, "no attempt reported: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("ws://127.0.0.1:9/subscribe") && !body.contains("s3cret"), "{body}");
    let (_, status) = http_get(r.public, "/status").unwrap();
    assert!(!status.contains("s3cret"), "{status}");
    assert!(!r.logs().contains("s3cret"), "{}", r.logs());
}

/// `--ready-max-lag`: `/ready` says 503 while the source is further behind than that. The
/// primary's fake relay stamps its frames months ago (its relay lag is that old); a replica
/// started after the primary's events aged is behind by their age until its upstream's cursor
/// messages say it has caught up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_says_503_while_behind_more_than_ready_max_lag() {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, 100, 10, 61));
    let (pd, rd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The replica's catch-up is paced (about four seconds for its 100 events), so that it is
    // behind for long enough to be seen on a loaded machine, however late the first look.
    let primary =
        Serve::start(pd.path(), &relay.url(), &["--max-events-per-second-per-ip", "20", "--ready-max-lag", "1h"]);
    primary.wait_for_seq(100, Duration::from_secs(30));
    let (status, body) = http_get(primary.public, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("behind (--ready-max-lag 3600s)"), "{body}");
    // The replica (cursor messages every 2 s): its events are a few seconds old when it gets
    // them, then it is caught up. (Its lag must be allowed two cursor intervals.)
    std::thread::sleep(Duration::from_secs(6));
    let r = replica_of(
        rd.path(),
        &format!("ws://{}", primary.public),
        &["--ready-max-lag", "5s", "--upstream-stale-timeout", "6s"],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen_behind = false;
    loop {
        let (status, body) = http_get(r.public, "/ready").unwrap();
        seen_behind |= status == 503 && body.contains("s behind (--ready-max-lag 5s)");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_caught_up(&primary, &r, Duration::from_secs(10));
    assert!(seen_behind, "never said it was behind");
}

/// An upstream behind us (a lagging replica we rotated to, which has not got our newest event)
/// is live at its own position, below ours: that is not caught up, and `/ready` still says how
/// far behind the events are. Before, a live cursor message anywhere at or below our position
/// reset the lag to 0. At our position it is, counting an event we dropped as ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_behind_us_does_not_make_the_replica_ready() {
    let upstream = FakeRelay::start().await;
    upstream.set_faults(Faults { text: true, ..Faults::default() });
    let now = now_us();
    let t = now - 3_600_000_000;
    for i in 0..3 {
        upstream.push(t + i, like_line(t + i));
    }
    let cursor = |time_us: i64| format!(r#"{{"kind":"cursor","time_us":{time_us},"live":true}}"#).into_bytes();
    upstream.push(t + 3, cursor(t + 1));
    let dir = tempfile::tempdir().unwrap();
    let replica = replica_of(dir.path(), &upstream.url(), &["--upstream-compress", "false", "--ready-max-lag", "5s"]);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 3.0, "the events never came");
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = http_get(replica.public, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("behind (--ready-max-lag 5s)"), "{body}");
    // At our position: caught up. (The upstream's newest is an event we drop, of a kind we do
    // not know: its position counts as ours.)
    let hologram = format!(r#"{{"did":"did:plc:a","time_us":{},"kind":"hologram"}}"#, t + 4);
    upstream.push(t + 4, hologram.into_bytes());
    upstream.push(t + 5, cursor(t + 4));
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(replica.public, "/ready").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "never ready; logs:\n{}", replica.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// After a resume, an upstream whose first event is far ahead (held until the next says what it
/// is) no longer has our newest event, whatever that event turns out to be: decided at once, so
/// the replica tries the upstream that has it, rather than waiting on a quiet one for its
/// stale timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_resuming_with_a_far_ahead_event_is_left_at_once() {
    let (a, b) = (FakeRelay::start().await, FakeRelay::start().await);
    for upstream in [&a, &b] {
        upstream.set_faults(Faults { text: true, ..Faults::default() });
    }
    let t = now_us() - 3_600_000_000;
    for i in 0..3 {
        a.push(t + i, like_line(t + i));
    }
    // A's first connection ends after two events; the replica moves on to B, which has only an
    // event two days ahead, and then nothing.
    a.plan(vec![ConnFault::drop_after(2)]);
    let ahead = now_us() + 2 * 24 * 3_600_000_000;
    b.push(ahead, like_line(ahead));
    let dir = tempfile::tempdir().unwrap();
    let urls = format!("{},{}", a.url(), b.url());
    let replica = replica_of(dir.path(), &urls, &["--upstream-compress", "false", "--upstream-stale-timeout", "20s"]);
    wait_metric(&replica, "contrail_events_ingested_total{kind=\"commit\"}", 3.0, "A's third event never came");
    let logs = replica.logs();
    assert!(logs.contains("no longer has our newest event"), "{logs}");
    assert!(!logs.contains("stale"), "waited for B's stale timeout: {logs}");
    assert_eq!(replica.metric("contrail_upstream_gaps_total"), Some(0.0), "A had it: no hole");
}
