//! The example application backend (examples/backend: Python, Flask, SQLite) behind
//! two real nodes and a real Redis, through the proxy contract of docs/proxy.md:
//! the relay asks the backend who connects (its session cookie, forwarded), what
//! they may join and say, and the backend acts on users through the server API.
//! The interpreter is `$WSRELAY_PYTHON` (scripts/test.sh sets it to a venv with
//! Flask), else `python3`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use common::{
    Client, RedisServer, TestNode, WAIT, connect_with_headers, free_port, http_exchange,
    http_request, wait_until,
};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const API_KEY: &str = "api-key-0123456789abcdef";
const JWT_SECRET: &str = "backend-test-secret-of-some-length";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_in_client_gets_its_personal_channel_and_one_without_the_cookie_is_refused() {
    let app = App::start(&[], &[]).await;
    let alice = app.backend.login("alice").await;
    let mut client = connect(app.node(0), &alice).await;
    assert_eq!(
        client.welcome["channels"],
        json!(["#alice"]),
        "{}",
        client.welcome
    );

    // Subscribed server-side: a message to the personal channel, through the other
    // node, reaches it.
    let (status, body) = api(
        app.node(1).addr,
        "/api/publish",
        json!({"ch":"#alice","data":"hi"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let msg = client.recv().await;
    assert_eq!(
        (&msg["ch"], &msg["data"]),
        (&json!("#alice"), &json!("hi")),
        "{msg}"
    );

    for cookie in [None, Some("sid=not-a-session")] {
        let (frame, code) = turned_away(app.node(1), "", cookie).await;
        assert_eq!(
            (&frame["op"], &frame["code"], &frame["app_code"]),
            (&json!("error"), &json!("refused"), &json!(4401)),
            "{frame}"
        );
        assert_eq!(frame["message"], "log in first");
        assert_eq!(code, Some(4401));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_lines_are_judged_and_stored_by_the_backend_and_delivered_on_both_nodes() {
    let app = App::start(&[], &[]).await;
    let mut alice = connect(app.node(0), &app.backend.login("alice").await).await;
    let mut bob = connect(app.node(1), &app.backend.login("bob").await).await;
    let mut admin = connect(app.node(0), &app.backend.login("admin").await).await;
    let mut alice_got = Vec::new();
    let mut bob_got = Vec::new();
    let sub = |ch: &str| json!({"op":"sub","ch":ch});
    assert_eq!(
        ask(&mut alice, sub("chat:lobby"), 1, &mut alice_got).await["op"],
        "ack"
    );
    assert_eq!(
        ask(&mut bob, sub("chat:lobby"), 2, &mut bob_got).await["op"],
        "ack"
    );
    // chat:secret is for admins: the backend refuses bob, the admin's grants cover it.
    let refusal = ask(&mut bob, sub("chat:secret"), 3, &mut bob_got).await;
    assert_eq!(
        (&refusal["code"], &refusal["app_code"]),
        (&json!("refused"), &json!(4403)),
        "{refusal}"
    );
    assert_eq!(
        ask(&mut admin, sub("chat:secret"), 4, &mut Vec::new()).await["op"],
        "ack"
    );

    let spam = json!({"op":"pub","ch":"chat:lobby","data":{"text":"cheap SPAM here"}});
    let refusal = ask(&mut alice, spam, 5, &mut alice_got).await;
    assert_eq!(
        (&refusal["op"], &refusal["code"], &refusal["app_code"]),
        (&json!("error"), &json!("refused"), &json!(4400)),
        "{refusal}"
    );
    let good = json!({"op":"pub","ch":"chat:lobby","data":{"text":"hello"}});
    assert_eq!(ask(&mut alice, good, 6, &mut alice_got).await["op"], "ack");

    // What the backend returned is what both nodes deliver: the stored line. The
    // refused line came first from the same publisher: had it been published, it
    // would be bob's first message.
    assert_eq!(bob_got, Vec::<Value>::new());
    let line = next_msg(&mut bob).await;
    assert_eq!(line["ch"], "chat:lobby");
    let data = &line["data"];
    assert!(data["id"].as_u64().is_some(), "{line}");
    assert!(
        data["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    assert_eq!(
        (&data["user"], &data["text"]),
        (&json!("alice"), &json!("hello"))
    );
    if alice_got.is_empty() {
        alice_got.push(next_msg(&mut alice).await);
    }
    assert_eq!(
        alice_got,
        vec![line.clone()],
        "the publisher gets the same line"
    );

    // The backend stored the good line only.
    let history = rpc(&mut bob, "history", json!({"room":"chat:lobby"}), 7).await;
    assert_eq!(history["op"], "rpc", "{history}");
    assert_eq!(history["data"]["lines"], json!([data]), "{history}");
    let unknown = rpc(&mut bob, "nope", json!({}), 8).await;
    assert_eq!(
        (&unknown["code"], &unknown["app_code"]),
        (&json!("refused"), &json!(4404)),
        "{unknown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_line_survives_a_restart_of_the_nodes_redis_and_backend() {
    let app = App::start(&[], &[]).await;
    let mut alice = connect(app.node(0), &app.backend.login("alice").await).await;
    let mut got = Vec::new();
    let sub = json!({"op":"sub","ch":"chat:lobby"});
    assert_eq!(ask(&mut alice, sub, 1, &mut got).await["op"], "ack");
    let good = json!({"op":"pub","ch":"chat:lobby","data":{"text":"still here?"}});
    assert_eq!(ask(&mut alice, good, 2, &mut got).await["op"], "ack");
    if got.is_empty() {
        got.push(next_msg(&mut alice).await);
    }
    let line = got[0]["data"].clone();
    drop(alice);

    let app = app.restart().await;
    let mut bob = connect(app.node(1), &app.backend.login("bob").await).await;
    let history = rpc(&mut bob, "history", json!({"room":"chat:lobby"}), 1).await;
    assert_eq!(history["data"]["lines"], json!([line]), "{history}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_user_is_disconnected_on_every_node_and_a_banned_one_refused() {
    let app = App::start(&[], &[]).await;
    let bob = app.backend.login("bob").await;
    let alice = app.backend.login("alice").await;
    let admin = app.backend.login("admin").await;
    let mut alice_ws = connect(app.node(0), &alice).await;

    // Only an admin may kick.
    let kick = json!({"user":"bob"});
    assert_eq!(app.backend.post("/admin/kick", None, &kick).await.0, 401);
    assert_eq!(
        app.backend.post("/admin/kick", Some(&alice), &kick).await.0,
        403
    );

    for ban in [false, true] {
        let mut on_n1 = connect(app.node(0), &bob).await;
        let mut on_n2 = connect(app.node(1), &bob).await;
        let (status, answer) = app
            .backend
            .post(
                "/admin/kick",
                Some(&admin),
                &json!({"user":"bob","ban":ban}),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["kicked"], "bob");
        for client in [&mut on_n1, &mut on_n2] {
            let (frames, code) = until_close(client).await;
            assert!(
                frames.iter().any(|f| f["op"] == "disconnect"),
                "a disconnect frame before the close: {frames:?}"
            );
            assert_eq!(code, Some(4001), "{frames:?}");
        }
    }
    // Kicked and banned: the backend refuses the next connect.
    let (frame, code) = turned_away(app.node(1), "", Some(&bob)).await;
    assert_eq!(frame["app_code"], 4403, "{frame}");
    assert_eq!(code, Some(4403));
    // Nobody else was touched.
    let pong = alice_ws
        .request(json!({"op":"ping"}), 1, &mut Vec::new())
        .await;
    assert_eq!(pong["op"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_at_connect_and_its_connections_closed() {
    let app = App::start(
        &["--jwt-secret", JWT_SECRET, "--token-revocation"],
        &["--jwt-secret", JWT_SECRET],
    )
    .await;
    let carol = app.backend.login("carol").await;
    let (status, answer) = app.backend.post("/token", Some(&carol), &json!({})).await;
    assert_eq!(status, 200, "{answer}");
    let token = answer["token"].as_str().unwrap().to_owned();
    let mut live = Vec::new();
    for i in 0..2 {
        let url = app.node(i).ws_url(&format!("token={token}"));
        live.push(connect_with_headers(&url, &[("sec-websocket-protocol", "wsrelay.v1")]).await);
    }
    let mut live: Vec<Client> = live
        .into_iter()
        .map(|c| c.unwrap_or_else(|(status, body)| panic!("the token works: {status} {body}")))
        .collect();
    // A cookie connection of someone else, through the connect proxy.
    let mut alice = connect(app.node(0), &app.backend.login("alice").await).await;

    let admin = app.backend.login("admin").await;
    let (status, answer) = app
        .backend
        .post("/admin/revoke", Some(&admin), &json!({"user":"carol"}))
        .await;
    assert_eq!(status, 200, "{answer}");
    for client in &mut live {
        let (frames, code) = until_close(client).await;
        assert_eq!(frames.last().unwrap()["op"], "disconnect", "{frames:?}");
        assert_eq!(code, Some(1008), "{frames:?}");
    }
    // Checked after the upgrade (a Redis read), so the client can read why.
    let query = format!("token={token}");
    let (frame, code) = turned_away(app.node(1), &query, None).await;
    assert_eq!(frame["code"], "forbidden", "{frame}");
    assert_eq!(code, Some(1008));
    let pong = alice
        .request(json!({"op":"ping"}), 1, &mut Vec::new())
        .await;
    assert_eq!(pong["op"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_refreshed_until_their_session_ends() {
    // Connections last 2 s between refreshes, asked for 1 s before they expire.
    let app = App::start(
        &["--proxy-refresh-before", "1s"],
        &["--connection-ttl", "2"],
    )
    .await;
    let alice = app.backend.login("alice").await;
    let bob = app.backend.login("bob").await;
    let mut alice_ws = connect(app.node(0), &alice).await;
    // Alice's first expiry is at most 2 s (and a second's rounding) from now.
    let expired_unless_refreshed = SystemTime::now() + Duration::from_secs(3);
    let mut bob_ws = connect(app.node(1), &bob).await;

    // Bob logs out: his next refresh finds no session, and the relay closes him.
    assert_eq!(
        app.backend.post("/logout", Some(&bob), &json!({})).await.0,
        200
    );
    let (frames, code) = until_close(&mut bob_ws).await;
    assert_eq!(code, Some(1008), "{frames:?}");

    // Alice is still logged in: refreshed past her first expiry, she is connected.
    wait_until("alice's first expiry has passed", || {
        SystemTime::now() > expired_unless_refreshed
    })
    .await;
    let pong = alice_ws
        .request(json!({"op":"ping"}), 1, &mut Vec::new())
        .await;
    assert_eq!(pong["op"], "pong");
}

/// The backend alone, called as a node calls it (the bodies of docs/proxy.md, the
/// cookie forwarded), and as the chat page and an admin call it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_answers_the_proxy_calls_as_the_contract_says() {
    let db = Database::new();
    let backend = Backend::start(free_port(), &db.path, &[], &[]).await;
    let alice = backend.login("alice").await;
    let call = async |proxy: &str, cookie: Option<&str>, body: Value| {
        let (status, answer) = backend
            .post(&format!("/relay/{proxy}"), cookie, &body)
            .await;
        assert_eq!(status, 200, "{proxy}: {answer}");
        answer
    };
    let common = json!({"client": "n1/17", "transport": "websocket"});
    let with = |fields: Value| {
        let mut body = common.clone();
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        body
    };

    let refusal = call("connect", None, with(json!({"channels": []}))).await;
    assert_eq!(
        refusal,
        json!({"error":{"code":4401,"message":"log in first"}})
    );
    let connect = call("connect", Some(&alice), with(json!({"channels": []}))).await;
    let result = &connect["result"];
    assert_eq!(
        (&result["user"], &result["info"], &result["subscribe"]),
        (
            &json!("alice"),
            &json!({"name":"alice"}),
            &json!(["#alice"])
        ),
        "{connect}"
    );
    assert!(result["expire_at"].as_u64().is_some(), "{connect}");

    let alice_says = |fields: Value| {
        let mut body = with(fields);
        body["user"] = json!("alice");
        body
    };
    let sub = |ch: &str| alice_says(json!({"ch": ch}));
    assert_eq!(
        call("subscribe", None, sub("chat:lobby")).await,
        json!({"result":{}})
    );
    let refusal = call("subscribe", None, sub("chat:secret")).await;
    assert_eq!(refusal["error"]["code"], 4403, "{refusal}");

    let publish = |text: &str| alice_says(json!({"ch":"chat:lobby","data":{"text":text}}));
    let refusal = call("publish", None, publish("more spam")).await;
    assert_eq!(refusal["error"]["code"], 4400, "{refusal}");
    let long = "x".repeat(501);
    assert_eq!(
        call("publish", None, publish(&long)).await["error"]["code"],
        4400
    );
    let stored = call("publish", None, publish("hello")).await;
    let line = &stored["result"]["data"];
    assert_eq!(
        (&line["user"], &line["text"]),
        (&json!("alice"), &json!("hello"))
    );

    let history = |room: &str| alice_says(json!({"method":"history","data":{"room":room}}));
    let answer = call("rpc", None, history("chat:lobby")).await;
    assert_eq!(
        answer,
        json!({"result":{"data":{"room":"chat:lobby","lines":[line]}}})
    );
    let unknown = call("rpc", None, alice_says(json!({"method":"nope","data":{}}))).await;
    assert_eq!(unknown["error"]["code"], 4404, "{unknown}");

    let refresh = call("refresh", Some(&alice), alice_says(json!({}))).await;
    assert!(
        refresh["result"]["expire_at"].as_u64().is_some(),
        "{refresh}"
    );
    assert_eq!(
        backend.post("/logout", Some(&alice), &json!({})).await.0,
        200
    );
    let refresh = call("refresh", Some(&alice), alice_says(json!({}))).await;
    assert_eq!(refresh, json!({"result":{"expired":true}}));

    // The admin's endpoints: for admins only, and they say when no node answers.
    let kick = json!({"user":"bob"});
    assert_eq!(backend.post("/admin/kick", None, &kick).await.0, 401);
    let bob = backend.login("bob").await;
    assert_eq!(backend.post("/admin/kick", Some(&bob), &kick).await.0, 403);
    let admin = backend.login("admin").await;
    let (status, answer) = backend
        .post("/admin/kick", Some(&admin), &json!({"user":"B B"}))
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = backend.post("/admin/kick", Some(&admin), &kick).await;
    assert_eq!(status, 502, "no relay node: {answer}");
}

/// Two nodes on one Redis, with the example's relay configuration
/// (examples/backend/wsrelay.toml) pointed at the backend, and the backend.
struct App {
    redis: RedisServer,
    nodes: Vec<TestNode>,
    backend: Backend,
    db: Database,
    relay_flags: Vec<String>,
    backend_flags: Vec<String>,
}

impl App {
    async fn start(relay_flags: &[&str], backend_flags: &[&str]) -> App {
        let redis = RedisServer::start().await;
        let to_strings = |flags: &[&str]| flags.iter().map(|f| f.to_string()).collect();
        App::start_with(
            redis,
            Database::new(),
            to_strings(relay_flags),
            to_strings(backend_flags),
        )
        .await
    }

    async fn start_with(
        redis: RedisServer,
        db: Database,
        relay_flags: Vec<String>,
        backend_flags: Vec<String>,
    ) -> App {
        // The nodes call the backend only when clients come: it can start after them.
        let port = free_port();
        let url = |proxy: &str| format!("http://127.0.0.1:{port}/relay/{proxy}");
        let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend/wsrelay.toml");
        let mut flags: Vec<String> = vec!["--config".into(), config.into()];
        for proxy in ["connect", "refresh", "subscribe", "publish", "rpc"] {
            flags.extend([format!("--proxy-{proxy}-url"), url(proxy)]);
        }
        // A debug build on a busy machine: the contract's 1 s is for production.
        flags.extend(["--proxy-timeout", "5s", "--api-key", API_KEY].map(String::from));
        flags.extend(relay_flags.iter().cloned());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mut nodes = Vec::new();
        for id in ["n1", "n2"] {
            nodes.push(TestNode::with_redis(&redis, id, &flags).await);
        }
        let apis: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
        let backend = Backend::start(port, &db.path, &apis, &backend_flags).await;
        App {
            redis,
            nodes,
            backend,
            db,
            relay_flags,
            backend_flags,
        }
    }

    fn node(&self, i: usize) -> &TestNode {
        &self.nodes[i]
    }

    /// Stops everything (the nodes drain, Redis and the backend are killed: Redis
    /// keeps nothing), then starts it again on the same database.
    async fn restart(self) -> App {
        let App {
            mut redis,
            nodes,
            backend,
            db,
            relay_flags,
            backend_flags,
        } = self;
        for node in nodes {
            node.stop().await;
        }
        drop(backend);
        redis.restart().await;
        App::start_with(redis, db, relay_flags, backend_flags).await
    }
}

/// The example backend (examples/backend/app.py) as a child process; killed on drop.
struct Backend {
    addr: SocketAddr,
    child: Child,
    /// Its output (the request log), kept for a failing test.
    log: PathBuf,
}

impl Backend {
    async fn start(port: u16, db: &Path, relays: &[SocketAddr], flags: &[String]) -> Backend {
        let python = std::env::var("WSRELAY_PYTHON").unwrap_or_else(|_| "python3".into());
        let check = Command::new(&python)
            .args(["-c", "import flask"])
            .output()
            .expect("a Python interpreter");
        assert!(
            check.status.success(),
            "{python} lacks the flask package: run ./scripts/test.sh, which installs it"
        );
        let log =
            std::env::temp_dir().join(format!("wsrelay-backend-{}-{port}.log", std::process::id()));
        let out = std::fs::File::create(&log).unwrap();
        let relays: Vec<String> = relays.iter().map(|a| format!("http://{a}")).collect();
        let child = Command::new(&python)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/examples/backend/app.py"
            ))
            .args(["--port", &port.to_string(), "--db"])
            .arg(db)
            .args(["--relay-api", &relays.join(","), "--relay-api-key", API_KEY])
            .args(flags)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        let mut backend = Backend {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log,
        };
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(backend.addr).await.is_err() {
            if let Some(status) = backend.child.try_wait().unwrap() {
                panic!("the backend exited ({status}): {}", backend.output());
            }
            assert!(Instant::now() < deadline, "the backend did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backend
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// POSTs JSON (with a session cookie): (status, JSON answer).
    async fn post(&self, path: &str, cookie: Option<&str>, body: &Value) -> (u16, Value) {
        let (status, _, body) = self.exchange(path, cookie, body).await;
        (status, body)
    }

    async fn exchange(
        &self,
        path: &str,
        cookie: Option<&str>,
        body: &Value,
    ) -> (u16, String, Value) {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(cookie.map(|c| ("cookie", c)));
        let (status, head, text) = http_exchange(
            self.addr,
            "POST",
            path,
            &headers,
            body.to_string().as_bytes(),
        )
        .await;
        let answer = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{path}: {status} {text:?} is not JSON ({e})"));
        (status, head, answer)
    }

    /// Logs `user` in; returns the session cookie (`sid=...`).
    async fn login(&self, user: &str) -> String {
        let (status, head, answer) = self.exchange("/login", None, &json!({"user": user})).await;
        assert_eq!(status, 200, "{answer}");
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, value)| value.trim().split(';').next()?.strip_prefix("sid="))
            .map(|sid| format!("sid={sid}"))
            .unwrap_or_else(|| panic!("a session cookie in {head}"))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("backend output:\n{}", self.output());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A new SQLite file for the backend, removed on drop.
struct Database {
    path: PathBuf,
}

impl Database {
    fn new() -> Database {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("wsrelay-backend-{}-{n}.db", std::process::id()));
        Database { path }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = self.path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A WebSocket request to `node` (with `query`) as a browser page of the chat would
/// send it: the protocol (no default channel) and the backend's session cookie.
fn ws_request(
    node: &TestNode,
    query: &str,
    cookie: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut request = node.ws_url(query).into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("sec-websocket-protocol", "wsrelay.v1".parse().unwrap());
    if let Some(cookie) = cookie {
        headers.insert("cookie", cookie.parse().unwrap());
    }
    request
}

/// A logged-in client (its cookie forwarded to the backend) after `welcome`.
async fn connect(node: &TestNode, cookie: &str) -> Client {
    let url = node.ws_url("");
    let headers = [("sec-websocket-protocol", "wsrelay.v1"), ("cookie", cookie)];
    connect_with_headers(&url, &headers)
        .await
        .unwrap_or_else(|(status, body)| panic!("connect: {status} {body}"))
}

/// Opens a WebSocket that is refused after the upgrade: the one frame the node
/// sends (an `error`), and the close code that follows.
async fn turned_away(node: &TestNode, query: &str, cookie: Option<&str>) -> (Value, Option<u16>) {
    let (ws, _) = timeout(
        WAIT,
        tokio_tungstenite::connect_async(ws_request(node, query, cookie)),
    )
    .await
    .expect("connect in time")
    .expect("the upgrade succeeds: the refusal is a frame and a close code");
    let mut client = Client {
        ws,
        welcome: Value::Null,
    };
    let (mut frames, code) = until_close(&mut client).await;
    assert_eq!(frames.len(), 1, "one frame before the close: {frames:?}");
    (frames.remove(0), code)
}

/// Every frame until the node closes the connection, and the close code.
async fn until_close(client: &mut Client) -> (Vec<Value>, Option<u16>) {
    use futures_util::StreamExt;
    let mut frames = Vec::new();
    loop {
        match timeout(WAIT, client.ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return (frames, frame.map(|f| f.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (frames, None),
        }
    }
}

/// Sends `frame` with `id` and returns its reply; the `msg` frames that arrive
/// meanwhile are added to `msgs`, presence events (the example's rooms have join
/// and leave) are skipped.
async fn ask(client: &mut Client, frame: Value, id: u64, msgs: &mut Vec<Value>) -> Value {
    let mut stash = Vec::new();
    let reply = client.request(frame, id, &mut stash).await;
    for frame in stash {
        match frame["op"].as_str() {
            Some("msg") => msgs.push(frame),
            Some("join" | "leave") => {}
            _ => panic!("unexpected frame: {frame}"),
        }
    }
    reply
}

/// The next `msg` frame, presence events skipped.
async fn next_msg(client: &mut Client) -> Value {
    loop {
        let frame = client.recv().await;
        match frame["op"].as_str() {
            Some("msg") => return frame,
            Some("join" | "leave") => {}
            _ => panic!("unexpected frame: {frame}"),
        }
    }
}

/// An `rpc` request: its answer (`{"op":"rpc",...}`) or error.
async fn rpc(client: &mut Client, method: &str, data: Value, id: u64) -> Value {
    let frame = json!({"op":"rpc","method":method,"data":data});
    client.request(frame, id, &mut Vec::new()).await
}

/// A POST to the server API of the node at `addr`: (status, body).
async fn api(addr: SocketAddr, path: &str, body: Value) -> (u16, String) {
    let auth = format!("Bearer {API_KEY}");
    let headers = [("authorization", auth.as_str())];
    http_request(addr, "POST", path, &headers, body.to_string().as_bytes()).await
}
