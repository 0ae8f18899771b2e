//! Sync 1.1 verification, the pure part: does a commit come from its repo's key, and do its
//! operations really turn the previous tree into the new one.
//!
//! - [`keys`]: signing keys (`did:key`, Multikey, the legacy types) and ECDSA with atproto's
//!   rules.
//! - [`commit`]: what a `#commit` / `#sync` frame carries for verification, the CAR as a block
//!   map, the signed commit and the bytes its signature covers.
//! - [`mst`]: the partial Merkle Search Tree and the inversion proof.
//!
//! What is checked per level:
//! - [`Level::Signature`]: the commit block hashes to the frame's `commit` CID, names the
//!   frame's repo and rev, and its signature checks against the repo's key.
//! - [`Level::Full`]: also the proof — every op's record CID is what the new tree (rooted at
//!   the signed `data`) holds, and undoing the ops gives `prevData`; and, against the repo's
//!   previous commit when known ([`check_chain`]), `since` and `prevData` continue it.
//!
//! Resolving a DID to its key, keeping per-repo state and deciding what happens to a failed
//! event are the service's (`src/verify`).

pub mod commit;
pub mod keys;
pub mod mst;

pub use commit::{frame_repo, identity_did, read_frame, Blocks, CommitFrame, RepoFrame, SignedCommit, SyncFrame};
pub use keys::PublicKey;

label_enum! {
    /// How much is verified.
    pub enum Level {
        Off => "off",
        Signature => "signature",
        Full => "full",
    }
}

label_enum! {
    /// Why an event failed verification (metric label and the reason logged).
    pub enum Reason {
        Signature => "signature",
        Chain => "chain",
        Proof => "proof",
        Resolve => "resolve",
        Malformed => "malformed",
    }
}

/// What went wrong, with a short static detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("the signature does not match the repo's key")]
    Signature,
    #[error("proof: {0}")]
    Proof(&'static str),
    /// The commit carries no proof to check (no `prevData`, or an update or delete without
    /// `prev`: a producer older than Sync 1.1, or a relay that stripped them). A `proof`
    /// failure under `full`.
    #[error("no proof: {0}")]
    NoProof(&'static str),
    #[error("chain: {0}")]
    Chain(&'static str),
}

impl Failure {
    pub fn reason(self) -> Reason {
        match self {
            Failure::Malformed(_) => Reason::Malformed,
            Failure::Signature => Reason::Signature,
            Failure::Proof(_) | Failure::NoProof(_) => Reason::Proof,
            Failure::Chain(_) => Reason::Chain,
        }
    }
}

/// A repo's position after its last verified commit: what the next one must continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoState {
    pub rev: String,
    /// The MST root (binary CID).
    pub data: Vec<u8>,
}

impl RepoState {
    /// `rev` + NUL + data, for storing.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.rev.len() + 1 + self.data.len());
        out.extend_from_slice(self.rev.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.data);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<RepoState> {
        let nul = bytes.iter().position(|&b| b == 0)?;
        Some(RepoState { rev: std::str::from_utf8(&bytes[..nul]).ok()?.to_string(), data: bytes[nul + 1..].to_vec() })
    }
}

/// What a commit was shown to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The repo's state after the commit.
    pub state: RepoState,
    /// The inversion proof was checked (`Full`).
    pub proven: bool,
}

/// What can be checked before the repo's key is known — so a frame that is malformed or names
/// a repo it does not carry costs no directory request: a valid DID and TID rev, and a commit
/// block that hashes to its CID and names the same repo and rev.
pub fn precheck(frame: &RepoFrame<'_>) -> Result<(), Failure> {
    let (did, rev, blocks, cid) = match frame {
        RepoFrame::Commit(c) => (c.repo, c.rev, &c.blocks, c.commit),
        RepoFrame::Sync(s) => {
            (s.did, s.rev, &s.blocks, *s.blocks.roots.first().ok_or(Failure::Malformed("sync CAR without a root"))?)
        }
    };
    if !crate::syntax::is_valid_did(did) {
        return Err(Failure::Malformed("invalid DID"));
    }
    if !crate::syntax::is_valid_tid(rev) {
        return Err(Failure::Malformed("rev is not a TID"));
    }
    let commit = SignedCommit::read(blocks, cid)?;
    if commit.did != did {
        return Err(Failure::Malformed("the commit names another repo"));
    }
    if commit.rev != rev {
        return Err(Failure::Malformed("the commit's rev differs from the frame's"));
    }
    Ok(())
}

/// Checks a `#commit` at `level` (`Signature` or `Full`) against the repo's key. `Full`
/// requires the proof: a commit without `prevData`, or an update or delete without `prev`,
/// fails (`NoProof`) — those fields are not signed, and a relay that strips them must not
/// turn `full` into `signature`.
pub fn check_commit(frame: &CommitFrame<'_>, key: &PublicKey, level: Level) -> Result<Checked, Failure> {
    let commit = signed(&frame.blocks, frame.commit, frame.repo, frame.rev, key)?;
    let state = RepoState { rev: commit.rev.to_string(), data: commit.data.to_vec() };
    if level != Level::Full {
        return Ok(Checked { state, proven: false });
    }
    let prev_data = frame.prev_data.ok_or(Failure::NoProof("no prevData"))?;
    if frame.unreadable_ops > 0 {
        // Undoing every op is the proof: one that cannot be read cannot be undone.
        return Err(Failure::Proof("an op the proof cannot read (unknown action, or no path)"));
    }
    mst::check_inversion(&frame.blocks, commit.data, &frame.ops, prev_data)?;
    Ok(Checked { state, proven: true })
}

/// Checks a `#sync` (the repo's current commit, signed): the state it re-anchors the repo to.
pub fn check_sync(frame: &SyncFrame<'_>, key: &PublicKey) -> Result<RepoState, Failure> {
    let root = *frame.blocks.roots.first().ok_or(Failure::Malformed("sync CAR without a root"))?;
    let commit = signed(&frame.blocks, root, frame.did, frame.rev, key)?;
    Ok(RepoState { rev: commit.rev.to_string(), data: commit.data.to_vec() })
}

fn signed<'a>(
    blocks: &Blocks<'a>,
    cid: &[u8],
    did: &str,
    rev: &str,
    key: &PublicKey,
) -> Result<SignedCommit<'a>, Failure> {
    let commit = SignedCommit::read(blocks, cid)?;
    if commit.did != did {
        return Err(Failure::Malformed("the commit names another repo"));
    }
    if commit.rev != rev {
        return Err(Failure::Malformed("the commit's rev differs from the frame's"));
    }
    if !key.verify(&commit.unsigned, commit.sig) {
        return Err(Failure::Signature);
    }
    Ok(commit)
}

/// What the next commit must agree with, from a commit: its rev, `since` and `prevData`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    pub rev: String,
    pub since: Option<String>,
    pub prev_data: Option<Vec<u8>>,
}

impl CommitFrame<'_> {
    pub fn link(&self) -> ChainLink {
        ChainLink {
            rev: self.rev.to_string(),
            since: self.since.map(str::to_string),
            prev_data: self.prev_data.map(<[u8]>::to_vec),
        }
    }
}

/// Does a verified commit continue the repo's last known state? Its rev must be newer, its
/// `since` the last rev, and its `prevData` the last tree. An unknown repo (first commit seen)
/// anchors here.
pub fn check_chain(last: Option<&RepoState>, commit: &ChainLink) -> Result<(), Failure> {
    let Some(last) = last else { return Ok(()) };
    if commit.rev <= last.rev {
        return Err(Failure::Chain("rev not after the repo's last"));
    }
    if commit.since.as_deref() != Some(last.rev.as_str()) {
        return Err(Failure::Chain("since is not the repo's last rev"));
    }
    if let Some(prev) = &commit.prev_data {
        if *prev != last.data {
            return Err(Failure::Chain("prevData is not the repo's last tree"));
        }
    }
    Ok(())
}
