//! Test harness: a real `redis-server` on a free loopback port, real nodes on port 0
//! (in-process, or as the real binary), and real WebSocket clients. Every wait has a
//! timeout; nothing here sleeps to synchronise.

// Each test binary uses a different part of the harness, as a private module.
#![allow(dead_code, unreachable_pub)]

pub mod checker;
pub mod raw;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use wsrelay::{Config, Node, NodeHandle};

/// Writes `text` to a new `--config` file and returns its path. One file per call:
/// tests run in parallel, and a file being rewritten can be read empty.
pub fn config_file(text: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("wsrelay-test-{}-{call}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Default bound of every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A free loopback port for a server a test starts by port number (Redis, nginx, a
/// node process restarted on the same port).
///
/// Below the kernel's ephemeral range on purpose: a port from that range, once
/// released, can become the source port of any outgoing connection (the nodes' own
/// Redis connections included), or stay held by such a connection in TIME_WAIT, and
/// the server's `bind` then fails. Ports are handed out in turn from a per-process
/// start, and each is checked by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    let high: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|&p| p > LOW + 1_000)
        .unwrap_or(32_768);
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = high - LOW;
    // Test binaries run one after another, but other processes may hold ports: start
    // each process somewhere else in the range.
    let start = std::process::id() * 7_919 % span;
    for _ in 0..span {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{high}");
}

/// A `redis-server` child process owned by the test; killed on drop.
pub struct RedisServer {
    pub port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_on(free_port()).await
    }

    pub async fn start_on(port: u16) -> RedisServer {
        RedisServer::start_with(port, &[]).await
    }

    /// Starts a server on `port` with extra `redis-server` arguments.
    pub async fn start_with(port: u16, args: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            // A directory of its own: a master writes an RDB file there to sync a
            // replica, which a later server must never load.
            .arg("--dir")
            .arg(self.dir())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: run the README test command, which installs it");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut conn) = self.connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (created if missing), removed on drop.
    fn dir(&self) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "wsrelay-redis-{}-{}",
            std::process::id(),
            self.port
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timeout")))?
    }

    /// How many times the server ran `command` (lowercase, `INFO commandstats`)
    /// without an error: an `EVALSHA` answered `NOSCRIPT`, which the client then
    /// sends again, is not a read.
    pub async fn command_calls(&self, command: &str) -> u64 {
        let mut conn = self.connection().await.unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        let prefix = format!("cmdstat_{command}:");
        let Some(stats) = info.lines().find_map(|l| l.strip_prefix(prefix.as_str())) else {
            return 0;
        };
        let field = |name: &str| -> u64 {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                .unwrap_or(0)
        };
        field("calls") - field("failed_calls")
    }

    /// Subscriber count of a relay channel in Redis (PUBSUB NUMSUB of the prefixed name).
    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut conn = self.connection().await.unwrap();
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(format!("wsrelay:{channel}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        n
    }

    /// Waits until PUBSUB NUMSUB of `channel` equals `expected`.
    pub async fn wait_numsub(&self, channel: &str, expected: i64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.numsub(channel).await;
            if n == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "NUMSUB {channel} stayed {n}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the integer reply of `command` (e.g. `["HLEN", key]`) is `expected`.
    pub async fn wait_int(&self, command: &[&str], expected: i64) {
        let mut conn = self.connection().await.unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            let mut cmd = redis::cmd(command[0]);
            cmd.arg(&command[1..]);
            let got: i64 = cmd.query_async(&mut conn).await.unwrap();
            if got == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{command:?} stayed {got}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until this replica is in sync with its master (`master_link_status:up`).
    pub async fn wait_synced(&self) {
        eventually("the replica is in sync", 3 * WAIT, async || {
            // A new connection each time: a sentinel that reconfigures a server
            // kills its clients (CLIENT KILL TYPE normal).
            let Ok(mut conn) = self.connection().await else {
                return false;
            };
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            info.contains("master_link_status:up")
        })
        .await;
    }

    /// Sends a signal (`STOP`, `CONT`, …) to the server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Whether the process is running (not killed by the test).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(self.dir());
    }
}

/// A node running in-process on 127.0.0.1:0; shut down on drop.
pub struct TestNode {
    pub addr: SocketAddr,
    pub handle: NodeHandle,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestNode {
    /// Starts a node with the given extra flags.
    pub async fn start(args: &[&str]) -> TestNode {
        let mut argv = vec!["wsrelay", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let config = Config::load_from(argv).expect("valid test flags");
        let listener = wsrelay::bind(&config).unwrap();
        let addr = listener.local_addr().unwrap();
        let node = Node::new(config).expect("node starts");
        let handle = node.handle();
        let task = tokio::spawn(async move {
            node.serve(listener, std::future::pending())
                .await
                .expect("node serves");
        });
        TestNode {
            addr,
            handle,
            task: Some(task),
        }
    }

    /// Starts a node of the cluster served by `redis`.
    pub async fn with_redis(redis: &RedisServer, node_id: &str, extra: &[&str]) -> TestNode {
        let url = redis.url();
        let mut args = vec!["--redis-url", url.as_str(), "--node-id", node_id];
        args.extend_from_slice(extra);
        let node = TestNode::start(&args).await;
        node.wait_ready().await;
        node
    }

    /// Waits until the node is ready and every Redis shard is usable: with
    /// `--ready-requires any-shard` (the default) one shard is enough for
    /// readiness, and tests expect every channel to work.
    pub async fn wait_ready(&self) {
        wait_until("node ready with every shard usable", || {
            self.handle.is_ready() && self.handle.all_shards_usable()
        })
        .await;
    }

    pub fn ws_url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("ws://{}/ws", self.addr)
        } else {
            format!("ws://{}/ws?{}", self.addr, query)
        }
    }

    /// Connects a client (query: e.g. `channel=a&channel=b`) and waits for `welcome`.
    pub async fn client(&self, query: &str) -> Client {
        Client::connect(&self.ws_url(query)).await
    }

    /// Waits until the registry is empty again.
    pub async fn wait_registry_empty(&self) {
        wait_until("registry empty", || {
            let s = self.handle.stats();
            s.connections == 0 && s.subscriptions == 0 && s.channels == 0
        })
        .await;
    }

    /// Drains the node and waits for it to stop.
    pub async fn stop(mut self) {
        self.handle.shutdown();
        if let Some(task) = self.task.take() {
            timeout(WAIT, task)
                .await
                .expect("node stops in time")
                .unwrap();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Polls a condition that has no event to await (e.g. a counter in another task).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol v1 client over a real WebSocket.
pub struct Client {
    pub ws: Ws,
    pub welcome: Value,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = timeout(WAIT, connect_async(url))
            .await
            .expect("connect in time")
            .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        let welcome = client.recv().await;
        assert_eq!(
            welcome["op"], "welcome",
            "first frame is welcome: {welcome}"
        );
        client.welcome = welcome;
        client
    }

    /// Connects over a socket that resets (RST) instead of closing when dropped: an
    /// abrupt disconnect, as when a phone loses its network.
    pub async fn connect_abortable(url: &str) -> Client {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        stream.set_zero_linger().unwrap();
        let (ws, _) = timeout(
            WAIT,
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        let welcome = client.recv().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        client.welcome = welcome;
        client
    }

    /// The next protocol frame if one arrives within `limit`.
    pub async fn try_recv(&mut self, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let msg = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.ws.next(),
            )
            .await
            .ok()?
            .expect("connection open")
            .expect("frame");
            if let Message::Text(text) = msg {
                return Some(serde_json::from_str(&text).expect("JSON frame"));
            }
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        timeout(WAIT, self.ws.send(Message::text(text)))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// The next protocol frame (control frames are skipped).
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .expect("frame");
            match msg {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
                Message::Close(frame) => panic!("unexpected close: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Receives `n` `msg` frames, skipping acks.
    pub async fn recv_msgs(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let frame = self.recv().await;
            match frame["op"].as_str() {
                Some("msg") => out.push(frame),
                Some("ack") => {}
                _ => panic!("unexpected frame: {frame}"),
            }
        }
        out
    }

    /// Sends a request with an id and returns its ack or error, keeping any `msg`
    /// frames that arrive meanwhile in `stash`.
    pub async fn request(&mut self, mut frame: Value, id: u64, stash: &mut Vec<Value>) -> Value {
        frame["id"] = json!(id);
        self.send(frame).await;
        loop {
            let reply = self.recv().await;
            if reply["id"] == json!(id) {
                return reply;
            }
            stash.push(reply);
        }
    }

    pub async fn sub(&mut self, ch: &str, id: u64) -> Value {
        let mut stash = Vec::new();
        let reply = self
            .request(json!({"op":"sub","ch":ch}), id, &mut stash)
            .await;
        assert!(
            stash.is_empty(),
            "unexpected frames before sub reply: {stash:?}"
        );
        reply
    }

    /// Sends a binary frame (which the protocol forbids).
    pub async fn ws_send_binary(&mut self) {
        self.ws
            .send(Message::binary(vec![0u8, 1, 2]))
            .await
            .unwrap();
    }

    /// Reads until the server closes; returns the close code (None: no close frame).
    pub async fn expect_close(&mut self) -> Option<u16> {
        loop {
            let next = timeout(WAIT, self.ws.next()).await.expect("close in time");
            match next {
                Some(Ok(Message::Close(frame))) => return frame.map(|f: CloseFrame| f.code.into()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// A minimal HTTP/1.1 GET over loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status line");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A TCP proxy on loopback that delays every byte by `delay` in each direction, to
/// make a node's link to Redis slow without touching Redis itself.
pub struct LatencyProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    pub async fn start(upstream_port: u16, delay: Duration) -> LatencyProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(delayed_copy(cr, uw, delay));
                tokio::spawn(delayed_copy(ur, cw, delay));
            }
        });
        LatencyProxy { port, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Bounded: a proxy for tests, carrying little traffic.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// The value of one sample in Prometheus text (`name` includes any labels, exactly
/// as rendered, e.g. `wsrelay_client_closes_total{reason="slow_consumer"}`); 0 when
/// the sample is absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == name).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Scrapes `/metrics` of a node.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The real `wsrelay` binary as a child process on port 0; killed on drop.
pub struct NodeProcess {
    pub addr: SocketAddr,
    child: Child,
    /// Every line the node wrote to stderr (its logs).
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl NodeProcess {
    pub fn spawn(args: &[&str]) -> NodeProcess {
        NodeProcess::spawn_with_env(args, &[])
    }

    /// Starts the binary with extra environment variables.
    pub fn spawn_with_env(args: &[&str], env: &[(&str, &str)]) -> NodeProcess {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        let kept = logs.clone();
        // Keeps reading so the node never blocks on a full stderr pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let text = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .map(str::to_owned)
                        .or_else(|| {
                            // JSON logs: "addr":"127.0.0.1:PORT"
                            let at = line.find(r#""addr":""#)? + 8;
                            line[at..].split('"').next().map(str::to_owned)
                        });
                    let _ = tx.send(text.and_then(|a| a.parse().ok()));
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(WAIT)
            .expect("node logs its address")
            .expect("addr= field");
        NodeProcess { addr, child, logs }
    }

    /// Waits for a log line matching `pred`.
    pub async fn wait_log(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.logs.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no log line: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{}", self.addr, query)
    }

    pub async fn client(&self, query: &str) -> Client {
        Client::connect(&self.ws_url(query)).await
    }

    /// Waits until `/readyz` answers 200 with no shard down (see
    /// [`TestNode::wait_ready`]).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = http_get(self.addr, "/readyz").await;
            if status == 200 && !body.contains(r#""state":"down""#) {
                return;
            }
            assert!(Instant::now() < deadline, "node {} not ready", self.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        scrape(self.addr).await
    }

    /// Waits until the node reports no connections, subscriptions or channels.
    pub async fn wait_registry_empty(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            let sizes: Vec<f64> = [
                "wsrelay_connections",
                "wsrelay_subscriptions",
                "wsrelay_channels",
            ]
            .iter()
            .map(|m| metric(&text, m))
            .collect();
            if sizes.iter().all(|v| *v == 0.0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "registry of {} not empty: {sizes:?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: peak).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; kills it and fails past `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request over loopback: (status, body).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let (status, _head, body) = http_exchange(addr, method, path, headers, body).await;
    (status, body)
}

/// [`http_request`], also returning the response's head (status line and
/// headers, e.g. to read a `Set-Cookie`): (status, head, body).
pub async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = timeout(WAIT, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (413) and close before reading a large body.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("response in time");
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("HTTP status line in {response:?}"));
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_owned(), body.to_owned())
}

/// Opens a WebSocket with extra request headers; returns the HTTP status when the
/// server refuses the upgrade, or the client after `welcome`.
pub async fn connect_with_headers(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Client, (u16, String)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match timeout(WAIT, connect_async(request))
        .await
        .expect("connect in time")
    {
        Ok((ws, _)) => {
            let mut client = Client {
                ws,
                welcome: Value::Null,
            };
            client.welcome = client.recv().await;
            assert_eq!(client.welcome["op"], "welcome");
            Ok(client)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((status, body))
        }
        Err(e) => panic!("connect to {url}: {e}"),
    }
}

/// Nodes of one test topology, so one suite runs on each: a single node on the
/// memory broker, several nodes on one real Redis, or several nodes on several
/// Redis shards. `node(i)` wraps around, so a test written for three nodes runs
/// unchanged on one.
pub struct Topology {
    /// The Redis servers, in `--redis-url` order (empty: the memory broker or a
    /// Redis Cluster).
    pub redis: Vec<RedisServer>,
    /// The Redis Cluster, if the nodes use one.
    pub cluster: Option<RedisCluster>,
    /// The Sentinel group, if the nodes use one.
    pub sentinel: Option<SentinelGroup>,
    pub nodes: Vec<TestNode>,
}

impl Topology {
    /// One node with the in-process broker.
    pub async fn memory(args: &[&str]) -> Topology {
        let node = TestNode::start(args).await;
        node.wait_ready().await;
        Topology {
            redis: Vec::new(),
            cluster: None,
            sentinel: None,
            nodes: vec![node],
        }
    }

    /// `n` nodes (ids n1, n2, …) sharing one new `redis-server`.
    pub async fn redis(n: usize, args: &[&str]) -> Topology {
        Topology::sharded(1, n, args).await
    }

    /// `n` nodes (ids n1, n2, …) on `shards` new `redis-server`s, each a shard.
    pub async fn sharded(shards: usize, n: usize, args: &[&str]) -> Topology {
        let mut redis = Vec::with_capacity(shards);
        for _ in 0..shards {
            redis.push(RedisServer::start().await);
        }
        let urls: Vec<String> = redis.iter().map(RedisServer::url).collect();
        let nodes = start_nodes(n, ["--redis-url", &urls.join(",")], args).await;
        Topology {
            redis,
            cluster: None,
            sentinel: None,
            nodes,
        }
    }

    /// `n` nodes (ids n1, n2, …) on a new Sentinel group (a master, a replica and
    /// three sentinels).
    pub async fn sentinel(n: usize, args: &[&str]) -> Topology {
        let group = SentinelGroup::start().await;
        let nodes = start_nodes(n, ["--redis-url", &group.url()], args).await;
        Topology {
            redis: Vec::new(),
            cluster: None,
            sentinel: Some(group),
            nodes,
        }
    }

    /// `n` nodes (ids n1, n2, …) on a new Redis Cluster of three masters and three
    /// replicas, through sharded pub/sub.
    pub async fn cluster(n: usize, args: &[&str]) -> Topology {
        let cluster = RedisCluster::start(3).await;
        let nodes = start_nodes(n, ["--redis-cluster", &cluster.seeds()], args).await;
        Topology {
            redis: Vec::new(),
            cluster: Some(cluster),
            sentinel: None,
            nodes,
        }
    }

    pub fn node(&self, i: usize) -> &TestNode {
        &self.nodes[i % self.nodes.len()]
    }

    /// The Redis server that holds `channel`.
    pub fn redis_for(&self, channel: &str) -> &RedisServer {
        &self.redis[shard_of(channel, self.redis.len())]
    }

    /// The Redis server that holds `channel`, to kill or restart it.
    pub fn redis_for_mut(&mut self, channel: &str) -> &mut RedisServer {
        let shard = shard_of(channel, self.redis.len());
        &mut self.redis[shard]
    }

    pub fn name(&self) -> &'static str {
        match self.redis.len() {
            0 if self.cluster.is_some() => "cluster",
            0 if self.sentinel.is_some() => "sentinel",
            0 => "memory",
            1 => "redis",
            _ => "sharded",
        }
    }
}

/// `n` ready nodes (ids n1, n2, …) on the broker named by `broker` (a flag and its
/// value), with `args`.
async fn start_nodes(n: usize, broker: [&str; 2], args: &[&str]) -> Vec<TestNode> {
    let mut nodes = Vec::with_capacity(n);
    for i in 1..=n {
        let id = format!("n{i}");
        let mut all = vec![broker[0], broker[1], "--node-id", id.as_str()];
        all.extend_from_slice(args);
        let node = TestNode::start(&all).await;
        node.wait_ready().await;
        nodes.push(node);
    }
    nodes
}

/// The shard of `channel` among `shards`, computed here from the documented
/// algorithm (jump consistent hash of the channel name's 64-bit FNV-1a hash), not
/// with the relay's code, so a change of the mapping fails the tests.
pub fn shard_of(channel: &str, shards: usize) -> usize {
    let mut key: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in channel.bytes() {
        key = (key ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < shards as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * (2_147_483_648.0 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

/// The `offset` of each frame.
pub fn offsets(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| {
            f["offset"]
                .as_u64()
                .unwrap_or_else(|| panic!("no offset in {f}"))
        })
        .collect()
}

impl Client {
    /// `sub` with an optional `since` (epoch, offset): returns the frames that came
    /// before the ack (the recovered messages), and the ack.
    pub async fn sub_since(
        &mut self,
        ch: &str,
        since: Option<(&str, u64)>,
        id: u64,
    ) -> (Vec<Value>, Value) {
        let mut frame = json!({"op":"sub","ch":ch});
        if let Some((epoch, offset)) = since {
            frame["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let mut before = Vec::new();
        let ack = self.request(frame, id, &mut before).await;
        (before, ack)
    }

    /// Publishes with an id; returns the ack (frames meanwhile are dropped).
    pub async fn publish(&mut self, ch: &str, data: Value, id: u64) -> Value {
        let mut stash = Vec::new();
        self.request(json!({"op":"pub","ch":ch,"data":data}), id, &mut stash)
            .await
    }
}

/// A TCP proxy between a node and Redis that can turn *deaf*: it then drops the
/// RESP3 push frames (`>`, pub/sub messages) Redis sends, and forwards everything
/// else (replies to PING and other commands), so the node's subscriber connection
/// looks healthy while it receives nothing.
pub struct DeafProxy {
    pub port: u16,
    deaf: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl DeafProxy {
    pub async fn start(upstream_port: u16) -> DeafProxy {
        use std::sync::atomic::AtomicBool;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let deaf = std::sync::Arc::new(AtomicBool::new(false));
        let flag = deaf.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, uw) = upstream.into_split();
                let mut uw = uw;
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                });
                let flag = flag.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut pending: Vec<u8> = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        pending.extend_from_slice(&buf[..n]);
                        let mut out = Vec::new();
                        let mut at = 0;
                        while let Some(len) = resp_frame_len(&pending[at..]) {
                            let frame = &pending[at..at + len];
                            let drop =
                                frame[0] == b'>' && flag.load(std::sync::atomic::Ordering::Relaxed);
                            if !drop {
                                out.extend_from_slice(frame);
                            }
                            at += len;
                        }
                        pending.drain(..at);
                        if !out.is_empty() && cw.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        DeafProxy { port, deaf, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// From now on, pub/sub messages are dropped (or, with `false`, forwarded again).
    pub fn set_deaf(&self, deaf: bool) {
        self.deaf.store(deaf, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for DeafProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The length of the complete RESP2/RESP3 frame at the start of `buf`, if it is
/// all there.
fn resp_frame_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")?;
    let header = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match buf.first()? {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Some(after),
        b'$' | b'!' | b'=' => {
            let len: i64 = header.parse().ok()?;
            if len < 0 {
                return Some(after);
            }
            let end = after + len as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        kind @ (b'*' | b'~' | b'>' | b'%' | b'|') => {
            let n: i64 = header.parse().ok()?;
            if n < 0 {
                return Some(after);
            }
            let elements = if matches!(kind, b'%' | b'|') {
                2 * n
            } else {
                n
            };
            let mut at = after;
            for _ in 0..elements {
                at += resp_frame_len(&buf[at..])?;
            }
            Some(at)
        }
        _ => panic!("unexpected RESP type byte {:?}", buf[0] as char),
    }
}

/// A `redis-sentinel` process watching the master `mymaster`, with its own
/// (writable) configuration file; killed on drop. Quick to decide: a master is down
/// after 1 s without answers.
pub struct SentinelServer {
    pub port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl SentinelServer {
    pub async fn start(master_port: u16, quorum: u32) -> SentinelServer {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("wsrelay-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                 sentinel monitor mymaster 127.0.0.1 {master_port} {quorum}\n\
                 sentinel down-after-milliseconds mymaster 1000\n\
                 sentinel failover-timeout mymaster 4000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir.display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-sentinel")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-sentinel not found: run the README test command, which installs it");
        let sentinel = SentinelServer { port, child, dir };
        let deadline = Instant::now() + WAIT;
        while sentinel.query::<String>(&["PING"]).await.is_err() {
            assert!(Instant::now() < deadline, "redis-sentinel did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sentinel
    }

    /// Sends one command to this sentinel.
    pub async fn query<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let mut conn = timeout(
            Duration::from_secs(2),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timeout")))??;
        redis::cmd(args[0])
            .arg(&args[1..])
            .query_async(&mut conn)
            .await
    }

    /// The port of the master this sentinel names now.
    pub async fn master_port(&self) -> Option<u16> {
        let addr: Option<(String, u16)> = self
            .query(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"])
            .await
            .ok()?;
        addr.map(|(_, port)| port)
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Cluster: `masters` masters with one replica each, every one a
/// `redis-server --cluster-enabled yes` process, joined by `redis-cli --cluster
/// create`. Quick to fail over: a node is failed after 2 s without answers.
pub struct RedisCluster {
    pub servers: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start(masters: usize) -> RedisCluster {
        let mut servers = Vec::with_capacity(masters * 2);
        for _ in 0..masters * 2 {
            // The bus port too is a free port: by default it is the port + 10000,
            // which may be taken (or in the kernel's ephemeral range).
            let bus = free_port().to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
                "--repl-diskless-sync-delay",
                "0",
            ];
            servers.push(RedisServer::start_with(free_port(), &args).await);
        }
        let addresses: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli not found: run the README test command, which installs it");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { servers };
        cluster.wait_healthy().await;
        // Every master's replica is attached (failover tests need one).
        let deadline = Instant::now() + WAIT;
        while cluster.slots().await.iter().any(|r| r.4.is_empty()) {
            assert!(Instant::now() < deadline, "replicas did not attach");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A failover to a replica that never synced would lose the history.
        for (.., replicas) in cluster.slots().await {
            for port in replicas {
                cluster.server(port).wait_synced().await;
            }
        }
        cluster
    }

    /// Waits until every live node says the cluster is up and knows every node.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + 3 * WAIT;
        for server in self.servers.iter().filter(|s| s.child.is_some()) {
            loop {
                let info: String = match server.connection().await {
                    Ok(mut conn) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster not healthy: {info}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The seed URLs for `--redis-cluster`.
    pub fn seeds(&self) -> String {
        self.servers
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The slot of `key`.
    pub async fn slot(&self, key: &str) -> u16 {
        let mut conn = self.any().connection().await.unwrap();
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// A live server.
    pub fn any(&self) -> &RedisServer {
        self.servers.iter().find(|s| s.child.is_some()).unwrap()
    }

    /// The slot ranges per master, as `(first, last, master port, master id,
    /// replica ports)`, as a live node sees them.
    pub async fn slots(&self) -> Vec<(u16, u16, u16, String, Vec<u16>)> {
        let mut conn = self.any().connection().await.unwrap();
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        ranges
            .into_iter()
            .map(|range| {
                let redis::Value::Array(items) = range else {
                    panic!("CLUSTER SLOTS: {range:?}")
                };
                let int = |v: &redis::Value| -> i64 { redis::from_redis_value_ref(v).unwrap() };
                let node = |v: &redis::Value| -> (u16, String) {
                    let redis::Value::Array(node) = v else {
                        panic!("{v:?}")
                    };
                    (
                        int(&node[1]) as u16,
                        redis::from_redis_value_ref(&node[2]).unwrap(),
                    )
                };
                let (port, id) = node(&items[2]);
                let replicas = items[3..].iter().map(|r| node(r).0).collect();
                (
                    int(&items[0]) as u16,
                    int(&items[1]) as u16,
                    port,
                    id,
                    replicas,
                )
            })
            .collect()
    }

    /// The master port, master id and replica ports owning `slot`.
    pub async fn owner(&self, slot: u16) -> (u16, String, Vec<u16>) {
        self.slots()
            .await
            .into_iter()
            .find(|(first, last, ..)| (*first..=*last).contains(&slot))
            .map(|(_, _, port, id, replicas)| (port, id, replicas))
            .expect("every slot is served")
    }

    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers.iter().find(|s| s.port == port).unwrap()
    }

    /// Moves `slot` (and its keys) from its master to the master `to` (a port), as
    /// `redis-cli --cluster reshard` does for each slot: importing and migrating
    /// states, `MIGRATE` of its keys in batches, then the new owner told to every
    /// master.
    pub async fn move_slot(&self, slot: u16, to: u16) {
        let (from, from_id, _) = self.owner(slot).await;
        let masters: Vec<(u16, String)> = self
            .slots()
            .await
            .into_iter()
            .map(|(_, _, port, id, _)| (port, id))
            .collect();
        let to_id = masters.iter().find(|(p, _)| *p == to).unwrap().1.clone();
        let mut src = self.server(from).connection().await.unwrap();
        let mut dst = self.server(to).connection().await.unwrap();
        let setslot = |state: &str, id: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
            cmd
        };
        let _: () = setslot("IMPORTING", &from_id)
            .query_async(&mut dst)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", &to_id)
            .query_async(&mut src)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut src)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut src)
                .await
                .unwrap();
        }
        for (port, _) in &masters {
            let mut conn = self.server(*port).connection().await.unwrap();
            let _: () = setslot("NODE", &to_id)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    pub fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        self.servers.iter_mut().find(|s| s.port == port).unwrap()
    }
}

/// Polls an asynchronous condition every 100 ms until it holds, within `limit`.
pub async fn eventually<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut check: F) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes (ids from `id` on) until one is acked; `unavailable`, the only other
/// answer allowed, is retried for at most `bound` (a failover). Returns the ack's
/// offset and how long it took.
pub async fn publish_until_acked(
    writer: &mut Client,
    ch: &str,
    id: &mut u64,
    bound: Duration,
) -> (u64, Duration) {
    let started = Instant::now();
    loop {
        *id += 1;
        let reply = writer.publish(ch, json!(*id), *id).await;
        if reply["op"] == "ack" {
            return (reply["offset"].as_u64().unwrap_or(0), started.elapsed());
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(
            started.elapsed() < bound,
            "publishes failed for {:?}: {reply}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy between nodes and Redis that can *hold* new connections: while held,
/// it accepts them but forwards nothing until released, while established
/// connections keep flowing (a reconnect that takes its time).
pub struct HoldProxy {
    pub port: u16,
    pub upstream_port: u16,
    held: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HoldProxy {
    pub async fn start(upstream_port: u16) -> HoldProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    if watch.wait_for(|held| !held).await.is_err() {
                        return;
                    }
                    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        HoldProxy {
            port,
            upstream_port,
            held,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Holds (`true`) or releases (`false`) connections accepted from now on, and
    /// releases those waiting.
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

impl Drop for HoldProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every sentinel knows the others and `replicas` replicas (so they can agree on a
/// failover and have someone to promote).
pub async fn wait_sentinels_agree(sentinels: &[SentinelServer], replicas: usize) {
    for s in sentinels {
        eventually("sentinels discover each other", 3 * WAIT, async || {
            let peers: redis::RedisResult<Vec<redis::Value>> =
                s.query(&["SENTINEL", "SENTINELS", "mymaster"]).await;
            let known: redis::RedisResult<Vec<redis::Value>> =
                s.query(&["SENTINEL", "REPLICAS", "mymaster"]).await;
            matches!((peers, known), (Ok(p), Ok(r)) if p.len() == sentinels.len() - 1 && r.len() == replicas)
        })
        .await;
    }
}

/// `redis+sentinel://…/mymaster` for these sentinels.
pub fn sentinel_url(sentinels: &[SentinelServer]) -> String {
    let hosts: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    format!("redis+sentinel://{}/mymaster", hosts.join(","))
}

/// A Sentinel group: a master, one replica and three `redis-sentinel` processes
/// (quorum 2) that agree on both.
pub struct SentinelGroup {
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<SentinelServer>,
}

impl SentinelGroup {
    pub async fn start() -> SentinelGroup {
        // Without the default 5 s wait before a diskless sync, the replica holds
        // the data within milliseconds.
        let master =
            RedisServer::start_with(free_port(), &["--repl-diskless-sync-delay", "0"]).await;
        let of = master.port.to_string();
        let replica = RedisServer::start_with(
            free_port(),
            &[
                "--replicaof",
                "127.0.0.1",
                &of,
                "--repl-diskless-sync-delay",
                "0",
            ],
        )
        .await;
        // A failover to a replica that never synced would lose the history.
        replica.wait_synced().await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(SentinelServer::start(master.port, 2).await);
        }
        let group = SentinelGroup {
            servers: vec![master, replica],
            sentinels,
        };
        group.wait_agree(1).await;
        group
    }

    /// Every sentinel knows the others and `replicas` replicas.
    pub async fn wait_agree(&self, replicas: usize) {
        wait_sentinels_agree(&self.sentinels, replicas).await;
    }

    /// `redis+sentinel://…/mymaster`.
    pub fn url(&self) -> String {
        sentinel_url(&self.sentinels)
    }

    /// The port of the master the sentinels name now.
    pub async fn master_port(&self) -> Option<u16> {
        for s in &self.sentinels {
            if let Some(port) = s.master_port().await {
                return Some(port);
            }
        }
        None
    }

    /// The current master.
    pub async fn master(&self) -> &RedisServer {
        let port = self.master_port().await.expect("a master");
        self.servers.iter().find(|s| s.port == port).unwrap()
    }

    pub fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        self.servers.iter_mut().find(|s| s.port == port).unwrap()
    }
}

/// A client of a streaming transport (`GET /sse` or `POST /stream`) over a raw
/// HTTP/1.1 connection: reads the chunked body as it arrives and splits it into
/// SSE events or NDJSON lines. Heartbeats (comments, empty lines) are counted, not
/// returned.
pub struct StreamClient {
    stream: TcpStream,
    /// Received bytes not yet decoded from the chunked encoding.
    raw: Vec<u8>,
    /// Decoded body bytes not yet split into events.
    body: Vec<u8>,
    /// Whether the last chunk (size 0) arrived.
    pub ended: bool,
    /// `text/event-stream` (else NDJSON).
    sse: bool,
    /// The HTTP status and headers of the response.
    pub status: u16,
    pub head: String,
    /// Heartbeats seen.
    pub heartbeats: usize,
    /// The session id from `welcome`.
    pub session: String,
    /// The `id` of the last SSE event that had one.
    pub last_event_id: Option<String>,
}

/// One SSE event or NDJSON line.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    /// The `id` field, if the event had one.
    pub id: Option<String>,
    pub data: Value,
}

impl StreamClient {
    /// Opens `GET /sse?<query>` with extra headers and waits for `welcome` (if
    /// the status is 200).
    pub async fn sse(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> StreamClient {
        StreamClient::open(addr, "GET", &format!("/sse?{query}"), headers, true).await
    }

    /// Opens `POST /stream?<query>` and waits for `welcome`.
    pub async fn ndjson(addr: SocketAddr, query: &str) -> StreamClient {
        StreamClient::open(addr, "POST", &format!("/stream?{query}"), &[], false).await
    }

    async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        sse: bool,
    ) -> StreamClient {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .unwrap()
            .unwrap();
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let end = loop {
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            let mut buf = [0u8; 4096];
            let n = timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("response head in time")
                .unwrap();
            assert!(n > 0, "connection closed before the response head");
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let raw = raw[end + 4..].to_vec();
        let mut client = StreamClient {
            stream,
            raw,
            body: Vec::new(),
            ended: false,
            sse,
            status,
            head,
            heartbeats: 0,
            session: String::new(),
            last_event_id: None,
        };
        if status == 200 {
            let welcome = client.next().await.expect("welcome");
            assert_eq!(welcome.data["op"], "welcome", "{:?}", welcome.data);
            client.session = welcome.data["session"].as_str().unwrap_or("").to_owned();
        } else {
            client.read_to_end().await;
        }
        client
    }

    /// Reads until the response ends (for an error status: its body is in
    /// `error_body`).
    async fn read_to_end(&mut self) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = timeout(WAIT, self.stream.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The body of a refused stream (the JSON error).
    pub fn error_body(&self) -> Value {
        let text = String::from_utf8_lossy(&self.raw);
        // A short error body may or may not be chunked: take the JSON object.
        let start = text.find('{').unwrap_or(0);
        let end = text.rfind('}').map_or(text.len(), |e| e + 1);
        serde_json::from_str(&text[start..end]).unwrap_or(Value::Null)
    }

    /// Decodes complete chunks from `raw` into `body`.
    fn decode_chunks(&mut self) {
        loop {
            let Some(line_end) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_text = String::from_utf8_lossy(&self.raw[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size in {size_text:?}"));
            if size == 0 {
                self.ended = true;
                self.raw.clear();
                return;
            }
            let start = line_end + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.body.extend_from_slice(&self.raw[start..start + size]);
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next event, within `limit`; `None` when the stream ended or nothing came.
    pub async fn try_next(&mut self, limit: Duration) -> Option<StreamEvent> {
        use tokio::io::AsyncReadExt;
        let deadline = Instant::now() + limit;
        loop {
            self.decode_chunks();
            if let Some(event) = self.split_event() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            let mut buf = [0u8; 8192];
            let n = match timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => return None,
            };
            if n == 0 {
                self.ended = true;
                return None;
            }
            self.raw.extend_from_slice(&buf[..n]);
        }
    }

    /// The next event; fails the test if none comes within [`WAIT`].
    pub async fn next(&mut self) -> Option<StreamEvent> {
        self.try_next(WAIT).await
    }

    /// The next event that is not a heartbeat, and the data of it; fails if none.
    pub async fn recv(&mut self) -> Value {
        self.next().await.expect("an event in time").data
    }

    /// Splits one complete event off the decoded body (skipping heartbeats).
    fn split_event(&mut self) -> Option<StreamEvent> {
        loop {
            if self.sse {
                let at = self.body.windows(2).position(|w| w == b"\n\n")?;
                let block = String::from_utf8(self.body[..at].to_vec()).expect("UTF-8 events");
                self.body.drain(..at + 2);
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push_str(v);
                    }
                }
                if let Some(id) = &id {
                    self.last_event_id = Some(id.clone());
                }
                if data.is_empty() {
                    // A comment (heartbeat) or the `retry` field.
                    if block.starts_with(':') {
                        self.heartbeats += 1;
                    }
                    continue;
                }
                let data = serde_json::from_str(&data).expect("JSON data");
                return Some(StreamEvent { id, data });
            } else {
                let at = self.body.iter().position(|&b| b == b'\n')?;
                let line = String::from_utf8(self.body[..at].to_vec()).expect("UTF-8 lines");
                self.body.drain(..at + 1);
                if line.is_empty() {
                    self.heartbeats += 1;
                    continue;
                }
                let data = serde_json::from_str(&line).expect("JSON line");
                return Some(StreamEvent { id: None, data });
            }
        }
    }

    /// Posts one request for this stream's session to the node at `addr`: the
    /// HTTP status and body.
    pub async fn request(&self, addr: SocketAddr, request: Value) -> (u16, String) {
        post_request(addr, &self.session, &request.to_string()).await
    }
}

/// `POST /stream/request?session=<session>` with `body`: (status, body).
pub async fn post_request(addr: SocketAddr, session: &str, body: &str) -> (u16, String) {
    http_request(
        addr,
        "POST",
        &format!("/stream/request?session={session}"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .await
}
