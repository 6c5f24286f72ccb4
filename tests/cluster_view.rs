//! The cluster view: `/api/nodes` and the cluster-wide `/api/channels`, from real
//! nodes announcing themselves through a real Redis; a node killed with SIGKILL is
//! `silent` (and out of the totals) within two announcement intervals, and leaves
//! the view once its announcement expires.

mod common;

use common::{NodeProcess, RedisServer, TestNode, WAIT, http_request};
use serde_json::{Value, json};

const API_KEY: &str = "api-key-0123456789abcdef";

async fn api(addr: std::net::SocketAddr, path: &str) -> Value {
    let auth = format!("Bearer {API_KEY}");
    let (status, body) =
        http_request(addr, "GET", path, &[("authorization", auth.as_str())], b"").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls `path` until `check` accepts its body.
async fn wait_api(addr: std::net::SocketAddr, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let body = api(addr, path).await;
        if check(&body) {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{path}: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn ids(body: &Value) -> Vec<String> {
    body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_channels_across_the_cluster() {
    let redis = RedisServer::start().await;
    let flags = ["--api-key", API_KEY, "--node-ttl", "1200ms"];
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let url = redis.url();
    let mut n3 =
        NodeProcess::spawn(&[&flags[..], &["--redis-url", &url, "--node-id", "n3"]].concat());
    n3.wait_ready().await;

    let _a1 = n1.client("channel=a").await;
    let _a2 = n1.client("channel=a").await;
    let _a3 = n2.client("channel=a").await;
    let _b = n3.client("channel=b").await;

    let body = wait_api(n1.addr, "/api/nodes", |b| ids(b) == ["n1", "n2", "n3"]).await;
    let n1_info = &body["nodes"][0];
    for field in [
        "version",
        "started_at",
        "address",
        "connections",
        "subscriptions",
        "channels",
        "published_per_s",
        "delivered_per_s",
        "ready",
    ] {
        assert!(n1_info.get(field).is_some(), "{field} in {n1_info}");
    }
    assert_eq!(n1_info["address"], n1.addr.to_string());
    wait_api(n2.addr, "/api/nodes", |b| {
        b["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["connections"].as_u64().unwrap())
            .collect::<Vec<_>>()
            == [2, 1, 1]
    })
    .await;
    let expected =
        json!({"channels":[{"ch":"a","subscribers":3},{"ch":"b","subscribers":1}],"left_out":[]});
    wait_api(n2.addr, "/api/channels", |b| *b == expected).await;
    // The local view is still there.
    assert_eq!(
        api(n2.addr, "/api/channels?node=local").await,
        json!({"node":"n2","channels":[{"ch":"a","subscribers":1}]})
    );

    n3.signal("KILL");
    n3.wait_exit(WAIT);
    wait_api(n1.addr, "/api/nodes", |b| ids(b) == ["n1", "n2"]).await;
    let expected = json!({"channels":[{"ch":"a","subscribers":3}],"left_out":[]});
    wait_api(n1.addr, "/api/channels", |b| *b == expected).await;
}

fn node<'a>(body: &'a Value, id: &str) -> &'a Value {
    body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("{id} in {body}"))
}

/// The issue this answers: a SIGKILLed node was listed as ready, its connection
/// counted, for the whole `--node-ttl`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_silent_within_two_intervals_and_out_of_the_totals() {
    let redis = RedisServer::start().await;
    // Announcements every second: silent after 2 s, gone after 6 s.
    let flags = ["--api-key", API_KEY, "--node-ttl", "6s"];
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let url = redis.url();
    let mut n3 =
        NodeProcess::spawn(&[&flags[..], &["--redis-url", &url, "--node-id", "n3"]].concat());
    n3.wait_ready().await;
    let _a = n1.client("channel=a").await;
    let _b = n3.client("channel=a&channel=b").await;

    let body = wait_api(n1.addr, "/api/nodes", |b| {
        b["totals"]["connections"] == 2 && b["totals"]["counted"] == 3
    })
    .await;
    assert_eq!(node(&body, "n3")["state"], "ready");
    assert_eq!(body["totals"]["left_out"], json!([]));
    assert_eq!(body["silent_after_ms"], 2000);
    assert!(node(&body, "n1")["heard_ms_ago"].as_u64().unwrap() < 2000);
    let shards = &node(&body, "n1")["shards"];
    assert_eq!(
        shards[0]["shard"],
        redis.url().trim_start_matches("redis://")
    );
    assert_eq!(shards[0]["state"], "up");
    wait_api(n1.addr, "/api/nodes", |b| {
        node(b, "n1")["shards"][0]["probe_rtt_ms"]
            .as_f64()
            .is_some()
    })
    .await;
    let one = api(n2.addr, "/api/channels?ch=a").await;
    assert_eq!(one["subscribers"], 2, "{one}");

    n3.signal("KILL");
    n3.wait_exit(WAIT);
    let killed = tokio::time::Instant::now();
    let body = wait_api(n1.addr, "/api/nodes", |b| {
        node(b, "n3")["state"] == "silent"
    })
    .await;
    // Two intervals from its last announcement, which came before the kill; the
    // slack is for the polling and the API round trips.
    let took = killed.elapsed();
    assert!(took < std::time::Duration::from_millis(2500), "{took:?}");
    assert!(node(&body, "n3")["heard_ms_ago"].as_u64().unwrap() > 2000);
    assert_eq!(body["totals"]["connections"], 1, "{body}");
    assert_eq!(body["totals"]["subscriptions"], 1, "{body}");
    assert_eq!(body["totals"]["counted"], 2);
    assert_eq!(body["totals"]["nodes"], 3);
    assert_eq!(body["totals"]["left_out"], json!(["n3"]));
    // Its subscribers are left out of the channels too, while it is still listed.
    let channels = api(n2.addr, "/api/channels").await;
    assert_eq!(
        channels,
        json!({"channels":[{"ch":"a","subscribers":1}],"left_out":["n3"]})
    );
    let one = api(n2.addr, "/api/channels?ch=a").await;
    assert_eq!(
        one,
        json!({"ch":"a","subscribers":1,"left_out":["n3"],"nodes":[
            {"node":"n1","subscribers":1,"state":"ready"},
            {"node":"n3","subscribers":1,"state":"silent"}]})
    );
    assert_eq!(ids(&api(n2.addr, "/api/nodes").await), ["n1", "n2", "n3"]);

    // A node that drains says so at once.
    n2.handle.shutdown();
    wait_api(n1.addr, "/api/nodes", |b| {
        node(b, "n2")["state"] == "draining"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_history_grows_oldest_first() {
    let redis = RedisServer::start().await;
    let flags = ["--api-key", API_KEY, "--node-ttl", "1200ms"];
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let _n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let _c = n1.client("channel=a").await;
    let body = wait_api(n1.addr, "/api/nodes/history", |b| {
        let nodes = b["nodes"].as_array().unwrap();
        nodes.len() == 2
            && nodes
                .iter()
                .all(|n| n["samples"].as_array().unwrap().len() >= 3)
    })
    .await;
    assert_eq!(body["window_ms"], 900_000);
    let samples = body["nodes"][0]["samples"].as_array().unwrap();
    // Oldest first, `[announced_at, connections, published/s, delivered/s]`.
    let times: Vec<u64> = samples.iter().map(|s| s[0].as_u64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    wait_api(n1.addr, "/api/nodes/history", |b| {
        b["nodes"][0]["samples"].as_array().unwrap().last().unwrap()[1] == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_shows_itself() {
    let node = TestNode::start(&["--api-key", API_KEY, "--node-ttl", "1200ms"]).await;
    let _c = node.client("channel=x").await;
    let body = wait_api(node.addr, "/api/nodes", |b| {
        b["nodes"].as_array().is_some_and(|n| n.len() == 1) && b["totals"]["connections"] == 1
    })
    .await;
    assert_eq!(body["nodes"][0]["broker"], "memory");
    let channels = api(node.addr, "/api/channels").await;
    assert_eq!(
        channels,
        json!({"channels":[{"ch":"x","subscribers":1}],"left_out":[]})
    );
    assert_eq!(body["nodes"][0]["state"], "ready");
    assert_eq!(body["totals"]["connections"], 1);
    let history = wait_api(node.addr, "/api/nodes/history", |b| {
        b["nodes"][0]["samples"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
    })
    .await;
    assert_eq!(history["nodes"][0]["id"], node.handle.node_id());
    // Bad input is a clear error.
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = http_request(
        node.addr,
        "GET",
        "/api/channels?ch=x&node=local",
        &[("authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = http_request(
        node.addr,
        "GET",
        "/api/channels?ch=",
        &[("authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_channel"), "{body}");
}

/// The cluster view where the nodes' announcements live on the first of several
/// shards, or under one hash tag of a Redis Cluster.
async fn the_view_on(t: common::Topology) {
    let _a1 = t.node(0).client("channel=a").await;
    let _a2 = t.node(1).client("channel=a").await;
    let _b = t.node(1).client("channel=b").await;
    wait_api(t.node(0).addr, "/api/nodes", |b| ids(b) == ["n1", "n2"]).await;
    let expected =
        json!({"channels":[{"ch":"a","subscribers":2},{"ch":"b","subscribers":1}],"left_out":[]});
    wait_api(t.node(0).addr, "/api/channels", |b| *b == expected).await;
    // Every shard, each with its probe's round trip once one came back.
    let body = wait_api(t.node(0).addr, "/api/nodes", |b| {
        b["nodes"].as_array().unwrap().iter().all(|n| {
            let shards = n["shards"].as_array().unwrap();
            !shards.is_empty()
                && shards
                    .iter()
                    .all(|s| s["state"] == "up" && s["probe_rtt_ms"].is_number())
        })
    })
    .await;
    let shards = body["nodes"][0]["shards"].as_array().unwrap().len();
    assert_eq!(shards, t.redis.len().max(1), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_on_shards() {
    let flags = ["--api-key", API_KEY, "--node-ttl", "1200ms"];
    the_view_on(common::Topology::sharded(3, 2, &flags).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_on_a_redis_cluster() {
    let flags = ["--api-key", API_KEY, "--node-ttl", "1200ms"];
    the_view_on(common::Topology::cluster(2, &flags).await).await;
}
