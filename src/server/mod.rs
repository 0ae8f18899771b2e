//! HTTP: the public listener (`/subscribe`, status page, health; routes in [`public`]) and
//! the metrics listener.
//!
//! hyper serves HTTP/1.1 connections (websockets need HTTP/1.1 upgrades); each connection is a
//! task tracked by the listener so shutdown can stop accepting and then wait for them.

pub mod history;
pub mod long_target;
pub mod public;
pub mod status_page;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::response::{full, text, Body};

/// The answer to a connection refused at accept (written without reading the request).
const TOO_MANY_CONNECTS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\ncontent-length: 38\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections from this client\n";

/// Kernel options for the sockets of a listener whose connections may become subscribers.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOptions {
    /// `TCP_USER_TIMEOUT`: the kernel closes a connection whose sent data stays unacknowledged,
    /// or whose peer's receive window stays shut, this long. It judges progress by the peer's
    /// acknowledgements, which is what tells a slow reader from a stuck one (`hub::session`).
    pub progress_timeout: Option<std::time::Duration>,
    /// `TCP_NOTSENT_LOWAT`: the most the kernel holds not yet sent before a write waits, so a
    /// slow reader's backlog stays in the log, not in kernel buffers, and writes wake as the
    /// reader drains.
    pub notsent_lowat: Option<u32>,
    /// Read a connection's first request line before hyper, so that one longer than hyper
    /// takes is served (`long_target`): the public listener's subscribers need it. Such a
    /// connection is closed after each plain HTTP answer, so that every request on it is a
    /// first one: a proxy reusing its upstream connections would otherwise send a long
    /// upgrade on a kept-alive connection and get hyper's 414.
    pub long_request_lines: bool,
}

impl SocketOptions {
    /// Sets each option (one failing does not skip the other); the first error, if any.
    fn apply(&self, tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
        let sock = socket2::SockRef::from(tcp);
        let timeout = self.progress_timeout.map_or(Ok(()), |t| sock.set_tcp_user_timeout(Some(t)));
        let lowat = self.notsent_lowat.map_or(Ok(()), |n| sock.set_tcp_notsent_lowat(n));
        timeout.and(lowat)
    }
}

/// Accepts connections on `listener` until `cancel`, serving each with `handler`; a `gate`
/// turns away clients opening connections faster than their rate, or holding too many still
/// in plain HTTP, before any parsing.
/// Returns once accepting has stopped and every connection task has finished.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    cancel: CancellationToken,
    connections: TaskTracker,
    gate: Option<Arc<crate::hub::limits::ConnectGate>>,
    options: SocketOptions,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let warnings = crate::rate_limited_log::RateLimitedLog::new(std::time::Duration::from_secs(60));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Counted while the connection speaks plain HTTP: released at its end or its upgrade
        // (the task below ends then).
        let counted = match &gate {
            Some(g) => match g.admit(peer.ip()) {
                Some(open) => Some(open),
                None => {
                    // Best effort, never waiting: the socket is closed right after.
                    let _ = tcp.try_write(TOO_MANY_CONNECTS);
                    continue;
                }
            },
            None => None,
        };
        let _ = tcp.set_nodelay(true);
        if let Err(e) = options.apply(&tcp) {
            // Never seen on Linux; the connection is served without them (a stuck subscriber
            // is then closed only by the session's own bound on one write, see hub::session).
            warnings.warn("socket_options", || format!("cannot set socket options: {e}"));
        }
        let handler = handler.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            // A first request line longer than hyper takes has its query set aside here.
            let close_after_plain_http = options.long_request_lines;
            let client = counted.as_ref().and_then(|c| c.client_key());
            let _counted = counted;
            let (tcp, long_query) = match options.long_request_lines {
                true => long_target::FirstLine::new(tcp, client),
                false => long_target::FirstLine::through(tcp),
            };
            let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                if req.uri().query() == Some(long_target::MARKER) {
                    if let Some(q) = long_query.lock().unwrap_or_else(|p| p.into_inner()).take() {
                        req.extensions_mut().insert(q);
                    }
                }
                let h = handler.clone();
                async move {
                    let mut response = h(req, peer).await;
                    if close_after_plain_http && response.status() != StatusCode::SWITCHING_PROTOCOLS {
                        // hyper ends the connection after a response that says so. A response
                        // with an `Upgrade` header (a 426) names it in `Connection` too (RFC
                        // 9110 7.8).
                        let close = match response.headers().contains_key(hyper::header::UPGRADE) {
                            true => "upgrade, close",
                            false => "close",
                        };
                        response.headers_mut().insert(CONNECTION, HeaderValue::from_static(close));
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                // Plain HTTP requests must arrive promptly; upgraded websockets are not affected.
                .header_read_timeout(std::time::Duration::from_secs(10))
                // Room for a request head with the longest URL hyper takes (64 KiB; a longer
                // first request line's query is set aside by `long_target`), not more: each
                // connection still sending its head may hold this much.
                .max_buf_size(256 << 10)
                .serve_connection(TokioIo::new(tcp), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                // Ends at the upgrade too: the websocket then lives on in its own task.
                _ = conn.as_mut() => {}
                // Plain HTTP (keep-alive, pipelining) for longer than this is closed: a client
                // reading its responses a few bytes a minute must not hold them for ever. The
                // response being written may finish first, for a while.
                () = tokio::time::sleep(MAX_PLAIN_HTTP) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(PLAIN_HTTP_GRACE, conn.as_mut()).await;
                }
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// How long a connection may speak plain HTTP before it is closed (a websocket is not: its
/// connection leaves hyper at the upgrade). A status page or a Prometheus scrape reconnects.
pub const MAX_PLAIN_HTTP: std::time::Duration = std::time::Duration::from_secs(120);
/// How long a response in progress at [`MAX_PLAIN_HTTP`] may take to finish.
const PLAIN_HTTP_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Binds, logging the real address (port 0 picks a free one).
pub async fn bind(addr: SocketAddr, name: &'static str) -> anyhow::Result<TcpListener> {
    let l = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({name}): {e}"))?;
    tracing::info!(listener = name, addr = %l.local_addr()?, "listening");
    Ok(l)
}

/// The metrics listener: `/metrics` only; `render` produces the text exposition.
pub fn metrics_handler(
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> impl Fn(Request<Incoming>, SocketAddr) -> std::future::Ready<Response<Body>> + Clone {
    move |req, _| {
        std::future::ready(match req.uri().path() {
            "/metrics" => full(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", render()),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        })
    }
}
