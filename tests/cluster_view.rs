//! The cluster view: `/api/nodes` and the cluster-wide `/api/channels`, from real
//! nodes announcing themselves through a real Redis; a node killed with SIGKILL
//! leaves the view once its announcement expires.

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
    let expected = json!({"channels":[{"ch":"a","subscribers":3},{"ch":"b","subscribers":1}]});
    wait_api(n2.addr, "/api/channels", |b| *b == expected).await;
    // The local view is still there.
    assert_eq!(
        api(n2.addr, "/api/channels?node=local").await,
        json!({"node":"n2","channels":[{"ch":"a","subscribers":1}]})
    );

    n3.signal("KILL");
    n3.wait_exit(WAIT);
    wait_api(n1.addr, "/api/nodes", |b| ids(b) == ["n1", "n2"]).await;
    let expected = json!({"channels":[{"ch":"a","subscribers":3}]});
    wait_api(n1.addr, "/api/channels", |b| *b == expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_shows_itself() {
    let node = TestNode::start(&["--api-key", API_KEY]).await;
    let _c = node.client("channel=x").await;
    let body = wait_api(node.addr, "/api/nodes", |b| {
        b["nodes"].as_array().is_some_and(|n| n.len() == 1)
    })
    .await;
    assert_eq!(body["nodes"][0]["broker"], "memory");
    let channels = api(node.addr, "/api/channels").await;
    assert_eq!(channels, json!({"channels":[{"ch":"x","subscribers":1}]}));
}

/// The cluster view where the nodes' announcements live on the first of several
/// shards, or under one hash tag of a Redis Cluster.
async fn the_view_on(t: common::Topology) {
    let _a1 = t.node(0).client("channel=a").await;
    let _a2 = t.node(1).client("channel=a").await;
    let _b = t.node(1).client("channel=b").await;
    wait_api(t.node(0).addr, "/api/nodes", |b| ids(b) == ["n1", "n2"]).await;
    let expected = json!({"channels":[{"ch":"a","subscribers":2},{"ch":"b","subscribers":1}]});
    wait_api(t.node(0).addr, "/api/channels", |b| *b == expected).await;
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
