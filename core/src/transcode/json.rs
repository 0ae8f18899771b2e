//! DAG-CBOR record → JSON, byte-identical to what production Jetstream v1 sent.
//!
//! Jetstream v1 decoded records with indigo's `atdata` into Go maps and marshalled them with
//! an HTML-escaping encoder. The rules reproduced here (spec/jetstream.md §3.2):
//! - links → `{"$link":"bafy…"}`, bytes → `{"$bytes":"…"}` (standard base64, no padding);
//! - blobs (`$type: "blob"`, exactly four keys) in their struct order `$type, ref, mimeType,
//!   size`; legacy blobs (`{cid, mimeType}`) re-emitted as `{"cid":…,"mimeType":…}`;
//! - every other map with keys sorted bytewise (Go's map order), not DAG-CBOR's length-first;
//! - strings escaped as Go does: `"` `\` `\n` `\r` `\t`, other controls as `\u00xx`, and
//!   `& < >` U+2028 U+2029 as `\u0026 \u003c \u003e \u2028 \u2029`; other UTF-8 raw;
//! - integral floats become integers; anything else about a value that atdata rejects makes
//!   the whole record invalid ([`RecordError`]), and the caller drops that one op.
//!
//! Written straight into the output buffer; map entries are collected on one reused stack,
//! so a record costs no allocation once the writer is warm. Nesting is capped at
//! [`MAX_RECORD_DEPTH`] so the recursion is bounded whatever the input.

use super::cbor::{self, CborError, Reader};
use super::cid;

/// Largest CBOR record accepted (atproto `MAX_CBOR_RECORD_SIZE`).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// Largest string or byte string inside a record (atproto `MAX_RECORD_STRING_LEN`).
pub const MAX_STRING_BYTES: usize = 1024 * 1024;
/// Most elements in one array or map (atproto `MAX_CBOR_CONTAINER_LEN`).
pub const MAX_CONTAINER_LEN: u64 = 128 * 1024;
/// Longest map key (atproto `MAX_OBJECT_KEY_LEN`).
pub const MAX_KEY_BYTES: usize = 8192;
/// Deepest nesting of maps and arrays in a record. The record sits at depth 3 of the event
/// (`{commit:{record:…}}`), so 125 keeps every event within the 128 levels that serde_json
/// (and so most Rust clients) parse by default. Jetstream v1 had no limit at all.
pub const MAX_RECORD_DEPTH: usize = 125;

/// Why a record was rejected. Each maps to a drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record over 1 MiB")]
    TooLarge,
    #[error("malformed DAG-CBOR: {0}")]
    Cbor(CborError),
    #[error("bytes after the record")]
    TrailingBytes,
    #[error("record is not a map")]
    NotAnObject,
    #[error("non-integer float")]
    Float,
    #[error("invalid UTF-8")]
    InvalidUtf8,
    #[error("nested too deep")]
    TooDeep,
    #[error("container with too many elements")]
    TooManyElements,
    #[error("map key too long")]
    KeyTooLong,
    #[error("string too long")]
    StringTooLong,
    #[error("integer outside int64")]
    IntOverflow,
    #[error("duplicate map key")]
    DuplicateKey,
    #[error("map key is not a string")]
    NonStringKey,
    #[error("$type is not a non-empty string")]
    BadType,
    #[error("malformed $link or CID")]
    BadLink,
    #[error("malformed $bytes")]
    BadBytes,
    #[error("malformed blob")]
    BadBlob,
}

impl From<CborError> for RecordError {
    fn from(e: CborError) -> Self {
        match e {
            CborError::InvalidUtf8 => RecordError::InvalidUtf8,
            e => RecordError::Cbor(e),
        }
    }
}

#[derive(Clone, Copy)]
struct Entry {
    key: (usize, usize),
    val: (usize, usize),
}

/// Renders records; keep one per worker so its scratch stack is reused.
#[derive(Default)]
pub struct RecordWriter {
    entries: Vec<Entry>,
}

impl RecordWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the JSON of one record (a DAG-CBOR map) to `out`. On error `out` may hold a
    /// partial write: the caller truncates it back.
    pub fn write_record(&mut self, record: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if record.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge);
        }
        self.entries.clear();
        let mut r = Reader::new(record);
        if record.first().map(|b| b >> 5) != Some(cbor::MAP) {
            return Err(RecordError::NotAnObject);
        }
        let rec = Rec { buf: record };
        rec.value(&mut r, out, 0, &mut self.entries)?;
        if !r.is_empty() {
            return Err(RecordError::TrailingBytes);
        }
        Ok(())
    }
}

struct Rec<'a> {
    buf: &'a [u8],
}

impl<'a> Rec<'a> {
    fn value(
        &self,
        r: &mut Reader<'a>,
        out: &mut Vec<u8>,
        depth: usize,
        stack: &mut Vec<Entry>,
    ) -> Result<(), RecordError> {
        let (h, info) = r.read_head_full()?;
        match h.major {
            cbor::UINT | cbor::NINT => write_i64(out, cbor::head_to_i64(h).ok_or(RecordError::IntOverflow)?),
            cbor::BYTES => {
                let b = take_string(r, h.arg)?;
                out.extend_from_slice(b"{\"$bytes\":\"");
                cid::write_base64_nopad(out, b);
                out.extend_from_slice(b"\"}");
            }
            cbor::TEXT => {
                let s = take_string(r, h.arg)?;
                let s = std::str::from_utf8(s).map_err(|_| RecordError::InvalidUtf8)?;
                write_json_str(out, s);
            }
            cbor::ARRAY => {
                if h.arg > MAX_CONTAINER_LEN {
                    return Err(RecordError::TooManyElements);
                }
                if depth + 1 > MAX_RECORD_DEPTH {
                    return Err(RecordError::TooDeep);
                }
                out.push(b'[');
                for i in 0..h.arg {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.value(r, out, depth + 1, stack)?;
                }
                out.push(b']');
            }
            cbor::MAP => self.map(r, h.arg, out, depth + 1, stack)?,
            cbor::TAG => {
                if h.arg != 42 {
                    return Err(RecordError::Cbor(CborError::BadTag));
                }
                let link = read_tag42_cid(r)?;
                write_link(out, link);
            }
            _ => match info {
                20 => out.extend_from_slice(b"false"),
                21 => out.extend_from_slice(b"true"),
                22 => out.extend_from_slice(b"null"),
                _ => write_i64(out, integral_float(h.arg)?),
            },
        }
        Ok(())
    }

    fn map(
        &self,
        r: &mut Reader<'a>,
        len: u64,
        out: &mut Vec<u8>,
        depth: usize,
        stack: &mut Vec<Entry>,
    ) -> Result<(), RecordError> {
        if len > MAX_CONTAINER_LEN {
            return Err(RecordError::TooManyElements);
        }
        if depth > MAX_RECORD_DEPTH {
            return Err(RecordError::TooDeep);
        }
        let base = stack.len();
        for _ in 0..len {
            let kh = r.read_head()?;
            if kh.major != cbor::TEXT {
                return Err(RecordError::NonStringKey);
            }
            let start = r.position();
            let key = r.take_len(kh.arg)?;
            if key.len() > MAX_KEY_BYTES {
                return Err(RecordError::KeyTooLong);
            }
            std::str::from_utf8(key).map_err(|_| RecordError::InvalidUtf8)?;
            let vstart = r.position();
            r.skip()?;
            stack.push(Entry { key: (start, start + key.len()), val: (vstart, r.position()) });
        }
        let result = self.map_entries(base, out, depth, stack);
        stack.truncate(base);
        result
    }

    fn key(&self, e: &Entry) -> &'a [u8] {
        &self.buf[e.key.0..e.key.1]
    }

    fn val(&self, e: &Entry) -> Reader<'a> {
        Reader::new(&self.buf[..e.val.1]).advanced_to(e.val.0)
    }

    fn find(&self, entries: &[Entry], key: &[u8]) -> Option<Entry> {
        entries.iter().find(|e| self.key(e) == key).copied()
    }

    fn map_entries(
        &self,
        base: usize,
        out: &mut Vec<u8>,
        depth: usize,
        stack: &mut Vec<Entry>,
    ) -> Result<(), RecordError> {
        // The special shapes, checked in atdata's order: $link, $bytes, $type (blob), legacy blob.
        let n = stack.len() - base;
        if let Some(e) = self.find(&stack[base..], b"$link") {
            if n != 1 {
                return Err(RecordError::BadLink);
            }
            let s = self.val(&e).read_str().map_err(|_| RecordError::BadLink)?;
            let bin = cid::parse_cid_string(s).ok_or(RecordError::BadLink)?;
            write_link(out, &bin);
            return Ok(());
        }
        if let Some(e) = self.find(&stack[base..], b"$bytes") {
            if n != 1 {
                return Err(RecordError::BadBytes);
            }
            let s = self.val(&e).read_str().map_err(|_| RecordError::BadBytes)?;
            let raw = cid::decode_base64_nopad(s.as_bytes()).ok_or(RecordError::BadBytes)?;
            out.extend_from_slice(b"{\"$bytes\":\"");
            cid::write_base64_nopad(out, &raw);
            out.extend_from_slice(b"\"}");
            return Ok(());
        }
        if let Some(e) = self.find(&stack[base..], b"$type") {
            let t = self.val(&e).read_str().map_err(|_| RecordError::BadType)?;
            if t.is_empty() {
                return Err(RecordError::BadType);
            }
            if t == "blob" {
                return self.blob(&stack[base..], out);
            }
        }
        if n == 2 {
            if let (Some(c), Some(m)) = (self.find(&stack[base..], b"cid"), self.find(&stack[base..], b"mimeType")) {
                return self.legacy_blob(c, m, out);
            }
        }

        let entries = &mut stack[base..];
        let buf = self.buf;
        entries.sort_unstable_by(|a, b| buf[a.key.0..a.key.1].cmp(&buf[b.key.0..b.key.1]));
        if entries.windows(2).any(|w| self.key(&w[0]) == self.key(&w[1])) {
            return Err(RecordError::DuplicateKey);
        }
        out.push(b'{');
        for i in 0..n {
            let e = stack[base + i];
            if i > 0 {
                out.push(b',');
            }
            // Keys were UTF-8 checked while collecting.
            write_json_str(out, std::str::from_utf8(self.key(&e)).unwrap_or_default());
            out.push(b':');
            let mut vr = self.val(&e);
            self.value(&mut vr, out, depth, stack)?;
        }
        out.push(b'}');
        Ok(())
    }

    /// `{"$type":"blob","ref":…,"mimeType":…,"size":…}`: exactly these four keys.
    fn blob(&self, entries: &[Entry], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if entries.len() != 4 {
            return Err(RecordError::BadBlob);
        }
        let get = |k: &[u8]| self.find(entries, k).ok_or(RecordError::BadBlob);
        let (rf, mt, sz) = (get(b"ref")?, get(b"mimeType")?, get(b"size")?);
        let size = {
            let mut vr = self.val(&sz);
            let (h, info) = vr.read_head_full()?;
            let n = match (h.major, info) {
                (cbor::UINT, _) | (cbor::NINT, _) => cbor::head_to_i64(h).ok_or(RecordError::BadBlob)?,
                (cbor::SIMPLE, 27) => integral_float(h.arg).map_err(|_| RecordError::BadBlob)?,
                _ => return Err(RecordError::BadBlob),
            };
            if n < 0 {
                return Err(RecordError::BadBlob);
            }
            n
        };
        let mime = self.val(&mt).read_str().map_err(|_| RecordError::BadBlob)?;
        let mut link_out = Vec::with_capacity(80);
        let mut rr = self.val(&rf);
        match rr.remaining().first().map(|b| b >> 5) {
            Some(cbor::TAG) => {
                let link = rr.read_link().map_err(|_| RecordError::BadBlob)?;
                if !cid::is_link(link) {
                    return Err(RecordError::BadLink);
                }
                write_link(&mut link_out, link);
            }
            Some(cbor::MAP) => {
                // A ref written as a `{"$link": "…"}` map is accepted by atdata too.
                let len = rr.read_map_len()?;
                let key = rr.read_str().map_err(|_| RecordError::BadBlob)?;
                if len != 1 || key != "$link" {
                    return Err(RecordError::BadLink);
                }
                let s = rr.read_str().map_err(|_| RecordError::BadLink)?;
                let bin = cid::parse_cid_string(s).ok_or(RecordError::BadLink)?;
                write_link(&mut link_out, &bin);
            }
            _ => return Err(RecordError::BadBlob),
        }
        out.extend_from_slice(b"{\"$type\":\"blob\",\"ref\":");
        out.extend_from_slice(&link_out);
        out.extend_from_slice(b",\"mimeType\":");
        write_json_str(out, mime);
        out.extend_from_slice(b",\"size\":");
        write_i64(out, size);
        out.push(b'}');
        Ok(())
    }

    /// `{cid: "<CID string>", mimeType}`, re-emitted as `{"cid":…,"mimeType":…}`.
    fn legacy_blob(&self, c: Entry, m: Entry, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let mime = self.val(&m).read_str().map_err(|_| RecordError::BadBlob)?;
        let mut cr = self.val(&c);
        let bin = match cr.remaining().first().map(|b| b >> 5) {
            Some(cbor::TEXT) => cid::parse_cid_string(cr.read_str()?).ok_or(RecordError::BadBlob)?,
            Some(cbor::TAG) => read_tag42_cid(&mut cr)?.to_vec(),
            _ => return Err(RecordError::BadBlob),
        };
        out.extend_from_slice(b"{\"cid\":\"");
        cid::write_cid_string(out, &bin);
        out.extend_from_slice(b"\",\"mimeType\":");
        write_json_str(out, mime);
        out.push(b'}');
        Ok(())
    }
}

fn take_string<'a>(r: &mut Reader<'a>, len: u64) -> Result<&'a [u8], RecordError> {
    if len > MAX_STRING_BYTES as u64 {
        return Err(RecordError::StringTooLong);
    }
    Ok(r.take_len(len)?)
}

/// Reads the byte string after a tag-42 head and checks it is a CID (v1, or v0 as in old
/// records).
fn read_tag42_cid<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], RecordError> {
    let h = r.read_head()?;
    if h.major != cbor::BYTES {
        return Err(RecordError::BadLink);
    }
    let b = r.take_len(h.arg)?;
    match b.split_first() {
        Some((0, c)) if cid::is_link(c) => Ok(c),
        _ => Err(RecordError::BadLink),
    }
}

/// atdata turns an integral float into an int64 and rejects every other float.
fn integral_float(bits: u64) -> Result<i64, RecordError> {
    let f = f64::from_bits(bits);
    // 2^63 is exactly representable; anything at or beyond it does not fit int64.
    if f.is_finite() && f.fract() == 0.0 && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
        Ok(f as i64)
    } else {
        Err(RecordError::Float)
    }
}

fn write_link(out: &mut Vec<u8>, cid_bytes: &[u8]) {
    out.extend_from_slice(b"{\"$link\":\"");
    cid::write_cid_string(out, cid_bytes);
    out.extend_from_slice(b"\"}");
}

/// Appends a decimal integer.
pub fn write_i64(out: &mut Vec<u8>, v: i64) {
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(itoa::Buffer::new().format(v.unsigned_abs()).as_bytes());
}

/// 0: copy as is; 1: needs an escape (controls, `"`, `\`, `<`, `>`, `&`); 2: 0xE2, the lead
/// byte of U+2028/U+2029, checked further.
static ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = 1;
        i += 1;
    }
    t[b'"' as usize] = 1;
    t[b'\\' as usize] = 1;
    t[b'<' as usize] = 1;
    t[b'>' as usize] = 1;
    t[b'&' as usize] = 1;
    t[0xE2] = 2;
    t
};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `s` as a JSON string with Go's HTML-safe escaping.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        let class = ESCAPE[b[i] as usize];
        if class == 0 {
            i += 1;
            continue;
        }
        if class == 2 {
            // U+2028 is E2 80 A8, U+2029 is E2 80 A9; other E2 sequences pass through.
            if b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xA8 | 0xA9)) {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(if b[i + 2] == 0xA8 { b"\\u2028" } else { b"\\u2029" });
                i += 3;
                start = i;
            } else {
                i += 1;
            }
            continue;
        }
        out.extend_from_slice(&b[start..i]);
        match b[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c => out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]]),
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(cbor: &[u8]) -> Result<String, RecordError> {
        let mut out = Vec::new();
        RecordWriter::new().write_record(cbor, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn go_escaping() {
        let mut out = Vec::new();
        write_json_str(&mut out, "a&b<c>\"\\\n\r\t\u{1}\u{2028}\u{2029}\u{2030}é😀\u{7f}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""a\u0026b\u003cc\u003e\"\\\n\r\t\u0001\u2028\u2029‰é😀"#.to_string() + "\u{7f}\""
        );
    }

    #[test]
    fn keys_sorted_bytewise_not_length_first() {
        // {"b": 1, "aa": 2} in canonical (length-first) order
        assert_eq!(render(&[0xa2, 0x61, b'b', 0x01, 0x62, b'a', b'a', 0x02]).unwrap(), r#"{"aa":2,"b":1}"#);
    }

    #[test]
    fn floats_and_ints() {
        // {"a": 1.0} → integer; {"a": 1.5} → rejected
        let one = [0xa1, 0x61, b'a', 0xfb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0];
        assert_eq!(render(&one).unwrap(), r#"{"a":1}"#);
        let half = [0xa1, 0x61, b'a', 0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0];
        assert_eq!(render(&half), Err(RecordError::Float));
        let big = [0xa1, 0x61, b'a', 0x1b, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(render(&big), Err(RecordError::IntOverflow));
        let neg = [0xa1, 0x61, b'a', 0x3b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(render(&neg).unwrap(), format!(r#"{{"a":{}}}"#, i64::MIN));
    }

    #[test]
    fn deep_nesting_is_rejected_without_overflowing_the_stack() {
        let mut rec = vec![0xa1, 0x61, b'a'];
        rec.extend(std::iter::repeat_n(0x81u8, 10_000));
        rec.push(0x01);
        assert_eq!(render(&rec), Err(RecordError::TooDeep));
        let mut ok = vec![0xa1, 0x61, b'a'];
        ok.extend(std::iter::repeat_n(0x81u8, MAX_RECORD_DEPTH - 1));
        ok.push(0x01);
        assert!(render(&ok).is_ok());
    }

    #[test]
    fn duplicate_keys_and_bad_utf8() {
        assert_eq!(render(&[0xa2, 0x61, b'a', 0x01, 0x61, b'a', 0x02]), Err(RecordError::DuplicateKey));
        assert_eq!(render(&[0xa1, 0x61, b'a', 0x61, 0xff]), Err(RecordError::InvalidUtf8));
        assert_eq!(render(&[0xa1, 0x01, 0x01]), Err(RecordError::NonStringKey));
        assert_eq!(render(&[0x81, 0x01]), Err(RecordError::NotAnObject));
        assert_eq!(render(&[0xa1, 0x61, b'a', 0x01, 0x00]), Err(RecordError::TrailingBytes));
    }
}
