//! Where one shard's Redis is: a fixed address (`redis://`, `rediss://`), the
//! current master of a Sentinel group (`redis+sentinel://`), found by asking the
//! sentinels and followed across failovers, or a whole Redis Cluster
//! (`--redis-cluster`), whose client follows the slot map by itself.
//!
//! redis-rs asks Sentinel for the master only when it connects, and a connection to
//! a master that was demoted stays up (now to a replica): writes fail with
//! `READONLY`, and plain `PUBLISH` succeeds but reaches only that replica's
//! subscribers. So the shard resolves the master itself on every (re)connect, and
//! [`watch`] listens to the sentinels' `+switch-master` events to move at once; the
//! shard's `ROLE` check and `READONLY` replies are the backstop.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use crate::config::ShardAddress;
use crate::config::topology::SentinelGroup;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One shard's Redis, ready to connect to.
#[derive(Clone)]
pub enum Endpoint {
    /// A fixed Redis server.
    Direct(redis::Client),
    /// The master of a Sentinel group.
    Sentinel(SentinelGroup),
    /// A Redis Cluster, from its seeds.
    Cluster(Vec<redis::ConnectionInfo>),
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl Endpoint {
    /// The endpoint of a configured shard.
    pub fn of_shard(address: ShardAddress) -> redis::RedisResult<Endpoint> {
        Ok(match address {
            ShardAddress::Server(info) => Endpoint::Direct(redis::Client::open(info)?),
            ShardAddress::Sentinel(group) => Endpoint::Sentinel(group),
        })
    }

    /// A name for logs, metrics and `/readyz`, without credentials: `host:port`,
    /// `sentinel/<master>` or `cluster`.
    pub fn label(&self) -> String {
        match self {
            Endpoint::Direct(client) => client.get_connection_info().addr().to_string(),
            Endpoint::Sentinel(s) => format!("sentinel/{}", s.master),
            Endpoint::Cluster(_) => "cluster".to_owned(),
        }
    }

    /// The pub/sub commands this endpoint speaks.
    pub(super) fn pubsub(&self) -> super::conn::PubSub {
        match self {
            Endpoint::Cluster(_) => super::conn::PubSub::Sharded,
            _ => super::conn::PubSub::Classic,
        }
    }

    /// A client of the cluster (RESP3 for the subscriber connection, whose pushes
    /// go to a callback). `None` for other endpoints.
    pub(super) fn cluster_client(
        &self,
        resp3: bool,
        resends: Resends,
    ) -> Option<redis::RedisResult<redis::cluster::ClusterClient>> {
        let Endpoint::Cluster(seeds) = self else {
            return None;
        };
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.iter().cloned());
        if resp3 {
            builder = builder.use_protocol(redis::ProtocolVersion::RESP3);
        }
        if resends == Resends::Never {
            builder = builder.retries(0);
        }
        Some(builder.build())
    }

    /// Whether this endpoint's master can move (so `ROLE` is worth checking).
    pub fn is_sentinel(&self) -> bool {
        matches!(self, Endpoint::Sentinel(_))
    }

    /// The client of the server to use now, and its address: the fixed server, or
    /// the master the sentinels name (the first sentinel that answers is trusted).
    pub async fn resolve(&self, timeout: Duration) -> Result<(String, redis::Client), String> {
        let sentinel = match self {
            Endpoint::Direct(client) => {
                return Ok((
                    client.get_connection_info().addr().to_string(),
                    client.clone(),
                ));
            }
            Endpoint::Sentinel(sentinel) => sentinel,
            Endpoint::Cluster(_) => return Err("a cluster has no single server".into()),
        };
        let mut errors = Vec::new();
        for address in &sentinel.sentinels {
            match ask(sentinel, address, timeout).await {
                Ok(Some((host, port))) => {
                    let url = format!(
                        "{}://{}{host}:{port}/{}",
                        sentinel.scheme, sentinel.userinfo, sentinel.db
                    );
                    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
                    return Ok((format!("{host}:{port}"), client));
                }
                Ok(None) => errors.push(format!("{address}: master {:?} unknown", sentinel.master)),
                Err(e) => errors.push(format!("{address}: {e}")),
            }
        }
        Err(format!(
            "no sentinel named the master: {}",
            errors.join("; ")
        ))
    }
}

/// `SENTINEL GET-MASTER-ADDR-BY-NAME` on one sentinel of `group`.
async fn ask(
    group: &SentinelGroup,
    address: &str,
    timeout: Duration,
) -> Result<Option<(String, u16)>, String> {
    let client = redis::Client::open(format!("redis://{address}")).map_err(|e| e.to_string())?;
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&group.master)
            .query_async::<Option<(String, u16)>>(&mut conn)
            .await
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Listens to the sentinels' `+switch-master` events and wakes `kick` when the
/// group's master changed, until shutdown. Moves to the next sentinel when one
/// cannot be reached. Nothing to do for a fixed endpoint.
pub(super) async fn watch(endpoint: Endpoint, kick: Arc<Notify>, shutdown: CancellationToken) {
    let Endpoint::Sentinel(sentinel) = endpoint else {
        return;
    };
    let mut backoff = super::Backoff::default();
    for address in sentinel.sentinels.iter().cycle() {
        let listen = async {
            let client = redis::Client::open(format!("redis://{address}"))?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            tracing::debug!(sentinel = %address, master = %sentinel.master, "watching for failovers");
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                // "<master name> <old ip> <old port> <new ip> <new port>"
                let payload: String = message.get_payload().unwrap_or_default();
                if payload.split(' ').next() == Some(sentinel.master.as_str()) {
                    tracing::warn!(master = %sentinel.master, event = %payload, "Sentinel switched the master");
                    kick.notify_one();
                }
            }
            Ok::<(), redis::RedisError>(())
        };
        let ended = tokio::select! {
            _ = shutdown.cancelled() => return,
            ended = listen => ended,
        };
        let delay = backoff.next_delay();
        match ended {
            Ok(()) => {
                tracing::warn!(sentinel = %address, "sentinel connection closed; watching another")
            }
            Err(e) => {
                tracing::warn!(sentinel = %address, error = %e, "cannot watch this sentinel; trying another")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether a Redis Cluster client sends a request again on its own (after a
/// redirect, or when its connection dropped before the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resends {
    /// redis-rs' default: fine for what may run twice (reads, presence, probes).
    Allowed,
    /// Never: a request whose connection dropped may have run already, and a
    /// publish run twice is a message stored and delivered twice. The caller sends
    /// again only what Redis answered it did not run (`run_once`).
    Never,
}
