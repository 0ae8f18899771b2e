//! The `/subscribe` query parser: never a panic, at most linear work.
#![no_main]
use contrail_core::event::EventKind;
use contrail_core::options::SubscribeOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    let header = query.split_once('#').map(|(_, h)| h);
    if let Ok(o) = SubscribeOptions::from_query(&query, header) {
        let _ = o.filter.matches(EventKind::Commit, "did:plc:x", Some("app.bsky.feed.post"));
        let _ = o.filter.matches(EventKind::Sync, "did:plc:x", None);
    }
});
