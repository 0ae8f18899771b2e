//! What a request asks, read alike by the server's routes and the hub's handshake: its query,
//! which may have been set aside before hyper parsed the request line (`server::long_target`
//! reads lines longer than hyper takes).

use std::sync::Arc;

/// The query hyper sees in place of one set aside.
pub const LONG_QUERY_MARKER: &str = "contrail-long-query";

/// A query too long for hyper, set aside for the handler (in the request's extensions, as an
/// `Arc`); `budget` is given back when it is dropped, with the request.
pub struct LongQuery {
    query: String,
    _budget: Box<dyn Send + Sync>,
}

impl LongQuery {
    pub fn new(query: String, budget: impl Send + Sync + 'static) -> LongQuery {
        LongQuery { query, _budget: Box::new(budget) }
    }

    pub fn as_str(&self) -> &str {
        &self.query
    }
}

/// A request's query: one set aside before hyper, or the URI's.
pub fn query<B>(req: &hyper::Request<B>) -> &str {
    match req.extensions().get::<Arc<LongQuery>>() {
        Some(q) if req.uri().query() == Some(LONG_QUERY_MARKER) => q.as_str(),
        _ => req.uri().query().unwrap_or(""),
    }
}
