//! Routes of the public listener: `/subscribe` (handed to the hub), `/health`, `/ready`,
//! `/status`, and `GET /` (the status page). Open CORS for GETs, as Jetstream v1.

use crate::app::Shared;
use crate::server::{full, text, Body};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn handler(
    shared: Arc<Shared>,
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

async fn route(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    if req.method() == Method::OPTIONS {
        return text(StatusCode::NO_CONTENT, "");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/subscribe" => crate::hub::subscribe(shared, req, peer).await,
        "/health" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            if shared.relay_reached.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: the relay has not been reached yet\n")
            }
        }
        "/status" => full(StatusCode::OK, "application/json", status_json(&shared).to_string()),
        "/" => full(StatusCode::OK, "text/html; charset=utf-8", crate::status_page::PAGE),
        "/dictionary" => {
            let mut r = full(StatusCode::OK, "application/octet-stream", shared.hub.dictionary.raw.clone());
            let id = shared.hub.dictionary.id.to_string();
            r.headers_mut().insert("x-zstd-dictionary-id", hyper::header::HeaderValue::from_str(&id).expect("digits"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The figures of `/status` (and the status page).
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let m = &shared.metrics;
    let events: u64 =
        ["commit", "identity", "account"].iter().map(|k| m.events_ingested.with_label_values(&[k]).get()).sum();
    let subscribers = shared.hub.admission.connected();
    let upstream = shared.upstream.as_ref().map(|u| u.lock().unwrap_or_else(|p| p.into_inner()).clone());
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "role": if upstream.is_some() { "replica" } else { "primary" },
        "upstream": upstream,
        "replication_lag_seconds": m.replication_lag_seconds.get(),
        "uptime_seconds": shared.started.elapsed().as_secs(),
        "relay": {
            "url": if shared.upstream.is_some() { None } else { Some(&shared.config.relay_url) },
            "connected": m.relay_connected.get() == 1,
            "seq": m.relay_last_seq.get(),
            "lag_seconds": m.relay_lag_seconds.get(),
            "reconnects": m.relay_reconnects.get(),
        },
        "ingest": {
            "events_total": events,
            "events_per_second": events as f64 / shared.started.elapsed().as_secs_f64().max(1.0),
        },
        "log": {
            "oldest_time_us": m.store_oldest_time_us.get(),
            "newest_time_us": m.store_newest_time_us.get(),
            "disk_bytes": m.store_disk_bytes.get(),
            "retention_seconds": shared.config.retention.as_secs(),
        },
        "subscribers": subscribers,
    })
}
