//! The `sweep` mode: `fanout` at a list of offered rates for one or more
//! configurations, written as a JSON file of every point and an SVG chart
//! (`chart`) of delivered rate and p99 latency against the offered rate.
//!
//! Each point is a fresh cluster: a point past saturation leaves queues full and
//! deliveries in flight (and, with history, longer streams), which a shared cluster
//! would carry into the next point, so the figures would depend on the order of the
//! points. A fresh one makes each point the same run as the `fanout` command it
//! stands for, for ~1 s of start-up and connecting. The configurations take turns at
//! each rate (rate 1: A, B; rate 2: A, B; …), as runs compared on this shared
//! machine always are, so a slow spell of the machine falls on all of them alike.
//!
//! The machine may be shared: each point also records the CPU that processes other
//! than the cluster and the load generator used meanwhile (from /proc/stat), and a
//! point where that was more than a trace is flagged as suspect.
//!
//! The files are written again after every point: a sweep cut short keeps what it
//! measured, and the chart fills in while it runs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::chart;
use crate::cluster::Cluster;
use crate::fanout::{self, FanoutArgs, Shape};
use crate::{Target, procstat};

#[derive(Debug, Args)]
pub(crate) struct SweepArgs {
    /// Offered rates in deliveries/s (suffixes `k` and `M`), comma-separated. Each is
    /// published at rate × channels ÷ subscribers messages/s, rounded.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_rate,
        default_value = "100k,250k,500k,750k,1M"
    )]
    rates: Vec<f64>,
    /// A configuration, `NAME=FLAGS`: global flags of this load generator (split at
    /// white space, no quoting) added to the command line for its points, e.g.
    /// `--config "history=--history 1000"` or `--config default=`. Repeatable, one
    /// series each; none: one configuration, `default`, as the command line is.
    /// Pinning of the load generator (`--pin-client`) holds for the whole sweep.
    #[arg(long = "config", value_parser = parse_config)]
    configs: Vec<Config>,
    /// Writes PATH.json (every point, with each run's full `fanout` report) and
    /// PATH.svg (the chart).
    #[arg(long, default_value = "sweep")]
    out: PathBuf,
    /// Runs nothing: draws PATH.svg again from the points in PATH.json.
    #[arg(long)]
    replot: bool,
    /// Pause between points, for the sockets of the last cluster to close.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    settle: Duration,
    #[command(flatten)]
    shape: Shape,
}

impl SweepArgs {
    /// The configurations, `default` with no flags if none was given.
    pub(crate) fn configs(&self) -> Vec<Config> {
        if self.configs.is_empty() {
            vec![Config {
                name: "default".to_owned(),
                flags: Vec::new(),
            }]
        } else {
            self.configs.clone()
        }
    }
}

/// A named set of extra global flags: one series of the chart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) flags: Vec<String>,
}

/// What the JSON file holds: enough to draw the chart again and to read each point
/// as the `fanout` run it was.
#[derive(Debug, Serialize, Deserialize)]
struct Sweep {
    title: String,
    /// The run's shape, as the chart's subtitle says it.
    subtitle: String,
    /// The command line of the sweep.
    command: Vec<String>,
    /// In legend order.
    configs: Vec<Config>,
    points: Vec<SweepPoint>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SweepPoint {
    config: String,
    /// The publishers' paced rate, messages/s.
    rate_msgs_per_s: u64,
    /// That rate times the subscribers a message goes to.
    offered_deliveries_per_s: f64,
    /// Deliveries over the publishing time plus the drain (`fanout`'s figure).
    delivered_deliveries_per_s: f64,
    /// Deliveries expected and not seen by the end of the drain: lost or late.
    lost: u64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    /// Nodes and Redis together.
    server_cpu_s_per_million_deliveries: Option<f64>,
    /// The load generator's own CPU: near one core (1 s a second), it is the
    /// bottleneck rather than the servers.
    loadgen_cpu_s: f64,
    /// CPU the machine spent on processes other than the cluster and the load
    /// generator during the point, in cores (0 to the number of CPUs): a machine
    /// shared with other work distorts the point. Not in files of older sweeps.
    #[serde(default)]
    other_cores: Option<f64>,
    /// The whole JSON line `fanout` printed for this point.
    report: serde_json::Value,
}

pub(crate) async fn run(args: &SweepArgs, configs: Vec<(Config, Target)>) -> anyhow::Result<()> {
    let json_path = with_suffix(&args.out, "json");
    let svg_path = with_suffix(&args.out, "svg");
    if args.replot {
        let text = std::fs::read_to_string(&json_path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", json_path.display()))?;
        let sweep: Sweep = serde_json::from_str(&text)?;
        std::fs::write(&svg_path, draw(&sweep))?;
        eprintln!(
            "sweep: drew {} from {}",
            svg_path.display(),
            json_path.display()
        );
        return Ok(());
    }
    anyhow::ensure!(!args.rates.is_empty(), "--rates needs at least one rate");
    let shape = &args.shape;
    anyhow::ensure!(
        shape.channels >= 1 && shape.subscribers >= shape.channels,
        "a sweep needs at least one subscriber on every channel"
    );
    for (i, (config, target)) in configs.iter().enumerate() {
        anyhow::ensure!(
            target.spawn_cluster.is_some(),
            "a sweep starts a cluster for each point: give --spawn-cluster N (config {})",
            config.name
        );
        anyhow::ensure!(
            configs[..i].iter().all(|(c, _)| c.name != config.name),
            "two configurations named {}",
            config.name
        );
    }
    // Deliveries per published message: subscribers of its channel, and publishers
    // go round-robin over the channels.
    let fan = shape.subscribers as f64 / shape.channels as f64;
    let rates: Vec<u64> = args
        .rates
        .iter()
        .map(|&offered| ((offered / fan).round() as u64).max(1))
        .collect();

    let mut sweep = Sweep {
        title: "wsrelay fan-out: delivered rate and p99 latency against the offered rate"
            .to_owned(),
        subtitle: subtitle(shape, &configs[0].1),
        command: std::env::args().collect(),
        configs: configs.iter().map(|(c, _)| c.clone()).collect(),
        points: Vec::new(),
    };
    if let Some(dir) = json_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let total = rates.len() * configs.len();
    let started = Instant::now();
    for &rate in &rates {
        for (config, target) in &configs {
            if !sweep.points.is_empty() {
                tokio::time::sleep(args.settle).await;
            }
            let offered = rate as f64 * fan;
            eprintln!(
                "sweep {}/{total}: {} at {} deliveries/s offered ({rate} msgs/s)",
                sweep.points.len() + 1,
                config.name,
                chart::si(offered),
            );
            let fanout_args = FanoutArgs {
                shape: shape.clone(),
                rate,
                recover: 0,
            };
            let n = target.spawn_cluster.expect("checked above");
            let cluster = Cluster::start(n, target).await?;
            let busy_before = Busy::now(&cluster);
            let report = fanout::run(&fanout_args, target, &cluster.urls(), Some(&cluster)).await;
            let other_cores = Busy::now(&cluster).others_since(&busy_before);
            cluster.stop().await;
            let mut point = SweepPoint::read(&config.name, rate, offered, report?)?;
            point.other_cores = Some(other_cores);
            eprintln!(
                "sweep {}/{total}: {} at {}: {} delivered/s, {} lost or late, p50 {} ms, p99 {} ms, {} server CPU-s per million; other processes {other_cores:.2} cores{}",
                sweep.points.len() + 1,
                config.name,
                chart::si(offered),
                chart::si(point.delivered_deliveries_per_s.round()),
                point.lost,
                round3(point.latency_p50_ms),
                round3(point.latency_p99_ms),
                point
                    .server_cpu_s_per_million_deliveries
                    .map_or("-".to_owned(), |c| format!("{c:.2}")),
                if other_cores > BUSY_ELSEWHERE {
                    " (busy machine: this point is suspect)"
                } else {
                    ""
                },
            );
            sweep.points.push(point);
            std::fs::write(&json_path, serde_json::to_string_pretty(&sweep)? + "\n")?;
            std::fs::write(&svg_path, draw(&sweep))?;
        }
    }
    eprintln!();
    eprintln!(
        "sweep: {} points in {:.0} s; wrote {} and {}",
        sweep.points.len(),
        started.elapsed().as_secs_f64(),
        json_path.display(),
        svg_path.display()
    );
    eprintln!(
        "  {:<16} {:>9} {:>10} {:>11} {:>10} {:>10} {:>12}",
        "config", "offered", "delivered", "lost/late", "p50 ms", "p99 ms", "CPU-s per M"
    );
    for p in &sweep.points {
        eprintln!(
            "  {:<16} {:>9} {:>10} {:>11} {:>10} {:>10} {:>12}",
            p.config,
            chart::si(p.offered_deliveries_per_s),
            chart::si(p.delivered_deliveries_per_s.round()),
            p.lost,
            round3(p.latency_p50_ms),
            round3(p.latency_p99_ms),
            p.server_cpu_s_per_million_deliveries
                .map_or("-".to_owned(), |c| format!("{c:.2}")),
        );
    }
    // One JSON line on stdout, as every mode prints: the points without the full
    // reports, which are in the file.
    let summary: Vec<serde_json::Value> = sweep
        .points
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(p).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("report");
            }
            v
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "mode": "sweep",
            "json": json_path,
            "svg": svg_path,
            "configs": sweep.configs,
            "points": summary,
        })
    );
    Ok(())
}

impl SweepPoint {
    /// The figures of one point out of `fanout`'s report.
    fn read(
        config: &str,
        rate: u64,
        offered: f64,
        report: serde_json::Value,
    ) -> anyhow::Result<SweepPoint> {
        let number = |v: &serde_json::Value, what: &str| {
            v.as_f64()
                .ok_or_else(|| anyhow::anyhow!("no {what} in the fanout report"))
        };
        Ok(SweepPoint {
            config: config.to_owned(),
            rate_msgs_per_s: rate,
            offered_deliveries_per_s: offered,
            delivered_deliveries_per_s: number(&report["deliveries_per_s"], "deliveries_per_s")?,
            lost: report["lost"].as_u64().unwrap_or(0),
            latency_p50_ms: number(&report["latency_ms"]["p50"], "p50")?,
            latency_p99_ms: number(&report["latency_ms"]["p99"], "p99")?,
            server_cpu_s_per_million_deliveries: report["server_cpu_s_per_million_deliveries"]
                .as_f64(),
            loadgen_cpu_s: number(&report["loadgen_cpu_s"], "loadgen_cpu_s")?,
            other_cores: None,
            report,
        })
    }
}

/// Cores of other work above which a point is flagged: more than the small
/// change /proc/stat's tick-based counts leave between the machine's busy time and
/// that of our own processes.
const BUSY_ELSEWHERE: f64 = 0.1;

/// CPU time used so far by the machine and by the processes of a point.
struct Busy {
    at: Instant,
    machine: Duration,
    ours: Duration,
}

impl Busy {
    fn now(cluster: &Cluster) -> Busy {
        Busy {
            at: Instant::now(),
            machine: procstat::machine_cpu_time(),
            ours: cluster.cpu_time() + procstat::own_cpu_time(),
        }
    }

    /// Cores the rest of the machine kept busy between `before` and now.
    fn others_since(&self, before: &Busy) -> f64 {
        let machine = self.machine.saturating_sub(before.machine);
        let ours = self.ours.saturating_sub(before.ours);
        machine.saturating_sub(ours).as_secs_f64()
            / self.at.duration_since(before.at).as_secs_f64().max(1e-3)
    }
}

/// The chart of a sweep: one series per configuration, in the order given.
fn draw(sweep: &Sweep) -> String {
    let series: Vec<chart::Series> = sweep
        .configs
        .iter()
        .map(|config| chart::Series {
            name: config.name.clone(),
            points: sweep
                .points
                .iter()
                .filter(|p| p.config == config.name)
                .map(|p| chart::Point {
                    offered: p.offered_deliveries_per_s,
                    delivered: p.delivered_deliveries_per_s,
                    // No delivery, no latency: a histogram's 0 is not a measurement.
                    p99_ms: if p.report["delivered"].as_u64() == Some(0) {
                        f64::NAN
                    } else {
                        p.latency_p99_ms
                    },
                })
                .collect(),
        })
        .collect();
    chart::render(&sweep.title, &sweep.subtitle, &series)
}

/// The run's shape in one line, from the sweep's arguments and the first
/// configuration's cluster.
fn subtitle(shape: &Shape, target: &Target) -> String {
    let nodes = target.spawn_cluster.unwrap_or(0);
    let mut parts = vec![format!(
        "{} node{}",
        nodes,
        if nodes == 1 { "" } else { "s" }
    )];
    if let Some(cpus) = &target.pin_servers {
        parts[0] = format!("{} + Redis on CPU {cpus}", parts[0]);
    }
    if let Some(cpus) = &target.pin_client {
        parts.push(format!("load generator on CPU {cpus}"));
    }
    parts.push(format!(
        "{} subscribers",
        thousands(shape.subscribers as u64)
    ));
    if shape.channels > 1 {
        parts.push(format!("{} channels", shape.channels));
    }
    parts.push(format!(
        "{} publisher{}",
        shape.publishers,
        if shape.publishers == 1 { "" } else { "s" }
    ));
    parts.push(format!("{} B messages", shape.size));
    parts.push(format!("{} s per point", shape.duration));
    parts.join(", ")
}

/// `1000` → `1,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn round3(v: f64) -> String {
    format!("{:.3}", v)
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned()
}

/// `docs/bench/sweep` → `docs/bench/sweep.json` (added, never replacing a dot in
/// the name).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

/// `250k` → 250,000; `1.5M` → 1,500,000; a plain number as it is.
fn parse_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let (digits, factor) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 1e3),
        Some((i, 'M' | 'm')) => (&text[..i], 1e6),
        _ => (text, 1.0),
    };
    match digits.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v * factor),
        _ => Err(format!(
            "{text:?} is not a rate in deliveries/s (e.g. 250k, 1M)"
        )),
    }
}

/// `NAME=FLAGS`.
fn parse_config(text: &str) -> Result<Config, String> {
    let Some((name, flags)) = text.split_once('=') else {
        return Err(format!(
            "{text:?}: expected NAME=FLAGS, e.g. \"history=--history 1000\" or default="
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{text:?}: the configuration needs a name"));
    }
    Ok(Config {
        name: name.to_owned(),
        flags: flags.split_whitespace().map(str::to_owned).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates_and_configs() {
        assert_eq!(parse_rate("250k"), Ok(250e3));
        assert_eq!(parse_rate("1.5M"), Ok(1.5e6));
        assert_eq!(parse_rate("100000"), Ok(100e3));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert_eq!(
            parse_config("history=--history 1000 --node-arg=--compression=off"),
            Ok(Config {
                name: "history".to_owned(),
                flags: vec![
                    "--history".to_owned(),
                    "1000".to_owned(),
                    "--node-arg=--compression=off".to_owned()
                ],
            })
        );
        assert_eq!(
            parse_config("default=").unwrap().flags,
            Vec::<String>::new()
        );
        assert!(parse_config("history").is_err());
        assert!(parse_config("=--history 1").is_err());
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(
            with_suffix(Path::new("docs/bench/sweep"), "svg"),
            PathBuf::from("docs/bench/sweep.svg")
        );
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(thousands(999), "999");
        assert_eq!(round3(12.5), "12.5");
    }
}
