//! The v2 wire's query parser: never a panic; errors always carry a name and a JSON body.
#![no_main]
use contrail_core::v2::V2Options;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let query = String::from_utf8_lossy(data);
    match V2Options::from_query(&query, None, 20_261_125) {
        Ok(o) => assert!(o.zstd_dictionary.is_none_or(|id| id == 20_261_125)),
        Err(e) => {
            assert!(!e.name.is_empty());
            let body: serde_json::Value = serde_json::from_slice(&e.body()).expect("XRPC error body is JSON");
            assert_eq!(body["error"].as_str(), Some(e.name));
        }
    }
});
