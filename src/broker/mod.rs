//! The broker: how a publication made on one node reaches the other nodes, and where
//! channel history lives.
//!
//! Two implementations behind one type: [`memory`] (in-process, one node, the
//! zero-setup default) and [`redis`] (Redis pub/sub and streams, any number of
//! nodes, on one Redis, several Redis shards, Sentinel groups or a Redis Cluster). The set is closed, so [`Broker`] is an enum rather than a trait object:
//! static dispatch and plain `async fn`s.
//!
//! Contract, for both (pinned by one test suite run against each, `tests/broker.rs`):
//! - The broker carries [`Publication`]s (raw data, publisher, position, trace
//!   context), never client frames. [`Broker::publish`] resolves once the publication
//!   is accepted for delivery to every node, or fails within `--broker-timeout`.
//!   Publishes awaited one after another are delivered in that order. On a channel
//!   with history it is stored and given the next offset atomically with being
//!   published, and the position is returned; with `publish-durability replicas:N`
//!   only once N replicas confirmed it, else [`BrokerError::NotDurable`] (the
//!   publication was stored on the master and delivered all the same).
//! - [`Broker::subscribe`] resolves once publications of the channel made from now on
//!   reach this node (the guarantee behind a `sub` ack).
//! - [`Broker::release`] tells the broker the channel may have lost its last local
//!   subscriber; the broker re-checks the registry and drops its interest.
//! - [`Broker::history`] reads a channel's position and stored publications.
//! - Incoming publications are handed to [`Delivery`] (the `delivery` module turns
//!   them into client frames, once per node, and queues them to local subscribers
//!   without waiting). On channels with history they arrive in offset order, each
//!   once: the Redis broker repairs its own gaps from the stream, and reports what it
//!   cannot repair with [`Delivery::gap`].
//!
//! This is the only module that talks to Redis.

pub mod memory;
mod presence;
pub(crate) mod recent;
pub mod redis;
mod tracker;

pub use presence::Entry as PresenceEntry;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::{Announcement, NodeInfo, Sample};
use crate::config::{ChannelOptions, Config, Topology};
use crate::delivery::Delivery;
use crate::publication::{Epoch, Position, Publication};
use recent::Tail;

/// Why a broker operation failed. `Timeout` and `Unavailable` mean "the request had
/// no effect that the client can rely on"; clients see them as `unavailable`.
/// `NotDurable` is a publish that did take effect, without the durability asked for;
/// clients see it as `not_durable`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// No answer within `--broker-timeout`.
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker refused or could not be reached.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// A publish with `publish-durability replicas:N`: stored on the master and
    /// delivered, but fewer than N replicas confirmed it within the time they had.
    #[error(
        "offset {} stored on the master but confirmed by {confirmed} of {wanted} replicas within {waited:?}; it may or may not survive a failover",
        position.offset
    )]
    NotDurable {
        /// The position the master gave the message.
        position: Position,
        /// Replicas that had to confirm it.
        wanted: u32,
        /// Replicas that did.
        confirmed: u32,
        /// How long they were waited for.
        waited: Duration,
    },
}

/// What to read from a channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HistoryRequest {
    /// Publications after this position (only when its epoch is current); `None`:
    /// the latest ones.
    pub since: Option<(Epoch, u64)>,
    /// Most publications to return; 0 reads only the position.
    pub limit: usize,
    /// All or nothing: return no publication when more than `limit` follow `since`
    /// (a recovery that cannot be complete is not attempted).
    pub all_or_nothing: bool,
    /// Made for a subscription (the node's or a client's): a channel that has no
    /// position yet gets one, so the position given stays valid until the first
    /// publish; nodes holding subscribers keep it alive, and it expires soon after
    /// the last one left (`--unpublished-position-ttl`). A plain read (`history`)
    /// writes nothing: it reports offset 0 in an epoch that is not kept.
    pub subscribing: bool,
    /// Most bytes of publications to return, each counted as its stored size
    /// ([`envelope::encoded_len`](crate::envelope::encoded_len)) plus
    /// [`READ_OVERHEAD`]: the reads of clients are bounded in bytes
    /// (`--max-history-bytes`), the node's own repairs are not (`None`). What does
    /// not fit is left out (all of it, when all or nothing) and the answer says
    /// [`History::truncated`].
    pub max_bytes: Option<usize>,
}

/// What each publication of a read counts on top of its stored size: about what
/// its client frame adds (`op`, `ch`, the offset's name).
pub const READ_OVERHEAD: usize = 64;

impl HistoryRequest {
    /// Only the channel's current position, for a subscription.
    pub fn position() -> Self {
        HistoryRequest {
            since: None,
            limit: 0,
            all_or_nothing: false,
            subscribing: true,
            max_bytes: None,
        }
    }
}

/// A channel's position and the publications read from its history, oldest first.
#[derive(Debug, Clone)]
pub struct History {
    /// The epoch and the offset of the latest publication (0: none yet).
    pub top: Position,
    /// Stored publications, in offset order.
    pub publications: Vec<Publication>,
    /// Publications were left out because they did not fit the read's `max_bytes`.
    pub truncated: bool,
}

/// A node's id and its channels with their local subscriber counts.
pub type NodeChannels = (String, Vec<(String, usize)>);

/// One Redis shard as readiness reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    /// `host:port`, `sentinel/<master>` or `cluster`.
    pub label: String,
    /// Why the shard is not usable (not connected, its delivery probe late);
    /// `None` while it is.
    pub problem: Option<String>,
    /// The round trip of its last delivery probe that came back.
    pub probe_rtt: Option<Duration>,
}

impl ShardState {
    /// Whether the shard is usable: connected, its delivery probe coming back.
    pub fn is_up(&self) -> bool {
        self.problem.is_none()
    }
}

/// The node's broker.
#[derive(Debug, Clone)]
pub enum Broker {
    /// In-process, single node.
    Memory(memory::MemoryBroker),
    /// Redis pub/sub, any number of nodes.
    Redis(redis::RedisBroker),
}

impl Broker {
    /// Builds the broker the configuration asks for. The Redis broker starts its
    /// subscriber task, which keeps (re)connecting until `shutdown` is cancelled; a
    /// Redis that is down at start-up only delays readiness.
    pub fn start(
        config: Arc<Config>,
        delivery: Delivery,
        shutdown: CancellationToken,
    ) -> Result<Broker, BrokerError> {
        // Checked with the rest of the configuration before the node starts.
        let invalid =
            |e: ::redis::RedisError| BrokerError::Unavailable(format!("invalid Redis URL: {e}"));
        let endpoints = match config.broker.topology() {
            Err(e) => return Err(BrokerError::Unavailable(e.to_string())),
            Ok(Topology::Memory) => {
                return Ok(Broker::Memory(memory::MemoryBroker::start(
                    delivery,
                    config.history.history_meta_ttl,
                    config.limits.max_channels,
                    shutdown,
                )));
            }
            Ok(Topology::Cluster(seeds)) => vec![redis::Endpoint::Cluster(seeds)],
            Ok(Topology::Shards(shards)) => shards
                .into_iter()
                .map(redis::Endpoint::of_shard)
                .collect::<Result<Vec<_>, _>>()
                .map_err(invalid)?,
        };
        Ok(Broker::Redis(redis::RedisBroker::start(
            endpoints, config, delivery, shutdown,
        )?))
    }

    /// Publishes to `channel` on every node; with history (`options`), stores it and
    /// returns the position it was given.
    pub async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        options: ChannelOptions,
    ) -> Result<Option<Position>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.publish(channel, publication, options)),
            Broker::Redis(b) => b.publish(channel, publication, options).await,
        }
    }

    /// Makes sure this node receives `channel`; resolves once that is live.
    pub async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(b) => b.subscribe(channel).await,
        }
    }

    /// Signals that `channel` may have no local subscribers left.
    pub fn release(&self, channel: &str) {
        match self {
            Broker::Memory(_) => {}
            Broker::Redis(b) => b.release(channel),
        }
    }

    /// What follows `since` in the run of `channel`'s recent publications this
    /// node keeps in memory, which ends at the last one it delivered (the Redis
    /// broker's cache, `recent`; the in-process broker's history is in memory
    /// already and needs none).
    pub(crate) fn cached(&self, channel: &str, since: &Position) -> Option<Tail> {
        match self {
            Broker::Memory(_) => None,
            Broker::Redis(b) => b.cached(channel, since),
        }
    }

    /// Whether a recovery of `channel` from `since` the cache cannot answer should
    /// read the channel's tail (once for every recovery of the channel waiting
    /// meanwhile) and fill the cache with it, rather than its own range; and how
    /// many bytes of it the cache would keep.
    pub fn caches(&self, channel: &str, since: &Position) -> Option<usize> {
        match self {
            Broker::Memory(_) => None,
            Broker::Redis(b) => b.caches(channel, since),
        }
    }

    /// Gives the cache of `channel` what a read of it returned.
    pub(crate) fn backfill(&self, channel: &str, history: &Tail) {
        if let Broker::Redis(b) = self {
            b.backfill(channel, history);
        }
    }

    /// Reads the position and stored publications of a channel with history.
    pub async fn history(
        &self,
        channel: &str,
        request: HistoryRequest,
    ) -> Result<History, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.history(channel, &request)),
            Broker::Redis(b) => b.history(channel, &request).await,
        }
    }

    /// Adds a local subscriber's entry to the channel's presence; resolves once every
    /// node would list it.
    pub async fn presence_add(
        &self,
        channel: &str,
        entry: PresenceEntry,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.presence.add(channel, entry);
                Ok(())
            }
            Broker::Redis(b) => b.presence_add(channel, entry).await,
        }
    }

    /// Removes a local subscriber's entry from the channel's presence.
    pub async fn presence_remove(&self, channel: &str, member: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.presence.remove(channel, member);
                Ok(())
            }
            Broker::Redis(b) => b.presence_remove(channel, member).await,
        }
    }

    /// Up to `max` entries of the channel's presence, cluster-wide, and how many
    /// there are.
    pub async fn presence(
        &self,
        channel: &str,
        max: usize,
    ) -> Result<(Vec<bytes::Bytes>, usize), BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.presence.list(channel, max)),
            Broker::Redis(b) => b.presence(channel, max).await,
        }
    }

    /// Clients and distinct users in the channel's presence, cluster-wide.
    pub async fn presence_stats(&self, channel: &str) -> Result<(usize, usize), BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.presence.stats(channel)),
            Broker::Redis(b) => b.presence_stats(channel).await,
        }
    }

    /// Publishes this node's announcement for the cluster view (it expires after
    /// `--node-ttl`).
    pub async fn announce(&self, announcement: Announcement) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.announce(announcement);
                Ok(())
            }
            Broker::Redis(b) => b.announce(announcement).await,
        }
    }

    /// The nodes whose announcement has not expired, by id.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b
                .announcement
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|a| a.info.clone())
                .collect()),
            Broker::Redis(b) => b.nodes().await,
        }
    }

    /// Each live node's channels with their local subscriber counts, by node id
    /// (summed by [`crate::cluster::channel_totals`]).
    pub async fn node_channels(&self) -> Result<Vec<NodeChannels>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.node_channels()),
            Broker::Redis(b) => b.node_channels().await,
        }
    }

    /// The samples of each live node's last announcements, oldest first, by node
    /// id: the admin page's charts.
    pub async fn node_history(&self) -> Result<Vec<(String, Vec<Sample>)>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.node_history()),
            Broker::Redis(b) => b.node_history().await,
        }
    }

    /// Hands a request for a streaming session to the node whose route is `route`
    /// (`<secret>` LF `<request>`, [`crate::streams::forwarded_payload`]): through
    /// that node's control channel in Redis; with the memory broker, to this node.
    /// Returns whether a node took it (none: the node is gone, or Redis dropped it).
    pub async fn forward(&self, route: &str, payload: Vec<u8>) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.forward(payload)),
            Broker::Redis(b) => b.forward(route, payload).await,
        }
    }

    /// Adds (or updates) a local connection among its user's connections,
    /// cluster-wide; `false` when the user has `max` (0: no limit) already.
    pub async fn user_add(
        &self,
        user: &str,
        entry: PresenceEntry,
        max: usize,
    ) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.user_add(user, entry, max)),
            Broker::Redis(b) => b.user_add(user, entry, max).await,
        }
    }

    /// Removes a local connection from its user's.
    pub async fn user_remove(&self, user: &str, member: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.users.remove(user, member);
                Ok(())
            }
            Broker::Redis(b) => b.user_remove(user, member).await,
        }
    }

    /// Every live connection of `user`, cluster-wide (entries as JSON).
    pub async fn user_connections(&self, user: &str) -> Result<Vec<bytes::Bytes>, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.users.list(user, usize::MAX).0),
            Broker::Redis(b) => b.user_connections(user).await,
        }
    }

    /// Sends a command of the server API to every node (through Redis: one
    /// publish, not a call per node); how many nodes received it.
    pub async fn command(&self, command: &crate::users::Command) -> Result<usize, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.command(command)),
            Broker::Redis(b) => b.command(command).await,
        }
    }

    /// Stores a revocation: one token by `jti`, or every token of `user` issued
    /// before `issued_before`; kept `ttl`.
    pub async fn revoke(
        &self,
        user: &str,
        jti: Option<&str>,
        issued_before: Option<u64>,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.revoke(user, jti, issued_before, ttl);
                Ok(())
            }
            Broker::Redis(b) => b.revoke(user, jti, issued_before, ttl).await,
        }
    }

    /// Whether a revocation covers this token of `user`.
    pub async fn is_revoked(
        &self,
        user: Option<&str>,
        token: &crate::auth::TokenId,
    ) -> Result<bool, BrokerError> {
        match self {
            Broker::Memory(b) => Ok(b.is_revoked(user, token)),
            Broker::Redis(b) => b.is_revoked(user, token).await,
        }
    }

    /// The state of each Redis shard, in `--redis-url` order (none for the memory
    /// broker, which is always usable): what readiness is decided from.
    pub fn shards(&self) -> Vec<ShardState> {
        match self {
            Broker::Memory(_) => Vec::new(),
            Broker::Redis(b) => b.shards(),
        }
    }

    /// Whether every shard is usable, so every channel can be served.
    pub fn all_shards_usable(&self) -> bool {
        self.shards().iter().all(ShardState::is_up)
    }

    /// `"memory"` or `"redis"`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }
}

/// Runs `round` every `period` (the first after one period) until shutdown, or until
/// the broker owning `state` is gone: the driver of the brokers' periodic rounds
/// (expiry sweeps, position checks, presence refreshes).
async fn every<T, F, Fut>(
    state: std::sync::Weak<T>,
    period: Duration,
    shutdown: CancellationToken,
    round: F,
) where
    F: Fn(Arc<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(state) = state.upgrade() else { return };
        round(state).await;
    }
}

/// The stored publications after `since` (all of them when `since` is `None`), given
/// the channel's current position, as both brokers answer a [`HistoryRequest`]:
/// `entries` are the publications the history holds, oldest first.
fn select<'a>(
    top: &Position,
    entries: impl DoubleEndedIterator<Item = &'a Publication>,
    request: &HistoryRequest,
) -> (Vec<Publication>, bool) {
    if request.limit == 0 {
        return (Vec::new(), false);
    }
    let mut budget = request.max_bytes.unwrap_or(usize::MAX);
    let mut truncated = false;
    let mut fits = |p: &Publication| {
        let size = crate::envelope::encoded_len(p) + READ_OVERHEAD;
        truncated |= size > budget;
        budget = budget.saturating_sub(size);
        !truncated
    };
    match &request.since {
        None => {
            let mut latest: Vec<Publication> = entries
                .rev()
                .take(request.limit)
                .take_while(|p| fits(p))
                .cloned()
                .collect();
            latest.reverse();
            (latest, truncated)
        }
        Some((epoch, offset)) => {
            if *epoch != top.epoch
                || (request.all_or_nothing
                    && top.offset.saturating_sub(*offset) > request.limit as u64)
            {
                return (Vec::new(), false);
            }
            let range: Vec<Publication> = entries
                .filter(|p| p.offset().is_some_and(|o| o > *offset))
                .take(request.limit)
                .take_while(|p| fits(p))
                .cloned()
                .collect();
            if truncated && request.all_or_nothing {
                return (Vec::new(), true);
            }
            (range, truncated)
        }
    }
}
