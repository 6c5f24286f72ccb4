//! The `idle` mode: open connections and hold them, to measure what an idle
//! connection costs a node.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::cluster::Cluster;
use crate::{Target, conn, ms, procstat};

#[derive(Debug, Args)]
pub(crate) struct IdleArgs {
    /// Connections to open.
    #[arg(short = 'c', long, default_value_t = 10_000)]
    connections: usize,
    /// Seconds to hold them (memory is sampled after the first second).
    #[arg(short = 'd', long, default_value_t = 3)]
    duration: u64,
    /// Channels the connections spread over.
    #[arg(short = 'k', long, default_value_t = 1)]
    channels: usize,
}

pub(crate) async fn run(
    args: &IdleArgs,
    target: &Target,
    urls: &[String],
    cluster: Option<&Cluster>,
) -> anyhow::Result<()> {
    let rss_before = cluster.map(Cluster::rss_kib);
    let server_cpu_before = cluster.map(Cluster::cpu_time);
    let own_cpu_before = procstat::own_cpu_time();
    let started = Instant::now();
    let channels = args.channels.max(1);
    let conns = conn::connect_many(
        urls,
        args.connections,
        target.connect_concurrency,
        &target.conn_options(Default::default()),
        |i| format!("channel=idle-{}", i % channels),
    )
    .await?;
    let connect_time = started.elapsed();
    let own_cpu = procstat::own_cpu_time() - own_cpu_before;
    let server_cpu = cluster
        .map(Cluster::cpu_time)
        .zip(server_cpu_before)
        .map(|(a, b)| a - b);
    tokio::time::sleep(Duration::from_secs(1).min(Duration::from_secs(args.duration))).await;
    let rss_after = cluster.map(Cluster::rss_kib);
    // The upkeep of idle connections (heartbeats, presence refreshes): server CPU and
    // Redis commands per second over the rest of the hold.
    let hold_started = Instant::now();
    let hold_cpu_before = cluster.map(Cluster::cpu_time);
    let hold_commands_before = match cluster {
        Some(c) => Some(c.redis_commands().await?),
        None => None,
    };
    tokio::time::sleep(Duration::from_secs(args.duration.saturating_sub(1))).await;
    let hold = hold_started.elapsed().as_secs_f64();
    let upkeep_cpu = cluster
        .map(Cluster::cpu_time)
        .zip(hold_cpu_before)
        .map(|(a, b)| (a - b).as_secs_f64() / hold);
    let upkeep_commands = match (cluster, hold_commands_before) {
        // Minus this probe's own INFO.
        (Some(c), Some(before)) => Some((c.redis_commands().await? - before - 1) as f64 / hold),
        _ => None,
    };
    // Again at the end of a longer hold: a node may give memory back once the
    // connect burst is over.
    let rss_end = cluster.filter(|_| args.duration > 1).map(Cluster::rss_kib);
    // Disconnecting everyone: with presence and join/leave, a leave and an entry
    // removal per connection.
    let cpu_before_close = cluster.map(Cluster::cpu_time);
    drop(conns);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let close_cpu = cluster
        .map(Cluster::cpu_time)
        .zip(cpu_before_close)
        .map(|(a, b)| a - b);

    let per_conn_of = |after: Option<u64>| {
        rss_before.zip(after).map(|(before, after)| {
            after.saturating_sub(before) as f64 / args.connections.max(1) as f64
        })
    };
    let per_conn = per_conn_of(rss_after);
    let per_conn_end = per_conn_of(rss_end);
    eprintln!();
    eprintln!(
        "idle: {} connections over {} node(s)",
        args.connections,
        urls.len()
    );
    eprintln!("  connect all               {}", ms(connect_time));
    eprintln!("  load generator CPU        {}", ms(own_cpu));
    if let Some(cpu) = server_cpu {
        eprintln!("  server CPU (nodes+redis)  {}", ms(cpu));
    }
    if let (Some(cpu), Some(commands)) = (upkeep_cpu, upkeep_commands) {
        eprintln!(
            "  idle upkeep               {:.2}% of one core (nodes+redis), {commands:.1} Redis commands/s",
            cpu * 100.0
        );
    }
    if let Some(cpu) = close_cpu {
        eprintln!("  disconnect all, server CPU {}", ms(cpu));
    }
    if let (Some(before), Some(after), Some(per)) = (rss_before, rss_after, per_conn) {
        eprintln!(
            "  server RSS (nodes+redis)  {before} KiB -> {after} KiB = {per:.2} KiB per connection"
        );
    }
    if let (Some(end), Some(per)) = (rss_end, per_conn_end) {
        eprintln!(
            "  after holding {} s        {end} KiB = {per:.2} KiB per connection",
            args.duration
        );
    }
    let report = json!({
        "mode": "idle",
        "connections": args.connections,
        "nodes": urls.len(),
        "connect_s": connect_time.as_secs_f64(),
        "connect_loadgen_cpu_s": own_cpu.as_secs_f64(),
        "connect_server_cpu_s": server_cpu.map(|c| c.as_secs_f64()),
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "server_rss_kib_per_connection": per_conn,
        "server_rss_kib_end": rss_end,
        "server_rss_kib_per_connection_end": per_conn_end,
        "upkeep_server_cpu_share": upkeep_cpu,
        "upkeep_redis_commands_per_s": upkeep_commands,
        "disconnect_server_cpu_s": close_cpu.map(|c| c.as_secs_f64()),
    });
    println!("{report}");
    Ok(())
}
