//! kill -9 of the server while 50 subscribers replay the log: within each connection no event
//! comes twice or out of order, what arrived before the kill is exactly the log from the
//! cursor, and each subscriber that reconnects with its last `time_us` gets the rest — the
//! whole log, exactly once.

mod common;

use common::client::{connect, next, Msg};
use common::frames::generate;
use common::process::{inspect_log, Serve};
use common::relay::FakeRelay;
use std::time::Duration;

fn time_of(line: &str) -> u64 {
    let i = line.find("\"time_us\":").unwrap();
    line[i + 10..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_replay_to_50_subscribers_loses_and_repeats_nothing() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 20_000, 200, 61);
    relay.push_all(&gen);
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--max-events-per-second-per-ip", "0", "--max-connects-per-second-per-ip", "0"];
    let mut serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(60));
    let public = serve.public;
    drop(relay); // nothing more to ingest: the log is what it is
    let log = inspect_log(dir.path());
    // 50 subscribers replaying from the oldest event, each reading at its own pace.
    let mut clients = Vec::new();
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..50u64 {
        let ws = connect(public, "/subscribe?cursor=0", &[]).await.unwrap();
        let started = started.clone();
        clients.push(tokio::spawn(async move {
            let mut ws = ws;
            let mut got = Vec::new();
            loop {
                match next(&mut ws, Duration::from_secs(10)).await {
                    Some(Msg::Text(t)) => {
                        if got.is_empty() {
                            started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        got.push(t);
                        // Each at its own pace, slower than the server writes, so the kill
                        // finds replays under way (the socket buffers hold a few MB each).
                        if got.len() % 20 == 0 {
                            tokio::time::sleep(Duration::from_millis(1 + i % 5)).await;
                        }
                    }
                    // The kill ends every connection; what arrived is checked below.
                    _ => return got,
                }
            }
        }));
    }
    // Once (nearly) every replay is under way: a loaded machine starts them slowly.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while started.load(std::sync::atomic::Ordering::SeqCst) < 45 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    serve.kill9();
    let before: Vec<Vec<String>> = futures_join(clients).await;
    let cut = before.iter().filter(|g| !g.is_empty() && g.len() < log.len()).count();
    assert!(cut >= 25, "only {cut} replays were cut mid-way by the kill");
    // Back on the same address with the same log.
    let serve =
        Serve::start(dir.path(), "ws://127.0.0.1:9", &[&flags[..], &["--listen", &public.to_string()]].concat());
    for (i, got) in before.into_iter().enumerate() {
        // Before the kill: a prefix of the log, no repeat, no reordering.
        assert!(got.len() <= log.len() && got[..] == log[..got.len()], "client {i}: not a prefix of the log");
        // Resume with the last time_us (inclusive: that event comes first again).
        let (query, skip) = match got.last() {
            Some(l) => (format!("/subscribe?cursor={}", time_of(l)), 1),
            None => ("/subscribe?cursor=0".to_string(), 0),
        };
        let mut ws = connect(serve.public, &query, &[]).await.unwrap();
        let mut rest = Vec::new();
        while got.len() + rest.len() < log.len() + skip {
            match next(&mut ws, Duration::from_secs(10)).await {
                Some(Msg::Text(t)) => rest.push(t),
                other => panic!("client {i} after the restart: {other:?} with {} events", got.len() + rest.len()),
            }
        }
        if skip == 1 {
            assert_eq!(rest[0], *got.last().unwrap(), "client {i}: the inclusive cursor's event");
        }
        let whole: Vec<&String> = got.iter().chain(rest.iter().skip(skip)).collect();
        assert!(
            whole.len() == log.len() && whole.iter().zip(&log).all(|(a, b)| *a == b),
            "client {i}: not the log exactly once"
        );
    }
}

async fn futures_join<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
