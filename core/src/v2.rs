//! Jetstream v2's wire (`network.bsky.jetstream.subscribeEvents`, `xrpc.v1.json` framing): the
//! message for an event, derived once from its v1 JSON, and the v2 query parameters.
//!
//! A message is `{"$type":"message","payload":{…}}`; the payload's keys are `$type` first and
//! then alphabetical, as Jetstream v2's generated encoder writes them:
//! - `#commit`: `cid?, collection, did, operation, record?, rev, rkey, seq, time`
//! - `#identity`: `did, identity{…}, seq, time`; `#account`: `account{…}, did, seq, time`;
//!   `#sync`: `did, seq, sync{…}, time` — the inner objects are the upstream relay's event, as
//!   the v1 JSON already carries it.
//!
//! Contrail's `seq` **is** the event's `time_us`: unique, increasing, the same on every
//! replica, and ≥ 10¹⁵ — the range v2 clients already read as "a unix-µs timestamp", which
//! resumes at the first event at or after it: the same event. `time` is that instant as
//! RFC 3339 with microseconds.

use crate::event::{Event, EventKind};
use crate::options::{Filter, Kinds, OptionsError};
use crate::syntax;
use crate::transcode::json::{write_i64, write_json_str};
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The lexicon's id; payload types are `<NSID>#commit` and so on.
pub const NSID: &str = "network.bsky.jetstream.subscribeEvents";
/// Cursors below this are seqs of another server, not timestamps (v2's threshold).
pub const TIMESTAMP_CURSOR_MIN: i64 = 1_000_000_000_000_000;

#[derive(serde::Deserialize)]
struct V1<'a> {
    #[serde(borrow)]
    commit: Option<Commit<'a>>,
    #[serde(borrow)]
    identity: Option<&'a RawValue>,
    #[serde(borrow)]
    account: Option<&'a RawValue>,
    #[serde(borrow)]
    sync: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
struct Commit<'a> {
    #[serde(borrow)]
    rev: Option<Cow<'a, str>>,
    #[serde(borrow)]
    operation: Cow<'a, str>,
    #[serde(borrow)]
    collection: Cow<'a, str>,
    #[serde(borrow)]
    rkey: Cow<'a, str>,
    #[serde(borrow)]
    record: Option<&'a RawValue>,
    #[serde(borrow)]
    cid: Option<Cow<'a, str>>,
}

/// `2026-07-04T14:38:08.999123Z`: v2's `time`, always six fractional digits.
pub fn rfc3339_micros(time_us: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(time_us as i128 * 1_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// `ev`'s v2 message, built on first use and kept with the event (shared by every v2
/// subscriber).
pub fn message_of(ev: &Event) -> std::borrow::Cow<'_, [u8]> {
    ev.v2_message(message)
}

/// The v2 message for `ev`, built from its v1 JSON (which Contrail wrote, so it parses).
pub fn message(ev: &Event) -> Vec<u8> {
    let json = ev.json();
    let mut out = Vec::with_capacity(json.len() + 96);
    out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
    out.extend_from_slice(NSID.as_bytes());
    out.push(b'#');
    out.extend_from_slice(ev.kind.as_str().as_bytes());
    out.push(b'"');
    let did = ev.did();
    let Ok(v1) = serde_json::from_slice::<V1<'_>>(json) else {
        // Not reachable for events Contrail built (a replica's upstream could send odd JSON):
        // a minimal message all the same.
        seq_time(&mut out, ev.time_us);
        out.extend_from_slice(b"}}");
        return out;
    };
    let did_field = |out: &mut Vec<u8>| {
        out.extend_from_slice(b",\"did\":\"");
        out.extend_from_slice(did.as_bytes());
        out.push(b'"');
    };
    match (ev.kind, &v1) {
        (EventKind::Commit, V1 { commit: Some(c), .. }) => {
            if let Some(cid) = &c.cid {
                out.extend_from_slice(b",\"cid\":");
                write_json_str(&mut out, cid);
            }
            out.extend_from_slice(b",\"collection\":");
            write_json_str(&mut out, &c.collection);
            did_field(&mut out);
            out.extend_from_slice(b",\"operation\":");
            write_json_str(&mut out, &c.operation);
            if let Some(r) = c.record {
                out.extend_from_slice(b",\"record\":");
                out.extend_from_slice(r.get().as_bytes());
            }
            out.extend_from_slice(b",\"rev\":");
            write_json_str(&mut out, c.rev.as_deref().unwrap_or(""));
            out.extend_from_slice(b",\"rkey\":");
            write_json_str(&mut out, &c.rkey);
            seq_time(&mut out, ev.time_us);
        }
        (EventKind::Identity, V1 { identity: Some(inner), .. }) => {
            did_field(&mut out);
            out.extend_from_slice(b",\"identity\":");
            out.extend_from_slice(inner.get().as_bytes());
            seq_time(&mut out, ev.time_us);
        }
        (EventKind::Account, V1 { account: Some(inner), .. }) => {
            out.extend_from_slice(b",\"account\":");
            out.extend_from_slice(inner.get().as_bytes());
            did_field(&mut out);
            seq_time(&mut out, ev.time_us);
        }
        (EventKind::Sync, V1 { sync: Some(inner), .. }) => {
            did_field(&mut out);
            out.extend_from_slice(b",\"seq\":");
            write_i64(&mut out, ev.time_us as i64);
            out.extend_from_slice(b",\"sync\":");
            out.extend_from_slice(inner.get().as_bytes());
            out.extend_from_slice(b",\"time\":\"");
            out.extend_from_slice(rfc3339_micros(ev.time_us).as_bytes());
            out.push(b'"');
        }
        _ => {
            // v1 JSON without its kind's object (only an odd upstream sends that).
            did_field(&mut out);
            seq_time(&mut out, ev.time_us);
        }
    }
    out.extend_from_slice(b"}}");
    out
}

fn seq_time(out: &mut Vec<u8>, time_us: u64) {
    out.extend_from_slice(b",\"seq\":");
    write_i64(out, time_us as i64);
    out.extend_from_slice(b",\"time\":\"");
    out.extend_from_slice(rfc3339_micros(time_us).as_bytes());
    out.push(b'"');
}

/// An `#info` message (`OutdatedCursor`, `FutureCursor`): no seq, no time.
pub fn info_message(name: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + message.len());
    out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
    out.extend_from_slice(NSID.as_bytes());
    out.extend_from_slice(b"#info\",\"message\":");
    write_json_str(&mut out, message);
    out.extend_from_slice(b",\"name\":");
    write_json_str(&mut out, name);
    out.extend_from_slice(b"}}");
    out
}

/// An `#info OutdatedCursor` for events the log no longer held when the stream came to them:
/// those after seq `after` through seq `through`. Beyond v2, the range is also in two fields,
/// `afterSeq` and `throughSeq` (clients that do not know them ignore them), so a client can
/// take it as a position rather than read it from the text.
pub fn outdated_cursor_message(after: u64, through: u64, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160 + message.len());
    out.extend_from_slice(b"{\"$type\":\"message\",\"payload\":{\"$type\":\"");
    out.extend_from_slice(NSID.as_bytes());
    out.extend_from_slice(b"#info\",\"afterSeq\":");
    write_i64(&mut out, after as i64);
    out.extend_from_slice(b",\"message\":");
    write_json_str(&mut out, message);
    out.extend_from_slice(b",\"name\":\"OutdatedCursor\",\"throughSeq\":");
    write_i64(&mut out, through as i64);
    out.extend_from_slice(b"}}");
    out
}

/// An in-stream error frame (`ConsumerTooSlow`, `InternalError`): terminal.
pub fn error_message(name: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + message.len());
    out.extend_from_slice(b"{\"$type\":\"error\",\"error\":");
    write_json_str(&mut out, name);
    out.extend_from_slice(b",\"message\":");
    write_json_str(&mut out, message);
    out.push(b'}');
    out
}

/// A refusal before the upgrade: HTTP status, XRPC error name, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XrpcError {
    pub status: u16,
    pub name: &'static str,
    pub message: String,
}

impl XrpcError {
    pub fn invalid(message: impl Into<String>) -> XrpcError {
        XrpcError { status: 400, name: "InvalidRequest", message: message.into() }
    }

    /// `{"error":…,"message":…}`, as XRPC servers answer.
    pub fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.message.len());
        out.extend_from_slice(b"{\"error\":");
        write_json_str(&mut out, self.name);
        out.extend_from_slice(b",\"message\":");
        write_json_str(&mut out, &self.message);
        out.push(b'}');
        out
    }
}

/// What a v2 subscriber asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V2Options {
    pub filter: Filter,
    /// The raw cursor (see [`TIMESTAMP_CURSOR_MIN`]); `None`: live.
    pub cursor: Option<i64>,
    /// 0: no limit; compared with the whole uncompressed message.
    pub max_message_size: u64,
    /// Compression with this dictionary id.
    pub zstd_dictionary: Option<u32>,
}

impl V2Options {
    /// Parses the query with v2's checks and messages (`compress`/`Socket-Encoding` and
    /// `zstdDictionary` first — only `current_dictionary` is accepted, as v2 does — then
    /// filters, then the cursor's syntax).
    pub fn from_query(
        query: &str,
        socket_encoding: Option<&str>,
        current_dictionary: u32,
    ) -> Result<V2Options, XrpcError> {
        let pairs = crate::options::query_pairs(query);
        let values = |k: &str| pairs.iter().filter(|(key, _)| key == k).map(|(_, v)| v.as_str()).collect::<Vec<_>>();
        let present = |k: &str| pairs.iter().any(|(key, _)| key == k);
        if values("compress").contains(&"true") || socket_encoding.is_some_and(|h| h.contains("zstd")) {
            return Err(XrpcError::invalid(
                "compress=true / Socket-Encoding: zstd is the /subscribe (v1) opt-in; this endpoint uses zstdDictionary=<id> with the dictionary from getZstdDictionary",
            ));
        }
        let zstd_dictionary = match values("zstdDictionary").first().copied() {
            None | Some("") => None,
            Some(v) => match v.parse::<u32>() {
                Ok(id) if id > 0 && v.bytes().all(|b| b.is_ascii_digit()) => {
                    if id != current_dictionary {
                        return Err(XrpcError {
                            status: 400,
                            name: "UnknownZstdDictionary",
                            message: format!(
                                "unknown zstd dictionary id {id}; current dictionary id is {current_dictionary} (fetch it via getZstdDictionary and reconnect)"
                            ),
                        });
                    }
                    Some(id)
                }
                _ => return Err(XrpcError::invalid("zstdDictionary must be a positive integer zstd dictionary ID")),
            },
        };
        let bad = |m: String| XrpcError::invalid(format!("subscribe: invalid options: {m}"));
        if present("wantedDids") {
            return Err(bad("wantedDids is the legacy /subscribe parameter; use dids".into()));
        }
        if present("wantedCollections") {
            return Err(bad("wantedCollections is the legacy /subscribe parameter; use collections".into()));
        }
        if present("requireHello") {
            return Err(bad("requireHello is not supported on this endpoint; it is server-push only (subscriber-sourced messages were removed)".into()));
        }
        let kinds_raw = values("kinds");
        if kinds_raw.len() > 4 {
            return Err(bad(format!("too many kinds values: {} > 4", kinds_raw.len())));
        }
        let mut kinds = if kinds_raw.is_empty() { Kinds::ALL } else { Kinds::NONE };
        for k in &kinds_raw {
            let kind = EventKind::ALL
                .iter()
                .find(|e| e.as_str() == *k)
                .ok_or_else(|| bad(format!("unknown kind {k:?} (valid: commit, identity, account, sync)")))?;
            kinds = kinds.with(*kind);
        }
        let dids = values("dids");
        if dids.len() > crate::options::MAX_WANTED_DIDS {
            return Err(bad(format!("too many dids values: {} > {}", dids.len(), crate::options::MAX_WANTED_DIDS)));
        }
        let collections = values("collections");
        if collections.len() > crate::options::MAX_WANTED_COLLECTIONS {
            return Err(bad(format!(
                "too many collections values: {} > {}",
                collections.len(),
                crate::options::MAX_WANTED_COLLECTIONS
            )));
        }
        for d in &dids {
            if !syntax::is_valid_did(d) {
                return Err(bad(format!("invalid DID: {d}")));
            }
        }
        for c in &collections {
            match c.strip_suffix(".*") {
                // v2 validates the head of a wildcard: `head.x` must be an NSID.
                Some(head) if !syntax::is_valid_nsid(&format!("{head}.x")) => {
                    return Err(bad(format!("invalid collection wildcard: {c}")))
                }
                Some(_) => {}
                None if !syntax::is_valid_nsid(c) => return Err(bad(format!("invalid collection: {c}"))),
                None => {}
            }
        }
        if !collections.is_empty() && !kinds_raw.is_empty() && !kinds.contains(EventKind::Commit) {
            return Err(bad("collections filter can never apply: kinds excludes commit".into()));
        }
        let max_message_size = match values("maxMessageSizeBytes").as_slice() {
            [] => 0,
            [v] if !v.is_empty() => {
                v.parse::<u32>()
                    .ok()
                    .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(|| bad(format!("invalid maxMessageSizeBytes {v:?}")))? as u64
            }
            _ => return Err(bad("maxMessageSizeBytes must be one unsigned 32-bit integer".into())),
        };
        let owned = |v: Vec<&str>| v.into_iter().map(str::to_string).collect::<Vec<_>>();
        let filter =
            Filter::new(&owned(collections), &owned(dids)).map_err(|OptionsError(m)| bad(m))?.with_kinds(kinds);
        let cursor = match values("cursor").first().copied() {
            None | Some("") => None,
            Some(v) => {
                let c =
                    v.parse::<i64>().map_err(|_| XrpcError::invalid(format!("subscribe: invalid cursor: {v:?}")))?;
                if c < 0 {
                    return Err(XrpcError::invalid(format!("subscribe: invalid cursor: negative value {c}")));
                }
                Some(c)
            }
        };
        Ok(V2Options { filter, cursor, max_message_size, zstd_dictionary })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, tail: &str, collection: Option<&str>) -> Event {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:test", kind);
        let at = out.len();
        out.extend_from_slice(tail.as_bytes());
        let coll = collection.map(|c| {
            let s = at + tail.find(c).unwrap();
            s..s + c.len()
        });
        let mut e = Event::from_parts(out, kind, 12, coll.unwrap_or(0..0));
        e.stamp(1_700_000_000_000_000);
        e
    }

    #[test]
    fn messages_have_v2_keys_in_v2_order() {
        let c = event(
            EventKind::Commit,
            r#","commit":{"rev":"3lXrev","operation":"create","collection":"app.bsky.feed.post","rkey":"abcd1234","record":{"$type":"app.bsky.feed.post","text":"hi \u003c3"},"cid":"bafyreigbtj4x7ip5legnfznufuopl4sg4knzc2cof6duas4b3q2fy6swua"}}"#,
            Some("app.bsky.feed.post"),
        );
        assert_eq!(
            String::from_utf8(message_of(&c).to_vec()).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","cid":"bafyreigbtj4x7ip5legnfznufuopl4sg4knzc2cof6duas4b3q2fy6swua","collection":"app.bsky.feed.post","did":"did:plc:test","operation":"create","record":{"$type":"app.bsky.feed.post","text":"hi \u003c3"},"rev":"3lXrev","rkey":"abcd1234","seq":1700000000000000,"time":"2023-11-14T22:13:20.000000Z"}}"#
        );
        let d = event(
            EventKind::Commit,
            r#","commit":{"rev":"3m","operation":"delete","collection":"app.bsky.feed.like","rkey":"3ms"}}"#,
            Some("app.bsky.feed.like"),
        );
        assert_eq!(
            String::from_utf8(message_of(&d).to_vec()).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","collection":"app.bsky.feed.like","did":"did:plc:test","operation":"delete","rev":"3m","rkey":"3ms","seq":1700000000000000,"time":"2023-11-14T22:13:20.000000Z"}}"#
        );
        let i = event(
            EventKind::Identity,
            r#","identity":{"did":"did:plc:test","seq":99,"time":"2026-05-25T00:00:00Z"}}"#,
            None,
        );
        assert_eq!(
            String::from_utf8(message_of(&i).to_vec()).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#identity","did":"did:plc:test","identity":{"did":"did:plc:test","seq":99,"time":"2026-05-25T00:00:00Z"},"seq":1700000000000000,"time":"2023-11-14T22:13:20.000000Z"}}"#
        );
        let a = event(
            EventKind::Account,
            r#","account":{"active":true,"did":"did:plc:test","seq":100,"time":"2026-05-25T00:00:01Z"}}"#,
            None,
        );
        assert_eq!(
            String::from_utf8(message_of(&a).to_vec()).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#account","account":{"active":true,"did":"did:plc:test","seq":100,"time":"2026-05-25T00:00:01Z"},"did":"did:plc:test","seq":1700000000000000,"time":"2023-11-14T22:13:20.000000Z"}}"#
        );
        let s = event(
            EventKind::Sync,
            r#","sync":{"blocks":{"$bytes":"AQID"},"did":"did:plc:test","rev":"rev-sync","seq":444,"time":"2026-05-25T00:00:00Z"}}"#,
            None,
        );
        assert_eq!(
            String::from_utf8(message_of(&s).to_vec()).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#sync","did":"did:plc:test","seq":1700000000000000,"sync":{"blocks":{"$bytes":"AQID"},"did":"did:plc:test","rev":"rev-sync","seq":444,"time":"2026-05-25T00:00:00Z"},"time":"2023-11-14T22:13:20.000000Z"}}"#
        );
        assert_eq!(rfc3339_micros(1_783_175_888_085_434), "2026-07-04T14:38:08.085434Z");
        assert_eq!(
            String::from_utf8(info_message("OutdatedCursor", "m")).unwrap(),
            r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","message":"m","name":"OutdatedCursor"}}"#
        );
        let gap: serde_json::Value = serde_json::from_slice(&outdated_cursor_message(5, 9, "m")).unwrap();
        assert_eq!(
            gap,
            serde_json::json!({"$type": "message", "payload": {"$type": format!("{NSID}#info"), "afterSeq": 5,
                "message": "m", "name": "OutdatedCursor", "throughSeq": 9}})
        );
    }

    #[test]
    fn v2_parameters_and_their_named_errors() {
        let err = |q: &str| V2Options::from_query(q, None, 20_261_125).unwrap_err();
        assert_eq!(
            err("wantedDids=did:plc:x").message,
            "subscribe: invalid options: wantedDids is the legacy /subscribe parameter; use dids"
        );
        assert!(err("requireHello=false").message.contains("requireHello is not supported"));
        assert_eq!(
            err("kinds=nope").message,
            r#"subscribe: invalid options: unknown kind "nope" (valid: commit, identity, account, sync)"#
        );
        assert_eq!(err("collections=app.*").message, "subscribe: invalid options: invalid collection wildcard: app.*");
        assert_eq!(
            err("collections=app.bsky.fo*").message,
            "subscribe: invalid options: invalid collection: app.bsky.fo*"
        );
        assert_eq!(
            err("kinds=identity&collections=app.bsky.feed.post").message,
            "subscribe: invalid options: collections filter can never apply: kinds excludes commit"
        );
        assert_eq!(
            err("maxMessageSizeBytes=-1").message,
            r#"subscribe: invalid options: invalid maxMessageSizeBytes "-1""#
        );
        assert_eq!(err("zstdDictionary=0").message, "zstdDictionary must be a positive integer zstd dictionary ID");
        assert_eq!(err("zstdDictionary=+5").name, "InvalidRequest");
        assert_eq!(err("zstdDictionary=7&kinds=bogus").name, "UnknownZstdDictionary", "checked before the filters");
        assert_eq!(err("compress=true").name, "InvalidRequest");
        assert_eq!(err("cursor=abc").message, r#"subscribe: invalid cursor: "abc""#);
        assert_eq!(err("cursor=-5").message, "subscribe: invalid cursor: negative value -5");
        assert_eq!(
            String::from_utf8(err("cursor=-5").body()).unwrap(),
            r#"{"error":"InvalidRequest","message":"subscribe: invalid cursor: negative value -5"}"#
        );
        let o = V2Options::from_query("kinds=commit&kinds=sync&collections=app.bsky.*&dids=did:plc:test&cursor=1700000000000000&zstdDictionary=20261125", None, 20_261_125).unwrap();
        assert_eq!((o.cursor, o.zstd_dictionary), (Some(1_700_000_000_000_000), Some(20_261_125)));
        assert!(o.filter.matches(EventKind::Sync, "did:plc:test", None), "collections never drop sync");
        assert!(!o.filter.matches(EventKind::Identity, "did:plc:test", None), "kinds");
        assert!(!o.filter.matches(EventKind::Commit, "did:plc:other", Some("app.bsky.feed.post")));
        assert!(
            V2Options::from_query("", None, 1).unwrap().filter.matches(EventKind::Sync, "did:plc:x", None),
            "all kinds by default"
        );
    }
}
