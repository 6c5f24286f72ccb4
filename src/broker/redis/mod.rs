//! The Redis broker: one or more shards, each a standalone Redis or a Sentinel
//! group, or one Redis Cluster, carrying pub/sub, channel history and presence.
//!
//! - **Shards**: every channel lives on one shard, picked by `ring::shard_of` (a
//!   jump consistent hash of its name over the `--redis-url` list). Its pub/sub
//!   traffic, history and presence keys are all on that shard; a shard that is down
//!   makes only its own channels unavailable. Cluster-wide keys (the node
//!   announcements of the cluster view) live on the first shard.
//! - **Publishing** goes through one self-reconnecting multiplexed connection per
//!   shard (redis-rs `ConnectionManager`): one round trip per publish, and concurrent
//!   publishes of all sessions are pipelined on one socket. A session awaits each
//!   `PUBLISH` reply before it sends the next one, so one connection's messages reach
//!   Redis, and therefore every node, in the order they were sent.
//! - **Receiving**: one RESP3 subscriber connection per shard, owned by that shard's
//!   `subscriber` task, subscribed to the shard's channels that have local
//!   subscribers, and checked every second by a delivery probe.
//! - **Failover**: a Sentinel-managed shard follows its master (`endpoint`): both
//!   connections move to the new master, and history channels are repaired from the
//!   stream after the move. A Redis Cluster is one shard whose clients follow the
//!   slot map; its channels use sharded pub/sub (`conn`).
//! - **History**: a publish to a channel with history runs the publish script
//!   (`scripts`), which assigns the next offset, appends the envelope to the
//!   channel's stream (exactly `history-size` entries kept), refreshes the TTLs and
//!   PUBLISHes the same bytes, atomically: no message is published without being
//!   stored, or stored without an offset. Each channel has two keys,
//!   `<prefix>{<channel>}:stream` and `<prefix>{<channel>}:meta` (epoch and top
//!   offset). Scripts run by EVALSHA; redis-rs loads them again after `NOSCRIPT` (a
//!   restart, a failover or `SCRIPT FLUSH`).
//! - **Gap repair**: publications of history channels go through the `Tracker`,
//!   which delivers them in offset order, once, and asks for repairs (read from the
//!   stream by `repair_task`s) when offsets are missing: after a pub/sub drop and
//!   reconnect (positions are read on the new subscriber connection right after it
//!   re-SUBSCRIBEs), when a publication skips offsets, and when the periodic position
//!   check (`check_positions`) finds a quiet channel behind its stream.
//!
//! One file per feature: `publish` (the publish path), `history` (clients' reads),
//! `repair` (repair tasks, the position check, unpublished positions), `presence`,
//! `cluster_view` (announcements), `keys` (names), `subscriber` (each shard's
//! receiving task); `shard`, `endpoint`, `conn`, `probe`, `ring` and `scripts` are
//! what they use. This file holds the broker's shared state ([`Inner`]), its start,
//! and the subscription requests of sessions; the features are functions over
//! `&Inner`, so the state is defined, and changed under its locks, in one place.

mod cluster_view;
mod conn;
mod endpoint;
mod history;
mod keys;
mod presence;
mod probe;
mod publish;
mod repair;
mod ring;
mod scripts;
mod shard;
mod subscriber;
mod users;

pub use endpoint::Endpoint;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::conn::PubSub;
use self::keys::Keys;
use self::shard::Shard;
use super::recent::{Budget, Retention};
use super::tracker::Tracker;
use super::{BrokerError, Delivery, History, HistoryRequest, every};
use crate::broker::recent::Tail;
use crate::cluster::{Announcement, NodeInfo, Sample};
use crate::config::{ChannelOptions, Config};
use crate::publication::{Position, Publication};

/// Channels per SUBSCRIBE/UNSUBSCRIBE command when many change at once (after a
/// reconnect): large enough to resubscribe thousands of channels in a few round
/// trips, small enough to keep each command short.
const SUBSCRIBE_BATCH: usize = 256;
/// How often each subscriber connection is checked (PING or ROLE) and a delivery
/// probe is sent, so a Redis that stalls, vanishes without closing the TCP
/// connection, or stops delivering is noticed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnect backoff: first delay and cap (jittered).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Handle to the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

/// The broker's state, shared by its handle, the shards' subscriber tasks, the
/// periodic rounds and the repair tasks.
struct Inner {
    /// In `--redis-url` order: the channel hash indexes this list. One shard for a
    /// Redis Cluster (its client routes by slot).
    shards: Vec<Arc<Shard>>,
    /// Classic or sharded pub/sub (a cluster): the same for every shard.
    pubsub: PubSub,
    keys: Keys,
    /// This node's control channel (see `keys::control`), on the first shard.
    control: String,
    /// The cluster-wide control channel of the server API's commands on users
    /// (see `keys::users_control`), on the first shard beside `control`.
    users_control: String,
    /// Whether the first shard's current subscriber connection has both control
    /// channels subscribed (the subscriber task retries until it has).
    control_live: std::sync::atomic::AtomicBool,
    timeout: Duration,
    config: Arc<Config>,
    delivery: Delivery,
    /// The last offset delivered per history channel, and the repairs.
    tracker: Tracker,
    /// This node's presence entries, registered in Redis and refreshed there.
    presence: super::presence::Table,
    /// Presence entries waiting for their shard's writer (`presence::writer`).
    presence_writes: presence::Writes,
    /// This node's connections with a user, by user, registered in Redis and
    /// refreshed there (with the presence entries).
    users: super::presence::Table,
    /// Ends repair tasks with the node.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards: Vec<&str> = self.shards.iter().map(|s| s.label.as_str()).collect();
        f.debug_struct("RedisBroker")
            .field("keys", &self.keys)
            .field("shards", &shards)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Opens the publishing connections and starts each shard's subscriber task (and,
    /// for Sentinel-managed shards, the failover watch), the position check and the
    /// presence refresh.
    pub fn start(
        endpoints: Vec<Endpoint>,
        config: Arc<Config>,
        delivery: Delivery,
        shutdown: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let prefix = config.broker.redis_prefix.clone();
        let timeout = config.broker.broker_timeout;
        let Some(pubsub) = endpoints.first().map(Endpoint::pubsub) else {
            return Err(BrokerError::Unavailable("no Redis URL".into()));
        };
        if endpoints.len() > 1 && pubsub == PubSub::Sharded {
            return Err(BrokerError::Unavailable(
                "a Redis Cluster is one shard of its own".into(),
            ));
        }
        let mut shards = Vec::with_capacity(endpoints.len());
        for (index, endpoint) in endpoints.into_iter().enumerate() {
            shards.push(Arc::new(Shard::new(
                index,
                endpoint,
                &prefix,
                timeout,
                config.any_durable(),
            )?));
        }
        // A repair buffers what arrives meanwhile like a client's queue would.
        let tracker = Tracker::new(
            delivery.clone(),
            config.limits.client_queue,
            config.history.max_recovery as u64,
            Budget::new(config.history.history_cache_bytes, delivery.metrics.clone()),
            Retention::new({
                let config = config.clone();
                move |channel| {
                    let options = config.channel_options(channel);
                    (options.history_size, options.history_ttl)
                }
            }),
        );
        delivery.metrics.broker_up.set(0);
        for shard in &shards {
            delivery.metrics.broker_shard_up(&shard.label, false);
        }
        let keys = Keys::new(prefix, pubsub);
        let shard_count = shards.len();
        let inner = Arc::new(Inner {
            shards,
            pubsub,
            control: keys.control(delivery.streams.route()),
            users_control: keys.users_control(),
            keys,
            control_live: Default::default(),
            timeout,
            delivery,
            tracker,
            presence: Default::default(),
            presence_writes: presence::Writes::new(shard_count),
            users: Default::default(),
            shutdown: shutdown.clone(),
            config,
        });
        for shard in &inner.shards {
            tokio::spawn(subscriber::run(
                inner.clone(),
                shard.clone(),
                shutdown.clone(),
            ));
            tokio::spawn(endpoint::watch(
                shard.endpoint.clone(),
                shard.kick.clone(),
                shutdown.clone(),
            ));
        }
        if inner.config.any_history() {
            let period = inner.config.history.position_check_interval;
            let weak = Arc::downgrade(&inner);
            tokio::spawn(every(
                weak,
                period,
                shutdown.clone(),
                repair::check_positions,
            ));
            let period = inner.config.history.unpublished_position_ttl / 3;
            let weak = Arc::downgrade(&inner);
            tokio::spawn(every(
                weak,
                period,
                shutdown.clone(),
                repair::keep_unpublished,
            ));
        }
        if inner.config.any_presence() {
            for shard in 0..inner.shards.len() {
                tokio::spawn(presence::writer(
                    Arc::downgrade(&inner),
                    shard,
                    shutdown.clone(),
                ));
            }
        }
        // Presence entries and the users' connection entries expire alike, and are
        // refreshed in one round.
        let period = inner.config.presence.presence_ttl / 3;
        let weak = Arc::downgrade(&inner);
        tokio::spawn(every(weak, period, shutdown, |inner| async move {
            if inner.config.any_presence() {
                presence::refresh_presence(inner.clone()).await;
            }
            users::refresh_users(&inner).await;
        }));
        Ok(Self { inner })
    }

    /// Sends a publication to every node subscribed to `channel`; on a channel with
    /// history, stores it first (one script) and returns its position.
    pub async fn publish(
        &self,
        channel: &str,
        publication: Publication,
        options: ChannelOptions,
    ) -> Result<Option<Position>, BrokerError> {
        publish::publish(&self.inner, channel, publication, options).await
    }

    /// Reads a channel's position and stored publications, for a client.
    pub async fn history(
        &self,
        channel: &str,
        request: &HistoryRequest,
    ) -> Result<History, BrokerError> {
        history::history(&self.inner, channel, request).await
    }

    /// Registers a local subscriber's presence entry in Redis.
    pub async fn presence_add(
        &self,
        channel: &str,
        entry: super::presence::Entry,
    ) -> Result<(), BrokerError> {
        presence::presence_add(&self.inner, channel, entry).await
    }

    /// Removes a local subscriber's presence entry from Redis.
    pub async fn presence_remove(&self, channel: &str, member: &str) -> Result<(), BrokerError> {
        presence::presence_remove(&self.inner, channel, member).await
    }

    /// Up to `max` entries of a channel's presence (0: all), and how many there are.
    pub async fn presence(
        &self,
        channel: &str,
        max: usize,
    ) -> Result<(Vec<bytes::Bytes>, usize), BrokerError> {
        presence::presence(&self.inner, channel, max).await
    }

    /// Clients and distinct users of a channel's presence.
    pub async fn presence_stats(&self, channel: &str) -> Result<(usize, usize), BrokerError> {
        presence::presence_stats(&self.inner, channel).await
    }

    /// Writes this node's announcement for the cluster view.
    pub async fn announce(&self, announcement: Announcement) -> Result<(), BrokerError> {
        cluster_view::announce(&self.inner, announcement).await
    }

    /// Forwards a request to the node of `route`'s control channel (on the first
    /// shard); whether a node received it.
    pub async fn forward(&self, route: &str, payload: Vec<u8>) -> Result<bool, BrokerError> {
        publish::forward(&self.inner, route, payload).await
    }

    /// Adds (or updates) a local connection among its user's; `false` when the
    /// user has `max` (0: no limit) already.
    pub async fn user_add(
        &self,
        user: &str,
        entry: super::presence::Entry,
        max: usize,
    ) -> Result<bool, BrokerError> {
        users::user_add(&self.inner, user, entry, max).await
    }

    /// Removes a local connection from its user's.
    pub async fn user_remove(&self, user: &str, member: &str) -> Result<(), BrokerError> {
        users::user_remove(&self.inner, user, member).await
    }

    /// Every live connection of `user`, cluster-wide.
    pub async fn user_connections(&self, user: &str) -> Result<Vec<bytes::Bytes>, BrokerError> {
        users::user_connections(&self.inner, user).await
    }

    /// Sends a command of the server API to every node; how many received it.
    pub async fn command(&self, command: &crate::users::Command) -> Result<usize, BrokerError> {
        users::command(&self.inner, command).await
    }

    /// Stores a revocation (see `users::revoke`).
    pub async fn revoke(
        &self,
        user: &str,
        jti: Option<&str>,
        issued_before: Option<u64>,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        users::revoke(&self.inner, user, jti, issued_before, ttl).await
    }

    /// Whether a revocation covers this token of `user`.
    pub async fn is_revoked(
        &self,
        user: Option<&str>,
        token: &crate::auth::TokenId,
    ) -> Result<bool, BrokerError> {
        users::is_revoked(&self.inner, user, token).await
    }

    /// The live nodes' announcements, by id.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        cluster_view::nodes(&self.inner).await
    }

    /// Each live node's channels with their local subscriber counts.
    pub async fn node_channels(&self) -> Result<Vec<super::NodeChannels>, BrokerError> {
        cluster_view::node_channels(&self.inner).await
    }

    /// The samples of each live node's last announcements, oldest first.
    pub async fn node_history(&self) -> Result<Vec<(String, Vec<Sample>)>, BrokerError> {
        cluster_view::node_history(&self.inner).await
    }

    /// Resolves once `channel` is subscribed on the node's Redis connection. The
    /// caller has already added its subscriber to the registry.
    pub async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let shard = inner.shard(channel);
        let rx = {
            let mut state = shard.lock();
            if shard.is_connected() && state.live.contains(channel) {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            let waiters = state.waiters.entry(channel.to_owned()).or_default();
            waiters.retain(|w| !w.is_closed());
            waiters.push(tx);
            state.mark_dirty(shard.is_connected(), channel);
            rx
        };
        shard.wake.notify_one();
        let waited = tokio::time::timeout(inner.timeout, rx).await;
        let result = match waited {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => Err(BrokerError::Unavailable("subscription abandoned".into())),
            Err(_) => Err(BrokerError::Timeout(inner.timeout)),
        };
        // Our waiter is gone with the timeout. Drop it now rather than when the
        // channel is next asked for: during an outage a client could otherwise grow
        // the map with a new channel name every timeout.
        let mut state = shard.lock();
        if let Some(waiters) = state.waiters.get_mut(channel) {
            waiters.retain(|w| !w.is_closed());
            if waiters.is_empty() {
                state.waiters.remove(channel);
            }
        }
        result
    }

    /// What follows `since` in the run of `channel`'s recent publications this
    /// node keeps, which ends at the last one it delivered (see `recent`).
    pub(crate) fn cached(&self, channel: &str, since: &Position) -> Option<Tail> {
        self.inner.tracker.cached(channel, since)
    }

    /// Whether a recovery of `channel` from `since` may read its tail to fill the
    /// cache, and how many bytes of it the cache would keep.
    pub fn caches(&self, channel: &str, since: &Position) -> Option<usize> {
        self.inner.tracker.caches(channel, since)
    }

    /// Puts what a read of `channel` returned in front of its cached run, where it
    /// meets it.
    pub(crate) fn backfill(&self, channel: &str, history: &Tail) {
        self.inner.tracker.backfill(channel, history);
    }

    /// Marks `channel` for re-checking: if it has no local subscribers left, the
    /// subscriber task UNSUBSCRIBEs it.
    pub fn release(&self, channel: &str) {
        // The flag is read under the state lock, where (dis)connecting changes it.
        let shard = self.inner.shard(channel);
        let mut state = shard.lock();
        state.mark_dirty(shard.is_connected(), channel);
        drop(state);
        shard.wake.notify_one();
    }

    /// Each shard's state (connected, its delivery probe coming back), in
    /// `--redis-url` order.
    pub fn shards(&self) -> Vec<super::ShardState> {
        self.inner
            .shards
            .iter()
            .map(|s| super::ShardState {
                label: s.label.clone(),
                problem: s.problem(),
                probe_rtt: s.probes.last_rtt(),
            })
            .collect()
    }
}

impl Inner {
    /// The shard `channel` lives on.
    fn shard(&self, channel: &str) -> &Arc<Shard> {
        &self.shards[ring::shard_of(channel, self.shards.len())]
    }

    /// The shard of the cluster-wide keys (node announcements): the first one.
    fn home(&self) -> &Arc<Shard> {
        &self.shards[0]
    }
}

/// Whole milliseconds, at least 1 (a Redis timeout of 0 means "forever").
fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

/// Exponential backoff with jitter, so a fleet of nodes does not reconnect in step.
#[derive(Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let exp = BACKOFF_MIN.saturating_mul(1 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(BACKOFF_MAX);
        // Between half and all of the capped delay.
        capped.mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    #[tokio::test]
    async fn subscribing_during_an_outage_leaves_nothing_behind() {
        // Nothing listens here: every subscribe times out.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let delivery = Delivery::for_tests(Registry::new());
        let shutdown = CancellationToken::new();
        let url = format!("redis://127.0.0.1:{port}");
        let config = crate::Config::load_from([
            "wsrelay",
            "--redis-url",
            url.as_str(),
            "--broker-timeout",
            "20ms",
        ])
        .unwrap();
        let broker = RedisBroker::start(
            vec![Endpoint::of_shard(crate::config::ShardAddress::parse(&url).unwrap()).unwrap()],
            Arc::new(config),
            delivery,
            shutdown.clone(),
        )
        .unwrap();
        for i in 0..20 {
            let channel = format!("fresh-{i}");
            assert!(broker.subscribe(&channel).await.is_err());
            broker.release(&channel);
        }
        let state = broker.inner.shards[0].lock();
        assert!(
            state.waiters.is_empty(),
            "{} channels of abandoned waiters",
            state.waiters.len()
        );
        assert!(
            state.dirty.is_empty(),
            "{} dirty channels",
            state.dirty.len()
        );
        drop(state);
        shutdown.cancel();
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        let later: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(later.last().unwrap() >= &(BACKOFF_MAX / 2));
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }
}
