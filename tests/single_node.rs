//! One node with the in-process memory broker (no Redis): the same relay behaviour,
//! bad input, slow consumers and heartbeats.

mod common;

use common::{Client, TestNode, WAIT, http_get};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_fans_out_in_order_with_acks() {
    let node = TestNode::start(&["--node-id", "solo", "--publish-burst", "1000"]).await;
    assert_eq!(http_get(node.addr, "/readyz").await.0, 200);
    let mut a = node.client("channel=room").await;
    let mut b = node.client("channel=room&channel=extra").await;
    let mut outsider = node.client("channel=elsewhere").await;
    assert_eq!(a.welcome["node"], "solo");
    assert_eq!(b.welcome["channels"], json!(["room", "extra"]));
    assert_ne!(a.welcome["conn"], b.welcome["conn"]);

    for seq in 0..200 {
        a.send(json!({"op":"pub","ch":"room","data":seq})).await;
    }
    let mut stash = Vec::new();
    let ack = a
        .request(
            json!({"op":"pub","ch":"elsewhere","data":"marker"}),
            4,
            &mut stash,
        )
        .await;
    assert_eq!(ack, json!({"op":"ack","id":4}));
    // The publisher receives its own messages (it is subscribed to room), in order.
    let mut own = stash;
    own.extend(a.recv_msgs(200 - own.len()).await);
    let b_msgs = b.recv_msgs(200).await;
    for seq in 0..200 {
        let expected = json!({"op":"msg","ch":"room","data":seq});
        assert_eq!(own[seq], expected);
        assert_eq!(b_msgs[seq], expected);
    }
    assert_eq!(outsider.recv().await["data"], "marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_default_channel_sub_and_unsub() {
    let node = TestNode::start(&["--default-channel", "lobby"]).await;
    let mut a = node.client("").await;
    let mut b = node.client("").await;
    assert_eq!(a.welcome["channels"], json!(["lobby"]));

    a.send(json!({"op":"pub","data":{"hi":true}})).await;
    assert_eq!(
        b.recv().await,
        json!({"op":"msg","ch":"lobby","data":{"hi":true}})
    );
    assert_eq!(a.recv().await["ch"], "lobby");

    assert_eq!(b.sub("news", 1).await, json!({"op":"ack","id":1}));
    // String ids are echoed as strings.
    b.send(json!({"op":"unsub","ch":"lobby","id":"u-1"})).await;
    assert_eq!(b.recv().await, json!({"op":"ack","id":"u-1"}));
    a.send(json!({"op":"pub","data":"lobby only"})).await;
    a.send(json!({"op":"pub","ch":"news","data":"news"})).await;
    assert_eq!(b.recv().await["data"], "news", "b left lobby");
    assert_eq!(node.handle.stats().subscriptions, 2);

    drop(a);
    drop(b);
    node.wait_registry_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_frames_and_the_connection_stays_usable() {
    let node = TestNode::start(&[]).await;
    let mut c = node.client("channel=room").await;

    c.send_text("this is not json").await;
    let e = c.recv().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
    assert!(e.get("id").is_none());

    let cases = [
        (json!({"op":"dance","id":1}), "unknown_op"),
        (
            json!({"op":"sub","ch":"no spaces","id":2}),
            "invalid_channel",
        ),
        (
            json!({"op":"sub","ch":"x".repeat(129),"id":3}),
            "invalid_channel",
        ),
        (
            json!({"op":"pub","ch":"","data":1,"id":4}),
            "invalid_channel",
        ),
        (json!({"op":"sub","id":5}), "bad_request"),
        (json!({"op":"pub","ch":"room","id":6}), "bad_request"),
        (json!({"ch":"room","id":7}), "bad_request"),
    ];
    for (request, code) in cases {
        let id = request["id"].clone();
        c.send(request).await;
        let e = c.recv().await;
        assert_eq!(e["op"], "error");
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(e["id"], id);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Still subscribed and able to publish.
    let mut stash = Vec::new();
    let ack = c
        .request(
            json!({"op":"pub","ch":"room","data":"still here"}),
            99,
            &mut stash,
        )
        .await;
    assert_eq!(ack["op"], "ack");
    let msgs = if stash.is_empty() {
        c.recv_msgs(1).await
    } else {
        stash
    };
    assert_eq!(msgs[0]["data"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_only_the_offender() {
    let node = TestNode::start(&["--max-message-bytes", "1024"]).await;
    let mut bystander = node.client("channel=room").await;

    let mut too_big = node.client("channel=room").await;
    too_big
        .send_text(&format!(r#"{{"op":"pub","data":"{}"}}"#, "x".repeat(2000)))
        .await;
    assert_eq!(too_big.expect_close().await, Some(1009));

    let mut binary = node.client("channel=room").await;
    binary
        .ws
        .send(Message::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(binary.expect_close().await, Some(1003));

    // The limit is on the message: many small fragments adding up to too much also close.
    let mut fragmented = node.client("channel=room").await;
    send_fragmented(&mut fragmented.ws, 1600, 100).await;
    assert_eq!(fragmented.expect_close().await, Some(1009));

    // Invalid channel at connect: refused before the upgrade.
    let refused = tokio_tungstenite::connect_async(node.ws_url("channel=bad%20name")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected HTTP 400, got {other:?}"),
    }

    // The bystander saw none of it and is fine.
    let mut stash = Vec::new();
    let ack = bystander
        .request(json!({"op":"pub","ch":"room","data":"ok"}), 1, &mut stash)
        .await;
    assert_eq!(ack["op"], "ack");
    let msgs = if stash.is_empty() {
        bystander.recv_msgs(1).await
    } else {
        stash
    };
    assert_eq!(msgs, vec![json!({"op":"msg","ch":"room","data":"ok"})]);
    drop(bystander);
    node.wait_registry_empty().await;
}

/// Sends one text message of `total` bytes as fragments of `chunk` bytes.
async fn send_fragmented(ws: &mut common::Ws, total: usize, chunk: usize) {
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let payload = vec![b'a'; total];
    let chunks: Vec<&[u8]> = payload.chunks(chunk).collect();
    for (i, part) in chunks.iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let last = i == chunks.len() - 1;
        let frame = Frame::message(part.to_vec(), opcode, last);
        if ws.send(Message::Frame(frame)).await.is_err() {
            return; // the server may close before the last fragment
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_with_1013_and_others_get_everything() {
    let node = TestNode::start(&[
        "--client-queue",
        "64",
        "--max-message-bytes",
        "16384",
        "--publish-rate",
        "1000000",
        "--publish-burst",
        "100000",
    ])
    .await;
    // Connected, subscribed, and never reading: its socket buffers fill, then its queue.
    let mut slow = node.client("channel=flood").await;
    let fast = node.client("channel=flood").await;
    let mut publisher = node.client("channel=control").await;

    const N: usize = 3000;
    let payload = "p".repeat(8 * 1024);
    let reader = tokio::spawn(async move {
        let mut fast = fast;
        let msgs = fast.recv_msgs(N).await;
        for (seq, msg) in msgs.iter().enumerate() {
            assert_eq!(
                msg["data"]["seq"], seq,
                "fast reader gets every message in order"
            );
        }
    });
    for seq in 0..N {
        publisher
            .send(json!({"op":"pub","ch":"flood","data":{"seq":seq,"pad":payload}}))
            .await;
    }
    timeout(WAIT * 3, reader)
        .await
        .expect("fast reader done")
        .unwrap();

    // The slow one, reading at last, finds its stream ended by 1013 after a prefix.
    let mut seen = 0;
    let code = loop {
        match timeout(WAIT, slow.ws.next()).await.expect("frame or close") {
            Some(Ok(Message::Text(_))) => seen += 1,
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1013));
    assert!(
        seen < N,
        "the slow consumer was cut off, not served in full ({seen})"
    );
    drop(publisher);
    node.wait_registry_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_live_clients_and_drop_silent_ones() {
    let node = TestNode::start(&["--ping-interval", "200ms"]).await;

    // A client that never reads never answers pings: dropped after an interval.
    let (_silent, _) = tokio_tungstenite::connect_async(node.ws_url("channel=a"))
        .await
        .unwrap();
    common::wait_until("silent client connected", || {
        node.handle.stats().connections == 1
    })
    .await;
    node.wait_registry_empty().await;

    // A client that reads answers pings (tungstenite replies automatically) and stays.
    let mut live = node.client("channel=a").await;
    let mut pings = 0;
    while pings < 4 {
        match timeout(WAIT, live.ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Ping(_) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(live.sub("b", 1).await["op"], "ack");
    assert_eq!(node.handle.stats().connections, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_and_probes_are_served() {
    let node = TestNode::start(&[]).await;
    let (status, body) = http_get(node.addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>wsrelay chat</title>") && body.contains("/ws"));
    assert_eq!(http_get(node.addr, "/healthz").await.0, 200);
    let (status, body) = http_get(node.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    // A plain GET on /ws is not an upgrade.
    assert!(http_get(node.addr, "/ws").await.0 >= 400);
    // Connecting works after all that.
    let _ = Client::connect(&node.ws_url("")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subprotocol_means_no_implicit_channel_and_ping_answers_pong() {
    let node = TestNode::start(&[]).await;
    let mut aware = common::connect_with_headers(
        &node.ws_url(""),
        &[("sec-websocket-protocol", "wsrelay.v1")],
    )
    .await
    .unwrap_or_else(|(status, body)| panic!("{status} {body}"));
    assert_eq!(aware.welcome["channels"], json!([]), "no default channel");
    let mut stash = Vec::new();
    let pong = aware.request(json!({"op":"ping"}), 5, &mut stash).await;
    assert_eq!(pong, json!({"op":"pong","id":5}));
    aware.send(json!({"op":"ping"})).await;
    assert_eq!(aware.recv().await, json!({"op":"pong"}));
    // Without the subprotocol, a bare connection is in the default channel, as before.
    let plain = node.client("").await;
    assert_eq!(plain.welcome["channels"], json!(["global"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_client_is_the_one_in_the_repository() {
    let node = TestNode::start(&[]).await;
    let (status, body) = common::http_get(node.addr, "/client.js").await;
    assert_eq!(status, 200);
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/src/index.js"
    ))
    .unwrap();
    assert_eq!(
        body, source,
        "GET /client.js serves clients/js/src/index.js as is"
    );
    let (status, page) = common::http_get(node.addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        page.contains(r#"import { Relay } from "/client.js";"#),
        "the chat page uses it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_keep_coming_are_written_together_and_an_idle_connection_at_once() {
    let node = TestNode::start(&["--write-pacing", "200ms", "--publish-rate", "1000"]).await;
    let mut reader = node.client("channel=burst").await;
    let mut writer = node.client("channel=elsewhere").await;
    let writes = |text: &str| common::metric(text, "wsrelay_client_writes_total");
    // An idle connection's message goes out at once, not after the pacing interval.
    // Idle means nothing written for longer than the interval (its welcome was):
    // time has to pass, there is no event to wait for.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let before = writes(&common::scrape(node.addr).await);
    let started = std::time::Instant::now();
    writer
        .send(serde_json::json!({"op":"pub","ch":"burst","data":0}))
        .await;
    assert_eq!(reader.recv().await["data"], 0);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(150),
        "the first message waited: {:?}",
        started.elapsed()
    );
    // A burst right after it: coalesced into a write or two, every message in order.
    for i in 1..=30 {
        writer
            .send(serde_json::json!({"op":"pub","ch":"burst","data":i}))
            .await;
    }
    for i in 1..=30 {
        assert_eq!(reader.recv().await["data"], i);
    }
    let after = writes(&common::scrape(node.addr).await);
    // The reader's writes: the first message, then the burst in at most two (the
    // writer's own acks for the publisher count too, none here: no ids).
    assert!(
        after - before <= 4.0,
        "{} writes for 31 messages to one client",
        after - before
    );
}

/// Pacing holds back the fan-out's frames, never the answer a client waits for: a
/// reply goes out at once even when the connection wrote less than an interval ago
/// (its welcome, then the previous ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_out_at_once_right_after_a_write() {
    let node = TestNode::start(&["--write-pacing", "1s", "--publish-rate", "1000"]).await;
    let mut client = node.client("channel=elsewhere").await;
    for id in 1..=5 {
        let started = std::time::Instant::now();
        client
            .send(serde_json::json!({"op":"pub","ch":"replies","data":id,"id":id}))
            .await;
        let ack = client.recv().await;
        assert_eq!(
            (ack["op"].as_str(), ack["id"].as_u64()),
            (Some("ack"), Some(id))
        );
        // Held back, it would wait out the 1 s interval.
        assert!(
            started.elapsed() < std::time::Duration::from_millis(500),
            "ack {id} waited {:?}",
            started.elapsed()
        );
    }
}

/// A WebSocket whose `welcome` must wait for a recovery's turn gets its
/// handshake's `101` at once (with a ping), not after the wait: in a storm the
/// turns are a queue of seconds, and a client library that times out its
/// handshake would give up and come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_waiting_for_its_recovery_turn_gets_its_101_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = common::config_file("[namespaces.chat]\nhistory-size = 1000\n");
    let flags = [
        "--config",
        &config,
        "--max-recoveries",
        "1",
        "--broker-timeout",
        "5s",
    ];
    let node = TestNode::start(&[&flags[..], &BULK[..]].concat()).await;
    let mut publisher = node.client("channel=side").await;
    for seq in 0..10 {
        publisher
            .send(json!({"op":"pub","ch":"chat:h","data":seq,"id":seq}))
            .await;
        publisher.recv().await;
    }
    let (_, ack) = publisher.sub_since("chat:h", None, 10).await;
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    // The first client reads nothing (a 4 KiB receive buffer): 12 MB fill its
    // socket, then more than half its queue's frames wait behind them. The turn
    // its recovery takes lasts until its writer got the queue under half, which
    // it cannot, so until --broker-timeout.
    let mut stalled = small_buffered_client(&node, "channel=flow").await;
    let filler = "x".repeat(30_000);
    for seq in 0..400 {
        publisher
            .send(json!({"op":"pub","ch":"flow","data":[seq, filler],"id":100 + seq}))
            .await;
    }
    for seq in 400..5500 {
        publisher
            .send(json!({"op":"pub","ch":"flow","data":seq,"id":100 + seq}))
            .await;
    }
    for _ in 0..5500 {
        publisher.recv().await;
    }
    let sub = json!({"op":"sub","ch":"chat:h","since":{"epoch":epoch,"offset":0},"id":"late"});
    stalled
        .send(Message::Text(sub.to_string().into()))
        .await
        .unwrap();
    common::eventually("the first recovery holds its turn", WAIT, async || {
        common::metric(
            &common::scrape(node.addr).await,
            "wsrelay_recoveries_running",
        ) == 1.0
    })
    .await;
    // The second waits for that turn; its handshake does not.
    let mut second = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let request = format!(
        "GET /ws?channel=chat:h&since=chat:h:{epoch}:9 HTTP/1.1\r\nHost: x\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    second.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    timeout(
        std::time::Duration::from_secs(2),
        second.read_exact(&mut head),
    )
    .await
    .expect("the 101 before the turn (up to 5 s away)")
    .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    assert_eq!(
        common::metric(
            &common::scrape(node.addr).await,
            "wsrelay_recoveries_waiting"
        ),
        1.0,
        "the second still waits for its turn"
    );
}

/// A WebSocket client with a 4 KiB receive buffer: what the node writes to it
/// fills its socket soon, and stays there while the test reads nothing.
async fn small_buffered_client(
    node: &TestNode,
    query: &str,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(node.ws_url(query), stream)
        .await
        .unwrap();
    ws
}

/// Limits for a publisher sending megabytes at once to a client that may fall
/// far behind: no rate limit in the way, and a queue that holds all of it.
const BULK: [&str; 8] = [
    "--publish-rate",
    "100000",
    "--publish-burst",
    "100000",
    "--client-queue",
    "10000",
    "--client-queue-bytes",
    "100000000",
];

/// The writer frames data itself while tungstenite answers the client's pings and
/// close on the same socket: every pong comes back with its payload, no frame is
/// torn, and the client's close is echoed after the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_a_close_from_the_client_are_answered_between_data_frames() {
    // Large messages: a batch is several times what the socket takes at once, so
    // it is written in parts, and the pongs must wait for its end.
    const N: usize = 1000;
    let filler = "x".repeat(30_000);
    let node = TestNode::start(&BULK).await;
    // A small receive buffer: the node's socket is full most of the time, so its
    // batches go out in parts while the pings come in.
    let mut ws = small_buffered_client(&node, "channel=flow").await;
    let mut publisher = node.client("channel=side").await;
    // How many messages the publisher has sent.
    let (progress, mut published) = tokio::sync::watch::channel(0);
    let publishing = tokio::spawn(async move {
        for seq in 0..N {
            publisher
                .send(json!({"op":"pub","ch":"flow","data":[seq, filler]}))
                .await;
            progress.send_replace(seq + 1);
        }
        publisher
    });
    let mut next = 0;
    let mut pongs = Vec::new();
    let mut sent = 0u32;
    while next < N || pongs.len() < 20 {
        // A ping every 50 messages, while the node is writing batches.
        if next / 50 > sent as usize && sent < 20 {
            sent += 1;
            let payload = format!("ping {sent}").into_bytes();
            timeout(WAIT, ws.send(Message::Ping(payload.into())))
                .await
                .unwrap()
                .unwrap();
            // Stop reading until 300 more messages (9 MB) are on their way: the
            // node's socket fills up in the middle of a batch, while it has the
            // ping to answer.
            let ahead = (next + 300).min(N);
            timeout(WAIT, published.wait_for(|sent| *sent >= ahead))
                .await
                .expect("published in time")
                .unwrap();
        }
        if next == N && sent < 20 {
            sent += 1;
            let payload = format!("ping {sent}").into_bytes();
            ws.send(Message::Ping(payload.into())).await.unwrap();
        }
        match timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).expect("whole frames");
                if frame["ch"] == "flow" {
                    assert_eq!(frame["data"][0], next, "in order, none lost");
                    next += 1;
                }
            }
            Some(Ok(Message::Pong(payload))) => {
                pongs.push(String::from_utf8(payload.to_vec()).unwrap())
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<String> = (1..=20).map(|i| format!("ping {i}")).collect();
    assert_eq!(pongs, expected);
    drop(publishing.await.unwrap());

    ws.send(Message::Close(Some(tungstenite::protocol::CloseFrame {
        code: 4321.into(),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let echoed = loop {
        match timeout(WAIT, ws.next()).await.expect("the echo in time") {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(Message::Text(_))) => {}
            other => panic!("expected the close echoed, got {other:?}"),
        }
    };
    assert_eq!(echoed, Some(4321));
    node.wait_registry_empty().await;
}

/// A client whose socket is full (it reads nothing for a while) still has its
/// requests read and answered as soon as it reads again: a request waits for the
/// frames queued before its answer, not for the next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_from_a_client_with_a_full_socket_is_answered_once_it_reads() {
    let sub = json!({"op":"sub","ch":"other","id":"late"});
    request_with_a_full_socket(&[], "flow", sub).await;
}

/// The same for a recovering `sub`, which waits for a recovery's turn (one at a
/// time here) before it is subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_from_a_client_with_a_full_socket_is_answered_once_it_reads() {
    let config = common::config_file("[namespaces.chat]\nhistory-size = 1000\n");
    let flags = ["--config", &config, "--max-recoveries", "1"];
    let sub = json!({"op":"sub","ch":"chat:other","since":{"epoch":"abc","offset":3},"id":"late"});
    request_with_a_full_socket(&flags, "chat:flow", sub).await;
}

/// A client with a 4 KiB receive buffer, subscribed to `flow`, gets 12 MB queued
/// and reads none of it; then sends `sub` (id "late"): the node reads it at once
/// (the node's subscriptions count it), and answers it once the client reads.
async fn request_with_a_full_socket(flags: &[&str], flow: &str, sub: serde_json::Value) {
    let filler = "x".repeat(30_000);
    let node = TestNode::start(&[flags, &BULK[..]].concat()).await;
    let mut ws = small_buffered_client(&node, &format!("channel={flow}")).await;
    let welcome = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains("welcome"),
        "{welcome:?}"
    );
    let mut publisher = node.client("channel=side").await;
    for seq in 0..400 {
        publisher
            .send(json!({"op":"pub","ch":flow,"data":[seq, filler], "id": seq}))
            .await;
    }
    // Every publication acked: all of them are queued or on the wire to the client.
    for _ in 0..400 {
        publisher.recv().await;
    }
    let sent = std::time::Instant::now();
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .unwrap();
    // Read while the client reads nothing: the node's socket to it is full.
    common::eventually("the sub read", WAIT, async || {
        common::metric(&common::scrape(node.addr).await, "wsrelay_subscriptions") == 3.0
    })
    .await;
    let mut seen = 0;
    loop {
        match timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Text(text))) => {
                let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                if frame["id"] == "late" {
                    break;
                }
                seen += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, 400, "the answer after the frames queued before it");
    let acked = sent.elapsed();
    assert!(
        acked < std::time::Duration::from_secs(5),
        "ack after {acked:?}"
    );
}
