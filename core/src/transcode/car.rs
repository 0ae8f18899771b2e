//! CAR v1 over the frame buffer: a zero-copy index from CID bytes to block bytes.
//!
//! Real relay CARs put the commit block last or in the middle, never reliably first, and may
//! repeat or leave out blocks, so the index is built once per frame and records are looked up
//! by `op.cid`. Lookups are O(1): a hash of the CID bytes leads to a short chain of sections
//! (a hostile frame with thousands of blocks and hundreds of ops must not cost their product).
//! Offsets (not slices) are kept so the index buffers are reused across frames.

use super::cbor::Reader;
use super::cid::{parse_cid_prefix, read_uvarint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CarError {
    #[error("bad CAR header")]
    Header,
    #[error("bad CAR section")]
    Section,
}

/// No section: the end of a hash chain.
const NONE: usize = usize::MAX;

/// The blocks of one CAR: `(cid_start, block_start, block_end)` offsets into the CAR bytes,
/// and a hash index over their CIDs.
#[derive(Default)]
pub struct CarIndex {
    sections: Vec<(usize, usize, usize)>,
    /// CID hash → the newest section with that hash.
    heads: std::collections::HashMap<u64, usize>,
    /// For each section, the previous one with the same hash (or `NONE`).
    next: Vec<usize>,
}

fn hash_cid(cid: &[u8]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // A fixed-key SipHash: the index lives for one frame, so per-process random keys buy
    // nothing, and the chains are checked byte for byte anyway.
    let mut h = std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
    h.write(cid);
    h.finish()
}

impl CarIndex {
    /// Indexes `car`, replacing what the index held.
    pub fn build(&mut self, car: &[u8]) -> Result<(), CarError> {
        self.sections.clear();
        self.heads.clear();
        self.next.clear();
        let (hlen, n) = read_uvarint(car).ok_or(CarError::Header)?;
        let hend = usize::try_from(hlen).ok().and_then(|l| n.checked_add(l)).ok_or(CarError::Header)?;
        if hlen == 0 || hend > car.len() {
            return Err(CarError::Header);
        }
        check_header(&car[n..hend])?;
        let mut pos = hend;
        while pos < car.len() {
            let (len, n) = read_uvarint(&car[pos..]).ok_or(CarError::Section)?;
            let start = pos + n;
            let end = usize::try_from(len).ok().and_then(|l| start.checked_add(l)).ok_or(CarError::Section)?;
            if len == 0 || end > car.len() {
                return Err(CarError::Section);
            }
            let cid_len = section_cid_len(&car[start..end]).ok_or(CarError::Section)?;
            let cid = &car[start..start + cid_len];
            // Only the first copy of a repeated block is indexed (it is the one a scan would
            // find), so chains hold distinct CIDs and stay short even when a CAR repeats one
            // block thousands of times.
            if self.find(car, cid).is_none() {
                let i = self.sections.len();
                self.sections.push((start, start + cid_len, end));
                let head = self.heads.entry(hash_cid(cid)).or_insert(NONE);
                self.next.push(*head);
                *head = i;
            }
            pos = end;
        }
        Ok(())
    }

    /// The block stored under `cid` (binary, no multibase prefix).
    pub fn get<'a>(&self, car: &'a [u8], cid: &[u8]) -> Option<&'a [u8]> {
        self.find(car, cid).map(|i| {
            let (_, b, e) = self.sections[i];
            &car[b..e]
        })
    }

    /// The section holding `cid`: its hash chain holds distinct CIDs (collisions only).
    fn find(&self, car: &[u8], cid: &[u8]) -> Option<usize> {
        let mut i = *self.heads.get(&hash_cid(cid))?;
        while i != NONE {
            let (c, b, _) = self.sections[i];
            if &car[c..b] == cid {
                return Some(i);
            }
            i = self.next[i];
        }
        None
    }

    pub fn len(&self) -> usize {
        self.sections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }
}

/// CIDv1, or a CIDv0 (a bare sha2-256 multihash, 34 bytes) which CAR files may still hold.
fn section_cid_len(section: &[u8]) -> Option<usize> {
    if section.starts_with(&[0x12, 0x20]) {
        return (section.len() >= 34).then_some(34);
    }
    parse_cid_prefix(section).map(|(_, n)| n)
}

/// `{version: 1, roots: [link, …]}`, keys in any order, other keys ignored.
fn check_header(h: &[u8]) -> Result<(), CarError> {
    let mut r = Reader::new(h);
    let mut version = None;
    let n = r.read_map_len().map_err(|_| CarError::Header)?;
    for _ in 0..n {
        match r.read_str().map_err(|_| CarError::Header)? {
            "version" => version = Some(r.read_i64().map_err(|_| CarError::Header)?),
            "roots" => {
                let roots = r.read_array_len().map_err(|_| CarError::Header)?;
                for _ in 0..roots {
                    r.read_link().map_err(|_| CarError::Header)?;
                }
            }
            _ => r.skip().map_err(|_| CarError::Header)?,
        }
    }
    if version != Some(1) || !r.is_empty() {
        return Err(CarError::Header);
    }
    Ok(())
}
