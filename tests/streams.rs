//! The streaming transports (SSE, HTTP streaming) against real nodes: a session's
//! requests posted to any node, recovery from `Last-Event-ID`, the refusals, the
//! drain, and the bounds on what a stream may hold.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Reads events until one satisfies `pred`; fails after [`WAIT`].
async fn until(stream: &mut StreamClient, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let event = stream
            .next()
            .await
            .unwrap_or_else(|| panic!("stream ended before {what}"));
        if pred(&event.data) {
            return event.data;
        }
    }
}

async fn requests_posted_to_any_node_reach_the_session(t: Topology) {
    let (a, b) = (t.node(0).addr, t.node(1).addr);
    let mut stream = StreamClient::sse(a, "channel=room", &[]).await;
    assert!(stream.head.contains("text/event-stream"), "{}", stream.head);
    assert!(!stream.session.is_empty());
    let mut watcher = t.node(1).client("channel=room").await;

    // Published through the other node: acked on the stream, delivered everywhere.
    let (status, body) = stream
        .request(b, json!({"op":"pub","ch":"room","data":{"n":1},"id":1}))
        .await;
    assert_eq!(status, 202, "{body}");
    until(&mut stream, "the ack", |f| f["op"] == "ack" && f["id"] == 1).await;
    let got = watcher.recv_msgs(1).await;
    assert_eq!(got[0]["data"], json!({"n":1}));

    // A subscription made through the other node brings that channel's messages.
    let (status, _) = stream
        .request(b, json!({"op":"sub","ch":"other","id":2}))
        .await;
    assert_eq!(status, 202);
    until(&mut stream, "the sub ack", |f| {
        f["op"] == "ack" && f["id"] == 2
    })
    .await;
    let mut publisher = t.node(1).client("channel=side").await;
    publisher.publish("other", json!({"n":2}), 3).await;
    let msg = until(&mut stream, "the message", |f| f["op"] == "msg").await;
    assert_eq!(
        (msg["ch"].clone(), msg["data"].clone()),
        (json!("other"), json!({"n":2}))
    );

    // Through another node, requests were forwarded (with one node, handed here).
    let route = if t.nodes.len() > 1 {
        "forwarded"
    } else {
        "local"
    };
    let posted = metric(
        &t.node(1).handle.metrics_text(),
        &format!("wsrelay_stream_requests_total{{route=\"{route}\"}}"),
    );
    assert!(posted >= 2.0, "{route}: {posted}");

    // A bad request gets its error on the stream, as over a WebSocket.
    let (status, _) = stream.request(b, json!({"op":"nope","id":4})).await;
    assert_eq!(status, 202);
    let error = until(&mut stream, "the error", |f| f["op"] == "error").await;
    assert_eq!(
        (error["id"].clone(), error["code"].clone()),
        (json!(4), json!("unknown_op"))
    );
}

#[tokio::test]
async fn requests_posted_to_any_node_reach_the_session_memory() {
    requests_posted_to_any_node_reach_the_session(Topology::memory(&[]).await).await;
}

#[tokio::test]
async fn requests_posted_to_any_node_reach_the_session_redis() {
    requests_posted_to_any_node_reach_the_session(Topology::redis(2, &[]).await).await;
}

#[tokio::test]
async fn requests_posted_to_any_node_reach_the_session_cluster() {
    requests_posted_to_any_node_reach_the_session(Topology::cluster(2, &[]).await).await;
}

/// A browser's `EventSource` reconnects by itself with `Last-Event-ID`: the id of
/// the last event it got names its place in every history channel, and the node it
/// reaches (any one) replays exactly what it missed.
#[tokio::test]
async fn a_reconnecting_event_source_recovers_what_it_missed_from_last_event_id() {
    let t = Topology::redis(2, &["--history-size", "100"]).await;
    let mut publisher = t.node(1).client("channel=side").await;
    let mut stream = StreamClient::sse(t.node(0).addr, "channel=h&channel=plain", &[]).await;
    for n in 1..=3 {
        publisher.publish("h", json!({"n": n}), n).await;
        let msg = until(&mut stream, "a message", |f| f["op"] == "msg").await;
        assert_eq!(msg["offset"], n);
    }
    let id = stream.last_event_id.clone().expect("events with an id");
    // Every history channel's place (both have history here), `h` at offset 3.
    assert!(
        id.split(',')
            .any(|p| p.starts_with("h:") && p.ends_with(":3")),
        "{id}"
    );
    drop(stream);
    for n in 4..=6 {
        publisher.publish("h", json!({"n": n}), n).await;
    }

    let mut again = StreamClient::sse(
        t.node(1).addr,
        "channel=h&channel=plain",
        &[("Last-Event-ID", &id)],
    )
    .await;
    let mut offsets = Vec::new();
    while offsets.len() < 3 {
        let msg = until(&mut again, "a replayed message", |f| f["op"] == "msg").await;
        offsets.push(msg["offset"].as_u64().unwrap());
    }
    assert_eq!(offsets, [4, 5, 6]);
    publisher.publish("h", json!({"n": 7}), 7).await;
    let msg = until(&mut again, "the live message", |f| f["op"] == "msg").await;
    assert_eq!(msg["offset"], 7);
    let id = again.last_event_id.clone().unwrap();
    assert!(
        id.split(',')
            .any(|p| p.starts_with("h:") && p.ends_with(":7")),
        "{id}"
    );

    // A malformed id is refused, not half-used.
    let bad = StreamClient::sse(t.node(0).addr, "channel=h", &[("Last-Event-ID", "h:x")]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.error_body()["error"], "bad_request");
}

#[tokio::test]
async fn requests_for_sessions_no_node_holds_are_refused() {
    for t in [
        Topology::memory(&["--max-message-bytes", "1024"]).await,
        Topology::redis(2, &["--max-message-bytes", "1024"]).await,
    ] {
        let (home, other) = (t.node(0).addr, t.node(1).addr);
        let stream = StreamClient::sse(home, "", &[]).await;
        // The session's node knows its sessions: a made-up secret is refused.
        let route = stream.session.split_once('.').unwrap().1;
        let nobody = format!("{:032x}.{route}", 7u128);
        let (status, body) = post_request(home, &nobody, r#"{"op":"ping"}"#).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("unknown_session"), "{body}");
        // No node has this route: nobody takes the forwarded request.
        let elsewhere = format!("{:032x}.{:016x}", 7u128, 9u64);
        assert_eq!(post_request(other, &elsewhere, "{}").await.0, 404);
        for malformed in ["", "abc", "x.y", &format!("{:031x}.1", 1u128)] {
            assert_eq!(
                post_request(other, malformed, "{}").await.0,
                400,
                "{malformed:?}"
            );
        }
        let addr = other;
        let big = format!(r#"{{"op":"pub","ch":"a","data":"{}"}}"#, "x".repeat(2000));
        assert_eq!(post_request(addr, &stream.session, &big).await.0, 413);
    }
}

/// A session takes a bounded number of waiting requests: with its broker stalled,
/// requests pile up to the bound, the next is refused with 429, and every one
/// accepted is answered once the broker is back.
#[tokio::test]
async fn a_session_holds_a_bounded_number_of_waiting_requests() {
    let t = Topology::redis(1, &["--broker-timeout", "3s"]).await;
    let addr = t.node(0).addr;
    let mut stream = StreamClient::sse(addr, "", &[]).await;
    t.redis[0].signal("STOP");
    // The first request holds the session (its subscribe waits for Redis).
    let (status, _) = stream
        .request(addr, json!({"op":"sub","ch":"x","id":0}))
        .await;
    assert_eq!(status, 202);
    let mut accepted = Vec::new();
    let refused = loop {
        let id = accepted.len() as u64 + 1;
        let (status, body) = stream.request(addr, json!({"op":"ping","id":id})).await;
        match status {
            202 => accepted.push(id),
            429 => break body,
            other => panic!("unexpected {other}: {body}"),
        }
        assert!(accepted.len() <= 32, "no bound on waiting requests");
    };
    assert!(refused.contains("too_many_requests"), "{refused}");
    assert!((16..=17).contains(&accepted.len()), "{}", accepted.len());
    t.redis[0].signal("CONT");
    let mut pongs = Vec::new();
    while pongs.len() < accepted.len() {
        let frame = stream.recv().await;
        if frame["op"] == "pong" {
            pongs.push(frame["id"].as_u64().unwrap());
        }
    }
    assert_eq!(pongs, accepted);
}

#[tokio::test]
async fn a_drained_node_ends_its_streams_with_a_reconnect_hint() {
    let node = TestNode::start(&[]).await;
    let mut sse = StreamClient::sse(node.addr, "channel=a", &[]).await;
    let mut ndjson = StreamClient::ndjson(node.addr, "channel=a").await;
    node.handle.shutdown();
    for stream in [&mut sse, &mut ndjson] {
        let close = until(stream, "the close frame", |f| f["op"] == "close").await;
        assert_eq!(close["code"], 1001);
        assert_eq!(close["reconnect"], true);
        assert!(stream.next().await.is_none(), "the stream ends after close");
    }
}

/// Streams are sessions: they count against `--max-connections`, not among the
/// pending HTTP connections, of which the oldest is evicted.
#[tokio::test]
async fn streams_are_sessions_not_pending_http_connections() {
    let node = TestNode::start(&["--max-http-connections", "2", "--max-connections", "5"]).await;
    let mut publisher = node.client("channel=side").await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(StreamClient::sse(node.addr, "channel=a", &[]).await);
    }
    // One more is one session too many.
    let refused = StreamClient::sse(node.addr, "channel=a", &[]).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error_body()["error"], "too_many_connections");
    publisher.publish("a", json!("all"), 1).await;
    for stream in &mut streams {
        let msg = until(stream, "the message", |f| f["op"] == "msg").await;
        assert_eq!(msg["data"], "all");
    }
}

#[tokio::test]
async fn http_streaming_carries_the_same_frames_and_heartbeats() {
    let node = TestNode::start(&["--ping-interval", "100ms"]).await;
    let mut stream = StreamClient::ndjson(node.addr, "channel=a").await;
    assert!(
        stream.head.contains("application/x-ndjson"),
        "{}",
        stream.head
    );
    let (status, _) = stream
        .request(node.addr, json!({"op":"ping","id":"p"}))
        .await;
    assert_eq!(status, 202);
    until(&mut stream, "the pong", |f| {
        f["op"] == "pong" && f["id"] == "p"
    })
    .await;
    let mut publisher = node.client("channel=side").await;
    publisher.publish("a", json!({"k":"v"}), 1).await;
    let msg = until(&mut stream, "the message", |f| f["op"] == "msg").await;
    assert_eq!(msg["data"], json!({"k":"v"}));
    // Heartbeats keep the stream going (a stream cannot answer pings: what it
    // takes is its sign of life).
    let before = stream.heartbeats;
    assert!(stream.try_next(Duration::from_millis(500)).await.is_none());
    assert!(stream.heartbeats > before, "no heartbeat in 500 ms");
    let (status, _) = stream
        .request(node.addr, json!({"op":"ping","id":"q"}))
        .await;
    assert_eq!(status, 202);
    until(&mut stream, "the pong", |f| {
        f["op"] == "pong" && f["id"] == "q"
    })
    .await;
}

/// A client that stops reading its stream is dropped: its queue fills (1013) or
/// its writes stall past `--write-timeout`; either way the node lets it go.
#[tokio::test]
async fn a_stream_nobody_reads_is_let_go() {
    let node = TestNode::start(&["--client-queue", "8", "--write-timeout", "300ms"]).await;
    let stream = StreamClient::sse(node.addr, "channel=a", &[]).await;
    let mut publisher = node.client("channel=side").await;
    let payload = "x".repeat(60 * 1024);
    for _ in 0..2000 {
        publisher.publish("a", json!(payload), 1).await;
        if node.handle.stats().connections == 1 {
            break;
        }
    }
    wait_until("the stream is let go", || {
        node.handle.stats().connections == 1
    })
    .await;
    drop(stream);
}

/// A page of another, allowed origin may read its stream and the answers to its
/// requests (CORS); a page of an origin that is not allowed gets neither.
#[tokio::test]
async fn pages_of_allowed_origins_may_read_streams_and_others_may_not() {
    let node = TestNode::start(&["--allowed-origins", "https://app.example"]).await;
    let allowed = [("Origin", "https://app.example")];
    let stream = StreamClient::sse(node.addr, "channel=a", &allowed).await;
    assert!(
        stream
            .head
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{}",
        stream.head
    );
    let (status, _) = http_request(
        node.addr,
        "POST",
        &format!("/stream/request?session={}", stream.session),
        &allowed,
        br#"{"op":"ping"}"#,
    )
    .await;
    assert_eq!(status, 202);

    let foreign = [("Origin", "https://evil.example")];
    let refused = StreamClient::sse(node.addr, "channel=a", &foreign).await;
    assert_eq!(refused.status, 403);
    let (status, body) = http_request(
        node.addr,
        "POST",
        &format!("/stream/request?session={}", stream.session),
        &foreign,
        br#"{"op":"ping"}"#,
    )
    .await;
    assert_eq!(status, 403, "{body}");
}
