//! Transcoder throughput on the real corpus frames, beside the baseline a Rust developer
//! would write with stock crates (serde_ipld_dagcbor → Ipld → serde_json::Value → bytes),
//! measured in the same run; and commits of the most ops a frame may carry (synthetic).
//! `cargo bench --bench transcode`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipld_core::ipld::Ipld;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;

#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;

fn corpus() -> Option<Vec<Vec<u8>>> {
    let dir = std::env::var_os("CONTRAIL_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let path = dir.join("corpus/frames.bin.zst");
    if !path.exists() {
        eprintln!("SKIP transcode bench: {} not found (set CONTRAIL_SHARED_DIR)", path.display());
        return None;
    }
    Some(contrail::framefile::read_frames(&path).expect("corpus"))
}

fn contrail_all(tx: &mut contrail::transcode::Transcoder, frames: &[Vec<u8>]) -> usize {
    let (mut events, mut drops) = (Vec::new(), Vec::new());
    let mut n = 0;
    for f in frames {
        events.clear();
        tx.transcode(f, &mut events, &mut drops);
        for e in events.iter_mut() {
            e.stamp(1_783_175_888_085_434);
            n += e.json().len();
        }
    }
    n
}

// ---- baseline: stock crates, tree in the middle ----

fn ipld_to_json(v: &Ipld) -> Value {
    match v {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(*b),
        Ipld::Integer(i) => json!(*i as i64),
        Ipld::Float(f) => json!(*f),
        Ipld::String(s) => Value::String(s.clone()),
        Ipld::Bytes(b) => json!({ "$bytes": base64_nopad(b) }),
        Ipld::List(l) => Value::Array(l.iter().map(ipld_to_json).collect()),
        Ipld::Map(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), ipld_to_json(v))).collect()),
        Ipld::Link(c) => json!({ "$link": c.to_string() }),
    }
}

fn base64_nopad(b: &[u8]) -> String {
    let mut out = Vec::new();
    contrail::transcode::cid::write_base64_nopad(&mut out, b);
    String::from_utf8(out).unwrap()
}

fn uvarint(b: &[u8]) -> (usize, usize) {
    let (mut v, mut i) = (0usize, 0);
    loop {
        v |= ((b[i] & 0x7f) as usize) << (7 * i);
        i += 1;
        if b[i - 1] & 0x80 == 0 {
            return (v, i);
        }
    }
}

fn baseline_frame(frame: &[u8]) -> Vec<Vec<u8>> {
    use serde::Deserialize;
    let mut de = serde_ipld_dagcbor::de::Deserializer::from_slice(frame);
    let header = Ipld::deserialize(&mut de).unwrap();
    let body = Ipld::deserialize(&mut de).unwrap();
    let (Ipld::Map(h), Ipld::Map(b)) = (header, body) else { return vec![] };
    if h.get("t") != Some(&Ipld::String("#commit".into())) {
        return vec![];
    }
    let Some(Ipld::Bytes(car)) = b.get("blocks") else { return vec![] };
    let (hlen, n) = uvarint(car);
    let mut pos = n + hlen;
    let mut blocks = HashMap::new();
    while pos < car.len() {
        let (len, n) = uvarint(&car[pos..]);
        let sec = &car[pos + n..pos + n + len];
        let cid = ipld_core::cid::Cid::read_bytes(sec).unwrap();
        let cl = cid.encoded_len();
        blocks.insert(cid, sec[cl..].to_vec());
        pos += n + len;
    }
    let mut out = Vec::new();
    let Some(Ipld::List(ops)) = b.get("ops") else { return out };
    for op in ops {
        let Ipld::Map(op) = op else { continue };
        let (Some(Ipld::String(path)), Some(Ipld::String(action))) = (op.get("path"), op.get("action")) else {
            continue;
        };
        let (coll, rkey) = path.split_once('/').unwrap();
        let mut commit =
            json!({"rev": b.get("rev").map(ipld_to_json), "operation": action, "collection": coll, "rkey": rkey});
        if let Some(Ipld::Link(cid)) = op.get("cid") {
            let rec: Ipld = serde_ipld_dagcbor::from_slice(&blocks[cid]).unwrap();
            commit["record"] = ipld_to_json(&rec);
            commit["cid"] = json!(cid.to_string());
        }
        let ev = json!({"did": b.get("repo").map(ipld_to_json), "time_us": 1_783_175_888_085_434u64, "kind": "commit", "commit": commit});
        out.push(serde_json::to_vec(&ev).unwrap());
    }
    out
}

/// Commits of 200 ops (the most a frame may carry): 200 different likes, and 200 likes of one
/// record (ops sharing a block: its JSON is rendered once per frame and copied).
fn bench_largest_commits(c: &mut Criterion) {
    use frames::{commit_frame, like_record, TestOp};
    let (did, rev) = ("did:plc:q6gjnaw2blty4crticxkmujt", "3mptbypluud2a");
    let path = |i: usize| format!("app.bsky.feed.like/3l{i:011}");
    let distinct: Vec<TestOp> = (0..200).map(|i| TestOp::create(&path(i), &like_record(i as u64))).collect();
    let shared: Vec<TestOp> = (0..200).map(|i| TestOp::create(&path(i), &like_record(7))).collect();
    let mut g = c.benchmark_group("transcode_commit_of_200_ops");
    g.throughput(Throughput::Elements(200));
    let mut tx = contrail::transcode::Transcoder::default();
    for (name, ops) in [("distinct_records", distinct), ("one_shared_record", shared)] {
        let frame = vec![commit_frame(1, did, rev, &ops)];
        assert!(contrail_all(&mut tx, &frame) > 0);
        g.bench_function(name, |b| b.iter(|| contrail_all(&mut tx, &frame)));
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    bench_largest_commits(c);
    let Some(frames) = corpus() else { return };
    let bytes: usize = frames.iter().map(Vec::len).sum();
    let mut g = c.benchmark_group("transcode_corpus");
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut tx = contrail::transcode::Transcoder::default();
    g.bench_function("contrail", |b| b.iter(|| contrail_all(&mut tx, &frames)));
    g.bench_function("baseline_ipld_serde_json", |b| {
        b.iter(|| frames.iter().map(|f| baseline_frame(f).len()).sum::<usize>())
    });
    g.finish();
    let mut g = c.benchmark_group("transcode_corpus_frames");
    g.throughput(Throughput::Elements(frames.len() as u64));
    g.bench_function("contrail", |b| b.iter(|| contrail_all(&mut tx, &frames)));
    g.finish();

    // The v2 wire's extra cost per event: its message is built once per event from the v1
    // JSON (then shared by every v2 subscriber, like the v1 bytes). Baseline in the same run:
    // the v1 events' transcoding, which every event pays anyway.
    let mut events = Vec::new();
    for f in &frames {
        tx.transcode(f, &mut events, &mut Vec::new());
    }
    for (i, e) in events.iter_mut().enumerate() {
        e.stamp(1_783_175_888_085_434 + i as u64);
    }
    let mut g = c.benchmark_group("v2_message_per_event");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("v2_message_from_v1_json", |b| {
        b.iter(|| events.iter().map(|e| contrail::v2::message(e).len()).sum::<usize>())
    });
    g.bench_function("baseline_v1_transcode", |b| b.iter(|| contrail_all(&mut tx, &frames)));
    g.finish();

    // Compressing one event with Jetstream's v1 dictionary (what `compress=true` costs per
    // event and dictionary, and what bounds a lone compressed replayer), by zstd level; the
    // compressed total is printed beside. Baseline in the same run: copying the JSON.
    let dict = contrail::hub::compress::JETSTREAM_V1;
    let mut g = c.benchmark_group("compress_per_event");
    g.throughput(Throughput::Elements(events.len() as u64));
    g.bench_function("baseline_copy_json", |b| {
        b.iter(|| events.iter().map(|e| e.json().to_vec().len()).sum::<usize>())
    });
    for level in [-1, 1, 3] {
        let prepared = zstd::dict::EncoderDictionary::copy(dict, level);
        let mut z = zstd::bulk::Compressor::with_prepared_dictionary(&prepared).unwrap();
        let total: usize = events.iter().map(|e| z.compress(e.json()).unwrap().len()).sum();
        let json: usize = events.iter().map(|e| e.json().len()).sum();
        println!(
            "zstd level {level}: {total} bytes compressed from {json} ({:.1}%)",
            100.0 * total as f64 / json as f64
        );
        g.bench_function(format!("zstd_level_{level}"), |b| {
            b.iter(|| events.iter().map(|e| z.compress(e.json()).unwrap().len()).sum::<usize>())
        });
    }
    // Level 1 with a smaller hash table and longer shortest match, set on a compressor that
    // builds its own tables from the dictionary (a prepared dictionary cannot take them):
    // measured, not adopted (BENCHMARKS.md, ninth session).
    {
        use zstd::stream::raw::CParameter;
        let mut z = zstd::bulk::Compressor::with_dictionary(1, dict).unwrap();
        z.set_parameter(CParameter::HashLog(12)).unwrap();
        z.set_parameter(CParameter::MinMatch(7)).unwrap();
        let total: usize = events.iter().map(|e| z.compress(e.json()).unwrap().len()).sum();
        let json: usize = events.iter().map(|e| e.json().len()).sum();
        println!(
            "zstd level 1, hash log 12, min match 7: {total} bytes from {json} ({:.1}%)",
            100.0 * total as f64 / json as f64
        );
        g.bench_function("zstd_level_1_hashlog_12_minmatch_7", |b| {
            b.iter(|| events.iter().map(|e| z.compress(e.json()).unwrap().len()).sum::<usize>())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
