//! Client decode throughput: events/s received, decoded and handed to a no-op handler by
//! contrail-client (through `process`, cursor bookkeeping included), jetstream-oxide and
//! rocketman, uncompressed and zstd (Jetstream's v1 dictionary, which the other two embed),
//! measured in the same run, rounds interleaved.
//!
//! The events are the real ones of `../shared/corpus/expected_v1.jsonl` in the collections
//! jetstream-oxide can type (its parser rejects other lexicons), repeated with increasing
//! `time_us`. A minimal websocket server in this process, on its own thread and runtime (the
//! second core), writes pre-encoded frames as fast as the client reads; each client runs on a
//! single-threaded runtime (one core).
//! `cargo bench -p contrail-client --bench decode` (prints a report; not a criterion bench: whole-client runs).

use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EVENTS: usize = 100_000;
const ROUNDS: usize = 5;
const BSKY: &[&str] = &[
    "app.bsky.feed.like",
    "app.bsky.feed.post",
    "app.bsky.feed.repost",
    "app.bsky.graph.follow",
    "app.bsky.graph.block",
];

/// The whole stream as websocket frames on the wire, so the server writes it in large chunks
/// and the clients, not the server's per-message writes, set the pace.
struct Encoded {
    text: Vec<u8>,
    zstd: Vec<u8>,
    json_bytes: usize,
    zstd_bytes: usize,
}

/// One unmasked (server → client) websocket frame, RFC 6455 §5.2.
fn frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n < 65536 => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

fn events(shared: &std::path::Path) -> Encoded {
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(shared.join("corpus/expected_v1.jsonl"))
        .expect("the corpus")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| BSKY.contains(&v["commit"]["collection"].as_str().unwrap_or("")))
        .collect();
    let dict = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../dictionaries/jetstream-v1.zdict")).unwrap();
    // The server's level (zstd 1, as Jetstream v2).
    let mut compressor = zstd::bulk::Compressor::with_dictionary(1, &dict).unwrap();
    let base = 1_725_000_000_000_000u64;
    let mut out = Encoded { text: Vec::new(), zstd: Vec::new(), json_bytes: 0, zstd_bytes: 0 };
    for i in 0..EVENTS {
        let mut v = lines[i % lines.len()].clone();
        v["time_us"] = (base + i as u64).into();
        let json = serde_json::to_vec(&v).unwrap();
        let compressed = compressor.compress(&json).unwrap();
        out.json_bytes += json.len();
        out.zstd_bytes += compressed.len();
        frame(&mut out.text, 0x1, &json);
        frame(&mut out.zstd, 0x2, &compressed);
    }
    for wire in [&mut out.text, &mut out.zstd] {
        frame(wire, 0x8, &1000u16.to_be_bytes());
    }
    out
}

/// Serves every connection the whole event list (binary zstd frames when the query asks for
/// `compress=true`), then a close frame.
fn start_server(events: Arc<Encoded>) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let events = events.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                        let events = events.clone();
                        async move {
                            let compress = req.uri().query().is_some_and(|q| q.contains("compress=true"));
                            let (resp, fut) = fastwebsockets::upgrade::upgrade(&mut req)?;
                            tokio::spawn(async move {
                                use tokio::io::AsyncWriteExt;
                                let Ok(ws) = fut.await else { return };
                                let mut io = ws.into_inner();
                                let wire = if compress { &events.zstd } else { &events.text };
                                for chunk in wire.chunks(256 << 10) {
                                    if io.write_all(chunk).await.is_err() {
                                        return;
                                    }
                                }
                                let _ = io.flush().await;
                                // Let the client read the close before the socket goes.
                                tokio::time::sleep(Duration::from_secs(5)).await;
                            });
                            Ok::<_, fastwebsockets::WebSocketError>(resp)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(tcp);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).with_upgrades().await;
                });
            }
        });
    });
    addr
}

fn one_core() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Seconds for contrail-client to hand `EVENTS` events to a no-op handler.
fn contrail_client(addr: SocketAddr, compress: bool, dict: &[u8]) -> (usize, f64) {
    one_core().block_on(async {
        let start = Instant::now();
        let sub = contrail_client::Subscription::builder([format!("ws://{addr}")])
            .compress(compress)
            .dictionary(dict.to_vec())
            .start()
            .unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let done = Arc::new(tokio::sync::Notify::new());
        let (c, d) = (count.clone(), done.clone());
        let handler = move |e: contrail_client::Event| {
            std::hint::black_box(e.collection());
            if c.fetch_add(1, Ordering::Relaxed) + 1 == EVENTS as u64 {
                d.notify_one();
            }
            async { Ok::<(), std::convert::Infallible>(()) }
        };
        let store = contrail_client::MemoryCursorStore::default();
        let shutdown = async move { done.notified().await };
        contrail_client::process(sub, store, contrail_client::ProcessOptions::default(), handler, shutdown)
            .await
            .unwrap();
        assert_eq!(count.load(Ordering::Relaxed), EVENTS as u64);
        (EVENTS, start.elapsed().as_secs_f64())
    })
}

fn jetstream_oxide(addr: SocketAddr, compress: bool) -> (usize, f64) {
    one_core().block_on(async {
        let start = Instant::now();
        let config = jetstream_oxide::JetstreamConfig {
            endpoint: format!("ws://{addr}/subscribe"),
            wanted_collections: BSKY.iter().map(|c| c.parse().unwrap()).collect(),
            compression: if compress {
                jetstream_oxide::JetstreamCompression::Zstd
            } else {
                jetstream_oxide::JetstreamCompression::None
            },
            max_retries: 1,
            ..Default::default()
        };
        let rx = jetstream_oxide::JetstreamConnector::new(config).unwrap().connect().await.unwrap();
        // Until the last event, or the end of its channel (it would skip events it cannot
        // type): the rate counts what it delivered.
        let mut delivered = 0;
        while delivered < EVENTS {
            let Ok(ev) = tokio::time::timeout(Duration::from_secs(30), rx.recv_async()).await.unwrap() else { break };
            std::hint::black_box(ev);
            delivered += 1;
        }
        (delivered, start.elapsed().as_secs_f64())
    })
}

struct Count(Arc<AtomicU64>);

#[async_trait::async_trait]
impl rocketman::ingestion::LexiconIngestor for Count {
    async fn ingest(&self, message: rocketman::types::event::Event<serde_json::Value>) -> anyhow::Result<()> {
        std::hint::black_box(message);
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn rocketman(addr: SocketAddr, compress: bool) -> (usize, f64) {
    one_core().block_on(async {
        let start = Instant::now();
        let opts = rocketman::options::JetstreamOptions::builder()
            .ws_url(rocketman::endpoints::JetstreamEndpoints::Custom(format!("ws://{addr}/subscribe")))
            .compress(compress)
            .build();
        let conn = rocketman::connection::JetstreamConnection::new(opts);
        let count = Arc::new(AtomicU64::new(0));
        let mut ingestors = rocketman::handler::Ingestors::new();
        for c in BSKY {
            ingestors.commits.insert(c.to_string(), Box::new(Count(count.clone())));
        }
        let cursor = Arc::new(std::sync::Mutex::new(None));
        let msgs = conn.get_msg_rx();
        let reconnect = conn.get_reconnect_tx();
        let c2 = cursor.clone();
        let task = tokio::spawn(async move {
            let _ = conn.connect(c2).await;
        });
        while count.load(Ordering::Relaxed) < EVENTS as u64 {
            let m = tokio::time::timeout(Duration::from_secs(30), msgs.recv()).await.unwrap().unwrap();
            rocketman::handler::handle_message(m, &ingestors, reconnect.clone(), cursor.clone()).await.unwrap();
        }
        task.abort();
        (EVENTS, start.elapsed().as_secs_f64())
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let shared = std::env::var_os("CONTRAIL_SHARED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared")));
    if !shared.join("corpus").is_dir() {
        eprintln!("SKIP client bench: the corpus is not at {}", shared.display());
        return;
    }
    let encoded = events(&shared);
    let zstd_bytes = encoded.zstd_bytes;
    println!(
        "{EVENTS} events per run: {:.0} B JSON each, {:.0} B compressed; median of {ROUNDS} rounds, interleaved",
        encoded.json_bytes as f64 / EVENTS as f64,
        zstd_bytes as f64 / EVENTS as f64
    );
    let dict = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../dictionaries/jetstream-v1.zdict")).unwrap();
    let addr = start_server(Arc::new(encoded));
    // Profiling aid: `DECODE_PROFILE=plain|zstd` runs only contrail-client, 20 times.
    if let Ok(mode) = std::env::var("DECODE_PROFILE") {
        for _ in 0..20 {
            let (n, secs) = contrail_client(addr, mode == "zstd", &dict);
            println!("contrail-client {mode}: {:.0} events/s", n as f64 / secs);
        }
        return;
    }
    for compress in [false, true] {
        let mut rates: [Vec<f64>; 3] = Default::default();
        let mut delivered = [0usize; 3];
        for _ in 0..ROUNDS {
            let runs =
                [contrail_client(addr, compress, &dict), jetstream_oxide(addr, compress), rocketman(addr, compress)];
            for (i, (n, secs)) in runs.into_iter().enumerate() {
                rates[i].push(n as f64 / secs);
                delivered[i] = n;
            }
        }
        let label = if compress { "zstd" } else { "plain" };
        let base = median(rates[0].clone());
        for (i, name) in ["contrail-client", "jetstream-oxide", "rocketman"].iter().enumerate() {
            let rate = median(rates[i].clone());
            println!(
                "{label:5} {name:16} {rate:>10.0} events/s  ({:.2}× contrail-client; {} of {EVENTS} events delivered)",
                rate / base,
                delivered[i]
            );
        }
    }
}
