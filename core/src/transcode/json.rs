//! DAG-CBOR record → JSON, byte-identical to what production Jetstream v1 sent.
//!
//! Jetstream v1 decoded records with indigo's `atdata` into Go maps and marshalled them with
//! an HTML-escaping encoder. The rules reproduced here (spec/jetstream.md §3.2):
//! - links → `{"$link":"bafy…"}`, bytes → `{"$bytes":"…"}` (standard base64, no padding);
//! - blobs (`$type: "blob"`, exactly four keys) in their struct order `$type, ref, mimeType,
//!   size`; legacy blobs (`{cid, mimeType}`) re-emitted as `{"cid":…,"mimeType":…}`;
//! - every other map with keys sorted bytewise as v1's encoder wrote them (escaped, then the
//!   closing quote: [`go_key_order`]), not DAG-CBOR's length-first;
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
/// Deepest nesting of maps and arrays in a record, counting the objects a link (`$link`),
/// bytes (`$bytes`) or a blob's `ref` become. The record sits at depth 3 of the event
/// (`{commit:{record:…}}`), so 125 keeps every event within the 127 levels that serde_json
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

/// Records from this size on have their containers' spans indexed before they are rendered
/// ([`Reader::index_containers`]). A map's values are found (skipped over) before they are
/// written, to sort its keys, so without the index every byte is walked once per enclosing
/// map: 125 levels of maps around 1 MiB of items is over 10⁸ steps for one record. Below this
/// size that costs at most 125 × 1 KiB, less than the index.
const INDEX_FROM_BYTES: usize = 1024;

/// Items of the span index and of the map-entry stack kept between records: a real record
/// needs a few dozen; a hostile one may have needed hundreds of thousands.
const KEEP_LIST_ITEMS: usize = 4096;

/// Renders records; keep one per worker so its scratch stack and index are reused.
pub struct RecordWriter {
    entries: Vec<Entry>,
    /// The record's containers' spans, by start (records from `index_from` bytes on).
    spans: Vec<(u32, u32)>,
    index_from: usize,
}

impl Default for RecordWriter {
    fn default() -> Self {
        RecordWriter { entries: Vec::new(), spans: Vec::new(), index_from: INDEX_FROM_BYTES }
    }
}

impl RecordWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer that indexes records from `bytes` on (tests compare 0 with `usize::MAX`).
    #[cfg(test)]
    fn indexing_from(bytes: usize) -> Self {
        RecordWriter { index_from: bytes, ..Self::default() }
    }

    /// Appends the JSON of one record (a DAG-CBOR map) to `out`. On error `out` may hold a
    /// partial write: the caller truncates it back.
    pub fn write_record(&mut self, record: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        if record.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge);
        }
        self.entries.clear();
        self.spans.clear();
        let mut r = Reader::new(record);
        if record.first().map(|b| b >> 5) != Some(cbor::MAP) {
            return Err(RecordError::NotAnObject);
        }
        if record.len() >= self.index_from {
            // (A lookup is for a value of a map at most MAX_RECORD_DEPTH deep.)
            Reader::new(record).index_containers(&mut self.spans, MAX_RECORD_DEPTH + 1);
        }
        let rec = Rec { buf: record, spans: &self.spans };
        let rendered = rec.value(&mut r, out, 0, &mut self.entries).and_then(|()| match r.is_empty() {
            true => Ok(()),
            false => Err(RecordError::TrailingBytes),
        });
        // A hostile record's lists are not kept for the records after it.
        if self.spans.capacity() > KEEP_LIST_ITEMS || self.entries.capacity() > KEEP_LIST_ITEMS {
            (self.spans, self.entries) = (Vec::new(), Vec::new());
        }
        rendered
    }
}

struct Rec<'a> {
    buf: &'a [u8],
    spans: &'a [(u32, u32)],
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
                // `{"$bytes":…}` is a level of the JSON too.
                if depth + 1 > MAX_RECORD_DEPTH {
                    return Err(RecordError::TooDeep);
                }
                let b = take_string(r, h.arg)?;
                out.extend_from_slice(b"{\"$bytes\":\"");
                cid::write_base64_nopad(out, b);
                out.extend_from_slice(b"\"}");
            }
            cbor::TEXT => {
                write_json_text(out, take_string(r, h.arg)?)?;
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
                // `{"$link":…}` is a level of the JSON too.
                if depth + 1 > MAX_RECORD_DEPTH {
                    return Err(RecordError::TooDeep);
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
            cbor::check_utf8(key)?;
            let vstart = r.position();
            self.skip(r)?;
            stack.push(Entry { key: (start, start + key.len()), val: (vstart, r.position()) });
        }
        let result = self.map_entries(base, out, depth, stack);
        stack.truncate(base);
        result
    }

    /// Skips one value: a container whose span is indexed by a jump to its end.
    fn skip(&self, r: &mut Reader<'a>) -> Result<(), CborError> {
        let at = r.position();
        if let Ok(i) = self.spans.binary_search_by_key(&(at as u32), |s| s.0) {
            let end = self.spans[i].1 as usize;
            if end > at {
                r.jump_to(end);
                return Ok(());
            }
        }
        r.skip()
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
        // The record itself (depth 1) must be none of them: atdata reads it as a link, bytes or
        // a blob, "not an object", and Jetstream v1 dropped the op.
        let n = stack.len() - base;
        let shape = |done: Result<(), RecordError>| match done {
            Ok(()) if depth == 1 => Err(RecordError::NotAnObject),
            done => done,
        };
        if let Some(e) = self.find(&stack[base..], b"$link") {
            if n != 1 {
                return Err(RecordError::BadLink);
            }
            let s = self.val(&e).read_str().map_err(|_| RecordError::BadLink)?;
            let bin = cid::parse_cid_string(s).ok_or(RecordError::BadLink)?;
            write_link(out, &bin);
            return shape(Ok(()));
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
            return shape(Ok(()));
        }
        if let Some(e) = self.find(&stack[base..], b"$type") {
            let t = self.val(&e).read_str().map_err(|_| RecordError::BadType)?;
            if t.is_empty() {
                return Err(RecordError::BadType);
            }
            if t == "blob" {
                // Its `ref`, `{"$link":…}`, is a level deeper.
                if depth + 1 > MAX_RECORD_DEPTH {
                    return Err(RecordError::TooDeep);
                }
                return shape(self.blob(&stack[base..], out));
            }
        }
        if n == 2 {
            if let (Some(c), Some(m)) = (self.find(&stack[base..], b"cid"), self.find(&stack[base..], b"mimeType")) {
                return shape(self.legacy_blob(c, m, out));
            }
        }

        let entries = &mut stack[base..];
        let buf = self.buf;
        entries.sort_unstable_by(|a, b| go_key_order(&buf[a.key.0..a.key.1], &buf[b.key.0..b.key.1]));
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
            write_json_checked(out, self.key(&e));
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
    write_json_checked(out, s.as_bytes());
}

/// [`write_json_str`] for bytes already checked to be UTF-8.
fn write_json_checked(out: &mut Vec<u8>, b: &[u8]) {
    write_json_bytes(out, b, true).expect("no check runs on checked bytes");
}

/// Appends `text` as [`write_json_str`] does, checking in the same pass that it is UTF-8: a
/// record's strings arrive as bytes, and most are ASCII, which a separate check would read
/// twice.
fn write_json_text(out: &mut Vec<u8>, text: &[u8]) -> Result<(), RecordError> {
    write_json_bytes(out, text, false).map_err(|_| RecordError::InvalidUtf8)
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes in `w` is not plain ASCII to copy as is: a byte of a
/// multi-byte character (0xE2 among them), a control, or one of `"` `\` `<` `>` `&`. Exact
/// for the word as a whole (the usual "has a zero byte" arithmetic), so a clean word is
/// copied without looking at its bytes one by one.
#[inline]
fn needs_a_look(w: u64) -> bool {
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    // A byte equal to `c`, or to `c` with the bits of `ignored` changed.
    let equal = |c: u8, ignored: u8| zero_byte((w ^ (ONES * c as u64)) & !(ONES * ignored as u64));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGHS;
    // `"` is 0x22 and `&` 0x26; `<` is 0x3C and `>` 0x3E.
    (w & HIGHS) | control | equal(b'"', 0x04) | equal(b'<', 0x02) | equal(b'\\', 0) != 0
}

/// The (up to eight) bytes of `b` from `at` as a word, padded with a letter.
#[inline]
fn word_at(b: &[u8], at: usize) -> u64 {
    match b.get(at..at + 8) {
        Some(w) => u64::from_le_bytes(w.try_into().expect("eight bytes")),
        None => {
            let mut w = [b'a'; 8];
            w[..b.len() - at].copy_from_slice(&b[at..]);
            u64::from_le_bytes(w)
        }
    }
}

/// The escaper. `checked`: `b` is known to be UTF-8; otherwise the rest of it is checked from
/// its first non-ASCII byte on (an ASCII prefix is UTF-8 whatever follows it).
fn write_json_bytes(out: &mut Vec<u8>, b: &[u8], mut checked: bool) -> Result<(), std::str::Utf8Error> {
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        // Eight bytes at a time while there is nothing to see; then the next eight one by one
        // (an escape may run past them, which only moves `i` on further).
        if !needs_a_look(word_at(b, i)) {
            i += 8;
            continue;
        }
        let end = (i + 8).min(b.len());
        while i < end {
            let c = b[i];
            if c >= 0x80 && !checked {
                std::str::from_utf8(&b[i..])?;
                checked = true;
            }
            let mut escape = [0u8; 6];
            match escape_at(b, i, &mut escape) {
                None => i += 1,
                Some((n, stands_for)) => {
                    out.extend_from_slice(&b[start..i]);
                    out.extend_from_slice(&escape[..n]);
                    i += stands_for;
                    start = i;
                }
            }
        }
    }
    out.extend_from_slice(&b[start..]);
    out.push(b'"');
    Ok(())
}

/// The order v1's encoder (goccy/go-json) gives a map's keys: by their encoded bytes, each
/// escaped as [`write_json_str`] does and followed by the closing quote (it sorts the `"key",`
/// it wrote). Raw bytewise order but where escaping or the quote decides: a key before
/// another that it begins when the other goes on with a space or `!` (below `"`), and keys
/// that differ at a character written escaped (`\n` after `\t`, `<` after `A`). Both keys are
/// UTF-8 (checked while collecting).
fn go_key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // From the start of the character where they differ: the same prefix encodes alike.
    let mut at = common;
    while at > 0 && at < a.len().max(b.len()) && continuation(a.get(at).or(b.get(at)).copied()) {
        at -= 1;
    }
    let (mut x, mut y) = ([0u8; 6], [0u8; 6]);
    let (nx, ny) = (encoded_char(a, at, &mut x), encoded_char(b, at, &mut y));
    x[..nx].cmp(&y[..ny])
}

fn continuation(byte: Option<u8>) -> bool {
    byte.is_some_and(|c| c & 0xC0 == 0x80)
}

/// The encoded form of the character of `key` at `at` (or the closing quote at its end) into
/// `out`; its length.
fn encoded_char(key: &[u8], at: usize, out: &mut [u8; 6]) -> usize {
    let Some(&c) = key.get(at) else {
        out[0] = b'"';
        return 1;
    };
    if let Some((n, _)) = escape_at(key, at, out) {
        return n;
    }
    // Written as is: the whole UTF-8 character.
    let n = match c {
        0xF0.. => 4,
        0xE0.. => 3,
        0x80.. => 2,
        _ => 1,
    }
    .min(key.len() - at);
    out[..n].copy_from_slice(&key[at..at + n]);
    n
}

/// Go's escape for the character at `b[i]` when it is written escaped (a control, `"` `\`
/// `<` `>` `&`, U+2028 or U+2029), into `out`: its length, and how many bytes of `b` it
/// stands for. `None`: written as is.
#[inline]
fn escape_at(b: &[u8], i: usize, out: &mut [u8; 6]) -> Option<(usize, usize)> {
    let c = b[i];
    let (escape, stands_for): (&[u8], usize) = match ESCAPE[c as usize] {
        0 => return None,
        // U+2028 is E2 80 A8, U+2029 is E2 80 A9; other E2 sequences pass through.
        2 if b.get(i + 1) == Some(&0x80) && matches!(b.get(i + 2), Some(0xA8 | 0xA9)) => {
            (if b[i + 2] == 0xA8 { b"\\u2028" } else { b"\\u2029" }, 3)
        }
        2 => return None,
        _ => match c {
            b'"' => (b"\\\"", 1),
            b'\\' => (b"\\\\", 1),
            b'\n' => (b"\\n", 1),
            b'\r' => (b"\\r", 1),
            b'\t' => (b"\\t", 1),
            c => {
                *out = [b'\\', b'u', b'0', b'0', HEX[(c >> 4) as usize], HEX[(c & 15) as usize]];
                return Some((6, 1));
            }
        },
    };
    out[..escape.len()].copy_from_slice(escape);
    Some((escape.len(), stands_for))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys in v1's order: by their escaped bytes and closing quote, not their raw bytes.
    #[test]
    fn map_keys_are_ordered_as_v1_encodes_them() {
        fn order<'a>(keys: &[&'a str]) -> Vec<&'a str> {
            let mut v = keys.to_vec();
            v.sort_by(|a, b| go_key_order(a.as_bytes(), b.as_bytes()));
            v
        }
        assert_eq!(order(&["b", "a"]), ["a", "b"]);
        assert_eq!(order(&["a", "a b"]), ["a b", "a"], "a space is below the closing quote");
        assert_eq!(order(&["a", "a!"]), ["a!", "a"]);
        assert_eq!(order(&["a#", "a"]), ["a", "a#"], "# is above it");
        assert_eq!(order(&["<", "A"]), ["A", "<"], "< is written \\u003c");
        assert_eq!(order(&["\t", "\n"]), ["\n", "\t"], "\\n before \\t");
        assert_eq!(order(&["\u{2000}", "\u{2028}"]), ["\u{2028}", "\u{2000}"], "\\u2028 before raw E2");
        assert_eq!(order(&["z", "é", "$type", "Z"]), ["$type", "Z", "z", "é"]);
        assert_eq!(order(&["ab\u{2029}", "ab\u{2028}", "ab"]), ["ab", "ab\u{2028}", "ab\u{2029}"]);
        // The same as sorting the encoded keys with their closing quote, for any keys.
        let keys = [
            "",
            " ",
            "!",
            "\"",
            "a",
            "a\"",
            "a\\",
            "a ",
            "a!",
            "a\u{1}",
            "a<",
            "aé",
            "a\u{2028}",
            "a\u{2027}",
            "é",
            "\u{10000}",
        ];
        let mut by_encoding = keys.to_vec();
        by_encoding.sort_by_key(|k| {
            let mut e = Vec::new();
            write_json_str(&mut e, k);
            e.push(b',');
            e
        });
        assert_eq!(order(&keys), by_encoding);
    }

    fn render(cbor: &[u8]) -> Result<String, RecordError> {
        let mut out = Vec::new();
        RecordWriter::new().write_record(cbor, &mut out)?;
        Ok(String::from_utf8(out).unwrap())
    }

    /// A DAG-CBOR-ish value for the property test below.
    #[derive(Debug, Clone)]
    enum V {
        Int(i64),
        Float(f64),
        Text(String),
        Bytes(Vec<u8>),
        Link(Vec<u8>),
        Simple(u8),
        Array(Vec<V>),
        Map(Vec<(String, V)>),
    }

    fn head(out: &mut Vec<u8>, major: u8, arg: u64) {
        match arg {
            0..=23 => out.push(major << 5 | arg as u8),
            24..=0xff => out.extend_from_slice(&[major << 5 | 24, arg as u8]),
            0x100..=0xffff => {
                out.push(major << 5 | 25);
                out.extend_from_slice(&(arg as u16).to_be_bytes());
            }
            _ => {
                out.push(major << 5 | 26);
                out.extend_from_slice(&(arg as u32).to_be_bytes());
            }
        }
    }

    fn encode(v: &V, out: &mut Vec<u8>) {
        match v {
            V::Int(i) if *i >= 0 => head(out, 0, *i as u64),
            V::Int(i) => head(out, 1, (-1 - *i) as u64),
            V::Float(f) => {
                out.push(0xfb);
                out.extend_from_slice(&f.to_bits().to_be_bytes());
            }
            V::Text(t) => {
                head(out, 3, t.len() as u64);
                out.extend_from_slice(t.as_bytes());
            }
            V::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            V::Link(b) => {
                out.extend_from_slice(&[0xd8, 42]);
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            V::Simple(code) => out.push(0xe0 | code),
            V::Array(items) => {
                head(out, 4, items.len() as u64);
                items.iter().for_each(|i| encode(i, out));
            }
            V::Map(entries) => {
                head(out, 5, entries.len() as u64);
                for (k, v) in entries {
                    encode(&V::Text(k.clone()), out);
                    encode(v, out);
                }
            }
        }
    }

    fn value() -> impl proptest::strategy::Strategy<Value = V> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<i64>().prop_map(V::Int),
            prop_oneof![Just(1.0f64), Just(1.5), Just(-3.0)].prop_map(V::Float),
            "[a-z$&<\u{2028}]{0,12}".prop_map(V::Text),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(V::Bytes),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut b| {
                // A CIDv1 (dag-cbor, sha-256) behind the identity-multibase prefix, mostly.
                let mut cid = vec![0x00, 0x01, 0x71, 0x12, 0x20];
                cid.extend(std::iter::repeat_n(7u8, 32));
                if b.first().is_some_and(|x| x % 4 != 0) {
                    b = cid;
                }
                V::Link(b)
            }),
            prop_oneof![Just(20u8), Just(21), Just(22)].prop_map(V::Simple),
        ];
        leaf.prop_recursive(40, 600, 12, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..12).prop_map(V::Array),
                proptest::collection::vec(("(\\$type|\\$link|\\$bytes|cid|mimeType|ref|size|[a-c]{1,2})", inner), 0..6)
                    .prop_map(V::Map),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, ..Default::default() })]

        /// Rendering with the containers' spans indexed gives exactly what rendering without
        /// the index gives: the same JSON, or the same error, for valid and damaged records.
        #[test]
        fn the_span_index_changes_nothing_rendered(
            entries in proptest::collection::vec(("[a-d]{1,2}", value()), 0..6),
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), 0u8..3), 0..3),
        ) {
            let mut record = Vec::new();
            encode(&V::Map(entries), &mut record);
            for (at, byte, kind) in edits {
                let i = at.index(record.len());
                match kind {
                    0 => record[i] = byte,
                    1 => record.insert(i, byte),
                    _ => record.truncate(i.max(1)),
                }
            }
            let (mut with, mut without) = (Vec::new(), Vec::new());
            let a = RecordWriter::indexing_from(0).write_record(&record, &mut with);
            let b = RecordWriter::indexing_from(usize::MAX).write_record(&record, &mut without);
            proptest::prop_assert_eq!(a, b);
            if a.is_ok() {
                proptest::prop_assert_eq!(with, without);
            }
        }
    }

    /// 120 maps around seven arrays of 4,096 zeros: each item is read a few times (the index,
    /// the innermost map's look at its values, the rendering), not once per enclosing map.
    #[test]
    fn a_deeply_nested_record_is_walked_a_few_times_not_once_per_level() {
        let mut record = vec![0xa7];
        for key in b'a'..=b'g' {
            // "a": [0, 0, … 4,096 of them]
            record.extend_from_slice(&[0x61, key, 0x99, 0x10, 0x00]);
            record.extend(std::iter::repeat_n(0u8, 4096));
        }
        for _ in 0..119 {
            let mut outer = vec![0xa1, 0x61, b'a'];
            outer.extend_from_slice(&record);
            record = outer;
        }
        let items = (7 * 4096 + 2 * 7 + 2 * 120) as u64;
        let heads_read = |mut writer: RecordWriter| {
            let mut out = Vec::new();
            let before = cbor::HEADS_READ.with(|n| n.get());
            writer.write_record(&record, &mut out).unwrap();
            cbor::HEADS_READ.with(|n| n.get()) - before
        };
        let indexed = heads_read(RecordWriter::new());
        assert!(indexed < 4 * items, "{indexed} heads read for {items} items");
        // The baseline, without the index: once per enclosing map.
        let unindexed = heads_read(RecordWriter::indexing_from(usize::MAX));
        assert!(unindexed > 100 * items, "{unindexed} heads read for {items} items");
    }

    /// A record nested far deeper than any can be rendered: the index holds no more than the
    /// renderable depth, keeps no large lists after it, and the answer is the same.
    #[test]
    fn a_record_nested_past_the_limit_is_indexed_only_to_it() {
        // {"a": [[[[…]]]]} with 500,000 arrays, and {"a": {"a": {…}}} with 300,000 maps.
        let mut arrays = vec![0xa1, 0x61, b'a'];
        arrays.extend(std::iter::repeat_n(0x81, 500_000));
        arrays.push(0x00);
        let mut maps = Vec::new();
        for _ in 0..300_000 {
            maps.extend_from_slice(&[0xa1, 0x61, b'a']);
        }
        maps.push(0x00);
        // {"a": 42(42(42(…)))} with 400,000 tags: nothing to index, and a link must be a byte
        // string (BadLink). (That the indexer's stack stays at the depth limit here, as for
        // containers, is not visible from a test.)
        let mut tags = vec![0xa1, 0x61, b'a'];
        for _ in 0..400_000 {
            tags.extend_from_slice(&[0xd8, 42]);
        }
        tags.push(0x40);
        let mut spans = Vec::new();
        Reader::new(&tags).index_containers(&mut spans, MAX_RECORD_DEPTH + 1);
        assert!(spans.is_empty());
        let mut out = Vec::new();
        assert_eq!(RecordWriter::new().write_record(&tags, &mut out), Err(RecordError::BadLink));
        for record in [arrays, maps] {
            let mut spans = Vec::new();
            Reader::new(&record).index_containers(&mut spans, MAX_RECORD_DEPTH + 1);
            assert!(spans.len() <= MAX_RECORD_DEPTH + 1, "{} spans", spans.len());
            let mut writer = RecordWriter::new();
            let mut out = Vec::new();
            assert_eq!(writer.write_record(&record, &mut out), Err(RecordError::TooDeep));
            let mut out = Vec::new();
            assert_eq!(
                RecordWriter::indexing_from(usize::MAX).write_record(&record, &mut out),
                Err(RecordError::TooDeep)
            );
            assert!(writer.spans.capacity() <= KEEP_LIST_ITEMS && writer.entries.capacity() <= KEEP_LIST_ITEMS);
        }
    }

    #[test]
    fn the_span_index_holds_every_complete_container() {
        // {"a": [1, {"b": []}], "c": {}}: the containers that are a map's values (the array,
        // [] and {}; not the root, nor the map inside the array).
        let rec = [0xa2, 0x61, b'a', 0x82, 0x01, 0xa1, 0x61, b'b', 0x80, 0x61, b'c', 0xa0];
        let mut spans = Vec::new();
        Reader::new(&rec).index_containers(&mut spans, 10);
        assert_eq!(spans, vec![(3, 9), (8, 9), (11, 12)]);
        // Truncated inside the array: its end is unknown. (The inner map's count is more than
        // the bytes left: not a container.)
        spans.clear();
        Reader::new(&rec[..7]).index_containers(&mut spans, 10);
        assert_eq!(spans, vec![(3, 0)]);
        // Past the depth asked for, containers are skipped whole, not recorded.
        spans.clear();
        Reader::new(&rec).index_containers(&mut spans, 1);
        assert_eq!(spans, vec![(3, 9), (11, 12)]);
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

    /// Go's HTML-safe escaping written the plain way, one character at a time: what the
    /// word-at-a-time escaper must match.
    fn escaped_one_by_one(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{2028}' => out.push_str("\\u2028"),
                '\u{2029}' => out.push_str("\\u2029"),
                c if (c as u32) < 0x20 || matches!(c, '<' | '>' | '&') => out.push_str(&format!("\\u{:04x}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    proptest::proptest! {
        #[test]
        fn the_escaper_writes_what_one_character_at_a_time_writes(
            // Runs of plain letters, long enough to fill the escaper's 8-byte words, between
            // the characters it must see.
            s in "([a-z ]{0,12}[<>&\"\\\\\n\t\u{1}\u{1f}\u{7f}é\u{2028}\u{2029}\u{2030}😀]){0,5}[a-z]{0,12}"
        ) {
            let mut out = Vec::new();
            write_json_str(&mut out, &s);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), escaped_one_by_one(&s));
        }

        #[test]
        fn text_is_written_when_it_is_utf8_and_refused_when_not(
            s in "([a-z ]{0,12}[<>&\"\\\\\n\u{1}é\u{2028}😀]){0,5}[a-z]{0,12}",
            change in proptest::option::of((0usize..64, proptest::prelude::any::<u8>())),
        ) {
            // The text, with one byte changed now and then (often no longer UTF-8).
            let mut b = s.into_bytes();
            if let Some((at, byte)) = change.filter(|_| !b.is_empty()) {
                let at = at % b.len();
                b[at] = byte;
            }
            let mut out = Vec::new();
            let written = write_json_text(&mut out, &b);
            match std::str::from_utf8(&b) {
                Ok(s) => proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), escaped_one_by_one(s)),
                Err(_) => proptest::prop_assert_eq!(written, Err(RecordError::InvalidUtf8)),
            }
        }
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
        let deepest = render(&ok).unwrap();
        // The objects a link, bytes or a blob's ref become count as levels: in the deepest
        // container, one is a level too deep; a level up, it fits. Every event a record makes
        // then parses with serde_json's default limit.
        let mut link = vec![0xd8, 42, 0x58, 37, 0x00, 0x01, 0x71, 0x12, 0x20];
        link.extend([7u8; 32]);
        let blob = |rf: &[u8]| {
            let mut b = vec![0xa4];
            for (k, v) in [("$type", &b"\x64blob"[..]), ("ref", rf), ("mimeType", b"\x6aimage/jpeg"), ("size", b"\x01")]
            {
                b.push(0x60 | k.len() as u8);
                b.extend(k.as_bytes());
                b.extend(v);
            }
            b
        };
        let blob_ok = blob(&link);
        for leaf in [&link[..], &[0x41, 0x00][..], &blob_ok[..]] {
            let arrays = |n: usize| {
                let mut rec = vec![0xa1, 0x61, b'a'];
                rec.extend(std::iter::repeat_n(0x81u8, n));
                rec.extend(leaf);
                rec
            };
            // (A blob is a map itself: it takes the deepest container's place.)
            let fits = if leaf[0] == 0xa4 { MAX_RECORD_DEPTH - 3 } else { MAX_RECORD_DEPTH - 2 };
            let json = render(&arrays(fits)).unwrap();
            let event = format!(r#"{{"did":"did:plc:a","commit":{{"record":{json}}}}}"#);
            assert!(serde_json::from_str::<serde_json::Value>(&event).is_ok(), "{leaf:?}");
            assert_eq!(render(&arrays(fits + 1)), Err(RecordError::TooDeep), "{leaf:?}");
        }
        let event = format!(r#"{{"did":"did:plc:a","commit":{{"record":{deepest}}}}}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&event).is_ok());
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
