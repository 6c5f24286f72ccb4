//! Publishing: one publication to a channel's shard, stored with the next offset on
//! a channel with history (the publish script, optionally followed by `WAIT` for
//! replicas), or plainly PUBLISHed; a publish is sent again only when Redis answered
//! that it did not run it.

use std::time::Duration;

use super::conn::Conn;
use super::scripts::PUBLISH_SCRIPT;
use super::{Inner, millis};
use crate::broker::BrokerError;
use crate::config::{ChannelOptions, Durability};
use crate::envelope;
use crate::publication::{Epoch, Kind, Position, Publication};

/// How long a publish that a Redis Cluster node did not run (`MOVED`, `ASK`,
/// `TRYAGAIN`, `CLUSTERDOWN`) waits before it is sent again: long enough for the
/// client to refresh its slot map, short against a failover or a slot migration.
const REDIRECT_PAUSE: Duration = Duration::from_millis(20);

/// Sends a publication to every node subscribed to `channel`; on a channel with
/// history, stores it first (one script) and returns its position.
pub(super) async fn publish(
    inner: &Inner,
    channel: &str,
    publication: Publication,
    options: ChannelOptions,
) -> Result<Option<Position>, BrokerError> {
    let started = std::time::Instant::now();
    let shard = inner.shard(channel);
    let key = inner.keys.pubsub(channel);
    let published = if options.has_history() {
        let head = envelope::head(&publication);
        // EVALSHA of the publish script (see `scripts`).
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg(PUBLISH_SCRIPT.get_hash())
            .arg(2)
            .arg(inner.keys.history(channel, "stream"))
            .arg(inner.keys.history(channel, "meta"))
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
        let payload = if inner.config.broker.legacy_envelopes && publication.kind == Kind::Message {
            let frame = crate::delivery::frame(channel, &publication);
            envelope::encode_v1(frame.as_str().as_bytes(), &publication)
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
                .delivery
                .metrics
                .redis_publish_latency
                .observe(started.elapsed().as_secs_f64());
            result
        }
        Err(_) => Err(BrokerError::Timeout(inner.timeout)),
    }
}

/// Publishes a forwarded request on the control channel of the node of `route`
/// (on the first shard, where cluster-wide traffic goes); whether a node received
/// it. Sent once, like a publication: a request run twice could be a message
/// published twice.
pub(super) async fn forward(
    inner: &Inner,
    route: &str,
    payload: Vec<u8>,
) -> Result<bool, BrokerError> {
    Ok(broadcast(inner, &inner.keys.control(route), payload).await? > 0)
}

/// Publishes `payload` once on a control channel of the first shard; how many
/// nodes received it.
pub(super) async fn broadcast(
    inner: &Inner,
    channel: &str,
    payload: Vec<u8>,
) -> Result<usize, BrokerError> {
    let shard = inner.home();
    let mut conn = shard.publisher_once()?;
    let mut publish = redis::cmd(inner.pubsub.publish());
    publish.arg(channel).arg(payload);
    let send = async {
        run_once(&mut conn, None, |mut conn| {
            let publish = &publish;
            async move { publish.query_async::<i64>(&mut conn).await }
        })
        .await
        .map_err(|e| shard.failed(e))
    };
    match tokio::time::timeout(inner.timeout, send).await {
        Ok(receivers) => Ok(receivers?.max(0) as usize),
        Err(_) => Err(BrokerError::Timeout(inner.timeout)),
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
