//! A subscription against servers that misbehave, each a real websocket server on loopback
//! whose n-th connection follows the n-th script: endless fragments, time going backwards,
//! a `time_us` in the future, garbage, an HTTP 400. The subscription must stay bounded, say
//! what happened, and deliver exactly the good events.

use contrail_client::{Error, Failover, Message, Subscription};
use fastwebsockets::{Frame, OpCode, Payload};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
enum Script {
    /// Text messages, then the connection stays open.
    Send(Vec<String>),
    /// A text message in fragments that never end (1 MiB each), until the client hangs up.
    EndlessFragments,
    /// Answer the upgrade with this status.
    Status(u16),
    /// Answer the upgrade with this status, `Retry-After` and body.
    Refuse(u16, Option<&'static str>, &'static str),
    /// Events of about this many bytes each, this many, starting at this `time_us`.
    Large { size: usize, count: usize, from: u64 },
    /// One event, at this `time_us` plus the connection's number (so each is new), then a
    /// close.
    OneThenClose(u64),
    /// Complete the upgrade, then neither read nor write (a server process that hangs while
    /// its kernel keeps the connection: pings are accepted and never answered).
    Silent,
    /// Nothing to send, pings answered, for this long; then a close (a quiet subscription
    /// through a server restart).
    QuietThenClose(Duration),
    /// Binary messages, then the connection stays open.
    Binary(Vec<Vec<u8>>),
    /// Text messages, then it hangs as [`Script::Silent`] does.
    SendThenSilent(Vec<String>),
    /// Text messages, then a close.
    SendThenClose(Vec<String>),
    /// Text messages, each after its pause (pings are not answered meanwhile), then as
    /// [`Script::Send`].
    Paced(Vec<(Duration, String)>),
    /// Frames as given (fin, opcode, payload), then as [`Script::Send`].
    Frames(Vec<(bool, OpCode, Vec<u8>)>),
}

fn event(time_us: u64) -> String {
    format!(
        r#"{{"did":"did:plc:a","time_us":{time_us},"kind":"commit","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k{time_us}","record":{{}}}}}}"#
    )
}

/// An op of a commit whose ops are all stamped `time_us` (as Jetstream v2 stamps them).
fn op_event(time_us: u64, rkey: &str) -> String {
    format!(
        r#"{{"did":"did:plc:a","time_us":{time_us},"kind":"commit","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"{rkey}","record":{{}}}}}}"#
    )
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// Serves its n-th connection with `scripts[min(n, last)]` (n counted from 0, or from where a
/// test sets `next_script`); counts connections and the bytes of fragments (or large events)
/// the client accepted.
struct Server {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    next_script: Arc<AtomicUsize>,
    accepted_bytes: Arc<AtomicUsize>,
}

async fn serve(scripts: Vec<Script>) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let next_script = Arc::new(AtomicUsize::new(0));
    let accepted_bytes = Arc::new(AtomicUsize::new(0));
    let (c, next, f) = (connections.clone(), next_script.clone(), accepted_bytes.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let n = c.fetch_add(1, Ordering::SeqCst);
            let script = scripts[next.fetch_add(1, Ordering::SeqCst).min(scripts.len() - 1)].clone();
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                    let (script, f) = (script.clone(), f.clone());
                    async move {
                        let refusal = match script {
                            Script::Status(code) => Some((code, None, "")),
                            Script::Refuse(code, after, body) => Some((code, after, body)),
                            _ => None,
                        };
                        if let Some((code, after, body)) = refusal {
                            let mut r = hyper::Response::builder().status(code);
                            if let Some(after) = after {
                                r = r.header("retry-after", after);
                            }
                            return Ok(r
                                .body(http_body_util::Full::new(bytes::Bytes::from_static(body.as_bytes())))
                                .unwrap());
                        }
                        let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
                        tokio::spawn(async move {
                            let Ok(mut ws) = fut.await else { return };
                            match script {
                                Script::Send(msgs) => {
                                    for m in msgs {
                                        if ws.write_frame(Frame::text(Payload::Owned(m.into_bytes()))).await.is_err() {
                                            return;
                                        }
                                    }
                                    // Stay open, answering pings, until the client leaves.
                                    while let Ok(frame) = ws.read_frame().await {
                                        if frame.opcode == OpCode::Close {
                                            return;
                                        }
                                    }
                                }
                                Script::EndlessFragments => {
                                    let chunk = vec![b'x'; 1 << 20];
                                    let first = Frame::new(false, OpCode::Text, None, Payload::Borrowed(b"{\"x\":\""));
                                    if ws.write_frame(first).await.is_err() {
                                        return;
                                    }
                                    loop {
                                        let frame =
                                            Frame::new(false, OpCode::Continuation, None, Payload::Borrowed(&chunk));
                                        if ws.write_frame(frame).await.is_err() {
                                            return;
                                        }
                                        f.fetch_add(chunk.len(), Ordering::SeqCst);
                                    }
                                }
                                Script::Large { size, count, from } => {
                                    let text = "x".repeat(size);
                                    for i in 0..count as u64 {
                                        let e = format!(
                                            r#"{{"did":"did:plc:a","time_us":{},"kind":"commit","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.post","rkey":"k{i}","record":{{"text":"{text}"}}}}}}"#,
                                            from + i
                                        );
                                        let n = e.len();
                                        if ws.write_frame(Frame::text(Payload::Owned(e.into_bytes()))).await.is_err() {
                                            return;
                                        }
                                        f.fetch_add(n, Ordering::SeqCst);
                                    }
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                Script::OneThenClose(from) => {
                                    let e = event(from + n as u64);
                                    let _ = ws.write_frame(Frame::text(Payload::Owned(e.into_bytes()))).await;
                                    let _ = ws.write_frame(Frame::close(1000, b"")).await;
                                }
                                Script::Silent => {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                    drop(ws);
                                }
                                Script::SendThenSilent(msgs) => {
                                    for m in msgs {
                                        if ws.write_frame(Frame::text(Payload::Owned(m.into_bytes()))).await.is_err() {
                                            return;
                                        }
                                    }
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                Script::Binary(msgs) => {
                                    for m in msgs {
                                        let frame = Frame::new(true, OpCode::Binary, None, Payload::Owned(m));
                                        if ws.write_frame(frame).await.is_err() {
                                            return;
                                        }
                                    }
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                Script::SendThenClose(msgs) => {
                                    for m in msgs {
                                        if ws.write_frame(Frame::text(Payload::Owned(m.into_bytes()))).await.is_err() {
                                            return;
                                        }
                                    }
                                    let _ = ws.write_frame(Frame::close(1001, b"restarting")).await;
                                    // The client's answer, before the socket goes.
                                    let _ = tokio::time::timeout(Duration::from_secs(5), ws.read_frame()).await;
                                }
                                Script::Paced(msgs) => {
                                    for (pause, m) in msgs {
                                        tokio::time::sleep(pause).await;
                                        if ws.write_frame(Frame::text(Payload::Owned(m.into_bytes()))).await.is_err() {
                                            return;
                                        }
                                    }
                                    while let Ok(frame) = ws.read_frame().await {
                                        if frame.opcode == OpCode::Close {
                                            return;
                                        }
                                    }
                                }
                                Script::QuietThenClose(d) => {
                                    let _ = tokio::time::timeout(d, async {
                                        while let Ok(frame) = ws.read_frame().await {
                                            if frame.opcode == OpCode::Close {
                                                return;
                                            }
                                        }
                                    })
                                    .await;
                                    let _ = ws.write_frame(Frame::close(1001, b"restarting")).await;
                                }
                                Script::Frames(frames) => {
                                    for (fin, opcode, payload) in frames {
                                        let frame = Frame::new(fin, opcode, None, Payload::Owned(payload));
                                        if ws.write_frame(frame).await.is_err() {
                                            return;
                                        }
                                    }
                                    while let Ok(frame) = ws.read_frame().await {
                                        if frame.opcode == OpCode::Close {
                                            return;
                                        }
                                    }
                                }
                                Script::Status(_) | Script::Refuse(..) => unreachable!(),
                            }
                        });
                        let (parts, _) = resp.into_parts();
                        Ok::<_, fastwebsockets::WebSocketError>(hyper::Response::from_parts(
                            parts,
                            http_body_util::Full::new(bytes::Bytes::new()),
                        ))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await;
            });
        }
    });
    Server { addr, connections, next_script, accepted_bytes }
}

fn subscribe(s: &Server, cursor: Option<u64>) -> Subscription {
    Subscription::builder([format!("ws://{}", s.addr)])
        .cursor(cursor)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .stale_timeout(Duration::from_secs(3))
        .start()
        .unwrap()
}

async fn next_event(sub: &mut Subscription) -> u64 {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("a message in time").unwrap();
        if let Message::Event(e) = m {
            return e.time_us();
        }
    }
}

/// A host stuck at `at`: cursor messages there, five a second, for 40 s.
fn stuck_at(at: u64) -> Script {
    let cursor = format!(r#"{{"kind":"cursor","time_us":{at},"live":true}}"#);
    Script::Paced((0..200).map(|_| (Duration::from_millis(200), cursor.clone())).collect())
}

/// A subscription over `hosts` from `t`, with a stale timeout of 3 s (a ping a second) and the
/// given stall timeout.
fn stalling_over(hosts: &[&Server], t: u64, stall: Duration) -> Subscription {
    Subscription::builder(hosts.iter().map(|h| format!("ws://{}", h.addr)))
        .cursor(Some(t))
        .stale_timeout(Duration::from_secs(3))
        .stall_timeout(stall)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_fragments_are_cut_off_at_the_message_limit() {
    let t = now_us();
    let server = serve(vec![Script::EndlessFragments, Script::Send(vec![event(t)])]).await;
    let mut sub = subscribe(&server, None);
    // The client hangs up on the first connection and gets the event on the second.
    assert_eq!(next_event(&mut sub).await, t);
    // What the server wrote before the client hung up: the 16 MiB limit plus what the two
    // loopback socket buffers held (the largest sizes the kernel grows them to: 4 MiB and
    // 6 MiB by default, 32 MiB for receiving on some machines). Without the limit it never ends.
    let largest = |name: &str, default: usize| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(default)
    };
    let most = (17 << 20) + largest("tcp_wmem", 4 << 20) + largest("tcp_rmem", 6 << 20);
    let accepted = server.accepted_bytes.load(Ordering::SeqCst);
    assert!(accepted <= most, "the client took {accepted} bytes of one message (at most {most})");
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_hangs_with_its_connection_open_is_left_at_the_stale_timeout() {
    let t = now_us();
    let server = serve(vec![Script::Silent, Script::Send(vec![event(t)])]).await;
    let mut sub = subscribe(&server, None);
    // The stale timeout is 3 s: the client pings every second, hears nothing, and moves on.
    // Before, each ping started the timeout again, so it never came.
    let started = std::time::Instant::now();
    assert_eq!(next_event(&mut sub).await, t);
    assert!(started.elapsed() >= Duration::from_secs(3), "not before the stale timeout");
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_sent_cursor_messages_and_then_only_answers_pings_is_left_at_the_stale_timeout() {
    let t = now_us();
    let cursor = |t: u64| format!(r#"{{"kind":"cursor","time_us":{t},"live":true}}"#);
    // Its stream for us stops after one cursor message; its socket still answers the pings.
    let server = serve(vec![Script::Send(vec![cursor(t)]), Script::Send(vec![event(t + 1)])]).await;
    let mut sub = subscribe(&server, Some(t));
    let started = std::time::Instant::now();
    assert_eq!(next_event(&mut sub).await, t + 1);
    assert!(started.elapsed() >= Duration::from_secs(3), "not before the stale timeout");
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    // Cursor messages at the pace asked for (one a second for a stale timeout of 3 s) keep a
    // quiet stream, over twice the stale timeout, on one connection.
    let mut paced: Vec<_> = (1..=7).map(|i| (Duration::from_secs(1), cursor(t + i))).collect();
    paced.push((Duration::from_secs(1), event(t + 8)));
    let server = serve(vec![Script::Paced(paced), Script::Send(vec![event(t + 9)])]).await;
    let mut sub = subscribe(&server, Some(t));
    assert_eq!(next_event(&mut sub).await, t + 8);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_does_not_keep_up_holds_its_buffer_in_bytes_not_just_messages() {
    // 300 events of 1 MiB (far under the 1,024 messages the buffer holds) to a consumer that
    // takes none: the client reads up to its byte budget (8 MiB here) and its read-ahead, then
    // stops reading; the sockets' buffers fill and the server's writes wait. Without the
    // budget it takes all 300 MiB.
    let t = now_us();
    let server = serve(vec![Script::Large { size: 1 << 20, count: 300, from: t }]).await;
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .buffer_bytes(8 << 20)
        .stale_timeout(Duration::from_secs(60))
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = server.accepted_bytes.load(Ordering::SeqCst);
    // 8 MiB buffered, 16 frames read ahead, one in hand, and the sockets' buffers (Linux
    // grows a loopback receive buffer up to `tcp_rmem`'s maximum, 32 MiB here): ~55 MiB.
    assert!(accepted <= 120 << 20, "the client took {} MiB", accepted >> 20);
    // Taking them frees room: every event arrives, in order.
    for i in 0..300 {
        assert_eq!(next_event(&mut sub).await, t + i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_each_hand_over_an_event_and_drop_us_are_not_reconnected_to_in_a_loop() {
    let t = now_us();
    // Two hosts (the same server twice), each connection one new event, then a close; and a
    // cursor message of 0 first (an empty log's), which is no position.
    let server =
        serve(vec![Script::Send(vec![r#"{"kind":"cursor","time_us":0}"#.into(), event(t)]), Script::OneThenClose(t)])
            .await;
    let url = format!("ws://{}", server.addr);
    let mut sub = Subscription::builder([url.clone(), url])
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .start()
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap() {
        Message::Event(e) => assert_eq!(e.time_us(), t),
        other => panic!("expected the event, got {other:?}"),
    }
    drop(sub);
    let mut sub = Subscription::builder([format!("ws://{}", server.addr), format!("ws://{}", server.addr)])
        .backoff(Duration::from_millis(100), Duration::from_millis(200))
        .start()
        .unwrap();
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let _ = tokio::time::timeout(Duration::from_millis(100), sub.next()).await;
    }
    // A pause of 50–100 ms after each brief connection: at most ~40 in 2 s. Before, none, and
    // the client connected thousands of times.
    let n = server.connections.load(Ordering::SeqCst);
    assert!(n <= 50, "{n} connections in 2 s");
    assert!(n >= 5, "{n} connections: it does go on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_client_cannot_read_at_one_position_ends_the_subscription_with_the_reason() {
    let t = now_us();
    // Every connection: the event at t+1, then one text message of 17 MiB (over the 16 MiB a
    // message may be, in one frame: the connection cannot go on past it).
    let big = format!("{{\"x\":\"{}\"}}", "x".repeat(17 << 20));
    // Before, it reconnected at t+1 for ever, the caller never told.
    ends_unreadable_after(t, big, "16 MiB").await;
}

/// The same with another host in the list that cannot be reached, the case a list is for: its
/// failures in between do not start the count again. Before, the subscription went from one
/// host to the other for ever, the caller never told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_client_cannot_read_ends_the_subscription_with_a_host_of_the_list_out_of_reach() {
    let t = now_us();
    let big = format!("{{\"x\":\"{}\"}}", "x".repeat(17 << 20));
    let server = serve(vec![Script::Send(vec![event(t + 1), big])]).await;
    // A port nothing listens on: refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut sub = Subscription::builder([format!("ws://{}", server.addr), format!("ws://{closed}")])
        .cursor(Some(t))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .stale_timeout(Duration::from_secs(3))
        .start()
        .unwrap();
    assert_eq!(next_event(&mut sub).await, t + 1);
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
    assert!(matches!(&err, Error::Unreadable { after: Some(a), .. } if *a == t + 1), "{err}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 1 + 3, "the first, then three tries at t+1");
}

/// A text message that is not UTF-8 breaks the protocol (RFC 6455 fails the connection), in
/// one frame or in fragments alike: the connection ends, and the same message at the same
/// position three times ends the subscription with the reason. Before, a fragmented one was
/// skipped as malformed while one in a single frame ended the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_message_that_is_not_utf8_is_unreadable_in_one_frame_or_in_fragments() {
    let t = now_us();
    let whole = vec![(true, OpCode::Text, b"{\"x\":\"\xff\"}".to_vec())];
    let fragmented =
        vec![(false, OpCode::Text, b"{\"x\":\"".to_vec()), (true, OpCode::Continuation, b"\xff\"}".to_vec())];
    for bad in [whole, fragmented] {
        let first = (true, OpCode::Text, event(t + 1).into_bytes());
        let server = serve(vec![Script::Frames([vec![first], bad].concat())]).await;
        let mut sub = subscribe(&server, Some(t));
        assert_eq!(next_event(&mut sub).await, t + 1);
        let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
        let Error::Unreadable { after, what, .. } = &err else { panic!("expected Unreadable, got {err}") };
        assert_eq!(*after, Some(t + 1));
        assert!(what.contains("not UTF-8"), "{what}");
        assert_eq!(server.connections.load(Ordering::SeqCst), 1 + 3, "the first, then three tries at t+1");
        assert_eq!(sub.stats().malformed.load(Ordering::Relaxed), 0);
    }
}

/// A message one host sends that this client cannot read is not met again and again on that
/// host while the other is paused by a `Retry-After`: the other is waited for. Before, the
/// three tries were used up on the host that sends it, and the subscription ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_is_not_met_again_while_the_other_host_is_paused() {
    let t = now_us();
    let paused = serve(vec![Script::Refuse(429, Some("2"), "busy"), Script::Send(vec![event(t + 1)])]).await;
    let unreadable = serve(vec![Script::Frames(vec![(true, OpCode::Text, b"{\"x\":\"\xff\"}".to_vec())])]).await;
    let began = std::time::Instant::now();
    let mut sub = Subscription::builder([format!("ws://{}", paused.addr), format!("ws://{}", unreadable.addr)])
        .cursor(Some(t))
        .backoff(Duration::from_millis(10), Duration::from_secs(10))
        .start()
        .unwrap();
    assert_eq!(next_event(&mut sub).await, t + 1);
    assert!(began.elapsed() >= Duration::from_millis(1_900), "asked again after {:?}", began.elapsed());
    assert_eq!(unreadable.connections.load(Ordering::SeqCst), 1);
    assert_eq!(paused.connections.load(Ordering::SeqCst), 2);
}

/// One host sends a message this client cannot read after the position; the other no longer
/// has the events after it. The search for a host that has them must not start the count of
/// unreadable messages again each round: before, the two were reconnected to for ever, several
/// times a second, and the subscription said nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_on_one_host_and_a_gap_on_the_other_end_the_subscription() {
    let t = now_us();
    let unreadable = serve(vec![Script::Frames(vec![(true, OpCode::Text, b"{\"x\":\"\xff\"}".to_vec())])]).await;
    let gap = format!(r#"{{"kind":"gap","after_us":{t},"through_us":{}}}"#, t + 3_600_000_000);
    let lacking = serve(vec![Script::Send(vec![gap])]).await;
    let mut sub = Subscription::builder([format!("ws://{}", unreadable.addr), format!("ws://{}", lacking.addr)])
        .cursor(Some(t))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
    assert!(matches!(&err, Error::Unreadable { after: Some(a), .. } if *a == t), "{err}");
    assert_eq!(unreadable.connections.load(Ordering::SeqCst), 3, "three tries at the position");
}

/// Timeouts past any clock (`Duration::MAX` for "never") are taken for a century: before, the
/// first connection's deadline overflowed and the subscription ended at once, saying nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_mean_never() {
    let t = now_us();
    let server = serve(vec![Script::Refuse(400, None, "no"), Script::Send(vec![event(t + 1)])]).await;
    let never = || {
        Subscription::builder([format!("ws://{}", server.addr)])
            .cursor(Some(t))
            .connect_timeout(Duration::MAX)
            .stale_timeout(Duration::MAX)
            .start()
            .unwrap()
    };
    // A refusal (the upgrade's deadline), then events (the stale deadline).
    let err = tokio::time::timeout(Duration::from_secs(10), never().next()).await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Refused { reason, .. } if reason.ends_with(": no")), "{err}");
    assert_eq!(next_event(&mut never()).await, t + 1);
}

/// A v2 connection ended by `set_filters` after it delivered is a good session, not one that
/// leaves the failures from before it counting: before, two failed connections, an hour of
/// events, new filters and one failed reconnect ended the subscription with `max_attempts(3)`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_filters_after_a_good_session_do_not_add_up_to_max_attempts() {
    let t = now_us();
    let v2 = |seq: u64| {
        format!(
            r#"{{"$type":"message","payload":{{"$type":"network.bsky.jetstream.subscribeEvents#commit","cid":"bafyreib","collection":"app.bsky.feed.post","did":"did:plc:abc","operation":"create","record":{{"text":"hi"}},"rev":"3l3qo2vutsw2b","rkey":"3l3qo2vuowo2b","seq":{seq},"time":"2024-09-09T19:46:02.329308Z"}}}}"#
        )
    };
    let server = serve(vec![
        Script::Status(503),
        Script::Status(503),
        Script::Send(vec![v2(t + 1)]),
        Script::Status(503),
        Script::Send(vec![v2(t + 2)]),
    ])
    .await;
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .wire(contrail_client::Wire::V2)
        .cursor(Some(t))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .max_attempts(3)
        .start()
        .unwrap();
    assert_eq!(next_event(&mut sub).await, t + 1);
    sub.set_filters(contrail_client::Filters { collections: vec!["app.bsky.feed.post".into()], dids: vec![] }).unwrap();
    assert_eq!(next_event(&mut sub).await, t + 2);
    assert_eq!(server.connections.load(Ordering::SeqCst), 5);
}

/// A host that sends cursor messages that do not move the position on (a replica whose
/// upstream is gone: it serves what it has, and answers as a live one would) is left after the
/// stall timeout for the next host, which is ahead. Before, its cursor messages kept it: the
/// subscription stayed there for as long as it stayed stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_cursor_messages_stay_put_is_left_for_one_that_moves_on() {
    let t = now_us();
    let frozen = serve(vec![stuck_at(t)]).await;
    let ahead = serve(vec![Script::Send(vec![event(t + 1)])]).await;
    let mut sub = stalling_over(&[&frozen, &ahead], t, Duration::from_secs(4));
    let began = std::time::Instant::now();
    assert_eq!(next_event(&mut sub).await, t + 1);
    assert!(began.elapsed() >= Duration::from_secs(4), "left after {:?}", began.elapsed());
    assert_eq!(frozen.connections.load(Ordering::SeqCst), 1);
    // One host alone is not left: there is nowhere else to go.
    let frozen = serve(vec![stuck_at(t)]).await;
    let mut sub = stalling_over(&[&frozen], t, Duration::from_secs(1));
    assert!(tokio::time::timeout(Duration::from_secs(6), sub.next()).await.is_err(), "nothing to hand over");
    assert_eq!(frozen.connections.load(Ordering::SeqCst), 1);
}

/// Every host stuck (the relay behind them all is down): the subscription still moves
/// between them, but waits twice as long after each round, rather than every stall timeout for
/// as long as it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_host_is_stuck_the_stall_timeout_doubles_each_round() {
    let t = now_us();
    let (a, b) = (serve(vec![stuck_at(t)]).await, serve(vec![stuck_at(t)]).await);
    let mut sub = stalling_over(&[&a, &b], t, Duration::from_secs(1));
    // Stalls after 1, 1, 2, 2, 4 s, each seen at a ping tick (a second apart), so up to a
    // second later: five or six connections in 16 s; every stall timeout, it was ten or more.
    assert!(tokio::time::timeout(Duration::from_secs(16), sub.next()).await.is_err(), "nothing to hand over");
    let connections = a.connections.load(Ordering::SeqCst) + b.connections.load(Ordering::SeqCst);
    assert!((4..=7).contains(&connections), "{connections} connections");
    assert!(a.connections.load(Ordering::SeqCst) >= 2 && b.connections.load(Ordering::SeqCst) >= 2);
}

/// The doubled stall timeout lasts only until the position moves: a host that delivers and
/// then stalls is left after the stall timeout itself, not after the doubled one of the
/// rounds before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stall_timeout_is_itself_again_once_the_position_moves() {
    let t = now_us();
    // A: stuck twice, then an event and stuck after it. B: stuck.
    let Script::Paced(stuck_after) = stuck_at(t + 1) else { unreachable!() };
    let moves_then_stalls = Script::Paced(std::iter::once((Duration::ZERO, event(t + 1))).chain(stuck_after).collect());
    let a = serve(vec![stuck_at(t), stuck_at(t), moves_then_stalls]).await;
    let b = serve(vec![stuck_at(t)]).await;
    let mut sub = stalling_over(&[&a, &b], t, Duration::from_secs(1));
    // Two rounds of stalls (1, 1, 2, 2 s, each seen up to a ping tick later), then A's event.
    assert_eq!(next_event(&mut sub).await, t + 1);
    let moved = std::time::Instant::now();
    let b_before = b.connections.load(Ordering::SeqCst);
    while b.connections.load(Ordering::SeqCst) == b_before {
        assert!(moved.elapsed() < Duration::from_secs(10), "A was never left");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The stall timeout (1 s) and a ping tick at most; four times it was 4 s and more.
    assert!(moved.elapsed() < Duration::from_millis(3_200), "A left after {:?}", moved.elapsed());
}

/// A bogus `time_us` days ahead (within the week a client's clock may be off) is taken as the
/// position; every later event is then "backwards" on every connection. Before, the subscription
/// reconnected with backoff for as long as it took the clock to come within two hours of it
/// (days), saying nothing to the caller; now connections that go backwards at once at one
/// position, three in a row over a stale timeout at least, end it with `Error::Unreadable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_going_backwards_at_once_at_one_position_ends_the_subscription() {
    let now = now_us();
    let ahead = now + 3 * 86_400_000_000;
    let server = serve(vec![Script::SendThenClose(vec![event(ahead)]), Script::Send(vec![event(now + 1)])]).await;
    let mut sub = subscribe(&server, None);
    assert_eq!(next_event(&mut sub).await, ahead);
    let began = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
    // Not before a stale timeout (3 s here): a clock corrected back and forth passes.
    assert!(began.elapsed() >= Duration::from_millis(2_900), "ended after {:?}", began.elapsed());
    match &err {
        Error::Unreadable { after, what, .. } => {
            assert_eq!(*after, Some(ahead));
            assert!(what.contains("went backwards"), "{what}");
        }
        other => panic!("expected Unreadable, got {other}"),
    }
    assert!(server.connections.load(Ordering::SeqCst) >= 4, "the first, then three tries at the position at least");
}

/// Serves the event at `t + 1`, then `bad`, on every connection: the subscription gets the
/// event, then ends with [`Error::Unreadable`] saying `says`, after the first connection and
/// three tries at `t + 1`.
async fn ends_unreadable_after(t: u64, bad: String, says: &str) {
    let server = serve(vec![Script::Send(vec![event(t + 1), bad])]).await;
    let mut sub = subscribe(&server, Some(t));
    assert_eq!(next_event(&mut sub).await, t + 1);
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
    match &err {
        Error::Unreadable { after, what, .. } => {
            assert_eq!(*after, Some(t + 1));
            assert!(what.contains(says), "{what}");
        }
        other => panic!("expected Unreadable, got {other}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(server.connections.load(Ordering::SeqCst), 1 + 3, "the first, then three tries at t+1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_going_backwards_is_not_hidden_and_the_good_events_arrive_once() {
    let t = now_us();
    // Connection 1: 10, 20, then 15 (backwards). Connection 2 (resuming at 20): 20 again (the
    // inclusive repeat), 30.
    let server = serve(vec![
        Script::Send(vec![event(t + 10), event(t + 20), event(t + 15), event(t + 40)]),
        Script::Send(vec![event(t + 20), event(t + 30)]),
    ])
    .await;
    let mut sub = subscribe(&server, Some(t));
    let got = [next_event(&mut sub).await, next_event(&mut sub).await, next_event(&mut sub).await];
    assert_eq!(got, [t + 10, t + 20, t + 30]);
    assert_eq!(server.connections.load(Ordering::SeqCst), 2, "the backwards event did not end the connection");
    assert_eq!(sub.stats().duplicates_dropped.load(Ordering::Relaxed), 1);
}

/// Jetstream v2 stamps every op of a commit with its frame's `time_us`: the ops after the first
/// are not repeats, live or after a reconnect between them (the server sends the ops at the
/// cursor again; those handed over already are the repeats, known by their identity), in
/// either failover mode. An event sent again is still a repeat. Before, every event at the
/// last position was taken for the inclusive cursor's repeat: a commit of three ops gave one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stamped_alike_all_arrive_once_across_a_reconnect_between_them() {
    let t = now_us();
    let server = serve(vec![
        Script::SendThenClose(vec![op_event(t + 10, "a"), op_event(t + 10, "b"), op_event(t + 10, "a")]),
        Script::Send(vec![
            op_event(t + 10, "a"),
            op_event(t + 10, "b"),
            op_event(t + 10, "c"),
            op_event(t + 20, "d"),
            op_event(t + 20, "e"),
        ]),
    ])
    .await;
    for failover in [Failover::ExactCursor, Failover::Rewind(Duration::from_secs(1))] {
        let before = server.connections.load(Ordering::SeqCst);
        server.next_script.store(0, Ordering::SeqCst);
        let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
            .cursor(Some(t))
            .failover(failover)
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .start()
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            let m =
                tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("a message in time").unwrap();
            if let Message::Event(e) = m {
                got.push((e.time_us() - t, e.rkey().unwrap().to_string()));
            }
        }
        let want = [(10, "a"), (10, "b"), (10, "c"), (20, "d"), (20, "e")].map(|(dt, k)| (dt, k.to_string()));
        assert_eq!(got, want, "{failover:?}");
        assert_eq!(server.connections.load(Ordering::SeqCst) - before, 2, "{failover:?}");
        let dropped = sub.stats().duplicates_dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 3, "{failover:?}: a sent again, then a and b at the cursor");
    }

    // A run starting from a stored cursor does not know what it handed over there: every event
    // at it is a repeat (on such a server, the rest of a commit a stop cut is lost).
    server.next_script.store(1, Ordering::SeqCst);
    let mut sub = subscribe(&server, Some(t + 10));
    assert_eq!(next_event(&mut sub).await, t + 20);
    assert_eq!(sub.stats().duplicates_dropped.load(Ordering::Relaxed), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_replaying_from_before_the_cursor_is_read_past_not_reconnected_to() {
    let t = now_us();
    // Jetstream v2 with a timestamp cursor starts at its active segment, up to an hour before
    // the cursor (bluesky-social/jetstream#343): every connection would meet the same replay.
    let server =
        serve(vec![Script::Send(vec![event(t + 5), event(t + 10), event(t + 20), event(t + 30), event(t + 40)])]).await;
    let mut sub = subscribe(&server, Some(t + 20));
    assert_eq!(next_event(&mut sub).await, t + 30);
    assert_eq!(next_event(&mut sub).await, t + 40);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1, "the replay before the cursor ended the connection");
    assert_eq!(sub.stats().duplicates_dropped.load(Ordering::Relaxed), 3, "5 and 10 before the cursor, 20 at it");
    // Once the connection has moved past its cursor, an older event is time going backwards.
    let server = serve(vec![
        Script::Send(vec![event(t + 5), event(t + 30), event(t + 10), event(t + 50)]),
        Script::Send(vec![event(t + 40)]),
    ])
    .await;
    let mut sub = subscribe(&server, Some(t + 20));
    assert_eq!(next_event(&mut sub).await, t + 30);
    assert_eq!(next_event(&mut sub).await, t + 40);
    assert_eq!(server.connections.load(Ordering::SeqCst), 2, "the backwards event did not end the connection");
    // Rewinding from a stored cursor (another host's timeline): what the server sends from
    // before the rewound cursor it was asked for is skipped too; from the rewind on, handed over.
    let sec = 1_000_000;
    let server =
        serve(vec![Script::Send(vec![event(t + 20 - 60 * sec), event(t + 20 - 5 * sec), event(t + 30)])]).await;
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .cursor(Some(t + 20))
        .failover(contrail_client::Failover::Rewind(Duration::from_secs(10)))
        .start()
        .unwrap();
    assert_eq!(next_event(&mut sub).await, t + 20 - 5 * sec);
    assert_eq!(next_event(&mut sub).await, t + 30);
    assert_eq!(sub.stats().duplicates_dropped.load(Ordering::Relaxed), 1);
    // More than two hours before the cursor is no replay: time went backwards.
    let hours = 3 * 3_600_000_000;
    let server =
        serve(vec![Script::Send(vec![event(t + 20 - hours), event(t + 30)]), Script::Send(vec![event(t + 30)])]).await;
    let mut sub = subscribe(&server, Some(t + 20));
    assert_eq!(next_event(&mut sub).await, t + 30);
    assert_eq!(server.connections.load(Ordering::SeqCst), 2, "an event hours before the cursor was skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_us_in_the_future_and_garbage_do_not_become_positions() {
    let t = now_us();
    let future = t + 30 * 24 * 3_600_000_000; // a month ahead
    let server = serve(vec![
        Script::Send(vec!["not json".into(), event(0), event(t + 1), event(future)]),
        Script::Send(vec![event(t + 1), event(t + 2)]),
    ])
    .await;
    let mut sub = subscribe(&server, Some(t));
    assert_eq!(next_event(&mut sub).await, t + 1);
    // The future event ends the connection; the next resumes at t+1, not at the future.
    assert_eq!(next_event(&mut sub).await, t + 2);
    assert_eq!(sub.stats().malformed.load(Ordering::Relaxed), 2, "the junk and the event at 0");
    // Started live, an event at 0 is not the first position either (saved, it would read back
    // as cursor=0: a replay of everything).
    let server = serve(vec![Script::Send(vec![event(0), event(t + 1)])]).await;
    let mut sub = subscribe(&server, None);
    assert_eq!(next_event(&mut sub).await, t + 1);
    assert_eq!(sub.stats().malformed.load(Ordering::Relaxed), 1);
}

/// A future `time_us` at the same position on every connection (this machine's clock a month
/// behind, or a server that stored one): after three tries the caller is told, rather than
/// reconnecting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_client_cannot_take_again_and_again_ends_the_subscription() {
    let t = now_us();
    let future = t + 30 * 24 * 3_600_000_000;
    ends_unreadable_after(t, event(future), "future").await;
}

/// A refusal's body is the reason the caller is given (one line, cut short: a server's whole
/// error page is not); a 429's `Retry-After` is waited out before the host is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_says_the_servers_reason_and_retry_after_is_waited_out() {
    let page: &'static str = Box::leak(format!("bad\r\nfilter:\t{}", "x".repeat(5_000)).into_boxed_str());
    let server = serve(vec![Script::Refuse(400, None, page)]).await;
    let mut sub = subscribe(&server, None);
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    let Error::Refused { reason, .. } = &err else { panic!("{err}") };
    assert!(reason.starts_with("HTTP 400 at the upgrade: bad filter: xxx"), "{reason}");
    assert!(reason.ends_with("x…") && reason.chars().count() < 250, "{reason}");
    // A token in the URL's own query, quoted back by a proxy, is not repeated (to logs and
    // errors); the filters are.
    let server = serve(vec![Script::Refuse(400, None, "no such token s3cret-t0ken for did:plc:abc")]).await;
    let url = format!("ws://{}/subscribe?token=s3cret-t0ken&wantedDids=did:plc:abc", server.addr);
    let mut sub = Subscription::builder([url]).start().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    let Error::Refused { reason, .. } = &err else { panic!("{err}") };
    assert_eq!(reason, "HTTP 400 at the upgrade: no such token … for did:plc:abc");
    // Quoted percent-decoded, and cut where the server's page stops being read (1 KiB).
    let page: &'static str =
        Box::leak(format!("token s3cret/t0ken: no; {}token s3cret/t0ken", " ".repeat(990)).into_boxed_str());
    let server = serve(vec![Script::Refuse(400, None, page)]).await;
    let url = format!("ws://{}/subscribe?token=s3cret%2Ft0ken", server.addr);
    let mut sub = Subscription::builder([url]).start().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    let Error::Refused { reason, .. } = &err else { panic!("{err}") };
    assert_eq!(reason, "HTTP 400 at the upgrade: token …: no; token …");
    // A refusal whose body never ends (no length: read until a close that never comes) is a
    // refusal still, not a timeout retried for ever.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 4096];
        let _ = tcp.read(&mut request).await;
        let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n\r\nbad filter").await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut sub =
        Subscription::builder([format!("ws://{addr}")]).connect_timeout(Duration::from_secs(60)).start().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("refused in time").unwrap_err();
    let Error::Refused { reason, .. } = &err else { panic!("{err}") };
    assert_eq!(reason, "HTTP 400 at the upgrade: bad filter");

    // Alone, and with a second host that is down (it accepts and hangs up at once; tried
    // meanwhile): the host that asked is not asked again before its time.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (down, tried) = (listener.local_addr().unwrap(), Arc::new(AtomicUsize::new(0)));
    let counter = tried.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    // And as a date (3 s after the server's own `Date`; whole seconds).
    for (with_down, as_date) in [(false, false), (true, false), (false, true)] {
        let after = match as_date {
            false => "2",
            true => {
                let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
                Box::leak(date.into_boxed_str())
            }
        };
        let t = now_us(); // (a live start takes nothing from before it)
        let server = serve(vec![Script::Refuse(429, Some(after), "slow down"), Script::Send(vec![event(t)])]).await;
        let mut hosts = vec![format!("ws://{}", server.addr)];
        hosts.extend(with_down.then(|| format!("ws://{down}")));
        let began = std::time::Instant::now();
        let mut sub =
            Subscription::builder(hosts).backoff(Duration::from_millis(10), Duration::from_secs(10)).start().unwrap();
        assert_eq!(next_event(&mut sub).await, t);
        assert!(began.elapsed() >= Duration::from_millis(1_900), "asked again after {:?}", began.elapsed());
        assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    }
    // Tried more than once meanwhile: the pause held up the host that asked, not the others.
    assert!(tried.load(Ordering::SeqCst) >= 2, "the other host was tried {} times", tried.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_ends_the_subscription_with_the_reason_and_a_404_is_retried() {
    let server = serve(vec![Script::Status(400)]).await;
    let mut sub = subscribe(&server, None);
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Refused { reason, .. } if reason.contains("400")), "{err}");
    assert!(!err.is_retryable());
    assert!(matches!(sub.next().await, Err(Error::Ended)));

    let t = now_us();
    let server = serve(vec![Script::Status(404), Script::Status(503), Script::Send(vec![event(t)])]).await;
    let mut sub = subscribe(&server, None);
    assert_eq!(next_event(&mut sub).await, t);
    assert_eq!(server.connections.load(Ordering::SeqCst), 3);

    // With a limit on attempts, a host that never answers ends in a retryable error.
    let server = serve(vec![Script::Status(503)]).await;
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .max_attempts(3)
        .start()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Unreachable { attempts: 3, .. }), "{err}");
    assert!(err.is_retryable());
}

/// A refusal is the request's fault only when every host of the list gives it: one host's
/// 400 (a proxy's, a deploy's) sends the subscription to the next, which serves it. Before, the
/// first 400 ended the subscription. Every host refusing still ends it, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hosts_refusal_tries_the_next_and_every_hosts_ends_the_subscription() {
    let t = now_us();
    let refusing = serve(vec![Script::Refuse(400, None, "bad gateway config")]).await;
    let serving = serve(vec![Script::Send(vec![event(t)])]).await;
    let hosts = [format!("ws://{}", refusing.addr), format!("ws://{}", serving.addr)];
    let mut sub = limited(&hosts, 10).start().unwrap();
    assert_eq!(next_event(&mut sub).await, t);
    assert_eq!(refusing.connections.load(Ordering::SeqCst), 1);

    let other = serve(vec![Script::Refuse(400, None, "invalid wantedDids")]).await;
    let hosts = [format!("ws://{}", refusing.addr), format!("ws://{}", other.addr)];
    let mut sub = limited(&hosts, 10).start().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Refused { reason, .. } if reason.contains("invalid wantedDids")), "{err}");
    assert_eq!(other.connections.load(Ordering::SeqCst), 1, "refused at once once both had");
}

/// A refusal is forgotten once a host has served the subscription (here for a stale timeout,
/// a quiet filter moving nothing on): a transient 400 from one host during its deploy, and
/// another's days later, do not add up to every host refusing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_a_host_served_the_subscription_are_forgotten() {
    let t = now_us();
    let a =
        serve(vec![Script::Refuse(400, None, "deploying"), Script::Status(503), Script::Send(vec![event(t)])]).await;
    let b = serve(vec![Script::QuietThenClose(Duration::from_secs(4)), Script::Refuse(400, None, "deploying")]).await;
    let mut sub = Subscription::builder([format!("ws://{}", a.addr), format!("ws://{}", b.addr)])
        .stale_timeout(Duration::from_secs(3))
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .start()
        .unwrap();
    assert_eq!(next_event(&mut sub).await, t);
    assert_eq!((a.connections.load(Ordering::SeqCst), b.connections.load(Ordering::SeqCst)), (3, 2));
}

/// Jetstream v1 closes with 1000 and `failed to parse subscriber options: …` when it refuses
/// the options of a hello: a refusal, not a normal close to reconnect after (with the same
/// hello, for ever). A 404 for `/dictionary` (Jetstream has none; a proxy during a deploy
/// answers it too) is that host failing, not a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstreams_refusal_ends_the_subscription_and_a_404_for_the_dictionary_is_retried() {
    let mut close = 1000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"failed to parse subscriber options: invalid did");
    let server = serve(vec![Script::Frames(vec![(true, OpCode::Close, close)])]).await;
    let mut sub = subscribe(&server, None);
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Refused { reason, .. } if reason.contains("failed to parse")), "{err}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);

    let server = serve(vec![Script::Status(404)]).await;
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .compress(true)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .max_attempts(3)
        .start()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Unreachable { attempts: 3, last } if last.contains("404")), "{err}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 3);
}

/// With a limit on attempts, a host that asked to be left alone a while is asked once more
/// before giving up: another host's failures during its pause do not use the attempts up.
/// Before, the subscription ended `Unreachable` while the host that would serve it waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_on_attempts_waits_for_a_host_that_asked_to_be_left_alone() {
    // A second host that is down: it accepts and hangs up at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            drop(tcp);
        }
    });
    let t = now_us();
    let server = serve(vec![Script::Refuse(503, Some("2"), "full"), Script::Send(vec![event(t)])]).await;
    let began = std::time::Instant::now();
    let mut sub = limited(&[format!("ws://{}", server.addr), down.clone()], 3).start().unwrap();
    assert_eq!(next_event(&mut sub).await, t);
    assert!(began.elapsed() >= Duration::from_millis(1_900), "asked again after {:?}", began.elapsed());
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    // A host that refuses every time is not waited for for ever: asked once more, then the
    // subscription ends (its refusal, the other's two failures, its last turn). (A pause of
    // 3 s: the other's two failures fit in it on a loaded machine too.)
    let server = serve(vec![Script::Refuse(503, Some("3"), "full")]).await;
    let mut sub = limited(&[format!("ws://{}", server.addr), down], 3).start().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(&err, Error::Unreachable { attempts: 4, last } if last.contains("503")), "{err}");
    assert_eq!(server.connections.load(Ordering::SeqCst), 2);
    // Its pause over while another host failed (here: timed out) is still a turn owed.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hangs = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let t = now_us();
    let server = serve(vec![Script::Refuse(503, Some("1"), "full"), Script::Send(vec![event(t)])]).await;
    let hosts = [format!("ws://{}", server.addr), hangs];
    let mut sub = limited(&hosts, 2).connect_timeout(Duration::from_secs(2)).start().unwrap();
    assert_eq!(next_event(&mut sub).await, t);
    // Alone, it is given up at the limit, as before.
    let server = serve(vec![Script::Refuse(503, Some("1"), "full")]).await;
    let mut sub = limited(&[format!("ws://{}", server.addr)], 2).start().unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Unreachable { attempts: 2, .. }), "{err}");
}

/// A subscription of `hosts` giving up after `attempts` failures, with short backoff waits.
fn limited(hosts: &[String], attempts: u32) -> contrail_client::Builder {
    Subscription::builder(hosts.to_vec())
        .backoff(Duration::from_millis(10), Duration::from_secs(10))
        .max_attempts(attempts)
}

/// A compressed subscription given the wrong dictionary (or a server that changed its own):
/// nothing decompresses. Skipped one by one, the subscription delivered nothing, for ever, and
/// said nothing; now the connection ends after 16 in a row, and three such connections at one
/// position end the subscription with `Error::Unreadable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dictionary_nothing_decompresses_with_ends_the_subscription() {
    let t = now_us();
    // What another dictionary's frames look like to this one: a zstd frame naming a dictionary
    // id it does not have.
    let other = zstd::dict::from_samples(&(0..200).map(|i| event(t + i)).collect::<Vec<_>>(), 4096).unwrap();
    let wrong = zstd::bulk::Compressor::with_dictionary(3, &other).unwrap().compress(event(t + 1).as_bytes()).unwrap();
    let server = serve(vec![Script::Binary(vec![wrong; 40])]).await;
    let dictionary = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../dictionaries/jetstream-v1.zdict")).unwrap();
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .cursor(Some(t))
        .compress(true)
        .dictionary(dictionary)
        .backoff(Duration::from_millis(10), Duration::from_millis(20))
        .start()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
    match &err {
        Error::Unreadable { after, what, .. } => {
            assert_eq!(*after, Some(t));
            assert!(what.contains("do not decompress with the dictionary"), "{what}");
        }
        other => panic!("expected Unreadable, got {other}"),
    }
    assert_eq!(server.connections.load(Ordering::SeqCst), 3);
    assert_eq!(sub.stats().malformed.load(Ordering::Relaxed), 3 * 16);
}

/// A compressed message whose frame does not record its size (a streaming compressor's) is
/// decompressed into a buffer for the largest message (16 MiB); the event keeps only its own
/// size, or a thousand buffered events would reserve 16 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_from_a_frame_without_its_size_keeps_only_its_own_bytes() {
    let t = now_us();
    let dictionary = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../dictionaries/jetstream-v1.zdict")).unwrap();
    let mut compressor = zstd::bulk::Compressor::with_dictionary(3, &dictionary).unwrap();
    compressor.include_contentsize(false).unwrap();
    let frame = compressor.compress(event(t + 1).as_bytes()).unwrap();
    let server = serve(vec![Script::Binary(vec![frame])]).await;
    let mut sub = Subscription::builder([format!("ws://{}", server.addr)])
        .cursor(Some(t))
        .compress(true)
        .dictionary(dictionary)
        .start()
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("a message in time").unwrap();
    let Message::Event(e) = m else { panic!("not an event") };
    assert_eq!(e.time_us(), t + 1);
    let json = e.into_json();
    assert!(json.capacity() < 64 << 10, "{} bytes held for an event of {}", json.capacity(), json.len());
}

/// Connections that stay up with nothing to deliver (a quiet filter; pings answered) and then
/// end (a server restart), or that deliver and then end, are not failures: `max_attempts`
/// counts failed connections in a row, and healthy ones must not end the subscription, even
/// with `max_attempts(1)` (before, a healthy connection's end counted as the first failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_quiet_connections_do_not_count_as_failed_attempts() {
    let t = now_us();
    // At most `n` failed connections in a row; quick reconnects, a stale timeout of 2 s (pings
    // every 0.67 s: a loaded machine's late pong does not make a healthy connection stale).
    let subscribe = |server: &Server, n: u32| {
        Subscription::builder([format!("ws://{}", server.addr)])
            .cursor(Some(t))
            .stale_timeout(Duration::from_secs(2))
            .backoff(Duration::from_millis(10), Duration::from_millis(20))
            .max_attempts(n)
            .start()
            .unwrap()
    };
    let quiet = Script::QuietThenClose(Duration::from_millis(3_000));
    let server = serve(vec![quiet.clone(), quiet.clone(), quiet, Script::Send(vec![event(t + 1)])]).await;
    let mut sub = subscribe(&server, 1);
    assert_eq!(next_event(&mut sub).await, t + 1);
    assert_eq!(server.connections.load(Ordering::SeqCst), 4);
    // Each connection hands over one event, then closes.
    let server = serve(vec![Script::OneThenClose(t + 1)]).await;
    let mut sub = subscribe(&server, 1);
    for n in 1..4 {
        assert_eq!(next_event(&mut sub).await, t + n);
    }
    // A server that hangs after the upgrade (never heard, however long each connection lasts),
    // or after one message, still counts.
    for script in [Script::Silent, Script::SendThenSilent(vec![format!(r#"{{"kind":"cursor","time_us":{t}}}"#)])] {
        let server = serve(vec![script]).await;
        let mut sub = subscribe(&server, 2);
        let err = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("an answer").unwrap_err();
        assert!(matches!(err, Error::Unreachable { attempts: 2, .. }), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_clock_is_hours_behind_still_gets_events() {
    // The server's time_us are two hours ahead of this machine's clock.
    let t = now_us() + 2 * 3_600_000_000;
    let server = serve(vec![Script::Send(vec![event(t + 1), event(t + 2)])]).await;
    let mut sub = subscribe(&server, Some(t));
    assert_eq!(next_event(&mut sub).await, t + 1);
    assert_eq!(next_event(&mut sub).await, t + 2);
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}
