//! Server-to-client WebSocket frames as the node writes them itself (RFC 6455
//! §5.2): one unfragmented frame per message, unmasked, as a server sends.
//!
//! The writer frames a whole batch into one buffer with these and hands it to the
//! socket in one write; tungstenite is left the control frames (ping, close) and
//! everything the client sends (see `socket`).

/// FIN, text.
pub(super) const TEXT: u8 = 0x81;
/// FIN, RSV1 (permessage-deflate: the payload is compressed), text.
pub(super) const TEXT_COMPRESSED: u8 = 0xc1;
/// The longest header a server frame has: 2 bytes, then 8 of extended length.
pub(super) const MAX_HEADER: usize = 10;

/// Appends one frame: `first` (FIN, RSV bits and opcode), the payload length in
/// the shortest form RFC 6455 allows (7 bits, or 126 and 16 bits, or 127 and 64
/// bits), no mask, the payload.
pub(super) fn put_frame(out: &mut Vec<u8>, first: u8, payload: &[u8]) {
    let len = payload.len();
    out.push(first);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};

    /// The bytes tungstenite writes for the same frame, as a server.
    fn tungstenite_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = Frame::message(
            Bytes::copy_from_slice(payload),
            OpCode::Data(Data::Text),
            true,
        );
        frame.header_mut().rsv1 = first & 0x40 != 0;
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    #[test]
    fn frames_are_byte_for_byte_what_tungstenite_writes() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            for first in [TEXT, TEXT_COMPRESSED] {
                let mut out = Vec::new();
                put_frame(&mut out, first, &payload);
                assert_eq!(out, tungstenite_frame(first, &payload), "{len} bytes");
                assert!(out.len() <= payload.len() + MAX_HEADER);
            }
        }
    }

    #[test]
    fn frames_follow_each_other_in_one_buffer() {
        let mut out = Vec::new();
        put_frame(&mut out, TEXT, b"{\"op\":\"a\"}");
        put_frame(&mut out, TEXT, b"");
        assert_eq!(out, b"\x81\x0a{\"op\":\"a\"}\x81\x00");
    }
}
