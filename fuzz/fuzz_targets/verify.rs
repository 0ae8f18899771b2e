//! Verification on hostile frames: reading a `#commit`/`#sync` for verification, the signed
//! commit and its unsigned form, loading the partial MST from the CAR, the forward check and
//! the inversion proof, and a signature check — never a panic, however the blocks lie (the
//! fuzzer cannot sign, so the MST code is driven directly with the frame's own roots).
#![no_main]
use contrail_core::verify::commit::SignedCommit;
use contrail_core::verify::{self, mst, Level, PublicKey, RepoFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = PublicKey::from_did_key("did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc").unwrap();
    match verify::read_frame(data) {
        Ok(Some(RepoFrame::Commit(c))) => {
            let _ = verify::check_commit(&c, &key, Level::Full);
            let _ = verify::check_chain(None, &c.link());
            if let Ok(commit) = SignedCommit::read(&c.blocks, c.commit) {
                // The unsigned form is the same map minus `sig`: one entry fewer.
                assert!(commit.unsigned.len() < 9 + data.len());
                let prev = c.prev_data.unwrap_or(commit.data);
                let _ = mst::check_inversion(&c.blocks, commit.data, &c.ops, prev);
                let _ = mst::check_ops_in_tree(&c.blocks, commit.data, &c.ops);
                if let Ok(tree) = mst::PartialTree::load(&c.blocks, commit.data) {
                    let _ = tree.root_cid();
                }
            }
        }
        Ok(Some(RepoFrame::Sync(s))) => {
            let _ = verify::check_sync(&s, &key);
        }
        _ => {}
    }
    // Keys from arbitrary text.
    if let Ok(text) = std::str::from_utf8(data) {
        if text.len() < 200 {
            let _ = PublicKey::from_multikey(text);
            let _ = PublicKey::from_legacy("EcdsaSecp256k1VerificationKey2019", text);
        }
    }
});
