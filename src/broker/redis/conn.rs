//! The two kinds of Redis connection a shard holds, behind one type each: a
//! standalone server's (or a Sentinel group's current master's), and a Redis
//! Cluster's, which routes each command to the node that owns its key's slot and
//! follows `MOVED` redirections and failovers by itself.
//!
//! Pub/sub differs between the two: standalone servers use `SUBSCRIBE`/`PUBLISH`,
//! a cluster uses sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`), so a channel's
//! messages only travel through the shard that owns its slot instead of being
//! broadcast over the whole cluster bus.

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// Which pub/sub commands a shard speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PubSub {
    /// `PUBLISH`/`SUBSCRIBE`: standalone Redis and Sentinel groups.
    Classic,
    /// `SPUBLISH`/`SSUBSCRIBE`: Redis Cluster.
    Sharded,
}

impl PubSub {
    /// The publish command.
    pub(super) fn publish(self) -> &'static str {
        match self {
            PubSub::Classic => "PUBLISH",
            PubSub::Sharded => "SPUBLISH",
        }
    }
}

/// A shard's publishing connection (also used for history and presence).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A shard's subscriber connection (RESP3: pushes go to a callback).
#[derive(Clone)]
pub(super) enum SubConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl SubConn {
    /// Subscribes to pub/sub channels (full names). On a cluster, one `SSUBSCRIBE`
    /// per channel, sent together: channels of one command must share a slot.
    pub(super) async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            SubConn::Single(c) => c.subscribe(channels).await,
            SubConn::Cluster(c) => {
                let each = channels.iter().map(|channel| {
                    let mut c = c.clone();
                    async move { c.ssubscribe(channel).await }
                });
                futures_util::future::try_join_all(each).await.map(|_| ())
            }
        }
    }

    /// Unsubscribes from pub/sub channels (full names).
    pub(super) async fn unsubscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            SubConn::Single(c) => c.unsubscribe(channels).await,
            SubConn::Cluster(c) => {
                let each = channels.iter().map(|channel| {
                    let mut c = c.clone();
                    async move { c.sunsubscribe(channel).await }
                });
                futures_util::future::try_join_all(each).await.map(|_| ())
            }
        }
    }
}

/// `ConnectionLike` for an enum of a standalone and a cluster connection, by
/// delegation to the variant: both are used with the same commands and scripts.
macro_rules! delegate_connection_like {
    ($ty:ident) => {
        impl ConnectionLike for $ty {
            fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
                match self {
                    $ty::Single(c) => c.req_packed_command(cmd),
                    $ty::Cluster(c) => c.req_packed_command(cmd),
                }
            }

            fn req_packed_commands<'a>(
                &'a mut self,
                pipeline: &'a Pipeline,
                offset: usize,
                count: usize,
            ) -> RedisFuture<'a, Vec<Value>> {
                match self {
                    $ty::Single(c) => c.req_packed_commands(pipeline, offset, count),
                    $ty::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
                }
            }

            fn get_db(&self) -> i64 {
                match self {
                    $ty::Single(c) => c.get_db(),
                    $ty::Cluster(c) => c.get_db(),
                }
            }
        }
    };
}

delegate_connection_like!(Conn);
delegate_connection_like!(SubConn);
