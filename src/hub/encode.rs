//! What one subscriber is sent for an event: the settings that make two subscribers' bytes for
//! the same event differ (the wire, the dictionary, the verification field, the size cap), and
//! the functions that turn an event into its websocket message under them: [`Encoding::message`]
//! for live delivery ([`super::session`]); for replay pages ([`super::replay_pages`]) the same
//! message given a stored compressed frame, or, where the v1 JSON alone decides it, from the
//! stored JSON without rebuilding the event ([`Encoding::message_of_json`]).

use super::compress::Dictionary;
use crate::event::Event;
use crate::metrics::Wire;
use fastwebsockets::{Frame, OpCode, Payload};
use std::borrow::Cow;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct Encoding {
    pub wire: Wire,
    /// The dictionary frames are compressed with; `None`: plain JSON text frames.
    pub dictionary: Option<Arc<Dictionary>>,
    /// v1 only: each event carries `"verification":"…"`.
    pub include_verification: bool,
    /// Events whose message is larger are skipped (0: no cap).
    pub max_size: u64,
}

impl PartialEq for Encoding {
    fn eq(&self, other: &Self) -> bool {
        self.wire == other.wire
            && self.dictionary.as_ref().map(|d| d.slot) == other.dictionary.as_ref().map(|d| d.slot)
            && self.include_verification == other.include_verification
            && self.max_size == other.max_size
    }
}

impl Eq for Encoding {}

impl std::hash::Hash for Encoding {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (self.wire, self.dictionary.as_ref().map(|d| d.slot), self.include_verification, self.max_size).hash(h);
    }
}

impl Encoding {
    /// Plain v1 JSON, every event: what a `/subscribe` without options gets.
    pub fn plain_v1() -> Encoding {
        Encoding { wire: Wire::V1, dictionary: None, include_verification: false, max_size: 0 }
    }

    /// The fingerprint of the dictionary whose stored compressed frames this encoding sends
    /// as they are ([`super::precompress`]): compressed v1 without the verification field.
    pub fn stored_frame_dictionary(&self) -> Option<u32> {
        match (self.wire, &self.dictionary) {
            (Wire::V1, Some(d)) if !self.include_verification => Some(d.fingerprint),
            _ => None,
        }
    }

    /// [`message`](Self::message), given the event's stored compressed frame for
    /// [`stored_frame_dictionary`](Self::stored_frame_dictionary) when there is one.
    pub fn message_stored<'e>(&self, ev: &'e Event, stored: Option<&'e [u8]>) -> Option<(OpCode, Cow<'e, [u8]>)> {
        match stored {
            Some(frame) if self.stored_frame_dictionary().is_some() => {
                self.within_cap(ev).then_some((OpCode::Binary, Cow::Borrowed(frame)))
            }
            _ => self.message(ev),
        }
    }

    /// Whether an event's message depends on its v1 JSON alone (v1 without the verification
    /// field): replay pages then send a stored value's JSON, or compress it, without rebuilding
    /// the event ([`Self::message_of_json`]).
    pub fn json_alone(&self) -> bool {
        self.wire == Wire::V1 && !self.include_verification
    }

    /// For an encoding where [`json_alone`](Self::json_alone) holds: the message of the event
    /// whose v1 JSON is `json`, given its stored compressed frame for this dictionary if it has
    /// one; the bytes [`message_stored`](Self::message_stored) gives for the event. A frame
    /// compressed here is left in `scratch`. `None` over the size cap.
    pub fn message_of_json<'a>(
        &self,
        json: &'a [u8],
        stored: Option<&'a [u8]>,
        scratch: &'a mut Vec<u8>,
    ) -> Option<(OpCode, &'a [u8])> {
        debug_assert!(self.json_alone());
        if !self.fits(json.len()) {
            return None;
        }
        Some(match (&self.dictionary, stored) {
            (None, _) => (OpCode::Text, json),
            (Some(_), Some(frame)) => (OpCode::Binary, frame),
            (Some(dict), None) => {
                dict.compress_into(json, scratch);
                (OpCode::Binary, &scratch[..])
            }
        })
    }

    /// Whether the event is within the size cap, measured on what this subscriber is sent
    /// before compression (the verification field included).
    fn within_cap(&self, ev: &Event) -> bool {
        let size = match self.wire {
            Wire::V1 if self.include_verification => ev.json().len() + 18 + ev.verification.as_str().len(),
            Wire::V1 => ev.json().len(),
            Wire::V2 => contrail_core::v2::message_of(ev).len(),
        };
        self.fits(size)
    }

    /// Whether a message of `size` bytes before compression is within the size cap.
    fn fits(&self, size: usize) -> bool {
        self.max_size == 0 || size as u64 <= self.max_size
    }

    /// The event's message and its opcode, or `None` when it is over the size cap (the
    /// subscriber skips it). Cached encodings are borrowed; past the cache's cap one is built
    /// for this message only.
    pub fn message<'e>(&self, ev: &'e Event) -> Option<(OpCode, Cow<'e, [u8]>)> {
        if !self.within_cap(ev) {
            return None;
        }
        Some(match (self.wire, &self.dictionary) {
            // The verification field is the event's: shared by every subscriber that asks.
            (Wire::V1, Some(dict)) if self.include_verification => (OpCode::Binary, dict.verified_frame(ev)),
            (Wire::V1, None) if self.include_verification => (OpCode::Text, ev.json_with_verification_shared()),
            (Wire::V1, Some(dict)) => (OpCode::Binary, dict.frame(ev)),
            (Wire::V1, None) => (OpCode::Text, Cow::Borrowed(ev.json())),
            (Wire::V2, Some(dict)) => (OpCode::Binary, dict.v2_frame(ev)),
            (Wire::V2, None) => (OpCode::Text, contrail_core::v2::message_of(ev)),
        })
    }
}

/// A whole, unfragmented server frame (servers do not mask).
pub fn frame(opcode: OpCode, payload: Cow<'_, [u8]>) -> Frame<'_> {
    let payload = match payload {
        Cow::Borrowed(b) => Payload::Borrowed(b),
        Cow::Owned(v) => Payload::Owned(v),
    };
    Frame::new(true, opcode, None, payload)
}

/// Appends `frame`, header and payload, to `out` as it goes on the wire (the header formatted
/// by fastwebsockets).
pub fn append_frame(out: &mut Vec<u8>, mut frame: Frame<'_>) {
    let mut head = [0u8; MAX_HEAD];
    let n = frame.fmt_head(&mut head);
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(&frame.payload);
}

/// The longest frame header: 2 bytes, 8 of length, 4 of mask.
pub const MAX_HEAD: usize = 14;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, Verification};

    #[test]
    fn the_verification_field_is_built_and_compressed_once_per_event() {
        let mut out = Vec::new();
        Event::begin(&mut out, "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa", EventKind::Identity);
        out.extend_from_slice(b"}");
        let mut ev = Event::from_parts(out, EventKind::Identity, 32, 0..0);
        ev.stamp(1);
        ev.verification = Verification::Full;
        let dict = super::super::compress::Dictionaries::load(&[], None).unwrap().default().clone();
        for dictionary in [Some(dict), None] {
            let e = Encoding { wire: Wire::V1, dictionary, include_verification: true, max_size: 0 };
            let (_, first) = e.message(&ev).unwrap();
            let (_, second) = e.message(&ev).unwrap();
            // Every subscriber asking sends the same bytes: shared, not built per subscriber.
            assert!(matches!((&first, &second), (Cow::Borrowed(a), Cow::Borrowed(b)) if std::ptr::eq(*a, *b)));
        }
        assert!(ev.json_with_verification_shared().ends_with(b",\"verification\":\"full\"}"));
    }
}
