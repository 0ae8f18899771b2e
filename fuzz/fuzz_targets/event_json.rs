//! The replica link's parser: an event line from an upstream, rebuilt with its metadata, then
//! re-encoded for the v2 wire. Never a panic, whatever the upstream sends.
#![no_main]
use contrail_core::event::{Event, EventKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, json)) = data.split_first() else { return };
    let kind = EventKind::ALL[selector as usize % EventKind::ALL.len()];
    let collection = (selector & 0x80 != 0).then_some("app.bsky.feed.post");
    if let Some(mut e) = Event::from_json(json.to_vec(), kind, collection) {
        let _ = (e.did(), e.collection(), contrail_core::v2::message(&e));
        let mut value = Vec::new();
        e.encode_value(&mut value);
        let back = Event::decode_value(e.time_us, &value).expect("an encoded value decodes");
        assert_eq!(back.json(), e.json());
        e.stamp(42);
        let _ = contrail_core::v2::message(&e);
    }
});
