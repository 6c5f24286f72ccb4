//! The fault suite: one scenario — real node processes, clients subscribed to
//! channels with history on every node, a publisher at ~300 messages/s — run with
//! every fault over every Redis topology it applies to, and judged by one checker
//! (`common::checker`): no offset twice, no silent hole, no acked publish silently
//! lost. Each run prints one `fault-table` line; docs/protocol.md's table of
//! delivery guarantees is made from them:
//!
//! ```sh
//! cargo test --test faults -- --nocapture --test-threads 1 2>&1 | grep fault-table
//! ```
//!
//! The chaos run (`chaos_*`) plays a seeded random schedule of these faults; set
//! `WSRELAY_CHAOS_SECS` to run it longer and `WSRELAY_CHAOS_SEED` to replay a seed.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::checker::{self, Acked, Report, Subscription};
use common::{
    HoldProxy, NodeProcess, RedisCluster, RedisServer, SentinelGroup, WAIT, eventually, shard_of,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Where the nodes' channels live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topo {
    /// One node, the in-process broker.
    Memory,
    /// Three nodes, one Redis (two of them through a proxy that can hold
    /// reconnects; the publisher's directly).
    Redis,
    /// Three nodes, three standalone shards (each through such a proxy, but for the
    /// publisher's node).
    Shards,
    /// Three nodes, a Sentinel group: one master, one replica, three sentinels.
    Sentinel,
    /// Three nodes, a Redis Cluster of three masters and three replicas.
    Cluster,
}

/// What goes wrong, once or twice during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every pub/sub connection killed (`CLIENT KILL TYPE pubsub`); with `held`,
    /// the reconnects are held ~0.5 s by the proxy while publishing goes on.
    PubSubKilled { held: bool },
    /// Every publishing connection killed (`CLIENT KILL TYPE normal`).
    PublisherKilled,
    /// The Redis of the first channel stopped (`SIGSTOP`) for longer than the
    /// broker timeout, then resumed.
    Paused,
    /// The Redis of the first channel restarted without its data; the nodes but the
    /// publisher's come back ~0.5 s later (their reconnects held), once the new
    /// epoch has messages.
    RestartedEmpty,
    /// The master of the first channel replaced by its replica: planned
    /// (`SENTINEL FAILOVER`, `CLUSTER FAILOVER`) or killed (`SIGKILL`).
    Failover { kill: bool },
    /// The slot of the first channel moved to another master (its keys migrated)
    /// while it is published to.
    Reshard,
    /// The first node SIGKILLed: its clients reconnect elsewhere with `since`.
    NodeKilled,
    /// The first node drained (SIGTERM): its clients reconnect elsewhere with `since`.
    NodeDrained,
    /// Every client of the first node reconnects at once, with `since`.
    ReconnectStorm,
    /// The same with a crowd: the first node has `CROWD` clients, all of which
    /// reconnect at once (their recoveries share reads, then the node's cache).
    CrowdStorm,
}

impl Fault {
    /// Its row in docs/protocol.md's table (the pub/sub kill is one row: the
    /// reconnect is held where a proxy sits between nodes and Redis).
    fn label(self) -> &'static str {
        match self {
            Fault::PubSubKilled { .. } => {
                "pub/sub connections killed (`CLIENT KILL TYPE pubsub`; reconnects held 0.5 s on one Redis and shards)"
            }
            Fault::PublisherKilled => "publishing connections killed (`CLIENT KILL TYPE normal`)",
            Fault::Paused => "Redis stopped 1.5 s (`SIGSTOP`, broker timeout 1 s)",
            Fault::RestartedEmpty => "Redis restarted without persistence",
            Fault::Failover { kill: false } => {
                "planned failover (`SENTINEL FAILOVER`, `CLUSTER FAILOVER`)"
            }
            Fault::Failover { kill: true } => "master SIGKILLed",
            Fault::Reshard => "a busy slot migrated to another master",
            Fault::NodeKilled => "a node SIGKILLed (its clients recover elsewhere)",
            Fault::NodeDrained => "a node drained (SIGTERM; its clients recover elsewhere)",
            Fault::ReconnectStorm => "a node's clients all reconnect at once with `since`",
            Fault::CrowdStorm => "60 clients of a node reconnect at once with `since`",
        }
    }

    /// Whether the fault may lose data on `topo`, so that a `gap` is a correct
    /// outcome: a restart without persistence; a master killed before its replica
    /// had every write (replication is asynchronous); and a Sentinel failover,
    /// which promotes the replica without pausing writes to the old master, so
    /// what that master accepts until it is demoted is lost (`CLUSTER FAILOVER`
    /// pauses them until the replica caught up).
    fn may_lose_data(self, topo: Topo) -> bool {
        match self {
            Fault::RestartedEmpty | Fault::Failover { kill: true } => true,
            Fault::Failover { kill: false } => topo == Topo::Sentinel,
            _ => false,
        }
    }

    /// Whether it is injected a second time near the end of the stream on `topo`.
    /// Not a killed master or node (gone for good), nor a Sentinel failover: the
    /// sentinels take seconds more to make the old master a replica of the new one,
    /// and a second failover before then has no replica in sync to promote.
    fn repeats(self, topo: Topo) -> bool {
        match self {
            Fault::Failover { kill: true } | Fault::NodeKilled | Fault::NodeDrained => false,
            Fault::Failover { kill: false } => topo != Topo::Sentinel,
            _ => true,
        }
    }
}

const BROKER_TIMEOUT: &str = "1s";
/// Messages per second from the publisher, over every channel.
const RATE: u64 = 300;
/// How long the publisher publishes (the faults strike at a third and two thirds).
const PUBLISHING: Duration = Duration::from_millis(4500);
const CLIENTS_PER_NODE: usize = 2;
/// Clients of the first node in a `CrowdStorm` run.
const CROWD: usize = 60;

/// The Redis side of a run and the nodes on it.
struct World {
    topo: Topo,
    redis: Vec<RedisServer>,
    proxies: Vec<HoldProxy>,
    sentinel: Option<SentinelGroup>,
    cluster: Option<RedisCluster>,
    nodes: Vec<Option<NodeProcess>>,
    channels: Vec<String>,
    /// Clients of the first node (`CLIENTS_PER_NODE` on every other one).
    crowd: usize,
}

impl World {
    async fn start(topo: Topo, channels: usize) -> World {
        let mut world = World {
            topo,
            redis: Vec::new(),
            proxies: Vec::new(),
            sentinel: None,
            cluster: None,
            nodes: Vec::new(),
            channels: (0..channels).map(|i| format!("chat:f{i}")).collect(),
            crowd: CLIENTS_PER_NODE,
        };
        let broker: Vec<String> = match topo {
            Topo::Memory => Vec::new(),
            Topo::Redis | Topo::Shards => {
                let shards = if topo == Topo::Redis { 1 } else { 3 };
                for _ in 0..shards {
                    let server = RedisServer::start().await;
                    world.proxies.push(HoldProxy::start(server.port).await);
                    world.redis.push(server);
                }
                let urls: Vec<String> = world.proxies.iter().map(HoldProxy::url).collect();
                vec!["--redis-url".into(), urls.join(",")]
            }
            Topo::Sentinel => {
                let group = SentinelGroup::start().await;
                let url = group.url();
                world.sentinel = Some(group);
                vec!["--redis-url".into(), url]
            }
            Topo::Cluster => {
                let cluster = RedisCluster::start(3).await;
                let seeds = cluster.seeds();
                world.cluster = Some(cluster);
                vec!["--redis-cluster".into(), seeds]
            }
        };
        let count = if topo == Topo::Memory { 1 } else { 3 };
        // The publisher's node (the last) reaches Redis directly: while the proxy
        // holds the others' reconnects, publishing goes on.
        let direct: Vec<String> = if world.proxies.is_empty() {
            broker.clone()
        } else {
            let urls: Vec<String> = world.redis.iter().map(RedisServer::url).collect();
            vec!["--redis-url".into(), urls.join(",")]
        };
        for i in 1..=count {
            let id = format!("n{i}");
            let broker = if i == count { &direct } else { &broker };
            let mut args: Vec<&str> = broker.iter().map(String::as_str).collect();
            args.extend([
                "--node-id",
                &id,
                "--history-size",
                "10000",
                "--broker-timeout",
                BROKER_TIMEOUT,
                "--publish-rate",
                "100000",
                "--publish-burst",
                "100000",
                "--drain-timeout",
                "2s",
            ]);
            let node = NodeProcess::spawn(&args);
            node.wait_ready().await;
            world.nodes.push(Some(node));
        }
        world
    }

    /// Prints what the nodes warned about and repaired, to explain a failure.
    /// Recoveries the nodes still up answered from their cache of recent history.
    async fn cache_hits(&self) -> u64 {
        let mut hits = 0.0;
        for node in self.nodes.iter().flatten() {
            // A node killed or drained is gone (its port refuses).
            if tokio::net::TcpStream::connect(node.addr).await.is_ok() {
                hits += common::metric(&node.metrics().await, "wsrelay_history_cache_hits_total");
            }
        }
        hits as u64
    }

    fn print_logs(&self) {
        for node in self.nodes.iter().flatten() {
            for line in node.logs.lock().unwrap().iter() {
                if line.contains("WARN") || line.contains("repair") || line.contains("slot") {
                    println!("node {}: {line}", node.addr);
                }
            }
        }
    }

    fn url(&self, node: usize) -> Option<String> {
        let node = self.nodes[node % self.nodes.len()].as_ref()?;
        Some(format!("ws://{}/ws", node.addr))
    }

    /// Every Redis server of the topology that runs.
    fn servers(&self) -> Vec<&RedisServer> {
        let mut all: Vec<&RedisServer> = self.redis.iter().collect();
        if let Some(group) = &self.sentinel {
            all.extend(&group.servers);
        }
        if let Some(cluster) = &self.cluster {
            all.extend(&cluster.servers);
        }
        all.retain(|s| s.is_running());
        all
    }

    /// The port of the server (the master) that holds `channel` now.
    async fn home_of(&self, channel: &str) -> u16 {
        match self.topo {
            Topo::Memory => unreachable!("no Redis"),
            Topo::Redis | Topo::Shards => self.redis[shard_of(channel, self.redis.len())].port,
            Topo::Sentinel => self.sentinel.as_ref().unwrap().master().await.port,
            Topo::Cluster => {
                let cluster = self.cluster.as_ref().unwrap();
                let slot = cluster.slot(&format!("{{{channel}}}")).await;
                cluster.owner(slot).await.0
            }
        }
    }

    fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        let mut all: Vec<&mut RedisServer> = self.redis.iter_mut().collect();
        if let Some(group) = &mut self.sentinel {
            all.extend(group.servers.iter_mut());
        }
        if let Some(cluster) = &mut self.cluster {
            all.extend(cluster.servers.iter_mut());
        }
        all.into_iter().find(|s| s.port == port).expect("a server")
    }

    /// Injects `fault` (`round` 0 or 1).
    async fn inject(&mut self, fault: Fault, clients: &Clients) {
        let first = self.channels[0].clone();
        match fault {
            Fault::PubSubKilled { held } => {
                for proxy in self.proxies.iter().filter(|_| held) {
                    proxy.hold(true);
                }
                for server in self.servers() {
                    client_kill(server, "pubsub").await;
                }
                if held {
                    sleep(Duration::from_millis(500)).await;
                    self.proxies.iter().for_each(|p| p.hold(false));
                }
            }
            Fault::PublisherKilled => {
                for server in self.servers() {
                    client_kill(server, "normal").await;
                }
            }
            Fault::Paused => {
                let port = self.home_of(&first).await;
                let server = self.server_mut(port);
                server.signal("STOP");
                sleep(Duration::from_millis(1500)).await;
                server.signal("CONT");
            }
            Fault::RestartedEmpty => {
                // The other nodes come back only once the new epoch has messages:
                // those must be delivered, not reported lost.
                self.proxies.iter().for_each(|p| p.hold(true));
                let port = self.home_of(&first).await;
                self.server_mut(port).restart().await;
                sleep(Duration::from_millis(500)).await;
                self.proxies.iter().for_each(|p| p.hold(false));
            }
            Fault::Failover { kill } => self.failover(&first, kill).await,
            Fault::Reshard => {
                let cluster = self.cluster.as_ref().expect("a Redis Cluster");
                let slot = cluster.slot(&format!("{{{first}}}")).await;
                let (from, ..) = cluster.owner(slot).await;
                let to = cluster
                    .slots()
                    .await
                    .into_iter()
                    .map(|r| r.2)
                    .find(|port| *port != from)
                    .unwrap();
                cluster.move_slot(slot, to).await;
            }
            Fault::NodeKilled => self.nodes[0].as_ref().unwrap().signal("KILL"),
            Fault::NodeDrained => self.nodes[0].as_ref().unwrap().signal("TERM"),
            Fault::ReconnectStorm | Fault::CrowdStorm => clients.storm(0),
        }
    }

    async fn failover(&mut self, channel: &str, kill: bool) {
        let master = self.home_of(channel).await;
        match self.topo {
            Topo::Sentinel => {
                let group = self.sentinel.as_mut().unwrap();
                if kill {
                    group.server_mut(master).kill();
                } else {
                    let _: redis::RedisResult<String> = group.sentinels[0]
                        .query(&["SENTINEL", "FAILOVER", "mymaster"])
                        .await;
                }
                eventually("the sentinels name a new master", 6 * WAIT, async || {
                    group.master_port().await.is_some_and(|p| p != master)
                })
                .await;
            }
            Topo::Cluster => {
                let cluster = self.cluster.as_mut().unwrap();
                let slot = cluster.slot(&format!("{{{channel}}}")).await;
                let (_, _, replicas) = cluster.owner(slot).await;
                if kill {
                    cluster.server_mut(master).kill();
                    eventually("the replica takes over", 6 * WAIT, async || {
                        cluster.owner(slot).await.0 != master
                    })
                    .await;
                    return;
                }
                // A planned failover gives up when the replica does not catch up in
                // time (it may still be syncing after an earlier fault): ask again.
                let replica = cluster.server(replicas[0]);
                for _ in 0..12 {
                    let mut conn = replica.connection().await.unwrap();
                    let _: redis::RedisResult<()> = redis::cmd("CLUSTER")
                        .arg("FAILOVER")
                        .query_async(&mut conn)
                        .await;
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline {
                        if cluster.owner(slot).await.0 != master {
                            return;
                        }
                        sleep(Duration::from_millis(100)).await;
                    }
                }
                panic!("no replica took over slot {slot} within 60 s");
            }
            _ => unreachable!("no failover without replicas"),
        }
    }
}

async fn client_kill(server: &RedisServer, kind: &str) {
    if let Ok(mut conn) = server.connection().await {
        let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .query_async(&mut conn)
            .await;
    }
}

/// The subscribers: their logs, and a way to make one node's clients reconnect.
struct Clients {
    /// (client, channel) → what it saw.
    logs: Arc<Mutex<HashMap<(usize, String), Subscription>>>,
    /// One token per node: cancelling it makes that node's clients reconnect.
    storms: Arc<Vec<Mutex<CancellationToken>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn storm(&self, node: usize) {
        let mut token = self.storms[node].lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Stops every client and returns what each saw of each channel.
    async fn finish(self) -> HashMap<(usize, String), Subscription> {
        self.stop.cancel();
        for task in self.tasks {
            timeout(WAIT, task).await.expect("clients stop").unwrap();
        }
        std::mem::take(&mut *self.logs.lock().unwrap())
    }
}

/// Starts `CLIENTS_PER_NODE` subscribers on every node (`crowd` on the first),
/// each subscribed to every channel; returns once all are subscribed.
async fn subscribe_all(world: &World) -> Clients {
    let urls: Vec<String> = (0..world.nodes.len())
        .filter_map(|i| world.url(i))
        .collect();
    let mut clients = Clients {
        logs: Default::default(),
        storms: Arc::new(
            (0..urls.len())
                .map(|_| Mutex::new(CancellationToken::new()))
                .collect(),
        ),
        stop: CancellationToken::new(),
        tasks: Vec::new(),
    };
    let ready = Arc::new(tokio::sync::Semaphore::new(0));
    let mut total = 0;
    for node in 0..urls.len() {
        let here = if node == 0 {
            world.crowd
        } else {
            CLIENTS_PER_NODE
        };
        for _ in 0..here {
            total += 1;
            let me = Subscriber {
                id: total,
                home: node,
                urls: urls.clone(),
                channels: world.channels.clone(),
                logs: clients.logs.clone(),
                storms: clients.storms.clone(),
                stop: clients.stop.clone(),
            };
            clients.tasks.push(tokio::spawn(me.run(ready.clone())));
        }
    }
    timeout(3 * WAIT, ready.acquire_many(total as u32))
        .await
        .expect("every client subscribed in time")
        .unwrap()
        .forget();
    clients
}

/// One subscribing client: connects to its node (the next one when that is gone),
/// subscribes to every channel (with `since` once it has a position), and logs
/// every frame of each channel, until stopped.
struct Subscriber {
    id: usize,
    home: usize,
    urls: Vec<String>,
    channels: Vec<String>,
    logs: Arc<Mutex<HashMap<(usize, String), Subscription>>>,
    storms: Arc<Vec<Mutex<CancellationToken>>>,
    stop: CancellationToken,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Subscriber {
    async fn run(self, ready: Arc<tokio::sync::Semaphore>) {
        let mut node = self.home;
        let mut first = true;
        while !self.stop.is_cancelled() {
            let storm = self.storms[node % self.storms.len()]
                .lock()
                .unwrap()
                .clone();
            let url = &self.urls[node % self.urls.len()];
            let Ok(Ok((mut ws, _))) = timeout(WAIT, connect_async(url.as_str())).await else {
                // The node is gone: the next one (as a balancer would).
                node += 1;
                sleep(Duration::from_millis(100)).await;
                continue;
            };
            if self.subscribe(&mut ws).await.is_err() {
                node += 1;
                sleep(Duration::from_millis(100)).await;
                continue;
            }
            if std::mem::take(&mut first) {
                ready.add_permits(1);
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = storm.cancelled() => {}
                _ = self.read(&mut ws) => {
                    // Closed (drain, kill): reconnect to the next node.
                    node += 1;
                }
            }
        }
    }

    fn log(&self, channel: &str, f: impl FnOnce(&mut Subscription)) {
        let mut logs = self.logs.lock().unwrap();
        let sub = logs
            .entry((self.id, channel.to_owned()))
            .or_insert_with(|| Subscription::new(format!("client {} {channel}", self.id)));
        f(sub);
    }

    /// Subscribes every channel, with `since` where a position is known, logging
    /// what arrives meanwhile. `Err` when the connection failed.
    async fn subscribe(&self, ws: &mut Ws) -> Result<(), ()> {
        for (i, channel) in self.channels.iter().enumerate() {
            let cursor = {
                let logs = self.logs.lock().unwrap();
                logs.get(&(self.id, channel.clone()))
                    .and_then(Subscription::cursor)
            };
            let mut frame = json!({"op": "sub", "ch": channel, "id": i + 1});
            if let Some((epoch, offset)) = &cursor {
                frame["since"] = json!({"epoch": epoch, "offset": offset});
            }
            loop {
                ws.send(Message::text(frame.to_string()))
                    .await
                    .map_err(|_| ())?;
                let reply = loop {
                    let frame = next_frame(ws).await.ok_or(())?;
                    if frame["id"] == json!(i + 1) {
                        break frame;
                    }
                    self.route(frame);
                };
                if reply["op"] == "ack" {
                    let epoch = reply["epoch"].as_str().unwrap_or_default();
                    let offset = reply["offset"].as_u64().unwrap_or(0);
                    let recovered = reply["recovered"].as_bool();
                    self.log(channel, |s| s.position(epoch, offset, recovered));
                    break;
                }
                // `unavailable` during an outage: try again.
                assert_eq!(reply["code"], "unavailable", "{reply}");
                sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Logs frames until the connection ends.
    async fn read(&self, ws: &mut Ws) {
        while let Some(frame) = next_frame(ws).await {
            self.route(frame);
        }
    }

    fn route(&self, frame: Value) {
        let channel = frame["ch"].as_str().unwrap_or_default().to_owned();
        // Not the default channel every connection joins.
        if matches!(frame["op"].as_str(), Some("msg") | Some("gap"))
            && self.channels.contains(&channel)
        {
            self.log(&channel, |s| s.frame(frame));
        }
    }
}

/// The next JSON frame, or `None` once the connection ended.
async fn next_frame(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return serde_json::from_str(&text).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Publishes `{"n": id}` to the channels at `RATE` in all through node `url`,
/// one connection per channel (a session answers one request at a time, and a
/// fault on one channel's Redis must not slow the others), until `stop`; returns
/// what was acked, and how many publishes were refused (`unavailable` during a
/// fault: not acked, not retried).
async fn publish(
    url: String,
    channels: Vec<String>,
    stop: CancellationToken,
) -> (Vec<Acked>, usize) {
    let count = channels.len() as u64;
    let each = channels.into_iter().enumerate().map(|(i, channel)| {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ws, _) = connect_async(url.as_str())
                .await
                .expect("publisher connects");
            let (mut acked, mut refused) = (Vec::new(), 0);
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * count / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // Unique over all channels.
            let mut n = i as u64;
            while !stop.is_cancelled() {
                tick.tick().await;
                n += count;
                let frame = json!({"op": "pub", "ch": channel, "id": n, "data": {"n": n}});
                ws.send(Message::text(frame.to_string()))
                    .await
                    .expect("publisher sends");
                let reply = timeout(WAIT, async {
                    loop {
                        let frame = next_frame(&mut ws)
                            .await
                            .expect("publisher stays connected");
                        if frame["id"] == json!(n) {
                            return frame;
                        }
                    }
                })
                .await
                .expect("a reply to every publish");
                if reply["op"] == "ack" {
                    acked.push(Acked {
                        channel: channel.clone(),
                        n,
                        offset: reply["offset"].as_u64().expect("an offset"),
                    });
                } else {
                    assert_eq!(reply["code"], "unavailable", "{reply}");
                    refused += 1;
                }
            }
            (acked, refused)
        })
    });
    let (mut acked, mut refused) = (Vec::new(), 0);
    for publisher in futures_util::future::join_all(each).await {
        let (some, more) = publisher.expect("publisher");
        acked.extend(some);
        refused += more;
    }
    (acked, refused)
}

/// The steady stream of a run: every node's clients subscribed, and the publisher
/// on the last node (never the one a fault takes away).
struct Stream {
    clients: Clients,
    stop: CancellationToken,
    publisher: tokio::task::JoinHandle<(Vec<Acked>, usize)>,
}

impl Stream {
    async fn start(world: &World) -> Stream {
        let clients = subscribe_all(world).await;
        let stop = CancellationToken::new();
        let publisher = tokio::spawn(publish(
            world.url(world.nodes.len() - 1).unwrap(),
            world.channels.clone(),
            stop.clone(),
        ));
        Stream {
            clients,
            stop,
            publisher,
        }
    }

    /// Stops publishing, waits until every client has the last acked message of
    /// each channel, and judges what they got: the report, what was acked, and how
    /// many publishes were refused.
    async fn finish(self, world: &World) -> (Report, Vec<Acked>, usize) {
        self.stop.cancel();
        let (acked, refused) = timeout(3 * WAIT, self.publisher)
            .await
            .expect("the publisher stops")
            .unwrap();
        settle(&self.clients, &world.channels, &acked).await;
        let logs = self.clients.finish().await;
        let subscriptions = logs.iter().map(|((_, ch), sub)| (ch.as_str(), sub));
        (checker::check(subscriptions, &acked), acked, refused)
    }
}

/// One run: subscribe, publish, inject `fault` at a third (and two thirds) of the
/// stream, wait until every client has the last acked message of each channel,
/// then check. Prints the `fault-table` line.
async fn run(topo: Topo, fault: Fault) -> Report {
    let _serial = SERIAL.lock().await;
    let mut world = World::start(topo, 4).await;
    if fault == Fault::CrowdStorm {
        world.crowd = CROWD;
    }
    let stream = Stream::start(&world).await;
    let started = Instant::now();
    sleep(PUBLISHING / 3).await;
    world.inject(fault, &stream.clients).await;
    if fault.repeats(topo) {
        tokio::time::sleep_until(started + PUBLISHING * 2 / 3).await;
        world.inject(fault, &stream.clients).await;
    }
    tokio::time::sleep_until(started + PUBLISHING).await;
    let (report, acked, refused) = stream.finish(&world).await;
    let cached = world.cache_hits().await;
    println!(
        "fault-table | {topo:?} | {} | {} | acked {} | refused {refused} | recoveries from a node's cache {cached} | {report}",
        fault.label(),
        if report.gaps > 0 { "gap" } else { "delivered" },
        acked.len()
    );
    // Clients that move to a node with subscribers of their channels recover from
    // its cache of recent history: the checker judged those recoveries too.
    if matches!(fault, Fault::NodeKilled | Fault::NodeDrained) && topo != Topo::Memory {
        assert!(cached > 0, "{topo:?} {fault:?}: no recovery from a cache");
    }
    // A crowd's recoveries of a channel wait for one read of it, then the cache
    // answers them: most of its 2 × CROWD × channels recoveries.
    if fault == Fault::CrowdStorm && topo != Topo::Memory {
        let storm = (CROWD * world.channels.len()) as u64;
        assert!(
            cached >= storm,
            "{topo:?} {fault:?}: {cached} recoveries from a cache"
        );
    }
    if !report.exactly_once() || (report.gaps > 0 && !fault.may_lose_data(topo)) {
        world.print_logs();
    }
    assert!(report.exactly_once(), "{topo:?} {fault:?}: {report}");
    if !fault.may_lose_data(topo) {
        assert_eq!(report.gaps, 0, "{topo:?} {fault:?}: {report}");
    }
    // A new epoch's messages are delivered from its first offset, not reported lost.
    assert_eq!(
        report.new_epoch_gaps_past_zero, 0,
        "{topo:?} {fault:?}: {report}"
    );
    // A stream went through (a pause of the one Redis stops all of it for seconds).
    assert!(
        acked.len() > RATE as usize,
        "too few acked: {}",
        acked.len()
    );
    report
}

/// Waits until every client has the last acked message of each channel, or was
/// told it lost it (a position past it).
async fn settle(clients: &Clients, channels: &[String], acked: &[Acked]) {
    let last: HashMap<&str, &Acked> = channels
        .iter()
        .filter_map(|c| Some((c.as_str(), acked.iter().rev().find(|a| &a.channel == c)?)))
        .collect();
    let settled = async {
        loop {
            let done = {
                let logs = clients.logs.lock().unwrap();
                logs.iter().all(|((_, ch), sub)| {
                    let Some(ack) = last.get(ch.as_str()) else {
                        return true;
                    };
                    sub.events.iter().any(|e| e["data"]["n"] == ack.n)
                        || sub.cursor().is_some_and(|(_, o)| o >= ack.offset)
                })
            };
            if done {
                return;
            }
            sleep(Duration::from_millis(50)).await;
        }
    };
    // Not fatal here: the checker says what is missing.
    let _ = timeout(3 * WAIT, settled).await;
}

/// One run at a time: each starts up to six Redis processes and three nodes, and
/// the faults are about timing.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

macro_rules! suite {
    ($($name:ident: $topo:expr, $fault:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                run($topo, $fault).await;
            }
        )*
    };
}

suite! {
    memory_reconnect_storm: Topo::Memory, Fault::ReconnectStorm;

    redis_pubsub_killed_reconnect_held: Topo::Redis, Fault::PubSubKilled { held: true };
    redis_publisher_killed: Topo::Redis, Fault::PublisherKilled;
    redis_paused: Topo::Redis, Fault::Paused;
    redis_restarted_empty: Topo::Redis, Fault::RestartedEmpty;
    redis_node_killed: Topo::Redis, Fault::NodeKilled;
    redis_node_drained: Topo::Redis, Fault::NodeDrained;
    redis_reconnect_storm: Topo::Redis, Fault::ReconnectStorm;
    redis_crowd_storm: Topo::Redis, Fault::CrowdStorm;

    shards_pubsub_killed_reconnect_held: Topo::Shards, Fault::PubSubKilled { held: true };
    shards_publisher_killed: Topo::Shards, Fault::PublisherKilled;
    shards_paused: Topo::Shards, Fault::Paused;
    shards_restarted_empty: Topo::Shards, Fault::RestartedEmpty;

    sentinel_pubsub_killed: Topo::Sentinel, Fault::PubSubKilled { held: false };
    sentinel_publisher_killed: Topo::Sentinel, Fault::PublisherKilled;
    sentinel_failover: Topo::Sentinel, Fault::Failover { kill: false };
    sentinel_master_killed: Topo::Sentinel, Fault::Failover { kill: true };

    cluster_pubsub_killed: Topo::Cluster, Fault::PubSubKilled { held: false };
    cluster_publisher_killed: Topo::Cluster, Fault::PublisherKilled;
    cluster_paused: Topo::Cluster, Fault::Paused;
    cluster_failover: Topo::Cluster, Fault::Failover { kill: false };
    cluster_master_killed: Topo::Cluster, Fault::Failover { kill: true };
    cluster_resharded: Topo::Cluster, Fault::Reshard;
}

/// The chaos run: a seeded random schedule of the faults that apply to `topo`
/// (a pause of 0.3–1.5 s between them), under the same steady publishing and with
/// clients of a random node reconnecting with `since` now and then, for
/// `WSRELAY_CHAOS_SECS` (default 20 s), judged by the same checker. The seed is
/// printed; `WSRELAY_CHAOS_SEED` replays its schedule.
async fn chaos(topo: Topo, faults: &[Fault]) {
    let secs: u64 = std::env::var("WSRELAY_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("WSRELAY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("chaos {topo:?}: seed {seed} (WSRELAY_CHAOS_SEED={seed} replays it), {secs} s");
    let mut rng = SplitMix(seed);
    let _serial = SERIAL.lock().await;
    let mut world = World::start(topo, 4).await;
    let stream = Stream::start(&world).await;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut schedule = Vec::new();
    while Instant::now() < deadline {
        sleep(Duration::from_millis(300 + rng.below(1200))).await;
        let fault = if rng.below(4) == 0 {
            // Subscribe churn: a node's clients come back with `since`.
            Fault::ReconnectStorm
        } else {
            faults[rng.below(faults.len() as u64) as usize]
        };
        let node = rng.below(world.nodes.len() as u64) as usize;
        schedule.push(format!("{fault:?}"));
        match fault {
            Fault::ReconnectStorm => stream.clients.storm(node),
            fault => world.inject(fault, &stream.clients).await,
        }
    }
    let (report, acked, refused) = stream.finish(&world).await;
    println!(
        "chaos {topo:?} seed {seed}: {} faults ({}) | acked {} | refused {refused} | {report}",
        schedule.len(),
        schedule.join(", "),
        acked.len()
    );
    if !report.exactly_once() {
        world.print_logs();
    }
    assert!(
        report.exactly_once(),
        "chaos {topo:?} seed {seed}: {report}"
    );
    if !faults.iter().any(|f| f.may_lose_data(topo)) {
        assert_eq!(report.gaps, 0, "chaos {topo:?} seed {seed}: {report}");
    }
}

/// A small deterministic generator (SplitMix64): a seed gives the same schedule
/// on every machine and with every version of the `rand` crate.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform enough in `0..n` for a schedule.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis() {
    let faults = [
        Fault::PubSubKilled { held: true },
        Fault::PublisherKilled,
        Fault::Paused,
    ];
    chaos(Topo::Redis, &faults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cluster() {
    let faults = [
        Fault::PubSubKilled { held: false },
        Fault::PublisherKilled,
        Fault::Paused,
        Fault::Failover { kill: false },
        Fault::Reshard,
    ];
    chaos(Topo::Cluster, &faults).await;
}

#[test]
fn the_checker_finds_what_it_must() {
    fn msg(offset: u64) -> Value {
        json!({"op": "msg", "offset": offset, "data": {"n": offset}})
    }
    fn acked(offsets: impl IntoIterator<Item = u64>) -> Vec<Acked> {
        offsets
            .into_iter()
            .map(|o| Acked {
                channel: "c".into(),
                n: o,
                offset: o,
            })
            .collect()
    }
    let mut good = Subscription::new("good");
    good.position("e", 0, None);
    (1..=5).for_each(|o| good.frame(msg(o)));
    let report = checker::check([("c", &good)], &acked(1..=5));
    assert!(report.exactly_once(), "{report}");

    let mut twice = Subscription::new("twice");
    twice.position("e", 0, None);
    [1, 2, 3, 2, 3]
        .into_iter()
        .for_each(|o| twice.frame(msg(o)));
    assert_eq!(checker::check([("c", &twice)], &[]).duplicates, 2);

    let mut hole = Subscription::new("hole");
    hole.position("e", 0, None);
    [1, 4].into_iter().for_each(|o| hole.frame(msg(o)));
    let report = checker::check([("c", &hole)], &acked(1..=4));
    assert_eq!((report.silent_holes, report.lost_acked), (2, 2), "{report}");

    let mut reported = Subscription::new("reported");
    reported.position("e", 0, None);
    reported.frame(msg(1));
    reported.frame(json!({"op": "gap", "epoch": "e", "offset": 3}));
    reported.frame(msg(4));
    let report = checker::check([("c", &reported)], &acked(1..=4));
    assert!(report.exactly_once(), "{report}");
    assert_eq!(report.gaps, 1);

    let mut new_epoch = Subscription::new("new epoch");
    new_epoch.position("e", 0, None);
    new_epoch.frame(msg(1));
    new_epoch.frame(json!({"op": "gap", "epoch": "f", "offset": 0}));
    // Offset 1 again, of the new epoch: another message.
    new_epoch.frame(json!({"op": "msg", "offset": 1, "data": {"n": 101}}));
    let report = checker::check([("c", &new_epoch)], &acked(1..=2));
    assert!(report.exactly_once(), "{report}");

    // A recovery that resumes where the client was: no gap, nothing twice.
    let mut resumed = Subscription::new("resumed");
    resumed.position("e", 0, None);
    [1, 2].into_iter().for_each(|o| resumed.frame(msg(o)));
    resumed.frame(msg(3));
    resumed.position("e", 3, Some(true));
    resumed.frame(msg(4));
    assert!(checker::check([("c", &resumed)], &acked(1..=4)).exactly_once());
}
