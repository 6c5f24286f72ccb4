//! The in-process broker: one node, no Redis. A publish is the local fan-out itself,
//! so it is accepted, ordered and delivered before `publish` returns.

use axum::extract::ws::Utf8Bytes;

use crate::registry::Registry;

/// Broker for a single node.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    registry: Registry,
}

impl MemoryBroker {
    /// A broker delivering straight into `registry`.
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// Delivers the frame to the channel's local subscribers.
    pub fn publish(&self, channel: &str, frame: Utf8Bytes) {
        self.registry.fanout(channel, &frame);
    }
}
