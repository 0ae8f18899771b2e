//! `GET /subscribe` before the upgrade: the query becomes options (or a 400 with v1's text),
//! the request must be a websocket upgrade, admission decides (503 / 429, and 503 when the
//! filter does not fit the filters' memory budget), and only then is the connection upgraded
//! and handed to a session.

use super::limits::{client_ip, Refused};
use super::session::{self, Subscription};
use super::stream::Start;
use super::Hub;
use crate::metrics::Wire;
use crate::options::{OptionsError, SubscribeOptions};
use crate::response::full;
use crate::response::{text, Body};
use contrail_core::v2::{self, V2Options, XrpcError};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;

pub use crate::metrics::Refusal;

/// The header of an upgrade without a cursor (live) that holds a cursor resuming from the
/// subscription's start (shared with the client crate, which reads it).
pub use contrail_client::transport::START_CURSOR_HEADER;

/// [`START_CURSOR_HEADER`]'s value now: the log's newest `time_us` plus one; on an empty log,
/// `empty`, the lowest cursor the wire reads as "from the start" (this log's start: the client
/// uses it on this host only). A client whose connection ends before it received anything
/// reconnects with it and misses nothing, whatever its own clock says (`time_us` follows this
/// server's clock, or its primary's on a replica still catching up). The session starts no
/// earlier: from the tip it reads when it starts, or at the hello with `requireHello`.
fn start_cursor(hub: &Hub, empty: u64) -> hyper::header::HeaderValue {
    hyper::header::HeaderValue::from(hub.tip.newest().map_or(empty, |t| t + 1))
}

/// A header's value as text, any byte that is not UTF-8 replaced (`Socket-Encoding: zstd\xff`
/// still asks for zstd, as Jetstream's substring test reads it).
fn header_text(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// What is wrong with a websocket upgrade request, if anything: its status and why. Asked
/// before admission, so that a client's mistake is named (not a full server's 503 or a 429)
/// and takes no slot, not even for a moment. A handshake is a GET over HTTP/1.1 or later,
/// with a key of 16 bytes in base64 and version 13 (RFC 6455 4.1, 4.2.1), which is what
/// Jetstream's websocket library checks too.
fn handshake_problem(req: &Request<Incoming>) -> Option<(StatusCode, &'static str)> {
    if req.method() != hyper::Method::GET {
        return Some((StatusCode::METHOD_NOT_ALLOWED, "the request method is not GET"));
    }
    if req.version() < hyper::Version::HTTP_11 {
        return Some((StatusCode::BAD_REQUEST, "a websocket upgrade needs HTTP/1.1 or later"));
    }
    let headers = req.headers();
    match headers.get("sec-websocket-key") {
        None => return Some((StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key")),
        Some(key) if !is_websocket_key(key.as_bytes()) => {
            return Some((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is not 16 bytes in base64"));
        }
        Some(_) => {}
    }
    match headers.get("sec-websocket-version") {
        None => Some((StatusCode::BAD_REQUEST, "no Sec-WebSocket-Version")),
        Some(v) if v.as_bytes() == b"13" => None,
        // Another version: 426 and the one spoken here (RFC 6455 4.4), so a client that can,
        // tries it.
        Some(_) => Some((StatusCode::UPGRADE_REQUIRED, "Sec-WebSocket-Version is not 13, the one spoken here")),
    }
}

/// Whether `key` is 16 bytes in base64: 22 characters of its alphabet and `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let key = key.trim_ascii();
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// [`handshake_problem`]'s answer in a wire's words (`bad_handshake`), counted.
fn bad_handshake(hub: &Hub, status: StatusCode, why: &str, words: fn(String) -> Response<Body>) -> Response<Body> {
    use hyper::header::{HeaderValue, ALLOW, UPGRADE};
    hub.metrics.rejected_requests.with_label_values(&[Refusal::BadRequest.as_str()]).inc();
    let mut response = words(why.to_string());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    match status {
        StatusCode::UPGRADE_REQUIRED => {
            headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            headers.insert(ALLOW, HeaderValue::from_static("GET"));
        }
        _ => {}
    }
    response
}

fn refuse(hub: &Hub, why: Refusal, status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    hub.metrics.rejected_requests.with_label_values(&[why.as_str()]).inc();
    text(status, body)
}

/// `GET /subscribe`: validate everything, then upgrade.
pub async fn subscribe(hub: Arc<Hub>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let header = |name: &str| header_text(&req, name);
    let opts = match SubscribeOptions::from_query(crate::request::query(&req), header("socket-encoding").as_deref()) {
        Ok(o) => o,
        Err(OptionsError(reason)) => {
            return refuse(&hub, Refusal::BadRequest, StatusCode::BAD_REQUEST, crate::response::brief(reason));
        }
    };
    // The dictionary: the one named, or the default for compress=true.
    let dictionary = match (opts.compress, opts.zstd_dictionary) {
        (_, Some(id)) => match hub.dictionaries.by_id(id) {
            Some(d) => Some(d.clone()),
            None => {
                let body = format!("unknown zstdDictionary {id}: this server has {}\n", hub.dictionaries.ids());
                return refuse(&hub, Refusal::BadRequest, StatusCode::BAD_REQUEST, body);
            }
        },
        (true, None) => Some(hub.dictionaries.default().clone()),
        (false, None) => None,
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return refuse(
            &hub,
            Refusal::NotWebsocket,
            StatusCode::BAD_REQUEST,
            "websocket upgrade required: connect to /subscribe with a websocket client\n",
        );
    }
    let refusals = Refusals {
        shutting_down: || text(StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n"),
        too_many: || text(StatusCode::SERVICE_UNAVAILABLE, "too many subscribers; try another instance or later\n"),
        from_ip: || text(StatusCode::TOO_MANY_REQUESTS, "too many connections from this address\n"),
        from_site: || text(StatusCode::TOO_MANY_REQUESTS, SITE_TEXT),
        filter_budget: || text(StatusCode::SERVICE_UNAVAILABLE, FILTER_BUDGET_TEXT),
        bad_handshake: |e| text(StatusCode::BAD_REQUEST, format!("bad websocket handshake: {e}\n")),
    };
    // Read before the session can start (it starts from the tip it then reads, or later).
    let start_cursor = opts.cursor.is_none().then(|| start_cursor(&hub, 1));
    let response = admit_and_upgrade(hub, req, peer, Subscription::v1(opts, dictionary), refusals, None);
    with_start_cursor(response, start_cursor)
}

/// Adds [`START_CURSOR_HEADER`] to an upgrade.
fn with_start_cursor(mut response: Response<Body>, start_cursor: Option<hyper::header::HeaderValue>) -> Response<Body> {
    if let (Some(v), StatusCode::SWITCHING_PROTOCOLS) = (start_cursor, response.status()) {
        response.headers_mut().insert(START_CURSOR_HEADER, v);
    }
    response
}

/// What a 503 for a filter over the filters' memory budget says.
const FILTER_BUDGET_TEXT: &str =
    "filter memory budget full: too many wantedDids/wantedCollections held; try another instance or later\n";

/// What a 429 for an IPv6 site past its share says.
const SITE_TEXT: &str = "too many connections from this network (IPv6 /48)\n";

/// The `Retry-After` (seconds) on admission's refusals: a server that is full (or stopping)
/// has room again once others leave (or it is back), which takes longer than a client's own
/// connection coming down. Clients that read it (Contrail's) wait at least that long before
/// asking this server again; they try their other hosts at once.
const RETRY_AFTER_FULL: u32 = 5;
const RETRY_AFTER_PER_CLIENT: u32 = 1;

/// `response` with a `Retry-After` of `secs`.
fn asking_back_after(mut response: Response<Body>, secs: u32) -> Response<Body> {
    response.headers_mut().insert(hyper::header::RETRY_AFTER, secs.into());
    response
}

/// How a wire words the refusals that admission makes.
struct Refusals {
    shutting_down: fn() -> Response<Body>,
    too_many: fn() -> Response<Body>,
    from_ip: fn() -> Response<Body>,
    from_site: fn() -> Response<Body>,
    filter_budget: fn() -> Response<Body>,
    /// An upgrade request that is not a websocket handshake ([`handshake_problem`]); its
    /// status is set after.
    bad_handshake: fn(String) -> Response<Body>,
}

/// Admission (subscriber and per-IP caps, the filters' memory budget), then the upgrade and
/// the session task. The response echoes `subprotocol` when given.
fn admit_and_upgrade(
    hub: Arc<Hub>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    sub: Subscription,
    refusals: Refusals,
    subprotocol: Option<&'static str>,
) -> Response<Body> {
    if let Some((status, why)) = handshake_problem(&req) {
        return bad_handshake(&hub, status, why, refusals.bad_handshake);
    }
    if hub.shutdown.is_cancelled() {
        return asking_back_after((refusals.shutting_down)(), RETRY_AFTER_FULL);
    }
    // Every line, as one list (RFC 9110 §5.3): a proxy that adds a line of its own after the
    // client's (HAProxy's `option forwardfor`) is read from the end of the last one. Entries are
    // decoded one by one: one that is not text (the client's own, on a line a proxy appended to)
    // stops the walk only where it stands, as an entry that is not an address does.
    let forwarded: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|entry| std::str::from_utf8(entry).unwrap_or("?"))
        .collect();
    let forwarded = (!forwarded.is_empty()).then(|| forwarded.join(","));
    let ip = client_ip(peer, forwarded.as_deref(), &hub.limits.trusted_proxies);
    let admitted = hub.admission.admit(ip).and_then(|mut slot| {
        slot.hold_filter(super::dispatch::filter_bytes(&sub.filter))?;
        Ok(slot)
    });
    let slot = match admitted {
        Ok(s) => s,
        Err(refused) => {
            let (why, response, after) = match refused {
                Refused::TooManySubscribers => (Refusal::TooManySubscribers, refusals.too_many, RETRY_AFTER_FULL),
                Refused::TooManyFromIp => (Refusal::TooManyFromIp, refusals.from_ip, RETRY_AFTER_PER_CLIENT),
                Refused::TooManyFromSite => (Refusal::TooManyFromSite, refusals.from_site, RETRY_AFTER_PER_CLIENT),
                Refused::FilterBudget => (Refusal::FilterBudget, refusals.filter_budget, RETRY_AFTER_FULL),
            };
            hub.metrics.rejected_requests.with_label_values(&[why.as_str()]).inc();
            return asking_back_after(response(), after);
        }
    };
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        // (Whatever fastwebsockets refuses, `handshake_problem` found first.)
        Err(e) => return bad_handshake(&hub, StatusCode::BAD_REQUEST, &e.to_string(), refusals.bad_handshake),
    };
    if let Some(p) = subprotocol {
        response.headers_mut().insert("sec-websocket-protocol", hyper::header::HeaderValue::from_static(p));
    }
    let task_hub = hub.clone();
    hub.tasks.spawn(async move {
        match upgrade.await {
            Ok(ws) => session::run(task_hub, ws, sub, slot).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    response.map(|b| b.boxed())
}

/// The v2 wire's subprotocol, echoed when the client offers it.
const XRPC_SUBPROTOCOL: &str = "xrpc.v1.json";

fn xrpc_error(hub: &Hub, why: Refusal, e: &XrpcError) -> Response<Body> {
    hub.metrics.rejected_requests.with_label_values(&[why.as_str()]).inc();
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let e = XrpcError { message: crate::response::brief(e.message.clone()), ..*e };
    full(status, "application/json", e.body())
}

/// `GET /xrpc/network.bsky.jetstream.subscribeEvents`: Jetstream v2's wire (see
/// `contrail_core::v2`), served by the same hub: one cursor walk, the same filters, limits
/// and metrics (`wire="v2"`).
pub async fn subscribe_events(hub: Arc<Hub>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let header = |name: &str| header_text(&req, name);
    let current = hub.dictionaries.v2_current().clone();
    let opts =
        match V2Options::from_query(crate::request::query(&req), header("socket-encoding").as_deref(), current.id) {
            Ok(o) => o,
            Err(e) => return xrpc_error(&hub, Refusal::BadRequest, &e),
        };
    // Only the current dictionary is accepted (checked by `from_query`, as v2 does).
    let dictionary = opts.zstd_dictionary.map(|_| current);
    // The cursor: Contrail's seq is the event's time_us (≥ 10^15, which v2 clients read as a
    // timestamp: the same position). A smaller one is another server's seq, below our floor.
    let tip = &hub.tip;
    let mut preface = Vec::new();
    let live = opts.cursor.is_none();
    let start = match opts.cursor {
        None => Start::Live,
        Some(c) if c < v2::TIMESTAMP_CURSOR_MIN => {
            let floor = tip.oldest().unwrap_or(v2::TIMESTAMP_CURSOR_MIN as u64);
            let e = XrpcError {
                status: 400,
                name: "CursorTooOld",
                message: format!(
                    "subscribe: cursor too old: cursor {c} below lookback floor {floor}; re-backfill from your last seq"
                ),
            };
            return xrpc_error(&hub, Refusal::BadRequest, &e);
        }
        Some(c) => match tip.oldest() {
            Some(oldest) if (c as u64) < oldest => {
                let message = format!("requested timestamp cursor below retention floor; starting at seq {oldest}");
                // The events from the cursor up to the oldest are gone: said as a range too,
                // except for the lowest cursor, "from the start" (as 0 and 1 on v1), and one
                // past the newest event deleted (nothing came in between).
                preface.push(match c == v2::TIMESTAMP_CURSOR_MIN || !tip.deleted_after(c as u64 - 1) {
                    true => v2::info_message("OutdatedCursor", &message),
                    false => v2::outdated_cursor_message(c as u64 - 1, tip.lost_through(c as u64 - 1), &message),
                });
                Start::From(oldest)
            }
            _ => Start::for_cursor(Some(c), tip.newest(), crate::clock::now_us()),
        },
    };
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        return xrpc_error(&hub, Refusal::NotWebsocket, &XrpcError::invalid("websocket upgrade required"));
    }
    // (On any of its lines, as v2 reads it.)
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|p| p.split(',').any(|t| t.trim() == XRPC_SUBPROTOCOL))
        .then_some(XRPC_SUBPROTOCOL);
    let sub = Subscription {
        wire: Wire::V2,
        filter: opts.filter,
        max_message_size: opts.max_message_size,
        dictionary,
        inform_cursor_seconds: None,
        require_hello: false,
        cursor: None,
        start: Some(start),
        preface,
        include_verification: false,
    };
    fn rate_limited(message: &str) -> Response<Body> {
        let e = XrpcError { status: 429, name: "RateLimitExceeded", message: message.into() };
        full(StatusCode::TOO_MANY_REQUESTS, "application/json", e.body())
    }
    fn unavailable(message: &str) -> Response<Body> {
        let e = XrpcError { status: 503, name: "ServiceUnavailable", message: message.into() };
        full(StatusCode::SERVICE_UNAVAILABLE, "application/json", e.body())
    }
    let refusals = Refusals {
        shutting_down: || unavailable("server shutting down"),
        too_many: || unavailable("too many subscribers; try another instance or later"),
        filter_budget: || unavailable(FILTER_BUDGET_TEXT.trim_end()),
        from_ip: || rate_limited("too many connections from this address"),
        from_site: || rate_limited(SITE_TEXT.trim_end()),
        // As every v2 answer before the upgrade: the XRPC envelope.
        bad_handshake: |e| {
            let e = XrpcError::invalid(format!("bad websocket handshake: {e}"));
            full(StatusCode::BAD_REQUEST, "application/json", e.body())
        },
    };
    // (A v2 cursor below 10^15 is refused as another server's seq.)
    let start_cursor = live.then(|| start_cursor(&hub, v2::TIMESTAMP_CURSOR_MIN as u64));
    with_start_cursor(admit_and_upgrade(hub, req, peer, sub, refusals, offered), start_cursor)
}
