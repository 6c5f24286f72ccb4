//! Presence in Redis: this node's entries of a channel (a hash of entries and a
//! sorted set of their expiries, per channel), written on subscribe, removed on
//! unsubscribe, read cluster-wide, and refreshed every third of `--presence-ttl`.

use std::sync::Arc;

use bytes::Bytes;

use super::conn::PubSub;
use super::scripts::{PRESENCE_SCRIPT, PRUNE_LUA};
use super::{Inner, millis};
use crate::broker::BrokerError;
use crate::broker::presence::{Entry, count_users};
use crate::envelope;

/// Presence entries per pipelined batch of the refresh: one round trip each, and
/// a yield between batches, so a channel of 100,000 subscribers neither blocks the
/// node nor sends one huge pipeline.
const REFRESH_BATCH: usize = 500;

/// Registers a local subscriber's presence entry in Redis.
pub(super) async fn presence_add(
    inner: &Inner,
    channel: &str,
    entry: Entry,
) -> Result<(), BrokerError> {
    let member = entry.member.clone();
    let mut pipe = redis::pipe();
    pipe.atomic();
    add_presence_commands(inner, &mut pipe, channel, std::slice::from_ref(&entry));
    inner.presence.add(channel, entry);
    let result = inner.shard(channel).run(&pipe).await;
    if result.is_err() {
        inner.presence.remove(channel, &member);
    }
    result
}

/// Removes a local subscriber's presence entry from Redis (if the removal fails,
/// the entry expires: this node no longer refreshes it).
pub(super) async fn presence_remove(
    inner: &Inner,
    channel: &str,
    member: &str,
) -> Result<(), BrokerError> {
    if !inner.presence.remove(channel, member) {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.cmd("HDEL")
        .arg(inner.keys.presence(channel, "presence"))
        .arg(member)
        .ignore()
        .cmd("ZREM")
        .arg(inner.keys.presence(channel, "presence-exp"))
        .arg(member)
        .ignore();
    inner.shard(channel).run(&pipe).await
}

/// Up to `max` entries of a channel's presence (0: all), and how many there are.
pub(super) async fn presence(
    inner: &Inner,
    channel: &str,
    max: usize,
) -> Result<(Vec<Bytes>, usize), BrokerError> {
    let (total, entries) = inner
        .shard(channel)
        .idempotent(|mut conn| async move {
            let mut script = PRESENCE_SCRIPT.prepare_invoke();
            script
                .key(inner.keys.presence(channel, "presence"))
                .key(inner.keys.presence(channel, "presence-exp"))
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
pub(super) async fn presence_stats(
    inner: &Inner,
    channel: &str,
) -> Result<(usize, usize), BrokerError> {
    #[derive(serde::Deserialize)]
    struct User {
        user: Option<String>,
    }
    let (entries, total) = presence(inner, channel, 0).await?;
    let users: Vec<Option<String>> = entries
        .iter()
        .map(|e| serde_json::from_slice::<User>(e).ok().and_then(|u| u.user))
        .collect();
    let users = count_users(users.iter().map(Option::as_deref));
    Ok((total, users))
}

/// Adds to `pipe` what registers (or refreshes) `entries` of `channel`: each in
/// the hash with its expiry in the sorted set, and both keys kept alive for two
/// TTLs (so a channel whose nodes all died leaves nothing behind).
pub(super) fn add_presence_commands(
    inner: &Inner,
    pipe: &mut redis::Pipeline,
    channel: &str,
    entries: &[Entry],
) {
    let ttl = inner.config.presence.presence_ttl;
    let expires = envelope::now_us() / 1000 + millis(ttl);
    let (hash, zset) = (
        inner.keys.presence(channel, "presence"),
        inner.keys.presence(channel, "presence-exp"),
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

/// One presence refresh, every third of `--presence-ttl`: writes this node's presence entries to Redis
/// again with a new expiry, in pipelined batches: entries of a node that stops
/// refreshing (it died) expire, and entries Redis lost (a restart without data) are
/// back within one interval.
pub(super) async fn refresh_presence(inner: Arc<Inner>) {
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
            .arg(inner.keys.presence(&channel, "presence"))
            .arg(inner.keys.presence(&channel, "presence-exp"))
            .arg(envelope::now_us() / 1000)
            .ignore();
        for chunk in entries.chunks(REFRESH_BATCH) {
            add_presence_commands(&inner, pipe, &channel, chunk);
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
