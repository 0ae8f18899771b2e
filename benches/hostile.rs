//! Hostile clients against the real server (release `contrail serve`, its own process, default
//! limits): a reference subscriber on another loopback address (127.0.0.2, so it is "another
//! user" to the per-IP limits) receives a paced live stream (~600 events/s) while attackers on
//! 127.0.0.1 run one attack per phase. Per phase: the reference's delivery latency (p50/p99,
//! event `time_us` → receive), the server's CPU and RSS, and what the server answered. At the
//! end the reference's events are checked against the log: nothing lost, nothing twice.
//! `ulimit -n 65536; cargo bench --bench hostile` (prints a report; not a criterion bench);
//! `HOSTILE_PHASES=<part of a name>,…` runs only those phases (and the quiet ones).
//! Attackers, reference and server share the machine's two cores: figures say so.

#[path = "../tests/common/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../tests/common/relay.rs"]
#[allow(dead_code)]
mod relay;

#[path = "common/proc.rs"]
#[allow(dead_code)]
mod proc;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::Empty;
use proc::{cpu_seconds, now_us, rss_mib};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const PHASE: Duration = Duration::from_secs(8);

struct Server {
    child: Child,
    public: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(data: &std::path::Path, relay: &str) -> Server {
    // CONTRAIL_BIN runs another build (a baseline) under the same harness.
    let bin = std::env::var("CONTRAIL_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_contrail").to_string());
    let mut child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--relay-url", relay])
        .arg("--data-dir")
        .arg(data)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("contrail starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                if v["message"] == "listening" && v["listener"] == "public" {
                    let _ = tx.send(v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap());
                }
            }
        }
    });
    let public = rx.recv_timeout(Duration::from_secs(20)).expect("server listening");
    Server { child, public }
}

/// The reference subscriber: from 127.0.0.2, live, all events; records (time_us, latency).
async fn reference(addr: SocketAddr, got: Arc<Mutex<Vec<(u64, u64)>>>, stop: Arc<AtomicBool>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let req = hyper::Request::builder()
        .uri("/subscribe")
        .header("Host", addr.to_string())
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (ws, _) =
        fastwebsockets::handshake::client(&contrail::source::wsclient::SpawnExecutor, req, tcp).await.unwrap();
    let mut ws = fastwebsockets::FragmentCollector::new(ws);
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(200), ws.read_frame()).await else { continue };
        if f.opcode == OpCode::Close {
            panic!("the reference subscriber was closed: {:?}", String::from_utf8_lossy(&f.payload));
        }
        if f.opcode != OpCode::Text {
            continue;
        }
        let now = now_us();
        let s = std::str::from_utf8(&f.payload).unwrap();
        let i = s.find("\"time_us\":").unwrap();
        let t: u64 = s[i + 10..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap();
        got.lock().unwrap().push((t, now.saturating_sub(t)));
    }
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize] as f64 / 1000.0
}

/// What an attack's connections were answered: (opened, refused before the upgrade, closed by
/// the server).
#[derive(Default)]
struct Answers {
    opened: AtomicU64,
    refused: AtomicU64,
    closed: AtomicU64,
}

async fn attack(name: &str, addr: SocketAddr, answers: Arc<Answers>, stop: Arc<AtomicBool>) {
    let mut tasks = Vec::new();
    let spawn_ws =
        |n: usize,
         query: &'static str,
         action: fn(client::Ws, Arc<AtomicBool>, Arc<Answers>) -> tokio::task::JoinHandle<()>| {
            let mut v = Vec::new();
            for _ in 0..n {
                let (answers, stop) = (answers.clone(), stop.clone());
                v.push(tokio::spawn(async move {
                    match client::connect(addr, query, &[]).await {
                        Ok(ws) => {
                            answers.opened.fetch_add(1, Ordering::Relaxed);
                            let _ = action(ws, stop, answers).await;
                        }
                        Err(_) => {
                            answers.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            v
        };
    match name {
        "quiet" => {}
        "10,000 connections" => {
            for _ in 0..10_000 {
                let (answers, stop) = (answers.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    match client::connect(addr, "/subscribe?wantedCollections=none.at.all", &[]).await {
                        Ok(mut ws) => {
                            answers.opened.fetch_add(1, Ordering::Relaxed);
                            while !stop.load(Ordering::Relaxed) {
                                if let Ok(Err(_)) =
                                    tokio::time::timeout(Duration::from_millis(500), ws.read_frame()).await
                                {
                                    answers.closed.fetch_add(1, Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                        Err(_) => {
                            answers.refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        "connection churn" => {
            for _ in 0..8 {
                let (answers, stop) = (answers.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match client::connect(addr, "/subscribe", &[]).await {
                            Ok(ws) => {
                                answers.opened.fetch_add(1, Ordering::Relaxed);
                                drop(ws);
                            }
                            Err(_) => {
                                answers.refused.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
        }
        "slowloris (1,000 trickled upgrades)" => {
            for _ in 0..1_000 {
                let (answers, stop) = (answers.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else { return };
                    answers.opened.fetch_add(1, Ordering::Relaxed);
                    let req =
                        b"GET /subscribe HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nX-Slow: ";
                    for b in req.iter().chain(std::iter::repeat(&b'a')) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if tcp.write_all(&[*b]).await.is_err() {
                            answers.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }));
            }
        }
        "oversized upgrades (1 MB URL, 10,000 parameters, bad UTF-8)" => {
            for _ in 0..4 {
                let (answers, stop) = (answers.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let huge = format!("GET /subscribe?{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(1 << 20));
                    let many = format!(
                        "GET /subscribe?{} HTTP/1.1\r\nHost: x\r\n\r\n",
                        vec!["wantedCollections=app.bsky.feed.post"; 10_000].join("&")
                    );
                    let bad = b"GET /subscribe?wantedDids=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
                    let reqs = [huge.into_bytes(), many.into_bytes(), bad];
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else { continue };
                        answers.opened.fetch_add(1, Ordering::Relaxed);
                        let _ = tcp.write_all(&reqs[i % 3]).await;
                        let mut buf = [0u8; 64];
                        let n = tokio::time::timeout(
                            Duration::from_secs(2),
                            tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or(0);
                        if buf[..n].starts_with(b"HTTP/1.1 4") {
                            answers.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        i += 1;
                    }
                }));
            }
        }
        "peers that never read (50 replays from cursor=0)" => {
            tasks.extend(spawn_ws(50, "/subscribe?cursor=0", |ws, stop, answers| {
                tokio::spawn(async move {
                    // Holds the socket and reads nothing until the phase ends.
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    drop(ws);
                    let _ = answers;
                })
            }));
        }
        "options_update flood (50 clients)" => {
            tasks.extend(spawn_ws(50, "/subscribe?wantedCollections=none.at.all", |mut ws, stop, answers| {
                tokio::spawn(async move {
                    let msg = r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.like"],"wantedDids":[]}}"#;
                    while !stop.load(Ordering::Relaxed) {
                        if ws.write_frame(Frame::text(Payload::Borrowed(msg.as_bytes()))).await.is_err() {
                            answers.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                })
            }));
        }
        "options_update of 10,000 DIDs, two filters in turn (50 clients)" => {
            tasks.extend(spawn_ws(50, "/subscribe?wantedCollections=none.at.all", |mut ws, stop, answers| {
                tokio::spawn(async move {
                    let filter = |tag: char| {
                        let dids: Vec<String> = (0..10_000).map(|i| format!("\"did:plc:{tag}{i:023}\"")).collect();
                        format!(r#"{{"type":"options_update","payload":{{"wantedDids":[{}]}}}}"#, dids.join(","))
                    };
                    let msgs = [filter('a'), filter('b')];
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let msg = msgs[i % 2].as_bytes();
                        if ws.write_frame(Frame::text(Payload::Borrowed(msg))).await.is_err() {
                            answers.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        i += 1;
                    }
                })
            }));
        }
        "options_update of one DID 200,000 times (~9 MB, 50 clients)" => {
            tasks.extend(spawn_ws(50, "/subscribe?wantedCollections=none.at.all", |mut ws, stop, answers| {
                tokio::spawn(async move {
                    let did = "\"did:plc:aaaaaaaaaaaaaaaaaaaaaaaa\"";
                    let msg = format!(
                        r#"{{"type":"options_update","payload":{{"wantedDids":[{}]}}}}"#,
                        vec![did; 200_000].join(",")
                    );
                    while !stop.load(Ordering::Relaxed) {
                        if ws.write_frame(Frame::text(Payload::Borrowed(msg.as_bytes()))).await.is_err() {
                            answers.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                })
            }));
        }
        "ping flood (50 clients)" => {
            tasks.extend(spawn_ws(50, "/subscribe?wantedCollections=none.at.all", |mut ws, stop, answers| {
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        if ws.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"p"))).await.is_err()
                        {
                            answers.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                })
            }));
        }
        "10 MB messages (20 clients)" => {
            tasks.extend(spawn_ws(20, "/subscribe?wantedCollections=none.at.all", |mut ws, stop, answers| {
                tokio::spawn(async move {
                    let big = vec![b' '; 10_000_000];
                    while !stop.load(Ordering::Relaxed) {
                        if ws.write_frame(Frame::text(Payload::Borrowed(&big))).await.is_err() {
                            answers.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                })
            }));
        }
        "compressed replay from cursor=0 (50 clients)" => {
            tasks.extend(spawn_ws(50, "/subscribe?cursor=0&compress=true", |mut ws, stop, answers| {
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match tokio::time::timeout(Duration::from_millis(200), ws.read_frame()).await {
                            Ok(Ok(f)) if f.opcode == OpCode::Close => {
                                answers.closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Ok(Err(_)) => {
                                answers.closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            _ => {}
                        }
                    }
                })
            }));
        }
        other => panic!("unknown attack {other}"),
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.abort();
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("hostile: skipped outside `cargo bench`");
        return;
    }
    let relay = relay::FakeRelay::start().await;
    // A log to replay (the replay attacks), then a paced live stream for the whole run.
    let history = frames::generate(1, 50_000, 5_000, 41);
    relay.push_all(&history);
    let dir = tempfile::tempdir().unwrap();
    let server = spawn_server(dir.path(), &relay.url());
    let pid = server.child.id();
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.set_faults(relay::Faults { frame_interval: Some(Duration::from_millis(2)), burst: 1, ..Default::default() });
    let live = frames::generate(100_000, 200_000, 5_000, 42);
    let feeder = {
        let relay_frames: Vec<(i64, Vec<u8>)> = live.iter().map(|g| (g.seq, g.frame.clone())).collect();
        let relay = Arc::new(relay);
        let r = relay.clone();
        (
            tokio::spawn(async move {
                for (seq, f) in relay_frames {
                    r.push(seq, f);
                    tokio::time::sleep(Duration::from_micros(1_500)).await;
                }
            }),
            relay,
        )
    };
    let got = Arc::new(Mutex::new(Vec::new()));
    let ref_stop = Arc::new(AtomicBool::new(false));
    let reference_task = tokio::spawn(reference(server.public, got.clone(), ref_stop.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "machine: {} cores; attackers, the reference subscriber and the server share them; phase {} s",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        PHASE.as_secs()
    );
    println!("| phase | reference p50 / p99 | server CPU | server RSS | attack connections: opened / refused / closed by server |");
    println!("|---|---|---|---|---|");
    // HOSTILE_PHASES: run only the phases whose names contain one of these (comma-separated),
    // and the quiet ones.
    let only = std::env::var("HOSTILE_PHASES").ok();
    let wanted =
        |name: &str| name == "quiet" || only.as_deref().is_none_or(|o| o.split(',').any(|p| name.contains(p.trim())));
    for name in [
        "quiet",
        "10,000 connections",
        "connection churn",
        "slowloris (1,000 trickled upgrades)",
        "oversized upgrades (1 MB URL, 10,000 parameters, bad UTF-8)",
        "peers that never read (50 replays from cursor=0)",
        "options_update flood (50 clients)",
        "ping flood (50 clients)",
        "10 MB messages (20 clients)",
        "compressed replay from cursor=0 (50 clients)",
        // Last: their connections hold their slots while the updates their sockets held are
        // applied, paced, after they hang up.
        "options_update of 10,000 DIDs, two filters in turn (50 clients)",
        "options_update of one DID 200,000 times (~9 MB, 50 clients)",
        "quiet",
    ] {
        if !wanted(name) {
            continue;
        }
        let start_len = got.lock().unwrap().len();
        let cpu0 = cpu_seconds(pid);
        let t0 = Instant::now();
        let answers = Arc::new(Answers::default());
        let stop = Arc::new(AtomicBool::new(false));
        let a = tokio::spawn(attack_owned(name.to_string(), server.public, answers.clone(), stop.clone()));
        tokio::time::sleep(PHASE).await;
        let rss = rss_mib(pid);
        stop.store(true, Ordering::Relaxed);
        let _ = a.await;
        let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
        let mut lat: Vec<u64> = got.lock().unwrap()[start_len..].iter().map(|&(_, l)| l).collect();
        let n = lat.len();
        println!(
            "| {name} | {:.1} / {:.1} ms ({n} events) | {:.2} cores | {rss:.0} MiB | {} / {} / {} |",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            cpu,
            answers.opened.load(Ordering::Relaxed),
            answers.refused.load(Ordering::Relaxed),
            answers.closed.load(Ordering::Relaxed),
        );
        // Let the server settle between phases.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    ref_stop.store(true, Ordering::Relaxed);
    reference_task.await.unwrap();
    feeder.0.abort();
    // Nothing lost, nothing twice: the reference's events are exactly the log's in its range.
    let got = got.lock().unwrap();
    let (first, last) = (got.first().unwrap().0, got.last().unwrap().0);
    let out = Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "log", "--cursor", &first.to_string()])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let log: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap())
        .filter(|&t| t <= last)
        .collect();
    let mine: Vec<u64> = got.iter().map(|&(t, _)| t).collect();
    println!(
        "reference: {} events from {first} to {last}; the log has {} there: {}",
        mine.len(),
        log.len(),
        if mine == log { "identical (nothing lost, nothing twice, in order)" } else { "DIFFERENT" }
    );
}

async fn attack_owned(name: String, addr: SocketAddr, answers: Arc<Answers>, stop: Arc<AtomicBool>) {
    attack(&name, addr, answers, stop).await
}
