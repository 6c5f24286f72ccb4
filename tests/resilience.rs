//! Real faults: Redis killed and restarted, Redis stalled, a node SIGKILLed,
//! thousands of abrupt disconnects, and a flood with a slow reader.

mod common;

use std::time::Duration;

use common::{Client, NodeProcess, RedisServer, TestNode, WAIT, metric, wait_until};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Publishes to `channel` until `listener` receives one of the attempts; returns
/// how long that took. Attempts answered `unavailable`, or acked while the
/// listener's node was not yet resubscribed, are lost (live delivery is
/// at-most-once across an outage) and simply retried.
async fn publish_until_delivered(
    publisher: &mut Client,
    listener: &mut Client,
    channel: &str,
    id: &mut u64,
) -> Duration {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < WAIT, "delivery did not resume");
        *id += 1;
        let mut stash = Vec::new();
        let reply = publisher
            .request(
                json!({"op":"pub","ch":channel,"data":{"attempt":*id}}),
                *id,
                &mut stash,
            )
            .await;
        if reply["op"] == "error" {
            assert_eq!(reply["code"], "unavailable", "{reply}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        if let Some(msg) = listener.try_recv(Duration::from_millis(200)).await {
            assert_eq!(msg["ch"], channel, "{msg}");
            // Drain attempts that were delivered late, so the caller starts clean.
            while listener
                .try_recv(Duration::from_millis(100))
                .await
                .is_some()
            {}
            return started.elapsed();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_traffic() {
    let mut redis = RedisServer::start().await;
    let flags = ["--broker-timeout", "500ms"];
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let mut listener = n2.client("channel=live").await;
    let mut publisher = n1.client("channel=publisher").await;
    let mut id = 0;
    publish_until_delivered(&mut publisher, &mut listener, "live", &mut id).await;

    redis.kill();
    // The publisher is told, within the broker timeout, that its message did not go out.
    let asked = Instant::now();
    let mut stash = Vec::new();
    let reply = publisher
        .request(
            json!({"op":"pub","ch":"live","data":"lost"}),
            900,
            &mut stash,
        )
        .await;
    assert_eq!(
        (reply["code"].as_str(), reply["id"].as_u64()),
        (Some("unavailable"), Some(900)),
        "{reply}"
    );
    assert!(
        asked.elapsed() < Duration::from_millis(500) + Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    // Both nodes report not ready while Redis is down.
    wait_until("nodes not ready", || {
        !n1.handle.is_ready() && !n2.handle.is_ready()
    })
    .await;
    let (status, body) = common::http_get(n2.addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("broker unavailable"), "{body}");
    // A subscription asked for during the outage is refused after the timeout.
    let reply = listener
        .request(json!({"op":"sub","ch":"during"}), 901, &mut stash)
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");

    redis.restart().await;
    let resumed = publish_until_delivered(&mut publisher, &mut listener, "live", &mut id).await;
    assert!(
        resumed < Duration::from_secs(5),
        "cross-node delivery resumed after {resumed:?}"
    );
    n1.wait_ready().await;
    n2.wait_ready().await;

    // Same connections throughout; the refused subscription can now be made.
    assert_eq!(listener.sub("during", 902).await["op"], "ack");
    let text = n2.handle.metrics_text();
    assert!(
        metric(&text, "wsrelay_broker_reconnects_total") >= 1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "wsrelay_broker_up"), 1.0);
    assert!(
        metric(
            &n1.handle.metrics_text(),
            "wsrelay_publish_errors_total{code=\"unavailable\"}"
        ) >= 1.0
    );
    assert_eq!(n2.handle.stats().connections, 1);
    assert!(
        stash.iter().all(|f| f["op"] != "msg" || f["ch"] == "live"),
        "{stash:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_handled_like_an_outage() {
    let redis =
        RedisServer::start_with(common::free_port(), &["--enable-debug-command", "local"]).await;
    let flags = ["--broker-timeout", "1s"];
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let mut listener = n2.client("channel=live").await;
    let mut publisher = n1.client("channel=publisher").await;
    let mut id = 0;
    publish_until_delivered(&mut publisher, &mut listener, "live", &mut id).await;

    // DEBUG SLEEP blocks Redis entirely for 4 s.
    let mut sleeper = redis.connection().await.unwrap();
    let mut probe = redis.connection().await.unwrap();
    let stall = tokio::spawn(async move {
        let _: redis::RedisResult<()> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(4)
            .query_async(&mut sleeper)
            .await;
    });
    loop {
        let ping = redis::cmd("PING");
        let answered = tokio::time::timeout(
            Duration::from_millis(100),
            ping.query_async::<String>(&mut probe),
        )
        .await;
        if answered.is_err() {
            break; // stalled
        }
    }

    let asked = Instant::now();
    let mut stash = Vec::new();
    let reply = publisher
        .request(
            json!({"op":"pub","ch":"live","data":"stalled"}),
            900,
            &mut stash,
        )
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        asked.elapsed()
    );
    wait_until("stall noticed", || !n2.handle.is_ready()).await;

    tokio::time::timeout(WAIT, stall).await.unwrap().unwrap();
    let stall_ended = Instant::now();
    publish_until_delivered(&mut publisher, &mut listener, "live", &mut id).await;
    assert!(
        stall_ended.elapsed() < Duration::from_secs(5),
        "resumed after {:?}",
        stall_ended.elapsed()
    );
    n2.wait_ready().await;
    assert_eq!(n2.handle.stats().connections, 1, "clients stayed connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_one_node_leaves_the_others_delivering() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let nodes: Vec<NodeProcess> = (1..=3)
        .map(|i| NodeProcess::spawn(&["--redis-url", &url, "--node-id", &format!("n{i}")]))
        .collect();
    for node in &nodes {
        node.wait_ready().await;
    }
    let mut subs = Vec::new();
    for node in &nodes {
        subs.push(node.client("channel=room").await);
    }
    let mut publisher = nodes[0].client("channel=publisher").await;
    assert_eq!(redis.numsub("room").await, 3);

    let mut nodes = nodes;
    let victim = nodes.pop().unwrap();
    victim.signal("KILL");
    let mut orphan = subs.pop().unwrap();
    assert_eq!(
        orphan.expect_close().await,
        None,
        "a killed node sends no close frame"
    );
    drop(victim);
    // Redis notices the dead subscriber connection; the survivors keep delivering.
    redis.wait_numsub("room", 2).await;
    for seq in 0..50 {
        publisher
            .send(json!({"op":"pub","ch":"room","data":seq}))
            .await;
    }
    for sub in &mut subs {
        let msgs = sub.recv_msgs(50).await;
        assert!(
            msgs.iter().enumerate().all(|(i, m)| m["data"] == i),
            "{msgs:?}"
        );
    }

    // The orphan reconnects to another node and resumes.
    let mut resumed = nodes[1].client("channel=room").await;
    assert_eq!(resumed.welcome["node"], "n2");
    publisher
        .send(json!({"op":"pub","ch":"room","data":"again"}))
        .await;
    assert_eq!(resumed.recv().await["data"], "again");
    for sub in &mut subs {
        assert_eq!(sub.recv().await["data"], "again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_no_trace() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let nodes = [
        NodeProcess::spawn(&["--redis-url", &url, "--node-id", "n1"]),
        NodeProcess::spawn(&["--redis-url", &url, "--node-id", "n2"]),
    ];
    for node in &nodes {
        node.wait_ready().await;
    }

    // Each cycle: connect (subscribing at connect), maybe subscribe more, then vanish
    // with a TCP reset: no close frame.
    let cycle = |i: usize| {
        let url = nodes[i % 2].ws_url(&format!("channel=churn-{}", i % 64));
        async move {
            let mut client = Client::connect_abortable(&url).await;
            if i.is_multiple_of(3) {
                let mut stash = Vec::new();
                let reply = client
                    .request(json!({"op":"sub","ch":format!("own-{i}")}), 1, &mut stash)
                    .await;
                assert_eq!(reply["op"], "ack", "{reply}");
            }
            if i.is_multiple_of(5) {
                client
                    .send(json!({"op":"pub","ch":format!("churn-{}", i % 64),"data":i}))
                    .await;
            }
            drop(client);
        }
    };
    let run = |range: std::ops::Range<usize>| {
        futures_util::stream::iter(range.map(cycle))
            .buffer_unordered(32)
            .collect::<Vec<()>>()
    };

    run(0..200).await;
    for node in &nodes {
        node.wait_registry_empty().await;
    }
    let baseline: Vec<u64> = nodes.iter().map(|n| n.memory_kib("VmRSS")).collect();

    run(200..2200).await;
    for node in &nodes {
        node.wait_registry_empty().await;
    }
    // No Redis subscription outlives its last local subscriber.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut conn = redis.connection().await.unwrap();
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("wsrelay:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        // Each node's own delivery-probe and control channels stay, by design.
        let channels: Vec<String> = channels
            .into_iter()
            .filter(|c| !c.starts_with("wsrelay:probe:") && !c.ends_with(":control"))
            .collect();
        if channels.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis still has subscriptions: {channels:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (node, before) in nodes.iter().zip(baseline) {
        let text = node.metrics().await;
        assert!(
            metric(&text, "wsrelay_connections_opened_total") >= 1100.0,
            "{text}"
        );
        let after = node.memory_kib("VmRSS");
        // 1,100 connections went through each node; a leak of even 1 KiB each
        // would show. 4 MiB allows for allocator caches.
        assert!(
            after <= before + 4 * 1024,
            "RSS grew from {before} KiB to {after} KiB"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_cuts_the_slow_reader_and_serves_the_fast_ones_in_bounded_memory() {
    // Redis disconnects a pub/sub client that lets 256 KiB of output pile up for a
    // second: the node's subscriber must keep reading whatever its clients do.
    let redis = RedisServer::start_with(
        common::free_port(),
        &["--client-output-buffer-limit", "pubsub 256kb 128kb 1"],
    )
    .await;
    // The flood is the point here, not the publish rate limit.
    let node = NodeProcess::spawn(&[
        "--redis-url",
        &redis.url(),
        "--client-queue",
        "256",
        "--publish-rate",
        "1000000",
        "--publish-burst",
        "100000",
    ]);
    node.wait_ready().await;

    const N: usize = 4000;
    const FAST: usize = 8;
    let mut slow = node.client("channel=flood").await;
    let mut readers = Vec::new();
    for _ in 0..FAST {
        let mut fast = node.client("channel=flood").await;
        readers.push(tokio::spawn(async move {
            let msgs = fast.recv_msgs(N).await;
            msgs.iter()
                .enumerate()
                .all(|(seq, m)| m["data"]["seq"] == seq)
        }));
    }
    let baseline = node.memory_kib("VmRSS");

    // The publisher reads its own copy of the flood and keeps at most 200 messages
    // outstanding, so the fast readers (as fast as it is) are never the slow ones.
    let mut publisher = node.client("channel=flood").await;
    let pad = "p".repeat(4096);
    let mut received = 0;
    for seq in 0..N {
        publisher
            .send(json!({"op":"pub","ch":"flood","data":{"seq":seq,"pad":pad}}))
            .await;
        while seq - received >= 200 {
            let msg: Value = publisher.recv().await;
            assert_eq!(msg["data"]["seq"], received);
            received += 1;
        }
    }
    for reader in readers {
        assert!(
            tokio::time::timeout(WAIT * 3, reader)
                .await
                .unwrap()
                .unwrap(),
            "in order, complete"
        );
    }

    let mut seen = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, slow.ws.next())
            .await
            .expect("frame or close")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))) => seen += 1,
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => {
                break f.map(|f| u16::from(f.code));
            }
            Some(Ok(_)) => {}
            other => panic!("expected close, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1013));
    assert!(seen < N);
    let text = node.metrics().await;
    assert_eq!(
        metric(
            &text,
            "wsrelay_client_closes_total{reason=\"slow_consumer\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "wsrelay_broker_reconnects_total"),
        0.0,
        "Redis never cut the subscriber off"
    );
    // 16 MiB of messages went to each of ten clients. Queued frames share one buffer
    // per message, so the node holds at most a queue's worth of distinct messages
    // (256 × 4 KiB) plus socket write buffers: 24 MiB above the idle baseline
    // leaves room for the allocator and still catches per-client copies
    // (10 × 256 × 4 KiB = 10 MiB) or an unbounded queue (160 MiB).
    let peak = node.memory_kib("VmHWM");
    assert!(
        peak < baseline + 24 * 1024,
        "peak RSS {peak} KiB, baseline {baseline} KiB"
    );
}
