//! `--spawn-cluster N`: private redis-servers (`--shards`, one by default) and N
//! release nodes on free loopback ports, optionally pinned to CPUs, stopped when the
//! run ends.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Target, procstat};

pub(crate) struct Cluster {
    /// Each shard's redis-server and port, in `--redis-url` order.
    redis: Vec<(Child, u16)>,
    nodes: Vec<(Child, u16)>,
}

impl Cluster {
    pub(crate) async fn start(n: usize, target: &Target) -> anyhow::Result<Cluster> {
        anyhow::ensure!(n >= 1, "--spawn-cluster needs at least one node");
        let node_binary = std::env::current_exe()?.with_file_name("wsrelay");
        anyhow::ensure!(
            node_binary.exists(),
            "{} not found: build it first (cargo build --release)",
            node_binary.display()
        );
        let pinned = |program: &str| match &target.pin_servers {
            Some(cpus) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", cpus, program]);
                cmd
            }
            None => Command::new(program),
        };

        anyhow::ensure!(target.shards >= 1, "--shards needs at least one");
        let mut cluster = Cluster {
            redis: Vec::new(),
            nodes: Vec::new(),
        };
        for _ in 0..target.shards {
            let port = free_port()?;
            let redis = pinned("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start redis-server: {e}"))?;
            cluster.redis.push((redis, port));
        }
        // Nodes start fine without Redis, but then log reconnect attempts: wait for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        for (_, port) in &cluster.redis {
            while tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_err()
            {
                anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let redis_urls = cluster
            .redis
            .iter()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let otel_env = match target.otel_ratio {
            Some(ratio) => {
                anyhow::ensure!(
                    (0.0..=1.0).contains(&ratio),
                    "--otel-ratio must be between 0 and 1"
                );
                let sink = start_otlp_sink().await?;
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{sink}")),
                    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
                    ("OTEL_TRACES_SAMPLER_ARG", ratio.to_string()),
                ]
            }
            None => Vec::new(),
        };
        let mut proxy_args = Vec::new();
        if target.publish_backend {
            let backend = start_publish_backend().await?;
            proxy_args = vec![
                "--proxy-publish-url".to_owned(),
                format!("http://{backend}/publish"),
                "--proxy-publish".to_owned(),
            ];
        }
        for i in 0..n {
            let port = free_port()?;
            let child = pinned(node_binary.to_str().expect("UTF-8 path"))
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--redis-url", &redis_urls])
                .args(["--node-id", &format!("bench-{}", i + 1)])
                // A benchmark publisher sends far above the per-connection default
                // (100/s); --node-arg flags come later and win.
                .args(["--publish-rate", "100000000", "--publish-burst", "10000000"])
                .args(["--history-size", &target.history.to_string()])
                .args(&proxy_args)
                .args(&target.node_args)
                .env("RUST_LOG", "warn")
                .envs(otel_env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .spawn()?;
            cluster.nodes.push((child, port));
        }
        for (_, port) in &cluster.nodes {
            wait_ready(*port).await?;
        }
        Ok(cluster)
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, port)| format!("ws://127.0.0.1:{port}/ws"))
            .collect()
    }

    fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.redis
            .iter()
            .chain(&self.nodes)
            .map(|(child, _)| child.id())
    }

    /// CPU time of each shard's redis-server so far, in `--redis-url` order: from
    /// its own `INFO cpu`, in microseconds, because /proc counts in clock ticks of
    /// 10 ms, about the size of the difference between one shard and three in a
    /// 5-second run; from /proc if INFO does not answer.
    pub(crate) async fn redis_cpu_times(&self) -> Vec<Duration> {
        let mut times = Vec::with_capacity(self.redis.len());
        for (child, port) in &self.redis {
            let reported = info(*port, "cpu").await.ok().and_then(|text| {
                let field = |name: &str| -> Option<f64> {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .and_then(|v| v.trim().parse().ok())
                };
                Some(Duration::from_secs_f64(
                    field("used_cpu_sys")? + field("used_cpu_user")?,
                ))
            });
            times.push(reported.unwrap_or_else(|| procstat::cpu_time(child.id())));
        }
        times
    }

    /// CPU time of the nodes alone so far (Redis not included).
    pub(crate) fn node_cpu_time(&self) -> Duration {
        self.nodes
            .iter()
            .map(|(child, _)| procstat::cpu_time(child.id()))
            .sum()
    }

    /// Commands Redis has processed so far (`INFO stats`), all shards together.
    pub(crate) async fn redis_commands(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for (_, port) in &self.redis {
            total += redis_commands(*port).await?;
        }
        Ok(total)
    }

    /// CPU time of every server process (nodes and Redis) so far.
    pub(crate) fn cpu_time(&self) -> Duration {
        self.pids().map(procstat::cpu_time).sum()
    }

    /// Resident memory of every server process, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        self.pids().map(procstat::rss_kib).sum()
    }

    pub(crate) async fn stop(self) {
        drop(self);
    }
}

impl Drop for Cluster {
    /// Whatever happened to the run, nothing it started outlives it.
    fn drop(&mut self) {
        for (child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (redis, _) in &mut self.redis {
            let _ = redis.kill();
            let _ = redis.wait();
        }
    }
}

/// An OTLP/HTTP endpoint that accepts span exports and discards them, so a traced
/// run measures the relay's cost of tracing, not a collector's.
async fn start_otlp_sink() -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|_body: axum::body::Bytes| async {
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// An application backend whose publish proxy allows every message as sent (it
/// reads the call's body, as a real one would), so a run with `--publish-backend`
/// measures what the proxy costs the relay and adds to a message's latency.
async fn start_publish_backend() -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/publish",
        axum::routing::post(|body: axum::body::Bytes| async move {
            let _ = std::hint::black_box(body);
            ([("content-type", "application/json")], r#"{"result":{}}"#)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if readyz(port).await.unwrap_or(false) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "node on port {port} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(port: u16) -> anyhow::Result<bool> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    Ok(response.starts_with(b"HTTP/1.1 200"))
}

/// Commands one redis-server has processed so far (`INFO stats`).
async fn redis_commands(port: u16) -> anyhow::Result<u64> {
    let text = info(port, "stats").await?;
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .ok_or_else(|| anyhow::anyhow!("no total_commands_processed in INFO stats"))?;
    Ok(count.trim().parse()?)
}

/// One section of a Redis server's `INFO`, on a connection of its own.
async fn info(port: u16, section: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("INFO {section}\r\n").as_bytes())
        .await?;
    // The reply is one bulk string: `$<length>\r\n`, the text, `\r\n`.
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "Redis closed the connection");
        reply.extend_from_slice(&buf[..n]);
        let Some(head_end) = reply.windows(2).position(|w| w == b"\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&reply[..head_end])?;
        let length: usize = head
            .strip_prefix('$')
            .ok_or_else(|| anyhow::anyhow!("INFO answered {head:?}"))?
            .parse()?;
        let body = head_end + 2;
        if reply.len() >= body + length {
            return Ok(String::from_utf8_lossy(&reply[body..body + length]).into_owned());
        }
    }
}
