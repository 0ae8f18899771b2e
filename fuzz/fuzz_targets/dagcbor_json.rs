//! DAG-CBOR record → JSON, differential: Contrail's renderer against an independent decoder
//! (serde_ipld_dagcbor → Ipld → the atproto JSON convention). When both accept an input, the
//! JSON must be equal (as values: key order and `$link`/`$bytes` spellings normalised). When
//! only one accepts, that is a documented difference, not a failure: Contrail is stricter
//! (it refuses non-integral floats, duplicate keys, deep nesting, over-long strings, …; see
//! `RecordError`), and Contrail reads `{"$link"}`/`{"$bytes"}` maps that the generic decoder
//! leaves as maps.
#![no_main]
use contrail_core::transcode::json::RecordWriter;
use ipld_core::ipld::Ipld;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Map, Value};

fn ipld_to_json(v: &Ipld) -> Option<Value> {
    Some(match v {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => json!(b),
        Ipld::Integer(i) => json!(i64::try_from(*i).ok()?),
        // atdata turns integral floats into integers and rejects the rest.
        Ipld::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => json!(*f as i64),
        Ipld::Float(_) => return None,
        Ipld::String(s) => json!(s),
        Ipld::Bytes(b) => json!({"$bytes": data_encoding::BASE64_NOPAD.encode(b)}),
        Ipld::List(l) => Value::Array(l.iter().map(ipld_to_json).collect::<Option<_>>()?),
        Ipld::Map(m) => {
            Value::Object(m.iter().map(|(k, v)| Some((k.clone(), ipld_to_json(v)?))).collect::<Option<Map<_, _>>>()?)
        }
        Ipld::Link(c) => json!({"$link": c.to_string()}),
    })
}

/// `{"$link": s}` in its canonical CID spelling, `{"$bytes": s}` unpadded.
fn normalise(v: &mut Value) {
    match v {
        Value::Array(a) => a.iter_mut().for_each(normalise),
        Value::Object(o) => {
            if o.len() == 1 {
                if let Some(Value::String(s)) = o.get("$link") {
                    if let Ok(c) = ipld_core::cid::Cid::try_from(s.as_str()) {
                        *o.get_mut("$link").unwrap() = json!(c.to_string());
                    }
                    return;
                }
                if let Some(Value::String(s)) = o.get("$bytes") {
                    let t = s.trim_end_matches('=');
                    if let Ok(b) = data_encoding::BASE64_NOPAD.decode(t.as_bytes()) {
                        *o.get_mut("$bytes").unwrap() = json!(data_encoding::BASE64_NOPAD.encode(&b));
                    }
                    return;
                }
            }
            o.values_mut().for_each(normalise);
        }
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let ours = RecordWriter::new().write_record(data, &mut out);
    let theirs = serde_ipld_dagcbor::from_slice::<Ipld>(data).ok().and_then(|i| ipld_to_json(&i));
    if let (Ok(()), Some(mut theirs)) = (ours, theirs) {
        let mut ours: Value = serde_json::from_slice(&out).expect("Contrail's record JSON parses");
        normalise(&mut ours);
        normalise(&mut theirs);
        assert_eq!(ours, theirs, "the two decoders disagree");
    }
});
