//! A frame for clients: the bytes of one server-to-client message (a publication,
//! an ack, an error), as every transport's writer takes them.
//!
//! A publication's frame is built once per node and shared by every local
//! subscriber (cloning it counts a reference, it copies nothing), so a queue holds
//! frames, never messages to serialise again. A frame may also say which channel
//! positions it carries the client to (a publication of a history channel, a
//! `welcome`, a subscribe ack, a `gap`): a transport that must name the client's
//! place in its own terms (SSE's event id) reads them here instead of parsing the
//! JSON.
//!
//! A frame that goes to many connections ([`Frame::shared`]) also keeps, for all its
//! copies, the one compressed form a transport built from it ([`Frame::deflated`]):
//! a node compresses a publication once, however many subscribers negotiated
//! compression.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tungstenite::Utf8Bytes;

use crate::publication::Position;

/// One message for clients, as JSON text.
///
/// The text is kept as tungstenite's `Utf8Bytes`, shared bytes known to be UTF-8:
/// the WebSocket writer takes it as a text message without copying or validating
/// it again.
#[derive(Debug, Clone)]
pub struct Frame {
    text: Utf8Bytes,
    /// What only some frames carry, shared by every copy: absent from most
    /// replies, so they cost one pointer.
    extra: Option<Arc<Extra>>,
}

/// What a frame carries besides its text.
#[derive(Debug, Default)]
struct Extra {
    /// The channel positions the frame brings its client to, in order.
    positions: Vec<(String, Position)>,
    /// The text compressed, once, by the first writer that needed it; `None` inside
    /// when it did not shrink. Never built for a frame no connection compresses.
    deflated: OnceLock<Option<Bytes>>,
}

impl Frame {
    /// A frame of constant text.
    pub const fn from_static(text: &'static str) -> Frame {
        Frame {
            text: Utf8Bytes::from_static(text),
            extra: None,
        }
    }

    /// The frame, telling that it brings its client to `positions`.
    pub fn with_positions(mut self, positions: Vec<(String, Position)>) -> Frame {
        if !positions.is_empty() {
            self.extra = Some(Arc::new(Extra {
                positions,
                deflated: OnceLock::new(),
            }));
        }
        self
    }

    /// The frame, about to go to many connections: its copies then share what
    /// [`Frame::deflated`] builds. Costs one small allocation when it carries no
    /// positions; only worth it for a frame that is fanned out.
    pub fn shared(mut self) -> Frame {
        if self.extra.is_none() {
            self.extra = Some(Arc::default());
        }
        self
    }

    /// The frame's text compressed by `deflate` (`None`: it did not shrink). A
    /// [shared](Frame::shared) frame calls `deflate` once for all its copies (a
    /// writer that asks while another one is compressing it waits for that
    /// result); any other frame calls it on every call.
    pub fn deflated(&self, deflate: impl FnOnce(&[u8]) -> Option<Bytes>) -> Option<Bytes> {
        match &self.extra {
            Some(extra) => extra
                .deflated
                .get_or_init(|| deflate(self.text.as_bytes()))
                .clone(),
            None => deflate(self.text.as_bytes()),
        }
    }

    /// The channel positions the frame brings its client to (a publication on a
    /// history channel, a `welcome`, a subscribe ack, a `gap`); empty for others.
    pub fn positions(&self) -> &[(String, Position)] {
        self.extra
            .as_deref()
            .map_or(&[], |e| e.positions.as_slice())
    }

    /// The frame as JSON text.
    pub fn text(&self) -> &Utf8Bytes {
        &self.text
    }

    /// The frame's JSON text, taken out of the frame.
    pub fn into_text(self) -> Utf8Bytes {
        self.text
    }

    /// The frame's JSON text, as a `&str`.
    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    /// What the frame holds in memory: its text, and what only some frames carry
    /// (the positions, and the compressed form if it was built already). What a
    /// cache that keeps frames counts against its budget.
    pub fn footprint(&self) -> usize {
        let extra = self.extra.as_deref().map_or(0, |extra| {
            // The Arc's counters, the struct, and what it points to.
            2 * std::mem::size_of::<usize>()
                + std::mem::size_of::<Extra>()
                + extra.positions.capacity() * std::mem::size_of::<(String, Position)>()
                + extra
                    .positions
                    .iter()
                    .map(|(channel, position)| channel.capacity() + position.epoch.as_str().len())
                    .sum::<usize>()
                + extra
                    .deflated
                    .get()
                    .and_then(Option::as_ref)
                    .map_or(0, Bytes::len)
        });
        self.text.len() + extra
    }

    /// Its size in bytes: what it counts against a connection's byte bound.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Whether the frame is empty (never, for a frame of the protocol).
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame {
            text: text.into(),
            extra: None,
        }
    }
}

impl From<&'static str> for Frame {
    fn from(text: &'static str) -> Frame {
        Frame::from_static(text)
    }
}

impl PartialEq for Frame {
    /// Frames are equal when their text is.
    fn eq(&self, other: &Frame) -> bool {
        self.text == other.text
    }
}

impl Eq for Frame {}

impl PartialEq<&str> for Frame {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_shared_frame_is_deflated_once_for_all_its_copies() {
        let calls = AtomicUsize::new(0);
        let deflate = |text: &[u8]| {
            calls.fetch_add(1, Ordering::Relaxed);
            Some(Bytes::copy_from_slice(&text[..2]))
        };
        let frame = Frame::from(String::from("{\"op\":\"msg\"}")).shared();
        let copies = [frame.clone(), frame.clone(), frame];
        for copy in &copies {
            assert_eq!(copy.deflated(deflate).as_deref(), Some(&b"{\""[..]));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // A reply goes to one connection: nothing is kept.
        let reply = Frame::from("{\"op\":\"pong\"}");
        reply.deflated(deflate);
        reply.clone().deflated(deflate);
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert!(reply.positions().is_empty());
    }

    #[test]
    fn a_frames_footprint_counts_its_positions_and_its_compressed_form() {
        let text = "{\"op\":\"msg\",\"ch\":\"chat:1\",\"offset\":7}";
        let plain = Frame::from(String::from(text));
        assert_eq!(plain.footprint(), text.len());
        let position = Position {
            epoch: crate::publication::Epoch::parse("k3x9").unwrap(),
            offset: 7,
        };
        let positioned = plain.with_positions(vec![("chat:1".to_owned(), position)]);
        let extra = positioned.footprint() - text.len();
        assert!(
            extra > std::mem::size_of::<Extra>() + "chat:1".len() + "k3x9".len(),
            "{extra}"
        );
        positioned.deflated(|_| Some(Bytes::from_static(b"12345")));
        assert_eq!(positioned.footprint(), text.len() + extra + 5);
    }
}
