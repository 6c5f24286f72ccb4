//! Presence and join/leave events, end to end: real nodes (in-process, and the real
//! binary where one must be SIGKILLed), real clients, a real `redis-server`. What
//! does not need Redis runs on the memory broker too.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    Client, NodeProcess, RedisServer, TestNode, Topology, WAIT, http_request, wait_until,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const API_KEY: &str = "api-key-0123456789abcdef";
/// Presence and join/leave on every channel.
const FLAGS: &[&str] = &["--presence", "--join-leave", "--api-key", API_KEY];

async fn presence(c: &mut Client, ch: &str, id: u64) -> Value {
    let mut stash = Vec::new();
    let reply = c
        .request(json!({"op":"presence","ch":ch}), id, &mut stash)
        .await;
    assert_eq!(reply["op"], "presence", "{reply}");
    reply
}

/// The connections listed in a presence reply, as `node/conn`, sorted.
fn members(reply: &Value) -> Vec<String> {
    let mut m: Vec<String> = reply["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["node"].as_str().unwrap(),
                e["conn"].as_str().unwrap()
            )
        })
        .collect();
    m.sort();
    m
}

fn member(client: &Client) -> String {
    format!(
        "{}/{}",
        client.welcome["node"].as_str().unwrap(),
        client.welcome["conn"].as_str().unwrap()
    )
}

/// Waits until every node lists exactly `expected` in `ch`'s presence.
async fn wait_members(nodes: &[&TestNode], ch: &str, mut expected: Vec<String>) {
    expected.sort();
    for node in nodes {
        let mut probe = node.client("channel=probe").await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = members(&presence(&mut probe, ch, 1).await);
            if got == expected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{got:?} != {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The next frame with one of `ops` (skipping others, e.g. the client's own events).
async fn next_op(c: &mut Client, ops: &[&str]) -> Value {
    loop {
        let f = c.recv().await;
        if ops.iter().any(|op| f["op"] == *op) {
            return f;
        }
    }
}

async fn presence_and_events(t: Topology) {
    let ch = "room:1";
    let mut a = t.node(0).client(&format!("channel={ch}")).await;
    let mut b = t.node(1).client(&format!("channel={ch}")).await;
    let mut c = t.node(2).client("channel=other").await;
    // a sees b join (its own join came first).
    let join = next_op(&mut a, &["join"]).await;
    let join = if join["conn"] == a.welcome["conn"] && join["node"] == a.welcome["node"] {
        next_op(&mut a, &["join"]).await
    } else {
        join
    };
    assert_eq!(
        join,
        json!({"op":"join","ch":ch,"conn":b.welcome["conn"],"node":b.welcome["node"],"user":null,"info":null}),
        "{}",
        t.name()
    );
    // c joins with a sub; a sees it before c's first message.
    let (_, ack) = c.sub_since(ch, None, 1).await;
    assert_eq!(ack["op"], "ack");
    c.send(json!({"op":"pub","ch":ch,"data":"hi from c"})).await;
    let frame = next_op(&mut a, &["join", "msg"]).await;
    assert_eq!(
        (frame["op"].clone(), frame["conn"].clone()),
        (json!("join"), c.welcome["conn"].clone())
    );
    let frame = next_op(&mut a, &["join", "msg"]).await;
    assert_eq!(frame["data"], "hi from c");

    let everyone = vec![member(&a), member(&b), member(&c)];
    let nodes: Vec<&TestNode> = t.nodes.iter().collect();
    wait_members(&nodes, ch, everyone.clone()).await;
    let mut stash = Vec::new();
    let stats = b
        .request(json!({"op":"presence_stats","ch":ch}), 2, &mut stash)
        .await;
    assert_eq!(
        stats,
        json!({"op":"presence_stats","id":2,"ch":ch,"clients":3,"users":3}),
        "anonymous clients count as one user each"
    );

    // c leaves with an unsub after a message: the message first, then the leave.
    c.send(json!({"op":"pub","ch":ch,"data":"bye"})).await;
    c.send(json!({"op":"unsub","ch":ch})).await;
    assert_eq!(next_op(&mut a, &["leave", "msg"]).await["data"], "bye");
    let leave = next_op(&mut a, &["leave", "msg"]).await;
    assert_eq!(
        (leave["op"].clone(), leave["conn"].clone()),
        (json!("leave"), c.welcome["conn"].clone())
    );
    // b vanishes without a close frame: leave, and out of presence.
    let b_member = member(&b);
    drop(b);
    let leave = next_op(&mut a, &["leave"]).await;
    assert_eq!(
        format!(
            "{}/{}",
            leave["node"].as_str().unwrap(),
            leave["conn"].as_str().unwrap()
        ),
        b_member
    );
    wait_members(&nodes, ch, vec![member(&a)]).await;

    // The API answers the same.
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = http_request(
        t.node(2).addr,
        "GET",
        &format!("/api/presence?ch={ch}"),
        &[("authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(members(&body), vec![member(&a)]);
    let (status, body) = http_request(
        t.node(1).addr,
        "GET",
        &format!("/api/presence_stats?ch={ch}"),
        &[("authorization", auth.as_str())],
        b"",
    )
    .await;
    assert_eq!(
        (status, serde_json::from_str::<Value>(&body).unwrap()),
        (200, json!({"ch":ch,"clients":1,"users":1}))
    );
    for (path, status) in [("/api/presence", 400), ("/api/presence?ch=a%20b", 400)] {
        let (got, body) = http_request(
            t.node(0).addr,
            "GET",
            path,
            &[("authorization", auth.as_str())],
            b"",
        )
        .await;
        assert_eq!(got, status, "{path}: {body}");
    }
    let (got, _) = http_request(
        t.node(0).addr,
        "GET",
        &format!("/api/presence?ch={ch}"),
        &[],
        b"",
    )
    .await;
    assert_eq!(got, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_memory() {
    presence_and_events(Topology::memory(FLAGS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_redis() {
    presence_and_events(Topology::redis(3, FLAGS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_sharded() {
    presence_and_events(Topology::sharded(3, 3, FLAGS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_join_leave_cluster() {
    presence_and_events(Topology::cluster(3, FLAGS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_without_presence_say_so_and_limits_hold() {
    let node = TestNode::start(&[
        "--config",
        &namespace_file("[namespaces.room]\npresence = true\n"),
        "--max-presence",
        "2",
    ])
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(node.client("channel=room:big").await);
    }
    let reply = presence(&mut clients[0], "room:big", 1).await;
    assert_eq!(
        reply["clients"].as_array().unwrap().len(),
        2,
        "--max-presence"
    );
    let mut stash = Vec::new();
    let stats = clients[0]
        .request(
            json!({"op":"presence_stats","ch":"room:big"}),
            2,
            &mut stash,
        )
        .await;
    assert_eq!(stats["clients"], 3, "stats count everyone");
    for op in ["presence", "presence_stats"] {
        let reply = clients[0]
            .request(json!({"op":op,"ch":"plain"}), 3, &mut stash)
            .await;
        assert_eq!(reply["code"], "bad_request", "{reply}");
        assert!(
            reply["message"].as_str().unwrap().contains("presence"),
            "{reply}"
        );
    }
    // No join events on a channel without join-leave.
    let mut watcher = node.client("channel=room:quiet").await;
    let _other = node.client("channel=room:quiet").await;
    assert!(watcher.try_recv(Duration::from_millis(300)).await.is_none());
}

fn namespace_file(text: &str) -> String {
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "wsrelay-presence-{}-{call}.toml",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_needs_the_permission_to_subscribe_and_counts_users() {
    const SECRET: &str = "test-secret-of-some-length";
    let node = TestNode::start(&["--jwt-secret", SECRET, "--presence", "--join-leave"]).await;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = |info: Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub":"ada","exp":exp,"channels":["room:a"],"info":info}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let mut first = node
        .client(&format!(
            "channel=room:a&token={}",
            token(json!({"color": "red"}))
        ))
        .await;
    let _second = node
        .client(&format!(
            "channel=room:a&token={}",
            token(json!({"color": "blue"}))
        ))
        .await;
    let reply = presence(&mut first, "room:a", 1).await;
    let infos: Vec<&Value> = reply["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["info"])
        .collect();
    assert!(infos.contains(&&json!({"color":"red"})) && infos.contains(&&json!({"color":"blue"})));
    assert!(
        reply["clients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["user"] == "ada")
    );
    let mut stash = Vec::new();
    let stats = first
        .request(json!({"op":"presence_stats","ch":"room:a"}), 2, &mut stash)
        .await;
    assert_eq!(
        (stats["clients"].clone(), stats["users"].clone()),
        (json!(2), json!(1))
    );
    let reply = first
        .request(json!({"op":"presence","ch":"room:b"}), 3, &mut stash)
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");

    // An info claim that is not a small JSON object is refused at connect.
    let big = json!({"x": "y".repeat(2000)});
    for info in [json!("text"), json!(null), json!([1]), big] {
        let refused = common::connect_with_headers(
            &node.ws_url(&format!("channel=room:a&token={}", token(info))),
            &[],
        )
        .await;
        let Err((status, body)) = refused else {
            panic!("accepted")
        };
        assert_eq!(status, 401);
        assert!(body.contains("info"), "{body}");
    }
}

/// SIGKILL of a node: its entries expire; a Redis that lost its data gets everyone
/// back within one refresh, without any client reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_follow_nodes_and_survive_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let flags = [FLAGS, &["--presence-ttl", "1500ms"]].concat();
    let n1 = TestNode::with_redis(&redis, "n1", &flags).await;
    let n2 = TestNode::with_redis(&redis, "n2", &flags).await;
    let url = redis.url();
    let doomed =
        NodeProcess::spawn(&[&flags[..], &["--redis-url", &url, "--node-id", "n3"]].concat());
    doomed.wait_ready().await;
    let ch = "room:k";
    let a = n1.client(&format!("channel={ch}")).await;
    let b = n2.client(&format!("channel={ch}")).await;
    let c = doomed.client(&format!("channel={ch}")).await;
    let all = vec![member(&a), member(&b), member(&c)];
    wait_members(&[&n1, &n2], ch, all).await;

    let mut doomed = doomed;
    doomed.signal("KILL");
    doomed.wait_exit(WAIT);
    // Nobody reads presence now: the survivors' refreshes prune the dead node's entry.
    let key = format!("wsrelay:{{{ch}}}:presence");
    redis.wait_int(&["HLEN", &key], 2).await;
    wait_members(&[&n1, &n2], ch, vec![member(&a), member(&b)]).await;

    redis.restart().await;
    n1.wait_ready().await;
    n2.wait_ready().await;
    wait_members(&[&n1, &n2], ch, vec![member(&a), member(&b)]).await;
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_no_presence_behind_and_an_outage_is_reported() {
    let mut redis = RedisServer::start().await;
    let n1 = TestNode::with_redis(&redis, "n1", FLAGS).await;
    let n2 = TestNode::with_redis(
        &redis,
        "n2",
        &[FLAGS, &["--broker-timeout", "300ms"]].concat(),
    )
    .await;
    let ch = "room:churn";
    let nodes = [&n1, &n2];
    let mut tasks = Vec::new();
    for worker in 0..20usize {
        let url = nodes[worker % 2].ws_url(&format!("channel={ch}"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                let c = Client::connect_abortable(&url).await;
                drop(c);
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .unwrap()
            .unwrap();
    }
    n1.wait_registry_empty().await;
    n2.wait_registry_empty().await;
    let key = format!("wsrelay:{{{ch}}}:presence");
    redis.wait_int(&["HLEN", &key], 0).await;
    wait_members(&[&n1, &n2], ch, Vec::new()).await;

    // Redis gone: presence is `unavailable` within the broker timeout.
    let mut probe = n2.client("channel=probe").await;
    redis.kill();
    wait_until("n2 sees the outage", || !n2.handle.is_ready()).await;
    let started = std::time::Instant::now();
    let mut stash = Vec::new();
    let reply = probe
        .request(json!({"op":"presence","ch":ch}), 1, &mut stash)
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

async fn many_at_once_each_find_itself(t: Topology) {
    // Connections opening at the same moment have their entries written together;
    // each one's welcome still means it is listed.
    let opens = (0..120).map(|i| {
        let node = t.node(i % 2);
        let url = node.ws_url("channel=crowd:1");
        async move {
            let mut c = Client::connect(&url).await;
            let me = format!(
                "{}/{}",
                c.welcome["node"].as_str().unwrap(),
                c.welcome["conn"].as_str().unwrap()
            );
            let listed = members(&presence(&mut c, "crowd:1", 1).await);
            assert!(listed.contains(&me), "{me} not in presence at its welcome");
            c
        }
    });
    let clients = futures_util::future::join_all(opens).await;
    assert_eq!(clients.len(), 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once_are_each_in_presence_at_welcome_redis() {
    many_at_once_each_find_itself(Topology::redis(2, FLAGS).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_at_once_are_each_in_presence_at_welcome_cluster() {
    many_at_once_each_find_itself(Topology::cluster(2, FLAGS).await).await;
}
