//! The client crate against the real server over loopback: exactly-once across client restarts,
//! across a kill -9 of the server, across failover between replicas (exact cursor) and between
//! independent servers (rewind and de-duplication); and `contrail tail`.

mod common;

use common::frames::{generate, GenFrame};
use common::process::{bin, inspect_log, Serve};
use common::proxy::Proxy;
use common::relay::{FakeRelay, Faults};
use common::{like_line, now_us, without_time_us};
use contrail_client::{
    process, process_parallel, CursorStore, Event, Failover, FileCursorStore, ProcessError, ProcessOptions,
    Subscription,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FLAGS: &[&str] = &["--max-events-per-second-per-ip", "0"];

fn newest(s: &Serve) -> u64 {
    s.metric("contrail_store_newest_time_us").unwrap_or(0.0) as u64
}

fn paced_relay_faults() -> Faults {
    Faults { frame_interval: Some(Duration::from_millis(1)), burst: 2, ..Faults::default() }
}

async fn relay_with(gen: &[GenFrame]) -> FakeRelay {
    let relay = FakeRelay::start().await;
    relay.push_all(gen);
    relay
}

/// Takes `n` events (each within 10 s), failing on an error (a refusal, an unreadable message).
async fn take_events(sub: &mut Subscription, n: usize) {
    let mut got = 0;
    while got < n {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("no event in time after {got}"))
            .expect("not refused, all readable");
        if let contrail_client::Message::Event(_) = m {
            got += 1;
        }
    }
}

fn builder(urls: &[&Serve]) -> contrail_client::Builder {
    Subscription::builder(urls.iter().map(|s| format!("ws://{}", s.public)))
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .connect_timeout(Duration::from_secs(2))
        .stale_timeout(Duration::from_secs(3))
}

/// Collects handled events' JSON; resolves `done` once `until` (a time_us) was handled.
#[derive(Clone, Default)]
struct Collector {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn push(&self, e: &Event) -> usize {
        let mut l = self.lines.lock().unwrap();
        l.push(e.json().to_string());
        l.len()
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}

/// Runs `process` until the handler has seen an event at or after `until()`.
async fn run_until(
    sub: Subscription,
    store: FileCursorStore,
    collector: &Collector,
    parallel: bool,
    stop: impl Fn(&Event, usize) -> bool + Send + Sync + 'static,
) {
    let notify = Arc::new(tokio::sync::Notify::new());
    let (c, n) = (collector.clone(), notify.clone());
    let handler = move |e: Event| {
        let count = c.push(&e);
        if stop(&e, count) {
            n.notify_one();
        }
        async { Ok::<(), std::convert::Infallible>(()) }
    };
    let shutdown = async move { notify.notified().await };
    let opts = ProcessOptions { save_interval: Duration::from_millis(20), ..ProcessOptions::default() };
    let run = async {
        if parallel {
            process_parallel(sub, store, opts, 4, handler, shutdown).await
        } else {
            process(sub, store, opts, handler, shutdown).await
        }
    };
    match tokio::time::timeout(Duration::from_secs(90), run).await {
        Ok(Ok(())) => {}
        Ok(Err(e @ ProcessError::Subscription(_))) => panic!("the subscription ended: {e}"),
        Ok(Err(e)) => panic!("{e}"),
        Err(_) => panic!("the run did not finish within 90 s ({} events)", collector.lines.lock().unwrap().len()),
    }
}

fn time_of(line: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(line).unwrap()["time_us"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_client_restarts() {
    let gen = generate(1, 3_000, 40, 31);
    let relay = relay_with(&gen).await;
    relay.set_faults(paced_relay_faults());
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(100, Duration::from_secs(30));
    let cursor_dir = tempfile::tempdir().unwrap();
    let store = FileCursorStore::new(cursor_dir.path().join("cursor"));
    let collector = Collector::default();
    // Three runs of the same consumer, each stopped part-way, the last after the final event.
    for (round, stop_after) in [(0, 700usize), (1, 700)] {
        let start = store.load().unwrap().or(Some(0)); // first run: from the oldest event
        let sub = builder(&[&primary]).cursor(start).start().unwrap();
        run_until(sub, store.clone(), &collector, false, move |_, n| n >= stop_after * (round + 1)).await;
    }
    primary.wait_for_seq(3_000, Duration::from_secs(60));
    let last = newest(&primary);
    let sub = builder(&[&primary]).cursor(store.load().unwrap()).start().unwrap();
    run_until(sub, store.clone(), &collector, false, move |e, _| e.time_us() >= last).await;
    assert_eq!(store.load().unwrap(), Some(last), "the saved cursor is the last handled event");
    let got = collector.take();
    let log = inspect_log(pd.path());
    assert_eq!(got.len(), log.len(), "a gap or a duplicate across client restarts");
    assert!(got == log, "the handled events differ from the server's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_a_server_kill_9_with_the_parallel_runner() {
    let gen = generate(1, 4_000, 40, 32);
    let relay = relay_with(&gen).await;
    relay.set_faults(paced_relay_faults());
    let pd = tempfile::tempdir().unwrap();
    let mut primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(100, Duration::from_secs(30));
    let public = primary.public;
    let cursor_dir = tempfile::tempdir().unwrap();
    let store = FileCursorStore::new(cursor_dir.path().join("cursor"));
    let collector = Collector::default();
    let sub = builder(&[&primary]).cursor(Some(0)).start().unwrap();
    let c = collector.clone();
    // Runs until aborted below, once it has the final event.
    let client = tokio::spawn(async move { run_until(sub, store, &c, true, |_, _| false).await });
    // Let the client get going, then kill the server mid-stream and bring it back on the same
    // address with the same log.
    let deadline = Instant::now() + Duration::from_secs(30);
    while collector.lines.lock().unwrap().len() < 800 {
        assert!(Instant::now() < deadline, "the client never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    primary.kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let primary = Serve::start(pd.path(), &relay.url(), &[FLAGS, &["--listen", &public.to_string()]].concat());
    primary.wait_for_seq(4_000, Duration::from_secs(60));
    let last = newest(&primary);
    // Wait for the client to have the final event.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = collector.lines.lock().unwrap().iter().any(|l| time_of(l) == last);
        if have {
            break;
        }
        assert!(Instant::now() < deadline, "the client never got the final event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.abort();
    let mut got = collector.take();
    got.sort_by_key(|l| time_of(l));
    let log = inspect_log(pd.path());
    assert_eq!(got.len(), log.len(), "a gap or a duplicate across the server's kill -9");
    assert!(got == log, "the handled events differ from the server's log");
}

/// Reads events from `sub`, calling `kill` once after `kill_after` of them, until the event
/// that is newest on `survivor` once it has ingested relay seq `last_seq`.
async fn read_through_a_kill(
    sub: &mut Subscription,
    kill_after: usize,
    mut kill: impl FnMut(),
    survivor: &Serve,
    last_seq: i64,
) -> Vec<Event> {
    let mut got = Vec::new();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "stuck after {} events", got.len());
        let m = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("a message").unwrap();
        let contrail_client::Message::Event(e) = m else { continue };
        got.push(e);
        if got.len() == kill_after {
            kill();
        }
        if got.len() >= kill_after
            && last.is_none()
            && survivor.metric("contrail_relay_last_seq").unwrap_or(0.0) as i64 >= last_seq
        {
            last = Some(newest(survivor));
        }
        if last.is_some_and(|l| got.last().unwrap().time_us() >= l) {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_between_replicas_uses_the_exact_cursor() {
    let gen = generate(1, 4_000, 40, 33);
    let relay = relay_with(&gen).await;
    relay.set_faults(paced_relay_faults());
    let (pd, ad, bd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let replica = |dir: &std::path::Path| {
        let up = format!("ws://{}", primary.public);
        Serve::start(
            dir,
            "ws://127.0.0.1:9",
            &[FLAGS, &["--upstream-url", &up, "--upstream-stale-timeout", "3s"]].concat(),
        )
    };
    let mut a = replica(ad.path());
    let b = replica(bd.path());
    let mut sub = builder(&[&a, &b]).cursor(Some(0)).start().unwrap();
    // The replica in use dies mid-stream.
    let got: Vec<String> = read_through_a_kill(&mut sub, 1_000, || a.kill9(), &primary, 4_000)
        .await
        .iter()
        .map(|e| e.json().to_string())
        .collect();
    assert_eq!(sub.stats().host.load(std::sync::atomic::Ordering::Relaxed), 1, "the client moved to B");
    let repeats = sub.stats().duplicates_dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(repeats <= 2, "{repeats} events came twice: a rewind, not the exact cursor");
    let log = inspect_log(pd.path());
    assert_eq!(got.len(), log.len(), "a gap or a duplicate across the failover");
    assert!(got == log, "the client's stream differs from the primary's log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_between_independent_servers_rewinds_and_drops_what_it_had() {
    // Two primaries reading one relay: the same events, each stamped with its own time_us,
    // like two Jetstream instances.
    let gen = generate(1, 4_000, 40, 34);
    let relay = relay_with(&gen).await;
    relay.set_faults(paced_relay_faults());
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut p1 = Serve::start(d1.path(), &relay.url(), FLAGS);
    let p2 = Serve::start(d2.path(), &relay.url(), FLAGS);
    p1.wait_for_seq(200, Duration::from_secs(30));
    p2.wait_for_seq(200, Duration::from_secs(30));
    let mut sub =
        builder(&[&p1, &p2]).failover(Failover::Rewind(Duration::from_secs(3))).cursor(Some(0)).start().unwrap();
    let got: Vec<String> = read_through_a_kill(&mut sub, 1_500, || p1.kill9(), &p2, 4_000)
        .await
        .iter()
        .map(|e| without_time_us(e.json()))
        .collect();
    let dropped = sub.stats().duplicates_dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped > 1, "the rewind replayed nothing ({dropped} dropped): not a rewind");
    let expected: Vec<String> = inspect_log(d2.path()).iter().map(|l| without_time_us(l)).collect();
    assert_eq!(got.len(), expected.len(), "a gap or a duplicate across the rewind ({dropped} dropped)");
    assert!(got == expected, "the client's stream differs from the relay's events");
}

/// v2 names the dictionary in its query: given a stale one (a file from before the server moved
/// to another, here one whose id it never had), the subscription is refused it once, fetches
/// the server's own, and goes on, rather than ending as refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_subscription_given_a_stale_dictionary_goes_on_with_the_servers_own() {
    let gen = generate(1, 200, 20, 37);
    let relay = relay_with(&gen).await;
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let events = inspect_log(pd.path()).len();
    let mut stale = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/dictionaries/contrail-v1.zdict")).unwrap();
    stale[4..8].copy_from_slice(&7u32.to_le_bytes()); // its id, in the header
    let mut sub = builder(&[&primary])
        .wire(contrail_client::Wire::V2)
        .compress(true)
        .dictionary(stale)
        .include_sync(true)
        .cursor(Some(1_000_000_000_000_000))
        .start()
        .unwrap();
    take_events(&mut sub, events).await;
    assert_eq!(sub.stats().connections.load(std::sync::atomic::Ordering::Relaxed), 1, "one upgrade took");
}

/// On v1 too, the subscription names the dictionary it decompresses with (`zstdDictionary`): a
/// Contrail compresses with it rather than its default. Before, a dictionary given to the
/// builder that was not the server's default (here Contrail's own, by a server whose default is
/// Jetstream's), or a default that changed between the fetch and the upgrade, made every
/// message undecompressable and the subscription end as unreadable. One the server does not
/// have is refused once, and the subscription goes on with the server's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_subscription_names_its_dictionary_and_goes_on_when_it_is_refused() {
    let gen = generate(1, 200, 20, 43);
    let relay = relay_with(&gen).await;
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let events = inspect_log(pd.path()).len();
    let ours = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/dictionaries/contrail-v1.zdict")).unwrap();
    let mut stale = ours.clone();
    stale[4..8].copy_from_slice(&7u32.to_le_bytes()); // an id the server never had
    for given in [ours, stale] {
        let mut sub = builder(&[&primary])
            .compress(true)
            .dictionary(given)
            .include_sync(true)
            .cursor(Some(1_000_000_000_000_000))
            .start()
            .unwrap();
        take_events(&mut sub, events).await;
        assert_eq!(sub.stats().malformed.load(std::sync::atomic::Ordering::Relaxed), 0);
        assert_eq!(sub.stats().connections.load(std::sync::atomic::Ordering::Relaxed), 1, "one upgrade took");
    }
}

/// A subscription the server refuses (here a DID in the URL's own query that is not one) ends
/// with the server's reason, not only its status: the user sees what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_says_the_servers_reason() {
    let relay = FakeRelay::start().await;
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    for (wire, url) in [
        (contrail_client::Wire::V1, format!("ws://{}?wantedDids=did:bad", primary.public)),
        (contrail_client::Wire::V2, format!("ws://{}?dids=did:bad", primary.public)),
    ] {
        let mut sub = Subscription::builder([url]).wire(wire).start().unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("an answer in time");
        let err = err.expect_err("refused");
        assert!(matches!(err, contrail_client::Error::Refused { .. }), "{err}");
        assert!(err.to_string().contains("HTTP 400 at the upgrade: "), "{err}");
        assert!(err.to_string().contains("did:bad"), "the server's reason: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v2_wire_delivers_the_same_events_and_filters_change_by_reconnecting() {
    let gen = generate(1, 800, 20, 36);
    let relay = relay_with(&gen).await;
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(800, Duration::from_secs(30));
    let log: Vec<Event> = inspect_log(pd.path()).into_iter().map(|l| Event::from_json(l).unwrap()).collect();
    let fields = |e: &Event| {
        (e.time_us(), e.kind(), e.did().to_string(), e.collection().map(str::to_string), e.rkey().map(str::to_string))
    };
    for compress in [false, true] {
        // v2 cursors are seqs; Contrail's are time_us (≥ 10¹⁵): this one is older than the log.
        let mut sub = builder(&[&primary])
            .wire(contrail_client::Wire::V2)
            .compress(compress)
            .include_sync(true)
            .cursor(Some(1_000_000_000_000_000))
            .start()
            .unwrap();
        let mut got = Vec::new();
        while got.len() < log.len() {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("an event in time").unwrap();
            if let contrail_client::Message::Event(e) = m {
                assert_eq!(e.wire(), contrail_client::Wire::V2);
                assert!(e.json().starts_with(r#"{"$type":"message""#), "{}", e.json());
                got.push(e);
            }
        }
        let want: Vec<_> = log.iter().map(fields).collect();
        assert!(got.iter().map(fields).eq(want), "compress={compress}: the v2 events differ from the log");
        // Records read the same through both wires.
        let (a, b) = (got.iter().find(|e| e.commit().is_some_and(|c| c.record.is_some())).unwrap(), &log);
        let same = b.iter().find(|e| e.time_us() == a.time_us()).unwrap();
        assert_eq!(a.commit().unwrap().record.unwrap().get(), same.commit().unwrap().record.unwrap().get());
        // New filters: the v2 subscription reconnects from where it was, with them; filters
        // given in a row while it is busy are taken as the last one (a reconnect each, before).
        let before = sub.stats().connections.load(std::sync::atomic::Ordering::Relaxed);
        for n in 0..20 {
            let dids = vec![format!("did:plc:{n:024}")];
            sub.set_filters(contrail_client::Filters { collections: vec![], dids }).unwrap();
        }
        sub.set_filters(contrail_client::Filters { collections: vec!["app.bsky.feed.post".into()], dids: vec![] })
            .unwrap();
        relay.push(801, common::frames::identity_frame(801, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", None));
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a message").unwrap();
            if let contrail_client::Message::Event(e) = m {
                assert!(e.time_us() > log.last().unwrap().time_us(), "a repeat after the filter change");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = sub.stats().connections.load(std::sync::atomic::Ordering::Relaxed);
        assert!((before + 1..=before + 2).contains(&after), "{} reconnects for 21 filter changes", after - before);
        relay.clear();
        relay.push_all(&gen);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contrail_tail_prints_the_events_as_sent_and_says_where_to_resume() {
    let gen = generate(1, 600, 20, 35);
    let relay = relay_with(&gen).await;
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(600, Duration::from_secs(30));
    let log = inspect_log(pd.path());
    // As in Jetstream, a collection filter selects commits; identity and account events pass.
    let likes: Vec<&String> = log
        .iter()
        .filter(|l| !l.contains(r#""kind":"commit""#) || l.contains(r#""collection":"app.bsky.feed.like""#))
        .collect();
    assert!(likes.len() > 50);
    for (compress, wire) in [(false, "v1"), (true, "v1"), (true, "v2")] {
        let mut cmd = std::process::Command::new(bin());
        // On v2 the cursor is a seq; Contrail's are time_us, so 10¹⁵ is "older than the log".
        let cursor = if wire == "v2" { "1000000000000000" } else { "0" };
        cmd.args(["tail", &format!("ws://{}", primary.public), "--collections", "app.bsky.feed.like"]);
        cmd.args(["--cursor", cursor, "--wire", wire]);
        if compress {
            cmd.arg("--compress");
        }
        let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let want = likes.len();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout).lines().map_while(Result::ok).take(want).collect::<Vec<String>>()
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !reader.is_finished() {
            assert!(Instant::now() < deadline, "contrail tail printed too little");
            std::thread::sleep(Duration::from_millis(20));
        }
        let lines = reader.join().unwrap();
        assert_eq!(lines.len(), likes.len());
        if wire == "v2" {
            // v2 messages of the same events, in the same order.
            for (line, like) in lines.iter().zip(&likes) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["$type"], "message", "{line}");
                assert_eq!(v["payload"]["seq"].as_u64(), Some(time_of(like)), "{line}");
            }
        } else if let Some((a, b)) = lines.iter().zip(&likes).find(|(a, b)| a != *b) {
            panic!("tail printed\n{a}\nwhere the server has\n{b}");
        }
        // Ctrl-C: a clean exit that names the cursor to resume from.
        common::process::signal(child.id(), 2);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tail exited with {:?}: {stderr}", out.status);
        // The last printed event, or a cursor message after it (the stream may have passed
        // events the filter skipped), and never beyond the log.
        let resume: u64 = stderr
            .split("resume with --cursor ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("stderr names no cursor: {stderr}"));
        let (printed, newest) = (time_of(likes.last().unwrap()), time_of(log.last().unwrap()));
        assert!((printed..=newest).contains(&resume), "resume cursor {resume} outside {printed}..={newest}");
    }
    // Output that cannot be written (a full disk): the tail stops with the error and names no
    // cursor past what reached stdout (here nothing did: the cursor it started from). Before, it named the last event
    // received, and a resume skipped everything that never got out.
    let out = std::process::Command::new(bin())
        .args(["tail", &format!("ws://{}", primary.public), "--cursor", "0"])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    let resume = stderr.split("resume with --cursor ").nth(1).and_then(|r| r.split_whitespace().next());
    assert_eq!(resume, Some("0"), "resume where it started, not past events never written: {stderr}");
    // A filter the client can tell is wrong, and one only the server refuses: a clear error
    // and a failing exit, not a retry loop.
    for (collection, says) in [("not a collection", "invalid filter"), ("bad..nsid", "refused the subscription")] {
        let out = std::process::Command::new(bin())
            .args(["tail", &format!("ws://{}", primary.public), "--collections", collection])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{collection:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_subscription_through_a_proxy_that_wants_a_token_fetches_its_dictionary_with_it() {
    let gen = generate(1, 300, 20, 41);
    let relay = relay_with(&gen).await;
    let pd = tempfile::tempdir().unwrap();
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(300, Duration::from_secs(30));
    let want = inspect_log(pd.path()).len();
    // Every request without the token gets a 403: the upgrade, and the dictionary fetch.
    let gate = common::proxy::Proxy::start_gated(primary.public, "token=s3cret").await;
    for wire in [contrail_client::Wire::V1, contrail_client::Wire::V2] {
        let url = format!(
            "ws://{}{}?token=s3cret",
            gate.addr,
            if wire == contrail_client::Wire::V1 {
                "/subscribe"
            } else {
                "/xrpc/network.bsky.jetstream.subscribeEvents"
            }
        );
        let mut sub = Subscription::builder([url])
            .backoff(Duration::from_millis(50), Duration::from_millis(300))
            .connect_timeout(Duration::from_secs(2))
            .wire(wire)
            .compress(true)
            .cursor(Some(1_000_000_000_000_000))
            .start()
            .unwrap();
        take_events(&mut sub, want).await;
        assert_eq!(sub.stats().connections.load(std::sync::atomic::Ordering::Relaxed), 1, "{wire:?}");
    }
}

/// A saved cursor the server's log no longer reaches (its retention deleted what followed): the
/// subscription hands over the gap, counted, before the oldest event left — compressed like the
/// events — and `process` saves past it, so a restart is not told it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_server_tells_is_handed_over_and_saved_past() {
    let first = generate(1, 200, 20, 41);
    let relay = relay_with(&first).await;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-events-per-second-per-ip", "0", "--retention", "1s", "--trim-interval", "100ms"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(first.last().unwrap().seq, Duration::from_secs(30));
    let log = inspect_log(dir.path());
    let (saved, first_last) = (time_of(&log[10]), time_of(log.last().unwrap()));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    relay.push_all(&generate(1_000, 50, 20, 42));
    serve.wait_for_seq(1_049, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    let oldest = loop {
        let oldest = time_of(&inspect_log(dir.path())[0]);
        if oldest > first_last {
            break oldest;
        }
        assert!(Instant::now() < deadline, "retention never trimmed the first batch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut sub = builder(&[&serve]).cursor(Some(saved)).compress(true).start().unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    assert_eq!(m, contrail_client::Message::Gap { after_us: saved, through_us: first_last });
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    assert!(matches!(&m, contrail_client::Message::Event(e) if e.time_us() == oldest), "{m:?}");
    assert_eq!(sub.stats().gaps.load(std::sync::atomic::Ordering::Relaxed), 1);
    // On v2 the same, from the range the `#info OutdatedCursor` carries in fields.
    let mut sub = builder(&[&serve]).wire(contrail_client::Wire::V2).cursor(Some(saved)).start().unwrap();
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    assert_eq!(m, contrail_client::Message::Gap { after_us: saved, through_us: first_last });
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    assert!(matches!(&m, contrail_client::Message::Event(e) if e.time_us() == oldest), "{m:?}");
    // `process` saves past the gap before any event: a handler failing on the first event
    // leaves the cursor at the gap's end, not at the old one.
    let cursor_dir = tempfile::tempdir().unwrap();
    let store = FileCursorStore::new(cursor_dir.path().join("failing"));
    store.clone().save(saved).unwrap();
    let sub = builder(&[&serve]).cursor(Some(saved)).start().unwrap();
    let failing = |_: Event| async { Err::<(), _>(std::io::Error::other("not now")) };
    let opts = ProcessOptions { save_interval: Duration::ZERO, ..ProcessOptions::default() };
    let run = process(sub, store.clone(), opts, failing, std::future::pending());
    let ended = tokio::time::timeout(Duration::from_secs(10), run).await.expect("the handler's error ends the run");
    assert!(matches!(ended, Err(ProcessError::Handler(_))), "{ended:?}");
    assert_eq!(store.load().unwrap(), Some(first_last));
    // `process` from the same saved cursor: the gap moves the saved position, the events follow.
    let store = FileCursorStore::new(cursor_dir.path().join("cursor"));
    store.clone().save(saved).unwrap();
    let collector = Collector::default();
    let last = newest(&serve);
    let sub = builder(&[&serve]).cursor(Some(saved)).start().unwrap();
    run_until(sub, store.clone(), &collector, false, move |e, _| e.time_us() >= last).await;
    assert!(collector.take() == inspect_log(dir.path()), "the events after the gap, all of them");
    assert_eq!(store.load().unwrap(), Some(last));
    // `contrail tail` says the gap on stderr; stdout stays the events.
    let mut child = std::process::Command::new(bin())
        .args(["tail", &format!("ws://{}", serve.public), "--cursor", &saved.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let first = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout).lines().next().and_then(Result::ok)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !first.is_finished() {
        assert!(Instant::now() < deadline, "contrail tail printed nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = first.join().unwrap().expect("a line");
    common::process::signal(child.id(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("contrail tail did not stop on SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(time_of(&first), oldest, "{first}");
    let says = format!("no longer held the events after {saved} through {first_last}");
    assert!(stderr.contains(&says), "{stderr}");
}

/// A saved cursor that the first host of the list no longer reaches (a replica with a shorter
/// history, listed first as the nearest) while another still has what follows it: the
/// subscription takes the events from that one, with no gap. With no other host that has them
/// (here one that cannot be reached), the gap is handed over after every host was tried once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_on_one_host_is_filled_from_another_that_still_has_the_events() {
    let relay = relay_with(&generate(1, 200, 20, 43)).await;
    let (pd, rd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let primary = Serve::start(pd.path(), &relay.url(), FLAGS);
    primary.wait_for_seq(200, Duration::from_secs(30));
    let upstream = format!("ws://{}", primary.public);
    let replica_flags = ["--upstream-url", &upstream, "--retention", "1s", "--trim-interval", "100ms"];
    let mut replica = Serve::start(rd.path(), "ws://127.0.0.1:9", &[FLAGS, &replica_flags[..]].concat());
    let log = inspect_log(pd.path());
    let (saved, first_last) = (time_of(&log[10]), time_of(log.last().unwrap()));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    relay.push_all(&generate(1_000, 50, 20, 44));
    primary.wait_for_seq(1_049, Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(20);
    while (replica.metric("contrail_store_oldest_time_us").unwrap_or(0.0) as u64) <= first_last
        || newest(&replica) != newest(&primary)
    {
        assert!(Instant::now() < deadline, "the replica never caught up and trimmed the first batch");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replica_oldest = replica.metric("contrail_store_oldest_time_us").unwrap() as u64;
    let last = newest(&primary);
    let want: Vec<String> = inspect_log(pd.path()).into_iter().filter(|l| time_of(l) > saved).collect();
    let mut sub = builder(&[&replica, &primary]).cursor(Some(saved)).start().unwrap();
    let mut got: Vec<String> = Vec::new();
    while got.last().is_none_or(|l| time_of(l) < last) {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap() {
            contrail_client::Message::Event(e) => got.push(e.json().to_string()),
            contrail_client::Message::Cursor(_) => {}
            other => panic!("{other:?} after {} events", got.len()),
        }
    }
    assert!(got == want, "every event after the cursor, from the primary ({} of {})", got.len(), want.len());
    assert_eq!(sub.stats().gaps.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(sub.stats().host.load(std::sync::atomic::Ordering::Relaxed), 1, "on the primary");
    // The other host cannot be reached: the replica's gap, once both were tried.
    let hosts = [format!("ws://{}", replica.public), "ws://127.0.0.1:9".to_string()];
    // It is waited for first, for the stale timeout (a restart would pass sooner).
    let limited = || {
        Subscription::builder(hosts.clone())
            .backoff(Duration::from_millis(50), Duration::from_millis(300))
            .connect_timeout(Duration::from_secs(2))
            .stale_timeout(Duration::from_secs(2))
            .max_attempts(3)
            .cursor(Some(saved))
            .start()
            .unwrap()
    };
    let mut sub = limited();
    let asked = Instant::now();
    let m = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.unwrap().unwrap();
    assert_eq!(m, contrail_client::Message::Gap { after_us: saved, through_us: first_last });
    assert!(asked.elapsed() >= Duration::from_secs(2), "taken after {:?}", asked.elapsed());
    assert_eq!(sub.stats().gaps.load(std::sync::atomic::Ordering::Relaxed), 1);
    let m = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap();
    assert!(matches!(&m, contrail_client::Message::Event(e) if e.time_us() == replica_oldest), "{m:?}");
    // Every host out of reach: the one that told the gap goes down while the other is waited
    // for. The subscription ends after its attempts, with nothing handed over, rather than
    // searching for ever.
    let mut sub = limited();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sub.stats().host.load(std::sync::atomic::Ordering::Relaxed) != 1 {
        assert!(Instant::now() < deadline, "the replica never told its gap");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    replica.kill9();
    let ended = tokio::time::timeout(Duration::from_secs(30), sub.next()).await.expect("the subscription ends");
    assert!(matches!(ended, Err(contrail_client::Error::Unreachable { attempts: 3, .. })), "{ended:?}");
}

/// A subscription started live whose first connection ends before anything arrived resumes
/// from its start on the server's clock (the upgrade's `contrail-start-cursor`), not on this
/// machine's. Here the server is a replica catching up, an hour behind this clock, and the
/// first connection is cut right after the upgrade (before the first cursor message). Before,
/// the reconnect asked for a second before the start by this clock: an hour past every event
/// the replica took after it, and all of them were skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_start_resumes_from_the_servers_start_cursor_not_this_clock() {
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = FakeRelay::start().await;
    upstream.set_faults(Faults { text: true, ..Faults::default() });
    let t = now_us() - 3_600_000_000;
    for i in 0..3 {
        upstream.push(t + i, like_line(t + i));
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream_url = upstream.url();
    let args = ["--upstream-url", &upstream_url, "--upstream-compress", "false", "--max-events-per-second-per-ip", "0"];
    let replica = Serve::start(dir.path(), "ws://127.0.0.1:9", &args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while newest(&replica) != (t + 2) as u64 {
        assert!(Instant::now() < deadline, "the replica never stored its first events");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The upgrade's head: the cursor after the newest event (none with a cursor of one's own).
    let upgrade_head = |query: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(replica.public).await.unwrap();
        let request = format!("GET /subscribe{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.unwrap());
        }
        String::from_utf8(head).unwrap()
    };
    let head = upgrade_head("").await;
    assert!(head.contains(&format!("\r\ncontrail-start-cursor: {}\r\n", t + 3)), "{head}");
    assert!(!upgrade_head("?cursor=1").await.contains("contrail-start-cursor"));
    // Through a proxy that cuts the first connection right after that head.
    let proxy = Proxy::start(replica.public).await;
    proxy.cut_next_after_head();
    let mut sub = Subscription::builder([format!("ws://{}", proxy.addr)])
        .backoff(Duration::from_millis(50), Duration::from_millis(300))
        .connect_timeout(Duration::from_secs(2))
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sub.stats().connections.load(Relaxed) == 0 {
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Then the replica takes three more events; the reconnect must bring them.
    for i in 10..13 {
        upstream.push(t + i, like_line(t + i));
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(20), sub.next()).await;
        match message {
            Ok(Ok(contrail_client::Message::Event(e))) => got.push(e.time_us()),
            Ok(Ok(contrail_client::Message::Cursor(_))) => {}
            other => panic!("after {got:?}: {other:?}"),
        }
    }
    assert_eq!(got, [t + 10, t + 11, t + 12].map(|t| t as u64));
    assert_eq!(sub.stats().connections.load(Relaxed), 2, "the first connection brought nothing");
}
