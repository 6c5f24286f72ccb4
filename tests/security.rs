//! Authentication, authorisation, origin policy, limits, the slowloris guard and the
//! server publish API, against real nodes.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, RedisServer, TestNode, WAIT, connect_with_headers, http_get, http_request};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-of-some-length";
const API_KEY: &str = "api-key-0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn hs256(claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token(channels: &[&str], publish: &[&str], ttl: i64) -> String {
    hs256(
        json!({"sub": "user-1", "exp": (now() as i64 + ttl), "channels": channels, "publish": publish}),
        SECRET,
    )
}

async fn authed_node(extra: &[&str]) -> TestNode {
    let mut args = vec!["--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    TestNode::start(&args).await
}

fn json_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_before_the_upgrade() {
    let node = authed_node(&[]).await;
    let url = node.ws_url("channel=room:1");
    let good = token(&["room:*"], &[], 600);

    let cases = [
        (vec![], "missing token"),
        (
            vec![("authorization", "Bearer not.a.jwt".to_owned())],
            "invalid token",
        ),
        (
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    hs256(
                        json!({"exp": now() + 600, "channels": ["*"]}),
                        "another-secret"
                    )
                ),
            )],
            "invalid token",
        ),
        (
            vec![(
                "authorization",
                format!("Bearer {}", token(&["*"], &[], -60)),
            )],
            "token expired",
        ),
        (
            vec![(
                "authorization",
                format!("Bearer {}", hs256(json!({"channels": ["*"]}), SECRET)),
            )],
            "invalid token",
        ),
        (
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    hs256(
                        json!({"exp": now() + 600, "nbf": now() + 300, "channels": ["*"]}),
                        SECRET
                    )
                ),
            )],
            "not valid yet",
        ),
    ];
    for (headers, reason) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = connect_with_headers(&url, &headers)
            .await
            .err()
            .expect("refused");
        assert_eq!(status, 401, "{reason}: {body}");
        let body = json_body(&body);
        assert_eq!(body["error"], "unauthorized");
        assert!(
            body["message"].as_str().unwrap().contains(reason),
            "{reason}: {body}"
        );
    }

    // Header and query parameter both work.
    let bearer = format!("Bearer {good}");
    let client = connect_with_headers(&url, &[("authorization", &bearer)])
        .await
        .expect("accepted");
    assert_eq!(client.welcome["channels"], json!(["room:1"]));
    let client = Client::connect(&node.ws_url(&format!("channel=room:2&token={good}"))).await;
    assert_eq!(client.welcome["channels"], json!(["room:2"]));
    // A channel the token does not grant is refused at connect.
    let (status, body) = connect_with_headers(
        &node.ws_url("channel=secret"),
        &[("authorization", &bearer)],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (403, json!("forbidden"))
    );
}

/// A correctly signed token whose `exp` is beyond what the clock can represent
/// (2^63 - 1 seconds and more) is a long-lived token, not a panic that drops the
/// connection without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_beyond_the_clock_is_long_lived() {
    let node = authed_node(&[]).await;
    for exp in [i64::MAX as u64, u64::MAX - 1, u64::MAX] {
        let token = hs256(json!({"exp": exp, "channels": ["room:*"]}), SECRET);
        let mut client =
            Client::connect(&node.ws_url(&format!("channel=room:1&token={token}"))).await;
        assert_eq!(client.welcome["channels"], json!(["room:1"]), "exp {exp}");
        client.send(json!({"op": "ping", "id": 1})).await;
        assert_eq!(client.recv().await["id"], 1, "exp {exp}: still served");
    }
    // The node is fine for everyone else.
    let good = token(&["room:*"], &[], 600);
    Client::connect(&node.ws_url(&format!("channel=room:2&token={good}"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens_from_a_public_key() {
    let key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/es256-public.pem");
    let node = TestNode::start(&["--jwt-public-key-file", key]).await;
    let private = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/keys/es256-private.pem"
    ))
    .unwrap();
    let claims = json!({"exp": now() + 600, "channels": ["a"], "publish": ["a"]});
    let es256 = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&private).unwrap(),
    )
    .unwrap();
    let mut client = Client::connect(&node.ws_url(&format!("channel=a&token={es256}"))).await;
    let mut stash = Vec::new();
    assert_eq!(
        client
            .request(json!({"op":"pub","ch":"a","data":1}), 1, &mut stash)
            .await["op"],
        "ack"
    );
    // An HS256 token is not accepted by an ES256 node.
    let hs = token(&["a"], &["a"], 600);
    let (status, _) = connect_with_headers(&node.ws_url(&format!("channel=a&token={hs}")), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_permissions_apply_to_sub_and_pub() {
    let node = authed_node(&["--expose-publisher"]).await;
    let t = token(&["room:*"], &["room:1"], 600);
    let mut c = Client::connect(&node.ws_url(&format!("channel=room:1&token={t}"))).await;
    let mut stash = Vec::new();

    assert_eq!(c.sub("room:2", 1).await, json!({"op":"ack","id":1}));
    let e = c
        .request(json!({"op":"sub","ch":"lobby"}), 2, &mut stash)
        .await;
    assert_eq!(
        (e["code"].as_str(), e["id"].as_u64()),
        (Some("forbidden"), Some(2)),
        "{e}"
    );
    let e = c
        .request(json!({"op":"pub","ch":"room:2","data":"x"}), 3, &mut stash)
        .await;
    assert_eq!(e["code"], "forbidden", "{e}");
    let ack = c
        .request(json!({"op":"pub","ch":"room:1","data":"ok"}), 4, &mut stash)
        .await;
    assert_eq!(ack["op"], "ack");
    let msg = if stash.is_empty() {
        c.recv_msgs(1).await.remove(0)
    } else {
        stash.remove(0)
    };
    assert_eq!(
        msg,
        json!({"op":"msg","ch":"room:1","from":"user-1","data":"ok"})
    );
    assert!(
        stash.is_empty(),
        "nothing of room:2 was published: {stash:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_connection_closes_it_with_1008() {
    let node = authed_node(&["--jwt-leeway", "0s"]).await;
    let t = token(&["*"], &["*"], 2);
    let mut c = Client::connect(&node.ws_url(&format!("channel=a&token={t}"))).await;
    // Still served before the expiry...
    assert_eq!(c.sub("b", 1).await["op"], "ack");
    let started = std::time::Instant::now();
    // ...closed at it.
    assert_eq!(c.expect_close().await, Some(1008));
    assert!(
        started.elapsed() <= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    node.wait_registry_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked() {
    let node = TestNode::start(&[
        "--allowed-origins",
        "https://good.example,*.trusted.example",
    ])
    .await;
    let url = node.ws_url("");
    for origin in ["https://good.example", "https://app.trusted.example"] {
        assert!(
            connect_with_headers(&url, &[("origin", origin)])
                .await
                .is_ok(),
            "{origin}"
        );
    }
    let (status, body) = connect_with_headers(&url, &[("origin", "https://evil.example")])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (403, json!("origin_not_allowed"))
    );
    // No Origin: not a browser, allowed.
    assert!(connect_with_headers(&url, &[]).await.is_ok());

    // By default only pages served by the node itself.
    let default = TestNode::start(&[]).await;
    let own = format!("http://{}", default.addr);
    assert!(
        connect_with_headers(&default.ws_url(""), &[("origin", &own)])
            .await
            .is_ok()
    );
    let (status, _) = connect_with_headers(
        &default.ws_url(""),
        &[("origin", "https://elsewhere.example")],
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_rate_limit_is_hit_recovers_and_cuts_persistent_abuse() {
    let node = TestNode::start(&["--publish-rate", "5", "--publish-burst", "3"]).await;
    let mut c = node.client("channel=a").await;
    let mut stash = Vec::new();
    for id in 1..=3 {
        assert_eq!(
            c.request(json!({"op":"pub","ch":"z","data":id}), id, &mut stash)
                .await["op"],
            "ack"
        );
    }
    let e = c
        .request(json!({"op":"pub","ch":"z","data":4}), 4, &mut stash)
        .await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    // The bucket refills at 5/s: 250 ms later one publish is allowed again.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        c.request(json!({"op":"pub","ch":"z","data":5}), 5, &mut stash)
            .await["op"],
        "ack"
    );

    // A client that keeps publishing while refused is cut off.
    for seq in 0..10 {
        c.send(json!({"op":"pub","ch":"z","data":seq})).await;
    }
    assert_eq!(c.expect_close().await, Some(1008));
}

/// `sub` is rate limited like `pub`: each new subscription may send a `join` to
/// every subscriber of the channel, and sub/unsub pairs must not flood them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_is_rate_limited_so_joins_cannot_flood() {
    let node = TestNode::start(&[
        "--join-leave",
        "--subscribe-rate",
        "2",
        "--subscribe-burst",
        "4",
    ])
    .await;
    let mut watcher = node.client("channel=room").await;
    let mut c = node.client("").await;
    let mut stash = Vec::new();
    for id in 1..=4 {
        let ack = c
            .request(json!({"op":"sub","ch":"room"}), id, &mut stash)
            .await;
        assert_eq!(ack["op"], "ack", "{ack}");
        c.send(json!({"op":"unsub","ch":"room"})).await;
    }
    let e = c
        .request(json!({"op":"sub","ch":"room"}), 5, &mut stash)
        .await;
    assert_eq!(e["code"], "rate_limited", "{e}");
    let other = c
        .request(json!({"op":"sub","ch":"other"}), 6, &mut stash)
        .await;
    assert_eq!(other["code"], "rate_limited", "any channel: {other}");
    let mut joins = 0;
    let me = c.welcome["conn"].clone();
    while let Some(frame) = watcher.try_recv(Duration::from_millis(300)).await {
        joins += usize::from(frame["op"] == "join" && frame["conn"] == me);
    }
    assert_eq!(joins, 4, "one join per subscription allowed");
    // The bucket refills at 2/s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ack = c
        .request(json!({"op":"sub","ch":"room"}), 7, &mut stash)
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    // Subscribing to a channel already subscribed to changes nothing: not limited.
    let again = c
        .request(json!({"op":"sub","ch":"room"}), 8, &mut stash)
        .await;
    assert_eq!(again["op"], "ack", "already subscribed: {again}");
    // A client that keeps subscribing while refused is cut off.
    for k in 0..10 {
        c.send(json!({"op":"sub","ch":format!("spam{k}")})).await;
    }
    assert_eq!(c.expect_close().await, Some(1008));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_limits_answer_clearly() {
    let node = TestNode::start(&[
        "--max-connections",
        "2",
        "--max-subscriptions",
        "2",
        "--max-channels",
        "3",
    ])
    .await;
    let mut a = node.client("channel=one").await;
    let _b = node.client("channel=two").await;
    let (status, body) = connect_with_headers(&node.ws_url(""), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (503, json!("too_many_connections"))
    );

    let mut stash = Vec::new();
    assert_eq!(
        a.request(json!({"op":"sub","ch":"three"}), 1, &mut stash)
            .await["op"],
        "ack"
    );
    let e = a
        .request(json!({"op":"sub","ch":"four"}), 2, &mut stash)
        .await;
    assert_eq!(
        e["code"], "limit_exceeded",
        "subscriptions per connection: {e}"
    );
    a.request(json!({"op":"unsub","ch":"one"}), 3, &mut stash)
        .await;
    // one was still held by nobody else, so the node has two channels (two, three).
    assert_eq!(
        a.request(json!({"op":"sub","ch":"four"}), 4, &mut stash)
            .await["op"],
        "ack"
    );
    a.request(json!({"op":"unsub","ch":"four"}), 5, &mut stash)
        .await;
    // Three channels on the node: a fourth distinct one is refused.
    assert_eq!(
        a.request(json!({"op":"sub","ch":"five"}), 6, &mut stash)
            .await["op"],
        "ack"
    );
    let e = a
        .request(json!({"op":"sub","ch":"six"}), 7, &mut stash)
        .await;
    assert_eq!(e["code"], "limit_exceeded", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_limit_also_applies_at_connect() {
    let node = TestNode::start(&["--max-channels", "2"]).await;
    let _a = node.client("channel=one&channel=two").await;
    // Existing channels are fine; a third one is not, at connect as with `sub`.
    let _b = node.client("channel=two").await;
    let (status, body) = connect_with_headers(&node.ws_url("channel=two&channel=three"), &[])
        .await
        .err()
        .unwrap();
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (503, json!("limit_exceeded"))
    );
    assert_eq!(node.handle.stats().channels, 2);
}

/// Clients that open HTTP connections and trickle their requests cannot take every
/// file descriptor of a node: past --max-http-connections the oldest is closed, so
/// probes and new clients get in at once instead of after the handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_cannot_take_every_socket() {
    let node =
        common::NodeProcess::spawn(&["--max-http-connections", "32", "--max-connections", "32"]);
    node.wait_ready().await;
    // 128 file descriptors in all: the attack below needs 200.
    let limit = libc::rlimit {
        rlim_cur: 128,
        rlim_max: 128,
    };
    let pid = node.pid() as libc::pid_t;
    // SAFETY: prlimit reads `limit` and writes nothing (no old-limit pointer).
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());

    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        slow.push(s);
    }
    let (status, _) = timeout(Duration::from_secs(3), http_get(node.addr, "/healthz"))
        .await
        .expect("a probe is answered at once");
    assert_eq!(status, 200);
    let mut client = timeout(Duration::from_secs(3), node.client(""))
        .await
        .expect("a client gets in at once");
    let pong = client
        .request(json!({"op":"ping"}), 1, &mut Vec::new())
        .await;
    assert_eq!(pong["op"], "pong");
    // The oldest trickling connections were the ones closed.
    let mut byte = [0u8; 1];
    let read = timeout(Duration::from_secs(3), slow[0].read(&mut byte))
        .await
        .expect("closed by the node");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_or_silent_http_clients_are_dropped() {
    let node = TestNode::start(&["--handshake-timeout", "500ms"]).await;
    // One sends half a request head and stalls; the other sends nothing at all.
    let mut slow = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: webs")
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    for stream in [&mut slow, &mut silent] {
        let started = std::time::Instant::now();
        let mut buf = [0u8; 512];
        // The server answers (408) or just closes; either way the read ends.
        loop {
            match tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("dropped in time")
            {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    // The node still serves.
    node.client("").await;
}

/// A request body is bounded in time and bytes, and a client without the API key
/// never gets to send one: a trickled `POST /api/publish` cannot hold connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_or_oversized_request_body_is_answered_at_once() {
    let node = TestNode::start(&[
        "--api-key",
        API_KEY,
        "--max-api-body-bytes",
        "1024",
        "--handshake-timeout",
        "1s",
    ])
    .await;
    // Writes a request head declaring `length` bytes and one byte of body, then
    // waits for the answer: its status and how long it took.
    let answer = async |auth: bool, length: u64| -> (u16, Duration) {
        let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        let key = if auth {
            format!("Authorization: Bearer {API_KEY}\r\n")
        } else {
            String::new()
        };
        let head = format!(
            "POST /api/publish HTTP/1.1\r\nHost: relay\r\n{key}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while !response.windows(4).any(|w| w == b"\r\n\r\n") {
            match timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("an answer in time")
            {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&response);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
        (status, started.elapsed())
    };
    // No key: refused before any body is read.
    let (status, took) = answer(false, 100).await;
    assert_eq!(status, 401);
    assert!(took < Duration::from_millis(500), "{took:?}");
    // A declared length over the limit: 413 before any body is read.
    let (status, took) = answer(true, 999_999_999).await;
    assert_eq!(status, 413);
    assert!(took < Duration::from_millis(500), "{took:?}");
    // A body that never arrives: 408 within the request timeout.
    let (status, took) = answer(true, 100).await;
    assert_eq!(status, 408);
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Meanwhile the node serves everyone else.
    assert_eq!(http_get(node.addr, "/healthz").await.0, 200);
    node.client("").await;
}

/// A query parameter given twice is refused, on every endpoint alike, instead of
/// one of its values being picked (the first on one endpoint, the last on another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_parameter_given_twice_is_refused() {
    let node = TestNode::start(&["--api-key", API_KEY, "--history-size", "10"]).await;
    let auth = format!("Bearer {API_KEY}");
    for path in [
        "/api/history?ch=a&ch=b",
        "/api/history?ch=a&limit=1&limit=2",
        "/api/presence?ch=a&ch=b",
        "/api/presence_stats?ch=a&ch=b",
    ] {
        let (status, body) =
            http_request(node.addr, "GET", path, &[("authorization", &auth)], b"").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            json_body(&body)["message"]
                .as_str()
                .unwrap()
                .contains("given twice"),
            "{path}: {body}"
        );
    }
    let (status, body) =
        connect_with_headers(&node.ws_url("channel=a&since=a:k3x9:1&since=a:k3x9:2"), &[])
            .await
            .err()
            .expect("refused");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("since given twice"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_publish_api() {
    let redis = RedisServer::start().await;
    let key_flags = ["--api-key", API_KEY, "--max-api-body-bytes", "1024"];
    let n1 = TestNode::with_redis(&redis, "n1", &key_flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &key_flags).await;
    let mut listener = n2.client("channel=news").await;
    let auth = format!("Bearer {API_KEY}");
    let json_type = ("content-type", "application/json");

    let one = br#"{"ch":"news","data":{"title":"hello"}}"#;
    let (status, body) = http_request(n1.addr, "POST", "/api/publish", &[json_type], one).await;
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (401, json!("unauthorized"))
    );
    let wrong = format!("Bearer {API_KEY}x");
    let (status, _) = http_request(
        n1.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &wrong)],
        one,
    )
    .await;
    assert_eq!(status, 401);
    let big = format!(r#"{{"ch":"news","data":"{}"}}"#, "x".repeat(2000));
    let (status, body) = http_request(
        n1.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &auth)],
        big.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(json_body(&body)["error"], "too_large");
    let (status, body) = http_request(
        n1.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &auth)],
        b"{nope",
    )
    .await;
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (400, json!("bad_request"))
    );
    let bad_channel = br#"{"messages":[{"ch":"ok","data":1},{"ch":"not ok","data":2}]}"#;
    let (status, body) = http_request(
        n1.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &auth)],
        bad_channel,
    )
    .await;
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (400, json!("invalid_channel"))
    );

    // A good key reaches subscribers on another node, a batch in order.
    let (status, body) = http_request(
        n1.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &auth)],
        one,
    )
    .await;
    assert_eq!((status, json_body(&body)), (200, json!({"published": 1})));
    assert_eq!(
        listener.recv().await,
        json!({"op":"msg","ch":"news","data":{"title":"hello"}})
    );
    let batch =
        br#"{"messages":[{"ch":"news","data":1},{"ch":"news","data":2},{"ch":"news","data":3}]}"#;
    let (status, body) = http_request(
        n1.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &auth)],
        batch,
    )
    .await;
    assert_eq!((status, json_body(&body)), (200, json!({"published": 3})));
    let data: Vec<Value> = listener
        .recv_msgs(3)
        .await
        .into_iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(data, vec![json!(1), json!(2), json!(3)]);

    let (status, body) = http_request(
        n2.addr,
        "GET",
        "/api/channels?node=local",
        &[("authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        json_body(&body)["channels"],
        json!([{"ch": "news", "subscribers": 1}])
    );

    // Without any key configured, the API is off.
    let plain = TestNode::start(&[]).await;
    let (status, body) = http_request(
        plain.addr,
        "POST",
        "/api/publish",
        &[json_type, ("authorization", &auth)],
        one,
    )
    .await;
    assert_eq!(
        (status, json_body(&body)["error"].clone()),
        (403, json!("api_disabled"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_envelope_from_redis_is_counted_and_dropped() {
    let redis = RedisServer::start().await;
    let node = TestNode::with_redis(&redis, "n1", &[]).await;
    let mut listener = node.client("channel=feed").await;
    let mut publisher = node.client("channel=other").await;
    let mut conn = redis.connection().await.unwrap();
    for garbage in [
        &b"not an envelope"[..],
        b"\x01short",
        b"",
        b"\x01\0\0\0\0\0\0\0\0\0\xff\xfe",
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("wsrelay:feed")
            .arg(garbage)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // Published after the garbage: if any of it had been delivered, it would come first.
    publisher
        .send(json!({"op":"pub","ch":"feed","data":"real"}))
        .await;
    assert_eq!(
        listener.recv().await,
        json!({"op":"msg","ch":"feed","data":"real"})
    );
    let text = node.handle.metrics_text();
    assert_eq!(
        common::metric(
            &text,
            "wsrelay_broker_dropped_messages_total{reason=\"malformed\"}"
        ),
        4.0,
        "{text}"
    );
}

// One client must not pin memory: whatever a connection holds for its client is
// bounded in bytes (`--client-queue-bytes`), and so is every read it asks for
// (`--max-history-bytes`).

/// A WebSocket whose socket takes in only a few KiB (a client that never reads).
async fn deaf_client(url: &str) -> common::Ws {
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = timeout(WAIT, socket.connect(addr)).await.unwrap().unwrap();
    let (mut ws, _) = timeout(
        WAIT,
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream)),
    )
    .await
    .expect("handshake in time")
    .expect("handshake");
    let welcome = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    ws
}

/// Publishes `n` messages of about `size` bytes to `ch`, waiting for every ack.
async fn publish_big(client: &mut Client, ch: &str, n: usize, size: usize) {
    let pad = "x".repeat(size);
    for i in 0..n {
        client
            .send(json!({"op":"pub","ch":ch,"data":{"i":i,"pad":pad},"id":i + 1}))
            .await;
    }
    let mut acked = 0;
    while acked < n {
        let frame = client.recv().await;
        if frame["op"] == "ack" {
            acked += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_pin_memory_with_recoveries_or_history_reads() {
    let redis = RedisServer::start().await;
    let node = common::NodeProcess::spawn(&[
        "--redis-url",
        &redis.url(),
        "--history-size",
        "1000",
        "--publish-rate",
        "100000",
        "--publish-burst",
        "100000",
        "--write-timeout",
        "2s",
    ]);
    node.wait_ready().await;
    let mut publisher = node.client("").await;
    publish_big(&mut publisher, "chat:big", 1000, 8000).await;

    // What a reading client sees: a recovery that needs more than
    // --max-history-bytes (1 MiB) is not made; one that fits is.
    let mut reader = node.client("").await;
    let mut stash = Vec::new();
    let latest = reader
        .request(json!({"op":"history","ch":"chat:big"}), 1, &mut stash)
        .await;
    let epoch = latest["epoch"].as_str().unwrap().to_owned();
    let got = latest["messages"].as_array().unwrap();
    assert_eq!(latest["truncated"], true, "8 MB asked, 1 MiB given");
    assert!((100..=130).contains(&got.len()), "{}", got.len());
    assert_eq!(got.last().unwrap()["offset"], 1000, "the newest that fit");
    let ack = reader
        .request(
            json!({"op":"sub","ch":"chat:big","since":{"epoch":epoch,"offset":0}}),
            2,
            &mut stash,
        )
        .await;
    assert_eq!(ack["recovered"], false, "{ack}");
    reader
        .send(json!({"op":"unsub","ch":"chat:big","id":3}))
        .await;
    let ack = reader
        .request(
            json!({"op":"sub","ch":"chat:big","since":{"epoch":epoch,"offset":950}}),
            4,
            &mut stash,
        )
        .await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let replayed: Vec<&Value> = stash.iter().filter(|f| f["op"] == "msg").collect();
    assert_eq!(replayed.len(), 50);
    assert_eq!(replayed[0]["offset"], 951);

    // The attack: one write of 30 subscribes recovering from offset 0 (8 MB each
    // before the bounds) and 40 history reads of 8 MB, on a socket never read.
    let mut bystander = node.client("channel=calm").await;
    let baseline = node.memory_kib("VmRSS");
    let mut deaf = deaf_client(&node.ws_url("")).await;
    for _ in 0..30 {
        let sub = json!({"op":"sub","ch":"chat:big","since":{"epoch":epoch,"offset":0}});
        deaf.feed(Message::text(sub.to_string())).await.unwrap();
        let unsub = json!({"op":"unsub","ch":"chat:big"});
        deaf.feed(Message::text(unsub.to_string())).await.unwrap();
    }
    for id in 0..40 {
        let read = json!({"op":"history","ch":"chat:big","id":id});
        deaf.feed(Message::text(read.to_string())).await.unwrap();
    }
    deaf.flush().await.unwrap();

    // The node goes on serving others, and drops the deaf client within its write
    // timeout.
    for i in 0..5 {
        publisher
            .send(json!({"op":"pub","ch":"calm","data":i}))
            .await;
        assert_eq!(bystander.recv().await["data"], i);
    }
    let (status, _) = http_get(node.addr, "/healthz").await;
    assert_eq!(status, 200);
    common::eventually("the deaf client is dropped", WAIT, async || {
        let text = node.metrics().await;
        common::metric(&text, "wsrelay_connections") == 3.0
    })
    .await;
    // Before the bounds this peaked at hundreds of MB; now the deaf connection
    // holds at most a few MiB (its queue's half, then a stalled write).
    let peak = node.memory_kib("VmHWM");
    assert!(
        peak < baseline + 32 * 1024,
        "peak RSS {peak} KiB, baseline {baseline} KiB"
    );
    drop(deaf);
}

/// A client that pipelines many requests and reads their replies is slowed down
/// (its requests are read as the replies are written), never closed as slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_slow_the_client_down_instead_of_closing_it() {
    let node = TestNode::start(&["--client-queue", "64"]).await;
    let mut client = node.client("").await;
    const N: u64 = 3000;
    for id in 1..=N {
        let ping = json!({"op":"ping","id":id});
        client
            .ws
            .feed(Message::text(ping.to_string()))
            .await
            .unwrap();
    }
    client.ws.flush().await.unwrap();
    for id in 1..=N {
        let pong = client.recv().await;
        assert_eq!(
            (pong["op"].as_str(), pong["id"].as_u64()),
            (Some("pong"), Some(id))
        );
    }
    let pong = client
        .request(json!({"op":"ping"}), N + 1, &mut Vec::new())
        .await;
    assert_eq!(pong["op"], "pong");
}

/// At most --max-history-reads reads of clients run at once on a node; the others
/// wait their turn, and all are answered once Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_are_admitted_a_few_at_a_time() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = TestNode::start(&[
        "--redis-url",
        &url,
        "--history-size",
        "10",
        "--max-history-reads",
        "1",
        "--broker-timeout",
        "5s",
    ])
    .await;
    let mut publisher = node.client("").await;
    publisher
        .send(json!({"op":"pub","ch":"chat:r","data":1,"id":1}))
        .await;
    assert_eq!(publisher.recv().await["op"], "ack");
    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(node.client("").await);
    }
    redis.signal("STOP");
    // Three different reads (identical ones waiting together share one, see
    // `identical_recoveries_at_once_share_their_reads` in tests/history.rs).
    for (limit, reader) in (1..).zip(&mut readers) {
        reader
            .send(json!({"op":"history","ch":"chat:r","id":7,"limit":limit}))
            .await;
    }
    common::eventually("one read runs, two wait", WAIT, async || {
        let text = common::scrape(node.addr).await;
        common::metric(&text, "wsrelay_history_reads_running") == 1.0
            && common::metric(&text, "wsrelay_history_reads_waiting") == 2.0
    })
    .await;
    redis.signal("CONT");
    for reader in &mut readers {
        let answer = reader.recv().await;
        assert_eq!(answer["op"], "history", "{answer}");
        assert_eq!(answer["messages"][0]["data"], 1, "{answer}");
    }
    let text = common::scrape(node.addr).await;
    assert_eq!(common::metric(&text, "wsrelay_history_reads_running"), 0.0);
    assert_eq!(common::metric(&text, "wsrelay_history_reads_waiting"), 0.0);
}
