//! Traces and metrics as an operator sees them: spans exported over OTLP/HTTP from
//! two real nodes, received and decoded here, and `/metrics` read with a
//! Prometheus text parser.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use common::{NodeProcess, RedisServer, TestNode, WAIT};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;
use tokio::time::Instant;

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    node: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP trace receiver on a free loopback port.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<Exported>>> = Arc::default();
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let sink = sink.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    sink.lock().unwrap().extend(flatten(request));
                    // An empty ExportTraceServiceResponse.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { addr, spans }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", self.addr),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
            ("OTEL_TRACES_SAMPLER_ARG", "1.0".into()),
        ]
    }

    /// Waits until a span matching `pred` has arrived.
    async fn wait_for(&self, what: &str, pred: impl Fn(&Exported) -> bool) -> Exported {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(span) = self.spans.lock().unwrap().iter().find(|s| pred(s)) {
                return span.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} span arrived: {:#?}",
                self.spans.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Exported> {
    let text = |v: Option<&AnyValue>| match v {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let node = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.instance.id")
            .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(Exported {
                    name: span.name,
                    node: node.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.clone(),
                                text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                            )
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traced_cluster(collector: &Collector, redis: &RedisServer) -> (NodeProcess, NodeProcess) {
    traced_cluster_with(collector, redis, &[]).await
}

async fn traced_cluster_with(
    collector: &Collector,
    redis: &RedisServer,
    extra: &[&str],
) -> (NodeProcess, NodeProcess) {
    let env = collector.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = redis.url();
    let args = |id| {
        let mut args = vec!["--redis-url", url.as_str(), "--node-id", id];
        args.extend_from_slice(extra);
        args
    };
    let n1 = NodeProcess::spawn_with_env(&args("n1"), &env);
    let n2 = NodeProcess::spawn_with_env(&args("n2"), &env);
    n1.wait_ready().await;
    n2.wait_ready().await;
    (n1, n2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_from_publisher_node_to_delivering_node() {
    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let (n1, n2) = traced_cluster(&collector, &redis).await;
    let mut listener = n2.client("channel=traced").await;
    let mut publisher = n1.client("channel=elsewhere").await;

    let mut stash = Vec::new();
    let ack = publisher
        .request(json!({"op":"pub","ch":"traced","data":"hi"}), 1, &mut stash)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(listener.recv().await["data"], "hi");

    let deliver = collector
        .wait_for("deliver", |s| s.name == "deliver" && s.node == "n2")
        .await;
    let publish = collector
        .wait_for("publish", |s| {
            s.name == "publish" && s.trace_id == deliver.trace_id
        })
        .await;
    assert_eq!(publish.node, "n1");
    assert_eq!(
        deliver.parent, publish.span_id,
        "the delivery span is a child of the publish span"
    );
    assert_eq!(deliver.attributes["wsrelay.recipients"], "1");
    assert_eq!(publish.attributes["messaging.destination.name"], "traced");
    assert_eq!(publish.attributes["messaging.message.body.size"], "4");
    let redis_publish = collector
        .wait_for("redis PUBLISH", |s| {
            s.name == "redis PUBLISH" && s.trace_id == publish.trace_id
        })
        .await;
    assert_eq!(redis_publish.parent, publish.span_id);

    // The connection's lifetime is a span too, exported when it closes.
    drop(listener);
    collector
        .wait_for("connection", |s| s.name == "connection" && s.node == "n2")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_is_continued() {
    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let (n1, n2) = traced_cluster(&collector, &redis).await;
    let mut listener = n2.client("channel=traced").await;
    let mut publisher = n1.client("channel=elsewhere").await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("00-{trace_id}-{parent}-01");
    let mut stash = Vec::new();
    let ack = publisher
        .request(
            json!({"op":"pub","ch":"traced","data":1,"tp":tp}),
            1,
            &mut stash,
        )
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(listener.recv().await["data"], 1);

    let publish = collector
        .wait_for("publish", |s| s.name == "publish" && s.trace_id == trace_id)
        .await;
    assert_eq!(publish.parent, parent, "the backend's span is the parent");
    let deliver = collector
        .wait_for("deliver", |s| s.name == "deliver" && s.trace_id == trace_id)
        .await;
    assert_eq!(deliver.parent, publish.span_id);
    assert_eq!(deliver.node, "n2");

    // A malformed traceparent is refused, not silently ignored.
    let reply = publisher
        .request(
            json!({"op":"pub","ch":"traced","data":2,"tp":"00-nope"}),
            2,
            &mut stash,
        )
        .await;
    assert_eq!(reply["code"], "bad_request", "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_client_through_the_backend_to_the_fan_out() {
    // A publish proxy that records the traceparent each call carries.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/publish",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let record = record.clone();
            async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                record.lock().unwrap().push(tp);
                axum::Json(json!({"result": {}}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let url = format!("http://{backend}/publish");

    let collector = Collector::start().await;
    let redis = RedisServer::start().await;
    let (n1, n2) = traced_cluster_with(
        &collector,
        &redis,
        &["--proxy-publish-url", &url, "--proxy-publish"],
    )
    .await;
    let mut listener = n2.client("channel=traced").await;
    let mut publisher = n1.client("channel=elsewhere").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let tp = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let ack = publisher
        .request(
            json!({"op":"pub","ch":"traced","data":1,"tp":tp}),
            1,
            &mut Vec::new(),
        )
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(listener.recv().await["data"], 1);

    // The relay's span of the call, in the client's trace; the backend got its
    // context; the publish and the delivery on the other node follow it.
    let call = collector
        .wait_for("proxy publish", |s| {
            s.name == "proxy publish" && s.trace_id == trace_id
        })
        .await;
    assert_eq!(call.parent, "00f067aa0ba902b7");
    assert_eq!(call.attributes["wsrelay.proxy"], "publish");
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent, [format!("00-{trace_id}-{}-01", call.span_id)]);
    let publish = collector
        .wait_for("publish", |s| s.name == "publish" && s.trace_id == trace_id)
        .await;
    assert_eq!(publish.parent, call.span_id);
    let deliver = collector
        .wait_for("deliver", |s| s.name == "deliver" && s.trace_id == trace_id)
        .await;
    assert_eq!(
        (deliver.node.as_str(), deliver.parent.as_str()),
        ("n2", publish.span_id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_costs_spans_not_messages() {
    // Nothing listens at this endpoint.
    let endpoint = format!("http://127.0.0.1:{}", common::free_port());
    let node = NodeProcess::spawn_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    let mut a = node.client("channel=c").await;
    for seq in 0..100 {
        a.send(json!({"op":"pub","ch":"c","data":seq})).await;
    }
    let msgs = a.recv_msgs(100).await;
    assert!(msgs.iter().enumerate().all(|(i, m)| m["data"] == i));
    let deadline = Instant::now() + WAIT;
    loop {
        let dropped = scrape(node.addr)
            .await
            .value("wsrelay_trace_spans_dropped_total", &[]);
        if dropped >= 100.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dropped spans not counted: {dropped}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A parsed `/metrics` scrape.
struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    /// The value of a counter or gauge sample with the given labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                other => panic!("{name} is not a plain value: {other:?}"),
            })
            .next()
            .unwrap_or(0.0)
    }

    /// The sample count of a histogram.
    fn histogram_count(&self, name: &str) -> f64 {
        self.value(&format!("{name}_count"), &[])
    }
}

async fn scrape(addr: SocketAddr) -> Metrics {
    let text = common::scrape(addr).await;
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    Metrics(prometheus_parse::Scrape::parse(lines).expect("Prometheus text"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_traffic() {
    let redis = RedisServer::start().await;
    let n1 = TestNode::with_redis(&redis, "n1", &[]).await;
    let n2 = TestNode::with_redis(&redis, "n2", &[]).await;
    let before = scrape(n2.addr).await;
    assert_eq!(before.value("wsrelay_connections", &[]), 0.0);
    assert_eq!(before.value("wsrelay_broker_up", &[]), 1.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        before.value("wsrelay_build_info", &[("version", version)]),
        1.0
    );

    let mut readers = vec![
        n2.client("channel=m").await,
        n2.client("channel=m&channel=n").await,
    ];
    let mut publisher = n1.client("channel=p").await;
    let during = scrape(n2.addr).await;
    assert_eq!(during.value("wsrelay_connections", &[]), 2.0);
    assert_eq!(during.value("wsrelay_subscriptions", &[]), 3.0);
    assert_eq!(during.value("wsrelay_channels", &[]), 2.0);

    const N: usize = 40;
    for seq in 0..N {
        publisher
            .send(json!({"op":"pub","ch":"m","data":seq}))
            .await;
    }
    let mut received = 0;
    for reader in &mut readers {
        received += reader.recv_msgs(N).await.len();
    }
    let after = scrape(n2.addr).await;
    assert_eq!(
        after.value("wsrelay_messages_delivered_total", &[]),
        received as f64
    );
    assert_eq!(
        after.histogram_count("wsrelay_fanout_latency_seconds"),
        N as f64
    );
    assert!(
        after.value("wsrelay_bytes_sent_total", &[])
            > before.value("wsrelay_bytes_sent_total", &[])
    );
    let origin = scrape(n1.addr).await;
    assert_eq!(
        origin.value("wsrelay_messages_published_total", &[]),
        N as f64
    );
    assert_eq!(origin.value("wsrelay_frames_received_total", &[]), N as f64);
    assert_eq!(
        origin.histogram_count("wsrelay_redis_publish_seconds"),
        N as f64
    );
    assert!(origin.value("wsrelay_bytes_received_total", &[]) > 0.0);

    // A bad frame closes the offender, counted by reason; the gauges come back down.
    readers[0].ws_send_binary().await;
    assert_eq!(readers[0].expect_close().await, Some(1003));
    drop(readers);
    n2.wait_registry_empty().await;
    let last = scrape(n2.addr).await;
    assert_eq!(last.value("wsrelay_connections", &[]), 0.0);
    assert_eq!(
        last.value("wsrelay_client_closes_total", &[("reason", "binary")]),
        1.0
    );
    assert_eq!(
        last.value("wsrelay_client_closes_total", &[("reason", "peer_gone")]),
        1.0,
        "a client that vanishes without a close frame is not a protocol error"
    );
}
