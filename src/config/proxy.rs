//! Settings of the application backend: the proxies a node calls (connect,
//! refresh, subscribe, publish, rpc; see `docs/proxy.md`), what of the client's
//! request they forward, and how users are bounded and acted on across the cluster.

use std::time::Duration;

use super::{ConfigError, parse_duration};

/// The application backend's proxies.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyConfig {
    /// URL the node POSTs to when a connection opens without a token (every
    /// connection when no JWT key is configured): the backend says who the user is,
    /// what it may do and where it is subscribed (docs/proxy.md).
    #[arg(long, env = "WSRELAY_PROXY_CONNECT_URL")]
    pub proxy_connect_url: Option<String>,

    /// URL the node POSTs to before a connection's expiry, to extend it.
    #[arg(long, env = "WSRELAY_PROXY_REFRESH_URL")]
    pub proxy_refresh_url: Option<String>,

    /// URL that authorizes a `sub` the connection's grants do not cover, in
    /// namespaces with `proxy-subscribe` (or everywhere with `--proxy-subscribe`).
    #[arg(long, env = "WSRELAY_PROXY_SUBSCRIBE_URL")]
    pub proxy_subscribe_url: Option<String>,

    /// URL that sees every client publication of namespaces with `proxy-publish`
    /// (or everywhere with `--proxy-publish`) before it is stored and fanned out:
    /// it allows, replaces the data, or refuses.
    #[arg(long, env = "WSRELAY_PROXY_PUBLISH_URL")]
    pub proxy_publish_url: Option<String>,

    /// URL that answers the clients' `rpc` requests.
    #[arg(long, env = "WSRELAY_PROXY_RPC_URL")]
    pub proxy_rpc_url: Option<String>,

    /// Call the subscribe proxy in every namespace (a namespace's `proxy-subscribe`
    /// overrides it).
    #[arg(long, env = "WSRELAY_PROXY_SUBSCRIBE")]
    pub proxy_subscribe: bool,

    /// Call the publish proxy in every namespace (a namespace's `proxy-publish`
    /// overrides it).
    #[arg(long, env = "WSRELAY_PROXY_PUBLISH")]
    pub proxy_publish: bool,

    /// Longest wait for the backend's answer (including the wait for a free call
    /// slot): a client is never kept waiting longer; it gets `unavailable`.
    #[arg(long, env = "WSRELAY_PROXY_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub proxy_timeout: Duration,

    /// Most proxy calls in flight at once on a node: a slow backend holds a slot
    /// per waiting client, so this bounds the sockets and memory it can take.
    #[arg(long, env = "WSRELAY_PROXY_MAX_CONCURRENCY", default_value_t = 256)]
    pub proxy_max_concurrency: usize,

    /// Headers of the client's HTTP request (the WebSocket upgrade, the SSE or
    /// stream request) sent along with every proxy call of its connection
    /// (comma-separated, case-insensitive). Nothing else of the request is.
    #[arg(long, env = "WSRELAY_PROXY_FORWARD_HEADERS", value_delimiter = ',')]
    pub proxy_forward_headers: Vec<String>,

    /// Cookies of the client's HTTP request sent along (in a `Cookie` header) with
    /// every proxy call of its connection, by name (comma-separated): the backend's
    /// session cookie, and only it.
    #[arg(long, env = "WSRELAY_PROXY_FORWARD_COOKIES", value_delimiter = ',')]
    pub proxy_forward_cookies: Vec<String>,

    /// How long before a connection's expiry the refresh proxy is called.
    #[arg(long, env = "WSRELAY_PROXY_REFRESH_BEFORE", default_value = "10s", value_parser = parse_duration)]
    pub proxy_refresh_before: Duration,
}

/// Users across the cluster.
#[derive(Debug, Clone, clap::Args)]
pub struct UsersConfig {
    /// Most connections of one user across the cluster (0: no limit): the next one
    /// is refused whatever node it reaches. Needs a user (a token's `sub`, or the
    /// connect proxy's `user`); anonymous connections are not counted.
    #[arg(long, env = "WSRELAY_MAX_CONNECTIONS_PER_USER", default_value_t = 0)]
    pub max_connections_per_user: usize,

    /// Check tokens against the revocations of `POST /api/revoke` at connect and
    /// at refresh (a Redis read per connection with a token).
    #[arg(long, env = "WSRELAY_TOKEN_REVOCATION")]
    pub token_revocation: bool,

    /// How long a revocation of all a user's tokens is kept: at least the lifetime
    /// of the tokens you issue (a revoked `jti` is kept until its token's expiry).
    #[arg(long, env = "WSRELAY_REVOCATION_TTL", default_value = "1day", value_parser = parse_duration)]
    pub revocation_ttl: Duration,

    /// Subscribe every connection with a user, at connect and server-side, to its
    /// personal channel `<NS>:#<user>` (`#<user>` when NS is empty).
    #[arg(long, env = "WSRELAY_PERSONAL_CHANNEL_NAMESPACE")]
    pub personal_channel_namespace: Option<String>,
}

impl ProxyConfig {
    /// Checks the URLs and ranges, naming the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, url) in [
            ("proxy-connect-url", &self.proxy_connect_url),
            ("proxy-refresh-url", &self.proxy_refresh_url),
            ("proxy-subscribe-url", &self.proxy_subscribe_url),
            ("proxy-publish-url", &self.proxy_publish_url),
            ("proxy-rpc-url", &self.proxy_rpc_url),
        ] {
            if let Some(url) = url {
                check_url(url).map_err(|reason| ConfigError::new(flag, reason))?;
            }
        }
        if self.proxy_max_concurrency == 0 {
            return Err(ConfigError::new(
                "proxy-max-concurrency",
                "must be at least 1",
            ));
        }
        if self.proxy_subscribe && self.proxy_subscribe_url.is_none() {
            return Err(ConfigError::new(
                "proxy-subscribe",
                "needs --proxy-subscribe-url",
            ));
        }
        if self.proxy_publish && self.proxy_publish_url.is_none() {
            return Err(ConfigError::new(
                "proxy-publish",
                "needs --proxy-publish-url",
            ));
        }
        for name in self
            .proxy_forward_headers
            .iter()
            .chain(&self.proxy_forward_cookies)
        {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
                return Err(ConfigError::new(
                    "proxy-forward-headers",
                    format!("{name:?} is not a header or cookie name"),
                ));
            }
        }
        Ok(())
    }
}

impl UsersConfig {
    /// Checks the personal channel's namespace.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(ns) = &self.personal_channel_namespace
            && !ns.is_empty()
            && crate::protocol::validate_channel(ns).is_err()
        {
            return Err(ConfigError::new(
                "personal-channel-namespace",
                format!("{ns:?} is not a namespace (A-Z a-z 0-9 _ . @ -)"),
            ));
        }
        Ok(())
    }
}

/// A proxy URL the node's HTTP client can call: `http://host[:port]/path`.
fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: expected http://host[:port]/path (the backend is reached over plain HTTP, inside the cluster)"))?;
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn urls() {
        assert!(check_url("http://app:8000/relay/connect").is_ok());
        assert!(check_url("http://127.0.0.1:1").is_ok());
        assert!(check_url("https://app/x").is_err());
        assert!(check_url("http:///x").is_err());
        assert!(check_url("app:8000").is_err());
    }
}
