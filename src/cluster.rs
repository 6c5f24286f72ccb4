//! The cluster view's vocabulary: what a node announces of itself (id, version,
//! address, live counters, its Redis shards and its channels) through the broker
//! every announcement interval, and what `GET /api/nodes`, `GET /api/nodes/history`
//! and the cluster-wide `GET /api/channels` read back. The node makes the
//! announcements (`node::announce`, beside its heartbeat); the broker stores and
//! reads them.
//!
//! Two clocks end a node's place in the view. Its announcement expires `--node-ttl`
//! after it was made, and then the node is gone. Before that, a node not heard from
//! for more than two of its announcement intervals (by the reading node's clock) is
//! [`NodeState::Silent`]: it missed two announcements in a row, so it is most likely
//! dead, and its numbers are left out of the totals. Waiting the whole TTL would
//! show a dead node and count its connections for 30 s, during an incident.

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
    /// Whether it is draining (stopping). Defaults keep the announcements of nodes
    /// of an older version readable during a rolling upgrade.
    #[serde(default)]
    pub draining: bool,
    /// How often it announces itself, in milliseconds (0: not said, an older node).
    #[serde(default)]
    pub interval_ms: u64,
    /// Each Redis shard as this node sees it, in `--redis-url` order (none with the
    /// memory broker).
    #[serde(default)]
    pub shards: Vec<ShardInfo>,
}

/// One Redis shard as a node announces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// `host:port`, `sentinel/<master>` or `cluster`.
    pub shard: String,
    /// `up` or `down`.
    pub state: ShardHealth,
    /// Why it is down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The round trip of the last delivery probe that came back, in milliseconds
    /// (on a Redis Cluster, the slowest of its masters' probes); `null` before one
    /// came back.
    #[serde(default)]
    pub probe_rtt_ms: Option<f64>,
}

/// Whether a shard is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardHealth {
    /// Connected, its delivery probe coming back.
    Up,
    /// Not connected, or its probe late.
    Down,
}

/// A node's state in the view, as `/api/nodes` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Heard from, serving.
    #[serde(rename = "ready")]
    Ready,
    /// Heard from, not ready (see `/readyz`).
    #[serde(rename = "not ready")]
    NotReady,
    /// Heard from, stopping.
    #[serde(rename = "draining")]
    Draining,
    /// Not heard from for more than two announcement intervals: left out of the
    /// totals.
    #[serde(rename = "silent")]
    Silent,
}

impl NodeInfo {
    /// How long ago the node announced itself, by the reading node's clock `now_ms`
    /// (0 when its clock is ahead).
    pub fn heard_ms_ago(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.announced_at)
    }

    /// Its state at `now_ms`; `own_interval` stands for its announcement interval
    /// when it does not say it.
    pub fn state(&self, now_ms: u64, own_interval: Duration) -> NodeState {
        let interval = match self.interval_ms {
            0 => own_interval,
            ms => Duration::from_millis(ms),
        };
        if self.heard_ms_ago(now_ms) as u128 > silent_after(interval).as_millis() {
            NodeState::Silent
        } else if self.draining {
            NodeState::Draining
        } else if self.ready {
            NodeState::Ready
        } else {
            NodeState::NotReady
        }
    }
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

/// How long a node may go unheard before it is [`NodeState::Silent`]: two
/// announcement intervals. One missed announcement is a hiccup (a slow Redis, a
/// paused process); two in a row is a node to stop counting.
pub fn silent_after(interval: Duration) -> Duration {
    interval * 2
}

/// One node in `/api/nodes`: its announcement, its state and how long ago it was
/// heard from.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// The announcement, as the node made it.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its state, by the reading node's clock.
    pub state: NodeState,
    /// Milliseconds since its announcement, by the reading node's clock.
    pub heard_ms_ago: u64,
}

/// The cluster's totals over the nodes heard from.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Nodes in the view.
    pub nodes: usize,
    /// Nodes counted in the totals.
    pub counted: usize,
    /// The silent nodes, left out of the totals.
    pub left_out: Vec<String>,
    /// Connections of the counted nodes.
    pub connections: usize,
    /// Subscriptions of the counted nodes.
    pub subscriptions: usize,
    /// Publications per second of the counted nodes.
    pub published_per_s: f64,
    /// Deliveries per second of the counted nodes.
    pub delivered_per_s: f64,
}

/// The view of `nodes` at `now_ms` (see [`NodeInfo::state`]) and its totals.
pub fn view(nodes: Vec<NodeInfo>, now_ms: u64, own_interval: Duration) -> (Vec<NodeView>, Totals) {
    let mut totals = Totals {
        nodes: nodes.len(),
        ..Totals::default()
    };
    let views: Vec<NodeView> = nodes
        .into_iter()
        .map(|info| NodeView {
            state: info.state(now_ms, own_interval),
            heard_ms_ago: info.heard_ms_ago(now_ms),
            info,
        })
        .collect();
    for node in &views {
        if node.state == NodeState::Silent {
            totals.left_out.push(node.info.id.clone());
            continue;
        }
        totals.counted += 1;
        totals.connections += node.info.connections;
        totals.subscriptions += node.info.subscriptions;
        totals.published_per_s += node.info.published_per_s;
        totals.delivered_per_s += node.info.delivered_per_s;
    }
    (views, totals)
}

/// Each channel's subscribers summed over the nodes' channel counts (by node id),
/// leaving out the nodes in `left_out`; sorted by channel.
pub fn channel_totals(
    per_node: &[(String, Vec<(String, usize)>)],
    left_out: &[String],
) -> Vec<(String, usize)> {
    let mut total: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, channels) in per_node.iter().filter(|(id, _)| !left_out.contains(id)) {
        for (channel, count) in channels {
            *total.entry(channel).or_default() += count;
        }
    }
    total
        .into_iter()
        .map(|(channel, count)| (channel.to_owned(), count))
        .collect()
}

/// How far back the charts of the admin page go.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Most samples kept per node: the window at the default 5 s interval is 180; a
/// short `--node-ttl` (announcing several times a second) keeps less than the
/// window rather than an unbounded list.
const MAX_SAMPLES: usize = 1000;

/// How many samples of a node's announcements are kept for the charts: the
/// [`HISTORY_WINDOW`] at `interval`, at most [`MAX_SAMPLES`].
pub fn history_len(interval: Duration) -> usize {
    let per_window = HISTORY_WINDOW.as_millis() / interval.as_millis().max(1);
    (per_window as usize).clamp(1, MAX_SAMPLES)
}

/// One point of a node's charts: `[announced_at, connections, published_per_s,
/// delivered_per_s]` (a JSON array: a thousand of them per node stay small).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample(pub u64, pub usize, pub f64, pub f64);

impl From<&NodeInfo> for Sample {
    fn from(info: &NodeInfo) -> Sample {
        Sample(
            info.announced_at,
            info.connections,
            info.published_per_s,
            info.delivered_per_s,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_come_well_within_the_ttl() {
        assert_eq!(interval(Duration::from_secs(30)), Duration::from_secs(5));
        assert_eq!(
            interval(Duration::from_millis(3000)),
            Duration::from_millis(500)
        );
    }

    fn node(id: &str, announced_at: u64, connections: usize) -> NodeInfo {
        NodeInfo {
            id: id.to_owned(),
            version: "0".into(),
            started_at: 0,
            address: "127.0.0.1:1".into(),
            broker: "redis".into(),
            ready: true,
            connections,
            subscriptions: connections,
            channels: 1,
            published_per_s: 1.0,
            delivered_per_s: 2.0,
            announced_at,
            draining: false,
            interval_ms: 1000,
            shards: Vec::new(),
        }
    }

    #[test]
    fn a_node_unheard_for_two_intervals_is_silent_and_not_counted() {
        let second = Duration::from_secs(1);
        let now = 100_000;
        let (views, totals) = view(
            vec![
                node("a", now - 500, 2),
                node("b", now - 2000, 3),
                node("c", now - 2001, 4),
            ],
            now,
            second,
        );
        let states: Vec<NodeState> = views.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [NodeState::Ready, NodeState::Ready, NodeState::Silent]
        );
        assert_eq!(views[2].heard_ms_ago, 2001);
        assert_eq!(totals.nodes, 3);
        assert_eq!(totals.counted, 2);
        assert_eq!(totals.left_out, ["c"]);
        assert_eq!(totals.connections, 5);
        assert_eq!(totals.delivered_per_s, 4.0);
        let json = serde_json::to_value(&views[2]).unwrap();
        assert_eq!(json["state"], "silent");
        assert_eq!(json["id"], "c", "the announcement's fields stay at the top");
    }

    #[test]
    fn states_and_the_interval_of_an_older_node() {
        let mut n = node("a", 10_000, 1);
        n.draining = true;
        n.ready = false;
        assert_eq!(n.state(10_000, Duration::ZERO), NodeState::Draining);
        n.draining = false;
        assert_eq!(n.state(10_000, Duration::ZERO), NodeState::NotReady);
        // An announcement without its interval is judged by the reader's.
        n.interval_ms = 0;
        assert_eq!(n.state(13_000, Duration::from_secs(2)), NodeState::NotReady);
        assert_eq!(n.state(14_001, Duration::from_secs(2)), NodeState::Silent);
        // A reader whose clock is behind sees a fresh node.
        assert_eq!(n.heard_ms_ago(9_000), 0);
        let old = r#"{"id":"a","version":"0","started_at":0,"address":"x","broker":"redis",
            "ready":true,"connections":1,"subscriptions":1,"channels":1,
            "published_per_s":0.0,"delivered_per_s":0.0,"announced_at":5}"#;
        let parsed: NodeInfo = serde_json::from_str(old).unwrap();
        assert!(parsed.shards.is_empty() && !parsed.draining);
    }

    #[test]
    fn channel_totals_leave_out_silent_nodes() {
        let per_node = vec![
            (
                "a".to_owned(),
                vec![("x".to_owned(), 2), ("y".to_owned(), 1)],
            ),
            (
                "c".to_owned(),
                vec![("x".to_owned(), 5), ("z".to_owned(), 1)],
            ),
        ];
        assert_eq!(
            channel_totals(&per_node, &[]),
            [
                ("x".to_owned(), 7),
                ("y".to_owned(), 1),
                ("z".to_owned(), 1)
            ]
        );
        assert_eq!(
            channel_totals(&per_node, &["c".to_owned()]),
            [("x".to_owned(), 2), ("y".to_owned(), 1)]
        );
    }

    #[test]
    fn history_is_the_window_and_bounded() {
        assert_eq!(history_len(Duration::from_secs(5)), 180);
        assert_eq!(history_len(Duration::from_millis(250)), 1000);
        assert_eq!(history_len(Duration::from_secs(3600)), 1);
        assert_eq!(
            serde_json::to_string(&Sample(1, 2, 0.5, 3.0)).unwrap(),
            "[1,2,0.5,3.0]"
        );
    }
}
