//! A relay frame → events: never a panic, and every event (once stamped) is valid JSON whose
//! `did`/`time_us`/`kind` are where the event says they are.
#![no_main]
use contrail_core::transcode::Transcoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mut events, mut drops) = (Vec::new(), Vec::new());
    let info = Transcoder::default().transcode(data, &mut events, &mut drops);
    assert!(info.dropped.is_none() || events.is_empty(), "a dropped frame produced events");
    for (i, mut e) in events.into_iter().enumerate() {
        e.stamp(1_783_175_888_085_434 + i as u64);
        let v: serde_json::Value = serde_json::from_slice(e.json()).expect("event JSON parses");
        assert_eq!(v["did"].as_str(), Some(e.did()));
        assert_eq!(v["time_us"].as_u64(), Some(e.time_us));
        assert_eq!(v["kind"].as_str(), Some(e.kind.as_str()));
        if let Some(c) = e.collection() {
            assert_eq!(v["commit"]["collection"].as_str(), Some(c));
        }
        let _ = contrail_core::v2::message(&e);
    }
});
