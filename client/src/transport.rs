//! The websocket and HTTP client under every connection Contrail makes, and that this crate's
//! subscriptions make: [`WsUrl`] (parsed once), [`connect`] (TCP, TLS with the webpki roots,
//! the websocket handshake, each step with its own deadline) and [`http_get`] (one small GET
//! on the same host, e.g. a server's `/dictionary`). The service's relay reader and replica
//! link use it too.

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE, USER_AGENT};
use std::sync::Arc;
use tokio::net::TcpStream;

/// The XRPC path of the firehose.
pub const SUBSCRIBE_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";
/// Transport limit: generous, so the application decides about big frames (see module doc).
/// It bounds one frame, and [`Reassembler`] bounds a fragmented message to the same.
pub const MAX_WS_MESSAGE_BYTES: usize = 32 << 20;

/// A URL that cannot be used: what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

fn bail<T>(msg: String) -> Result<T, UrlError> {
    Err(UrlError(msg))
}

impl UrlError {
    pub(crate) fn new(msg: String) -> UrlError {
        UrlError(msg)
    }
}

/// A parsed `ws://` or `wss://` URL of a relay or an upstream Contrail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// As the operator wrote it (shown in logs, `/status` and `--validate-only`).
    pub raw: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path (always the subscribeRepos endpoint) and any query the operator gave, without cursor.
    pub path: String,
    pub query: Vec<String>,
}

impl WsUrl {
    /// Accepts a base URL (`wss://bsky.network`) or the full subscribeRepos URL.
    pub fn parse(url: &str) -> Result<WsUrl, UrlError> {
        Self::parse_with_path(url, SUBSCRIBE_PATH)
    }

    /// Like [`WsUrl::parse`], with another endpoint path appended to base URLs (a replica's
    /// upstream is a Contrail `/subscribe`).
    pub fn parse_with_path(url: &str, endpoint: &str) -> Result<WsUrl, UrlError> {
        // Errors show the URL without its query, which may hold an access token.
        let shown = without_query(url);
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return bail(format!("URL must start with ws:// or wss://: {shown}"));
        };
        // A fragment is not sent.
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path_query) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if authority.contains('@') {
            // (Not echoed: the URL holds a secret.)
            return bail("credentials in a URL (user@host) are not supported: put an access token in its query".into());
        }
        let (path, query) = match path_query.split_once('?') {
            Some((p, q)) => (p, q),
            None => (path_query, ""),
        };
        let default_port = if tls { 443 } else { 80 };
        let bad_port = || UrlError(format!("bad port in URL {shown}"));
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            // An IPv6 literal, with or without a port: `[::1]`, `[::1]:6008`.
            let (addr, after) =
                bracketed.split_once(']').ok_or_else(|| UrlError(format!("unclosed [ in URL {shown}")))?;
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| UrlError(format!("bad IPv6 address in URL {shown}")))?;
            let port = match after {
                "" => default_port,
                p => p.strip_prefix(':').ok_or_else(bad_port)?.parse::<u16>().map_err(|_| bad_port())?,
            };
            (format!("[{addr}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse::<u16>().map_err(|_| bad_port())?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return bail(format!("URL has no host: {shown}"));
        }
        let path = match path.trim_end_matches('/') {
            "" => endpoint.to_string(),
            p if p.ends_with(endpoint) => p.to_string(),
            p => format!("{p}{endpoint}"),
        };
        let query =
            query.split('&').filter(|kv| !kv.is_empty() && !kv.starts_with("cursor=")).map(str::to_string).collect();
        Ok(WsUrl { raw: url.to_string(), tls, host, port, path, query })
    }

    /// One spelling per endpoint (scheme, lower-case host, explicit port, full path): what the
    /// stored relay cursor is compared by, so `wss://host` and `wss://host/` are the same relay
    /// and a restart resumes instead of starting live. The query is left out: a parameter (an
    /// access token rotated between restarts) does not make another seq space, and a token
    /// must not be stored or logged with the cursor.
    pub fn canonical(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://{}:{}{}", self.host.to_ascii_lowercase(), self.port, self.path)
    }

    /// The request target, with `cursor` when resuming.
    pub fn target(&self, cursor: Option<i64>) -> String {
        self.target_with(cursor.map(|c| format!("cursor={c}")).into_iter())
    }

    /// Another request target on the same server (`/dictionary`, `/status`), with the URL's
    /// own query: a proxy in front of the server that wants a `?token=` on every request gets
    /// it on these too.
    pub fn at(&self, path: &str) -> String {
        if self.query.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{}", self.query.join("&"))
        }
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

/// The URL as written, without its query or fragment: what logs, errors and status texts show.
/// A query may hold an access token (`?token=`), which must not reach a log or a public
/// `/ready` answer; requests are built from the parsed parts, with the query.
impl std::fmt::Display for WsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(without_query(&self.raw))
    }
}

/// A URL as written, without its query or fragment (see [`WsUrl`]'s `Display`).
pub fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or_default()
}

impl serde::Serialize for WsUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

/// Runs hyper's connection drivers on the tokio runtime (for `fastwebsockets`' own client
/// handshake, which tests and benchmarks use as a third-party client).
pub struct SpawnExecutor;

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

pub type Ws = fastwebsockets::WebSocket<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Largest body [`http_get`] accepts: a zstd dictionary is ~100 KiB; a peer that streams
/// more is not one we want to hold in memory.
pub const MAX_HTTP_BODY_BYTES: usize = 4 << 20;

/// Why a connection or a request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("{0:?} is not a valid TLS server name")]
    TlsName(String),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("websocket handshake: {0}")]
    Handshake(fastwebsockets::WebSocketError),
    /// The server answered with another status than the one asked for (not 101 to an
    /// upgrade, not 2xx to a GET): the status, how long its `Retry-After` asked for when it gave
    /// one, and the start of its body as one printable line ([`refusal_text`]), which says why.
    #[error("HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status { status: u16, retry_after: Option<std::time::Duration>, body: String },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("{step} did not finish within {after:?}")]
    Timeout { step: &'static str, after: std::time::Duration },
    /// [`http_get_public`]: the name has no public address (loopback, private, link-local…).
    #[error("{0} has no public address")]
    NotPublic(String),
}

impl ClientError {
    /// How long the server asked to be left alone (`Retry-After` on a refusal), if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ClientError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// How much of a refusal's body is read: enough for a reason, not a page.
const REFUSAL_BODY_BYTES: usize = 1024;
/// How long it is waited for: a status must not be lost to a body that never ends (one
/// without a length is read until the server closes).
const REFUSAL_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How much of it is shown (characters).
const REFUSAL_TEXT_CHARS: usize = 200;

/// The query parameters of a subscription, which are not secret: the values of any other in a
/// URL's own query (an access token) are not shown when a refusal's body quotes them.
const PUBLIC_PARAMS: &[&str] = &[
    "wantedCollections",
    "wantedDids",
    "cursor",
    "compress",
    "requireHello",
    "maxMessageSizeBytes",
    "informCursorSeconds",
    "includeSync",
    "includeVerification",
    "collections",
    "dids",
    "kinds",
    "zstdDictionary",
];

/// A refusal from its response: the status, [`retry_after`] and the first
/// [`REFUSAL_BODY_BYTES`] of the body, what arrived of it within [`REFUSAL_BODY_WAIT`] or half
/// of what is left until the step's `deadline` (the status must not be lost to it), with the
/// values of `url`'s own non-public query parameters left out.
async fn refusal(
    resp: hyper::Response<hyper::body::Incoming>,
    url: &WsUrl,
    deadline: tokio::time::Instant,
) -> ClientError {
    use http_body_util::BodyExt;
    let status = resp.status().as_u16();
    let retry_after = retry_after(resp.headers(), std::time::SystemTime::now());
    let mut body = resp.into_body();
    let mut head = Vec::new();
    // A body that breaks off, or stalls, is shown as far as it came.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    let mut whole = false;
    let _ = tokio::time::timeout(REFUSAL_BODY_WAIT.min(left / 2), async {
        while head.len() < REFUSAL_BODY_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        head.extend_from_slice(&data[..data.len().min(REFUSAL_BODY_BYTES - head.len())]);
                    }
                }
                None => {
                    whole = true;
                    break;
                }
                Some(Err(_)) => break,
            }
        }
    })
    .await;
    // (Cut by our limit, the wait, or the connection: a secret may end where it stops.)
    let read_cut = !whole;
    ClientError::Status { status, retry_after, body: refusal_text_without(&head, &secrets(url), read_cut) }
}

/// The values of `url`'s own non-public query parameters (an access token), as written and
/// percent-decoded (a proxy may quote either). A value of a few characters is no secret, and
/// would take others' letters away.
fn secrets(url: &WsUrl) -> Vec<String> {
    let mut secrets = Vec::new();
    for (key, value) in url.query.iter().filter_map(|kv| kv.split_once('=')) {
        if PUBLIC_PARAMS.contains(&key) {
            continue;
        }
        // (As a form decodes it, `+` a space; and as RFC 3986 does, `+` itself.)
        let decode = |v: &str| percent_encoding::percent_decode_str(v).decode_utf8().ok().map(|d| d.into_owned());
        let forms = [Some(value.to_string()), decode(&value.replace('+', " ")), decode(value)];
        for v in forms.into_iter().flatten() {
            if v.chars().count() >= 4 && !secrets.contains(&v) {
                secrets.push(v);
            }
        }
    }
    secrets
}

/// The instant `timeout` from now; for a timeout past any clock (`Duration::MAX` for "never"),
/// a century from now.
fn deadline_after(timeout: std::time::Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + std::time::Duration::from_secs(100 * 365 * 86_400))
}

/// How long a refusal asks to be left alone: its `Retry-After` in seconds, or as an HTTP date
/// (RFC 9110 §10.2.3), counted from the response's own `Date` when it has one (a peer whose
/// clock is minutes off still gets the wait it meant), else from `now`. A date already past is
/// no wait; seconds beyond any clock are the longest wait (the caller caps it).
fn retry_after(headers: &hyper::HeaderMap, now: std::time::SystemTime) -> Option<std::time::Duration> {
    let value = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse().map_or(std::time::Duration::MAX, std::time::Duration::from_secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let date = headers.get(hyper::header::DATE).and_then(|d| httpdate::parse_http_date(d.to_str().ok()?).ok());
    Some(at.duration_since(date.unwrap_or(now)).unwrap_or_default())
}

/// Characters that change how a line reads without being seen (the format characters: soft
/// hyphen, zero-width spaces and joiners, direction marks and overrides, the byte-order mark,
/// interlinear annotation, tags): taken for spaces, as control characters are, so a peer's
/// text cannot disguise a log line.
fn invisible(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{61c}'
                | '\u{180e}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
}

/// A body a server sent as one short printable line for logs and errors: an XRPC error
/// (`{"error":…,"message":…}`) as "error: message"; otherwise the text, not UTF-8 replaced,
/// control and invisible characters and runs of whitespace as one space; cut at
/// [`REFUSAL_TEXT_CHARS`].
pub fn refusal_text(body: &[u8]) -> String {
    refusal_text_without(body, &[], false)
}

/// [`refusal_text`] with each of `secrets` (before it is cut) as "…"; with `read_cut` (the body
/// was read only so far), the start of one at the end too.
fn refusal_text_without(body: &[u8], secrets: &[String], read_cut: bool) -> String {
    #[derive(serde::Deserialize)]
    struct Xrpc {
        error: String,
        message: Option<String>,
    }
    let xrpc = serde_json::from_slice::<Xrpc>(body).ok();
    let text = match &xrpc {
        Some(Xrpc { error, message: Some(m) }) => std::borrow::Cow::Owned(format!("{error}: {m}")),
        Some(Xrpc { error, message: None }) => std::borrow::Cow::Borrowed(error.as_str()),
        None => String::from_utf8_lossy(body),
    };
    let mut text = text.into_owned();
    for secret in secrets {
        text = text.replace(secret.as_str(), "…");
    }
    if read_cut {
        // (A character cut in two by the read is a replacement character, not the secret's.)
        let cut_char = text.trim_end_matches('\u{fffd}').len();
        text.truncate(cut_char);
        let started = secrets
            .iter()
            .filter_map(|secret| {
                secret.char_indices().filter(|&(i, _)| i > 0).map(|(i, _)| &secret[..i]).rfind(|p| text.ends_with(p))
            })
            .map(str::len)
            .max();
        if let Some(len) = started {
            text.truncate(text.len() - len);
            text.push('…');
        }
    }
    let mut out = String::new();
    for (n, word) in text.split(invisible).filter(|w| !w.is_empty()).enumerate() {
        if n > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
    match out.char_indices().nth(REFUSAL_TEXT_CHARS) {
        Some((cut, _)) => format!("{}…", &out[..cut]),
        None => out,
    }
}

/// Whether a request made on a stranger's behalf (a `did:web` name in a relay's frame) may go
/// to `ip`: not loopback, private, shared (CGNAT), link-local, unspecified, multicast,
/// broadcast, documentation, benchmarking or reserved (IPv6: also site-local, and the local-use
/// NAT64 prefix). IPv4-mapped, NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) IPv6 addresses are
/// judged by the IPv4 address inside.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::{IpAddr, Ipv4Addr};
    fn v4(ip: Ipv4Addr) -> bool {
        let [a, b, c, _] = ip.octets();
        !(ip.is_private()
            || ip.is_loopback()
            || ip.is_link_local()
            || ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_documentation()
            || ip.is_multicast()
            || a == 0
            || (a == 100 && (64..128).contains(&b))
            || (a == 192 && b == 0 && c == 0)
            || (a == 198 && (b == 18 || b == 19))
            || a >= 240)
    }
    match ip {
        IpAddr::V4(ip) => v4(ip),
        IpAddr::V6(ip) => {
            if let Some(mapped) = ip.to_ipv4_mapped() {
                return v4(mapped);
            }
            let s = ip.segments();
            let embedded = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return v4(embedded(s[6], s[7]));
            }
            if s[0] == 0x2002 {
                return v4(embedded(s[1], s[2]));
            }
            !(ip.is_loopback()
                || ip.is_unspecified()
                || ip.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local, deprecated
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1) // local-use NAT64
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || s[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible, deprecated
        }
    }
}

/// Runs one step of a connection with its own deadline: a peer that accepts TCP and then
/// says nothing must not hang the reader (DESIGN.md invariant 10).
async fn step<T, E>(
    step: &'static str,
    after: std::time::Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
    err: impl FnOnce(E) -> ClientError,
) -> Result<T, ClientError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(ClientError::Timeout { step, after }),
    }
}

async fn tcp(url: &WsUrl, timeout: std::time::Duration) -> Result<TcpStream, ClientError> {
    tcp_to(url, timeout, false).await
}

/// Connects to `url`'s host; with `public_only`, only to one of its public addresses
/// ([`is_public`]), resolved here so the address checked is the address connected to.
async fn tcp_to(url: &WsUrl, timeout: std::time::Duration, public_only: bool) -> Result<TcpStream, ClientError> {
    let addr = format!("{}:{}", url.host, url.port);
    let host = url.host.trim_matches(|c| c == '[' || c == ']');
    // `Ok(None)`: the name has no public address.
    let connect = async {
        let addrs: Vec<std::net::SocketAddr> =
            tokio::net::lookup_host((host, url.port)).await?.filter(|a| !public_only || is_public(a.ip())).collect();
        if addrs.is_empty() && public_only {
            return Ok(None);
        }
        connect_any(addrs, TcpStream::connect).await.map(Some)
    };
    let tcp = match tokio::time::timeout(timeout, connect).await {
        Err(_) => return Err(ClientError::Timeout { step: "TCP connect", after: timeout }),
        Ok(Err(source)) => return Err(ClientError::Connect { addr, source }),
        Ok(Ok(None)) => return Err(ClientError::NotPublic(host.to_string())),
        Ok(Ok(Some(tcp))) => tcp,
    };
    tcp.set_nodelay(true).map_err(|source| ClientError::Connect { addr, source })?;
    Ok(tcp)
}

/// How long an address is tried alone before the next one is tried beside it (RFC 8305's
/// "connection attempt delay").
const NEXT_ADDRESS_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// Connects to the first of `addrs` that answers, the families taken in turn (IPv6, IPv4, …,
/// starting with the first's): each is tried alone for [`NEXT_ADDRESS_AFTER`], or until it
/// fails, then the next one beside it (RFC 8305's "happy eyeballs"). So one address that never
/// answers — a broken IPv6 path whose SYNs are dropped, a dead record sorted first — does not
/// take the whole connect timeout of every attempt while the others work. The error is the
/// last one seen.
async fn connect_any<F, Fut, S>(addrs: Vec<std::net::SocketAddr>, connect: F) -> std::io::Result<S>
where
    F: Fn(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>> + Send + 'static,
    S: Send + 'static,
{
    let (v6, v4): (Vec<std::net::SocketAddr>, Vec<_>) = addrs.iter().partition(|a| a.is_ipv6());
    let (first, second) = if addrs.first().is_some_and(|a| a.is_ipv4()) { (v4, v6) } else { (v6, v4) };
    let mut order = Vec::with_capacity(addrs.len());
    for i in 0..first.len().max(second.len()) {
        order.extend(first.get(i).copied());
        order.extend(second.get(i).copied());
    }
    let mut next = order.into_iter().peekable();
    // Dropped on return: the attempts still going are given up.
    let mut attempts = tokio::task::JoinSet::new();
    let mut last_error = None;
    loop {
        if let Some(a) = next.next() {
            attempts.spawn(connect(a));
        }
        if attempts.is_empty() {
            let none = || std::io::Error::new(std::io::ErrorKind::NotFound, "the name has no address");
            return Err(last_error.unwrap_or_else(none));
        }
        let more = next.peek().is_some();
        tokio::select! {
            done = attempts.join_next() => match done.expect("an attempt is going") {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => last_error = Some(e),
                Err(e) => last_error = Some(std::io::Error::other(e)),
            },
            _ = tokio::time::sleep(NEXT_ADDRESS_AFTER), if more => {}
        }
    }
}

async fn tls(
    url: &WsUrl,
    tcp: TcpStream,
    timeout: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
    let connector = tokio_rustls::TlsConnector::from(tls_config());
    let host = url.host.trim_matches(|c| c == '[' || c == ']').to_string();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| ClientError::TlsName(host))?;
    step("TLS handshake", timeout, connector.connect(name, tcp), ClientError::Tls).await
}

/// Opens a websocket to `url` with the given request target (path and query). Each step
/// (TCP, TLS, the upgrade) must finish within `timeout`.
pub async fn connect(url: &WsUrl, target: String, timeout: std::time::Duration) -> Result<Ws, ClientError> {
    connect_with_start_cursor(url, target, timeout).await.map(|(ws, _)| ws)
}

/// The header in which a Contrail server answers a live upgrade with a cursor that resumes
/// from the subscription's start, on its own clock.
pub const START_CURSOR_HEADER: &str = "contrail-start-cursor";

/// [`connect`], with the upgrade's [`START_CURSOR_HEADER`] when it had one.
pub async fn connect_with_start_cursor(
    url: &WsUrl,
    target: String,
    timeout: std::time::Duration,
) -> Result<(Ws, Option<u64>), ClientError> {
    let tcp = tcp(url, timeout).await?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(target)
        .header(HOST, url.host_header())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13")
        .header(USER_AGENT, concat!("contrail/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    let (mut ws, response) = if url.tls {
        let tls = tls(url, tcp, timeout).await?;
        step("websocket handshake", timeout, upgrade(url, timeout, req, tls), |e| e).await?
    } else {
        step("websocket handshake", timeout, upgrade(url, timeout, req, tcp), |e| e).await?
    };
    ws.set_max_message_size(MAX_WS_MESSAGE_BYTES);
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    let start_cursor = response.headers().get(START_CURSOR_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
    Ok((ws, start_cursor))
}

/// The websocket upgrade over `io`, as `fastwebsockets::handshake::client` does it, except
/// that a refusal keeps what the server said ([`ClientError::Status`]): a 400's reason, a 429's
/// `Retry-After`.
async fn upgrade<S>(
    url: &WsUrl,
    timeout: std::time::Duration,
    req: hyper::Request<Empty<Bytes>>,
    io: S,
) -> Result<(Ws, hyper::Response<()>), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let deadline = deadline_after(timeout);
    let http = |e: hyper::Error| ClientError::Http(e.to_string());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(http)?;
    // The connection's driver: after an upgrade it hands the connection over and ends; a
    // handshake that fails or is given up (its deadline) takes it down.
    let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "websocket handshake connection");
        }
    }));
    let mut resp = sender.send_request(req).await.map_err(http)?;
    if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
        return Err(refusal(resp, url, deadline).await);
    }
    // (`Connection` is a list of tokens: "keep-alive, Upgrade" will do.)
    let says = |name: hyper::header::HeaderName, want: &str| {
        let value = resp.headers().get(name).and_then(|v| v.to_str().ok());
        value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
    };
    if !says(UPGRADE, "websocket") {
        return Err(ClientError::Handshake(fastwebsockets::WebSocketError::InvalidUpgradeHeader));
    }
    if !says(CONNECTION, "upgrade") {
        return Err(ClientError::Handshake(fastwebsockets::WebSocketError::InvalidConnectionHeader));
    }
    let upgraded = hyper::upgrade::on(&mut resp).await.map_err(http)?;
    let ws = fastwebsockets::WebSocket::after_handshake(
        hyper_util::rt::TokioIo::new(upgraded),
        fastwebsockets::Role::Client,
    );
    let (parts, _) = resp.into_parts();
    Ok((ws, hyper::Response::from_parts(parts, ())))
}

/// A plain HTTP GET of `path` on the same host (e.g. an upstream's `/dictionary`); the body,
/// at most [`MAX_HTTP_BODY_BYTES`]. The whole request must finish within `timeout`.
pub async fn http_get(url: &WsUrl, path: &str, timeout: std::time::Duration) -> Result<Vec<u8>, ClientError> {
    http_get_at_most(url, path, timeout, MAX_HTTP_BODY_BYTES).await
}

/// [`http_get`] of a body of at most `max_bytes`: a longer one is an error once that much has
/// arrived, not after all of it was read.
pub async fn http_get_at_most(
    url: &WsUrl,
    path: &str,
    timeout: std::time::Duration,
    max_bytes: usize,
) -> Result<Vec<u8>, ClientError> {
    get(url, path, timeout, max_bytes, false).await
}

/// [`http_get_at_most`] from a host named by a stranger (a `did:web` document): only to a
/// public address of it ([`is_public`]), so a name that resolves to this machine, its network
/// or a cloud metadata address is refused before any connection ([`ClientError::NotPublic`]).
pub async fn http_get_public(
    url: &WsUrl,
    path: &str,
    timeout: std::time::Duration,
    max_bytes: usize,
) -> Result<Vec<u8>, ClientError> {
    get(url, path, timeout, max_bytes, true).await
}

async fn get(
    url: &WsUrl,
    path: &str,
    timeout: std::time::Duration,
    max_bytes: usize,
    public_only: bool,
) -> Result<Vec<u8>, ClientError> {
    let tcp = tcp_to(url, timeout, public_only).await?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(path)
        .header(HOST, url.host_header())
        .header(USER_AGENT, concat!("contrail/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Http(e.to_string()))?;
    async fn send<S>(
        url: &WsUrl,
        deadline: tokio::time::Instant,
        io: S,
        req: hyper::Request<Empty<Bytes>>,
        max_bytes: usize,
    ) -> Result<Vec<u8>, ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use http_body_util::BodyExt;
        let http = |e: hyper::Error| ClientError::Http(e.to_string());
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await.map_err(http)?;
        // The connection's driver ends with the request (one request, then dropped; given up
        // at the deadline too).
        let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        let resp = sender.send_request(req).await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(refusal(resp, url, deadline).await);
        }
        let limited = http_body_util::Limited::new(resp.into_body(), max_bytes);
        let body = limited.collect().await.map_err(|e| ClientError::Http(format!("body: {e}")));
        Ok(body?.to_bytes().to_vec())
    }
    // (The step's, for a refusal's body.)
    let deadline = deadline_after(timeout);
    let request = async {
        if url.tls {
            send(url, deadline, tls(url, tcp, timeout).await?, req, max_bytes).await
        } else {
            send(url, deadline, tcp, req, max_bytes).await
        }
    };
    step("HTTP GET", timeout, request, |e| e).await
}

/// Puts fragmented websocket messages back together, their total capped. fastwebsockets'
/// `FragmentCollector` caps each frame but not the message, so a peer sending fragment after
/// fragment without end would grow one message until memory ran out.
#[derive(Debug)]
pub struct Reassembler {
    max: usize,
    /// The opcode of the message being put together, if one is.
    partial: Option<fastwebsockets::OpCode>,
    buf: Vec<u8>,
}

/// What one frame completed.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled<'a> {
    /// A whole message or a control frame: the frame's own payload when it was not fragmented.
    Message(fastwebsockets::OpCode, &'a [u8]),
    /// A fragment, kept until the message's last one.
    Partial,
}

/// A message the peer got wrong: the connection should end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReassemblyError {
    #[error("a fragmented message larger than {0} bytes")]
    TooBig(usize),
    #[error("a new message inside a fragmented one")]
    Interleaved,
    #[error("a continuation frame outside a message")]
    StrayContinuation,
}

impl Reassembler {
    /// Above this, the buffer of a finished message is not kept for the next one.
    const KEEP_CAPACITY: usize = 1 << 20;

    pub fn new(max: usize) -> Reassembler {
        Reassembler { max, partial: None, buf: Vec::new() }
    }

    /// Takes the next frame read. Control frames (which may come between fragments) pass
    /// through as they are.
    pub fn push<'a>(
        &'a mut self,
        opcode: fastwebsockets::OpCode,
        fin: bool,
        payload: &'a [u8],
    ) -> Result<Assembled<'a>, ReassemblyError> {
        use fastwebsockets::OpCode;
        if self.partial.is_none() && self.buf.capacity() > Self::KEEP_CAPACITY {
            // The last message was a large one, handed out by the call before: let it go now
            // rather than hold it for the rest of the connection.
            self.buf = Vec::new();
        }
        match (opcode, self.partial) {
            (OpCode::Text | OpCode::Binary, Some(_)) => Err(ReassemblyError::Interleaved),
            (OpCode::Text | OpCode::Binary, None) if fin => Ok(Assembled::Message(opcode, payload)),
            (OpCode::Text | OpCode::Binary, None) => {
                if payload.len() > self.max {
                    return Err(ReassemblyError::TooBig(self.max));
                }
                self.buf.clear();
                self.buf.extend_from_slice(payload);
                self.partial = Some(opcode);
                Ok(Assembled::Partial)
            }
            (OpCode::Continuation, None) => Err(ReassemblyError::StrayContinuation),
            (OpCode::Continuation, Some(first)) => {
                if self.buf.len() + payload.len() > self.max {
                    self.partial = None;
                    self.buf = Vec::new();
                    return Err(ReassemblyError::TooBig(self.max));
                }
                self.buf.extend_from_slice(payload);
                if !fin {
                    return Ok(Assembled::Partial);
                }
                self.partial = None;
                Ok(Assembled::Message(first, &self.buf))
            }
            (control, _) => Ok(Assembled::Message(control, payload)),
        }
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

#[cfg(test)]
mod tests {
    #[test]
    fn retry_after_in_seconds_or_as_a_date_by_the_servers_own_clock() {
        use std::time::{Duration, SystemTime};
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = hyper::HeaderMap::new();
            for (name, value) in pairs {
                h.insert(*name, value.parse().unwrap());
            }
            h
        };
        let now = httpdate::parse_http_date("Thu, 03 Dec 2026 10:00:00 GMT").unwrap();
        let after = |pairs: &[(&'static str, &str)]| super::retry_after(&headers(pairs), now);
        assert_eq!(after(&[]), None);
        assert_eq!(after(&[("retry-after", " 120 ")]), Some(Duration::from_secs(120)));
        assert_eq!(after(&[("retry-after", "0")]), Some(Duration::ZERO));
        assert_eq!(after(&[("retry-after", "99999999999999999999999")]), Some(Duration::MAX));
        for junk in ["", "-5", "+5", "1.5", "soon", "5 seconds"] {
            assert_eq!(after(&[("retry-after", junk)]), None, "{junk:?}");
        }
        // A date: from this clock, or from the server's own `Date` (its clock ten minutes
        // ahead of this one: the wait it meant is 90 s, not ten minutes and a half).
        assert_eq!(after(&[("retry-after", "Thu, 03 Dec 2026 10:01:30 GMT")]), Some(Duration::from_secs(90)));
        let skewed = [("retry-after", "Thu, 03 Dec 2026 10:11:30 GMT"), ("date", "Thu, 03 Dec 2026 10:10:00 GMT")];
        assert_eq!(after(&skewed), Some(Duration::from_secs(90)));
        // The obsolete date forms HTTP still accepts.
        assert_eq!(after(&[("retry-after", "Thursday, 03-Dec-26 10:00:30 GMT")]), Some(Duration::from_secs(30)));
        assert_eq!(after(&[("retry-after", "Thu Dec  3 10:00:30 2026")]), Some(Duration::from_secs(30)));
        // Already past: no wait. A `Date` that is not one: this clock.
        assert_eq!(after(&[("retry-after", "Thu, 03 Dec 2026 09:00:00 GMT")]), Some(Duration::ZERO));
        let bad_date = [("retry-after", "Thu, 03 Dec 2026 10:00:10 GMT"), ("date", "yesterday")];
        assert_eq!(after(&bad_date), Some(Duration::from_secs(10)));
        assert_eq!(
            super::retry_after(&headers(&[("retry-after", "3")]), SystemTime::UNIX_EPOCH),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn other_requests_to_the_server_carry_the_urls_query() {
        let u = super::WsUrl::parse_with_path("wss://h.example/subscribe?token=t1&x=2", "/subscribe").unwrap();
        assert_eq!(u.at("/dictionary"), "/dictionary?token=t1&x=2");
        let plain = super::WsUrl::parse_with_path("wss://h.example", "/subscribe").unwrap();
        assert_eq!(plain.at("/status"), "/status");
        // Shown (logs, errors, `/ready`) without the query, which may be a secret.
        assert_eq!(u.to_string(), "wss://h.example/subscribe");
        assert_eq!(u.target(Some(5)), "/subscribe?token=t1&x=2&cursor=5");
    }

    use super::*;

    /// An address that never answers does not hold the connect: the next one is tried after
    /// the delay, families in turn; a failing one passes on at once; the last error is said.
    #[tokio::test(start_paused = true)]
    async fn connects_go_on_to_the_next_address_when_one_does_not_answer() {
        use std::net::SocketAddr;
        let (dead6, dead4, live6, live4): (SocketAddr, SocketAddr, SocketAddr, SocketAddr) = (
            "[2001:db8::1]:443".parse().unwrap(),
            "192.0.2.1:443".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
            "192.0.2.2:443".parse().unwrap(),
        );
        let tried = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connect = |tried: Arc<std::sync::Mutex<Vec<SocketAddr>>>| {
            move |a: SocketAddr| {
                tried.lock().unwrap().push(a);
                async move {
                    match a {
                        a if a == live6 || a == live4 => Ok(a),
                        a if a.port() == 1 => Err(std::io::Error::other(format!("refused by {a}"))),
                        _ => std::future::pending().await,
                    }
                }
            }
        };
        let started = tokio::time::Instant::now();
        let got = connect_any(vec![dead6, live6, dead4, live4], connect(tried.clone())).await.unwrap();
        // IPv6 first (the first address's family), then IPv4: the dead IPv6 and dead IPv4
        // addresses each had their delay, then the live IPv6 one answered.
        assert_eq!(got, live6);
        assert_eq!(*tried.lock().unwrap(), [dead6, dead4, live6]);
        assert_eq!(started.elapsed(), 2 * NEXT_ADDRESS_AFTER);
        // Refusals pass on at once; when every address failed, the last error.
        let refused: Vec<SocketAddr> = vec!["192.0.2.3:1".parse().unwrap(), "192.0.2.4:1".parse().unwrap()];
        let started = tokio::time::Instant::now();
        let e = connect_any(refused, connect(Arc::default())).await.unwrap_err();
        assert_eq!(
            (e.to_string(), started.elapsed()),
            ("refused by 192.0.2.4:1".to_string(), std::time::Duration::ZERO)
        );
        assert_eq!(
            connect_any(vec![], connect(Arc::default())).await.unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }

    #[test]
    fn fragments_are_put_together_within_the_cap_and_the_peers_mistakes_are_errors() {
        use fastwebsockets::OpCode::{Binary, Close, Continuation, Ping, Text};
        let mut r = Reassembler::new(10);
        // Unfragmented: the frame's own payload, even at the cap (the transport bounds frames).
        assert_eq!(r.push(Binary, true, b"whole"), Ok(Assembled::Message(Binary, &b"whole"[..])));
        // Fragments, with a ping between them.
        assert_eq!(r.push(Text, false, b"abc"), Ok(Assembled::Partial));
        assert_eq!(r.push(Ping, true, b"p"), Ok(Assembled::Message(Ping, &b"p"[..])));
        assert_eq!(r.push(Continuation, false, b"def"), Ok(Assembled::Partial));
        assert_eq!(r.push(Continuation, true, b"ghij"), Ok(Assembled::Message(Text, &b"abcdefghij"[..])));
        // One byte over the cap, however it is split.
        assert_eq!(r.push(Binary, false, b"0123456789a"), Err(ReassemblyError::TooBig(10)));
        assert_eq!(r.push(Binary, false, b"01234"), Ok(Assembled::Partial));
        assert_eq!(r.push(Continuation, false, b"56789"), Ok(Assembled::Partial));
        assert_eq!(r.push(Continuation, false, b"a"), Err(ReassemblyError::TooBig(10)));
        // After an error nothing is in progress.
        assert_eq!(r.push(Continuation, true, b"x"), Err(ReassemblyError::StrayContinuation));
        assert_eq!(r.push(Binary, false, b"1"), Ok(Assembled::Partial));
        assert_eq!(r.push(Text, true, b"2"), Err(ReassemblyError::Interleaved));
        assert_eq!(r.push(Close, true, b""), Ok(Assembled::Message(Close, &b""[..])));
        // A large message's buffer goes with the next frame, whatever it is.
        let mut r = Reassembler::new(4 << 20);
        let big = vec![7u8; 3 << 20];
        assert_eq!(r.push(Binary, false, &big), Ok(Assembled::Partial));
        assert!(
            matches!(r.push(Continuation, true, b"!"), Ok(Assembled::Message(Binary, m)) if m.len() == big.len() + 1)
        );
        assert!(r.buf.capacity() > Reassembler::KEEP_CAPACITY);
        assert_eq!(r.push(Binary, true, b"small"), Ok(Assembled::Message(Binary, &b"small"[..])));
        assert_eq!(r.buf.capacity(), 0);
    }

    #[test]
    fn a_refusals_body_is_shown_as_one_short_printable_line() {
        assert_eq!(refusal_text(b""), "");
        assert_eq!(refusal_text(b"  invalid DID:\r\n\tdid:bad\n"), "invalid DID: did:bad");
        assert_eq!(refusal_text(b"a\x1b[31mb\x00c \xff d"), "a [31mb c \u{fffd} d");
        assert_eq!(refusal_text("a\u{202e}b\u{200b}c\u{feff}\u{e0041}d\u{ad}".as_bytes()), "a b c d");
        // A secret is left out before the cut: none of it is shown, even across the cut.
        let quoted = format!("{}token s3cret-t0ken", "x".repeat(REFUSAL_TEXT_CHARS - 9));
        let secret = ["s3cret-t0ken".to_string()];
        let shown = refusal_text_without(quoted.as_bytes(), &secret, false);
        assert!(!shown.contains("s3c") && shown.ends_with("token …"), "{shown}");
        // Nor its start, where the read stopped (the rest of the body not read).
        let shown = refusal_text_without(b"bad token s3cret-t", &secret, true);
        assert_eq!(shown, "bad token …");
        assert_eq!(refusal_text_without(b"bad token s3cret-t", &secret, false), "bad token s3cret-t");
        assert_eq!(refusal_text_without(b"bad token x", &secret, true), "bad token x");
        // As written in the URL, and percent-decoded.
        let url =
            WsUrl::parse("ws://h/subscribe?token=a%2Fb+c%3D&key=abc&wantedDids=did:plc:abcd&x=%FF%FE%FD%FC").unwrap();
        assert_eq!(secrets(&url), ["a%2Fb+c%3D", "a/b c=", "a/b+c=", "%FF%FE%FD%FC"]);
        // A non-ASCII secret cut inside a character.
        let secret = ["pässwörd".to_string()];
        let cut = &"bad pässwörd".as_bytes()[..6];
        assert_eq!(refusal_text_without(cut, &secret, true), "bad …");
        let xrpc = br#"{"error":"InvalidRequest","message":"invalid DID:\n did:bad"}"#;
        assert_eq!(refusal_text(xrpc), "InvalidRequest: invalid DID: did:bad");
        assert_eq!(refusal_text(br#"{"error":"RateLimitExceeded"}"#), "RateLimitExceeded");
        assert_eq!(refusal_text(br#"{"message":"m"}"#), r#"{"message":"m"}"#);
        let long = "é".repeat(REFUSAL_TEXT_CHARS + 1);
        assert_eq!(refusal_text(long.as_bytes()), format!("{}…", "é".repeat(REFUSAL_TEXT_CHARS)));
        assert_eq!(refusal_text("é".repeat(REFUSAL_TEXT_CHARS).as_bytes()), "é".repeat(REFUSAL_TEXT_CHARS));
    }

    #[test]
    fn relay_urls() {
        let u = WsUrl::parse("wss://bsky.network").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (true, "bsky.network", 443));
        assert_eq!(u.target(Some(5)), "/xrpc/com.atproto.sync.subscribeRepos?cursor=5");
        let u = WsUrl::parse("ws://127.0.0.1:7001/xrpc/com.atproto.sync.subscribeRepos?cursor=9&x=1").unwrap();
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "127.0.0.1", 7001));
        assert_eq!(u.target(None), "/xrpc/com.atproto.sync.subscribeRepos?x=1");
        assert_eq!(u.host_header(), "127.0.0.1:7001");
        assert!(WsUrl::parse("http://x").is_err());
        // Credentials in the authority are refused, without the URL in the error; a fragment
        // is not sent.
        for with_credentials in ["wss://tok@h.example", "wss://user:s3cret@h.example/x"] {
            let e = WsUrl::parse(with_credentials).unwrap_err().to_string();
            assert!(e.contains("credentials") && !e.contains("s3cret") && !e.contains("tok@"), "{e}");
        }
        let u = WsUrl::parse("wss://h.example/?x=1#part").unwrap();
        assert_eq!(
            (u.host.as_str(), u.target(None)),
            ("h.example", "/xrpc/com.atproto.sync.subscribeRepos?x=1".into())
        );
    }

    #[test]
    fn ipv6_literals_and_one_canonical_spelling() {
        let u = WsUrl::parse("ws://[::1]").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 80));
        assert_eq!(u.host_header(), "[::1]");
        let u = WsUrl::parse("wss://[2001:db8::7]:7443/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[2001:db8::7]", 7443));
        assert_eq!(u.host_header(), "[2001:db8::7]:7443");
        assert!(WsUrl::parse("ws://[::1").is_err());
        assert!(WsUrl::parse("ws://[nope]").is_err());
        let same = [
            "wss://bsky.network",
            "wss://bsky.network/",
            "wss://BSKY.network:443",
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos?cursor=5",
            "wss://bsky.network/?token=secret",
        ];
        let canon: Vec<String> = same.iter().map(|u| WsUrl::parse(u).unwrap().canonical()).collect();
        assert!(canon.iter().all(|c| c == "wss://bsky.network:443/xrpc/com.atproto.sync.subscribeRepos"), "{canon:?}");
        assert_ne!(WsUrl::parse("ws://bsky.network").unwrap().canonical(), canon[0]);
    }

    /// A URL that does not parse is shown without its query: it may hold an access token.
    #[test]
    fn a_bad_urls_error_does_not_show_its_query() {
        for bad in ["wss://h:x/?token=secret", "ftp://h/?token=secret", "ws://[::1/?token=secret", "ws://?token=secret"]
        {
            let e = WsUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_an_error_before_it_is_all_read() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = c.read(&mut head).await.unwrap();
            let body = vec![b'x'; 32 << 20];
            c.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes()).await.unwrap();
            // How much the client took before it stopped reading.
            let mut sent = 0;
            for chunk in body.chunks(16 << 10) {
                if c.write_all(chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        });
        let url = WsUrl::parse(&format!("ws://{addr}")).unwrap();
        let got = http_get_at_most(&url, "/", std::time::Duration::from_secs(5), 64 << 10).await;
        assert!(matches!(&got, Err(ClientError::Http(m)) if m.contains("length limit")), "{got:?}");
        let sent = served.await.unwrap();
        assert!(sent < 16 << 20, "the client read {sent} bytes of a 32 MiB body (socket buffers aside)");
    }

    #[test]
    fn only_public_addresses_are_public() {
        let public = ["1.1.1.1", "8.8.8.8", "2606:4700::1111", "::ffff:1.1.1.1", "64:ff9b::101:101", "2002:101:101::1"];
        for a in public {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
        let not = [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "::127.0.0.1",
            "fec0::1",
            "64:ff9b:1::1",
            "2002:a00:1::1",
            "2002:7f00:1::1",
        ];
        for a in not {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[tokio::test]
    async fn a_name_without_a_public_address_is_refused_before_connecting() {
        // A listener on loopback: a connection to it would be accepted.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        for host in ["localhost", "127.0.0.1"] {
            let url = WsUrl::parse(&format!("ws://{host}:{port}")).unwrap();
            let got = http_get_public(&url, "/", std::time::Duration::from_secs(5), 1 << 16).await;
            assert!(matches!(&got, Err(ClientError::NotPublic(_))), "{host}: {got:?}");
        }
        let accepted = tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "a connection was made");
    }
}
