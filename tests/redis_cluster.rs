//! A real Redis Cluster (three masters, three replicas, `redis-cli --cluster
//! create`) under two nodes given `--redis-cluster`: sharded pub/sub carries each
//! channel only on its slot's shard; delivery resumes after a planned failover and
//! after a master is killed; a busy channel's slot migrates while it is published
//! to, and subscribers see every offset exactly once.

mod common;

use std::time::Duration;

use common::{
    Client, RedisCluster, RedisServer, TestNode, WAIT, eventually, offsets, publish_until_acked,
};
use serde_json::json;

/// Longest time publishes may fail after a master is killed: the cluster marks it
/// failed after `cluster-node-timeout` (2 s here), the replica wins the election
/// within a second or two, and the nodes' cluster clients find the new owner.
const FAILOVER_BOUND: Duration = Duration::from_secs(15);

async fn nodes(cluster: &RedisCluster) -> Vec<TestNode> {
    let seeds = cluster.seeds();
    let mut nodes = Vec::new();
    for id in ["n1", "n2"] {
        let args = [
            "--redis-cluster",
            &seeds,
            "--node-id",
            id,
            "--history-size",
            "10000",
            "--broker-timeout",
            "1s",
            "--publish-rate",
            "10000",
        ];
        let node = TestNode::start(&args).await;
        node.wait_ready().await;
        nodes.push(node);
    }
    nodes
}

/// `PUBSUB SHARDCHANNELS` (or `CHANNELS`) of one server.
async fn channels(server: &RedisServer, sharded: bool) -> Vec<String> {
    let mut conn = server.connection().await.unwrap();
    redis::cmd("PUBSUB")
        .arg(if sharded { "SHARDCHANNELS" } else { "CHANNELS" })
        .arg("wsrelay:*")
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_survives_a_planned_failover_and_a_killed_master() {
    let mut cluster = RedisCluster::start(3).await;
    let nodes = nodes(&cluster).await;
    let ch = "chat:cluster";
    let plain = "plain";
    let mut reader = nodes[1]
        .client(&format!("channel={ch}&channel={plain}"))
        .await;
    let mut writer = nodes[0].client("channel=side").await;
    let mut id = 0;
    for _ in 0..5 {
        publish_until_acked(&mut writer, ch, &mut id, FAILOVER_BOUND).await;
    }
    assert_eq!(offsets(&reader.recv_msgs(5).await), [1, 2, 3, 4, 5]);

    // Sharded pub/sub: the channel is subscribed on its slot's master only, and
    // nothing uses classic pub/sub (which the cluster bus broadcasts everywhere).
    let slot = cluster.slot(ch).await;
    let (master, _, replicas) = cluster.owner(slot).await;
    for server in &cluster.servers {
        let sharded = channels(server, true).await;
        let expected = server.port == master;
        assert_eq!(
            sharded.contains(&format!("wsrelay:{{{ch}}}")),
            expected,
            "{}: {sharded:?}",
            server.port
        );
        assert!(
            channels(server, false).await.is_empty(),
            "classic pub/sub used"
        );
    }
    // Every master carries a delivery probe of each node.
    for (_, _, port, _, _) in cluster.slots().await {
        let probes = channels(cluster.server(port), true)
            .await
            .into_iter()
            .filter(|c| c.starts_with("wsrelay:{probe:"))
            .count();
        assert_eq!(probes, nodes.len(), "probes on master {port}");
    }

    // 1: a planned failover (CLUSTER FAILOVER on the replica): the old master
    // unsubscribes its shard channels, the nodes subscribe on the new one.
    let replica = replicas[0];
    let mut conn = cluster.server(replica).connection().await.unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query_async(&mut conn)
        .await
        .unwrap();
    eventually("the replica takes over", WAIT, async || {
        cluster.owner(slot).await.0 == replica
    })
    .await;
    let (last, outage) = publish_until_acked(&mut writer, ch, &mut id, FAILOVER_BOUND).await;
    println!("planned failover: publishes failed for {outage:?}");
    assert!(last >= 6);
    assert_eq!(
        offsets(&reader.recv_msgs(last as usize - 5).await),
        (6..=last).collect::<Vec<_>>()
    );
    let ack = writer.publish(plain, json!("after"), 10_000).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let msg = reader.recv().await;
    assert_eq!(
        (msg["ch"].as_str(), msg["data"].as_str()),
        (Some(plain), Some("after"))
    );

    // 2: the new master is killed (once its replica has every write).
    let mut conn = cluster.server(replica).connection().await.unwrap();
    eventually("the replica has every write", WAIT, async || {
        let synced: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(200)
            .query_async(&mut conn)
            .await;
        synced == Ok(1)
    })
    .await;
    cluster.server_mut(replica).kill();
    let (next, outage) = publish_until_acked(&mut writer, ch, &mut id, FAILOVER_BOUND).await;
    println!("master killed: publishes failed for {outage:?}");
    assert!(next > last);
    assert_eq!(
        offsets(&reader.recv_msgs((next - last) as usize).await),
        (last + 1..=next).collect::<Vec<_>>(),
        "every offset once, in order, no gap"
    );
    assert!(reader.try_recv(Duration::from_millis(200)).await.is_none());
    for node in &nodes {
        node.wait_ready().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_channel_keeps_every_offset_once_while_its_slot_migrates() {
    let cluster = RedisCluster::start(3).await;
    let nodes = nodes(&cluster).await;
    // A channel among the first slots of its master: `reshard` moves a master's
    // slots from the lowest up.
    let ranges = cluster.slots().await;
    let mut ch = String::new();
    let mut from = (0, String::new());
    for i in 0.. {
        let candidate = format!("busy:{i}");
        let slot = cluster.slot(&candidate).await;
        if let Some((first, _, port, id, _)) = ranges
            .iter()
            .find(|(first, last, ..)| (*first..=*last).contains(&slot))
            && slot < first + 50
        {
            ch = candidate;
            from = (*port, id.clone());
            break;
        }
    }
    let slot = cluster.slot(&ch).await;
    let (_, _, _, to_id, _) = ranges.iter().find(|r| r.2 != from.0).unwrap().clone();

    let mut readers = Vec::new();
    for node in &nodes {
        readers.push(node.client(&format!("channel={ch}")).await);
    }
    // A steady publisher: 3 ms apart, retrying what the migration refuses
    // (`unavailable`: TRYAGAIN while the channel's keys are split).
    let publisher = {
        let url = nodes[0].ws_url("channel=side");
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut writer = Client::connect(&url).await;
            let mut id = 0;
            let mut last = 0;
            let mut refused = 0;
            for _ in 0..600 {
                let before = id;
                let (offset, _) =
                    publish_until_acked(&mut writer, &ch, &mut id, FAILOVER_BOUND).await;
                refused += id - before - 1;
                last = offset;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (last, refused)
        })
    };
    // Let traffic flow, then move 100 slots (the channel's among them).
    let mut first = readers[0].recv_msgs(50).await;
    let out = std::process::Command::new("redis-cli")
        .args(["--cluster", "reshard", &format!("127.0.0.1:{}", from.0)])
        .args(["--cluster-from", &from.1, "--cluster-to", &to_id])
        .args(["--cluster-slots", "100", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        cluster.owner(slot).await.1,
        to_id,
        "the channel's slot moved"
    );
    let (last, refused) = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher in time")
        .unwrap();
    println!("slot migration: {refused} publishes refused and retried; last offset {last}");
    first.extend(readers[0].recv_msgs(last as usize - 50).await);
    assert_eq!(offsets(&first), (1..=last).collect::<Vec<_>>(), "reader 1");
    let got = readers[1].recv_msgs(last as usize).await;
    assert_eq!(offsets(&got), (1..=last).collect::<Vec<_>>(), "reader 2");
    for reader in &mut readers {
        assert!(reader.try_recv(Duration::from_millis(200)).await.is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_publish_waits_on_the_master_of_its_slot_only() {
    let cluster = RedisCluster::start(3).await;
    let node = TestNode::start(&[
        "--redis-cluster",
        &cluster.seeds(),
        "--history-size",
        "100",
        "--publish-durability",
        "replicas:1",
    ])
    .await;
    node.wait_ready().await;
    let ch = "chat:durable";
    let mut writer = node.client("channel=side").await;
    for id in 1..=5 {
        let ack = writer.publish(ch, json!(id), id).await;
        assert_eq!(
            (ack["op"].as_str(), ack["offset"].as_u64()),
            (Some("ack"), Some(id)),
            "{ack}"
        );
    }
    // redis-rs alone would send WAIT to every master (and take the smallest count):
    // it must go, with the script, to the master that stored the message.
    let (owner, _, _) = cluster
        .owner(cluster.slot(&format!("{{{ch}}}")).await)
        .await;
    let masters: std::collections::BTreeSet<u16> =
        cluster.slots().await.into_iter().map(|r| r.2).collect();
    for port in masters {
        let calls = cluster.server(port).command_calls("wait").await;
        // One more on the owner when the first publish found the script missing
        // (the WAIT pipelined with it ran, then both again).
        let expected = if port == owner { 5..=6 } else { 0..=0 };
        assert!(
            expected.contains(&calls),
            "{calls} WAIT calls on master {port} (owner {owner})"
        );
    }
}
