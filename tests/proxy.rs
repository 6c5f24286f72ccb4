//! The application backend's proxies (connect, refresh, subscribe, publish, rpc),
//! what a client sees when the backend fails, user-limited channels, and the
//! server API's commands on users (disconnect, subscribe, unsubscribe, refresh,
//! connections, revoke, the per-user limit), against two real nodes on a real
//! Redis and a real HTTP backend on loopback (`Backend`, below: it records every
//! call, and each test sets how it answers).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use common::{Client, RedisServer, TestNode, WAIT, http_request};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "test-secret-of-some-length";
const API_KEY: &str = "api-key-0123456789abcdef";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// How the backend answers one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// Answers after 2 s (the nodes' `--proxy-timeout` is 300 ms).
    Slow,
    /// HTTP 500.
    Failing,
    /// HTTP 200 with something that is not the contract's JSON.
    Garbage,
}

/// One call the backend received.
#[derive(Debug, Clone)]
struct Call {
    path: String,
    headers: HeaderMap,
    body: Value,
}

#[derive(Default)]
struct BackendState {
    calls: Mutex<Vec<Call>>,
    modes: Mutex<HashMap<String, Mode>>,
    /// The connect proxy's `expire_at`, seconds from now (none: no expiry).
    expire_in: Mutex<Option<u64>>,
    /// What the refresh proxy answers, in turn: `{"expire_in": N}` (seconds from
    /// the call) or a result as is (then: 60 s more).
    refreshes: Mutex<Vec<Value>>,
    /// The last `expire_at` the connect proxy gave.
    gave_expiry: Mutex<Option<u64>>,
}

/// A real HTTP backend on loopback, answering the proxy contract of
/// docs/proxy.md the way a chat application would.
struct Backend {
    addr: SocketAddr,
    state: Arc<BackendState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start() -> Backend {
        let state = Arc::new(BackendState::default());
        let app = axum::Router::new()
            .route("/{proxy}", post(answer))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Backend { addr, state, task }
    }

    fn url(&self, proxy: &str) -> String {
        format!("http://{}/{proxy}", self.addr)
    }

    fn set(&self, proxy: &str, mode: Mode) {
        self.state
            .modes
            .lock()
            .unwrap()
            .insert(proxy.to_owned(), mode);
    }

    fn calls(&self, proxy: &str) -> Vec<Call> {
        let path = format!("/{proxy}");
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    /// Every proxy flag, pointing here.
    fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for proxy in ["connect", "refresh", "subscribe", "publish", "rpc"] {
            flags.push(format!("--proxy-{proxy}-url"));
            flags.push(self.url(proxy));
        }
        flags
    }
}

async fn answer(
    State(state): State<Arc<BackendState>>,
    axum::extract::Path(proxy): axum::extract::Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.calls.lock().unwrap().push(Call {
        path: format!("/{proxy}"),
        headers: headers.clone(),
        body: body.clone(),
    });
    let mode = *state
        .modes
        .lock()
        .unwrap()
        .get(&proxy)
        .unwrap_or(&Mode::Normal);
    match mode {
        Mode::Normal => {}
        Mode::Slow => tokio::time::sleep(Duration::from_secs(2)).await,
        Mode::Failing => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Mode::Garbage => return Json(json!({"allow": "yes"})).into_response(),
    }
    let refuse = |code: u16, message: &str| {
        Json(json!({"error": {"code": code, "message": message}})).into_response()
    };
    let user = body["user"].as_str().unwrap_or_default().to_owned();
    match proxy.as_str() {
        "connect" => {
            // The session cookie says who the user is.
            let cookie = headers
                .get("cookie")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let Some(user) = cookie
                .split(';')
                .filter_map(|p| p.trim().strip_prefix("sid="))
                .next()
            else {
                return refuse(4401, "log in first");
            };
            let mut result = json!({
                "user": user,
                "info": {"name": user.to_uppercase()},
                "channels": ["chat:*"],
                "publish": ["chat:*"],
                "subscribe": ["news"],
            });
            if let Some(seconds) = *state.expire_in.lock().unwrap() {
                result["expire_at"] = json!(now() + seconds);
                *state.gave_expiry.lock().unwrap() = Some(now() + seconds);
            }
            Json(json!({"result": result})).into_response()
        }
        "refresh" => {
            let mut queue = state.refreshes.lock().unwrap();
            let result = match queue.is_empty() {
                true => json!({"expire_at": now() + 60}),
                false => match queue.remove(0) {
                    next if next.get("expire_in").is_some() => {
                        json!({"expire_at": now() + next["expire_in"].as_u64().unwrap()})
                    }
                    next => next,
                },
            };
            Json(json!({"result": result})).into_response()
        }
        "subscribe" => {
            if body["ch"].as_str().unwrap_or_default().ends_with("secret") {
                return refuse(4403, "members only");
            }
            Json(json!({"result": {}})).into_response()
        }
        "publish" => {
            let text = body["data"]["text"].as_str().unwrap_or_default();
            if text.contains("spam") {
                return refuse(4400, "no spam here");
            }
            // Stored, then published as the application wants it shown.
            let stored = json!({"text": text, "by": user, "stored": true});
            Json(json!({"result": {"data": stored}})).into_response()
        }
        "rpc" => match body["method"].as_str() {
            Some("echo") => {
                Json(json!({"result": {"data": {"echo": body["data"]}}})).into_response()
            }
            _ => refuse(4404, "no such method"),
        },
        _ => (StatusCode::NOT_FOUND, "no such proxy").into_response(),
    }
}

/// Two nodes (n1, n2) on one Redis, with `args`.
async fn cluster(args: &[&str]) -> (RedisServer, TestNode, TestNode) {
    let redis = RedisServer::start().await;
    let mut all = vec!["--api-key", API_KEY, "--proxy-timeout", "300ms"];
    all.extend_from_slice(args);
    let n1 = TestNode::with_redis(&redis, "n1", &all).await;
    let n2 = TestNode::with_redis(&redis, "n2", &all).await;
    (redis, n1, n2)
}

/// What a connection got, from its first frame to its close: frames and the close
/// code (the connection may be refused after the upgrade, so no `welcome` is
/// assumed).
async fn connect_raw(url: &str, headers: &[(&str, &str)]) -> common::Ws {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let (ws, _) = timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect in time")
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    ws
}

/// Reads a socket to its close: the frames, and the close code.
async fn until_close(ws: &mut common::Ws) -> (Vec<Value>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        match timeout(WAIT, ws.next()).await.expect("close in time") {
            Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return (frames, frame.map(|f| f.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

/// A client connected with these headers, after its `welcome`.
async fn client_with(url: &str, headers: &[(&str, &str)]) -> Client {
    let mut ws = connect_raw(url, headers).await;
    let welcome = loop {
        match timeout(WAIT, ws.next()).await.expect("welcome in time") {
            Some(Ok(Message::Text(text))) => break serde_json::from_str::<Value>(&text).unwrap(),
            Some(Ok(Message::Close(frame))) => panic!("refused: {frame:?}"),
            Some(Ok(_)) => {}
            other => panic!("no welcome: {other:?}"),
        }
    };
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    Client { ws, welcome }
}

async fn api(node: &TestNode, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let (status, text) = http_request(
        node.addr,
        method,
        path,
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The next frame of `op`, skipping others (acks, joins).
async fn next_op(client: &mut Client, op: &str) -> Value {
    loop {
        let frame = client.recv().await;
        if frame["op"] == op {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_proxy_decides_who_connects_from_the_session_cookie() {
    let backend = Backend::start().await;
    let flags = backend.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend([
        "--proxy-forward-cookies",
        "sid",
        "--proxy-forward-headers",
        "x-real-ip",
    ]);
    let (_redis, n1, n2) = cluster(&args).await;

    let mut ada = client_with(
        &n1.ws_url("channel=chat:lobby"),
        &[
            ("Cookie", "theme=dark; sid=ada; csrf=x"),
            ("X-Real-IP", "10.1.2.3"),
            ("X-Secret", "must not travel"),
        ],
    )
    .await;
    // The client's channel and the server-side one from the backend's answer.
    assert_eq!(ada.welcome["channels"], json!(["chat:lobby", "news"]));
    let call = &backend.calls("connect")[0];
    assert_eq!(
        call.headers["cookie"], "sid=ada",
        "only the allowlisted cookie"
    );
    assert_eq!(call.headers["x-real-ip"], "10.1.2.3");
    assert!(call.headers.get("x-secret").is_none());
    assert_eq!(call.body["channels"], json!(["chat:lobby"]));
    assert_eq!(call.body["transport"], "websocket");
    assert!(
        call.body["client"].as_str().unwrap().starts_with("n1/"),
        "{}",
        call.body
    );

    // The server-side channel delivers with no `sub` of the client's.
    let (status, _) = api(
        &n2,
        "POST",
        "/api/publish",
        json!({"ch":"news","data":"hi"}),
    )
    .await;
    assert_eq!(status, 200);
    let msg = next_op(&mut ada, "msg").await;
    assert_eq!(
        (msg["ch"].clone(), msg["data"].clone()),
        (json!("news"), json!("hi"))
    );
    // The grants the backend gave hold.
    let reply = ada.sub("other", 1).await;
    assert_eq!(reply["code"], "forbidden", "{reply}");

    // No session cookie: the backend refuses, the client reads why and the code.
    let mut ws = connect_raw(&n2.ws_url("channel=chat:lobby"), &[]).await;
    let (frames, code) = until_close(&mut ws).await;
    assert_eq!(code, Some(4401));
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["code"], "refused");
    assert_eq!(frames[0]["app_code"], 4401);
    assert_eq!(frames[0]["message"], "log in first");

    // A channel the grants do not allow, asked for in the URL: refused after the
    // backend answered (the grants were not known before).
    let mut ws = connect_raw(&n1.ws_url("channel=admin"), &[("Cookie", "sid=bob")]).await;
    let (frames, code) = until_close(&mut ws).await;
    assert_eq!(code, Some(1008));
    assert_eq!(frames[0]["code"], "forbidden", "{frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_backend_gives_the_documented_result_never_a_hang_or_an_allow() {
    let backend = Backend::start().await;
    let flags = backend.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--proxy-forward-cookies", "sid", "--proxy-publish"]);
    let (_redis, n1, n2) = cluster(&args).await;
    let cookie = [("Cookie", "sid=ada")];

    // Connect: unavailable (timeout, 500) closes 1013 ("try again later"); a bad
    // answer closes 1011; each after an `error` saying so.
    for (mode, error, close) in [
        (Mode::Slow, "unavailable", 1013),
        (Mode::Failing, "unavailable", 1013),
        (Mode::Garbage, "internal", 1011),
    ] {
        backend.set("connect", mode);
        let started = std::time::Instant::now();
        let mut ws = connect_raw(&n1.ws_url("channel=chat:a"), &cookie).await;
        let (frames, code) = until_close(&mut ws).await;
        assert_eq!(code, Some(close), "{mode:?}: {frames:?}");
        assert_eq!(frames[0]["code"], error, "{mode:?}: {frames:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{mode:?}: bounded by --proxy-timeout, took {:?}",
            started.elapsed()
        );
    }
    backend.set("connect", Mode::Normal);

    // Publish: a subscriber on the other node gets only what the backend allowed.
    let mut reader = client_with(&n2.ws_url("channel=chat:a"), &cookie).await;
    let mut writer = client_with(&n1.ws_url("channel=chat:b"), &cookie).await;
    let mut id = 0;
    for (mode, error) in [
        (Mode::Slow, "unavailable"),
        (Mode::Failing, "unavailable"),
        (Mode::Garbage, "internal"),
    ] {
        backend.set("publish", mode);
        id += 1;
        let reply = writer
            .request(
                json!({"op":"pub","ch":"chat:a","data":{"text":"x"}}),
                id,
                &mut Vec::new(),
            )
            .await;
        assert_eq!(reply["op"], "error", "{mode:?}: {reply}");
        assert_eq!(reply["code"], error, "{mode:?}: {reply}");
    }
    backend.set("publish", Mode::Normal);
    let reply = writer
        .request(
            json!({"op":"pub","ch":"chat:a","data":{"text":"buy spam"}}),
            10,
            &mut Vec::new(),
        )
        .await;
    assert_eq!(
        (reply["code"].clone(), reply["app_code"].clone()),
        (json!("refused"), json!(4400)),
        "{reply}"
    );
    assert_eq!(reply["message"], "no spam here");
    let reply = writer
        .request(
            json!({"op":"pub","ch":"chat:a","data":{"text":"hello"}}),
            11,
            &mut Vec::new(),
        )
        .await;
    assert_eq!(reply["op"], "ack", "{reply}");
    // The first message the reader gets is the allowed one, as the backend
    // replaced it: nothing refused or unanswered went out.
    let msg = next_op(&mut reader, "msg").await;
    assert_eq!(
        msg["data"],
        json!({"text":"hello","by":"ada","stored":true}),
        "{msg}"
    );
    assert!(
        reader.try_recv(Duration::from_millis(300)).await.is_none(),
        "nothing else"
    );
    // Each failure counted by proxy and result.
    let metrics = common::scrape(n1.addr).await;
    for (result, at_least) in [
        ("ok", 1.0),
        ("refused", 1.0),
        ("unavailable", 2.0),
        ("bad_answer", 1.0),
    ] {
        let name = format!(r#"wsrelay_proxy_calls_total{{proxy="publish",result="{result}"}}"#);
        assert!(
            common::metric(&metrics, &name) >= at_least,
            "{name}\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_proxy_and_rpc_answer_over_the_connection() {
    let backend = Backend::start().await;
    let (_redis, n1, _n2) = cluster(&[
        "--jwt-secret",
        SECRET,
        "--proxy-subscribe-url",
        &backend.url("subscribe"),
        "--proxy-subscribe",
        "--proxy-rpc-url",
        &backend.url("rpc"),
        "--presence",
    ])
    .await;
    let jwt = token(json!({"sub":"ada","exp": now() + 600, "channels":["chat:*"]}));
    let mut ada = n1.client(&format!("channel=chat:a&token={jwt}")).await;

    // Granted by the token: the backend is not asked.
    assert_eq!(ada.sub("chat:b", 1).await["op"], "ack");
    assert!(backend.calls("subscribe").is_empty());
    // Not granted: the backend decides.
    assert_eq!(ada.sub("room:1", 2).await["op"], "ack");
    let reply = ada.sub("room:secret", 3).await;
    assert_eq!(
        (reply["code"].clone(), reply["app_code"].clone()),
        (json!("refused"), json!(4403)),
        "{reply}"
    );
    // A subscription the backend allowed lets the client see who else is there;
    // a channel it is not in stays closed to it.
    let reply = ada
        .request(json!({"op":"presence","ch":"room:1"}), 20, &mut Vec::new())
        .await;
    assert_eq!(reply["op"], "presence", "{reply}");
    let reply = ada
        .request(json!({"op":"presence","ch":"room:2"}), 21, &mut Vec::new())
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    let calls = backend.calls("subscribe");
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].body["ch"].clone(), calls[0].body["user"].clone()),
        (json!("room:1"), json!("ada"))
    );

    // rpc: the backend's data, with the request's id; its refusals as errors.
    let reply = ada
        .request(
            json!({"op":"rpc","method":"echo","data":{"n":[1,2]}}),
            4,
            &mut Vec::new(),
        )
        .await;
    assert_eq!(
        reply,
        json!({"op":"rpc","id":4,"data":{"echo":{"n":[1,2]}}})
    );
    let reply = ada
        .request(json!({"op":"rpc","method":"nope"}), 5, &mut Vec::new())
        .await;
    assert_eq!(reply["app_code"], 4404, "{reply}");
    let reply = ada.request(json!({"op":"rpc"}), 6, &mut Vec::new()).await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
    // A traceparent goes with every call.
    assert!(
        backend.calls("rpc")[0]
            .headers
            .get("traceparent")
            .is_none_or(|tp| tp.len() == 55)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresh_proxy_extends_a_connection_until_it_says_expired() {
    let backend = Backend::start().await;
    *backend.state.expire_in.lock().unwrap() = Some(2);
    backend
        .state
        .refreshes
        .lock()
        .unwrap()
        .extend([json!({"expire_in": 3}), json!({"expired": true})]);
    let flags = backend.flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend([
        "--proxy-forward-cookies",
        "sid",
        "--proxy-refresh-before",
        "1s",
    ]);
    let (_redis, n1, _n2) = cluster(&args).await;
    let mut ws = connect_raw(&n1.ws_url("channel=chat:a"), &[("Cookie", "sid=ada")]).await;
    let (frames, code) = until_close(&mut ws).await;
    assert_eq!(frames[0]["op"], "welcome");
    assert_eq!(code, Some(1008), "expired as a token does");
    // Extended once (it lived past its first expiry), then told it expired.
    let first_expiry = backend.state.gave_expiry.lock().unwrap().unwrap();
    assert!(now() >= first_expiry, "closed before its first expiry");
    let calls = backend.calls("refresh");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].body["user"], "ada");
    assert_eq!(
        calls[0].headers["cookie"], "sid=ada",
        "forwarded on every call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limited_and_personal_channels() {
    let (_redis, n1, n2) = cluster(&[
        "--jwt-secret",
        SECRET,
        "--personal-channel-namespace",
        "user",
    ])
    .await;
    let ada = token(json!({"sub":"ada","exp": now() + 600, "channels":["dm*"], "publish":["dm*"]}));
    let bob = token(json!({"sub":"bob","exp": now() + 600}));
    let mut a = n1
        .client(&format!("channel=chat%23ada,bob&token={ada}"))
        .await;
    assert_eq!(a.welcome["channels"], json!(["chat#ada,bob", "user:#ada"]));
    let mut b = n2
        .client(&format!("token={bob}&channel=chat%23ada,bob"))
        .await;
    // A user channel needs no grant for its users, and refuses others even granted.
    assert_eq!(a.sub("dm:x#bob,carol", 1).await["code"], "forbidden");
    assert_eq!(a.sub("dm:x#carol,ada", 2).await["op"], "ack");
    let reply = b
        .request(
            json!({"op":"pub","ch":"chat#ada,bob","data":"hi ada"}),
            3,
            &mut Vec::new(),
        )
        .await;
    assert_eq!(reply["op"], "ack", "{reply}");
    assert_eq!(next_op(&mut a, "msg").await["data"], "hi ada");
    let reply = b
        .request(
            json!({"op":"pub","ch":"#ada","data":"x"}),
            4,
            &mut Vec::new(),
        )
        .await;
    assert_eq!(reply["code"], "forbidden");
    // The personal channel reaches Ada through the API.
    api(
        &n2,
        "POST",
        "/api/publish",
        json!({"ch":"user:#ada","data":"for you"}),
    )
    .await;
    assert_eq!(next_op(&mut a, "msg").await["data"], "for you");
    // Someone not listed cannot even connect to it.
    let carol = token(json!({"sub":"carol","exp": now() + 600, "channels":["*"]}));
    let refused = common::connect_with_headers(
        &n1.ws_url(&format!("channel=chat%23ada,bob&token={carol}")),
        &[],
    )
    .await;
    let Err((status, body)) = refused else {
        panic!("carol connected to a channel of ada and bob");
    };
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_api_reaches_a_users_connections_on_every_node() {
    let (_redis, n1, n2) = cluster(&["--jwt-secret", SECRET]).await;
    let ada = token(json!({"sub":"ada","exp": now() + 600, "channels":["chat:*", "global"]}));
    let mut a1 = n1.client(&format!("channel=chat:a&token={ada}")).await;
    let mut a2 = n2.client(&format!("channel=chat:b&token={ada}")).await;
    let bob = token(json!({"sub":"bob","exp": now() + 600, "channels":["global"]}));
    let mut b = n1.client(&format!("token={bob}")).await;

    // Subscribed now, on both nodes, to a channel the token does not grant.
    let (status, body) = api(
        &n1,
        "POST",
        "/api/subscribe",
        json!({"user":"ada","ch":"news"}),
    )
    .await;
    assert_eq!((status, body["nodes"].clone()), (200, json!(2)), "{body}");
    for a in [&mut a1, &mut a2] {
        let frame = next_op(a, "subscribed").await;
        assert_eq!(frame["ch"], "news");
    }
    api(&n2, "POST", "/api/publish", json!({"ch":"news","data":1})).await;
    for a in [&mut a1, &mut a2] {
        assert_eq!(next_op(a, "msg").await["data"], 1);
    }
    // Every connection of the user, with its node and channels.
    let (status, body) = api(&n2, "GET", "/api/connections?user=ada", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let mut seen: Vec<(String, Value)> = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["node"].as_str().unwrap().to_owned(),
                c["channels"].clone(),
            )
        })
        .collect();
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        seen,
        [
            ("n1".to_owned(), json!(["chat:a", "news"])),
            ("n2".to_owned(), json!(["chat:b", "news"]))
        ],
        "{body}"
    );

    api(
        &n2,
        "POST",
        "/api/unsubscribe",
        json!({"user":"ada","ch":"news"}),
    )
    .await;
    for a in [&mut a1, &mut a2] {
        assert_eq!(next_op(a, "unsubscribed").await["ch"], "news");
    }
    api(&n1, "POST", "/api/publish", json!({"ch":"news","data":2})).await;
    api(&n1, "POST", "/api/publish", json!({"ch":"chat:a","data":3})).await;
    assert_eq!(next_op(&mut a1, "msg").await["data"], 3, "news no longer");

    // One connection only, by its name.
    let one = format!("n2/{}", a2.welcome["conn"].as_str().unwrap());
    api(
        &n1,
        "POST",
        "/api/disconnect",
        json!({"user":"ada","conn":one,"code":4100,"reason":"one"}),
    )
    .await;
    let (frames, code) = until_close(&mut a2.ws).await;
    assert_eq!(code, Some(4100));
    assert_eq!(
        frames.last().unwrap(),
        &json!({"op":"disconnect","code":4100,"reason":"one"})
    );
    let mut a2 = n2.client(&format!("token={ada}")).await;

    // Every connection, by default with 4001.
    let (status, _) = api(
        &n2,
        "POST",
        "/api/disconnect",
        json!({"user":"ada","reason":"kicked"}),
    )
    .await;
    assert_eq!(status, 200);
    for a in [&mut a1, &mut a2] {
        let (frames, code) = until_close(&mut a.ws).await;
        assert_eq!(code, Some(4001));
        assert_eq!(frames.last().unwrap()["reason"], "kicked");
    }
    // Bob was not touched.
    b.send(json!({"op":"ping","id":9})).await;
    assert_eq!(b.recv().await["op"], "pong");

    // A refresh through the API sets the expiry of each connection.
    let mut a1 = n1.client(&format!("token={ada}")).await;
    api(
        &n2,
        "POST",
        "/api/refresh",
        json!({"user":"ada","expire_at": now() + 1}),
    )
    .await;
    let (_, code) = until_close(&mut a1.ws).await;
    assert_eq!(code, Some(1008), "expired at the time the API set");

    // Bad calls are refused with a clear error.
    for (path, body) in [
        ("/api/subscribe", json!({"user":"ada"})),
        ("/api/subscribe", json!({"user":"ada","ch":"bad name"})),
        ("/api/disconnect", json!({"user":"ada","code":1000})),
        ("/api/disconnect", json!({"user":""})),
    ] {
        let (status, reply) = api(&n1, "POST", path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {reply}");
    }
    let (status, _) = api(&n1, "GET", "/api/connections", json!({})).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_refused_and_their_connections_closed() {
    let (_redis, n1, n2) = cluster(&["--jwt-secret", SECRET, "--token-revocation"]).await;
    let t1 = token(
        json!({"sub":"ada","exp": now() + 600, "jti":"t1", "iat": now() - 100, "channels":["global"]}),
    );
    let t2 = token(
        json!({"sub":"ada","exp": now() + 600, "jti":"t2", "iat": now(), "channels":["global"]}),
    );
    let mut on1 = n1.client(&format!("token={t1}")).await;
    let mut on2 = n2.client(&format!("token={t1}")).await;
    let mut other = n2.client(&format!("token={t2}")).await;

    let (status, body) = api(
        &n2,
        "POST",
        "/api/revoke",
        json!({"user":"ada","jti":"t1","expire_at": now() + 600}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for ws in [&mut on1.ws, &mut on2.ws] {
        let (frames, code) = until_close(ws).await;
        assert_eq!(code, Some(1008));
        assert_eq!(frames.last().unwrap()["op"], "disconnect");
    }
    other.send(json!({"op":"ping","id":1})).await;
    assert_eq!(
        other.recv().await["op"],
        "pong",
        "another token of the user stands"
    );
    // The revoked token is refused at connect, on any node.
    let mut ws = connect_raw(&n1.ws_url(&format!("token={t1}")), &[]).await;
    let (frames, code) = until_close(&mut ws).await;
    assert_eq!(code, Some(1008));
    assert!(
        frames[0]["message"].as_str().unwrap().contains("revoked"),
        "{frames:?}"
    );

    // Every token issued before a time.
    api(
        &n1,
        "POST",
        "/api/revoke",
        json!({"user":"ada","issued_before": now() + 1}),
    )
    .await;
    let (_, code) = until_close(&mut other.ws).await;
    assert_eq!(code, Some(1008));
    let mut ws = connect_raw(&n2.ws_url(&format!("token={t2}")), &[]).await;
    assert_eq!(until_close(&mut ws).await.1, Some(1008));
    let t3 = token(
        json!({"sub":"ada","exp": now() + 600, "jti":"t3", "iat": now() + 5, "channels":["global"]}),
    );
    n2.client(&format!("token={t3}")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connections_are_limited_across_the_cluster() {
    let (_redis, n1, n2) =
        cluster(&["--jwt-secret", SECRET, "--max-connections-per-user", "2"]).await;
    let ada = token(json!({"sub":"ada","exp": now() + 600, "channels":["global"]}));
    let mut first = n1.client(&format!("token={ada}")).await;
    let _second = n2.client(&format!("token={ada}")).await;
    for node in [&n1, &n2] {
        let mut ws = connect_raw(&node.ws_url(&format!("token={ada}")), &[]).await;
        let (frames, code) = until_close(&mut ws).await;
        assert_eq!(code, Some(1008));
        assert_eq!(frames[0]["code"], "limit_exceeded", "{frames:?}");
    }
    // Another user is not counted with her.
    let bob = token(json!({"sub":"bob","exp": now() + 600, "channels":["global"]}));
    n1.client(&format!("token={bob}")).await;
    // A connection that leaves makes room.
    first.ws.send(Message::Close(None)).await.unwrap();
    let _ = until_close(&mut first.ws).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut ws = connect_raw(&n1.ws_url(&format!("token={ada}")), &[]).await;
        let next = timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let frame: Value = serde_json::from_str(next.to_text().unwrap()).unwrap();
        if frame["op"] == "welcome" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no room after a close: {frame}"
        );
        // The entry of the closed connection is removed as its session ends:
        // nothing to await from here, so look again shortly.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_from_redis_during_a_revocation_closes_the_token_once_back() {
    let redis = RedisServer::start().await;
    let deaf = common::DeafProxy::start(redis.port).await;
    let args = [
        "--api-key",
        API_KEY,
        "--jwt-secret",
        SECRET,
        "--token-revocation",
        "--broker-timeout",
        "500ms",
    ];
    let n1 = TestNode::with_redis(&redis, "n1", &args).await;
    let url = deaf.url();
    let mut n2_args = vec!["--redis-url", url.as_str(), "--node-id", "n2"];
    n2_args.extend_from_slice(&args);
    let n2 = TestNode::start(&n2_args).await;
    n2.wait_ready().await;
    let t1 = token(json!({"sub":"ada","exp": now() + 600, "jti":"t1", "channels":["global"]}));
    let mut ada = n2.client(&format!("token={t1}")).await;

    // n2 hears nothing from Redis while the revocation is sent.
    deaf.set_deaf(true);
    let (status, _) = api(&n1, "POST", "/api/revoke", json!({"user":"ada","jti":"t1"})).await;
    assert_eq!(status, 200);
    common::wait_until("n2 notices it is deaf", || !n2.handle.all_shards_usable()).await;
    assert!(
        ada.try_recv(Duration::from_millis(100)).await.is_none(),
        "the command did not reach n2"
    );
    // Back: n2 subscribes its control channels again and checks its tokens.
    deaf.set_deaf(false);
    let (frames, code) = until_close(&mut ada.ws).await;
    assert_eq!(code, Some(1008), "{frames:?}");
    assert_eq!(frames.last().unwrap()["op"], "disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_api_and_the_limit_on_one_node_without_redis() {
    // The zero-setup node: the memory broker is every node at once.
    let node = TestNode::start(&[
        "--api-key",
        API_KEY,
        "--jwt-secret",
        SECRET,
        "--max-connections-per-user",
        "1",
        "--token-revocation",
    ])
    .await;
    let ada = token(json!({"sub":"ada","exp": now() + 600, "jti":"m1", "channels":["global"]}));
    let mut a = node.client(&format!("token={ada}")).await;
    let mut ws = connect_raw(&node.ws_url(&format!("token={ada}")), &[]).await;
    let (frames, code) = until_close(&mut ws).await;
    assert_eq!(
        (code, frames[0]["code"].clone()),
        (Some(1008), json!("limit_exceeded"))
    );

    let (status, body) = api(
        &node,
        "POST",
        "/api/subscribe",
        json!({"user":"ada","ch":"news"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(next_op(&mut a, "subscribed").await["ch"], "news");
    let (_, body) = api(&node, "GET", "/api/connections?user=ada", json!({})).await;
    assert_eq!(
        body["connections"][0]["channels"],
        json!(["global", "news"]),
        "{body}"
    );
    let (status, _) = api(
        &node,
        "POST",
        "/api/revoke",
        json!({"user":"ada","jti":"m1"}),
    )
    .await;
    assert_eq!(status, 200);
    let (frames, code) = until_close(&mut a.ws).await;
    assert_eq!(code, Some(1008));
    assert_eq!(frames.last().unwrap()["op"], "disconnect");
    let mut ws = connect_raw(&node.ws_url(&format!("token={ada}")), &[]).await;
    assert_eq!(
        until_close(&mut ws).await.1,
        Some(1008),
        "revoked at connect too"
    );
}
