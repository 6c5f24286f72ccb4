//! Node configuration: every setting, its flag, its environment variable, its key in
//! the `--config` file, and its default.
//!
//! Configuration is loaded once at start-up ([`Config::load`]) into [`Config`] and then
//! only read. Settings are grouped by the part of the node that owns them (broker,
//! limits, auth, history); every field that carries a policy (a bound, a timeout) says
//! why it has its default. Precedence: flags, then environment variables, then the
//! config file, then defaults. [`Config::validate`] is pure (no file or network I/O):
//! JWT keys are loaded by the node, once.
//!
//! Per-channel options (history today; presence later) come from the channel's
//! namespace, the part of its name before the first `:` (`chat:room1` -> `chat`). The
//! flags give the options of every channel; `[namespaces.NAME]` sections of the config
//! file override them for one namespace ([`Config::channel_options`]).

pub mod compression;
pub mod proxy;
pub mod topology;

pub use compression::CompressionConfig;
pub use proxy::{ProxyConfig, UsersConfig};
pub use topology::{ShardAddress, Topology};

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;

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

    /// TOML file with settings (keys are the flag names without `--`) and per-namespace
    /// channel options (`[namespaces.chat]`). Flags and environment variables win over it.
    #[arg(long, env = "WSRELAY_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address the HTTP/WebSocket server listens on.
    #[arg(long, env = "WSRELAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Length of the listen queue: connections the kernel completes before the node
    /// accepts them. A reconnect storm (every client of a restarted node at once)
    /// overflows a short queue, and each dropped SYN costs its client a one-second
    /// retransmit. The kernel caps it at `net.core.somaxconn`.
    #[arg(long, env = "WSRELAY_LISTEN_BACKLOG", default_value_t = 4096)]
    pub listen_backlog: u32,

    /// Name of this node, shown to clients in `welcome`. Default: hostname plus a short
    /// random suffix, so two nodes on one host never share a name.
    #[arg(long, env = "WSRELAY_NODE_ID")]
    pub node_id: Option<String>,

    /// Channel of connections that name none at connect, and of `pub` without `ch`.
    #[arg(long, env = "WSRELAY_DEFAULT_CHANNEL", default_value = "global")]
    pub default_channel: String,

    /// Log line format: `text` for people, `json` for log collectors.
    #[arg(long, env = "WSRELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How this node reaches the other nodes.
    #[command(flatten)]
    pub broker: BrokerConfig,

    /// Bounds on what clients may make the node hold or do.
    #[command(flatten)]
    pub limits: LimitsConfig,

    /// Who may connect and what they may do.
    #[command(flatten)]
    pub auth: AuthConfig,

    /// Message history and recovery (the defaults of every namespace).
    #[command(flatten)]
    pub history: HistoryConfig,

    /// Presence and join/leave events (the defaults of every namespace).
    #[command(flatten)]
    pub presence: PresenceConfig,

    /// permessage-deflate on WebSocket connections.
    #[command(flatten)]
    pub compression: CompressionConfig,

    /// The application backend's proxies (docs/proxy.md).
    #[command(flatten)]
    pub proxy: ProxyConfig,

    /// Users across the cluster: limits, revocation, personal channels.
    #[command(flatten)]
    pub users: UsersConfig,

    /// Per-namespace overrides of the channel options, from the config file.
    #[arg(skip)]
    pub namespaces: HashMap<String, NamespaceOptions>,
}

/// The broker: Redis, or the in-process one.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerConfig {
    /// Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for TLS, or a
    /// Sentinel group `redis+sentinel://[:password@]host:26379,host2:26379/<master>[/db]`).
    /// Repeated (or a comma-separated list), several Redis instances are shards: each
    /// channel lives on one of them, chosen by a jump consistent hash of its name.
    /// Unset, and without `--redis-cluster`: the in-process memory broker serves a
    /// single node.
    #[arg(long, env = "WSRELAY_REDIS_URL", action = clap::ArgAction::Append)]
    pub redis_url: Vec<String>,

    /// Redis Cluster (7 or newer): one or more seed URLs (`redis://host:port`,
    /// repeated or comma-separated). Channels use sharded pub/sub
    /// (`SPUBLISH`/`SSUBSCRIBE`) on the cluster node that owns their slot. Not with
    /// `--redis-url`.
    #[arg(long, env = "WSRELAY_REDIS_CLUSTER", action = clap::ArgAction::Append, conflicts_with = "redis_url")]
    pub redis_cluster: Vec<String>,

    /// Prefix of every Redis key and pub/sub channel name, so several relays (or other
    /// applications) can share one Redis.
    #[arg(long, env = "WSRELAY_REDIS_PREFIX", default_value = "wsrelay:")]
    pub redis_prefix: String,

    /// Longest wait for the broker on a publish, subscribe or history read before the
    /// client gets an `unavailable` error (a stalled Redis must never hang a client).
    #[arg(long, env = "WSRELAY_BROKER_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub broker_timeout: Duration,

    /// Publish messages of channels without history in the version 1 envelope, which
    /// nodes of wsrelay 0.1 before history read: set it on the new nodes for the
    /// duration of a rolling upgrade from those, then remove it. (Messages with
    /// offsets and join/leave events need version 2; older nodes drop and count them.)
    #[arg(long, env = "WSRELAY_LEGACY_ENVELOPES")]
    pub legacy_envelopes: bool,

    /// What `/readyz` (and the cluster view's `ready`) requires of the Redis shards:
    /// `any-shard`, ready while at least one shard is usable, or `all-shards`, not
    /// ready while any shard is down. Every node uses every shard, so with
    /// `all-shards` one dead shard takes every node out of the load balancer,
    /// although the other shards' channels still work; hence the default. With one
    /// shard (or a Redis Cluster) both mean the same.
    #[arg(
        long,
        env = "WSRELAY_READY_REQUIRES",
        value_enum,
        default_value = "any-shard"
    )]
    pub ready_requires: ReadyRequires,
}

/// What readiness requires of the broker's shards (`--ready-requires`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadyRequires {
    /// Ready while at least one shard is usable: the node can serve its channels.
    AnyShard,
    /// Ready only while every shard is usable.
    AllShards,
}

impl BrokerConfig {
    /// The Redis URLs (shards) of `--redis-url`, each occurrence split at its commas.
    /// A piece without `://` continues the host list of the URL before it, so a
    /// Sentinel URL (`redis+sentinel://a:26379,b:26379/mymaster`) stays whole.
    pub fn redis_urls(&self) -> Vec<String> {
        split_urls(&self.redis_url)
    }

    /// The seed URLs of `--redis-cluster`.
    pub fn redis_cluster_urls(&self) -> Vec<String> {
        split_urls(&self.redis_cluster)
    }

    /// The Redis these URLs name, parsed and checked (the broker connects to it).
    pub fn topology(&self) -> Result<Topology, ConfigError> {
        topology::parse(&self.redis_urls(), &self.redis_cluster_urls())
            .map_err(|(flag, why)| ConfigError::new(flag, why))
    }
}

fn split_urls(values: &[String]) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for piece in values.iter().flat_map(|v| v.split(',')) {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        match urls.last_mut() {
            Some(last) if !piece.contains("://") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => urls.push(piece.to_owned()),
        }
    }
    urls
}

/// Bounds on clients and connections.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitsConfig {
    /// Largest message a client may send, in bytes; larger ones close the connection
    /// with 1009. 64 KiB covers chat and dashboard payloads while bounding what one
    /// client can make the node buffer.
    #[arg(long, env = "WSRELAY_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Outbound queue of each connection, in frames. When it is full the client is too
    /// slow and is closed with 1013: 1024 frames absorb a burst of a second or more at
    /// typical rates without letting one reader pin unbounded memory. The hold-back
    /// buffer of a recovering subscription has the same bound.
    #[arg(long, env = "WSRELAY_CLIENT_QUEUE", default_value_t = 1024)]
    pub client_queue: usize,

    /// Most bytes a connection holds for its client: queued frames, recoveries and
    /// answers together, until written to the socket. Past it the client is too slow
    /// and is closed with 1013; the connection's own replies wait for the queue to
    /// be under half of it (a client pipelining requests is slowed, not closed). At
    /// least twice `--max-message-bytes` and `--max-history-bytes`.
    #[arg(long, env = "WSRELAY_CLIENT_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub client_queue_bytes: usize,

    /// Interval between server pings; a connection that has not answered a ping by the
    /// next one is dropped (half-open TCP connections are otherwise never noticed).
    #[arg(long, env = "WSRELAY_PING_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// Longest time one write to a client may take before the connection is dropped.
    #[arg(long, env = "WSRELAY_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Most one write to a WebSocket client per this interval while messages keep
    /// coming: a writer that wrote less than this long ago waits out the rest of
    /// it and sends everything queued meanwhile in one write. Each write costs the
    /// kernel the same whatever its size, so a busy subscriber's messages are
    /// coalesced instead of written one by one; an idle connection's next message
    /// goes out at once. 5 ms: invisible to people, and at a million deliveries a
    /// second it cuts the node's CPU per delivery by a quarter (BENCHMARKS.md). 0
    /// turns it off (a write per wake-up).
    #[arg(long, env = "WSRELAY_WRITE_PACING", default_value = "5ms", value_parser = parse_duration)]
    pub write_pacing: Duration,

    /// The longest write pacing, for a node that stays busy (its worker threads
    /// working 80% of the time or more): the interval climbs from
    /// `--write-pacing` up to this one in at most three steps of one factor (5,
    /// 10, 20 ms by default), a step each 200 ms the node is still busy, and comes back down once they are under 50% and its deliveries per
    /// second under 70% of their peak. A saturated node delivers more per
    /// CPU-second by writing less often, and its messages are late by then anyway.
    /// At least `--write-pacing`; equal to it turns the adaptation off. Default:
    /// four times `--write-pacing` (20 ms), at most 1 s.
    #[arg(long, env = "WSRELAY_WRITE_PACING_BUSY", value_parser = parse_duration)]
    pub write_pacing_busy: Option<Duration>,

    /// Closes a draining node's connections over this window, a share every 100 ms,
    /// rather than all at once: the clients reconnect to the other nodes (and
    /// recover from Redis) as a ramp instead of a storm. Connections keep working
    /// until their turn. Less than `--drain-timeout`; 0: all at once.
    #[arg(long, env = "WSRELAY_DRAIN_SPREAD", default_value = "0s", value_parser = parse_duration)]
    pub drain_spread: Duration,

    /// Time allowed on SIGTERM/SIGINT to close every client with 1001 and exit.
    /// Kubernetes' default grace period is 30 s; 10 s leaves room for a preStop hook.
    #[arg(long, env = "WSRELAY_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

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

    /// New subscriptions per second one connection may sustain with `sub` (token
    /// bucket refill rate): each may send a `join` to every subscriber of the
    /// channel, which must not escape the publish rate limit.
    #[arg(long, env = "WSRELAY_SUBSCRIBE_RATE", default_value_t = 50.0)]
    pub subscribe_rate: f64,

    /// `sub` requests one connection may send in a burst (token bucket size); as for
    /// publishes, a client that keeps subscribing after this many refusals in a row
    /// is closed with 1008. Channels named at connect do not count.
    #[arg(long, env = "WSRELAY_SUBSCRIBE_BURST", default_value_t = 256)]
    pub subscribe_burst: u32,

    /// Time a client has to send a complete HTTP request (including the WebSocket
    /// upgrade) after opening the connection; slower ones are dropped (slowloris).
    #[arg(long, env = "WSRELAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Largest HTTP request head (request line and headers), in bytes.
    #[arg(long, env = "WSRELAY_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// HTTP connections open at once that are not WebSockets (yet): requests in
    /// progress, handshakes, idle keep-alive. Past it the oldest is closed to make
    /// room: clients trickling requests to hold sockets are the oldest, so probes
    /// and new clients always get in, and the node never runs out of file
    /// descriptors because of them.
    #[arg(long, env = "WSRELAY_MAX_HTTP_CONNECTIONS", default_value_t = 1024)]
    pub max_http_connections: usize,

    /// Largest `/api/publish` request body, in bytes (413 beyond).
    #[arg(long, env = "WSRELAY_MAX_API_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_api_body_bytes: usize,
}

impl LimitsConfig {
    /// The write pacing while the node is busy (`--write-pacing-busy`, by default
    /// four times `--write-pacing`, at most 1 s), reached in doubling steps (see
    /// `pacing`). Four: at a million deliveries a second on one core, twice
    /// (10 ms) still left the node at 0.9–1.0 CPU-s per million deliveries with no
    /// room to catch up (p99 of 300–400 ms), four times at 0.66–0.80 with p99 of
    /// 25–30 ms (BENCHMARKS.md).
    pub fn write_pacing_busy(&self) -> Duration {
        self.write_pacing_busy.unwrap_or_else(|| {
            (self.write_pacing * 4)
                .min(Duration::from_secs(1))
                .max(self.write_pacing)
        })
    }
}

/// Authentication of clients and backends.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthConfig {
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

    /// API keys accepted by `/api/*` as `Authorization: Bearer <key>` (comma-separated).
    /// Unset: the server API is disabled.
    #[arg(
        long = "api-key",
        env = "WSRELAY_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
}

/// History and recovery. `history-size` and `history-ttl` are the options of every
/// channel whose namespace does not override them.
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryConfig {
    /// Messages kept per channel for recovery and `history` (exactly the last N).
    /// 0 turns history off: messages carry no offset and cost nothing extra.
    #[arg(long, env = "WSRELAY_HISTORY_SIZE", default_value_t = 0)]
    pub history_size: usize,

    /// How long a channel's messages are kept after its last publish. Five minutes
    /// covers a reconnect, a deploy or a phone going through a tunnel.
    #[arg(long, env = "WSRELAY_HISTORY_TTL", default_value = "5m", value_parser = parse_duration)]
    pub history_ttl: Duration,

    /// How long a quiet channel keeps its epoch and top offset after its last publish,
    /// so a client coming back after the messages expired learns "nothing new" rather
    /// than "lost". Tiny (two fields per channel), so kept long.
    #[arg(long, env = "WSRELAY_HISTORY_META_TTL", default_value = "30days", value_parser = parse_duration)]
    pub history_meta_ttl: Duration,

    /// How long the position a subscribe gave a channel nobody has published to is
    /// kept once no node holds subscribers of it any more. Nodes with subscribers
    /// renew it every third of this, so a waiting subscriber's position stays valid;
    /// short, so that clients naming channels cannot fill Redis with keys. Reads
    /// (`history`) never create a position.
    #[arg(long, env = "WSRELAY_UNPUBLISHED_POSITION_TTL", default_value = "1m", value_parser = parse_duration)]
    pub unpublished_position_ttl: Duration,

    /// Most messages one recovery replays; a client that missed more is told
    /// `recovered:false` and reloads its state (cheaper for everyone than a replay
    /// that floods its queue).
    #[arg(long, env = "WSRELAY_MAX_RECOVERY", default_value_t = 1000)]
    pub max_recovery: usize,

    /// Most messages one `history` request returns.
    #[arg(long, env = "WSRELAY_MAX_HISTORY_LIMIT", default_value_t = 1000)]
    pub max_history_limit: usize,

    /// Most bytes of messages one read of a client returns (a recovery, a `history`
    /// request, `GET /api/history`), counted as each message's stored size plus 64.
    /// A recovery needing more is `recovered:false`; a `history` answer holds the
    /// messages that fit and says `"truncated":true`. A connection's recoveries at
    /// connect share it.
    #[arg(long, env = "WSRELAY_MAX_HISTORY_BYTES", default_value_t = 1024 * 1024)]
    pub max_history_bytes: usize,

    /// History reads of clients running at once on a node (recoveries, `history`
    /// requests, `GET /api/history`): more wait their turn, up to `--broker-timeout`,
    /// then get `unavailable`. Bounds the memory and the Redis time that many
    /// clients reading at once can take from everyone else.
    #[arg(long, env = "WSRELAY_MAX_HISTORY_READS", default_value_t = 64)]
    pub max_history_reads: usize,

    /// Recoveries running at once on a node, each from before its subscription is
    /// made until the writer has taken its replay (or `--broker-timeout`): more wait their
    /// turn, in order. A reconnect storm's replays then take the node's time a few
    /// at a time, and a publish made meanwhile does not wait behind all of them
    /// (measured in BENCHMARKS.md: 8 keeps a storm as fast, 64 lets publishes wait
    /// seconds).
    #[arg(long, env = "WSRELAY_MAX_RECOVERIES", default_value_t = 8)]
    pub max_recoveries: usize,

    /// Bytes of recent history a node keeps in memory, over all the history channels
    /// it has subscribers of, to answer recoveries without Redis (a reconnect storm
    /// after a deploy costs Redis one read per channel and node, not one per client).
    /// Filled by what the node delivers anyway; each channel keeps at most
    /// `--max-recovery` messages and its share of this. 0 turns it off.
    #[arg(long, env = "WSRELAY_HISTORY_CACHE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub history_cache_bytes: usize,

    /// How often a node compares the last offset it delivered on each quiet history
    /// channel with Redis, to notice a pub/sub connection that stopped delivering
    /// without closing. One pipelined batch per check.
    #[arg(long, env = "WSRELAY_POSITION_CHECK_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub position_check_interval: Duration,

    /// When a publish to a channel with history is acknowledged: `leader`, once the
    /// Redis master stored it, or `replicas:N`, once N replicas confirmed it too
    /// (Redis `WAIT`), so a failover keeps it. Redis replicates asynchronously: with
    /// `leader`, an acked message can vanish when the master fails. A message stored
    /// but not confirmed in time is answered `not_durable`. Channels without history
    /// store nothing and are not affected. Not with the memory broker.
    #[arg(long, env = "WSRELAY_PUBLISH_DURABILITY", default_value = "leader", value_parser = Durability::parse)]
    pub publish_durability: Durability,
}

/// When a publish to a channel with history counts as done (`publish-durability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Stored on the Redis master (lost if it fails before replicating).
    #[default]
    Leader,
    /// Stored on the master and confirmed by this many of its replicas.
    Replicas(NonZeroU32),
}

impl Durability {
    /// `leader` or `replicas:N` (N at least 1).
    pub fn parse(text: &str) -> Result<Durability, String> {
        let expected = "expected `leader` or `replicas:N` with N at least 1";
        match text.trim() {
            "leader" => Ok(Durability::Leader),
            other => other
                .strip_prefix("replicas:")
                .and_then(|n| n.parse::<NonZeroU32>().ok())
                .map(Durability::Replicas)
                .ok_or_else(|| format!("{text:?}: {expected}")),
        }
    }

    /// The replicas that must confirm a publish (0 for `leader`).
    pub fn replicas(self) -> u32 {
        match self {
            Durability::Leader => 0,
            Durability::Replicas(n) => n.get(),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::Leader => f.write_str("leader"),
            Durability::Replicas(n) => write!(f, "replicas:{n}"),
        }
    }
}

/// Presence and join/leave. `presence` and `join-leave` are the options of every
/// channel whose namespace does not override them.
#[derive(Debug, Clone, clap::Args)]
pub struct PresenceConfig {
    /// Keep a cluster-wide list of each channel's subscribers (`presence` requests).
    #[arg(long, env = "WSRELAY_PRESENCE")]
    pub presence: bool,

    /// Send `join` and `leave` events to a channel's subscribers.
    #[arg(long, env = "WSRELAY_JOIN_LEAVE")]
    pub join_leave: bool,

    /// How long a presence entry outlives its node's last refresh: a node that dies
    /// without saying goodbye drops out of presence within this. Nodes refresh their
    /// entries every third of it.
    #[arg(long, env = "WSRELAY_PRESENCE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub presence_ttl: Duration,

    /// Most entries one `presence` answer lists (`presence_stats` counts them all).
    #[arg(long, env = "WSRELAY_MAX_PRESENCE", default_value_t = 1000)]
    pub max_presence: usize,

    /// How long a node stays in the cluster view (`/api/nodes`) after its last
    /// announcement; nodes announce themselves every few seconds (a sixth of this,
    /// at most 5 s).
    #[arg(long, env = "WSRELAY_NODE_TTL", default_value = "30s", value_parser = parse_duration)]
    pub node_ttl: Duration,
}

/// Options of one channel, resolved from its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Messages kept; 0: no history.
    pub history_size: usize,
    /// Lifetime of the kept messages after the last publish.
    pub history_ttl: Duration,
    /// A cluster-wide list of subscribers is kept.
    pub presence: bool,
    /// Subscribers get `join` and `leave` events.
    pub join_leave: bool,
    /// When a publish counts as done (channels with history only).
    pub durability: Durability,
    /// A `sub` the grants do not cover asks the subscribe proxy.
    pub proxy_subscribe: bool,
    /// Every client `pub` goes through the publish proxy first.
    pub proxy_publish: bool,
}

impl ChannelOptions {
    /// Whether the channel keeps history (and its messages carry offsets).
    pub fn has_history(&self) -> bool {
        self.history_size > 0
    }
}

/// A `[namespaces.NAME]` section of the config file: what it sets, the rest inherited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceOptions {
    /// Overrides `history-size`.
    pub history_size: Option<usize>,
    /// Overrides `history-ttl` (a duration string such as `"300s"`).
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub history_ttl: Option<Duration>,
    /// Overrides `presence`.
    pub presence: Option<bool>,
    /// Overrides `join-leave`.
    pub join_leave: Option<bool>,
    /// Overrides `publish-durability` (`"leader"` or `"replicas:N"`).
    #[serde(default, deserialize_with = "deserialize_durability")]
    pub publish_durability: Option<Durability>,
    /// Overrides `proxy-subscribe`.
    pub proxy_subscribe: Option<bool>,
    /// Overrides `proxy-publish`.
    pub proxy_publish: Option<bool>,
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

/// A setting that cannot work, named by its flag (or config file key).
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct ConfigError {
    flag: String,
    reason: String,
}

impl ConfigError {
    /// An error about `flag` (named without `--`).
    pub fn new(flag: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            flag: flag.into(),
            reason: reason.into(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Flags or environment variables clap refused (including `--help` and `--version`,
    /// which it prints itself).
    #[error(transparent)]
    Args(#[from] clap::Error),
    /// The config file or a value in it.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl LoadError {
    /// Prints the error the way the binary reports it and returns the exit code.
    pub fn report(&self) -> u8 {
        match self {
            LoadError::Args(e) => {
                let _ = e.print();
                e.exit_code() as u8
            }
            LoadError::Invalid(e) => {
                eprintln!("wsrelay: {e}");
                2
            }
        }
    }
}

impl Config {
    /// Loads the configuration of the process: flags, environment, `--config` file.
    pub fn load() -> Result<Config, LoadError> {
        Config::load_from(std::env::args_os())
    }

    /// Loads from the given arguments (the first is the program name), the
    /// environment and the `--config` file they name.
    pub fn load_from<I, T>(args: I) -> Result<Config, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let matches = Config::command().try_get_matches_from(&args)?;
        let config = Config::from_arg_matches(&matches)?;
        let Some(path) = config.config.clone() else {
            return Ok(config);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError::new("config", format!("{}: {e}", path.display())))?;
        let file = ConfigFile::parse(&path, &text)?;
        // The file's settings become flags placed before the given ones, but only for
        // settings no flag or variable gave: those win, and clap then parses and
        // checks every value the same way whatever its source.
        let mut merged = vec![args.first().cloned().unwrap_or_else(|| "wsrelay".into())];
        for (key, value) in &file.settings {
            let arg = Config::command()
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()))
                .cloned()
                .ok_or_else(|| file.error(key, "unknown key"))?;
            if matches!(
                matches.value_source(arg.get_id().as_str()),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            file.append_flag(&mut merged, key, value, arg.get_action())?;
        }
        merged.extend(args.iter().skip(1).cloned());
        let matches = Config::command()
            .try_get_matches_from(&merged)
            .map_err(|e| file.error("", first_line(&e.to_string())))?;
        let mut config = Config::from_arg_matches(&matches)?;
        config.namespaces = file.namespaces;
        Ok(config)
    }

    /// The options of `channel`, from its namespace's section or the defaults.
    pub fn channel_options(&self, channel: &str) -> ChannelOptions {
        let section = match channel.split_once(':') {
            Some((namespace, _)) if !self.namespaces.is_empty() => self.namespaces.get(namespace),
            _ => None,
        };
        self.options_with(section)
    }

    /// The defaults, overridden by a namespace's section when there is one.
    fn options_with(&self, section: Option<&NamespaceOptions>) -> ChannelOptions {
        let defaults = ChannelOptions {
            history_size: self.history.history_size,
            history_ttl: self.history.history_ttl,
            presence: self.presence.presence,
            join_leave: self.presence.join_leave,
            durability: self.history.publish_durability,
            proxy_subscribe: self.proxy.proxy_subscribe,
            proxy_publish: self.proxy.proxy_publish,
        };
        match section {
            None => defaults,
            Some(ns) => ChannelOptions {
                history_size: ns.history_size.unwrap_or(defaults.history_size),
                history_ttl: ns.history_ttl.unwrap_or(defaults.history_ttl),
                presence: ns.presence.unwrap_or(defaults.presence),
                join_leave: ns.join_leave.unwrap_or(defaults.join_leave),
                durability: ns.publish_durability.unwrap_or(defaults.durability),
                proxy_subscribe: ns.proxy_subscribe.unwrap_or(defaults.proxy_subscribe),
                proxy_publish: ns.proxy_publish.unwrap_or(defaults.proxy_publish),
            },
        }
    }

    /// Checks what clap's parsers cannot: ranges and cross-field rules. Pure: reads
    /// no file and opens no connection.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        if let Err(e) = protocol::validate_channel(&self.default_channel) {
            return Err(ConfigError::new("default-channel", e.to_string()));
        }
        if limits.max_message_bytes < 16 {
            return Err(ConfigError::new(
                "max-message-bytes",
                "must be at least 16 bytes",
            ));
        }
        if limits.client_queue == 0 {
            return Err(ConfigError::new("client-queue", "must be at least 1 frame"));
        }
        if limits.drain_spread >= limits.drain_timeout {
            return Err(ConfigError::new(
                "drain-spread",
                "must be less than --drain-timeout (the drain ends within it)",
            ));
        }
        if limits
            .write_pacing_busy
            .is_some_and(|busy| busy < limits.write_pacing)
        {
            return Err(ConfigError::new(
                "write-pacing-busy",
                "must be at least --write-pacing",
            ));
        }
        for (flag, value) in [
            ("ping-interval", limits.ping_interval),
            ("write-timeout", limits.write_timeout),
            ("write-pacing", limits.write_pacing),
            (
                "write-pacing-busy",
                limits.write_pacing_busy.unwrap_or(limits.write_pacing),
            ),
            ("drain-timeout", limits.drain_timeout),
            ("drain-spread", limits.drain_spread),
            ("broker-timeout", self.broker.broker_timeout),
            ("handshake-timeout", limits.handshake_timeout),
            ("jwt-leeway", self.auth.jwt_leeway),
            ("history-meta-ttl", self.history.history_meta_ttl),
            (
                "unpublished-position-ttl",
                self.history.unpublished_position_ttl,
            ),
            (
                "position-check-interval",
                self.history.position_check_interval,
            ),
            ("presence-ttl", self.presence.presence_ttl),
            ("node-ttl", self.presence.node_ttl),
            ("proxy-timeout", self.proxy.proxy_timeout),
            ("proxy-refresh-before", self.proxy.proxy_refresh_before),
            ("revocation-ttl", self.users.revocation_ttl),
        ] {
            check_duration(flag, value)?;
        }
        for (flag, value) in [
            ("max-connections", limits.max_connections),
            ("max-subscriptions", limits.max_subscriptions),
            ("max-channels", limits.max_channels),
            ("max-api-body-bytes", limits.max_api_body_bytes),
            ("max-http-connections", limits.max_http_connections),
            ("publish-burst", limits.publish_burst as usize),
            ("subscribe-burst", limits.subscribe_burst as usize),
            ("max-recovery", self.history.max_recovery),
            ("max-history-limit", self.history.max_history_limit),
            ("max-history-reads", self.history.max_history_reads),
            ("max-recoveries", self.history.max_recoveries),
            ("max-presence", self.presence.max_presence),
        ] {
            if value == 0 {
                return Err(ConfigError::new(flag, "must be at least 1"));
            }
        }
        for (flag, rate) in [
            ("publish-rate", limits.publish_rate),
            ("subscribe-rate", limits.subscribe_rate),
        ] {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(ConfigError::new(flag, "must be a positive number"));
            }
        }
        if self.history.max_history_bytes < 1024 {
            return Err(ConfigError::new(
                "max-history-bytes",
                "must be at least 1024",
            ));
        }
        if (1..64 * 1024).contains(&self.history.history_cache_bytes) {
            return Err(ConfigError::new(
                "history-cache-bytes",
                "must be 0 (off) or at least 65536",
            ));
        }
        let least = 2 * limits.max_message_bytes.max(self.history.max_history_bytes);
        if limits.client_queue_bytes < least {
            return Err(ConfigError::new(
                "client-queue-bytes",
                format!(
                    "must be at least twice --max-message-bytes and --max-history-bytes ({least})"
                ),
            ));
        }
        if limits.max_header_bytes < 8192 {
            return Err(ConfigError::new(
                "max-header-bytes",
                "must be at least 8192",
            ));
        }
        if self.auth.api_keys.iter().any(|k| k.len() < 16) {
            return Err(ConfigError::new(
                "api-key",
                "keys must be at least 16 characters",
            ));
        }
        self.broker.topology()?;
        validate_history("history-size", "history-ttl", self.options_with(None))?;
        for (name, section) in &self.namespaces {
            validate_history(
                &format!("config: namespaces.{name}.history-size"),
                &format!("config: namespaces.{name}.history-ttl"),
                self.options_with(Some(section)),
            )?;
        }
        self.validate_durability()?;
        self.compression.validate()?;
        self.proxy.validate()?;
        self.users.validate()?;
        for (name, section) in &self.namespaces {
            for (key, on, url) in [
                (
                    "proxy-subscribe",
                    section.proxy_subscribe,
                    &self.proxy.proxy_subscribe_url,
                ),
                (
                    "proxy-publish",
                    section.proxy_publish,
                    &self.proxy.proxy_publish_url,
                ),
            ] {
                if on == Some(true) && url.is_none() {
                    return Err(ConfigError::new(
                        format!("config: namespaces.{name}.{key}"),
                        format!("needs --{key}-url"),
                    ));
                }
            }
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

    /// `publish-durability` needs replicas to confirm writes, so a Redis broker; and in
    /// a namespace section it must name a namespace whose channels store something.
    fn validate_durability(&self) -> Result<(), ConfigError> {
        let memory =
            self.broker.redis_urls().is_empty() && self.broker.redis_cluster_urls().is_empty();
        let refuse_memory = |key: &str, durability: Durability| {
            ConfigError::new(
                key,
                format!(
                    "{durability} needs Redis replicas to confirm publishes; the memory broker (no --redis-url or --redis-cluster) has none: use leader"
                ),
            )
        };
        let durability = self.history.publish_durability;
        if memory && durability != Durability::Leader {
            return Err(refuse_memory("publish-durability", durability));
        }
        for (name, section) in &self.namespaces {
            let Some(durability @ Durability::Replicas(_)) = section.publish_durability else {
                continue;
            };
            let key = format!("config: namespaces.{name}.publish-durability");
            if memory {
                return Err(refuse_memory(&key, durability));
            }
            if !self.options_with(Some(section)).has_history() {
                return Err(ConfigError::new(
                    key,
                    format!(
                        "{durability} applies to channels with history, and this namespace has none (history-size 0)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A warning about a setting that works but does nothing: `publish-durability`
    /// with no channel that has history.
    pub fn durability_warning(&self) -> Option<String> {
        let durability = self.history.publish_durability;
        (durability != Durability::Leader && !self.any_history()).then(|| {
            format!(
                "--publish-durability {durability} applies to channels with history, and no channel has history (--history-size 0): it has no effect"
            )
        })
    }

    /// Whether any channel's publishes wait for replicas (so each Redis shard keeps
    /// a connection for them).
    pub fn any_durable(&self) -> bool {
        self.history.publish_durability != Durability::Leader
            || self
                .namespaces
                .values()
                .any(|ns| matches!(ns.publish_durability, Some(Durability::Replicas(_))))
    }

    /// Whether any channel can have presence (so the node refreshes its entries).
    pub fn any_presence(&self) -> bool {
        self.presence.presence || self.namespaces.values().any(|ns| ns.presence == Some(true))
    }

    /// Whether any channel can have history (so the node needs the history machinery).
    pub fn any_history(&self) -> bool {
        self.history.history_size > 0
            || self
                .namespaces
                .values()
                .any(|ns| ns.history_size.is_some_and(|n| n > 0))
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

/// Most messages a channel may keep: one million 64 KiB messages is already 64 GiB of
/// Redis memory for one channel; a larger number is a typo.
const MAX_HISTORY_SIZE: usize = 1_000_000;

fn validate_history(
    size_key: &str,
    ttl_key: &str,
    options: ChannelOptions,
) -> Result<(), ConfigError> {
    if options.history_size > MAX_HISTORY_SIZE {
        return Err(ConfigError::new(
            size_key,
            format!("at most {MAX_HISTORY_SIZE} messages"),
        ));
    }
    check_duration(ttl_key, options.history_ttl)
}

/// The range of each duration setting, by its flag: below it a timer would spin or
/// panic (a zero period) or a Redis key would expire before it is renewed; above it
/// the clock or Redis could not represent it (`PEXPIRE` takes milliseconds), or the
/// node would wait for ever in practice. Documented in the README.
fn duration_range(flag: &str) -> (Duration, Duration) {
    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);
    // A namespace's history-ttl is named `config: namespaces.NAME.history-ttl`.
    let name = flag.rsplit('.').next().unwrap_or(flag);
    match name {
        "ping-interval" | "write-timeout" | "drain-timeout" | "handshake-timeout" => {
            (100 * MS, HOUR)
        }
        "broker-timeout" => (10 * MS, 5 * 60 * S),
        "drain-spread" => (Duration::ZERO, HOUR),
        "write-pacing" | "write-pacing-busy" => (Duration::ZERO, S),
        "jwt-leeway" => (Duration::ZERO, HOUR),
        "history-ttl" => (S, 365 * DAY),
        "history-meta-ttl" => (S, 3650 * DAY),
        "unpublished-position-ttl" | "presence-ttl" => (S, DAY),
        "position-check-interval" => (100 * MS, DAY),
        "node-ttl" => (S, HOUR),
        "proxy-timeout" => (10 * MS, 5 * 60 * S),
        "proxy-refresh-before" => (Duration::ZERO, DAY),
        "revocation-ttl" => (S, 3650 * DAY),
        other => unreachable!("no range for {other}"),
    }
}

/// `value` is within the documented range of `flag` ([`duration_range`]).
fn check_duration(flag: &str, value: Duration) -> Result<(), ConfigError> {
    let (min, max) = duration_range(flag);
    if value < min || value > max {
        return Err(ConfigError::new(
            flag,
            format!(
                "{} is out of range: {} to {}",
                humantime::format_duration(value),
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(())
}

/// A parsed `--config` file.
struct ConfigFile<'a> {
    path: &'a Path,
    settings: Vec<(String, toml::Value)>,
    namespaces: HashMap<String, NamespaceOptions>,
}

impl<'a> ConfigFile<'a> {
    fn parse(path: &'a Path, text: &str) -> Result<ConfigFile<'a>, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            // One line that names the place: the line number and the line itself
            // (so the key), whatever the parser's own message says.
            let place = e.span().map(|span| {
                let start = span.start.min(text.len());
                let number = text[..start].matches('\n').count() + 1;
                let line = text.lines().nth(number - 1).unwrap_or("").trim();
                format!(" line {number} ({line}):")
            });
            ConfigError::new(
                "config",
                format!(
                    "{}:{} {}",
                    path.display(),
                    place.unwrap_or_default(),
                    e.message()
                ),
            )
        })?;
        let mut file = ConfigFile {
            path,
            settings: Vec::new(),
            namespaces: HashMap::new(),
        };
        if let Some(namespaces) = table.remove("namespaces") {
            let toml::Value::Table(namespaces) = namespaces else {
                return Err(file.error("namespaces", "must be a table of [namespaces.NAME]"));
            };
            for (name, options) in namespaces {
                let key = format!("namespaces.{name}");
                if name.is_empty()
                    || name.contains(':')
                    || protocol::validate_channel(&name).is_err()
                {
                    return Err(file.error(
                        &key,
                        "a namespace is a channel name prefix without ':' (A-Z a-z 0-9 _ . @ -)",
                    ));
                }
                let options = NamespaceOptions::deserialize(options)
                    .map_err(|e| file.error(&key, e.message()))?;
                file.namespaces.insert(name, options);
            }
        }
        for key in ["config", "help", "version"] {
            if table.contains_key(key) {
                return Err(file.error(key, "not allowed in a config file"));
            }
        }
        file.settings = table.into_iter().collect();
        Ok(file)
    }

    fn error(&self, key: &str, reason: &str) -> ConfigError {
        let flag = if key.is_empty() {
            format!("config {}", self.path.display())
        } else {
            format!("config {}: key {key}", self.path.display())
        };
        ConfigError::new(flag, reason)
    }

    /// Appends the flag(s) for one setting of the file to `args`.
    fn append_flag(
        &self,
        args: &mut Vec<OsString>,
        key: &str,
        value: &toml::Value,
        action: &ArgAction,
    ) -> Result<(), ConfigError> {
        let flag = format!("--{key}");
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                // A flag that takes a value may still be an on/off switch
                // (`compression = false`).
                toml::Value::Boolean(b) => Ok(b.to_string()),
                _ => Err(self.error(key, "must be a string or a number")),
            }
        };
        match (action, value) {
            (ArgAction::SetTrue, toml::Value::Boolean(true)) => args.push(flag.into()),
            (ArgAction::SetTrue, toml::Value::Boolean(false)) => {}
            (ArgAction::SetTrue, _) => return Err(self.error(key, "must be true or false")),
            // `--key=value`, one argument: a value such as `-1` or `-5s` must reach
            // the flag's parser (which names the flag), not look like another flag.
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    args.push(format!("{flag}={}", scalar(item)?).into());
                }
            }
            (_, value) => {
                args.push(format!("{flag}={}", scalar(value)?).into());
            }
        }
        Ok(())
    }
}

fn first_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or(text);
    line.strip_prefix("error: ").unwrap_or(line)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 1m)"))
}

fn deserialize_durability<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Durability>, D::Error> {
    let text = String::deserialize(d)?;
    Durability::parse(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["wsrelay"];
        argv.extend_from_slice(args);
        let config = Config::load_from(argv).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    fn with_file(text: &str, args: &[&str]) -> Result<Config, String> {
        let dir = std::env::temp_dir().join(format!(
            "wsrelay-config-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&dir, text).unwrap();
        let path = dir.to_str().unwrap().to_owned();
        let mut argv = vec!["--config", path.as_str()];
        argv.extend_from_slice(args);
        let result = parse(&argv);
        let _ = std::fs::remove_file(&dir);
        result
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.default_channel, "global");
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.limits.client_queue, 1024);
        assert_eq!(c.limits.ping_interval, Duration::from_secs(25));
        assert_eq!(c.limits.drain_timeout, Duration::from_secs(10));
        assert!(c.broker.redis_urls().is_empty());
        assert_eq!(c.history.history_size, 0);
        assert!(!c.channel_options("chat:1").has_history());
        assert_eq!(c.history.max_recovery, 1000);
        assert_eq!(c.history.history_meta_ttl, Duration::from_secs(30 * 86400));
    }

    #[test]
    fn redis_urls_are_shards_in_order() {
        let c = parse(&[
            "--redis-url",
            "redis://a:1, redis://b:2",
            "--redis-url",
            "redis+sentinel://s1:26379,s2:26379/mymaster/2,redis://c:3",
        ])
        .unwrap();
        assert_eq!(
            c.broker.redis_urls(),
            [
                "redis://a:1",
                "redis://b:2",
                "redis+sentinel://s1:26379,s2:26379/mymaster/2",
                "redis://c:3"
            ]
        );
        let c = with_file("redis-url = [\"redis://a:1\", \"redis://b:2\"]\n", &[]).unwrap();
        assert_eq!(c.broker.redis_urls(), ["redis://a:1", "redis://b:2"]);
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
        assert!(e.contains("--redis-url") && e.contains("redis://"), "{e}");
        let e = parse(&["--redis-url", "redis://a:1,redis://a:1"]).unwrap_err();
        assert!(e.contains("--redis-url") && e.contains("twice"), "{e}");
        let e = parse(&["--redis-cluster", "redis+sentinel://s:26379/m"]).unwrap_err();
        assert!(e.contains("--redis-cluster"), "{e}");
        assert!(
            parse(&[
                "--redis-cluster",
                "redis://a:1",
                "--redis-url",
                "redis://b:2"
            ])
            .is_err()
        );
        let e = parse(&["--redis-url", "redis+sentinel://s:26379"]).unwrap_err();
        assert!(e.contains("--redis-url") && e.contains("master"), "{e}");
        let e = parse(&["--drain-timeout", "0s"]).unwrap_err();
        assert!(e.contains("--drain-timeout"), "{e}");
        let e = parse(&["--history-size", "2000000"]).unwrap_err();
        assert!(e.contains("--history-size"), "{e}");
    }

    /// The byte bounds hold together: a connection's queue takes twice the largest
    /// message and the largest read (the reader stops at half of it).
    #[test]
    fn byte_bounds_are_checked_together() {
        for (args, flag) in [
            (
                &["--client-queue-bytes", "100000"][..],
                "--client-queue-bytes",
            ),
            (
                &["--max-history-bytes", "3000000"][..],
                "--client-queue-bytes",
            ),
            (&["--max-history-bytes", "10"][..], "--max-history-bytes"),
            (&["--max-history-reads", "0"][..], "--max-history-reads"),
            (
                &["--history-cache-bytes", "1000"][..],
                "--history-cache-bytes",
            ),
            (
                &["--max-http-connections", "0"][..],
                "--max-http-connections",
            ),
            (&["--subscribe-rate", "0"][..], "--subscribe-rate"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        let fits = [
            "--client-queue-bytes",
            "262144",
            "--max-message-bytes",
            "131072",
            "--max-history-bytes",
            "65536",
        ];
        assert!(parse(&fits).is_ok());
    }

    /// Values that parsed, then broke the running node (a zero period panics a
    /// task, a millisecond TTL floods Redis, a TTL past what Redis takes fails
    /// every publish): each is refused at start-up, naming the flag and its range.
    #[test]
    fn every_duration_has_a_range() {
        for (flag, value) in [
            ("--presence-ttl", "0s"),
            ("--presence-ttl", "2ns"),
            ("--presence-ttl", "1ms"),
            ("--node-ttl", "0s"),
            ("--node-ttl", "1ns"),
            ("--history-ttl", "200000000000days"),
            ("--history-meta-ttl", "20000days"),
            ("--ping-interval", "1ns"),
            ("--write-timeout", "0s"),
            ("--handshake-timeout", "2h"),
            ("--broker-timeout", "1ms"),
            ("--jwt-leeway", "2h"),
            ("--unpublished-position-ttl", "10ms"),
            ("--position-check-interval", "0s"),
        ] {
            let e = parse(&[flag, value]).unwrap_err();
            assert!(
                e.contains(flag) && e.contains("out of range"),
                "{flag} {value}: {e}"
            );
        }
        let e = with_file(
            "[namespaces.chat]\nhistory-size = 10\nhistory-ttl = \"0s\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("namespaces.chat.history-ttl"), "{e}");
        // The bounds themselves are accepted, and so are the defaults.
        assert!(parse(&["--ping-interval", "100ms", "--node-ttl", "1h"]).is_ok());
        assert!(parse(&["--jwt-leeway", "0s", "--broker-timeout", "10ms"]).is_ok());
        assert!(parse(&[]).is_ok());
    }

    #[test]
    fn the_drain_spread_fits_in_the_drain_timeout() {
        assert_eq!(parse(&[]).unwrap().limits.drain_spread, Duration::ZERO);
        assert!(parse(&["--drain-spread", "9s"]).is_ok());
        for spread in ["10s", "30s"] {
            let e = parse(&["--drain-spread", spread]).unwrap_err();
            assert!(
                e.contains("drain-spread") && e.contains("drain-timeout"),
                "{e}"
            );
        }
        assert!(parse(&["--drain-spread", "20s", "--drain-timeout", "30s"]).is_ok());
    }

    #[test]
    fn busy_write_pacing_defaults_to_four_times_the_pacing_and_is_never_shorter() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.limits.write_pacing_busy(), Duration::from_millis(20));
        let c = parse(&["--write-pacing", "200ms"]).unwrap();
        assert_eq!(c.limits.write_pacing_busy(), Duration::from_millis(800));
        let c = parse(&["--write-pacing", "400ms"]).unwrap();
        assert_eq!(
            c.limits.write_pacing_busy(),
            Duration::from_secs(1),
            "at most 1 s"
        );
        let c = parse(&["--write-pacing", "0s"]).unwrap();
        assert_eq!(c.limits.write_pacing_busy(), Duration::ZERO, "off is off");
        let c = parse(&["--write-pacing-busy", "5ms"]).unwrap();
        assert_eq!(c.limits.write_pacing_busy(), Duration::from_millis(5));
        let e = parse(&["--write-pacing-busy", "2ms"]).unwrap_err();
        assert!(
            e.contains("write-pacing-busy") && e.contains("at least"),
            "{e}"
        );
        let e = parse(&["--write-pacing-busy", "2s"]).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }

    #[test]
    fn publish_durability_is_leader_or_a_number_of_replicas() {
        let redis = ["--redis-url", "redis://a:1", "--history-size", "10"];
        let c = parse(&redis).unwrap();
        assert_eq!(c.history.publish_durability, Durability::Leader);
        assert_eq!(c.channel_options("chat:1").durability, Durability::Leader);
        assert!(!c.any_durable());
        let c = parse(&[&redis[..], &["--publish-durability", "replicas:2"]].concat()).unwrap();
        let two = Durability::Replicas(NonZeroU32::new(2).unwrap());
        assert_eq!(c.channel_options("chat:1").durability, two);
        assert_eq!(
            (two.replicas(), two.to_string().as_str()),
            (2, "replicas:2")
        );
        assert!(c.any_durable() && c.durability_warning().is_none());
        for bad in [
            "replicas:0",
            "replicas:x",
            "replicas:",
            "replicas:-1",
            "foo",
            "",
        ] {
            let e = parse(&[&redis[..], &["--publish-durability", bad]].concat()).unwrap_err();
            assert!(e.contains("--publish-durability"), "{bad}: {e}");
        }
        assert_eq!(Durability::parse("leader"), Ok(Durability::Leader));
        assert!(Durability::parse("replicas:0").is_err());

        // Nothing to replicate to in the memory broker.
        let e = parse(&["--publish-durability", "replicas:1"]).unwrap_err();
        assert!(
            e.contains("--publish-durability") && e.contains("memory broker"),
            "{e}"
        );
        assert!(parse(&["--publish-durability", "leader"]).is_ok());
        // Without history anywhere it does nothing: a warning, not an error.
        let c = parse(&[
            "--redis-url",
            "redis://a:1",
            "--publish-durability",
            "replicas:1",
        ])
        .unwrap();
        assert!(
            c.durability_warning()
                .unwrap()
                .contains("no channel has history")
        );
    }

    #[test]
    fn proxy_settings_are_checked() {
        let url = "http://app:8000/relay";
        let c = parse(&["--proxy-publish-url", url, "--proxy-publish"]).unwrap();
        assert!(c.channel_options("chat:1").proxy_publish);
        for (args, flag) in [
            (
                vec!["--proxy-connect-url", "https://app/x"],
                "proxy-connect-url",
            ),
            (vec!["--proxy-rpc-url", "app:8000"], "proxy-rpc-url"),
            (vec!["--proxy-subscribe"], "proxy-subscribe"),
            (vec!["--proxy-publish"], "proxy-publish"),
            (
                vec!["--proxy-max-concurrency", "0"],
                "proxy-max-concurrency",
            ),
            (vec!["--proxy-timeout", "0s"], "proxy-timeout"),
            (
                vec!["--proxy-forward-cookies", "a=b"],
                "proxy-forward-headers",
            ),
            (
                vec!["--personal-channel-namespace", "a b"],
                "personal-channel-namespace",
            ),
            (vec!["--revocation-ttl", "0s"], "revocation-ttl"),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        // Per namespace: on where asked, and only with the proxy's URL.
        let file = "[namespaces.chat]\nproxy-subscribe = true\nproxy-publish = true\n";
        let c = with_file(
            file,
            &["--proxy-subscribe-url", url, "--proxy-publish-url", url],
        )
        .unwrap();
        assert!(c.channel_options("chat:1").proxy_subscribe);
        assert!(!c.channel_options("news:1").proxy_publish);
        let e = with_file(file, &["--proxy-publish-url", url]).unwrap_err();
        assert!(e.contains("namespaces.chat.proxy-subscribe"), "{e}");
    }

    #[test]
    fn publish_durability_per_namespace() {
        let text = r#"
redis-url = "redis://a:1"
history-size = 10
[namespaces.orders]
publish-durability = "replicas:1"
[namespaces.live]
history-size = 0
"#;
        let c = with_file(text, &[]).unwrap();
        let one = Durability::Replicas(NonZeroU32::new(1).unwrap());
        assert_eq!(c.channel_options("orders:1").durability, one);
        assert_eq!(c.channel_options("chat:1").durability, Durability::Leader);
        assert!(c.any_durable());
        let file = "[namespaces.orders]\nhistory-size = 5\npublish-durability = \"replicas:1\"\n";
        let e = with_file(file, &[]).unwrap_err();
        assert!(
            e.contains("namespaces.orders.publish-durability") && e.contains("memory broker"),
            "{e}"
        );
        let e = with_file(
            "redis-url = \"redis://a:1\"\n[namespaces.live]\npublish-durability = \"replicas:1\"\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains("namespaces.live.publish-durability") && e.contains("history"),
            "{e}"
        );
        for bad in ["replicas:0", "always"] {
            let e = with_file(
                &format!(
                    "redis-url = \"redis://a:1\"\n[namespaces.x]\npublish-durability = \"{bad}\"\n"
                ),
                &[],
            )
            .unwrap_err();
            assert!(
                e.contains("namespaces.x") && e.contains("replicas:N"),
                "{bad}: {e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = with_file("publish-durability = \"replicas:0\"\n", &[]).unwrap_err();
        assert!(e.contains("publish-durability"), "{e}");
    }

    #[test]
    fn readiness_requires_any_shard_unless_told() {
        assert_eq!(
            parse(&[]).unwrap().broker.ready_requires,
            ReadyRequires::AnyShard
        );
        let c = parse(&["--ready-requires", "all-shards"]).unwrap();
        assert_eq!(c.broker.ready_requires, ReadyRequires::AllShards);
        let c = with_file("ready-requires = \"all-shards\"\n", &[]).unwrap();
        assert_eq!(c.broker.ready_requires, ReadyRequires::AllShards);
        let e = parse(&["--ready-requires", "most"]).unwrap_err();
        assert!(e.contains("--ready-requires"), "{e}");
    }

    #[test]
    fn namespaces_override_the_defaults() {
        let c = with_file(
            r#"
history-size = 10
history-ttl = "1m"
[namespaces.chat]
history-size = 100
[namespaces.live]
history-size = 0
presence = true
join-leave = true
"#,
            &[],
        )
        .unwrap();
        let chat = c.channel_options("chat:room1");
        assert_eq!(chat.history_size, 100);
        assert_eq!(chat.history_ttl, Duration::from_secs(60), "inherited");
        assert!(!c.channel_options("live:scores").has_history());
        assert!(c.channel_options("live:scores").presence);
        assert!(c.channel_options("live:scores").join_leave);
        assert!(!c.channel_options("chat:room1").presence);
        assert!(c.any_presence());
        assert_eq!(c.channel_options("other:x").history_size, 10);
        assert_eq!(c.channel_options("chat").history_size, 10, "no namespace");
        assert!(c.any_history());
    }

    #[test]
    fn flags_win_over_the_file() {
        let text = "client-queue = 64\nmax-channels = 5\nexpose-publisher = true\napi-key = [\"0123456789abcdef\", \"fedcba9876543210\"]\n";
        let c = with_file(text, &["--client-queue", "32"]).unwrap();
        assert_eq!(c.limits.client_queue, 32, "flag wins");
        assert_eq!(c.limits.max_channels, 5, "file fills the rest");
        assert!(c.auth.expose_publisher);
        assert_eq!(c.auth.api_keys.len(), 2);
    }

    #[test]
    fn bad_files_are_one_line_errors_naming_the_key() {
        let e = with_file("no-such-key = 1\n", &[]).unwrap_err();
        assert!(
            e.contains("no-such-key") && e.contains("unknown key"),
            "{e}"
        );
        let e = with_file("client-queue = \"many\"\n", &[]).unwrap_err();
        assert!(e.contains("client-queue"), "{e}");
        let e = with_file("[namespaces.chat]\nhistory-sise = 1\n", &[]).unwrap_err();
        assert!(
            e.contains("namespaces.chat") && e.contains("history-sise"),
            "{e}"
        );
        let e = with_file("[namespaces.chat]\nhistory-ttl = \"soon\"\n", &[]).unwrap_err();
        assert!(e.contains("namespaces.chat"), "{e}");
        let e = with_file("[namespaces.\"a:b\"]\n", &[]).unwrap_err();
        assert!(e.contains("namespaces.a:b"), "{e}");
        let e = with_file("this is not toml", &[]).unwrap_err();
        assert!(e.contains("--config"), "{e}");
        for e in [
            with_file("no-such-key = 1\n", &[]).unwrap_err(),
            with_file("client-queue = \"many\"\n", &[]).unwrap_err(),
        ] {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = parse(&["--config", "/nonexistent/wsrelay.toml"]).unwrap_err();
        assert!(e.contains("--config") && e.contains("/nonexistent"), "{e}");
    }

    /// Negative values reach their flag's parser, and what the TOML parser refuses
    /// (a number too large, a key given twice) names its line and so its key.
    #[test]
    fn every_file_error_names_its_key() {
        for (text, key) in [
            ("history-size = -1\n", "history-size"),
            ("history-ttl = \"-5s\"\n", "history-ttl"),
            ("client-queue = -3\n", "client-queue"),
            (
                "history-size = 99999999999999999999\n",
                "history-size = 99999999999999999999",
            ),
            (
                "history-size = 1\npresence = true\nhistory-size = 2\n",
                "line 3 (history-size = 2)",
            ),
            ("[namespaces.chat]\nhistory-size = -1\n", "namespaces.chat"),
        ] {
            let e = with_file(text, &[]).unwrap_err();
            assert!(e.contains(key), "{text:?}: {e}");
            assert!(!e.contains("unexpected argument"), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn the_shipped_config_files_load() {
        for (name, text) in [
            (
                "k8s/base/wsrelay.toml",
                include_str!("../../k8s/base/wsrelay.toml"),
            ),
            (
                "deploy/wsrelay.toml",
                include_str!("../../deploy/wsrelay.toml"),
            ),
        ] {
            let c = with_file(text, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(c.channel_options("chat:1").has_history(), "{name}");
        }
    }

    #[test]
    fn generated_node_ids_differ() {
        let c = parse(&[]).unwrap();
        assert_ne!(c.resolved_node_id(), c.resolved_node_id());
        let c = parse(&["--node-id", "n1"]).unwrap();
        assert_eq!(c.resolved_node_id(), "n1");
    }
}
