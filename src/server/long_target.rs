//! A connection's first request line, read before hyper parses it, so that a request target
//! longer than hyper takes (65,534 bytes, the `http` crate's URI limit) is served rather than
//! answered with a bare 414.
//!
//! Jetstream (Go's `net/http`) takes a 1 MB request head: v2 clients put up to 10,000 `dids` in
//! the URL (~450 KB), and v2 has no client message to send them in otherwise; Jetstream's own Go
//! client takes a 414 for a passing failure and reconnects for ever. So the query of such a
//! line is set aside ([`LongQuery`], put in the request's extensions by the connection's
//! service) and the line hyper reads carries [`MARKER`] as its query instead; handlers read the
//! query with [`crate::request::query`].
//!
//! Bounds: only a connection's first request is looked at (a websocket upgrade is one; the
//! server closes a connection after each plain HTTP answer, so every request is one); a line
//! is read no further than [`MAX_LINE`]; the buffers of lines past hyper's limit (by capacity,
//! a query keeping the buffer it came in) hold at most [`LONG_LINES_BUDGET`] at once in the
//! whole process, and the lines of one client (an IP, an IPv6 /64; not an exempt one) a quarter
//! of it, and those of one IPv6 site (a /48, which holds 65,536 /64s) a quarter too, so that
//! one client cannot take it all and leave every other long URL a 414. A line over either, or whose query has a byte hyper refuses in one (a
//! fragment's `#` too), is handed to hyper as it is (its 414, or 431 past its buffer); so is a
//! request after blank lines (hyper skips them; this reader stops at the first). Reading a line is bounded in time by hyper's
//! header timeout, which runs while hyper waits on this reader.

use crate::request::LongQuery;
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The query hyper sees in place of one set aside.
pub use crate::request::LONG_QUERY_MARKER as MARKER;
/// The longest request line read (Go's `http.DefaultMaxHeaderBytes` is for the whole head).
pub const MAX_LINE: usize = 1 << 20;
/// What lines longer than hyper's limit may hold at once, process-wide (64 such lines).
pub const LONG_LINES_BUDGET: usize = 64 << 20;
/// Targets up to this long go to hyper as they are.
const HYPER_MAX_TARGET: usize = u16::MAX as usize - 1;
/// Reads of the first line take this much at a time.
const CHUNK: usize = 16 << 10;

/// What one client's lines may hold of [`LONG_LINES_BUDGET`] at once (16 such lines).
pub const LONG_LINES_PER_CLIENT: usize = LONG_LINES_BUDGET / 4;

static LONG_LINES_HELD: AtomicUsize = AtomicUsize::new(0);

/// What each client, and each IPv6 site, holds now (entries only while it holds something: at
/// most 128 at once).
static LONG_LINES_BY_CLIENT: LazyLock<Mutex<HashMap<Share, usize>>> = LazyLock::new(Mutex::default);

/// Who a quarter of [`LONG_LINES_BUDGET`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Share {
    Client(IpAddr),
    /// An IPv6 /48 (a /64 key with zeros past its /48 would be the same address).
    Site(IpAddr),
}

/// The shares a line of `client` counts in.
fn shares(client: Option<IpAddr>) -> impl Iterator<Item = Share> {
    let site = client.filter(|c| matches!(c, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none()));
    let site = site.map(|c| Share::Site(crate::hub::limits::client_key(c, crate::hub::limits::IPV6_SITE_PREFIX)));
    client.map(Share::Client).into_iter().chain(site)
}

/// Bytes of [`LONG_LINES_BUDGET`] held by one line of `client` (`None`: an exempt client,
/// held to the total only), given back on drop.
#[derive(Debug, Default)]
struct Held {
    bytes: usize,
    client: Option<IpAddr>,
}

impl Held {
    fn of(client: Option<IpAddr>) -> Held {
        Held { bytes: 0, client }
    }

    /// Takes `more`; false, taking nothing, past the budget or the client's or its site's
    /// share of it.
    fn take(&mut self, more: usize) -> bool {
        let mut by_client = LONG_LINES_BY_CLIENT.lock().unwrap_or_else(|p| p.into_inner());
        let holds = |share| by_client.get(&share).copied().unwrap_or(0);
        if shares(self.client).any(|share| holds(share).saturating_add(more) > LONG_LINES_PER_CLIENT) {
            return false;
        }
        let fits = |held: usize| held.checked_add(more).filter(|h| *h <= LONG_LINES_BUDGET);
        let taken = LONG_LINES_HELD.fetch_update(Ordering::AcqRel, Ordering::Acquire, fits).is_ok();
        if taken {
            self.bytes += more;
            for share in shares(self.client) {
                *by_client.entry(share).or_default() += more;
            }
        }
        taken
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        LONG_LINES_HELD.fetch_sub(self.bytes, Ordering::AcqRel);
        let mut by_client = LONG_LINES_BY_CLIENT.lock().unwrap_or_else(|p| p.into_inner());
        for share in shares(self.client) {
            if let Some(held) = by_client.get_mut(&share) {
                *held = held.saturating_sub(self.bytes);
                if *held == 0 {
                    by_client.remove(&share);
                }
            }
        }
    }
}

/// Where [`FirstLine`] leaves a query it set aside, for the connection's service.
pub type QuerySlot = Arc<Mutex<Option<Arc<LongQuery>>>>;

enum State {
    /// The first line, not yet ended, as read so far; `held`: its buffer's capacity past
    /// [`FREE_BYTES`], taken from the budget.
    Reading {
        buf: Vec<u8>,
        held: Held,
    },
    /// Bytes for hyper before the socket's next: the first line (rewritten or not) and what
    /// arrived with it.
    Replaying {
        buf: Vec<u8>,
        at: usize,
    },
    Through,
}

/// A first line's buffer holds this much without counting in the budget: what hyper holds for
/// a line it takes anyway.
const FREE_BYTES: usize = HYPER_MAX_TARGET + 1024;

/// A connection whose first request line is read here first (see the module).
pub struct FirstLine<T> {
    io: T,
    state: State,
    slot: QuerySlot,
}

impl<T> FirstLine<T> {
    /// `client`: the connection's client key, whose lines hold at most
    /// [`LONG_LINES_PER_CLIENT`] (`None`: an exempt client).
    pub fn new(io: T, client: Option<IpAddr>) -> (Self, QuerySlot) {
        let slot = QuerySlot::default();
        let state = State::Reading { buf: Vec::new(), held: Held::of(client) };
        (FirstLine { io, state, slot: slot.clone() }, slot)
    }

    /// A connection passed to hyper as it comes (a listener that needs no long lines).
    pub fn through(io: T) -> (Self, QuerySlot) {
        let slot = QuerySlot::default();
        (FirstLine { io, state: State::Through, slot: slot.clone() }, slot)
    }

    /// The first line is complete in `buf` (ending at `line_end`, its `\n`): what hyper reads.
    fn decide(&self, mut buf: Vec<u8>, line_end: usize, held: Held) -> Vec<u8> {
        let Some((target_at, target_end)) = long_target(&buf[..line_end]) else { return buf };
        let Some(q) = buf[target_at..target_end].iter().position(|&b| b == b'?') else { return buf };
        let (query_at, query_end) = (target_at + q + 1, target_end);
        // The path alone too long, or bytes hyper would refuse in a URI: hyper answers it.
        if q + 1 + MARKER.len() > HYPER_MAX_TARGET || !buf[query_at..query_end].iter().all(|&b| query_byte(b)) {
            return buf;
        }
        let mut line = Vec::with_capacity(query_at + MARKER.len() + buf.len() - query_end);
        line.extend_from_slice(&buf[..query_at]);
        line.extend_from_slice(MARKER.as_bytes());
        line.extend_from_slice(&buf[query_end..]);
        // The query keeps the buffer it arrived in (counted in `held`).
        buf.truncate(query_end);
        buf.drain(..query_at);
        let query = String::from_utf8(buf).expect("visible ASCII is UTF-8");
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(LongQuery::new(query, held)));
        line
    }
}

/// A byte the `http` crate takes in a URI's query (visible ASCII but `"`, `#`, `<` and `>`):
/// a long query is held to what a short one would be.
fn query_byte(b: u8) -> bool {
    matches!(b, 0x21 | 0x24..=0x3b | 0x3d | 0x3f..=0x7e)
}

/// Where the request target of `line` (`METHOD SP target SP version`) starts and ends, if it
/// is longer than hyper takes.
fn long_target(line: &[u8]) -> Option<(usize, usize)> {
    let start = line.iter().position(|&b| b == b' ')? + 1;
    let end = line.iter().rposition(|&b| b == b' ')?;
    (end > start && end - start > HYPER_MAX_TARGET).then_some((start, end))
}

/// Makes room in `buf` for `more` bytes within [`MAX_LINE`], its capacity past [`FREE_BYTES`]
/// counted in `held`; false, growing nothing, when either bound says no.
fn make_room(buf: &mut Vec<u8>, held: &mut Held, more: usize) -> bool {
    let need = buf.len() + more;
    if need > MAX_LINE {
        return false;
    }
    if need <= buf.capacity() {
        return true;
    }
    let capacity = need.max(2 * buf.capacity()).clamp(CHUNK, MAX_LINE);
    let counted = capacity.saturating_sub(FREE_BYTES);
    if counted > held.bytes && !held.take(counted - held.bytes) {
        return false;
    }
    buf.reserve_exact(capacity - buf.len());
    true
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstLine<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Through => return Pin::new(&mut this.io).poll_read(cx, out),
                State::Replaying { buf, at } => {
                    let n = (buf.len() - *at).min(out.remaining());
                    out.put_slice(&buf[*at..*at + n]);
                    *at += n;
                    if *at == buf.len() {
                        this.state = State::Through;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Reading { buf, held } => {
                    let mut chunk = [0u8; CHUNK];
                    let mut read = ReadBuf::new(&mut chunk);
                    ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
                    let got = read.filled();
                    let line_end = got.iter().position(|&b| b == b'\n').map(|i| buf.len() + i);
                    let room = make_room(buf, held, got.len());
                    if !room {
                        // Taken still (not one byte is lost), for hyper to refuse.
                        buf.reserve_exact(got.len());
                    }
                    buf.extend_from_slice(got);
                    let (buf, held) = (std::mem::take(buf), std::mem::take(held));
                    this.state = match line_end {
                        Some(end) if room => State::Replaying { buf: this.decide(buf, end, held), at: 0 },
                        Some(_) => State::Replaying { buf, at: 0 },
                        None if got.is_empty() || !room => State::Replaying { buf, at: 0 },
                        None => State::Reading { buf, held },
                    };
                    if let State::Replaying { buf, .. } = &this.state {
                        if buf.is_empty() {
                            this.state = State::Through;
                        }
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstLine<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What hyper would read of `input`, and the query set aside.
    async fn through(input: Vec<u8>) -> (Vec<u8>, Option<String>) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let (mut line, slot) = FirstLine::new(server, None);
        let mut out = Vec::new();
        line.read_to_end(&mut out).await.unwrap();
        drop(writer.await.unwrap());
        let q = slot.lock().unwrap().take();
        (out, q.map(|q| q.as_str().to_string()))
    }

    #[tokio::test]
    async fn short_lines_and_what_follows_pass_unchanged() {
        let req = b"GET /subscribe?wantedDids=did:plc:a HTTP/1.1\r\nHost: x\r\n\r\nmore".to_vec();
        assert_eq!(through(req.clone()).await, (req, None));
        // No line end at all (a client that hangs up early).
        assert_eq!(through(b"GET /x".to_vec()).await, (b"GET /x".to_vec(), None));
    }

    #[tokio::test]
    async fn a_long_query_is_set_aside_and_its_bytes_given_back() {
        let q = format!("dids={}", "did%3Aplc%3Aaaaaaaaaaaaaaaaaaaaaaaaa&dids=".repeat(5_000));
        let req = format!("GET /xrpc/x?{q} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (out, got) = through(req.into_bytes()).await;
        assert_eq!(String::from_utf8(out).unwrap(), format!("GET /xrpc/x?{MARKER} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(got.as_deref(), Some(q.as_str()));
        // The budget: a line's buffer past what hyper holds anyway, by capacity.
        let (mut buf, mut held) = (Vec::new(), Held::default());
        assert!(make_room(&mut buf, &mut held, FREE_BYTES + 10));
        assert_eq!(held.bytes, buf.capacity() - FREE_BYTES);
        assert!(!make_room(&mut buf, &mut held, MAX_LINE + 1), "past the longest line");
    }

    #[tokio::test]
    async fn a_long_first_line_leaves_what_follows_it_as_it_came() {
        // A second request pipelined behind the first, and bytes that are no URI's in a query.
        let q = format!("wantedDids={}", "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa&wantedDids=".repeat(3_000));
        let second = "GET /status HTTP/1.1\r\nHost: x\r\n\r\n";
        let req = format!("GET /subscribe?{q} HTTP/1.1\r\nHost: x\r\n\r\n{second}");
        let (out, got) = through(req.into_bytes()).await;
        let want = format!("GET /subscribe?{MARKER} HTTP/1.1\r\nHost: x\r\n\r\n{second}");
        assert_eq!((String::from_utf8(out).unwrap(), got), (want, Some(q.clone())));
        for odd in ["\u{7f}", "\"", "#fragment"] {
            let req = format!("GET /subscribe?{q}{odd} HTTP/1.1\r\n\r\n").into_bytes();
            assert_eq!(through(req.clone()).await, (req, None), "{odd}");
        }
    }

    #[test]
    fn one_client_holds_at_most_a_quarter_of_the_budget() {
        let (a, b) = ("192.0.2.1".parse().ok(), "192.0.2.2".parse().ok());
        let lines = |client: Option<IpAddr>, n: usize| {
            let mut held = Vec::new();
            for _ in 0..n {
                let (mut buf, mut h) = (Vec::new(), Held::of(client));
                if !make_room(&mut buf, &mut h, MAX_LINE) {
                    break;
                }
                held.push(h);
            }
            held
        };
        let first = lines(a, 64);
        let per_line = MAX_LINE - FREE_BYTES;
        assert_eq!(first.len(), LONG_LINES_PER_CLIENT / per_line, "the client's quarter");
        assert_eq!(lines(b, 1).len(), 1, "another client still has room");
        drop(first);
        assert_eq!(lines(a, 1).len(), 1, "given back");
        assert!(LONG_LINES_BY_CLIENT.lock().unwrap().get(&Share::Client(a.unwrap())).is_none(), "no entry left");
        // Four /64s of one IPv6 /48 hold a quarter between them; another /48 still has room.
        let (site_a, site_b) = ("2001:db8:1:1::", "2001:db8:1:2::");
        let of_site: Vec<_> = [site_a, site_b].iter().map(|c| lines(c.parse().ok(), 64)).collect();
        assert_eq!(of_site.iter().map(Vec::len).sum::<usize>(), LONG_LINES_PER_CLIENT / per_line, "the site's quarter");
        assert_eq!(lines("2001:db8:2::".parse().ok(), 1).len(), 1, "another site still has room");
        drop(of_site);
        assert!(LONG_LINES_BY_CLIENT.lock().unwrap().is_empty(), "no entry left");
    }

    #[tokio::test]
    async fn a_line_past_the_bound_goes_to_hyper_as_it_is() {
        let req = format!("GET /x?{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_LINE + CHUNK));
        assert_eq!(through(req.clone().into_bytes()).await, (req.into_bytes(), None));
        // A long path has no query to set aside.
        let req = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(HYPER_MAX_TARGET + 10));
        assert_eq!(through(req.clone().into_bytes()).await, (req.into_bytes(), None));
    }
}
