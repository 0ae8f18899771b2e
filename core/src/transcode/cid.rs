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

/// Parses a CIDv1 at the start of `buf`, returning it and its length (CIDv0 is handled by
/// [`is_cid_v0`] where it may appear: record links).
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

/// A binary CIDv0: a bare sha2-256 multihash (`0x12 0x20` + 32 bytes). atproto never writes
/// one, but old records can hold them, and Go's Jetstream renders them (as base58btc `Qm…`).
pub fn is_cid_v0(buf: &[u8]) -> bool {
    buf.len() == 34 && buf[0] == 0x12 && buf[1] == 0x20
}

/// A binary CID a record may link to: a CIDv1, or a CIDv0.
pub fn is_link(buf: &[u8]) -> bool {
    parse_cid(buf).is_some() || is_cid_v0(buf)
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

/// Appends a CID's canonical string form, as Go's `cid.String()` writes it: a CIDv1 as
/// multibase base32 (`b` + RFC 4648 base32, lowercase, unpadded), a CIDv0 as bare base58btc.
pub fn write_cid_string(out: &mut Vec<u8>, cid_bytes: &[u8]) {
    if is_cid_v0(cid_bytes) {
        out.extend_from_slice(bs58::encode(cid_bytes).into_string().as_bytes());
        return;
    }
    out.reserve(1 + (cid_bytes.len() * 8).div_ceil(5));
    out.push(b'b');
    // Five bytes are eight characters: whole groups at once, the rest bit by bit.
    let groups = cid_bytes.chunks_exact(5);
    let rest = groups.remainder();
    for g in groups {
        let v = u64::from_be_bytes([0, 0, 0, g[0], g[1], g[2], g[3], g[4]]);
        out.extend_from_slice(&std::array::from_fn::<u8, 8, _>(|i| BASE32_LOWER[(v >> (35 - 5 * i)) as usize & 31]));
    }
    let mut acc: u64 = 0;
    let mut bits = 0u32;
    for &b in rest {
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

/// Parses a CID string back to binary, in any form Go's `cid.Decode` accepts: multibase
/// base32 (`b`, the usual one), base58btc (`z`, or a bare `Qm…` CIDv0), base32 upper (`B`),
/// base16 (`f`, `F`), base64 (`m`, `M`, `u`, `U`); `None` if malformed or not a CID.
pub fn parse_cid_string(s: &str) -> Option<Vec<u8>> {
    let Some(body) = s.strip_prefix('b') else { return parse_other_multibase(s) };
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

/// The rare string forms (see [`parse_cid_string`]).
fn parse_other_multibase(s: &str) -> Option<Vec<u8>> {
    use data_encoding::{BASE32_NOPAD, BASE64, BASE64URL, BASE64URL_NOPAD, BASE64_NOPAD, HEXLOWER, HEXUPPER};
    if s.len() > 2 * MAX_CID_BYTES + 2 {
        return None;
    }
    let bytes = if s.len() == 46 && s.starts_with("Qm") {
        bs58::decode(s).into_vec().ok().filter(|b| is_cid_v0(b))?
    } else {
        let (prefix, body) = s.split_at(s.char_indices().nth(1)?.0);
        let body = body.as_bytes();
        match prefix {
            "z" => bs58::decode(body).into_vec().ok()?,
            "B" => BASE32_NOPAD.decode(body).ok()?,
            "f" => HEXLOWER.decode(body).ok()?,
            "F" => HEXUPPER.decode(body).ok()?,
            "m" => BASE64_NOPAD.decode(body).ok()?,
            "M" => BASE64.decode(body).ok()?,
            "u" => BASE64URL_NOPAD.decode(body).ok()?,
            "U" => BASE64URL.decode(body).ok()?,
            _ => return None,
        }
    };
    is_link(&bytes).then_some(bytes)
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
/// trailing bits are ignored, `\r` and `\n` are skipped wherever they are).
pub fn decode_base64_nopad(s: &[u8]) -> Option<Vec<u8>> {
    let newlines = s.iter().filter(|&&c| c == b'\r' || c == b'\n').count();
    if (s.len() - newlines) % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0u32;
    for &c in s.iter().filter(|&&c| c != b'\r' && c != b'\n') {
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
    fn base32_of_every_length_matches_rfc_4648_bit_by_bit() {
        for len in 0..=41usize {
            // Not a CIDv0 (those start 0x12 0x20 and are 34 bytes long).
            let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(151).wrapping_add(1)).collect();
            let bits: Vec<u8> = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).collect();
            let want: String = std::iter::once('b')
                .chain(bits.chunks(5).map(|c| {
                    let v = c.iter().chain(std::iter::repeat(&0)).take(5).fold(0, |v, &bit| v << 1 | bit);
                    BASE32_LOWER[v as usize] as char
                }))
                .collect();
            assert_eq!(cid_to_string(&bytes), want, "{len} bytes");
        }
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
        // Line breaks are skipped, as Go's decoder does; the length rule counts the rest.
        assert_eq!(decode_base64_nopad(b"Zm\r\n9v\nZg").unwrap(), b"foof");
        assert_eq!(decode_base64_nopad(b"\nZg\n\n").unwrap(), b"f");
        assert!(decode_base64_nopad(b"Zm9vZ\n").is_none());
        assert!(decode_base64_nopad(b"Zm 9v").is_none());
    }

    #[test]
    fn varints_are_minimal() {
        assert_eq!(read_uvarint(&[0x01]), Some((1, 1)));
        assert_eq!(read_uvarint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(read_uvarint(&[0x81, 0x00]), None);
        assert_eq!(read_uvarint(&[0x80; 10]), None);
    }
}
