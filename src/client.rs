//! The outbound side of one connection, as seen by everyone but its own tasks: a
//! bounded frame queue and a close signal.
//!
//! [`ClientHandle::send`] never waits: a full queue means the client is not keeping
//! up, and it is closed with 1013 rather than allowed to grow memory or to slow the
//! fan-out that serves every other client.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Node-local connection id.
pub type ConnId = u64;

/// Why a connection ends. The first reason recorded wins; it decides the close code
/// the writer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    PeerClosed,
    /// The TCP connection broke or the stream ended without a close frame.
    PeerGone,
    /// The node is draining.
    Shutdown,
    /// The outbound queue filled up.
    SlowConsumer,
    /// A message above `--max-message-bytes`.
    TooLarge,
    /// A binary frame; the protocol is JSON text.
    Binary,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// A WebSocket protocol violation.
    ProtocolError,
    /// No pong arrived within a ping interval.
    PingTimeout,
    /// A write to the client did not complete within `--write-timeout`.
    WriteTimeout,
    /// The connect-time subscriptions could not be made live.
    BrokerUnavailable,
}

impl CloseReason {
    /// The close code to send, or `None` when the peer is gone or already closed.
    pub fn code(self) -> Option<u16> {
        match self {
            CloseReason::PeerClosed | CloseReason::PeerGone | CloseReason::WriteTimeout => None,
            CloseReason::Shutdown => Some(1001),
            CloseReason::ProtocolError => Some(1002),
            CloseReason::Binary => Some(1003),
            CloseReason::InvalidUtf8 => Some(1007),
            CloseReason::TooLarge => Some(1009),
            CloseReason::PingTimeout => Some(1011),
            CloseReason::SlowConsumer | CloseReason::BrokerUnavailable => Some(1013),
        }
    }

    /// Label of the `reason` of `wsrelay_client_closes_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TooLarge => "too_large",
            CloseReason::Binary => "binary",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::BrokerUnavailable => "broker_unavailable",
        }
    }

    /// Short label for the close frame and for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "client closed",
            CloseReason::PeerGone => "connection lost",
            CloseReason::Shutdown => "node shutting down",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::TooLarge => "message too large",
            CloseReason::Binary => "binary frames are not supported",
            CloseReason::InvalidUtf8 => "invalid UTF-8",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::PingTimeout => "ping timeout",
            CloseReason::WriteTimeout => "write timeout",
            CloseReason::BrokerUnavailable => "broker unavailable",
        }
    }
}

/// A cheap-to-clone handle to one connection's outbound queue.
#[derive(Debug, Clone)]
pub struct ClientHandle {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    id: ConnId,
    tx: mpsc::Sender<Utf8Bytes>,
    reason: OnceLock<CloseReason>,
    closing: CancellationToken,
}

impl ClientHandle {
    /// A handle and the receiving end of its queue of `capacity` frames.
    pub fn new(id: ConnId, capacity: usize) -> (ClientHandle, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Shared {
            id,
            tx,
            reason: OnceLock::new(),
            closing: CancellationToken::new(),
        };
        (
            ClientHandle {
                shared: Arc::new(shared),
            },
            rx,
        )
    }

    /// The connection id.
    pub fn id(&self) -> ConnId {
        self.shared.id
    }

    /// Queues a frame without waiting. Returns `false` if the frame was not queued:
    /// the connection is closing, or its queue is full, in which case it is closed
    /// as a slow consumer.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        match self.shared.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the connection to close; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if self.shared.reason.set(reason).is_ok() {
            self.shared.closing.cancel();
        }
    }

    /// The reason the connection is closing, once one was given.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason.get().copied()
    }

    /// Resolves once [`close`](Self::close) has been called.
    pub async fn closing(&self) {
        self.shared.closing.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_closes_as_slow_consumer() {
        let (h, mut rx) = ClientHandle::new(1, 2);
        assert!(h.send("a".into()));
        assert!(h.send("b".into()));
        assert!(h.close_reason().is_none());
        assert!(!h.send("c".into()));
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));
        // The first reason sticks.
        h.close(CloseReason::Shutdown);
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(rx.try_recv().unwrap(), "a");
        assert_eq!(rx.try_recv().unwrap(), "b");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn close_codes() {
        assert_eq!(CloseReason::Shutdown.code(), Some(1001));
        assert_eq!(CloseReason::Binary.code(), Some(1003));
        assert_eq!(CloseReason::TooLarge.code(), Some(1009));
        assert_eq!(CloseReason::SlowConsumer.code(), Some(1013));
        assert_eq!(CloseReason::PeerGone.code(), None);
    }
}
