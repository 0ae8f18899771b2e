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
                let state = verify::check_commit(&c, &key, Level::Full)
                    .unwrap_or_else(|e| panic!("seq {}: {} failed: {e}", c.seq, c.repo));
                if let Some(last) = chain.get(c.repo) {
                    verify::check_chain(Some(last), &c).unwrap();
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
