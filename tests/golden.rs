//! Conformance with production Jetstream v1 on real relay frames (`../shared/corpus`).

mod common;

use common::frames::{cid_of, dag_cbor, json_to_ipld};
use common::{shared_dir, without_time_us};
use contrail::transcode::json::RecordWriter;
use contrail::transcode::{cid::cid_to_string, Transcoder};
use std::collections::BTreeMap;

fn multiset<'a>(lines: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in lines.filter(|l| !l.is_empty()) {
        *m.entry(without_time_us(l)).or_default() += 1;
    }
    m
}

fn diff(ours: &BTreeMap<String, usize>, expected: &BTreeMap<String, usize>) -> String {
    let mut s = String::new();
    for (line, n) in expected {
        if ours.get(line) != Some(n) {
            s += &format!("expected ×{n}, got ×{}: {line}\n", ours.get(line).copied().unwrap_or(0));
        }
    }
    for (line, n) in ours {
        if !expected.contains_key(line) {
            s += &format!("unexpected ×{n}: {line}\n");
        }
    }
    s
}

#[test]
fn corpus_frames_match_production_v1_byte_for_byte() {
    let Some(shared) = shared_dir("corpus_frames_match_production_v1_byte_for_byte") else { return };
    let frames = contrail::framefile::read_frames(&shared.join("corpus/frames.bin.zst")).unwrap();
    assert_eq!(frames.len(), 100);
    let mut tx = Transcoder::default();
    let (mut events, mut drops) = (Vec::new(), Vec::new());
    let mut lines = Vec::new();
    for f in &frames {
        events.clear();
        let info = tx.transcode(f, &mut events, &mut drops);
        assert_eq!(info.dropped, None, "frame seq {:?} dropped", info.seq);
        for e in &events {
            lines.push(String::from_utf8(e.json().to_vec()).unwrap());
        }
    }
    assert!(drops.is_empty(), "ops dropped: {drops:?}");
    let expected_text = std::fs::read_to_string(shared.join("corpus/expected_v1.jsonl")).unwrap();
    let expected = multiset(expected_text.lines());
    let ours = multiset(lines.iter().map(String::as_str));
    assert_eq!(expected.values().sum::<usize>(), 102);
    assert!(ours == expected, "differences:\n{}", diff(&ours, &expected));
}

#[test]
fn inspect_frames_reproduces_the_corpus() {
    let Some(shared) = shared_dir("inspect_frames_reproduces_the_corpus") else { return };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "frames"])
        .arg(shared.join("corpus/frames.bin.zst"))
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("frames 100: commit=100"), "{stderr}");
    assert!(stderr.contains("events 102: commit=102"), "{stderr}");
    assert!(stderr.contains("drops 0"), "{stderr}");
    // time_us: unique and strictly increasing, in relay order.
    let times: Vec<u64> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "time_us not strictly increasing");
    let expected_text = std::fs::read_to_string(shared.join("corpus/expected_v1.jsonl")).unwrap();
    let expected = multiset(expected_text.lines());
    let ours = multiset(stdout.lines());
    assert!(ours == expected, "differences:\n{}", diff(&ours, &expected));
}

#[derive(serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    commit: Option<CommitPart<'a>>,
}

#[derive(serde::Deserialize)]
struct CommitPart<'a> {
    #[serde(borrow)]
    record: Option<&'a serde_json::value::RawValue>,
    cid: Option<String>,
}

/// JSON → DAG-CBOR (with the encoder the test relay uses) → our transcoder gives the same bytes
/// back, and the CBOR's CID is the event's `commit.cid`.
#[test]
fn golden_records_round_trip_through_dag_cbor() {
    let Some(shared) = shared_dir("golden_records_round_trip_through_dag_cbor") else { return };
    let text = std::fs::read_to_string(shared.join("corpus/golden_v1.jsonl")).unwrap();
    let mut checked = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let parsed: Line = serde_json::from_str(line).unwrap();
        let Some(CommitPart { record: Some(raw), cid: Some(cid) }) = parsed.commit else { continue };
        let value: serde_json::Value = serde_json::from_str(raw.get()).unwrap();
        let cbor = dag_cbor(&json_to_ipld(&value));
        let mut out = Vec::new();
        RecordWriter::new().write_record(&cbor, &mut out).unwrap();
        assert_eq!(std::str::from_utf8(&out).unwrap(), raw.get());
        // Every golden record's upstream CBOR was canonical, so re-encoding it gives the same
        // CID. (A record written non-canonically upstream would differ here and only here.)
        assert_eq!(cid_to_string(&cid_of(&cbor).to_bytes()), cid, "CID of {line}");
        checked += 1;
    }
    assert_eq!(checked, 7, "golden file has 7 create/update records");
}

/// Many chunks, transcoded on every core: the output is still in relay order, each event once,
/// with strictly increasing time_us.
#[test]
fn inspect_frames_keeps_relay_order_across_threads() {
    let gen = common::frames::generate(1, 3_000, 200, 91);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frames.bin");
    std::fs::write(&path, contrail::framefile::encode_frames(gen.iter().map(|g| g.frame.as_slice()))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "frames"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let expected: Vec<(String, &str, String, String)> = gen.iter().flat_map(|g| g.expected.clone()).collect();
    let got: Vec<(String, String, String, String)> = stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_string();
            (s(&v["did"]), s(&v["kind"]), s(&v["commit"]["collection"]), s(&v["commit"]["rkey"]))
        })
        .collect();
    assert_eq!(got.len(), expected.len());
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert!(
            g.0 == e.0 && g.1 == e.1 && g.2 == e.2 && g.3 == e.3,
            "event {i}: {g:?} where the relay order has {e:?}"
        );
    }
    let times: Vec<u64> = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["time_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "time_us not strictly increasing");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("frames 3000:"), "{stderr}");
    // One thread or many: the same lines (time_us aside).
    let one = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "frames", "--threads", "1"])
        .arg(&path)
        .output()
        .unwrap();
    let strip = |text: &str| text.lines().map(without_time_us).collect::<Vec<_>>();
    assert!(strip(&String::from_utf8(one.stdout).unwrap()) == strip(&stdout), "--threads 1 printed other lines");
    // The same frames zstd-compressed: the same lines.
    let zpath = dir.path().join("frames.bin.zst");
    std::fs::write(&zpath, zstd::encode_all(&std::fs::read(&path).unwrap()[..], 3).unwrap()).unwrap();
    let z = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "frames"])
        .arg(&zpath)
        .output()
        .unwrap();
    assert!(strip(&String::from_utf8(z.stdout).unwrap()) == strip(&stdout), "the zstd file printed other lines");
    // A file that ends inside a frame: everything before it, then a failing exit that says so.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let cut = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "frames"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!cut.status.success());
    let err = String::from_utf8_lossy(&cut.stderr);
    assert!(err.contains("ends inside a frame after 2999 frames"), "{err}");
    assert_eq!(String::from_utf8(cut.stdout).unwrap().lines().count(), got.len() - gen.last().unwrap().expected.len());
}

/// A frame far over `--max-frame-bytes`: counted as dropped, not held whole in memory, and the
/// frames after it are intact.
#[test]
fn inspect_frames_drops_an_oversized_frame_and_goes_on() {
    let gen = common::frames::generate(1, 300, 20, 92);
    let mut frames: Vec<Vec<u8>> = gen.iter().map(|g| g.frame.clone()).collect();
    // Frame 100: a real commit frame padded to 3 MB (its header still reads).
    frames[100].resize(3 << 20, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("frames.bin");
    std::fs::write(&path, contrail::framefile::encode_frames(frames.iter().map(Vec::as_slice))).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_contrail"))
        .args(["inspect", "frames", "--max-frame-bytes", "100000"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("drop frame_too_large 1"), "{stderr}");
    assert!(stderr.contains("frames 300:"), "{stderr}");
    let expected: usize = gen.iter().enumerate().filter(|(i, _)| *i != 100).map(|(_, g)| g.expected.len()).sum();
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), expected);
}

/// A small zstd file whose one frame claims and really holds 1.5 GiB: `inspect frames` stays
/// within a 1 GiB address-space limit (it keeps only `--max-frame-bytes` of the frame).
#[test]
fn inspect_frames_does_not_hold_a_giant_frame() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("giant.bin.zst");
    let gen = common::frames::generate(1, 3, 2, 93);
    let mut enc = zstd::stream::Encoder::new(std::fs::File::create(&path).unwrap(), 1).unwrap();
    let giant: u32 = 3 << 29; // 1.5 GiB
    enc.write_all(&giant.to_le_bytes()).unwrap();
    enc.write_all(&gen[0].frame).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = giant as usize - gen[0].frame.len();
    while left > 0 {
        let n = left.min(zeros.len());
        enc.write_all(&zeros[..n]).unwrap();
        left -= n;
    }
    enc.write_all(&contrail::framefile::encode_frames([gen[1].frame.as_slice()])).unwrap();
    enc.finish().unwrap();
    let cmd = format!("ulimit -v 1048576; exec {} inspect frames {}", env!("CARGO_BIN_EXE_contrail"), path.display());
    let out = std::process::Command::new("bash").args(["-c", &cmd]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("frames 2:") && stderr.contains("drop frame_too_large 1"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), gen[1].expected.len());
}
