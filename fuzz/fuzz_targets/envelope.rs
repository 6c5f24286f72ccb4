//! Any bytes arriving from Redis: decoding must accept or refuse, never panic, and
//! what it accepts must slice a UTF-8 frame out of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = envelope::decode(bytes::Bytes::copy_from_slice(data)) {
        assert!(std::str::from_utf8(&env.frame).is_ok());
        assert!(env.frame.len() + env.traceparent.len() < data.len());
    }
});
