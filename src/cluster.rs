//! The cluster view's vocabulary: what a node announces of itself (id, version,
//! address, live counters and its channels) through the broker every few seconds,
//! and what `GET /api/nodes` and the cluster-wide `GET /api/channels` read back. An
//! announcement expires `--node-ttl` after it was made, so a node that stops
//! announcing (it died) leaves the view. The node makes the announcements
//! (`node::announce`, beside its heartbeat); the broker stores and reads them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_come_well_within_the_ttl() {
        assert_eq!(interval(Duration::from_secs(30)), Duration::from_secs(5));
        assert_eq!(interval(Duration::from_secs(3)), Duration::from_millis(500));
    }
}
