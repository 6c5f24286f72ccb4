//! The in-process broker: one node, no Redis. A publish is the local fan-out itself,
//! so it is accepted, ordered and delivered before `publish` returns.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;

use crate::metrics::Metrics;
use crate::registry::Registry;

/// Broker for a single node.
#[derive(Debug, Clone)]
pub struct MemoryBroker {
    registry: Registry,
    metrics: Arc<Metrics>,
}

impl MemoryBroker {
    /// A broker delivering straight into `registry`.
    pub fn new(registry: Registry, metrics: Arc<Metrics>) -> Self {
        metrics.broker_up.set(1);
        Self { registry, metrics }
    }

    /// Delivers the frame to the channel's local subscribers.
    pub fn publish(&self, channel: &str, frame: Utf8Bytes) {
        let delivered = self.registry.fanout(channel, &frame);
        self.metrics.messages_delivered.inc_by(delivered as u64);
    }
}
