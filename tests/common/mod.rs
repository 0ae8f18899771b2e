//! Shared test helpers: where the shared corpus lives, and a builder of real-format relay
//! frames (DAG-CBOR encoded by serde_ipld_dagcbor, an implementation independent of ours).
#![allow(dead_code)]

pub mod client;
pub mod frames;
pub mod process;
pub mod proxy;
pub mod relay;
pub mod signed;

use std::path::PathBuf;

/// `../shared` beside the repository, or `$CONTRAIL_SHARED_DIR`. `None` (after printing why)
/// when it is absent, so a plain clone still passes.
pub fn shared_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CONTRAIL_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("corpus").is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIP {test}: shared material not found at {} (set CONTRAIL_SHARED_DIR)", dir.display());
        None
    }
}

/// The most two loopback TCP socket buffers (one sending, one receiving) can hold: the largest
/// sizes the kernel grows them to (`net.ipv4.tcp_wmem` and `tcp_rmem`, 4 MiB and 6 MiB by
/// default; 32 MiB for receiving on some machines).
pub fn loopback_buffers() -> usize {
    let largest = |name: &str, default: usize| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
            .unwrap_or(default)
    };
    largest("tcp_wmem", 4 << 20) + largest("tcp_rmem", 6 << 20)
}

/// Removes `"time_us":N,` from an event line so lines can be compared across instances.
pub fn without_time_us(line: &str) -> String {
    let Some(start) = line.find("\"time_us\":") else { return line.to_string() };
    let digits = line[start + 10..].bytes().take_while(|b| b.is_ascii_digit() || *b == b'-').count();
    let mut end = start + 10 + digits;
    if line.as_bytes().get(end) == Some(&b',') {
        end += 1;
    }
    format!("{}{}", &line[..start], &line[end..])
}

/// This machine's clock, in `time_us` (fake upstreams' events must not be a day past it).
pub fn now_us() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as i64
}

/// A v1 like event at `time_us`, as a fake upstream's text line.
pub fn like_line(time_us: i64) -> Vec<u8> {
    format!(
        r#"{{"did":"did:plc:a","time_us":{time_us},"kind":"commit","commit":{{"rev":"r","operation":"create","collection":"app.bsky.feed.like","rkey":"k{time_us}","record":{{}}}}}}"#
    )
    .into_bytes()
}
