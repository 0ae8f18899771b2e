//! One event as the server sent it: the JSON text is kept exactly (for `contrail tail`, for
//! storing, for forwarding), the fields every consumer reads (`time_us`, kind, DID, a commit's
//! collection, rkey, operation and rev) are read once on arrival as spans of that text, and
//! everything else is parsed on demand, borrowing from it ([`Event::commit`],
//! [`Event::record`], [`Event::identity`], [`Event::account`], [`Event::parse`]).

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// What an event is about (Jetstream v1's `kind`; `sync` is Contrail's `includeSync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    Commit,
    Identity,
    Account,
    Sync,
    /// A kind this version does not know yet; the event is delivered unchanged.
    Other,
}

impl Kind {
    fn parse(s: &str) -> Kind {
        match s {
            "commit" => Kind::Commit,
            "identity" => Kind::Identity,
            "account" => Kind::Account,
            "sync" => Kind::Sync,
            _ => Kind::Other,
        }
    }
}

/// A commit operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    fn parse(s: &str) -> Option<Operation> {
        match s {
            "create" => Some(Operation::Create),
            "update" => Some(Operation::Update),
            "delete" => Some(Operation::Delete),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// A string field: a span of the event's text, or (when the server escaped it) its own copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Text {
    Span(u32, u32),
    Owned(Box<str>),
}

impl Text {
    fn of(raw: &str, s: Cow<'_, str>) -> Text {
        match s {
            Cow::Borrowed(b) => {
                // A borrowed string lies inside `raw`: its offset is the pointer difference.
                let start = b.as_ptr() as usize - raw.as_ptr() as usize;
                Text::Span(start as u32, (start + b.len()) as u32)
            }
            Cow::Owned(o) => Text::Owned(o.into_boxed_str()),
        }
    }

    fn get<'a>(&'a self, raw: &'a str) -> &'a str {
        match self {
            Text::Span(a, b) => &raw[*a as usize..*b as usize],
            Text::Owned(s) => s,
        }
    }
}

/// Why a text message is not an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    #[error("not event JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("an event larger than 4 GiB")]
    TooLarge,
}

/// Which Jetstream wire a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// `/subscribe`: the event JSON itself (`did`, `time_us`, `kind`, …).
    #[default]
    V1,
    /// `subscribeEvents`: `{"$type":"message","payload":{"$type":"…#commit",…,"seq":…}}`;
    /// the position is `seq` (on Contrail, the same number as v1's `time_us`).
    V2,
}

/// One event (see the module doc). Cloning copies the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    raw: String,
    wire: Wire,
    time_us: u64,
    kind: Kind,
    did: Text,
    commit: Option<CommitHead>,
    /// Other events may carry the same `time_us` ([`Event::may_share_time`]).
    shares_time: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CommitHead {
    operation: Option<Operation>,
    collection: Text,
    rkey: Text,
    rev: Text,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    did: Cow<'a, str>,
    time_us: u64,
    /// Jetstream v2's seq, which its `/subscribe` adds to every event (and Jetstream v1 and
    /// Contrail do not).
    #[serde(default)]
    cursor: Option<IgnoredAny>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    commit: Option<CommitFields<'a>>,
}

#[derive(Deserialize)]
struct CommitFields<'a> {
    #[serde(borrow, default)]
    rev: Cow<'a, str>,
    #[serde(borrow, default)]
    operation: Cow<'a, str>,
    #[serde(borrow, default)]
    collection: Cow<'a, str>,
    #[serde(borrow, default)]
    rkey: Cow<'a, str>,
    // Checked for well-formedness, not kept.
    #[serde(default)]
    #[allow(dead_code)]
    record: Option<IgnoredAny>,
}

impl Event {
    /// Reads an event from the text of one message (Jetstream v1 JSON).
    pub fn from_json(raw: String) -> Result<Event, EventError> {
        if raw.len() > u32::MAX as usize {
            return Err(EventError::TooLarge);
        }
        let env: Envelope<'_> = serde_json::from_str(&raw)?;
        let did = Text::of(&raw, env.did);
        let kind = Kind::parse(&env.kind);
        let commit = env.commit.map(|c| CommitHead {
            operation: Operation::parse(&c.operation),
            collection: Text::of(&raw, c.collection),
            rkey: Text::of(&raw, c.rkey),
            rev: Text::of(&raw, c.rev),
        });
        let shares_time = env.cursor.is_some();
        Ok(Event { time_us: env.time_us, kind, did, commit, raw, wire: Wire::V1, shares_time })
    }

    /// Reads a Jetstream v2 message: an event, or what else the server said.
    pub fn from_v2_json(raw: String) -> Result<V2Message, EventError> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(rename = "$type", borrow)]
            ty: Cow<'a, str>,
            #[serde(borrow)]
            payload: Option<Payload<'a>>,
            #[serde(borrow)]
            error: Option<Cow<'a, str>>,
            #[serde(borrow)]
            message: Option<Cow<'a, str>>,
        }
        #[derive(Deserialize)]
        struct Payload<'a> {
            #[serde(rename = "$type", borrow)]
            ty: Cow<'a, str>,
            #[serde(borrow)]
            did: Option<Cow<'a, str>>,
            seq: Option<u64>,
            #[serde(borrow)]
            name: Option<Cow<'a, str>>,
            #[serde(borrow)]
            message: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            rev: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            operation: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            collection: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            rkey: Option<Cow<'a, str>>,
            #[serde(default)]
            #[allow(dead_code)]
            record: Option<IgnoredAny>,
            /// Contrail's `#info OutdatedCursor` range (not in Jetstream v2's).
            #[serde(rename = "afterSeq", default)]
            after_seq: Option<u64>,
            #[serde(rename = "throughSeq", default)]
            through_seq: Option<u64>,
        }
        if raw.len() > u32::MAX as usize {
            return Err(EventError::TooLarge);
        }
        let env: Envelope<'_> = serde_json::from_str(&raw)?;
        let missing = |what: &str| EventError::Json(serde::de::Error::custom(format!("a v2 message without {what}")));
        if env.ty == "error" {
            let error = env.error.unwrap_or_default().into_owned();
            return Ok(V2Message::Error { error, message: env.message.unwrap_or_default().into_owned() });
        }
        let p = env.payload.ok_or_else(|| missing("a payload"))?;
        let kind = p.ty.rsplit_once('#').map_or("", |(_, k)| k);
        if kind == "info" {
            let (name, message) = (p.name.unwrap_or_default(), p.message.unwrap_or_default().into_owned());
            return Ok(match (p.after_seq, p.through_seq) {
                (Some(after), Some(through)) if name == "OutdatedCursor" && after < through => {
                    V2Message::Gap { after, through, message }
                }
                _ => V2Message::Info { name: name.into_owned(), message },
            });
        }
        let time_us = p.seq.ok_or_else(|| missing("seq"))?;
        let did = Text::of(&raw, p.did.ok_or_else(|| missing("did"))?);
        let kind = Kind::parse(kind);
        let commit = match (kind, p.collection) {
            (Kind::Commit, Some(collection)) => Some(CommitHead {
                operation: p.operation.as_deref().and_then(Operation::parse),
                collection: Text::of(&raw, collection),
                rkey: Text::of(&raw, p.rkey.unwrap_or_default()),
                rev: Text::of(&raw, p.rev.unwrap_or_default()),
            }),
            _ => None,
        };
        // (The position is the seq: one per event.)
        Ok(V2Message::Event(Event { raw, wire: Wire::V2, time_us, kind, did, commit, shares_time: false }))
    }

    /// The server's position of this event: the cursor to resume from.
    pub fn time_us(&self) -> u64 {
        self.time_us
    }

    /// Whether other events may have the same position: Jetstream v2's `/subscribe` gives every
    /// op of a commit its frame's `time_us` (it is known by the `cursor` field it adds to every
    /// event). Jetstream v1 and Contrail stamp each event uniquely, and v2's `subscribeEvents`
    /// positions are one per event.
    pub fn may_share_time(&self) -> bool {
        self.shares_time
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn did(&self) -> &str {
        self.did.get(&self.raw)
    }

    /// A commit's collection (NSID).
    pub fn collection(&self) -> Option<&str> {
        self.commit.as_ref().map(|c| c.collection.get(&self.raw))
    }

    /// A commit's record key.
    pub fn rkey(&self) -> Option<&str> {
        self.commit.as_ref().map(|c| c.rkey.get(&self.raw))
    }

    /// A commit's operation.
    pub fn operation(&self) -> Option<Operation> {
        self.commit.as_ref().and_then(|c| c.operation)
    }

    /// A commit's repo revision.
    pub fn rev(&self) -> Option<&str> {
        self.commit.as_ref().map(|c| c.rev.get(&self.raw))
    }

    /// The event's JSON exactly as the server sent it.
    pub fn json(&self) -> &str {
        &self.raw
    }

    pub fn into_json(self) -> String {
        self.raw
    }

    /// The whole event as the caller's type, borrowing from the text where the type does.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> serde_json::Result<T> {
        serde_json::from_str(&self.raw)
    }

    /// The wire this event came on.
    pub fn wire(&self) -> Wire {
        self.wire
    }

    /// The object holding the event's fields: the message itself on v1, its `payload` on v2.
    fn body(&self) -> Option<&RawValue> {
        match self.wire {
            Wire::V1 => serde_json::from_str(&self.raw).ok(),
            Wire::V2 => {
                #[derive(Deserialize)]
                struct Outer<'a> {
                    #[serde(borrow)]
                    payload: &'a RawValue,
                }
                serde_json::from_str::<Outer<'_>>(&self.raw).ok().map(|o| o.payload)
            }
        }
    }

    /// One field of the body, as `T`.
    fn field<'a, T: Deserialize<'a>>(&'a self, name: &str) -> Option<T> {
        let fields: std::collections::HashMap<Cow<'a, str>, &'a RawValue> =
            serde_json::from_str(self.body()?.get()).ok()?;
        serde_json::from_str(fields.get(name)?.get()).ok()
    }

    /// A commit's fields, its record as raw JSON (no copy, no parse of the record).
    pub fn commit(&self) -> Option<Commit<'_>> {
        if self.kind != Kind::Commit {
            return None;
        }
        match self.wire {
            Wire::V1 => self.field("commit"),
            // v2 carries the commit's fields in the payload itself.
            Wire::V2 => serde_json::from_str(self.body()?.get()).ok(),
        }
    }

    /// A commit's record as the caller's type (`None` for deletes and non-commits).
    pub fn record<'a, T: Deserialize<'a>>(&'a self) -> Option<serde_json::Result<T>> {
        let record = self.commit()?.record?;
        Some(serde_json::from_str(record.get()))
    }

    /// An `#identity` event's fields (the relay's, as both wires carry them).
    pub fn identity(&self) -> Option<Identity<'_>> {
        (self.kind == Kind::Identity).then(|| self.field("identity"))?
    }

    pub fn account(&self) -> Option<Account<'_>> {
        (self.kind == Kind::Account).then(|| self.field("account"))?
    }

    /// A `#sync` event's fields (Contrail's `includeSync`; v2's `kinds=sync`).
    pub fn sync(&self) -> Option<Sync<'_>> {
        (self.kind == Kind::Sync).then(|| self.field("sync"))?
    }

    /// An identity that tells events stamped alike (the ops of one commit, on a server that
    /// gives them one `time_us`) from an event sent again, cheap enough for every event handed
    /// over: a commit by (DID, rev, collection, rkey, operation), anything else by its text.
    pub(crate) fn sibling_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match &self.commit {
            Some(_) => (self.did(), self.rev(), self.collection(), self.rkey(), self.operation()).hash(&mut h),
            None => self.raw.hash(&mut h),
        }
        h.finish()
    }

    /// The identity of this event for de-duplication across servers whose `time_us` differ:
    /// a commit by (DID, rev, collection, rkey, operation), anything else by its kind-specific
    /// sequence (`seq`) or, lacking one, its whole text.
    pub(crate) fn identity_key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.did().hash(&mut h);
        std::mem::discriminant(&self.kind).hash(&mut h);
        match &self.commit {
            Some(_) => {
                (self.rev(), self.collection(), self.rkey(), self.operation()).hash(&mut h);
            }
            None => {
                // The relay's seq, inside the kind's object (on both wires).
                #[derive(Deserialize)]
                struct Seq {
                    seq: Option<i64>,
                }
                let inner = match self.kind {
                    Kind::Identity => "identity",
                    Kind::Account => "account",
                    _ => "sync",
                };
                match self.field::<Seq>(inner).and_then(|s| s.seq) {
                    Some(seq) => seq.hash(&mut h),
                    None => self.raw.hash(&mut h),
                }
            }
        }
        h.finish()
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.raw)
    }
}

/// Serialized as the event's JSON, unchanged.
impl serde::Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.raw).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// Deserialized from v1 JSON.
impl<'de> serde::Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Event::from_json(String::from(raw.get())).map_err(serde::de::Error::custom)
    }
}

/// What a v2 server sends.
#[derive(Debug)]
#[non_exhaustive]
pub enum V2Message {
    Event(Event),
    /// `#info` (`OutdatedCursor`, `FutureCursor`): informational.
    Info {
        name: String,
        message: String,
    },
    /// Contrail's `#info OutdatedCursor` with its range (`afterSeq`, `throughSeq`): the events
    /// after seq `after` through seq `through` were deleted before they were sent.
    Gap {
        after: u64,
        through: u64,
        message: String,
    },
    /// An error frame (`ConsumerTooSlow`, `InternalError`); the server closes next.
    Error {
        error: String,
        message: String,
    },
}

/// A commit, borrowing from its event.
#[derive(Debug, Deserialize)]
pub struct Commit<'a> {
    #[serde(borrow)]
    pub rev: Cow<'a, str>,
    #[serde(borrow)]
    pub operation: Cow<'a, str>,
    #[serde(borrow)]
    pub collection: Cow<'a, str>,
    #[serde(borrow)]
    pub rkey: Cow<'a, str>,
    /// The record's JSON (creates and updates).
    #[serde(borrow, default)]
    pub record: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub cid: Option<Cow<'a, str>>,
}

/// An `#identity` event's fields.
#[derive(Debug, Deserialize)]
pub struct Identity<'a> {
    #[serde(borrow)]
    pub did: Cow<'a, str>,
    #[serde(borrow, default)]
    pub handle: Option<Cow<'a, str>>,
    pub seq: i64,
    #[serde(borrow)]
    pub time: Cow<'a, str>,
}

/// An `#account` event's fields.
#[derive(Debug, Deserialize)]
pub struct Account<'a> {
    pub active: bool,
    #[serde(borrow)]
    pub did: Cow<'a, str>,
    pub seq: i64,
    #[serde(borrow, default)]
    pub status: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub time: Cow<'a, str>,
}

/// A `#sync` event's fields: the repo was reset to the commit in `blocks` (a CAR as
/// `{"$bytes": base64}`); a consumer that keeps repo state should resync it.
#[derive(Debug, Deserialize)]
pub struct Sync<'a> {
    #[serde(borrow)]
    pub did: Cow<'a, str>,
    #[serde(borrow)]
    pub rev: Cow<'a, str>,
    #[serde(default)]
    pub seq: Option<i64>,
    #[serde(borrow, default)]
    pub time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub blocks: Option<&'a RawValue>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &str = r#"{"did":"did:plc:abc","time_us":1725911162329308,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create","collection":"app.bsky.feed.post","rkey":"3l3qo2vuowo2b","record":{"$type":"app.bsky.feed.post","text":"hi \"there\""},"cid":"bafyreib"}}"#;

    #[test]
    fn reads_the_fields_once_and_keeps_the_text() {
        let e = Event::from_json(POST.to_string()).unwrap();
        assert_eq!((e.time_us(), e.kind(), e.did()), (1725911162329308, Kind::Commit, "did:plc:abc"));
        assert_eq!(e.collection(), Some("app.bsky.feed.post"));
        assert_eq!(
            (e.rkey(), e.rev(), e.operation()),
            (Some("3l3qo2vuowo2b"), Some("3l3qo2vutsw2b"), Some(Operation::Create))
        );
        assert_eq!(e.json(), POST);
        let c = e.commit().unwrap();
        assert_eq!(c.record.unwrap().get(), r#"{"$type":"app.bsky.feed.post","text":"hi \"there\""}"#);
        #[derive(Deserialize)]
        struct Post {
            text: String,
        }
        assert_eq!(e.record::<Post>().unwrap().unwrap().text, "hi \"there\"");
        assert_eq!(serde_json::to_string(&e).unwrap(), POST);
        let back: Event = serde_json::from_str(POST).unwrap();
        assert_eq!(back, e);
    }

    /// Jetstream v2's `/subscribe` adds its seq as a top-level `cursor` to every event, and
    /// stamps every op of a commit alike: such events may share their position.
    #[test]
    fn events_from_a_server_that_stamps_alike_are_known_by_their_cursor_field() {
        let v1 =
            r#"{"did":"did:plc:x","time_us":6,"kind":"identity","identity":{"did":"did:plc:x","seq":1,"time":"t"}}"#;
        assert!(!Event::from_json(v1.into()).unwrap().may_share_time());
        let v2 = r#"{"did":"did:plc:x","time_us":6,"cursor":42,"kind":"identity","identity":{"did":"did:plc:x","seq":1,"time":"t"}}"#;
        assert!(Event::from_json(v2.into()).unwrap().may_share_time());
        // Any value is taken as the mark, never refused (it is not ours to check).
        let odd = r#"{"did":"did:plc:x","time_us":6,"cursor":"x","kind":"identity","identity":{"did":"did:plc:x","seq":1,"time":"t"}}"#;
        assert!(Event::from_json(odd.into()).unwrap().may_share_time());
    }

    #[test]
    fn escaped_fields_and_other_kinds() {
        let e = Event::from_json(r#"{"did":"did:plc:a\u0062c","time_us":5,"kind":"identity","identity":{"did":"did:plc:abc","handle":"a.test","seq":9,"time":"2024-09-09T19:46:02.102Z"}}"#.into()).unwrap();
        assert_eq!((e.did(), e.kind(), e.collection()), ("did:plc:abc", Kind::Identity, None));
        assert_eq!(e.identity().unwrap().seq, 9);
        assert!(e.commit().is_none() && e.account().is_none());
        let a = Event::from_json(r#"{"did":"did:plc:x","time_us":6,"kind":"account","account":{"active":false,"did":"did:plc:x","seq":10,"status":"takendown","time":"t"}}"#.into()).unwrap();
        assert_eq!(a.account().unwrap().status.as_deref(), Some("takendown"));
        let s = Event::from_json(r#"{"did":"did:plc:x","time_us":8,"kind":"sync","sync":{"blocks":{"$bytes":"AAEC"},"did":"did:plc:x","rev":"3l3qo2vutsw2b","seq":11,"time":"t"}}"#.into()).unwrap();
        let sync = s.sync().unwrap();
        assert_eq!(
            (sync.rev.as_ref(), sync.seq, sync.blocks.unwrap().get()),
            ("3l3qo2vutsw2b", Some(11), r#"{"$bytes":"AAEC"}"#)
        );
        let o = Event::from_json(r#"{"did":"did:plc:x","time_us":7,"kind":"future"}"#.into()).unwrap();
        assert_eq!(o.kind(), Kind::Other);
        assert!(Event::from_json(r#"{"did":"did:plc:x","kind":"commit"}"#.into()).is_err());
        assert!(Event::from_json("not json".into()).is_err());
    }

    #[test]
    fn v2_messages() {
        let commit = r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#commit","cid":"bafyreib","collection":"app.bsky.feed.post","did":"did:plc:abc","operation":"create","record":{"text":"hi"},"rev":"3l3qo2vutsw2b","rkey":"3l3qo2vuowo2b","seq":1725911162329308,"time":"2024-09-09T19:46:02.329308Z"}}"#;
        let V2Message::Event(e) = Event::from_v2_json(commit.into()).unwrap() else { panic!() };
        assert_eq!(
            (e.wire(), e.time_us(), e.kind(), e.did()),
            (Wire::V2, 1725911162329308, Kind::Commit, "did:plc:abc")
        );
        assert_eq!(
            (e.collection(), e.rkey(), e.operation()),
            (Some("app.bsky.feed.post"), Some("3l3qo2vuowo2b"), Some(Operation::Create))
        );
        assert_eq!(e.commit().unwrap().record.unwrap().get(), r#"{"text":"hi"}"#);
        assert_eq!(e.json(), commit);
        // The same event on v1 has the same identity.
        let v1 = Event::from_json(POST.to_string()).unwrap();
        assert_eq!(e.identity_key(), v1.identity_key());
        let identity = r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#identity","did":"did:plc:x","identity":{"did":"did:plc:x","handle":"x.test","seq":9,"time":"t"},"seq":1725911162329309,"time":"t"}}"#;
        let V2Message::Event(i) = Event::from_v2_json(identity.into()).unwrap() else { panic!() };
        assert_eq!((i.kind(), i.identity().unwrap().seq), (Kind::Identity, 9));
        let info = r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","name":"OutdatedCursor","message":"m"}}"#;
        assert!(
            matches!(Event::from_v2_json(info.into()).unwrap(), V2Message::Info { name, .. } if name == "OutdatedCursor")
        );
        let gap = r#"{"$type":"message","payload":{"$type":"network.bsky.jetstream.subscribeEvents#info","afterSeq":5,"message":"m","name":"OutdatedCursor","throughSeq":9}}"#;
        assert!(matches!(Event::from_v2_json(gap.into()).unwrap(), V2Message::Gap { after: 5, through: 9, .. }));
        // Not a range: an empty one, or another name.
        let empty = gap.replace("\"throughSeq\":9", "\"throughSeq\":5");
        assert!(matches!(Event::from_v2_json(empty).unwrap(), V2Message::Info { .. }));
        let other = gap.replace("OutdatedCursor", "FutureCursor");
        assert!(matches!(Event::from_v2_json(other).unwrap(), V2Message::Info { .. }));
        let error = r#"{"$type":"error","error":"ConsumerTooSlow","message":"resume with cursor=5"}"#;
        assert!(
            matches!(Event::from_v2_json(error.into()).unwrap(), V2Message::Error { error, .. } if error == "ConsumerTooSlow")
        );
        assert!(Event::from_v2_json(r#"{"$type":"message","payload":{"$type":"x#commit","did":"d"}}"#.into()).is_err());
    }

    #[test]
    fn identity_keys_ignore_time_us() {
        let a = Event::from_json(POST.to_string()).unwrap();
        let b = Event::from_json(POST.replace("1725911162329308", "1725911162329999")).unwrap();
        let c = Event::from_json(POST.replace("3l3qo2vuowo2b", "3l3qo2vuowo2c")).unwrap();
        assert_eq!(a.identity_key(), b.identity_key());
        assert_ne!(a.identity_key(), c.identity_key());
        let i1 =
            r#"{"did":"did:plc:x","time_us":1,"kind":"identity","identity":{"did":"did:plc:x","seq":1,"time":"t"}}"#;
        let i2 = i1.replace("\"time_us\":1", "\"time_us\":2");
        let i3 = i1.replace("\"seq\":1", "\"seq\":2");
        let key = |s: &str| Event::from_json(s.to_string()).unwrap().identity_key();
        assert_eq!(key(i1), key(&i2));
        assert_ne!(key(i1), key(&i3));
    }
}
