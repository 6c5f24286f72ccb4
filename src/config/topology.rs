//! Where Redis is, as configured: the one parser of `--redis-url` and
//! `--redis-cluster`. The configuration checks the URLs with it at start-up and the
//! broker connects to what it returns, so a URL is understood the same way by both,
//! and the configuration does not depend on the broker to know it.

use std::fmt;

/// Default port of a sentinel.
const SENTINEL_PORT: u16 = 26379;

/// The Redis a node uses.
#[derive(Debug, Clone)]
pub enum Topology {
    /// No Redis: the in-process broker serves one node.
    Memory,
    /// One or more shards, in `--redis-url` order (each channel lives on one).
    Shards(Vec<ShardAddress>),
    /// A Redis Cluster, from its seed URLs.
    Cluster(Vec<redis::ConnectionInfo>),
}

/// One shard's Redis.
#[derive(Clone)]
pub enum ShardAddress {
    /// A fixed server (`redis://`, `rediss://`).
    Server(redis::ConnectionInfo),
    /// The current master of a Sentinel group (`redis+sentinel://`).
    Sentinel(SentinelGroup),
}

/// A Sentinel group: its sentinels, the master's name, and how to connect to the
/// master once found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelGroup {
    /// `host:port` of each sentinel.
    pub sentinels: Vec<String>,
    /// The name the sentinels know the master by.
    pub master: String,
    /// The master's scheme: `redis` or `rediss`.
    pub scheme: &'static str,
    /// `user:password@` of the master, or empty (the sentinels are asked without).
    pub userinfo: String,
    /// The master's database number.
    pub db: i64,
}

/// Why a Redis URL was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidUrl(String);

impl fmt::Debug for ShardAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl ShardAddress {
    /// Parses `redis://`, `rediss://`, `redis+sentinel://` or `rediss+sentinel://`
    /// (`redis+sentinel://[user:password@]host[:port],host2[:port]/<master>[/<db>]`;
    /// the credentials are the master's, the sentinels are asked without).
    pub fn parse(url: &str) -> Result<ShardAddress, InvalidUrl> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
        match scheme {
            "redis" | "rediss" => server(url).map(ShardAddress::Server),
            "redis+sentinel" | "rediss+sentinel" => parse_sentinel(scheme, rest),
            _ => Err(InvalidUrl(
                "the scheme must be redis://, rediss:// or redis+sentinel://".into(),
            )),
        }
    }

    /// A name for logs, metrics and `/readyz`, without credentials: `host:port` or
    /// `sentinel/<master>`.
    pub fn label(&self) -> String {
        match self {
            ShardAddress::Server(info) => info.addr().to_string(),
            ShardAddress::Sentinel(group) => format!("sentinel/{}", group.master),
        }
    }
}

/// The topology of `--redis-url` (shards, in order) or `--redis-cluster` (seeds);
/// `Err` names the flag and says what is wrong.
pub fn parse(
    redis_urls: &[String],
    cluster_urls: &[String],
) -> Result<Topology, (&'static str, String)> {
    if !cluster_urls.is_empty() {
        let mut seeds = Vec::new();
        for url in cluster_urls {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err((
                    "redis-cluster",
                    format!(
                        "{url:?}: seeds must be redis:// or rediss:// URLs of cluster nodes (a cluster fails over by itself, without Sentinel)"
                    ),
                ));
            }
            seeds.push(server(url).map_err(|e| ("redis-cluster", format!("{url:?}: {e}")))?);
        }
        return Ok(Topology::Cluster(seeds));
    }
    if redis_urls.is_empty() {
        return Ok(Topology::Memory);
    }
    let mut shards = Vec::new();
    for (i, url) in redis_urls.iter().enumerate() {
        let shard = ShardAddress::parse(url).map_err(|e| ("redis-url", format!("{url:?}: {e}")))?;
        if redis_urls[..i].contains(url) {
            return Err((
                "redis-url",
                format!("{url:?} is listed twice: each shard must be a different Redis"),
            ));
        }
        shards.push(shard);
    }
    Ok(Topology::Shards(shards))
}

fn server(url: &str) -> Result<redis::ConnectionInfo, InvalidUrl> {
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| InvalidUrl(e.to_string()))
}

fn parse_sentinel(scheme: &str, rest: &str) -> Result<ShardAddress, InvalidUrl> {
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
    Ok(ShardAddress::Sentinel(SentinelGroup {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sentinel(url: &str) -> SentinelGroup {
        match ShardAddress::parse(url).unwrap() {
            ShardAddress::Sentinel(s) => s,
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
            ShardAddress::parse("redis+sentinel://h/m").unwrap().label(),
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
            assert!(ShardAddress::parse(url).is_err(), "{url} accepted");
        }
        assert_eq!(
            ShardAddress::parse("redis://h:7000").unwrap().label(),
            "h:7000"
        );
    }

    #[test]
    fn names_the_flag_of_what_it_refuses() {
        let urls = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(matches!(parse(&[], &[]), Ok(Topology::Memory)));
        let twice = parse(&urls(&["redis://a:1", "redis://a:1"]), &[]).unwrap_err();
        assert_eq!(twice.0, "redis-url");
        assert!(twice.1.contains("listed twice"), "{}", twice.1);
        let sentinel_seed = parse(&[], &urls(&["redis+sentinel://h/m"])).unwrap_err();
        assert_eq!(sentinel_seed.0, "redis-cluster");
        assert!(matches!(
            parse(&urls(&["redis://a:1", "redis+sentinel://s/m"]), &[]),
            Ok(Topology::Shards(s)) if s.len() == 2
        ));
    }
}
