//! A websocket client for tests (fastwebsockets, the same crate the server uses; the
//! third-party clients are exercised in `tests/third_party.rs`).

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Empty;
use std::net::SocketAddr;
use std::time::Duration;

pub type Ws = FragmentCollector<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

use contrail::source::wsclient::SpawnExecutor;

/// Opens `ws://addr{path_and_query}` with extra headers.
pub async fn connect(addr: SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> anyhow::Result<Ws> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut req = hyper::Request::builder()
        .method("GET")
        .uri(path_and_query)
        .header("Host", addr.to_string())
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header("Sec-WebSocket-Key", fastwebsockets::handshake::generate_key())
        .header("Sec-WebSocket-Version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req.body(Empty::<Bytes>::new())?, tcp).await?;
    ws.set_max_message_size(64 << 20);
    Ok(FragmentCollector::new(ws))
}

/// A message from the server.
#[derive(Debug, PartialEq)]
pub enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Close(u16, String),
}

/// The next data or close message, or `None` after `timeout` of silence.
pub async fn next(ws: &mut Ws, timeout: Duration) -> Option<Msg> {
    loop {
        let frame = tokio::time::timeout(timeout, ws.read_frame()).await.ok()?;
        let Ok(f) = frame else { return Some(Msg::Close(1006, "connection lost".into())) };
        match f.opcode {
            OpCode::Text => return Some(Msg::Text(String::from_utf8(f.payload.to_vec()).unwrap())),
            OpCode::Binary => return Some(Msg::Binary(f.payload.to_vec())),
            OpCode::Close => {
                let p = f.payload.to_vec();
                let code = if p.len() >= 2 { u16::from_be_bytes([p[0], p[1]]) } else { 1005 };
                return Some(Msg::Close(code, String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned()));
            }
            _ => continue,
        }
    }
}

/// Reads text messages until `n` events (not cursor messages) arrived or `timeout` passes
/// without a message.
pub async fn collect(ws: &mut Ws, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while out.len() < n {
        match next(ws, timeout).await {
            Some(Msg::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["kind"] != "cursor" {
                    out.push(v);
                }
            }
            Some(Msg::Binary(_)) => panic!("unexpected binary frame"),
            Some(Msg::Close(code, reason)) => panic!("closed {code} {reason} after {} events", out.len()),
            None => break,
        }
    }
    out
}

/// Reads until the server's close frame, skipping other messages: its code and reason, or
/// `None` when the connection goes quiet for `timeout` first.
pub async fn close_of(ws: &mut Ws, timeout: Duration) -> Option<(u16, String)> {
    while let Some(m) = next(ws, timeout).await {
        if let Msg::Close(code, reason) = m {
            return Some((code, reason));
        }
    }
    None
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec()))).await.unwrap();
}
