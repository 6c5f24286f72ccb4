//! Presence in Redis: this node's entries of a channel (a hash of entries and a
//! sorted set of their expiries, per channel), written on subscribe, removed on
//! unsubscribe, read cluster-wide, and refreshed every third of `--presence-ttl`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::PubSub;
use super::scripts::{PRESENCE_SCRIPT, PRUNE_LUA};
use super::shard::Shard;
use super::{Inner, millis};
use crate::broker::BrokerError;
use crate::broker::presence::{Entry, count_users};
use crate::envelope;

/// Presence entries per pipelined batch of the refresh: one round trip each, and
/// a yield between batches, so a channel of 100,000 subscribers neither blocks the
/// node nor sends one huge pipeline.
const REFRESH_BATCH: usize = 500;

/// Registers a local subscriber's presence entry in Redis; resolves once Redis has
/// it (so a `welcome` or ack sent after it finds the subscriber in presence).
///
/// Entries added at the same moment (a burst of connections, a reconnect storm)
/// are written together: the shard's writer task takes every entry waiting when
/// it is free and writes them in one transaction per shard (per channel on a
/// Redis Cluster, whose transactions stay in one slot), with one `HSET` and one
/// `ZADD` per channel, and answers each waiter. An entry alone waits for nothing:
/// the writer is idle and takes it at once.
pub(super) async fn presence_add(
    inner: &Inner,
    channel: &str,
    entry: Entry,
) -> Result<(), BrokerError> {
    let member = entry.member.clone();
    inner.presence.add(channel, entry.clone());
    let shard = inner.shard(channel);
    let (done, written) = oneshot::channel();
    inner.presence_writes.queue(
        shard.index,
        Write {
            channel: channel.to_owned(),
            entry,
            done,
        },
    );
    let result = match tokio::time::timeout(inner.timeout, written).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(BrokerError::Unavailable("the node is stopping".into())),
        Err(_) => Err(BrokerError::Timeout(inner.timeout)),
    };
    if result.is_err() {
        inner.presence.remove(channel, &member);
    }
    result
}

/// One entry waiting for its shard's presence writer.
pub(super) struct Write {
    channel: String,
    entry: Entry,
    done: oneshot::Sender<Result<(), BrokerError>>,
}

/// The entries waiting to be written, per shard, and the wake-up of each shard's
/// writer. Bounded by the subscriptions being made (each waits for its own).
#[derive(Default)]
pub(super) struct Writes {
    shards: Vec<(Mutex<Vec<Write>>, Arc<Notify>)>,
}

impl Writes {
    pub(super) fn new(shards: usize) -> Writes {
        Writes {
            shards: (0..shards).map(|_| Default::default()).collect(),
        }
    }

    fn queue(&self, shard: usize, write: Write) {
        let (waiting, wake) = &self.shards[shard];
        waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(write);
        wake.notify_one();
    }

    fn take(&self, shard: usize) -> Vec<Write> {
        std::mem::take(
            &mut *self.shards[shard]
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }
}

/// A shard's presence writer: writes what is waiting, one batch at a time, until
/// the node stops.
pub(super) async fn writer(inner: Weak<Inner>, shard: usize, shutdown: CancellationToken) {
    let Some(wake) = inner
        .upgrade()
        .map(|i| i.presence_writes.shards[shard].1.clone())
    else {
        return;
    };
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let batch = strong.presence_writes.take(shard);
        if batch.is_empty() {
            // Not kept while idle: the broker may go away.
            drop(strong);
            // A queue between the take and this wait left a permit: not missed.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => continue,
            }
        }
        write_batch(&strong, shard, batch).await;
    }
}

/// Writes a batch of entries of one shard and answers their waiters.
async fn write_batch(inner: &Inner, shard: usize, batch: Vec<Write>) {
    let mut by_channel: HashMap<String, Vec<Write>> = HashMap::new();
    for write in batch {
        by_channel
            .entry(write.channel.clone())
            .or_default()
            .push(write);
    }
    let shard = &inner.shards[shard];
    let pipeline = |channels: &[(&String, &Vec<Write>)]| {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for (channel, writes) in channels {
            let entries: Vec<&Entry> = writes.iter().map(|w| &w.entry).collect();
            add_presence_commands(inner, &mut pipe, channel, &entries);
        }
        pipe
    };
    let answer = |writes: Vec<Write>, result: &Result<(), BrokerError>| {
        for write in writes {
            let _ = write.done.send(match result {
                Ok(()) => Ok(()),
                Err(e) => Err(BrokerError::Unavailable(e.to_string())),
            });
        }
    };
    if inner.pubsub == PubSub::Sharded {
        // A transaction stays in one slot: one per channel, all at once.
        let runs = by_channel.iter().map(|(channel, writes)| {
            let pipe = pipeline(&[(channel, writes)]);
            async move { shard.run(&pipe).await }
        });
        let results = futures_util::future::join_all(runs).await;
        for ((_, writes), result) in by_channel.into_iter().zip(results) {
            answer(writes, &result);
        }
    } else {
        let channels: Vec<(&String, &Vec<Write>)> = by_channel.iter().collect();
        let result = shard.run(&pipeline(&channels)).await;
        for (_, writes) in by_channel {
            answer(writes, &result);
        }
    }
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
    let keys = presence_keys(inner, channel);
    inner.shard(channel).run(&remove_entry(&keys, member)).await
}

/// A channel's presence keys: the hash of entries and the sorted set of expiries.
fn presence_keys(inner: &Inner, channel: &str) -> (String, String) {
    (
        inner.keys.presence(channel, "presence"),
        inner.keys.presence(channel, "presence-exp"),
    )
}

/// What removes one entry from a set of entries (`(hash, expiries)`): presence
/// keeps a channel's this way, and a user's connections too.
pub(super) fn remove_entry(keys: &(String, String), member: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("HDEL")
        .arg(&keys.0)
        .arg(member)
        .ignore()
        .cmd("ZREM")
        .arg(&keys.1)
        .arg(member)
        .ignore();
    pipe
}

/// Reads a set of entries (`(hash, expiries)`) on `shard`, pruned of the expired:
/// up to `max` (0: all), and how many there are.
pub(super) async fn read_entries(
    shard: &Shard,
    keys: &(String, String),
    max: usize,
) -> Result<(Vec<Bytes>, usize), BrokerError> {
    let (total, entries) = shard
        .idempotent(|mut conn| async move {
            let mut script = PRESENCE_SCRIPT.prepare_invoke();
            script
                .key(&keys.0)
                .key(&keys.1)
                .arg(envelope::now_us() / 1000)
                .arg(max);
            script
                .invoke_async::<(usize, Vec<Vec<u8>>)>(&mut conn)
                .await
        })
        .await?;
    Ok((entries.into_iter().map(Bytes::from).collect(), total))
}

/// Up to `max` entries of a channel's presence (0: all), and how many there are.
pub(super) async fn presence(
    inner: &Inner,
    channel: &str,
    max: usize,
) -> Result<(Vec<Bytes>, usize), BrokerError> {
    read_entries(inner.shard(channel), &presence_keys(inner, channel), max).await
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

/// Adds to `pipe` what registers (or refreshes) `entries` of `channel`: all in the
/// hash (one `HSET`) with their expiry in the sorted set (one `ZADD`), and both
/// keys kept alive for two TTLs (so a channel whose nodes all died leaves nothing
/// behind).
pub(super) fn add_presence_commands<E: std::borrow::Borrow<Entry>>(
    inner: &Inner,
    pipe: &mut redis::Pipeline,
    channel: &str,
    entries: &[E],
) {
    let ttl = inner.config.presence.presence_ttl;
    add_entries(pipe, &presence_keys(inner, channel), ttl, entries);
}

/// Adds to `pipe` what writes `entries` into a set of entries (`(hash,
/// expiries)`) with an expiry `ttl` from now, and keeps both keys alive for two
/// TTLs: presence keeps a channel's this way, and a user's connections too.
pub(super) fn add_entries<E: std::borrow::Borrow<Entry>>(
    pipe: &mut redis::Pipeline,
    keys: &(String, String),
    ttl: std::time::Duration,
    entries: &[E],
) {
    if entries.is_empty() {
        return;
    }
    let expires = envelope::now_us() / 1000 + millis(ttl);
    let (hash, zset) = keys;
    let hset = pipe.cmd("HSET").arg(hash);
    for entry in entries {
        let entry = entry.borrow();
        hset.arg(&entry.member).arg(&entry.json[..]);
    }
    hset.ignore();
    let zadd = pipe.cmd("ZADD").arg(zset);
    for entry in entries {
        zadd.arg(expires).arg(&entry.borrow().member);
    }
    zadd.ignore();
    for key in [hash, zset] {
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
