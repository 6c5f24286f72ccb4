//! Any bytes arriving from Redis: decoding must accept or refuse, never panic, and
//! what it accepts must slice UTF-8 data out of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsrelay::envelope;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = envelope::decode(bytes::Bytes::copy_from_slice(data)) {
        assert!(std::str::from_utf8(&p.data).is_ok());
        assert!(p.data.len() + p.traceparent.len() < data.len());
    }
});
