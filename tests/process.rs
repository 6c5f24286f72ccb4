//! The real `wsrelay` binary as a process: start-up, SIGTERM drain, bad configuration.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, RedisServer, WAIT};

/// Starts the binary on port 0 and returns it with the address it logged.
fn spawn_node(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wsrelay"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent && line.contains("listening") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_owned);
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(WAIT)
        .expect("node logs its address")
        .expect("addr= field");
    (child, addr)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_client_with_1001_and_exits_in_time() {
    let redis = RedisServer::start().await;
    let (mut child, addr) = spawn_node(&["--redis-url", &redis.url(), "--drain-timeout", "3s"]);
    let url = |q: &str| format!("ws://{addr}/ws?{q}");
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(Client::connect(&url(&format!("channel=c{i}"))).await);
    }

    let started = Instant::now();
    sigterm(&child);
    for client in &mut clients {
        assert_eq!(client.expect_close().await, Some(1001));
    }
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(3) + WAIT))
            .await
            .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3) + Duration::from_secs(2),
        "exit within the drain timeout"
    );
    // The node's Redis subscriptions went with it.
    redis.wait_numsub("c0", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_the_close_does_not_hold_the_drain_past_its_timeout() {
    let (mut child, addr) = spawn_node(&["--drain-timeout", "1s"]);
    // Connected, never reading: it will not answer the close frame.
    let (_ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    let started = Instant::now();
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child, WAIT))
        .await
        .unwrap();
    assert!(status.success());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
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
}
