//! The envelope: how one [`Publication`] travels between nodes through the broker,
//! and how it is stored in a channel's Redis history.
//!
//! Layout (version 2), all integers big-endian:
//!
//! ```text
//! +------+------+--------------+--------+-------------+----------+------+---------+-----------+------+
//! | 0x02 | kind | published_at | tp_len | traceparent | from_len | from | pos_len | position  | data |
//! | u8   | u8   | u64 unix µs  | u8     | tp_len B    | u16      |      | u8      | "off:ep"  | JSON |
//! +------+------+--------------+--------+-------------+----------+------+---------+-----------+------+
//! ```
//!
//! `kind`: 0 a message, 1 a join, 2 a leave (`data` is then the presence entry).
//! Everything before `pos_len` is the [`Head`], built by the publishing node; the
//! position (`<offset>:<epoch>` in ASCII, empty on channels without history) is
//! inserted by the Redis publish script, which is the one place offsets are assigned,
//! so the stored and the published envelope are the same bytes. `data` is the raw
//! JSON the client published; each receiving node builds the client frame from it
//! once. `published_at` lets receivers measure publish-to-delivery latency;
//! `traceparent` (W3C, empty when not traced) lets a receiving node continue the
//! origin's trace.
//!
//! Version 1 envelopes (a finished `msg` frame after the header, from nodes not yet
//! upgraded during a rolling deploy) are still understood, and written for plain
//! messages with `--legacy-envelopes`, so that those nodes understand ours.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::publication::{Epoch, Kind, MAX_OFFSET, Position, Publication};

const VERSION: u8 = 2;
const V1: u8 = 1;
const V1_HEADER_LEN: usize = 1 + 8 + 1;
const KIND_MESSAGE: u8 = 0;
const KIND_JOIN: u8 = 1;
const KIND_LEAVE: u8 = 2;

/// Why an envelope was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than its header says.
    #[error("envelope is truncated")]
    Truncated,
    /// Written by an incompatible (or foreign) publisher.
    #[error("unknown envelope version {0}")]
    UnknownVersion(u8),
    /// An event kind this node does not know.
    #[error("unknown publication kind {0}")]
    UnknownKind(u8),
    /// The data or publisher cannot be text.
    #[error("data is not UTF-8")]
    NotUtf8,
    /// The position is not `<offset>:<epoch>`.
    #[error("malformed position")]
    BadPosition,
    /// A version 1 frame that is not a `msg` frame.
    #[error("malformed version 1 frame")]
    BadFrame,
}

/// The part of an envelope before the position: what the publishing node knows.
#[derive(Debug, Clone)]
pub struct Head(Bytes);

impl Head {
    /// The bytes of the head.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Builds the head of a publication's envelope (kind, time, trace context, publisher).
pub fn head(publication: &Publication) -> Head {
    // A traceparent is 55 bytes; anything past 255 is not one.
    let tp: &[u8] = if publication.traceparent.len() <= u8::MAX as usize {
        &publication.traceparent
    } else {
        &[]
    };
    let from: &[u8] = match &publication.from {
        Some(from) if from.len() <= u16::MAX as usize => from,
        _ => &[],
    };
    let mut out = BytesMut::with_capacity(1 + 1 + 8 + 1 + tp.len() + 2 + from.len());
    out.put_u8(VERSION);
    out.put_u8(match publication.kind {
        Kind::Message => KIND_MESSAGE,
        Kind::Join => KIND_JOIN,
        Kind::Leave => KIND_LEAVE,
    });
    out.put_u64(publication.published_at_us);
    out.put_u8(tp.len() as u8);
    out.put_slice(tp);
    out.put_u16(from.len() as u16);
    out.put_slice(from);
    Head(out.freeze())
}

/// The position as the envelope (and the publish script) writes it.
pub fn position_text(position: &Position) -> String {
    format!("{}:{}", position.offset, position.epoch)
}

/// Wraps a publication for the broker.
pub fn encode(publication: &Publication) -> Bytes {
    let head = head(publication);
    let position = publication
        .position
        .as_ref()
        .map(position_text)
        .unwrap_or_default();
    let mut out =
        BytesMut::with_capacity(head.0.len() + 1 + position.len() + publication.data.len());
    out.put_slice(&head.0);
    out.put_u8(position.len() as u8);
    out.put_slice(position.as_bytes());
    out.put_slice(&publication.data);
    out.freeze()
}

/// The size of [`encode`]'s result, without building it: what a publication
/// takes in a channel's history, which bounds a client's reads in bytes.
pub fn encoded_len(publication: &Publication) -> usize {
    let tp = publication.traceparent.len();
    let tp = if tp <= u8::MAX as usize { tp } else { 0 };
    let from = publication.from.as_ref().map_or(0, |f| f.len());
    let from = if from <= u16::MAX as usize { from } else { 0 };
    let position = publication.position.as_ref().map_or(0, |p| {
        p.offset.checked_ilog10().unwrap_or(0) as usize + 2 + p.epoch.as_str().len()
    });
    1 + 1 + 8 + 1 + tp + 2 + from + 1 + position + publication.data.len()
}

/// Wraps a message in the version 1 envelope (header, then its finished `msg`
/// frame), which nodes from before version 2 read: for rolling upgrades from them.
pub fn encode_v1(frame: &[u8], publication: &Publication) -> Bytes {
    let tp: &[u8] = if publication.traceparent.len() <= u8::MAX as usize {
        &publication.traceparent
    } else {
        &[]
    };
    let mut out = BytesMut::with_capacity(V1_HEADER_LEN + tp.len() + frame.len());
    out.put_u8(V1);
    out.put_u64(publication.published_at_us);
    out.put_u8(tp.len() as u8);
    out.put_slice(tp);
    out.put_slice(frame);
    out.freeze()
}

/// Unwraps an envelope received from the broker (or read from history) without
/// copying its data.
pub fn decode(mut buf: Bytes) -> Result<Publication, EnvelopeError> {
    match buf.first() {
        None => return Err(EnvelopeError::Truncated),
        Some(&V1) => return decode_v1(buf),
        Some(&VERSION) => {}
        Some(&other) => return Err(EnvelopeError::UnknownVersion(other)),
    }
    let take = |buf: &mut Bytes, n: usize| -> Result<Bytes, EnvelopeError> {
        if buf.len() < n {
            return Err(EnvelopeError::Truncated);
        }
        Ok(buf.split_to(n))
    };
    let fixed = take(&mut buf, 1 + 1 + 8 + 1)?;
    let kind = match fixed[1] {
        KIND_MESSAGE => Kind::Message,
        KIND_JOIN => Kind::Join,
        KIND_LEAVE => Kind::Leave,
        other => return Err(EnvelopeError::UnknownKind(other)),
    };
    let published_at_us = u64::from_be_bytes(fixed[2..10].try_into().expect("8 bytes"));
    let traceparent = take(&mut buf, fixed[10] as usize)?;
    let from_len = take(&mut buf, 2)?;
    let from_len = u16::from_be_bytes([from_len[0], from_len[1]]) as usize;
    let from = take(&mut buf, from_len)?;
    if std::str::from_utf8(&from).is_err() {
        return Err(EnvelopeError::NotUtf8);
    }
    let pos_len = take(&mut buf, 1)?[0] as usize;
    let position = take(&mut buf, pos_len)?;
    let position = if position.is_empty() {
        None
    } else {
        Some(parse_position(position)?)
    };
    if std::str::from_utf8(&buf).is_err() {
        return Err(EnvelopeError::NotUtf8);
    }
    Ok(Publication {
        kind,
        data: buf,
        from: (!from.is_empty()).then_some(from),
        position,
        traceparent,
        published_at_us,
    })
}

fn parse_position(mut text: Bytes) -> Result<Position, EnvelopeError> {
    let colon = text
        .iter()
        .position(|&b| b == b':')
        .ok_or(EnvelopeError::BadPosition)?;
    let offset = text.split_to(colon);
    let _ = text.split_to(1);
    let offset: u64 = std::str::from_utf8(&offset)
        .ok()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .filter(|&o| (1..=MAX_OFFSET).contains(&o))
        .ok_or(EnvelopeError::BadPosition)?;
    let epoch = Epoch::new(text).ok_or(EnvelopeError::BadPosition)?;
    Ok(Position { epoch, offset })
}

/// A version 1 envelope: header, then the finished `msg` frame.
fn decode_v1(buf: Bytes) -> Result<Publication, EnvelopeError> {
    #[derive(Deserialize)]
    struct Frame<'a> {
        #[serde(borrow)]
        data: &'a RawValue,
        #[serde(default)]
        from: Option<String>,
    }
    if buf.len() < V1_HEADER_LEN {
        return Err(EnvelopeError::Truncated);
    }
    let published_at_us = u64::from_be_bytes(buf[1..9].try_into().expect("8 bytes"));
    let tp_len = buf[9] as usize;
    if buf.len() < V1_HEADER_LEN + tp_len {
        return Err(EnvelopeError::Truncated);
    }
    let traceparent = buf.slice(V1_HEADER_LEN..V1_HEADER_LEN + tp_len);
    let frame = buf.slice(V1_HEADER_LEN + tp_len..);
    let text = std::str::from_utf8(&frame).map_err(|_| EnvelopeError::NotUtf8)?;
    let parsed: Frame<'_> = serde_json::from_str(text).map_err(|_| EnvelopeError::BadFrame)?;
    let data = frame.slice_ref(parsed.data.get().as_bytes());
    Ok(Publication {
        kind: Kind::Message,
        data,
        from: parsed.from.map(Bytes::from),
        position: None,
        traceparent,
        published_at_us,
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

    fn publication(position: Option<Position>) -> Publication {
        Publication {
            kind: Kind::Message,
            data: Bytes::from_static(br#"{"text":"hi"}"#),
            from: Some(Bytes::from_static(b"ada")),
            position,
            traceparent: Bytes::from_static(
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            published_at_us: now_us(),
        }
    }

    #[test]
    fn round_trip_shares_the_data() {
        let original = publication(Some(Position {
            epoch: Epoch::parse("k3x9").unwrap(),
            offset: 42,
        }));
        let wire = encode(&original);
        assert_eq!(encoded_len(&original), wire.len());
        let decoded = decode(wire.clone()).unwrap();
        assert_eq!(decoded, original);
        // The data is a view into the received buffer, not a copy.
        assert_eq!(
            decoded.data.as_ptr(),
            wire[wire.len() - original.data.len()..].as_ptr()
        );
        let bare = Publication {
            from: None,
            position: None,
            traceparent: Bytes::new(),
            ..original
        };
        assert_eq!(decode(encode(&bare)).unwrap(), bare);
        assert_eq!(encoded_len(&bare), encode(&bare).len());
        for offset in [0, 9, 10, 99, 100, u64::MAX] {
            let at = Publication {
                position: Some(Position {
                    epoch: Epoch::parse("k3x9").unwrap(),
                    offset,
                }),
                ..bare.clone()
            };
            assert_eq!(encoded_len(&at), encode(&at).len(), "offset {offset}");
        }
    }

    #[test]
    fn the_script_inserts_the_position_between_head_and_data() {
        // What the Redis publish script does: head .. pos_len .. pos .. data.
        let p = publication(None);
        let pos = b"7:abc";
        let mut wire = head(&p).as_bytes().to_vec();
        wire.push(pos.len() as u8);
        wire.extend_from_slice(pos);
        wire.extend_from_slice(&p.data);
        let decoded = decode(wire.into()).unwrap();
        assert_eq!(decoded.offset(), Some(7));
        assert_eq!(decoded.position.unwrap().epoch.as_str(), "abc");
    }

    #[test]
    fn version_1_envelopes_round_trip() {
        let p = Publication {
            position: None,
            ..publication(None)
        };
        let frame = format!(
            r#"{{"op":"msg","ch":"a","from":"ada","data":{}}}"#,
            p.data_str()
        );
        let decoded = decode(encode_v1(frame.as_bytes(), &p)).unwrap();
        assert_eq!(decoded, p);
    }

    #[test]
    fn version_1_envelopes_are_understood() {
        let frame = br#"{"op":"msg","ch":"a","from":"bob","data":{"n": 1}}"#;
        let mut wire = vec![1u8];
        wire.extend_from_slice(&123u64.to_be_bytes());
        wire.push(0);
        wire.extend_from_slice(frame);
        let p = decode(wire.into()).unwrap();
        assert_eq!(p.data_str(), r#"{"n": 1}"#);
        assert_eq!(p.publisher(), Some("bob"));
        assert_eq!(p.published_at_us, 123);
        assert!(p.position.is_none());
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        assert_eq!(decode(Bytes::new()), Err(EnvelopeError::Truncated));
        assert_eq!(
            decode(Bytes::from_static(b"\x02\x00abc")),
            Err(EnvelopeError::Truncated)
        );
        assert_eq!(
            decode(Bytes::from_static(b"{\"op\":\"msg\"}")),
            Err(EnvelopeError::UnknownVersion(b'{'))
        );
        let good = encode(&publication(None)).to_vec();
        let mut bad_kind = good.clone();
        bad_kind[1] = 9;
        assert_eq!(decode(bad_kind.into()), Err(EnvelopeError::UnknownKind(9)));
        let mut bad_tp = good.clone();
        bad_tp[10] = 250;
        assert_eq!(decode(bad_tp.into()), Err(EnvelopeError::Truncated));
        let mut bad_utf8 = good.clone();
        bad_utf8.push(0xff);
        assert_eq!(decode(bad_utf8.into()), Err(EnvelopeError::NotUtf8));
        for pos in [
            &b"x:abc"[..],
            b"0:abc",
            b"5:",
            b"5",
            b"5:a-b",
            b"99999999999999999999:a",
        ] {
            let p = publication(None);
            let mut wire = head(&p).as_bytes().to_vec();
            wire.push(pos.len() as u8);
            wire.extend_from_slice(pos);
            wire.extend_from_slice(b"1");
            assert_eq!(
                decode(wire.into()),
                Err(EnvelopeError::BadPosition),
                "{}",
                String::from_utf8_lossy(pos)
            );
        }
    }
}
