//! Subscriber options: the `/subscribe` query string and `options_update` messages, validated
//! exactly as Jetstream v1 does (spec/jetstream.md §1.2–§1.4, §2), and the filter they build.

use crate::event::EventKind;
use crate::syntax;
use std::collections::HashSet;

/// Most `wantedCollections` entries (v1: prefixes plus unique full NSIDs).
pub const MAX_WANTED_COLLECTIONS: usize = 100;
/// Most unique `wantedDids`.
pub const MAX_WANTED_DIDS: usize = 10_000;
/// `informCursorSeconds` range.
pub const INFORM_CURSOR_RANGE: std::ops::RangeInclusive<u64> = 1..=600;

/// A 400 before the upgrade, or a 1008 close after it; the text is the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionsError(pub String);

/// A set of event kinds, one bit per [`EventKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    /// What a v1 client gets unless it asks for more: every kind but `sync`.
    pub const V1_DEFAULT: Kinds =
        Kinds(1 << EventKind::Commit as u8 | 1 << EventKind::Identity as u8 | 1 << EventKind::Account as u8);
    pub const ALL: Kinds = Kinds(Self::V1_DEFAULT.0 | 1 << EventKind::Sync as u8);
    pub const NONE: Kinds = Kinds(0);

    pub fn contains(self, kind: EventKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    pub fn with(self, kind: EventKind) -> Kinds {
        Kinds(self.0 | 1 << kind as u8)
    }

    pub fn without(self, kind: EventKind) -> Kinds {
        Kinds(self.0 & !(1 << kind as u8))
    }
}

/// Which events a subscriber wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// Which kinds pass at all.
    kinds: Kinds,
    /// `None`: every collection.
    collections: Option<HashSet<String>>,
    /// `app.bsky.feed.*` is kept as the prefix `app.bsky.feed.`.
    prefixes: Vec<String>,
    /// `None`: every DID.
    dids: Option<HashSet<String>>,
}

impl Default for Filter {
    /// Everything a v1 client gets by default.
    fn default() -> Self {
        Filter { kinds: Kinds::V1_DEFAULT, collections: None, prefixes: Vec::new(), dids: None }
    }
}

/// Consistent with `==`, which compares the sets whatever their order: each set is hashed as
/// the sum of its members' hashes, keyed per process (so collisions cannot be prepared
/// offline). Replays share work between subscribers with equal filters by this hash.
impl std::hash::Hash for Filter {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> = std::sync::OnceLock::new();
        fn set_hash(set: &Option<HashSet<String>>) -> Option<u64> {
            use std::hash::BuildHasher;
            let keys = KEYS.get_or_init(Default::default);
            set.as_ref().map(|s| s.iter().fold(0u64, |sum, m| sum.wrapping_add(keys.hash_one(m))))
        }
        self.kinds.0.hash(h);
        set_hash(&self.collections).hash(h);
        self.prefixes.hash(h);
        set_hash(&self.dids).hash(h);
    }
}

impl Filter {
    /// The same filter passing `kinds`.
    pub fn with_kinds(mut self, kinds: Kinds) -> Filter {
        self.kinds = kinds;
        self
    }

    pub fn kinds(&self) -> Kinds {
        self.kinds
    }

    /// The wanted DIDs; `None`: every DID.
    pub fn dids(&self) -> Option<&HashSet<String>> {
        self.dids.as_ref()
    }

    /// The wanted full collection NSIDs; `None`: every collection (then there are no prefixes).
    pub fn collections(&self) -> Option<&HashSet<String>> {
        self.collections.as_ref()
    }

    /// The wanted collection prefixes, each ending in `.` (`app.bsky.feed.*` → `app.bsky.feed.`).
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// About how much heap the filter holds: its strings and its sets' tables (for budgets
    /// that keep filters alive, such as kept replay pages).
    pub fn heap_bytes(&self) -> usize {
        fn set_bytes(set: &Option<HashSet<String>>) -> usize {
            set.as_ref().map_or(0, |s| {
                // A table slot per capacity (the String and a control byte), and each string.
                s.capacity() * (std::mem::size_of::<String>() + 1) + s.iter().map(String::capacity).sum::<usize>()
            })
        }
        set_bytes(&self.collections)
            + set_bytes(&self.dids)
            + self.prefixes.capacity() * std::mem::size_of::<String>()
            + self.prefixes.iter().map(String::capacity).sum::<usize>()
    }

    /// Builds a filter from raw values, with v1's validation and messages. O(n) in the input,
    /// stopping at the first limit crossed: a 10 MB `options_update` costs one pass over it.
    /// The collections are judged first, then the DIDs.
    pub fn new(collections: &[String], dids: &[String]) -> Result<Filter, OptionsError> {
        let mut b = FilterBuilder::default();
        collections.iter().try_for_each(|c| b.collection(c))?;
        dids.iter().try_for_each(|d| b.did(d))?;
        Ok(b.build())
    }

    /// Identity and account events (no collection) bypass `wantedCollections` but not
    /// `wantedDids`, as in v1.
    pub fn matches(&self, kind: EventKind, did: &str, collection: Option<&str>) -> bool {
        if !self.kinds.contains(kind) {
            return false;
        }
        if let Some(dids) = &self.dids {
            if !dids.contains(did) {
                return false;
            }
        }
        let Some(set) = &self.collections else { return true };
        match (kind, collection) {
            (EventKind::Commit, Some(c)) => set.contains(c) || self.prefixes.iter().any(|p| c.starts_with(p.as_str())),
            _ => true,
        }
    }
}

/// Builds a [`Filter`] one value at a time, with v1's validation and messages: what
/// [`Filter::new`] and an `options_update` read as it is parsed share. A repeat adds nothing,
/// so the builder holds at most the caps' worth of distinct values whatever the input's length.
#[derive(Default)]
pub struct FilterBuilder {
    /// Full NSIDs, and the heads of `.*` prefixes in their first order; `None` until the first.
    collections: Option<(HashSet<String>, HashSet<String>, Vec<String>)>,
    dids: Option<HashSet<String>>,
}

impl FilterBuilder {
    /// Adds one `wantedCollections` value.
    pub fn collection(&mut self, c: &str) -> Result<(), OptionsError> {
        let (set, heads, prefixes) = self.collections.get_or_insert_with(Default::default);
        if let Some(head) = c.strip_suffix('*').filter(|h| h.ends_with('.')) {
            // v1 parity: the head of a `.*` prefix is not validated.
            if !heads.contains(head) {
                heads.insert(head.to_string());
                prefixes.push(head.to_string());
            }
        } else if syntax::is_valid_nsid(c) {
            if !set.contains(c) {
                set.insert(c.to_string());
            }
        } else {
            return Err(OptionsError(format!("invalid subscriber options: invalid collection: {c}")));
        }
        if set.len() + prefixes.len() > MAX_WANTED_COLLECTIONS {
            return Err(OptionsError("invalid subscriber options: too many wanted collections".into()));
        }
        Ok(())
    }

    /// Adds one `wantedDids` value.
    pub fn did(&mut self, d: &str) -> Result<(), OptionsError> {
        // A DID that does not parse is refused: it must never widen the filter.
        if !syntax::is_valid_did(d) {
            return Err(OptionsError(format!("invalid subscriber options: invalid DID: {d}")));
        }
        let set = self.dids.get_or_insert_with(HashSet::new);
        if !set.contains(d) {
            set.insert(d.to_string());
        }
        if set.len() > MAX_WANTED_DIDS {
            return Err(OptionsError("invalid subscriber options: too many wanted DIDs".into()));
        }
        Ok(())
    }

    pub fn build(self) -> Filter {
        let mut f = Filter::default();
        if let Some((set, _, prefixes)) = self.collections {
            (f.collections, f.prefixes) = (Some(set), prefixes);
        }
        if let Some(mut set) = self.dids {
            // Sized for what it holds: 10,000 copies of one DID must not keep 10,000 slots (a
            // filter's bytes count against --max-filter-bytes).
            set.shrink_to_fit();
            f.dids = Some(set);
        }
        f
    }
}

/// Everything a subscriber asked for in its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeOptions {
    pub filter: Filter,
    /// Unix µs, inclusive; `None` for live.
    pub cursor: Option<i64>,
    pub compress: bool,
    pub require_hello: bool,
    /// 0: no limit. Compared with the uncompressed JSON length (v1 compared compressed).
    pub max_message_size: u64,
    /// Beyond v1: send `{"kind":"cursor","time_us":T,"live":L}` every N seconds.
    pub inform_cursor_seconds: Option<u64>,
    /// The zstd dictionary id to compress with (v2's `zstdDictionary`); implies `compress`.
    /// `None`: the server's default.
    pub zstd_dictionary: Option<u32>,
    /// Beyond v1: add `"verification":"…"` to each event (what `--verify` showed about it).
    pub include_verification: bool,
}

/// `true`/`false` as v1 reads booleans (anything but `true` is false).
fn is_true(v: &str) -> bool {
    v == "true"
}

/// Percent-decodes a query component (`+` is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                // Two hex digits (`from_str_radix` alone would take `+4`).
                let hex = Some(&b[i + 1..i + 3])
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value` pairs of a query string, decoded, in order.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(kv), String::new()),
        })
        .collect()
}

/// v1's `maxMessageSizeBytes`: empty, non-integer and negative become 0; values past u32 are
/// 0 too (v1 wrapped them modulo 2^32, a bug; v2 maps overflow to 0).
pub fn parse_max_message_size(raw: &str) -> u64 {
    match raw.parse::<i64>() {
        Ok(n) if n > 0 && n <= u32::MAX as i64 => n as u64,
        _ => 0,
    }
}

fn parse_inform(raw: &str) -> Result<u64, OptionsError> {
    raw.parse::<u64>()
        .ok()
        .filter(|n| INFORM_CURSOR_RANGE.contains(n))
        .ok_or_else(|| OptionsError(format!("invalid informCursorSeconds: {raw} (must be 1 to 600)")))
}

impl SubscribeOptions {
    /// Parses the query string; `socket_encoding` is the `Socket-Encoding` header, if any.
    pub fn from_query(query: &str, socket_encoding: Option<&str>) -> Result<Self, OptionsError> {
        let (mut collections, mut dids) = (Vec::new(), Vec::new());
        let mut o = SubscribeOptions {
            filter: Filter::default(),
            cursor: None,
            compress: socket_encoding.is_some_and(|h| h.contains("zstd")),
            require_hello: false,
            max_message_size: 0,
            inform_cursor_seconds: None,
            zstd_dictionary: None,
            include_verification: false,
        };
        let mut include_sync = false;
        // v1 reads the first value of a parameter (Go's `Query().Get`); only the wanted lists
        // take every value.
        let mut seen = HashSet::new();
        for (k, v) in query_pairs(query) {
            if k != "wantedCollections" && k != "wantedDids" && !seen.insert(k.clone()) {
                continue;
            }
            match k.as_str() {
                "wantedCollections" => collections.push(v),
                "wantedDids" => dids.push(v),
                "cursor" if v.is_empty() => {}
                "cursor" => {
                    o.cursor = Some(v.parse::<i64>().map_err(|_| OptionsError(format!("invalid cursor: {v}")))?)
                }
                "compress" => o.compress |= v == "true",
                "requireHello" => o.require_hello = v == "true",
                "maxMessageSizeBytes" => o.max_message_size = parse_max_message_size(&v),
                "informCursorSeconds" => o.inform_cursor_seconds = Some(parse_inform(&v)?),
                // Beyond v1: `#sync` events (Sync 1.1) for clients that ask.
                "includeSync" => include_sync = is_true(&v),
                "includeVerification" => o.include_verification = is_true(&v),
                "zstdDictionary" => {
                    let id = v.parse::<u32>().map_err(|_| OptionsError(format!("invalid zstdDictionary: {v}")))?;
                    o.zstd_dictionary = Some(id);
                    o.compress = true;
                }
                _ => {}
            }
        }
        let kinds = if include_sync { Kinds::ALL } else { Kinds::V1_DEFAULT };
        o.filter = Filter::new(&collections, &dids)?.with_kinds(kinds);
        Ok(o)
    }
}

/// What an accepted `options_update` changes.
#[derive(Debug)]
pub struct Update {
    pub filter: Filter,
    pub max_message_size: u64,
    /// `Some(None)`: turn off; `None`: leave as is.
    pub inform_cursor_seconds: Option<Option<u64>>,
    /// `None`: leave as is.
    pub include_sync: Option<bool>,
}

/// Why a client message is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// Not the JSON v1 reads (a 1007 close); the text is the reason.
    Json(String),
    /// Options v1 refuses (a 1008 close).
    Options(OptionsError),
}

/// Reads a client's text message as Jetstream v1 does (spec/jetstream.md §2): `Ok(None)` for
/// a message it ignores (any `type` but `options_update`, or none), else the update.
///
/// Read as Go's `encoding/json` reads it into v1's structs, so what a v1 client sends means
/// the same here: member names match ignoring ASCII case (`wantedDIDs` is `wantedDids`, not an
/// unknown member that would drop the DID filter), a repeated member replaces the earlier one,
/// and `null` leaves a field unset (so `{}` or `null` is an ignored message, a `null` payload
/// resets the filters). A missing payload is `{}` too (v1 refused it as empty JSON).
///
/// One pass, holding no more than the message and the filter it builds: the wanted lists are
/// read value by value into a [`FilterBuilder`] (no list of 2.5 million one-letter strings
/// from a 10 MB message); past the first refused value, the rest is only checked to be JSON.
pub fn parse_client_message(text: &str) -> Result<Option<Update>, MessageError> {
    let envelope = |e: serde_json::Error| MessageError::Json(format!("failed to parse subscriber message: {e}"));
    let envelope_members = [("type", OnNull::Skipped), ("payload", OnNull::Kept)];
    let Some([kind, payload]) = members(text, envelope_members).map_err(envelope)? else { return Ok(None) };
    let kind: Option<String> = json_value(kind).map_err(envelope)?;
    if kind.as_deref() != Some("options_update") {
        return Ok(None);
    }
    let bad_payload = |e: serde_json::Error| MessageError::Json(format!("failed to parse options_update payload: {e}"));
    // Go sets a list to nil on `null` and leaves a number or a bool as it was.
    let names = [
        ("wantedCollections", OnNull::Kept),
        ("wantedDids", OnNull::Kept),
        ("maxMessageSizeBytes", OnNull::Skipped),
        ("informCursorSeconds", OnNull::Skipped),
        ("includeSync", OnNull::Skipped),
    ];
    let fields = match payload {
        Some(p) => members(p.get(), names).map_err(bad_payload)?.unwrap_or_default(),
        None => Default::default(),
    };
    let [collections, dids, max_size, inform, include_sync] = fields;
    // Every member is JSON of the right type, or the message is refused as JSON (1007), as
    // v1 would fail to unmarshal it; only then are the filter's values judged (1008).
    // (Go reads `-0` as the integer 0; serde_json as a float.)
    let max_size: Option<i64> = match max_size {
        Some(raw) if raw.get().trim() == "-0" => Some(0),
        raw => json_value(raw).map_err(bad_payload)?,
    };
    let inform: Option<u64> = json_value(inform).map_err(bad_payload)?;
    let include_sync: Option<bool> = json_value(include_sync).map_err(bad_payload)?;
    let mut builder = FilterBuilder::default();
    let mut refused = None;
    // The collections are judged before the DIDs, as in `Filter::new`.
    for (raw, add) in [
        (collections, FilterBuilder::collection as fn(&mut FilterBuilder, &str) -> Result<(), OptionsError>),
        (dids, FilterBuilder::did),
    ] {
        if let Some(raw) = raw {
            let into = IntoBuilder { builder: &mut builder, add, refused: &mut refused };
            serde::de::DeserializeSeed::deserialize(into, &mut serde_json::Deserializer::from_str(raw.get()))
                .map_err(bad_payload)?;
        }
    }
    if let Some(e) = refused {
        return Err(MessageError::Options(e));
    }
    let max_message_size = max_size.map(|n| parse_max_message_size(&n.to_string())).unwrap_or(0);
    let inform_cursor_seconds = match inform {
        None => None,
        Some(0) => Some(None),
        Some(n) => Some(Some(parse_inform(&n.to_string()).map_err(MessageError::Options)?)),
    };
    Ok(Some(Update { filter: builder.build(), max_message_size, inform_cursor_seconds, include_sync }))
}

use serde_json::value::RawValue;

/// A member's value; `None` when absent or `null` (Go leaves the field as it was).
fn json_value<'a, T: serde::Deserialize<'a>>(raw: Option<&'a RawValue>) -> serde_json::Result<Option<T>> {
    raw.map(|r| serde_json::from_str::<Option<T>>(r.get())).transpose().map(Option::flatten)
}

/// What a member whose value is `null` does to what an earlier member of that name gave, as
/// Go's decoder does to the field.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnNull {
    /// Replaces it (Go: a slice becomes nil, a raw message holds `null`).
    Kept,
    /// Leaves it (Go: a string, a number or a bool is left as it was).
    Skipped,
}

/// The members of a JSON object named `names` (ignoring ASCII case; a later one replaces an
/// earlier one, a `null` as [`OnNull`] says), borrowed; other members are read and dropped.
/// `None` for JSON `null`.
fn members<'a, const N: usize>(
    json: &'a str,
    names: [(&'static str, OnNull); N],
) -> serde_json::Result<Option<[Option<&'a RawValue>; N]>> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Object<const N: usize>([(&'static str, OnNull); N]);
    /// A member's name, as its index in the names (no copy of the name is kept).
    struct Name<'n>(&'n [(&'static str, OnNull)]);
    impl<'de> DeserializeSeed<'de> for Name<'_> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl Visitor<'_> for Name<'_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Option<usize>, E> {
            Ok(self.0.iter().position(|(n, _)| n.eq_ignore_ascii_case(v)))
        }
    }
    impl<'de, const N: usize> Visitor<'de> for Object<N> {
        type Value = Option<[Option<&'de RawValue>; N]>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = [None; N];
            while let Some(at) = map.next_key_seed(Name(&self.0))? {
                match at {
                    Some(i) => {
                        let value = map.next_value::<&'de RawValue>()?;
                        if value.get() != "null" || self.0[i].1 == OnNull::Kept {
                            found[i] = Some(value);
                        }
                    }
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(Some(found))
        }
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let found = de.deserialize_any(Object(names))?;
    de.end()?;
    Ok(found)
}

/// Reads a JSON list of strings (or `null`) into a [`FilterBuilder`], one value at a time;
/// after the first value it refuses (kept in `refused`), the rest is only read.
struct IntoBuilder<'b> {
    builder: &'b mut FilterBuilder,
    add: fn(&mut FilterBuilder, &str) -> Result<(), OptionsError>,
    refused: &'b mut Option<OptionsError>,
}

impl<'de> serde::de::DeserializeSeed<'de> for IntoBuilder<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for IntoBuilder<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of strings")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        /// One string, handed to `add` as read (borrowed where it has no escapes); `null` is
        /// the empty string, as Go leaves a string it cannot set (and v1 refuses it as a value).
        struct Value<'v, 'b>(&'v mut IntoBuilder<'b>);
        impl<'de> serde::de::DeserializeSeed<'de> for Value<'_, '_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }
        impl serde::de::Visitor<'_> for Value<'_, '_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
                self.visit_str("")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
                let into = &mut *self.0;
                if into.refused.is_none() {
                    if let Err(e) = (into.add)(into.builder, v) {
                        *into.refused = Some(e);
                    }
                }
                Ok(())
            }
        }
        let mut this = self;
        while seq.next_element_seed(Value(&mut this))?.is_some() {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:q6gjnaw2blty4crticxkmujt";

    #[test]
    fn equal_filters_hash_alike_whatever_their_order() {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let hash = |f: &Filter| state.hash_one(f);
        let dids = ["did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".to_string(), "did:plc:bbbbbbbbbbbbbbbbbbbbbbbb".to_string()];
        let colls = ["app.bsky.feed.post".to_string(), "app.bsky.feed.like".to_string()];
        let a = Filter::new(&colls, &dids).unwrap();
        let b = Filter::new(&[colls[1].clone(), colls[0].clone()], &[dids[1].clone(), dids[0].clone()]).unwrap();
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        let c = Filter::new(&colls[..1], &dids).unwrap();
        assert_ne!(hash(&a), hash(&c));
        assert_ne!(hash(&Filter::default()), hash(&Filter::default().with_kinds(Kinds::ALL)));
    }

    #[test]
    fn filters_match_like_v1() {
        let f = Filter::new(&["app.bsky.feed.post".into(), "app.bsky.graph.*".into()], &[]).unwrap();
        assert!(f.matches(EventKind::Commit, DID, Some("app.bsky.feed.post")));
        assert!(f.matches(EventKind::Commit, DID, Some("app.bsky.graph.follow")));
        assert!(!f.matches(EventKind::Commit, DID, Some("app.bsky.feed.like")));
        assert!(f.matches(EventKind::Identity, DID, None), "identity bypasses wantedCollections");
        let f = Filter::new(&[], &[DID.into()]).unwrap();
        assert!(!f.matches(EventKind::Account, "did:plc:other", None), "but not wantedDids");
        assert!(f.matches(EventKind::Account, DID, None));
        assert!(!f.matches(EventKind::Sync, DID, None), "v1 clients get no sync unless they ask");
        let f = f.with_kinds(Kinds::ALL);
        assert!(f.matches(EventKind::Sync, DID, None));
        let o = SubscribeOptions::from_query("includeSync=true&wantedCollections=app.bsky.feed.post", None).unwrap();
        assert!(o.filter.matches(EventKind::Sync, DID, None), "sync bypasses wantedCollections");
    }

    #[test]
    fn client_messages_are_read_as_go_reads_them_into_v1s_structs() {
        let read = |m: &str| parse_client_message(m);
        let dids = |u: Update| u.filter.dids().map(|d| d.iter().cloned().collect::<Vec<_>>());
        // Ignored: no type, another type, `null`.
        for m in ["{}", "null", r#"{"type":null}"#, r#"{"type":"hello","payload":5}"#, r#"{"kind":"options_update"}"#] {
            assert_eq!(read(m).map(|u| u.is_some()), Ok(false), "{m}");
        }
        // Names match ignoring ASCII case; a later member replaces an earlier one.
        let u = read(&format!(r#"{{"TYPE":"options_update","Payload":{{"wantedDIDs":["{DID}"]}}}}"#)).unwrap();
        assert_eq!(dids(u.unwrap()), Some(vec![DID.to_string()]));
        let m =
            format!(r#"{{"type":"options_update","payload":{{"wantedDids":["did:plc:x"],"wanteddids":["{DID}"]}}}}"#);
        assert_eq!(dids(read(&m).unwrap().unwrap()), Some(vec![DID.to_string()]));
        // No payload, a `null` one, `null` lists: every filter off.
        for m in [
            r#"{"type":"options_update"}"#,
            r#"{"type":"options_update","payload":null}"#,
            r#"{"type":"options_update","payload":{"wantedDids":null,"wantedCollections":[]}}"#,
        ] {
            let u = read(m).unwrap().unwrap();
            assert_eq!(u.filter, Filter::default(), "{m}");
        }
        // Not the JSON v1 reads: a 1007.
        for m in [
            "[1]",
            "not json",
            r#"{"type":5}"#,
            r#"{"type":"options_update"} x"#,
            r#"{"type":"options_update","payload":[]}"#,
            r#"{"type":"options_update","payload":{"wantedDids":"did:plc:x"}}"#,
            r#"{"type":"options_update","payload":{"wantedDids":[1]}}"#,
            r#"{"type":"options_update","payload":{"maxMessageSizeBytes":1.5}}"#,
        ] {
            assert!(matches!(read(m), Err(MessageError::Json(_))), "{m}: {:?}", read(m));
        }
        // Values v1 refuses: a 1008 with v1's reason; the collections are judged first, as in
        // `Filter::new`, and a refused value ends the judging (the rest must still be strings).
        let m = r#"{"type":"options_update","payload":{"wantedDids":["nope"],"wantedCollections":["bad!"]}}"#;
        let refused =
            MessageError::Options(OptionsError("invalid subscriber options: invalid collection: bad!".into()));
        assert_eq!(read(m).unwrap_err(), refused);
        let m = r#"{"type":"options_update","payload":{"wantedDids":["nope",5]}}"#;
        assert!(matches!(read(m), Err(MessageError::Json(_))));
        // `null` as Go reads it: in a list, the empty string (an invalid DID); for a number or
        // the type, nothing (an earlier value stays); for a list, no list.
        let m = r#"{"type":"options_update","payload":{"wantedDids":[null]}}"#;
        let invalid = MessageError::Options(OptionsError("invalid subscriber options: invalid DID: ".into()));
        assert_eq!(read(m).unwrap_err(), invalid);
        let m =
            r#"{"type":"options_update","type":null,"payload":{"maxMessageSizeBytes":5,"maxMessageSizeBytes":null}}"#;
        assert_eq!(read(m).unwrap().unwrap().max_message_size, 5);
        let m = r#"{"type":"options_update","payload":{"maxMessageSizeBytes":5,"maxMessageSizeBytes":-0}}"#;
        assert_eq!(read(m).unwrap().unwrap().max_message_size, 0, "Go reads -0 as an integer");
        let m = format!(r#"{{"type":"options_update","payload":{{"wantedDids":["{DID}"],"wantedDids":null}}}}"#);
        assert_eq!(read(&m).unwrap().unwrap().filter, Filter::default());
        let m = r#"{"type":"options_update","payload":{"informCursorSeconds":601}}"#;
        assert!(matches!(read(m), Err(MessageError::Options(_))));
        // The same filter as from the query string, values repeated or not.
        let c = ["app.bsky.feed.post", "app.bsky.graph.*", "app.bsky.feed.post"];
        let m = format!(
            r#"{{"type":"options_update","payload":{{"wantedCollections":{},"wantedDids":["{DID}","{DID}"],"maxMessageSizeBytes":-3}}}}"#,
            serde_json::to_string(&c).unwrap()
        );
        let u = read(&m).unwrap().unwrap();
        let c: Vec<String> = c.iter().map(|s| s.to_string()).collect();
        assert_eq!(u.filter, Filter::new(&c, &[DID.into(), DID.into()]).unwrap());
        assert_eq!(u.max_message_size, 0);
        // A list of repeats holds one value while it is read, however long.
        let many = vec![DID; 200_000];
        let m = format!(
            r#"{{"type":"options_update","payload":{{"wantedDids":{}}}}}"#,
            serde_json::to_string(&many).unwrap()
        );
        assert_eq!(dids(read(&m).unwrap().unwrap()).map(|d| d.len()), Some(1));
        // Past the cap of distinct values: refused, as from the query string.
        let distinct: Vec<String> = (0..=MAX_WANTED_DIDS).map(|i| format!("did:plc:{i:0>24}")).collect();
        let m = format!(
            r#"{{"type":"options_update","payload":{{"wantedDids":{}}}}}"#,
            serde_json::to_string(&distinct).unwrap()
        );
        assert_eq!(read(&m).unwrap_err(), MessageError::Options(Filter::new(&[], &distinct).unwrap_err()));
    }

    #[test]
    fn a_huge_prefix_list_is_refused_in_one_pass() {
        // 100,000 distinct prefixes: refused at the 101st, without a quadratic dedupe.
        let prefixes: Vec<String> = (0..100_000).map(|i| format!("x{i}.*")).collect();
        let started = std::time::Instant::now();
        let err = Filter::new(&prefixes, &[]).unwrap_err();
        assert_eq!(err.0, "invalid subscriber options: too many wanted collections");
        // Generous: a quadratic scan takes minutes here, the early exit microseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }

    #[test]
    fn query_parsing_and_v1_errors() {
        let o = SubscribeOptions::from_query(
            "wantedCollections=app.bsky.feed.post&cursor=%2B5&compress=true&maxMessageSizeBytes=4294967297",
            None,
        )
        .unwrap();
        assert_eq!((o.cursor, o.compress, o.max_message_size), (Some(5), true, 0));
        assert!(SubscribeOptions::from_query("", Some("gzip, zstd")).unwrap().compress);
        assert!(!SubscribeOptions::from_query("requireHello=True", None).unwrap().require_hello);
        let err = |q: &str| SubscribeOptions::from_query(q, None).unwrap_err().0;
        assert_eq!(err("cursor=abc"), "invalid cursor: abc");
        // A `;` is part of the value (v1's Go dropped the pair, and with it the filter).
        assert_eq!(err("cursor=5;x"), "invalid cursor: 5;x");
        assert!(err("wantedCollections=app.bsky.feed.post;").ends_with("invalid collection: app.bsky.feed.post;"));
        assert_eq!(
            err("wantedCollections=app.bsky.fo*"),
            "invalid subscriber options: invalid collection: app.bsky.fo*"
        );
        assert_eq!(err("wantedDids=did:bad"), "invalid subscriber options: invalid DID: did:bad");
        let many: String = (0..101).map(|i| format!("wantedCollections=app.bsky.c{i}.post&")).collect();
        assert_eq!(err(&many), "invalid subscriber options: too many wanted collections");
        let dup: String = (0..5000).map(|_| "wantedCollections=app.bsky.*&").collect();
        assert!(SubscribeOptions::from_query(&dup, None).is_ok(), "repeats count once");
        assert!(err("informCursorSeconds=0").starts_with("invalid informCursorSeconds"));
        assert_eq!(err("zstdDictionary=abc"), "invalid zstdDictionary: abc");
        let o = SubscribeOptions::from_query("zstdDictionary=20261125", None).unwrap();
        assert_eq!((o.zstd_dictionary, o.compress), (Some(20_261_125), true));
        assert_eq!(query_pairs("a=%41%zz+b&c"), vec![("a".into(), "A%zz b".into()), ("c".into(), String::new())]);
        assert_eq!(query_pairs("a=%+4%4"), vec![("a".into(), "% 4%4".into())], "not escapes");
        // One value per parameter, the first, as v1 reads it; the wanted lists take them all.
        let o = SubscribeOptions::from_query(
            "cursor=5&cursor=abc&requireHello=true&requireHello=false&compress=false&compress=true\
             &maxMessageSizeBytes=7&maxMessageSizeBytes=9&wantedDids=did:plc:a&wantedDids=did:plc:b",
            None,
        )
        .unwrap();
        assert_eq!((o.cursor, o.require_hello, o.compress, o.max_message_size), (Some(5), true, false, 7));
        assert_eq!(o.filter.dids().map(|d| d.len()), Some(2));
        assert_eq!(parse_max_message_size(" 5"), 0, "Go's Atoi takes no spaces (`+5` decodes to one)");
    }
}
