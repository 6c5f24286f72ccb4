//! The `storm` mode: the reconnect storm an operator sees after a node drain.
//!
//! K history channels (`storm-<k>`) are filled with `--fill` messages each, and
//! `--residents` subscribers per channel per node stay connected throughout, as
//! the other nodes' subscribers of the same channels are in a real drain. Then C
//! clients connect at once (as fast as `--connect-concurrency` lets them), spread
//! round-robin over the nodes, each recovering `--per-client` channels `--behind`
//! offsets back with `since` in its connect URL, as a drained node's clients do.
//!
//! Measured: how long until every subscription is live again (`welcome`) and every
//! replay is in; what each recovery got (recovered, not recovered, or an error, by
//! code); whether each replay is exact (the missed offsets, consecutive, as many as
//! missed); the CPU Redis and the nodes spent in the storm (spawned clusters only);
//! and the publish→ack round trip of a paced publisher on another history channel
//! (`storm-pub`), in a baseline window before the storm and during it.
//!
//! Clients never offer compression: every replayed message's offset is read, and
//! the compressed path of `wire` inflates only a sample of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::conn::{self, Ws};
use crate::payload::{self, Kind};
use crate::{Target, ms, procstat};

#[derive(Debug, Args)]
pub(crate) struct StormArgs {
    /// Clients that reconnect at once.
    #[arg(short = 'c', long, default_value_t = 10_000)]
    clients: usize,
    /// History channels the clients recover: `storm-0` … `storm-<K-1>`.
    #[arg(short = 'k', long, default_value_t = 100)]
    channels: usize,
    /// Channels each client recovers: client i gets channels (i × per-client + j)
    /// mod K, for j below per-client.
    #[arg(long, default_value_t = 3)]
    per_client: usize,
    /// Messages published to each channel before the storm.
    #[arg(long, default_value_t = 1000)]
    fill: u64,
    /// Payload (`data`) size in bytes, of the fill and of the latency publisher.
    #[arg(short = 's', long, default_value_t = 100)]
    size: usize,
    /// Connections filling the channels in parallel, each waiting for its acks.
    #[arg(long, default_value_t = 4)]
    fill_publishers: usize,
    /// Messages each client missed: its `since` is this many offsets below the top.
    #[arg(long, default_value_t = 500)]
    behind: u64,
    /// Subscribers per channel per node connected for the whole run. 0: none, and
    /// the storm's clients are the first subscribers of their channels on a node.
    #[arg(long, default_value_t = 1)]
    residents: usize,
    /// The last this many nodes get no storm clients, and the latency publisher
    /// publishes through the last one: what the storm costs the cluster's other
    /// publishes through Redis, apart from the stormed nodes' own CPU. 0: the
    /// storm reaches every node and the publisher is on the first.
    #[arg(long, default_value_t = 0)]
    quiet_nodes: usize,
    /// Publishes per second of the latency publisher, on `storm-pub`.
    #[arg(long, default_value_t = 200)]
    publish_rate: u64,
    /// How long the publish latency is measured before the storm, as its baseline.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    baseline: Duration,
    /// Longest the storm may take: a client not live or whose replay is not in by
    /// then is reported (not waited for).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Where the latency publisher publishes: a history channel outside the K, so its
/// acks wait for the same Redis as the recoveries' reads.
const PUB_CHANNEL: &str = "storm-pub";

/// Longest wait for one reply outside the storm (fill acks, positions, the last
/// acks of the latency publisher, a close handshake).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Unacknowledged publishes per fill connection: enough to keep the node busy,
/// few enough that its replies never fill the connection's queue.
const FILL_WINDOW: u64 = 256;

pub(crate) async fn run(
    args: &StormArgs,
    target: &Target,
    urls: &[String],
    cluster: Option<&Cluster>,
) -> anyhow::Result<Value> {
    anyhow::ensure!(
        args.clients >= 1 && args.channels >= 1,
        "need at least one client and one channel"
    );
    anyhow::ensure!(
        (1..=args.channels).contains(&args.per_client),
        "--per-client must be between 1 and --channels ({}): a client names each of its channels once",
        args.channels
    );
    anyhow::ensure!(
        args.behind >= 1 && args.fill >= args.behind,
        "--behind must be at least 1 and at most --fill ({}): the clients recover messages of the fill",
        args.fill
    );
    anyhow::ensure!(args.publish_rate >= 1, "--publish-rate must be at least 1");
    anyhow::ensure!(
        args.quiet_nodes < urls.len(),
        "--quiet-nodes must leave at least one of the {} node(s) to the storm",
        urls.len()
    );
    // The storm's nodes, and the latency publisher's.
    let stormed = &urls[..urls.len() - args.quiet_nodes];
    let publishing = if args.quiet_nodes > 0 {
        &urls[urls.len() - 1]
    } else {
        &urls[0]
    };
    anyhow::ensure!(
        !target.compression,
        "storm reads the offset of every replayed message: run it without --compression"
    );
    if cluster.is_some() {
        anyhow::ensure!(
            target.history > 0,
            "storm needs --history N: without it spawned nodes keep no history, and there is nothing to recover"
        );
        anyhow::ensure!(
            target.history as u64 >= args.behind,
            "--history {} keeps fewer messages than --behind {}: no recovery could succeed",
            target.history,
            args.behind
        );
    }
    let plain = conn::Options {
        read_buffer: target.read_buffer,
        compression: false,
        wire: Default::default(),
    };
    let channel = |k: usize| format!("storm-{k}");

    eprintln!(
        "filling {} channels with {} messages each…",
        args.channels, args.fill
    );
    let fill_started = Instant::now();
    let tops = fill(args, urls, &plain).await?;
    let fill_time = fill_started.elapsed();
    let epochs = positions(&urls[0], &plain, &tops).await?;

    let stop_residents = CancellationToken::new();
    let residents = conn::connect_many(
        urls,
        args.channels * args.residents * urls.len(),
        target.connect_concurrency,
        &plain,
        // Resident i is on node i mod N: each node gets R of every channel.
        |i| format!("channel={}", channel((i / urls.len()) % args.channels)),
    )
    .await?;
    let residents: Vec<_> = residents
        .into_iter()
        .map(|ws| tokio::spawn(hold(ws, stop_residents.clone())))
        .collect();

    // The clients' connect URLs, built before the clock starts.
    let plans: Vec<(String, Vec<Sub>)> = (0..args.clients)
        .map(|i| {
            let subs: Vec<Sub> = (0..args.per_client)
                .map(|j| {
                    let k = (i * args.per_client + j) % args.channels;
                    Sub {
                        name: channel(k),
                        since: tops[k].saturating_sub(args.behind),
                    }
                })
                .collect();
            let mut query: Vec<String> =
                subs.iter().map(|s| format!("channel={}", s.name)).collect();
            query.extend(subs.iter().enumerate().map(|(j, s)| {
                let k = (i * args.per_client + j) % args.channels;
                format!("since={}:{}:{}", s.name, epochs[k], s.since)
            }));
            (
                format!("{}?{}", stormed[i % stormed.len()], query.join("&")),
                subs,
            )
        })
        .collect();

    let stop_publisher = CancellationToken::new();
    let epoch = Instant::now();
    let publisher = start_latency_publisher(
        publishing.clone(),
        plain.clone(),
        (args.publish_rate, args.size),
        epoch,
        stop_publisher.clone(),
    )
    .await?;
    eprintln!(
        "baseline: publishing {}/s to {PUB_CHANNEL} for {:?}…",
        args.publish_rate, args.baseline
    );
    let baseline_redis_before = redis_cpu(cluster).await;
    let baseline_started = Instant::now();
    tokio::time::sleep(args.baseline).await;
    let redis_baseline_per_s =
        redis_cpu(cluster)
            .await
            .zip(baseline_redis_before)
            .map(|(after, before)| {
                (after - before).as_secs_f64() / baseline_started.elapsed().as_secs_f64()
            });

    eprintln!(
        "storm: {} clients connect at once to {} node(s)…",
        args.clients,
        urls.len()
    );
    let redis_before = redis_cpu(cluster).await;
    let nodes_before = cluster.map(Cluster::node_cpu_time);
    let commands_before = match cluster {
        Some(c) => Some(c.redis_commands().await?),
        None => None,
    };
    let coalesced_before = node_counter(urls, "wsrelay_history_reads_coalesced_total").await;
    let own_before = procstat::own_cpu_time();
    let started = Instant::now();
    let storm = Arc::new(Storm {
        options: plain.clone(),
        started,
        deadline: tokio::time::Instant::now() + args.timeout,
        slots: Semaphore::new(target.connect_concurrency.max(1)),
        behind: args.behind,
    });
    let clients: Vec<_> = plans
        .into_iter()
        .map(|(url, subs)| tokio::spawn(reconnect(storm.clone(), url, subs)))
        .collect();
    let mut totals = Totals::new()?;
    let mut sockets = Vec::with_capacity(args.clients);
    for client in clients {
        let (outcome, ws) = client.await?;
        totals.add(outcome);
        sockets.extend(ws);
    }
    let storm_time = started.elapsed();
    let own_cpu = procstat::own_cpu_time() - own_before;
    let redis_cpu_s = redis_cpu(cluster)
        .await
        .zip(redis_before)
        .map(|(after, before)| after - before);
    let node_cpu = cluster
        .map(Cluster::node_cpu_time)
        .zip(nodes_before)
        .map(|(after, before)| after - before);
    let redis_commands = match (cluster, commands_before) {
        // Minus the INFO that read the count before.
        (Some(c), Some(before)) => Some(c.redis_commands().await? - before - 1),
        _ => None,
    };
    let coalesced = node_counter(urls, "wsrelay_history_reads_coalesced_total")
        .await
        .zip(coalesced_before)
        .map(|(after, before)| after - before);

    // The storm's latency needs samples: at least one second of them.
    if let Some(rest) = Duration::from_secs(1).checked_sub(started.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    stop_publisher.cancel();
    let latency = tokio::time::timeout(REPLY_TIMEOUT * 2, publisher)
        .await
        .map_err(|_| anyhow::anyhow!("the latency publisher did not stop"))?
        .map_err(|_| anyhow::anyhow!("the latency publisher's thread ended without a result"))??;
    let storm_at = started.duration_since(epoch).as_nanos() as u64;
    let mut baseline_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut storm_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for &(sent_ns, rtt_ns) in &latency.samples {
        let histogram = if sent_ns < storm_at {
            &mut baseline_us
        } else {
            &mut storm_us
        };
        histogram.saturating_record((rtt_ns / 1000).max(1));
    }
    // The slowest publishes of the storm and when they were sent: whether they
    // bunch at its start (the connects) or spread over it (the replays).
    let mut slowest: Vec<(u64, u64)> = latency
        .samples
        .iter()
        .filter(|(sent_ns, _)| *sent_ns >= storm_at)
        .map(|&(sent_ns, rtt_ns)| (rtt_ns, sent_ns - storm_at))
        .collect();
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    slowest.truncate(3);

    stop_residents.cancel();
    let mut resident_msgs = 0;
    for resident in residents {
        resident_msgs += resident.await?;
    }
    let open_sockets = sockets.len();
    let closed = futures_util::stream::iter(sockets)
        .map(close)
        .buffer_unordered(target.connect_concurrency.max(1))
        .fold(0usize, |n, clean| async move { n + usize::from(clean) })
        .await;

    let subscriptions = (args.clients * args.per_client) as u64;
    let errors: u64 = totals.outcome.errors.values().sum();
    let redis_ms_per_recovery =
        redis_cpu_s.map(|cpu| cpu.as_secs_f64() * 1e3 / subscriptions as f64);
    let quantiles = |h: &Histogram<u64>| {
        (!h.is_empty()).then(|| {
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
            json!({"p50": q(0.5), "p99": q(0.99), "max": h.max() as f64 / 1e3, "samples": h.len()})
        })
    };
    let p99_ratio = (!baseline_us.is_empty() && !storm_us.is_empty()).then(|| {
        storm_us.value_at_quantile(0.99) as f64 / baseline_us.value_at_quantile(0.99) as f64
    });
    let counts = |m: &BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let o = &totals.outcome;

    eprintln!();
    eprintln!(
        "storm: {} clients × {} of {} channels, {} behind of {} filled, {} B payloads, {} resident(s) per channel per node, {} node(s), connect concurrency {}",
        args.clients,
        args.per_client,
        args.channels,
        args.behind,
        args.fill,
        args.size,
        args.residents,
        urls.len(),
        target.connect_concurrency
    );
    eprintln!(
        "  fill                      {} messages in {:.2} s ({} connections)",
        args.fill * args.channels as u64,
        fill_time.as_secs_f64(),
        args.fill_publishers.clamp(1, args.channels)
    );
    eprintln!("  storm complete            {}", ms(storm_time));
    let pct = |h: &Histogram<u64>| {
        if h.is_empty() {
            "none".to_owned()
        } else {
            let q = |p: f64| ms(Duration::from_micros(h.value_at_quantile(p)));
            format!("p50 {} / p99 {} / max {}", q(0.5), q(0.99), q(1.0))
        }
    };
    eprintln!("  client live (welcome)     {}", pct(&totals.live_us));
    eprintln!("  client recovered          {}", pct(&totals.done_us));
    eprintln!(
        "  subscriptions             {subscriptions}: recovered {}, not recovered {}, errors {errors}{}",
        o.recovered,
        o.not_recovered,
        if errors > 0 {
            format!(" ({})", counts(&o.errors))
        } else {
            String::new()
        }
    );
    eprintln!(
        "  replayed                  {} messages ({} per recovery expected), inexact {}, cut off {}{}",
        o.replayed,
        args.behind,
        o.inexact,
        o.cut.values().sum::<u64>(),
        if o.cut.is_empty() {
            String::new()
        } else {
            format!(" ({})", counts(&o.cut))
        }
    );
    if let Some(example) = &o.inexact_example {
        eprintln!("  first inexact replay      {example}");
    }
    if let Some(frame) = &o.unexpected_example {
        eprintln!(
            "  unexpected frames         {} (first: {frame})",
            o.unexpected
        );
    }
    if let (Some(redis), Some(per), Some(base)) =
        (redis_cpu_s, redis_ms_per_recovery, redis_baseline_per_s)
    {
        eprintln!(
            "  Redis CPU                 {:.3} s in the storm = {per:.4} ms per recovering subscription (baseline {:.1} ms/s)",
            redis.as_secs_f64(),
            base * 1e3
        );
    }
    if let Some(nodes) = node_cpu {
        eprintln!("  nodes CPU                 {:.3} s", nodes.as_secs_f64());
    }
    if let Some(commands) = redis_commands {
        eprintln!("  Redis commands            {commands} in the storm");
    }
    if let Some(coalesced) = coalesced {
        eprintln!("  reads coalesced (nodes)   {coalesced}");
    }
    eprintln!(
        "  load generator CPU        {:.2} s ({:.0}% of one core)",
        own_cpu.as_secs_f64(),
        100.0 * own_cpu.as_secs_f64() / storm_time.as_secs_f64()
    );
    eprintln!(
        "  publish→ack baseline      {} ({} samples)",
        pct(&baseline_us),
        baseline_us.len()
    );
    eprintln!(
        "  publish→ack storm         {} ({} samples){}",
        pct(&storm_us),
        storm_us.len(),
        p99_ratio
            .map(|r| format!(", p99 {r:.1}× baseline"))
            .unwrap_or_default()
    );
    if !slowest.is_empty() {
        let list: Vec<String> = slowest
            .iter()
            .map(|(rtt, at)| format!("{:.1} ms at +{:.2} s", *rtt as f64 / 1e6, *at as f64 / 1e9))
            .collect();
        eprintln!("  slowest in the storm      {}", list.join(", "));
    }
    if latency.unanswered > 0 || !latency.errors.is_empty() {
        eprintln!(
            "  publishes not acked       {} unanswered, errors: {}",
            latency.unanswered,
            counts(&latency.errors)
        );
    }
    if closed < open_sockets {
        eprintln!("  closed cleanly            {closed} of {open_sockets} client connections");
    }

    let report = json!({
        "mode": "storm",
        "nodes": urls.len(),
        "clients": args.clients,
        "channels": args.channels,
        "per_client": args.per_client,
        "fill": args.fill,
        "behind": args.behind,
        "payload_bytes": args.size,
        "residents_per_channel_per_node": args.residents,
        "history": cluster.map(|_| target.history),
        "connect_concurrency": target.connect_concurrency,
        "fill_s": fill_time.as_secs_f64(),
        "storm_s": storm_time.as_secs_f64(),
        "client_live_ms": quantiles(&totals.live_us),
        "client_recovered_ms": quantiles(&totals.done_us),
        "subscriptions": subscriptions,
        "recovered": o.recovered,
        "not_recovered": o.not_recovered,
        "errors": errors,
        "errors_by_code": o.errors,
        "replayed": o.replayed,
        "replays_inexact": o.inexact,
        "replays_cut": o.cut,
        "unexpected_frames": o.unexpected,
        "redis_cpu_s": redis_cpu_s.map(|c| c.as_secs_f64()),
        "redis_cpu_ms_per_recovery": redis_ms_per_recovery,
        "redis_cpu_ms_per_s_baseline": redis_baseline_per_s.map(|r| r * 1e3),
        "nodes_cpu_s": node_cpu.map(|c| c.as_secs_f64()),
        "redis_commands": redis_commands,
        "reads_coalesced": coalesced,
        "loadgen_cpu_s": own_cpu.as_secs_f64(),
        "publish_ack_ms": {
            "baseline": quantiles(&baseline_us),
            "storm": quantiles(&storm_us),
            "p99_ratio": p99_ratio,
            "unanswered": latency.unanswered,
            "errors": latency.errors,
        },
        "resident_deliveries": resident_msgs,
        "closed_cleanly": closed,
        "client_connections_open_at_end": open_sockets,
    });
    Ok(report)
}

/// Redis CPU time so far, all shards together, for a spawned cluster.
async fn redis_cpu(cluster: Option<&Cluster>) -> Option<Duration> {
    match cluster {
        Some(cluster) => Some(cluster.redis_cpu_times().await.into_iter().sum()),
        None => None,
    }
}

/// Fills every channel with `--fill` messages from a few connections in parallel
/// (channel k from connection k mod P), each keeping a window of publishes in
/// flight; returns each channel's top offset, from the last ack.
async fn fill(
    args: &StormArgs,
    urls: &[String],
    options: &conn::Options,
) -> anyhow::Result<Vec<u64>> {
    let publishers = args.fill_publishers.clamp(1, args.channels);
    let tasks: Vec<_> = (0..publishers)
        .map(|j| {
            let url = format!("{}?channel=storm-fill-{j}", urls[j % urls.len()]);
            let channels: Vec<usize> = (j..args.channels).step_by(publishers).collect();
            let options = options.clone();
            let (count, size) = (args.fill, args.size);
            tokio::spawn(async move { fill_channels(&url, &options, channels, count, size).await })
        })
        .collect();
    let mut tops = vec![0; args.channels];
    for task in tasks {
        for (k, top) in task.await?? {
            tops[k] = top;
        }
    }
    Ok(tops)
}

/// Publishes `count` messages to each of `channels`, waiting for every ack.
async fn fill_channels(
    url: &str,
    options: &conn::Options,
    channels: Vec<usize>,
    count: u64,
    size: usize,
) -> anyhow::Result<Vec<(usize, u64)>> {
    let mut ws = conn::connect(url, options).await?;
    let mut tops = Vec::with_capacity(channels.len());
    let mut id = 0u64;
    for k in channels {
        let (mut sent, mut acked, mut top) = (0u64, 0u64, 0u64);
        while acked < count {
            while sent < count && sent - acked < FILL_WINDOW {
                let data = payload::data(Kind::X, 0, sent, size);
                let frame = format!(r#"{{"op":"pub","ch":"storm-{k}","data":{data},"id":{id}}}"#);
                ws.feed(Message::text(frame)).await?;
                id += 1;
                sent += 1;
            }
            ws.flush().await?;
            // Replies come in the order of the requests: read until half a window
            // is in flight before sending more, and every ack after the last send.
            loop {
                let in_flight = sent - acked;
                let enough = if sent == count {
                    in_flight == 0
                } else {
                    in_flight <= FILL_WINDOW / 2
                };
                if enough {
                    break;
                }
                let reply = next_json(&mut ws, "a fill publish").await?;
                match reply["op"].as_str() {
                    Some("ack") => {
                        let offset = reply["offset"].as_u64().ok_or_else(|| {
                            anyhow::anyhow!(
                                "storm-{k} keeps no history on {url} (its ack has no offset): the nodes need --history-size"
                            )
                        })?;
                        top = top.max(offset);
                        acked += 1;
                    }
                    Some("error") if reply["code"] == "rate_limited" => anyhow::bail!(
                        "filling storm-{k}: {reply}: the nodes limit publishes per connection (--publish-rate, --publish-burst); raise the limits for this benchmark"
                    ),
                    Some("error") => anyhow::bail!("filling storm-{k}: {reply}"),
                    _ => {}
                }
            }
        }
        tops.push((k, top));
    }
    close(ws).await;
    Ok(tops)
}

/// Each channel's epoch (from `history` with `limit` 0, which reads only the
/// position), checking that its top is still the fill's last ack.
async fn positions(
    url: &str,
    options: &conn::Options,
    tops: &[u64],
) -> anyhow::Result<Vec<String>> {
    let mut ws = conn::connect(&format!("{url}?channel=storm-probe"), options).await?;
    let mut epochs = Vec::with_capacity(tops.len());
    for (k, &top) in tops.iter().enumerate() {
        let request = json!({"op":"history","ch":format!("storm-{k}"),"limit":0,"id":k});
        ws.send(Message::text(request.to_string())).await?;
        let reply = loop {
            let reply = next_json(&mut ws, "a position read").await?;
            if reply["id"] == k {
                break reply;
            }
        };
        let (Some(epoch), Some(offset)) = (reply["epoch"].as_str(), reply["offset"].as_u64())
        else {
            anyhow::bail!("no position of storm-{k}: {reply}");
        };
        anyhow::ensure!(
            offset == top,
            "storm-{k} is at offset {offset} after the fill, whose last ack said {top}: something else publishes to it"
        );
        epochs.push(epoch.to_owned());
    }
    close(ws).await;
    Ok(epochs)
}

/// The next text frame, parsed, within [`REPLY_TIMEOUT`].
async fn next_json(ws: &mut Ws, what: &str) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(REPLY_TIMEOUT, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no reply to {what} within {REPLY_TIMEOUT:?}"))?;
        match msg {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(text.as_str())?),
            Some(Ok(Message::Close(frame))) => {
                anyhow::bail!("the node closed the connection during {what}: {frame:?}")
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => anyhow::bail!("during {what}: {e}"),
            None => anyhow::bail!("connection closed during {what}"),
        }
    }
}

/// Keeps a resident subscriber reading (it answers pings, and counts what it
/// receives) until `stop`, then closes it.
async fn hold(mut ws: Ws, stop: CancellationToken) -> u64 {
    let mut msgs = 0;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            msg = ws.next() => msg,
        };
        match msg {
            Some(Ok(Message::Text(t))) if t.as_str().starts_with(r#"{"op":"msg""#) => msgs += 1,
            Some(Ok(_)) => {}
            _ => return msgs,
        }
    }
    close(ws).await;
    msgs
}

/// Closes a connection with the WebSocket handshake: a close frame, then reading
/// until the node's. Whether it completed within [`REPLY_TIMEOUT`].
async fn close(mut ws: Ws) -> bool {
    tokio::time::timeout(REPLY_TIMEOUT, async move {
        let _ = ws.close(None).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await
    .is_ok()
}

/// What the latency publisher saw.
#[derive(Debug, Default)]
struct Latency {
    /// Each acked publish: when it was sent and its round trip, in ns.
    samples: Vec<(u64, u64)>,
    sent: u64,
    /// Publishes answered by an error, by code.
    errors: BTreeMap<String, u64>,
    /// Publishes with no answer at all (within [`REPLY_TIMEOUT`] after the stop).
    unanswered: u64,
}

/// Starts the latency publisher on a thread and a runtime of its own, and returns
/// once it is connected. Its own thread, because the storm's clients keep the
/// load generator's runtime busy: an ack read by a worker that is busy with
/// 10,000 replays would be timed late, and the figure would be the load
/// generator's. The OS schedules a thread that mostly sleeps promptly even on a
/// busy core.
async fn start_latency_publisher(
    url: String,
    options: conn::Options,
    (rate, size): (u64, usize),
    epoch: Instant,
    stop: CancellationToken,
) -> anyhow::Result<oneshot::Receiver<anyhow::Result<Latency>>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("storm-publisher".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let url = format!("{url}?channel=storm-publisher");
                match conn::connect(&url, &options).await {
                    Ok(ws) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = done_tx.send(publish_paced(ws, rate, size, epoch, stop).await);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })?;
    tokio::time::timeout(REPLY_TIMEOUT, ready_rx)
        .await
        .map_err(|_| anyhow::anyhow!("the latency publisher did not connect"))?
        .map_err(|_| anyhow::anyhow!("the latency publisher's thread ended"))??;
    Ok(done_rx)
}

/// Publishes to [`PUB_CHANNEL`] at `rate` per second until `stop`, each with its
/// send time (ns since `epoch`) as its id, so that the ack alone gives the round
/// trip; then waits up to [`REPLY_TIMEOUT`] for the last acks.
async fn publish_paced(
    ws: Ws,
    rate: u64,
    size: usize,
    epoch: Instant,
    stop: CancellationToken,
) -> anyhow::Result<Latency> {
    let (mut sink, mut stream) = ws.split();
    let mut latency = Latency::default();
    let mut answered = 0u64;
    let mut last_id = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let until = grace.unwrap_or_else(|| tokio::time::Instant::now() + REPLY_TIMEOUT);
        tokio::select! {
            _ = tick.tick(), if grace.is_none() => {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
                while latency.sent < due {
                    let id = (epoch.elapsed().as_nanos() as u64).max(last_id + 1);
                    last_id = id;
                    let data = payload::data(Kind::X, id, latency.sent, size);
                    let frame = format!(r#"{{"op":"pub","ch":"{PUB_CHANNEL}","data":{data},"id":{id}}}"#);
                    sink.feed(Message::text(frame)).await?;
                    latency.sent += 1;
                }
                sink.flush().await?;
            }
            _ = stop.cancelled(), if grace.is_none() => {
                grace = Some(tokio::time::Instant::now() + REPLY_TIMEOUT);
            }
            _ = tokio::time::sleep_until(until), if grace.is_some() => break,
            msg = stream.next() => {
                let Some(msg) = msg else {
                    anyhow::bail!("the latency publisher's connection closed");
                };
                let Message::Text(text) = msg? else { continue };
                let received = epoch.elapsed().as_nanos() as u64;
                let reply: Value = serde_json::from_str(text.as_str())?;
                let Some(id) = reply["id"].as_u64() else { continue };
                answered += 1;
                match reply["op"].as_str() {
                    Some("ack") => latency.samples.push((id, received.saturating_sub(id))),
                    _ => {
                        let code = reply["code"].as_str().unwrap_or("no code").to_owned();
                        *latency.errors.entry(code).or_default() += 1;
                    }
                }
            }
        }
        if grace.is_some() && answered == latency.sent {
            break;
        }
    }
    latency.unanswered = latency.sent - answered;
    close(stream.reunite(sink)?).await;
    Ok(latency)
}

/// What the storm's clients share.
struct Storm {
    options: conn::Options,
    /// When the storm started: every client's times are from here.
    started: Instant,
    /// `--timeout` after the start: nothing waits beyond it.
    deadline: tokio::time::Instant,
    /// `--connect-concurrency` handshakes at once.
    slots: Semaphore,
    behind: u64,
}

/// One channel a client recovers.
struct Sub {
    name: String,
    since: u64,
}

/// A replay being read.
struct Replay {
    name: String,
    /// The offset due next.
    next: u64,
    /// The top the `welcome` gave: the replay ends there.
    top: u64,
    got: u64,
    /// The first offset out of order, if any.
    problem: Option<String>,
    done: bool,
}

/// What one client saw (and, summed, all of them).
#[derive(Debug, Default)]
struct Outcome {
    recovered: u64,
    not_recovered: u64,
    /// Subscriptions that did not go live, by the error code the node sent, or by
    /// what failed before one could come.
    errors: BTreeMap<String, u64>,
    /// Replayed messages received.
    replayed: u64,
    /// Replays that were not exactly the missed offsets, in order.
    inexact: u64,
    inexact_example: Option<String>,
    /// Replays that did not arrive whole, by why.
    cut: BTreeMap<String, u64>,
    /// Frames other than replayed messages before the replays were in.
    unexpected: u64,
    unexpected_example: Option<String>,
    /// When the client's subscriptions were live (`welcome`), since the start.
    live: Option<Duration>,
    /// When the last of its replays was in.
    done: Option<Duration>,
}

/// Every client's outcome, with the distributions of their times.
struct Totals {
    outcome: Outcome,
    live_us: Histogram<u64>,
    done_us: Histogram<u64>,
}

impl Totals {
    fn new() -> anyhow::Result<Totals> {
        Ok(Totals {
            outcome: Outcome::default(),
            live_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            done_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        })
    }

    fn add(&mut self, o: Outcome) {
        let t = &mut self.outcome;
        t.recovered += o.recovered;
        t.not_recovered += o.not_recovered;
        for (k, v) in o.errors {
            *t.errors.entry(k).or_default() += v;
        }
        t.replayed += o.replayed;
        t.inexact += o.inexact;
        t.inexact_example = t.inexact_example.take().or(o.inexact_example);
        for (k, v) in o.cut {
            *t.cut.entry(k).or_default() += v;
        }
        t.unexpected += o.unexpected;
        t.unexpected_example = t.unexpected_example.take().or(o.unexpected_example);
        let us = |d: Duration| (d.as_micros() as u64).max(1);
        if let Some(live) = o.live {
            self.live_us.saturating_record(us(live));
        }
        if let Some(done) = o.done {
            self.done_us.saturating_record(us(done));
        }
    }
}

/// One client of the storm: connects with `since` for each of its channels,
/// reads `welcome`, then its replays. Returns what it saw, and its connection
/// if it got one (closed by the caller once every client is done).
async fn reconnect(storm: Arc<Storm>, url: String, subs: Vec<Sub>) -> (Outcome, Option<Ws>) {
    let mut out = Outcome::default();
    let count = subs.len() as u64;
    let opened = match tokio::time::timeout_at(storm.deadline, storm.slots.acquire()).await {
        Err(_) => Err(anyhow::anyhow!(
            "no connection slot came free within --timeout"
        )),
        Ok(_slot) => {
            let left = storm
                .deadline
                .saturating_duration_since(tokio::time::Instant::now());
            conn::open(&url, &storm.options, left).await
        }
    };
    let (mut ws, first) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            // The URL is long and the same for many: the node's place is enough.
            let why = format!("{e:#}").replace(&url, "<node>");
            *out.errors.entry(why).or_default() += count;
            return (out, None);
        }
    };
    let first_json = match &first {
        Message::Text(t) => serde_json::from_str::<Value>(t.as_str()).ok(),
        _ => None,
    };
    let positions = match first_json {
        Some(mut welcome) if welcome["op"] == "welcome" => match welcome["positions"].take() {
            Value::Array(positions) => positions,
            _ => Vec::new(),
        },
        Some(error) if error["op"] == "error" => {
            let code = error["code"].as_str().unwrap_or("error without a code");
            *out.errors.entry(code.to_owned()).or_default() += count;
            return (out, Some(ws));
        }
        _ => {
            let why = format!("first frame not welcome: {first:?}");
            *out.errors.entry(why).or_default() += count;
            return (out, Some(ws));
        }
    };
    out.live = Some(storm.started.elapsed());

    let mut replays = Vec::with_capacity(subs.len());
    for sub in subs {
        let position = positions.iter().find(|p| p["ch"] == sub.name.as_str());
        match position.map(|p| (p["recovered"].as_bool(), p["offset"].as_u64())) {
            Some((Some(true), Some(top))) => {
                out.recovered += 1;
                replays.push(Replay {
                    done: top <= sub.since,
                    next: sub.since + 1,
                    name: sub.name,
                    top,
                    got: 0,
                    problem: None,
                });
            }
            Some((Some(false), _)) => out.not_recovered += 1,
            _ => {
                *out.errors
                    .entry("welcome without the channel's recovery".to_owned())
                    .or_default() += 1;
            }
        }
    }

    let mut cut: Option<String> = None;
    while cut.is_none() && replays.iter().any(|r| !r.done) {
        let msg = match tokio::time::timeout_at(storm.deadline, ws.next()).await {
            Err(_) => {
                cut = Some("not in within --timeout".to_owned());
                break;
            }
            Ok(None) => {
                cut = Some("connection closed".to_owned());
                break;
            }
            Ok(Some(Err(e))) => {
                cut = Some(format!("read error: {e}"));
                break;
            }
            Ok(Some(Ok(msg))) => msg,
        };
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Close(frame) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                cut = Some(format!("closed by the node, code {code:?}"));
                break;
            }
            _ => continue,
        };
        let replay = msg_position(text).and_then(|(ch, offset)| {
            let replay = replays.iter_mut().find(|r| r.name == ch && !r.done)?;
            Some((replay, offset))
        });
        let Some((replay, offset)) = replay else {
            // A live message of a channel already replayed (nothing publishes to
            // them in a storm of its own, but a shared cluster may) is no surprise.
            if !text.starts_with(r#"{"op":"msg""#) {
                out.unexpected += 1;
                out.unexpected_example
                    .get_or_insert_with(|| text.chars().take(200).collect());
            }
            continue;
        };
        out.replayed += 1;
        replay.got += 1;
        if offset != replay.next && replay.problem.is_none() {
            replay.problem = Some(format!(
                "{}: offset {offset} where {} was due",
                replay.name, replay.next
            ));
        }
        replay.next = offset + 1;
        replay.done = offset >= replay.top;
    }
    if let Some(why) = cut {
        let left = replays.iter().filter(|r| !r.done).count() as u64;
        *out.cut.entry(why).or_default() += left;
    } else {
        out.done = Some(storm.started.elapsed());
    }
    for replay in replays.iter().filter(|r| r.done) {
        let problem = replay.problem.clone().or_else(|| {
            (replay.got != storm.behind).then(|| {
                format!(
                    "{}: {} messages replayed, {} missed",
                    replay.name, replay.got, storm.behind
                )
            })
        });
        if let Some(problem) = problem {
            out.inexact += 1;
            out.inexact_example.get_or_insert(problem);
        }
    }
    (out, Some(ws))
}

/// The channel and offset of a `msg` frame, without a JSON parse: one load
/// generator core reads every replayed message of the storm.
fn msg_position(frame: &str) -> Option<(&str, u64)> {
    let rest = frame.strip_prefix(r#"{"op":"msg","ch":""#)?;
    let (ch, rest) = rest.split_once('"')?;
    let rest = rest.strip_prefix(r#","offset":"#)?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    Some((ch, rest[..end].parse().ok()?))
}

/// A counter of the nodes' `/metrics`, summed over the nodes; `None` if one
/// cannot be read.
async fn node_counter(urls: &[String], name: &str) -> Option<u64> {
    let mut total = 0.0;
    for url in urls {
        let authority = url.strip_prefix("ws://")?.split('/').next()?;
        let body = tokio::time::timeout(REPLY_TIMEOUT, http_get(authority, "/metrics"))
            .await
            .ok()?
            .ok()?;
        total += body.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })?;
    }
    Some(total as u64)
}

/// A plain HTTP/1.1 GET; the whole response, headers included.
async fn http_get(authority: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_messages_channel_and_offset() {
        let frame = r#"{"op":"msg","ch":"storm-7","offset":501,"data":{"t":0,"s":1,"p":"x"}}"#;
        assert_eq!(super::msg_position(frame), Some(("storm-7", 501)));
        assert_eq!(
            super::msg_position(r#"{"op":"msg","ch":"a","data":1}"#),
            None
        );
        assert_eq!(super::msg_position(r#"{"op":"ack","id":1}"#), None);
    }
}
