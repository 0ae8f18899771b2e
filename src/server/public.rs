//! Routes of the public listener: `/subscribe` (handed to the hub), `/health`, `/ready`,
//! `/status`, and `GET /` (the status page). Open CORS for GETs, as Jetstream v1.

use super::{full, text, Body};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::source::Readiness;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the public routes read.
pub struct Public {
    /// The last hour, for the status page.
    pub history: Arc<super::history::History>,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// The relay read (primary), for `/status`.
    pub relay_url: Option<String>,
    /// The upstream in use (replica).
    pub upstream: Option<Arc<Mutex<String>>>,
    /// Whether the relay or an upstream has been reached, and if not, why.
    pub readiness: Arc<Readiness>,
    pub retention: std::time::Duration,
    /// `--verify`, `--on-verify-failure`, `--on-resolve-failure`.
    pub verify: (crate::verify::VerifyMode, crate::verify::OnFailure, crate::verify::OnFailure),
    pub started: Instant,
}

pub fn handler(
    shared: Arc<Public>,
) -> impl Fn(Request<Incoming>, SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>
       + Clone {
    move |req, peer| {
        let shared = shared.clone();
        Box::pin(async move {
            let mut resp = route(shared, req, peer).await;
            let h = resp.headers_mut();
            h.insert("access-control-allow-origin", hyper::header::HeaderValue::from_static("*"));
            h.insert("access-control-allow-methods", hyper::header::HeaderValue::from_static("GET, HEAD, OPTIONS"));
            resp
        })
    }
}

async fn route(shared: Arc<Public>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    if req.method() == Method::OPTIONS {
        return text(StatusCode::NO_CONTENT, "");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD, OPTIONS"));
        return r;
    }
    match req.uri().path() {
        "/subscribe" => crate::hub::handshake::subscribe(shared.hub.clone(), req, peer).await,
        "/xrpc/network.bsky.jetstream.subscribeEvents" => {
            crate::hub::handshake::subscribe_events(shared.hub.clone(), req, peer).await
        }
        "/xrpc/network.bsky.jetstream.getZstdDictionary" => get_zstd_dictionary(&shared, &req),
        "/health" => text(StatusCode::OK, "ok\n"),
        "/ready" => match shared.readiness.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/status" => full(StatusCode::OK, "application/json", status_json(&shared).to_string()),
        "/status/history" => full(StatusCode::OK, "application/json", shared.history.samples_json()),
        "/" => full(StatusCode::OK, "text/html; charset=utf-8", super::status_page::PAGE),
        "/dictionary" => {
            // `?id=N` for a given one; without it, the default (what compress=true uses).
            let ids = &shared.hub.dictionaries;
            let wanted = crate::options::query_pairs(crate::request::query(&req))
                .into_iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.parse::<u32>().ok());
            let dict = match wanted {
                None => ids.default(),
                Some(None) => return text(StatusCode::BAD_REQUEST, "id must be a zstd dictionary id (an integer)\n"),
                Some(Some(id)) => match ids.by_id(id) {
                    Some(d) => d,
                    None => {
                        return text(
                            StatusCode::NOT_FOUND,
                            format!("no such dictionary; this server has {}\n", ids.ids()),
                        )
                    }
                },
            };
            let mut r = full(StatusCode::OK, "application/octet-stream", dict.raw.clone());
            let id = dict.id.to_string();
            r.headers_mut().insert("x-zstd-dictionary-id", hyper::header::HeaderValue::from_str(&id).expect("digits"));
            r
        }
        // v2's other methods (`planSnapshot` and the archive's): the XRPC answer for a method
        // this server does not have, so a v2 client's backfill stops with a named error.
        p if p.starts_with("/xrpc/") => {
            let e = crate::v2::XrpcError {
                status: 501,
                name: "MethodNotImplemented",
                message: crate::response::brief(format!("{} is not implemented by this server", &p["/xrpc/".len()..])),
            };
            full(StatusCode::NOT_IMPLEMENTED, "application/json", e.body())
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// v2's `getZstdDictionary[?id=N]`: the current v2 dictionary, or the one named; errors in
/// the XRPC envelope.
fn get_zstd_dictionary(shared: &Public, req: &Request<Incoming>) -> Response<Body> {
    let dicts = &shared.hub.dictionaries;
    let xrpc = |status: StatusCode, name: &'static str, message: String| {
        let e = contrail_core::v2::XrpcError { status: status.as_u16(), name, message };
        full(status, "application/json", e.body())
    };
    let wanted = crate::options::query_pairs(crate::request::query(req)).into_iter().find(|(k, _)| k == "id");
    let named = wanted.is_some();
    let dict = match wanted {
        None => dicts.v2_current(),
        Some((_, v)) => {
            let Ok(id) = v.parse::<i64>() else {
                return xrpc(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequest",
                    "id must be an integer zstd dictionary ID".into(),
                );
            };
            // v2 serves its current dictionary only.
            match u32::try_from(id).ok().filter(|&id| id == dicts.v2_current().id).and_then(|id| dicts.by_id(id)) {
                Some(d) => d,
                None => {
                    let current = dicts.v2_current().id;
                    let message = format!("no dictionary with id {id}; current dictionary id is {current}");
                    return xrpc(StatusCode::NOT_FOUND, "DictionaryNotFound", message);
                }
            }
        }
    };
    let mut r = full(StatusCode::OK, "application/octet-stream", dict.raw.clone());
    let id = dict.id.to_string();
    let h = r.headers_mut();
    h.insert("x-zstd-dictionary-id", hyper::header::HeaderValue::from_str(&id).expect("digits"));
    // A dictionary asked for by id is immutable; "the current one" may change with the
    // server's configuration.
    let cache = if named { "public, max-age=31536000, immutable" } else { "public, max-age=300" };
    h.insert("cache-control", hyper::header::HeaderValue::from_static(cache));
    // The content's checksum too: an operator's file may replace a built-in one of the same id.
    let etag = format!("\"zstd-dict-{id}-{:08x}\"", dict.fingerprint);
    h.insert("etag", hyper::header::HeaderValue::from_str(&etag).expect("ascii"));
    r
}

/// What `--verify` checks and what it found (from the metrics).
fn verification_json(shared: &Public) -> serde_json::Value {
    let m = &shared.metrics;
    let (mode, on_failure, on_resolve_failure) = shared.verify;
    let by = |v: &prometheus::IntCounterVec, labels: &[&str]| -> serde_json::Map<String, serde_json::Value> {
        labels.iter().map(|l| (l.to_string(), v.with_label_values(&[l]).get().into())).collect()
    };
    let outcomes: Vec<&str> = crate::metrics::Outcome::ALL.iter().map(|o| o.as_str()).collect();
    let reasons: Vec<&str> = contrail_core::verify::Reason::ALL.iter().map(|r| r.as_str()).collect();
    serde_json::json!({
        "mode": mode,
        "on_verify_failure": on_failure,
        "on_resolve_failure": on_resolve_failure,
        "commits": by(&m.verify_commits, &outcomes),
        "failures": by(&m.verify_failures, &reasons),
        "dropped_events": m.verify_dropped_events.get(),
        "desynchronized": m.verify_desynchronized.get(),
        "did_cache_entries": m.did_cache_entries.get(),
    })
}

/// A URL as `/status` shows it: without its user info, query or fragment, where an operator's
/// token for a private relay or upstream would be.
fn shown_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    format!("{scheme}://{host}{path}")
}

/// The figures of `/status` (and the status page).
pub fn status_json(shared: &Public) -> serde_json::Value {
    let m = &shared.metrics;
    let tip = &shared.hub.tip;
    let events = m.events_ingested_total();
    let subscribers = shared.hub.admission.connected();
    let upstream = shared.upstream.as_ref().map(|u| u.lock().unwrap_or_else(|p| p.into_inner()).clone());
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        // What a replica of this server measures its lag by: a primary's clock, which stamped
        // the events; a replica's reading of its own upstream's (down a chain, the primary's).
        "now_us": m.upstream_now_us(),
        "role": if upstream.is_some() { "replica" } else { "primary" },
        "upstream": upstream.as_deref().map(shown_url),
        "replication_lag_seconds": m.replication_lag(),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "relay": {
            "url": shared.relay_url.as_deref().map(shown_url),
            "connected": m.relay_connected.get() == 1,
            "seq": m.relay_last_seq.get(),
            "lag_seconds": m.relay_lag(),
            "reconnects": m.relay_reconnects.get(),
        },
        "ingest": {
            "events_total": events,
            "events_per_second": events as f64 / shared.started.elapsed().as_secs_f64().max(1.0),
        },
        "log": {
            "oldest_time_us": tip.oldest().unwrap_or(0),
            "newest_time_us": tip.newest().unwrap_or(0),
            "disk_bytes": tip.bytes(),
            "retention_seconds": shared.retention.as_secs(),
            "holes": tip.holes().count(),
        },
        "subscribers": subscribers,
        "subscribers_by_wire": crate::metrics::Wire::ALL.iter().map(|w| {
            let by_compression: serde_json::Map<String, serde_json::Value> = crate::metrics::Compression::ALL
                .iter()
                .map(|c| (c.as_str().to_string(), m.subscribers.with_label_values(&[w.as_str(), c.as_str()]).get().into()))
                .collect();
            (w.as_str().to_string(), serde_json::Value::Object(by_compression))
        }).collect::<serde_json::Map<_, _>>(),
        "ready": shared.readiness.is_ready(),
        "not_ready_reason": shared.readiness.not_ready_reason(),
        "verification": verification_json(shared),
        "mix": shared.history.mix_json(),
        "catchup": shared.history.catchup_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::shown_url;

    #[test]
    fn status_shows_urls_without_their_secrets() {
        assert_eq!(shown_url("wss://bsky.network"), "wss://bsky.network");
        assert_eq!(shown_url("wss://relay.example/xrpc/x?token=secret#f"), "wss://relay.example/xrpc/x");
        assert_eq!(shown_url("ws://user:pw@10.0.0.1:6008/"), "ws://10.0.0.1:6008/");
        assert_eq!(shown_url("ws://[::1]:6008?k=v"), "ws://[::1]:6008");
    }
}
