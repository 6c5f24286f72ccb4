//! permessage-deflate against real nodes, seen from a hand-written client: what the
//! upgrade answers, which frames carry RSV1, that a compressed payload inflates
//! alone (no context) to exactly what a plain client gets, that a node compresses a
//! publication once however many subscribers take it, and that compressed client
//! messages are inflated within the message bound.

mod common;

use std::time::Duration;

use common::raw::{BROWSER_OFFER, RawClient, deflate, ticker_json};
use common::{Client, RedisServer, TestNode, WAIT, metric, wait_until};
use serde_json::json;

const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn offer() -> [(&'static str, &'static str); 1] {
    [("Sec-WebSocket-Extensions", BROWSER_OFFER)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_is_agreed_and_large_frames_travel_compressed() {
    let node = TestNode::start(&[]).await;
    let mut raw = RawClient::connect(
        node.addr,
        "channel=ticker",
        &[
            ("Sec-WebSocket-Extensions", BROWSER_OFFER),
            ("Sec-WebSocket-Protocol", "other, wsrelay.v1"),
        ],
    )
    .await;
    assert_eq!(raw.header("sec-websocket-extensions"), Some(AGREED));
    assert_eq!(raw.header("sec-websocket-protocol"), Some("wsrelay.v1"));
    let (welcome, compressed) = raw.json().await;
    assert_eq!(welcome["op"], "welcome");
    assert!(!compressed, "a welcome this small goes plain");

    let mut plain = node.client("channel=ticker").await;
    let mut publisher = node.client("channel=other").await;
    let data = ticker_json(1, 1000);
    publisher.publish("ticker", data.clone(), 1).await;
    let frame = raw.data().await;
    assert!(frame.rsv1 && frame.fin && frame.opcode == 1, "{frame:?}");
    assert!(
        frame.payload.len() < frame.text().len() * 3 / 5,
        "{} B for {} B",
        frame.payload.len(),
        frame.text().len()
    );
    // Inflated alone, it is exactly the frame a plain client gets.
    let text = frame.text();
    let got = plain.recv().await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&text).unwrap(),
        got
    );
    assert_eq!(got["data"], data);

    // Small publications go plain.
    publisher.publish("ticker", json!({"n": 1}), 2).await;
    let (small, compressed) = raw.json().await;
    assert_eq!(small["data"], json!({"n": 1}));
    assert!(!compressed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_compresses_a_publication_once_for_all_its_subscribers() {
    let redis = RedisServer::start().await;
    let n1 = TestNode::with_redis(&redis, "n1", &[]).await;
    let n2 = TestNode::with_redis(&redis, "n2", &[]).await;
    let mut clients = Vec::new();
    for node in [&n1, &n1, &n1, &n2, &n2] {
        let mut raw = RawClient::connect(node.addr, "channel=feed", &offer()).await;
        assert_eq!(raw.json().await.0["op"], "welcome");
        clients.push(raw);
    }
    let mut plain = n2.client("channel=feed").await;
    let mut publisher = n1.client("channel=other").await;
    redis.wait_numsub("feed", 2).await;
    for (node, deflating) in [(&n1, 3.0), (&n2, 2.0)] {
        let text = node.handle.metrics_text();
        assert_eq!(metric(&text, "wsrelay_connections_deflate"), deflating);
    }

    let messages = 3u64;
    for i in 0..messages {
        publisher.publish("feed", ticker_json(i, 1000), i + 1).await;
    }
    let mut first = Vec::new();
    for (k, raw) in clients.iter_mut().enumerate() {
        for i in 0..messages as usize {
            let frame = raw.data().await;
            assert!(frame.rsv1);
            if k == 0 {
                first.push(frame.payload);
            } else {
                assert_eq!(frame.payload, first[i], "the same bytes for everyone");
            }
        }
    }
    let plain_frames = plain.recv_msgs(messages as usize).await;
    let plain_bytes: usize = plain_frames.iter().map(|f| f.to_string().len()).sum();
    let wire: usize = first.iter().map(Vec::len).sum();
    assert!(wire * 10 < plain_bytes * 6, "{wire} B for {plain_bytes} B");

    // One compression per publication and node, whatever the subscribers. A
    // writer counts what it saved after its write: the client may have the frame
    // a moment before the count is made.
    for (node, subscribers) in [(&n1, 3.0), (&n2, 2.0)] {
        wait_until("every writer counted its savings", || {
            let text = node.handle.metrics_text();
            let (raw_in, out) = (
                metric(&text, "wsrelay_compression_bytes_in_total"),
                metric(&text, "wsrelay_compression_bytes_out_total"),
            );
            metric(&text, "wsrelay_compression_saved_bytes_total") >= subscribers * (raw_in - out)
        })
        .await;
        let text = node.handle.metrics_text();
        assert_eq!(metric(&text, "wsrelay_compressions_total"), messages as f64);
        let (raw_in, out) = (
            metric(&text, "wsrelay_compression_bytes_in_total"),
            metric(&text, "wsrelay_compression_bytes_out_total"),
        );
        assert_eq!(out, wire as f64);
        assert_eq!(
            metric(&text, "wsrelay_compression_saved_bytes_total"),
            subscribers * (raw_in - out)
        );
    }
    drop(clients);
    wait_until("deflate connections gone", || {
        metric(&n1.handle.metrics_text(), "wsrelay_connections_deflate") == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_off_declines_and_the_threshold_applies() {
    let off = TestNode::start(&["--compression", "off"]).await;
    let mut raw = RawClient::connect(off.addr, "channel=a", &offer()).await;
    assert_eq!(raw.header("sec-websocket-extensions"), None);
    raw.json().await;
    let mut publisher = off.client("channel=b").await;
    publisher.publish("a", ticker_json(1, 2000), 1).await;
    assert!(!raw.json().await.1, "plain without the extension");

    let node = TestNode::start(&["--compression-min-bytes", "1500"]).await;
    let mut raw = RawClient::connect(node.addr, "channel=a", &offer()).await;
    assert_eq!(raw.header("sec-websocket-extensions"), Some(AGREED));
    raw.json().await;
    let mut publisher = node.client("channel=b").await;
    publisher.publish("a", ticker_json(1, 1000), 1).await;
    assert!(!raw.json().await.1, "under --compression-min-bytes");
    publisher.publish("a", ticker_json(2, 2000), 2).await;
    let (msg, compressed) = raw.json().await;
    assert!(compressed);
    assert_eq!(msg["data"], ticker_json(2, 2000));

    // An offer the node cannot take (a smaller server window) leaves the
    // connection plain, and working.
    let mut declined = RawClient::connect(
        node.addr,
        "channel=a",
        &[(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; server_max_window_bits=10",
        )],
    )
    .await;
    assert_eq!(declined.header("sec-websocket-extensions"), None);
    declined.json().await;
    publisher.publish("a", ticker_json(3, 2000), 3).await;
    let (msg, compressed) = declined.json().await;
    assert!(!compressed);
    assert_eq!(msg["data"], ticker_json(3, 2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_client_messages_are_inflated() {
    let node = TestNode::start(&[]).await;
    let mut plain = node.client("channel=room").await;
    let mut raw = RawClient::connect(node.addr, "channel=mine", &offer()).await;
    raw.json().await;

    // One frame.
    let data = ticker_json(5, 800);
    raw.send_compressed(&json!({"op":"pub","ch":"room","data":data,"id":1}).to_string())
        .await;
    assert_eq!(raw.json().await.0, json!({"op":"ack","id":1}));
    assert_eq!(plain.recv().await["data"], data);

    // Three fragments, a ping between the first two: the pong comes back, then
    // the ack.
    let request = json!({"op":"pub","ch":"room","data":ticker_json(6, 3000),"id":2}).to_string();
    let z = deflate(request.as_bytes());
    let (a, rest) = z.split_at(z.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    raw.send(false, true, 1, a).await;
    raw.send(true, false, 9, b"still there?").await;
    raw.send(false, false, 0, b).await;
    raw.send(true, false, 0, c).await;
    let pong = raw.frame().await;
    assert_eq!((pong.opcode, &pong.payload[..]), (10, &b"still there?"[..]));
    assert_eq!(raw.json().await.0, json!({"op":"ack","id":2}));
    assert_eq!(plain.recv().await["data"], ticker_json(6, 3000));
    let text = node.handle.metrics_text();
    assert_eq!(metric(&text, "wsrelay_frames_received_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflate_bomb_closes_with_1009_and_bad_data_with_1002() {
    let node = TestNode::start(&["--max-message-bytes", "65536"]).await;
    let mut bomber = RawClient::connect(node.addr, "channel=a", &offer()).await;
    bomber.json().await;
    // 32 MiB of one letter: ~32 KB compressed, under the bound on the wire.
    let bomb = deflate(&vec![b'a'; 32 << 20]);
    assert!(bomb.len() < 65536, "{}", bomb.len());
    bomber.send(true, true, 1, &bomb).await;
    assert_eq!(bomber.close_code().await, Some(1009));

    let mut garbler = RawClient::connect(node.addr, "channel=a", &offer()).await;
    garbler.json().await;
    garbler.send(true, true, 1, &[0xff; 16]).await;
    assert_eq!(garbler.close_code().await, Some(1002));

    // A compressed frame to a connection that did not negotiate it is a
    // protocol error too, as before.
    let mut plain = RawClient::connect(node.addr, "channel=a", &[]).await;
    plain.json().await;
    plain.send_compressed("{\"op\":\"ping\"}").await;
    assert_eq!(plain.close_code().await, Some(1002));

    let text = node.handle.metrics_text();
    assert_eq!(
        metric(&text, "wsrelay_client_closes_total{reason=\"too_large\"}"),
        1.0
    );
    // The node goes on serving.
    let mut client = node.client("channel=a").await;
    let mut stash = Vec::new();
    let pong = client.request(json!({"op":"ping"}), 1, &mut stash).await;
    assert_eq!(pong["op"], "pong");
}

/// The checks and refusals of the handshake are axum's, to the word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_refusals_are_unchanged() {
    let node = TestNode::start(&[]).await;
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "keep-alive, Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let without = |name: &str| -> Vec<(&str, &str)> {
        upgrade
            .iter()
            .copied()
            .filter(|(n, _)| *n != name)
            .collect()
    };
    for (headers, status, body) in [
        (
            without("Connection"),
            400,
            "Connection header did not include 'upgrade'",
        ),
        (
            without("Upgrade"),
            400,
            "`Upgrade` header did not include 'websocket'",
        ),
        (
            without("Sec-WebSocket-Key"),
            400,
            "`Sec-WebSocket-Key` header missing",
        ),
        (
            without("Sec-WebSocket-Version"),
            400,
            "`Sec-WebSocket-Version` header did not include '13'",
        ),
    ] {
        let (got, text) = get(node.addr, "/ws", &headers).await;
        assert_eq!((got, text.as_str()), (status, body), "{headers:?}");
    }
    // The checks of the node come after the handshake's, as before.
    let (status, body) = get(node.addr, "/ws?channel=bad%20name", &upgrade).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_channel"), "{body}");
    // And a full handshake still works, with the accept key of RFC 6455's example.
    let raw = RawClient::connect(node.addr, "", &[]).await;
    assert_eq!(
        raw.header("sec-websocket-accept"),
        Some("s3pplmbitxaq9kygzzhzrbk+xoo=")
    );
    let mut client = Client::connect(&node.ws_url("")).await;
    client.send(json!({"op":"ping"})).await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), client.recv())
            .await
            .unwrap(),
        json!({"op":"pong"})
    );
}

/// A GET with exactly these headers (and `Host`); the status and the body.
async fn get(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&response).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_lowercase()
                        .strip_prefix("content-length:")?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0usize);
            if body.len() >= length {
                let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
                return (status, body[..length].to_owned());
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed before the response: {text}");
        response.extend_from_slice(&chunk[..n]);
    }
}

/// Python's `websockets` (compression on by default): it negotiates, its compressed
/// publications are inflated, the node's compressed frames inflate on its side, and
/// its deflate bomb is closed with 1009. The interpreter is `$WSRELAY_PYTHON`
/// (scripts/test.sh sets it to a venv with `websockets`), else `python3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_interoperates() {
    let python = std::env::var("WSRELAY_PYTHON").unwrap_or_else(|_| "python3".into());
    let node = TestNode::start(&[]).await;
    let url = node.ws_url("");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/python/deflate_interop.py"
            ))
            .arg(url)
            .output()
            .unwrap_or_else(|e| panic!("{python}: {e}"))
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "the script failed (run ./scripts/test.sh, which installs websockets): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report,
        json!({
            "extensions_header": AGREED,
            "subprotocol": "wsrelay.v1",
            "deflate": true,
            "server_no_context_takeover": true,
            "client_no_context_takeover": true,
            "welcome": "welcome",
            "round_trip_intact": true,
            "bomb_close_code": 1009,
        })
    );
    let text = node.handle.metrics_text();
    assert_eq!(metric(&text, "wsrelay_compressions_total"), 3.0);
    assert!(metric(&text, "wsrelay_compression_saved_bytes_total") > 300.0);
    assert_eq!(
        metric(&text, "wsrelay_client_closes_total{reason=\"too_large\"}"),
        1.0
    );
}
