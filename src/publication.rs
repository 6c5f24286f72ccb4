//! The vocabulary shared by the broker, the hub and the wire formats: a
//! [`Publication`] (one published message, as nodes exchange it) and its
//! [`Position`] in a channel's history ([`Epoch`] plus offset).
//!
//! A publication carries the publisher's raw JSON `data`, never a finished client
//! frame: each receiving node builds the frame once (with the offset its history
//! assigned) and shares its bytes with every local subscriber.

use std::fmt;

use bytes::Bytes;

/// Longest epoch accepted from Redis or a client.
pub const MAX_EPOCH_LEN: usize = 32;

/// Identifies one incarnation of a channel's history: it changes whenever the
/// history and its offsets were lost (Redis restarted without persistence, keys
/// evicted or expired), so an offset only means something together with its epoch.
///
/// 1 to 32 ASCII letters and digits; shares the buffer it was decoded from.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Epoch(Bytes);

impl Epoch {
    /// Checks and wraps an epoch.
    pub fn new(bytes: Bytes) -> Option<Epoch> {
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_EPOCH_LEN
            && bytes.iter().all(u8::is_ascii_alphanumeric);
        ok.then_some(Epoch(bytes))
    }

    /// Parses an epoch from text.
    pub fn parse(text: &str) -> Option<Epoch> {
        Epoch::new(Bytes::copy_from_slice(text.as_bytes()))
    }

    /// A fresh random epoch (8 characters of `[0-9a-z]`).
    pub fn random() -> Epoch {
        const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let text: Vec<u8> = (0..8)
            .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())])
            .collect();
        Epoch(Bytes::from(text))
    }

    /// The epoch as text.
    pub fn as_str(&self) -> &str {
        // Checked ASCII on construction.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A place in a channel's history: the message with `offset` (1, 2, 3, …) of
/// `epoch`, or with offset 0, the start of an empty history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The history's incarnation.
    pub epoch: Epoch,
    /// Messages published to the channel in this epoch up to here.
    pub offset: u64,
}

/// Offsets stay below 2^53 so that JavaScript reads them exactly.
pub const MAX_OFFSET: u64 = (1 << 53) - 1;

/// What kind of event a publication is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A message published by a client or the API.
    Message,
    /// A client subscribed (`data` is its presence entry); never stored.
    Join,
    /// A client unsubscribed or disconnected (`data` is its presence entry).
    Leave,
}

/// One published message as the broker carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// What kind of event.
    pub kind: Kind,
    /// The payload: the JSON text the publisher sent, byte for byte (valid UTF-8).
    pub data: Bytes,
    /// The publisher's user id, when the node exposes publishers.
    pub from: Option<Bytes>,
    /// The position the channel's history assigned; `None` on channels without history.
    pub position: Option<Position>,
    /// W3C `traceparent` of the origin's publish span; empty when not traced.
    pub traceparent: Bytes,
    /// When the origin node accepted the publish, in microseconds since the epoch.
    pub published_at_us: u64,
}

impl Publication {
    /// The offset, on channels with history.
    pub fn offset(&self) -> Option<u64> {
        self.position.as_ref().map(|p| p.offset)
    }

    /// The publisher as text.
    pub fn publisher(&self) -> Option<&str> {
        self.from
            .as_ref()
            .map(|f| std::str::from_utf8(f).unwrap_or_default())
    }

    /// The data as text.
    pub fn data_str(&self) -> &str {
        // Checked UTF-8 wherever a publication is built or decoded.
        std::str::from_utf8(&self.data).unwrap_or("null")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_checked() {
        assert!(Epoch::parse("k3x9").is_some());
        assert!(Epoch::parse("").is_none());
        assert!(Epoch::parse("a:b").is_none());
        assert!(Epoch::parse(&"a".repeat(33)).is_none());
        let a = Epoch::random();
        assert_eq!(a.as_str().len(), 8);
        assert_ne!(a, Epoch::random());
        assert_eq!(Epoch::parse(a.as_str()), Some(a));
    }
}
