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
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Default port of a sentinel.
const SENTINEL_PORT: u16 = 26379;

/// One shard's Redis, as configured.
#[derive(Clone)]
pub enum Endpoint {
    /// A fixed Redis server.
    Direct(redis::Client),
    /// The master of a Sentinel group.
    Sentinel(Sentinel),
    /// A Redis Cluster, from its seed URLs.
    Cluster(Vec<String>),
}

/// A Sentinel group: its sentinels, the master's name, and how to connect to the
/// master once found.
#[derive(Clone)]
pub struct Sentinel {
    sentinels: Vec<String>,
    master: String,
    /// `redis` or `rediss`.
    scheme: &'static str,
    /// `user:password@` of the master, or empty.
    userinfo: String,
    db: i64,
}

/// Why a Redis URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidUrl(String);

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl Endpoint {
    /// Parses `redis://`, `rediss://`, `redis+sentinel://` or `rediss+sentinel://`
    /// (`redis+sentinel://[user:password@]host[:port],host2[:port]/<master>[/<db>]`;
    /// the credentials are the master's, the sentinels are asked without).
    pub fn parse(url: &str) -> Result<Endpoint, InvalidUrl> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        match scheme {
            "redis" | "rediss" => redis::Client::open(url)
                .map(Endpoint::Direct)
                .map_err(|e| InvalidUrl(e.to_string())),
            "redis+sentinel" | "rediss+sentinel" => Self::parse_sentinel(scheme, rest),
            _ => Err(InvalidUrl(
                "the scheme must be redis://, rediss:// or redis+sentinel://".into(),
            )),
        }
    }

    fn parse_sentinel(scheme: &str, rest: &str) -> Result<Endpoint, InvalidUrl> {
        let invalid = |why: &str| {
            InvalidUrl(format!(
                "{why} (expected {scheme}://[user:password@]host:26379,host2:26379/<master>[/<db>])"
            ))
        };
        let (authority, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid("no master name"))?;
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
            None => (String::new(), authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let address = match host.rsplit_once(':') {
                Some((name, port)) if !name.is_empty() => {
                    let port: u16 = port
                        .parse()
                        .map_err(|_| invalid(&format!("bad port in {host:?}")))?;
                    format!("{name}:{port}")
                }
                Some(_) => return Err(invalid(&format!("no host in {host:?}"))),
                None => format!("{host}:{SENTINEL_PORT}"),
            };
            sentinels.push(address);
        }
        if sentinels.is_empty() {
            return Err(invalid("no sentinel address"));
        }
        let mut segments = path.split('/');
        let master = segments.next().unwrap_or_default();
        if master.is_empty() {
            return Err(invalid("no master name"));
        }
        let db = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse()
                .map_err(|_| invalid(&format!("bad database number {db:?}")))?,
        };
        if segments.next().is_some() {
            return Err(invalid("too many path segments"));
        }
        Ok(Endpoint::Sentinel(Sentinel {
            sentinels,
            master: master.to_owned(),
            scheme: if scheme.starts_with("rediss") {
                "rediss"
            } else {
                "redis"
            },
            userinfo,
            db,
        }))
    }

    /// A Redis Cluster reached through `seeds` (checked like `--redis-url`s).
    pub fn cluster(seeds: &[String]) -> Result<Endpoint, InvalidUrl> {
        for seed in seeds {
            redis::Client::open(seed.as_str()).map_err(|e| InvalidUrl(format!("{seed:?}: {e}")))?;
        }
        if seeds.is_empty() {
            return Err(InvalidUrl("no seed URL".into()));
        }
        Ok(Endpoint::Cluster(seeds.to_vec()))
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
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str));
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
            match sentinel.ask(address, timeout).await {
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

impl Sentinel {
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on one sentinel.
    async fn ask(&self, address: &str, timeout: Duration) -> Result<Option<(String, u16)>, String> {
        let client =
            redis::Client::open(format!("redis://{address}")).map_err(|e| e.to_string())?;
        let ask = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&self.master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        match tokio::time::timeout(timeout, ask).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> Sentinel {
        match Endpoint::parse(url).unwrap() {
            Endpoint::Sentinel(s) => s,
            _ => panic!("{url} did not parse as a Sentinel group"),
        }
    }

    #[test]
    fn parses_sentinel_groups() {
        let s = sentinel("redis+sentinel://a:26380,b/mymaster");
        assert_eq!(s.sentinels, ["a:26380", "b:26379"]);
        assert_eq!(s.master, "mymaster");
        assert_eq!((s.scheme, s.userinfo.as_str(), s.db), ("redis", "", 0));

        let s = sentinel("rediss+sentinel://:secret@h:1/m/3");
        assert_eq!(s.sentinels, ["h:1"]);
        assert_eq!(
            (s.scheme, s.userinfo.as_str(), s.db),
            ("rediss", ":secret@", 3)
        );
        assert_eq!(
            Endpoint::parse("redis+sentinel://h/m").unwrap().label(),
            "sentinel/m"
        );
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        for url in [
            "http://h:6379",
            "h:6379",
            "redis+sentinel://h:26379",
            "redis+sentinel://h:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://h:x/m",
            "redis+sentinel://h/m/notadb",
            "redis+sentinel://h/m/0/extra",
        ] {
            assert!(Endpoint::parse(url).is_err(), "{url} accepted");
        }
        assert_eq!(Endpoint::parse("redis://h:7000").unwrap().label(), "h:7000");
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
