//! Sync 1.1 verification on real data: every commit of the shared corpus (production frames
//! from bsky.network) checked at `full` against the DID documents captured with it.

mod common;

use contrail_core::verify::{self, keys, Level, RepoFrame, RepoState};
use std::collections::HashMap;

#[test]
fn every_corpus_commit_verifies_in_full() {
    let Some(shared) = common::shared_dir("every_corpus_commit_verifies_in_full") else { return };
    let frames = contrail::framefile::read_frames(&shared.join("corpus/frames.bin.zst")).unwrap();
    let docs_raw = zstd::decode_all(std::fs::File::open(shared.join("corpus/did_docs.json.zst")).unwrap()).unwrap();
    let docs: HashMap<String, serde_json::Value> = serde_json::from_slice(&docs_raw).unwrap();
    let mut chain: HashMap<String, RepoState> = HashMap::new();
    let (mut commits, mut syncs, mut chained) = (0, 0, 0);
    for frame in &frames {
        match verify::read_frame(frame).unwrap() {
            Some(RepoFrame::Commit(c)) => {
                let doc = docs.get(c.repo).unwrap_or_else(|| panic!("no DID document for {}", c.repo));
                let key = keys::atproto_key(c.repo, doc).unwrap();
                let checked = verify::check_commit(&c, &key, Level::Full)
                    .unwrap_or_else(|e| panic!("seq {}: {} failed: {e}", c.seq, c.repo));
                assert!(checked.proven, "seq {}: no proof", c.seq);
                let state = checked.state;
                if let Some(last) = chain.get(c.repo) {
                    verify::check_chain(Some(last), &c.link()).unwrap();
                    chained += 1;
                }
                chain.insert(c.repo.to_string(), state);
                commits += 1;
            }
            Some(RepoFrame::Sync(s)) => {
                let key = keys::atproto_key(s.did, &docs[s.did]).unwrap();
                verify::check_sync(&s, &key).unwrap();
                syncs += 1;
            }
            None => {}
        }
    }
    println!("{commits} commits verified in full ({chained} continuing an earlier one), {syncs} syncs");
    assert!(commits >= 90, "only {commits} commits in the corpus");
}

// ---------------------------------------------------------------------------------------------
// End to end: the real binary, a fake relay of signed repos, a PLC-style directory.

use common::process::{inspect_log, Serve};
use common::relay::FakeRelay;
use common::signed::{did_doc, record, with_seq, Answer, Op, Plc, SignedRepo, Signer, Tamper};
use std::time::{Duration, Instant};

const ALICE: &str = "did:plc:aliceaaaaaaaaaaaaaaaaaaa";
const BOB: &str = "did:plc:bobbbbbbbbbbbbbbbbbbbbbb";
const CAROL: &str = "did:plc:carolcccccccccccccccccccc";
const DAVE: &str = "did:plc:davedddddddddddddddddddd";
const ERIN: &str = "did:plc:erineeeeeeeeeeeeeeeeeeee";

fn post(n: &str) -> String {
    format!("app.bsky.feed.post/{n}")
}

/// `(did, operation, rkey)` of every commit event in the log, in order.
fn stored_commits(dir: &std::path::Path) -> Vec<(String, String, String)> {
    inspect_log(dir)
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "commit")
        .map(|v| {
            (
                v["did"].as_str().unwrap().to_string(),
                v["commit"]["operation"].as_str().unwrap().to_string(),
                v["commit"]["rkey"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn failures(serve: &Serve, reason: &str) -> f64 {
    serve.metric(&format!("contrail_verify_failures_total{{reason=\"{reason}\"}}")).unwrap()
}

/// Compacts a stopped `serve`'s verification state as the store does when it will, with the
/// default `--verify-state-ttl` ageing chain states by their revs.
fn compact_verification_state(dir: &std::path::Path) {
    use clap::Parser;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        verify: contrail::verify::VerifyConfig,
    }
    let expiry = Flags::parse_from(["verify"]).verify.state_expiry();
    let options = contrail::log::rocks::RocksOptions { state_expiry: expiry, ..Default::default() };
    contrail::log::rocks::RocksLog::open(dir, options).unwrap().compact_state().unwrap();
}

/// `(rkey, verification mark)` of the first `n` commit events of a replay from the start.
async fn commit_marks(serve: &Serve, n: usize) -> Vec<(String, String)> {
    use common::client::{connect, next, Msg};
    let mut ws = connect(serve.public, "/subscribe?cursor=0&includeVerification=true", &[]).await.unwrap();
    let mut marks = Vec::new();
    while marks.len() < n {
        let Some(Msg::Text(t)) = next(&mut ws, Duration::from_secs(5)).await else { panic!("no event") };
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        if v["kind"] == "commit" {
            marks.push((v["commit"]["rkey"].as_str().unwrap().into(), v["verification"].as_str().unwrap().into()));
        }
    }
    marks
}

/// A directory that serves alice's key, a relay, and alice.
async fn alice_and_her_directory() -> (Plc, FakeRelay, SignedRepo) {
    let plc = Plc::start().await;
    let alice = SignedRepo::new(ALICE, Signer::k256(1));
    plc.set(ALICE, Answer::Doc(alice.did_doc()));
    (plc, FakeRelay::start().await, alice)
}

/// Pushes each frame to the relay under the next seq (1, 2, …); returns it.
fn pusher(relay: &FakeRelay) -> impl FnMut(Vec<u8>) -> i64 + '_ {
    pusher_after(relay, 0)
}

/// Pushes each frame to the relay under the next seq after `seq`; returns it.
fn pusher_after(relay: &FakeRelay, mut seq: i64) -> impl FnMut(Vec<u8>) -> i64 + '_ {
    move |frame| {
        seq += 1;
        relay.push(seq, with_seq(&frame, seq));
        seq
    }
}

fn ev(did: &str, op: &str, rkey: &str) -> (String, String, String) {
    (did.to_string(), op.to_string(), rkey.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_verification_drops_each_forgery_and_nothing_else() {
    let plc = Plc::start().await;
    let relay = FakeRelay::start().await;
    let mut alice = SignedRepo::new(ALICE, Signer::k256(1));
    let mut bob = SignedRepo::new(BOB, Signer::p256(2));
    let mut carol = SignedRepo::new(CAROL, Signer::k256(3));
    let mut dave = SignedRepo::new(DAVE, Signer::k256(4));
    let mut erin = SignedRepo::new(ERIN, Signer::k256(6));
    for r in [&alice, &bob, &dave, &erin] {
        plc.set(&r.did, Answer::Doc(r.did_doc()));
    }
    // Carol's DID is unknown to the directory (404).
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    push(alice.commit(0, &create("a1"), Tamper::None));
    push(bob.commit(0, &create("b1"), Tamper::None));
    let a2 = alice.commit(0, &create("a2"), Tamper::None);
    push(a2.clone());
    push(alice.commit(0, &create("ax1"), Tamper::FlipSig));
    push(bob.commit(0, &create("b2"), Tamper::None));
    push(alice.commit(0, &create("ax2"), Tamper::SwapRecord));
    push(alice.commit(0, &create("ax3"), Tamper::WrongPrevData));
    push(alice.commit(0, &create("ax4"), Tamper::ExtraOp));
    push(alice.commit(0, &[Op::Update(post("a1"), record("a1 stripped"))], Tamper::StripProof));
    push(alice.commit(0, &[Op::Update(post("a1"), record("a1 edited"))], Tamper::None));
    push(alice.commit(0, &[Op::Delete(post("a2"))], Tamper::None));
    push(carol.commit(0, &create("c1"), Tamper::None));
    push(erin.commit(0, &create("e1"), Tamper::OtherKey));
    let d1 = push(dave.commit(0, &create("d1"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "2s"];
    let mut serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(d1, Duration::from_secs(30));
    // Dave rotates his key (the directory serves the new one from now on); his next commit
    // fails against the cached key, which is re-resolved once.
    dave.signer = Signer::k256(5);
    plc.set(DAVE, Answer::Doc(dave.did_doc()));
    push(dave.commit(0, &create("d2"), Tamper::None));
    // Bob's b3 never reaches us: b4 breaks his chain; b5 continues from b4 and re-anchors.
    let _lost = bob.commit(0, &create("b3"), Tamper::None);
    push(bob.commit(0, &create("b4"), Tamper::None));
    push(bob.commit(0, &create("b5"), Tamper::None));
    // A replay of alice's a2 under a new seq.
    push(a2);
    let last = push(alice.commit(0, &create("a3"), Tamper::None));

    serve.wait_for_seq(last, Duration::from_secs(30));
    let expected = vec![
        ev(ALICE, "create", "a1"),
        ev(BOB, "create", "b1"),
        ev(ALICE, "create", "a2"),
        ev(BOB, "create", "b2"),
        ev(ALICE, "update", "a1"),
        ev(ALICE, "delete", "a2"),
        ev(CAROL, "create", "c1"),
        ev(DAVE, "create", "d1"),
        ev(DAVE, "create", "d2"),
        ev(BOB, "create", "b5"),
        ev(ALICE, "create", "a3"),
    ];
    assert_eq!(failures(&serve, "signature"), 2.0, "the flipped byte and erin's other key");
    // Erin's commit failed against a key resolved for its check: her document is not asked for
    // again (it was, at once: a forged commit of a repo not cached cost two requests).
    assert_eq!(plc.requests(ERIN), 1);
    assert_eq!(
        failures(&serve, "proof"),
        4.0,
        "swapped record, wrong prevData, op missing from the tree, proof stripped"
    );
    assert_eq!(failures(&serve, "chain"), 2.0, "bob's gap and the replay");
    assert_eq!(failures(&serve, "resolve"), 1.0, "carol");
    assert_eq!(failures(&serve, "malformed"), 0.0);
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(11.0 - 1.0));
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"unresolved\"}"), Some(1.0));
    assert_eq!(serve.metric("contrail_verify_dropped_events_total"), Some(9.0));
    let (code, status) = common::process::http_get(serve.public, "/status").unwrap();
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["verification"]["mode"], "full");
    assert_eq!(status["verification"]["failures"]["proof"], 4);
    // Bob's gap, and alice's forgeries (a failed commit might have been her real next one).
    assert_eq!(status["verification"]["desynchronized"], 2);
    {
        let marks: Vec<String> = commit_marks(&serve, expected.len()).await.into_iter().map(|(_, m)| m).collect();
        // `full` only where the commit continues a verified one: a repo's first commit, and the
        // first after a break (bob's b5, alice's edit after her forgeries), are `signature`.
        let want = [
            "signature",  // a1
            "signature",  // b1
            "full",       // a2
            "full",       // b2
            "signature",  // a1 edited, after alice's failed commits
            "full",       // a2 deleted
            "unresolved", // c1
            "signature",  // d1
            "full",       // d2
            "signature",  // b5
            "full",       // a3
        ];
        assert_eq!(marks, want);
    }
    serve.kill9();
    assert_eq!(stored_commits(dir.path()), expected);

    // The chain state survived the kill with the events: a4 continues it, a6 (a5 lost) breaks
    // it. Keys come from the store's cache: no new directory request for alice.
    // Alice's key: resolved once, and, after the flipped signature, once more when that
    // commit's check joined the request a1's had begun (the key might have rotated just
    // before); not when its check began first (the key is then as new as the commit).
    let alices = plc.requests(ALICE);
    assert!((1..=2).contains(&alices), "{alices} requests for alice's key");
    assert_eq!(plc.requests(DAVE), 2, "dave's key was re-resolved once, after the rotation");
    push(alice.commit(0, &create("a4"), Tamper::None));
    let _lost = alice.commit(0, &create("a5"), Tamper::None);
    let last = push(alice.commit(0, &create("a6"), Tamper::None));
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last, Duration::from_secs(30));
    assert_eq!(failures(&serve, "chain"), 1.0, "a6 does not continue a4: {}", serve.logs());
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(1.0));
    drop(serve);
    assert_eq!(plc.requests(ALICE), alices, "alice's key came from the store after the restart");
    let stored = stored_commits(dir.path());
    assert_eq!(stored.last(), Some(&ev(ALICE, "create", "a4")));
}

/// A catch-up across a key rotation: commits a repo made (by their signed rev) before it rotated
/// its key are checked against the key it had then (from its PLC audit log), not dropped as
/// forgeries; after the rotation only the new key signs; a key rotated away from days ago signs
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_from_before_a_key_rotation_verify_against_the_key_of_their_time() {
    let plc = Plc::start().await;
    let relay = FakeRelay::start().await;
    let now = contrail::clock::now_us();
    let (hour, day) = (3_600_000_000u64, 86_400_000_000u64);
    let at = |us: u64| contrail_core::v2::rfc3339_micros(us);
    // The directory serves the new keys by now; the audit logs have both.
    let op = |did: &str, key: &Signer, at: String| {
        serde_json::json!({"did": did, "cid": "bafy", "nullified": false, "createdAt": at, "operation":
            {"type": "plc_operation", "verificationMethods": {"atproto": key.public().to_did_key()}}})
    };
    let rotated = |did: &str, old: &Signer, new: &Signer, when: u64| {
        plc.set(did, Answer::Doc(did_doc(did, &new.public())));
        plc.set(
            &format!("{did}/log/audit"),
            Answer::Doc(serde_json::json!([op(did, old, at(now - 30 * day)), op(did, new, at(when))])),
        );
    };
    // Alice rotated an hour ago; Bob four days ago.
    let (old, new) = (Signer::k256(1), Signer::k256(7));
    rotated(ALICE, &old, &new, now - hour);
    rotated(BOB, &Signer::k256(2), &Signer::k256(8), now - 4 * day);
    let mut alice = SignedRepo::new(ALICE, old.clone());
    let mut bob = SignedRepo::new(BOB, Signer::k256(2));
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    // Made two hours ago with the old key.
    alice.made_at(now - 2 * hour);
    push(alice.commit(0, &create("a1"), Tamper::None));
    push(alice.commit(0, &create("a2"), Tamper::None));
    // Whoever holds the old key, with a rev from before the rotation: it passes `signature`
    // (it cannot be told from the repo's own), and alice's next commit does not continue it.
    let mut leaked = alice.clone();
    leaked.made_at(now - 3 * hour / 2);
    push(leaked.commit(0, &create("af"), Tamper::None));
    // Made after the rotation: the new key; the old one is a forgery.
    alice.signer = new;
    alice.made_at(now - hour / 2);
    push(alice.commit(0, &create("a3"), Tamper::None));
    let mut stale = alice.clone();
    stale.signer = old;
    push(stale.commit(0, &create("ax"), Tamper::None));
    push(alice.commit(0, &create("a4"), Tamper::None));
    // Made five days ago with a key replaced four days ago: too long ago.
    bob.made_at(now - 5 * day);
    let last = push(bob.commit(0, &create("b1"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "2s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last, Duration::from_secs(30));
    let want: Vec<_> = ["a1", "a2", "af", "a3", "a4"].iter().map(|n| ev(ALICE, "create", n)).collect();
    assert_eq!(stored_commits(dir.path()), want, "logs:\n{}", serve.logs());
    assert_eq!(failures(&serve, "signature"), 2.0);
    assert_eq!(failures(&serve, "chain"), 0.0, "a3 is not a break after af");
    let marks = commit_marks(&serve, 5).await;
    // a2 continues a1, but only a key the repo rotated away from signs it: whoever holds
    // that key may not be the repo, so it is not `full` (it was). So af. a3, signed with the
    // new key, does not continue af: it anchors again (before, it was dropped as a break in the
    // chain: the leaked key's commit cost the repo its real one). a4 anchors again: the
    // forgery before it might have been the repo's real next commit.
    let mark = |n: &str, m: &str| (n.to_string(), m.to_string());
    let want = ["a1", "a2", "af", "a3", "a4"].map(|n| mark(n, "signature")).to_vec();
    assert_eq!(marks, want);
    assert_eq!(plc.requests(&format!("{ALICE}/log/audit")), 1, "the audit log is asked for once");
    assert_eq!(serve.metric("contrail_did_key_histories_total{result=\"ok\"}"), Some(2.0), "Alice's and Bob's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pass_keeps_failed_events_and_counts_them() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    relay.push(1, with_seq(&alice.commit(0, &[Op::Create(post("a1"), record("1"))], Tamper::None), 1));
    relay.push(2, with_seq(&alice.commit(0, &[Op::Create(post("ax"), record("x"))], Tamper::FlipSig), 2));
    relay.push(3, with_seq(&alice.commit(0, &[Op::Create(post("a2"), record("2"))], Tamper::None), 3));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "signature", "--on-verify-failure", "pass", "--plc-url", &plc.url()];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(3, Duration::from_secs(30));
    assert_eq!(failures(&serve, "signature"), 1.0);
    assert_eq!(serve.metric("contrail_verify_dropped_events_total"), Some(0.0));

    // Subscribers that ask see what was verified; the others see Jetstream v1's JSON as ever.
    use common::client::{connect, next, Msg};
    let t = Duration::from_secs(5);
    let mut plain = connect(serve.public, "/subscribe?cursor=0", &[]).await.unwrap();
    let mut asked = connect(serve.public, "/subscribe?cursor=0&includeVerification=true", &[]).await.unwrap();
    let mut zstd =
        connect(serve.public, "/subscribe?cursor=0&includeVerification=true&compress=true", &[]).await.unwrap();
    let mut dec = zstd::bulk::Decompressor::with_dictionary(contrail::hub::compress::JETSTREAM_V1).unwrap();
    for (rkey, want) in [("a1", "signature"), ("ax", "failed"), ("a2", "signature")] {
        let Some(Msg::Text(p)) = next(&mut plain, t).await else { panic!("no event") };
        let Some(Msg::Text(a)) = next(&mut asked, t).await else { panic!("no event") };
        let Some(Msg::Binary(z)) = next(&mut zstd, t).await else { panic!("no event") };
        let z = String::from_utf8(dec.decompress(&z, 1 << 20).unwrap()).unwrap();
        assert!(!p.contains("verification"), "{p}");
        assert_eq!(a, z);
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(v["commit"]["rkey"], rkey);
        assert_eq!(v["verification"], want, "{a}");
        assert_eq!(a, format!("{},\"verification\":\"{want}\"}}", &p[..p.len() - 1]), "the field is added last");
    }
    drop(serve);
    let rkeys: Vec<String> = stored_commits(dir.path()).into_iter().map(|(_, _, r)| r).collect();
    assert_eq!(rkeys, ["a1", "ax", "a2"]);
}

/// An `#identity` frame the transcoder drops (here its `time` cannot be read) still announces
/// that the repo's key may have changed: the key is resolved again for its next commit. Before,
/// only an event the transcoder made dropped it, and a rotated-away key stayed in use for up to
/// the cache's day.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_frame_the_transcoder_drops_still_has_the_key_resolved_again() {
    use common::frames::identity_frame_at;
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let commit = |alice: &mut SignedRepo, n: &str| alice.commit(0, &[Op::Create(post(n), record(n))], Tamper::None);
    relay.push(1, with_seq(&commit(&mut alice, "a1"), 1));
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(dir.path(), &relay.url(), &["--verify", "full", "--plc-url", &plc.url()]);
    serve.wait_for_seq(1, Duration::from_secs(30));
    let asked = plc.requests(ALICE);
    relay.push(2, identity_frame_at(2, ALICE, None, "not a time"));
    serve.wait_for_seq(2, Duration::from_secs(30));
    relay.push(3, with_seq(&commit(&mut alice, "a2"), 3));
    serve.wait_for_seq(3, Duration::from_secs(30));
    assert_eq!(plc.requests(ALICE), asked + 1, "alice's key resolved again; logs:\n{}", serve.logs());
    let dropped = serve.metric("contrail_drops_total{reason=\"bad_time\"}");
    assert_eq!(dropped, Some(1.0), "the #identity was dropped");
    let marks = commit_marks(&serve, 2).await;
    assert_eq!(marks, [("a1", "signature"), ("a2", "full")].map(|(r, m)| (r.to_string(), m.to_string())));
}

/// A commit passed unverified (its key could not be had) may be the repo's real next commit:
/// the one after it names it in `since`. That one must re-anchor the chain, not be dropped as a
/// chain break; and a repo's first verified commit is marked `signature`, not `full` (its
/// `prevData` continues nothing, so its op list is not proven complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_passed_unresolved_does_not_break_the_next_ones_chain() {
    use common::frames::identity_frame;
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let commit = |alice: &mut SignedRepo, n: &str| alice.commit(0, &[Op::Create(post(n), record(n))], Tamper::None);
    relay.push(1, with_seq(&commit(&mut alice, "a1"), 1));
    relay.push(2, with_seq(&commit(&mut alice, "a2"), 2));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "2s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(2, Duration::from_secs(30));
    // An #identity event drops alice's key while the directory fails: a3 passes unresolved.
    plc.set(ALICE, Answer::Status(500));
    relay.push(3, identity_frame(3, ALICE, Some("alice.test")));
    serve.wait_for_seq(3, Duration::from_secs(30));
    relay.push(4, with_seq(&commit(&mut alice, "a3"), 4));
    serve.wait_for_seq(4, Duration::from_secs(30));
    // The directory is back (another #identity clears the remembered failure); a4 follows a3.
    plc.set(ALICE, Answer::Doc(alice.did_doc()));
    relay.push(5, identity_frame(5, ALICE, Some("alice.test")));
    // (A frame's key is looked up when it arrives, an #identity applied when it is passed on:
    // a4 must arrive after.)
    serve.wait_for_seq(5, Duration::from_secs(30));
    relay.push(6, with_seq(&commit(&mut alice, "a4"), 6));
    relay.push(7, with_seq(&commit(&mut alice, "a5"), 7));
    serve.wait_for_seq(7, Duration::from_secs(30));
    assert_eq!(failures(&serve, "resolve"), 1.0, "{}", serve.logs());
    assert_eq!(failures(&serve, "chain"), 0.0, "a4 re-anchors the chain a3 left unverified");
    assert_eq!(serve.metric("contrail_verify_desynchronized_total"), Some(1.0));
    let marks = commit_marks(&serve, 5).await;
    let want = [("a1", "signature"), ("a2", "full"), ("a3", "unresolved"), ("a4", "signature"), ("a5", "full")];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())));
    drop(serve);
    let rkeys: Vec<String> = stored_commits(dir.path()).into_iter().map(|(_, _, r)| r).collect();
    assert_eq!(rkeys, ["a1", "a2", "a3", "a4", "a5"]);
}

/// A rev far ahead of the clock (a PDS clock bug, a stolen key) must not move a repo's chain:
/// a rev only moves forward, so every later commit would be refused as "not after" it, for
/// good. It is refused, and the repo's next real commit continues the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rev_far_ahead_of_the_clock_does_not_take_the_chain_with_it() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    alice.made_at(now);
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    push(alice.commit(0, &create("a1"), Tamper::None));
    // Signed by alice, made "two days from now", prevData continuing a1.
    let mut ahead = alice.clone();
    ahead.made_at(now + 2 * 86_400_000_000);
    push(ahead.commit(0, &create("ax"), Tamper::None));
    push(alice.commit(0, &create("a2"), Tamper::None));
    push(alice.commit(0, &create("a3"), Tamper::None));
    // The repo's real next commit is the one ahead (its PDS's clock jumped, then came back):
    // refused, and the commit after it, which continues it, anchors the chain again.
    alice.made_at(now + 2 * 86_400_000_000);
    push(alice.commit(0, &create("a4x"), Tamper::None));
    alice.made_at(now);
    push(alice.commit(0, &create("a5"), Tamper::None));
    let last = push(alice.commit(0, &create("a6"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "2s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last, Duration::from_secs(30));
    assert_eq!(failures(&serve, "chain"), 2.0, "the two revs ahead, and only they: {}", serve.logs());
    let marks = commit_marks(&serve, 5).await;
    // a2 anchors again too: the refused commit before it might have been the repo's real next.
    let want = [("a1", "signature"), ("a2", "signature"), ("a3", "full"), ("a5", "signature"), ("a6", "full")];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())));
}

/// `full` says subscribers saw all of the repo since the last anchor. A commit the transcoder
/// dropped an op of (its record block stripped by the relay) or all of (a `time` that does not
/// parse, a CAR cut short) moves the repo on, but subscribers did not see all of it: its
/// events, and the repo's next commit, are `signature`; the one after is `full` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_subscribers_did_not_see_whole_is_not_called_full() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    push(alice.commit(0, &create("a1"), Tamper::None));
    push(alice.commit(0, &create("a2"), Tamper::None));
    // The relay strips a3b's record block: a3 arrives, a3b does not.
    let two = [create("a3"), create("a3b")].concat();
    push(alice.clone().commit(0, &two, Tamper::StripRecordBlock));
    alice.commit(0, &two, Tamper::None);
    push(alice.commit(0, &create("a4"), Tamper::None));
    push(alice.commit(0, &create("a5"), Tamper::None));
    // A commit whose whole frame the transcoder drops.
    push(alice.clone().commit(0, &create("a6"), Tamper::BadTime));
    alice.commit(0, &create("a6"), Tamper::None);
    push(alice.commit(0, &create("a7"), Tamper::None));
    push(alice.commit(0, &create("a8"), Tamper::None));
    // One whose commit the verifier cannot read either (its CAR cut short): the frame still
    // names the repo, whose next commit anchors again. Before, that one failed as a chain
    // break (and was dropped), and only the one after it anchored.
    push(alice.clone().commit(0, &create("a9"), Tamper::TruncatedCar));
    alice.commit(0, &create("a9"), Tamper::None);
    push(alice.commit(0, &create("a10"), Tamper::None));
    let last = push(alice.commit(0, &create("a11"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "2s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last, Duration::from_secs(30));
    let marks = commit_marks(&serve, 9).await;
    let want = [
        ("a1", "signature"),
        ("a2", "full"),
        ("a3", "signature"),
        ("a4", "signature"),
        ("a5", "full"),
        ("a7", "signature"),
        ("a8", "full"),
        ("a10", "signature"),
        ("a11", "full"),
    ];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())), "{}", serve.logs());
    assert_eq!(failures(&serve, "chain"), 0.0, "each commit continues the one before");
    assert_eq!(failures(&serve, "malformed"), 1.0, "the cut CAR");
}

/// A `#sync` that fails its check (here its signature; in life, checked against a key its
/// repo's `#identity` had just replaced) may still be the repo's real new state: its next
/// commit, which continues it, anchors again rather than being dropped as a chain break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_that_fails_its_check_does_not_break_the_next_commits_chain() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    push(alice.commit(0, &create("a1"), Tamper::None));
    push(alice.commit(0, &create("a2"), Tamper::None));
    push(alice.sync(0, Tamper::FlipSig));
    alice.sync(0, Tamper::None);
    push(alice.commit(0, &create("a3"), Tamper::None));
    let last = push(alice.commit(0, &create("a4"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "2s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(last, Duration::from_secs(30));
    let marks = commit_marks(&serve, 4).await;
    let want = [("a1", "signature"), ("a2", "full"), ("a3", "signature"), ("a4", "full")];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())), "{}", serve.logs());
    assert_eq!((failures(&serve, "signature"), failures(&serve, "chain")), (1.0, 0.0));
}

/// An op the verifier cannot read (an unknown action) drops that op, not the commit: the
/// transcoder skips it, `signature` checks no ops; `full` cannot undo it, so the commit fails
/// its proof (not "malformed").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_op_drops_the_op_not_the_commit() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    relay.push(1, with_seq(&alice.commit(0, &[Op::Create(post("a1"), record("1"))], Tamper::None), 1));
    relay.push(2, with_seq(&alice.commit(0, &[Op::Create(post("a2"), record("2"))], Tamper::UnknownOp), 2));
    for (mode, stored, proof) in [("signature", vec!["a1", "a2"], 0.0), ("full", vec!["a1"], 1.0)] {
        let dir = tempfile::tempdir().unwrap();
        let serve = Serve::start(dir.path(), &relay.url(), &["--verify", mode, "--plc-url", &plc.url()]);
        serve.wait_for_seq(2, Duration::from_secs(30));
        assert_eq!(failures(&serve, "malformed"), 0.0, "{mode}");
        assert_eq!(failures(&serve, "proof"), proof, "{mode}");
        drop(serve);
        let rkeys: Vec<String> = stored_commits(dir.path()).into_iter().map(|(_, _, r)| r).collect();
        assert_eq!(rkeys, stored, "{mode}");
    }
}

/// A run without chain checks (`--verify off` or `signature`) lets repos move on unseen: the
/// next `full` run must not take their stored chain states as the last commit (each active
/// repo's first commit would fail as a chain break and be dropped). It anchors them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_after_one_without_chain_checks_anchors_repos_again() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let push = |alice: &mut SignedRepo, seq: i64, n: &str| {
        relay.push(seq, with_seq(&alice.commit(0, &[Op::Create(post(n), record(n))], Tamper::None), seq));
    };
    let dir = tempfile::tempdir().unwrap();
    let full = ["--verify", "full", "--plc-url", &plc.url()];
    push(&mut alice, 1, "a1");
    push(&mut alice, 2, "a2");
    let serve = Serve::start(dir.path(), &relay.url(), &full);
    serve.wait_for_seq(2, Duration::from_secs(30));
    drop(serve);
    for mode in ["off", "signature"] {
        let n = if mode == "off" { 3 } else { 5 };
        push(&mut alice, n, &format!("a{n}"));
        let serve = Serve::start(dir.path(), &relay.url(), &["--verify", mode, "--plc-url", &plc.url()]);
        serve.wait_for_seq(n, Duration::from_secs(30));
        drop(serve);
        push(&mut alice, n + 1, &format!("a{}", n + 1));
        let serve = Serve::start(dir.path(), &relay.url(), &full);
        serve.wait_for_seq(n + 1, Duration::from_secs(30));
        assert_eq!(failures(&serve, "chain"), 0.0, "after a run with --verify {mode}: {}", serve.logs());
        drop(serve);
    }
    // Restarting in full after full changes nothing: a7 continues a6. Even when the store has
    // compacted the chain states in between, as it does when it will (restarts add files).
    compact_verification_state(dir.path());
    push(&mut alice, 7, "a7");
    let serve = Serve::start(dir.path(), &relay.url(), &full);
    serve.wait_for_seq(7, Duration::from_secs(30));
    let marks: Vec<String> = commit_marks(&serve, 7).await.into_iter().map(|(_, m)| m).collect();
    let want = ["signature", "full", "none", "signature", "signature", "signature", "full"];
    assert_eq!(marks, want, "a4 and a6 anchor again; a7 continues: {}", serve.logs());
    drop(serve);
    let rkeys: Vec<String> = stored_commits(dir.path()).into_iter().map(|(_, _, r)| r).collect();
    assert_eq!(rkeys, ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]);
}

/// A run without chain checks served its commits unchecked: a repo's next commit after it is
/// not `full` even when it continues the state from before (a repo restored from a backup
/// continues an old state, not what subscribers were sent). Unlike after a seq gap, which
/// subscribers did not see past either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_continuing_a_state_from_before_a_run_without_chain_checks_is_not_full() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let mut push = pusher(&relay);
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let dir = tempfile::tempdir().unwrap();
    let full = ["--verify", "full", "--plc-url", &plc.url()];
    push(alice.commit(0, &create("a1"), Tamper::None));
    let seq = push(alice.commit(0, &create("a2"), Tamper::None));
    let serve = Serve::start(dir.path(), &relay.url(), &full);
    serve.wait_for_seq(seq, Duration::from_secs(30));
    drop(serve);
    let serve = Serve::start(dir.path(), &relay.url(), &["--verify", "signature", "--plc-url", &plc.url()]);
    serve.wait_for_seq(seq, Duration::from_secs(30));
    drop(serve);
    push(alice.commit(0, &create("a3"), Tamper::None));
    let seq = push(alice.commit(0, &create("a4"), Tamper::None));
    let serve = Serve::start(dir.path(), &relay.url(), &full);
    serve.wait_for_seq(seq, Duration::from_secs(30));
    let marks: Vec<String> = commit_marks(&serve, 4).await.into_iter().map(|(_, m)| m).collect();
    assert_eq!(marks, ["signature", "full", "signature", "full"], "{}", serve.logs());
    assert_eq!(failures(&serve, "chain"), 0.0);
}

/// A gap the relay reader knows of (its seq jumped: the relay skipped a taken-down event, or a
/// frame it could not read; a relay that reset) may hold any repo's commits. A repo whose next
/// commit does not continue its chain anchors again (`signature`) instead of being dropped as
/// a chain break; one whose next commit continues it is still `full`. The gap is stored with
/// the frame after it, so a restart before the repos' next commits keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_gap_anchors_the_repos_that_moved_in_it_and_only_them() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let mut bob = SignedRepo::new(BOB, Signer::p256(2));
    plc.set(BOB, Answer::Doc(bob.did_doc()));
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let push = |seq: i64, frame: Vec<u8>| relay.push(seq, with_seq(&frame, seq));
    push(1, alice.commit(0, &create("a1"), Tamper::None));
    push(2, bob.commit(0, &create("b1"), Tamper::None));
    push(3, alice.commit(0, &create("a2"), Tamper::None));
    // Seq 4, alice's a3, is not on the relay.
    let _skipped = alice.commit(0, &create("a3"), Tamper::None);
    push(5, bob.commit(0, &create("b2"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url()];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(5, Duration::from_secs(30));
    drop(serve);
    push(6, alice.commit(0, &create("a4"), Tamper::None));
    push(7, alice.commit(0, &create("a5"), Tamper::None));
    push(8, bob.commit(0, &create("b3"), Tamper::None));
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(8, Duration::from_secs(30));
    assert_eq!(failures(&serve, "chain"), 0.0, "{}", serve.logs());
    assert_eq!(serve.metric("contrail_verify_desynchronized_total"), Some(1.0), "alice's a4");
    let marks = commit_marks(&serve, 7).await;
    let want = [
        ("a1", "signature"),
        ("b1", "signature"),
        ("a2", "full"),
        ("b2", "full"),
        ("a4", "signature"),
        ("a5", "full"),
        ("b3", "full"),
    ];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())), "{}", serve.logs());
}

/// A burst of commits right after a key rotation (an account that moved to a new PDS posts at
/// once): each is checked on its own against the cached old key and fails together; the first
/// re-resolves, and the others take its answer rather than failing (they used to, each counted
/// a forgery and dropped, while the directory was still answering the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_commits_after_a_key_rotation_verifies_with_one_request() {
    let plc = Plc::start().await;
    let relay = FakeRelay::start().await;
    let mut dave = SignedRepo::new(DAVE, Signer::k256(4));
    plc.set(DAVE, Answer::Doc(dave.did_doc()));
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    let d1 = push(dave.commit(0, &create("d1"), Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "5s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(d1, Duration::from_secs(30));
    // The new key, which the directory takes half a second to give.
    dave.signer = Signer::k256(5);
    plc.set(DAVE, Answer::Slow(Duration::from_millis(500), did_doc(DAVE, &dave.signer.public())));
    let mut last = 0;
    for i in 2..=20 {
        last = push(dave.commit(0, &create(&format!("d{i}")), Tamper::None));
    }
    serve.wait_for_seq(last, Duration::from_secs(30));
    assert_eq!(failures(&serve, "signature"), 0.0, "{}", serve.logs());
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(20.0));
    assert_eq!(plc.requests(DAVE), 2, "resolved once, and once again after the rotation");
    // A forgery re-resolves the key (the same one), then the repo announces a new key with an
    // #identity event and a burst follows: the re-resolve minutes ago does not stop another.
    push(dave.commit(0, &create("forged"), Tamper::FlipSig));
    dave.signer = Signer::k256(6);
    plc.set(DAVE, Answer::Slow(Duration::from_millis(500), did_doc(DAVE, &dave.signer.public())));
    push(common::frames::identity_frame(0, DAVE, None));
    for i in 21..=40 {
        last = push(dave.commit(0, &create(&format!("d{i}")), Tamper::None));
    }
    serve.wait_for_seq(last, Duration::from_secs(30));
    assert_eq!(failures(&serve, "signature"), 1.0, "the forgery alone: {}", serve.logs());
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(40.0));
    drop(serve);
    assert_eq!(stored_commits(dir.path()).len(), 40);
}

/// A commit whose check joined a request for the key begun before it came may get a key its
/// repo has replaced since (its `#identity` not seen): it is asked again. (A first version of
/// "not asked again when resolved for this check" compared wall-clock times, and took the
/// joined request's answer, which came after the commit, for one made for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_joined_an_older_request_for_the_key_asks_again_when_it_fails() {
    let plc = Plc::start().await;
    let relay = FakeRelay::start().await;
    let mut dave = SignedRepo::new(DAVE, Signer::k256(4));
    plc.set(DAVE, Answer::Slow(Duration::from_millis(1500), dave.did_doc()));
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher(&relay);
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "5s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    push(dave.commit(0, &create("d1"), Tamper::None));
    // d1's request is on its way (answered with the old key in 1.5 s)...
    let deadline = Instant::now() + Duration::from_secs(20);
    while plc.requests(DAVE) == 0 {
        assert!(Instant::now() < deadline, "no request for dave's key: {}", serve.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...when he rotates his key and commits with the new one.
    dave.signer = Signer::k256(5);
    plc.set(DAVE, Answer::Doc(dave.did_doc()));
    let d2 = push(dave.commit(0, &create("d2"), Tamper::None));
    serve.wait_for_seq(d2, Duration::from_secs(30));
    assert_eq!(failures(&serve, "signature"), 0.0, "{}", serve.logs());
    assert_eq!(stored_commits(dir.path()), [ev(DAVE, "create", "d1"), ev(DAVE, "create", "d2")]);
    assert_eq!(plc.requests(DAVE), 2);
}

/// Alice and Dave in the directory, and their first commits, a1 and d1, on the relay; the seq
/// of the last.
async fn alice_and_dave_on_the_relay() -> (Plc, FakeRelay, SignedRepo, SignedRepo, i64) {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let mut dave = SignedRepo::new(DAVE, Signer::k256(4));
    plc.set(DAVE, Answer::Doc(dave.did_doc()));
    relay.push(1, with_seq(&alice.commit(0, &[Op::Create(post("a1"), record("a1"))], Tamper::None), 1));
    relay.push(2, with_seq(&dave.commit(0, &[Op::Create(post("d1"), record("d1"))], Tamper::None), 2));
    (plc, relay, alice, dave, 2)
}

/// A commit checked while an `#identity` of its repo waits in front of it (checks run ahead of
/// the in-order apply) was checked against the key that event may replace: it is checked
/// again. Alice rotates her key, and a commit signed with the old one after the rotation (whoever
/// holds a leaked key) is a forgery: it was `full`. Dave only changes his handle: his commit
/// stays `full`. Bob's slow key holds both in the queue while their first checks run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_checked_ahead_of_its_repos_identity_is_checked_again() {
    let (plc, relay, mut alice, mut dave, seq) = alice_and_dave_on_the_relay().await;
    let create = |n: &str| vec![Op::Create(post(n), record(n))];
    let mut push = pusher_after(&relay, seq);
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "5s"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(seq, Duration::from_secs(30));
    // Alice's directory now says her new key; the old one signs on.
    plc.set(ALICE, Answer::Doc(did_doc(ALICE, &Signer::k256(7).public())));
    let bob = SignedRepo::new(BOB, Signer::k256(2));
    plc.set(BOB, Answer::Slow(Duration::from_secs(1), did_doc(BOB, &bob.signer.public())));
    push(bob.clone().commit(0, &create("b1"), Tamper::None));
    push(common::frames::identity_frame(0, ALICE, None));
    push(alice.commit(0, &create("a2"), Tamper::None));
    push(common::frames::identity_frame(0, DAVE, Some("dave.example.com")));
    let seq = push(dave.commit(0, &create("d2"), Tamper::None));
    serve.wait_for_seq(seq, Duration::from_secs(30));
    assert_eq!(failures(&serve, "signature"), 1.0, "{}", serve.logs());
    let marks = commit_marks(&serve, 4).await;
    let want = [("a1", "signature"), ("d1", "signature"), ("b1", "signature"), ("d2", "full")];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())), "{}", serve.logs());
}

/// Bob's document takes a minute; alice's comes at once. On the relay: bob's b1, then 200 of
/// alice's commits; bob, and the last seq.
async fn a_slow_repo_then_200_commits() -> (Plc, FakeRelay, SignedRepo, i64) {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let mut bob = SignedRepo::new(BOB, Signer::k256(2));
    plc.set(BOB, Answer::Slow(Duration::from_secs(60), did_doc(BOB, &bob.signer.public())));
    relay.push(1, with_seq(&bob.commit(0, &[Op::Create(post("b1"), record("b"))], Tamper::None), 1));
    for i in 0..200 {
        let commit = alice.commit(0, &[Op::Create(post(&format!("a{i}")), record("a"))], Tamper::None);
        relay.push(2 + i, with_seq(&commit, 2 + i));
    }
    (plc, relay, bob, 201)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_directory_holds_one_repo_not_the_stream() {
    // The resolve timeout is 1 s.
    let (plc, relay, mut bob, seq) = a_slow_repo_then_200_commits().await;
    relay.push(seq + 1, with_seq(&bob.commit(0, &[Op::Create(post("b2"), record("b"))], Tamper::None), seq + 1));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "1s"];
    let started = Instant::now();
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(seq + 1, Duration::from_secs(30));
    let took = started.elapsed();
    // One timeout for bob's first commit (his second is answered from the failure cache), while
    // alice's resolve and verify behind it.
    // (The bound counts the process's start too: it tells seconds from the minutes a stream
    // held by each slow lookup would take, on a loaded machine.)
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(failures(&serve, "resolve"), 2.0);
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(200.0));
    assert_eq!(plc.requests(BOB), 1, "a failed DID is not asked again at once");
    drop(serve);
    let stored = stored_commits(dir.path());
    assert_eq!(stored.len(), 202, "bob's passed unverified (--on-resolve-failure pass)");
    assert_eq!(stored[0], ev(BOB, "create", "b1"));
}

/// A full verification queue behind a repo whose key is on its way from a slow host waits a
/// second for it, not the resolve timeout: repos whose hosts stall (did:web hosts are anyone's)
/// would otherwise hold ingest to the queue's length per timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_waits_a_second_for_a_slow_key_not_the_timeout() {
    let (plc, relay, _bob, seq) = a_slow_repo_then_200_commits().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "30s", "--verify-queue", "32"];
    let started = Instant::now();
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(seq, Duration::from_secs(60));
    let took = started.elapsed();
    // (Against the 30 s timeout; the process's start counted too.)
    assert!(took < Duration::from_secs(20), "took {took:?}: the queue waited for the timeout");
    assert_eq!(failures(&serve, "resolve"), 1.0, "bob's commit, given up");
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(200.0));
    drop(serve);
    let stored = stored_commits(dir.path());
    assert_eq!((stored.len(), &stored[0]), (201, &ev(BOB, "create", "b1")), "bob's passed unverified");
}

/// The same for the look for a newer key after a signature failed (the directory slow by then):
/// given up, the commit is a signature failure, not passed as unresolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gives_up_a_slow_re_resolve_as_a_signature_failure() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    relay.push(1, with_seq(&alice.commit(0, &[Op::Create(post("a0"), record("a"))], Tamper::None), 1));
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "30s", "--verify-queue", "32"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(1, Duration::from_secs(30));
    // Alice's key is cached; the directory turns slow; a forged commit, then 200 good ones.
    plc.set(ALICE, Answer::Slow(Duration::from_secs(60), alice.did_doc()));
    relay.push(2, with_seq(&alice.commit(0, &[Op::Create(post("ax"), record("x"))], Tamper::FlipSig), 2));
    let mut seq = 2;
    for i in 0..200 {
        seq = 3 + i;
        let commit = alice.commit(0, &[Op::Create(post(&format!("a{i}")), record("a"))], Tamper::None);
        relay.push(seq, with_seq(&commit, seq));
    }
    let started = Instant::now();
    serve.wait_for_seq(seq, Duration::from_secs(60));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}: the queue waited for the re-resolve");
    assert_eq!(failures(&serve, "signature"), 1.0, "{}", serve.logs());
    assert_eq!(failures(&serve, "resolve"), 0.0);
    drop(serve);
    assert!(!stored_commits(dir.path()).contains(&ev(ALICE, "create", "ax")), "the forgery was dropped");
}

/// A commit that passed ahead of its repo's `#identity`, checked again behind a full queue
/// while the directory is slow by then — for her key, or (her key replaced, so the commit fails
/// against it) for her key history: given up, it goes on as unresolved (it did pass with the
/// key it had), not as a signature failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_gives_up_a_passed_commits_second_check_as_unresolved() {
    for history_slow in [false, true] {
        let (plc, relay, mut alice, mut dave, seq) = alice_and_dave_on_the_relay().await;
        let create = |n: &str| vec![Op::Create(post(n), record(n))];
        let mut push = pusher_after(&relay, seq);
        let dir = tempfile::tempdir().unwrap();
        let flags =
            ["--verify", "full", "--plc-url", &plc.url(), "--did-resolve-timeout", "30s", "--verify-queue", "32"];
        let serve = Serve::start(dir.path(), &relay.url(), &flags);
        serve.wait_for_seq(seq, Duration::from_secs(30));
        // Bob's slow key holds alice's #identity and a2 in the queue while a2 passes with her
        // cached key.
        let bob = SignedRepo::new(BOB, Signer::k256(2));
        plc.set(BOB, Answer::Slow(Duration::from_secs(60), did_doc(BOB, &bob.signer.public())));
        if history_slow {
            plc.set(ALICE, Answer::Doc(did_doc(ALICE, &Signer::k256(7).public())));
            plc.set(&format!("{ALICE}/log/audit"), Answer::Slow(Duration::from_secs(60), serde_json::json!([])));
        } else {
            plc.set(ALICE, Answer::Slow(Duration::from_secs(60), alice.did_doc()));
        }
        push(bob.clone().commit(0, &create("b1"), Tamper::None));
        push(common::frames::identity_frame(0, ALICE, None));
        push(alice.commit(0, &create("a2"), Tamper::None));
        let mut seq = 0;
        for i in 2..=201 {
            seq = push(dave.commit(0, &create(&format!("d{i}")), Tamper::None));
        }
        serve.wait_for_seq(seq, Duration::from_secs(60));
        assert_eq!(failures(&serve, "signature"), 0.0, "history slow: {history_slow}: {}", serve.logs());
        assert_eq!(failures(&serve, "resolve"), 2.0, "bob's b1 and alice's a2");
        let marks = commit_marks(&serve, 4).await;
        let want = [("a1", "signature"), ("d1", "signature"), ("b1", "unresolved"), ("a2", "unresolved")];
        assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())), "{}", serve.logs());
        if history_slow {
            assert_eq!(plc.requests(&format!("{ALICE}/log/audit")), 1, "its second check waited for the history");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn did_web_keys_come_from_the_host() {
    // The directory stands in for the did:web host too: `GET /.well-known/did.json`.
    let host = Plc::start().await;
    let relay = FakeRelay::start().await;
    let did = format!("did:web:127.0.0.1%3A{}", host.addr.port());
    let mut web = SignedRepo::new(&did, Signer::p256(9));
    host.set(".well-known/did.json", Answer::Doc(web.did_doc()));
    relay.push(1, with_seq(&web.commit(0, &[Op::Create(post("w1"), record("w"))], Tamper::None), 1));
    relay.push(2, with_seq(&web.commit(0, &[Op::Create(post("wx"), record("x"))], Tamper::FlipSig), 2));
    let dir = tempfile::tempdir().unwrap();
    // --did-web-http: tests only (did:web is HTTPS on the network).
    let flags = ["--verify", "full", "--plc-url", "http://127.0.0.1:9", "--did-web-http"];
    let serve = Serve::start(dir.path(), &relay.url(), &flags);
    serve.wait_for_seq(2, Duration::from_secs(30));
    assert_eq!(serve.metric("contrail_verify_commits_total{result=\"verified\"}"), Some(1.0), "{}", serve.logs());
    assert_eq!(failures(&serve, "signature"), 1.0);
    drop(serve);
    assert_eq!(stored_commits(dir.path()), vec![ev(&did, "create", "w1")]);
}

/// `did:web` hosts that hold their requests to the timeout (anyone can run them, under many
/// names) use `did:web`'s own slots (a quarter, at least one), not the directory's: here one
/// is in flight while the other waits, and the `did:plc` repo's key is looked up meanwhile.
/// Before, the two took both of the two slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalling_did_web_hosts_do_not_take_the_directorys_slots() {
    let (plc, relay, mut alice) = alice_and_her_directory().await;
    let mut push = pusher(&relay);
    let mut hosts = Vec::new();
    for (i, rkey) in ["w1", "w2"].into_iter().enumerate() {
        let host = Plc::start().await;
        let did = format!("did:web:127.0.0.1%3A{}", host.addr.port());
        let mut web = SignedRepo::new(&did, Signer::p256(20 + i as u8));
        host.set(".well-known/did.json", Answer::Slow(Duration::from_secs(60), web.did_doc()));
        push(web.commit(0, &[Op::Create(post(rkey), record(rkey))], Tamper::None));
        hosts.push(host);
    }
    let last = push(alice.commit(0, &[Op::Create(post("a1"), record("a1"))], Tamper::None));
    let dir = tempfile::tempdir().unwrap();
    let plc_url = plc.url();
    let flags = ["--verify", "full", "--plc-url", &plc_url, "--did-web-http"];
    let slots = ["--did-resolve-timeout", "3s", "--did-resolve-concurrency", "2"];
    let serve = Serve::start(dir.path(), &relay.url(), &[flags.as_slice(), &slots].concat());
    let asked = || hosts.iter().map(|h| h.requests(".well-known/did.json")).sum::<usize>();
    // (The deadline covers the process's start: opening the log, the relay's first frames.)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while asked() == 0 {
        assert!(std::time::Instant::now() < deadline, "no did:web host was asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(asked(), 1, "one did:web request at a time, the other waiting for its slot");
    serve.wait_for_seq(last, Duration::from_secs(30));
    let marks = commit_marks(&serve, 3).await;
    let want = [("w1", "unresolved"), ("w2", "unresolved"), ("a1", "signature")];
    assert_eq!(marks, want.map(|(r, m)| (r.to_string(), m.to_string())), "{}", serve.logs());
}
