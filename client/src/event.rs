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
pub enum EventError {
    #[error("not event JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("an event larger than 4 GiB")]
    TooLarge,
}

/// One event (see the module doc). Cloning copies the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Event {
    raw: String,
    time_us: u64,
    kind: Kind,
    did: Text,
    commit: Option<CommitHead>,
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
        Ok(Event { time_us: env.time_us, kind, did, commit, raw })
    }

    /// The server's position of this event: the cursor to resume from.
    pub fn time_us(&self) -> u64 {
        self.time_us
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

    /// A commit's fields, its record as raw JSON (no copy, no parse of the record).
    pub fn commit(&self) -> Option<Commit<'_>> {
        if self.kind != Kind::Commit {
            return None;
        }
        #[derive(Deserialize)]
        struct Outer<'a> {
            #[serde(borrow)]
            commit: Commit<'a>,
        }
        self.parse::<Outer<'_>>().ok().map(|o| o.commit)
    }

    /// A commit's record as the caller's type (`None` for deletes and non-commits).
    pub fn record<'a, T: Deserialize<'a>>(&'a self) -> Option<serde_json::Result<T>> {
        let record = self.commit()?.record?;
        Some(serde_json::from_str(record.get()))
    }

    pub fn identity(&self) -> Option<Identity<'_>> {
        #[derive(Deserialize)]
        struct Outer<'a> {
            #[serde(borrow)]
            identity: Identity<'a>,
        }
        (self.kind == Kind::Identity).then(|| self.parse::<Outer<'_>>().ok().map(|o| o.identity))?
    }

    pub fn account(&self) -> Option<Account<'_>> {
        #[derive(Deserialize)]
        struct Outer<'a> {
            #[serde(borrow)]
            account: Account<'a>,
        }
        (self.kind == Kind::Account).then(|| self.parse::<Outer<'_>>().ok().map(|o| o.account))?
    }

    /// A `#sync` event's fields (Contrail's `includeSync`).
    pub fn sync(&self) -> Option<Sync<'_>> {
        #[derive(Deserialize)]
        struct Outer<'a> {
            #[serde(borrow)]
            sync: Sync<'a>,
        }
        (self.kind == Kind::Sync).then(|| self.parse::<Outer<'_>>().ok().map(|o| o.sync))?
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
                #[derive(Deserialize)]
                struct Seq {
                    seq: Option<i64>,
                }
                #[derive(Deserialize)]
                struct Outer {
                    identity: Option<Seq>,
                    account: Option<Seq>,
                    sync: Option<Seq>,
                }
                let seq = serde_json::from_str::<Outer>(&self.raw)
                    .ok()
                    .and_then(|o| o.identity.or(o.account).or(o.sync))
                    .and_then(|s| s.seq);
                match seq {
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

impl<'de> serde::Deserialize<'de> for Event {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Event::from_json(String::from(raw.get())).map_err(serde::de::Error::custom)
    }
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
