//! Builds `com.atproto.sync.subscribeRepos` frames the way a relay does: a DAG-CBOR header
//! `{t, op}`, then the body, with commit records carried as blocks of a CAR v1 slice.

use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub fn dag_cbor(v: &Ipld) -> Vec<u8> {
    serde_ipld_dagcbor::to_vec(v).expect("encodable")
}

/// The CIDv1 (dag-cbor, sha2-256) of a block.
pub fn cid_of(block: &[u8]) -> Cid {
    cid_with_codec(block, 0x71)
}

pub fn cid_with_codec(block: &[u8], codec: u8) -> Cid {
    let mut b = vec![0x01, codec, 0x12, 0x20];
    b.extend_from_slice(&Sha256::digest(block));
    Cid::try_from(b.as_slice()).expect("valid cid")
}

pub fn map(entries: Vec<(&str, Ipld)>) -> Ipld {
    Ipld::Map(entries.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<BTreeMap<_, _>>())
}

pub fn s(v: &str) -> Ipld {
    Ipld::String(v.to_string())
}

fn uvarint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A CAR v1 with `root` as its only root and the given `(cid, block)` sections.
pub fn car(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    let header = dag_cbor(&map(vec![("roots", Ipld::List(vec![Ipld::Link(*root)])), ("version", Ipld::Integer(1))]));
    let mut out = Vec::new();
    uvarint(header.len() as u64, &mut out);
    out.extend_from_slice(&header);
    for (cid, block) in blocks {
        let cid_bytes = cid.to_bytes();
        uvarint((cid_bytes.len() + block.len()) as u64, &mut out);
        out.extend_from_slice(&cid_bytes);
        out.extend_from_slice(block);
    }
    out
}

/// JSON in the atproto data model → the Ipld it stands for (`$link`, `$bytes`).
pub fn json_to_ipld(v: &serde_json::Value) -> Ipld {
    use serde_json::Value;
    match v {
        Value::Null => Ipld::Null,
        Value::Bool(b) => Ipld::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Ipld::Integer(i as i128),
            None => Ipld::Float(n.as_f64().expect("number")),
        },
        Value::String(s) => Ipld::String(s.clone()),
        Value::Array(a) => Ipld::List(a.iter().map(json_to_ipld).collect()),
        Value::Object(o) => {
            if o.len() == 1 {
                if let Some(Value::String(l)) = o.get("$link") {
                    return Ipld::Link(Cid::try_from(l.as_str()).expect("valid $link"));
                }
                if let Some(Value::String(b)) = o.get("$bytes") {
                    return Ipld::Bytes(base64_decode(b));
                }
            }
            Ipld::Map(o.iter().map(|(k, v)| (k.clone(), json_to_ipld(v))).collect())
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut acc, mut bits, mut out) = (0u32, 0, Vec::new());
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | A.iter().position(|&a| a == c).expect("base64") as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// One op of a commit: the record is raw DAG-CBOR bytes so tests can send anything.
#[derive(Clone)]
pub struct TestOp {
    pub action: String,
    pub path: String,
    /// The record block for create/update; `None` for delete.
    pub record: Option<Vec<u8>>,
    /// Override the op's `cid` (e.g. to point at a block that is not in the CAR).
    pub cid: Option<Option<Cid>>,
    /// Leave the record block out of the CAR.
    pub omit_block: bool,
    /// Store different bytes under the record's CID (a hash mismatch).
    pub corrupt_block: bool,
}

impl TestOp {
    pub fn create(path: &str, record: &Ipld) -> Self {
        TestOp {
            action: "create".into(),
            path: path.into(),
            record: Some(dag_cbor(record)),
            cid: None,
            omit_block: false,
            corrupt_block: false,
        }
    }
    pub fn create_raw(path: &str, record: Vec<u8>) -> Self {
        TestOp {
            action: "create".into(),
            path: path.into(),
            record: Some(record),
            cid: None,
            omit_block: false,
            corrupt_block: false,
        }
    }
    pub fn update(path: &str, record: &Ipld) -> Self {
        TestOp { action: "update".into(), ..Self::create(path, record) }
    }
    pub fn delete(path: &str) -> Self {
        TestOp {
            action: "delete".into(),
            path: path.into(),
            record: None,
            cid: None,
            omit_block: false,
            corrupt_block: false,
        }
    }
}

pub fn header(t: &str) -> Vec<u8> {
    dag_cbor(&map(vec![("t", s(t)), ("op", Ipld::Integer(1))]))
}

/// The time string relays send.
pub const TIME: &str = "2026-07-04T14:38:08.999Z";

/// A `#commit` frame for `repo` with the given ops.
pub fn commit_frame(seq: i64, repo: &str, rev: &str, ops: &[TestOp]) -> Vec<u8> {
    commit_frame_with(seq, repo, rev, ops, |_| {})
}

/// Like [`commit_frame`], letting the test edit the body map before encoding.
pub fn commit_frame_with(
    seq: i64,
    repo: &str,
    rev: &str,
    ops: &[TestOp],
    edit: impl FnOnce(&mut BTreeMap<String, Ipld>),
) -> Vec<u8> {
    let mut blocks = Vec::new();
    let mut op_list = Vec::new();
    for op in ops {
        let rec_cid = op.record.as_ref().map(|r| cid_of(r));
        if let (Some(r), Some(c)) = (&op.record, &rec_cid) {
            if !op.omit_block {
                let mut stored = r.clone();
                if op.corrupt_block {
                    stored.push(0);
                }
                blocks.push((*c, stored));
            }
        }
        let cid = match &op.cid {
            Some(over) => *over,
            None => rec_cid,
        };
        op_list.push(map(vec![
            ("action", s(&op.action)),
            ("path", s(&op.path)),
            ("cid", cid.map(Ipld::Link).unwrap_or(Ipld::Null)),
        ]));
    }
    // A commit block like the real ones (put last, where relays usually put it).
    let data_cid = cid_of(b"mst-root");
    let commit_block = dag_cbor(&map(vec![
        ("did", s(repo)),
        ("rev", s(rev)),
        ("sig", Ipld::Bytes(vec![7; 64])),
        ("data", Ipld::Link(data_cid)),
        ("prev", Ipld::Null),
        ("version", Ipld::Integer(3)),
    ]));
    let commit_cid = cid_of(&commit_block);
    blocks.push((commit_cid, commit_block));
    let Ipld::Map(mut body) = map(vec![
        ("seq", Ipld::Integer(seq as i128)),
        ("rebase", Ipld::Bool(false)),
        ("tooBig", Ipld::Bool(false)),
        ("repo", s(repo)),
        ("commit", Ipld::Link(commit_cid)),
        ("rev", s(rev)),
        ("since", Ipld::Null),
        ("blocks", Ipld::Bytes(car(&commit_cid, &blocks))),
        ("ops", Ipld::List(op_list)),
        ("blobs", Ipld::List(vec![])),
        ("time", s(TIME)),
    ]) else {
        unreachable!()
    };
    edit(&mut body);
    let mut frame = header("#commit");
    frame.extend(dag_cbor(&Ipld::Map(body)));
    frame
}

pub fn identity_frame(seq: i64, did: &str, handle: Option<&str>) -> Vec<u8> {
    identity_frame_at(seq, did, handle, TIME)
}

/// An `#identity` frame with the given `time` string.
pub fn identity_frame_at(seq: i64, did: &str, handle: Option<&str>, time: &str) -> Vec<u8> {
    let mut body = vec![("seq", Ipld::Integer(seq as i128)), ("did", s(did)), ("time", s(time))];
    if let Some(h) = handle {
        body.push(("handle", s(h)));
    }
    let mut frame = header("#identity");
    frame.extend(dag_cbor(&map(body)));
    frame
}

pub fn account_frame(seq: i64, did: &str, active: bool, status: Option<&str>) -> Vec<u8> {
    let mut body =
        vec![("seq", Ipld::Integer(seq as i128)), ("did", s(did)), ("time", s(TIME)), ("active", Ipld::Bool(active))];
    if let Some(st) = status {
        body.push(("status", s(st)));
    }
    let mut frame = header("#account");
    frame.extend(dag_cbor(&map(body)));
    frame
}

pub fn sync_frame(seq: i64, did: &str) -> Vec<u8> {
    sync_frame_with(seq, did, "3mptbypluud2a", vec![])
}

/// A `#sync` frame with the given `rev` and `blocks`.
pub fn sync_frame_with(seq: i64, did: &str, rev: &str, blocks: Vec<u8>) -> Vec<u8> {
    let mut frame = header("#sync");
    frame.extend(dag_cbor(&map(vec![
        ("seq", Ipld::Integer(seq as i128)),
        ("did", s(did)),
        ("rev", s(rev)),
        ("blocks", Ipld::Bytes(blocks)),
        ("time", s(TIME)),
    ])));
    frame
}

pub fn info_frame(name: &str) -> Vec<u8> {
    let mut frame = header("#info");
    frame.extend(dag_cbor(&map(vec![("name", s(name)), ("message", s("cursor is too old"))])));
    frame
}

pub fn error_frame(error: &str) -> Vec<u8> {
    let mut frame = dag_cbor(&map(vec![("op", Ipld::Integer(-1))]));
    frame.extend(dag_cbor(&map(vec![("error", s(error)), ("message", s("bye"))])));
    frame
}

pub fn unknown_frame(seq: i64, t: &str) -> Vec<u8> {
    let mut frame = header(t);
    frame.extend(dag_cbor(&map(vec![("seq", Ipld::Integer(seq as i128)), ("did", s("did:plc:abc"))])));
    frame
}

/// A small, valid like record.
pub fn like_record(n: u64) -> Ipld {
    map(vec![
        ("$type", s("app.bsky.feed.like")),
        ("createdAt", s(TIME)),
        (
            "subject",
            map(vec![
                ("cid", s("bafyreiftot7eltsc3f6g4qktykmbv6jcmdmhcx5osscan6jpdxkpqcmcza")),
                ("uri", s(&format!("at://did:plc:r2zybk6op3ymzpz6jhqpkoy5/app.bsky.feed.post/3mpsjbtci{n:04}"))),
            ]),
        ),
    ])
}

/// Tiny deterministic generator (tests must be reproducible).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407))
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A valid did:plc for repo number `i`.
pub fn did_for(i: u64) -> String {
    const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut s = String::from("did:plc:");
    let mut x = i.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    for _ in 0..24 {
        s.push(B32[(x % 32) as usize] as char);
        x = (x / 32) ^ (x << 7) ^ i;
    }
    s
}

/// A valid TID-shaped record key from a counter (unique per counter value).
pub fn tid_for(n: u64) -> String {
    const S32: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
    let mut v = (1u64 << 60) | n;
    let mut out = [b'2'; 13];
    for c in out.iter_mut().rev() {
        *c = S32[(v % 32) as usize];
        v /= 32;
    }
    String::from_utf8(out.to_vec()).unwrap()
}

/// One generated frame and the events it must produce.
#[derive(Clone)]
pub struct GenFrame {
    pub seq: i64,
    pub frame: Vec<u8>,
    /// `(did, kind, collection, rkey)` of each expected event, in order.
    pub expected: Vec<(String, &'static str, String, String)>,
}

/// Frames like a busy relay's: likes, posts, follows, reposts, profile updates, deletes,
/// multi-op commits, identity and account events, across `repos` repositories.
pub fn generate(first_seq: i64, n: usize, repos: u64, seed: u64) -> Vec<GenFrame> {
    let mut rng = Lcg::new(seed);
    let mut out = Vec::with_capacity(n);
    let mut counter = seed.wrapping_mul(1_000_003) % (1 << 40);
    for i in 0..n {
        let seq = first_seq + i as i64;
        let did = did_for(rng.below(repos));
        let roll = rng.below(100);
        let rev = tid_for(counter);
        if roll < 3 {
            out.push(GenFrame {
                seq,
                frame: identity_frame(seq, &did, None),
                expected: vec![(did, "identity", String::new(), String::new())],
            });
            continue;
        }
        if roll < 5 {
            let frame = account_frame(seq, &did, rng.below(2) == 0, Some("deactivated").filter(|_| rng.below(3) == 0));
            out.push(GenFrame { seq, frame, expected: vec![(did, "account", String::new(), String::new())] });
            continue;
        }
        let nops = if roll < 15 { 2 + rng.below(3) as usize } else { 1 };
        let mut ops = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..nops {
            counter += 1;
            let rkey = tid_for(counter);
            let (coll, op) = match rng.below(10) {
                0..=3 => {
                    ("app.bsky.feed.like", TestOp::create(&format!("app.bsky.feed.like/{rkey}"), &like_record(counter)))
                }
                4..=5 => {
                    let text = format!("post number {counter} <with> & \"quotes\" — ünïcödé 🦋");
                    let rec = map(vec![
                        ("$type", s("app.bsky.feed.post")),
                        ("createdAt", s(TIME)),
                        ("langs", Ipld::List(vec![s("en")])),
                        ("text", s(&text)),
                    ]);
                    ("app.bsky.feed.post", TestOp::create(&format!("app.bsky.feed.post/{rkey}"), &rec))
                }
                6 => {
                    let rec = map(vec![
                        ("$type", s("app.bsky.graph.follow")),
                        ("createdAt", s(TIME)),
                        ("subject", s(&did_for(counter % 97))),
                    ]);
                    ("app.bsky.graph.follow", TestOp::create(&format!("app.bsky.graph.follow/{rkey}"), &rec))
                }
                7 => ("app.bsky.feed.repost", TestOp::delete(&format!("app.bsky.feed.repost/{rkey}"))),
                8 => {
                    let rec = map(vec![
                        ("$type", s("app.bsky.actor.profile")),
                        ("displayName", s(&format!("user {counter}"))),
                        (
                            "avatar",
                            map(vec![
                                ("$type", s("blob")),
                                ("ref", Ipld::Link(cid_with_codec(&counter.to_le_bytes(), 0x55))),
                                ("mimeType", s("image/jpeg")),
                                ("size", Ipld::Integer(1000 + counter as i128 % 9000)),
                            ]),
                        ),
                    ]);
                    // Profiles are updated in place; the rkey is still unique here so every
                    // event can be told apart.
                    ("app.bsky.actor.profile", TestOp::update(&format!("app.bsky.actor.profile/{rkey}"), &rec))
                }
                _ => (
                    "com.example.custom.thing",
                    TestOp::create(
                        &format!("com.example.custom.thing/{rkey}"),
                        &map(vec![("$type", s("com.example.custom.thing")), ("n", Ipld::Integer(counter as i128))]),
                    ),
                ),
            };
            expected.push((did.clone(), "commit", coll.to_string(), rkey));
            ops.push(op);
        }
        out.push(GenFrame { seq, frame: commit_frame(seq, &did, &rev, &ops), expected });
    }
    out
}
