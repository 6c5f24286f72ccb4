//! permessage-deflate (RFC 7692) on the WebSocket transport, compressed once per
//! node: the negotiation, the compressor of outbound frames, and (in [`inflate`])
//! the inflation of compressed client messages below tungstenite.
//!
//! **Once per node, not per subscriber.** The node always agrees to
//! `server_no_context_takeover`: each message it sends is compressed on its own,
//! so one compressed payload is valid on every connection that negotiated the
//! extension. A fanned-out frame is compressed by the first writer that needs it
//! and every other one writes the same bytes ([`Frame::deflated`]); frames under
//! `--compression-min-bytes` (and those that would not shrink) go plain.
//!
//! **No inflater per connection.** The node also imposes
//! `client_no_context_takeover` (RFC 7692 lets a server add it to its answer even
//! when the offer did not name it; Chromium, Node's `ws` and Python's
//! `websockets` accept it, as the interop tests show): each client message inflates on its own, with the
//! worker thread's inflater, so a connection holds no inflate state between
//! messages. A client that refuses the parameter fails its own handshake; one that
//! keeps its context anyway sends data the node cannot inflate (1002). Keeping an
//! inflater (~48 KB) per publishing connection for such clients was not worth it.

mod inflate;

use std::cell::RefCell;
use std::sync::Arc;

use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};

pub(crate) use inflate::{InflateError, InflatingIo};

use crate::config::CompressionConfig;
use crate::frame::Frame;
use crate::metrics::Metrics;

/// The node's answer to an acceptable offer: the same for every connection, so
/// that one compressed payload suits them all (see the module doc).
pub(crate) const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// What ends every sync-flushed deflate block; permessage-deflate leaves it off the
/// wire and the receiver puts it back (RFC 7692 §7.2.1).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Whether the values of a request's `Sec-WebSocket-Extensions` headers hold a
/// `permessage-deflate` offer the node can accept (then it answers [`RESPONSE`]).
///
/// An offer is declined, and the next one looked at, when it has an unknown or
/// repeated parameter or a malformed value (RFC 7692 §5), or asks for a server
/// window under 15 bits: the shared payloads are compressed with a 15-bit window
/// (browsers and the common libraries never ask for less).
pub(crate) fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> bool {
    header_values
        .into_iter()
        .flat_map(|value| value.split(','))
        .any(acceptable)
}

/// Whether one offer (`permessage-deflate; param; param=value`) can be accepted.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    let mut seen: Vec<String> = Vec::new();
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return false;
        }
        let bits = |value: Option<&str>| value.and_then(|v| v.parse::<u8>().ok());
        let ok = match name.as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            // Its window is the client's business: the node inflates with 15 bits,
            // which reads any smaller window.
            "client_max_window_bits" => {
                value.is_none() || bits(value).is_some_and(|b| (8..=15).contains(&b))
            }
            "server_max_window_bits" => bits(value) == Some(15),
            _ => false,
        };
        if !ok {
            return false;
        }
        seen.push(name);
    }
    true
}

/// Compresses the frames of one connection that negotiated permessage-deflate; it
/// lives in the connection's writer, and counts the connection in
/// `wsrelay_connections_deflate` meanwhile. 16 bytes: every writer holds an
/// `Option` of it.
#[derive(Debug)]
pub(crate) struct Compressor {
    level: u32,
    /// `--compression-min-bytes` (at most 64 MiB).
    min_bytes: u32,
    metrics: Arc<Metrics>,
}

impl Compressor {
    pub(crate) fn new(config: &CompressionConfig, metrics: Arc<Metrics>) -> Compressor {
        metrics.connections_deflate.inc();
        Compressor {
            level: config.compression_level,
            min_bytes: u32::try_from(config.compression_min_bytes).unwrap_or(u32::MAX),
            metrics,
        }
    }

    /// `frame`'s text compressed, to go out in one frame with RSV1 set; `None`
    /// when it is under the threshold or did not shrink (it goes plain).
    pub(crate) fn compress(&self, frame: &Frame) -> Option<Bytes> {
        if frame.len() < self.min_bytes as usize {
            return None;
        }
        frame.deflated(|text| self.deflate(text))
    }

    /// Counts bytes that compression kept off the wire.
    pub(crate) fn saved(&self, bytes: usize) {
        self.metrics.compression_saved_bytes.inc_by(bytes as u64);
    }

    /// Compresses `text` with this thread's compressor, and counts it.
    fn deflate(&self, text: &[u8]) -> Option<Bytes> {
        let payload = DEFLATER
            .try_with(|cell| match cell.try_borrow_mut() {
                Ok(mut deflater) => deflater.compress(self.level, text),
                // Never happens (nothing runs inside a compression); plain is safe.
                Err(_) => None,
            })
            .unwrap_or(None);
        let metrics = &self.metrics;
        metrics.compressions.inc();
        metrics.compression_bytes_in.inc_by(text.len() as u64);
        let out = payload.as_ref().map_or(text.len(), Bytes::len);
        metrics.compression_bytes_out.inc_by(out as u64);
        payload
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        self.metrics.connections_deflate.dec();
    }
}

thread_local! {
    /// One compressor per worker thread (~380 KB of zlib-rs state), reset before
    /// every message: a compressor per connection would cost that much each.
    static DEFLATER: RefCell<Deflater> = const { RefCell::new(Deflater { compress: None }) };
}

/// A thread's compressor, made on first use at the level asked for.
struct Deflater {
    compress: Option<(u32, Compress)>,
}

impl Deflater {
    /// `text` compressed as one permessage-deflate message without context, or
    /// `None` when that is not smaller than `text`.
    fn compress(&mut self, level: u32, text: &[u8]) -> Option<Bytes> {
        let compress = match &mut self.compress {
            // Several nodes in one process (tests) may use different levels.
            Some((made_at, compress)) if *made_at == level => {
                compress.reset();
                compress
            }
            slot => {
                let (_, compress) =
                    slot.insert((level, Compress::new(Compression::new(level), false)));
                compress
            }
        };
        deflate_message(compress, text)
    }
}

/// Compresses `text` with `compress` (fresh or reset), sync-flushed and without the
/// tail, as permessage-deflate sends it; `None` unless it shrinks.
fn deflate_message(compress: &mut Compress, text: &[u8]) -> Option<Bytes> {
    // JSON shrinks to about half: one allocation is usually enough. Past the
    // text's own size it is not worth finishing.
    let give_up = text.len() + TAIL.len();
    let mut out = Vec::with_capacity((text.len() / 2 + 64).min(give_up + 1));
    let mut input = text;
    loop {
        let before = compress.total_in();
        compress
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .ok()?;
        input = &input[(compress.total_in() - before) as usize..];
        // Room left after all the input: the flush is complete.
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        if out.capacity() > give_up {
            return None;
        }
        out.reserve_exact(out.capacity().min(give_up + 1 - out.capacity()).max(64));
    }
    if !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    if out.len() >= text.len() {
        return None;
    }
    if out.capacity() > 2 * out.len() + 64 {
        // Queued frames keep it: do not keep the room of a poor guess.
        out.shrink_to_fit();
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests;
