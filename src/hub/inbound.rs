//! Reading a subscriber's frames (RFC 6455, the client-to-server half), and the memory its
//! messages hold while they arrive and wait to be handled: a connection's [`Counter`] holds
//! `--max-client-message-bytes` for its bytes in memory beyond [`FREE_BYTES`]; past the budget,
//! or the client's share of it, reading fails with [`ReadError::OverBudget`] and the session
//! closes with 1013.
//!
//! The frames are read here rather than by fastwebsockets' reader because its buffer is sized
//! to the largest frame a connection ever sent and kept for the connection's life (a client
//! could leave 10 MB behind on each of its connections, uncounted). Here a payload is read into
//! its own buffer, grown as its bytes arrive (so a declared length costs nothing until sent),
//! counted while it is in memory — read, queued or being handled — and freed with its message.

use super::limits::MessageBytes;
use fastwebsockets::OpCode;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

/// What a connection may hold without the budget: small messages never wait for, or fail on,
/// a full budget.
pub const FREE_BYTES: usize = 64 * 1024;
/// Taken from the budget at a time, and read at a time into a payload.
const STEP: usize = 64 * 1024;
/// The socket's read buffer (frame headers, small frames).
const READ_BUFFER: usize = 4096;
/// Control frames carry at most this much (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A connection's bytes in memory and the budget held for them, shared by its reader and the
/// messages it handed on.
#[derive(Clone)]
pub struct Counter(Arc<Mutex<Held>>);

struct Held {
    bytes: usize,
    hold: MessageBytes,
}

impl Counter {
    pub fn new(hold: MessageBytes) -> Self {
        Counter(Arc::new(Mutex::new(Held { bytes: 0, hold })))
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts `n` more bytes, taking budget as needed; false (nothing counted) past it.
    fn add(&self, n: usize) -> bool {
        let mut h = self.lock();
        let need = (h.bytes + n).saturating_sub(FREE_BYTES);
        while h.hold.bytes() < need {
            if !h.hold.grow(STEP) {
                return false;
            }
        }
        h.bytes += n;
        true
    }

    fn release(&self, n: usize) {
        let mut h = self.lock();
        h.bytes = h.bytes.saturating_sub(n);
        let need = h.bytes.saturating_sub(FREE_BYTES);
        // Given back a step at a time, so that a connection reading on does not take and give
        // the same step for every frame.
        if h.hold.bytes() >= need + STEP {
            h.hold.shrink_to(need.next_multiple_of(STEP));
        }
    }

    /// What the connection counts now (tests).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Bytes counted in a connection's [`Counter`] until this is dropped.
pub struct Counted {
    counter: Counter,
    bytes: usize,
}

impl Counted {
    /// Gives back what `counted` counts, and counts nothing (bytes read and not kept).
    pub fn none(counted: Counted) -> Counted {
        Counted { counter: counted.counter.clone(), bytes: 0 }
    }

    /// Counts `other`'s bytes here instead (one message made of several frames).
    pub fn absorb(&mut self, mut other: Counted) {
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.counter.release(self.bytes);
        }
    }
}

/// One frame, its payload unmasked.
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub enum ReadError {
    /// A data frame longer than the caller's limit (known from its header).
    TooBig,
    /// Its bytes would take the connection past the budget, or its client past its share.
    OverBudget,
    /// Not a frame a client may send.
    Protocol(&'static str),
    Io(io::Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooBig => f.write_str("frame too large"),
            ReadError::OverBudget => f.write_str("client messages' memory budget full"),
            ReadError::Protocol(what) => f.write_str(what),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads frames from a client, counting their payloads.
pub struct FrameReader<R> {
    io: BufReader<R>,
    counter: Counter,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, counter: Counter) -> Self {
        FrameReader { io: BufReader::with_capacity(READ_BUFFER, io), counter }
    }

    /// The next frame, and its payload's bytes counted until the [`Counted`] is dropped. A
    /// data frame whose payload is over `max_payload` is refused from its header (control
    /// frames have their own limit, 125 bytes).
    pub async fn read(&mut self, max_payload: usize) -> Result<(Frame, Counted), ReadError> {
        let [b0, b1] = {
            let mut head = [0u8; 2];
            self.io.read_exact(&mut head).await?;
            head
        };
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set (no extension was agreed)"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = match b0 & 0x0f {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xa => OpCode::Pong,
            _ => return Err(ReadError::Protocol("unknown opcode")),
        };
        // RFC 6455 §5.1: a server closes the connection on a frame that is not masked.
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("unmasked client frame"));
        }
        let len = match b1 & 0x7f {
            126 => self.io.read_u16().await? as u64,
            127 => self.io.read_u64().await?,
            n => n as u64,
        };
        let mask = self.io.read_u32().await?.to_be_bytes();
        let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
        if control && !fin {
            return Err(ReadError::Protocol("fragmented control frame"));
        }
        if control && len > MAX_CONTROL_PAYLOAD {
            return Err(ReadError::Protocol("control frame over 125 bytes"));
        }
        if !control && len > max_payload as u64 {
            return Err(ReadError::TooBig);
        }
        let len = len as usize;
        let mut counted = Counted { counter: self.counter.clone(), bytes: 0 };
        let mut payload: Vec<u8> = Vec::new();
        while payload.len() < len {
            let start = payload.len();
            let end = start + (len - start).min(STEP);
            if !self.counter.add(end - start) {
                return Err(ReadError::OverBudget);
            }
            counted.bytes += end - start;
            if payload.capacity() < end {
                // Doubling, but never past the declared length; not zeroed, so a page takes
                // memory only once bytes arrive in it.
                let want = len.min((2 * payload.capacity()).max(end));
                payload.reserve_exact(want - start);
            }
            while payload.len() < end {
                let rest = end - payload.len();
                let mut room = bytes::BufMut::limit(&mut payload, rest);
                if self.io.read_buf(&mut room).await? == 0 {
                    return Err(ReadError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
        fastwebsockets::unmask(&mut payload, mask);
        Ok((Frame { fin, opcode, payload }, counted))
    }

    /// Reads and drops up to `max` bytes, until the client stops sending (after a frame that
    /// cannot be read on from).
    pub async fn discard(&mut self, max: usize) {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut (&mut self.io).take(max as u64), &mut sink).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::limits::{Admission, LimitsConfig};

    fn admission(max: u64) -> Arc<Admission> {
        let limits = LimitsConfig {
            max_subscribers: 10,
            max_connections_per_ip: 10,
            max_events_per_second_per_ip: 0,
            trusted_proxies: vec![],
            ipv6_prefix: 64,
            unlimited_clients: vec![],
            max_connects_per_second_per_ip: 0,
            max_filter_bytes: 0,
            max_connections_per_ipv6_48: None,
            max_client_message_bytes: max,
        };
        Admission::new(&limits, ["f", "m"].map(|n| prometheus::IntGauge::new(n, "h").unwrap()))
    }

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![(fin as u8) << 7 | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 1 << 16 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[tokio::test]
    async fn frames_are_read_unmasked_and_counted_until_their_messages_go() {
        // One client's share: a quarter of 1 MiB.
        let a = admission(1 << 20);
        let slot = a.admit("192.0.2.1".parse().unwrap()).unwrap();
        let counter = Counter::new(slot.message_bytes());
        let big = vec![b'x'; 100 * 1024];
        let mut wire = frame(true, 1, b"hello");
        wire.extend(frame(false, 1, &big));
        wire.extend(frame(true, 0, &big));
        wire.extend(frame(true, 9, b"ping"));
        wire.extend(frame(true, 2, &vec![0; 300 * 1024]));
        let mut r = FrameReader::new(&wire[..], counter.clone());
        let (f, hello) = r.read(usize::MAX).await.unwrap();
        assert_eq!((f.fin, f.opcode, &f.payload[..]), (true, OpCode::Text, &b"hello"[..]));
        assert_eq!((counter.bytes(), a.message_bytes()), (5, 0), "within the free bytes");
        drop(hello);
        // Two fragments of 100 KiB held together: 136 KiB beyond the free bytes, in steps.
        let (first, mut message) = r.read(usize::MAX).await.unwrap();
        let (second, rest) = r.read(usize::MAX).await.unwrap();
        assert!(!first.fin && second.fin && second.payload == big);
        message.absorb(rest);
        assert_eq!(a.message_bytes(), 3 * STEP);
        let (ping, _) = r.read(usize::MAX).await.unwrap();
        assert_eq!((ping.opcode, &ping.payload[..]), (OpCode::Ping, &b"ping"[..]));
        // 300 KiB more would pass the client's 256 KiB share; what it had read goes back.
        assert!(matches!(r.read(usize::MAX).await, Err(ReadError::OverBudget)));
        // The message goes: its bytes and budget come back.
        drop(message);
        assert_eq!((counter.bytes(), a.message_bytes()), (0, 0));
    }

    #[tokio::test]
    async fn frames_a_client_may_not_send_are_refused() {
        let a = admission(0);
        let slot = a.admit("192.0.2.1".parse().unwrap()).unwrap();
        let read = |wire: Vec<u8>, max: usize| {
            let counter = Counter::new(slot.message_bytes());
            async move { FrameReader::new(&wire[..], counter).read(max).await.map(|(f, _)| f.payload.len()) }
        };
        assert!(matches!(read(frame(true, 1, &[b'a'; 100]), 99).await, Err(ReadError::TooBig)));
        assert!(matches!(read(frame(true, 1, &[b'a'; 100]), 100).await, Ok(100)));
        assert!(matches!(read(frame(false, 9, b"p"), 100).await, Err(ReadError::Protocol(_))));
        assert!(matches!(read(frame(true, 8, &[0; 126]), 1000).await, Err(ReadError::Protocol(_))));
        assert!(matches!(read(frame(true, 3, b"?"), 100).await, Err(ReadError::Protocol(_))));
        assert!(matches!(read(vec![0xc1, 0x80, 0, 0, 0, 0], 100).await, Err(ReadError::Protocol(_))), "RSV1");
        // A length declared and not sent: the end of the stream, not a 4 GB buffer.
        let mut short = frame(true, 1, b"abc");
        short[1] = 0x80 | 127;
        short.splice(2..2, 4_000_000_000u64.to_be_bytes());
        assert!(matches!(read(short, usize::MAX).await, Err(ReadError::Io(_))));
    }
}
