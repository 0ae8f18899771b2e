//! What verification costs per commit, on the real corpus (100 production commits from
//! bsky.network with their authors' DID documents), beside transcoding the same frames in the
//! same run. `cargo bench --bench verify`.
//!
//! - `transcode`: frame → Jetstream events (what ingest does anyway).
//! - `signature`: read the commit, check its block against its CID and its signature.
//! - `full`: also the MST inversion proof and the chain check.
//!
//! Keys are resolved beforehand (the directory's cost is per new DID, not per commit).
//!
//! `mst proof`: the inversion proof alone for a commit of 200 creates (the most a commit
//! carries) in a repo of 20,000 records, its whole new tree in the CAR — once with keys spread
//! over the layers as real ones are, once with every key on layer 0: one node of ~20,000
//! entries (~1 MB), which a PDS can make by choosing its record keys.

#[allow(dead_code)]
#[path = "../tests/common/frames.rs"]
mod frames;

use contrail_core::verify::commit::{Action, Blocks, ProofOp};
use contrail_core::verify::mst::{check_inversion, key_height, PartialTree};
use contrail_core::verify::{self, keys, Level, RepoFrame};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::collections::HashMap;
use std::path::PathBuf;

struct Corpus {
    frames: Vec<Vec<u8>>,
    keys: HashMap<String, verify::PublicKey>,
}

fn corpus() -> Option<Corpus> {
    let dir = corpus_dir();
    let path = dir.join("corpus/frames.bin.zst");
    if !path.exists() {
        eprintln!("SKIP verify bench: {} not found (set CONTRAIL_SHARED_DIR)", path.display());
        return None;
    }
    let frames = contrail::framefile::read_frames(&path).expect("corpus");
    let docs = zstd::decode_all(std::fs::File::open(dir.join("corpus/did_docs.json.zst")).unwrap()).unwrap();
    let docs: HashMap<String, serde_json::Value> = serde_json::from_slice(&docs).unwrap();
    let keys = docs.iter().filter_map(|(did, doc)| Some((did.clone(), keys::atproto_key(did, doc).ok()?))).collect();
    // Only the commits: the per-commit figure is what scales with the firehose.
    let frames = frames
        .into_iter()
        .filter(|f| matches!(verify::read_frame(f), Ok(Some(RepoFrame::Commit(_)))))
        .collect::<Vec<_>>();
    Some(Corpus { frames, keys })
}

fn check_all(c: &Corpus, level: Level) -> usize {
    let mut ok = 0;
    for f in &c.frames {
        let Ok(Some(RepoFrame::Commit(commit))) = verify::read_frame(f) else { continue };
        let key = &c.keys[commit.repo];
        if let Ok(checked) = verify::check_commit(&commit, key, level) {
            if level == Level::Full {
                let _ = verify::check_chain(Some(&checked.state), &commit.link());
            }
            ok += 1;
        }
    }
    ok
}

fn bench(c: &mut Criterion) {
    let Some(corpus) = corpus() else { return };
    assert_eq!(check_all(&corpus, Level::Full), corpus.frames.len(), "every corpus commit verifies");
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(corpus.frames.len() as u64));
    g.bench_function("transcode (baseline)", |b| {
        let mut tx = contrail::transcode::Transcoder::default();
        let (mut events, mut drops) = (Vec::new(), Vec::new());
        b.iter(|| {
            for f in &corpus.frames {
                events.clear();
                tx.transcode(f, &mut events, &mut drops);
            }
            events.len()
        })
    });
    g.bench_function("signature", |b| b.iter(|| check_all(&corpus, Level::Signature)));
    g.bench_function("full", |b| b.iter(|| check_all(&corpus, Level::Full)));
    g.finish();

    // One signature per curve (the interop fixtures' valid ones): what the two key types cost.
    let fixtures: serde_json::Value = serde_json::from_slice(
        &std::fs::read(corpus_dir().join("interop/crypto/signature-fixtures.json")).expect("fixtures"),
    )
    .unwrap();
    let mut g = c.benchmark_group("one signature");
    for f in fixtures.as_array().unwrap().iter().filter(|f| f["validSignature"] == true) {
        let b64 = |k: &str| {
            contrail::transcode::cid::decode_base64_nopad(f[k].as_str().unwrap().trim_end_matches('=').as_bytes())
                .unwrap()
        };
        let (msg, sig) = (b64("messageBase64"), b64("signatureBase64"));
        let key = verify::PublicKey::from_did_key(f["publicKeyDid"].as_str().unwrap()).unwrap();
        let name = f["algorithm"].as_str().unwrap().to_string();
        g.bench_function(name, |b| b.iter(|| assert!(key.verify(&msg, &sig))));
    }
    g.finish();

    let mut g = c.benchmark_group("mst proof");
    g.sample_size(20);
    for (name, wide) in [("20,000 records, 200 creates", false), ("20,000 records on one layer, 200 creates", true)] {
        let Creates { car, root, ops, before_root } = commit_of_creates(20_000, 200, wide);
        let blocks = Blocks::parse(&car).unwrap();
        let ops: Vec<ProofOp> = ops
            .iter()
            .map(|(path, cid)| ProofOp { action: Action::Create, path, cid: Some(cid), prev: None })
            .collect();
        assert_eq!(check_inversion(&blocks, &root, &ops, &before_root), Ok(()));
        g.bench_function(name, |b| b.iter(|| check_inversion(&blocks, &root, &ops, &before_root)));
    }
    g.finish();
}

/// A commit of creates, as a relay carries it with its whole new tree.
struct Creates {
    car: Vec<u8>,
    root: Vec<u8>,
    /// Each create's path and record CID.
    ops: Vec<(String, Vec<u8>)>,
    before_root: Vec<u8>,
}

/// A commit creating `creates` records in a repo of `records`. `one_layer`: only keys of
/// layer 0, so the tree is one node.
fn commit_of_creates(records: usize, creates: usize, one_layer: bool) -> Creates {
    let value = frames::cid_of(b"record").to_bytes();
    let keys: Vec<String> = (0u32..)
        .map(|n| format!("app.bsky.feed.post/{n:013}"))
        .filter(|k| !one_layer || key_height(k.as_bytes()) == 0)
        .take(records + creates)
        .collect();
    // Every (records / creates)th key is created by the commit.
    let step = (records + creates) / creates;
    let created = |i: usize| i.is_multiple_of(step) && i / step < creates;
    let kept = keys.iter().enumerate().filter(|(i, _)| !created(*i)).map(|(_, k)| k);
    let before = PartialTree::from_records(kept.map(|k| (k.as_bytes(), value.as_slice())));
    let after = PartialTree::from_records(keys.iter().map(|k| (k.as_bytes(), value.as_slice())));
    let (root, nodes) = after.blocks().unwrap();
    let cid = |b: &[u8]| ipld_core::cid::Cid::try_from(b).unwrap();
    let nodes: Vec<_> = nodes.iter().map(|(c, b)| (cid(c), b.clone())).collect();
    let car = frames::car(&cid(&root), &nodes);
    let ops = keys.iter().enumerate().filter(|(i, _)| created(*i)).map(|(_, k)| (k.clone(), value.clone())).collect();
    Creates { car, root, ops, before_root: before.root_cid().unwrap() }
}

fn corpus_dir() -> PathBuf {
    std::env::var_os("CONTRAIL_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

criterion_group!(benches, bench);
criterion_main!(benches);
