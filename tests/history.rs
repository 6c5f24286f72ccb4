//! History and recovery, end to end: real nodes, real WebSocket clients and real
//! Redis processes (killed, restarted, or cut off where a test says so). Each
//! scenario runs on every topology it applies to (`on_topologies!`): one node on the
//! memory broker, three nodes on one Redis, on three shards, on a Sentinel group, on
//! a Redis Cluster. Faults under a steady stream are in `tests/faults.rs`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    Client, DeafProxy, RedisServer, TestNode, Topology, WAIT, http_request, metric, offsets,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::time::timeout;

const API_KEY: &str = "api-key-0123456789abcdef";

/// Publishers fast enough for the tests, and the API.
const FLAGS: &[&str] = &[
    "--publish-rate",
    "100000",
    "--publish-burst",
    "100000",
    "--api-key",
    API_KEY,
];

/// A `--config` file giving the `chat` namespace `history_size` messages of history
/// (every other channel has none).
fn chat_history(history_size: usize) -> String {
    common::config_file(&format!(
        "[namespaces.chat]\nhistory-size = {history_size}\n"
    ))
}

fn flags(history_size: usize, extra: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = vec!["--config".into(), chat_history(history_size)];
    all.extend(FLAGS.iter().chain(extra).map(|f| f.to_string()));
    all
}

async fn memory(history_size: usize, extra: &[&str]) -> Topology {
    let flags = flags(history_size, extra);
    Topology::memory(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await
}

async fn redis(history_size: usize, extra: &[&str]) -> Topology {
    let flags = flags(history_size, extra);
    Topology::redis(3, &flags.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Three nodes on a Redis Cluster (three masters, three replicas).
async fn cluster(history_size: usize, extra: &[&str]) -> Topology {
    let flags = flags(history_size, extra);
    Topology::cluster(3, &flags.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Three nodes on a Sentinel group (a master, a replica, three sentinels).
async fn sentinel(history_size: usize, extra: &[&str]) -> Topology {
    let flags = flags(history_size, extra);
    Topology::sentinel(3, &flags.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Three nodes on three Redis shards.
async fn sharded(history_size: usize, extra: &[&str]) -> Topology {
    let flags = flags(history_size, extra);
    Topology::sharded(3, 3, &flags.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// One test per topology for a scenario: `on_topologies!(scenario(size, flags):
/// memory, redis, …)` makes the tests `scenario::memory`, `scenario::redis`, …, each
/// running the scenario on a new topology of that kind with `size` messages of
/// history in the `chat` namespace and `flags`.
macro_rules! on_topologies {
    ($scenario:ident($size:expr, $flags:expr): $($topology:ident),+) => {
        mod $scenario {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $topology() {
                    super::$scenario(super::$topology($size, $flags).await).await;
                }
            )+
        }
    };
}

fn epoch_of(frame: &Value) -> String {
    frame["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("no epoch in {frame}"))
        .to_owned()
}

/// The position of `ch` in a `welcome` frame.
fn welcome_position(client: &Client, ch: &str) -> Value {
    client.welcome["positions"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["ch"] == ch))
        .unwrap_or_else(|| panic!("no position of {ch} in {}", client.welcome))
        .clone()
}

async fn publish_range(publisher: &mut Client, ch: &str, range: std::ops::RangeInclusive<u64>) {
    for i in range {
        let ack = publisher.publish(ch, json!({"n": i}), i).await;
        assert_eq!(ack, json!({"op":"ack","id":i,"offset":i}), "pub {i}");
    }
}

// 1 and 5: a client reads 1..10 on one node, goes away while 20 more are published
// on another, and comes back on a third with `since`.

async fn recovery_across_nodes(t: Topology) {
    let ch = "chat:recover";
    let mut publisher = t.node(0).client("channel=side").await;
    let mut reader = t.node(1).client(&format!("channel={ch}")).await;
    let position = welcome_position(&reader, ch);
    assert_eq!(position["offset"], 0, "{}", t.name());
    let epoch = epoch_of(&position);

    publish_range(&mut publisher, ch, 1..=10).await;
    let got = reader.recv_msgs(10).await;
    assert_eq!(offsets(&got), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        got[0],
        json!({"op":"msg","ch":ch,"offset":1,"data":{"n":1}})
    );
    drop(reader);

    publish_range(&mut publisher, ch, 11..=30).await;
    let mut back = t.node(2).client("channel=other").await;
    let (recovered, ack) = back.sub_since(ch, Some((&epoch, 10)), 1).await;
    assert_eq!(offsets(&recovered), (11..=30).collect::<Vec<_>>());
    assert_eq!(recovered[19]["data"], json!({"n": 30}));
    assert_eq!(
        ack,
        json!({"op":"ack","id":1,"epoch":epoch,"offset":30,"recovered":true})
    );
    // Live from 31 on, nothing twice.
    publish_range(&mut publisher, ch, 31..=32).await;
    assert_eq!(offsets(&back.recv_msgs(2).await), vec![31, 32]);
    assert!(back.try_recv(Duration::from_millis(200)).await.is_none());

    // Nothing missed: recovered, no replay.
    let mut current = t.node(1).client("channel=other").await;
    let (recovered, ack) = current.sub_since(ch, Some((&epoch, 32)), 2).await;
    assert!(recovered.is_empty(), "{recovered:?}");
    assert_eq!(ack["recovered"], true);
    // A plain `sub` on a history channel carries the position.
    let mut plain = t.node(1).client("channel=other").await;
    let (before, ack) = plain.sub_since(ch, None, 3).await;
    assert!(before.is_empty());
    assert_eq!(ack, json!({"op":"ack","id":3,"epoch":epoch,"offset":32}));

    // Recovery at connect: welcome first, then what was missed, then live.
    let mut again = t
        .node(0)
        .client(&format!("channel={ch}&since={ch}:{epoch}:28"))
        .await;
    assert_eq!(
        again.welcome["positions"],
        json!([{"ch":ch,"epoch":epoch,"offset":32,"recovered":true}])
    );
    assert_eq!(offsets(&again.recv_msgs(4).await), vec![29, 30, 31, 32]);
    publish_range(&mut publisher, ch, 33..=33).await;
    assert_eq!(offsets(&again.recv_msgs(1).await), vec![33]);
}

on_topologies!(recovery_across_nodes(5000, &[]): memory, redis, sharded, sentinel, cluster);

// 2: a publisher at full rate while 20 clients keep disconnecting and recovering
// on other nodes; every client's offsets are strictly consecutive.

/// Recovery may reach back further than the default 1,000: on a loaded 2-core
/// machine a reader can be away for more than a second of the publisher's rate,
/// and this suite is about offsets under races, not about the recovery limit
/// (`trimmed_history_is_not_recovered` is).
const RACE_FLAGS: &[&str] = &["--max-recovery", "5000"];

/// One race at a time: each runs a publisher at 1,000/s and 20 readers, and several
/// at once on two cores (with the rest of the suite) starve each other past the
/// waits' bounds.
static ONE_RACE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn recovery_races_a_publisher(t: Topology) {
    let _one = ONE_RACE.lock().await;
    const READERS: usize = 20;
    const MESSAGES: u64 = 3000;
    let ch = "chat:race";
    let urls: Vec<String> = (0..3).map(|i| t.node(i).ws_url("")).collect();
    // The final offset, once the publisher is done (0 until then).
    let last_published = Arc::new(AtomicU64::new(0));

    let publisher = {
        let url = t.node(0).ws_url("channel=pubside");
        let last_published = last_published.clone();
        tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            // 1 ms ticks catch up after a late one: at least 1,000 publishes/s.
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let started = std::time::Instant::now();
            for i in 1..MESSAGES {
                tick.tick().await;
                c.send(json!({"op":"pub","ch":ch,"data":i})).await;
            }
            let ack = c.publish(ch, json!(MESSAGES), 1).await;
            let elapsed = started.elapsed();
            last_published.store(ack["offset"].as_u64().unwrap(), Ordering::SeqCst);
            elapsed
        })
    };

    let mut readers = Vec::new();
    for r in 0..READERS {
        let urls = urls.clone();
        let last_published = last_published.clone();
        readers.push(tokio::spawn(async move {
            let base = |i: usize| urls[i % urls.len()].clone();
            let mut client = Client::connect(&format!("{}?channel={ch}", base(r))).await;
            let position = welcome_position(&client, ch);
            let epoch = epoch_of(&position);
            let mut last = position["offset"].as_u64().unwrap();
            let mut reconnects = 0u32;
            let mut received = 0u64;
            let mut hop = r;
            let mut seen = Vec::new();
            let mut idle_since = std::time::Instant::now();
            loop {
                let done = last_published.load(Ordering::SeqCst);
                if done != 0 && last >= done {
                    return (received, reconnects);
                }
                // Leave after a few dozen messages, then come back on the next node.
                if received > 0 && received.is_multiple_of(20 + r as u64 * 3) && done == 0 {
                    drop(client);
                    hop += 1;
                    let url = format!("{}?channel={ch}&since={ch}:{epoch}:{last}", base(hop));
                    client = Client::connect(&url).await;
                    let position = welcome_position(&client, ch);
                    assert_eq!(position["recovered"], true, "reader {r}: {position}");
                    assert_eq!(epoch_of(&position), epoch);
                    reconnects += 1;
                }
                // Short waits: the publisher may finish just after this reader got
                // the last message, and the loop must see that.
                let Some(frame) = client.try_recv(Duration::from_millis(100)).await else {
                    assert!(
                        idle_since.elapsed() < WAIT,
                        "reader {r}: nothing after {last} (published: {})",
                        last_published.load(Ordering::SeqCst),
                    );
                    continue;
                };
                idle_since = std::time::Instant::now();
                assert_eq!(frame["op"], "msg", "reader {r}: {frame}");
                let offset = frame["offset"].as_u64().unwrap();
                seen.push(offset);
                assert_eq!(
                    offset,
                    last + 1,
                    "reader {r} conn {}: offsets must be consecutive: {:?}",
                    client.welcome["conn"],
                    &seen[seen.len().saturating_sub(12)..]
                );
                last = offset;
                received += 1;
            }
        }));
    }
    let elapsed = timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher in time")
        .unwrap();
    let rate = MESSAGES as f64 / elapsed.as_secs_f64();
    let mut total_reconnects = 0;
    for reader in readers {
        let (received, reconnects) = timeout(Duration::from_secs(60), reader)
            .await
            .expect("reader in time")
            .unwrap();
        assert!(received > 0);
        total_reconnects += reconnects;
    }
    assert!(
        total_reconnects >= READERS as u32 * 5,
        "{total_reconnects} reconnects"
    );
    eprintln!(
        "{}: {MESSAGES} messages at {rate:.0}/s, {total_reconnects} recoveries, all consecutive",
        t.name()
    );
}

on_topologies!(recovery_races_a_publisher(5000, RACE_FLAGS): memory, redis, sharded, sentinel, cluster);

// 3: history that no longer holds what a client missed is not recovered, never in
// part.

async fn trimmed_history_is_not_recovered(t: Topology) {
    let ch = "chat:trim";
    let mut publisher = t.node(0).client(&format!("channel={ch}")).await;
    let epoch = epoch_of(&welcome_position(&publisher, ch));
    publish_range(&mut publisher, ch, 1..=50).await;

    let mut c = t.node(1).client("channel=other").await;
    let (before, ack) = c.sub_since(ch, Some((&epoch, 5)), 1).await;
    assert!(
        before.is_empty(),
        "nothing of a partial recovery: {before:?}"
    );
    assert_eq!(
        ack,
        json!({"op":"ack","id":1,"epoch":epoch,"offset":50,"recovered":false})
    );
    // Live delivery goes on after a failed recovery.
    publish_range(&mut publisher, ch, 51..=51).await;
    assert_eq!(offsets(&c.recv_msgs(1).await), vec![51]);

    let mut c = t.node(2).client("channel=other").await;
    let (before, ack) = c.sub_since(ch, Some((&epoch, 45)), 2).await;
    assert_eq!(offsets(&before), (46..=51).collect::<Vec<_>>());
    assert_eq!(ack["recovered"], true);

    for (since, what) in [
        (("zzzz9", 45), "another epoch"),
        ((epoch.as_str(), 99), "ahead"),
    ] {
        let mut c = t.node(1).client("channel=other").await;
        let (before, ack) = c.sub_since(ch, Some(since), 3).await;
        assert!(before.is_empty(), "{what}");
        assert_eq!(ack["recovered"], false, "{what}: {ack}");
        assert_eq!(ack["epoch"], json!(epoch), "{what}: the current epoch");
    }

    // More missed than --max-recovery (20 here) is not replayed either.
    let mut c = t.node(1).client("channel=other").await;
    let (before, ack) = c.sub_since(ch, Some((&epoch, 30)), 4).await;
    assert!(before.is_empty());
    assert_eq!(ack["recovered"], false);

    // Without an id there is no ack: the failed recovery comes as a gap.
    c.send(json!({"op":"sub","ch":"chat:trim2","since":{"epoch":"zzzz9","offset":1}}))
        .await;
    let gap = c.recv().await;
    assert_eq!(gap["op"], "gap", "{gap}");
    assert_eq!(gap["ch"], "chat:trim2");
}

on_topologies!(trimmed_history_is_not_recovered(10, &["--max-recovery", "20"]): memory, redis, sharded);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_keeps_exactly_history_size_entries() {
    let t = redis(10, &[]).await;
    let mut publisher = t.node(0).client("channel=other").await;
    publish_range(&mut publisher, "chat:exact", 1..=25).await;
    let mut conn = t.redis_for("chat:exact").connection().await.unwrap();
    let len: u64 = redis::cmd("XLEN")
        .arg("wsrelay:{chat:exact}:stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 10, "exact MAXLEN, not approximate");
}

// 3: Redis restarted without its data: the epoch changes; subscribers that stayed
// are told with a gap, and recovery with the old epoch fails.

async fn redis_losing_its_data_changes_the_epoch(mut t: Topology) {
    let ch = "chat:restart";
    let mut stayer = t.node(1).client(&format!("channel={ch}")).await;
    let old = epoch_of(&welcome_position(&stayer, ch));
    let mut publisher = t.node(0).client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=5).await;
    assert_eq!(
        offsets(&stayer.recv_msgs(5).await),
        (1..=5).collect::<Vec<_>>()
    );

    t.redis_for_mut(ch).restart().await;
    // Node 2 re-subscribes, reads the new position and tells its subscriber.
    let gap = stayer.recv().await;
    assert_eq!(gap["op"], "gap", "{gap}");
    let new = epoch_of(&gap);
    assert_ne!(new, old);
    assert_eq!(gap["offset"], 0);

    for node in &t.nodes {
        node.wait_ready().await;
    }
    // The first publish after the restart may find the publishing connection broken
    // (`unavailable`, as documented); it reconnects.
    let deadline = tokio::time::Instant::now() + WAIT;
    let ack = loop {
        let reply = publisher.publish(ch, json!("after"), 1).await;
        if reply["op"] == "ack" {
            break reply;
        }
        assert_eq!(reply["code"], "unavailable", "{reply}");
        assert!(tokio::time::Instant::now() < deadline, "{reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ack["offset"], 1, "offsets start again in the new epoch");
    let msg = stayer.recv().await;
    assert_eq!(
        (msg["op"].clone(), msg["offset"].clone()),
        (json!("msg"), json!(1))
    );

    let mut late = t.node(2).client("channel=other").await;
    let (before, ack) = late.sub_since(ch, Some((&old, 5)), 2).await;
    assert!(before.is_empty());
    assert_eq!(
        ack,
        json!({"op":"ack","id":2,"epoch":new,"offset":1,"recovered":false})
    );
}

on_topologies!(redis_losing_its_data_changes_the_epoch(5000, &[]): redis, sharded);

// 4: the node repairs its own gaps: its pub/sub connection dropped (and kept out
// for a while), or deaf without being closed.

async fn a_dropped_pubsub_connection_is_repaired_from_history(t: Topology) {
    let ch = "chat:kill";
    let redis_server = t.redis_for(ch);
    let mut subscribers = Vec::new();
    for i in 0..3 {
        subscribers.push(t.node(i).client(&format!("channel={ch}")).await);
    }
    // A steady publisher through node 1.
    let publisher = {
        let url = t.node(0).ws_url("channel=pubside");
        tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            for i in 1..=600u64 {
                tick.tick().await;
                c.send(json!({"op":"pub","ch":ch,"data":i})).await;
            }
            c.publish(ch, json!("end"), 1).await["offset"]
                .as_u64()
                .unwrap()
        })
    };
    let mut admin = redis_server.connection().await.unwrap();
    // Connected (and subscribed) before the outages: it publishes during them.
    let mut side = Client::connect(&t.node(0).ws_url("channel=other")).await;
    let mut restored = Vec::new();
    for _ in 0..2 {
        // Let some traffic through, then cut every node's subscriber connection and
        // keep the nodes from reconnecting while messages go on being published.
        subscribers[0]
            .recv_msgs(50)
            .await
            .into_iter()
            .for_each(|m| restored.push(m));
        // Every node subscribed again (after the previous round).
        redis_server.wait_numsub(ch, 3).await;
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .unwrap();
        let connected = clients.lines().count();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(connected - 3)
            .query_async(&mut admin)
            .await
            .unwrap();
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(killed, 3, "one subscriber connection per node");
        for i in 0..20 {
            side.publish(ch, json!({"during": i}), 100 + i).await;
        }
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxclients")
            .arg(10_000)
            .query_async(&mut admin)
            .await
            .unwrap();
    }
    let last = timeout(Duration::from_secs(30), publisher)
        .await
        .expect("publisher in time")
        .unwrap();
    assert_eq!(last, 641, "600 + 2 x 20 + 1 published");

    // Node 1's subscriber: the frames taken above, then the rest.
    let mut first = restored;
    let rest = subscribers[0].recv_msgs(last as usize - first.len()).await;
    first.extend(rest);
    assert_eq!(offsets(&first), (1..=last).collect::<Vec<_>>(), "node 1");
    for (i, s) in subscribers.iter_mut().enumerate().skip(1) {
        let got = s.recv_msgs(last as usize).await;
        assert_eq!(
            offsets(&got),
            (1..=last).collect::<Vec<_>>(),
            "node {}",
            i + 1
        );
        assert!(
            s.try_recv(Duration::from_millis(100)).await.is_none(),
            "nothing twice"
        );
    }
    let mut repaired = 0.0;
    for node in &t.nodes {
        let text = node.handle.metrics_text();
        repaired += metric(&text, "wsrelay_history_repaired_messages_total");
        assert_eq!(
            metric(&text, r#"wsrelay_history_gaps_total{outcome="lost"}"#),
            0.0
        );
    }
    assert!(
        repaired >= 3.0 * 40.0,
        "each node repaired what it missed: {repaired}"
    );
}

on_topologies!(a_dropped_pubsub_connection_is_repaired_from_history(5000, &[]): redis, sharded);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_gone_back_is_a_gap_and_its_reused_offsets_are_delivered() {
    // What a failover to a replica that missed the last writes leaves behind: the
    // same epoch at a lower offset, whose next offsets go to other publications.
    let t = redis(5000, &[]).await;
    let ch = "chat:back";
    let mut reader = t.node(1).client(&format!("channel={ch}")).await;
    let mut publisher = t.node(0).client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=5).await;
    assert_eq!(offsets(&reader.recv_msgs(5).await), [1, 2, 3, 4, 5]);
    let mut admin = t.redis_for(ch).connection().await.unwrap();
    // The channel as a replica that got only 1..=3 has it.
    let _: () = redis::cmd("EVAL")
        .arg(
            "local e = redis.call('XRANGE', KEYS[1], '-', '3-0') \
             redis.call('DEL', KEYS[1]) \
             for i = 1, #e do redis.call('XADD', KEYS[1], e[i][1], unpack(e[i][2])) end \
             redis.call('HSET', KEYS[2], 's', 3)",
        )
        .arg(2)
        .arg("wsrelay:{chat:back}:stream")
        .arg("wsrelay:{chat:back}:meta")
        .query_async(&mut admin)
        .await
        .unwrap();
    // The nodes re-subscribe, as after a failover.
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    let gap = reader.recv().await;
    assert_eq!(
        (gap["op"].as_str(), gap["offset"].as_u64()),
        (Some("gap"), Some(3)),
        "{gap}"
    );
    // The next publication is given offset 4 again: delivered, not dropped as a
    // duplicate of the lost one.
    let ack = publisher.publish(ch, json!("the new 4"), 99).await;
    assert_eq!(ack["offset"], 4, "{ack}");
    let msg = reader.recv().await;
    assert_eq!(
        (msg["offset"].as_u64(), msg["data"].as_str()),
        (Some(4), Some("the new 4")),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_subscriber_connection_is_repaired_reported_and_replaced() {
    let redis_server = RedisServer::start().await;
    let proxy = DeafProxy::start(redis_server.port).await;
    let flags = flags(
        5000,
        &[
            "--position-check-interval",
            "300ms",
            "--broker-timeout",
            "1s",
        ],
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let n1 = TestNode::with_redis(&redis_server, "n1", &flags).await;
    let url = proxy.url();
    let n2 =
        TestNode::start(&[flags.as_slice(), &["--redis-url", &url, "--node-id", "n2"]].concat())
            .await;
    n2.wait_ready().await;
    let ch = "chat:deaf";
    let mut far = n2.client(&format!("channel={ch}")).await;
    let mut publisher = n1.client(&format!("channel={ch}")).await;
    publish_range(&mut publisher, ch, 1..=3).await;
    assert_eq!(offsets(&far.recv_msgs(3).await), vec![1, 2, 3]);

    proxy.set_deaf(true);
    publish_range(&mut publisher, ch, 4..=20).await;
    // Nothing arrives by pub/sub; the position check finds the channel behind.
    assert_eq!(
        offsets(&far.recv_msgs(17).await),
        (4..=20).collect::<Vec<_>>()
    );
    // The delivery probe does not come back: the node says why it is not ready.
    let (status, body) = wait_for_readyz(&n2, |status, body| {
        status == 503
            && body.contains("delivery probe through")
            && body.contains("not received within")
    })
    .await;
    assert!(
        body.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{status} {body}"
    );
    let text = n2.handle.metrics_text();
    let shard = format!(r#"{{shard="127.0.0.1:{}"}}"#, proxy.port);
    assert!(
        metric(
            &text,
            &format!("wsrelay_broker_probe_failures_total{shard}")
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("wsrelay_broker_shard_up{shard}")),
        0.0
    );
    assert_eq!(metric(&text, "wsrelay_broker_up"), 0.0);

    // Published while the node has no working subscriber connection.
    publish_range(&mut publisher, ch, 21..=25).await;
    proxy.set_deaf(false);
    // A new subscriber connection: ready again, and what it missed is repaired.
    wait_for_readyz(&n2, |status, _| status == 200).await;
    publish_range(&mut publisher, ch, 26..=27).await;
    assert_eq!(
        offsets(&far.recv_msgs(7).await),
        (21..=27).collect::<Vec<_>>()
    );
    assert!(
        far.try_recv(Duration::from_millis(200)).await.is_none(),
        "nothing twice"
    );
    let text = n2.handle.metrics_text();
    assert!(
        metric(&text, "wsrelay_history_repaired_messages_total") >= 17.0,
        "{text}"
    );
    assert_eq!(metric(&text, "wsrelay_broker_up"), 1.0);
    assert_eq!(
        metric(&text, r#"wsrelay_history_gaps_total{outcome="lost"}"#),
        0.0
    );
}

/// Polls `GET /readyz` until `done(status, body)`; returns the last answer.
async fn wait_for_readyz(node: &TestNode, done: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = common::http_get(node.addr, "/readyz").await;
        if done(status, &body) {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// 6: the `history` request and `GET /api/history`.

async fn history_requests(t: Topology) {
    let ch = "chat:hist";
    let mut c = t.node(0).client("channel=other").await;
    let mut publisher = t.node(1).client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=8).await;

    let mut stash = Vec::new();
    let reply = c
        .request(json!({"op":"history","ch":ch}), 1, &mut stash)
        .await;
    assert_eq!(reply["op"], "history", "{reply}");
    assert_eq!(reply["offset"], 8);
    let epoch = epoch_of(&reply);
    assert_eq!(
        offsets(reply["messages"].as_array().unwrap()),
        vec![4, 5, 6, 7, 8],
        "latest, capped by --max-history-limit"
    );
    assert_eq!(reply["messages"][0], json!({"offset":4,"data":{"n":4}}));
    let reply = c
        .request(json!({"op":"history","ch":ch,"limit":2}), 2, &mut stash)
        .await;
    assert_eq!(offsets(reply["messages"].as_array().unwrap()), vec![7, 8]);
    let reply = c
        .request(
            json!({"op":"history","ch":ch,"since":{"epoch":epoch,"offset":2},"limit":3}),
            3,
            &mut stash,
        )
        .await;
    assert_eq!(
        offsets(reply["messages"].as_array().unwrap()),
        vec![3, 4, 5]
    );
    let reply = c
        .request(json!({"op":"history","ch":ch,"limit":0}), 4, &mut stash)
        .await;
    assert_eq!(
        reply,
        json!({"op":"history","id":4,"ch":ch,"epoch":epoch,"offset":8,"messages":[]})
    );
    let reply = c
        .request(
            json!({"op":"history","ch":ch,"since":{"epoch":"other1","offset":2}}),
            5,
            &mut stash,
        )
        .await;
    assert_eq!(reply["messages"], json!([]), "another epoch: nothing of it");

    for (request, code) in [
        (json!({"op":"history","ch":"plain"}), "bad_request"),
        (json!({"op":"history","ch":"bad name"}), "invalid_channel"),
        (json!({"op":"history"}), "bad_request"),
        (json!({"op":"history","ch":ch,"limit":"x"}), "bad_request"),
        (
            json!({"op":"history","ch":ch,"since":{"epoch":"e"}}),
            "bad_request",
        ),
        (
            json!({"op":"sub","ch":"plain","since":{"epoch":"e","offset":1}}),
            "bad_request",
        ),
    ] {
        let reply = c.request(request.clone(), 9, &mut stash).await;
        assert_eq!(
            (reply["op"].clone(), reply["code"].clone()),
            (json!("error"), json!(code)),
            "{request}"
        );
    }
    assert!(stash.is_empty(), "{stash:?}");

    let addr = t.node(2).addr;
    let auth = format!("Bearer {API_KEY}");
    let get = |path: String| {
        let auth = auth.clone();
        async move {
            let (status, body) =
                http_request(addr, "GET", &path, &[("authorization", auth.as_str())], b"").await;
            (
                status,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = get(format!("/api/history?ch={ch}&limit=2")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"ch":ch,"epoch":epoch,"offset":8,"messages":[{"offset":7,"data":{"n":7}},{"offset":8,"data":{"n":8}}]})
    );
    let (_, body) = get(format!("/api/history?ch={ch}&since_offset=6&epoch={epoch}")).await;
    assert_eq!(offsets(body["messages"].as_array().unwrap()), vec![7, 8]);
    for (path, status, code) in [
        ("/api/history?ch=plain".to_owned(), 400, "bad_request"),
        ("/api/history?ch=a%20b".to_owned(), 400, "invalid_channel"),
        ("/api/history".to_owned(), 400, "bad_request"),
        (format!("/api/history?ch={ch}&limit=-1"), 400, "bad_request"),
        (
            format!("/api/history?ch={ch}&since_offset=1"),
            400,
            "bad_request",
        ),
    ] {
        let (got, body) = get(path.clone()).await;
        assert_eq!(
            (got, body["error"].clone()),
            (status, json!(code)),
            "{path}"
        );
    }
    let (status, _) = http_request(addr, "GET", &format!("/api/history?ch={ch}"), &[], b"").await;
    assert_eq!(status, 401);
}

on_topologies!(history_requests(5000, &["--max-history-limit", "5"]): memory, redis, sharded, sentinel, cluster);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_needs_the_permission_to_subscribe() {
    const SECRET: &str = "test-secret-of-some-length";
    let flags = flags(5000, &["--jwt-secret", SECRET]);
    let node = TestNode::start(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub":"u","exp":exp,"channels":["chat:open"],"publish":["chat:*"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut c = node
        .client(&format!("channel=chat:open&token={token}"))
        .await;
    let mut stash = Vec::new();
    let reply = c
        .request(json!({"op":"history","ch":"chat:open"}), 1, &mut stash)
        .await;
    assert_eq!(reply["op"], "history");
    let reply = c
        .request(json!({"op":"history","ch":"chat:closed"}), 2, &mut stash)
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
    let reply = c
        .request(
            json!({"op":"sub","ch":"chat:closed","since":{"epoch":"e1","offset":0}}),
            3,
            &mut stash,
        )
        .await;
    assert_eq!(reply["code"], "forbidden", "{reply}");
}

// 7: an idle channel's messages expire after --history-ttl; its position stays.

async fn idle_history_expires_but_the_position_stays(t: Topology) {
    let ch = "chat:ttl";
    let mut publisher = t.node(0).client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=3).await;
    let mut stash = Vec::new();
    let reply = publisher
        .request(json!({"op":"history","ch":ch}), 10, &mut stash)
        .await;
    let epoch = epoch_of(&reply);
    assert_eq!(
        offsets(reply["messages"].as_array().unwrap()),
        vec![1, 2, 3]
    );

    if !t.redis.is_empty() {
        let redis = t.redis_for("chat:ttl");
        redis
            .wait_int(&["EXISTS", "wsrelay:{chat:ttl}:stream"], 0)
            .await;
        let mut conn = redis.connection().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL")
            .arg("wsrelay:{chat:ttl}:meta")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 86_400_000,
            "the meta key outlives the stream: {ttl} ms"
        );
    }
    // Poll the history until its messages are gone (the memory broker expires them
    // on access).
    let deadline = tokio::time::Instant::now() + WAIT;
    let reply = loop {
        let reply = publisher
            .request(json!({"op":"history","ch":ch}), 11, &mut stash)
            .await;
        if reply["messages"] == json!([]) {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history did not expire: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (epoch_of(&reply), reply["offset"].clone()),
        (epoch.clone(), json!(3))
    );

    // "Nothing new" for a client that saw everything, "lost" for one that did not.
    let mut c = t.node(1).client("channel=other").await;
    let (before, ack) = c.sub_since(ch, Some((&epoch, 3)), 1).await;
    assert!(before.is_empty());
    assert_eq!(ack["recovered"], true, "{ack}");
    let (before, ack) = c.sub_since("chat:ttl2", None, 2).await;
    assert!(before.is_empty() && ack["offset"] == 0);
    let mut c = t.node(2).client("channel=other").await;
    let (_, ack) = c.sub_since(ch, Some((&epoch, 1)), 3).await;
    assert_eq!(ack["recovered"], false, "{ack}");
    // Publishing again continues the offsets.
    let ack = publisher.publish(ch, json!(4), 12).await;
    assert_eq!(ack["offset"], 4);
}

on_topologies!(idle_history_expires_but_the_position_stays(5000, &["--history-ttl", "1s"]): memory, redis, sharded);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_without_history_are_unchanged() {
    let t = Topology::memory(&[]).await;
    let mut c = t.node(0).client("channel=room").await;
    assert!(c.welcome.get("positions").is_none(), "{}", c.welcome);
    let (before, ack) = c.sub_since("room2", None, 1).await;
    assert!(before.is_empty());
    assert_eq!(ack, json!({"op":"ack","id":1}));
    let mut frames = Vec::new();
    let ack = c
        .request(json!({"op":"pub","ch":"room","data":"hi"}), 2, &mut frames)
        .await;
    assert_eq!(ack, json!({"op":"ack","id":2}));
    if frames.is_empty() {
        frames.push(c.recv().await);
    }
    assert_eq!(frames, vec![json!({"op":"msg","ch":"room","data":"hi"})]);
    let refused =
        common::connect_with_headers(&t.node(0).ws_url("channel=room&since=room:e1:3"), &[]).await;
    let Err((status, body)) = refused else {
        panic!("since on a channel without history must be refused");
    };
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("no history"), "{body}");
}

/// Live messages arriving while a recovery reads the history are held back, at most
/// `--client-queue` of them: one more closes the client with 1013 (it then recovers
/// again), without harm to anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_hold_back_closes_the_client_with_1013() {
    let redis_server = RedisServer::start().await;
    // The subscriber's node reaches Redis over a slow link: its history read takes a
    // while, during which a steady publisher's messages must be held back.
    let slow = common::LatencyProxy::start(redis_server.port, Duration::from_millis(150)).await;
    let flags = flags(5000, &["--client-queue", "4"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let fast = TestNode::with_redis(&redis_server, "n1", &flags).await;
    let url = slow.url();
    let far =
        TestNode::start(&[flags.as_slice(), &["--redis-url", &url, "--node-id", "n2"]].concat())
            .await;
    far.wait_ready().await;
    let ch = "chat:flood";
    let mut publisher = fast.client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=1).await;
    let bystander = fast.client(&format!("channel={ch}")).await;
    let epoch = epoch_of(&welcome_position(&bystander, ch));
    // It reads as messages come, as a client that keeps up does.
    let bystander = tokio::spawn(async move {
        let mut bystander = bystander;
        offsets(&bystander.recv_msgs(400).await)
    });

    let flood = {
        let url = fast.ws_url("channel=other2");
        tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            for i in 0..400u64 {
                c.send(json!({"op":"pub","ch":ch,"data":i})).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // A client recovering from offset 1 on the slow node while the flood goes on.
    let mut late = far.client("channel=other3").await;
    late.send(json!({"op":"sub","ch":ch,"since":{"epoch":epoch,"offset":1},"id":1}))
        .await;
    assert_eq!(late.expect_close().await, Some(1013));
    wait_until_closed_for_holdback(&far).await;
    flood.await.unwrap();
    // Everyone else got everything, in order.
    assert_eq!(bystander.await.unwrap(), (2..=401).collect::<Vec<_>>());
}

async fn wait_until_closed_for_holdback(node: &TestNode) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = node.handle.metrics_text();
        if metric(
            &text,
            r#"wsrelay_client_closes_total{reason="holdback_overflow"}"#,
        ) == 1.0
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no holdback_overflow close: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// Reads never create keys; a subscribe's position of a channel nobody published to
// lives while someone is subscribed, and expires soon after the last one left.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_abandoned_subscribes_leave_no_keys_behind() {
    // Position checks run all the time, so their answers race the unsubscribes.
    let flags = [
        "--unpublished-position-ttl",
        "1s",
        "--position-check-interval",
        "100ms",
    ];
    let t = redis(100, &flags).await;
    let redis = &t.redis[0];
    let mut conn = redis.connection().await.unwrap();
    let dbsize = async |conn: &mut redis::aio::MultiplexedConnection| -> i64 {
        redis::cmd("DBSIZE").query_async(conn).await.unwrap()
    };
    let mut publisher = t.node(0).client("").await;
    publish_range(&mut publisher, "chat:kept", 1..=2).await;
    // The published channel's stream and meta, and the nodes' announcements.
    let published = dbsize(&mut conn).await;

    // A waiting subscriber's position stays valid past the TTL: nodes renew it.
    let mut waiting = t.node(1).client("").await;
    let (_, ack) = waiting.sub_since("chat:waiting", None, 1).await;
    let epoch = epoch_of(&ack);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ack = publisher.publish("chat:waiting", json!(1), 3).await;
    assert_eq!(ack["offset"], 1, "{ack}");
    let got = waiting.recv().await;
    assert_eq!(got["offset"], 1, "no gap, the same epoch: {got}");
    let mut stash = Vec::new();
    let reply = waiting
        .request(json!({"op":"history","ch":"chat:waiting"}), 4, &mut stash)
        .await;
    assert_eq!(epoch_of(&reply), epoch);
    drop(waiting);
    let published = published + 2;

    // 10,000 names read and subscribed by clients of every node, then left.
    let names = 10_000;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(t.node(i).client("").await);
    }
    let runs = clients
        .iter_mut()
        .enumerate()
        .map(|(c, client)| async move {
            let per = names / 10;
            for k in 0..per {
                let ch = format!("chat:made-up-{c}-{k}-{}", rand_suffix(c, k));
                let id = 2 * k as u64 + 1;
                let mut stash = Vec::new();
                let reply = client
                    .request(json!({"op":"history","ch":ch}), id, &mut stash)
                    .await;
                assert_eq!(reply["offset"], 0, "{reply}");
                let (_, ack) = client.sub_since(&ch, None, id + 1).await;
                assert_eq!(ack["op"], "ack", "{ack}");
                client.send(json!({"op":"unsub","ch":ch})).await;
            }
        });
    futures_util::future::join_all(runs).await;
    drop(clients);
    common::eventually("the made-up channels' keys expire", 3 * WAIT, async || {
        dbsize(&mut conn).await == published
    })
    .await;
}

/// A per-name suffix, so names differ from run to run of the same test binary.
fn rand_suffix(c: usize, k: usize) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos ^ ((c as u64) << 32) ^ k as u64
}

/// Scripts Redis ran: history reads and publishes.
async fn script_calls(server: &RedisServer) -> u64 {
    server.command_calls("evalsha").await + server.command_calls("eval").await
}

/// A reconnect storm: 40 clients recover the same channel from the same offset at
/// once. The first reads the channel's tail, which fills the node's cache; the
/// others wait for that read, then the cache answers them: Redis runs a few
/// history reads instead of 40, and every client still gets exactly what it
/// missed, then the live messages, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_recoveries_at_once_share_their_reads() {
    const CLIENTS: usize = 40;
    let redis = RedisServer::start().await;
    // One read at a time: the storm's reads queue up behind it.
    let flags = flags(1000, &["--max-history-reads", "1"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = TestNode::with_redis(&redis, "n1", &flags).await;
    let ch = "chat:storm";
    let mut publisher = node.client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=60).await;
    let first = node.client(&format!("channel={ch}")).await;
    let epoch = epoch_of(&welcome_position(&first, ch));

    let before = script_calls(&redis).await;
    let url = node.ws_url(&format!("channel={ch}&since={ch}:{epoch}:20"));
    let mut clients =
        futures_util::future::join_all((0..CLIENTS).map(|_| Client::connect(&url))).await;
    let reads = script_calls(&redis).await - before;
    let text = node.handle.metrics_text();
    let coalesced = metric(&text, "wsrelay_history_reads_coalesced_total") as u64;
    let cached = metric(&text, "wsrelay_history_cache_hits_total") as u64;
    let fills = metric(&text, "wsrelay_history_cache_fills_total") as u64;
    let seen = format!(
        "{reads} history reads for {CLIENTS} identical recoveries ({coalesced} shared, {cached} from the cache)"
    );
    println!("{seen}");
    assert!(reads <= 3, "{seen}");
    assert_eq!(fills, reads, "each read is of the tail: {seen}");
    assert_eq!(
        reads + cached,
        CLIENTS as u64,
        "each read, or answered by the cache: {seen}"
    );

    publish_range(&mut publisher, ch, 61..=61).await;
    for client in &mut clients {
        assert_eq!(
            client.welcome["positions"],
            json!([{"ch":ch,"epoch":epoch,"offset":60,"recovered":true}])
        );
        assert_eq!(
            offsets(&client.recv_msgs(41).await),
            (21..=61).collect::<Vec<_>>()
        );
        assert!(client.try_recv(Duration::from_millis(20)).await.is_none());
    }
}

/// The data of recovered messages.
fn data_of(frames: &[Value]) -> Vec<Value> {
    frames.iter().map(|f| f["data"].clone()).collect()
}

/// Recoveries on a node that delivers the channel already are answered from its
/// cache of recent history — and never across what the node did not deliver: a
/// gap (messages the stream lost while the node was deaf) or an epoch change
/// (Redis restarted empty). Each recovery is what a read of Redis would have given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_recoveries_but_not_across_a_gap_or_an_epoch() {
    let mut redis = RedisServer::start().await;
    let proxy = DeafProxy::start(redis.port).await;
    let url = proxy.url();
    let flags = flags(5, &["--redis-url", &url, "--broker-timeout", "1s"]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let node = TestNode::start(&flags).await;
    node.wait_ready().await;
    let ch = "chat:cache";
    let hits = || {
        metric(
            &node.handle.metrics_text(),
            "wsrelay_history_cache_hits_total",
        )
    };
    let mut stayer = node.client(&format!("channel={ch}")).await;
    let epoch = epoch_of(&welcome_position(&stayer, ch));
    let mut publisher = node.client("channel=other").await;
    publish_range(&mut publisher, ch, 1..=4).await;
    assert_eq!(offsets(&stayer.recv_msgs(4).await), [1, 2, 3, 4]);

    // What the node delivered answers a recovery, without a read of Redis.
    let reads = script_calls(&redis).await;
    let mut a = node.client("channel=other").await;
    let (replay, ack) = a.sub_since(ch, Some((&epoch, 1)), 1).await;
    assert_eq!(
        data_of(&replay),
        [json!({"n":2}), json!({"n":3}), json!({"n":4})]
    );
    assert_eq!(
        ack,
        json!({"op":"ack","id":1,"epoch":epoch,"offset":4,"recovered":true})
    );
    assert_eq!(hits(), 1.0);
    assert_eq!(script_calls(&redis).await, reads, "no read of Redis");

    // Deaf while 5..=12 are published: when 13 shows the node what it missed,
    // the stream keeps 9..=13, so the node's repair delivers a gap at 8, then 9 on.
    proxy.set_deaf(true);
    publish_range(&mut publisher, ch, 5..=12).await;
    proxy.set_deaf(false);
    publish_range(&mut publisher, ch, 13..=13).await;
    let gap = stayer.recv().await;
    assert_eq!(
        (gap["op"].clone(), gap["offset"].clone()),
        (json!("gap"), json!(8)),
        "{gap}"
    );
    assert_eq!(
        offsets(&stayer.recv_msgs(5).await),
        (9..=13).collect::<Vec<_>>()
    );

    // Missed 5..=13 from before the gap: Redis no longer holds 5..=8.
    let mut b = node.client("channel=other").await;
    let (replay, ack) = b.sub_since(ch, Some((&epoch, 4)), 1).await;
    assert!(replay.is_empty(), "{replay:?}");
    assert_eq!(
        ack,
        json!({"op":"ack","id":1,"epoch":epoch,"offset":13,"recovered":false})
    );
    // After the gap: from the cache.
    let before = hits();
    let mut c = node.client("channel=other").await;
    let (replay, ack) = c.sub_since(ch, Some((&epoch, 9)), 1).await;
    assert_eq!(offsets(&replay), [10, 11, 12, 13]);
    assert_eq!(data_of(&replay)[0], json!({"n":10}));
    assert_eq!(ack["recovered"], true, "{ack}");
    assert_eq!(hits(), before + 1.0);

    // Redis restarted empty: a new epoch, whose offsets start again.
    redis.restart().await;
    let gap = stayer.recv().await;
    assert_eq!(gap["op"], "gap", "{gap}");
    let new = epoch_of(&gap);
    assert_ne!(new, epoch);
    node.wait_ready().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 1..=3 {
        // The first publish may find the publishing connection broken.
        loop {
            let reply = publisher.publish(ch, json!({"new": n}), n).await;
            if reply["op"] == "ack" {
                assert_eq!(reply["offset"], n, "{reply}");
                break;
            }
            assert_eq!(reply["code"], "unavailable", "{reply}");
            assert!(tokio::time::Instant::now() < deadline, "{reply}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(offsets(&stayer.recv_msgs(3).await), [1, 2, 3]);
    // The new epoch's messages, from the cache.
    let before = hits();
    let mut d = node.client("channel=other").await;
    let (replay, ack) = d.sub_since(ch, Some((&new, 1)), 1).await;
    assert_eq!(data_of(&replay), [json!({"new":2}), json!({"new":3})]);
    assert_eq!(
        ack,
        json!({"op":"ack","id":1,"epoch":new,"offset":3,"recovered":true})
    );
    assert_eq!(hits(), before + 1.0);
    // An offset of the old epoch is not one of the new: nothing recovered.
    let mut e = node.client("channel=other").await;
    let (replay, ack) = e.sub_since(ch, Some((&epoch, 1)), 1).await;
    assert!(replay.is_empty(), "{replay:?}");
    assert_eq!(
        ack,
        json!({"op":"ack","id":1,"epoch":new,"offset":3,"recovered":false})
    );
}
