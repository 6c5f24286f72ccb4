//! The Python example client (examples/python/recover.py) against real nodes: the
//! protocol's recovery rules are implementable in ~60 lines outside JavaScript. The
//! interpreter is `$WSRELAY_PYTHON` (scripts/test.sh sets it to a venv with
//! `websockets`), else `python3`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{RedisServer, TestNode, wait_until};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_recovers_across_a_drained_node() {
    let python = std::env::var("WSRELAY_PYTHON").unwrap_or_else(|_| "python3".into());
    let check = Command::new(&python)
        .args(["-c", "import websockets"])
        .output()
        .expect("a Python interpreter");
    assert!(
        check.status.success(),
        "{python} lacks the websockets package: run ./scripts/test.sh, which installs it"
    );
    follows_across_a_drained_node("recover.py", "chat:py", |node| node.ws_url("")).await;
}

/// The standard-library SSE follower (examples/python/sse_follow.py): a node
/// drains under it, it connects to the other one with `Last-Event-ID`, and prints
/// every offset once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sse_follower_recovers_across_a_drained_node_from_last_event_id() {
    follows_across_a_drained_node("sse_follow.py", "news", |node| {
        format!("http://{}", node.addr)
    })
    .await;
}

/// Runs `script` (of examples/python) on two nodes' URLs and channel `ch`: 20
/// messages, the first node drains, 20 more; the script must print offsets 1 to
/// 40, each once, in order, and exit.
async fn follows_across_a_drained_node(script: &str, ch: &str, url: impl Fn(&TestNode) -> String) {
    let python = std::env::var("WSRELAY_PYTHON").unwrap_or_else(|_| "python3".into());
    let redis = RedisServer::start().await;
    let flags = ["--history-size", "1000"];
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let mut script = Command::new(&python)
        .arg(format!(
            "{}/examples/python/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([url(&n1), url(&n2)])
        .args(["--channel", ch, "--until", "40"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = script.stdout.take().unwrap();
    let mut script = KillOnDrop(script);
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    wait_until("the script subscribed on n1", || {
        n1.handle.stats().subscriptions == 1
    })
    .await;

    let mut publisher = n2.client("channel=other").await;
    for i in 1..=20u64 {
        assert_eq!(publisher.publish(ch, json!(i), i).await["offset"], i);
    }
    // n1 drains: the script moves to n2 while publishing goes on.
    n1.stop().await;
    for i in 21..=40u64 {
        assert_eq!(publisher.publish(ch, json!(i), i).await["offset"], i);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while script.0.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the script did not reach offset 40"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = lines.join().unwrap();
    let offsets: Vec<u64> = lines
        .iter()
        .map(|l| {
            l.split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("{l}"))
        })
        .collect();
    assert_eq!(offsets, (1..=40).collect::<Vec<_>>(), "{lines:?}");
}

/// The script's process, killed if the test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
