//! Plain HTTP responses (the body type, a full body, a text body): shared by the server's
//! routes and the hub's handshake, which refuses requests before any upgrade.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use std::convert::Infallible;

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed())
        .expect("static response parts are valid")
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", body)
}
