//! Several standalone Redis shards (`--redis-url` repeated): channels spread over
//! the shards by the documented hash, each shard carries only its own channels, and
//! a shard that dies takes down only its channels, which resume when it is back.
//! (The delivery, recovery and presence suites also run on three shards: the
//! `_sharded` tests of `history.rs` and `presence.rs`.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{
    Client, RedisServer, TestNode, Topology, WAIT, free_port, http_get, metric, offsets, shard_of,
};
use serde_json::json;

/// The channels of `wsrelay:<pattern>` subscribed on `redis`, without the prefix.
async fn subscribed(redis: &RedisServer, pattern: &str) -> BTreeSet<String> {
    let mut conn = redis.connection().await.unwrap();
    let channels: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg(format!("wsrelay:{pattern}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    channels
        .into_iter()
        .map(|c| c.trim_start_matches("wsrelay:").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spread_over_the_shards_and_each_shard_carries_only_its_own() {
    let t = Topology::sharded(3, 3, &[]).await;
    let rooms: Vec<String> = (0..12).map(|i| format!("room:{i}")).collect();
    let query = rooms
        .iter()
        .map(|r| format!("channel={r}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(t.node(i).client(&query).await);
    }

    for (shard, redis) in t.redis.iter().enumerate() {
        let expected: BTreeSet<String> = rooms
            .iter()
            .filter(|r| shard_of(r, 3) == shard)
            .cloned()
            .collect();
        assert!(!expected.is_empty(), "the hash leaves shard {shard} empty");
        // The welcome came after every subscription was live.
        assert_eq!(subscribed(redis, "room:*").await, expected, "shard {shard}");
        for room in &expected {
            assert_eq!(redis.numsub(room).await, 3, "{room}");
        }
    }

    // Cross-node delivery on every shard.
    let mut publisher = t.node(0).client("channel=side").await;
    for (i, room) in rooms.iter().enumerate() {
        let ack = publisher.publish(room, json!({"n": i}), i as u64 + 1).await;
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    for client in &mut clients[1..] {
        let got = client.recv_msgs(rooms.len()).await;
        let mut got: Vec<(String, u64)> = got
            .iter()
            .map(|m| {
                (
                    m["ch"].as_str().unwrap().to_owned(),
                    m["data"]["n"].as_u64().unwrap(),
                )
            })
            .collect();
        // Order holds within a channel; rooms on different shards arrive through
        // different subscriber connections, so their order may differ.
        got.sort_by_key(|(_, n)| *n);
        let expected: Vec<(String, u64)> = rooms
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), i as u64))
            .collect();
        assert_eq!(got, expected);
    }

    // Unsubscribing releases the channel on its shard only.
    drop(clients);
    for redis in &t.redis {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !subscribed(redis, "room:*").await.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "subscriptions left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Each shard's `state` in a `/readyz` body, by label.
fn shard_states(body: &str) -> BTreeMap<String, String> {
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    body["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("no shards in {body}"))
        .iter()
        .map(|s| {
            (
                s["shard"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls `/readyz` until it answers `status`; returns the body.
async fn readyz_until(node: &TestNode, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body) = http_get(node.addr, "/readyz").await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz stayed {got}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stays_ready_while_one_shard_is_usable_unless_told_to_require_all() {
    let mut redis = Vec::new();
    for _ in 0..3 {
        redis.push(RedisServer::start().await);
    }
    let urls = redis
        .iter()
        .map(RedisServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let key = "0123456789abcdef";
    // Quick announcements, so the cluster view catches up within the test.
    let flags = [
        "--redis-url",
        &urls,
        "--broker-timeout",
        "300ms",
        "--node-ttl",
        "1200ms",
        "--api-key",
        key,
    ];
    let any = TestNode::start(&[&flags[..], &["--node-id", "any"]].concat()).await;
    let all = TestNode::start(
        &[
            &flags[..],
            &["--node-id", "all", "--ready-requires", "all-shards"],
        ]
        .concat(),
    )
    .await;
    for node in [&any, &all] {
        node.wait_ready().await;
        let (status, body) = http_get(node.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        let states = shard_states(&body);
        assert_eq!(states.len(), 3, "{body}");
        assert!(states.values().all(|s| s == "up"), "{body}");
    }

    // Not the first shard: it holds the cluster view, read below.
    redis[1].kill();
    let dead = format!("127.0.0.1:{}", redis[1].port);
    let body = readyz_until(&all, 503).await;
    assert!(body.contains(&dead), "names the shard: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "not ready");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .starts_with("broker unavailable"),
        "{body}"
    );
    // The same shard is down for the default node, which stays ready.
    common::wait_until("the node sees the dead shard", || {
        !any.handle.all_shards_usable()
    })
    .await;
    let (status, body) = http_get(any.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let states = shard_states(&body);
    assert_eq!(states[&dead], "down", "{body}");
    assert_eq!(states.values().filter(|s| *s == "up").count(), 2, "{body}");
    let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (parsed["status"].as_str(), parsed["node"].as_str()),
        (Some("ready"), Some("any"))
    );
    let down = parsed["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard"] == dead.as_str())
        .unwrap();
    assert!(
        down["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert!(any.handle.is_ready() && !all.handle.is_ready());

    // The cluster view says what /readyz says.
    let auth = format!("Bearer {key}");
    common::eventually("the announcements catch up", WAIT, async || {
        let (status, body) = common::http_request(
            any.addr,
            "GET",
            "/api/nodes",
            &[("Authorization", &auth)],
            b"",
        )
        .await;
        if status != 200 {
            return false;
        }
        let nodes: serde_json::Value = serde_json::from_str(&body).unwrap();
        let ready = |id: &str| {
            nodes["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|n| n["id"] == id)
                .map(|n| n["ready"].clone())
        };
        ready("any") == Some(json!(true)) && ready("all") == Some(json!(false))
    })
    .await;

    // No shard left: no node can serve anything.
    redis[0].kill();
    redis[2].kill();
    let body = readyz_until(&any, 503).await;
    let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(parsed["status"], "not ready", "{body}");
    for redis in &redis {
        assert!(
            body.contains(&format!("127.0.0.1:{}", redis.port)),
            "{body}"
        );
    }
    assert!(shard_states(&body).values().all(|s| s == "down"), "{body}");

    // One shard back is enough for the default node, not for the strict one.
    redis[2].restart().await;
    readyz_until(&any, 200).await;
    assert_eq!(http_get(all.addr, "/readyz").await.0, 503);
}

/// `n` names of the form `<prefix>:<i>` living on `shard` of `shards`.
fn channels_on(shard: usize, shards: usize, prefix: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}:{i}"))
        .filter(|c| shard_of(c, shards) == shard)
        .take(n)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_takes_down_only_its_channels_which_resume_when_it_is_back() {
    // Shards that keep their data across a restart (append-only file), as in
    // production: the channels' epochs and offsets survive the outage.
    let dir = std::env::temp_dir().join(format!("wsrelay-shards-{}", std::process::id()));
    let mut redis = Vec::new();
    for i in 0..3 {
        let dir = dir.join(i.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.to_str().unwrap().to_owned();
        redis.push(
            RedisServer::start_with(
                free_port(),
                &[
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--dir",
                    &dir,
                ],
            )
            .await,
        );
    }
    let urls = redis
        .iter()
        .map(RedisServer::url)
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let id = format!("n{i}");
        let args = [
            "--redis-url",
            &urls,
            "--node-id",
            &id,
            "--history-size",
            "100",
            "--broker-timeout",
            "500ms",
        ];
        let node = TestNode::start(&args).await;
        node.wait_ready().await;
        nodes.push(node);
    }
    let down = channels_on(0, 3, "chat", 1).remove(0);
    let up = channels_on(1, 3, "chat", 1).remove(0);
    let mut reader = nodes[1]
        .client(&format!("channel={down}&channel={up}"))
        .await;
    let mut writer = nodes[0].client("channel=side").await;
    let mut id = 0;
    let mut publish = async |writer: &mut Client, ch: &str| {
        id += 1;
        writer.publish(ch, json!(id), id).await
    };
    for ch in [&down, &up] {
        for _ in 0..3 {
            assert_eq!(publish(&mut writer, ch).await["op"], "ack");
        }
    }
    let got = reader.recv_msgs(6).await;
    assert_eq!(offsets(&got), [1, 2, 3, 1, 2, 3]);

    redis[0].kill();
    let dead = format!("127.0.0.1:{}", redis[0].port);
    for node in &nodes {
        common::wait_until("the node sees the dead shard", || {
            !node.handle.all_shards_usable()
        })
        .await;
        // The node still serves the other shards' channels: it stays ready.
        let (status, body) = http_get(node.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(shard_states(&body)[&dead], "down", "{body}");
        let text = node.handle.metrics_text();
        assert_eq!(
            metric(
                &text,
                &format!("wsrelay_broker_shard_up{{shard=\"{dead}\"}}")
            ),
            0.0
        );
        let alive = format!(
            "wsrelay_broker_shard_up{{shard=\"127.0.0.1:{}\"}}",
            redis[1].port
        );
        assert_eq!(metric(&text, &alive), 1.0, "{text}");
    }

    // The other shards' channels work as before.
    let ack = publish(&mut writer, &up).await;
    assert_eq!(
        (ack["op"].as_str(), ack["offset"].as_u64()),
        (Some("ack"), Some(4))
    );
    let msg = reader.recv().await;
    assert_eq!(
        (msg["ch"].as_str(), msg["offset"].as_u64()),
        (Some(up.as_str()), Some(4))
    );
    let mut newcomer = nodes[0].client("channel=side2").await;
    assert_eq!(newcomer.sub(&up, 1).await["op"], "ack");
    // The dead shard's channels answer `unavailable`, promptly.
    let started = std::time::Instant::now();
    let failed = publish(&mut writer, &down).await;
    assert_eq!(failed["code"], "unavailable", "{failed}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let refused = newcomer.sub(&down, 2).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");

    redis[0].restart().await;
    for node in &nodes {
        node.wait_ready().await;
    }
    // It resumes where it was: same epoch, the next offset, no gap.
    let deadline = tokio::time::Instant::now() + WAIT;
    let ack = loop {
        let reply = publish(&mut writer, &down).await;
        if reply["op"] == "ack" {
            break reply;
        }
        // The publishing connection may need one failed attempt to reconnect.
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(tokio::time::Instant::now() < deadline, "{reply}");
    };
    // An attempt answered `unavailable` may still have been published (as
    // documented): the reader gets every offset from 4 on, once, with no gap.
    let last = ack["offset"].as_u64().unwrap();
    assert!(last >= 4, "{ack}");
    let got = reader.recv_msgs((last - 3) as usize).await;
    assert!(
        got.iter()
            .all(|m| m["op"] == "msg" && m["ch"] == down.as_str()),
        "{got:?}"
    );
    assert_eq!(offsets(&got), (4..=last).collect::<Vec<_>>());
    assert_eq!(newcomer.sub(&down, 3).await["op"], "ack");
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
