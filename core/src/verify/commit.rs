//! What verification reads from a frame: a `#commit` or `#sync` body (with the fields the
//! transcoder does not need: `commit`, `since`, `prevData`, each op's `prev`), its CAR as a
//! block map, and the signed commit block with the bytes its signature covers.

use super::Failure;
use crate::transcode::cbor::{Reader, MAP};
use crate::transcode::cid::{parse_cid, read_uvarint, verify_block, Verify};
use std::collections::HashMap;

/// A record operation as the proof needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Update,
    Delete,
}

#[derive(Debug, Clone)]
pub struct ProofOp<'a> {
    pub action: Action,
    pub path: &'a str,
    /// The record's CID after the commit (create, update).
    pub cid: Option<&'a [u8]>,
    /// The record's CID before the commit (update, delete), Sync 1.1.
    pub prev: Option<&'a [u8]>,
}

/// A CAR's blocks by CID (binary, no multibase prefix), and its roots.
#[derive(Debug, Default)]
pub struct Blocks<'a> {
    pub roots: Vec<&'a [u8]>,
    map: HashMap<&'a [u8], &'a [u8]>,
}

impl<'a> Blocks<'a> {
    pub fn parse(car: &'a [u8]) -> Result<Blocks<'a>, Failure> {
        let (hlen, n) = read_uvarint(car).ok_or(Failure::Malformed("car header"))?;
        let hend = usize::try_from(hlen).ok().and_then(|l| n.checked_add(l)).ok_or(Failure::Malformed("car header"))?;
        if hend > car.len() {
            return Err(Failure::Malformed("car header"));
        }
        let mut blocks = Blocks::default();
        let mut r = Reader::new(&car[n..hend]);
        let entries = r.read_map_len().map_err(|_| Failure::Malformed("car header"))?;
        for _ in 0..entries {
            let key = r.read_str().map_err(|_| Failure::Malformed("car header"))?;
            if key == "roots" {
                let len = r.read_array_len().map_err(|_| Failure::Malformed("car roots"))?;
                for _ in 0..len {
                    blocks.roots.push(r.read_link().map_err(|_| Failure::Malformed("car roots"))?);
                }
            } else {
                r.skip().map_err(|_| Failure::Malformed("car header"))?;
            }
        }
        let mut pos = hend;
        while pos < car.len() {
            let (len, n) = read_uvarint(&car[pos..]).ok_or(Failure::Malformed("car section"))?;
            let start = pos + n;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| start.checked_add(l))
                .filter(|&e| e <= car.len() && len > 0)
                .ok_or(Failure::Malformed("car section"))?;
            let section = &car[start..end];
            let cid_len = cid_prefix_len(section).ok_or(Failure::Malformed("car section cid"))?;
            // The first copy wins, as in the transcoder.
            blocks.map.entry(&section[..cid_len]).or_insert(&section[cid_len..]);
            pos = end;
        }
        Ok(blocks)
    }

    /// The block stored under `cid`, checked against it: a block whose bytes do not hash to
    /// its CID is a tampered proof, not a missing one.
    pub fn get_verified(&self, cid: &[u8]) -> Result<Option<&'a [u8]>, Failure> {
        let Some(block) = self.map.get(cid).copied() else { return Ok(None) };
        let parsed = parse_cid(cid).ok_or(Failure::Malformed("cid"))?;
        match verify_block(&parsed, block) {
            Verify::Ok => Ok(Some(block)),
            Verify::Mismatch => Err(Failure::Proof("a block does not match its CID")),
            Verify::UnsupportedHash => Err(Failure::Malformed("unsupported hash")),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

fn cid_prefix_len(section: &[u8]) -> Option<usize> {
    crate::transcode::cid::parse_cid_prefix(section).map(|(_, n)| n)
}

/// The fields of a `#commit` body verification needs.
#[derive(Debug)]
pub struct CommitFrame<'a> {
    pub seq: i64,
    pub repo: &'a str,
    pub rev: &'a str,
    pub since: Option<&'a str>,
    /// The signed commit block's CID.
    pub commit: &'a [u8],
    /// The MST root before this commit (Sync 1.1); absent on older producers' commits.
    pub prev_data: Option<&'a [u8]>,
    pub ops: Vec<ProofOp<'a>>,
    /// Ops that could not be read as a proof op (an unknown action, no path): the transcoder
    /// drops them, `signature` needs no ops, and `full` cannot prove the commit with them.
    pub unreadable_ops: usize,
    pub blocks: Blocks<'a>,
}

/// The fields of a `#sync` body: the repo's current commit, alone in its CAR.
#[derive(Debug)]
pub struct SyncFrame<'a> {
    pub seq: i64,
    pub did: &'a str,
    pub rev: &'a str,
    pub blocks: Blocks<'a>,
}

/// A frame verification can read.
#[derive(Debug)]
pub enum RepoFrame<'a> {
    Commit(CommitFrame<'a>),
    Sync(SyncFrame<'a>),
}

/// Reads a relay frame (header and body) for verification; `None` for frames that carry no
/// commit (identity, account, info, errors, unknown types).
pub fn read_frame(frame: &[u8]) -> Result<Option<RepoFrame<'_>>, Failure> {
    let mut r = Reader::new(frame);
    match read_header(&mut r).map_err(bad("header"))? {
        (Some(1), Some("#commit")) => read_commit(r).map(|c| Some(RepoFrame::Commit(c))),
        (Some(1), Some("#sync")) => read_sync(r).map(|s| Some(RepoFrame::Sync(s))),
        _ => Ok(None),
    }
}

/// The repo a `#commit` (`repo`) or `#sync` (`did`) frame names, read leniently: for a frame
/// [`read_frame`] refuses (more ops than allowed, a bad CAR), whose repo moved on all the same.
/// `None` when even that cannot be read, or it is not a valid DID.
pub fn frame_repo(frame: &[u8]) -> Option<&str> {
    let mut r = Reader::new(frame);
    let key = match read_header(&mut r).ok()? {
        (Some(1), Some("#commit")) => "repo",
        (Some(1), Some("#sync")) => "did",
        _ => return None,
    };
    for _ in 0..r.read_map_len().ok()? {
        if r.read_str().ok()? == key {
            return r.read_str().ok().filter(|d| crate::syntax::is_valid_did(d));
        }
        r.skip().ok()?;
    }
    None
}

/// The DID an `#identity` frame names, read leniently: a frame the transcoder drops (a `time`
/// it cannot read, a handle too long) still announces that the DID's key may have changed.
/// `None` for another frame, or when the DID cannot be read or is not a valid one.
pub fn identity_did(frame: &[u8]) -> Option<&str> {
    let mut r = Reader::new(frame);
    if read_header(&mut r).ok()? != (Some(1), Some("#identity")) {
        return None;
    }
    for _ in 0..r.read_map_len().ok()? {
        if r.read_str().ok()? == "did" {
            return r.read_str().ok().filter(|d| crate::syntax::is_valid_did(d));
        }
        r.skip().ok()?;
    }
    None
}

/// A frame header's `op` and `t`, the reader left at the body.
fn read_header<'a>(r: &mut Reader<'a>) -> Result<(Option<i64>, Option<&'a str>), crate::transcode::cbor::CborError> {
    let (mut op, mut t) = (None, None);
    for _ in 0..r.read_map_len()? {
        match r.read_str()? {
            "op" => op = Some(r.read_i64()?),
            "t" => t = Some(r.read_str()?),
            _ => r.skip()?,
        }
    }
    Ok((op, t))
}

fn bad(what: &'static str) -> impl Fn(crate::transcode::cbor::CborError) -> Failure {
    move |_| Failure::Malformed(what)
}

fn opt_str<'a>(r: &mut Reader<'a>) -> Result<Option<&'a str>, Failure> {
    if r.read_null().map_err(bad("null"))? {
        Ok(None)
    } else {
        r.read_str().map(Some).map_err(bad("string"))
    }
}

fn opt_link<'a>(r: &mut Reader<'a>) -> Result<Option<&'a [u8]>, Failure> {
    if r.read_null().map_err(bad("null"))? {
        Ok(None)
    } else {
        r.read_link().map(Some).map_err(bad("link"))
    }
}

fn read_commit(mut r: Reader<'_>) -> Result<CommitFrame<'_>, Failure> {
    let n = r.read_map_len().map_err(bad("body"))?;
    let mut unreadable_ops = 0;
    let (mut seq, mut repo, mut rev, mut since, mut commit, mut prev_data, mut ops, mut car) =
        (None, None, None, None, None, None, None, None);
    for _ in 0..n {
        match r.read_str().map_err(bad("body key"))? {
            "seq" => seq = Some(r.read_i64().map_err(bad("seq"))?),
            "repo" => repo = Some(r.read_str().map_err(bad("repo"))?),
            "rev" => rev = Some(r.read_str().map_err(bad("rev"))?),
            "since" => since = opt_str(&mut r)?,
            "commit" => commit = Some(r.read_link().map_err(bad("commit"))?),
            "prevData" => prev_data = opt_link(&mut r)?,
            "blocks" => car = Some(r.read_bytes().map_err(bad("blocks"))?),
            "ops" => {
                let len = r.read_array_len().map_err(bad("ops"))?;
                if len > crate::transcode::MAX_COMMIT_OPS {
                    return Err(Failure::Malformed("more ops than the protocol allows"));
                }
                let mut list = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    match read_op(&mut r)? {
                        Some(op) => list.push(op),
                        None => unreadable_ops += 1,
                    }
                }
                ops = Some(list);
            }
            _ => r.skip().map_err(bad("body"))?,
        }
    }
    let car = car.ok_or(Failure::Malformed("no blocks"))?;
    if car.len() > crate::transcode::MAX_BLOCKS_BYTES {
        return Err(Failure::Malformed("blocks larger than the protocol allows"));
    }
    let blocks = Blocks::parse(car)?;
    Ok(CommitFrame {
        seq: seq.ok_or(Failure::Malformed("no seq"))?,
        repo: repo.ok_or(Failure::Malformed("no repo"))?,
        rev: rev.ok_or(Failure::Malformed("no rev"))?,
        since,
        commit: commit.ok_or(Failure::Malformed("no commit"))?,
        prev_data,
        ops: ops.ok_or(Failure::Malformed("no ops"))?,
        unreadable_ops,
        blocks,
    })
}

/// One op; `None` for one that is whole CBOR but not an op a proof can use (an unknown
/// action, a missing action or path): like the transcoder, that drops the op, not the frame.
fn read_op<'a>(r: &mut Reader<'a>) -> Result<Option<ProofOp<'a>>, Failure> {
    let n = r.read_map_len().map_err(bad("op"))?;
    let (mut action, mut path, mut cid, mut prev) = (None, None, None, None);
    let mut known_action = true;
    for _ in 0..n {
        match r.read_str().map_err(bad("op key"))? {
            "action" => {
                action = match r.read_str().map_err(bad("action"))? {
                    "create" => Some(Action::Create),
                    "update" => Some(Action::Update),
                    "delete" => Some(Action::Delete),
                    _ => {
                        known_action = false;
                        None
                    }
                }
            }
            "path" => path = Some(r.read_str().map_err(bad("path"))?),
            "cid" => cid = opt_link(r)?,
            "prev" => prev = opt_link(r)?,
            _ => r.skip().map_err(bad("op"))?,
        }
    }
    Ok(match (action, path) {
        (Some(action), Some(path)) if known_action => Some(ProofOp { action, path, cid, prev }),
        _ => None,
    })
}

fn read_sync(mut r: Reader<'_>) -> Result<SyncFrame<'_>, Failure> {
    let n = r.read_map_len().map_err(bad("body"))?;
    let (mut seq, mut did, mut rev, mut car) = (None, None, None, None);
    for _ in 0..n {
        match r.read_str().map_err(bad("body key"))? {
            "seq" => seq = Some(r.read_i64().map_err(bad("seq"))?),
            "did" => did = Some(r.read_str().map_err(bad("did"))?),
            "rev" => rev = Some(r.read_str().map_err(bad("rev"))?),
            "blocks" => car = Some(r.read_bytes().map_err(bad("blocks"))?),
            _ => r.skip().map_err(bad("body"))?,
        }
    }
    let car = car.ok_or(Failure::Malformed("no blocks"))?;
    if car.len() > MAX_SYNC_BLOCKS_BYTES {
        return Err(Failure::Malformed("sync blocks larger than the protocol allows"));
    }
    Ok(SyncFrame {
        seq: seq.ok_or(Failure::Malformed("no seq"))?,
        did: did.ok_or(Failure::Malformed("no did"))?,
        rev: rev.ok_or(Failure::Malformed("no rev"))?,
        blocks: Blocks::parse(car)?,
    })
}

/// `#sync`'s `blocks` limit (the lexicon's `maxLength`: the commit block alone).
pub const MAX_SYNC_BLOCKS_BYTES: usize = 10_000;

/// A signed commit block (repo format v3).
#[derive(Debug, Clone)]
pub struct SignedCommit<'a> {
    pub did: &'a str,
    pub rev: &'a str,
    pub version: i64,
    /// The MST root after the commit.
    pub data: &'a [u8],
    pub sig: &'a [u8],
    /// The DAG-CBOR of the same map without `sig`: what the signature covers.
    pub unsigned: Vec<u8>,
}

impl<'a> SignedCommit<'a> {
    /// Reads the block stored under `cid` (checked against it).
    pub fn read(blocks: &Blocks<'a>, cid: &[u8]) -> Result<SignedCommit<'a>, Failure> {
        let block = blocks.get_verified(cid)?.ok_or(Failure::Malformed("commit block missing"))?;
        Self::parse(block)
    }

    pub fn parse(block: &'a [u8]) -> Result<SignedCommit<'a>, Failure> {
        let mut r = Reader::new(block);
        let n = r.read_map_len().map_err(bad("commit"))?;
        let (mut did, mut rev, mut version, mut data, mut sig) = (None, None, None, None, None);
        // The unsigned form: the same entries minus `sig`, under a map head one smaller. The
        // block is canonical DAG-CBOR (its signer wrote it so), so the spliced bytes are too.
        let mut entries = Vec::with_capacity(block.len());
        // Canonical key order (no key twice, `sig` in its place): one signature, one block.
        let mut order = KeyOrder::default();
        for _ in 0..n {
            let start = r.position();
            let key = r.read_str().map_err(bad("commit key"))?;
            order.next(key)?;
            match key {
                "did" => did = Some(r.read_str().map_err(bad("commit did"))?),
                "rev" => rev = Some(r.read_str().map_err(bad("commit rev"))?),
                "version" => version = Some(r.read_i64().map_err(bad("commit version"))?),
                "data" => data = Some(r.read_link().map_err(bad("commit data"))?),
                "sig" => sig = Some(r.read_bytes().map_err(bad("commit sig"))?),
                _ => r.skip().map_err(bad("commit"))?,
            }
            if key != "sig" {
                entries.extend_from_slice(&block[start..r.position()]);
            }
        }
        if !r.is_empty() {
            return Err(Failure::Malformed("commit trailing bytes"));
        }
        let sig = sig.ok_or(Failure::Malformed("commit without sig"))?;
        if sig.len() != 64 {
            return Err(Failure::Signature);
        }
        let mut unsigned = Vec::with_capacity(entries.len() + 9);
        write_head(&mut unsigned, MAP, n - 1);
        unsigned.extend_from_slice(&entries);
        let version = version.ok_or(Failure::Malformed("commit without version"))?;
        if version != 3 && version != 2 {
            return Err(Failure::Malformed("commit version"));
        }
        Ok(SignedCommit {
            did: did.ok_or(Failure::Malformed("commit without did"))?,
            rev: rev.ok_or(Failure::Malformed("commit without rev"))?,
            version,
            data: data.ok_or(Failure::Malformed("commit without data"))?,
            sig,
            unsigned,
        })
    }
}

/// Map keys must come in DAG-CBOR's canonical order (shorter first, then bytewise), which
/// also rules out a key given twice.
#[derive(Default)]
pub(crate) struct KeyOrder<'k> {
    last: Option<&'k str>,
}

impl<'k> KeyOrder<'k> {
    pub(crate) fn next(&mut self, key: &'k str) -> Result<(), Failure> {
        if let Some(last) = self.last {
            if (last.len(), last.as_bytes()) >= (key.len(), key.as_bytes()) {
                return Err(Failure::Malformed("map keys not in canonical order"));
            }
        }
        self.last = Some(key);
        Ok(())
    }
}

/// Writes a CBOR head in its shortest form (canonical DAG-CBOR).
pub(crate) fn write_head(out: &mut Vec<u8>, major: u8, arg: u64) {
    let m = major << 5;
    match arg {
        0..=23 => out.push(m | arg as u8),
        24..=0xff => out.extend_from_slice(&[m | 24, arg as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend_from_slice(&(arg as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend_from_slice(&(arg as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend_from_slice(&arg.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `t` whose body holds `fields` (text values, or a one-byte CAR for "blocks").
    fn frame(t: &str, fields: &[(&str, &str)]) -> Vec<u8> {
        let text = |out: &mut Vec<u8>, s: &str| {
            write_head(out, 3, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        };
        let mut out = Vec::new();
        write_head(&mut out, 5, 2);
        text(&mut out, "op");
        write_head(&mut out, 0, 1);
        text(&mut out, "t");
        text(&mut out, t);
        write_head(&mut out, 5, fields.len() as u64);
        for (k, v) in fields {
            text(&mut out, k);
            match *k {
                "blocks" => out.extend_from_slice(&[0x41, 0x00]),
                _ => text(&mut out, v),
            }
        }
        out
    }

    #[test]
    fn the_repo_of_a_frame_the_verifier_refuses_is_still_read() {
        let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
        // A CAR that does not parse, before the repo: refused, its repo read all the same.
        let commit = frame("#commit", &[("blocks", ""), ("repo", did), ("rev", "3l")]);
        assert!(read_frame(&commit).is_err());
        assert_eq!(frame_repo(&commit), Some(did));
        assert_eq!(frame_repo(&frame("#sync", &[("blocks", ""), ("did", did)])), Some(did));
        // Not a DID, no repo, another kind, a body cut short: none.
        assert_eq!(frame_repo(&frame("#commit", &[("repo", "bob")])), None);
        assert_eq!(frame_repo(&frame("#commit", &[("rev", "3l")])), None);
        assert_eq!(frame_repo(&frame("#identity", &[("did", did)])), None);
        // An #identity's DID, whatever else the frame holds; no other frame's.
        assert_eq!(identity_did(&frame("#identity", &[("did", did), ("time", "not a time")])), Some(did));
        assert_eq!(identity_did(&frame("#identity", &[("handle", "x"), ("did", did)])), Some(did));
        assert_eq!(identity_did(&frame("#identity", &[("did", "bob")])), None);
        assert_eq!(identity_did(&commit), None);
        assert_eq!(frame_repo(&commit[..commit.len() - 20]), None);
    }
}
