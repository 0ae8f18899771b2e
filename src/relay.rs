//! The upstream socket: one websocket client to a relay's `com.atproto.sync.subscribeRepos`.
//!
//! - Resumes with `?cursor=<last persisted seq>`; relays replay that seq again (rainbow's
//!   cursor is inclusive), so frames with `seq <= last` are skipped — no duplicates.
//! - Reconnects with exponential backoff and jitter (1 s → 60 s) after any failure, and when
//!   the socket has been silent for the idle timeout: a quiet upstream never kills the process.
//! - The websocket layer allows 32 MiB messages; the protocol's 5 MB limit is applied by the
//!   transcoder, so an oversized frame is counted and skipped by seq rather than closing the
//!   connection and replaying the same frame forever.
//! - Error frames (`FutureCursor`, `ConsumerTooSlow`) and `#info OutdatedCursor` are logged
//!   and counted; seq gaps are counted.
//!
//! Frames are transcoded here (the reader is one task, far faster than the firehose) and handed
//! to the sequencer with their seq.

use crate::metrics::Metrics;
use crate::sequencer::IngestFrame;
use crate::transcode::{DropReason, FrameType, Transcoder};
use crate::util::RateLimitedLog;
use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::{FragmentCollector, OpCode};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE, USER_AGENT};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The XRPC path of the firehose.
pub const SUBSCRIBE_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";
/// Transport limit: generous, so the application decides about big frames (see module doc).
const MAX_WS_MESSAGE_BYTES: usize = 32 << 20;

/// A parsed relay URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path (always the subscribeRepos endpoint) and any query the operator gave, without cursor.
    pub path: String,
    pub query: Vec<String>,
}

impl RelayUrl {
    /// Accepts a base URL (`wss://bsky.network`) or the full subscribeRepos URL.
    pub fn parse(url: &str) -> anyhow::Result<RelayUrl> {
        Self::parse_with_path(url, SUBSCRIBE_PATH)
    }

    /// Like [`RelayUrl::parse`], with another endpoint path appended to base URLs (a replica's
    /// upstream is a Contrail `/subscribe`).
    pub fn parse_with_path(url: &str, endpoint: &str) -> anyhow::Result<RelayUrl> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            bail!("relay URL must start with ws:// or wss://: {url}");
        };
        let (authority, path_query) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_query, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h.to_string(), p.parse::<u16>().with_context(|| format!("bad port in relay URL {url}"))?)
            }
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            bail!("relay URL has no host: {url}");
        }
        let path = match path.trim_end_matches('/') {
            "" => endpoint.to_string(),
            p if p.ends_with(endpoint) => p.to_string(),
            p => format!("{p}{endpoint}"),
        };
        let query =
            query.split('&').filter(|kv| !kv.is_empty() && !kv.starts_with("cursor=")).map(str::to_string).collect();
        Ok(RelayUrl { tls, host, port, path, query })
    }

    /// The request target, with `cursor` when resuming.
    pub fn target(&self, cursor: Option<i64>) -> String {
        self.target_with(cursor.map(|c| format!("cursor={c}")).into_iter())
    }

    /// The request target with extra query parameters.
    pub fn target_with(&self, extra: impl Iterator<Item = String>) -> String {
        let mut q = self.query.clone();
        q.extend(extra);
        if q.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, q.join("&"))
        }
    }

    fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Reader settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub url: String,
    pub max_frame_bytes: usize,
    /// Reconnect when nothing arrives for this long.
    pub idle_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        // The upgraded connection's driver: it ends when the connection does.
        tokio::spawn(fut);
    }
}

pub(crate) type Ws = fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Opens a websocket to `url` with the given request target (path and query).
pub(crate) async fn connect(url: &RelayUrl, target: String) -> anyhow::Result<Ws> {
    let tcp = TcpStream::connect((url.host.trim_matches(|c| c == '[' || c == ']'), url.port))
        .await
        .with_context(|| format!("connecting to {}:{}", url.host, url.port))?;
    tcp.set_nodelay(true)?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(target)
        .header(HOST, url.host_header())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .header(USER_AGENT, concat!("contrail/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())?;
    let (mut ws, _) = if url.tls {
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        let name =
            rustls::pki_types::ServerName::try_from(url.host.clone()).context("relay host is not a valid TLS name")?;
        let tls = connector.connect(name, tcp).await.context("TLS handshake")?;
        fastwebsockets::handshake::client(&SpawnExecutor, req, tls).await.context("websocket handshake")?
    } else {
        fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await.context("websocket handshake")?
    };
    ws.set_max_message_size(MAX_WS_MESSAGE_BYTES);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    Ok(ws)
}

/// A plain HTTP GET of `path` on the same host (e.g. an upstream's `/dictionary`); the body.
pub(crate) async fn http_get(url: &RelayUrl, path: &str) -> anyhow::Result<Vec<u8>> {
    use http_body_util::BodyExt;
    let tcp = TcpStream::connect((url.host.trim_matches(|c| c == '[' || c == ']'), url.port))
        .await
        .with_context(|| format!("connecting to {}:{}", url.host, url.port))?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header(HOST, url.host_header())
        .header(USER_AGENT, concat!("contrail/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())?;
    async fn send<S>(io: S, req: hyper::Request<Empty<Bytes>>) -> anyhow::Result<Vec<u8>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
        // The connection's driver ends with the request (one request, then dropped).
        let driver = tokio::spawn(conn);
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        driver.abort();
        Ok(body)
    }
    if url.tls {
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        let name = rustls::pki_types::ServerName::try_from(url.host.clone()).context("host is not a valid TLS name")?;
        send(connector.connect(name, tcp).await.context("TLS handshake")?, req).await
    } else {
        send(tcp, req).await
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            // The provider is passed explicitly: with more than one compiled in, rustls would
            // panic choosing (rust-deps.md P9).
            let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(cfg)
        })
        .clone()
}

/// The reader's view of the relay stream position.
pub struct Reader {
    opts: RelayOptions,
    url: RelayUrl,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<IngestFrame>,
    /// Newest seq handed to the sequencer (0: none yet, start live).
    last_seq: i64,
    /// No frame with a seq has arrived on this connection yet.
    first_of_session: bool,
    /// `contrail_relay_frames_total` per frame type, resolved once (not a label lookup per frame).
    frames_by_type: Vec<prometheus::IntCounter>,
    transcoder: Transcoder,
    log: RateLimitedLog,
    /// Set once the relay has been reached (for readiness).
    pub reached: Arc<std::sync::atomic::AtomicBool>,
}

enum Ended {
    Cancelled,
    Retry(anyhow::Error),
}

impl Reader {
    pub fn new(
        opts: RelayOptions,
        start_seq: Option<i64>,
        metrics: Arc<Metrics>,
        tx: mpsc::Sender<IngestFrame>,
    ) -> anyhow::Result<Self> {
        let url = RelayUrl::parse(&opts.url)?;
        let transcoder = Transcoder::new(opts.max_frame_bytes);
        let frames_by_type =
            FrameType::ALL.iter().map(|t| metrics.relay_frames.with_label_values(&[t.as_str()])).collect();
        Ok(Reader {
            opts,
            url,
            metrics,
            tx,
            last_seq: start_seq.unwrap_or(0),
            first_of_session: true,
            frames_by_type,
            transcoder,
            log: RateLimitedLog::new(Duration::from_secs(10)),
            reached: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// Runs until `cancel` fires (or the sequencer is gone).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = self.opts.backoff_min;
        let mut first = true;
        loop {
            if !first {
                self.metrics.relay_reconnects.inc();
            }
            first = false;
            let cursor = (self.last_seq > 0).then_some(self.last_seq);
            let started_at = self.last_seq;
            let ended = tokio::select! {
                _ = cancel.cancelled() => Ended::Cancelled,
                r = self.session(cursor) => r,
            };
            self.metrics.relay_connected.set(0);
            match ended {
                Ended::Cancelled => return,
                Ended::Retry(e) => {
                    if self.tx.is_closed() {
                        return;
                    }
                    if self.last_seq != started_at {
                        backoff = self.opts.backoff_min;
                    }
                    // Full jitter on the upper half: reconnecting clients spread out.
                    let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "relay connection ended");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(self.opts.backoff_max);
                }
            }
        }
    }

    async fn session(&mut self, cursor: Option<i64>) -> Ended {
        tracing::info!(host = %self.url.host, cursor, "connecting to relay");
        let ws = match connect(&self.url, self.url.target(cursor)).await {
            Ok(ws) => ws,
            Err(e) => {
                self.metrics.relay_errors.with_label_values(&["connect"]).inc();
                return Ended::Retry(e);
            }
        };
        self.reached.store(true, std::sync::atomic::Ordering::Relaxed);
        self.first_of_session = true;
        self.metrics.relay_connected.set(1);
        tracing::info!(host = %self.url.host, cursor, "relay connected");
        let mut ws = FragmentCollector::new(ws);
        loop {
            let frame = match tokio::time::timeout(self.opts.idle_timeout, ws.read_frame()).await {
                Err(_) => {
                    self.metrics.relay_errors.with_label_values(&["idle_timeout"]).inc();
                    return Ended::Retry(anyhow::anyhow!("no frame for {:?}", self.opts.idle_timeout));
                }
                Ok(Err(e)) => {
                    self.metrics.relay_errors.with_label_values(&["read"]).inc();
                    return Ended::Retry(e.into());
                }
                Ok(Ok(f)) => f,
            };
            match frame.opcode {
                OpCode::Binary => {
                    if let Err(e) = self.handle(&frame.payload).await {
                        return Ended::Retry(e);
                    }
                }
                OpCode::Close => return Ended::Retry(anyhow::anyhow!("relay closed the connection")),
                OpCode::Text => {
                    // Not part of the protocol: counted as malformed, skipped.
                    self.metrics.relay_frames.with_label_values(&[FrameType::Malformed.as_str()]).inc();
                    self.metrics.drops.with_label_values(&[DropReason::BadHeader.as_str()]).inc();
                }
                _ => {}
            }
        }
    }

    async fn handle(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let m = &self.metrics;
        m.relay_bytes.inc_by(payload.len() as u64);
        let (mut events, mut op_drops) = (Vec::new(), Vec::new());
        let info = self.transcoder.transcode(payload, &mut events, &mut op_drops);
        if let Some(c) =
            FrameType::ALL.iter().position(|t| *t == info.frame_type).and_then(|i| self.frames_by_type.get(i))
        {
            c.inc();
        }
        for d in info.dropped.iter().chain(op_drops.iter()) {
            m.drops.with_label_values(&[d.as_str()]).inc();
            if !d.is_benign() && *d != DropReason::ErrorFrame {
                self.log.warn(d.as_str(), || format!("dropped {} (seq {:?})", d.as_str(), info.seq));
            }
        }
        match info.frame_type {
            FrameType::Error => {
                let name = info.name.clone().unwrap_or_default();
                let kind = match name.as_str() {
                    "FutureCursor" => "future_cursor",
                    "ConsumerTooSlow" => "consumer_too_slow",
                    _ => "other",
                };
                m.relay_errors.with_label_values(&[kind]).inc();
                tracing::error!(error = %name, message = info.message.as_deref().unwrap_or(""), last_seq = self.last_seq, "relay sent an error frame");
            }
            FrameType::Info => {
                tracing::warn!(
                    name = info.name.as_deref().unwrap_or(""),
                    message = info.message.as_deref().unwrap_or(""),
                    "relay info"
                );
            }
            _ => {}
        }
        let Some(seq) = info.seq else { return Ok(()) };
        if std::mem::take(&mut self.first_of_session) && seq < self.last_seq {
            // We asked for `cursor=last_seq` and the relay starts below it: it cannot serve
            // our cursor (a new relay instance with a new seq space, restarted lower). Taking
            // its stream from here is the only way forward; skipping "duplicates" would stall
            // ingest forever.
            m.relay_errors.with_label_values(&["seq_reset"]).inc();
            tracing::error!(
                cursor = self.last_seq,
                first_seq = seq,
                "relay seq went backwards on reconnect: treating it as a relay reset"
            );
            self.last_seq = seq - 1;
        }
        if seq <= self.last_seq {
            m.relay_duplicates.inc();
            return Ok(());
        }
        if self.last_seq > 0 && seq > self.last_seq + 1 {
            m.relay_seq_gaps.inc();
        }
        self.last_seq = seq;
        let frame = IngestFrame { seq: Some(seq), relay_time_us: info.relay_time_us, events, keep_time: false };
        if self.tx.send(frame).await.is_err() {
            bail!("sequencer stopped");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls() {
        let u = RelayUrl::parse("wss://bsky.network").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "bsky.network", 443));
        assert_eq!(u.target(Some(5)), "/xrpc/com.atproto.sync.subscribeRepos?cursor=5");
        let u = RelayUrl::parse("ws://127.0.0.1:7001/xrpc/com.atproto.sync.subscribeRepos?cursor=9&x=1").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 7001));
        assert_eq!(u.target(None), "/xrpc/com.atproto.sync.subscribeRepos?x=1");
        assert_eq!(u.host_header(), "127.0.0.1:7001");
        assert!(RelayUrl::parse("http://x").is_err());
    }
}
