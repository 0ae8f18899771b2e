//! The soak (issue 11 §4): the release server on a paced stream for an hour or more, with
//! subscribers churning and retention trimming throughout, sampled every minute.
//!
//! `cargo bench --bench soak` (60 minutes; `SOAK_MINUTES`, `SOAK_RATE` frames/s (2,000),
//! `SOAK_SAMPLE_SECS` (60), `SOAK_RETENTION` (10m), `SOAK_CHURNERS` (40), `SOAK_OUT`
//! (`target/soak`) change it). Not a criterion bench: it prints a report and writes
//! `samples.csv` and `soak.svg` into `SOAK_OUT`.
//!
//! - A relay of its own (bounded: it keeps two minutes of frames for the server's reconnects)
//!   generates real-shaped frames at `SOAK_RATE` with the test generator and paces them.
//! - A **checker** subscriber (127.0.0.2, unfiltered, from the oldest event) compares every event
//!   with what the relay sent, in order: anything lost, repeated or reordered is counted; its
//!   delivery latency (receive time − `time_us`) gives each sample's p50/p99.
//! - **Churners** (127.0.0.3–6): each session picks a random filter (one collection, a
//!   wildcard, 1–5 DIDs, nothing, or a collection nobody writes), a random cursor (live, a recent
//!   one, an old one, the oldest), compression or not, sometimes slow (a message every 50 ms),
//!   sometimes an `options_update` half way; lives 5–90 s; leaves with a close frame or by
//!   dropping the socket. Each checks its own stream never goes back in `time_us`.
//! - Every sample: the server's RSS, open files, CPU, the RocksDB directory's size, the
//!   checker's latency, and counts. At the end the verdict: the checker saw every event exactly
//!   once and in order, and whether RSS and open files stayed flat over the second half.
//!
//! The relay, the checker, the churners and the server share the machine's cores.

#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;

#[path = "common/proc.rs"]
#[allow(dead_code)]
mod proc;

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use proc::{cpu_seconds, now_us, open_files, rss_mib};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Repositories in the generated stream (wantedDids filters pick among them).
const REPOS: u64 = 20_000;
/// Collections the generator writes, and one it never does.
const COLLECTIONS: [&str; 6] = [
    "app.bsky.feed.like",
    "app.bsky.feed.post",
    "app.bsky.graph.follow",
    "app.bsky.feed.repost",
    "app.bsky.actor.profile",
    "com.example.custom.thing",
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// The relay: generated frames, paced, a bounded window for reconnects.

/// What the checker expects, in order: `(did, kind, collection, rkey)`.
type Expected = (String, &'static str, String, String);

struct Feed {
    /// The last frames, contiguous by seq.
    window: Mutex<VecDeque<(i64, Bytes)>>,
    latest: tokio::sync::watch::Sender<i64>,
    expected: Mutex<VecDeque<Expected>>,
    frames_sent: AtomicU64,
    relay_connections: AtomicU64,
}

async fn relay(listener: tokio::net::TcpListener, feed: Arc<Feed>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let feed = feed.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let feed = feed.clone();
                async move {
                    let cursor = req
                        .uri()
                        .query()
                        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("cursor=")))
                        .and_then(|c| c.parse::<i64>().ok());
                    let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req).unwrap();
                    tokio::spawn(async move {
                        if let Ok(ws) = fut.await {
                            feed.relay_connections.fetch_add(1, Ordering::Relaxed);
                            relay_conn(feed, ws, cursor).await;
                        }
                    });
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .with_upgrades()
                .await;
        });
    }
}

async fn relay_conn(
    feed: Arc<Feed>,
    mut ws: fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
    cursor: Option<i64>,
) {
    let mut latest = feed.latest.subscribe();
    // Inclusive replay from the cursor, like the public relays; live otherwise.
    let mut next = cursor.unwrap_or(*latest.borrow() + 1);
    loop {
        let batch: Vec<Bytes> = {
            let w = feed.window.lock().unwrap();
            let first = w.front().map(|(s, _)| *s).unwrap_or(next);
            next = next.max(first);
            w.iter().skip((next - first) as usize).take(256).map(|(_, f)| f.clone()).collect()
        };
        if batch.is_empty() {
            if latest.changed().await.is_err() {
                return;
            }
            continue;
        }
        for f in batch {
            if ws.write_frame(Frame::binary(Payload::Borrowed(&f))).await.is_err() {
                return;
            }
            next += 1;
        }
    }
}

/// Generates `rate` frames a second in 50 ms steps until `stop`.
async fn generate(feed: Arc<Feed>, rate: u64, stop: Arc<AtomicBool>) {
    let step = Duration::from_millis(50);
    let per_step = (rate / 20).max(1) as usize;
    let keep = (rate * 120) as usize;
    let mut tick = tokio::time::interval(step);
    let mut seq = 1i64;
    let mut chunk = 1u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        // Distinct seeds give disjoint record-key counters (frames::generate), so every event
        // of the run can be told apart.
        let frames = frames::generate(seq, per_step, REPOS, chunk);
        chunk += 1;
        {
            let mut exp = feed.expected.lock().unwrap();
            for g in &frames {
                exp.extend(g.expected.iter().cloned());
            }
        }
        {
            let mut w = feed.window.lock().unwrap();
            for g in frames {
                w.push_back((g.seq, Bytes::from(g.frame)));
            }
            while w.len() > keep {
                w.pop_front();
            }
        }
        seq += per_step as i64;
        feed.frames_sent.fetch_add(per_step as u64, Ordering::Relaxed);
        let _ = feed.latest.send(seq - 1);
    }
}

// ---------------------------------------------------------------------------------------------
// The server.

struct Server {
    child: Child,
    public: SocketAddr,
    metrics: SocketAddr,
    warnings: Arc<Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(data: &std::path::Path, relay: &str, retention: &str) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--relay-url", relay])
        .args(["--retention", retention, "--trim-interval", "30s"])
        .arg("--data-dir")
        .arg(data)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("contrail starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let w = warnings.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if v["message"] == "listening" {
                let addr = v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap();
                let _ = tx.send((v["listener"].as_str().unwrap_or("").to_string(), addr));
            }
            if v["level"] == "WARN" || v["level"] == "ERROR" {
                let mut w = w.lock().unwrap();
                if w.len() < 10_000 {
                    w.push(line);
                }
            }
        }
    });
    let (mut public, mut metrics) = (None, None);
    while public.is_none() || metrics.is_none() {
        let (which, addr) = rx.recv_timeout(Duration::from_secs(30)).expect("server listening");
        match which.as_str() {
            "public" => public = Some(addr),
            _ => metrics = Some(addr),
        }
    }
    Server { child, public: public.unwrap(), metrics: metrics.unwrap(), warnings }
}

fn dir_mib(dir: &std::path::Path) -> f64 {
    fn walk(p: &std::path::Path) -> u64 {
        let Ok(rd) = std::fs::read_dir(p) else { return 0 };
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir) as f64 / (1 << 20) as f64
}

/// `/metrics` as text (HTTP/1.0, so the body ends with the connection).
async fn scrape(addr: SocketAddr) -> String {
    let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else { return String::new() };
    let _ = tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let mut body = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut body)).await;
    String::from_utf8_lossy(&body).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Subscribers.

type Ws = FragmentCollector<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

async fn connect_from(from: IpAddr, server: SocketAddr, path: &str) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(server).await?;
    tcp.set_nodelay(true)?;
    let req = hyper::Request::builder()
        .uri(path)
        .header("Host", server.to_string())
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        fastwebsockets::handshake::client(&contrail::source::wsclient::SpawnExecutor, req, tcp),
    )
    .await??;
    ws.set_max_message_size(64 << 20);
    Ok(FragmentCollector::new(ws))
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let i = text.find(key)? + key.len();
    let rest = &text[i..];
    if let Some(r) = rest.strip_prefix('"') {
        r.split('"').next()
    } else {
        rest.split(|c: char| !c.is_ascii_digit()).next()
    }
}

#[derive(Default)]
struct CheckerStats {
    checked: AtomicU64,
    lost: AtomicU64,
    unexpected: AtomicU64,
    reconnects: AtomicU64,
    /// Latencies (µs) since the last sample.
    latencies: Mutex<Vec<u32>>,
    first_problems: Mutex<Vec<String>>,
}

impl CheckerStats {
    fn problem(&self, what: String) {
        let mut p = self.first_problems.lock().unwrap();
        if p.len() < 20 {
            p.push(what);
        }
    }
}

/// Every event, in order, against the relay's record of what it sent. A mismatch looks ahead
/// for the event: found k places on, those k were lost; not found, it is unexpected (a
/// repeat or an invention).
async fn checker(server: SocketAddr, feed: Arc<Feed>, stats: Arc<CheckerStats>, stop: Arc<AtomicBool>) {
    let from: IpAddr = "127.0.0.2".parse().unwrap();
    let mut cursor = 0u64;
    let mut last_time = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let path = format!("/subscribe?cursor={cursor}");
        let mut ws = match connect_from(from, server, &path).await {
            Ok(ws) => ws,
            Err(e) => {
                stats.problem(format!("checker connect: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(frame) = tokio::time::timeout(Duration::from_millis(500), ws.read_frame()).await else { continue };
            let f = match frame {
                Ok(f) => f,
                Err(e) => {
                    stats.problem(format!("checker connection lost: {e}"));
                    break;
                }
            };
            if f.opcode == OpCode::Close {
                stats.problem(format!("checker closed by the server: {:?}", String::from_utf8_lossy(&f.payload)));
                break;
            }
            if f.opcode != OpCode::Text {
                continue;
            }
            let now = now_us();
            let text = std::str::from_utf8(&f.payload).unwrap();
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let kind = v["kind"].as_str().unwrap_or("");
            if kind == "cursor" {
                continue;
            }
            let t = v["time_us"].as_u64().unwrap_or(0);
            if t <= last_time {
                stats.problem(format!("time_us went back: {t} after {last_time}"));
            }
            last_time = last_time.max(t);
            cursor = last_time + 1;
            stats.latencies.lock().unwrap().push(now.saturating_sub(t).min(u32::MAX as u64) as u32);
            let got: Expected = (
                v["did"].as_str().unwrap_or("").to_string(),
                match kind {
                    "commit" => "commit",
                    "identity" => "identity",
                    "account" => "account",
                    _ => "other",
                },
                v["commit"]["collection"].as_str().unwrap_or("").to_string(),
                v["commit"]["rkey"].as_str().unwrap_or("").to_string(),
            );
            let mut exp = feed.expected.lock().unwrap();
            match exp.iter().take(100_000).position(|e| *e == got) {
                Some(0) => {
                    exp.pop_front();
                }
                Some(k) => {
                    stats.lost.fetch_add(k as u64, Ordering::Relaxed);
                    stats.problem(format!("{k} events lost before {got:?}"));
                    exp.drain(..=k);
                }
                None => {
                    stats.unexpected.fetch_add(1, Ordering::Relaxed);
                    stats.problem(format!("unexpected event {got:?}"));
                }
            }
            drop(exp);
            stats.checked.fetch_add(1, Ordering::Relaxed);
        }
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct ChurnStats {
    sessions: AtomicU64,
    connected: AtomicU64,
    refused: AtomicU64,
    messages: AtomicU64,
    /// A connection's `time_us` going back (or repeating): must stay 0.
    went_back: AtomicU64,
    closes: Mutex<BTreeMap<String, u64>>,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One session's query: filter, cursor, compression.
fn random_query(rng: &mut Rng, retention_us: u64) -> (String, bool, bool) {
    let mut q = String::from("/subscribe?");
    match rng.below(100) {
        0..=29 => {
            let _ = write!(q, "wantedCollections={}&", COLLECTIONS[rng.below(COLLECTIONS.len() as u64) as usize]);
        }
        30..=44 => q.push_str("wantedCollections=app.bsky.graph.*&"),
        45..=69 => {
            for _ in 0..1 + rng.below(5) {
                let _ = write!(q, "wantedDids={}&", frames::did_for(rng.below(REPOS)));
            }
        }
        70..=89 => {}
        _ => q.push_str("wantedCollections=org.example.nobody.writes&"),
    }
    let now = now_us();
    match rng.below(100) {
        0..=49 => {}
        50..=79 => {
            let _ = write!(q, "cursor={}&", now - rng.below(120_000_000));
        }
        80..=96 => {
            let _ = write!(q, "cursor={}&", now - rng.below(retention_us));
        }
        _ => q.push_str("cursor=0&"),
    }
    let compress = rng.below(100) < 30;
    if compress {
        q.push_str("compress=true&");
    }
    let slow = rng.below(100) < 10;
    q.pop();
    (q, compress, slow)
}

async fn churner(id: u64, server: SocketAddr, retention_us: u64, stats: Arc<ChurnStats>, stop: Arc<AtomicBool>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (id + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let from = IpAddr::from([127, 0, 0, 3 + (id % 4) as u8]);
    // Start spread out, not in one burst.
    tokio::time::sleep(Duration::from_millis(rng.below(10_000))).await;
    while !stop.load(Ordering::Relaxed) {
        let (path, _compress, slow) = random_query(&mut rng, retention_us);
        let lifetime = Duration::from_secs(5 + rng.below(86));
        let update_at = (rng.below(100) < 20).then(|| lifetime / 2);
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        let mut ws = match connect_from(from, server, &path).await {
            Ok(ws) => ws,
            Err(_) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        stats.connected.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let mut updated = false;
        let mut last_time = 0u64;
        let mut closed_by_server = false;
        while start.elapsed() < lifetime && !stop.load(Ordering::Relaxed) {
            if let Some(at) = update_at.filter(|at| !updated && start.elapsed() >= *at) {
                let _ = at;
                updated = true;
                let coll = COLLECTIONS[rng.below(COLLECTIONS.len() as u64) as usize];
                let msg = format!(
                    r#"{{"type":"options_update","payload":{{"wantedCollections":["{coll}"],"wantedDids":[],"maxMessageSizeBytes":0}}}}"#
                );
                if ws.write_frame(Frame::text(Payload::Owned(msg.into_bytes()))).await.is_err() {
                    break;
                }
            }
            let Ok(frame) = tokio::time::timeout(Duration::from_millis(500), ws.read_frame()).await else { continue };
            let Ok(f) = frame else {
                *stats.closes.lock().unwrap().entry("connection lost".into()).or_default() += 1;
                closed_by_server = true;
                break;
            };
            match f.opcode {
                OpCode::Close => {
                    let p = f.payload.to_vec();
                    let code = if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 1005 };
                    let why = format!("{code} {}", String::from_utf8_lossy(p.get(2..).unwrap_or_default()));
                    *stats.closes.lock().unwrap().entry(why).or_default() += 1;
                    closed_by_server = true;
                    break;
                }
                OpCode::Text => {
                    stats.messages.fetch_add(1, Ordering::Relaxed);
                    let text = std::str::from_utf8(&f.payload).unwrap_or("");
                    if field(text, "\"kind\":") != Some("cursor") {
                        let t: u64 = field(text, "\"time_us\":").and_then(|v| v.parse().ok()).unwrap_or(0);
                        if t <= last_time {
                            stats.went_back.fetch_add(1, Ordering::Relaxed);
                        }
                        last_time = t;
                    }
                }
                OpCode::Binary => {
                    stats.messages.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            if slow {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        if !closed_by_server && rng.below(100) < 80 {
            let _ = tokio::time::timeout(Duration::from_secs(2), ws.write_frame(Frame::close(1000, b"bye"))).await;
        }
        drop(ws);
    }
}

// ---------------------------------------------------------------------------------------------
// Samples, the plot, the verdict.

#[derive(Clone, Default)]
struct Sample {
    minute: f64,
    rss_mib: f64,
    open_files: u64,
    rocksdb_mib: f64,
    cpu_cores: f64,
    p50_ms: f64,
    p99_ms: f64,
    checked: u64,
    sessions: u64,
    connected: u64,
}

fn percentile(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// Reads one figure of a sample.
type Measure = fn(&Sample) -> f64;

/// Five stacked line charts (RSS, open files, RocksDB size, checker p99, CPU) against minutes.
fn svg(samples: &[Sample], title: &str) -> String {
    let panels: [(&str, Measure); 5] = [
        ("server RSS (MiB)", |s| s.rss_mib),
        ("server open files", |s| s.open_files as f64),
        ("RocksDB directory (MiB)", |s| s.rocksdb_mib),
        ("checker p99 latency (ms)", |s| s.p99_ms),
        ("server CPU (cores)", |s| s.cpu_cores),
    ];
    let (w, ph, left, top) = (760.0, 150.0, 70.0, 40.0);
    let height = top + panels.len() as f64 * (ph + 40.0);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(out, r#"<text x="{left}" y="22" font-size="14">{title}</text>"#);
    let max_x = samples.last().map(|s| s.minute).unwrap_or(1.0).max(1.0);
    for (i, (name, get)) in panels.iter().enumerate() {
        let y0 = top + i as f64 * (ph + 40.0);
        let max_y = samples.iter().map(get).fold(0.0f64, f64::max).max(1e-9) * 1.1;
        let plot_w = w - left - 20.0;
        let _ = write!(
            out,
            r##"<text x="{left}" y="{}">{name}</text><rect x="{left}" y="{}" width="{plot_w}" height="{ph}" fill="none" stroke="#999"/>"##,
            y0 + 12.0,
            y0 + 18.0
        );
        let _ = write!(out, r#"<text x="{}" y="{}" text-anchor="end">{:.1}</text>"#, left - 4.0, y0 + 28.0, max_y);
        let _ = write!(out, r#"<text x="{}" y="{}" text-anchor="end">0</text>"#, left - 4.0, y0 + 18.0 + ph);
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{max_x:.0} min</text>"#,
            left + plot_w,
            y0 + 32.0 + ph
        );
        let points: Vec<String> = samples
            .iter()
            .map(|s| {
                let x = left + s.minute / max_x * plot_w;
                let y = y0 + 18.0 + ph - get(s) / max_y * ph;
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            out,
            r##"<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{}"/>"##,
            points.join(" ")
        );
    }
    out.push_str("</svg>\n");
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak: skipped outside `cargo bench`");
        return;
    }
    let minutes: f64 = env_or("SOAK_MINUTES", 60.0);
    let rate: u64 = env_or("SOAK_RATE", 2_000);
    let sample_secs: u64 = env_or("SOAK_SAMPLE_SECS", 60);
    let retention: String = env_or("SOAK_RETENTION", "10m".to_string());
    let churners: u64 = env_or("SOAK_CHURNERS", 40);
    let out_dir = std::path::PathBuf::from(env_or("SOAK_OUT", "target/soak".to_string()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let retention_us = humantime::parse_duration(&retention).expect("SOAK_RETENTION").as_micros() as u64;

    let (latest, _) = tokio::sync::watch::channel(0i64);
    let feed = Arc::new(Feed {
        window: Mutex::new(VecDeque::new()),
        latest,
        expected: Mutex::new(VecDeque::new()),
        frames_sent: AtomicU64::new(0),
        relay_connections: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("ws://{}", listener.local_addr().unwrap());
    tokio::spawn(relay(listener, feed.clone()));

    let dir = tempfile::tempdir_in(std::env::var("SOAK_DATA_PARENT").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
    let mut server = spawn_server(dir.path(), &relay_url, &retention);
    let pid = server.child.id();
    while feed.relay_connections.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop_gen = Arc::new(AtomicBool::new(false));
    let generator = tokio::spawn(generate(feed.clone(), rate, stop_gen.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let check = Arc::new(CheckerStats::default());
    let checker_task = tokio::spawn(checker(server.public, feed.clone(), check.clone(), stop.clone()));
    let churn = Arc::new(ChurnStats::default());
    let churn_tasks: Vec<_> = (0..churners)
        .map(|i| tokio::spawn(churner(i, server.public, retention_us, churn.clone(), stop.clone())))
        .collect();

    let started = Instant::now();
    let date = time::OffsetDateTime::now_utc();
    println!(
        "soak: {minutes} min, {rate} frames/s, retention {retention}, {churners} churners, sample every {sample_secs} s; \
         {} cores shared by the server, the relay, the checker and the churners; data in {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        dir.path().display()
    );
    println!("| minute | RSS MiB | open files | RocksDB MiB | CPU cores | checker p50 / p99 ms | checked | sessions | connected |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from(
        "minute,rss_mib,open_files,rocksdb_mib,cpu_cores,checker_p50_ms,checker_p99_ms,checked,sessions,connected\n",
    );
    let mut samples = Vec::new();
    let mut cpu0 = cpu_seconds(pid);
    let mut t0 = Instant::now();
    let total = Duration::from_secs_f64(minutes * 60.0);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(sample_secs).min(total.saturating_sub(started.elapsed()))).await;
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("the server exited during the soak: {status}");
        }
        let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
        cpu0 = cpu_seconds(pid);
        t0 = Instant::now();
        let mut lat = std::mem::take(&mut *check.latencies.lock().unwrap());
        let s = Sample {
            minute: started.elapsed().as_secs_f64() / 60.0,
            rss_mib: rss_mib(pid),
            open_files: open_files(pid),
            rocksdb_mib: dir_mib(dir.path()),
            cpu_cores: cpu,
            p50_ms: percentile(&mut lat, 0.5),
            p99_ms: percentile(&mut lat, 0.99),
            checked: check.checked.load(Ordering::Relaxed),
            sessions: churn.sessions.load(Ordering::Relaxed),
            connected: churn.connected.load(Ordering::Relaxed),
        };
        println!(
            "| {:.1} | {:.0} | {} | {:.0} | {:.2} | {:.1} / {:.1} | {} | {} | {} |",
            s.minute,
            s.rss_mib,
            s.open_files,
            s.rocksdb_mib,
            s.cpu_cores,
            s.p50_ms,
            s.p99_ms,
            s.checked,
            s.sessions,
            s.connected
        );
        let _ = writeln!(
            csv,
            "{:.2},{:.1},{},{:.1},{:.3},{:.2},{:.2},{},{},{}",
            s.minute,
            s.rss_mib,
            s.open_files,
            s.rocksdb_mib,
            s.cpu_cores,
            s.p50_ms,
            s.p99_ms,
            s.checked,
            s.sessions,
            s.connected
        );
        std::fs::write(out_dir.join("samples.csv"), &csv).unwrap();
        samples.push(s);
        let title = format!(
            "Contrail soak {}: {rate} frames/s, {churners} churning subscribers, retention {retention}",
            date.date()
        );
        std::fs::write(out_dir.join("soak.svg"), svg(&samples, &title)).unwrap();
    }

    // Stop the stream and let the checker read to its end.
    stop_gen.store(true, Ordering::Relaxed);
    let _ = generator.await;
    let drain = Instant::now();
    while !feed.expected.lock().unwrap().is_empty() && drain.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = scrape(server.metrics).await;
    stop.store(true, Ordering::Relaxed);
    let _ = checker_task.await;
    for t in churn_tasks {
        let _ = t.await;
    }

    let left = feed.expected.lock().unwrap().len() as u64;
    let lost = check.lost.load(Ordering::Relaxed) + left;
    let unexpected = check.unexpected.load(Ordering::Relaxed);
    let went_back = churn.went_back.load(Ordering::Relaxed);
    println!();
    println!(
        "relay: {} frames; checker: {} events checked, {} lost (of which {} never arrived), {} unexpected, {} reconnects",
        feed.frames_sent.load(Ordering::Relaxed),
        check.checked.load(Ordering::Relaxed),
        lost,
        left,
        unexpected,
        check.reconnects.load(Ordering::Relaxed)
    );
    for p in check.first_problems.lock().unwrap().iter() {
        println!("  checker: {p}");
    }
    println!(
        "churners: {} sessions, {} refused at connect, {} messages, {} time_us going back within a connection",
        churn.sessions.load(Ordering::Relaxed),
        churn.refused.load(Ordering::Relaxed),
        churn.messages.load(Ordering::Relaxed),
        went_back
    );
    for (why, n) in churn.closes.lock().unwrap().iter() {
        println!("  closed by the server: {why}: {n}");
    }
    for line in metrics.lines().filter(|l| {
        (l.starts_with("contrail_hub_closes_total")
            || l.starts_with("contrail_hub_rejected_requests_total")
            || l.starts_with("contrail_log_trimmed")
            || l.starts_with("contrail_ingest_frames_dropped"))
            && !l.starts_with('#')
    }) {
        println!("  metrics: {line}");
    }
    let warnings = server.warnings.lock().unwrap().clone();
    println!("server warnings/errors logged: {}", warnings.len());
    for w in warnings.iter().take(10) {
        println!("  {w}");
    }
    // Flatness over the second half: the first half includes the fill-up (ring, caches, the log
    // growing to its retention).
    let half = &samples[samples.len() / 2..];
    let range = |f: &dyn Fn(&Sample) -> f64| {
        let v: Vec<f64> = half.iter().map(f).collect();
        (v.iter().cloned().fold(f64::MAX, f64::min), v.iter().cloned().fold(f64::MIN, f64::max))
    };
    let (rss_lo, rss_hi) = range(&|s| s.rss_mib);
    let (fd_lo, fd_hi) = range(&|s| s.open_files as f64);
    let (db_lo, db_hi) = range(&|s| s.rocksdb_mib);
    println!(
        "second half: RSS {rss_lo:.0}–{rss_hi:.0} MiB, open files {fd_lo:.0}–{fd_hi:.0}, RocksDB {db_lo:.0}–{db_hi:.0} MiB"
    );
    println!("wrote {} and {}", out_dir.join("samples.csv").display(), out_dir.join("soak.svg").display());
    let ok = lost == 0 && unexpected == 0 && went_back == 0;
    println!("verdict: {}", if ok { "exactly once and in order" } else { "FAILED" });
    if !ok {
        std::process::exit(1);
    }
}
