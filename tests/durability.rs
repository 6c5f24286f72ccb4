//! `publish-durability replicas:N`: a publish to a channel with history is acked
//! only once N replicas confirmed it (Redis `WAIT`, pipelined with the publish
//! script on a connection of its own); otherwise the publisher gets `not_durable`
//! (HTTP 504), although the message was stored on the master and delivered.
//! The failover half (acked offsets survive a killed master) is in `sentinel.rs`.

mod common;

use std::time::{Duration, Instant};

use common::{RedisServer, TestNode, free_port, http_request, metric};
use serde_json::{Value, json};

const API_KEY: &str = "0123456789abcdef";

/// A `--config` file: history and `publish-durability` for the `chat` namespace
/// only, so other channels keep the default (no history, `leader`).
fn chat_durable(durability: &str) -> String {
    common::config_file(&format!(
        "[namespaces.chat]\nhistory-size = 1000\npublish-durability = \"{durability}\"\n"
    ))
}

async fn api_publish(node: &TestNode, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = http_request(
        node.addr,
        "POST",
        "/api/publish",
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_a_durable_publish_is_delivered_but_answered_not_durable() {
    let redis = RedisServer::start().await;
    let config = chat_durable("replicas:1");
    let node = TestNode::with_redis(
        &redis,
        "n1",
        &[
            "--config",
            &config,
            // The replicas get half of it; Redis ends a WAIT on a 100 ms tick.
            "--broker-timeout",
            "600ms",
            "--api-key",
            API_KEY,
        ],
    )
    .await;
    let ch = "chat:durable";
    let mut reader = node.client(&format!("channel={ch}&channel=plain")).await;
    let mut writer = node.client("channel=side").await;

    let started = Instant::now();
    let reply = writer.publish(ch, json!("first"), 1).await;
    let took = started.elapsed();
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("not_durable")),
        "{reply}"
    );
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains("offset 1") && message.contains("may or may not survive a failover"),
        "{message}"
    );
    // The replicas had half of the broker timeout.
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // Stored and delivered all the same.
    let msg = reader.recv().await;
    assert_eq!(
        (
            msg["op"].as_str(),
            msg["offset"].as_u64(),
            msg["data"].as_str()
        ),
        (Some("msg"), Some(1), Some("first")),
        "{msg}"
    );

    // A channel without history stores nothing: a plain ack, at once.
    let started = Instant::now();
    let ack = writer.publish("plain", json!("p"), 2).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert!(started.elapsed() < Duration::from_millis(200));
    assert_eq!(reader.recv().await["data"], "p");

    // The server API: a distinct status and error, with the offset.
    let (status, body) = api_publish(&node, json!({"ch": ch, "data": "second"})).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        (
            body["error"].as_str(),
            body["published"].as_u64(),
            body["offsets"].clone()
        ),
        (Some("not_durable"), Some(1), json!([2])),
        "{body}"
    );
    assert_eq!(reader.recv().await["offset"], 2);
    // A batch stops at the first message not confirmed.
    let (status, body) = api_publish(
        &node,
        json!({"messages": [{"ch": "plain", "data": 1}, {"ch": ch, "data": 2}, {"ch": "plain", "data": 3}]}),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(
        (body["published"].as_u64(), body["offsets"].clone()),
        (Some(2), json!([null, 3])),
        "{body}"
    );

    let text = node.handle.metrics_text();
    assert_eq!(
        metric(&text, r#"wsrelay_publish_errors_total{code="not_durable"}"#),
        3.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_durable_publishes_are_acked_even_after_a_script_flush() {
    // Syncs the replica at once (Redis waits 5 s by default for more replicas).
    let master = RedisServer::start_with(free_port(), &["--repl-diskless-sync-delay", "0"]).await;
    let replica = RedisServer::start_with(
        free_port(),
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    )
    .await;
    replica.wait_synced().await;
    let config = chat_durable("replicas:1");
    let node =
        TestNode::with_redis(&master, "n1", &["--config", &config, "--api-key", API_KEY]).await;
    let ch = "chat:acked";
    let mut reader = node.client(&format!("channel={ch}")).await;
    let mut writer = node.client("channel=side").await;
    let ack = writer.publish(ch, json!(1), 1).await;
    assert_eq!(
        (ack["op"].as_str(), ack["offset"].as_u64()),
        (Some("ack"), Some(1)),
        "{ack}"
    );

    // The script is gone (as after a restart): loaded again, and still acked.
    let mut conn = master.connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ack = writer.publish(ch, json!(2), 2).await;
    assert_eq!(
        (ack["op"].as_str(), ack["offset"].as_u64()),
        (Some("ack"), Some(2)),
        "{ack}"
    );
    let (status, body) = api_publish(&node, json!({"ch": ch, "data": 3})).await;
    assert_eq!(
        (status, body["offsets"].clone()),
        (200, json!([3])),
        "{body}"
    );
    let got = reader.recv_msgs(3).await;
    assert_eq!(common::offsets(&got), [1, 2, 3]);

    // Stored where a failover keeps it.
    let mut conn = replica.connection().await.unwrap();
    let stored: i64 = redis::cmd("XLEN")
        .arg(format!("wsrelay:{{{ch}}}:stream"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 3);
}
