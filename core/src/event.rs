//! One Jetstream v1 event: its JSON bytes, encoded once, and the small metadata filters read.
//!
//! The JSON is built by the transcoder with a 16-digit placeholder where `time_us` goes
//! (`{"did":"…","time_us":0000000000000000,"kind":…`); the sequencer stamps the real value
//! in place. Every `time_us` between 2001 and 2286 has 16 digits, so stamping is a 16-byte
//! copy; other widths (tests, replicas of odd upstreams) fall back to a splice.
//!
//! The DID is validated syntax (no characters that JSON escapes), so it is read straight out
//! of the JSON; so is the collection, a validated NSID.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

label_enum! {
    /// Which event kind (the discriminant is the stored byte: 0, 1, 2, 3). `sync` (Sync 1.1's
    /// `#sync`) is never sent to a v1 client that did not ask for it.
    #[repr(u8)]
    pub enum EventKind {
        Commit => "commit",
        Identity => "identity",
        Account => "account",
        Sync => "sync",
    }
}

impl EventKind {
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(EventKind::Commit),
            1 => Some(EventKind::Identity),
            2 => Some(EventKind::Account),
            3 => Some(EventKind::Sync),
            _ => None,
        }
    }
}

/// How many zstd dictionaries an event can hold a compressed frame for at once (a server
/// serves at most this many; each slot costs a few bytes per event in the ring).
pub const COMPRESSED_SLOTS: usize = 4;

/// An event's encodings besides its v1 JSON, built on first use and shared by every
/// subscriber that needs the same one (DESIGN.md invariant 5).
///
/// The cache is bounded process-wide ([`set_encoding_cache_cap`]): past the cap, an encoding is
/// built for the one subscriber that asked and not kept, so subscribers asking for many
/// dictionaries and both wires cost CPU, never unbounded memory on top of the ring.
#[derive(Debug, Default, PartialEq, Eq)]
struct Encodings {
    /// zstd frames of the v1 JSON, per dictionary slot.
    v1_zstd: [OnceLock<Vec<u8>>; COMPRESSED_SLOTS],
    /// The v2 wire message.
    v2: OnceLock<Vec<u8>>,
    /// zstd frames of the v2 message, per dictionary slot.
    v2_zstd: [OnceLock<Vec<u8>>; COMPRESSED_SLOTS],
    /// The v1 JSON with the `verification` field (`includeVerification`), and its zstd frames:
    /// boxed, as few subscribers ask for it.
    verified: OnceLock<Box<Verified>>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Verified {
    json: OnceLock<Vec<u8>>,
    zstd: [OnceLock<Vec<u8>>; COMPRESSED_SLOTS],
}

impl Drop for Verified {
    fn drop(&mut self) {
        let cells = std::iter::once(&self.json).chain(self.zstd.iter());
        let held: u64 = cells.filter_map(OnceLock::get).map(|v| v.len() as u64).sum();
        CACHED_BYTES.fetch_sub(held, Ordering::Relaxed);
    }
}

/// Bytes held by every event's cached encodings, and the most they may hold.
static CACHED_BYTES: AtomicU64 = AtomicU64::new(0);
static CACHE_CAP: AtomicU64 = AtomicU64::new(u64::MAX);

/// Caps the bytes all events' cached encodings may hold together (the service sets it to the
/// ring's byte budget at start).
pub fn set_encoding_cache_cap(bytes: u64) {
    CACHE_CAP.store(bytes, Ordering::Relaxed);
}

/// Bytes the cached encodings hold now.
pub fn encoding_cache_bytes() -> u64 {
    CACHED_BYTES.load(Ordering::Relaxed)
}

/// The cached value of `cell`, building it with `build` the first time — unless the cache is
/// full, in which case the built bytes are returned without being kept.
fn cached<'a>(cell: &'a OnceLock<Vec<u8>>, build: impl FnOnce() -> Vec<u8>) -> Cow<'a, [u8]> {
    if let Some(v) = cell.get() {
        return Cow::Borrowed(v);
    }
    let v = build();
    let len = v.len() as u64;
    if CACHED_BYTES.load(Ordering::Relaxed).saturating_add(len) > CACHE_CAP.load(Ordering::Relaxed) {
        return Cow::Owned(v);
    }
    CACHED_BYTES.fetch_add(len, Ordering::Relaxed);
    if let Err(v) = cell.set(v) {
        // Another subscriber built it at the same moment: keep theirs.
        CACHED_BYTES.fetch_sub(v.len() as u64, Ordering::Relaxed);
    }
    Cow::Borrowed(cell.get().expect("set above"))
}

impl Encodings {
    fn cells(&self) -> impl Iterator<Item = &OnceLock<Vec<u8>>> {
        self.v1_zstd.iter().chain(std::iter::once(&self.v2)).chain(self.v2_zstd.iter())
    }
}

impl Drop for Encodings {
    fn drop(&mut self) {
        let held: u64 = self.cells().filter_map(OnceLock::get).map(|v| v.len() as u64).sum();
        CACHED_BYTES.fetch_sub(held, Ordering::Relaxed);
    }
}

impl Clone for Encodings {
    /// A copy of an event starts with an empty cache (its bytes are counted once).
    fn clone(&self) -> Self {
        Encodings::default()
    }
}

/// `{"did":"` — the DID starts right after it.
pub const DID_OFFSET: usize = 8;
/// What sits between the DID and the `time_us` digits.
const TIME_KEY: &[u8] = b"\",\"time_us\":";
/// The placeholder the transcoder writes for `time_us`.
pub const TIME_PLACEHOLDER: &[u8; 16] = b"0000000000000000";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_us: u64,
    pub kind: EventKind,
    did_len: usize,
    /// Where the `time_us` digits are.
    time: Range<usize>,
    /// Where the collection NSID is (empty for identity and account).
    collection: Range<usize>,
    json: Vec<u8>,
    /// What verification showed about the commit this event came from (`--verify`); stored
    /// with the event, sent only to subscribers that ask (`includeVerification`).
    pub verification: Verification,
    /// The other encodings of this event, each built the first time a subscriber needs it and
    /// shared by all of them.
    /// Allocated on first use: an event only ever sent as plain v1 JSON costs 8 bytes here.
    encodings: OnceLock<Box<Encodings>>,
}

impl Event {
    /// Starts an event's JSON in `out`: `{"did":"<did>","time_us":<placeholder>,"kind":"<kind>"`.
    /// Finish the JSON, then wrap it with [`Event::from_parts`].
    pub fn begin(out: &mut Vec<u8>, did: &str, kind: EventKind) {
        out.clear();
        out.extend_from_slice(b"{\"did\":\"");
        out.extend_from_slice(did.as_bytes());
        out.extend_from_slice(TIME_KEY);
        out.extend_from_slice(TIME_PLACEHOLDER);
        out.extend_from_slice(b",\"kind\":\"");
        out.extend_from_slice(kind.as_str().as_bytes());
        out.push(b'"');
    }

    /// Wraps JSON begun with [`Event::begin`] (time_us not stamped yet).
    pub fn from_parts(json: Vec<u8>, kind: EventKind, did_len: usize, collection: Range<usize>) -> Self {
        let t = DID_OFFSET + did_len + TIME_KEY.len();
        Event {
            time_us: 0,
            kind,
            did_len,
            time: t..t + TIME_PLACEHOLDER.len(),
            collection,
            json,
            verification: Verification::None,
            encodings: Default::default(),
        }
    }

    /// Rebuilds an event from stored or received JSON and its metadata. The JSON must be in
    /// v1 shape (`{"did":"…","time_us":N,…`); returns `None` if it is not.
    pub fn from_json(json: Vec<u8>, kind: EventKind, collection: Option<&str>) -> Option<Self> {
        let rest = json.strip_prefix(b"{\"did\":\"")?;
        let did_len = rest.iter().position(|&c| c == b'"')?;
        // The stored value's header holds the DID's length in 16 bits, the collection's
        // offset in 32 and its length in 16 ([`Self::encode_value`]): cut short, a value would
        // be unreadable, or name another DID.
        if did_len > u16::MAX as usize
            || json.len() > u32::MAX as usize
            || collection.is_some_and(|c| c.len() > u16::MAX as usize)
        {
            return None;
        }
        let t = DID_OFFSET + did_len + TIME_KEY.len();
        if json.get(DID_OFFSET + did_len..t)? != TIME_KEY {
            return None;
        }
        let digits = json[t..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 19 {
            return None;
        }
        let time_us = std::str::from_utf8(&json[t..t + digits]).ok()?.parse().ok()?;
        let collection = match collection {
            Some(c) => {
                let needle = [b"\"collection\":\"", c.as_bytes(), b"\""].concat();
                let at = find(&json, &needle)? + 14;
                at..at + c.len()
            }
            None => 0..0,
        };
        Some(Event {
            time_us,
            kind,
            did_len,
            time: t..t + digits,
            collection,
            json,
            verification: Verification::None,
            encodings: Default::default(),
        })
    }

    /// Sets `time_us`, rewriting its digits in the JSON.
    pub fn stamp(&mut self, time_us: u64) {
        let mut buf = itoa::Buffer::new();
        let digits = buf.format(time_us).as_bytes();
        if digits.len() == self.time.len() {
            self.json[self.time.clone()].copy_from_slice(digits);
        } else {
            let delta = digits.len() as isize - self.time.len() as isize;
            self.json.splice(self.time.clone(), digits.iter().copied());
            self.time = self.time.start..self.time.start + digits.len();
            if !self.collection.is_empty() {
                let s = (self.collection.start as isize + delta) as usize;
                self.collection = s..s + self.collection.len();
            }
        }
        self.time_us = time_us;
        self.encodings = Default::default();
    }

    pub fn did(&self) -> &str {
        std::str::from_utf8(&self.json[DID_OFFSET..DID_OFFSET + self.did_len]).unwrap_or_default()
    }

    /// The collection NSID of a commit event.
    pub fn collection(&self) -> Option<&str> {
        if self.collection.is_empty() {
            None
        } else {
            std::str::from_utf8(&self.json[self.collection.clone()]).ok()
        }
    }

    /// The v1 JSON bytes.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// The memory its JSON buffer holds (its capacity, which may be more than `json().len()`).
    pub fn json_capacity(&self) -> usize {
        self.json.capacity()
    }

    /// The compressed v1 JSON for dictionary `slot` (< [`COMPRESSED_SLOTS`]), computed by
    /// `compress` at most once per event and dictionary.
    pub fn compressed(&self, slot: usize, compress: impl FnOnce(&[u8]) -> Vec<u8>) -> Cow<'_, [u8]> {
        cached(&self.encodings().v1_zstd[slot], || compress(&self.json))
    }

    /// The Jetstream v2 wire message for this event, built once by `build` (see
    /// `crate::v2::message_of`, which passes the encoder: events know nothing of wires).
    pub fn v2_message(&self, build: impl FnOnce(&Event) -> Vec<u8>) -> Cow<'_, [u8]> {
        cached(&self.encodings().v2, || build(self))
    }

    /// The compressed v2 `message` for dictionary `slot`, built at most once.
    pub fn v2_compressed(&self, slot: usize, message: &[u8], compress: impl FnOnce(&[u8]) -> Vec<u8>) -> Cow<'_, [u8]> {
        cached(&self.encodings().v2_zstd[slot], || compress(message))
    }

    /// [`Self::json_with_verification`], built at most once per event.
    pub fn json_with_verification_shared(&self) -> Cow<'_, [u8]> {
        cached(&self.verified().json, || self.json_with_verification())
    }

    /// [`Self::json_with_verification`] compressed for dictionary `slot`, built at most once
    /// per event and dictionary (every such subscriber sends the same bytes: the mark is the
    /// event's).
    pub fn compressed_with_verification(&self, slot: usize, compress: impl FnOnce(&[u8]) -> Vec<u8>) -> Cow<'_, [u8]> {
        cached(&self.verified().zstd[slot], || compress(&self.json_with_verification_shared()))
    }

    fn verified(&self) -> &Verified {
        self.encodings().verified.get_or_init(Box::default)
    }

    fn encodings(&self) -> &Encodings {
        self.encodings.get_or_init(Box::default)
    }

    pub fn into_json(self) -> Vec<u8> {
        self.json
    }

    /// The v1 JSON with `"verification":"…"` added as its last field, for subscribers that
    /// asked for it (built per write: few subscribers ask, and the plain JSON stays shared).
    pub fn json_with_verification(&self) -> Vec<u8> {
        let label = self.verification.as_str();
        let mut out = Vec::with_capacity(self.json.len() + 20 + label.len());
        out.extend_from_slice(&self.json[..self.json.len().saturating_sub(1)]);
        out.extend_from_slice(b",\"verification\":\"");
        out.extend_from_slice(label.as_bytes());
        out.extend_from_slice(b"\"}");
        out
    }
}

label_enum! {
    /// What verification showed about an event's commit.
    pub enum Verification {
        /// Not verified: verification was off when it was ingested, or the event carries no
        /// signature (identity, account).
        None => "none",
        /// The repo's signature, the Sync 1.1 MST proof and the repo's chain.
        Full => "full",
        /// The repo's signature (`--verify signature`); under `full`, a commit whose proof
        /// checked but that does not continue a commit verified before it (a repo's first, the
        /// first after a break, a gap or a commit only a former key signed), one only a former
        /// key signs, or a `#sync`.
        Signature => "signature",
        /// The repo's DID could not be resolved; passed on unchecked.
        Unresolved => "unresolved",
        /// Failed, and passed on anyway (`--on-verify-failure pass`).
        Failed => "failed",
    }
}

impl Verification {
    fn from_u8(v: u8) -> Verification {
        Verification::ALL.get(v as usize).copied().unwrap_or(Verification::None)
    }

    fn from_label(label: &[u8]) -> Option<Verification> {
        Verification::ALL.iter().copied().find(|v| v.as_str().as_bytes() == label)
    }
}

/// Splits `"verification":"…"`, as [`Event::json_with_verification`] adds it (the last field),
/// off an event's JSON: the JSON as stored, and the mark. An event without the field comes back
/// whole, with `None`. A label this version does not know (a newer upstream's) comes off too and
/// reads as `None`: nothing it can vouch for. (A v1 event's JSON never ends in a string field:
/// its last field is an object.)
pub fn split_verification(mut json: Vec<u8>) -> (Vec<u8>, Verification) {
    const KEY: &[u8] = b",\"verification\":\"";
    if !json.ends_with(b"\"}") {
        return (json, Verification::None);
    }
    let body = &json[..json.len() - 2];
    let Some(start) = body.iter().rposition(|&c| c == b'"').and_then(|q| q.checked_sub(KEY.len() - 1)) else {
        return (json, Verification::None);
    };
    if !body[start..].starts_with(KEY) {
        return (json, Verification::None);
    }
    let mark = Verification::from_label(&body[start + KEY.len()..]).unwrap_or(Verification::None);
    json.truncate(start);
    json.push(b'}');
    (json, mark)
}

/// Version byte of the stored value layout below.
const VALUE_V1: u8 = 1;
/// Stored value header: version, kind, DID length (u16), collection offset (u32) and length
/// (u16), all little-endian, then the JSON.
const VALUE_HEADER: usize = 10;

/// The metadata filters need, read straight from a stored value without touching the JSON.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    pub kind: EventKind,
    pub did: &'a str,
    pub collection: Option<&'a str>,
    pub json: &'a [u8],
}

impl Event {
    /// The value stored in the log for this event (metadata header + JSON).
    pub fn encode_value(&self, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(VALUE_HEADER + self.json.len());
        // The version byte's high nibble carries the verification (0 = none: older values).
        out.push(VALUE_V1 | ((self.verification as u8) << 4));
        out.push(self.kind as u8);
        out.extend_from_slice(&(self.did_len as u16).to_le_bytes());
        out.extend_from_slice(&(self.collection.start as u32).to_le_bytes());
        out.extend_from_slice(&(self.collection.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.json);
    }

    /// Rebuilds an event from its stored value; `None` if the value is not one we wrote.
    pub fn decode_value(time_us: u64, value: &[u8]) -> Option<Event> {
        let v = view_parts(value)?;
        let json = value[VALUE_HEADER..].to_vec();
        let t = DID_OFFSET + v.did_len + TIME_KEY.len();
        let digits = json[t..].iter().take_while(|c| c.is_ascii_digit()).count();
        Some(Event {
            time_us,
            kind: v.kind,
            did_len: v.did_len,
            time: t..t + digits,
            collection: v.collection,
            json,
            verification: v.verification,
            encodings: Default::default(),
        })
    }
}

struct ValueParts {
    verification: Verification,
    kind: EventKind,
    did_len: usize,
    collection: Range<usize>,
}

fn view_parts(value: &[u8]) -> Option<ValueParts> {
    if value.len() < VALUE_HEADER || value[0] & 0x0f != VALUE_V1 {
        return None;
    }
    let verification = Verification::from_u8(value[0] >> 4);
    let kind = EventKind::from_u8(value[1])?;
    let did_len = u16::from_le_bytes([value[2], value[3]]) as usize;
    let coll_start = u32::from_le_bytes([value[4], value[5], value[6], value[7]]) as usize;
    let coll_len = u16::from_le_bytes([value[8], value[9]]) as usize;
    let json_len = value.len() - VALUE_HEADER;
    // Up to the end of the time key: what `decode_value` reads, so a value that can be viewed
    // can be decoded (replay pages send a viewed value's JSON without decoding it).
    if DID_OFFSET + did_len + TIME_KEY.len() > json_len || coll_start + coll_len > json_len {
        return None;
    }
    Some(ValueParts { verification, kind, did_len, collection: coll_start..coll_start + coll_len })
}

/// Reads the metadata of a stored value (no allocation, no JSON parsing).
pub fn view_value(value: &[u8]) -> Option<EventView<'_>> {
    let p = view_parts(value)?;
    let json = &value[VALUE_HEADER..];
    let did = std::str::from_utf8(&json[DID_OFFSET..DID_OFFSET + p.did_len]).ok()?;
    let collection = if p.collection.is_empty() { None } else { std::str::from_utf8(&json[p.collection]).ok() };
    Some(EventView { kind: p.kind, did, collection, json })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_json_refuses_what_a_stored_value_could_not_hold() {
        let json = |did: &str| format!(r#"{{"did":"{did}","time_us":1,"kind":"identity"}}"#).into_bytes();
        let longest = format!("did:plc:{}", "a".repeat(u16::MAX as usize - 8));
        assert!(Event::from_json(json(&longest), EventKind::Identity, None).is_some());
        let longer = format!("{longest}a");
        assert!(Event::from_json(json(&longer), EventKind::Identity, None).is_none());
    }

    #[test]
    fn stamp_in_place_and_with_other_widths() {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:abc", EventKind::Commit);
        out.extend_from_slice(b",\"commit\":{\"collection\":\"app.bsky.feed.like\"}}");
        let at = out.len() - 21;
        let mut e = Event::from_parts(out, EventKind::Commit, 11, at..at + 18);
        assert_eq!(e.collection(), Some("app.bsky.feed.like"));
        e.stamp(1_783_175_888_085_434);
        assert_eq!(
            std::str::from_utf8(e.json()).unwrap(),
            r#"{"did":"did:plc:abc","time_us":1783175888085434,"kind":"commit","commit":{"collection":"app.bsky.feed.like"}}"#
        );
        e.stamp(7);
        assert_eq!(e.collection(), Some("app.bsky.feed.like"));
        assert!(std::str::from_utf8(e.json()).unwrap().contains(r#""time_us":7,"#));
        let back = Event::from_json(e.json().to_vec(), EventKind::Commit, Some("app.bsky.feed.like")).unwrap();
        assert_eq!(back, e);
        let mut value = Vec::new();
        e.encode_value(&mut value);
        assert_eq!(Event::decode_value(7, &value).unwrap(), e);
        let v = view_value(&value).unwrap();
        assert_eq!(
            (v.kind, v.did, v.collection, v.json),
            (EventKind::Commit, "did:plc:abc", Some("app.bsky.feed.like"), e.json())
        );
        assert_eq!(back.did(), "did:plc:abc");
    }

    #[test]
    fn the_verification_is_stored_in_the_version_byte_and_older_values_read_as_none() {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:x", EventKind::Identity);
        out.push(b'}');
        let mut e = Event::from_parts(out, EventKind::Identity, 9, 0..0);
        e.stamp(42);
        let mut value = Vec::new();
        e.encode_value(&mut value);
        assert_eq!(value[0], VALUE_V1, "unverified events keep the old layout byte for byte");
        for v in Verification::ALL {
            e.verification = *v;
            e.encode_value(&mut value);
            let back = Event::decode_value(42, &value).unwrap();
            assert_eq!(back.verification, *v);
            assert_eq!(back.json(), e.json());
            assert_eq!(view_value(&value).unwrap().did, "did:plc:x");
        }
        e.verification = Verification::Full;
        assert_eq!(
            String::from_utf8(e.json_with_verification()).unwrap(),
            r#"{"did":"did:plc:x","time_us":42,"kind":"identity","verification":"full"}"#
        );
    }

    #[test]
    fn the_verification_field_comes_off_as_it_went_on() {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:x", EventKind::Commit);
        out.extend_from_slice(br#","commit":{"rev":"3l","record":{"text":"\",\"verification\":\"full"}}}"#);
        let mut e = Event::from_parts(out, EventKind::Commit, 9, 0..0);
        e.stamp(7);
        let plain = e.json().to_vec();
        assert_eq!(split_verification(plain.clone()), (plain.clone(), Verification::None));
        for v in Verification::ALL {
            e.verification = *v;
            assert_eq!(split_verification(e.json_with_verification()), (plain.clone(), *v));
        }
        // A label from a newer version: off, and nothing vouched for.
        let mut newer = plain.clone();
        newer.truncate(newer.len() - 1);
        newer.extend_from_slice(br#","verification":"quantum"}"#);
        assert_eq!(split_verification(newer), (plain.clone(), Verification::None));
    }

    #[test]
    fn cached_encodings_are_counted_and_capped() {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:abc", EventKind::Identity);
        out.extend_from_slice(b"}");
        let e = Event::from_parts(out, EventKind::Identity, 11, 0..0);
        let before = encoding_cache_bytes();
        assert!(matches!(e.compressed(0, |_| vec![1; 100]), Cow::Borrowed(_)));
        assert!(matches!(e.compressed(0, |_| unreachable!("built once")), Cow::Borrowed(_)));
        assert!(encoding_cache_bytes() >= before + 100);
        let copy = e.clone();
        drop(e);
        drop(copy);
        // (Other tests run in parallel and cache too: only check that this event's bytes went.)
        assert!(encoding_cache_bytes() < before + 100 || before > 0);
    }
}
