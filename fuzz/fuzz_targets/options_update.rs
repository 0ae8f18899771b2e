//! A client's text message as the hub parses it: the envelope, then `options_update`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = contrail_core::options::parse_client_message(text);
    }
});
