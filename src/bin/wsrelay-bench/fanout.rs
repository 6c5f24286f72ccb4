//! The `fanout` mode: paced publishers, many subscribers, end-to-end latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::conn::{self, Ws};
use crate::payload::{self, Kind};
use crate::wire;
use crate::{Target, ms, procstat};

#[derive(Debug, Args)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    pub(crate) shape: Shape,
    /// Total published messages per second (deliveries/s = rate × subscribers per channel).
    #[arg(short = 'r', long, default_value_t = 100)]
    pub(crate) rate: u64,
    /// After the run, time recoveries of this many missed messages (needs history
    /// on the nodes, at least this deep). 0: none.
    #[arg(long, default_value_t = 0)]
    pub(crate) recover: u64,
}

/// What a run looks like apart from its rate: shared by `fanout` and `sweep`.
#[derive(Debug, Clone, Args)]
pub(crate) struct Shape {
    /// Subscriber connections.
    #[arg(short = 'c', long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Publisher connections.
    #[arg(short = 'p', long, default_value_t = 1)]
    pub(crate) publishers: usize,
    /// Seconds of publishing.
    #[arg(short = 'd', long, default_value_t = 10)]
    pub(crate) duration: u64,
    /// Payload (`data`) size in bytes.
    #[arg(short = 's', long, default_value_t = 100)]
    pub(crate) size: usize,
    /// What fills the payload: `x` (one letter repeated) or `ticker` (market data
    /// JSON, which compresses as real payloads do).
    #[arg(long, value_enum, default_value = "x")]
    pub(crate) payload: Kind,
    /// Channels; subscriber i listens to channel i mod K, publishers go round-robin.
    #[arg(short = 'k', long, default_value_t = 1)]
    pub(crate) channels: usize,
    /// Longest wait after publishing for deliveries still in flight.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) drain: Duration,
    /// The first part of the publishing left out of the figures: latencies of
    /// messages sent in it, and the CPU and deliveries until its end. The nodes
    /// meet the full rate at once (from idle to a million deliveries a second),
    /// and what they queue meanwhile drains for a while; this measures them
    /// once that is over. Shorter than the duration.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub(crate) warmup: Duration,
}

impl Shape {
    /// Subscribers of channel `k`: subscriber i listens to channel i mod K.
    pub(crate) fn subscribers_of(&self, k: usize) -> u64 {
        (0..self.subscribers)
            .filter(|i| i % self.channels == k)
            .count() as u64
    }
}

/// What one subscriber saw: the latency of each delivery, in microseconds. A plain
/// vector, merged into one histogram at the end, costs the hot loop a push; one
/// histogram per subscriber made recording the load generator's top cost.
struct Seen {
    latencies_us: Vec<u32>,
    /// Deliveries, with a latency or not (compressed ones are sampled).
    delivered: u64,
}

pub(crate) async fn run(
    args: &FanoutArgs,
    target: &Target,
    urls: &[String],
    cluster: Option<&Cluster>,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        args.shape.channels >= 1 && args.shape.publishers >= 1,
        "need at least one channel and one publisher"
    );
    let channel = |i: usize| format!("bench-{}", i % args.shape.channels);
    let epoch = Instant::now();

    eprintln!(
        "connecting {} subscribers to {} node(s)…",
        args.shape.subscribers,
        urls.len()
    );
    let connect_started = Instant::now();
    // Bytes the subscribers read from their sockets: what deliveries cost on the wire.
    let wire = Arc::new(AtomicU64::new(0));
    let subscribers = conn::connect_many(
        urls,
        args.shape.subscribers,
        target.connect_concurrency,
        &target.conn_options(wire.clone()),
        |i| format!("channel={}", channel(i)),
    )
    .await?;
    let connect_time = connect_started.elapsed();
    let publishers = conn::connect_many(
        urls,
        args.shape.publishers,
        target.connect_concurrency,
        &target.conn_options(Default::default()),
        |j| format!("channel=bench-publisher-{j}"),
    )
    .await?;

    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    // Messages sent before this (ns since `epoch`) are the warm-up's: not timed.
    let timed_from = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|ws| {
            let (received, timed_from) = (received.clone(), timed_from.clone());
            tokio::spawn(subscribe(ws, epoch, received, timed_from, stop.clone()))
        })
        .collect();

    let duration = Duration::from_secs(args.shape.duration);
    anyhow::ensure!(
        args.shape.warmup < duration,
        "--warmup must be shorter than the duration"
    );
    let mut server_cpu_before = cluster.map(Cluster::cpu_time);
    let mut redis_cpu_before = redis_cpu_times(cluster).await;
    let mut own_cpu_before = procstat::own_cpu_time();
    let mut wire_before = wire.load(Ordering::Relaxed);
    let started = Instant::now();
    timed_from.store(
        (started + args.shape.warmup)
            .duration_since(epoch)
            .as_nanos() as u64,
        Ordering::Relaxed,
    );
    let per_publisher = args.rate as f64 / args.shape.publishers as f64;
    let senders: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(j, ws)| {
            let payload = (args.shape.payload, args.shape.size);
            let channels = args.shape.channels;
            tokio::spawn(publish(
                ws,
                j,
                per_publisher,
                duration,
                channels,
                payload,
                epoch,
            ))
        })
        .collect();
    // Deliveries before the end of the warm-up, left out of the per-delivery
    // figures with the CPU spent until then.
    let mut warm_deliveries = 0;
    let mut measured_from = started;
    if !args.shape.warmup.is_zero() {
        tokio::time::sleep(args.shape.warmup).await;
        server_cpu_before = cluster.map(Cluster::cpu_time);
        redis_cpu_before = redis_cpu_times(cluster).await;
        own_cpu_before = procstat::own_cpu_time();
        wire_before = wire.load(Ordering::Relaxed);
        warm_deliveries = received.load(Ordering::Relaxed);
        measured_from = Instant::now();
    }
    let mut published_per_channel = vec![0u64; args.shape.channels];
    for sender in senders {
        for (k, n) in sender.await??.into_iter().enumerate() {
            published_per_channel[k] += n;
        }
    }
    let publish_time = started.elapsed();

    let subs_per_channel: Vec<u64> = (0..args.shape.channels)
        .map(|k| args.shape.subscribers_of(k))
        .collect();
    let expected: u64 = published_per_channel
        .iter()
        .zip(&subs_per_channel)
        .map(|(m, s)| m * s)
        .sum();
    let drain_deadline = Instant::now() + args.shape.drain;
    while received.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let measured_elapsed = measured_from.elapsed();
    let wire_bytes = wire.load(Ordering::Relaxed) - wire_before;
    let own_cpu = procstat::own_cpu_time() - own_cpu_before;
    let server_cpu = cluster
        .map(|c| c.cpu_time())
        .zip(server_cpu_before)
        .map(|(after, before)| after - before);
    // Each shard's Redis alone: the capacity model's Redis side.
    let redis_cpu: Option<Vec<Duration>> = redis_cpu_times(cluster)
        .await
        .zip(redis_cpu_before)
        .map(|(after, before)| after.iter().zip(before).map(|(a, b)| *a - b).collect());
    stop.cancel();

    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut got = 0;
    for reader in readers {
        let seen = reader.await?;
        got += seen.delivered;
        for us in seen.latencies_us {
            latency.saturating_record(u64::from(us).max(1));
        }
    }
    let published: u64 = published_per_channel.iter().sum();
    let recovery = if args.recover > 0 {
        Some(time_recoveries(&urls[0], target.read_buffer, args.recover).await?)
    } else {
        None
    };
    let deliveries_per_s = got as f64 / elapsed.as_secs_f64();
    let q = |p: f64| Duration::from_micros(latency.value_at_quantile(p));
    // After the warm-up, if any: what the CPU figures were measured over.
    let measured = got.saturating_sub(warm_deliveries);
    let measured_publishes =
        published.saturating_sub((args.rate as f64 * args.shape.warmup.as_secs_f64()) as u64);
    let server_cpu_per_million =
        server_cpu.map(|cpu| cpu.as_secs_f64() / (measured.max(1) as f64 / 1e6));
    let server_cpu_per_thousand_publishes =
        server_cpu.map(|cpu| cpu.as_secs_f64() / (measured_publishes.max(1) as f64 / 1e3));

    let wire_per_delivery = wire_bytes as f64 / measured.max(1) as f64;
    eprintln!();
    eprintln!(
        "fanout: {} subscribers, {} publisher(s), {} channel(s), {} msgs/s for {:?}, {} B {:?} payload, compression {}",
        args.shape.subscribers,
        args.shape.publishers,
        args.shape.channels,
        args.rate,
        duration,
        args.shape.size,
        args.shape.payload,
        if target.compression {
            "offered"
        } else {
            "not offered"
        },
    );
    eprintln!("  connect all subscribers   {}", ms(connect_time));
    if !args.shape.warmup.is_zero() {
        eprintln!(
            "  warm-up                   the first {:?} of publishing left out of latency, CPU and bytes ({warm_deliveries} deliveries)",
            args.shape.warmup
        );
    }
    eprintln!(
        "  published                 {published} in {:.2} s",
        publish_time.as_secs_f64()
    );
    eprintln!(
        "  deliveries                {got} of {expected} expected ({} lost or late)",
        expected.saturating_sub(got)
    );
    eprintln!(
        "  deliveries/s              {deliveries_per_s:.0} (offered {})",
        args.rate * subs_per_channel.iter().max().copied().unwrap_or(0)
    );
    eprintln!(
        "  bytes on the wire          {wire_per_delivery:.1} per delivery ({wire_bytes} in all)"
    );
    eprintln!(
        "  latency p50/p90/p99/p99.9 {} / {} / {} / {}",
        ms(q(0.5)),
        ms(q(0.9)),
        ms(q(0.99)),
        ms(q(0.999))
    );
    eprintln!(
        "  latency max               {}",
        ms(Duration::from_micros(latency.max()))
    );
    eprintln!(
        "  load generator CPU        {:.2} s ({:.0}% of one core)",
        own_cpu.as_secs_f64(),
        100.0 * own_cpu.as_secs_f64() / measured_elapsed.as_secs_f64()
    );
    if let (Some(cpu), Some(per_m), Some(per_k)) = (
        server_cpu,
        server_cpu_per_million,
        server_cpu_per_thousand_publishes,
    ) {
        eprintln!(
            "  server CPU (nodes+redis)  {:.2} s = {per_m:.2} CPU-s per million deliveries, {per_k:.4} per thousand publishes",
            cpu.as_secs_f64()
        );
    }
    let redis_per_thousand: Option<Vec<f64>> = redis_cpu.as_ref().map(|shards| {
        shards
            .iter()
            .map(|cpu| cpu.as_secs_f64() * 1e3 / (measured_publishes.max(1) as f64 / 1e3))
            .collect()
    });
    if let Some(per_k) = &redis_per_thousand {
        let shards: Vec<String> = per_k.iter().map(|ms| format!("{ms:.2}")).collect();
        eprintln!(
            "  Redis CPU per thousand publishes: {:.2} ms (per shard: {})",
            per_k.iter().sum::<f64>(),
            shards.join(", ")
        );
    }
    if let Some(times) = &recovery {
        eprintln!(
            "  recovery of {} messages  median {} (min {}, max {}, {} runs)",
            args.recover,
            ms(times[times.len() / 2]),
            ms(times[0]),
            ms(times[times.len() - 1]),
            times.len()
        );
    }
    let report = json!({
        "mode": "fanout",
        "subscribers": args.shape.subscribers,
        "publishers": args.shape.publishers,
        "channels": args.shape.channels,
        "rate_msgs_per_s": args.rate,
        "duration_s": args.shape.duration,
        "warmup_s": args.shape.warmup.as_secs_f64(),
        "payload_bytes": args.shape.size,
        "payload": format!("{:?}", args.shape.payload).to_lowercase(),
        "compression": target.compression,
        "wire_bytes_per_delivery": wire_per_delivery,
        "nodes": urls.len(),
        "connect_s": connect_time.as_secs_f64(),
        "published": published,
        "expected": expected,
        "delivered": got,
        "lost": expected.saturating_sub(got),
        "deliveries_per_s": deliveries_per_s,
        "latency_ms": {
            "p50": q(0.5).as_secs_f64() * 1e3,
            "p90": q(0.9).as_secs_f64() * 1e3,
            "p99": q(0.99).as_secs_f64() * 1e3,
            "p999": q(0.999).as_secs_f64() * 1e3,
            "max": latency.max() as f64 / 1e3,
        },
        "loadgen_cpu_s": own_cpu.as_secs_f64(),
        "server_cpu_s": server_cpu.map(|c| c.as_secs_f64()),
        "server_cpu_s_per_million_deliveries": server_cpu_per_million,
        "server_cpu_s_per_thousand_publishes": server_cpu_per_thousand_publishes,
        "redis_cpu_ms_per_thousand_publishes": redis_per_thousand.as_ref().map(|v| v.iter().sum::<f64>()),
        "redis_cpu_ms_per_thousand_publishes_per_shard": redis_per_thousand,
        "history": target.history,
        "recovery_ms": recovery.as_ref().map(|t| json!({
            "messages": args.recover,
            "median": t[t.len() / 2].as_secs_f64() * 1e3,
            "min": t[0].as_secs_f64() * 1e3,
            "max": t[t.len() - 1].as_secs_f64() * 1e3,
        })),
    });
    Ok(report)
}

/// Times recoveries of `missed` messages on `bench-0`: a new client subscribes with
/// `since` set `missed` offsets back, and the clock runs from sending the `sub` to its
/// ack (the replayed messages come first). Sorted durations of several runs.
async fn time_recoveries(
    url: &str,
    read_buffer: usize,
    missed: u64,
) -> anyhow::Result<Vec<Duration>> {
    const RUNS: usize = 9;
    // Not compressed: the replies are parsed whole.
    let options = conn::Options {
        read_buffer,
        compression: false,
        wire: Default::default(),
    };
    let mut ws = conn::connect(&format!("{url}?channel=bench-recovery"), &options).await?;
    let ack = request(&mut ws, json!({"op":"sub","ch":"bench-0","id":0}), 0)
        .await?
        .1;
    let (Some(epoch), Some(top)) = (ack["epoch"].as_str(), ack["offset"].as_u64()) else {
        anyhow::bail!("no position in {ack}: start the nodes with --history");
    };
    anyhow::ensure!(
        top >= missed,
        "only {top} messages were published; need {missed}"
    );
    let epoch = epoch.to_owned();
    let mut times = Vec::with_capacity(RUNS);
    for run in 1..=RUNS as u64 {
        request(
            &mut ws,
            json!({"op":"unsub","ch":"bench-0","id":run * 2}),
            run * 2,
        )
        .await?;
        let sub = json!({"op":"sub","ch":"bench-0","since":{"epoch":epoch,"offset":top - missed},"id":run * 2 + 1});
        let started = Instant::now();
        let (replayed, ack) = request(&mut ws, sub, run * 2 + 1).await?;
        times.push(started.elapsed());
        anyhow::ensure!(
            ack["recovered"] == true && replayed == missed,
            "recovery failed: {replayed} replayed, ack {ack}"
        );
    }
    times.sort();
    Ok(times)
}

/// Sends a request and reads until its reply; returns how many `msg` frames came
/// before it, and the reply.
async fn request(
    ws: &mut Ws,
    frame: serde_json::Value,
    id: u64,
) -> anyhow::Result<(u64, serde_json::Value)> {
    ws.send(Message::text(frame.to_string())).await?;
    let mut msgs = 0;
    loop {
        let Some(msg) = ws.next().await else {
            anyhow::bail!("connection closed during a request");
        };
        let Message::Text(text) = msg? else { continue };
        let reply: serde_json::Value = serde_json::from_str(text.as_str())?;
        if reply["id"] == id {
            return Ok((msgs, reply));
        }
        if reply["op"] == "msg" {
            msgs += 1;
        }
    }
}

/// Paces one publisher at `rate` messages/s for `duration`; returns how many it
/// published to each channel.
async fn publish(
    ws: Ws,
    index: usize,
    rate: f64,
    duration: Duration,
    channels: usize,
    (kind, size): (Kind, usize),
    epoch: Instant,
) -> anyhow::Result<Vec<u64>> {
    let mut per_channel = vec![0u64; channels];
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Replies (errors) and our own subscription are read and dropped concurrently.
    let (mut sink, mut stream) = ws.split();
    let drain = async {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Text(t) = msg
                && t.as_str().contains(r#""op":"error""#)
            {
                eprintln!("publisher {index}: {t}");
            }
        }
    };
    let send = async {
        loop {
            tick.tick().await;
            let elapsed = started.elapsed().min(duration);
            let due = (elapsed.as_secs_f64() * rate) as u64;
            while sent < due {
                let k = (sent as usize + index) % channels;
                let t = epoch.elapsed().as_nanos() as u64;
                let data = payload::data(kind, t, sent, size);
                let frame = format!(r#"{{"op":"pub","ch":"bench-{k}","data":{data}}}"#);
                sink.feed(Message::text(frame)).await?;
                per_channel[k] += 1;
                sent += 1;
            }
            sink.flush().await?;
            if elapsed >= duration {
                return anyhow::Ok(());
            }
        }
    };
    tokio::select! {
        result = send => result?,
        _ = drain => anyhow::bail!("publisher {index} disconnected"),
    }
    Ok(per_channel)
}

/// Messages timed with one clock read, at most: processing them takes a few µs.
const BATCH_CLOCK: u32 = 32;

/// Reads deliveries until `stop`, recording end-to-end latency from the payload's
/// send timestamp.
///
/// The messages one socket read brought are taken together, with one clock read
/// and one count for all of them: they arrived at the same moment, and at a
/// million deliveries a second the generator's own cost per message decides
/// whether it, rather than the nodes, sets the latency it reports.
async fn subscribe(
    mut ws: Ws,
    epoch: Instant,
    received: Arc<AtomicU64>,
    timed_from: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Seen {
    use futures_util::FutureExt;

    let mut seen = Seen {
        latencies_us: Vec::new(),
        delivered: 0,
    };
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            msg = ws.next() => msg,
        };
        let mut now = epoch.elapsed().as_nanos() as u64;
        let before = seen.delivered;
        let timed_from = timed_from.load(Ordering::Relaxed);
        let mut next = Some(first);
        let mut open = true;
        let mut taken = 0u32;
        while let Some(msg) = next.take() {
            match msg {
                Some(Ok(Message::Text(text))) => seen.record(text.as_str(), now, timed_from),
                Some(Ok(_)) => {}
                _ => {
                    open = false;
                    break;
                }
            }
            // Ready without waiting: read already, or readable at once. The clock
            // is read again every so often, so that a socket that never runs dry
            // does not make latencies look shorter than they were.
            next = ws.next().now_or_never();
            taken += 1;
            if taken.is_multiple_of(BATCH_CLOCK) {
                now = epoch.elapsed().as_nanos() as u64;
            }
        }
        received.fetch_add(seen.delivered - before, Ordering::Relaxed);
        if !open {
            break;
        }
    }
    seen
}

impl Seen {
    /// Counts one delivered frame (with its latency, when it carries the send
    /// timestamp and was sent at `timed_from` or later) received at `now`; other
    /// frames (acks) are not deliveries.
    fn record(&mut self, text: &str, now: u64, timed_from: u64) {
        if let Some(sent_at) = timestamp(text) {
            if sent_at >= timed_from {
                let us = now.saturating_sub(sent_at) / 1000;
                self.latencies_us.push(us.min(u64::from(u32::MAX)) as u32);
            }
        } else if text != wire::UNSAMPLED {
            return;
        }
        self.delivered += 1;
    }
}

/// The `t` of a delivered bench payload, without a JSON parse: the payload is
/// the frame's first object inside it (`{"op":"msg","ch":"bench-0","data":{"t":..`;
/// bench channel names hold no brace). A search for one byte, not a substring
/// search, which would set up a searcher for every message.
fn timestamp(frame: &str) -> Option<u64> {
    let inner = frame.get(1..)?;
    let rest = inner[inner.find('{')? + 1..].strip_prefix(r#""t":"#)?;
    let end = rest.find(',')?;
    rest[..end].parse().ok()
}

/// Each shard's Redis CPU so far, for a spawned cluster.
async fn redis_cpu_times(cluster: Option<&Cluster>) -> Option<Vec<Duration>> {
    match cluster {
        Some(cluster) => Some(cluster.redis_cpu_times().await),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_timestamp() {
        let frame = r#"{"op":"msg","ch":"bench-0","data":{"t":12345,"s":1,"p":"xx"}}"#;
        assert_eq!(super::timestamp(frame), Some(12345));
        assert_eq!(super::timestamp(r#"{"op":"ack","id":1}"#), None);
    }
}
