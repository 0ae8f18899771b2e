//! CIDs: binary parsing, the base32 string form, block verification; and the base64 form of
//! `$bytes`. Hand-written because the rules are small and this is on the per-record path.

use sha2::{Digest, Sha256};

/// Multihash code of sha2-256, the only hash atproto uses.
const SHA2_256: u64 = 0x12;
/// Jetstream and atproto cap binary CIDs at 100 bytes (`MAX_CID_BYTES`).
pub const MAX_CID_BYTES: usize = 100;

/// A parsed binary CIDv1 (borrowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cid<'a> {
    /// The whole binary CID.
    pub bytes: &'a [u8],
    pub codec: u64,
    pub hash_code: u64,
    pub digest: &'a [u8],
}

/// Reads an unsigned LEB128 varint (at most 9 bytes, minimal form), returning value and length.
pub fn read_uvarint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(9) {
        value |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            // A trailing zero byte after the first is a non-minimal encoding.
            if i > 0 && b == 0 {
                return None;
            }
            return Some((value, i + 1));
        }
    }
    None
}

/// Parses a CIDv1 at the start of `buf`, returning it and its length. CIDv0 is rejected:
/// atproto never writes it and Jetstream's output format has no base58 links.
pub fn parse_cid_prefix(buf: &[u8]) -> Option<(Cid<'_>, usize)> {
    let mut pos = 0;
    let next = |pos: &mut usize| -> Option<u64> {
        let (v, n) = read_uvarint(&buf[*pos..])?;
        *pos += n;
        Some(v)
    };
    if next(&mut pos)? != 1 {
        return None;
    }
    let codec = next(&mut pos)?;
    let hash_code = next(&mut pos)?;
    let digest_len = usize::try_from(next(&mut pos)?).ok()?;
    let end = pos.checked_add(digest_len)?;
    if end > buf.len() || end > MAX_CID_BYTES {
        return None;
    }
    let cid = Cid { bytes: &buf[..end], codec, hash_code, digest: &buf[pos..end] };
    Some((cid, end))
}

/// Parses a complete binary CIDv1 (no trailing bytes).
pub fn parse_cid(buf: &[u8]) -> Option<Cid<'_>> {
    match parse_cid_prefix(buf) {
        Some((cid, n)) if n == buf.len() => Some(cid),
        _ => None,
    }
}

/// Outcome of checking a block against its CID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Ok,
    Mismatch,
    UnsupportedHash,
}

/// Checks that `block` hashes to the CID's digest.
pub fn verify_block(cid: &Cid<'_>, block: &[u8]) -> Verify {
    if cid.hash_code != SHA2_256 || cid.digest.len() != 32 {
        return Verify::UnsupportedHash;
    }
    if Sha256::digest(block).as_slice() == cid.digest {
        Verify::Ok
    } else {
        Verify::Mismatch
    }
}

/// The CIDv1 (dag-cbor, sha2-256) of a block, as atproto computes record CIDs.
pub fn dag_cbor_cid_of(block: &[u8]) -> Vec<u8> {
    let mut out = vec![0x01, 0x71, 0x12, 0x20];
    out.extend_from_slice(&Sha256::digest(block));
    out
}

const BASE32_LOWER: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Appends the multibase base32 string form (`b` + RFC 4648 base32, lowercase, unpadded).
pub fn write_cid_string(out: &mut Vec<u8>, cid_bytes: &[u8]) {
    out.push(b'b');
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in cid_bytes {
        acc = (acc << 8) | b as u64;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32_LOWER[((acc >> bits) & 31) as usize]);
        }
    }
    if bits > 0 {
        out.push(BASE32_LOWER[((acc << (5 - bits)) & 31) as usize]);
    }
}

/// The string form of a binary CID.
pub fn cid_to_string(cid_bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(2 + cid_bytes.len() * 8 / 5);
    write_cid_string(&mut out, cid_bytes);
    String::from_utf8(out).expect("base32 alphabet is ASCII")
}

/// Parses a `b`-prefixed lowercase base32 CID string back to binary; `None` if malformed.
pub fn parse_cid_string(s: &str) -> Option<Vec<u8>> {
    let body = s.strip_prefix('b')?;
    let mut out = Vec::with_capacity(body.len() * 5 / 8);
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for c in body.bytes() {
        let v = BASE32_LOWER.iter().position(|&a| a == c)? as u64;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    // Leftover bits must be padding zeros, fewer than a byte.
    if bits >= 5 || acc & ((1 << bits) - 1) != 0 {
        return None;
    }
    parse_cid(&out)?;
    Some(out)
}

const BASE64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Appends standard-alphabet base64 without padding (Go's `RawStdEncoding`).
pub fn write_base64_nopad(out: &mut Vec<u8>, data: &[u8]) {
    let mut chunks = data.chunks_exact(3);
    for c in &mut chunks {
        let n = (c[0] as u32) << 16 | (c[1] as u32) << 8 | c[2] as u32;
        out.extend_from_slice(&[
            BASE64_STD[(n >> 18) as usize & 63],
            BASE64_STD[(n >> 12) as usize & 63],
            BASE64_STD[(n >> 6) as usize & 63],
            BASE64_STD[n as usize & 63],
        ]);
    }
    match *chunks.remainder() {
        [a] => {
            let n = (a as u32) << 16;
            out.extend_from_slice(&[BASE64_STD[(n >> 18) as usize & 63], BASE64_STD[(n >> 12) as usize & 63]]);
        }
        [a, b] => {
            let n = (a as u32) << 16 | (b as u32) << 8;
            out.extend_from_slice(&[
                BASE64_STD[(n >> 18) as usize & 63],
                BASE64_STD[(n >> 12) as usize & 63],
                BASE64_STD[(n >> 6) as usize & 63],
            ]);
        }
        _ => {}
    }
}

/// Decodes unpadded standard base64 as Go's `RawStdEncoding` does (padding is an error,
/// trailing bits are ignored).
pub fn decode_base64_nopad(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &c in s {
        let v = BASE64_STD.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_round_trip_of_a_real_cid() {
        let s = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a";
        let bin = parse_cid_string(s).expect("valid");
        assert_eq!(bin.len(), 36);
        assert_eq!(cid_to_string(&bin), s);
        assert!(parse_cid_string("bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2").is_none());
        assert!(parse_cid_string("Qmabc").is_none());
    }

    #[test]
    fn base64_matches_go_raw_std() {
        for (raw, enc) in [(&b""[..], ""), (b"f", "Zg"), (b"fo", "Zm8"), (b"foo", "Zm9v"), (b"\xfb\xff", "+/8")] {
            let mut out = Vec::new();
            write_base64_nopad(&mut out, raw);
            assert_eq!(out, enc.as_bytes());
            assert_eq!(decode_base64_nopad(enc.as_bytes()).unwrap(), raw);
        }
        assert!(decode_base64_nopad(b"Zg==").is_none());
    }

    #[test]
    fn varints_are_minimal() {
        assert_eq!(read_uvarint(&[0x01]), Some((1, 1)));
        assert_eq!(read_uvarint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(read_uvarint(&[0x81, 0x00]), None);
        assert_eq!(read_uvarint(&[0x80; 10]), None);
    }
}
