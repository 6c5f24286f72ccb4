//! The cluster view in Redis: this node's announcement (its info, listed in a
//! sorted set by expiry, its channel counts and the samples for the charts, written
//! in one transaction on the first shard) and the reads of every live node's.

use std::collections::HashMap;
use std::time::Duration;

use super::{Inner, millis};
use crate::broker::{BrokerError, NodeChannels};
use crate::cluster::{self, Announcement, NodeInfo, Sample};
use crate::envelope;

/// Writes this node's announcement: its info (expiring after `--node-ttl`, and
/// listed in the nodes sorted set with that expiry), its channel counts and a
/// sample for the charts (a list capped at [`cluster::history_len`]), in one
/// transaction, so readers never see half of it.
pub(super) async fn announce(inner: &Inner, announcement: Announcement) -> Result<(), BrokerError> {
    let ttl = millis(inner.config.presence.node_ttl);
    let id = &announcement.info.id;
    let info = serde_json::to_vec(&announcement.info)
        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
    let sample = serde_json::to_vec(&Sample::from(&announcement.info))
        .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
    let keep = cluster::history_len(Duration::from_millis(announcement.info.interval_ms));
    let channels_key = inner.keys.node(&format!("node-channels:{id}"));
    let history_key = inner.keys.node(&format!("node-history:{id}"));
    let mut pipe = redis::pipe();
    // Newest first: LTRIM keeps the last `keep`.
    pipe.atomic()
        .cmd("LPUSH")
        .arg(&history_key)
        .arg(sample)
        .ignore()
        .cmd("LTRIM")
        .arg(&history_key)
        .arg(0)
        .arg(keep - 1)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&history_key)
        .arg(ttl)
        .ignore();
    pipe.cmd("SET")
        .arg(inner.keys.node(&format!("node:{id}")))
        .arg(info)
        .arg("PX")
        .arg(ttl)
        .ignore()
        .cmd("ZADD")
        .arg(inner.keys.node("nodes"))
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
async fn live_nodes(inner: &Inner) -> Result<Vec<String>, BrokerError> {
    let key = inner.keys.node("nodes");
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
        .idempotent(|mut conn| async move { pipe.query_async::<(Vec<String>,)>(&mut conn).await })
        .await?;
    Ok(ids)
}

/// The live nodes' announcements, by id.
pub(super) async fn nodes(inner: &Inner) -> Result<Vec<NodeInfo>, BrokerError> {
    let ids = live_nodes(inner).await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = ids
        .iter()
        .map(|id| inner.keys.node(&format!("node:{id}")))
        .collect();
    let mut mget = redis::cmd("MGET");
    mget.arg(&keys);
    let mget = &mget;
    let infos = inner
        .home()
        .idempotent(
            |mut conn| async move { mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await },
        )
        .await?;
    let mut nodes: Vec<NodeInfo> = infos
        .into_iter()
        .flatten()
        .filter_map(|json| serde_json::from_slice(&json).ok())
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(nodes)
}

/// Each live node's channels with their local subscriber counts, by node id.
pub(super) async fn node_channels(inner: &Inner) -> Result<Vec<NodeChannels>, BrokerError> {
    let per_node = per_live_node::<HashMap<String, usize>>(inner, |pipe, id| {
        pipe.cmd("HGETALL")
            .arg(inner.keys.node(&format!("node-channels:{id}")));
    })
    .await?;
    Ok(per_node
        .into_iter()
        .map(|(id, channels)| {
            let mut channels: Vec<(String, usize)> = channels.into_iter().collect();
            channels.sort();
            (id, channels)
        })
        .collect())
}

/// The samples of each live node's last announcements, oldest first, by node id.
pub(super) async fn node_history(inner: &Inner) -> Result<Vec<(String, Vec<Sample>)>, BrokerError> {
    let per_node = per_live_node::<Vec<Vec<u8>>>(inner, |pipe, id| {
        pipe.cmd("LRANGE")
            .arg(inner.keys.node(&format!("node-history:{id}")))
            .arg(0)
            .arg(-1);
    })
    .await?;
    Ok(per_node
        .into_iter()
        .map(|(id, samples)| {
            // A sample that does not parse (another version's) is skipped.
            let samples = samples
                .iter()
                .rev()
                .filter_map(|json| serde_json::from_slice(json).ok())
                .collect();
            (id, samples)
        })
        .collect())
}

/// One command per live node (`command` adds it to the pipeline), sent in one
/// pipeline; each node's answer, by node id in id order.
async fn per_live_node<T: redis::FromRedisValue>(
    inner: &Inner,
    command: impl Fn(&mut redis::Pipeline, &str),
) -> Result<Vec<(String, T)>, BrokerError> {
    let mut ids = live_nodes(inner).await?;
    ids.sort();
    let mut pipe = redis::pipe();
    for id in &ids {
        command(&mut pipe, id);
    }
    let pipe = &pipe;
    let answers = inner
        .home()
        .idempotent(|mut conn| async move { pipe.query_async::<Vec<T>>(&mut conn).await })
        .await?;
    Ok(ids.into_iter().zip(answers).collect())
}
