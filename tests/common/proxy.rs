//! A TCP proxy on 127.0.0.1:0 that can be frozen: while frozen it still accepts and holds
//! connections but moves no bytes (a peer that is up but stuck). It can also cut each
//! connection after a number of bytes from the target ([`Proxy::cut_after`]): a peer that dies
//! in the middle of a frame. A gated proxy ([`Proxy::start_gated`]) answers 403 to every
//! request whose request line lacks a given string (a proxy that wants `?token=` everywhere).
//! A routing proxy ([`Proxy::start_routing`]) sends the requests for one path to another
//! target.

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
    /// Whether the next new connection is cut right after the target's response head.
    cut_next: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    limit: u64,
    after_head: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = if limit == 0 { u64::MAX } else { limit };
    // With `after_head`: the last bytes forwarded, to find the head's end across reads.
    let mut tail: Vec<u8> = Vec::new();
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
        let mut n = n.min(left.min(usize::MAX as u64) as usize);
        if after_head {
            let seen = tail.len();
            tail.extend_from_slice(&buf[..n]);
            if let Some(end) = tail.windows(4).position(|w| w == b"\r\n\r\n") {
                // Forward through the blank line, then cut.
                n = end + 4 - seen;
                left = n as u64;
            }
            tail.drain(..tail.len().saturating_sub(3));
        }
        left -= n as u64;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// An HTTP request's head (through the blank line; at most 16 KiB), or None.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte, so that nothing after the head is read here.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 || s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

fn first_line(head: &[u8]) -> String {
    String::from_utf8_lossy(head.split(|&b| b == b'\n').next().unwrap_or(&[])).into_owned()
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        Proxy::start_gated(target, "").await
    }

    /// A proxy that forwards only requests whose request line contains `required`, and answers
    /// the others `403 Forbidden`.
    pub async fn start_gated(target: SocketAddr, required: &str) -> Proxy {
        Proxy::start_with(target, required, None).await
    }

    /// A proxy that sends requests whose request line contains `path` to `there`, and all
    /// others to `target` (a load balancer in front of instances that may differ).
    pub async fn start_routing(target: SocketAddr, path: &str, there: SocketAddr) -> Proxy {
        Proxy::start_with(target, "", Some((path.to_string(), there))).await
    }

    async fn start_with(target: SocketAddr, required: &str, route: Option<(String, SocketAddr)>) -> Proxy {
        let required = Arc::new(required.to_string());
        let route = Arc::new(route);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let cut_next = Arc::new(AtomicBool::new(false));
        let (f, c, once) = (frozen.clone(), cut.clone(), cut_next.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let f = f.clone();
                let limit = c.load(Ordering::SeqCst);
                let after_head = once.swap(false, Ordering::SeqCst);
                let required = required.clone();
                let route = route.clone();
                tokio::spawn(async move {
                    let mut client = client;
                    let mut target = target;
                    let head = if required.is_empty() && route.is_none() {
                        Vec::new()
                    } else {
                        match read_head(&mut client).await {
                            Some(head) if first_line(&head).contains(required.as_str()) => {
                                if let Some((path, there)) = route.as_ref() {
                                    if first_line(&head).contains(path.as_str()) {
                                        target = *there;
                                    }
                                }
                                head
                            }
                            _ => {
                                let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n").await;
                                return;
                            }
                        }
                    };
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else { return };
                    if server.write_all(&head).await.is_err() {
                        return;
                    }
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // The cut applies to what the target sends; when it falls, the other way
                    // is dropped with it.
                    tokio::select! {
                        _ = pump(cr, sw, f.clone(), 0, false) => {}
                        _ = pump(sr, cw, f, limit, after_head) => {}
                    }
                });
            }
        });
        Proxy { addr, frozen, cut, cut_next, _task: task }
    }

    /// Cuts each connection opened from now on after `bytes` from the target (0: never).
    pub fn cut_after(&self, bytes: u64) {
        self.cut.store(bytes, Ordering::SeqCst);
    }

    /// Cuts the next connection opened right after the target's response head (an upgrade's:
    /// nothing of the websocket after it).
    pub fn cut_next_after_head(&self) {
        self.cut_next.store(true, Ordering::SeqCst);
    }

    pub fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}
