//! A zero-copy DAG-CBOR reader over a byte slice.
//!
//! Owns the low-level rules every decoder in Contrail shares: definite lengths only, the one
//! allowed tag (42, CID), the allowed simple values (`false`, `true`, `null`), 64-bit floats
//! only. It never recurses: [`Reader::skip`] walks nested containers with a counter, so a
//! hostile frame of 10,000 nested arrays costs a loop, not a stack overflow.
//!
//! Non-canonical encodings (long-form integers, unsorted keys) are accepted: Contrail only
//! decodes and never re-encodes, and CIDs are always computed over the received bytes.

use thiserror::Error;

/// Why a CBOR item could not be read. Callers map these onto drop reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CborError {
    #[error("unexpected end of input")]
    Truncated,
    #[error("indefinite-length item")]
    Indefinite,
    #[error("reserved additional-information value")]
    Reserved,
    #[error("tag other than 42")]
    BadTag,
    #[error("simple value other than false/true/null")]
    BadSimple,
    #[error("unexpected type")]
    WrongType,
    #[error("invalid UTF-8 in a text string")]
    InvalidUtf8,
    #[error("length does not fit the input")]
    TooLong,
}

/// CBOR major types.
pub const UINT: u8 = 0;
pub const NINT: u8 = 1;
pub const BYTES: u8 = 2;
pub const TEXT: u8 = 3;
pub const ARRAY: u8 = 4;
pub const MAP: u8 = 5;
pub const TAG: u8 = 6;
pub const SIMPLE: u8 = 7;

#[cfg(test)]
thread_local! {
    /// Item heads read on this thread: what tests count a walk's steps by.
    pub static HEADS_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Checks text read without its check (see [`Reader::read_key`]).
pub fn check_utf8(text: &[u8]) -> Result<(), CborError> {
    if text.is_ascii() || std::str::from_utf8(text).is_ok() {
        Ok(())
    } else {
        Err(CborError::InvalidUtf8)
    }
}

/// One decoded item head: its major type and argument (length, value or simple code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub major: u8,
    /// Length, integer value or tag number; for a float (major 7, info 27) its f64 bits.
    pub arg: u64,
}

/// A cursor over one CBOR buffer. Cheap to copy, which is how callers "peek".
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// The same buffer, read from `pos` on (used to revisit a value found by skipping).
    pub fn advanced_to(mut self, pos: usize) -> Self {
        self.pos = pos.min(self.buf.len());
        self
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CborError> {
        if self.buf.len() - self.pos < n {
            return Err(CborError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Reads one item head. Floats come back as major 7 with `arg` = the f64 bits and the
    /// additional-information code checked by [`Reader::read_head_full`].
    pub fn read_head(&mut self) -> Result<Head, CborError> {
        self.read_head_full().map(|(h, _)| h)
    }

    /// Like [`read_head`](Self::read_head), also returning the additional-information code
    /// (needed to tell a float from a simple value under major 7).
    pub fn read_head_full(&mut self) -> Result<(Head, u8), CborError> {
        #[cfg(test)]
        HEADS_READ.with(|n| n.set(n.get() + 1));
        let b = *self.buf.get(self.pos).ok_or(CborError::Truncated)?;
        self.pos += 1;
        let major = b >> 5;
        let info = b & 0x1f;
        let arg = match info {
            0..=23 => info as u64,
            24 => self.take(1)?[0] as u64,
            25 => u16::from_be_bytes(self.take(2)?.try_into().unwrap()) as u64,
            26 => u32::from_be_bytes(self.take(4)?.try_into().unwrap()) as u64,
            27 => u64::from_be_bytes(self.take(8)?.try_into().unwrap()),
            28..=30 => return Err(CborError::Reserved),
            _ => return Err(CborError::Indefinite),
        };
        if major == SIMPLE {
            match info {
                20..=22 => {}
                // DAG-CBOR allows only 64-bit floats; half and single precision are invalid.
                27 => {}
                _ => return Err(CborError::BadSimple),
            }
        }
        Ok((Head { major, arg }, info))
    }

    /// Reads a text string (UTF-8 checked).
    pub fn read_str(&mut self) -> Result<&'a str, CborError> {
        let h = self.read_head()?;
        if h.major != TEXT {
            return Err(CborError::WrongType);
        }
        let bytes = self.take_len(h.arg)?;
        std::str::from_utf8(bytes).map_err(|_| CborError::InvalidUtf8)
    }

    /// Reads a map key to compare with ASCII names, its UTF-8 check left to the caller: a key
    /// equal to a name is UTF-8, so only one that matches none needs [`check_utf8`].
    pub fn read_key(&mut self) -> Result<&'a [u8], CborError> {
        let h = self.read_head()?;
        if h.major != TEXT {
            return Err(CborError::WrongType);
        }
        self.take_len(h.arg)
    }

    /// Reads a text string's raw bytes without the UTF-8 check (for keys compared to ASCII).
    pub fn take_len(&mut self, len: u64) -> Result<&'a [u8], CborError> {
        let len = usize::try_from(len).map_err(|_| CborError::TooLong)?;
        if len > self.buf.len() - self.pos {
            return Err(CborError::TooLong);
        }
        self.take(len)
    }

    pub fn read_bytes(&mut self) -> Result<&'a [u8], CborError> {
        let h = self.read_head()?;
        if h.major != BYTES {
            return Err(CborError::WrongType);
        }
        self.take_len(h.arg)
    }

    /// Reads a signed 64-bit integer (major 0 or 1); values outside i64 are errors.
    pub fn read_i64(&mut self) -> Result<i64, CborError> {
        let h = self.read_head()?;
        head_to_i64(h).ok_or(CborError::WrongType)
    }

    pub fn read_bool(&mut self) -> Result<bool, CborError> {
        let (h, info) = self.read_head_full()?;
        match (h.major, info) {
            (SIMPLE, 20) => Ok(false),
            (SIMPLE, 21) => Ok(true),
            _ => Err(CborError::WrongType),
        }
    }

    /// True (and consumes it) when the next item is `null`.
    pub fn read_null(&mut self) -> Result<bool, CborError> {
        if self.buf.get(self.pos) == Some(&0xf6) {
            self.pos += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Reads a tag-42 CID link and returns the CID bytes (without the 0x00 multibase prefix).
    pub fn read_link(&mut self) -> Result<&'a [u8], CborError> {
        let h = self.read_head()?;
        if h.major != TAG || h.arg != 42 {
            return Err(CborError::WrongType);
        }
        let b = self.read_bytes()?;
        match b.split_first() {
            Some((0, cid)) => Ok(cid),
            _ => Err(CborError::WrongType),
        }
    }

    /// Reads a map head and returns its entry count.
    pub fn read_map_len(&mut self) -> Result<u64, CborError> {
        let h = self.read_head()?;
        if h.major != MAP {
            return Err(CborError::WrongType);
        }
        self.check_count(h.arg, 2)?;
        Ok(h.arg)
    }

    pub fn read_array_len(&mut self) -> Result<u64, CborError> {
        let h = self.read_head()?;
        if h.major != ARRAY {
            return Err(CborError::WrongType);
        }
        self.check_count(h.arg, 1)?;
        Ok(h.arg)
    }

    /// Every item takes at least one byte: a count larger than the input left is a lie, and
    /// rejecting it early keeps counters from overflowing.
    fn check_count(&self, count: u64, per_item: u64) -> Result<(), CborError> {
        let left = (self.buf.len() - self.pos) as u64;
        if count.saturating_mul(per_item) > left {
            return Err(CborError::TooLong);
        }
        Ok(())
    }

    /// Skips one complete item (with everything nested in it), iteratively.
    pub fn skip(&mut self) -> Result<(), CborError> {
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let h = self.read_head()?;
            match h.major {
                UINT | NINT | SIMPLE => {}
                BYTES | TEXT => {
                    self.take_len(h.arg)?;
                }
                ARRAY => {
                    self.check_count(h.arg, 1)?;
                    pending += h.arg;
                }
                MAP => {
                    self.check_count(h.arg, 2)?;
                    pending += h.arg * 2;
                }
                TAG => {
                    if h.arg != 42 {
                        return Err(CborError::BadTag);
                    }
                    pending += 1;
                }
                _ => unreachable!("major type is 3 bits"),
            }
            // `pending` never exceeds the bytes left, so it cannot overflow.
            if pending > (self.buf.len() - self.pos) as u64 {
                return Err(CborError::TooLong);
            }
        }
        Ok(())
    }

    /// Records the span `(start, end)` of every array and map that is a map's value, down to
    /// `max_depth` levels, in the one item read from here, in the order they start (so `out`
    /// is sorted by start), as [`Reader::skip`] would find their ends: a container still open
    /// where the input stops being well-formed keeps the end 0 (unknown). One pass, whatever
    /// the nesting: what lets a renderer that must find a map's values before writing them (to
    /// sort its keys) jump over a nested container instead of walking it once per enclosing
    /// map. (Only a map's values are looked up; deeper than `max_depth` a container is skipped
    /// whole, so what this holds is bounded by the depth, not by the input.)
    pub fn index_containers(&mut self, out: &mut Vec<(u32, u32)>, max_depth: usize) {
        const NOT_RECORDED: usize = usize::MAX;
        // Open containers (and tags): their index in `out`, the items still to come, and
        // whether it is a map (whose every second item is a value).
        let mut open: Vec<(usize, u64, bool)> = Vec::new();
        loop {
            let start = self.pos;
            let Ok(h) = self.read_head() else { return };
            let mut map_value = false;
            if let Some(parent) = open.last_mut() {
                map_value = parent.2 && parent.1 % 2 == 1;
                parent.1 -= 1;
            }
            let items = match h.major {
                UINT | NINT | SIMPLE => None,
                BYTES | TEXT => match self.take_len(h.arg) {
                    Ok(_) => None,
                    Err(_) => return,
                },
                // (Tags too: a chain of them nests like containers.)
                ARRAY | MAP | TAG if open.len() > max_depth => {
                    self.pos = start;
                    if self.skip().is_err() {
                        return;
                    }
                    None
                }
                ARRAY | MAP => {
                    let per_item = if h.major == MAP { 2 } else { 1 };
                    if self.check_count(h.arg, per_item).is_err() {
                        return;
                    }
                    let index = if map_value {
                        out.push((start as u32, 0));
                        out.len() - 1
                    } else {
                        NOT_RECORDED
                    };
                    Some((index, h.arg * per_item, h.major == MAP))
                }
                TAG if h.arg == 42 => Some((NOT_RECORDED, 1, false)),
                _ => return,
            };
            if let Some(container) = items {
                open.push(container);
            }
            while let Some(&(i, 0, _)) = open.last() {
                if i != NOT_RECORDED {
                    out[i].1 = self.pos as u32;
                }
                open.pop();
            }
            if open.is_empty() {
                return;
            }
        }
    }

    /// Moves to `pos` of the same buffer (an end found by [`Reader::index_containers`]).
    pub fn jump_to(&mut self, pos: usize) {
        self.pos = pos.min(self.buf.len());
    }

    /// Skips one item and returns the bytes it spanned.
    pub fn skip_span(&mut self) -> Result<&'a [u8], CborError> {
        let start = self.pos;
        self.skip()?;
        Ok(&self.buf[start..self.pos])
    }
}

/// Converts an integer head to i64 (major 0 or 1), `None` if out of range or not an integer.
pub fn head_to_i64(h: Head) -> Option<i64> {
    match h.major {
        UINT => i64::try_from(h.arg).ok(),
        NINT => i64::try_from(h.arg).ok().map(|n| -1 - n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scalars_and_rejects_non_dag_items() {
        let mut r = Reader::new(&[0x18, 100, 0x38, 99, 0xf5, 0xf6]);
        assert_eq!(r.read_i64(), Ok(100));
        assert_eq!(r.read_i64(), Ok(-100));
        assert_eq!(r.read_bool(), Ok(true));
        assert_eq!(r.read_null(), Ok(true));
        assert!(r.is_empty());
        // indefinite array, undefined, f32, tag 0
        assert_eq!(Reader::new(&[0x9f]).skip(), Err(CborError::Indefinite));
        assert_eq!(Reader::new(&[0xf7]).skip(), Err(CborError::BadSimple));
        assert_eq!(Reader::new(&[0xfa, 0, 0, 0, 0]).skip(), Err(CborError::BadSimple));
        assert_eq!(Reader::new(&[0xc0, 0x01]).skip(), Err(CborError::BadTag));
    }

    #[test]
    fn skip_survives_deep_nesting_and_lying_lengths() {
        let mut deep = vec![0x81u8; 100_000];
        deep.push(0x01);
        let mut r = Reader::new(&deep);
        assert_eq!(r.skip(), Ok(()));
        assert!(r.is_empty());
        // a map claiming 2^63 entries with three bytes of input
        let lie = [0xbb, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3];
        assert_eq!(Reader::new(&lie).skip(), Err(CborError::TooLong));
        assert_eq!(Reader::new(&[0x5a, 0xff, 0xff, 0xff, 0xff]).skip(), Err(CborError::TooLong));
    }
}
