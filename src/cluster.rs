//! The cluster view: every node announces itself (id, version, address, live
//! counters and its channels) through the broker every few seconds, and reads the
//! announcements of the others for `GET /api/nodes` and the cluster-wide
//! `GET /api/channels`. An announcement expires `--node-ttl` after it was made, so a
//! node that stops announcing (it died) leaves the view.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::envelope;
use crate::hub::Hub;
use crate::readiness::Readiness;

/// What one node says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node id (`--node-id`).
    pub id: String,
    /// The wsrelay version it runs.
    pub version: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_at: u64,
    /// The address it listens on.
    pub address: String,
    /// `memory` or `redis`.
    pub broker: String,
    /// Whether it answers `/readyz` with 200 (so with `--ready-requires any-shard`,
    /// true while a shard is down but another one is usable).
    pub ready: bool,
    /// Open WebSocket connections.
    pub connections: usize,
    /// (connection, channel) subscriptions.
    pub subscriptions: usize,
    /// Channels with local subscribers.
    pub channels: usize,
    /// Messages its clients published per second, over the last interval.
    pub published_per_s: f64,
    /// Messages it queued to its clients per second, over the last interval.
    pub delivered_per_s: f64,
    /// When it made this announcement, in milliseconds since the Unix epoch.
    pub announced_at: u64,
}

/// A node's announcement: its info and its channels with their local subscriber
/// counts.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// What the node says of itself.
    pub info: NodeInfo,
    /// Channels with local subscribers, and how many.
    pub channels: Vec<(String, usize)>,
}

/// How often a node announces itself: a sixth of `--node-ttl`, at most 5 s, so a live
/// node never drops out of the view between two announcements.
pub(crate) fn interval(node_ttl: Duration) -> Duration {
    (node_ttl / 6).min(Duration::from_secs(5))
}

/// Announces this node until shutdown.
pub(crate) async fn announce(hub: Arc<Hub>, address: SocketAddr) {
    let started_at = envelope::now_us() / 1000;
    let period = interval(hub.config.presence.node_ttl);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (
        std::time::Instant::now(),
        hub.metrics.messages_published.get(),
        hub.metrics.messages_delivered.get(),
    );
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::Instant::now();
        let (published, delivered) = (
            hub.metrics.messages_published.get(),
            hub.metrics.messages_delivered.get(),
        );
        let elapsed = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let stats = hub.registry.stats();
        let announcement = Announcement {
            info: NodeInfo {
                id: hub.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at,
                address: address.to_string(),
                broker: hub.broker.kind().to_owned(),
                ready: Readiness::of(&hub).is_ready(),
                connections: stats.connections,
                subscriptions: stats.subscriptions,
                channels: stats.channels,
                published_per_s: (published - last.1) as f64 / elapsed,
                delivered_per_s: (delivered - last.2) as f64 / elapsed,
                announced_at: envelope::now_us() / 1000,
            },
            channels: hub.registry.channel_counts(),
        };
        last = (now, published, delivered);
        if let Err(e) = hub.broker.announce(announcement).await {
            tracing::debug!(error = %e, "could not announce this node");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_come_well_within_the_ttl() {
        assert_eq!(interval(Duration::from_secs(30)), Duration::from_secs(5));
        assert_eq!(interval(Duration::from_secs(3)), Duration::from_millis(500));
    }
}
