//! The in-process broker: one node, no Redis. A publish is the local fan-out itself,
//! so it is accepted, ordered and delivered before `publish` returns.

use axum::extract::ws::Utf8Bytes;

use super::Local;

/// Broker for a single node.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    local: Local,
}

impl MemoryBroker {
    /// A broker delivering straight to this node's subscribers.
    pub fn new(local: Local) -> Self {
        local.metrics.broker_up.set(1);
        Self { local }
    }

    /// Delivers the frame to the channel's local subscribers.
    pub fn publish(&self, channel: &str, frame: Utf8Bytes, traceparent: &str) {
        self.local.deliver(channel, &frame, traceparent.as_bytes());
    }
}
