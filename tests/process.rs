//! The real `wsrelay` binary as a process: SIGTERM drain, bad configuration.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, NodeProcess, RedisServer, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1001_and_exits_in_time() {
    let redis = RedisServer::start().await;
    let mut node = NodeProcess::spawn(&["--redis-url", &redis.url(), "--drain-timeout", "3s"]);
    node.wait_ready().await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(node.client(&format!("channel=c{i}")).await);
    }

    let started = Instant::now();
    node.signal("TERM");
    for client in &mut clients {
        assert_eq!(client.expect_close().await, Some(1001));
    }
    let (status, node) =
        tokio::task::spawn_blocking(move || (node.wait_exit(Duration::from_secs(3) + WAIT), node))
            .await
            .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit within the drain timeout"
    );
    drop(node);
    // The node's Redis subscriptions went with it.
    redis.wait_numsub("c0", 0).await;
}

/// `--drain-spread`: the clients of a drained node are closed with 1001 over the
/// window, not at once, and those still open keep receiving what another node's
/// clients publish until their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spread_drain_closes_clients_over_the_window_and_they_keep_receiving() {
    use futures_util::StreamExt;
    use serde_json::json;
    use tokio_tungstenite::tungstenite::Message;

    const CLIENTS: usize = 20;
    let redis = RedisServer::start().await;
    let args = ["--redis-url", &redis.url()];
    let mut drained = NodeProcess::spawn(
        &[
            &args[..],
            &["--drain-spread", "2s", "--drain-timeout", "6s"],
        ]
        .concat(),
    );
    let other = NodeProcess::spawn(&args);
    drained.wait_ready().await;
    other.wait_ready().await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(drained.client("channel=room").await);
    }
    let mut publisher = other.client("channel=side").await;
    // An SSE stream too: its HTTP connection must not hold the drain up.
    let mut stream = common::StreamClient::sse(drained.addr, "channel=room", &[]).await;
    redis.wait_numsub("room", 1).await;

    let started = Instant::now();
    drained.signal("TERM");
    // Each client reads until its close: when it came, with which code, and the
    // last message it received before it.
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut last = None;
                loop {
                    match tokio::time::timeout(WAIT, client.ws.next())
                        .await
                        .expect("a frame in time")
                    {
                        Some(Ok(Message::Text(text))) => {
                            let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                            if frame["ch"] == "room" {
                                last = frame["data"].as_u64();
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map(|f| u16::from(f.code));
                            return (started.elapsed(), code, last);
                        }
                        Some(Ok(_)) => {}
                        other => panic!("expected a close frame, got {other:?}"),
                    }
                }
            })
        })
        .collect();
    // Published from the other node every 50 ms through the drain.
    let mut seq = 0u64;
    let mut published_at = Vec::new();
    while started.elapsed() < Duration::from_millis(2500) {
        publisher
            .send(json!({"op":"pub","ch":"room","data":seq}))
            .await;
        published_at.push(started.elapsed());
        seq += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut closes = Vec::new();
    for reader in readers {
        closes.push(reader.await.unwrap());
    }
    // The stream ended with the close event (the others' closes are 1001 frames).
    let mut stream_closed = None;
    while let Some(event) = stream.next().await {
        if event.data["op"] == "close" {
            stream_closed = Some(event.data["code"].clone());
        }
    }
    assert_eq!(stream_closed, Some(json!(1001)));
    closes.sort_by_key(|c| c.0);
    assert!(closes.iter().all(|c| c.1 == Some(1001)), "{closes:?}");
    let first = closes.first().unwrap().0;
    let last = closes.last().unwrap();
    assert!(
        first < Duration::from_millis(700),
        "the first share at once: {closes:?}"
    );
    assert!(
        last.0 > Duration::from_millis(1500),
        "the last at the end: {closes:?}"
    );
    let early = closes
        .iter()
        .filter(|c| c.0 < Duration::from_secs(1))
        .count();
    assert!(early <= CLIENTS * 3 / 4, "not all at once: {closes:?}");
    // The last client closed still received what was published 1 s into the drain.
    let seq_at_1s = published_at
        .iter()
        .position(|t| *t > Duration::from_secs(1))
        .unwrap() as u64;
    assert!(
        last.2.is_some_and(|s| s >= seq_at_1s),
        "{last:?}, {seq_at_1s}"
    );

    let status = tokio::task::spawn_blocking(move || drained.wait_exit(WAIT))
        .await
        .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "within the drain timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_the_close_does_not_hold_the_drain_past_its_timeout() {
    let mut node = NodeProcess::spawn(&["--drain-timeout", "1s"]);
    // Connected, never reading: it will not answer the close frame.
    let (_ws, _) = tokio_tungstenite::connect_async(node.ws_url(""))
        .await
        .unwrap();
    let started = Instant::now();
    node.signal("TERM");
    let status = tokio::task::spawn_blocking(move || node.wait_exit(WAIT))
        .await
        .unwrap();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_a_client() {
    let node = NodeProcess::spawn(&[]);
    let mut client = Client::connect(&node.ws_url("channel=x")).await;
    assert_eq!(client.sub("y", 1).await["op"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_connection_open_and_close() {
    let node = NodeProcess::spawn(&["--log-format", "json", "--node-id", "logger"]);
    let mut client = node.client("channel=a&channel=b").await;
    let conn = client.welcome["conn"].as_str().unwrap().to_owned();
    for seq in 0..20 {
        client
            .send(serde_json::json!({"op":"pub","ch":"a","data":seq}))
            .await;
    }
    client.recv_msgs(20).await;
    client.ws_send_binary().await;
    assert_eq!(client.expect_close().await, Some(1003));

    let closed = node
        .wait_log("connection closed", |l| l.contains("connection closed"))
        .await;
    let logs = node.logs.lock().unwrap().clone();
    let parsed: Vec<serde_json::Value> = logs
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let field = |v: &serde_json::Value, k: &str| v["fields"][k].clone();
    let opened: Vec<_> = parsed
        .iter()
        .filter(|v| field(v, "message") == "connection opened")
        .collect();
    assert_eq!(opened.len(), 1, "{logs:?}");
    assert_eq!(field(opened[0], "node"), "logger");
    assert_eq!(field(opened[0], "conn").to_string(), conn);
    let closed: serde_json::Value = serde_json::from_str(&closed).unwrap();
    assert_eq!(field(&closed, "reason"), "binary");
    assert_eq!(field(&closed, "code"), 1003);
    assert_eq!(field(&closed, "conn").to_string(), conn);
    // No line per message at the default level.
    assert!(parsed.len() < 10, "{logs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_subcommand_follows_readiness() {
    let healthcheck = |url: String| {
        Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(["healthcheck", &url])
            .output()
            .unwrap()
    };
    let node = NodeProcess::spawn(&[]);
    let ready = format!("http://{}/readyz", node.addr);
    let out = tokio::task::spawn_blocking(move || healthcheck(ready))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A node whose Redis is missing is up but not ready: exit 1, saying why.
    let url = format!("redis://127.0.0.1:{}", common::free_port());
    let unready = NodeProcess::spawn(&["--redis-url", &url, "--broker-timeout", "200ms"]);
    let target = format!("http://{}/readyz", unready.addr);
    let out = tokio::task::spawn_blocking(move || healthcheck(target))
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("broker unavailable"));

    // Without a URL it asks the node at --listen (here, via the environment).
    let listen = node.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .arg("healthcheck")
            .env("WSRELAY_LISTEN", listen)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn invalid_configuration_exits_non_zero_naming_the_flag() {
    for (args, flag) in [
        (vec!["--client-queue", "0"], "--client-queue"),
        (vec!["--ping-interval", "often"], "--ping-interval"),
        (vec!["--redis-url", "ftp://x"], "--redis-url"),
        (vec!["--default-channel", "a b"], "--default-channel"),
        (vec!["--listen", "nowhere"], "--listen"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    // The same through the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .env("WSRELAY_MAX_MESSAGE_BYTES", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-message-bytes"));

    // What is wrong is said in words a newcomer can act on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for (args, expected) in [
        (vec!["--listen", addr.as_str()], "already in use"),
        (
            vec!["--redis-url", "http://x"],
            "must be redis://, rediss:// or redis+sentinel://",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("wsrelay:"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line: {stderr}");
        assert!(errors[0].contains(expected), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_not_blamed_on_its_version() {
    let port = common::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = common::NodeProcess::spawn(&["--redis-url", &url]);
    let line = node
        .wait_log("a failed Redis connection", |l| {
            l.contains("Redis subscriber connection failed")
        })
        .await;
    assert!(
        !line.contains("RESP3") && !line.contains("Redis 6"),
        "{line}"
    );
}

/// A reconnect storm while the node is busy: the kernel must queue the connections
/// (`--listen-backlog`), not drop their SYNs, which costs each client a one-second
/// retransmit. A stopped process stands in for a node that cannot accept for a moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_storm_is_queued_while_the_node_cannot_accept() {
    // The kernel caps the queue at net.core.somaxconn (4096 on current kernels).
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(4096);
    let storm = 400.min(somaxconn.saturating_sub(1));
    let node = NodeProcess::spawn(&[]);
    node.wait_ready().await;
    node.signal("STOP");
    let connects = (0..storm).map(|_| {
        // Below the kernel's first SYN retransmit (one second): a dropped SYN shows.
        tokio::time::timeout(
            Duration::from_millis(800),
            tokio::net::TcpStream::connect(node.addr),
        )
    });
    let streams = futures_util::future::join_all(connects).await;
    node.signal("CONT");
    let connected: Vec<_> = streams.into_iter().filter_map(|s| s.ok()?.ok()).collect();
    assert_eq!(
        connected.len(),
        storm,
        "connections completed by the kernel while the node was stopped"
    );
    // And each queued connection is then served.
    let handshakes = connected.into_iter().map(|stream| {
        let url = node.ws_url("channel=storm");
        async move {
            let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
            let welcome = tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws))
                .await
                .expect("welcome in time");
            let text = welcome.unwrap().unwrap().into_text().unwrap();
            assert!(text.contains(r#""op":"welcome""#), "{text}");
            ws
        }
    });
    let served = futures_util::future::join_all(handshakes).await;
    assert_eq!(served.len(), storm);
}
