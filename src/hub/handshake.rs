//! `GET /subscribe` before the upgrade: the query becomes options (or a 400 with v1's text),
//! the request must be a websocket upgrade, admission decides (503 / 429), and only then is
//! the connection upgraded and handed to a session.

use super::limits::{client_ip, Refused};
use super::{session, Hub};
use crate::options::{OptionsError, SubscribeOptions};
use crate::response::{text, Body};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;

pub use crate::metrics::Refusal;

fn refuse(hub: &Hub, why: Refusal, status: StatusCode, body: impl Into<bytes::Bytes>) -> Response<Body> {
    hub.metrics.rejected_requests.with_label_values(&[why.as_str()]).inc();
    text(status, body)
}

/// `GET /subscribe`: validate everything, then upgrade.
pub async fn subscribe(hub: Arc<Hub>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let opts = match SubscribeOptions::from_query(req.uri().query().unwrap_or(""), header("socket-encoding").as_deref())
    {
        Ok(o) => o,
        Err(OptionsError(reason)) => return refuse(&hub, Refusal::BadRequest, StatusCode::BAD_REQUEST, reason),
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
    if hub.shutdown.is_cancelled() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n");
    }
    let ip = client_ip(peer, header("x-forwarded-for").as_deref(), &hub.limits.trusted_proxies);
    let slot = match hub.admission.admit(ip) {
        Ok(s) => s,
        Err(Refused::TooManySubscribers) => {
            return refuse(
                &hub,
                Refusal::TooManySubscribers,
                StatusCode::SERVICE_UNAVAILABLE,
                "too many subscribers; try another instance or later\n",
            )
        }
        Err(Refused::TooManyFromIp) => {
            return refuse(
                &hub,
                Refusal::TooManyFromIp,
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address\n",
            )
        }
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("bad websocket handshake: {e}\n")),
    };
    let task_hub = hub.clone();
    hub.tasks.spawn(async move {
        match upgrade.await {
            Ok(ws) => session::run(task_hub, ws, opts, dictionary, slot).await,
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    response.map(|b| b.boxed())
}
