//! Signed repositories for the verification tests: each commit carries a real MST (every node
//! of the new tree), the record blocks, `prevData` and each op's `prev`, and is signed with the
//! repo's key (K-256 or P-256) — and, on demand, tampered with in one specific way. A
//! PLC-style directory serves the repos' DID documents.
//!
//! Commit blocks and frames are encoded with serde_ipld_dagcbor (independent of Contrail's
//! reader); the MST nodes are built with `contrail_core::verify::mst`, whose builder the
//! interop fixtures check.

use super::frames::{car, cid_of, dag_cbor, map, s, tid_for, TIME};
use bytes::Bytes;
use contrail_core::verify::mst::PartialTree;
use contrail_core::verify::PublicKey;
use http_body_util::Full;
use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A repo's signing key.
#[derive(Clone)]
pub enum Signer {
    K256(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl Signer {
    /// A deterministic key from a seed byte.
    pub fn k256(seed: u8) -> Signer {
        Signer::K256(k256::ecdsa::SigningKey::from_slice(&[seed.max(1); 32]).unwrap())
    }

    pub fn p256(seed: u8) -> Signer {
        Signer::P256(p256::ecdsa::SigningKey::from_slice(&[seed.max(1); 32]).unwrap())
    }

    pub fn public(&self) -> PublicKey {
        match self {
            Signer::K256(k) => PublicKey::from_k256(*k.verifying_key()),
            Signer::P256(k) => PublicKey::P256(*k.verifying_key()),
        }
    }

    /// A 64-byte low-S signature over SHA-256 of `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use k256::ecdsa::signature::hazmat::PrehashSigner;
        let digest = Sha256::digest(msg);
        match self {
            Signer::K256(k) => {
                let sig: k256::ecdsa::Signature = k.sign_prehash(&digest).unwrap();
                sig.normalize_s().unwrap_or(sig).to_bytes().to_vec()
            }
            Signer::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign_prehash(&digest).unwrap();
                sig.normalize_s().unwrap_or(sig).to_bytes().to_vec()
            }
        }
    }
}

/// One operation of a commit.
#[derive(Clone)]
pub enum Op {
    Create(String, Ipld),
    Update(String, Ipld),
    Delete(String),
}

/// How to spoil a commit (the repo's own state does not move for a spoiled one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tamper {
    None,
    /// One byte of the signature flipped.
    FlipSig,
    /// An op's CID (and the block the CAR carries for it) replaced by another record's.
    SwapRecord,
    /// `prevData` names another tree.
    WrongPrevData,
    /// An extra create op (with its block) that the signed tree does not hold.
    ExtraOp,
    /// Signed by another key.
    OtherKey,
    /// `prevData` and each op's `prev` left out (they are not signed: a relay can strip them).
    StripProof,
    /// An extra op with an action no one knows (`upsert`): not signed, dropped by the
    /// transcoder; it cannot be undone, so the commit cannot be proven.
    UnknownOp,
    /// The last op's record block left out of the CAR (blocks are not signed): the commit is
    /// still the repo's real one, proven, but the transcoder drops that op.
    StripRecordBlock,
    /// A `time` that is not one (not signed): the transcoder drops the whole frame.
    BadTime,
    /// The CAR's bytes cut short (not signed): neither the transcoder nor the verifier can
    /// read the commit; the frame still names its repo.
    TruncatedCar,
}

/// A repository that writes signed commits.
#[derive(Clone)]
pub struct SignedRepo {
    pub did: String,
    pub signer: Signer,
    records: BTreeMap<String, Vec<u8>>,
    revs: u64,
    /// Revs are TIDs of this value plus the count of commits (see [`SignedRepo::made_at`]).
    rev_base: u64,
    last_rev: Option<String>,
}

pub fn record(text: &str) -> Ipld {
    map(vec![("$type", s("app.bsky.feed.post")), ("createdAt", s(TIME)), ("text", s(text))])
}

impl SignedRepo {
    pub fn new(did: &str, signer: Signer) -> SignedRepo {
        SignedRepo {
            did: did.to_string(),
            signer,
            records: BTreeMap::new(),
            revs: 0,
            // Revs of now, as a PDS makes them: the store ages chain states by their rev's time
            // (--verify-state-ttl), so revs from long ago would let any compaction delete them.
            rev_base: (std::time::UNIX_EPOCH.elapsed().unwrap().as_micros() as u64) << 10,
            last_rev: None,
        }
    }

    /// The next commits' revs say they were made at `unix_us` (and count on from there).
    pub fn made_at(&mut self, unix_us: u64) {
        self.rev_base = unix_us << 10;
    }

    fn root(&self) -> Vec<u8> {
        PartialTree::from_records(self.records.iter().map(|(k, v)| (k.as_bytes(), v.as_slice()))).root_cid().unwrap()
    }

    /// The DID document a directory serves for this repo.
    pub fn did_doc(&self) -> serde_json::Value {
        did_doc(&self.did, &self.signer.public())
    }

    /// A `#commit` frame for `ops`, spoiled by `tamper`; an unspoiled one moves the repo on.
    pub fn commit(&mut self, seq: i64, ops: &[Op], tamper: Tamper) -> Vec<u8> {
        if tamper != Tamper::None {
            let mut copy = self.clone();
            return copy.build(seq, ops, tamper);
        }
        self.build(seq, ops, tamper)
    }

    fn build(&mut self, seq: i64, ops: &[Op], tamper: Tamper) -> Vec<u8> {
        let prev_data = self.root();
        let mut record_blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
        let mut op_list = Vec::new();
        for op in ops {
            let (action, path, rec) = match op {
                Op::Create(p, r) => ("create", p, Some(r)),
                Op::Update(p, r) => ("update", p, Some(r)),
                Op::Delete(p) => ("delete", p, None),
            };
            let prev = self.records.get(path).map(|c| Cid::try_from(c.as_slice()).unwrap());
            let cid = rec.map(|r| {
                let block = dag_cbor(r);
                let cid = cid_of(&block);
                record_blocks.push((cid, block));
                cid
            });
            match cid {
                Some(c) => self.records.insert(path.clone(), c.to_bytes()),
                None => self.records.remove(path),
            };
            let mut entry =
                vec![("action", s(action)), ("path", s(path)), ("cid", cid.map(Ipld::Link).unwrap_or(Ipld::Null))];
            if let (Some(p), true) = (prev, action != "create" && tamper != Tamper::StripProof) {
                entry.push(("prev", Ipld::Link(p)));
            }
            op_list.push(entry);
        }
        let tree = PartialTree::from_records(self.records.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
        let (root, nodes) = tree.blocks().unwrap();
        self.revs += 1;
        let rev = tid_for(self.rev_base + self.revs);
        let (commit_cid, commit_block) = self.signed_commit(&rev, &root, tamper);
        match tamper {
            Tamper::SwapRecord => {
                // Another record, correctly hashed, under the first op's name.
                let other = dag_cbor(&record("not what was signed"));
                let other_cid = cid_of(&other);
                record_blocks.push((other_cid, other));
                op_list[0].retain(|(k, _)| *k != "cid");
                op_list[0].push(("cid", Ipld::Link(other_cid)));
            }
            Tamper::ExtraOp => {
                let extra = dag_cbor(&record("slipped in"));
                let extra_cid = cid_of(&extra);
                record_blocks.push((extra_cid, extra));
                op_list.push(vec![
                    ("action", s("create")),
                    ("path", s("app.bsky.feed.post/3zzzzzzzzzzzz")),
                    ("cid", Ipld::Link(extra_cid)),
                ]);
            }
            Tamper::UnknownOp => {
                op_list.push(vec![
                    ("action", s("upsert")),
                    ("path", s("app.bsky.feed.post/3yyyyyyyyyyyy")),
                    ("cid", Ipld::Null),
                ]);
            }
            Tamper::StripRecordBlock => {
                record_blocks.pop();
            }
            _ => {}
        }
        let mut blocks = vec![(commit_cid, commit_block)];
        blocks.extend(nodes.into_iter().map(|(c, b)| (Cid::try_from(c.as_slice()).unwrap(), b)));
        blocks.extend(record_blocks);
        let prev_data = if tamper == Tamper::WrongPrevData { cid_of(b"another tree").to_bytes() } else { prev_data };
        let mut body = map(vec![
            ("seq", Ipld::Integer(seq as i128)),
            ("rebase", Ipld::Bool(false)),
            ("tooBig", Ipld::Bool(false)),
            ("repo", s(&self.did)),
            ("commit", Ipld::Link(commit_cid)),
            ("rev", s(&rev)),
            ("since", self.last_rev.as_deref().map(s).unwrap_or(Ipld::Null)),
            (
                "blocks",
                Ipld::Bytes(match car(&commit_cid, &blocks) {
                    c if tamper == Tamper::TruncatedCar => c[..c.len() / 2].to_vec(),
                    c => c,
                }),
            ),
            ("ops", Ipld::List(op_list.into_iter().map(map).collect())),
            ("blobs", Ipld::List(vec![])),
            ("prevData", Ipld::Link(Cid::try_from(prev_data.as_slice()).unwrap())),
            ("time", s(if tamper == Tamper::BadTime { "not a time" } else { TIME })),
        ]);
        if let (Tamper::StripProof, Ipld::Map(m)) = (tamper, &mut body) {
            m.remove("prevData");
        }
        self.last_rev = Some(rev);
        let mut frame = dag_cbor(&map(vec![("t", s("#commit")), ("op", Ipld::Integer(1))]));
        frame.extend(dag_cbor(&body));
        frame
    }

    /// The signed commit block of the repo at `rev` with the tree `root` (its CID and bytes),
    /// spoiled by `tamper` (`FlipSig`, `OtherKey`).
    fn signed_commit(&self, rev: &str, root: &[u8], tamper: Tamper) -> (Cid, Vec<u8>) {
        let unsigned = map(vec![
            ("did", s(&self.did)),
            ("rev", s(rev)),
            ("data", Ipld::Link(Cid::try_from(root).unwrap())),
            ("prev", Ipld::Null),
            ("version", Ipld::Integer(3)),
        ]);
        let signer = if tamper == Tamper::OtherKey { Signer::k256(0xee) } else { self.signer.clone() };
        let mut sig = signer.sign(&dag_cbor(&unsigned));
        if tamper == Tamper::FlipSig {
            sig[10] ^= 0x01;
        }
        let Ipld::Map(mut signed) = unsigned else { unreachable!() };
        signed.insert("sig".into(), Ipld::Bytes(sig));
        let block = dag_cbor(&Ipld::Map(signed));
        (cid_of(&block), block)
    }

    /// A `#sync` frame ("this is the repo now": its signed commit alone), spoiled by `tamper`
    /// (`FlipSig` or `OtherKey`); an unspoiled one moves the repo on to a new rev.
    pub fn sync(&mut self, seq: i64, tamper: Tamper) -> Vec<u8> {
        if tamper != Tamper::None {
            return self.clone().build_sync(seq, tamper);
        }
        self.build_sync(seq, Tamper::None)
    }

    fn build_sync(&mut self, seq: i64, tamper: Tamper) -> Vec<u8> {
        self.revs += 1;
        let rev = tid_for(self.rev_base + self.revs);
        let (commit_cid, commit_block) = self.signed_commit(&rev, &self.root(), tamper);
        let body = map(vec![
            ("seq", Ipld::Integer(seq as i128)),
            ("did", s(&self.did)),
            ("rev", s(&rev)),
            ("blocks", Ipld::Bytes(car(&commit_cid, &[(commit_cid, commit_block)]))),
            ("time", s(TIME)),
        ]);
        self.last_rev = Some(rev);
        let mut frame = dag_cbor(&map(vec![("t", s("#sync")), ("op", Ipld::Integer(1))]));
        frame.extend(dag_cbor(&body));
        frame
    }
}

/// The same frame under another seq (a replay).
pub fn with_seq(frame: &[u8], seq: i64) -> Vec<u8> {
    let mut de = serde_ipld_dagcbor::de::Deserializer::from_slice(frame);
    let header: Ipld = serde::Deserialize::deserialize(&mut de).unwrap();
    let Ipld::Map(mut body): Ipld = serde::Deserialize::deserialize(&mut de).unwrap() else { panic!("body") };
    body.insert("seq".into(), Ipld::Integer(seq as i128));
    let mut out = dag_cbor(&header);
    out.extend(dag_cbor(&Ipld::Map(body)));
    out
}

/// A DID document with `key` as its `#atproto` Multikey.
pub fn did_doc(did: &str, key: &PublicKey) -> serde_json::Value {
    let multikey = key.to_did_key().strip_prefix("did:key:").unwrap().to_string();
    serde_json::json!({
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": did,
        "alsoKnownAs": [],
        "verificationMethod": [{
            "id": format!("{did}#atproto"),
            "type": "Multikey",
            "controller": did,
            "publicKeyMultibase": multikey,
        }],
        "service": [],
    })
}

/// What the directory does for one DID.
#[derive(Clone)]
pub enum Answer {
    Doc(serde_json::Value),
    /// The document, after a delay.
    Slow(Duration, serde_json::Value),
    Status(u16),
}

/// A PLC-style directory on 127.0.0.1: `GET /<did>` → the DID document.
pub struct Plc {
    pub addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl Plc {
    pub async fn start() -> Plc {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answers: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let requests: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let (a, r) = (answers.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (a, r) = (a.clone(), r.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (a, r) = (a.clone(), r.clone());
                        async move {
                            let did = req.uri().path().trim_start_matches('/').to_string();
                            *r.lock().unwrap().entry(did.clone()).or_default() += 1;
                            let answer = a.lock().unwrap().get(&did).cloned().unwrap_or(Answer::Status(404));
                            let (status, body) = match answer {
                                Answer::Doc(d) => (200, d.to_string()),
                                Answer::Slow(wait, d) => {
                                    tokio::time::sleep(wait).await;
                                    (200, d.to_string())
                                }
                                Answer::Status(code) => (code, String::new()),
                            };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Plc { addr, answers, requests }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, did: &str, answer: Answer) {
        self.answers.lock().unwrap().insert(did.to_string(), answer);
    }

    pub fn requests(&self, did: &str) -> usize {
        self.requests.lock().unwrap().get(did).copied().unwrap_or(0)
    }
}
