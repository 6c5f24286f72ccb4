//! Clients' history reads: a channel's position and stored publications, read by
//! the history script (bounded in count and bytes) on the shard's connection for
//! reads.

use bytes::Bytes;

use super::scripts::HISTORY_SCRIPT;
use super::{Inner, millis};
use crate::broker::{BrokerError, History, HistoryRequest};
use crate::envelope;
use crate::publication::{Epoch, Position};

/// Reads a channel's position and stored publications, for a client (a
/// subscription, a recovery, a `history` request): on the shard's connection
/// for reads, so large answers do not hold up publishes.
pub(super) async fn history(
    inner: &Inner,
    channel: &str,
    request: &HistoryRequest,
) -> Result<History, BrokerError> {
    inner
        .shard(channel)
        .read(|mut conn| async move { read_history(inner, &mut conn, channel, request).await })
        .await
}

/// Runs [`HISTORY_SCRIPT`] on `conn` and decodes what it read.
///
/// A read of the position alone (`limit` 0: every subscribe, the tracker's
/// re-subscribes) is first one plain `HMGET` of the meta hash, which a reconnect
/// storm makes by the thousand: cheaper for Redis than a script call, and atomic
/// enough (one command reads both fields). Only a channel without a position runs
/// the script, which creates it atomically with finding none.
pub(super) async fn read_history(
    inner: &Inner,
    conn: &mut impl redis::aio::ConnectionLike,
    channel: &str,
    request: &HistoryRequest,
) -> redis::RedisResult<History> {
    if request.limit == 0 {
        let (epoch, top): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(inner.keys.history(channel, "meta"))
            .arg("e")
            .arg("s")
            .query_async(conn)
            .await?;
        if let (Some(epoch), Some(top)) = (epoch.as_deref().and_then(Epoch::parse), top) {
            return Ok(History {
                top: Position { epoch, offset: top },
                publications: Vec::new(),
                truncated: false,
            });
        }
    }
    let (since_epoch, since_offset) = match &request.since {
        Some((epoch, offset)) => (epoch.as_str().to_owned(), *offset),
        None => (String::new(), 0),
    };
    let mut script = HISTORY_SCRIPT.prepare_invoke();
    script
        .key(inner.keys.history(channel, "stream"))
        .key(inner.keys.history(channel, "meta"))
        .arg(Epoch::random().as_str())
        .arg(if request.subscribing {
            millis(inner.config.history.unpublished_position_ttl)
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
                inner.delivery.metrics.broker_dropped("malformed");
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
