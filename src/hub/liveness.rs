//! Whether a subscriber is alive: what its socket shows, and how long a write may wait.
//!
//! A subscriber reading slowly but steadily must be kept (it falls back to the log; the slow
//! rule decides when it is too slow), while a dead or stuck peer must go. Found by the soak:
//! judging by how long one write takes, or by when a ping is answered, closes the slow reader
//! too — its writes wait for it by nature, and its pings wait behind the data it has not read.
//!
//! What tells them apart is progress, and the sender sees it only as the client's window
//! reopens: by one MSS (64 KiB on loopback) or a sixteenth of its receive buffer at a time, so
//! a reader of a few KB/s shows progress every several seconds. Hence:
//! - the kernel judges a connection's progress: `TCP_USER_TIMEOUT` = `--write-timeout` on the
//!   socket (the listener sets it: `server::SocketOptions`) ends a connection whose data goes
//!   unacknowledged, or whose window stays shut, for that long (Linux ≥ 5.11 for the window),
//!   failing it with `TimedOut`;
//! - `TCP_NOTSENT_LOWAT` ([`NOTSENT_LOWAT`]) keeps a backlog in the log rather than unsent in
//!   kernel buffers, so a waiting write wakes as the reader drains;
//! - one write ([`within`]) ends when the socket takes nothing for the longer of
//!   `--write-timeout` and `--slow-window` — a waiting write wakes each time about 64 KiB (half
//!   the low-water mark) has drained, so this is a reader draining less than that per minute —
//!   or when it outlasts that plus its length at [`FLOOR_BYTES_PER_SECOND`] (timers and the
//!   slow rule do not run while a write waits, so a write must not pin a session for long),
//!   or at shutdown;
//! - a silent client is judged from the later of when it was last heard and when its
//!   connection was last backed up ([`Watched::backed_up_at`]): while behind, its pings wait.

use super::close::CloseReason;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::time::Instant;

/// `TCP_NOTSENT_LOWAT` on subscriber sockets: the kernel holds at most this much not yet sent
/// (besides what is in flight, which the client's window bounds), so a slow reader's backlog
/// stays in the log (where its stream reads it from) and a write that waits wakes as the reader
/// drains, rather than after a third of a multi-megabyte send buffer has gone.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// The slowest a write may drain on the whole: 1 KB/s is five typical events a second (~200
/// bytes each), the slow rule's default floor. A stream of only compressed identity and account
/// events (~70 bytes) is slower at that rate, and may be ended before the slow rule would.
pub const FLOOR_BYTES_PER_SECOND: u64 = 1_000;

/// What a socket's write half has shown: when the socket last took bytes, and when a write last
/// found it full. Milliseconds after `base`, `u64::MAX` for never; shared by the writer and the
/// write in progress.
#[derive(Debug)]
pub struct Progress {
    base: Instant,
    took: AtomicU64,
    waited: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress { base: Instant::now(), took: AtomicU64::new(u64::MAX), waited: AtomicU64::new(u64::MAX) }
    }

    fn note(&self, at: &AtomicU64) {
        at.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn at(&self, at: &AtomicU64) -> Option<Instant> {
        let ms = at.load(Ordering::Relaxed);
        (ms != u64::MAX).then(|| self.base + Duration::from_millis(ms))
    }
}

/// A socket's write half, noting its [`Progress`].
pub struct Watched<W> {
    inner: W,
    progress: Arc<Progress>,
    /// The last poll was `Pending`.
    waiting: bool,
    /// Counts the writes the socket took (`contrail_hub_socket_writes_total`).
    writes: Option<prometheus::IntCounter>,
}

impl<W> Watched<W> {
    pub fn new(inner: W) -> Self {
        Watched { inner, progress: Arc::new(Progress::new()), waiting: false, writes: None }
    }

    /// Counts every write the socket takes into `writes`.
    pub fn counting_writes(mut self, writes: prometheus::IntCounter) -> Self {
        self.writes = Some(writes);
        self
    }

    /// What [`within`] watches.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// When the socket was last full (a write waited, or went on after waiting): the client was
    /// behind what it was sent, and a ping sent before waited behind that.
    pub fn backed_up_at(&self) -> Option<Instant> {
        self.progress.at(&self.progress.waited)
    }

    /// `had_budget`: the task had runtime budget left before the poll. Without it, tokio answers
    /// `Pending` whatever the socket's state (cooperative scheduling), which is no wait for the
    /// client: a busy fast client must not look backed up, or its silence would be excused.
    fn noted<T>(
        &mut self,
        had_budget: bool,
        r: Poll<std::io::Result<T>>,
        took: impl Fn(&T) -> bool,
    ) -> Poll<std::io::Result<T>> {
        let waits = r.is_pending() && had_budget;
        // A write going on after a wait counts as the socket being full too: about half the
        // low-water mark is still unsent ahead of what follows.
        if std::mem::replace(&mut self.waiting, waits) || waits {
            self.progress.note(&self.progress.waited);
        }
        if let Poll::Ready(Ok(v)) = &r {
            if took(v) {
                self.progress.note(&self.progress.took);
                if let Some(w) = &self.writes {
                    w.inc();
                }
            }
        }
        r
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let had_budget = tokio::task::coop::has_budget_remaining();
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.get_mut().noted(had_budget, r, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let had_budget = tokio::task::coop::has_budget_remaining();
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.get_mut().noted(had_budget, r, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let had_budget = tokio::task::coop::has_budget_remaining();
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.get_mut().noted(had_budget, r, |_| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs a write or flush of `len` bytes to a subscriber to its end, unless its socket takes
/// nothing for `limit` (counted from the later of the write's start and the last bytes taken)
/// or the write outlasts `limit` plus `len` at [`FLOOR_BYTES_PER_SECOND`], the kernel gives up
/// on the connection, or shutdown comes.
pub async fn within(
    limit: Duration,
    len: usize,
    progress: &Progress,
    shutdown: &tokio_util::sync::CancellationToken,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), CloseReason> {
    let ended = |r: std::io::Result<()>| match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err(CloseReason::WriteTimeout),
        Err(_) => Err(CloseReason::WriteError),
    };
    tokio::pin!(write);
    // Most writes are taken at once: those need no timer (two per delivered event otherwise).
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return ended(r);
    }
    let started = Instant::now();
    // Far enough for any sane setting; an absurd one must not overflow the clock.
    let after = |t: Instant, d: Duration| t.checked_add(d).unwrap_or(t + Duration::from_secs(365 * 86_400));
    let floor = Duration::from_millis((len as u64).saturating_mul(1_000) / FLOOR_BYTES_PER_SECOND);
    let end = after(after(started, limit), floor);
    let deadline = || after(progress.at(&progress.took).map_or(started, |t| t.max(started)), limit).min(end);
    loop {
        tokio::select! {
            biased;
            r = &mut write => return ended(r),
            _ = shutdown.cancelled() => return Err(CloseReason::Shutdown),
            _ = tokio::time::sleep_until(deadline()) => {
                if deadline() <= Instant::now() {
                    return Err(CloseReason::WriteTimeout);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reader taking 4 KiB every 100 ms: a 256 KiB write takes seconds yet never outlasts a
    /// 500 ms limit, and the writer notes it waited; once the reader stops, the next write ends.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_progresses_and_a_stopped_one_does_not() {
        // Paused time: a write that spins instead of waiting would hang; this fails it instead.
        tokio::time::timeout(Duration::from_secs(600), slow_and_stopped()).await.expect("a write spun");
    }

    /// The runtime's cooperative budget makes a write answer `Pending` after many ready
    /// operations in one poll, whatever the socket's state: that is no wait for the client, so
    /// a busy fast subscriber does not look backed up (which would excuse its silence).
    #[tokio::test]
    async fn a_pending_for_the_runtime_budget_is_not_a_backed_up_socket() {
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut w = Watched::new(a);
        let pendings = std::future::poll_fn(|cx| {
            let mut pendings = 0;
            for _ in 0..300 {
                if Pin::new(&mut w).poll_write(cx, b"x").is_pending() {
                    pendings += 1;
                }
            }
            Poll::Ready(pendings)
        })
        .await;
        assert!(pendings > 0, "the budget never ran out: the test shows nothing");
        assert!(w.backed_up_at().is_none(), "a budget Pending counted as the client being behind");
        assert!(w.progress.at(&w.progress.took).is_some());
    }

    /// Every write the socket takes is counted once; a write that finds it full is not.
    #[tokio::test]
    async fn writes_the_socket_took_are_counted() {
        let writes = prometheus::IntCounter::new("w", "w").unwrap();
        let (a, _b) = tokio::io::duplex(8);
        let mut w = Watched::new(a).counting_writes(writes.clone());
        w.write_all(b"abc").await.unwrap();
        w.write_all(b"de").await.unwrap();
        assert_eq!(writes.get(), 2);
        // The pipe holds 8 bytes and 5 are in it: this write takes 3, then waits for a reader.
        let blocked = tokio::time::timeout(Duration::from_millis(50), w.write_all(b"fghij")).await;
        assert!(blocked.is_err(), "the pipe had room for more than it should");
        assert_eq!(writes.get(), 3, "a write that found the socket full was counted");
    }

    async fn slow_and_stopped() {
        let (a, mut b) = tokio::io::duplex(8 * 1024);
        let mut w = Watched::new(a);
        let progress = w.progress();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            while got < 256 * 1024 {
                got += b.read(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            b // kept open, unread
        });
        let data = vec![7u8; 256 * 1024];
        let t = Instant::now();
        assert!(w.backed_up_at().is_none());
        within(Duration::from_millis(500), data.len(), &progress, &shutdown, w.write_all(&data)).await.unwrap();
        assert!(t.elapsed() > Duration::from_secs(2), "the write should have been slow");
        assert!(w.backed_up_at().is_some_and(|at| at > t));
        let mut b = reader.await.unwrap();
        // Nobody reads now, and the last progress is long past: the next write still gets its
        // whole limit from its own start, then ends.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = Instant::now();
        let got = within(Duration::from_millis(500), data.len(), &progress, &shutdown, w.write_all(&data)).await;
        assert_eq!(got, Err(CloseReason::WriteTimeout));
        assert!(t.elapsed() >= Duration::from_millis(500), "ended after {:?}", t.elapsed());
        // A reader draining below the floor rate: progress, but the write ends at its limit plus
        // its length at the floor (0.5 s + 8 s here), not when it would be done.
        let trickle = tokio::spawn(async move {
            let mut buf = [0u8; 100];
            loop {
                if b.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let t = Instant::now();
        let eight_kb = vec![7u8; 8_000];
        let got = within(Duration::from_millis(500), 8_000, &progress, &shutdown, w.write_all(&eight_kb)).await;
        assert_eq!(got, Err(CloseReason::WriteTimeout));
        assert!(
            (Duration::from_millis(8_400)..Duration::from_millis(8_700)).contains(&t.elapsed()),
            "{:?}",
            t.elapsed()
        );
        trickle.abort();
        // Shutdown does not wait for a write.
        shutdown.cancel();
        let got = within(Duration::from_secs(3600), data.len(), &progress, &shutdown, w.write_all(&data)).await;
        assert_eq!(got, Err(CloseReason::Shutdown));
    }
}
