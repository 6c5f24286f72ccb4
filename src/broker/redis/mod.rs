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

mod conn;
mod endpoint;
mod probe;
mod ring;
mod scripts;
mod shard;
mod subscriber;

pub use endpoint::Endpoint;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use self::conn::{Conn, PubSub};
use self::scripts::{
    HISTORY_SCRIPT, KEEP_UNPUBLISHED_LUA, PRESENCE_SCRIPT, PRUNE_LUA, PUBLISH_SCRIPT,
};
use self::shard::Shard;
use super::tracker::{Repair, Tracker};
use super::{BrokerError, History, HistoryRequest, Local, every};
use crate::config::{ChannelOptions, Config, Durability};
use crate::envelope;
use crate::publication::{Epoch, Kind, Position, Publication};

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
/// How long a publish that a Redis Cluster node did not run (`MOVED`, `ASK`,
/// `TRYAGAIN`, `CLUSTERDOWN`) waits before it is sent again: long enough for the
/// client to refresh its slot map, short against a failover or a slot migration.
const REDIRECT_PAUSE: Duration = Duration::from_millis(20);
/// Quiet channels per pipelined batch of the position check.
const CHECK_BATCH: usize = 1000;
/// Presence entries per pipelined batch of the refresh: one round trip each, and
/// a yield between batches, so a channel of 100,000 subscribers neither blocks the
/// node nor sends one huge pipeline.
const REFRESH_BATCH: usize = 500;

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
    prefix: String,
    timeout: Duration,
    config: Arc<Config>,
    local: Local,
    /// The last offset delivered per history channel, and the repairs.
    tracker: Tracker,
    /// This node's presence entries, registered in Redis and refreshed there.
    presence: super::presence::Table,
    /// Ends repair tasks with the node.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shards: Vec<&str> = self.shards.iter().map(|s| s.label.as_str()).collect();
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
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
        local: Local,
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
            local.clone(),
            config.limits.client_queue,
            config.history.max_recovery as u64,
        );
        local.metrics.broker_up.set(0);
        for shard in &shards {
            local.metrics.broker_shard_up(&shard.label, false);
        }
        let inner = Arc::new(Inner {
            shards,
            pubsub,
            prefix,
            timeout,
            local,
            tracker,
            presence: Default::default(),
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
            tokio::spawn(every(weak, period, shutdown.clone(), check_positions));
            let period = inner.config.history.unpublished_position_ttl / 3;
            let weak = Arc::downgrade(&inner);
            tokio::spawn(every(weak, period, shutdown.clone(), keep_unpublished));
        }
        if inner.config.any_presence() {
            let period = inner.config.presence.presence_ttl / 3;
            let weak = Arc::downgrade(&inner);
            tokio::spawn(every(weak, period, shutdown, refresh_presence));
        }
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
        let inner = &self.inner;
        let started = std::time::Instant::now();
        let shard = inner.shard(channel);
        let key = inner.key(channel);
        let published = if options.has_history() {
            let head = envelope::head(&publication);
            // EVALSHA of the publish script (see `scripts`).
            let mut evalsha = redis::cmd("EVALSHA");
            evalsha
                .arg(PUBLISH_SCRIPT.get_hash())
                .arg(2)
                .arg(inner.history_key(channel, "stream"))
                .arg(inner.history_key(channel, "meta"))
                .arg(&key)
                .arg(head.as_bytes())
                .arg(&publication.data[..])
                .arg(options.history_size)
                .arg(millis(options.history_ttl))
                .arg(millis(inner.config.history.history_meta_ttl))
                .arg(Epoch::random().as_str())
                .arg(inner.pubsub.publish());
            let position = |(offset, epoch): (u64, String)| {
                let epoch = Epoch::parse(&epoch).ok_or_else(|| {
                    BrokerError::Unavailable(format!("Redis returned a malformed epoch {epoch:?}"))
                })?;
                Ok(Position { epoch, offset })
            };
            match options.durability {
                Durability::Leader => {
                    let mut conn = shard.publisher_once()?;
                    let publish = async {
                        let stored = run_once(&mut conn, Some(&PUBLISH_SCRIPT), |mut conn| {
                            let evalsha = &evalsha;
                            async move { evalsha.query_async(&mut conn).await }
                        })
                        .await
                        .map_err(|e| shard.failed(e))?;
                        Ok(Some(position(stored)?))
                    };
                    tokio::time::timeout(inner.timeout, publish).await
                }
                Durability::Replicas(wanted) => {
                    // WAIT counts the replicas that acknowledged every write made so
                    // far on the connection it is sent on. Sent in one pipeline with
                    // the script, it is on the script's connection whatever happens
                    // (a reconnect between the two would make a WAIT on a fresh
                    // connection, with nothing to wait for, succeed at once), and on
                    // a Redis Cluster it goes where the script goes: redis-rs routes a
                    // pipeline by its first command with a key (alone, WAIT would go
                    // to every master).
                    let mut conn = shard.durable_publisher()?;
                    let waited = replica_wait(inner.timeout);
                    // One budget for the replicas: after a NOSCRIPT, the WAIT that
                    // ran with the failed script may have used it up already.
                    let deadline = std::time::Instant::now() + waited;
                    let request = |mut conn: Conn| {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        let mut pipe = redis::pipe();
                        pipe.add_command(evalsha.clone())
                            .cmd("WAIT")
                            .arg(wanted.get())
                            .arg(millis(left));
                        async move { pipe.query_async(&mut conn).await }
                    };
                    let publish = async {
                        let (stored, confirmed): ((u64, String), u32) =
                            run_once(&mut conn, Some(&PUBLISH_SCRIPT), request)
                                .await
                                .map_err(|e| shard.failed(e))?;
                        let position = position(stored)?;
                        if confirmed < wanted.get() {
                            return Err(BrokerError::NotDurable {
                                position,
                                wanted: wanted.get(),
                                confirmed,
                                waited,
                            });
                        }
                        Ok(Some(position))
                    };
                    tokio::time::timeout(inner.timeout, publish).await
                }
            }
        } else {
            let mut conn = shard.publisher_once()?;
            let payload =
                if inner.config.broker.legacy_envelopes && publication.kind == Kind::Message {
                    let frame = crate::protocol::encode_publication(channel, &publication);
                    envelope::encode_v1(frame.as_bytes(), &publication)
                } else {
                    envelope::encode(&publication)
                };
            let mut publish = redis::cmd(inner.pubsub.publish());
            publish.arg(&key).arg(&payload[..]);
            let publish = async {
                run_once(&mut conn, None, |mut conn| {
                    let publish = &publish;
                    async move { publish.query_async::<i64>(&mut conn).await }
                })
                .await
                .map(|_receivers| None)
                .map_err(|e| shard.failed(e))
            };
            tokio::time::timeout(inner.timeout, publish).await
        };
        match published {
            Ok(result) => {
                inner
                    .local
                    .metrics
                    .redis_publish_latency
                    .observe(started.elapsed().as_secs_f64());
                result
            }
            Err(_) => Err(BrokerError::Timeout(inner.timeout)),
        }
    }

    /// Reads a channel's position and stored publications, for a client (a
    /// subscription, a recovery, a `history` request): on the shard's connection
    /// for reads, so large answers do not hold up publishes.
    pub async fn history(
        &self,
        channel: &str,
        request: &HistoryRequest,
    ) -> Result<History, BrokerError> {
        let inner = &self.inner;
        inner
            .shard(channel)
            .read(|mut conn| async move { inner.read_history(&mut conn, channel, request).await })
            .await
    }

    /// Registers a local subscriber's presence entry in Redis.
    pub async fn presence_add(
        &self,
        channel: &str,
        entry: super::presence::Entry,
    ) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let member = entry.member.clone();
        let mut pipe = redis::pipe();
        pipe.atomic();
        inner.add_presence_commands(&mut pipe, channel, std::slice::from_ref(&entry));
        inner.presence.add(channel, entry);
        let result = inner.shard(channel).run(&pipe).await;
        if result.is_err() {
            inner.presence.remove(channel, &member);
        }
        result
    }

    /// Removes a local subscriber's presence entry from Redis (if the removal fails,
    /// the entry expires: this node no longer refreshes it).
    pub async fn presence_remove(&self, channel: &str, member: &str) -> Result<(), BrokerError> {
        let inner = &self.inner;
        if !inner.presence.remove(channel, member) {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL")
            .arg(inner.presence_key(channel, "presence"))
            .arg(member)
            .ignore()
            .cmd("ZREM")
            .arg(inner.presence_key(channel, "presence-exp"))
            .arg(member)
            .ignore();
        inner.shard(channel).run(&pipe).await
    }

    /// Up to `max` entries of a channel's presence (0: all), and how many there are.
    pub async fn presence(
        &self,
        channel: &str,
        max: usize,
    ) -> Result<(Vec<Bytes>, usize), BrokerError> {
        let inner = &self.inner;
        let (total, entries) = inner
            .shard(channel)
            .idempotent(|mut conn| async move {
                let mut script = PRESENCE_SCRIPT.prepare_invoke();
                script
                    .key(inner.presence_key(channel, "presence"))
                    .key(inner.presence_key(channel, "presence-exp"))
                    .arg(envelope::now_us() / 1000)
                    .arg(max);
                script
                    .invoke_async::<(usize, Vec<Vec<u8>>)>(&mut conn)
                    .await
            })
            .await?;
        Ok((entries.into_iter().map(Bytes::from).collect(), total))
    }

    /// Clients and distinct users of a channel's presence.
    pub async fn presence_stats(&self, channel: &str) -> Result<(usize, usize), BrokerError> {
        #[derive(serde::Deserialize)]
        struct User {
            user: Option<String>,
        }
        let (entries, total) = self.presence(channel, 0).await?;
        let users: Vec<Option<String>> = entries
            .iter()
            .map(|e| serde_json::from_slice::<User>(e).ok().and_then(|u| u.user))
            .collect();
        let users = super::presence::count_users(users.iter().map(Option::as_deref));
        Ok((total, users))
    }

    /// Writes this node's announcement: its info (expiring after `--node-ttl`, and
    /// listed in the nodes sorted set with that expiry) and its channel counts, in
    /// one transaction, so readers never see half of it.
    pub async fn announce(
        &self,
        announcement: crate::cluster::Announcement,
    ) -> Result<(), BrokerError> {
        let inner = &self.inner;
        let ttl = millis(inner.config.presence.node_ttl);
        let id = &announcement.info.id;
        let info = serde_json::to_vec(&announcement.info)
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        let channels_key = inner.node_key(&format!("node-channels:{id}"));
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(inner.node_key(&format!("node:{id}")))
            .arg(info)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("ZADD")
            .arg(inner.node_key("nodes"))
            .arg(envelope::now_us() / 1000 + ttl)
            .arg(id)
            .ignore()
            .cmd("DEL")
            .arg(&channels_key)
            .ignore();
        for chunk in announcement.channels.chunks(1000) {
            let hset = pipe.cmd("HSET").arg(&channels_key);
            for (channel, count) in chunk {
                hset.arg(channel).arg(count);
            }
            hset.ignore();
        }
        pipe.cmd("PEXPIRE").arg(&channels_key).arg(ttl).ignore();
        inner.home().run(&pipe).await
    }

    /// The ids of the nodes whose announcement has not expired (expired ones are
    /// dropped from the set on the way).
    async fn live_nodes(&self) -> Result<Vec<String>, BrokerError> {
        let inner = &self.inner;
        let key = inner.node_key("nodes");
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(envelope::now_us() / 1000)
            .ignore()
            .cmd("ZRANGE")
            .arg(&key)
            .arg(0)
            .arg(-1);
        let pipe = &pipe;
        let (ids,) = inner
            .home()
            .idempotent(
                |mut conn| async move { pipe.query_async::<(Vec<String>,)>(&mut conn).await },
            )
            .await?;
        Ok(ids)
    }

    /// The live nodes' announcements, by id.
    pub async fn nodes(&self) -> Result<Vec<crate::cluster::NodeInfo>, BrokerError> {
        let inner = &self.inner;
        let ids = self.live_nodes().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids
            .iter()
            .map(|id| inner.node_key(&format!("node:{id}")))
            .collect();
        let mut mget = redis::cmd("MGET");
        mget.arg(&keys);
        let mget = &mget;
        let infos = inner
            .home()
            .idempotent(|mut conn| async move {
                mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await
            })
            .await?;
        let mut nodes: Vec<crate::cluster::NodeInfo> = infos
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_slice(&json).ok())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// Channels with subscribers on any live node, with the sum of their counts.
    pub async fn cluster_channels(&self) -> Result<Vec<(String, usize)>, BrokerError> {
        let inner = &self.inner;
        let ids = self.live_nodes().await?;
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HGETALL")
                .arg(inner.node_key(&format!("node-channels:{id}")));
        }
        let pipe = &pipe;
        let per_node = inner
            .home()
            .idempotent(|mut conn| async move {
                pipe.query_async::<Vec<HashMap<String, usize>>>(&mut conn)
                    .await
            })
            .await?;
        let mut total: HashMap<String, usize> = HashMap::new();
        for channels in per_node {
            for (channel, count) in channels {
                *total.entry(channel).or_default() += count;
            }
        }
        let mut channels: Vec<(String, usize)> = total.into_iter().collect();
        channels.sort();
        Ok(channels)
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

    /// The pub/sub channel of `channel`: `<prefix><channel>`, or on a cluster
    /// `<prefix>{<channel>}`, whose hash tag puts it on the slot of the channel's
    /// history and presence keys (a script may only publish to its keys' slot).
    fn key(&self, channel: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + channel.len() + 2);
        key.push_str(&self.prefix);
        match self.pubsub {
            PubSub::Classic => key.push_str(channel),
            PubSub::Sharded => {
                key.push('{');
                key.push_str(channel);
                key.push('}');
            }
        }
        key
    }

    /// The channel of a pub/sub channel name made by [`key`](Self::key).
    fn channel_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key.strip_prefix(self.prefix.as_str())?;
        match self.pubsub {
            PubSub::Classic => Some(rest),
            PubSub::Sharded => rest.strip_prefix('{')?.strip_suffix('}'),
        }
    }

    /// A cluster-wide key (the cluster view's): `<prefix><name>`, or on a cluster
    /// `<prefix>{nodes}:<name>`, so all of them share a slot and one transaction
    /// may touch them.
    fn node_key(&self, name: &str) -> String {
        match self.pubsub {
            PubSub::Classic => format!("{}{name}", self.prefix),
            PubSub::Sharded => format!("{}{{nodes}}:{name}", self.prefix),
        }
    }

    /// `<prefix>{<channel>}:<suffix>`: the hash tag keeps a channel's keys together.
    fn history_key(&self, channel: &str, suffix: &str) -> String {
        format!("{}{{{channel}}}:{suffix}", self.prefix)
    }

    /// A channel's presence keys (same shape as its history keys).
    fn presence_key(&self, channel: &str, suffix: &str) -> String {
        self.history_key(channel, suffix)
    }

    /// Adds to `pipe` what registers (or refreshes) `entries` of `channel`: each in
    /// the hash with its expiry in the sorted set, and both keys kept alive for two
    /// TTLs (so a channel whose nodes all died leaves nothing behind).
    fn add_presence_commands(
        &self,
        pipe: &mut redis::Pipeline,
        channel: &str,
        entries: &[super::presence::Entry],
    ) {
        let ttl = self.config.presence.presence_ttl;
        let expires = envelope::now_us() / 1000 + millis(ttl);
        let (hash, zset) = (
            self.presence_key(channel, "presence"),
            self.presence_key(channel, "presence-exp"),
        );
        for entry in entries {
            pipe.cmd("HSET")
                .arg(&hash)
                .arg(&entry.member)
                .arg(&entry.json[..])
                .ignore()
                .cmd("ZADD")
                .arg(&zset)
                .arg(expires)
                .arg(&entry.member)
                .ignore();
        }
        for key in [&hash, &zset] {
            pipe.cmd("PEXPIRE").arg(key).arg(2 * millis(ttl)).ignore();
        }
    }

    /// Runs [`HISTORY_SCRIPT`] on `conn` and decodes what it read.
    async fn read_history(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        channel: &str,
        request: &HistoryRequest,
    ) -> redis::RedisResult<History> {
        let (since_epoch, since_offset) = match &request.since {
            Some((epoch, offset)) => (epoch.as_str().to_owned(), *offset),
            None => (String::new(), 0),
        };
        let mut script = HISTORY_SCRIPT.prepare_invoke();
        script
            .key(self.history_key(channel, "stream"))
            .key(self.history_key(channel, "meta"))
            .arg(Epoch::random().as_str())
            .arg(if request.subscribing {
                millis(self.config.history.unpublished_position_ttl)
            } else {
                0
            })
            .arg(since_epoch)
            .arg(since_offset)
            .arg(request.limit)
            .arg(if request.all_or_nothing { "1" } else { "0" })
            .arg(request.max_bytes.map_or(0, |b| b.max(1)))
            .arg(crate::broker::READ_OVERHEAD);
        let (epoch, top, entries, truncated): (String, u64, Vec<Vec<u8>>, u8) =
            script.invoke_async(conn).await?;
        let malformed = |what: String| -> redis::RedisError {
            (redis::ErrorKind::Parse, "malformed history in Redis", what).into()
        };
        let epoch = Epoch::parse(&epoch).ok_or_else(|| malformed(format!("epoch {epoch:?}")))?;
        let mut publications = Vec::with_capacity(entries.len());
        for entry in entries {
            match envelope::decode(Bytes::from(entry)) {
                Ok(publication) => publications.push(publication),
                Err(e) => {
                    // Not fatal: the rest of the history is still good; the tracker
                    // or the client sees the missing offset.
                    self.local.metrics.broker_dropped("malformed");
                    tracing::warn!(channel, error = %e, "dropping a malformed history entry");
                }
            }
        }
        Ok(History {
            top: Position { epoch, offset: top },
            publications,
            truncated: truncated == 1,
        })
    }

    /// `items` grouped by the index of their channel's shard, leaving out the shards
    /// that are not connected (for the periodic rounds over tracked channels).
    fn by_connected_shard<T>(
        &self,
        items: Vec<T>,
        channel: impl Fn(&T) -> &str,
    ) -> HashMap<usize, Vec<T>> {
        let mut by_shard: HashMap<usize, Vec<T>> = HashMap::new();
        for item in items {
            let shard = self.shard(channel(&item));
            if shard.is_connected() {
                by_shard.entry(shard.index).or_default().push(item);
            }
        }
        by_shard
    }

    /// Starts a task that reads a repair's range and hands it to the tracker, until
    /// the channel is whole again (or no longer wanted).
    fn spawn_repair(self: &Arc<Self>, repair: Repair) {
        tokio::spawn(repair_task(self.clone(), repair));
    }
}

/// Reads a repair's range from the stream (retrying while Redis cannot answer) and
/// hands it to the tracker, until the channel is whole again or no longer tracked.
async fn repair_task(inner: Arc<Inner>, mut repair: Repair) {
    let mut backoff = Backoff::default();
    loop {
        if !inner.tracker.still_wanted(&repair) {
            return;
        }
        let request = HistoryRequest {
            since: Some((repair.epoch.clone(), repair.after)),
            limit: (repair.upto - repair.after) as usize,
            all_or_nothing: false,
            // Repairs are for channels the node holds subscribers of.
            subscribing: true,
            // Bounded by `--max-repair`; cut short, they would be gaps.
            max_bytes: None,
        };
        let read = inner
            .shard(&repair.channel)
            .idempotent(|mut conn| {
                let (inner, request, channel) = (&inner, &request, &repair.channel);
                async move { inner.read_history(&mut conn, channel, request).await }
            })
            .await;
        match read {
            Ok(history) => {
                tracing::info!(
                    channel = %repair.channel,
                    from = repair.after + 1,
                    to = repair.upto,
                    read = history.publications.len(),
                    "repairing a gap in pub/sub delivery from history"
                );
                match inner
                    .tracker
                    .on_repaired(&repair, history.top, history.publications)
                {
                    Some(next) => {
                        repair = next;
                        backoff.reset();
                    }
                    None => return,
                }
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(channel = %repair.channel, %error, retry_in = ?delay, "history repair read failed");
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One round of the position check, every `--position-check-interval`: compares the last offset delivered on each
/// quiet history channel with its meta key in Redis (one pipelined round trip per
/// batch), so a subscriber connection that silently stopped delivering is noticed
/// and the tracker repairs what it missed.
async fn check_positions(inner: Arc<Inner>) {
    // A disconnected shard re-reads every position when it reconnects.
    let quiet_by_shard = inner.by_connected_shard(inner.tracker.quiet_channels(), |q| &q.0);
    for (index, quiet) in quiet_by_shard {
        let shard = &inner.shards[index];
        for batch in quiet.chunks(CHECK_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|(channel, _, _)| inner.history_key(channel, "meta"))
                .collect();
            let read = shard
                .idempotent(|conn| read_positions(conn, &keys, inner.pubsub))
                .await;
            let positions = match read {
                Ok(positions) => positions,
                Err(e) => {
                    tracing::warn!(shard = %shard.label, error = %e, "position check failed");
                    break;
                }
            };
            for ((channel, _, last), position) in batch.iter().zip(positions) {
                // A missing meta key: the history was lost; the next publication
                // starts a new epoch, which the tracker reports as a gap.
                let (Some(epoch), Some(top)) = position else {
                    continue;
                };
                let Some(epoch) = Epoch::parse(&epoch) else {
                    continue;
                };
                if top > *last {
                    tracing::warn!(
                        channel,
                        last,
                        top,
                        "a quiet channel is behind its history: pub/sub delivery missed messages"
                    );
                }
                if let Some(repair) = inner
                    .tracker
                    .on_position(channel, Position { epoch, offset: top })
                {
                    inner.spawn_repair(repair);
                }
            }
        }
    }
}

/// `HMGET <meta> e s` of each key.
async fn read_positions(
    conn: Conn,
    keys: &[String],
    pubsub: PubSub,
) -> redis::RedisResult<Vec<(Option<String>, Option<u64>)>> {
    per_key(conn, keys, pubsub, |key| {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg("e").arg("s");
        cmd
    })
    .await
}

/// Runs the command `command` makes of each key: one pipeline, or on a cluster
/// (where a pipeline must stay within one slot) one command per key, sent together.
async fn per_key<T: redis::FromRedisValue>(
    conn: Conn,
    keys: &[String],
    pubsub: PubSub,
    command: impl Fn(&String) -> redis::Cmd,
) -> redis::RedisResult<Vec<T>> {
    match pubsub {
        PubSub::Classic => {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.add_command(command(key));
            }
            pipe.query_async(&mut conn.clone()).await
        }
        PubSub::Sharded => {
            let each = keys.iter().map(|key| {
                let (mut conn, cmd) = (conn.clone(), command(key));
                async move { cmd.query_async(&mut conn).await }
            });
            futures_util::future::try_join_all(each).await
        }
    }
}

/// One round of renewing, every third of `--unpublished-position-ttl`, the
/// positions that subscribes created for channels nobody has published to, for
/// the channels this node holds subscribers of: they stay valid while someone
/// waits, and expire soon after the last subscriber of the cluster left.
async fn keep_unpublished(inner: Arc<Inner>) {
    let ttl = millis(inner.config.history.unpublished_position_ttl);
    // A disconnected shard creates the positions again when it re-subscribes.
    let by_shard = inner.by_connected_shard(inner.tracker.unpublished_channels(), |c| c);
    for (index, channels) in by_shard {
        let shard = &inner.shards[index];
        for batch in channels.chunks(CHECK_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|channel| inner.history_key(channel, "meta"))
                .collect();
            let kept = shard
                .idempotent(|conn| {
                    per_key::<()>(conn, &keys, inner.pubsub, |key| {
                        // EVAL, not EVALSHA: a pipeline cannot reload a script
                        // Redis forgot, and this one is short.
                        let mut cmd = redis::cmd("EVAL");
                        cmd.arg(KEEP_UNPUBLISHED_LUA).arg(1).arg(key).arg(ttl);
                        cmd
                    })
                })
                .await;
            if let Err(e) = kept {
                tracing::warn!(shard = %shard.label, error = %e, "renewing unpublished positions failed");
                break;
            }
        }
    }
}

/// One presence refresh, every third of `--presence-ttl`: writes this node's presence entries to Redis
/// again with a new expiry, in pipelined batches: entries of a node that stops
/// refreshing (it died) expire, and entries Redis lost (a restart without data) are
/// back within one interval.
async fn refresh_presence(inner: Arc<Inner>) {
    // One pipeline (and count of entries in it) per shard.
    let mut pipes: Vec<(redis::Pipeline, usize)> =
        inner.shards.iter().map(|_| (redis::pipe(), 0)).collect();
    for (channel, entries) in inner.presence.snapshot() {
        let shard = inner.shard(&channel);
        let (pipe, batched) = &mut pipes[shard.index];
        // The entries of dead nodes go even in channels nobody reads. Sent as
        // EVAL (the script is short), since a pipeline cannot reload a script
        // Redis forgot.
        pipe.cmd("EVAL")
            .arg(PRUNE_LUA)
            .arg(2)
            .arg(inner.presence_key(&channel, "presence"))
            .arg(inner.presence_key(&channel, "presence-exp"))
            .arg(envelope::now_us() / 1000)
            .ignore();
        for chunk in entries.chunks(REFRESH_BATCH) {
            inner.add_presence_commands(pipe, &channel, chunk);
            *batched += chunk.len();
            // On a cluster a pipeline must stay within one slot: one per channel.
            if *batched >= REFRESH_BATCH || inner.pubsub == PubSub::Sharded {
                if let Err(e) = shard.run(pipe).await {
                    tracing::warn!(shard = %shard.label, error = %e, "presence refresh failed");
                }
                (*pipe, *batched) = (redis::pipe(), 0);
                tokio::task::yield_now().await;
            }
        }
    }
    for (shard, (pipe, batched)) in inner.shards.iter().zip(pipes) {
        if batched > 0
            && let Err(e) = shard.run(&pipe).await
        {
            tracing::warn!(shard = %shard.label, error = %e, "presence refresh failed");
        }
    }
}

/// Runs a request that must never run twice (a publish) on a connection that
/// never resends on its own ([`Shard::publisher_once`]), and again only when Redis
/// answered that it did not run it: the script was not loaded (`NOSCRIPT`: loaded,
/// then sent again), or a Redis Cluster node does not serve the slot now (`MOVED`,
/// `ASK`, `TRYAGAIN`, `CLUSTERDOWN`: sent again after a short pause, by which the
/// client has refreshed its slot map) — within the caller's timeout. A request whose
/// connection dropped is not sent again: it may have run.
async fn run_once<T, F, Fut>(
    conn: &mut Conn,
    script: Option<&redis::Script>,
    request: F,
) -> redis::RedisResult<T>
where
    F: Fn(Conn) -> Fut,
    Fut: Future<Output = redis::RedisResult<T>>,
{
    loop {
        match request(conn.clone()).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let Some(script) = script else {
                    return Err(e);
                };
                script.load_async(conn).await?;
            }
            Err(e) if matches!(e.code(), Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN")) => {
                tokio::time::sleep(REDIRECT_PAUSE).await;
            }
            result => return result,
        }
    }
}

/// How long a durable publish's `WAIT` gives the replicas: half of
/// `--broker-timeout`, so that the master's answer (stored, confirmed by so many)
/// comes back before the timeout that would make the publish `unavailable`. The
/// other half covers the script, the round trip, and Redis' timer: it ends a `WAIT`
/// on its next tick after the timeout (every 100 ms with the default `hz 10`), once
/// more after a `NOSCRIPT`, when the script is loaded and run again.
fn replica_wait(timeout: Duration) -> Duration {
    timeout / 2
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
        let local = Local {
            registry: Registry::new(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            tracing: crate::telemetry::Tracing::disabled(),
        };
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
            local,
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
