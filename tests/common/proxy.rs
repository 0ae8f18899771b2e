//! A TCP proxy on 127.0.0.1:0 that can be frozen: while frozen it still accepts and holds
//! connections but moves no bytes (a peer that is up but stuck). It can also cut each
//! connection after a number of bytes from the target ([`Proxy::cut_after`]): a peer that dies
//! in the middle of a frame.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Proxy {
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    /// Bytes from the target each new connection forwards before it is cut (0: no limit).
    cut: Arc<std::sync::atomic::AtomicU64>,
    _task: tokio::task::JoinHandle<()>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    limit: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = if limit == 0 { u64::MAX } else { limit };
    loop {
        if left == 0 {
            // Cut: both directions end here, mid-frame.
            let _ = to.shutdown().await;
            return;
        }
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n = n.min(left.min(usize::MAX as u64) as usize);
        left -= n as u64;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (f, c) = (frozen.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let f = f.clone();
                let limit = c.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // The cut applies to what the target sends; when it falls, the other way
                    // is dropped with it.
                    tokio::select! {
                        _ = pump(cr, sw, f.clone(), 0) => {}
                        _ = pump(sr, cw, f, limit) => {}
                    }
                });
            }
        });
        Proxy { addr, frozen, cut, _task: task }
    }

    /// Cuts each connection opened from now on after `bytes` from the target (0: never).
    pub fn cut_after(&self, bytes: u64) {
        self.cut.store(bytes, Ordering::SeqCst);
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}
