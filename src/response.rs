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

/// The most of a refusal's reason that is sent back. A reason may quote the value refused, and
/// a request line may be up to 1 MiB long ([`crate::server::long_target`]): quoted whole, an
/// answer to a client that does not read it would hold that much for as long as its connection
/// lasts, outside the budget the request line was held in.
pub const MAX_REASON_BYTES: usize = 512;

/// `reason`, cut to [`MAX_REASON_BYTES`] (at a character's boundary) with the size left out
/// said.
pub fn brief(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let left_out = reason.len() - cut;
        let newline = reason.ends_with('\n');
        reason.truncate(cut);
        reason.push_str(&format!("… ({left_out} more bytes)"));
        if newline {
            reason.push('\n');
        }
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        assert_eq!(brief("invalid DID: x\n".into()), "invalid DID: x\n");
        let long = format!("invalid DID: {}\n", "é".repeat(1 << 19));
        let cut = brief(long.clone());
        assert!(cut.len() < MAX_REASON_BYTES + 32, "{} bytes", cut.len());
        assert!(cut.starts_with("invalid DID: éé") && cut.ends_with(" more bytes)\n"), "{cut:?}");
        let kept = cut.split('…').next().unwrap().len();
        assert!(cut.contains(&format!("({} more bytes)", long.len() - kept)), "{cut:?}");
    }
}
