//! Relay frame → Jetstream v1 events. Pure: no I/O, no clock.
//!
//! A `subscribeRepos` websocket message is two DAG-CBOR items back to back: a header
//! `{op, t}` and a body. [`Transcoder::transcode`] decodes both, and for `#commit` indexes the
//! CAR in `blocks`, finds each op's record by `op.cid`, checks its sha-256, and renders it
//! to JSON ([`json`]). One event per op, plus one per `#identity` and `#account`.
//!
//! Bad upstream data is data (DESIGN.md invariant 6): the smallest unit is dropped with a
//! [`DropReason`] — the op, not the commit; the frame, not the connection — and the seq is
//! still reported whenever the body could be read, so the relay cursor moves past it.

pub mod car;
pub mod cbor;
pub mod cid;
pub mod json;

use crate::event::{Event, EventKind};
use crate::syntax;
use cbor::{CborError, Reader};
use json::{RecordError, RecordWriter};

/// The protocol's hard limit on one firehose frame (the Sync spec's 5 MB). Applied here, not
/// by the websocket layer, so an oversized frame is skipped by seq instead of closing the
/// connection and replaying the same frame forever.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 5_000_000;
/// The protocol's limit on ops in one commit (`website:specs/sync`; indigo `MaxCommitOps`).
pub const MAX_COMMIT_OPS: u64 = 200;
/// The protocol's limit on a commit's CAR bytes (indigo `MaxMessageBlocksBytes`).
pub const MAX_BLOCKS_BYTES: usize = 2_000_000;
/// Most event JSON one frame may produce. Within the limits above, ops may still point at
/// the same 1 MB block; without this, 200 ops × 1 MB would render 200 MB from one 2 MB frame.
/// A valid frame renders well under it (its ≤ 2 MB of blocks, at most ~3× as JSON).
pub const MAX_FRAME_OUTPUT_BYTES: usize = 8 << 20;
/// Longest `rev` passed through (a TID is 13 characters; room for a future format). With
/// `handle` and `status` below, what bounds an event's size outside its record: passed
/// through unbounded, one 5 MB `rev` of control characters escapes to a 29 MB event, past
/// what replicas and clients read (16 MiB), and a replica would stop at it for good.
pub const MAX_REV_BYTES: usize = 64;
/// Longest `handle` in `#identity` (a handle is at most 253 characters).
pub const MAX_HANDLE_BYTES: usize = 253;
/// Longest `status` in `#account` (known values are a dozen characters).
pub const MAX_STATUS_BYTES: usize = 128;
/// Longest `time` (RFC 3339 with microseconds is 27 characters; its fraction may have any
/// number of digits), passed through in `#identity`, `#account` and `#sync` events.
pub const MAX_TIME_BYTES: usize = 64;
/// Diagnostic strings from the wire (error and info names, messages) are cut to this before
/// they reach a log line.
const MAX_DIAGNOSTIC_BYTES: usize = 256;

label_enum! {
    /// Why something from upstream produced no event. A small fixed set: these are metric labels.
    pub enum DropReason {
        // Whole frames.
        FrameTooLarge => "frame_too_large",
        BadHeader => "bad_header",
        BadBody => "bad_body",
        TrailingBytes => "trailing_bytes",
        UnknownOp => "unknown_op",
        UnknownType => "unknown_type",
        ErrorFrame => "error_frame",
        Info => "info",
        /// No longer produced: `#sync` frames become `sync` events (served only on request).
        Sync => "sync",
        TooBig => "too_big",
        BadCar => "bad_car",
        BadDid => "bad_did",
        BadTime => "bad_time",
        /// More ops than the protocol allows in one commit.
        TooManyOps => "too_many_ops",
        /// More CAR bytes than the protocol allows in one commit (or `#sync`).
        BlocksTooLarge => "blocks_too_large",
        /// A `rev`, `handle`, `status` or `time` longer than any valid one.
        FieldTooLong => "field_too_long",
        /// A seq that is not positive, or an implausible jump (decided by the relay reader).
        BadSeq => "bad_seq",
        // Single ops.
        BadPath => "bad_path",
        UnknownAction => "unknown_action",
        MissingCid => "missing_cid",
        MissingBlock => "missing_block",
        CidMismatch => "cid_mismatch",
        UnsupportedHash => "unsupported_hash",
        RecordTooLarge => "record_too_large",
        RecordMalformed => "record_malformed",
        RecordNotObject => "record_not_object",
        Float => "float",
        InvalidUtf8 => "invalid_utf8",
        TooDeep => "too_deep",
        TooManyElements => "too_many_elements",
        KeyTooLong => "key_too_long",
        StringTooLong => "string_too_long",
        IntOverflow => "int_overflow",
        DuplicateKey => "duplicate_key",
        BadTypeField => "bad_type_field",
        BadLink => "bad_link",
        BadBytes => "bad_bytes",
        BadBlob => "bad_blob",
        /// The frame's events already hold more JSON than any valid frame renders to.
        OutputBudget => "output_budget",
    }
}

impl DropReason {
    /// True for the drops that are expected protocol traffic rather than bad data.
    pub fn is_benign(self) -> bool {
        matches!(self, DropReason::Info | DropReason::Sync)
    }
}

impl From<RecordError> for DropReason {
    fn from(e: RecordError) -> Self {
        match e {
            RecordError::TooLarge => DropReason::RecordTooLarge,
            RecordError::Cbor(_) | RecordError::TrailingBytes | RecordError::NonStringKey => {
                DropReason::RecordMalformed
            }
            RecordError::NotAnObject => DropReason::RecordNotObject,
            RecordError::Float => DropReason::Float,
            RecordError::InvalidUtf8 => DropReason::InvalidUtf8,
            RecordError::TooDeep => DropReason::TooDeep,
            RecordError::TooManyElements => DropReason::TooManyElements,
            RecordError::KeyTooLong => DropReason::KeyTooLong,
            RecordError::StringTooLong => DropReason::StringTooLong,
            RecordError::IntOverflow => DropReason::IntOverflow,
            RecordError::DuplicateKey => DropReason::DuplicateKey,
            RecordError::BadType => DropReason::BadTypeField,
            RecordError::BadLink => DropReason::BadLink,
            RecordError::BadBytes => DropReason::BadBytes,
            RecordError::BadBlob => DropReason::BadBlob,
        }
    }
}

label_enum! {
    /// The frame's message type, from its header.
    pub enum FrameType {
        Commit => "commit",
        Identity => "identity",
        Account => "account",
        Sync => "sync",
        Info => "info",
        Error => "error",
        Unknown => "unknown",
        /// The header itself could not be read.
        Malformed => "malformed",
    }
}

/// What one frame was, besides the events it produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameInfo {
    pub frame_type: FrameType,
    /// The relay seq, when the body could be read far enough to know it.
    pub seq: Option<i64>,
    /// Set when the whole frame produced nothing because of this.
    pub dropped: Option<DropReason>,
    /// For error frames the error name, for `#info` the info name (cut to a safe length).
    pub name: Option<String>,
    /// The message of an error or info frame (cut to a safe length).
    pub message: Option<String>,
    /// The relay's `time` of a commit, identity or account, in unix µs (for lag figures).
    pub relay_time_us: Option<i64>,
}

impl FrameInfo {
    fn new(frame_type: FrameType) -> Self {
        FrameInfo { frame_type, seq: None, dropped: None, name: None, message: None, relay_time_us: None }
    }

    fn drop(mut self, reason: DropReason) -> Self {
        self.dropped = Some(reason);
        self
    }
}

/// Decodes frames; keep one per worker so its buffers are reused.
pub struct Transcoder {
    max_frame_bytes: usize,
    records: RecordWriter,
    car: car::CarIndex,
    scratch: Vec<u8>,
}

impl Default for Transcoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

/// The fields of a `#commit` body that matter here, borrowed from the frame.
#[derive(Default)]
struct CommitBody<'a> {
    seq: Option<i64>,
    repo: Option<&'a str>,
    rev: Option<&'a str>,
    time: Option<&'a str>,
    blocks: Option<&'a [u8]>,
    /// The raw `ops` array, walked after the body is known to be whole.
    ops: Option<&'a [u8]>,
    too_big: bool,
}

/// The fields of `#identity`, `#account` and `#sync` bodies.
#[derive(Default)]
struct RepoEventBody<'a> {
    rev: Option<&'a str>,
    blocks: Option<&'a [u8]>,
    seq: Option<i64>,
    did: Option<&'a str>,
    time: Option<&'a str>,
    handle: Option<&'a str>,
    active: bool,
    status: Option<&'a str>,
}

impl Transcoder {
    pub fn new(max_frame_bytes: usize) -> Self {
        Transcoder { max_frame_bytes, records: RecordWriter::new(), car: car::CarIndex::default(), scratch: Vec::new() }
    }

    /// Decodes one websocket binary message, appending its events (time_us not yet stamped)
    /// to `events` and each dropped op's reason to `op_drops`.
    pub fn transcode(&mut self, frame: &[u8], events: &mut Vec<Event>, op_drops: &mut Vec<DropReason>) -> FrameInfo {
        let mut r = Reader::new(frame);
        let (op, t) = match read_header(&mut r) {
            Ok(h) => h,
            Err(_) => return FrameInfo::new(FrameType::Malformed).drop(DropReason::BadHeader),
        };
        let frame_type = match (op, t) {
            (-1, _) => FrameType::Error,
            (1, Some("#commit")) => FrameType::Commit,
            (1, Some("#identity")) => FrameType::Identity,
            (1, Some("#account")) => FrameType::Account,
            (1, Some("#sync")) => FrameType::Sync,
            (1, Some("#info")) => FrameType::Info,
            _ => FrameType::Unknown,
        };
        let mut info = FrameInfo::new(frame_type);
        if frame.len() > self.max_frame_bytes {
            // Still read the seq, so the cursor can move past the frame.
            info.seq = peek_seq(r);
            return info.drop(DropReason::FrameTooLarge);
        }
        match frame_type {
            FrameType::Commit => self.commit(r, info, events, op_drops),
            FrameType::Identity | FrameType::Account | FrameType::Sync => self.repo_event(r, info, events),
            FrameType::Error | FrameType::Info => {
                let keys: [&str; 2] =
                    if frame_type == FrameType::Error { ["error", "message"] } else { ["name", "message"] };
                match read_named(&mut r, keys) {
                    Ok((name, message)) if r.is_empty() => {
                        info.name = name.map(bounded);
                        info.message = message.map(bounded);
                        let reason =
                            if frame_type == FrameType::Error { DropReason::ErrorFrame } else { DropReason::Info };
                        info.drop(reason)
                    }
                    Ok(_) => info.drop(DropReason::TrailingBytes),
                    Err(_) => info.drop(DropReason::BadBody),
                }
            }
            FrameType::Unknown => {
                info.seq = peek_seq(r);
                if op == 1 {
                    info.name = t.map(bounded);
                    info.drop(DropReason::UnknownType)
                } else {
                    info.drop(DropReason::UnknownOp)
                }
            }
            FrameType::Malformed => unreachable!("set only when the header fails"),
        }
    }

    fn commit(
        &mut self,
        mut r: Reader<'_>,
        mut info: FrameInfo,
        events: &mut Vec<Event>,
        op_drops: &mut Vec<DropReason>,
    ) -> FrameInfo {
        let body_start = r; // read_commit moves `r` on before it fails
        let body = match read_commit(&mut r) {
            Ok(b) => b,
            Err(_) => {
                info.seq = peek_seq(body_start);
                return info.drop(DropReason::BadBody);
            }
        };
        info.seq = body.seq;
        if body.seq.is_none() {
            return info.drop(DropReason::BadBody);
        }
        if !r.is_empty() {
            return info.drop(DropReason::TrailingBytes);
        }
        if body.too_big {
            return info.drop(DropReason::TooBig);
        }
        let repo = match body.repo {
            Some(d) if syntax::is_valid_did(d) => d,
            _ => return info.drop(DropReason::BadDid),
        };
        info.relay_time_us = body.time.and_then(syntax::rfc3339_to_unix_us);
        if info.relay_time_us.is_none() {
            return info.drop(DropReason::BadTime);
        }
        let (Some(rev), Some(ops), Some(blocks)) = (body.rev, body.ops, body.blocks) else {
            return info.drop(DropReason::BadBody);
        };
        if rev.len() > MAX_REV_BYTES {
            return info.drop(DropReason::FieldTooLong);
        }
        // The protocol's limits, checked before any work that grows with them.
        if blocks.len() > MAX_BLOCKS_BYTES {
            return info.drop(DropReason::BlocksTooLarge);
        }
        if self.car.build(blocks).is_err() {
            return info.drop(DropReason::BadCar);
        }
        let mut ops_r = Reader::new(ops);
        let Ok(n) = ops_r.read_array_len() else { return info.drop(DropReason::BadBody) };
        if n > MAX_COMMIT_OPS {
            return info.drop(DropReason::TooManyOps);
        }
        let first_event = events.len();
        let mut produced = 0usize;
        // Records rendered in this frame, by CID: ops sharing a block (a crafted 1 MiB one, a
        // deep one below the size that gets an index, or a user's identical records) fail
        // again at once or copy its JSON, instead of hashing and rendering it again: 200 full
        // passes, a failure's not counted by the output budget at all.
        let mut records = FrameRecords::default();
        for _ in 0..n {
            // Each op is read from its own span, so a malformed op cannot derail the next.
            let Ok(span) = ops_r.skip_span() else {
                op_drops.push(DropReason::BadBody);
                break;
            };
            let op = match read_op(&mut Reader::new(span)) {
                Ok(op) => op,
                Err(_) => {
                    // The body as a whole was well-formed CBOR; a malformed op entry is still
                    // only that op.
                    op_drops.push(DropReason::BadBody);
                    continue;
                }
            };
            if produced > MAX_FRAME_OUTPUT_BYTES {
                op_drops.push(DropReason::OutputBudget);
                continue;
            }
            match self.op_event(repo, rev, &op, blocks, &mut records, events) {
                Ok(ev) => {
                    produced += ev.json().len();
                    events.push(ev);
                }
                Err(reason) => op_drops.push(reason),
            }
        }
        debug_assert!(events[first_event..].iter().map(|e| e.json().len()).sum::<usize>() == produced);
        info
    }

    fn op_event<'f>(
        &mut self,
        repo: &str,
        rev: &str,
        op: &Op<'f>,
        blocks: &[u8],
        records: &mut FrameRecords<'f>,
        events: &[Event],
    ) -> Result<Event, DropReason> {
        let (collection, rkey) = split_path(op.path.ok_or(DropReason::BadPath)?).ok_or(DropReason::BadPath)?;
        let operation = match op.action {
            Some(a @ ("create" | "update" | "delete")) => a,
            _ => return Err(DropReason::UnknownAction),
        };
        let mut out = std::mem::take(&mut self.scratch);
        Event::begin(&mut out, repo, EventKind::Commit);
        out.extend_from_slice(b",\"commit\":{");
        // Every commit field is omitempty in v1; only rev can be empty here.
        if !rev.is_empty() {
            out.extend_from_slice(b"\"rev\":");
            json::write_json_str(&mut out, rev);
            out.push(b',');
        }
        out.extend_from_slice(b"\"operation\":\"");
        out.extend_from_slice(operation.as_bytes());
        out.extend_from_slice(b"\",\"collection\":\"");
        let coll_start = out.len();
        out.extend_from_slice(collection.as_bytes());
        let coll = coll_start..out.len();
        out.extend_from_slice(b"\",\"rkey\":");
        json::write_json_str(&mut out, rkey);
        if operation != "delete" {
            if let Err(reason) = self.record(op, blocks, &mut out, records, events) {
                self.scratch = out;
                return Err(reason);
            }
        }
        out.extend_from_slice(b"}}");
        // The event gets a copy of its own size; the scratch buffer stays for the next one.
        // (Handing the buffer itself over carried the largest event's capacity on to every
        // event after it, unseen by the memory budgets, which count lengths.)
        let json = out.as_slice().to_vec();
        self.scratch = out;
        Ok(Event::from_parts(json, EventKind::Commit, repo.len(), coll))
    }

    /// Appends `,"record":{…},"cid":"…"` for a create or update of the event to be pushed
    /// onto `events`; the outcome is remembered in `records` under the op's CID, and one
    /// found there is used (its JSON copied from the event that has it).
    fn record<'f>(
        &mut self,
        op: &Op<'f>,
        blocks: &[u8],
        out: &mut Vec<u8>,
        records: &mut FrameRecords<'f>,
        events: &[Event],
    ) -> Result<(), DropReason> {
        let cid_bytes = op.cid.ok_or(DropReason::MissingCid)?;
        match records.find(cid_bytes) {
            Some(Rendered::Failed(reason)) => return Err(*reason),
            Some(Rendered::In { event, bytes }) => {
                if let Some(json) = events.get(*event).and_then(|e| e.json().get(bytes.clone())) {
                    out.extend_from_slice(json);
                    return Ok(());
                }
            }
            None => {}
        }
        let start = out.len();
        let written = self.record_of(cid_bytes, blocks, out);
        let rendered = match written {
            Ok(()) => Rendered::In { event: events.len(), bytes: start..out.len() },
            Err(reason) => Rendered::Failed(reason),
        };
        records.push(cid_bytes, rendered);
        written
    }

    fn record_of(&mut self, cid_bytes: &[u8], blocks: &[u8], out: &mut Vec<u8>) -> Result<(), DropReason> {
        let cid = cid::parse_cid(cid_bytes).ok_or(DropReason::BadLink)?;
        let block = self.car.get(blocks, cid_bytes).ok_or(DropReason::MissingBlock)?;
        match cid::verify_block(&cid, block) {
            cid::Verify::Ok => {}
            cid::Verify::Mismatch => return Err(DropReason::CidMismatch),
            cid::Verify::UnsupportedHash => return Err(DropReason::UnsupportedHash),
        }
        out.extend_from_slice(b",\"record\":");
        self.records.write_record(block, out)?;
        out.extend_from_slice(b",\"cid\":\"");
        cid::write_cid_string(out, cid_bytes);
        out.push(b'"');
        Ok(())
    }

    fn repo_event(&mut self, mut r: Reader<'_>, mut info: FrameInfo, events: &mut Vec<Event>) -> FrameInfo {
        let body_start = r; // read_repo_event moves `r` on before it fails
        let body = match read_repo_event(&mut r, info.frame_type == FrameType::Sync) {
            Ok(b) => b,
            Err(_) => {
                info.seq = peek_seq(body_start);
                return info.drop(DropReason::BadBody);
            }
        };
        info.seq = body.seq;
        let Some(seq) = body.seq else { return info.drop(DropReason::BadBody) };
        if !r.is_empty() {
            return info.drop(DropReason::TrailingBytes);
        }
        let did = match body.did {
            Some(d) if syntax::is_valid_did(d) => d,
            _ => return info.drop(DropReason::BadDid),
        };
        info.relay_time_us = body.time.and_then(syntax::rfc3339_to_unix_us);
        let (Some(time), Some(_)) = (body.time, info.relay_time_us) else { return info.drop(DropReason::BadTime) };
        if time.len() > MAX_TIME_BYTES
            || body.rev.is_some_and(|r| r.len() > MAX_REV_BYTES)
            || body.handle.is_some_and(|h| h.len() > MAX_HANDLE_BYTES)
            || body.status.is_some_and(|s| s.len() > MAX_STATUS_BYTES)
        {
            return info.drop(DropReason::FieldTooLong);
        }
        if body.blocks.is_some_and(|b| b.len() > MAX_BLOCKS_BYTES) {
            return info.drop(DropReason::BlocksTooLarge);
        }
        let kind = match info.frame_type {
            FrameType::Identity => EventKind::Identity,
            FrameType::Account => EventKind::Account,
            _ => EventKind::Sync,
        };
        let mut out = Vec::with_capacity(160 + 2 * did.len() + body.blocks.map_or(0, |b| b.len() * 4 / 3));
        Event::begin(&mut out, did, kind);
        // indigo's structs, passed through in their field order.
        if kind == EventKind::Sync {
            // `#sync` (Sync 1.1): the repo's state was reset; consumers should resync it. As
            // jetstream-legacy PR #79 shapes it (indigo's SyncSubscribeRepos_Sync), with the
            // commit block kept as `$bytes` so a consumer can check the new root.
            let (Some(rev), Some(blocks)) = (body.rev, body.blocks) else { return info.drop(DropReason::BadBody) };
            out.extend_from_slice(b",\"sync\":{\"blocks\":{\"$bytes\":\"");
            cid::write_base64_nopad(&mut out, blocks);
            out.extend_from_slice(b"\"},\"did\":\"");
            out.extend_from_slice(did.as_bytes());
            out.extend_from_slice(b"\",\"rev\":");
            json::write_json_str(&mut out, rev);
        } else if kind == EventKind::Identity {
            out.extend_from_slice(b",\"identity\":{\"did\":\"");
            out.extend_from_slice(did.as_bytes());
            out.push(b'"');
            if let Some(h) = body.handle {
                out.extend_from_slice(b",\"handle\":");
                json::write_json_str(&mut out, h);
            }
        } else {
            out.extend_from_slice(b",\"account\":{\"active\":");
            out.extend_from_slice(if body.active { b"true" } else { b"false" });
            out.extend_from_slice(b",\"did\":\"");
            out.extend_from_slice(did.as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b",\"seq\":");
        json::write_i64(&mut out, seq);
        if kind == EventKind::Account {
            if let Some(s) = body.status {
                out.extend_from_slice(b",\"status\":");
                json::write_json_str(&mut out, s);
            }
        }
        out.extend_from_slice(b",\"time\":");
        json::write_json_str(&mut out, time);
        out.extend_from_slice(b"}}");
        events.push(Event::from_parts(out, kind, did.len(), 0..0));
        info
    }
}

/// The records rendered in one frame, by CID: up to 200, looked up once per op, by the end of
/// the CID (its digest's last 8 bytes) first (comparing whole CIDs, each op against each
/// entry, showed in a 200-op commit's profile: BENCHMARKS.md, thirtieth session).
#[derive(Default)]
struct FrameRecords<'f> {
    keys: Vec<u64>,
    entries: Vec<(&'f [u8], Rendered)>,
}

impl<'f> FrameRecords<'f> {
    fn key(cid: &[u8]) -> u64 {
        let mut tail = [0u8; 8];
        let n = cid.len().min(8);
        tail[..n].copy_from_slice(&cid[cid.len() - n..]);
        u64::from_le_bytes(tail)
    }

    fn find(&self, cid: &[u8]) -> Option<&Rendered> {
        let key = Self::key(cid);
        let mut at = 0;
        while let Some(i) = self.keys[at..].iter().position(|&k| k == key) {
            let (c, rendered) = &self.entries[at + i];
            if *c == cid {
                return Some(rendered);
            }
            at += i + 1;
        }
        None
    }

    fn push(&mut self, cid: &'f [u8], rendered: Rendered) {
        self.keys.push(Self::key(cid));
        self.entries.push((cid, rendered));
    }
}

/// What an op's record CID rendered to earlier in a frame.
enum Rendered {
    Failed(DropReason),
    /// `,"record":…,"cid":"…"`: these bytes of the JSON of `events[event]` (events are pushed
    /// as they are made, so an op's record is in place once its event is).
    In {
        event: usize,
        bytes: std::ops::Range<usize>,
    },
}

/// `{op, t}`; unknown header keys are ignored (forward compatibility).
fn read_header<'a>(r: &mut Reader<'a>) -> Result<(i64, Option<&'a str>), CborError> {
    let mut op = None;
    let mut t = None;
    for _ in 0..r.read_map_len()? {
        match r.read_key()? {
            b"op" => op = Some(r.read_i64()?),
            b"t" => t = Some(r.read_str()?),
            other => skip_unknown(r, other)?,
        }
    }
    Ok((op.ok_or(CborError::WrongType)?, t))
}

/// Passes over the value of a key no reader asked for, once the key is known to be UTF-8 (a
/// key that is not fails the frame, as any other text that is not).
fn skip_unknown(r: &mut Reader<'_>, key: &[u8]) -> Result<(), CborError> {
    cbor::check_utf8(key)?;
    r.skip()
}

/// Best effort: the `seq` of a body that did not decode as its type.
fn peek_seq(mut r: Reader<'_>) -> Option<i64> {
    let n = r.read_map_len().ok()?;
    for _ in 0..n {
        if r.read_str().ok()? == "seq" {
            return r.read_i64().ok();
        }
        r.skip().ok()?;
    }
    None
}

fn read_named<'a>(r: &mut Reader<'a>, keys: [&str; 2]) -> Result<(Option<&'a str>, Option<&'a str>), CborError> {
    let (mut a, mut b) = (None, None);
    for _ in 0..r.read_map_len()? {
        let k = r.read_key()?;
        if k == keys[0].as_bytes() {
            a = Some(r.read_str()?);
        } else if k == keys[1].as_bytes() && !r.read_null()? {
            b = Some(r.read_str()?);
        } else if k != keys[1].as_bytes() {
            skip_unknown(r, k)?;
        }
    }
    Ok((a, b))
}

/// A nullable string field.
fn opt_str<'a>(r: &mut Reader<'a>) -> Result<Option<&'a str>, CborError> {
    if r.read_null()? {
        Ok(None)
    } else {
        r.read_str().map(Some)
    }
}

fn read_commit<'a>(r: &mut Reader<'a>) -> Result<CommitBody<'a>, CborError> {
    let mut b = CommitBody::default();
    for _ in 0..r.read_map_len()? {
        match r.read_key()? {
            b"seq" => b.seq = Some(r.read_i64()?),
            b"repo" => b.repo = Some(r.read_str()?),
            b"rev" => b.rev = Some(r.read_str()?),
            b"time" => b.time = Some(r.read_str()?),
            b"blocks" => b.blocks = Some(r.read_bytes()?),
            b"ops" => b.ops = Some(r.skip_span()?),
            b"tooBig" => b.too_big = r.read_bool()?,
            // since, commit, prevData, rebase, blobs, prev and anything new: not needed.
            other => skip_unknown(r, other)?,
        }
    }
    Ok(b)
}

/// `#identity`, `#account` or (`sync`) `#sync`. `rev` and `blocks` are `#sync`'s alone: in the
/// others they are unknown keys, skipped (as Go's decoder does), neither checked nor kept.
fn read_repo_event<'a>(r: &mut Reader<'a>, sync: bool) -> Result<RepoEventBody<'a>, CborError> {
    let mut b = RepoEventBody::default();
    for _ in 0..r.read_map_len()? {
        match r.read_key()? {
            other @ (b"rev" | b"blocks") if !sync => skip_unknown(r, other)?,
            b"seq" => b.seq = Some(r.read_i64()?),
            b"did" => b.did = Some(r.read_str()?),
            b"time" => b.time = Some(r.read_str()?),
            b"handle" => b.handle = opt_str(r)?,
            b"active" => b.active = r.read_bool()?,
            b"status" => b.status = opt_str(r)?,
            b"rev" => b.rev = Some(r.read_str()?),
            b"blocks" => b.blocks = Some(r.read_bytes()?),
            other => skip_unknown(r, other)?,
        }
    }
    Ok(b)
}

/// One `#repoOp`.
struct Op<'a> {
    action: Option<&'a str>,
    path: Option<&'a str>,
    cid: Option<&'a [u8]>,
}

fn read_op<'a>(r: &mut Reader<'a>) -> Result<Op<'a>, CborError> {
    let mut op = Op { action: None, path: None, cid: None };
    for _ in 0..r.read_map_len()? {
        match r.read_key()? {
            b"action" => op.action = Some(r.read_str()?),
            b"path" => op.path = Some(r.read_str()?),
            b"cid" => op.cid = if r.read_null()? { None } else { Some(r.read_link()?) },
            other => skip_unknown(r, other)?,
        }
    }
    Ok(op)
}

/// `collection/rkey`: exactly one `/`, a valid NSID and a valid record key.
fn split_path(path: &str) -> Option<(&str, &str)> {
    let (collection, rkey) = path.split_once('/')?;
    if rkey.contains('/') || !syntax::is_valid_nsid(collection) || !syntax::is_valid_record_key(rkey) {
        return None;
    }
    Some((collection, rkey))
}

/// Cuts a wire string for logging, at a char boundary.
fn bounded(s: &str) -> String {
    if s.len() <= MAX_DIAGNOSTIC_BYTES {
        return s.to_string();
    }
    let mut end = MAX_DIAGNOSTIC_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
