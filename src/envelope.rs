//! The envelope: how one published message travels between nodes through the broker.
//!
//! Layout (version 1), all integers big-endian:
//!
//! ```text
//! +------+----------------+--------+-----------------+------------------------+
//! | 0x01 | published_at   | tp_len | traceparent     | frame                  |
//! | u8   | u64 unix µs    | u8     | tp_len bytes    | the client `msg` frame |
//! +------+----------------+--------+-----------------+------------------------+
//! ```
//!
//! The frame is the exact text frame every recipient gets, built once by the origin
//! node; a receiving node slices it out of the envelope (no copy, no JSON parsing)
//! and hands the same bytes to each local subscriber. `published_at` lets receivers
//! measure publish-to-delivery latency; `traceparent` (W3C, empty when the message
//! is not traced) lets a receiving node continue the origin's trace.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8 + 1;

/// A decoded envelope; `frame` and `traceparent` share the received buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// When the origin node accepted the publish, in microseconds since the epoch.
    pub published_at_us: u64,
    /// W3C `traceparent` of the origin's publish span; empty when not traced.
    pub traceparent: Bytes,
    /// The `msg` frame, ready to send to clients.
    pub frame: Bytes,
}

/// Why an envelope was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than its header says.
    #[error("envelope is truncated")]
    Truncated,
    /// Written by an incompatible (or foreign) publisher.
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    /// The frame cannot be a text frame.
    #[error("frame is not UTF-8")]
    NotUtf8,
}

/// Wraps a frame for the broker.
pub fn encode(frame: &[u8], traceparent: &[u8]) -> Bytes {
    // A traceparent is 55 bytes; anything past 255 is not one.
    let tp = if traceparent.len() <= u8::MAX as usize {
        traceparent
    } else {
        &[]
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + tp.len() + frame.len());
    out.put_u8(VERSION);
    out.put_u64(now_us());
    out.put_u8(tp.len() as u8);
    out.put_slice(tp);
    out.put_slice(frame);
    out.freeze()
}

/// Unwraps an envelope received from the broker without copying the frame.
pub fn decode(mut buf: Bytes) -> Result<Envelope, EnvelopeError> {
    if buf.len() < HEADER_LEN {
        return Err(if buf.first().is_some_and(|&v| v != VERSION) {
            EnvelopeError::UnknownVersion(buf[0])
        } else {
            EnvelopeError::Truncated
        });
    }
    if buf[0] != VERSION {
        return Err(EnvelopeError::UnknownVersion(buf[0]));
    }
    let published_at_us = u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes"));
    let tp_len = buf[9] as usize;
    if buf.len() < HEADER_LEN + tp_len {
        return Err(EnvelopeError::Truncated);
    }
    let _ = buf.split_to(HEADER_LEN);
    let traceparent = buf.split_to(tp_len);
    if std::str::from_utf8(&buf).is_err() {
        return Err(EnvelopeError::NotUtf8);
    }
    Ok(Envelope {
        published_at_us,
        traceparent,
        frame: buf,
    })
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_shares_the_frame() {
        let frame = br#"{"op":"msg","ch":"a","data":1}"#;
        let tp = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let before = now_us();
        let wire = encode(frame, tp);
        let env = decode(wire.clone()).unwrap();
        assert_eq!(&env.frame[..], frame);
        assert_eq!(&env.traceparent[..], tp);
        assert!(env.published_at_us >= before && env.published_at_us <= now_us());
        // The frame is a view into the received buffer, not a copy.
        assert_eq!(
            env.frame.as_ptr(),
            wire[wire.len() - frame.len()..].as_ptr()
        );
    }

    #[test]
    fn untraced_envelope() {
        let env = decode(encode(b"{}", b"")).unwrap();
        assert!(env.traceparent.is_empty());
        assert_eq!(&env.frame[..], b"{}");
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        assert_eq!(decode(Bytes::new()), Err(EnvelopeError::Truncated));
        assert_eq!(
            decode(Bytes::from_static(b"\x01abc")),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            decode(Bytes::from_static(b"{\"op\":\"msg\"}")),
            Err(EnvelopeError::UnknownVersion(b'{'))
        );
        let mut bad_tp = encode(b"{}", b"").to_vec();
        bad_tp[9] = 200;
        assert_eq!(decode(bad_tp.into()), Err(EnvelopeError::Truncated));
        let mut bad_utf8 = encode(b"{}", b"").to_vec();
        bad_utf8.push(0xff);
        assert_eq!(decode(bad_utf8.into()), Err(EnvelopeError::NotUtf8));
    }
}
