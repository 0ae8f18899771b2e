//! `/subscribe` end to end: the real binary, a fake relay, real websocket clients.

mod common;

use common::client::{close_of, collect, connect, next, send_text, Msg, Ws};
use common::frames::{did_for, generate, GenFrame};
use common::process::{http_get, inspect_log, Serve};
use common::relay::{FakeRelay, Faults};
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

struct Setup {
    relay: FakeRelay,
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    serve: Serve,
    gen: Vec<GenFrame>,
}

/// A server that has ingested `n` generated frames.
async fn setup(n: usize, extra: &[&str]) -> Setup {
    let relay = FakeRelay::start().await;
    let gen = generate(1, n, 20, 7);
    relay.push_all(&gen);
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--max-events-per-second-per-ip", "0"];
    args.extend_from_slice(extra);
    let serve = Serve::start(dir.path(), &relay.url(), &args);
    serve.wait_for_seq(gen.last().unwrap().seq, Duration::from_secs(60));
    Setup { relay, dir: dir.path().to_path_buf(), _dir: dir, serve, gen }
}

fn log(s: &Setup) -> Vec<serde_json::Value> {
    inspect_log(&s.dir).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_are_400s() {
    let s = setup(5, &[]).await;
    let ws_headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let many_colls: String = (0..101).map(|i| format!("wantedCollections=app.bsky.c{i}.post&")).collect();
    for (q, body) in [
        ("cursor=abc", "invalid cursor: abc"),
        ("wantedCollections=app.bsky.fo*", "invalid subscriber options: invalid collection: app.bsky.fo*"),
        ("wantedDids=notadid", "invalid subscriber options: invalid DID: notadid"),
        (&many_colls, "invalid subscriber options: too many wanted collections"),
        ("informCursorSeconds=601", "invalid informCursorSeconds: 601 (must be 1 to 600)"),
    ] {
        let (status, got) =
            common::process::http_get_with(s.serve.public, &format!("/subscribe?{q}"), &ws_headers).unwrap();
        assert_eq!((status, got.trim()), (400, body), "query {}", &q[..q.len().min(60)]);
    }
    // The value refused is quoted, not whole (a request line may be 1 MiB long): before, an
    // answer that a client never read held all of it as long as its connection lasted.
    let q = format!("wantedDids=did:plc:{}", "!".repeat(300_000));
    let (status, got) =
        common::process::http_get_with(s.serve.public, &format!("/subscribe?{q}"), &ws_headers).unwrap();
    assert_eq!(status, 400);
    assert!(got.starts_with("invalid subscriber options: invalid DID: did:plc:!!!"), "{}", &got[..60]);
    assert!(got.len() < 1024 && got.contains(" more bytes)"), "{} bytes: {}", got.len(), &got[got.len() - 40..]);
    // 10,000 DIDs do not fit in a URL hyper accepts (64 KiB): they go in options_update,
    // where the cap is counted after duplicates are removed.
    let dids =
        |n: u64, f: fn(u64) -> u64| (0..n).map(|i| format!("\"{}\"", did_for(f(i)))).collect::<Vec<_>>().join(",");
    let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    send_text(&mut ws, &format!(r#"{{"type":"options_update","payload":{{"wantedDids":[{}]}}}}"#, dids(10_001, |_| 1)))
        .await;
    assert_eq!(next(&mut ws, Duration::from_millis(500)).await, None, "duplicates counted");
    send_text(&mut ws, &format!(r#"{{"type":"options_update","payload":{{"wantedDids":[{}]}}}}"#, dids(10_001, |i| i)))
        .await;
    assert_eq!(
        next(&mut ws, T).await,
        Some(Msg::Close(1008, "invalid subscriber options: too many wanted DIDs".into()))
    );
    let (status, _) = http_get(s.serve.public, "/subscribe").unwrap();
    assert_eq!(status, 400, "a plain GET is not a websocket");
    assert!(s.serve.metric("contrail_hub_rejected_requests_total{reason=\"bad_request\"}").unwrap() >= 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_returns_the_log_and_filters_select_events() {
    let s = setup(400, &[]).await;
    let all = log(&s);
    // cursor=0: everything, in log order.
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let got = collect(&mut ws, all.len(), T).await;
    assert_eq!(got, all);
    // A cursor is inclusive.
    let mid = all[all.len() / 2]["time_us"].as_u64().unwrap();
    let mut ws = connect(s.serve.public, &format!("/subscribe?cursor={mid}"), &[]).await.unwrap();
    let got = collect(&mut ws, all.len() / 2, T).await;
    assert_eq!(got[0]["time_us"].as_u64().unwrap(), mid);
    // Collections (exact and prefix) and DIDs; identity/account bypass collections only.
    let did = s.gen.iter().find(|g| g.expected[0].1 == "identity").map(|g| g.expected[0].0.clone()).unwrap();
    let q = format!(
        "/subscribe?cursor=0&wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.graph.*&wantedDids={did}"
    );
    let want: Vec<_> = all
        .iter()
        .filter(|e| e["did"] == did.as_str())
        .filter(|e| {
            e["kind"] != "commit"
                || e["commit"]["collection"] == "app.bsky.feed.post"
                || e["commit"]["collection"].as_str().unwrap().starts_with("app.bsky.graph.")
        })
        .cloned()
        .collect();
    assert!(want.iter().any(|e| e["kind"] == "identity"));
    let mut ws = connect(s.serve.public, &q, &[]).await.unwrap();
    assert_eq!(collect(&mut ws, want.len(), T).await, want);
    assert_eq!(next(&mut ws, Duration::from_millis(300)).await, None, "nothing beyond the filter");
    // maxMessageSizeBytes skips larger events.
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&maxMessageSizeBytes=500", &[]).await.unwrap();
    let small: Vec<_> = all.iter().filter(|e| e.to_string().len() <= 500).cloned().collect();
    assert!(small.len() < all.len() && !small.is_empty());
    assert_eq!(collect(&mut ws, small.len(), T).await.len(), small.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_then_options_update_replaces_filters() {
    let s = setup(10, &[]).await;
    let mut ws = connect(s.serve.public, "/subscribe?wantedCollections=app.bsky.feed.like", &[]).await.unwrap();
    wait_live(&s, 1.0);
    let more = generate(1000, 300, 20, 8);
    s.relay.push_all(&more[..150]);
    // Likes, and identity/account events, which bypass wantedCollections.
    let before =
        more[..150].iter().flat_map(|g| &g.expected).filter(|e| e.2 == "app.bsky.feed.like" || e.1 != "commit").count();
    let got = collect(&mut ws, before, T).await;
    assert_eq!(got.len(), before);
    assert!(got.iter().all(|e| e["commit"]["collection"] == "app.bsky.feed.like" || e["kind"] != "commit"));
    // Live writes are counted, and timed from storing to the socket (observed just after the
    // write the client has already read: give it a moment).
    let deadline = std::time::Instant::now() + T;
    while s.serve.metric("contrail_hub_live_delay_seconds_count").unwrap_or(0.0) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no live delay observed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (sum, count) = (
        s.serve.metric("contrail_hub_live_delay_seconds_sum").unwrap(),
        s.serve.metric("contrail_hub_live_delay_seconds_count").unwrap(),
    );
    assert!(sum / count < 5.0, "mean live delay {} s over {count} flushes", sum / count);
    assert!(s.serve.metric("contrail_hub_socket_writes_total").unwrap() >= 1.0);
    // Replace: now only posts (and no more likes).
    // (With cursor messages, whose first, a second later, shows the update was taken.)
    let update =
        r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post"],"informCursorSeconds":1}}"#;
    send_text(&mut ws, update).await;
    // Unknown message types are ignored.
    send_text(&mut ws, r#"{"type":"something_new","payload":{}}"#).await;
    match next(&mut ws, T).await {
        Some(Msg::Text(t)) if t.contains(r#""kind":"cursor""#) => {}
        other => panic!("not a cursor message: {other:?}"),
    }
    s.relay.push_all(&more[150..]);
    let posts_after = more[150..].iter().flat_map(|g| &g.expected).filter(|e| e.2 == "app.bsky.feed.post").count();
    // Posts, and identity/account events (cursor messages are skipped).
    let after =
        more[150..].iter().flat_map(|g| &g.expected).filter(|e| e.2 == "app.bsky.feed.post" || e.1 != "commit").count();
    // (Bounded: the cursor messages keep `collect`'s own silence timeout from ending it.)
    let got = tokio::time::timeout(Duration::from_secs(60), collect(&mut ws, after, T)).await.expect("every event");
    assert_eq!(got.len(), after);
    let posts: Vec<_> = got.iter().filter(|e| e["kind"] == "commit").collect();
    assert!(posts.iter().all(|e| e["commit"]["collection"] == "app.bsky.feed.post"), "old filter still applied");
    assert_eq!(posts.len(), posts_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_hello_holds_delivery() {
    let s = setup(50, &[]).await;
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&requireHello=true", &[]).await.unwrap();
    assert_eq!(next(&mut ws, Duration::from_millis(500)).await, None, "delivered before hello");
    send_text(&mut ws, r#"{"type":"options_update","payload":{}}"#).await;
    let n = log(&s).len();
    assert_eq!(collect(&mut ws, n, T).await.len(), n);
}

/// Client messages are read as v1's Go decoder reads them: member names ignoring case (a
/// misspelt `wantedDIDs` is the DID filter, not an unknown member that would have sent this
/// client every DID), and `{}` is a message of no type: ignored, not a hello, not a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_messages_are_read_as_v1_reads_them() {
    let s = setup(50, &[]).await;
    let all = log(&s);
    let did = all.iter().find(|e| e["kind"] == "commit").unwrap()["did"].as_str().unwrap().to_string();
    let want: Vec<_> = all.iter().filter(|e| e["did"] == did.as_str()).cloned().collect();
    assert!(want.len() < all.len());
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&requireHello=true", &[]).await.unwrap();
    send_text(&mut ws, "{}").await;
    assert_eq!(next(&mut ws, Duration::from_millis(500)).await, None, "`{{}}` is ignored");
    send_text(&mut ws, &format!(r#"{{"Type":"options_update","Payload":{{"wantedDIDs":["{did}"]}}}}"#)).await;
    assert_eq!(collect(&mut ws, want.len(), T).await, want);
    assert_eq!(next(&mut ws, Duration::from_millis(300)).await, None, "only that DID's events");
}

/// A client waiting longer than the pong timeout before its hello is pinged meanwhile (and,
/// answering, kept): what the server writes while waiting reaches the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_to_say_hello_is_pinged_and_kept() {
    // Pongs have 3 s of slack over the ping interval (CI runs many tests on two cores); the
    // wait is longer than the pong timeout, so a server whose pings never leave closes us.
    let s = setup(50, &["--ping-interval", "1s", "--pong-timeout", "4s"]).await;
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&requireHello=true", &[]).await.unwrap();
    // Reading answers the server's pings (the client's auto-pong); nothing else may arrive.
    assert_eq!(next(&mut ws, Duration::from_secs(7)).await, None, "closed or delivered before hello");
    send_text(&mut ws, r#"{"type":"options_update","payload":{}}"#).await;
    let n = log(&s).len();
    assert_eq!(collect(&mut ws, n, T).await.len(), n);
}

/// A client library that sends a whole message over 10 MB gets the 1009 close, not a reset:
/// the server reads and drops the rest of the message (bounded) while its close goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_sent_whole_is_answered_with_1009() {
    use fastwebsockets::{Frame, OpCode, Payload};
    let s = setup(5, &[]).await;
    for _ in 0..3 {
        let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        let big = vec![b' '; 10_000_001];
        // The server may close before the whole message is written.
        let _ = ws.write_frame(Frame::new(true, OpCode::Text, None, Payload::Owned(big))).await;
        let closed = close_of(&mut ws, T).await.map(|(code, _)| code);
        assert_eq!(closed, Some(1009), "the close was lost");
    }
}

/// The slow rule judges a stream from when it starts: a client that says hello later than a
/// window after connecting is not closed as too slow for the time it took (the window used to
/// run from the connection, and a cursor message due at once checked it before any event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_hello_is_not_judged_slow_for_the_wait() {
    // Any stream still reading the log after a window is slow: this one has 50 events to read.
    let flags = ["--slow-window", "3s", "--slow-min-rate", "1000000", "--slow-behind", "0s"];
    let s = setup(50, &flags).await;
    let query = "/subscribe?cursor=0&requireHello=true&informCursorSeconds=1";
    let mut ws = connect(s.serve.public, query, &[]).await.unwrap();
    assert_eq!(next(&mut ws, Duration::from_secs(4)).await, None, "closed or delivered before hello");
    send_text(&mut ws, r#"{"type":"options_update","payload":{}}"#).await;
    let n = log(&s).len();
    let mut events = 0;
    while events < n {
        match next(&mut ws, T).await {
            Some(Msg::Text(t)) if t.starts_with(r#"{"kind":"cursor""#) => {}
            Some(Msg::Text(_)) => events += 1,
            other => panic!("after {events} events: {other:?}"),
        }
    }
}

/// Writes `chunks` of raw bytes to a subscriber's socket (frames a websocket library would not
/// send), `pause` between them, then reads it as a client again.
async fn send_raw(ws: Ws, chunks: &[&[u8]], pause: Duration) -> Ws {
    let mut raw = ws.into_inner();
    for (i, chunk) in chunks.iter().enumerate() {
        if i > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        tokio::io::AsyncWriteExt::write_all(&mut raw, chunk).await.unwrap();
    }
    fastwebsockets::FragmentCollector::new(fastwebsockets::WebSocket::after_handshake(
        raw,
        fastwebsockets::Role::Client,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_messages_close_with_codes() {
    let s = setup(5, &[]).await;
    let cases: [(&str, u16); 2] =
        [("not json", 1007), (r#"{"type":"options_update","payload":{"wantedDids":["nope"]}}"#, 1008)];
    for (msg, code) in cases {
        let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        send_text(&mut ws, msg).await;
        match next(&mut ws, T).await {
            Some(Msg::Close(c, reason)) => {
                assert_eq!(c, code, "{msg}: {reason}");
                assert!(reason.len() <= 123);
            }
            other => panic!("{msg}: expected close, got {other:?}"),
        }
    }
    // A message over 10 MB: only its frame header is sent (the server refuses it from the
    // header alone), so no unread bytes turn the server's close into a reset.
    use std::io::{Read, Write};
    let mut raw = raw_subscriber(s.serve.public).await.into_std().unwrap();
    raw.set_nonblocking(false).unwrap();
    raw.set_read_timeout(Some(T)).unwrap();
    let mut buf = [0u8; 4096];
    let mut header = vec![0x81, 0xff];
    header.extend_from_slice(&10_000_001u64.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.write_all(&header).unwrap();
    let mut frame = Vec::new();
    while frame.len() < 4 {
        let n = raw.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed without a close frame");
        frame.extend_from_slice(&buf[..n]);
    }
    assert_eq!(frame[0], 0x88, "expected a close frame");
    assert_eq!(u16::from_be_bytes([frame[2], frame[3]]), 1009);
    // A ping flood: answered up to a keep-alive's needs, then closed with 1008.
    let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    for _ in 0..200 {
        let ping = fastwebsockets::Frame::new(
            true,
            fastwebsockets::OpCode::Ping,
            None,
            fastwebsockets::Payload::Borrowed(b"p"),
        );
        if ws.write_frame(ping).await.is_err() {
            break; // closed already
        }
    }
    match next(&mut ws, T).await {
        Some(Msg::Close(1008, reason)) => assert_eq!(reason, "too many pings"),
        other => panic!("a ping flood: expected close 1008, got {other:?}"),
    }
    wait_closes(&s, "ping_flood", 1.0);
    // Floods of what the server ignores (unsolicited pongs, text that is not an
    // options_update, v1 binary messages): closed with 1008 too. A few are fine.
    let floods: [(fastwebsockets::OpCode, &[u8]); 3] = [
        (fastwebsockets::OpCode::Pong, b"p"),
        (fastwebsockets::OpCode::Text, br#"{"type":"hello","payload":{}}"#),
        (fastwebsockets::OpCode::Binary, b"\x01\x02"),
    ];
    for (opcode, payload) in floods {
        let frame = || fastwebsockets::Frame::new(true, opcode, None, fastwebsockets::Payload::Borrowed(payload));
        let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        for _ in 0..5 {
            ws.write_frame(frame()).await.unwrap();
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(300), ws.read_frame()).await.is_err(),
            "{opcode:?}: five messages are not a flood"
        );
        // One over the limit, back to back (nothing after it: a client still sending binary
        // messages after the close is not waited for, and its socket would be reset).
        let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        for _ in 0..51 {
            ws.write_frame(frame()).await.unwrap();
        }
        match next(&mut ws, T).await {
            Some(Msg::Close(1008, reason)) => assert_eq!(reason, "too many messages", "{opcode:?}"),
            other => panic!("a flood of {opcode:?}: expected close 1008, got {other:?}"),
        }
    }
    // A fragmented message of empty frames that never ends (never over 10 MB, never a message
    // to count): closed past 500 small fragments a second. The client sends exactly one too many,
    // in one write.
    {
        let mut burst = vec![0x01, 0x81, 0, 0, 0, 0, b'{'];
        for _ in 0..500 {
            burst.extend_from_slice(&[0x00, 0x80, 0, 0, 0, 0]);
        }
        let ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        let mut ws = send_raw(ws, &[&burst], Duration::ZERO).await;
        match next(&mut ws, T).await {
            Some(Msg::Close(1008, reason)) => assert_eq!(reason, "too many messages"),
            other => panic!("a flood of empty fragments: expected close 1008, got {other:?}"),
        }
    }
    // The same message of empty frames, below that rate (200 a second): closed at its 65th
    // small fragment rather than read for ever.
    {
        let ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        let mut chunks: Vec<&[u8]> = vec![&[0x01, 0x81, 0, 0, 0, 0, b'{']];
        chunks.extend([&[0x00, 0x80, 0, 0, 0, 0][..]; 64]);
        let mut ws = send_raw(ws, &chunks, Duration::from_millis(5)).await;
        match next(&mut ws, T).await {
            Some(Msg::Close(1008, reason)) => assert_eq!(reason, "too many messages"),
            other => panic!("a slow message of empty fragments: expected close 1008, got {other:?}"),
        }
    }
    wait_closes(&s, "message_flood", 5.0);
    // Frames no client may send: closed with 1002 and what was wrong (RFC 6455 fails the
    // connection; it used to be dropped without a word).
    // (The last with 10 KB of payload the server does not read as a frame: dropped while the
    // close goes out, or the unread bytes would turn the close into a reset.)
    let mut large_unmasked = b"\x81\x7e\x28\x00".to_vec();
    large_unmasked.resize(4 + 10_240, b'x');
    let bad: [(&[u8], &str); 4] = [
        (b"\x80\x80\0\0\0\0", "a continuation frame without a message"),
        (b"\xc1\x80\0\0\0\0", "reserved bits set (no extension was agreed)"),
        (b"\x81\x02{}", "unmasked client frame"),
        (&large_unmasked, "unmasked client frame"),
    ];
    for (frame, why) in bad {
        let ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        let mut ws = send_raw(ws, &[frame], Duration::ZERO).await;
        match next(&mut ws, T).await {
            Some(Msg::Close(1002, reason)) => assert_eq!(reason, why),
            other => panic!("{why}: expected close 1002, got {other:?}"),
        }
    }
    wait_closes(&s, "protocol_error", 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_frames_decode_with_the_dictionary() {
    let s = setup(200, &[]).await;
    let get = |path: &str| {
        let mut stream = std::net::TcpStream::connect(s.serve.public).unwrap();
        use std::io::{Read, Write};
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        let at = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        (String::from_utf8_lossy(&raw[9..12]).to_string(), raw[at + 4..].to_vec())
    };
    // On defaults, compress=true speaks Jetstream's v1 dictionary (what its clients embed).
    let (status, dict) = get("/dictionary");
    assert_eq!(status, "200");
    assert_eq!(dict, contrail::hub::compress::JETSTREAM_V1);
    if let Some(shared) = common::shared_dir("compressed_frames_decode_with_the_dictionary (Jetstream's file)") {
        assert_eq!(dict, std::fs::read(shared.join("dictionaries/jetstream-v1.zdict")).unwrap(), "not Jetstream's");
    }
    let (status, ours) = get("/dictionary?id=20261125");
    assert_eq!(status, "200");
    assert_eq!(ours, contrail::hub::compress::CONTRAIL_V1);
    assert_eq!(get("/dictionary?id=7").0, "404");
    let all = log(&s);
    for (q, headers, dict) in [
        ("/subscribe?cursor=0&compress=true", vec![], &dict),
        ("/subscribe?cursor=0", vec![("Socket-Encoding", "zstd")], &dict),
        ("/subscribe?cursor=0&zstdDictionary=20261125", vec![], &ours),
    ] {
        let mut ws = connect(s.serve.public, q, &headers).await.unwrap();
        let mut got = Vec::new();
        let mut dec = zstd::bulk::Decompressor::with_dictionary(dict).unwrap();
        while got.len() < all.len() {
            match next(&mut ws, T).await {
                Some(Msg::Binary(b)) => got
                    .push(serde_json::from_slice::<serde_json::Value>(&dec.decompress(&b, 1 << 20).unwrap()).unwrap()),
                other => panic!("{q}: expected a binary frame, got {other:?}"),
            }
        }
        assert_eq!(got, all, "{q}");
    }
    // An unknown id is refused before the upgrade, naming the ids served.
    let (status, body) = common::process::http_get_with(
        s.serve.public,
        "/subscribe?zstdDictionary=7",
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    .unwrap();
    assert_eq!((status, body.trim()), (400, "unknown zstdDictionary 7: this server has 1612007021, 20261125"));
}

/// Replayers that start together with the same filter and encoding share replay pages (the
/// log read, filtered, compressed and framed once); each still gets exactly its own stream:
/// cursors inside a page, other filters, compression, a size cap, a filter change mid-replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replayers_share_pages_and_each_gets_exactly_its_stream() {
    let s = setup(3000, &[]).await;
    let all = log(&s);
    assert!(all.len() > 3 * 1024, "several pages: {} events", all.len());
    let time = |e: &serde_json::Value| e["time_us"].as_u64().unwrap();
    let posts = |e: &&serde_json::Value| e["kind"] != "commit" || e["commit"]["collection"] == "app.bsky.feed.post";
    let from = |i: usize| all[i..].to_vec();
    // (query, expected, compressed)
    let mid = time(&all[1500]);
    let cases: Vec<(String, Vec<serde_json::Value>, bool)> = vec![
        ("/subscribe?cursor=0".into(), all.clone(), false),
        ("/subscribe?cursor=0".into(), all.clone(), false),
        ("/subscribe?cursor=0".into(), all.clone(), false),
        (format!("/subscribe?cursor={mid}"), from(1500), false),
        (format!("/subscribe?cursor={}", mid + 1), from(1501), false),
        ("/subscribe?cursor=0&compress=true".into(), all.clone(), true),
        ("/subscribe?cursor=0&compress=true".into(), all.clone(), true),
        (
            "/subscribe?cursor=0&wantedCollections=app.bsky.feed.post".into(),
            all.iter().filter(posts).cloned().collect(),
            false,
        ),
        (
            "/subscribe?cursor=0&wantedCollections=app.bsky.feed.post&compress=true".into(),
            all.iter().filter(posts).cloned().collect(),
            true,
        ),
        (
            "/subscribe?cursor=0&maxMessageSizeBytes=500".into(),
            all.iter().filter(|e| e.to_string().len() <= 500).cloned().collect(),
            false,
        ),
    ];
    let dict = contrail::hub::compress::JETSTREAM_V1;
    let mut conns = Vec::new();
    for (q, _, _) in &cases {
        conns.push(connect(s.serve.public, q, &[]).await.unwrap());
    }
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(cases)
        .map(|(mut ws, (q, want, compressed))| {
            tokio::spawn(async move {
                let mut dec = zstd::bulk::Decompressor::with_dictionary(dict).unwrap();
                let mut got = Vec::new();
                while got.len() < want.len() {
                    let json = match next(&mut ws, T).await {
                        Some(Msg::Binary(b)) if compressed => dec.decompress(&b, 1 << 20).unwrap(),
                        Some(Msg::Text(t)) if !compressed => t.into_bytes(),
                        other => panic!("{q}: after {} events, {other:?}", got.len()),
                    };
                    got.push(serde_json::from_slice::<serde_json::Value>(&json).unwrap());
                }
                assert!(got == want, "{q}: a different stream");
                assert_eq!(next(&mut ws, Duration::from_millis(300)).await, None, "{q}: nothing more");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let shared = s.serve.metric("contrail_hub_replay_pages_shared_total").unwrap();
    let built = s.serve.metric("contrail_hub_replay_pages_built_total").unwrap();
    assert!(shared >= 8.0, "replayers shared pages: {shared} shared, {built} built");

    // A filter change in the middle of a page: the old filter's events up to the position,
    // the new one's after it.
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let head = collect(&mut ws, 1500, T).await;
    assert_eq!(head, all[..1500].to_vec());
    send_text(&mut ws, r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post"]}}"#).await;
    // Events already on their way when the update arrived are the old filter's (all of
    // them, from 1500); after those, the new filter's, from where the old ones stopped.
    let got = collect(&mut ws, 200, T).await;
    let old = got.iter().zip(&all[1500..]).take_while(|(a, b)| a == b).count();
    let new: Vec<_> = all[1500 + old..].iter().filter(posts).take(200 - old).cloned().collect();
    assert_eq!(got[old..], new[..], "after {old} events of the old filter, the new one's, in order");
}

/// Reads the whole log as one compressed subscriber, decoding each frame.
async fn compressed_replay(public: std::net::SocketAddr, n: usize) -> Vec<serde_json::Value> {
    let mut ws = connect(public, "/subscribe?cursor=0&compress=true", &[]).await.unwrap();
    let mut dec = zstd::bulk::Decompressor::with_dictionary(contrail::hub::compress::JETSTREAM_V1).unwrap();
    let mut got = Vec::new();
    while got.len() < n {
        match next(&mut ws, T).await {
            Some(Msg::Binary(b)) => got.push(serde_json::from_slice(&dec.decompress(&b, 1 << 20).unwrap()).unwrap()),
            other => panic!("after {} events, {other:?}", got.len()),
        }
    }
    got
}

/// Waits until the server has compressed at least `n` events and the frames are caught up.
fn wait_for_stored_frames(serve: &Serve, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while serve.metric("contrail_store_precompressed_events_total").unwrap_or(0.0) < n as f64
        || serve.metric("contrail_store_precompress_behind_seconds") != Some(0.0)
    {
        assert!(std::time::Instant::now() < deadline, "the stored frames never caught up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stored compressed frames are written without RocksDB's WAL: a crash loses those not yet
/// flushed, which the next process compresses again; a graceful stop flushes them, so the next
/// process compresses nothing again and replays from them. Either way every compressed replay
/// decodes to exactly the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_frames_survive_a_graceful_restart_and_a_crash_only_costs_compressing_again() {
    let mut s = setup(1500, &[]).await;
    let all = log(&s);
    wait_for_stored_frames(&s.serve, all.len());
    let last_seq = s.gen.last().unwrap().seq;
    let args = ["--max-events-per-second-per-ip", "0"];

    // A crash: the frames are still in the memtable (a few hundred KB of 32 MB), so gone.
    s.serve.kill9();
    s.serve = Serve::start(&s.dir, &s.relay.url(), &args);
    s.serve.wait_for_seq(last_seq, Duration::from_secs(60));
    wait_for_stored_frames(&s.serve, 1);
    assert!(compressed_replay(s.serve.public, all.len()).await == all, "after a crash");

    assert!(s.serve.terminate().success());
    s.serve = Serve::start(&s.dir, &s.relay.url(), &args);
    s.serve.wait_for_seq(last_seq, Duration::from_secs(60));
    assert!(compressed_replay(s.serve.public, all.len()).await == all, "after a graceful restart");
    assert_eq!(s.serve.metric("contrail_store_precompressed_events_total"), Some(0.0), "nothing compressed again");
    let stored = s.serve.metric("contrail_hub_replay_stored_frames_total").unwrap();
    assert!(stored >= all.len() as f64, "the replay read the stored frames: {stored}");
}

/// Compressed frames stored ahead of replay (`--precompress-window`, 1h by default): once the
/// background thread has caught up, compressed replays read them instead of compressing, and
/// each subscriber still gets exactly the log from its cursor, with its filter and size cap,
/// decoding with the dictionary; events newer than the stored frames are compressed as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_replay_reads_stored_frames_and_gets_exactly_the_log() {
    let s = setup(2000, &[]).await;
    let all = log(&s);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while s.serve.metric("contrail_store_precompressed_events_total").unwrap_or(0.0) < all.len() as f64 {
        assert!(std::time::Instant::now() < deadline, "the stored frames never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.serve.metric("contrail_store_precompress_behind_seconds"), Some(0.0));
    // More events after that: the log's newest have no stored frame yet (maybe).
    let more = generate(1, 2300, 20, 7);
    s.relay.push_all(&more[2000..]);
    s.serve.wait_for_seq(more.last().unwrap().seq, Duration::from_secs(60));
    let all = log(&s);
    let time = |e: &serde_json::Value| e["time_us"].as_u64().unwrap();
    let posts = |e: &&serde_json::Value| e["kind"] != "commit" || e["commit"]["collection"] == "app.bsky.feed.post";
    let cases: Vec<(String, Vec<serde_json::Value>)> = vec![
        ("/subscribe?cursor=0&compress=true".into(), all.clone()),
        (format!("/subscribe?cursor={}&compress=true", time(&all[777])), all[777..].to_vec()),
        (
            "/subscribe?cursor=0&compress=true&wantedCollections=app.bsky.feed.post".into(),
            all.iter().filter(posts).cloned().collect(),
        ),
        (
            "/subscribe?cursor=0&compress=true&maxMessageSizeBytes=400".into(),
            all.iter().filter(|e| e.to_string().len() <= 400).cloned().collect(),
        ),
    ];
    let dict = contrail::hub::compress::JETSTREAM_V1;
    for (q, want) in cases {
        assert!(!want.is_empty());
        let mut ws = connect(s.serve.public, &q, &[]).await.unwrap();
        let mut dec = zstd::bulk::Decompressor::with_dictionary(dict).unwrap();
        let mut got = Vec::new();
        while got.len() < want.len() {
            match next(&mut ws, T).await {
                Some(Msg::Binary(b)) => got
                    .push(serde_json::from_slice::<serde_json::Value>(&dec.decompress(&b, 1 << 20).unwrap()).unwrap()),
                other => panic!("{q}: after {} events, {other:?}", got.len()),
            }
        }
        assert!(got == want, "{q}: a different stream");
        assert_eq!(next(&mut ws, Duration::from_millis(300)).await, None, "{q}: nothing more");
    }
    let stored = s.serve.metric("contrail_hub_replay_stored_frames_total").unwrap();
    assert!(stored >= 2000.0, "replay took the stored frames: {stored}");
}

/// Subscribers with cursors all over the log connect while ingest goes on: each gets exactly
/// the log from its cursor, in order, through the switch from replay to live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_under_ingest_is_exact() {
    handoff_under_ingest(&["--ring-capacity", "256"]).await;
}

/// The same with `--write-linger`: live events wait up to it and leave together, none lost,
/// repeated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_under_ingest_is_exact_with_a_write_linger() {
    handoff_under_ingest(&["--ring-capacity", "256", "--write-linger", "15ms"]).await;
}

async fn handoff_under_ingest(args: &[&str]) {
    let s = setup(1_000, args).await;
    let more = generate(10_000, 4_000, 40, 9);
    // About 2,000 frames/s: ingest goes on for ~2 s while subscribers connect.
    s.relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(1)), burst: 2, ..Faults::default() });
    s.relay.push_all(&more);
    let last_seq = more.last().unwrap().seq;
    let before = log(&s);
    let mut clients = Vec::new();
    for i in 0..16 {
        let cursor = if i % 4 == 3 { None } else { Some(before[(i * before.len()) / 16]["time_us"].as_u64().unwrap()) };
        let q = match cursor {
            Some(c) => format!("/subscribe?cursor={c}"),
            None => "/subscribe".to_string(),
        };
        let ws = connect(s.serve.public, &q, &[]).await.unwrap();
        clients.push((cursor, ws));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    s.serve.wait_for_seq(last_seq, Duration::from_secs(120));
    let all = log(&s);
    let newest = all.last().unwrap()["time_us"].as_u64().unwrap();
    for (cursor, mut ws) in clients {
        let mut got = Vec::new();
        loop {
            match next(&mut ws, Duration::from_secs(10)).await {
                Some(Msg::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let done = v["time_us"].as_u64().unwrap() == newest;
                    got.push(v);
                    if done {
                        break;
                    }
                }
                other => panic!(
                    "cursor {cursor:?}: stream ended with {other:?} after {} events; logs:\n{}",
                    got.len(),
                    s.serve.logs()
                ),
            }
        }
        let start = match cursor {
            Some(c) => all.iter().position(|e| e["time_us"].as_u64().unwrap() >= c).unwrap(),
            None => all.iter().position(|e| e["time_us"] == got[0]["time_us"]).expect("live start is in the log"),
        };
        assert_eq!(got.len(), all.len() - start, "cursor {cursor:?}: wrong count");
        assert!(got == all[start..], "cursor {cursor:?}: stream differs from the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_messages_report_progress() {
    let s = setup(100, &[]).await;
    let newest = log(&s).last().unwrap()["time_us"].as_u64().unwrap();
    // A filter that matches nothing: the cursor still moves over what was filtered out.
    let q = "/subscribe?cursor=0&wantedDids=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa&informCursorSeconds=1";
    let mut ws = connect(s.serve.public, q, &[]).await.unwrap();
    let (mut last, mut live) = (0, false);
    for _ in 0..3 {
        match next(&mut ws, Duration::from_secs(3)).await {
            Some(Msg::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                assert_eq!(v["kind"], "cursor", "{t}");
                (last, live) = (v["time_us"].as_u64().unwrap(), v["live"].as_bool().unwrap());
            }
            other => panic!("expected a cursor message, got {other:?}"),
        }
    }
    assert_eq!(last, newest);
    assert!(live, "past the log's end, the stream is live and says so");
    // Without the option, no cursor messages.
    let mut ws = connect(s.serve.public, "/subscribe?wantedDids=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", &[]).await.unwrap();
    assert_eq!(next(&mut ws, Duration::from_millis(1500)).await, None);
    // A shorter interval set by options_update counts from then, not from the old one's next.
    let q = "/subscribe?wantedDids=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa&informCursorSeconds=600";
    let mut ws = connect(s.serve.public, q, &[]).await.unwrap();
    assert!(matches!(next(&mut ws, T).await, Some(Msg::Text(t)) if t.contains("\"cursor\"")), "the first at once");
    send_text(&mut ws, r#"{"type":"options_update","payload":{"wantedDids":["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"],"informCursorSeconds":1}}"#).await;
    assert!(
        matches!(next(&mut ws, Duration::from_secs(3)).await, Some(Msg::Text(t)) if t.contains("\"cursor\"")),
        "the next one a second later"
    );
}

/// A live subscriber whose address's event rate is below what its filter matches (one busy
/// address): between the events it is paced to, the session still hears its timers. It used
/// to wait for each event's tokens inside a write step of up to 256 events: for minutes, no
/// cursor message, no ping, no flush of what was paid for, no shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_subscriber_paced_by_its_address_rate_still_hears_its_timers() {
    let relay = FakeRelay::start().await;
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(20)), ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--max-events-per-second-per-ip", "5"]);
    let mut ws = connect(serve.public, "/subscribe?informCursorSeconds=1", &[]).await.unwrap();
    // 50 frames a second for 10 s, ten times the address's rate.
    relay.push_all(&generate(1, 500, 10, 11));
    let (mut events, mut cursors) = (0, 0);
    let until = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < until {
        match next(&mut ws, until.saturating_duration_since(tokio::time::Instant::now())).await {
            Some(Msg::Text(t)) if t.contains(r#""kind":"cursor""#) => cursors += 1,
            Some(Msg::Text(_)) => events += 1,
            Some(other) => panic!("{other:?}"),
            None => break,
        }
    }
    // About 5 a second after the bucket's first few, and a cursor message a second.
    assert!((10..=60).contains(&events), "{events} events in 6 s at 5 a second");
    assert!(cursors >= 3, "{cursors} cursor messages in 6 s ({events} events)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_slow_peers_are_closed_without_hurting_others() {
    let s = setup(10, &["--ping-interval", "500ms", "--pong-timeout", "2s", "--write-timeout", "1s"]).await;
    // A peer that upgrades and then never reads nor answers pings.
    let dead = raw_subscriber(s.serve.public).await;
    let mut good = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    wait_live(&s, 2.0);
    let more = generate(5000, 3000, 40, 10);
    s.relay.push_all(&more);
    let n: usize = more.iter().map(|g| g.expected.len()).sum();
    // The healthy client gets everything (it answers pings through its reads).
    assert_eq!(collect(&mut good, n, T).await.len(), n);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let closed = || {
        s.serve.metric("contrail_hub_closes_total{reason=\"ping_timeout\"}").unwrap_or(0.0)
            + s.serve.metric("contrail_hub_closes_total{reason=\"write_timeout\"}").unwrap_or(0.0)
    };
    while closed() < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed() >= 1.0, "the dead peer was not closed");
    drop(dead);
}

/// Opens a websocket to `/subscribe` on a raw socket (it answers nothing, pings included).
async fn raw_subscriber(public: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(public).await.unwrap();
    tcp.write_all(b"GET /subscribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
    upgraded(tcp).await
}

/// [`raw_subscriber`] with a query, as client `from` (`X-Forwarded-For`), with a small receive
/// buffer: a client that does not read stops the server's writes after a few KB.
async fn raw_subscriber_at(public: std::net::SocketAddr, path: &str, from: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(public).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: {from}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    upgraded(tcp).await
}

/// Reads the server's answer to an upgrade request: it must be a 101.
async fn upgraded(mut tcp: tokio::net::TcpStream) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1, "the upgrade was not answered");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tcp
}

fn closes(s: &Setup, reason: &str) -> f64 {
    s.serve.metric(&format!("contrail_hub_closes_total{{reason=\"{reason}\"}}")).unwrap_or(0.0)
}

/// Waits until the server's metric `name` (0 when absent) reads `want`, for at most `T`.
fn wait_metric(s: &Setup, name: &str, want: f64) {
    let deadline = std::time::Instant::now() + T;
    while s.serve.metric(name).unwrap_or(0.0) != want {
        assert!(std::time::Instant::now() < deadline, "{name} is {:?}, not {want}", s.serve.metric(name));
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `n` plain v1 subscribers are counted: each has then taken its start point (the
/// count goes up just before), so events pushed after it reach them live. (The upgrade's
/// answer comes before: a client connected may not be started yet.)
fn wait_live(s: &Setup, n: f64) {
    wait_metric(s, "contrail_hub_subscribers{compression=\"none\",wire=\"v1\"}", n);
}

/// Waits until `want` closes for `reason` are counted (a close is counted just after its frame
/// has gone, so a client can read it first).
fn wait_closes(s: &Setup, reason: &str, want: f64) {
    wait_metric(s, &format!("contrail_hub_closes_total{{reason=\"{reason}\"}}"), want);
}

/// A subscriber reading steadily but far slower than its stream (16 KiB every 50 ms, megabytes
/// behind, on a raw socket that answers no pings) is kept: its pings wait behind the data it
/// has not read, and one write waits seconds for it, yet it keeps taking data, which the kernel
/// sees (TCP_USER_TIMEOUT judges by acknowledgements). Found by the soak, where such readers
/// were closed by the pong and write timeouts although the hub promises to keep slow readers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_steady_reader_is_kept() {
    use common::frames::{commit_frame, map, s as text, tid_for, TestOp};
    use tokio::io::AsyncReadExt;
    let s = setup(5, &["--ping-interval", "1s", "--pong-timeout", "4s", "--write-timeout", "10s"]).await;
    let mut slow = raw_subscriber(s.serve.public).await;
    // Twelve events of 300 KB: over ten seconds of backlog at this pace.
    let big = "x".repeat(300_000);
    for i in 0..12u64 {
        let seq = 100 + i as i64;
        let rec = map(vec![("$type", text("app.bsky.feed.post")), ("text", text(&big))]);
        let path = format!("app.bsky.feed.post/{}", tid_for(i));
        s.relay.push(seq, commit_frame(seq, &did_for(1), &tid_for(9_000 + i), &[TestOp::create(&path, &rec)]));
    }
    // Read 16 KiB every 50 ms, counting the big events' frames as they complete.
    let (mut pending, mut events, mut read) = (Vec::new(), 0, 0);
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while events < 12 && std::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                read += n;
                pending.extend_from_slice(&buf[..n]);
            }
        }
        while let Some((opcode, len, used)) = server_frame(&pending) {
            events += usize::from(opcode == 1 && len > 300_000);
            pending.drain(..used);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(closes(&s, "ping_timeout"), 0.0, "a reader taking data was closed for its late pongs");
    assert_eq!(closes(&s, "write_timeout"), 0.0, "a reader taking data was closed for a slow write");
    assert_eq!(events, 12, "got {events} of the 12 events ({read} bytes)");
}

/// The first whole frame in `b` from the server (unmasked): (opcode, payload length, bytes used).
fn server_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    let (opcode, len7) = (b.first()? & 0x0f, b.get(1)? & 0x7f);
    let (len, head) = match len7 {
        126 => (u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    (b.len() >= head + len).then_some((opcode, len, head + len))
}

/// The pong timeout still closes a client that reads everything but never answers a ping: its
/// connection is never backed up, so nothing excuses the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_answers_pings_is_closed() {
    use tokio::io::AsyncReadExt;
    let s = setup(5, &["--ping-interval", "300ms", "--pong-timeout", "1s"]).await;
    let mut mute = raw_subscriber(s.serve.public).await;
    s.relay.push_all(&generate(100, 200, 20, 8));
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    // Read until the server ends the connection (EOF or a reset).
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), mute.read(&mut buf)).await {
        if n == 0 {
            break;
        }
    }
    assert_eq!(closes(&s, "ping_timeout"), 1.0, "closed after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "closed only after {:?}", started.elapsed());
}

/// A client that stops reading amid a busy stream is closed by the kernel's progress timeout
/// (its window stays shut), reported as `write_timeout`; the others are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_by_the_write_timeout() {
    // Pings far apart: only the kernel's progress timeout is under test.
    let s = setup(5, &["--ping-interval", "10s", "--pong-timeout", "30s", "--write-timeout", "2s"]).await;
    let _stuck = raw_subscriber(s.serve.public).await;
    let mut good = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    wait_live(&s, 2.0);
    let more = generate(5000, 4000, 40, 10);
    s.relay.push_all(&more);
    let n: usize = more.iter().map(|g| g.expected.len()).sum();
    assert_eq!(collect(&mut good, n, T).await.len(), n);
    drop(good); // it would not answer pings while nobody reads it
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while closes(&s, "write_timeout") < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(closes(&s, "write_timeout"), 1.0, "the stuck reader was not closed by the write timeout");
    assert_eq!(closes(&s, "ping_timeout"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_are_enforced() {
    let s = setup(5, &["--max-connections-per-ip", "2"]).await;
    let _a = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    let _b = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    // Refused with a reason and when to come back (read by Contrail's own client code).
    let url =
        contrail::source::wsclient::WsUrl::parse_with_path(&format!("ws://{}", s.serve.public), "/subscribe").unwrap();
    let third = contrail::source::wsclient::connect(&url, url.target(None), T).await.map(|_| ()).unwrap_err();
    let contrail::source::wsclient::ClientError::Status { status: 429, retry_after, body } = &third else {
        panic!("third connection from one IP: {third}")
    };
    assert_eq!((*retry_after, body.as_str()), (Some(Duration::from_secs(1)), "too many connections from this address"));
    assert_eq!(s.serve.metric("contrail_hub_rejected_requests_total{reason=\"too_many_from_ip\"}"), Some(1.0));
    // X-Forwarded-For is ignored from an untrusted peer.
    assert!(connect(s.serve.public, "/subscribe", &[("X-Forwarded-For", "198.51.100.1")]).await.is_err());
}

/// A server at `--max-subscribers` says so with a 503 and asks to be left alone for a few
/// seconds (`Retry-After`): others have to leave first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_says_when_to_come_back() {
    let s = setup(5, &["--max-subscribers", "1"]).await;
    let _a = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    use contrail::source::wsclient::{connect as connect_ws, ClientError, WsUrl};
    for (path, says) in [
        ("/subscribe", "too many subscribers; try another instance or later"),
        (
            "/xrpc/network.bsky.jetstream.subscribeEvents",
            "ServiceUnavailable: too many subscribers; try another instance or later",
        ),
    ] {
        let url = WsUrl::parse_with_path(&format!("ws://{}", s.serve.public), path).unwrap();
        let refused = connect_ws(&url, url.target(None), T).await.map(|_| ()).unwrap_err();
        let ClientError::Status { status: 503, retry_after, body } = &refused else { panic!("{path}: {refused}") };
        assert_eq!((*retry_after, body.as_str()), (Some(Duration::from_secs(5)), says), "{path}");
    }
    assert_eq!(s.serve.metric("contrail_hub_rejected_requests_total{reason=\"too_many_subscribers\"}"), Some(2.0));
}

/// The head of the answer to a request written as is.
fn raw_answer_head(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(request).unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") && tcp.read(&mut byte).unwrap_or(0) == 1 {
        raw.push(byte[0]);
    }
    String::from_utf8_lossy(&raw).to_lowercase()
}

/// An upgrade request that is not a websocket handshake is named for what it is (405, 400,
/// 426 with the version spoken here), before admission: a full server does not answer it
/// with a 503, and it takes no slot. Before, an HTTP/1.0 or HEAD request was upgraded, and a
/// key that is not 16 bytes in base64 was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_is_not_a_websocket_handshake_is_named_before_admission() {
    let s = setup(5, &["--max-subscribers", "1"]).await;
    let a = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    let request = |method: &str, version: &str, key: &str, ws_version: &str| {
        format!("{method} /subscribe {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}{ws_version}\r\n")
    };
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let v13 = "Sec-WebSocket-Version: 13\r\n";
    for (req, status, says) in [
        (request("HEAD", "HTTP/1.1", key, v13), "405", "allow: get"),
        (request("GET", "HTTP/1.0", key, v13), "400", ""),
        (request("GET", "HTTP/1.1", "Sec-WebSocket-Key: abc\r\n", v13), "400", ""),
        (request("GET", "HTTP/1.1", "", v13), "400", ""),
        (request("GET", "HTTP/1.1", key, "Sec-WebSocket-Version: 8\r\n"), "426", "sec-websocket-version: 13"),
    ] {
        let head = raw_answer_head(s.serve.public, req.as_bytes());
        // (An HTTP/1.0 request is answered in HTTP/1.0.)
        assert!(head.split(' ').nth(1) == Some(status) && head.contains(says), "{req}\n{head}");
        if status == "426" {
            // Named beside the Upgrade header it carries (RFC 9110 7.8), and closed.
            assert!(head.contains("\r\nconnection: upgrade, close\r\n"), "{head}");
        }
    }
    let bad = s.serve.metric("contrail_hub_rejected_requests_total{reason=\"bad_request\"}");
    assert_eq!(bad, Some(5.0));
    let full = s.serve.metric("contrail_hub_rejected_requests_total{reason=\"too_many_subscribers\"}");
    assert_eq!(full.unwrap_or(0.0), 0.0);
    // `Socket-Encoding` with a byte that is not UTF-8 still asks for zstd (Jetstream looks
    // for the word): the replay comes compressed, in binary frames.
    drop(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.serve.metric("contrail_hub_subscribers{compression=\"none\",wire=\"v1\"}").unwrap_or(0.0) > 0.0 {
        assert!(std::time::Instant::now() < deadline, "the first subscriber stays");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(s.serve.public).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = request("GET", "HTTP/1.1", key, v13).replace("/subscribe ", "/subscribe?cursor=0 ").into_bytes();
    req.truncate(req.len() - 2);
    req.extend_from_slice(b"Socket-Encoding: zstd\xff\r\n\r\n");
    tcp.write_all(&req).unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(tcp.read(&mut byte).unwrap(), 1);
        raw.push(byte[0]);
    }
    assert!(raw.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&raw));
    tcp.read_exact(&mut byte).unwrap();
    assert_eq!(byte[0], 0x82, "the first frame: a final binary one");
}

/// Behind a trusted proxy that adds its own `X-Forwarded-For` line after the client's (HAProxy),
/// the client is the last line's, whatever the client wrote in its own: reading only the first
/// line let a client name a new address on every connection, past every per-IP limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_s_own_forwarded_for_line_does_not_name_it() {
    let s = setup(5, &["--max-connections-per-ip", "1", "--trusted-proxies", "127.0.0.1"]).await;
    let via_proxy = |made_up: &'static str| [("X-Forwarded-For", made_up), ("X-Forwarded-For", "192.0.2.7")];
    let _a = connect(s.serve.public, "/subscribe", &via_proxy("198.51.100.9")).await.unwrap();
    assert!(
        connect(s.serve.public, "/subscribe", &via_proxy("198.51.100.10")).await.is_err(),
        "a second from 192.0.2.7"
    );
    assert_eq!(s.serve.metric("contrail_hub_rejected_requests_total{reason=\"too_many_from_ip\"}"), Some(1.0));
    // One line with both, as other proxies write it: the same.
    let one_line = [("X-Forwarded-For", "198.51.100.11, 192.0.2.7")];
    assert!(connect(s.serve.public, "/subscribe", &one_line).await.is_err());
    // The client's own entry not even text, on the line the proxy appended to: still the last
    // entry's client (it was the proxy's own address, a second quota).
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.serve.public).await.unwrap();
    let request = b"GET /subscribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nX-Forwarded-For: \xff, 192.0.2.7\r\n\r\n";
    tcp.write_all(request).await.unwrap();
    let mut answer = [0u8; 12];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 429", "{}", String::from_utf8_lossy(&answer));
}

/// IPv6 clients are limited per /64, and one network (a /48, a free tunnel broker's grant)
/// holds 65,536 of them: together its clients hold at most a quarter of `--max-subscribers`,
/// so that it cannot take every slot from everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ipv6_network_cannot_take_every_subscriber_slot() {
    let args = ["--max-subscribers", "8", "--max-connections-per-ip", "1", "--trusted-proxies", "127.0.0.1"];
    let s = setup(5, &args).await;
    let from = |client: &str| [("X-Forwarded-For", client.to_string())];
    let connect_as = |client: &str| {
        let headers = from(client);
        async move { connect(s.serve.public, "/subscribe", &[(headers[0].0, headers[0].1.as_str())]).await }
    };
    let _a = connect_as("2001:db8:0:1::1").await.unwrap();
    let _b = connect_as("2001:db8:0:2::1").await.unwrap();
    assert!(connect_as("2001:db8:0:3::1").await.is_err(), "a third /64 of one /48 past its quarter (2 of 8)");
    assert_eq!(s.serve.metric("contrail_hub_rejected_requests_total{reason=\"too_many_from_site\"}"), Some(1.0));
    // Another network, and IPv4 clients, still get in.
    let _c = connect_as("2001:db8:1::1").await.unwrap();
    let _d = connect_as("198.51.100.1").await.unwrap();
    drop(_a);
    // A place given back is taken again (once the server has seen the close).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if connect_as("2001:db8:0:3::1").await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the /48's place never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server that has ingested `frames` generated frames (`seed`), each client address paced at
/// `rate` events a second.
async fn paced(frames: usize, seed: u64, rate: &str) -> (FakeRelay, tempfile::TempDir, Serve) {
    let relay = FakeRelay::start().await;
    relay.push_all(&generate(1, frames, 10, seed));
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--max-events-per-second-per-ip", rate]);
    serve.wait_for_seq(frames as i64, Duration::from_secs(60));
    (relay, dir, serve)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_rate_is_shared_by_connections() {
    let (_relay, _dir, serve) = paced(300, 11, "100").await;
    let start = std::time::Instant::now();
    let mut a = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let mut b = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let (ga, gb) = tokio::join!(collect(&mut a, 150, T), collect(&mut b, 150, T));
    assert_eq!((ga.len(), gb.len()), (150, 150));
    // 300 events at 100/s with a 100-event burst: at least ~2 s.
    assert!(start.elapsed() >= Duration::from_millis(1800), "rate limit not applied: {:?}", start.elapsed());
}

/// A client's event rate outlives its connections until it has refilled: closing the last one
/// and opening another used to bring a full bucket (5,000 events at the default) every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_a_client_s_rate() {
    let (_relay, _dir, serve) = paced(300, 14, "20").await;
    // The burst (20 events), then a new connection at once: it waits for the rate.
    let mut ws = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    assert_eq!(collect(&mut ws, 20, T).await.len(), 20);
    drop(ws);
    tokio::time::sleep(Duration::from_millis(100)).await; // the server sees the close
    let start = std::time::Instant::now();
    let mut ws = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    assert_eq!(collect(&mut ws, 20, T).await.len(), 20);
    assert!(start.elapsed() >= Duration::from_millis(700), "a full bucket again: {:?}", start.elapsed());
}

/// A replay whose filter matches nothing pays for what it passes over (one event of the
/// client's rate per 64 read from the log): it used to read the whole log at disk speed for
/// free, on as many connections as the client opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_matches_nothing_is_paced_too() {
    let (_relay, dir, serve) = paced(3_500, 13, "10").await;
    let log = inspect_log(dir.path());
    let newest = serde_json::from_str::<serde_json::Value>(log.last().unwrap()).unwrap()["time_us"].as_u64().unwrap();
    let start = std::time::Instant::now();
    let q = "/subscribe?cursor=0&wantedDids=did:plc:aaaaaaaaaaaaaaaaaaaaaaaa&informCursorSeconds=1";
    let mut ws = connect(serve.public, q, &[]).await.unwrap();
    loop {
        let Some(Msg::Text(t)) = next(&mut ws, Duration::from_secs(30)).await else { panic!("no cursor message") };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["time_us"].as_u64() == Some(newest) {
            break;
        }
        // Still reading the log, and saying so (a replica must not take it for caught up).
        assert_eq!(v["live"], false, "{t}");
    }
    // Each page (at most 1,024 events) is paid for before the next is read, at 10 events of
    // the rate a second with 10 banked: all but the last page's, less the bank, is waited for.
    let least = Duration::from_secs_f64(((log.len() - 1_024) as f64 / 64.0 - 10.0) / 10.0 * 0.9);
    assert!(least > Duration::from_secs(2), "{} events", log.len());
    assert!(start.elapsed() >= least, "not paced: the log passed over in {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_clients_are_not_paced() {
    let relay = FakeRelay::start().await;
    let gen = generate(1, 300, 10, 12);
    relay.push_all(&gen);
    let dir = tempfile::tempdir().unwrap();
    // 20 events/s per IP, but loopback is exempt (as an operator exempts its replicas).
    let serve = Serve::start(
        dir.path(),
        &relay.url(),
        &[
            "--max-events-per-second-per-ip",
            "20",
            "--unlimited-clients",
            "127.0.0.0/8",
            "--max-connections-per-ip",
            "1",
        ],
    );
    serve.wait_for_seq(300, Duration::from_secs(30));
    let n = inspect_log(dir.path()).len();
    let start = std::time::Instant::now();
    let mut a = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let mut b = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap(); // over the per-IP cap: exempt
    let (ga, gb) = tokio::join!(collect(&mut a, n, T), collect(&mut b, n, T));
    assert_eq!((ga.len(), gb.len()), (n, n));
    // Paced at 20/s this would take over 20 s.
    assert!(start.elapsed() < Duration::from_secs(10), "exempt client was paced: {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_options_updates_cost_little_and_disturb_nobody() {
    let s = setup(2_000, &["--max-options-updates-per-second", "1000"]).await;
    let all = log(&s);
    let mut bystander = connect(s.serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    // A ~9 MB options_update of 700,000 distinct `x….*` prefixes (a quadratic dedupe takes
    // hours on it) is refused after one pass, and a ~10 MB list of DIDs likewise.
    let prefixes: Vec<String> = (0..700_000).map(|i| format!("x{i}.*")).collect();
    let dids: Vec<String> = (0..280_000).map(|i| format!("did:plc:{i:024}")).collect();
    let started = std::time::Instant::now();
    for (payload, reason) in [
        (serde_json::json!({"wantedCollections": prefixes}), "too many wanted collections"),
        (serde_json::json!({"wantedDids": dids}), "too many wanted DIDs"),
    ] {
        let mut hostile = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
        let msg = serde_json::json!({"type": "options_update", "payload": payload}).to_string();
        assert!(msg.len() > 8_000_000 && msg.len() <= 10_000_000, "{} bytes", msg.len());
        send_text(&mut hostile, &msg).await;
        match next(&mut hostile, Duration::from_secs(20)).await {
            Some(Msg::Close(1008, got)) => assert!(got.contains(reason), "{got}"),
            other => panic!("expected a 1008 close, got {other:?}"),
        }
    }
    let took = started.elapsed();
    // The bystander's stream was not held up: it gets every event.
    let got = collect(&mut bystander, all.len(), T).await;
    assert_eq!(got.len(), all.len());
    // Debug build on a shared 2-core machine: a generous bound (the release figure is in the
    // README); a quadratic or blocking check takes minutes.
    assert!(took < Duration::from_secs(15), "refusing two 10 MB options_updates took {took:?}");

    // 1,000 options_updates during a replay do not multiply log reads.
    let reads = || s.serve.metric("contrail_hub_replay_reads_total").unwrap();
    let before = reads();
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0&informCursorSeconds=1", &[]).await.unwrap();
    for i in 0..1_000 {
        let coll = if i % 2 == 0 { "app.bsky.feed.like" } else { "app.bsky.feed.post" };
        let m = format!(r#"{{"type":"options_update","payload":{{"wantedCollections":["{coll}"]}}}}"#);
        send_text(&mut ws, &m).await;
    }
    // The stream runs to the end of the log (its cursor messages say when it got there).
    let newest = all.last().unwrap()["time_us"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(std::time::Instant::now() < deadline, "replay did not finish");
        match next(&mut ws, T).await {
            Some(Msg::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["kind"] == "cursor" && v["time_us"].as_u64().unwrap() >= newest {
                    break;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let batches = all.len().div_ceil(1024) as f64;
    assert!(reads() - before <= batches + 3.0, "{} log reads for {batches} batches", reads() - before);
}

/// An `options_update` costs a token of `--max-options-updates-per-second` per 64 KiB of the
/// two filters it changes between (at least one), with ten seconds of tokens banked: a first
/// large filter waits for nothing, while a client swapping large filters back and forth is
/// paced by their size (each swap costs milliseconds of CPU; ten a second per connection cost
/// 1.3 cores for 50 such clients, BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_filter_changes_are_paced_by_their_size() {
    let s = setup(10, &[]).await;
    let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    let held = || s.serve.metric("contrail_hub_filter_bytes").unwrap();
    let base = held();
    let update = |n: usize, tag: char| {
        let dids: Vec<String> = (0..n).map(|i| format!("did:plc:{tag}{i:023}")).collect();
        serde_json::json!({"type": "options_update", "payload": {"wantedDids": dids}}).to_string()
    };
    let wait_until = |what: &str, done: &dyn Fn(f64) -> bool| {
        let started = std::time::Instant::now();
        while !done(held()) {
            assert!(started.elapsed() < Duration::from_secs(20), "{what}: {} bytes held", held());
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    };
    // A first large filter (10,000 DIDs): at once.
    send_text(&mut ws, &update(10_000, 'a')).await;
    let took = wait_until("the first filter", &|b| b > base + 1e6);
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Back and forth (~52 tokens a change), then a small filter: the bank of 100 runs out on
    // the third change, and the small one comes ~7 s later.
    for m in [update(5_000, 'b'), update(10_000, 'a'), update(1, 'c')] {
        send_text(&mut ws, &m).await;
    }
    let took = wait_until("the small filter", &|b| b < base + 10_000.0);
    assert!(took > Duration::from_secs(3), "the changes were not paced: {took:?}");
}

/// While an `options_update` waits for its tokens, the stream goes on under the filter before
/// it (the session does not wait in place, delivering nothing), and a pong deadline passing
/// meanwhile (the client's pongs are not read) neither closes it nor holds the stream back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_while_a_paced_filter_change_waits() {
    let s = setup(10, &["--ping-interval", "1s", "--pong-timeout", "3s"]).await;
    // 3,000 more frames, live at ~500 a second (six seconds of them).
    let more = generate(10_000, 3_000, 20, 9);
    let mut real: Vec<String> = more.iter().flat_map(|f| f.expected.iter().map(|e| e.0.clone())).collect();
    real.sort();
    real.dedup();
    let events: usize = more.iter().map(|f| f.expected.len()).sum();
    // Filters of 10,000 DIDs that take every one of them: their DIDs and others.
    let update = |tag: char| {
        let mut dids = real.clone();
        dids.extend((dids.len()..10_000).map(|i| format!("did:plc:{tag}{i:023}")));
        serde_json::json!({"type": "options_update", "payload": {"wantedDids": dids}}).to_string()
    };
    let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    wait_live(&s, 1.0);
    // The first change within the bank (~35 tokens), the next two waiting for theirs (~70
    // each: ~0.4 s, then ~7 s, past the pong deadline).
    for m in [update('a'), update('b'), update('a')] {
        send_text(&mut ws, &m).await;
    }
    s.relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(2)), ..Faults::default() });
    s.relay.push_all(&more);
    let t0 = std::time::Instant::now();
    let (mut early, mut during) = (0, 0);
    while t0.elapsed() < Duration::from_millis(6_500) && during < events {
        match next(&mut ws, Duration::from_secs(2)).await {
            Some(Msg::Text(_)) => during += 1,
            other => panic!("{other:?} after {during} events"),
        }
        if t0.elapsed() < Duration::from_millis(1_500) {
            early = during;
        }
    }
    // Against what the server had taken by then (the fake relay's pace varies).
    let taken_seq = s.serve.metric("contrail_relay_last_seq").unwrap() as i64;
    let taken: usize = more.iter().filter(|f| f.seq <= taken_seq).map(|f| f.expected.len()).sum();
    assert!(early > 100, "{early} events in the first 1.5 s, while the change waited");
    // (Held back, it would be ~3,500 behind: the waits' 7 s of events.)
    assert!(during + 1_000 >= taken, "{during} of the {taken} events taken in 6.5 s: the stream was held back");
    let rest = collect(&mut ws, events - during, T).await;
    assert_eq!(during + rest.len(), events, "every event, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_are_reassembled_and_limited_in_total() {
    use fastwebsockets::{Frame, OpCode, Payload};
    let s = setup(300, &[]).await;
    let all = log(&s);
    // A valid options_update in three fragments applies.
    let mut ws = connect(s.serve.public, "/subscribe?requireHello=true&cursor=0", &[]).await.unwrap();
    let did = all[0]["did"].as_str().unwrap().to_string();
    let parts =
        [r#"{"type":"options_"#.to_string(), r#"update","payload":{"wantedDids":["#.into(), format!(r#""{did}"]}}}}"#)];
    for (i, p) in parts.iter().enumerate() {
        let (fin, op) = (i == parts.len() - 1, if i == 0 { OpCode::Text } else { OpCode::Continuation });
        ws.write_frame(Frame::new(fin, op, None, Payload::Owned(p.as_bytes().to_vec()))).await.unwrap();
    }
    let want = all.iter().filter(|e| e["did"] == did.as_str()).count();
    let got = collect(&mut ws, want, T).await;
    assert_eq!(got.len(), want);
    assert!(got.iter().all(|e| e["did"] == did.as_str()));
    // Fragments that add up to more than 10 MB close with 1009, each frame being small enough:
    // refused from the header of the frame that would pass the limit. Only that header is sent
    // of it, so no unread bytes turn the close into a reset.
    let mut ws = connect(s.serve.public, "/subscribe", &[]).await.unwrap();
    let chunk = vec![b' '; 4_000_000];
    ws.write_frame(Frame::new(false, OpCode::Text, None, Payload::Owned(chunk.clone()))).await.unwrap();
    ws.write_frame(Frame::new(false, OpCode::Continuation, None, Payload::Owned(chunk.clone()))).await.unwrap();
    let mut header = vec![0x00, 0xff];
    header.extend_from_slice(&4_000_000u64.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let mut ws = send_raw(ws, &[&header], Duration::ZERO).await;
    let closed = close_of(&mut ws, T).await.map(|(code, _)| code);
    assert_eq!(closed, Some(1009), "a 12 MB fragmented message was not refused");
    // (Counted just after the close frame went.)
    let deadline = std::time::Instant::now() + T;
    while s.serve.metric("contrail_hub_closes_total{reason=\"message_too_big\"}").unwrap_or(0.0) < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the close was not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_opening_connections_too_fast_is_turned_away_at_accept() {
    let s = setup(5, &["--max-connects-per-second-per-ip", "20"]).await;
    // 200 plain connections at once from 127.0.0.1: about a second's worth get served.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let addr = s.serve.public;
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(T, tcp.read_to_end(&mut buf)).await;
            String::from_utf8_lossy(&buf).lines().next().unwrap_or("").to_string()
        }));
    }
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        *statuses.entry(t.await.unwrap()).or_default() += 1;
    }
    let ok = statuses.get("HTTP/1.1 200 OK").copied().unwrap_or(0);
    assert!((20..=60).contains(&ok), "served {ok} of 200 at once: {statuses:?}");
    let refused = s.serve.metric("contrail_hub_rejected_requests_total{reason=\"connect_rate\"}").unwrap();
    assert!(refused >= 100.0, "{refused} refused: {statuses:?}");
    // Another client is not affected, and the limited one is served again a moment later.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut tcp = other.connect(s.serve.public).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut ws = connect(s.serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    assert!(matches!(next(&mut ws, T).await, Some(Msg::Text(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_past_the_memory_budget_are_refused_and_their_bytes_come_back() {
    let dids = |n: usize, tag: usize| -> Vec<String> { (0..n).map(|i| format!("did:plc:{tag:04}{i:020}")).collect() };
    let query =
        |param: &str, tag: usize| dids(500, tag).iter().map(|d| format!("{param}={d}")).collect::<Vec<_>>().join("&");
    let update = |n: usize, tag: usize| {
        serde_json::json!({"type": "options_update", "payload": {"wantedDids": dids(n, tag)}}).to_string()
    };
    // What one 500-DID filter holds, as the server counts it; the budget is 4.5 of them, so
    // one address may hold 1.125.
    let f = contrail::hub::dispatch::filter_bytes(&contrail::options::Filter::new(&[], &dids(500, 0)).unwrap());
    let budget = (f * 9 / 2).to_string();
    let s = setup(5, &["--max-filter-bytes", &budget, "--trusted-proxies", "127.0.0.1"]).await;
    let public = s.serve.public;
    let held = || s.serve.metric("contrail_hub_filter_bytes").unwrap() as usize;
    let wait_held = |want: usize| wait_metric(&s, "contrail_hub_filter_bytes", want as f64);
    let refused = || s.serve.metric("contrail_hub_rejected_requests_total{reason=\"filter_budget\"}").unwrap_or(0.0);
    let from = |i: u8| format!("198.51.100.{i}");
    let v1 = |tag: usize| format!("/subscribe?{}", query("wantedDids", tag));

    // One address: its first filter fits its quarter, a second one as large does not.
    let _a = connect(public, &v1(1), &[("X-Forwarded-For", &from(1))]).await.unwrap();
    assert_eq!(held(), f);
    assert!(connect(public, &v1(2), &[("X-Forwarded-For", &from(1))]).await.is_err());
    assert_eq!(refused(), 1.0);
    // A filter sent in an options_update counts the same.
    let mut b = connect(public, "/subscribe", &[("X-Forwarded-For", &from(2))]).await.unwrap();
    send_text(&mut b, &update(500, 3)).await;
    wait_held(2 * f);
    // Two more clients fill the budget; the next is refused, on either wire.
    let _c = connect(public, &v1(4), &[("X-Forwarded-For", &from(3))]).await.unwrap();
    let _d = connect(public, &v1(5), &[("X-Forwarded-For", &from(4))]).await.unwrap();
    assert_eq!(held(), 4 * f);
    assert!(connect(public, &v1(6), &[("X-Forwarded-For", &from(5))]).await.is_err());
    let v2 = format!("/xrpc/network.bsky.jetstream.subscribeEvents?{}", query("dids", 6));
    assert!(connect(public, &v2, &[("X-Forwarded-For", &from(5))]).await.is_err());
    assert_eq!(refused(), 3.0);
    // An options_update past the budget closes with 1013 and a reason.
    send_text(&mut b, &update(1000, 7)).await;
    match next(&mut b, T).await {
        Some(Msg::Close(1013, reason)) => assert_eq!(reason, "filter memory budget full; try again later"),
        other => panic!("expected a 1013 close, got {other:?}"),
    }
    // Counted once the session has ended, just after its close frame.
    let closed = || s.serve.metric("contrail_hub_closes_total{reason=\"filter_budget\"}");
    let deadline = std::time::Instant::now() + T;
    while closed() != Some(1.0) {
        assert!(std::time::Instant::now() < deadline, "the close was not counted: {:?}", closed());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its filter's bytes come back with the close: the refused client gets in now.
    wait_held(3 * f);
    let _e = connect(public, &v1(6), &[("X-Forwarded-For", &from(5))]).await.unwrap();
    assert_eq!(held(), 4 * f);
    // A filter the live index keeps copies of (collections, or up to 100 DIDs) counts them too.
    let few: Vec<String> = dids(50, 8);
    let q = few.iter().map(|d| format!("wantedDids={d}")).collect::<Vec<_>>().join("&");
    let _g = connect(
        public,
        &format!("/subscribe?wantedCollections=app.bsky.feed.post&{q}"),
        &[("X-Forwarded-For", &from(6))],
    )
    .await
    .unwrap();
    let small = contrail::options::Filter::new(&["app.bsky.feed.post".into()], &few).unwrap();
    let counted = contrail::hub::dispatch::filter_bytes(&small);
    assert!(counted > small.heap_bytes(), "the index copy is counted");
    assert_eq!(held(), 4 * f + counted);
}

/// Incoming messages share `--max-client-message-bytes` (here 4 MiB: 1 MiB per client), beyond
/// 64 KiB per connection: a client holding part of a large message counts what it sent, a
/// message past its client's share closes with 1013 (its bytes come back), small messages and
/// other clients are not affected, and a client's bytes come back when it leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_messages_past_their_memory_budget_close_with_1013_and_their_bytes_come_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(5, &["--max-client-message-bytes", "4MiB", "--trusted-proxies", "127.0.0.1"]).await;
    let public = s.serve.public;
    let all = log(&s);
    let did = all[0]["did"].as_str().unwrap().to_string();
    let want = all.iter().filter(|e| e["did"] == did.as_str()).count();
    let wait_held = |want: usize| wait_metric(&s, "contrail_hub_client_message_bytes", want as f64);
    // The start of a text frame of `len` bytes (masked with zeros), and `sent` bytes in all.
    let partial_frame = |len: u64, sent: usize| {
        let mut bytes = vec![0x81, 0xff];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.resize(sent, b' ');
        bytes
    };
    // An options_update of about 220 KB for `did` (and 6,000 DIDs nobody writes) applies, and
    // its events arrive.
    let large_update = serde_json::json!({"type": "options_update", "payload": {"wantedDids":
        std::iter::once(did.clone()).chain((0..6000).map(|i| format!("did:plc:{i:024}"))).collect::<Vec<_>>()}})
    .to_string();
    assert!(large_update.len() > 200_000);
    let small_update = serde_json::json!({"type": "options_update", "payload": {"wantedDids": [did]}}).to_string();
    let applies = |from: &'static str, update: String| async move {
        let mut ws =
            connect(public, "/subscribe?requireHello=true&cursor=0", &[("X-Forwarded-For", from)]).await.unwrap();
        send_text(&mut ws, &update).await;
        let got = collect(&mut ws, want, T).await;
        assert_eq!(got.len(), want, "{from}: a {} byte options_update", update.len());
        ws
    };

    // A client sends 1,000,000 bytes of a 5 MB message and stops: read 64 KiB at a time, each
    // counted as its read starts, so 16 × 64 KiB are counted, 15 of them beyond the free 64 KiB.
    let mut a = raw_subscriber_at(public, "/subscribe", "198.51.100.1").await;
    a.write_all(&partial_frame(5_000_000, 1_000_000)).await.unwrap();
    wait_held(15 << 16);
    // Its second connection gets one more step (the client's 1 MiB), then is closed with 1013
    // before a third 64 KiB is read. It sends exactly the two it can read, so no unread bytes
    // turn the close into a reset.
    let mut b = raw_subscriber_at(public, "/subscribe", "198.51.100.1").await;
    b.write_all(&partial_frame(200_000, 14 + (2 << 16))).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(T, b.read_to_end(&mut answer)).await.expect("no close").unwrap();
    assert!(answer.len() >= 4 && answer[0] == 0x88, "expected a close frame: {answer:?}");
    assert_eq!(u16::from_be_bytes([answer[2], answer[3]]), 1013);
    assert_eq!(&answer[4..], b"client message memory budget full; try again later");
    assert_eq!(closes(&s, "message_budget"), 1.0);
    wait_held(15 << 16);
    // Another client's large message, and the same client's small one, apply meanwhile.
    let _c = applies("198.51.100.2", large_update.clone()).await;
    let _d = applies("198.51.100.1", small_update).await;
    wait_held(15 << 16);
    // The first connection leaves: its bytes come back, and its client's large message applies.
    drop(a);
    wait_held(0);
    let _e = applies("198.51.100.1", large_update).await;
    wait_held(0);
}

/// Replay pages in subscribers' hands share `--replay-held-bytes`, a quarter of it per client:
/// clients that stop reading mid-replay at distinct places hold at most the budget (before,
/// each held its own page of up to ~8 MB until the write timeout). Another client replays
/// past one client's stuck streams; once the whole budget is held a replayer waits for room,
/// holding nothing, and gets exactly the log once the stuck clients are gone.
/// Adds 2,000 events of ~2 KB to a server of [`setup`]`(5, …)`: a page of 1,024 of them is
/// ~4.4 MB. Returns the whole log.
fn with_large_posts(s: &Setup) -> Vec<serde_json::Value> {
    use common::frames::{commit_frame, map, s as text, tid_for, TestOp};
    let body = "x".repeat(2_000);
    for i in 0..2_000u64 {
        let seq = 100 + i as i64;
        let rec = map(vec![("$type", text("app.bsky.feed.post")), ("text", text(&body))]);
        let path = format!("app.bsky.feed.post/{}", tid_for(i));
        s.relay.push(seq, commit_frame(seq, &did_for(1 + i % 3), &tid_for(9_000 + i), &[TestOp::create(&path, &rec)]));
    }
    s.serve.wait_for_seq(2_099, Duration::from_secs(60));
    let all = log(s);
    assert_eq!(all.len(), 2_005);
    all
}

/// A replayer that waits longer than `--replay-room-timeout` for room is told to come back
/// later (1013): clients reading their pages very slowly keep the room for many minutes,
/// and it used to wait for as long, silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayer_kept_waiting_for_room_is_told_to_try_again_later() {
    let args = ["--replay-held-bytes", "1MiB", "--replay-room-timeout", "2s", "--trusted-proxies", "127.0.0.1"];
    let s = setup(5, &args).await;
    let all = with_large_posts(&s);
    // A client stops reading with its first page (~4.4 MB) in hand: all the room there is.
    let _stuck = raw_subscriber_at(s.serve.public, "/subscribe?cursor=0", "198.51.100.1").await;
    let deadline = std::time::Instant::now() + T;
    while s.serve.metric("contrail_hub_replay_held_bytes").unwrap_or(0.0) < (1 << 20) as f64 {
        assert!(std::time::Instant::now() < deadline, "the stuck client's page never counted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = std::time::Instant::now();
    let cursor = format!("/subscribe?cursor={}", all[1_500]["time_us"]);
    let mut ws = connect(s.serve.public, &cursor, &[("X-Forwarded-For", "198.51.100.2")]).await.unwrap();
    let closed = next(&mut ws, Duration::from_secs(20)).await;
    assert_eq!(closed, Some(Msg::Close(1013, "replay memory budget full; try again later".into())));
    assert!(start.elapsed() >= Duration::from_secs(2), "closed after {:?}", start.elapsed());
    wait_closes(&s, "replay_budget", 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_pages_in_hand_are_bounded_and_a_replayer_waits_for_room() {
    let budget = 16 << 20;
    let s = setup(5, &["--replay-held-bytes", "16MiB", "--trusted-proxies", "127.0.0.1"]).await;
    let all = with_large_posts(&s);
    let public = s.serve.public;
    let held = || s.serve.metric("contrail_hub_replay_held_bytes").unwrap();
    let waits = || s.serve.metric("contrail_hub_replay_held_waits_total").unwrap();
    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + T;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}: held {} bytes, {} waits", held(), waits());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let at = |i: usize| all[i]["time_us"].as_u64().unwrap();
    let reader = |from: &'static str| async move {
        connect(public, "/subscribe?cursor=0", &[("X-Forwarded-For", from)]).await.unwrap()
    };

    // Client A stops reading with the first page in hand: its quarter is taken, so its next
    // stream, in the middle of the log with a filter of its own, waits.
    let a1 = raw_subscriber_at(public, "/subscribe?cursor=0", "198.51.100.1").await;
    wait_until("A's first page in hand", &|| held() > 0.0);
    let a2 = raw_subscriber_at(
        public,
        &format!("/subscribe?cursor={}&wantedDids={}", at(1_500), did_for(2)),
        "198.51.100.1",
    )
    .await;
    wait_until("A's second stream waiting", &|| waits() >= 1.0);
    let held_by_a = held(); // A's first page: B joins it, and lets its own pages go
                            // Client B replays everything past A's stuck streams: it shares A's first page.
    let mut b = reader("198.51.100.2").await;
    assert_eq!(collect(&mut b, all.len(), T).await, all, "client B's replay is the log");

    // Three more stuck clients, each at a place of its own past the first page (within a page
    // someone holds, a stream joins it). A reservation is room for the largest page (~8.5 MiB),
    // so one gets in at first and the others wait; each page taken in hand gives back what it
    // does not use, and a waiter gets in while there is room. Then it settles, with less room
    // left than a reservation (else a waiter would have got in).
    wait_until("B's pages let go", &|| held() == held_by_a);
    let mut stuck = vec![a1, a2];
    for (i, from) in [(1_100, "198.51.100.3"), (1_300, "198.51.100.4"), (1_400, "198.51.100.5")] {
        stuck.push(raw_subscriber_at(public, &format!("/subscribe?cursor={}", at(i)), from).await);
    }
    wait_until("another page held, a wait", &|| waits() >= 2.0 && held() > held_by_a);
    // Settled: nothing moved for a second (a loaded machine builds the pages slowly).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut state, mut since) = ((held(), waits()), std::time::Instant::now());
    while since.elapsed() < Duration::from_secs(1) {
        assert!(std::time::Instant::now() < deadline, "never settled: held {} bytes, {} waits", held(), waits());
        std::thread::sleep(Duration::from_millis(50));
        if (held(), waits()) != state {
            (state, since) = ((held(), waits()), std::time::Instant::now());
        }
    }
    let (held_by_stuck, waits_before) = state;
    assert!(held_by_stuck <= budget as f64, "{held_by_stuck} bytes held");
    // A replayer from yet another client gets the first page (joined: A holds it) and then
    // nothing, waiting for room for the next one.
    let mut g = reader("198.51.100.6").await;
    let first = collect(&mut g, all.len(), Duration::from_secs(3)).await;
    assert_eq!(first.len(), 1_024, "one page, then a wait for room");
    assert_eq!(waits(), waits_before + 1.0, "the replayer's wait");
    assert_eq!(held(), held_by_stuck, "the joined page counted once");
    // The stuck clients go: the replayer gets the rest, exactly.
    drop(stuck);
    let rest = collect(&mut g, all.len() - first.len(), Duration::from_secs(20)).await;
    let got: Vec<serde_json::Value> = first.into_iter().chain(rest).collect();
    assert_eq!(got, all, "the replay is the log, once, in order");
    wait_until("every page let go", &|| held() == 0.0);
}

/// What a subscriber was told, in order: an event's `time_us` (`Ok`), or a gap (`Err`: its
/// after and through edges, from a v1 gap message or a v2 `#info OutdatedCursor`).
type Told = Result<u64, (u64, u64)>;

/// Reads a v1 (`v2` false) or v2 text stream until a gap and then `after_gap` events were told,
/// or until `timeout` of silence. Cursor messages are checked, not returned: none before the
/// gap may claim a position past its start.
async fn told_until_past_a_gap(ws: &mut Ws, v2: bool, after_gap: usize, timeout: Duration) -> Vec<Told> {
    let mut out: Vec<Told> = Vec::new();
    let mut cursor_before_gap = 0;
    let past_gap = |out: &Vec<Told>| out.iter().skip_while(|t| t.is_ok()).skip(1).count();
    while !out.iter().any(|t| t.is_err()) || past_gap(&out) < after_gap {
        let Some(m) = next(ws, timeout).await else { break };
        let Msg::Text(t) = m else { panic!("after {} messages: {m:?}", out.len()) };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        let told = if v2 {
            let p = &v["payload"];
            if p["$type"] == "network.bsky.jetstream.subscribeEvents#info" {
                assert_eq!(p["name"], "OutdatedCursor", "{t}");
                // "events after seq A through seq B were deleted before they were sent; …"
                let words: Vec<&str> = p["message"].as_str().unwrap().split(' ').collect();
                let (after, through) = (words[3].parse().unwrap(), words[6].parse().unwrap());
                // The same range in fields, for programs.
                assert_eq!((p["afterSeq"].as_u64(), p["throughSeq"].as_u64()), (Some(after), Some(through)), "{t}");
                Err((after, through))
            } else {
                Ok(p["seq"].as_u64().unwrap())
            }
        } else {
            match v["kind"].as_str().unwrap() {
                "cursor" => {
                    if !out.iter().any(|t| t.is_err()) {
                        cursor_before_gap = v["time_us"].as_u64().unwrap();
                    }
                    continue;
                }
                "gap" => Err((v["after_us"].as_u64().unwrap(), v["through_us"].as_u64().unwrap())),
                "commit" | "identity" | "account" | "sync" => Ok(v["time_us"].as_u64().unwrap()),
                other => panic!("a message of kind {other}: {t}"),
            }
        };
        if let Err((after, _)) = told {
            assert!(cursor_before_gap <= after, "a cursor message at {cursor_before_gap} claimed the gap's range: {t}");
        }
        out.push(told);
    }
    out
}

/// Retention that deletes events replaying subscribers have not read yet: each goes on from the
/// oldest event left and is told the gap first, exactly, between the events around it — v2 in
/// an `#info OutdatedCursor`, v1 if it asked for cursor messages (a strict v1 client is told
/// nothing: it knows no other kinds). A cursor older than the log is told the same at the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayers_that_retention_overtakes_are_told_the_gap_in_order() {
    let relay = FakeRelay::start().await;
    let first = generate(1, 1500, 20, 7);
    relay.push_all(&first);
    let dir = tempfile::tempdir().unwrap();
    // Three replayers sharing 300 events/s take about ten seconds for their first page (1,024
    // events); retention (1 s) deletes the rest of the first batch once the second arrives,
    // some 1.5 s in (the margin is for a loaded machine's slow ingest of it).
    let flags = ["--max-events-per-second-per-ip", "300", "--retention", "1s", "--trim-interval", "100ms"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(first.last().unwrap().seq, Duration::from_secs(60));
    // Quiet now: the log stays as it is until newer events arrive.
    let times = |dir: &std::path::Path| -> Vec<u64> {
        inspect_log(dir)
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap())
            .collect()
    };
    let before = times(dir.path());
    assert!(before.len() > 1500, "{} events", before.len());
    let oldest = before[0];
    let q = |more: &str| format!("/subscribe?cursor={oldest}{more}");
    let mut told = connect(serve.public, &q("&informCursorSeconds=1"), &[]).await.unwrap();
    let mut strict = connect(serve.public, &q(""), &[]).await.unwrap();
    let v2_path = format!("/xrpc/network.bsky.jetstream.subscribeEvents?cursor={oldest}");
    let mut v2 = connect(serve.public, &v2_path, &[]).await.unwrap();
    // Their first pages taken (scanned before any trim), then the first batch a retention old.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while serve.metric("contrail_hub_replay_reads_total").unwrap_or(0.0) < 3.0 {
        assert!(std::time::Instant::now() < deadline, "the replays never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = generate(10_000, 50, 20, 8);
    relay.push_all(&second);
    serve.wait_for_seq(second.last().unwrap().seq, Duration::from_secs(30));
    let long = Duration::from_secs(15);
    let (told_v1, told_v2) =
        (told_until_past_a_gap(&mut told, false, 5, long).await, told_until_past_a_gap(&mut v2, true, 5, long).await);
    let after = times(dir.path());
    assert!(after[0] > *before.last().unwrap(), "retention left some of the first batch: {}", after[0]);
    for (wire, got) in [("v1", &told_v1), ("v2", &told_v2)] {
        let gap_at = got.iter().position(|t| t.is_err()).unwrap_or_else(|| panic!("{wire}: no gap told"));
        let events: Vec<u64> = got[..gap_at].iter().map(|t| *t.as_ref().unwrap()).collect();
        assert!(
            events.len() >= 1024 && events[..] == before[..events.len()],
            "{wire}: the log from the cursor, then the gap"
        );
        let Err((from, through)) = got[gap_at] else { unreachable!() };
        assert_eq!(from, *events.last().unwrap(), "{wire}: the gap starts at the last event sent");
        assert_eq!(through, *before.last().unwrap(), "{wire}: and ends at the newest event deleted");
        let rest: Vec<u64> = got[gap_at + 1..]
            .iter()
            .map(|t| *t.as_ref().unwrap_or_else(|g| panic!("{wire}: a second gap {g:?}")))
            .collect();
        assert_eq!(rest[..], after[..rest.len()], "{wire}: then the oldest events left, in order");
    }
    // The strict v1 client: the same events, with nothing between them.
    let mut plain = Vec::new();
    while plain.len() < told_v1.len() - 1 {
        let Some(Msg::Text(t)) = next(&mut strict, long).await else { panic!("after {} events", plain.len()) };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert!(["commit", "identity", "account"].contains(&v["kind"].as_str().unwrap()), "{t}");
        plain.push(v["time_us"].as_u64().unwrap());
    }
    let want: Vec<u64> = told_v1.iter().filter_map(|t| t.ok()).collect();
    assert_eq!(plain, want);
    assert_eq!(serve.metric("contrail_hub_replay_overtaken_total"), Some(3.0), "each replayer counted once");
    // A cursor the log no longer reaches: the gap up to the newest event deleted, then the
    // oldest event left;
    // with the start taken at a hello too, when the first cursor message is due at once.
    let mut late = connect(serve.public, &q("&informCursorSeconds=1"), &[]).await.unwrap();
    let got = told_until_past_a_gap(&mut late, false, 1, T).await;
    assert_eq!(got, vec![Err((oldest - 1, *before.last().unwrap())), Ok(after[0])]);
    let mut late = connect(serve.public, &q("&informCursorSeconds=1&requireHello=true"), &[]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    send_text(&mut late, r#"{"type":"options_update","payload":{}}"#).await;
    let got = told_until_past_a_gap(&mut late, false, 1, T).await;
    assert_eq!(got, vec![Err((oldest - 1, *before.last().unwrap())), Ok(after[0])]);
    let mut late = connect(serve.public, &q(""), &[]).await.unwrap();
    let Some(Msg::Text(t)) = next(&mut late, T).await else { panic!("nothing") };
    assert!(t.contains(&format!("\"time_us\":{}", after[0])), "a strict v1 client gets the oldest event: {t}");
    // A cursor just past the newest event deleted (a client that had it) lost nothing: no
    // event was ever between it and the oldest left. Before, both wires told a gap.
    let past = before.last().unwrap() + 1;
    let mut caught_up =
        connect(serve.public, &format!("/subscribe?cursor={past}&informCursorSeconds=1"), &[]).await.unwrap();
    let first = loop {
        let Some(Msg::Text(t)) = next(&mut caught_up, T).await else { panic!("nothing") };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["kind"] != "cursor" {
            break v;
        }
    };
    assert_eq!(first["time_us"].as_u64(), Some(after[0]), "v1: the oldest event left, no gap: {first}");
    let v2_path = format!("/xrpc/network.bsky.jetstream.subscribeEvents?cursor={past}");
    let mut caught_up = connect(serve.public, &v2_path, &[]).await.unwrap();
    let Some(Msg::Text(t)) = next(&mut caught_up, T).await else { panic!("nothing") };
    let info: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(info["payload"]["name"], "OutdatedCursor", "v2 says the cursor is below the floor, as v2 does: {t}");
    assert!(info["payload"].get("afterSeq").is_none(), "but no range lost: {t}");
    let Some(Msg::Text(t)) = next(&mut caught_up, T).await else { panic!("nothing") };
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["payload"]["seq"].as_u64(), Some(after[0]), "{t}");
    assert_eq!(serve.metric("contrail_hub_cursors_before_log_total"), Some(3.0), "the three late cursors");
}
