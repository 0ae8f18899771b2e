//! Real third-party Jetstream clients (jetstream-oxide, rocketman) against our server on
//! loopback, uncompressed and compressed (on defaults: Jetstream's v1 dictionary, which these
//! clients embed), on the real corpus.

mod common;

use common::process::Serve;
use common::relay::FakeRelay;
use common::shared_dir;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (did, collection, rkey) of every event production Jetstream v1 sent for the corpus.
fn expected(shared: &std::path::Path, collections: Option<&[&str]>) -> BTreeSet<(String, String, String)> {
    std::fs::read_to_string(shared.join("corpus/expected_v1.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| collections.is_none_or(|c| c.contains(&v["commit"]["collection"].as_str().unwrap())))
        .map(|v| {
            let c = &v["commit"];
            (
                v["did"].as_str().unwrap().into(),
                c["collection"].as_str().unwrap().into(),
                c["rkey"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// A server on defaults that has ingested the corpus frames.
async fn corpus_server(shared: &std::path::Path) -> (FakeRelay, tempfile::TempDir, Serve) {
    let relay = FakeRelay::start().await;
    let frames = contrail::framefile::read_frames(&shared.join("corpus/frames.bin.zst")).unwrap();
    let mut last = 0;
    for f in frames {
        let info = contrail::transcode::Transcoder::default().transcode(&f, &mut Vec::new(), &mut Vec::new());
        last = info.seq.unwrap();
        relay.push(last, f);
    }
    let dir = tempfile::tempdir().unwrap();
    // Defaults: no dictionary flag. compress=true must speak what these clients embed.
    let serve = Serve::start(dir.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
    serve.wait_for_seq(last, Duration::from_secs(30));
    (relay, dir, serve)
}

/// jetstream-oxide types records with atrium's known Bluesky lexicons, so it is asked only
/// for those collections (its parser rejects other lexicons by design).
const BSKY: &[&str] = &[
    "app.bsky.feed.like",
    "app.bsky.feed.post",
    "app.bsky.feed.repost",
    "app.bsky.graph.follow",
    "app.bsky.graph.block",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_oxide_receives_the_corpus() {
    let Some(shared) = shared_dir("jetstream_oxide_receives_the_corpus") else { return };
    let (_relay, _dir, serve) = corpus_server(&shared).await;
    let want = expected(&shared, Some(BSKY));
    assert_eq!(want.len(), 100);
    for compression in [jetstream_oxide::JetstreamCompression::None, jetstream_oxide::JetstreamCompression::Zstd] {
        let config = jetstream_oxide::JetstreamConfig {
            endpoint: format!("ws://{}/subscribe", serve.public),
            wanted_collections: BSKY.iter().map(|c| c.parse().unwrap()).collect(),
            compression,
            cursor: chrono::DateTime::from_timestamp_micros(1),
            max_retries: 1,
            ..Default::default()
        };
        let rx = jetstream_oxide::JetstreamConnector::new(config).unwrap().connect().await.unwrap();
        let mut got = BTreeSet::new();
        let mut last_time = 0;
        while got.len() < want.len() {
            let ev =
                tokio::time::timeout(Duration::from_secs(10), rx.recv_async()).await.expect("event in time").unwrap();
            use jetstream_oxide::events::{commit::CommitEvent, JetstreamEvent};
            let JetstreamEvent::Commit(c) = ev else { panic!("unexpected non-commit event") };
            let (info, ci) = match &c {
                CommitEvent::Create { info, commit } | CommitEvent::Update { info, commit } => (info, &commit.info),
                CommitEvent::Delete { info, commit } => (info, commit),
            };
            assert!(info.time_us > last_time, "time_us not increasing");
            last_time = info.time_us;
            assert!(got.insert((info.did.to_string(), ci.collection.to_string(), ci.rkey.clone())), "duplicate event");
        }
        assert_eq!(got, want);
    }
}

struct Collect(Arc<Mutex<Vec<rocketman::types::event::Event<serde_json::Value>>>>);

#[async_trait::async_trait]
impl rocketman::ingestion::LexiconIngestor for Collect {
    async fn ingest(&self, message: rocketman::types::event::Event<serde_json::Value>) -> anyhow::Result<()> {
        self.0.lock().unwrap().push(message);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocketman_receives_the_corpus() {
    let Some(shared) = shared_dir("rocketman_receives_the_corpus") else { return };
    let (_relay, _dir, serve) = corpus_server(&shared).await;
    let want = expected(&shared, None);
    assert_eq!(want.len(), 102);
    for compress in [false, true] {
        let opts = rocketman::options::JetstreamOptions::builder()
            .ws_url(rocketman::endpoints::JetstreamEndpoints::Custom(format!("ws://{}/subscribe", serve.public)))
            .compress(compress)
            .build();
        let conn = rocketman::connection::JetstreamConnection::new(opts);
        let got = Arc::new(Mutex::new(Vec::new()));
        let mut ingestors = rocketman::handler::Ingestors::new();
        for c in [
            "app.bsky.feed.like",
            "app.bsky.feed.post",
            "app.bsky.feed.repost",
            "app.bsky.graph.follow",
            "app.bsky.graph.block",
            "app.bsky.actor.status",
            "fm.teal.alpha.actor.status",
        ] {
            ingestors.commits.insert(c.to_string(), Box::new(Collect(got.clone())));
        }
        let cursor = Arc::new(Mutex::new(Some(1u64)));
        let msgs = conn.get_msg_rx();
        let reconnect = conn.get_reconnect_tx();
        let c2 = cursor.clone();
        let task = tokio::spawn(async move {
            let _ = conn.connect(c2).await;
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.lock().unwrap().len() < want.len() && std::time::Instant::now() < deadline {
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(200), msgs.recv()).await {
                rocketman::handler::handle_message(m, &ingestors, reconnect.clone(), cursor.clone()).await.unwrap();
            }
        }
        task.abort();
        let got = got.lock().unwrap();
        let set: BTreeSet<_> = got
            .iter()
            .map(|e| {
                let c = e.commit.as_ref().unwrap();
                (e.did.clone(), c.collection.clone(), c.rkey.clone())
            })
            .collect();
        assert_eq!(got.len(), want.len(), "compress={compress}");
        assert_eq!(set, want, "compress={compress}");
        let times: Vec<u64> = got.iter().map(|e| e.time_us.unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]));
    }
}

/// A virtualenv with the Python atproto SDK (pinned), made once per target dir the way a user
/// would: `python3 -m venv` and `pip install atproto`. `None` when there is no python3.
fn atproto_venv() -> Option<std::path::PathBuf> {
    let venv = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("venv-atproto-0.0.73");
    let python = venv.join("bin/python");
    if python.is_file() {
        return Some(python);
    }
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIP the Python SDK test: no python3");
        return None;
    }
    let ok = |c: &mut std::process::Command| c.status().map(|s| s.success()).unwrap_or(false);
    assert!(ok(std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv)), "python3 -m venv failed");
    let pip = venv.join("bin/pip");
    assert!(
        ok(std::process::Command::new(&pip).args(["install", "-q", "atproto==0.0.73"])),
        "pip install atproto failed"
    );
    Some(python)
}

/// The Python SDK's v2 client (`atproto_jetstream.JetstreamClient`) receives exactly the corpus
/// through Contrail's v2 wire, with and without compression, and — the server being killed
/// and restarted under it before the second half of the corpus even exists — resumes by its
/// own cursor with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atproto_python_v2_client_receives_the_corpus_and_resumes() {
    let Some(shared) = shared_dir("atproto_python_v2_client_receives_the_corpus_and_resumes") else { return };
    let Some(python) = atproto_venv() else { return };
    let want = expected(&shared, None);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/v2_client.py");
    let frames = contrail::framefile::read_frames(&shared.join("corpus/frames.bin.zst")).unwrap();
    for compress in ["0", "1"] {
        // Half the corpus now; the rest only after the server is killed and restarted, so the
        // client must reconnect and resume to get it.
        let relay = FakeRelay::start().await;
        let push = |range: std::ops::Range<usize>| {
            for f in &frames[range] {
                let info = contrail::transcode::Transcoder::default().transcode(f, &mut Vec::new(), &mut Vec::new());
                relay.push(info.seq.unwrap(), f.clone());
            }
        };
        push(0..50);
        let dir = tempfile::tempdir().unwrap();
        let mut serve = Serve::start(dir.path(), &relay.url(), &["--max-events-per-second-per-ip", "0"]);
        let mut child = std::process::Command::new(&python)
            .args([script, &format!("ws://{}/xrpc", serve.public), &want.len().to_string(), compress])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str::<serde_json::Value>(&line).unwrap());
            }
        });
        let (mut got, mut seqs, mut done, mut restarted) = (BTreeSet::new(), Vec::new(), None, false);
        while done.is_none() {
            let v = rx.recv_timeout(Duration::from_secs(60)).expect("the Python client stalled");
            if v["done"] == true {
                done = Some(v);
                continue;
            }
            seqs.push(v["seq"].as_u64().unwrap());
            let key = (
                v["did"].as_str().unwrap().to_string(),
                v["collection"].as_str().unwrap().to_string(),
                v["rkey"].as_str().unwrap().to_string(),
            );
            assert!(got.insert(key), "duplicate event {v}");
            if seqs.len() == 30 {
                // Kill the server under the client and bring it back on the same address.
                let public = serve.public.to_string();
                serve.kill9();
                serve = Serve::start(
                    dir.path(),
                    &relay.url(),
                    &["--max-events-per-second-per-ip", "0", "--listen", &public],
                );
                push(50..frames.len());
                restarted = true;
            }
        }
        assert!(child.wait().unwrap().success());
        assert!(restarted);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq not increasing");
        assert_eq!(got, want, "compress={compress}");
        let done = done.unwrap();
        assert_eq!(done["compressed"], compress == "1", "{done}");
        assert_eq!(done["cursor"].as_u64(), seqs.last().copied());
    }
}
