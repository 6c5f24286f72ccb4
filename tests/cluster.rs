//! Several real nodes sharing one real Redis: cross-node fan-out, ordering,
//! subscribe-ack semantics, and interest-based Redis subscriptions.

mod common;

use std::time::Duration;

use common::{LatencyProxy, RedisServer, TestNode, http_get};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_in_order_and_only_to_subscribers() {
    let redis = RedisServer::start().await;
    // 201 publishes in a row from one connection: above the default burst.
    let n1 = TestNode::with_redis(&redis, "n1", &["--publish-burst", "1000"]).await;
    let n2 = TestNode::with_redis(&redis, "n2", &[]).await;
    let n3 = TestNode::with_redis(&redis, "n3", &[]).await;

    let mut subs = vec![
        n1.client("channel=room").await,
        n2.client("channel=room").await,
        n3.client("channel=room").await,
    ];
    let nodes: Vec<_> = subs.iter().map(|c| c.welcome["node"].clone()).collect();
    assert_eq!(nodes, vec![json!("n1"), json!("n2"), json!("n3")]);
    assert_eq!(subs[0].welcome["channels"], json!(["room"]));
    let mut other = n2.client("channel=other").await;
    let mut publisher = n1.client("channel=publisher").await;

    for seq in 0..200 {
        publisher
            .send(json!({"op":"pub","ch":"room","data":{"seq":seq}}))
            .await;
    }
    // Published after the 200 by the same connection: anything of `room` wrongly
    // delivered to `other` would arrive before this marker.
    let mut stash = Vec::new();
    let ack = publisher
        .request(
            json!({"op":"pub","ch":"other","data":"marker"}),
            1,
            &mut stash,
        )
        .await;
    assert_eq!(ack, json!({"op":"ack","id":1}));
    assert!(
        stash.is_empty(),
        "publisher is not subscribed to room: {stash:?}"
    );

    for sub in &mut subs {
        let msgs = sub.recv_msgs(200).await;
        for (seq, msg) in msgs.iter().enumerate() {
            assert_eq!(*msg, json!({"op":"msg","ch":"room","data":{"seq":seq}}));
        }
    }
    assert_eq!(
        other.recv().await,
        json!({"op":"msg","ch":"other","data":"marker"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_channel_broadcast_across_nodes() {
    let redis = RedisServer::start().await;
    let n1 = TestNode::with_redis(&redis, "n1", &[]).await;
    let n2 = TestNode::with_redis(&redis, "n2", &[]).await;
    let mut a = n1.client("").await;
    let mut b = n2.client("").await;
    assert_eq!(a.welcome["channels"], json!(["global"]));
    assert_eq!(b.welcome["channels"], json!(["global"]));

    // Data is forwarded exactly as published, whitespace and all.
    a.send_text(r#"{"op":"pub","data":{"text":"hello",  "n": [1, 2.50]}}"#)
        .await;
    let expected = r#"{"op":"msg","ch":"global","data":{"text":"hello",  "n": [1, 2.50]}}"#;
    for client in [&mut a, &mut b] {
        let frame =
            tokio::time::timeout(common::WAIT, futures_util::StreamExt::next(&mut client.ws))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
        assert_eq!(frame.into_text().unwrap().as_str(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sub_ack_means_the_next_publish_on_another_node_is_delivered() {
    let redis = RedisServer::start().await;
    // Node 2 reaches Redis over a slow link, so a `sub` acked before Redis confirmed
    // the SUBSCRIBE would lose the publish that follows the ack.
    let slow_link = LatencyProxy::start(redis.port, Duration::from_millis(150)).await;
    let n1 = TestNode::with_redis(&redis, "n1", &[]).await;
    let n2 = TestNode::start(&["--redis-url", &slow_link.url(), "--node-id", "n2"]).await;
    n2.wait_ready().await;
    let mut listener = n2.client("channel=lobby").await;
    let mut publisher = n1.client("channel=lobby").await;

    // Fresh channels every round: node 2 must SUBSCRIBE in Redis before it acks.
    for round in 0..4u64 {
        let channel = format!("fresh-{round}");
        assert_eq!(
            listener.sub(&channel, round).await,
            json!({"op":"ack","id":round})
        );
        let mut stash = Vec::new();
        let ack = publisher
            .request(
                json!({"op":"pub","ch":channel,"data":round}),
                1000 + round,
                &mut stash,
            )
            .await;
        assert_eq!(ack["op"], "ack");
        assert_eq!(
            listener.recv().await,
            json!({"op":"msg","ch":channel,"data":round})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_local_subscriber_leaving_unsubscribes_the_node_from_redis() {
    let redis = RedisServer::start().await;
    let n1 = TestNode::with_redis(&redis, "n1", &[]).await;
    let n2 = TestNode::with_redis(&redis, "n2", &[]).await;

    let mut a = n1.client("channel=room&channel=side").await;
    let b = n1.client("channel=room").await;
    let mut c = n2.client("channel=room").await;
    // One Redis subscription per node, however many local subscribers.
    assert_eq!(redis.numsub("room").await, 2);
    assert_eq!(redis.numsub("side").await, 1);
    assert_eq!(n1.handle.stats().subscriptions, 3);

    // `a` leaves room: node 1 keeps its subscription for `b`.
    let mut stash = Vec::new();
    assert_eq!(
        a.request(json!({"op":"unsub","ch":"room"}), 1, &mut stash)
            .await["op"],
        "ack"
    );
    assert_eq!(redis.numsub("room").await, 2);
    // `a` no longer gets room messages: the side marker, published after, comes first.
    c.send(json!({"op":"pub","ch":"room","data":"after-unsub"}))
        .await;
    c.send(json!({"op":"pub","ch":"side","data":"marker"}))
        .await;
    assert_eq!(c.recv().await["data"], "after-unsub");
    assert_eq!(
        a.recv().await,
        json!({"op":"msg","ch":"side","data":"marker"})
    );

    // `b`, the last subscriber of room on node 1, vanishes without a close frame.
    drop(b);
    redis.wait_numsub("room", 1).await;
    assert_eq!(redis.numsub("side").await, 1);

    drop(a);
    redis.wait_numsub("side", 0).await;
    n1.wait_registry_empty().await;
    assert_eq!(n2.handle.stats().connections, 1);
    drop(c);
    redis.wait_numsub("room", 0).await;
    n2.wait_registry_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    // Nothing listens on this port: the node starts, but is not ready.
    let port = common::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = TestNode::start(&["--redis-url", &url, "--broker-timeout", "300ms"]).await;
    let (status, body) = http_get(node.addr, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker unavailable"), "{body}");
    assert_eq!(http_get(node.addr, "/healthz").await.0, 200);

    // A client connecting now is told why it cannot be served.
    let (mut ws, _) = tokio_tungstenite::connect_async(node.ws_url("channel=a"))
        .await
        .unwrap();
    let frame = futures_util::StreamExt::next(&mut ws)
        .await
        .unwrap()
        .unwrap();
    let error: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
    assert_eq!(error["code"], "unavailable", "{error}");

    let _redis = RedisServer::start_on(port).await;
    node.wait_ready().await;
    assert_eq!(http_get(node.addr, "/readyz").await.0, 200);
    let mut client = node.client("channel=a").await;
    assert_eq!(client.sub("b", 1).await["op"], "ack");
}

/// `--legacy-envelopes`: plain messages go out in the version 1 envelope that nodes
/// from before history read, and current nodes read them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_envelopes_for_a_rolling_upgrade() {
    use futures_util::StreamExt;
    let redis = RedisServer::start().await;
    let old_style = TestNode::with_redis(&redis, "n1", &["--legacy-envelopes"]).await;
    let current = TestNode::with_redis(&redis, "n2", &[]).await;
    let mut tap = redis::Client::open(redis.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    tap.subscribe("wsrelay:legacy").await.unwrap();
    let mut listener = current.client("channel=legacy").await;
    let mut publisher = old_style.client("channel=other").await;
    let mut stash = Vec::new();
    let ack = publisher
        .request(
            json!({"op":"pub","ch":"legacy","data":{"n":1}}),
            1,
            &mut stash,
        )
        .await;
    assert_eq!(ack["op"], "ack");
    let pushed = tokio::time::timeout(common::WAIT, tap.on_message().next())
        .await
        .unwrap()
        .unwrap();
    let payload: Vec<u8> = pushed.get_payload().unwrap();
    assert_eq!(payload[0], 1, "version 1 envelope");
    assert_eq!(
        listener.recv().await,
        json!({"op":"msg","ch":"legacy","data":{"n":1}})
    );
}
