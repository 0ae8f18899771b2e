//! Writes seed corpora for the fuzz targets into `fuzz/corpus/<target>/` from the shared
//! material (`../shared/corpus`, read in place; nothing from it is committed):
//! `cargo run --release --bin seed` (from `fuzz/`), then `cargo fuzz run <target>`.
use std::path::Path;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn main() {
    let shared = std::env::var_os("CONTRAIL_SHARED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let raw = std::fs::read(shared.join("corpus/frames.bin.zst")).expect("../shared/corpus/frames.bin.zst");
    let mut data = &zstd::decode_all(&raw[..]).unwrap()[..];
    let mut n = 0;
    while data.len() >= 4 {
        let len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
        let frame = &data[4..4 + len];
        write(&corpus.join("frame"), &format!("corpus-{n}"), frame);
        write(&corpus.join("verify"), &format!("corpus-{n}"), frame);
        // The same bytes seed the record differential: the CBOR items in a frame are records'
        // neighbours (maps, links, bytes, strings).
        write(&corpus.join("dagcbor_json"), &format!("corpus-{n}"), frame);
        data = &data[4 + len..];
        n += 1;
    }
    // Whole records for the differential: the interop data-model fixtures' CBOR.
    if let Ok(text) = std::fs::read_to_string(shared.join("interop/data-model/data-model-fixtures.json")) {
        let fixtures: serde_json::Value = serde_json::from_str(&text).unwrap();
        for (i, f) in fixtures.as_array().into_iter().flatten().enumerate() {
            let Some(b64) = f["cbor_base64"].as_str() else { continue };
            let cbor = data_encoding::BASE64_NOPAD.decode(b64.trim_end_matches('=').as_bytes()).unwrap();
            write(&corpus.join("dagcbor_json"), &format!("fixture-{i}"), &cbor);
        }
    }
    if let Ok(lines) = std::fs::read_to_string(shared.join("corpus/expected_v1.jsonl")) {
        for (i, l) in lines.lines().enumerate() {
            let mut seed = vec![(i % 4) as u8 | 0x80];
            seed.extend_from_slice(l.as_bytes());
            write(&corpus.join("event_json"), &format!("corpus-{i}"), &seed);
        }
    }
    let queries = [
        "wantedCollections=app.bsky.feed.post&wantedCollections=app.bsky.graph.*&cursor=0&compress=true",
        "wantedDids=did:plc:q6gjnaw2blty4crticxkmujt&requireHello=true&maxMessageSizeBytes=1000&includeSync=true",
        "zstdDictionary=20261125&informCursorSeconds=5",
    ];
    for (i, q) in queries.iter().enumerate() {
        write(&corpus.join("subscribe_query"), &format!("q{i}"), q.as_bytes());
    }
    let v2 = [
        "kinds=commit&kinds=sync&collections=app.bsky.feed.*&dids=did:plc:abc&cursor=1700000000000000",
        "zstdDictionary=20261125&maxMessageSizeBytes=5000",
    ];
    for (i, q) in v2.iter().enumerate() {
        write(&corpus.join("v2_query"), &format!("q{i}"), q.as_bytes());
    }
    let updates = [
        r#"{"type":"options_update","payload":{"wantedCollections":["app.bsky.feed.post","app.bsky.*"],"wantedDids":["did:plc:abc"],"maxMessageSizeBytes":100,"includeSync":true}}"#,
        r#"{"type":"options_update","payload":{}}"#,
    ];
    for (i, u) in updates.iter().enumerate() {
        write(&corpus.join("options_update"), &format!("u{i}"), u.as_bytes());
    }
    eprintln!("seeded {n} frames and the query/message targets into {}", corpus.display());
}
