//! Node configuration: every setting, its flag, its environment variable and its default.
//!
//! Configuration is parsed once at start-up into [`Config`] and then only read. Every
//! field that carries a policy (a bound, a timeout) says why it has its default.
//! Invalid values make start-up fail with a one-line error that names the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::protocol;
use crate::telemetry::LogFormat;

/// Settings of one relay node.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "wsrelay",
    version,
    about = "Horizontally scaled WebSocket relay"
)]
pub struct Config {
    /// Something else than running a node.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "WSRELAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Length of the listen queue: connections the kernel completes before the node
    /// accepts them. A reconnect storm (every client of a restarted node at once)
    /// overflows a short queue, and each dropped SYN costs its client a one-second
    /// retransmit. The kernel caps it at `net.core.somaxconn`.
    #[arg(long, env = "WSRELAY_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Redis URL (`redis://[:password@]host:port[/db]`). Unset: the in-process memory
    /// broker serves a single node.
    #[arg(long, env = "WSRELAY_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of the Redis pub/sub channel names, so several relays (or other
    /// applications) can share one Redis.
    #[arg(long, env = "WSRELAY_REDIS_PREFIX", default_value = "wsrelay:")]
    pub redis_prefix: String,

    /// Name of this node, shown to clients in `welcome`. Default: hostname plus a short
    /// random suffix, so two nodes on one host never share a name.
    #[arg(long, env = "WSRELAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Channel of connections that name none at connect, and of `pub` without `ch`.
    #[arg(long, env = "WSRELAY_DEFAULT_CHANNEL", default_value = "global")]
    pub default_channel: String,

    /// Largest message a client may send, in bytes; larger ones close the connection
    /// with 1009. 64 KiB covers chat and dashboard payloads while bounding what one
    /// client can make the node buffer.
    #[arg(long, env = "WSRELAY_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Outbound queue of each connection, in frames. When it is full the client is too
    /// slow and is closed with 1013: 1024 frames absorb a burst of a second or more at
    /// typical rates without letting one reader pin unbounded memory.
    #[arg(long, env = "WSRELAY_CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,

    /// Interval between server pings; a connection that has not answered a ping by the
    /// next one is dropped (half-open TCP connections are otherwise never noticed).
    #[arg(long, env = "WSRELAY_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// Longest time one write to a client may take before the connection is dropped.
    #[arg(long, env = "WSRELAY_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Time allowed on SIGTERM/SIGINT to close every client with 1001 and exit.
    /// Kubernetes' default grace period is 30 s; 10 s leaves room for a preStop hook.
    #[arg(long, env = "WSRELAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Longest wait for the broker on a publish or subscribe before the client gets
    /// an `unavailable` error (a stalled Redis must never hang a client).
    #[arg(long, env = "WSRELAY_BROKER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub broker_timeout: Duration,

    /// Log line format: `text` for people, `json` for log collectors.
    #[arg(long, env = "WSRELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// HS256 secret for client JWTs. Setting any JWT key turns authentication on.
    #[arg(long, env = "WSRELAY_JWT_SECRET", hide_env_values = true, conflicts_with_all = ["jwt_secret_file", "jwt_public_key_file"])]
    pub jwt_secret: Option<String>,

    /// File holding the HS256 secret (trailing whitespace ignored), e.g. a mounted Secret.
    #[arg(
        long,
        env = "WSRELAY_JWT_SECRET_FILE",
        conflicts_with = "jwt_public_key_file"
    )]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key for RS256 (RSA key) or ES256 (EC P-256 key) client JWTs.
    #[arg(long, env = "WSRELAY_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Clock skew allowed on a token's `exp`, at connect and while connected. The JWT
    /// library's own 60 s default would keep expired tokens alive too long.
    #[arg(long, env = "WSRELAY_JWT_LEEWAY", default_value = "5s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Add the publisher's JWT `sub` to every message as `"from"`.
    #[arg(long, env = "WSRELAY_EXPOSE_PUBLISHER")]
    pub expose_publisher: bool,

    /// Browser origins allowed to connect (comma-separated): `https://app.example.com`,
    /// `app.example.com` (any scheme), `*.example.com`, or `*` for all (logged as a
    /// warning). Unset: only pages served by this host. Clients that send no `Origin`
    /// (backends, apps) are not browsers and are always allowed.
    #[arg(long, env = "WSRELAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Open WebSocket connections per node; beyond it, HTTP 503 (the load balancer
    /// retries elsewhere). Each connection costs ~4 KiB and a file descriptor.
    #[arg(long, env = "WSRELAY_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,

    /// Channels one connection may be subscribed to at once.
    #[arg(long, env = "WSRELAY_MAX_SUBSCRIPTIONS", default_value_t = 256)]
    pub max_subscriptions: usize,

    /// Distinct channels with subscribers on one node: bounds the registry and the
    /// node's Redis subscriptions.
    #[arg(long, env = "WSRELAY_MAX_CHANNELS", default_value_t = 100_000)]
    pub max_channels: usize,

    /// Publishes per second one connection may sustain (token bucket refill rate).
    #[arg(long, env = "WSRELAY_PUBLISH_RATE", default_value_t = 100.0)]
    pub publish_rate: f64,

    /// Publishes one connection may send in a burst (token bucket size). A client that
    /// keeps publishing after this many refusals in a row is closed with 1008.
    #[arg(long, env = "WSRELAY_PUBLISH_BURST", default_value_t = 200)]
    pub publish_burst: u32,

    /// Time a client has to send a complete HTTP request (including the WebSocket
    /// upgrade) after opening the connection; slower ones are dropped (slowloris).
    #[arg(long, env = "WSRELAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Largest HTTP request head (request line and headers), in bytes.
    #[arg(long, env = "WSRELAY_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// API keys accepted by `/api/*` as `Authorization: Bearer <key>` (comma-separated).
    /// Unset: the server API is disabled.
    #[arg(
        long = "api-key",
        env = "WSRELAY_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Largest `/api/publish` request body, in bytes (413 beyond).
    #[arg(long, env = "WSRELAY_MAX_API_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_api_body_bytes: usize,
}

/// Subcommands of the binary.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Exit 0 if the node answers `/readyz` with 200 (for container health checks,
    /// in images without curl). Default URL: the node at `--listen` on this host.
    Healthcheck {
        /// e.g. `http://127.0.0.1:8080/readyz`
        url: Option<String>,
    },
}

/// A setting that cannot work, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct ConfigError {
    flag: &'static str,
    reason: String,
}

impl ConfigError {
    /// The error for a JWT key that cannot be loaded.
    pub fn from_key_error(e: &crate::auth::KeyError) -> Self {
        Self::new(e.flag(), e.reason())
    }

    fn new(flag: &'static str, reason: impl Into<String>) -> Self {
        Self {
            flag,
            reason: reason.into(),
        }
    }
}

impl Config {
    /// Checks what clap's parsers cannot: ranges and cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = protocol::validate_channel(&self.default_channel) {
            return Err(ConfigError::new("default-channel", e.to_string()));
        }
        if self.max_message_bytes < 16 {
            return Err(ConfigError::new(
                "max-message-bytes",
                "must be at least 16 bytes",
            ));
        }
        if self.client_queue == 0 {
            return Err(ConfigError::new("client-queue", "must be at least 1 frame"));
        }
        for (flag, value) in [
            ("ping-interval", self.ping_interval),
            ("write-timeout", self.write_timeout),
            ("drain-timeout", self.drain_timeout),
            ("broker-timeout", self.broker_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(flag, "must be greater than zero"));
            }
        }
        for (flag, value) in [
            ("max-connections", self.max_connections),
            ("max-subscriptions", self.max_subscriptions),
            ("max-channels", self.max_channels),
            ("max-api-body-bytes", self.max_api_body_bytes),
            ("publish-burst", self.publish_burst as usize),
        ] {
            if value == 0 {
                return Err(ConfigError::new(flag, "must be at least 1"));
            }
        }
        if !(self.publish_rate > 0.0 && self.publish_rate.is_finite()) {
            return Err(ConfigError::new(
                "publish-rate",
                "must be a positive number",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::new(
                "handshake-timeout",
                "must be greater than zero",
            ));
        }
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "max-header-bytes",
                "must be at least 8192",
            ));
        }
        if self.api_keys.iter().any(|k| k.len() < 16) {
            return Err(ConfigError::new(
                "api-key",
                "keys must be at least 16 characters",
            ));
        }
        if let Err(e) = crate::auth::Verifier::from_config(self) {
            return Err(ConfigError::from_key_error(&e));
        }
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| ConfigError::new("redis-url", e.to_string()))?;
        }
        if let Some(id) = &self.node_id
            && (id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()))
        {
            return Err(ConfigError::new(
                "node-id",
                "must be 1 to 128 printable characters",
            ));
        }
        Ok(())
    }

    /// The node id: the configured one, or hostname plus a random suffix.
    pub fn resolved_node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "wsrelay".to_owned());
        format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["wsrelay"];
        argv.extend_from_slice(args);
        let config = Config::try_parse_from(argv).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.default_channel, "global");
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.client_queue, 1024);
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert!(c.redis_url.is_none());
    }

    #[test]
    fn errors_name_the_flag() {
        let e = parse(&["--client-queue", "0"]).unwrap_err();
        assert!(e.contains("--client-queue"), "{e}");
        let e = parse(&["--default-channel", "bad channel"]).unwrap_err();
        assert!(e.contains("--default-channel"), "{e}");
        let e = parse(&["--ping-interval", "soon"]).unwrap_err();
        assert!(e.contains("--ping-interval"), "{e}");
        let e = parse(&["--redis-url", "http://nope"]).unwrap_err();
        assert!(e.contains("--redis-url"), "{e}");
        let e = parse(&["--drain-timeout", "0s"]).unwrap_err();
        assert!(e.contains("--drain-timeout"), "{e}");
    }

    #[test]
    fn generated_node_ids_differ() {
        let c = parse(&[]).unwrap();
        assert_ne!(c.resolved_node_id(), c.resolved_node_id());
        let c = parse(&["--node-id", "n1"]).unwrap();
        assert_eq!(c.resolved_node_id(), "n1");
    }
}
