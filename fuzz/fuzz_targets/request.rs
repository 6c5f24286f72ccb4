//! Any client text frame: decoding must answer (request or error), never panic; only
//! a JSON object is a request; and a decoded publish must encode to a frame that is
//! valid JSON carrying the same data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::protocol::{self, Request};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = protocol::parse_request(text);
    // Only JSON objects are requests (an array of the fields is refused).
    assert!(parsed.is_err() || text.trim_start().starts_with('{'));
    if let Ok(Request::Publish { ch, data, .. }) = parsed {
        let channel = ch.as_deref().unwrap_or("global");
        let frame = protocol::encode_message(channel, data, Some("fuzz\"user"));
        let value: serde_json::Value = serde_json::from_str(frame.as_str()).expect("msg frame is JSON");
        let original: serde_json::Value = serde_json::from_str(data.get()).expect("data is JSON");
        assert_eq!(value["data"], original);
    }
});
