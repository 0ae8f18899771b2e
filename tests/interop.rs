//! The AT Protocol interop fixtures (`../shared/interop`): data model and identifier syntax.

mod common;

use common::frames::{dag_cbor, json_to_ipld};
use common::shared_dir;
use contrail::syntax;
use contrail::transcode::cid::{cid_to_string, dag_cbor_cid_of, decode_base64_nopad};
use contrail::transcode::json::RecordWriter;
use ipld_core::ipld::Ipld;

fn render(cbor: &[u8]) -> Result<String, contrail::transcode::json::RecordError> {
    let mut out = Vec::new();
    RecordWriter::new().write_record(cbor, &mut out).map(|()| String::from_utf8(out).unwrap())
}

/// JSON encoded literally: `$link`/`$bytes` objects stay plain maps, so the transcoder sees
/// exactly what a hostile or buggy writer could put in a record.
fn literal(v: &serde_json::Value) -> Ipld {
    use serde_json::Value;
    match v {
        Value::Object(o) => Ipld::Map(o.iter().map(|(k, v)| (k.clone(), literal(v))).collect()),
        Value::Array(a) => Ipld::List(a.iter().map(literal).collect()),
        other => json_to_ipld(other),
    }
}

fn fixtures(shared: &std::path::Path, name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(shared.join("interop/data-model").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn data_model_fixtures_cbor_to_json_and_cid() {
    let Some(shared) = shared_dir("data_model_fixtures_cbor_to_json_and_cid") else { return };
    let all = fixtures(&shared, "data-model-fixtures.json");
    assert_eq!(all.len(), 3);
    for f in all {
        let b64 = f["cbor_base64"].as_str().unwrap().trim_end_matches('=');
        let cbor = decode_base64_nopad(b64.as_bytes()).unwrap();
        let json = render(&cbor).unwrap();
        let ours: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(ours, f["json"], "JSON of fixture {}", f["cid"]);
        assert_eq!(cid_to_string(&dag_cbor_cid_of(&cbor)), f["cid"].as_str().unwrap());
        // And the other way: our output, encoded again, is the same CBOR.
        assert_eq!(dag_cbor(&json_to_ipld(&ours)), cbor);
    }
}

#[test]
fn data_model_valid_and_invalid() {
    let Some(shared) = shared_dir("data_model_valid_and_invalid") else { return };
    for f in fixtures(&shared, "data-model-valid.json") {
        let cbor = dag_cbor(&json_to_ipld(&f["json"]));
        let json = render(&cbor).unwrap_or_else(|e| panic!("{}: {e}", f["note"]));
        let ours: serde_json::Value = serde_json::from_str(&json).unwrap();
        // Integral floats come out as integers, as in Jetstream v1.
        let expected: serde_json::Value = serde_json::from_str(&f["json"].to_string().replace("123.0", "123")).unwrap();
        assert_eq!(ours, expected, "{}", f["note"]);
    }
    let invalid = fixtures(&shared, "data-model-invalid.json");
    assert_eq!(invalid.len(), 12);
    for f in invalid {
        let cbor = dag_cbor(&literal(&f["json"]));
        assert!(render(&cbor).is_err(), "accepted invalid fixture: {}", f["note"]);
    }
}

fn syntax_lines(shared: &std::path::Path, name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(shared.join("interop/syntax").join(name)).unwrap();
    // Split on \n (allowing \r\n), skip empty and comment lines, never trim: leading and
    // trailing spaces are deliberate cases.
    text.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn check(shared: &std::path::Path, kind: &str, f: fn(&str) -> bool) {
    let valid = syntax_lines(shared, &format!("{kind}_syntax_valid.txt"));
    let invalid = syntax_lines(shared, &format!("{kind}_syntax_invalid.txt"));
    assert!(!valid.is_empty() && !invalid.is_empty());
    for v in &valid {
        assert!(f(v), "{kind}: rejected valid {v:?}");
    }
    for v in &invalid {
        assert!(!f(v), "{kind}: accepted invalid {v:?}");
    }
}

#[test]
fn identifier_syntax_lists() {
    let Some(shared) = shared_dir("identifier_syntax_lists") else { return };
    check(&shared, "nsid", syntax::is_valid_nsid);
    check(&shared, "did", syntax::is_valid_did);
    check(&shared, "recordkey", syntax::is_valid_record_key);
    check(&shared, "tid", syntax::is_valid_tid);
}
