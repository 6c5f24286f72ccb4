//! The node's Prometheus metrics: every metric is a typed handle in [`Metrics`],
//! created once at start-up and rendered by `GET /metrics` in the text format.
//!
//! Names follow Prometheus conventions: prefix `wsrelay_`, counters end in `_total`.
//! Handles are atomics, so recording on the message path costs one atomic add;
//! label families are only used for rare events (errors, closes, reconnects).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::client::CloseReason;
use crate::registry::RegistryStats;

type Labels = [(&'static str, &'static str); 1];
/// Labels of a proxy call: the proxy and the call's result.
type ProxyLabels = [(&'static str, &'static str); 2];
/// Labels naming a broker shard (its address, known only at run time).
type ShardLabels = [(&'static str, String); 1];

/// Every metric of one node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Gauge,
    subscriptions: Gauge,
    channels: Gauge,
    /// WebSocket connections accepted.
    pub connections_opened: Counter,
    /// Text frames received from clients.
    pub frames_received: Counter,
    /// Messages accepted by the broker from this node's clients.
    pub messages_published: Counter,
    /// Messages queued to local clients (one per recipient).
    pub messages_delivered: Counter,
    publish_errors: Family<Labels, Counter>,
    client_closes: Family<Labels, Counter>,
    stream_requests: Family<Labels, Counter>,
    /// Times the Redis subscriber connection was re-established after a loss.
    pub broker_reconnects: Counter,
    /// 1 while every broker shard is up.
    pub broker_up: Gauge,
    broker_dropped: Family<Labels, Counter>,
    broker_shard_up: Family<ShardLabels, Gauge>,
    broker_probe_failures: Family<ShardLabels, Counter>,
    broker_master_changes: Family<ShardLabels, Counter>,
    /// Bytes of text frames received from clients.
    pub bytes_received: Counter,
    /// Bytes of frames queued to clients.
    pub bytes_sent: Counter,
    /// Origin publish to local enqueue, for messages that came through Redis
    /// (from the timestamp in the envelope; clocks of nodes must be in sync).
    pub fanout_latency: Histogram,
    /// Round trip of one Redis PUBLISH.
    pub redis_publish_latency: Histogram,
    /// Trace spans dropped because the collector could not take them.
    pub trace_spans_dropped: Counter,
    history_gaps: Family<Labels, Counter>,
    /// Publications of history channels read back from the stream to fill a gap in
    /// pub/sub delivery.
    pub history_repaired_messages: Counter,
    /// Publications of history channels received twice (after a repair) and dropped.
    pub history_duplicates: Counter,
    recoveries: Family<Labels, Counter>,
    /// Clients' history reads running now (bounded by `--max-history-reads`).
    pub history_reads_running: Gauge,
    /// Clients' history reads waiting for their turn.
    pub history_reads_waiting: Gauge,
    /// Clients' history reads answered by an identical read another client of
    /// this node was waiting for (see `reads`).
    pub history_reads_coalesced: Counter,
    /// Recoveries in their turn now (bounded by `--max-recoveries`).
    pub recoveries_running: Gauge,
    /// Recoveries waiting for their turn.
    pub recoveries_waiting: Gauge,
    /// Recoveries answered by the node's cache of recent history (no Redis read).
    pub history_cache_hits: Counter,
    /// Reads of a channel's tail from Redis made to fill that cache for the
    /// recoveries of a channel.
    pub history_cache_fills: Counter,
    /// Bytes the cache of recent history holds (bounded by --history-cache-bytes).
    pub history_cache_bytes: Gauge,
    /// Open connections that negotiated permessage-deflate.
    pub connections_deflate: Gauge,
    /// Frames compressed: a fanned-out publication once per node, however many
    /// connections take it compressed; a reply for its one connection.
    pub compressions: Counter,
    /// Bytes of the frames compressed, before compression (once per compression).
    pub compression_bytes_in: Counter,
    /// What those frames became: the compressed bytes, or the frame's own when it
    /// did not shrink (sent plain).
    pub compression_bytes_out: Counter,
    /// Bytes not written to clients thanks to compression, per delivery.
    pub compression_saved_bytes: Counter,
    /// Writes to WebSocket clients (one per batch of frames, however many).
    pub client_writes: Counter,
    /// The interval WebSocket writers keep between writes now (see `pacing`).
    pub write_pacing: Gauge<f64, AtomicU64>,
    proxy_calls: Family<ProxyLabels, Counter>,
    proxy_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Proxy calls in flight now (bounded by `--proxy-max-concurrency`).
    pub proxy_in_flight: Gauge,
    /// Commands of the server API (disconnect, subscribe, ...) this node applied to
    /// its connections, from any node.
    pub user_commands: Counter,
}

fn proxy_histogram() -> Histogram {
    // 100 µs to ~6.5 s: a local backend to one past any sane timeout.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsrelay");
        let m = Metrics {
            connections: Gauge::default(),
            subscriptions: Gauge::default(),
            channels: Gauge::default(),
            connections_opened: Counter::default(),
            frames_received: Counter::default(),
            messages_published: Counter::default(),
            messages_delivered: Counter::default(),
            publish_errors: Family::default(),
            stream_requests: Family::default(),
            client_closes: Family::default(),
            broker_reconnects: Counter::default(),
            broker_up: Gauge::default(),
            broker_dropped: Family::default(),
            broker_shard_up: Family::default(),
            broker_probe_failures: Family::default(),
            broker_master_changes: Family::default(),
            bytes_received: Counter::default(),
            bytes_sent: Counter::default(),
            // 50 µs to ~1.6 s: loopback deliveries to a stalled broker.
            fanout_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            redis_publish_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            trace_spans_dropped: Counter::default(),
            history_gaps: Family::default(),
            history_repaired_messages: Counter::default(),
            history_duplicates: Counter::default(),
            recoveries: Family::default(),
            history_reads_running: Gauge::default(),
            history_reads_waiting: Gauge::default(),
            history_reads_coalesced: Counter::default(),
            history_cache_hits: Counter::default(),
            recoveries_running: Gauge::default(),
            recoveries_waiting: Gauge::default(),
            history_cache_fills: Counter::default(),
            history_cache_bytes: Gauge::default(),
            connections_deflate: Gauge::default(),
            compressions: Counter::default(),
            compression_bytes_in: Counter::default(),
            compression_bytes_out: Counter::default(),
            compression_saved_bytes: Counter::default(),
            client_writes: Counter::default(),
            write_pacing: Gauge::default(),
            proxy_calls: Family::default(),
            proxy_duration: Family::new_with_constructor(proxy_histogram as fn() -> Histogram),
            proxy_in_flight: Gauge::default(),
            user_commands: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "subscriptions",
            "Channel subscriptions of local connections",
            m.subscriptions.clone(),
        );
        registry.register(
            "channels",
            "Channels with at least one local subscriber",
            m.channels.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            m.connections_opened.clone(),
        );
        registry.register(
            "frames_received",
            "Text frames received from clients",
            m.frames_received.clone(),
        );
        registry.register(
            "messages_published",
            "Messages from this node's clients accepted by the broker",
            m.messages_published.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages queued to local clients, one per recipient",
            m.messages_delivered.clone(),
        );
        registry.register(
            "publish_errors",
            "Failed publishes by error code",
            m.publish_errors.clone(),
        );
        registry.register(
            "stream_requests",
            "Requests posted for streaming sessions, by what became of them on this node: local (handed to a session here), forwarded (to the session's node), unknown (no such session), full (too many waiting)",
            m.stream_requests.clone(),
        );
        registry.register(
            "client_closes",
            "Connections closed, by reason",
            m.client_closes.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Re-established broker subscriber connections",
            m.broker_reconnects.clone(),
        );
        registry.register(
            "broker_up",
            "1 while every broker shard is up",
            m.broker_up.clone(),
        );
        registry.register(
            "broker_dropped_messages",
            "Messages from the broker that were dropped, by reason",
            m.broker_dropped.clone(),
        );
        registry.register(
            "broker_shard_up",
            "1 while the broker shard's subscriber connection is up and its delivery probe comes back",
            m.broker_shard_up.clone(),
        );
        registry.register(
            "broker_probe_failures",
            "Delivery probes that did not come back through the shard's subscriber within the broker timeout",
            m.broker_probe_failures.clone(),
        );
        registry.register(
            "broker_master_changes",
            "Times a Sentinel-managed shard was found on a new master",
            m.broker_master_changes.clone(),
        );
        registry.register(
            "history_reads_running",
            "Clients' history reads (recoveries, history requests) running now",
            m.history_reads_running.clone(),
        );
        registry.register(
            "history_reads_waiting",
            "Clients' history reads waiting for one of the --max-history-reads slots",
            m.history_reads_waiting.clone(),
        );
        registry.register(
            "history_reads_coalesced",
            "Clients' history reads answered by an identical read that was waiting for its turn (a reconnect storm's recoveries of one channel share one read)",
            m.history_reads_coalesced.clone(),
        );
        registry.register(
            "recoveries_running",
            "Recoveries in their turn (from before their subscription is made until the writer has taken their replay), at most --max-recoveries",
            m.recoveries_running.clone(),
        );
        registry.register(
            "recoveries_waiting",
            "Recoveries waiting for their turn",
            m.recoveries_waiting.clone(),
        );
        registry.register(
            "history_cache_hits",
            "Recoveries answered from this node's cache of recent history, without reading Redis",
            m.history_cache_hits.clone(),
        );
        registry.register(
            "history_cache_fills",
            "Reads of a channel's tail from Redis that filled this node's cache of recent history for the recoveries of that channel",
            m.history_cache_fills.clone(),
        );
        registry.register(
            "history_cache_bytes",
            "Bytes held by this node's cache of recent history (at most --history-cache-bytes)",
            m.history_cache_bytes.clone(),
        );
        registry.register(
            "connections_deflate",
            "Open WebSocket connections that negotiated permessage-deflate",
            m.connections_deflate.clone(),
        );
        registry.register(
            "compressions",
            "Frames compressed: a fanned-out publication once per node, a reply once for its connection",
            m.compressions.clone(),
        );
        registry.register(
            "compression_bytes_in",
            "Bytes of the frames compressed, before compression",
            m.compression_bytes_in.clone(),
        );
        registry.register(
            "compression_bytes_out",
            "Bytes of the frames compressed, after compression (a frame that did not shrink counts its own size: it is sent plain)",
            m.compression_bytes_out.clone(),
        );
        registry.register(
            "compression_saved_bytes",
            "Bytes not written to clients thanks to compression, summed over deliveries",
            m.compression_saved_bytes.clone(),
        );
        registry.register(
            "bytes_received",
            "Bytes of text frames received from clients",
            m.bytes_received.clone(),
        );
        registry.register(
            "bytes_sent",
            "Bytes of frames queued to clients",
            m.bytes_sent.clone(),
        );
        registry.register_with_unit(
            "fanout_latency",
            "Origin publish to local enqueue, for messages that came through the broker",
            prometheus_client::registry::Unit::Seconds,
            m.fanout_latency.clone(),
        );
        registry.register_with_unit(
            "redis_publish",
            "Round trip of one Redis PUBLISH",
            prometheus_client::registry::Unit::Seconds,
            m.redis_publish_latency.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Trace spans dropped because the collector could not take them",
            m.trace_spans_dropped.clone(),
        );
        registry.register(
            "history_gaps",
            "Gaps in pub/sub delivery of history channels, by outcome (repaired from the stream, or lost and reported to subscribers)",
            m.history_gaps.clone(),
        );
        registry.register(
            "history_repaired_messages",
            "Publications read back from history to fill gaps in pub/sub delivery",
            m.history_repaired_messages.clone(),
        );
        registry.register(
            "history_duplicates",
            "Publications of history channels received again and dropped",
            m.history_duplicates.clone(),
        );
        registry.register(
            "recoveries",
            "Subscriptions that asked to recover, by result (recovered or not)",
            m.recoveries.clone(),
        );
        registry.register(
            "client_writes",
            "Writes to WebSocket clients: one per batch of frames (see --write-pacing)",
            m.client_writes.clone(),
        );
        registry.register(
            "write_pacing_seconds",
            "The interval WebSocket writers keep between two writes while messages keep coming: --write-pacing, or a longer one up to --write-pacing-busy while the node is busy",
            m.write_pacing.clone(),
        );
        registry.register(
            "proxy_calls",
            "Calls of the application backend's proxies, by proxy and result (ok, refused, unavailable, bad_answer)",
            m.proxy_calls.clone(),
        );
        registry.register(
            "proxy_duration_seconds",
            "Time from a proxy call to the backend's answer, by proxy",
            m.proxy_duration.clone(),
        );
        registry.register(
            "proxy_in_flight",
            "Proxy calls in flight (bounded by --proxy-max-concurrency)",
            m.proxy_in_flight.clone(),
        );
        registry.register(
            "user_commands",
            "Server API commands (disconnect, subscribe, unsubscribe, refresh, revoke) applied to this node's connections",
            m.user_commands.clone(),
        );
        registry.register(
            "build",
            "Version and git commit of this binary",
            Info::new([
                ("version", env!("CARGO_PKG_VERSION")),
                ("git_sha", env!("WSRELAY_GIT_SHA")),
            ]),
        );
        Metrics { registry, ..m }
    }

    /// Counts a publish that failed with `code` (an error code of the protocol).
    pub fn publish_error(&self, code: &'static str) {
        self.publish_errors.get_or_create(&[("code", code)]).inc();
    }

    /// Counts a request posted for a streaming session: `local`, `forwarded`,
    /// `unknown` or `full`.
    pub fn stream_request(&self, route: &'static str) {
        self.stream_requests
            .get_or_create(&[("route", route)])
            .inc();
    }

    /// Counts a proxy call and its latency: `proxy` is its name, `result` one of
    /// `ok`, `refused`, `unavailable`, `bad_answer`.
    pub fn proxy_call(&self, proxy: &'static str, result: &'static str, seconds: f64) {
        self.proxy_calls
            .get_or_create(&[("proxy", proxy), ("result", result)])
            .inc();
        self.proxy_duration
            .get_or_create(&[("proxy", proxy)])
            .observe(seconds);
    }

    /// Counts a gap in the delivery of a history channel (`repaired` or `lost`).
    pub fn history_gap(&self, outcome: &'static str) {
        self.history_gaps
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }

    /// Counts a recovery attempt (`recovered` or `not_recovered`).
    pub fn recovery(&self, result: &'static str) {
        self.recoveries.get_or_create(&[("result", result)]).inc();
    }

    /// Counts a closed connection.
    pub fn client_closed(&self, reason: CloseReason) {
        self.client_closes
            .get_or_create(&[("reason", reason.metric_label())])
            .inc();
    }

    /// Counts a message from the broker that could not be delivered.
    pub fn broker_dropped(&self, reason: &'static str) {
        self.broker_dropped
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// Records whether broker shard `shard` is usable.
    pub fn broker_shard_up(&self, shard: &str, up: bool) {
        self.broker_shard_up
            .get_or_create(&[("shard", shard.to_owned())])
            .set(i64::from(up));
    }

    /// Counts a delivery probe of `shard` that did not come back in time.
    pub fn broker_probe_failed(&self, shard: &str) {
        self.broker_probe_failures
            .get_or_create(&[("shard", shard.to_owned())])
            .inc();
    }

    /// Counts a move of `shard` to a new master (Sentinel failover).
    pub fn broker_master_changed(&self, shard: &str) {
        self.broker_master_changes
            .get_or_create(&[("shard", shard.to_owned())])
            .inc();
    }

    /// Renders every metric in the Prometheus text format, with the registry gauges
    /// read at this moment.
    pub fn render(&self, stats: RegistryStats) -> String {
        self.connections.set(stats.connections as i64);
        self.subscriptions.set(stats.subscriptions as i64);
        self.channels.set(stats.channels as i64);
        let mut out = String::with_capacity(4096);
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.messages_delivered.inc_by(3);
        m.client_closed(CloseReason::SlowConsumer);
        m.publish_error("unavailable");
        let text = m.render(RegistryStats {
            connections: 2,
            subscriptions: 5,
            channels: 1,
        });
        for line in [
            "wsrelay_connections 2",
            "wsrelay_subscriptions 5",
            "wsrelay_messages_delivered_total 3",
            "wsrelay_client_closes_total{reason=\"slow_consumer\"} 1",
            "wsrelay_publish_errors_total{code=\"unavailable\"} 1",
            "# TYPE wsrelay_broker_reconnects counter",
            "# TYPE wsrelay_fanout_latency_seconds histogram",
            "# TYPE wsrelay_redis_publish_seconds histogram",
            "# TYPE wsrelay_compressions counter",
            "wsrelay_compression_bytes_in_total 0",
            "wsrelay_compression_bytes_out_total 0",
            "wsrelay_compression_saved_bytes_total 0",
            "wsrelay_connections_deflate 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(
            text.contains(&format!(
                "wsrelay_build_info{{version=\"{}\"",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
    }
}
