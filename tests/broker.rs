//! The broker contract (see `src/broker/mod.rs`), one suite run against each broker:
//! the memory broker, and the Redis broker with a real `redis-server` (two brokers
//! on one Redis stand for two nodes). What a subscriber's queue receives is what a
//! client would be sent.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{RedisServer, WAIT, wait_until};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use wsrelay::Config;
use wsrelay::broker::{Broker, HistoryRequest};
use wsrelay::client::{ClientHandle, ClientQueue, QueueBounds};
use wsrelay::delivery::Delivery;
use wsrelay::metrics::Metrics;
use wsrelay::publication::{Epoch, Kind, Position, Publication};
use wsrelay::registry::Registry;
use wsrelay::telemetry::Tracing;

/// One node's side of the contract: a broker, its registry, and one subscriber.
struct Side {
    broker: Broker,
    registry: Registry,
    client: ClientHandle,
    queue: ClientQueue,
}

impl Side {
    async fn start(config: &Arc<Config>, shutdown: &CancellationToken) -> Side {
        let registry = Registry::new();
        let delivery = Delivery {
            registry: registry.clone(),
            metrics: Arc::new(Metrics::new()),
            tracing: Tracing::disabled(),
            streams: Default::default(),
            users: Default::default(),
        };
        let broker = Broker::start(config.clone(), delivery, shutdown.clone()).unwrap();
        wait_until("broker ready", || broker.all_shards_usable()).await;
        let (client, queue) = registry.register(QueueBounds::frames(1024));
        Side {
            broker,
            registry,
            client,
            queue,
        }
    }

    async fn subscribe(&self, channel: &str) {
        self.registry.subscribe(&self.client, channel);
        self.broker.subscribe(channel).await.unwrap();
    }

    /// The next `n` frames queued to the subscriber, as JSON.
    async fn frames(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        while got.len() < n {
            got.extend(
                self.queue
                    .take_all()
                    .into_iter()
                    .map(|f| serde_json::from_str::<Value>(f.as_str()).unwrap()),
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} frames: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(got.len(), n, "{got:?}");
        got
    }
}

/// The brokers under test: a publishing side and a subscribing side (the same one
/// for the memory broker, two nodes on one Redis otherwise).
struct Pair {
    name: &'static str,
    sides: Vec<Side>,
    _redis: Option<RedisServer>,
    shutdown: CancellationToken,
}

impl Pair {
    fn publisher(&self) -> &Side {
        &self.sides[0]
    }

    fn subscriber(&mut self) -> &mut Side {
        let last = self.sides.len() - 1;
        &mut self.sides[last]
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `chat:*` keeps 5 messages; every other channel has no history.
fn config(redis: Option<&RedisServer>) -> Arc<Config> {
    // One file per call: tests run in parallel, and a file being rewritten can be
    // read empty.
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("wsrelay-broker-{}-{call}.toml", std::process::id()));
    std::fs::write(&path, "[namespaces.chat]\nhistory-size = 5\n").unwrap();
    let mut args = vec![
        "wsrelay".to_owned(),
        "--config".to_owned(),
        path.to_str().unwrap().to_owned(),
    ];
    if let Some(redis) = redis {
        args.extend(["--redis-url".to_owned(), redis.url()]);
    }
    Arc::new(Config::load_from(args).unwrap())
}

async fn pairs() -> Vec<Pair> {
    let shutdown = CancellationToken::new();
    let memory = config(None);
    let memory = Pair {
        name: "memory",
        sides: vec![Side::start(&memory, &shutdown).await],
        _redis: None,
        shutdown,
    };
    let redis = RedisServer::start().await;
    let config = config(Some(&redis));
    let shutdown = CancellationToken::new();
    let sides = vec![
        Side::start(&config, &shutdown).await,
        Side::start(&config, &shutdown).await,
    ];
    let redis = Pair {
        name: "redis",
        sides,
        _redis: Some(redis),
        shutdown,
    };
    vec![memory, redis]
}

fn publication(data: &str) -> Publication {
    Publication {
        kind: Kind::Message,
        data: Bytes::copy_from_slice(data.as_bytes()),
        from: None,
        position: None,
        traceparent: Bytes::new(),
        published_at_us: 0,
    }
}

async fn publish(side: &Side, config: &Config, channel: &str, data: &str) -> Option<Position> {
    side.broker
        .publish(channel, publication(data), config.channel_options(channel))
        .await
        .unwrap()
}

fn offsets(frames: &[Value]) -> Vec<Option<u64>> {
    frames.iter().map(|f| f["offset"].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_reach_subscribers_in_order_with_offsets_on_history_channels() {
    for mut pair in pairs().await {
        let config = config(None);
        let name = pair.name;
        pair.subscriber().subscribe("plain").await;
        pair.subscriber().subscribe("chat:order").await;
        let mut positions = Vec::new();
        for i in 1..=3 {
            assert_eq!(
                publish(pair.publisher(), &config, "plain", &i.to_string()).await,
                None
            );
            positions.push(
                publish(pair.publisher(), &config, "chat:order", &i.to_string())
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(
            positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
            [1, 2, 3],
            "{name}"
        );
        assert!(
            positions.iter().all(|p| p.epoch == positions[0].epoch),
            "{name}"
        );

        let frames = pair.subscriber().frames(6).await;
        let plain: Vec<&Value> = frames.iter().filter(|f| f["ch"] == "plain").collect();
        let chat: Vec<Value> = frames
            .iter()
            .filter(|f| f["ch"] == "chat:order")
            .cloned()
            .collect();
        assert_eq!(
            plain.iter().map(|f| f["data"].clone()).collect::<Vec<_>>(),
            [1, 2, 3],
            "{name}"
        );
        assert!(
            plain.iter().all(|f| f.get("offset").is_none()),
            "{name}: no offset without history"
        );
        assert_eq!(offsets(&chat), [Some(1), Some(2), Some(3)], "{name}");
        assert_eq!(
            chat[0],
            serde_json::json!({"op":"msg","ch":"chat:order","offset":1,"data":1})
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_follow_the_request() {
    for pair in pairs().await {
        let config = config(None);
        let name = pair.name;
        let side = pair.publisher();
        // Nobody published yet: a stable position at offset 0.
        let first = side
            .broker
            .history("chat:h", HistoryRequest::position())
            .await
            .unwrap();
        let again = side
            .broker
            .history("chat:h", HistoryRequest::position())
            .await
            .unwrap();
        assert_eq!(
            (first.top.offset, &first.top.epoch),
            (0, &again.top.epoch),
            "{name}"
        );
        for i in 1..=8 {
            let position = publish(side, &config, "chat:h", &i.to_string())
                .await
                .unwrap();
            assert_eq!(
                position.epoch, first.top.epoch,
                "{name}: the read's epoch is kept"
            );
        }
        let epoch = first.top.epoch.clone();
        let read_within = |since: Option<(Epoch, u64)>,
                           limit: usize,
                           all_or_nothing: bool,
                           max_bytes: Option<usize>| {
            side.broker.history(
                "chat:h",
                HistoryRequest {
                    since,
                    limit,
                    all_or_nothing,
                    subscribing: false,
                    max_bytes,
                },
            )
        };
        let read = |since, limit, all_or_nothing| read_within(since, limit, all_or_nothing, None);
        let offsets = |h: &wsrelay::broker::History| -> Vec<u64> {
            h.publications.iter().map(|p| p.offset().unwrap()).collect()
        };
        let latest = read(None, 10, false).await.unwrap();
        assert_eq!(latest.top.offset, 8, "{name}");
        assert_eq!(
            offsets(&latest),
            [4, 5, 6, 7, 8],
            "{name}: exactly the last 5 kept"
        );
        assert_eq!(latest.publications[4].data_str(), "8");
        assert_eq!(
            offsets(&read(None, 2, false).await.unwrap()),
            [7, 8],
            "{name}"
        );
        let since = Some((epoch.clone(), 5));
        assert_eq!(
            offsets(&read(since.clone(), 10, false).await.unwrap()),
            [6, 7, 8],
            "{name}"
        );
        assert_eq!(
            offsets(&read(since, 2, false).await.unwrap()),
            [6, 7],
            "{name}"
        );
        let far = Some((epoch.clone(), 2));
        assert!(
            read(far.clone(), 3, true)
                .await
                .unwrap()
                .publications
                .is_empty(),
            "{name}: all or nothing"
        );
        assert_eq!(
            offsets(&read(far, 10, false).await.unwrap()),
            [4, 5, 6, 7, 8],
            "{name}: what is left"
        );
        let other = Some((Epoch::parse("other1").unwrap(), 5));
        assert!(
            read(other, 10, false)
                .await
                .unwrap()
                .publications
                .is_empty(),
            "{name}: another epoch"
        );
        // Bounded in bytes: each message counts its stored size and the overhead.
        let size = wsrelay::envelope::encoded_len(&latest.publications[0])
            + wsrelay::broker::READ_OVERHEAD;
        let bounded = read_within(None, 10, false, Some(2 * size + size / 2))
            .await
            .unwrap();
        assert_eq!(offsets(&bounded), [7, 8], "{name}: the newest that fit");
        assert!(bounded.truncated, "{name}");
        let since = Some((epoch.clone(), 5));
        let bounded = read_within(since.clone(), 10, false, Some(2 * size))
            .await
            .unwrap();
        assert_eq!(offsets(&bounded), [6, 7], "{name}: the oldest that fit");
        assert!(bounded.truncated, "{name}");
        let all = read_within(since.clone(), 10, true, Some(2 * size))
            .await
            .unwrap();
        assert!(
            all.publications.is_empty() && all.truncated,
            "{name}: all or nothing, in bytes too"
        );
        let all = read_within(since, 10, true, Some(3 * size)).await.unwrap();
        assert_eq!(offsets(&all), [6, 7, 8], "{name}: exactly fits");
        assert!(!all.truncated, "{name}");
        let none = read(None, 0, false).await.unwrap();
        assert!(
            none.publications.is_empty() && none.top.offset == 8,
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_publish_script_survives_a_script_flush() {
    let redis = RedisServer::start().await;
    let config = config(Some(&redis));
    let shutdown = CancellationToken::new();
    let side = Side::start(&config, &shutdown).await;
    assert_eq!(
        publish(&side, &config, "chat:flush", "1")
            .await
            .unwrap()
            .offset,
        1
    );
    let mut conn = redis.connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        publish(&side, &config, "chat:flush", "2")
            .await
            .unwrap()
            .offset,
        2
    );
    let history = side
        .broker
        .history(
            "chat:flush",
            HistoryRequest {
                since: None,
                limit: 5,
                all_or_nothing: false,
                subscribing: false,
                max_bytes: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(history.publications.len(), 2);
    shutdown.cancel();
}
