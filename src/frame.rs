//! A frame for clients: the bytes of one server-to-client message (a publication,
//! an ack, an error), as every transport's writer takes them.
//!
//! A publication's frame is built once per node and shared by every local
//! subscriber (cloning it counts a reference, it copies nothing), so a queue holds
//! frames, never messages to serialise again.

use axum::extract::ws::Utf8Bytes;

/// One message for clients, as JSON text.
///
/// The text is kept as `Utf8Bytes` (axum's, around tungstenite's), shared bytes known to be UTF-8:
/// the WebSocket writer takes it as a text message without copying or validating it
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    text: Utf8Bytes,
}

impl Frame {
    /// A frame of constant text.
    pub const fn from_static(text: &'static str) -> Frame {
        Frame {
            text: Utf8Bytes::from_static(text),
        }
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
        Frame { text: text.into() }
    }
}

impl From<&'static str> for Frame {
    fn from(text: &'static str) -> Frame {
        Frame::from_static(text)
    }
}

impl PartialEq<&str> for Frame {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}
