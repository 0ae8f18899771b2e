//! The socket's write half, watched: when it last accepted bytes, and how many in all. Found
//! by the soak: subscribers reading slowly but steadily were closed by the write and pong
//! timeouts, though the hub promises to keep slow readers on the log. With
//! `TCP_NOTSENT_LOWAT` on the socket (`server`), a write waits only for the peer to drain the
//! little the kernel holds unsent, and wakes as it drains; so a write that keeps making
//! progress is not cut by `--write-timeout` (only a socket that takes nothing for the whole
//! timeout is), and a peer that keeps taking data is not closed because its pong is behind that
//! data.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::time::Instant;

/// When the socket last accepted bytes, and how many it has accepted (shared by the writer and
/// the session).
#[derive(Debug)]
pub struct LastWrite {
    start: Instant,
    /// Milliseconds after `start`.
    ms: AtomicU64,
    bytes: AtomicU64,
}

impl LastWrite {
    pub fn new() -> Arc<LastWrite> {
        Arc::new(LastWrite { start: Instant::now(), ms: AtomicU64::new(0), bytes: AtomicU64::new(0) })
    }

    fn accepted(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let ms = self.start.elapsed().as_millis() as u64;
        self.ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// When bytes were last accepted (the session's start if never).
    pub fn at(&self) -> Instant {
        self.start + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }

    /// Bytes accepted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A writer that notes the bytes it accepts.
pub struct Watched<W> {
    inner: W,
    last: Arc<LastWrite>,
}

impl<W> Watched<W> {
    pub fn new(inner: W, last: Arc<LastWrite>) -> Self {
        Watched { inner, last }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Watched<W> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.last.accepted(*n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.last.accepted(*n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The write did not progress for the whole timeout.
#[derive(Debug)]
pub struct Stalled;

/// Runs `write` to its end, unless the socket accepts nothing for `timeout` (counted from the
/// later of the last accepted bytes and the start of this write).
pub async fn unless_stalled<T>(
    last: &LastWrite,
    timeout: Duration,
    write: impl std::future::Future<Output = T>,
) -> Result<T, Stalled> {
    let started = Instant::now();
    tokio::pin!(write);
    loop {
        let deadline = last.at().max(started) + timeout;
        tokio::select! {
            out = &mut write => return Ok(out),
            _ = tokio::time::sleep_until(deadline) => {
                if last.at().max(started) + timeout <= Instant::now() {
                    return Err(Stalled);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A reader taking 4 KiB every 100 ms: a 256 KiB write takes seconds, yet never stalls a
    /// 500 ms timeout; a reader that stops does.
    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_progresses_and_a_stopped_one_stalls() {
        let (a, mut b) = tokio::io::duplex(8 * 1024);
        let last = LastWrite::new();
        let mut w = Watched::new(a, last.clone());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            while got < 256 * 1024 {
                got += b.read(&mut buf).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            b // keep the pipe open, unread
        });
        let data = vec![7u8; 256 * 1024];
        let t = Instant::now();
        unless_stalled(&last, Duration::from_millis(500), w.write_all(&data)).await.unwrap().unwrap();
        assert!(t.elapsed() > Duration::from_secs(2), "the write should have been slow");
        assert_eq!(last.bytes(), 256 * 1024);
        let _b = reader.await.unwrap();
        // Nobody reads now: the next large write stalls.
        let got = unless_stalled(&last, Duration::from_millis(500), w.write_all(&data)).await;
        assert!(got.is_err());
    }
}
