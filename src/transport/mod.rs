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

use tokio_util::sync::CancellationToken;

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
