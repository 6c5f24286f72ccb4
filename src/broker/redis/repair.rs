//! Keeping history channels whole on this node: the repair tasks (a gap's range
//! read from the stream and handed to the tracker), the periodic position check
//! (quiet channels compared with their meta keys), and the renewal of positions that
//! subscribes made for channels nobody has published to.

use std::collections::HashMap;
use std::sync::Arc;

use super::conn::{Conn, PubSub};
use super::history::read_history;
use super::scripts::KEEP_UNPUBLISHED_LUA;
use super::{Backoff, Inner, millis};
use crate::broker::HistoryRequest;
use crate::broker::tracker::Repair;
use crate::publication::{Epoch, Position};

/// Quiet channels per pipelined batch of the position check.
const CHECK_BATCH: usize = 1000;

/// `items` grouped by the index of their channel's shard, leaving out the shards
/// that are not connected (for the periodic rounds over tracked channels).
pub(super) fn by_connected_shard<T>(
    inner: &Inner,
    items: Vec<T>,
    channel: impl Fn(&T) -> &str,
) -> HashMap<usize, Vec<T>> {
    let mut by_shard: HashMap<usize, Vec<T>> = HashMap::new();
    for item in items {
        let shard = inner.shard(channel(&item));
        if shard.is_connected() {
            by_shard.entry(shard.index).or_default().push(item);
        }
    }
    by_shard
}

/// Starts a task that reads a repair's range and hands it to the tracker, until
/// the channel is whole again (or no longer wanted).
pub(super) fn spawn_repair(inner: &Arc<Inner>, repair: Repair) {
    tokio::spawn(repair_task(inner.clone(), repair));
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
                async move { read_history(inner, &mut conn, channel, request).await }
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
pub(super) async fn check_positions(inner: Arc<Inner>) {
    // A disconnected shard re-reads every position when it reconnects.
    let quiet_by_shard = by_connected_shard(&inner, inner.tracker.quiet_channels(), |q| &q.0);
    for (index, quiet) in quiet_by_shard {
        let shard = &inner.shards[index];
        for batch in quiet.chunks(CHECK_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|(channel, _, _)| inner.keys.history(channel, "meta"))
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
                    spawn_repair(&inner, repair);
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
pub(super) async fn keep_unpublished(inner: Arc<Inner>) {
    let ttl = millis(inner.config.history.unpublished_position_ttl);
    // A disconnected shard creates the positions again when it re-subscribes.
    let by_shard = by_connected_shard(&inner, inner.tracker.unpublished_channels(), |c| c);
    for (index, channels) in by_shard {
        let shard = &inner.shards[index];
        for batch in channels.chunks(CHECK_BATCH) {
            let keys: Vec<String> = batch
                .iter()
                .map(|channel| inner.keys.history(channel, "meta"))
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
