//! The subscriber task of one shard: finds the shard's master, holds one RESP3
//! connection to it, keeps its subscriptions equal to the local interest in the
//! shard's channels, hands pushes to the tracker and the registry, and checks
//! every second that delivery really works.
//!
//! - **Interest**: sessions mark channels dirty and wait for `live`; the task
//!   reconciles, so a racing sub/unsub always converges, and after a reconnect every
//!   channel is subscribed again.
//! - **Health**: each tick sends `PING` (`ROLE` on a Sentinel-managed shard, so a
//!   connection to a demoted master is dropped) and publishes a probe on a
//!   node-private channel through the publishing connection. A probe that does not
//!   come back through this connection within the broker timeout means pushes are
//!   not flowing although the socket is up: the shard reports not ready and the
//!   connection is replaced (the position reads after re-subscribing repair what
//!   history channels missed).
//! - **Pushes** are handled inside the connection's reader by [`Inner::on_push`],
//!   which never waits: no intermediate queue that could grow, and Redis never sees a
//!   slow reader (so `client-output-buffer-limit pubsub` cannot cut the node off
//!   because one client is slow).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::cluster::ClusterConfig;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::conn::SubConn;
use super::endpoint::Resends;
use super::history::read_history;
use super::probe::Step;
use super::repair::spawn_repair;
use super::scripts::PROBE_SCRIPT;
use super::shard::Shard;
use super::{Backoff, HEALTH_INTERVAL, Inner, SUBSCRIBE_BATCH};
use crate::broker::HistoryRequest;
use crate::envelope;

enum Ended {
    Shutdown,
    Lost(String),
}

/// Runs the shard's subscriber connection until shutdown, reconnecting (and finding
/// the master again) with backoff.
pub(super) async fn run(inner: Arc<Inner>, shard: Arc<Shard>, shutdown: CancellationToken) {
    let mut backoff = Backoff::default();
    let mut ever_connected = false;
    loop {
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            connected = connect(&inner, &shard) => connected,
        };
        let (mut conn, disconnected) = match connected {
            Ok(connected) => connected,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(shard = %shard.label, %error, retry_in = ?delay, "Redis subscriber connection failed");
                shard.set_problem(error);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    // A failover event is worth an early retry.
                    _ = shard.kick.notified() => {
                        shard.forget_master();
                        continue;
                    }
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        backoff.reset();
        on_connected(&inner, &shard);
        if ever_connected {
            inner.delivery.metrics.broker_reconnects.inc();
            tracing::info!(shard = %shard.label, "Redis subscriber reconnected; subscriptions restored");
        } else {
            tracing::info!(shard = %shard.label, "Redis subscriber connected");
        }
        ever_connected = true;
        let ended = serve(&inner, &shard, &mut conn, &disconnected, &shutdown).await;
        on_disconnected(&inner, &shard);
        match ended {
            Ended::Shutdown => return,
            Ended::Lost(error) => {
                tracing::warn!(shard = %shard.label, %error, "Redis subscriber connection lost; reconnecting");
                shard.set_problem(error);
            }
        }
    }
}

/// The callback that takes the pushes of a subscriber connection.
fn push_handler(
    inner: &Arc<Inner>,
    shard: &Arc<Shard>,
    disconnected: &Arc<Notify>,
) -> impl Fn(PushInfo) -> Result<(), Infallible> + Send + Sync + 'static {
    let (inner, shard, disconnected) = (inner.clone(), shard.clone(), disconnected.clone());
    let connection = shard.next_connection();
    move |info: PushInfo| {
        if shard.is_current(connection) {
            on_push(&inner, &shard, info, &disconnected);
        }
        Ok(())
    }
}

/// Opens a subscriber connection (RESP3, so pushes are handled by a callback in the
/// connection's reader: RESP2 pub/sub goes through an unbounded queue inside
/// redis-rs) with the probe channel subscribed. For a standalone or Sentinel
/// shard, first finds the master and moves the publishing connection there if it
/// changed.
async fn connect(inner: &Arc<Inner>, shard: &Arc<Shard>) -> Result<(SubConn, Arc<Notify>), String> {
    let timeout = inner.timeout;
    let disconnected = Arc::new(Notify::new());
    let setup = async {
        let mut conn = match shard.endpoint.cluster_client(true, Resends::Allowed) {
            Some(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout)
                    .set_push_sender(push_handler(inner, shard, &disconnected));
                let mut conn = client
                    .map_err(|e| e.to_string())?
                    .get_async_connection_with_config(config)
                    .await
                    .map_err(|e| e.to_string())?;
                shard
                    .probes
                    .set_cluster_masters(&cluster_masters(&mut conn).await?);
                SubConn::Cluster(conn)
            }
            None => connect_single(inner, shard, &disconnected).await?,
        };
        conn.subscribe(&shard.probes.channels())
            .await
            .map_err(|e| e.to_string())?;
        Ok((conn, disconnected.clone()))
    };
    match tokio::time::timeout(timeout, setup).await {
        Ok(connected) => connected,
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

/// The subscriber connection of a standalone or Sentinel-managed shard.
async fn connect_single(
    inner: &Arc<Inner>,
    shard: &Arc<Shard>,
    disconnected: &Arc<Notify>,
) -> Result<SubConn, String> {
    let (address, client) = shard.endpoint.resolve(inner.timeout).await?;
    if shard
        .use_master(&address, &client)
        .map_err(|e| e.to_string())?
    {
        inner.delivery.metrics.broker_master_changed(&shard.label);
        tracing::warn!(shard = %shard.label, master = %address, "moved to the new master");
    }
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    let client =
        redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(inner.timeout))
        .set_response_timeout(Some(inner.timeout))
        .set_push_sender(push_handler(inner, shard, disconnected));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| {
            // Say so when Redis itself refused RESP3 (HELLO 3), not when it could
            // not be reached.
            let error = e.to_string();
            let lower = error.to_lowercase();
            if lower.contains("hello")
                || lower.contains("noproto")
                || lower.contains("unknown command")
            {
                format!("{error} (Redis 6 or newer is required: RESP3)")
            } else {
                error
            }
        })?;
    if shard.endpoint.is_sentinel() {
        check_role(&mut conn).await?;
    }
    Ok(SubConn::Single(conn))
}

/// The slot ranges of a Redis Cluster and their masters' addresses (`CLUSTER
/// SLOTS`), for one delivery probe per master.
async fn cluster_masters(
    conn: &mut impl ConnectionLike,
) -> Result<Vec<(u16, u16, String)>, String> {
    let ranges: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut masters = Vec::with_capacity(ranges.len());
    for range in ranges {
        let parsed: Option<(u16, u16, String)> = (|| {
            let Value::Array(items) = range else {
                return None;
            };
            let int = |v: &Value| redis::from_redis_value_ref::<u16>(v).ok();
            let Value::Array(master) = items.get(2)? else {
                return None;
            };
            let host: String = redis::from_redis_value_ref(master.first()?).ok()?;
            let port = redis::from_redis_value_ref::<u16>(master.get(1)?).ok()?;
            Some((
                int(items.first()?)?,
                int(items.get(1)?)?,
                format!("{host}:{port}"),
            ))
        })();
        masters.push(parsed.ok_or("unexpected CLUSTER SLOTS reply")?);
    }
    Ok(masters)
}

/// `Ok` when the server is a master: the sentinels may name a master that is
/// still being demoted or promoted.
async fn check_role(conn: &mut impl ConnectionLike) -> Result<(), String> {
    let role: Vec<Value> = redis::cmd("ROLE")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    match role.first() {
        Some(Value::BulkString(role)) if role == b"master" => Ok(()),
        Some(Value::BulkString(role)) => Err(format!(
            "the server is a {}, not the master",
            String::from_utf8_lossy(role)
        )),
        _ => Err("unexpected ROLE reply".into()),
    }
}

/// After (re)connecting: nothing is live on the new connection; every channel
/// of this shard with local subscribers or waiters must be subscribed again.
fn on_connected(inner: &Inner, shard: &Shard) {
    if shard.index == 0 {
        inner.control_live.store(false, Ordering::Relaxed);
    }
    let mut state = shard.lock();
    state.live.clear();
    let pending: Vec<String> = state.waiters.keys().cloned().collect();
    state.dirty.extend(pending);
    let count = inner.shards.len();
    state.dirty.extend(
        inner
            .delivery
            .registry
            .channel_names()
            .into_iter()
            .filter(|c| super::ring::shard_of(c, count) == shard.index),
    );
    // Channels that lost their subscribers during the outage need no repair.
    inner
        .tracker
        .retain(|channel| inner.delivery.registry.has_subscribers(channel));
    shard.set_connected(&state, true);
    drop(state);
    update_up(inner, shard);
}

fn on_disconnected(inner: &Inner, shard: &Shard) {
    let mut state = shard.lock();
    shard.set_connected(&state, false);
    shard.probes.abandon(None);
    state.live.clear();
    state.dirty.clear();
    drop(state);
    update_up(inner, shard);
}

/// Brings the connection's subscriptions in line with the registry for the
/// channels marked dirty.
async fn reconcile(
    inner: &Arc<Inner>,
    shard: &Shard,
    conn: &mut SubConn,
) -> redis::RedisResult<()> {
    let (to_subscribe, to_unsubscribe) = {
        let mut state = shard.lock();
        let dirty = std::mem::take(&mut state.dirty);
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        for channel in dirty {
            // Checked under the state lock: a session adds itself to the registry
            // before it looks at `live`, so it either sees the channel removed from
            // `live` here (and waits for the re-subscribe) or is seen as interest.
            let wanted = inner.delivery.registry.has_subscribers(&channel);
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
        let keys: Vec<String> = batch.iter().map(|c| inner.keys.pubsub(c)).collect();
        for channel in batch {
            if inner.config.channel_options(channel).has_history() {
                inner.tracker.on_subscribing(channel);
            }
        }
        shard.lock().subscribing.extend(batch.iter().cloned());
        let subscribed = async {
            conn.subscribe(&keys).await?;
            read_positions(inner, conn, batch).await
        };
        let subscribed = subscribed.await;
        let mut state = shard.lock();
        for channel in batch {
            state.subscribing.remove(channel);
            // Unsubscribed by Redis meanwhile: subscribed again next round.
            if !state.moved.remove(channel) && subscribed.is_ok() {
                state.live.insert(channel.clone());
                state.wake_waiters(channel);
            }
        }
        drop(state);
        subscribed?;
    }
    for batch in to_unsubscribe.chunks(SUBSCRIBE_BATCH) {
        let keys: Vec<String> = batch.iter().map(|c| inner.keys.pubsub(c)).collect();
        conn.unsubscribe(&keys).await?;
        for channel in batch {
            inner.tracker.forget(channel);
        }
    }
    Ok(())
}

/// Reads the positions of history channels just subscribed on `conn` (the
/// subscriber connection, so they are ordered with its pushes) and hands each to
/// the tracker as soon as it arrives: a channel's live publications wait until
/// its own position is judged, not until the slowest read of the batch (on a
/// Redis Cluster, one master may be failing while the others answer).
async fn read_positions(
    inner: &Arc<Inner>,
    conn: &SubConn,
    channels: &[String],
) -> redis::RedisResult<()> {
    let reads = channels
        .iter()
        .filter(|c| inner.config.channel_options(c).has_history())
        .map(|channel| {
            let mut conn = conn.clone();
            async move {
                let history =
                    read_history(inner, &mut conn, channel, &HistoryRequest::position()).await?;
                if let Some(repair) = inner.tracker.on_resubscribed(channel, history.top) {
                    spawn_repair(inner, repair);
                }
                Ok::<_, redis::RedisError>(())
            }
        });
    futures_util::future::try_join_all(reads).await?;
    Ok(())
}

/// Serves one subscriber connection until it fails, is kicked, or the node
/// shuts down.
async fn serve(
    inner: &Arc<Inner>,
    shard: &Shard,
    conn: &mut SubConn,
    disconnected: &Notify,
    shutdown: &CancellationToken,
) -> Ended {
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Err(e) = reconcile(inner, shard, conn).await {
            return Ended::Lost(e.to_string());
        }
        if shard.index == 0 && !inner.control_live.load(Ordering::Relaxed) {
            subscribe_control(inner, conn).await;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = disconnected.notified() => return Ended::Lost("connection closed".into()),
            _ = shard.kick.notified() => {
                shard.forget_master();
                return Ended::Lost("the master changed".into());
            }
            _ = shard.wake.notified() => {}
            _ = health.tick() => {
                if let Err(e) = health_check(inner, shard, conn).await {
                    // On a Sentinel shard: the server may no longer be the master.
                    shard.forget_master();
                    return Ended::Lost(e);
                }
            }
        }
    }
}

/// Subscribes this node's control channel (forwarded requests of its streaming
/// sessions) on the first shard's connection. Apart from the connect's must-succeed
/// subscriptions: its slot's master may be the one failing over on a Redis Cluster,
/// and that must not keep every other channel of the node unsubscribed. Tried
/// again every round (at least every health tick) until it took.
async fn subscribe_control(inner: &Arc<Inner>, conn: &mut SubConn) {
    let control = [inner.control.clone(), inner.users_control.clone()];
    match tokio::time::timeout(inner.timeout, conn.subscribe(&control)).await {
        Ok(Ok(())) => {
            inner.control_live.store(true, Ordering::Relaxed);
            // Revocations sent while the control channel was not subscribed did
            // not reach this node: its connections' tokens are checked now.
            if inner.config.users.token_revocation {
                tokio::spawn(super::users::sweep_revoked(inner.clone()));
            }
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "control channel not subscribed yet"),
        Err(_) => tracing::debug!("control channel not subscribed yet: no answer in time"),
    }
}

/// One health tick: the connection answers (and is still on the master), and
/// the last delivery probe came back in time.
async fn health_check(inner: &Inner, shard: &Shard, conn: &mut SubConn) -> Result<(), String> {
    let timeout = inner.timeout;
    let answered = if shard.endpoint.is_sentinel() {
        tokio::time::timeout(timeout, check_role(conn)).await
    } else {
        let ping = redis::cmd("PING");
        tokio::time::timeout(timeout, async {
            ping.query_async::<()>(conn)
                .await
                .map_err(|e| e.to_string())
        })
        .await
    };
    match answered {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(format!("no answer to a health check within {timeout:?}")),
    }
    let send = match shard.probes.step() {
        Step::Send(send) => send,
        Step::Overdue(target) => {
            inner.delivery.metrics.broker_probe_failed(&shard.label);
            let problem =
                format!("delivery probe through {target} not received within {timeout:?}");
            shard.set_problem(problem.clone());
            update_up(inner, shard);
            return Err(problem);
        }
    };
    for (channel, nonce) in send {
        // Through the publishing connection and a script, as publications with
        // history travel (see `PROBE_SCRIPT`). A failure
        // here is the publisher's (it reconnects by itself); the probe is sent
        // again next tick.
        let sent = shard
            .idempotent(|mut publisher| {
                let channel = channel.clone();
                async move {
                    PROBE_SCRIPT
                        .key(channel)
                        .arg(nonce.to_string())
                        .arg(shard.pubsub.publish())
                        .invoke_async::<i64>(&mut publisher)
                        .await
                }
            })
            .await;
        if let Err(e) = sent {
            tracing::debug!(shard = %shard.label, error = %e, "delivery probe not sent");
            shard.probes.abandon(Some(&channel));
        }
    }
    Ok(())
}

/// Handles one push from a subscriber connection. Runs inside the connection's
/// reader: must not block.
fn on_push(inner: &Arc<Inner>, shard: &Shard, info: PushInfo, disconnected: &Notify) {
    match info.kind {
        PushKind::Message | PushKind::SMessage => {
            let mut data = info.data;
            let (Some(Value::BulkString(payload)), Some(Value::BulkString(key))) =
                (data.pop(), data.pop())
            else {
                inner.delivery.metrics.broker_dropped("malformed");
                tracing::warn!("dropping malformed pub/sub push from Redis");
                return;
            };
            if let Some(cleared) = shard.probe_returned(&key, &payload) {
                if cleared {
                    tracing::info!(shard = %shard.label, "delivery probe received again");
                    update_up(inner, shard);
                }
                return;
            }
            if shard.index == 0 && key == inner.users_control.as_bytes() {
                let reached = inner.delivery.users.apply_json(&payload);
                inner.delivery.metrics.user_commands.inc_by(reached as u64);
                return;
            }
            if shard.index == 0 && key == inner.control.as_bytes() {
                let known = inner.delivery.streams.forwarded(Bytes::from(payload));
                if !known {
                    tracing::debug!("a forwarded request for a session this node does not hold");
                }
                return;
            }
            let Some(channel) = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| inner.keys.channel_of(k))
            else {
                return;
            };
            match envelope::decode(Bytes::from(payload)) {
                Ok(publication) => {
                    let published_at_us = publication.published_at_us;
                    if let Some(repair) = inner.tracker.on_live(channel, publication) {
                        spawn_repair(inner, repair);
                    }
                    let latency_us = envelope::now_us().saturating_sub(published_at_us);
                    inner
                        .delivery
                        .metrics
                        .fanout_latency
                        .observe(latency_us as f64 / 1e6);
                }
                Err(e) => {
                    inner.delivery.metrics.broker_dropped("malformed");
                    tracing::warn!(channel, error = %e, "dropping malformed envelope");
                }
            }
        }
        PushKind::Disconnection => disconnected.notify_one(),
        PushKind::SUnsubscribe => {
            // Redis Cluster unsubscribes a shard channel whose slot moved to
            // another node. Still wanted: subscribe again (the cluster client
            // sends it to the new owner) and repair what was missed.
            let Some(Value::BulkString(key)) = info.data.first() else {
                return;
            };
            if shard.index == 0
                && (key == inner.control.as_bytes() || key == inner.users_control.as_bytes())
            {
                // Its slot moved: subscribe it again on the next round.
                inner.control_live.store(false, Ordering::Relaxed);
                shard.wake.notify_one();
                return;
            }
            if shard.probes.channels().iter().any(|c| c.as_bytes() == key) {
                // A probe's slot moved: pick the probes again on a new connection.
                shard.kick.notify_one();
                return;
            }
            let Some(channel) = std::str::from_utf8(key)
                .ok()
                .and_then(|k| inner.keys.channel_of(k))
            else {
                return;
            };
            let mut state = shard.lock();
            // Live, or being subscribed (the slot moved again while its
            // SSUBSCRIBE went to the old owner); not our own unsubscribe.
            let moved = state.subscribing.contains(channel);
            if moved {
                state.moved.insert(channel.to_owned());
            }
            if state.live.remove(channel) || moved {
                tracing::info!(
                    channel,
                    "Redis Cluster moved the channel's slot; subscribing on its new owner"
                );
                state.dirty.insert(channel.to_owned());
                drop(state);
                shard.wake.notify_one();
            }
        }
        _ => {}
    }
}

/// Updates the shard's `broker_shard_up` and the node's `broker_up` gauges.
fn update_up(inner: &Inner, shard: &Shard) {
    let metrics = &inner.delivery.metrics;
    metrics.broker_shard_up(&shard.label, shard.status().is_ok());
    let all = inner.shards.iter().all(|s| s.status().is_ok());
    metrics.broker_up.set(i64::from(all));
}
