//! Jetstream v2's wire (`/xrpc/network.bsky.jetstream.subscribeEvents`) end to end: the real
//! binary, a fake relay, real websocket clients; and `#sync` on both wires.

mod common;

use common::client::{connect, next, send_text, Msg};
use common::frames::{generate, sync_frame};
use common::process::{http_get_with, inspect_log, Serve};
use common::relay::FakeRelay;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);
const PATH: &str = "/xrpc/network.bsky.jetstream.subscribeEvents";
const WS: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

struct Setup {
    _relay: FakeRelay,
    _dir: tempfile::TempDir,
    serve: Serve,
    /// The v1 log, oldest first.
    log: Vec<serde_json::Value>,
    sync_did: String,
}

/// A server with `n` generated frames and one `#sync` frame at the end.
async fn setup(n: usize) -> Setup {
    let relay = FakeRelay::start().await;
    let gen = generate(1, n, 20, 61);
    relay.push_all(&gen);
    let sync_did = gen[0].expected[0].0.clone();
    relay.push(n as i64 + 1, sync_frame(n as i64 + 1, &sync_did));
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    serve.wait_for_seq(n as i64 + 1, Duration::from_secs(60));
    let log = inspect_log(dir.path()).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    Setup { _relay: relay, _dir: dir, serve, log, sync_did }
}

/// The next `n` v2 payloads (text frames, or zstd frames decoded with `dict`).
async fn payloads(ws: &mut common::client::Ws, n: usize, dict: Option<&[u8]>) -> Vec<serde_json::Value> {
    let mut dec = dict.map(|d| zstd::bulk::Decompressor::with_dictionary(d).unwrap());
    let mut out = Vec::new();
    while out.len() < n {
        let bytes = match (next(ws, T).await, dec.as_mut()) {
            (Some(Msg::Text(t)), None) => t.into_bytes(),
            (Some(Msg::Binary(b)), Some(d)) => d.decompress(&b, 1 << 24).unwrap(),
            (other, _) => panic!("after {} messages: {other:?}", out.len()),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["$type"], "message", "{v}");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["$type", "payload"], "the envelope has exactly two keys");
        out.push(v["payload"].clone());
    }
    out
}

/// What the v2 payload of a v1 event must say.
fn check_against_v1(p: &serde_json::Value, v1: &serde_json::Value) {
    let kind = v1["kind"].as_str().unwrap();
    assert_eq!(p["$type"], format!("network.bsky.jetstream.subscribeEvents#{kind}"));
    assert_eq!(p["seq"], v1["time_us"], "seq is the time_us");
    assert_eq!(p["did"], v1["did"]);
    assert!(p["time"].as_str().unwrap().ends_with('Z') && p["time"].as_str().unwrap().len() == 27, "{p}");
    match kind {
        "commit" => {
            for k in ["collection", "operation", "rkey", "rev", "record", "cid"] {
                assert_eq!(p[k], v1["commit"][k], "{k}");
            }
        }
        other => assert_eq!(p[other], v1[other]),
    }
}

/// The status line and headers of the answer to a GET of `path` with `headers`.
fn response_head(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    tcp.write_all(format!("{req}\r\n").as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    text.split_once("\r\n\r\n").map_or(text.clone(), |(head, _)| format!("{head}\r\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_refuses_bad_requests_with_named_xrpc_errors() {
    let s = setup(10).await;
    for (q, status, name, message) in [
        ("wantedDids=did:plc:x", 400, "InvalidRequest", "subscribe: invalid options: wantedDids is the legacy /subscribe parameter; use dids"),
        ("requireHello=true", 400, "InvalidRequest", "subscribe: invalid options: requireHello is not supported on this endpoint; it is server-push only (subscriber-sourced messages were removed)"),
        ("kinds=commit&kinds=bogus", 400, "InvalidRequest", "subscribe: invalid options: unknown kind \"bogus\" (valid: commit, identity, account, sync)"),
        ("compress=true", 400, "InvalidRequest", "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses zstdDictionary=<id> with the dictionary from getZstdDictionary"),
        ("zstdDictionary=7", 400, "UnknownZstdDictionary", "unknown zstd dictionary id 7; current dictionary id is 20261125 (fetch it via getZstdDictionary and reconnect)"),
        ("cursor=5", 400, "CursorTooOld", ""),
    ] {
        let (got_status, body) = http_get_with(s.serve.public, &format!("{PATH}?{q}"), &WS).unwrap();
        assert_eq!(got_status, status, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: {e}: {body}"));
        assert_eq!(v["error"], name, "{q}");
        if !message.is_empty() {
            assert_eq!(v["message"], message, "{q}");
        } else {
            assert!(v["message"].as_str().unwrap().starts_with("subscribe: cursor too old: cursor 5 below lookback floor "));
        }
    }
    // The value refused is quoted, not whole (a request line may be 1 MiB long).
    let q = format!("dids=did:plc:{}", "!".repeat(300_000));
    let (status, body) = http_get_with(s.serve.public, &format!("{PATH}?{q}"), &WS).unwrap();
    assert_eq!(status, 400);
    assert!(body.len() < 1024, "{} bytes", body.len());
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let message = v["message"].as_str().unwrap();
    assert!(message.starts_with("subscribe: invalid options: invalid DID: did:plc:!!!"), "{message}");
    assert!(message.ends_with(" more bytes)"), "{message}");
    // An upgrade fastwebsockets refuses (another websocket version) is answered as XRPC too,
    // with 426 (RFC 6455 4.4: the version spoken here goes with it), and counted.
    let bad_requests = || s.serve.metric("contrail_hub_rejected_requests_total{reason=\"bad_request\"}").unwrap();
    let before = bad_requests();
    let old_version = [WS[0], WS[1], WS[2], ("Sec-WebSocket-Version", "8")];
    let (status, body) = http_get_with(s.serve.public, PATH, &old_version).unwrap();
    assert_eq!(status, 426, "{body}");
    assert_eq!(bad_requests(), before + 1.0);
    let head = response_head(s.serve.public, PATH, &old_version);
    assert!(
        head.contains("\r\nsec-websocket-version: 13\r\n") && head.contains("\r\nupgrade: websocket\r\n"),
        "{head}"
    );
    // On v1 too; and without a key the request is not one to retry with another version.
    let head = response_head(s.serve.public, "/subscribe", &old_version);
    assert!(head.starts_with("HTTP/1.1 426") && head.contains("\r\nsec-websocket-version: 13\r\n"), "{head}");
    let keyless = [WS[0], WS[1], ("Sec-WebSocket-Version", "8")];
    assert!(response_head(s.serve.public, "/subscribe", &keyless).starts_with("HTTP/1.1 400"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"], "InvalidRequest");
    assert!(v["message"].as_str().unwrap().starts_with("bad websocket handshake"), "{v}");
    // A v2 method this server does not have (the archive's backfill).
    let (status, body) = http_get_with(s.serve.public, "/xrpc/network.bsky.jetstream.planSnapshot", &[]).unwrap();
    assert_eq!(status, 501, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"], "MethodNotImplemented");
    // getZstdDictionary: the current one, by id, and the XRPC errors.
    let (status, body) =
        http_get_with(s.serve.public, "/xrpc/network.bsky.jetstream.getZstdDictionary?id=9", &[]).unwrap();
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"], "DictionaryNotFound");
    assert_eq!(
        http_get_with(s.serve.public, "/xrpc/network.bsky.jetstream.getZstdDictionary?id=x", &[]).unwrap().0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_streams_the_log_as_v2_messages_with_filters_and_resume() {
    let s = setup(300).await;
    let n = s.log.len();
    assert_eq!(s.log.last().unwrap()["kind"], "sync", "the #sync frame was stored");
    // An old timestamp cursor: an #info OutdatedCursor first, then every event, sync included.
    let mut ws = connect(s.serve.public, &format!("{PATH}?cursor=1000000000000000"), &[]).await.unwrap();
    let got = payloads(&mut ws, n + 1, None).await;
    assert_eq!(got[0]["$type"], "network.bsky.jetstream.subscribeEvents#info");
    assert_eq!(got[0]["name"], "OutdatedCursor");
    // The lowest timestamp cursor is "from the start": no range is said to be lost.
    assert!(got[0].get("afterSeq").is_none() && got[0].get("throughSeq").is_none(), "{}", got[0]);
    for (p, v1) in got[1..].iter().zip(&s.log) {
        check_against_v1(p, v1);
    }
    // Any other cursor before the oldest event: the range lost, in fields too (Contrail's).
    let oldest = s.log[0]["time_us"].as_u64().unwrap();
    let mut ws = connect(s.serve.public, &format!("{PATH}?cursor=1000000000000001"), &[]).await.unwrap();
    let got = payloads(&mut ws, 2, None).await;
    assert_eq!(got[0]["name"], "OutdatedCursor");
    assert_eq!((&got[0]["afterSeq"], &got[0]["throughSeq"]), (&1_000_000_000_000_000u64.into(), &(oldest - 1).into()));
    check_against_v1(&got[1], &s.log[0]);
    // Resume from a seq: inclusive, exactly from there.
    let k = n / 2;
    let seq = s.log[k]["time_us"].as_u64().unwrap();
    let mut ws = connect(s.serve.public, &format!("{PATH}?cursor={seq}"), &[]).await.unwrap();
    let got = payloads(&mut ws, n - k, None).await;
    assert_eq!(got[0]["seq"], seq);
    assert_eq!(got.last().unwrap()["seq"], s.log[n - 1]["time_us"]);
    // Filters: kinds, and collections that never drop non-commit kinds.
    let mut ws =
        connect(s.serve.public, &format!("{PATH}?cursor={}&kinds=sync", s.log[0]["time_us"]), &[]).await.unwrap();
    let got = payloads(&mut ws, 1, None).await;
    assert_eq!(
        (got[0]["$type"].as_str().unwrap(), got[0]["did"].as_str().unwrap()),
        ("network.bsky.jetstream.subscribeEvents#sync", s.sync_did.as_str())
    );
    let q = format!("{PATH}?cursor={}&collections=app.bsky.feed.post&dids={}", s.log[0]["time_us"], s.sync_did);
    let want: Vec<&serde_json::Value> = s
        .log
        .iter()
        .filter(|e| {
            e["did"] == s.sync_did.as_str()
                && (e["kind"] != "commit" || e["commit"]["collection"] == "app.bsky.feed.post")
        })
        .collect();
    let mut ws = connect(s.serve.public, &q, &[]).await.unwrap();
    let got = payloads(&mut ws, want.len(), None).await;
    for (p, v1) in got.iter().zip(want) {
        check_against_v1(p, v1);
    }
    assert!(next(&mut ws, Duration::from_millis(300)).await.is_none(), "nothing else matches");
    // A data frame from the client ends the connection (server-push only).
    send_text(&mut ws, r#"{"type":"options_update"}"#).await;
    assert_eq!(next(&mut ws, T).await, Some(Msg::Close(1008, "unexpected data message".into())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_compression_uses_the_dictionary_from_get_zstd_dictionary() {
    let s = setup(200).await;
    let n = s.log.len();
    let (status, dict) = {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(s.serve.public).unwrap();
        stream
            .write_all(
                b"GET /xrpc/network.bsky.jetstream.getZstdDictionary HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..at]).to_lowercase();
        assert!(head.contains("x-zstd-dictionary-id: 20261125"), "{head}");
        (String::from_utf8_lossy(&raw[9..12]).to_string(), raw[at + 4..].to_vec())
    };
    assert_eq!(status, "200");
    let cursor = s.log[0]["time_us"].as_u64().unwrap();
    let mut plain = connect(s.serve.public, &format!("{PATH}?cursor={cursor}"), &[]).await.unwrap();
    let mut zstd =
        connect(s.serve.public, &format!("{PATH}?cursor={cursor}&zstdDictionary=20261125"), &[]).await.unwrap();
    let (a, b) = tokio::join!(payloads(&mut plain, n, None), payloads(&mut zstd, n, Some(&dict)));
    assert_eq!(a, b, "compressed messages decode to the plain ones");
    // The subprotocol is echoed when offered.
    let (status, _) = http_get_with(s.serve.public, PATH, &[]).unwrap();
    assert_eq!(status, 400, "not a websocket upgrade");
    use std::io::{Read, Write};
    let mut raw = std::net::TcpStream::connect(s.serve.public).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    raw.write_all(format!("GET {PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xrpc.v1.json\r\n\r\n").as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = raw.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("sec-websocket-protocol: xrpc.v1.json"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_events_reach_v1_clients_only_when_asked() {
    let s = setup(50).await;
    let n = s.log.len();
    let kinds = |got: &[serde_json::Value]| got.iter().filter(|e| e["kind"] == "sync").count();
    // A strict v1 client never sees the sync event.
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let got = common::client::collect(&mut ws, n - 1, T).await;
    assert_eq!((got.len(), kinds(&got)), (n - 1, 0));
    assert!(next(&mut ws, Duration::from_millis(300)).await.is_none());
    // includeSync=true in the query...
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&includeSync=true", &[]).await.unwrap();
    let got = common::client::collect(&mut ws, n, T).await;
    assert_eq!(kinds(&got), 1);
    assert_eq!(got.last().unwrap(), s.log.last().unwrap());
    // ...or in an options_update (after the hello).
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&requireHello=true", &[]).await.unwrap();
    send_text(&mut ws, r#"{"type":"options_update","payload":{"includeSync":true}}"#).await;
    let got = common::client::collect(&mut ws, n, T).await;
    assert_eq!(kinds(&got), 1);
}

/// Opens a websocket writing its own request line (the `http` crate's URI, which the other
/// helpers build on, stops at 64 KiB); the status, and the socket once upgraded.
async fn connect_long_url(
    addr: std::net::SocketAddr,
    path_and_query: &str,
) -> (u16, Option<fastwebsockets::FragmentCollector<tokio::net::TcpStream>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path_and_query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
    // A refusal may come (and the connection close) before the whole line is written.
    let _ = tcp.write_all(head.as_bytes()).await;
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(T, tcp.read(&mut b)).await.expect("an answer in time") {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    let status = String::from_utf8_lossy(&got).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let ws = (status == 101).then(|| {
        fastwebsockets::FragmentCollector::new(fastwebsockets::WebSocket::after_handshake(
            tcp,
            fastwebsockets::Role::Client,
        ))
    });
    (status, ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_longer_than_hyper_takes_are_served_on_both_wires() {
    let s = setup(200).await;
    let did = s.sync_did.clone();
    let cursor = s.log[0]["time_us"].as_u64().unwrap();
    let want: Vec<u64> = s
        .log
        .iter()
        .filter(|e| e["did"] == did.as_str() && e["kind"] != "sync")
        .map(|e| e["time_us"].as_u64().unwrap())
        .collect();
    assert!(!want.is_empty());
    // 5,000 DIDs, `:` escaped as Go's client does: ~230 KB, past hyper's 64 KiB.
    let others: Vec<String> = (0..4_999).map(|i| format!("did:plc:{i:024}")).collect();
    let list = |key: &str, escape: bool| {
        let enc = |d: &str| if escape { d.replace(':', "%3A") } else { d.to_string() };
        others.iter().chain([&did]).map(|d| format!("{key}={}", enc(d))).collect::<Vec<_>>().join("&")
    };
    // Each wire's events from a long URL: (did, time_us) of the first `want.len()` of them.
    let events = |path: String, did_at: &'static str, time_at: &'static str| {
        let (addr, n) = (s.serve.public, want.len());
        async move {
            let (status, ws) = connect_long_url(addr, &path).await;
            assert_eq!(status, 101, "{}", &path[..80]);
            let mut ws = ws.unwrap();
            let mut got = Vec::new();
            while got.len() < n {
                let f = tokio::time::timeout(T, ws.read_frame()).await.expect("events in time").unwrap();
                let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                let (d, t) = (v.pointer(did_at).cloned(), v.pointer(time_at).and_then(|t| t.as_u64()));
                got.push((d.unwrap().as_str().unwrap().to_string(), t.unwrap()));
            }
            got
        }
    };
    let want: Vec<(String, u64)> = want.iter().map(|&t| (did.clone(), t)).collect();
    // v2 (`dids`), which takes no client messages: the URL is the only way.
    let v2 = events(format!("{PATH}?cursor={cursor}&{}", list("dids", true)), "/payload/did", "/payload/seq");
    assert_eq!(v2.await, want);
    // v1 (`wantedDids`).
    let v1 = events(format!("/subscribe?cursor={cursor}&{}", list("wantedDids", false)), "/did", "/time_us");
    assert_eq!(v1.await, want);
    // Past the 1 MiB a request line may take: an HTTP error, not an upgrade or a hang.
    let many: String = (0..30_000).map(|i| format!("&wantedDids=did:plc:{i:024}")).collect();
    let (status, ws) = connect_long_url(s.serve.public, &format!("/subscribe?cursor={cursor}{many}")).await;
    assert!(ws.is_none() && (400..500).contains(&status), "{status}");
}

/// A live start's upgrade says where it started (`contrail-start-cursor`: the newest event's
/// `time_us` plus one) on both wires; an upgrade with a cursor does not. On an empty log it is
/// the lowest cursor each wire reads as "from the start", and taken back without a gap (v2
/// refuses a cursor below 10^15 as another server's seq).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_upgrade_says_its_start_cursor_on_both_wires() {
    use std::io::{Read, Write};
    let head = |addr: std::net::SocketAddr, target: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut request = format!("GET {target} HTTP/1.1\r\nHost: x\r\n");
        for (k, v) in WS {
            request += &format!("{k}: {v}\r\n");
        }
        s.write_all(format!("{request}\r\n").as_bytes()).unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).unwrap(), 1, "{}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        head.lines().find_map(|l| l.strip_prefix("contrail-start-cursor: ")).map(|v| v.parse::<u64>().unwrap())
    };
    let s = setup(50).await;
    let newest = s.log.last().unwrap()["time_us"].as_u64().unwrap();
    for path in ["/subscribe", PATH] {
        assert_eq!(head(s.serve.public, path), Some(newest + 1), "{path}");
        assert_eq!(head(s.serve.public, &format!("{path}?cursor={newest}")), None, "{path}");
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = Serve::start(dir.path(), "ws://127.0.0.1:9", &[]);
    for (path, want) in [("/subscribe", 1u64), (PATH, 1_000_000_000_000_000)] {
        assert_eq!(head(empty.public, path), Some(want), "{path}");
        assert_eq!(head(empty.public, &format!("{path}?cursor={want}")), None, "{path}");
    }
    // Taken back by a log that has events since: from its start, no range said lost.
    let mut ws = connect(s.serve.public, &format!("{PATH}?cursor=1000000000000000"), &[]).await.unwrap();
    let got = payloads(&mut ws, 1, None).await;
    assert_eq!(got[0]["name"], "OutdatedCursor");
    assert!(got[0].get("afterSeq").is_none(), "{}", got[0]);
}
