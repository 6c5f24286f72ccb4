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
}
