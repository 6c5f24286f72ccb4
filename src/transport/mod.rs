//! Transports: how a session's requests and frames travel between a client and the
//! node. Each moves bytes only; what a connection does lives in `session`.
//!
//! - [`websocket`]: an upgraded HTTP/1.1 connection (RFC 6455), with
//! - [`deflate`]: permessage-deflate (RFC 7692) for it, compressed once per node.
//! - [`stream`]: an HTTP response that never ends, as Server-Sent Events
//!   (`GET /sse`, for `EventSource`) or newline-delimited JSON (`POST /stream`,
//!   for `fetch`); its client sends requests with `POST /stream/request` to any
//!   node (see `streams`).

mod deflate;
pub(crate) mod stream;
pub(crate) mod websocket;

use std::collections::VecDeque;

use tokio_util::sync::CancellationToken;

use crate::frame::Frame;

/// Most bytes of frames one write of a connection takes: a larger batch (a
/// recovery's replay, up to `--max-history-bytes`) goes out in several, so that
/// the node's other tasks do not wait for all of it, and what a write holds
/// beyond the connection's queue stays small.
pub(crate) const WRITE_CHUNK: usize = 64 * 1024;

/// How many of the frames at the front of `batch` one write takes, and their
/// bytes: as many as fit in [`WRITE_CHUNK`], and at least one (a frame larger than
/// that goes alone).
pub(crate) fn next_piece(batch: &VecDeque<Frame>) -> (usize, usize) {
    let mut bytes = 0;
    let count = batch
        .iter()
        .take_while(|f| {
            let fits = bytes == 0 || bytes + f.len() <= WRITE_CHUNK;
            if fits {
                bytes += f.len();
            }
            fits
        })
        .count();
    (count, bytes)
}

/// The place of one HTTP connection among the pending ones of the node's accept
/// loop, as its requests see it (a request extension).
#[derive(Debug, Clone)]
pub(crate) struct ConnSlot {
    /// Cancelled: the connection is dropped (its socket closed) at once.
    evict: CancellationToken,
    /// Cancelled: the connection leaves the pending set (it ended, or became a
    /// session that counts against `--max-connections` instead).
    detach: CancellationToken,
}

impl ConnSlot {
    /// The slot of a connection: `evict` drops it, `detach` takes it out of the
    /// pending set.
    pub(crate) fn new(evict: CancellationToken, detach: CancellationToken) -> Self {
        ConnSlot { evict, detach }
    }

    /// The connection now carries a session: it no longer counts as pending, and
    /// is no longer the oldest to evict.
    pub(crate) fn detach(&self) {
        self.detach.cancel();
    }

    /// Drops the connection (a session's write stalled past `--write-timeout`).
    pub(crate) fn evict(&self) {
        self.evict.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_takes_what_fits_and_a_large_frame_alone() {
        let frame = |n: usize| Frame::from("x".repeat(n));
        let batch: VecDeque<Frame> = [frame(40_000), frame(20_000), frame(10_000)].into();
        assert_eq!(next_piece(&batch), (2, 60_000));
        let batch: VecDeque<Frame> = [frame(100_000), frame(1)].into();
        assert_eq!(next_piece(&batch), (1, 100_000));
        assert_eq!(next_piece(&VecDeque::new()), (0, 0));
    }
}
