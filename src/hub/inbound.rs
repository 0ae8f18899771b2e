//! The memory a subscriber's incoming messages hold while they arrive. The socket's reader
//! ([`BudgetedRead`]) counts the bytes read and not yet let go (frames waiting in
//! fastwebsockets' buffer, the parts of a fragmented text message kept so far) and holds
//! `--max-client-message-bytes` for what goes beyond [`FREE_BYTES`]. Past the budget, or the
//! client's share of it, the read fails with [`OverBudget`] and the session closes with 1013.
//! A text message handed on takes its share of the hold along; it is given back when the
//! message has been handled.
//!
//! fastwebsockets reserves a frame's declared length before reading it, but the memory is only
//! touched as bytes arrive: what is counted is what was read. A frame counts as its payload and
//! a header of the minimal size ([`frame_bytes`]); a client writing lengths in more bytes than
//! needed is counted a few bytes more per frame than it sent, never fewer.

use super::limits::MessageBytes;
use fastwebsockets::Frame;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// What a connection may hold without the budget: small messages never wait for, or fail on,
/// a full budget.
pub const FREE_BYTES: usize = 64 * 1024;
/// Taken from the budget at a time when the free bytes are used up.
const STEP: usize = 64 * 1024;

/// A connection's count, shared by its reader and the loop that reads its frames (one task).
#[derive(Clone)]
pub struct Counter(Arc<Mutex<Held>>);

struct Held {
    /// Bytes read from the socket.
    read: usize,
    /// Of those, the bytes let go: handed on in messages, or dropped (binary and control
    /// frames, whose bytes are not kept).
    let_go: usize,
    hold: MessageBytes,
}

impl Held {
    /// What the held bytes need from the budget.
    fn beyond_free(&self) -> usize {
        (self.read - self.let_go).saturating_sub(FREE_BYTES)
    }
}

impl Counter {
    pub fn new(hold: MessageBytes) -> Self {
        Counter(Arc::new(Mutex::new(Held { read: 0, let_go: 0, hold })))
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The first `bytes` read are no longer held: what they took from the budget goes back.
    pub fn let_go(&self, bytes: usize) {
        let mut h = self.lock();
        h.let_go = bytes.min(h.read);
        let need = h.beyond_free();
        h.hold.shrink_to(need);
    }

    /// The first `bytes` read are no longer held because a message made of them was handed on:
    /// what they took from the budget goes with it.
    pub fn hand_on(&self, bytes: usize) -> MessageBytes {
        let mut h = self.lock();
        h.let_go = bytes.min(h.read);
        let need = h.beyond_free();
        h.hold.split_above(need)
    }
}

/// A frame's size on the wire: its payload and a minimal header (with the mask, if any).
pub fn frame_bytes(frame: &mut Frame<'_>) -> usize {
    let mut head = [0u8; super::encode::MAX_HEAD];
    frame.fmt_head(&mut head) + frame.payload.len()
}

/// The read error of a connection whose messages would pass the budget.
#[derive(Debug)]
pub struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("client messages' memory budget full")
    }
}

impl std::error::Error for OverBudget {}

impl OverBudget {
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<OverBudget>())
    }
}

/// Reads no more than the connection's free bytes and its hold allow, taking more from the
/// budget as the held bytes reach that.
pub struct BudgetedRead<R> {
    inner: tokio::io::Take<R>,
    counter: Counter,
}

impl<R: AsyncRead> BudgetedRead<R> {
    pub fn new(inner: R, counter: Counter) -> Self {
        use tokio::io::AsyncReadExt;
        BudgetedRead { inner: inner.take(0), counter }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for BudgetedRead<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let room = {
            let mut h = this.counter.lock();
            let held = h.read - h.let_go;
            if held >= FREE_BYTES + h.hold.bytes() && !h.hold.grow(STEP) {
                return Poll::Ready(Err(io::Error::other(OverBudget)));
            }
            FREE_BYTES + h.hold.bytes() - held
        };
        // Never 0 (`Take` would report the end of the stream): the hold just grew if needed.
        this.inner.set_limit(room as u64);
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.counter.lock().read += buf.filled().len() - before;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::limits::{Admission, LimitsConfig};
    use tokio::io::AsyncReadExt;

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
            max_client_message_bytes: max,
        };
        Admission::new(&limits, ["f", "m"].map(|n| prometheus::IntGauge::new(n, "h").unwrap()))
    }

    #[tokio::test]
    async fn a_reader_holds_the_budget_for_what_it_holds_beyond_the_free_bytes() {
        // One client's share: a quarter of 1 MiB.
        let a = admission(1 << 20);
        let slot = a.admit("192.0.2.1".parse().unwrap()).unwrap();
        let counter = Counter::new(slot.message_bytes());
        let sent = vec![7u8; 1 << 20];
        let mut r = BudgetedRead::new(&sent[..], counter.clone());
        let mut buf = vec![0u8; 200 * 1024];
        // The free 64 KiB, then steps of 64 KiB from the budget.
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!((n, a.message_bytes()), (FREE_BYTES, 0));
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!((n, a.message_bytes()), (STEP, STEP));
        r.read_exact(&mut buf[..FREE_BYTES + STEP]).await.unwrap();
        assert_eq!(a.message_bytes(), 3 * STEP, "256 KiB read, 192 KiB of it from the budget");
        // Letting bytes go gives back what they took; a message takes its share along.
        counter.let_go(STEP);
        assert_eq!(a.message_bytes(), 2 * STEP);
        let message = counter.hand_on(3 * STEP);
        assert_eq!((message.bytes(), a.message_bytes()), (2 * STEP, 2 * STEP));
        drop(message);
        assert_eq!(a.message_bytes(), 0);
        // Reading on to the client's share (256 KiB held beyond the free bytes), then refused.
        let mut read = 4 * STEP;
        let err = loop {
            match r.read(&mut buf).await {
                Ok(0) => panic!("the end of the input before the budget"),
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert!(OverBudget::is(&err), "{err}");
        assert_eq!((read, a.message_bytes()), (3 * STEP + FREE_BYTES + (1 << 18), 1 << 18));
        // Nothing is left held once the connection's count goes.
        drop((r, counter, slot));
        assert_eq!(a.message_bytes(), 0);
    }
}
