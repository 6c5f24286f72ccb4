//! The Redis pub/sub broker.
//!
//! - **Publishing** goes through one self-reconnecting multiplexed connection
//!   (redis-rs `ConnectionManager`): one round trip per publish, and concurrent
//!   publishes of all sessions are pipelined on one socket. A session awaits each
//!   `PUBLISH` reply before it sends the next one, so one connection's messages reach
//!   Redis, and therefore every node, in the order they were sent.
//! - **Receiving** uses one dedicated RESP3 connection per node. Its push messages
//!   are handed, inside the connection's reader, straight to [`Registry::fanout`],
//!   which never waits: there is no intermediate queue that could grow, and Redis
//!   never sees a slow reader (so `client-output-buffer-limit pubsub` cannot cut the
//!   node off because one client is slow).
//! - **Interest**: the node SUBSCRIBEs to a channel when its first local subscriber
//!   arrives and UNSUBSCRIBEs when the last one leaves. One task, the subscriber
//!   task, owns the connection and reconciles "channels with local subscribers"
//!   (the registry) with "channels subscribed on the connection" (`live`). Sessions
//!   only mark channels dirty and wait for `live`; a racing sub/unsub therefore
//!   always converges, and after a reconnect every channel is subscribed again.
//! - **History**: a publish to a channel with history runs [`PUBLISH_SCRIPT`], which
//!   assigns the next offset, appends the envelope to the channel's stream (exactly
//!   `history-size` entries kept), refreshes the TTLs and PUBLISHes the same bytes,
//!   atomically: no message is published without being stored, or stored without an
//!   offset. Each channel has two keys, `<prefix>{<channel>}:stream` and
//!   `<prefix>{<channel>}:meta` (epoch and top offset); the hash tag keeps them on one
//!   Redis Cluster slot. Scripts run by EVALSHA; redis-rs loads them again after
//!   `NOSCRIPT` (a restart or `SCRIPT FLUSH`).
//! - **Gap repair**: publications of history channels go through the [`Tracker`],
//!   which delivers them in offset order, once, and asks for repairs (read from the
//!   stream by [`repair`] tasks) when offsets are missing: after a pub/sub drop and
//!   reconnect (positions are read on the new subscriber connection right after it
//!   re-SUBSCRIBEs), when a publication skips offsets, and when the periodic position
//!   check ([`position_checks`]) finds a quiet channel behind its stream.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::tracker::{Repair, Tracker};
use super::{BrokerError, History, HistoryRequest, Local, every};
use crate::config::{ChannelOptions, Config};
use crate::envelope;
use crate::publication::{Epoch, Kind, Position, Publication};

/// Channels per SUBSCRIBE/UNSUBSCRIBE command when many change at once (after a
/// reconnect): large enough to resubscribe thousands of channels in a few round
/// trips, small enough to keep each command short.
const SUBSCRIBE_BATCH: usize = 256;
/// How often the subscriber connection is probed with PING, so a Redis that stalls
/// or vanishes without closing the TCP connection is noticed.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnect backoff: first delay and cap (jittered).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Quiet channels per pipelined batch of the position check.
const CHECK_BATCH: usize = 1000;
/// Presence entries per pipelined batch of the refresh: one round trip each, and
/// a yield between batches, so a channel of 100,000 subscribers neither blocks the
/// node nor sends one huge pipeline.
const REFRESH_BATCH: usize = 500;

/// Drops the presence entries whose node stopped refreshing them (their expiry in the
/// sorted set has passed). KEYS: entries hash, expiry sorted set. ARGV: now (ms).
const PRUNE_LUA: &str = r#"
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #expired do redis.call('HDEL', KEYS[1], expired[i]) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"#;

/// Reads a channel's presence: prunes it ([`PRUNE_LUA`]), then returns how many
/// entries there are and up to `max` of them (all with `max` 0).
///
/// KEYS: entries hash, expiry sorted set. ARGV: now (ms), max. Returns `{total, {entry..}}`.
static PRESENCE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRUNE_LUA}{}",
        r#"
local total = redis.call('HLEN', KEYS[1])
local max = tonumber(ARGV[2])
local out = {}
if max == 0 or total <= max then
  out = redis.call('HVALS', KEYS[1])
else
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 100)
    cursor = page[1]
    local kv = page[2]
    for i = 2, #kv, 2 do
      if #out < max then out[#out + 1] = kv[i] end
    end
  until cursor == '0' or #out >= max
end
return {total, out}
"#
    ))
});

/// Stores a publication in its channel's history under the next offset and
/// publishes it, atomically. A channel without a meta key (new, expired or lost)
/// starts a new epoch, and its stale stream, if any, is dropped with it.
///
/// KEYS: stream, meta. ARGV: pub/sub channel, envelope head, data, history size,
/// history TTL (ms), meta TTL (ms), epoch for a new history.
/// Returns `{offset, epoch}`.
static PUBLISH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
local pos = string.format('%d', offset) .. ':' .. epoch
local payload = ARGV[2] .. string.char(#pos) .. pos .. ARGV[3]
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], string.format('%d-0', offset), 'p', payload)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[1], payload)
return {offset, epoch}
"#,
    )
});

/// Reads a channel's position and, optionally, stored envelopes: the latest `limit`
/// (since epoch empty), or up to `limit` after the since offset when the since epoch
/// is current (none when all-or-nothing and more than `limit` follow it). A channel
/// without a meta key gets one (a new epoch at offset 0), so the position a subscriber
/// is given stays valid. It gets the full meta TTL, not a shorter one: a subscriber
/// waiting on a quiet channel would otherwise see the epoch change under it at the
/// first publish, as if history had been lost.
///
/// KEYS: stream, meta. ARGV: epoch for a new history, meta TTL (ms), since epoch,
/// since offset, limit, all-or-nothing (`1`/`0`). Returns `{epoch, top, {envelope..}}`.
static HISTORY_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local top = tonumber(redis.call('HGET', KEYS[2], 's'))
local limit = tonumber(ARGV[5])
local entries = {}
if limit > 0 then
  if ARGV[3] == '' then
    local rev = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
    for i = #rev, 1, -1 do entries[#entries + 1] = rev[i][2][2] end
  elseif ARGV[3] == epoch then
    local since = tonumber(ARGV[4])
    if not (ARGV[6] == '1' and top - since > limit) then
      local range = redis.call('XRANGE', KEYS[1], string.format('%d-0', since + 1), '+', 'COUNT', limit)
      for i = 1, #range do entries[#entries + 1] = range[i][2][2] end
    end
  end
end
return {epoch, top, entries}
"#,
    )
});

/// Handle to the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

struct Inner {
    /// Publishing connection; reconnects by itself after a failure.
    publisher: ConnectionManager,
    prefix: String,
    timeout: Duration,
    config: Arc<Config>,
    local: Local,
    /// The last offset delivered per history channel, and the repairs.
    tracker: Tracker,
    /// This node's presence entries, registered in Redis and refreshed there.
    presence: super::presence::Table,
    /// Why a std mutex: critical sections are a few set operations and are never
    /// held across an `.await`; shared by sessions and the subscriber task.
    state: Mutex<SubState>,
    /// Wakes the subscriber task when `state.dirty` gained a channel.
    wake: Notify,
    connected: AtomicBool,
    /// Ends repair tasks with the node.
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("prefix", &self.prefix)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct SubState {
    /// Channels SUBSCRIBEd (confirmed) on the current subscriber connection.
    live: HashSet<String>,
    /// Channels whose local interest may differ from `live`.
    dirty: HashSet<String>,
    /// Sessions waiting for a channel to become live. Bounded by the number of
    /// sessions: each waits for at most one subscription at a time, and abandoned
    /// waiters are pruned whenever a new one is added.
    waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
}

impl SubState {
    /// Marks a channel for the subscriber task. Not while disconnected: the next
    /// connection starts from the registry and the waiters (`on_connected`), so a
    /// set fed during an outage would only grow with what clients ask for.
    fn mark_dirty(&mut self, connected: bool, channel: &str) {
        if connected {
            self.dirty.insert(channel.to_owned());
        }
    }

    /// Tells the sessions waiting for `channel` that it is live.
    fn wake_waiters(&mut self, channel: &str) {
        for waiter in self.waiters.remove(channel).into_iter().flatten() {
            // A waiter that gave up (timed out) is simply gone.
            let _ = waiter.send(());
        }
    }
}

enum Ended {
    Shutdown,
    Lost(String),
}

impl RedisBroker {
    /// Creates the publishing connection and starts the subscriber task and the
    /// position check.
    pub fn start(
        url: &str,
        config: Arc<Config>,
        local: Local,
        shutdown: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let prefix = config.broker.redis_prefix.as_str();
        let timeout = config.broker.broker_timeout;
        let invalid =
            |e: &dyn std::fmt::Display| BrokerError::Unavailable(format!("invalid Redis URL: {e}"));

        let client = redis::Client::open(url).map_err(|e| invalid(&e))?;
        // Lazy, so a node starts (not ready) while Redis is down. Few retries per
        // failure: the caller's timeout bounds the wait, and the next publish retries.
        let publisher_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let publisher = ConnectionManager::new_lazy_with_config(client.clone(), publisher_config)
            .map_err(|e| invalid(&e))?;

        // The subscriber connection speaks RESP3 so that pushes can be handled by a
        // callback in the connection's reader (RESP2 pub/sub goes through an
        // unbounded queue inside redis-rs).
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client =
            redis::Client::open(info.set_redis_settings(settings)).map_err(|e| invalid(&e))?;

        // A repair buffers what arrives meanwhile like a client's queue would.
        let tracker = Tracker::new(
            local.clone(),
            config.limits.client_queue,
            config.history.max_recovery as u64,
        );
        let inner = Arc::new(Inner {
            publisher,
            prefix: prefix.to_owned(),
            timeout,
            local,
            tracker,
            presence: Default::default(),
            state: Mutex::new(SubState::default()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
            shutdown: shutdown.clone(),
            config,
        });
        tokio::spawn(subscriber_task(inner.clone(), client, shutdown.clone()));
        if inner.config.any_history() {
            let period = inner.config.history.position_check_interval;
            let weak = Arc::downgrade(&inner);
            tokio::spawn(every(weak, period, shutdown.clone(), check_positions));
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
        let mut conn = inner.publisher.clone();
        let key = inner.key(channel);
        let published = if options.has_history() {
            let head = envelope::head(&publication);
            let mut script = PUBLISH_SCRIPT.prepare_invoke();
            script
                .key(inner.history_key(channel, "stream"))
                .key(inner.history_key(channel, "meta"))
                .arg(&key)
                .arg(head.as_bytes())
                .arg(&publication.data[..])
                .arg(options.history_size)
                .arg(millis(options.history_ttl))
                .arg(millis(inner.config.history.history_meta_ttl))
                .arg(Epoch::random().as_str());
            let publish = async {
                let (offset, epoch): (u64, String) = script
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
                let epoch = Epoch::parse(&epoch).ok_or_else(|| {
                    BrokerError::Unavailable(format!("Redis returned a malformed epoch {epoch:?}"))
                })?;
                Ok(Some(Position { epoch, offset }))
            };
            tokio::time::timeout(inner.timeout, publish).await
        } else {
            let payload =
                if inner.config.broker.legacy_envelopes && publication.kind == Kind::Message {
                    let frame = crate::protocol::encode_publication(channel, &publication);
                    envelope::encode_v1(frame.as_bytes(), &publication)
                } else {
                    envelope::encode(&publication)
                };
            let publish = async {
                redis::cmd("PUBLISH")
                    .arg(&key)
                    .arg(&payload[..])
                    .query_async::<i64>(&mut conn)
                    .await
                    .map(|_receivers| None)
                    .map_err(|e| BrokerError::Unavailable(e.to_string()))
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

    /// Reads a channel's position and stored publications.
    pub async fn history(
        &self,
        channel: &str,
        request: &HistoryRequest,
    ) -> Result<History, BrokerError> {
        let inner = &self.inner;
        inner
            .idempotent(|| async {
                let mut conn = inner.publisher.clone();
                inner.read_history(&mut conn, channel, request).await
            })
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
        let result = inner.run(pipe).await;
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
        inner.run(pipe).await
    }

    /// Up to `max` entries of a channel's presence (0: all), and how many there are.
    pub async fn presence(
        &self,
        channel: &str,
        max: usize,
    ) -> Result<(Vec<Bytes>, usize), BrokerError> {
        let inner = &self.inner;
        let (total, entries) = inner
            .idempotent(|| async {
                let mut script = PRESENCE_SCRIPT.prepare_invoke();
                script
                    .key(inner.presence_key(channel, "presence"))
                    .key(inner.presence_key(channel, "presence-exp"))
                    .arg(envelope::now_us() / 1000)
                    .arg(max);
                let mut conn = inner.publisher.clone();
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
        let channels_key = format!("{}node-channels:{id}", inner.prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("SET")
            .arg(format!("{}node:{id}", inner.prefix))
            .arg(info)
            .arg("PX")
            .arg(ttl)
            .ignore()
            .cmd("ZADD")
            .arg(format!("{}nodes", inner.prefix))
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
        inner.run(pipe).await
    }

    /// The ids of the nodes whose announcement has not expired (expired ones are
    /// dropped from the set on the way).
    async fn live_nodes(&self) -> Result<Vec<String>, BrokerError> {
        let inner = &self.inner;
        let key = format!("{}nodes", inner.prefix);
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
        let mut conn = inner.publisher.clone();
        match tokio::time::timeout(inner.timeout, pipe.query_async::<(Vec<String>,)>(&mut conn))
            .await
        {
            Ok(Ok((ids,))) => Ok(ids),
            Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => Err(BrokerError::Timeout(inner.timeout)),
        }
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
            .map(|id| format!("{}node:{id}", inner.prefix))
            .collect();
        let mut conn = inner.publisher.clone();
        let mut mget = redis::cmd("MGET");
        mget.arg(&keys);
        let read = mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn);
        let infos = match tokio::time::timeout(inner.timeout, read).await {
            Ok(Ok(infos)) => infos,
            Ok(Err(e)) => return Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => return Err(BrokerError::Timeout(inner.timeout)),
        };
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
                .arg(format!("{}node-channels:{id}", inner.prefix));
        }
        let mut conn = inner.publisher.clone();
        let read = pipe.query_async::<Vec<HashMap<String, usize>>>(&mut conn);
        let per_node = match tokio::time::timeout(inner.timeout, read).await {
            Ok(Ok(per_node)) => per_node,
            Ok(Err(e)) => return Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => return Err(BrokerError::Timeout(inner.timeout)),
        };
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
        let rx = {
            let mut state = inner.lock();
            if inner.is_connected() && state.live.contains(channel) {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            let waiters = state.waiters.entry(channel.to_owned()).or_default();
            waiters.retain(|w| !w.is_closed());
            waiters.push(tx);
            state.mark_dirty(inner.is_connected(), channel);
            rx
        };
        inner.wake.notify_one();
        let waited = tokio::time::timeout(inner.timeout, rx).await;
        let result = match waited {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(_)) => Err(BrokerError::Unavailable("subscription abandoned".into())),
            Err(_) => Err(BrokerError::Timeout(inner.timeout)),
        };
        // Our waiter is gone with the timeout. Drop it now rather than when the
        // channel is next asked for: during an outage a client could otherwise grow
        // the map with a new channel name every timeout.
        let mut state = inner.lock();
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
        let mut state = self.inner.lock();
        state.mark_dirty(self.inner.is_connected(), channel);
        drop(state);
        self.inner.wake.notify_one();
    }

    /// Whether the subscriber connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.is_connected()
    }
}

impl Inner {
    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, SubState> {
        // A panic while holding this lock cannot leave the sets inconsistent in a
        // way that matters (they are re-derived on reconnect), so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, channel: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + channel.len());
        key.push_str(&self.prefix);
        key.push_str(channel);
        key
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

    /// Runs an idempotent operation within the broker timeout, twice if the first
    /// attempt found the connection dropped: the first command after Redis restarted
    /// finds the old connection broken, and the connection manager has reconnected
    /// by the second. Only for operations that may run twice (reads, presence
    /// writes), never for a publish.
    async fn idempotent<T, F, Fut>(&self, op: F) -> Result<T, BrokerError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            match op().await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => op().await,
                result => result,
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(BrokerError::Unavailable(e.to_string())),
            Err(_) => Err(BrokerError::Timeout(self.timeout)),
        }
    }

    /// Runs an idempotent pipeline (presence writes, announcements) on the publishing
    /// connection (see [`idempotent`](Self::idempotent)).
    async fn run(&self, pipe: redis::Pipeline) -> Result<(), BrokerError> {
        self.idempotent(|| async {
            let mut conn = self.publisher.clone();
            pipe.query_async::<()>(&mut conn).await
        })
        .await
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
            .arg(millis(self.config.history.history_meta_ttl))
            .arg(since_epoch)
            .arg(since_offset)
            .arg(request.limit)
            .arg(if request.all_or_nothing { "1" } else { "0" });
        let (epoch, top, entries): (String, u64, Vec<Vec<u8>>) = script.invoke_async(conn).await?;
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
        })
    }

    /// Starts a task that reads a repair's range and hands it to the tracker, until
    /// the channel is whole again (or no longer wanted).
    fn spawn_repair(self: &Arc<Self>, repair: Repair) {
        tokio::spawn(repair_task(self.clone(), repair));
    }

    /// Reads the positions of history channels just subscribed on `conn` (the
    /// subscriber connection, so they are ordered with its pushes) and hands them to
    /// the tracker.
    async fn read_positions(
        self: &Arc<Self>,
        conn: &MultiplexedConnection,
        channels: &[String],
    ) -> redis::RedisResult<()> {
        let reads = channels
            .iter()
            .filter(|c| self.config.channel_options(c).has_history())
            .map(|channel| {
                let mut conn = conn.clone();
                async move {
                    let history = self
                        .read_history(&mut conn, channel, &HistoryRequest::position())
                        .await?;
                    Ok::<_, redis::RedisError>((channel, history.top))
                }
            });
        for read in futures_util::future::join_all(reads).await {
            let (channel, top) = read?;
            if let Some(repair) = self.tracker.on_position(channel, top) {
                self.spawn_repair(repair);
            }
        }
        Ok(())
    }

    /// After (re)connecting: nothing is live on the new connection; every channel
    /// with local subscribers or waiters must be subscribed again.
    fn on_connected(&self) {
        let mut state = self.lock();
        state.live.clear();
        let pending: Vec<String> = state.waiters.keys().cloned().collect();
        state.dirty.extend(pending);
        state.dirty.extend(self.local.registry.channel_names());
        // Channels that lost their subscribers during the outage need no repair.
        self.tracker
            .retain(|channel| self.local.registry.has_subscribers(channel));
        self.connected.store(true, Ordering::Release);
        self.local.metrics.broker_up.set(1);
    }

    fn on_disconnected(&self) {
        let mut state = self.lock();
        self.connected.store(false, Ordering::Release);
        self.local.metrics.broker_up.set(0);
        state.live.clear();
        state.dirty.clear();
    }

    /// Brings the connection's subscriptions in line with the registry for the
    /// channels marked dirty.
    async fn reconcile(
        self: &Arc<Self>,
        conn: &mut MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let (to_subscribe, to_unsubscribe) = {
            let mut state = self.lock();
            let dirty = std::mem::take(&mut state.dirty);
            let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
            for channel in dirty {
                // Checked under the state lock: a session adds itself to the registry
                // before it looks at `live`, so it either sees the channel removed from
                // `live` here (and waits for the re-subscribe) or is seen as interest.
                let wanted = self.local.registry.has_subscribers(&channel);
                let live = state.live.contains(&channel);
                if wanted && !live {
                    subscribe.push(channel);
                } else if !wanted && live {
                    state.live.remove(&channel);
                    unsubscribe.push(channel);
                } else if !wanted {
                    // Waiters whose sessions left before the subscribe happened.
                    state.waiters.remove(&channel);
                } else {
                    state.wake_waiters(&channel);
                }
            }
            (subscribe, unsubscribe)
        };

        for batch in to_subscribe.chunks(SUBSCRIBE_BATCH) {
            let keys: Vec<String> = batch.iter().map(|c| self.key(c)).collect();
            conn.subscribe(&keys).await?;
            self.read_positions(conn, batch).await?;
            let mut state = self.lock();
            for channel in batch {
                state.live.insert(channel.clone());
                state.wake_waiters(channel);
            }
        }
        for batch in to_unsubscribe.chunks(SUBSCRIBE_BATCH) {
            let keys: Vec<String> = batch.iter().map(|c| self.key(c)).collect();
            conn.unsubscribe(&keys).await?;
            for channel in batch {
                self.tracker.forget(channel);
            }
        }
        Ok(())
    }

    /// Serves one subscriber connection until it fails or the node shuts down.
    async fn serve(
        self: &Arc<Self>,
        conn: &mut MultiplexedConnection,
        disconnected: &Notify,
        shutdown: &CancellationToken,
    ) -> Ended {
        let mut health = tokio::time::interval(HEALTH_INTERVAL);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(e) = self.reconcile(conn).await {
                return Ended::Lost(e.to_string());
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ended::Shutdown,
                _ = disconnected.notified() => return Ended::Lost("connection closed".into()),
                _ = self.wake.notified() => {}
                _ = health.tick() => {
                    let ping = redis::cmd("PING");
                    match tokio::time::timeout(self.timeout, ping.query_async::<()>(conn)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Ended::Lost(e.to_string()),
                        Err(_) => return Ended::Lost(format!("PING not answered within {:?}", self.timeout)),
                    }
                }
            }
        }
    }

    /// Handles one push from the subscriber connection. Runs inside the connection's
    /// reader: must not block.
    fn on_push(self: &Arc<Self>, info: PushInfo, disconnected: &Notify) {
        match info.kind {
            PushKind::Message => {
                let mut data = info.data;
                let (Some(Value::BulkString(payload)), Some(Value::BulkString(key))) =
                    (data.pop(), data.pop())
                else {
                    self.local.metrics.broker_dropped("malformed");
                    tracing::warn!("dropping malformed pub/sub push from Redis");
                    return;
                };
                let Some(channel) = std::str::from_utf8(&key)
                    .ok()
                    .and_then(|k| k.strip_prefix(self.prefix.as_str()))
                else {
                    return;
                };
                match envelope::decode(Bytes::from(payload)) {
                    Ok(publication) => {
                        let published_at_us = publication.published_at_us;
                        if let Some(repair) = self.tracker.on_live(channel, publication) {
                            self.spawn_repair(repair);
                        }
                        let latency_us = envelope::now_us().saturating_sub(published_at_us);
                        self.local
                            .metrics
                            .fanout_latency
                            .observe(latency_us as f64 / 1e6);
                    }
                    Err(e) => {
                        self.local.metrics.broker_dropped("malformed");
                        tracing::warn!(channel, error = %e, "dropping malformed envelope");
                    }
                }
            }
            PushKind::Disconnection => disconnected.notify_one(),
            _ => {}
        }
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
        };
        let mut conn = inner.publisher.clone();
        let read = inner.read_history(&mut conn, &repair.channel, &request);
        match tokio::time::timeout(inner.timeout, read).await {
            Ok(Ok(history)) => {
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
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", inner.timeout),
                };
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
    if !inner.is_connected() {
        return;
    }
    let quiet = inner.tracker.quiet_channels();
    for batch in quiet.chunks(CHECK_BATCH) {
        let mut pipe = redis::pipe();
        for (channel, _, _) in batch {
            pipe.cmd("HMGET")
                .arg(inner.history_key(channel, "meta"))
                .arg("e")
                .arg("s");
        }
        let mut conn = inner.publisher.clone();
        let read = pipe.query_async::<Vec<(Option<String>, Option<u64>)>>(&mut conn);
        let positions = match tokio::time::timeout(inner.timeout, read).await {
            Ok(Ok(positions)) => positions,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "position check failed");
                break;
            }
            Err(_) => {
                tracing::warn!("position check not answered within {:?}", inner.timeout);
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

/// One presence refresh, every third of `--presence-ttl`: writes this node's presence entries to Redis
/// again with a new expiry, in pipelined batches: entries of a node that stops
/// refreshing (it died) expire, and entries Redis lost (a restart without data) are
/// back within one interval.
async fn refresh_presence(inner: Arc<Inner>) {
    let mut pipe = redis::pipe();
    let mut batched = 0;
    for (channel, entries) in inner.presence.snapshot() {
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
            inner.add_presence_commands(&mut pipe, &channel, chunk);
            batched += chunk.len();
            if batched >= REFRESH_BATCH {
                if let Err(e) = inner.run(std::mem::take(&mut pipe)).await {
                    tracing::warn!(error = %e, "presence refresh failed");
                }
                batched = 0;
                tokio::task::yield_now().await;
            }
        }
    }
    if batched > 0
        && let Err(e) = inner.run(pipe).await
    {
        tracing::warn!(error = %e, "presence refresh failed");
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().clamp(1, u64::MAX as u128) as u64
}

async fn subscriber_task(inner: Arc<Inner>, client: redis::Client, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut ever_connected = false;
    loop {
        let disconnected = Arc::new(Notify::new());
        let on_push = {
            let inner = inner.clone();
            let disconnected = disconnected.clone();
            move |info: PushInfo| -> Result<(), Infallible> {
                inner.on_push(info, &disconnected);
                Ok(())
            }
        };
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(inner.timeout))
            .set_response_timeout(Some(inner.timeout))
            .set_push_sender(on_push);
        let connect = client.get_multiplexed_async_connection_with_config(&config);
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = tokio::time::timeout(inner.timeout, connect) => connected,
        };
        let mut conn = match connected {
            Ok(Ok(conn)) => conn,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no connection within {:?}", inner.timeout),
                };
                let delay = backoff.next_delay();
                // The subscriber connection speaks RESP3 (HELLO 3): say so only when
                // Redis is what refused, not when it could not be reached.
                let lower = error.to_lowercase();
                if lower.contains("hello")
                    || lower.contains("noproto")
                    || lower.contains("unknown command")
                {
                    tracing::warn!(%error, retry_in = ?delay, "Redis refused the subscriber connection: Redis 6 or newer is required (RESP3)");
                } else {
                    tracing::warn!(%error, retry_in = ?delay, "Redis subscriber connection failed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        backoff.reset();
        inner.on_connected();
        if ever_connected {
            inner.local.metrics.broker_reconnects.inc();
            tracing::info!("Redis subscriber reconnected; subscriptions restored");
        } else {
            tracing::info!("Redis subscriber connected");
        }
        ever_connected = true;
        let ended = inner.serve(&mut conn, &disconnected, &shutdown).await;
        inner.on_disconnected();
        match ended {
            Ended::Shutdown => return,
            Ended::Lost(error) => {
                tracing::warn!(%error, "Redis subscriber connection lost; reconnecting")
            }
        }
    }
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
        let broker = RedisBroker::start(&url, Arc::new(config), local, shutdown.clone()).unwrap();
        for i in 0..20 {
            let channel = format!("fresh-{i}");
            assert!(broker.subscribe(&channel).await.is_err());
            broker.release(&channel);
        }
        let state = broker.inner.lock();
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
