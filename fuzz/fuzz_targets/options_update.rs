//! A client's text message as the hub parses it: the envelope, then `options_update`.
#![no_main]
use contrail_core::options::{ClientMessage, OptionsUpdate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = serde_json::from_slice::<ClientMessage>(data) else { return };
    let payload = msg.payload.as_ref().map(|p| p.get()).unwrap_or("{}");
    if let Ok(update) = serde_json::from_str::<OptionsUpdate>(payload) {
        let _ = update.validate();
    }
});
