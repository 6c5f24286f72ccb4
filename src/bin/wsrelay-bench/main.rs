//! `wsrelay-bench`: a load generator that speaks protocol v1 and drives a running
//! cluster (or one it starts itself with `--spawn-cluster`).
//!
//! - `fanout`: C subscribers spread round-robin over the node URLs, P publishers,
//!   a paced total rate of R messages/s for D seconds, payloads of S bytes, K
//!   channels. Reports loss, deliveries/s, end-to-end latency percentiles, time to
//!   connect, and its own CPU use.
//! - `idle`: opens C connections and holds them, to measure memory per connection.
//! - `sweep`: `fanout` at a list of offered rates for one or more configurations
//!   (sets of the global flags below), each point on a fresh `--spawn-cluster`;
//!   writes every point as JSON and a chart of them as SVG.
//! - `storm`: the reconnect storm after a node drain: C clients connect at once,
//!   each recovering a few history channels with `since`, while residents of the
//!   same channels stay connected. Reports the time until every subscription is
//!   live and every replay in, recovered / not recovered / errors by code, whether
//!   each replay was exact, Redis and node CPU in the storm, and how the storm
//!   slows a paced publisher's acks against a baseline.
//!
//! With `--history N` spawned nodes keep history, and `fanout` also times recoveries
//! (`--recover M`: a client that missed M messages subscribes with `since`); `storm`
//! needs it.
//!
//! With `--compression` clients offer permessage-deflate as browsers do; `fanout`
//! reports the bytes its subscribers received per delivery either way, and
//! `--payload ticker` sends market data that compresses as real JSON does.
//!
//! With `--spawn-cluster N` it starts a private `redis-server` and N release nodes,
//! samples their CPU time and RSS from /proc, reports server CPU-seconds per million
//! deliveries and RSS per idle connection, and stops everything it started.
//! Output: a readable table on stderr and one JSON line on stdout.

mod chart;
mod cluster;
mod conn;
mod fanout;
mod idle;
mod payload;
mod procstat;
mod storm;
mod sweep;
mod wire;

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "wsrelay-bench", version, about = "Load generator for wsrelay")]
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    mode: Mode,
}

/// Where the load goes.
#[derive(Debug, Args)]
pub(crate) struct Target {
    /// Node WebSocket URLs (`ws://host:port/ws`), repeatable; connections are
    /// spread round-robin. Ignored with `--spawn-cluster`.
    #[arg(long = "url", global = true, default_value = "ws://127.0.0.1:8080/ws")]
    urls: Vec<String>,
    /// Start a private redis-server and this many release nodes, and measure them.
    #[arg(long, global = true)]
    spawn_cluster: Option<usize>,
    /// With `--spawn-cluster`: start this many redis-servers, each a shard of the
    /// nodes' `--redis-url` list.
    #[arg(long, global = true, default_value_t = 1)]
    shards: usize,
    /// CPU list the spawned servers are pinned to (taskset syntax, e.g. `0`).
    #[arg(long, global = true)]
    pin_servers: Option<String>,
    /// CPU list this load generator is pinned to (e.g. `1`).
    #[arg(long, global = true)]
    pin_client: Option<String>,
    /// Extra flags for spawned nodes (e.g. `--node-arg=--client-queue=4096`).
    #[arg(long = "node-arg", global = true, allow_hyphen_values = true)]
    node_args: Vec<String>,
    /// Export traces from spawned nodes at this sampling ratio (0.0 to 1.0), to an
    /// OTLP/HTTP sink in this process that accepts and discards them. Unset: no
    /// exporter runs on the nodes.
    #[arg(long, global = true)]
    otel_ratio: Option<f64>,
    /// Read buffer of each client connection, in bytes. Small on purpose: a large
    /// buffer is zero-filled on every read and makes the load generator the bottleneck.
    #[arg(long, global = true, default_value_t = 1024)]
    read_buffer: usize,
    /// Connections opened concurrently while connecting.
    #[arg(long, global = true, default_value_t = 256)]
    connect_concurrency: usize,
    /// Keep this many messages of history per channel on spawned nodes
    /// (`--history-size`): every message is then stored with an offset. 0: off.
    #[arg(long, global = true, default_value_t = 0)]
    history: usize,
    /// Spawned nodes send every client publication through a publish proxy (the
    /// application backend, `--proxy-publish-url`) to an HTTP backend in this
    /// process that allows each as sent: what a publish proxy costs per message.
    #[arg(long, global = true)]
    publish_backend: bool,
    /// Clients offer permessage-deflate (`permessage-deflate; client_max_window_bits`,
    /// as browsers do); nodes started with `--compression off` decline it.
    #[arg(long, global = true)]
    compression: bool,
}

impl Target {
    /// How clients connect; the bytes they read are counted in `wire`.
    pub(crate) fn conn_options(&self, wire: Arc<AtomicU64>) -> conn::Options {
        conn::Options {
            read_buffer: self.read_buffer,
            compression: self.compression,
            wire,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Paced publishing to many subscribers; measures delivery, latency and CPU.
    Fanout(fanout::FanoutArgs),
    /// Opens connections and holds them; measures memory per connection.
    Idle(idle::IdleArgs),
    /// `fanout` at several offered rates for one or more configurations; writes the
    /// points (JSON) and a chart (SVG) of delivered rate and p99 latency.
    Sweep(sweep::SweepArgs),
    /// A reconnect storm after a node drain: many clients recover history channels
    /// at once; measures time to live, recovery results, Redis CPU and publish latency.
    Storm(storm::StormArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Checked before anything starts: a configuration's flags may not parse.
    let sweep_targets = match &cli.mode {
        Mode::Sweep(args) => sweep_targets(&args.configs())?,
        _ => Vec::new(),
    };
    raise_open_file_limit();
    if let Some(cpus) = &cli.target.pin_client {
        procstat::pin_self(cpus)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1.max(procstat::allowed_cpus()))
        .enable_all()
        .build()?;
    // The body runs as a task on a worker: inside `block_on` it would run on the
    // main thread, and every socket event would cross from a worker to it.
    let body = runtime.spawn(async move {
        let cluster = match (&cli.mode, cli.target.spawn_cluster) {
            // A sweep starts a cluster for each of its points.
            (Mode::Sweep(_), _) | (_, None) => None,
            (_, Some(n)) => Some(cluster::Cluster::start(n, &cli.target).await?),
        };
        let urls = match &cluster {
            Some(c) => c.urls(),
            None => cli.target.urls.clone(),
        };
        let result = match &cli.mode {
            Mode::Fanout(args) => fanout::run(args, &cli.target, &urls, cluster.as_ref())
                .await
                .map(|report| println!("{report}")),
            Mode::Idle(args) => idle::run(args, &cli.target, &urls, cluster.as_ref()).await,
            Mode::Sweep(args) => sweep::run(args, sweep_targets).await,
            Mode::Storm(args) => storm::run(args, &cli.target, &urls, cluster.as_ref())
                .await
                .map(|report| println!("{report}")),
        };
        if let Some(cluster) = cluster {
            cluster.stop().await;
        }
        result
    });
    runtime.block_on(body)?
}

/// What each configuration of a sweep runs against: this command line with the
/// configuration's flags added before it, parsed again, so that they can be any of
/// the global flags and a wrong one is reported as clap reports any other.
fn sweep_targets(configs: &[sweep::Config]) -> anyhow::Result<Vec<(sweep::Config, Target)>> {
    configs
        .iter()
        .map(|config| {
            let mut argv: Vec<OsString> = std::env::args_os().collect();
            argv.splice(1..1, config.flags.iter().map(OsString::from));
            let cli = Cli::try_parse_from(argv)
                .map_err(|e| anyhow::anyhow!("--config {}: {}", config.name, e.render()))?;
            Ok((config.clone(), cli.target))
        })
        .collect()
}

/// 10,000 connections need more descriptors than the usual soft limit of 1024.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Formats a duration in milliseconds with three decimals.
pub(crate) fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}
