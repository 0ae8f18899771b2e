//! Verification against the AT Protocol interop fixtures (../shared/interop, CC0): signatures
//! and did:key parsing, MST key heights, and the Sync 1.1 commit-proof cases. Skips with a
//! printed reason when ../shared is absent.

use contrail_core::transcode::cid::{cid_to_string, decode_base64_nopad, parse_cid_string};
use contrail_core::verify::commit::{Action, Blocks, ProofOp};
use contrail_core::verify::mst::{check_inversion, key_height, PartialTree};
use contrail_core::verify::{Failure, PublicKey};
use std::path::PathBuf;

fn interop(file: &str) -> Option<serde_json::Value> {
    let shared = std::env::var_os("CONTRAIL_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let path = shared.join("interop").join(file);
    match std::fs::read(&path) {
        Ok(b) => Some(serde_json::from_slice(&b).unwrap()),
        Err(e) => {
            println!("SKIP: {} not readable ({e})", path.display());
            None
        }
    }
}

fn b64(s: &str) -> Vec<u8> {
    decode_base64_nopad(s.trim_end_matches('=').as_bytes()).expect("base64")
}

#[test]
fn signature_fixtures() {
    let Some(fixtures) = interop("crypto/signature-fixtures.json") else { return };
    let mut n = 0;
    for f in fixtures.as_array().unwrap() {
        let comment = f["comment"].as_str().unwrap();
        let message = b64(f["messageBase64"].as_str().unwrap());
        let signature = b64(f["signatureBase64"].as_str().unwrap());
        let want = f["validSignature"].as_bool().unwrap();
        let from_did = PublicKey::from_did_key(f["publicKeyDid"].as_str().unwrap()).unwrap();
        let legacy =
            PublicKey::from_legacy(f["didDocSuite"].as_str().unwrap(), f["publicKeyMultibase"].as_str().unwrap())
                .unwrap();
        assert_eq!(from_did, legacy, "{comment}: the two key forms differ");
        assert_eq!(from_did.verify(&message, &signature), want, "{comment}");
        assert_eq!(from_did.to_did_key(), f["publicKeyDid"].as_str().unwrap(), "{comment}");
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn did_key_fixtures_match_their_private_keys() {
    for (file, curve) in [("crypto/w3c_didkey_K256.json", "k256"), ("crypto/w3c_didkey_P256.json", "p256")] {
        let Some(fixtures) = interop(file) else { return };
        for f in fixtures.as_array().unwrap() {
            let did = f["publicDidKey"].as_str().unwrap();
            let key = PublicKey::from_did_key(did).unwrap();
            assert_eq!(key.to_did_key(), did);
            let private = match (f.get("privateKeyBytesHex"), f.get("privateKeyBytesBase58")) {
                (Some(h), _) => hex(h.as_str().unwrap()),
                (_, Some(b)) => bs58::decode(b.as_str().unwrap()).into_vec().unwrap(),
                _ => panic!("no private key"),
            };
            let derived = match curve {
                "k256" => PublicKey::from_k256(*k256::ecdsa::SigningKey::from_slice(&private).unwrap().verifying_key()),
                _ => PublicKey::P256(*p256::ecdsa::SigningKey::from_slice(&private).unwrap().verifying_key()),
            };
            assert_eq!(derived, key, "{did}");
        }
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn mst_key_heights() {
    let Some(fixtures) = interop("mst/key_heights.json") else { return };
    for f in fixtures.as_array().unwrap() {
        let key = f["key"].as_str().unwrap();
        assert_eq!(key_height(key.as_bytes()) as u64, f["height"].as_u64().unwrap(), "{key:?}");
    }
}

/// A CAR of `blocks` under `root`.
fn car(root: &[u8], blocks: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
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
    let mut header = vec![0xa2, 0x65];
    header.extend_from_slice(b"roots");
    header.push(0x81);
    header.extend_from_slice(&[0xd8, 0x2a, 0x58, root.len() as u8 + 1, 0]);
    header.extend_from_slice(root);
    header.push(0x67);
    header.extend_from_slice(b"version");
    header.push(0x01);
    let mut out = Vec::new();
    uvarint(header.len() as u64, &mut out);
    out.extend_from_slice(&header);
    for (cid, block) in blocks {
        uvarint((cid.len() + block.len()) as u64, &mut out);
        out.extend_from_slice(cid);
        out.extend_from_slice(block);
    }
    out
}

#[test]
fn commit_proof_fixtures() {
    let Some(fixtures) = interop("firehose/commit-proof-fixtures.json") else { return };
    let mut n = 0;
    for f in fixtures.as_array().unwrap() {
        let comment = f["comment"].as_str().unwrap();
        let strs = |k: &str| -> Vec<String> {
            f[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
        };
        let leaf = parse_cid_string(f["leafValue"].as_str().unwrap()).unwrap();
        let (keys, adds, dels) = (strs("keys"), strs("adds"), strs("dels"));
        let before = PartialTree::from_records(keys.iter().map(|k| (k.as_bytes(), leaf.as_slice())));
        assert_eq!(
            cid_to_string(&before.root_cid().unwrap()),
            f["rootBeforeCommit"].as_str().unwrap(),
            "{comment}: root before"
        );
        let mut after_keys: Vec<&String> = keys.iter().filter(|k| !dels.contains(k)).collect();
        after_keys.extend(adds.iter());
        let after = PartialTree::from_records(after_keys.iter().map(|k| (k.as_bytes(), leaf.as_slice())));
        let (root, all_blocks) = after.blocks().unwrap();
        assert_eq!(cid_to_string(&root), f["rootAfterCommit"].as_str().unwrap(), "{comment}: root after");

        // The proof: only the blocks the fixture lists, the ops undone.
        let in_proof = strs("blocksInProof");
        let proof_blocks: Vec<_> =
            all_blocks.iter().filter(|(c, _)| in_proof.contains(&cid_to_string(c))).cloned().collect();
        assert_eq!(proof_blocks.len(), in_proof.len(), "{comment}: every proof block is a node of the new tree");
        let ops: Vec<ProofOp> = adds
            .iter()
            .map(|k| ProofOp { action: Action::Create, path: k, cid: Some(&leaf), prev: None })
            .chain(dels.iter().map(|k| ProofOp { action: Action::Delete, path: k, cid: None, prev: Some(&leaf) }))
            .collect();
        let before_root = before.root_cid().unwrap();
        let bytes = car(&root, &proof_blocks);
        let blocks = Blocks::parse(&bytes).unwrap();
        check_inversion(&blocks, &root, &ops, &before_root).unwrap_or_else(|e| panic!("{comment}: {e}"));

        // The whole tree proves it too. Without its root block nothing is proven; other
        // blocks of the listed proof may be more than inversion needs (the fixture lists what
        // a PDS sends), so a smaller proof may still pass, but never wrongly.
        let full = car(&root, &all_blocks);
        check_inversion(&Blocks::parse(&full).unwrap(), &root, &ops, &before_root).unwrap();
        let without_root: Vec<_> = proof_blocks.iter().filter(|(c, _)| *c != root).cloned().collect();
        let bytes = car(&root, &without_root);
        let got = check_inversion(&Blocks::parse(&bytes).unwrap(), &root, &ops, &before_root);
        assert!(matches!(got, Err(Failure::Proof(_))), "{comment}: a proof without its root passed: {got:?}");
        for skip in 0..proof_blocks.len() {
            let fewer: Vec<_> =
                proof_blocks.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, b)| b.clone()).collect();
            let bytes = car(&root, &fewer);
            match check_inversion(&Blocks::parse(&bytes).unwrap(), &root, &ops, &before_root) {
                Ok(()) | Err(Failure::Proof(_)) => {}
                Err(e) => panic!("{comment}: without block {skip}: {e}"),
            }
        }
        // A wrong prevData fails.
        let got = check_inversion(&blocks, &root, &ops, &root);
        assert!(matches!(got, Err(Failure::Proof(_))), "{comment}");
        n += 1;
    }
    assert_eq!(n, 6);
}

// ---------------------------------------------------------------------------------------------
// Property tests: random repos and random commits, their proofs built from the new tree.

use proptest::prelude::*;

/// An op with its own strings: action, path, cid, prev.
type OwnedOp = (Action, String, Option<Vec<u8>>, Option<Vec<u8>>);

fn value_cid(n: u32) -> Vec<u8> {
    contrail_core::transcode::cid::dag_cbor_cid_of(&n.to_be_bytes())
}

fn path(n: u16) -> String {
    // Two collections, record keys spread so that layers 1 and 2 appear.
    format!("app.bsky.feed.{}/{:05}", if n.is_multiple_of(3) { "like" } else { "post" }, n)
}

proptest! {
    // 256 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// Any commit's ops, undone on the whole new tree, give the old root; a smaller proof
    /// either still proves it or is refused as a proof failure; a wrong prevData never passes.
    #[test]
    fn inversion_undoes_any_commit(
        initial in proptest::collection::btree_set(0u16..400, 0..80),
        creates in proptest::collection::btree_set(400u16..800, 0..6),
        deletes in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
        updates in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
        drop_block in any::<proptest::sample::Index>(),
    ) {
        let initial: Vec<u16> = initial.into_iter().collect();
        let mut records: std::collections::BTreeMap<String, Vec<u8>> =
            initial.iter().map(|&n| (path(n), value_cid(n as u32))).collect();
        let before = PartialTree::from_records(records.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
        let before_root = before.root_cid().unwrap();
        let mut ops_owned: Vec<OwnedOp> = Vec::new();
        let mut touched = std::collections::BTreeSet::new();
        if !initial.is_empty() {
            for d in &deletes {
                let p = path(initial[d.index(initial.len())]);
                if touched.insert(p.clone()) {
                    let prev = records.remove(&p);
                    ops_owned.push((Action::Delete, p, None, prev));
                }
            }
            for u in &updates {
                let p = path(initial[u.index(initial.len())]);
                if touched.insert(p.clone()) {
                    let new = value_cid(100_000 + u.index(1000) as u32);
                    let prev = records.insert(p.clone(), new.clone());
                    ops_owned.push((Action::Update, p, Some(new), prev));
                }
            }
        }
        for &c in &creates {
            let p = path(c);
            let v = value_cid(c as u32);
            records.insert(p.clone(), v.clone());
            ops_owned.push((Action::Create, p, Some(v), None));
        }
        let after = PartialTree::from_records(records.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
        let (root, blocks) = after.blocks().unwrap();
        let ops: Vec<ProofOp> = ops_owned
            .iter()
            .map(|(a, p, c, prev)| ProofOp { action: *a, path: p, cid: c.as_deref(), prev: prev.as_deref() })
            .collect();
        let whole = car(&root, &blocks);
        let parsed = Blocks::parse(&whole).unwrap();
        prop_assert_eq!(check_inversion(&parsed, &root, &ops, &before_root), Ok(()));
        // A wrong prevData.
        let wrong = value_cid(7_777_777);
        prop_assert!(check_inversion(&parsed, &root, &ops, &wrong).is_err());
        // A proof short of one block.
        if blocks.len() > 1 {
            let skip = drop_block.index(blocks.len());
            let fewer: Vec<_> = blocks.iter().enumerate().filter(|(i, _)| *i != skip).map(|(_, b)| b.clone()).collect();
            let bytes = car(&root, &fewer);
            let fewer = Blocks::parse(&bytes).unwrap();
            let got = check_inversion(&fewer, &root, &ops, &before_root);
            match got {
                Ok(()) | Err(Failure::Proof(_)) => {}
                Err(e) => prop_assert!(false, "unexpected failure {e}"),
            }
            // The one-pass undo is not stricter than undoing the ops one at a time.
            if undo_one_by_one(&fewer, &root, &ops) == Ok(before_root.clone()) {
                prop_assert_eq!(got, Ok(()));
            }
        }
    }
}

/// The ops undone one after another on the partial tree, each against the tree the ones
/// before it left; the root that gives.
fn undo_one_by_one(blocks: &Blocks, root: &[u8], ops: &[ProofOp]) -> Result<Vec<u8>, Failure> {
    let mut tree = PartialTree::load(blocks, root)?;
    for op in ops {
        let key = op.path.as_bytes();
        match op.action {
            Action::Create => tree.remove(key)?,
            Action::Update => tree.set(key, op.prev.unwrap())?,
            Action::Delete => tree.insert(key, op.prev.unwrap())?,
        }
    }
    tree.root_cid()
}

/// A node pointing at one child twice (a DAG, not a tree) is refused, not unfolded: layered,
/// such a CAR of a few KB would otherwise expand into exponentially many records.
#[test]
fn an_mst_node_referenced_twice_is_refused() {
    fn link(cid: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&[0xd8, 0x2a, 0x58, cid.len() as u8 + 1, 0]);
        out.extend_from_slice(cid);
    }
    fn text(s: &str, out: &mut Vec<u8>) {
        out.push(0x60 | s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    /// `{e: [{k, p: 0, t, v}], l}` with one entry.
    fn node(left: Option<&[u8]>, key: &[u8], value: &[u8], right: Option<&[u8]>) -> Vec<u8> {
        let mut out = vec![0xa2];
        text("e", &mut out);
        out.push(0x81);
        out.push(0xa4);
        text("k", &mut out);
        out.extend_from_slice(&[0x58, key.len() as u8]);
        out.extend_from_slice(key);
        text("p", &mut out);
        out.push(0x00);
        text("t", &mut out);
        match right {
            Some(c) => link(c, &mut out),
            None => out.push(0xf6),
        }
        text("v", &mut out);
        link(value, &mut out);
        text("l", &mut out);
        match left {
            Some(c) => link(c, &mut out),
            None => out.push(0xf6),
        }
        out
    }
    let key_at =
        |h: u32| (0..).map(|n| format!("app.bsky.feed.post/{n:06}")).find(|k| key_height(k.as_bytes()) == h).unwrap();
    let (low, high) = (key_at(0), key_at(1));
    let value = value_cid(1);
    let child = node(None, low.as_bytes(), &value, None);
    let child_cid = contrail_core::transcode::cid::dag_cbor_cid_of(&child);
    let root = node(Some(&child_cid), high.as_bytes(), &value, Some(&child_cid));
    let root_cid = contrail_core::transcode::cid::dag_cbor_cid_of(&root);
    let bytes = car(&root_cid, &[(root_cid.clone(), root), (child_cid, child)]);
    let blocks = Blocks::parse(&bytes).unwrap();
    let got = PartialTree::load(&blocks, &root_cid);
    assert!(matches!(got, Err(Failure::Proof(_))), "{got:?}");
}

/// The root CID and node blocks of a tree of 40 records.
fn forty_records() -> (Vec<u8>, Vec<contrail_core::verify::mst::NodeBlock>) {
    let records: std::collections::BTreeMap<String, Vec<u8>> =
        (0..40u16).map(|n| (path(n), value_cid(n as u32))).collect();
    let tree = PartialTree::from_records(records.iter().map(|(k, v)| (k.as_bytes(), v.as_slice())));
    tree.blocks().unwrap()
}

/// An update whose prev is its cid undoes to the same tree, so it would prove for any record
/// left unchanged: refused (indigo's `IsUpdate` requires the two to differ).
#[test]
fn an_update_that_changes_nothing_is_refused() {
    let (root, blocks) = forty_records();
    let whole = car(&root, &blocks);
    let parsed = Blocks::parse(&whole).unwrap();
    let (p, v) = (path(7), value_cid(7));
    let ops = [ProofOp { action: Action::Update, path: &p, cid: Some(&v), prev: Some(&v) }];
    let got = check_inversion(&parsed, &root, &ops, &root);
    assert!(matches!(got, Err(Failure::Proof(_))), "{got:?}");
}

/// An empty commit's diff may carry no block of the tree: before, its proof failed ("the MST
/// root is not in the CAR"), and its repo's next commit was marked `signature` only.
#[test]
fn an_empty_commit_is_proven_by_an_unchanged_tree_alone() {
    let (root, _) = forty_records();
    let no_blocks = car(&root, &[]);
    let parsed = Blocks::parse(&no_blocks).unwrap();
    assert_eq!(check_inversion(&parsed, &root, &[], &root), Ok(()));
    let other = value_cid(99);
    let got = check_inversion(&parsed, &root, &[], &other);
    assert!(matches!(got, Err(Failure::Proof(_))), "{got:?}");
}

/// Prefix compression lets each 16-byte entry rebuild the key before it plus a byte: one node
/// of N entries rebuilt N²/2 bytes of keys (gigabytes from a 2 MB block). A key longer than any
/// repo path is refused instead.
#[test]
fn mst_keys_longer_than_any_repo_path_are_refused() {
    let n = 3_000usize;
    let value = value_cid(1);
    let mut node = vec![0xa2, 0x61, b'e', 0x99];
    node.extend_from_slice(&(n as u16).to_be_bytes());
    let mut key: Vec<u8> = Vec::new();
    for i in 0..n {
        // A byte that keeps the longer key on layer 0.
        let b = (b'a'..=b'z').find(|&b| key_height(&[key.as_slice(), &[b]].concat()) == 0).unwrap();
        node.extend_from_slice(&[0xa4, 0x61, b'k', 0x41, b]);
        node.extend_from_slice(&[0x61, b'p', 0x19]);
        node.extend_from_slice(&(i as u16).to_be_bytes());
        node.extend_from_slice(&[0x61, b't', 0xf6, 0x61, b'v', 0xd8, 0x2a, 0x58, value.len() as u8 + 1, 0]);
        node.extend_from_slice(&value);
        key.push(b);
    }
    node.extend_from_slice(&[0x61, b'l', 0xf6]);
    let root = contrail_core::transcode::cid::dag_cbor_cid_of(&node);
    let bytes = car(&root, &[(root.clone(), node)]);
    let blocks = Blocks::parse(&bytes).unwrap();
    let got = PartialTree::load(&blocks, &root);
    assert!(matches!(got, Err(Failure::Proof(_))), "{:?}", got.map(|_| "loaded"));
}
