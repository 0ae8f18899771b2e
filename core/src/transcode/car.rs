//! CAR v1 over the frame buffer: a zero-copy index from CID bytes to block bytes.
//!
//! Real relay CARs put the commit block last or in the middle, never reliably first, and may
//! repeat or leave out blocks, so the index is built once per frame and records are looked up
//! by `op.cid`. A typical frame has one to three ops among dozens of MST blocks: its lookups
//! are plain scans, cheaper than hashing every block's CID (measured: hashing them all cost
//! the corpus 22% of its transcoding speed). From the fifth lookup in one frame on, a hash
//! index is built (random-keyed SipHash, so chains stay short even for crafted CIDs) and
//! lookups are O(1): a hostile frame with thousands of blocks and hundreds of ops does not
//! cost their product. Offsets (not slices) are kept so the buffers are reused across frames.

use super::cbor::Reader;
use super::cid::{parse_cid_prefix, read_uvarint};
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CarError {
    #[error("bad CAR header")]
    Header,
    #[error("bad CAR section")]
    Section,
}

/// Lookups per frame answered by a scan before the hash index is built.
const SCANNED_LOOKUPS: usize = 4;
/// No section: the end of a hash chain.
const NONE: usize = usize::MAX;
/// Sections the index keeps room for between frames: a real frame has dozens of blocks, and
/// the lists a hostile one grew (hundreds of thousands of tiny blocks) are not kept for the
/// transcoder's life.
const KEPT_SECTIONS: usize = 4096;

/// The blocks of one CAR: `(cid_start, block_start, block_end)` offsets into the CAR bytes,
/// and, once a frame looks up enough of them, a hash index over their CIDs.
#[derive(Default)]
pub struct CarIndex {
    sections: Vec<(usize, usize, usize)>,
    lookups: usize,
    /// Built on demand for this frame: CID hash → the last indexed section with that hash.
    heads: HashMap<u64, usize>,
    /// For each indexed section, the previous one with the same hash (or `NONE`).
    next: Vec<usize>,
    indexed: bool,
    hasher: RandomState,
}

impl CarIndex {
    /// Indexes `car`, replacing what the index held.
    pub fn build(&mut self, car: &[u8]) -> Result<(), CarError> {
        if self.sections.capacity() > KEPT_SECTIONS {
            (self.sections, self.heads, self.next) = Default::default();
        }
        self.sections.clear();
        self.heads.clear();
        self.next.clear();
        self.indexed = false;
        self.lookups = 0;
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
            self.sections.push((start, start + cid_len, end));
            pos = end;
        }
        Ok(())
    }

    /// The block stored under `cid` (binary, no multibase prefix); the first one when a CAR
    /// repeats a block.
    pub fn get<'a>(&mut self, car: &'a [u8], cid: &[u8]) -> Option<&'a [u8]> {
        self.lookups += 1;
        let found = if self.lookups <= SCANNED_LOOKUPS {
            self.sections.iter().position(|&(c, b, _)| &car[c..b] == cid)
        } else {
            if !self.indexed {
                self.index(car);
            }
            self.find(car, cid)
        };
        found.map(|i| {
            let (_, b, e) = self.sections[i];
            &car[b..e]
        })
    }

    /// Builds the hash index. Only the first copy of a repeated CID is indexed (the one a
    /// scan finds), so chains hold distinct CIDs.
    fn index(&mut self, car: &[u8]) {
        self.next.resize(self.sections.len(), NONE);
        for i in 0..self.sections.len() {
            let (c, b, _) = self.sections[i];
            if self.find(car, &car[c..b]).is_some() {
                continue;
            }
            let head = self.heads.entry(self.hasher.hash_one(&car[c..b])).or_insert(NONE);
            self.next[i] = *head;
            *head = i;
        }
        self.indexed = true;
    }

    fn find(&self, car: &[u8], cid: &[u8]) -> Option<usize> {
        let mut i = *self.heads.get(&self.hasher.hash_one(cid))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A CAR with `n` one-byte blocks whose CIDs are `0x01 0x55 0x00 0x02 i_hi i_lo` (raw,
    /// identity multihash of 2 bytes), the block at `dup` repeated at the end with other bytes.
    fn car(n: usize, dup: usize) -> Vec<u8> {
        let mut out = vec![0x0a, 0xa2, 0x65, b'r', b'o', b'o', b't', b's', 0x80, 0x67, b'v'];
        out.extend_from_slice(b"ersion");
        out.push(0x01);
        out[0] = (out.len() - 1) as u8;
        let mut push = |i: usize, byte: u8| {
            out.extend_from_slice(&[7, 0x01, 0x55, 0x00, 0x02, (i >> 8) as u8, i as u8, byte]);
        };
        for i in 0..n {
            push(i, i as u8);
        }
        push(dup, 0xee);
        out
    }

    #[test]
    fn scans_then_indexes_and_the_first_copy_wins_either_way() {
        let c = car(300, 7);
        let mut idx = CarIndex::default();
        idx.build(&c).unwrap();
        assert_eq!(idx.len(), 301);
        for round in 0..2 {
            // The first lookups scan; later ones use the index: the same answers.
            for i in (0..300).step_by(37) {
                let cid = [0x01, 0x55, 0x00, 0x02, (i >> 8) as u8, i as u8];
                assert_eq!(idx.get(&c, &cid), Some(&[i as u8][..]), "round {round}, block {i}");
            }
            assert_eq!(idx.get(&c, &[0x01, 0x55, 0x00, 0x02, 0, 7]), Some(&[7u8][..]), "the first copy");
            assert_eq!(idx.get(&c, &[0x01, 0x55, 0x00, 0x02, 9, 9]), None);
        }
        assert!(idx.indexed);
        idx.build(&c).unwrap();
        assert!(!idx.indexed, "a new frame starts with scans");
    }

    /// A frame of many tiny blocks, looked up enough to be indexed, leaves no lists of its
    /// size behind for the frames after it.
    #[test]
    fn a_huge_car_leaves_no_large_lists_behind() {
        let huge = car(60_000, 0);
        let mut idx = CarIndex::default();
        idx.build(&huge).unwrap();
        for i in 0..SCANNED_LOOKUPS + 1 {
            idx.get(&huge, &[0x01, 0x55, 0x00, 0x02, 0, i as u8]);
        }
        assert!(idx.indexed && idx.next.capacity() >= 60_000);
        let small = car(10, 0);
        idx.build(&small).unwrap();
        assert_eq!(idx.get(&small, &[0x01, 0x55, 0x00, 0x02, 0, 3]), Some(&[3u8][..]));
        assert!(idx.sections.capacity() <= KEPT_SECTIONS, "{}", idx.sections.capacity());
        assert!(idx.next.capacity() <= KEPT_SECTIONS && idx.heads.capacity() <= KEPT_SECTIONS);
    }
}
