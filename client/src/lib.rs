//! `contrail-client`: subscribe to a Contrail (or any Jetstream v1 `/subscribe`), process each
//! event, and never lose one across restarts, crashes, reconnects and failover.
//!
//! ```no_run
//! use contrail_client::{process, FileCursorStore, CursorStore, ProcessOptions, Subscription};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let store = FileCursorStore::new("likes.cursor");
//! let sub = Subscription::builder(["wss://contrail-a.example", "wss://contrail-b.example"])
//!     .collections(["app.bsky.feed.like"])
//!     .cursor(store.load()?)
//!     .start()?;
//! let handler = |event: contrail_client::Event| async move {
//!     println!("{} liked something at {}", event.did(), event.time_us());
//!     Ok::<(), std::io::Error>(())
//! };
//! let ctrl_c = async { let _ = tokio::signal::ctrl_c().await; };
//! process(sub, store, ProcessOptions::default(), handler, ctrl_c).await?;
//! # Ok(()) }
//! ```
//!
//! - [`Subscription`]: the connection (filters, `options_update` at run time, zstd, cursor
//!   messages as heartbeat and position, reconnect with backoff and jitter, failover along a
//!   host list: exact cursor between a Contrail primary and its replicas, rewind and
//!   de-duplication between servers with their own `time_us`).
//! - [`process()`] / [`process_parallel`]: run a handler and keep the cursor in a
//!   [`CursorStore`]; the delivery guarantee is spelled out in [`mod@process`].
//! - [`Event`]: the JSON exactly as sent, its common fields read once, the rest on demand.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cursor;
mod error;
pub mod event;
pub mod process;
pub mod subscription;
pub mod transport;

pub use cursor::{CursorStore, FileCursorStore, MemoryCursorStore};
pub use error::Error;
pub use event::{Event, Kind, Operation, Wire};
pub use process::{process, process_parallel, ProcessError, ProcessOptions};
pub use subscription::{Builder, Failover, Message, Subscription};

/// Which events a subscription wants (Jetstream's `wantedCollections` and `wantedDids`); empty
/// lists mean everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// NSIDs, or prefixes like `app.bsky.graph.*`. At most 100 (Jetstream's limit).
    pub collections: Vec<String>,
    /// At most 10,000.
    pub dids: Vec<String>,
}

impl Filters {
    pub const MAX_COLLECTIONS: usize = 100;
    pub const MAX_DIDS: usize = 10_000;

    fn validate(&self) -> Result<(), Error> {
        if self.collections.len() > Self::MAX_COLLECTIONS {
            return Err(Error::Filter(format!(
                "{} collections (at most {})",
                self.collections.len(),
                Self::MAX_COLLECTIONS
            )));
        }
        if self.dids.len() > Self::MAX_DIDS {
            return Err(Error::Filter(format!("{} DIDs (at most {})", self.dids.len(), Self::MAX_DIDS)));
        }
        let bad = |s: &String| {
            s.is_empty() || s.len() > 2048 || s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        };
        if let Some(c) = self.collections.iter().find(|c| bad(c)) {
            return Err(Error::Filter(format!("collection {c:?}")));
        }
        if let Some(d) = self.dids.iter().find(|d| bad(d) || !d.starts_with("did:")) {
            return Err(Error::Filter(format!("DID {d:?}")));
        }
        Ok(())
    }

    fn query_params(&self) -> impl Iterator<Item = String> + '_ {
        let c = self.collections.iter().map(|c| format!("wantedCollections={}", encode(c)));
        c.chain(self.dids.iter().map(|d| format!("wantedDids={}", encode(d))))
    }

    /// The `options_update` message carrying these filters.
    fn options_update(&self) -> String {
        serde_json::json!({
            "type": "options_update",
            "payload": { "wantedCollections": self.collections, "wantedDids": self.dids },
        })
        .to_string()
    }
}

/// Percent-encodes what a query value cannot carry as is (NSIDs and most DIDs pass unchanged).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~' | b':' | b'*') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_may_not_set_what_the_builder_sets() {
        let url = |param: &str| format!("wss://jetstream.example/subscribe?token=x&{param}");
        let refused = |b: Builder, param: &str| {
            let err = b.start().err().unwrap_or_else(|| panic!("{param} taken"));
            let key = param.split('=').next().unwrap();
            assert!(
                matches!(&err, Error::Url(_)) && err.to_string().contains(&format!("sets {key}")),
                "{param}: {err}"
            );
        };
        for param in ["compress=true", "requireHello=true", "informCursorSeconds=5", "zstdDictionary=1"] {
            refused(Subscription::builder([url(param)]), param);
        }
        let post = "wantedCollections=app.bsky.feed.post";
        refused(Subscription::builder([url(post)]).collections(["app.bsky.feed.like"]), post);
        let v2 = |param: &str| Subscription::builder([url(param)]).wire(Wire::V2);
        refused(v2("collections=app.bsky.feed.post").collections(["app.bsky.feed.like"]), "collections");
        refused(v2("kinds=commit"), "kinds");
        refused(v2("zstdDictionary=1"), "zstdDictionary");
    }

    /// A filter the builder does not set may stay in the URL (a Jetstream URL copied with its
    /// query, as `contrail tail` takes it).
    #[tokio::test]
    async fn a_url_may_carry_a_filter_the_builder_does_not_set() {
        let url = "ws://127.0.0.1:9/subscribe?wantedCollections=app.bsky.feed.post&wantedDids=did:plc:a";
        let sub = Subscription::builder([url]).start().unwrap();
        // It would come back at the next reconnect, under the new ones.
        let err = sub.set_filters(Filters::default()).unwrap_err();
        assert!(matches!(&err, Error::Filter(why) if why.contains("carries wantedCollections")), "{err}");
        assert!(Subscription::builder(["ws://127.0.0.1:9/subscribe?includeSync=true"]).start().is_ok());
    }

    #[test]
    fn filters_become_query_parameters_or_a_hello() {
        let f = Filters { collections: vec!["app.bsky.graph.*".into()], dids: vec!["did:web:a%3A8080.test".into()] };
        let q: Vec<String> = f.query_params().collect();
        assert_eq!(q, ["wantedCollections=app.bsky.graph.*", "wantedDids=did:web:a%253A8080.test"]);
        let hello: serde_json::Value = serde_json::from_str(&f.options_update()).unwrap();
        assert_eq!(hello["payload"]["wantedDids"][0], "did:web:a%3A8080.test");
        assert!(f.validate().is_ok());
        let too_many = Filters { collections: vec!["a.b.c".into(); 101], dids: vec![] };
        assert!(matches!(too_many.validate(), Err(Error::Filter(_))));
        let bad = Filters { collections: vec![], dids: vec!["plc:abc".into()] };
        assert!(bad.validate().is_err());
    }
}
