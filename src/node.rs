//! A relay node: start-up, serving and graceful drain.
//!
//! [`Node::new`] builds the node's state once — the [`Hub`] (channels and clients)
//! and the HTTP [`AppState`] around it — and shares it (`Arc`) with the HTTP handlers
//! and every session. One [`CancellationToken`] is the node's shutdown signal,
//! threaded through every task: the HTTP server, each session (see `drain`).
//! Sessions live outside axum's graceful shutdown (an upgraded connection is no
//! longer an HTTP request), so a [`TaskTracker`] tracks them and the drain waits for
//! it, bounded by `--drain-timeout`, closing them at once or over `--drain-spread`
//! (`drain`). The broker's subscriber, repair and check tasks follow a second token,
//! cancelled when the drain is over, so the connections still open keep receiving
//! and the sessions' cleanup reaches Redis.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Grants, OriginPolicy, Verifier};
use crate::broker::{Broker, BrokerError, ShardState};
use crate::cluster::{Announcement, NodeInfo, ShardHealth, ShardInfo};
use crate::config::{Config, ConfigError};
use crate::delivery::Delivery;
use crate::envelope;
use crate::handshake_io::HandshakeIo;
use crate::http::{self, AppState};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::pacing::Pacing;
use crate::proxy::Proxy;
use crate::readiness::Readiness;
use crate::reads::HistoryReads;
use crate::registry::{Registry, RegistryStats};
use crate::streams::Streams;
use crate::telemetry::Tracing;
use crate::transport::ConnSlot;
use crate::users::Users;

/// Why a node could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The listener failed.
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

/// A configured node, ready to serve.
#[derive(Debug)]
pub struct Node {
    state: Arc<AppState>,
}

/// A handle to a running node, for tests and tooling to observe it.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    hub: Arc<Hub>,
}

impl Node {
    /// Validates the configuration and starts the broker, with fresh metrics and no
    /// trace export. Must be called inside a tokio runtime.
    pub fn new(config: Config) -> Result<Node, NodeError> {
        Node::with_telemetry(config, Arc::new(Metrics::new()), Tracing::disabled())
    }

    /// As [`Node::new`], with the metrics and tracer set up by the caller (the binary
    /// shares them with the exporter).
    pub fn with_telemetry(
        config: Config,
        metrics: Arc<Metrics>,
        tracing: Tracing,
    ) -> Result<Node, NodeError> {
        config.validate()?;
        // The one place JWT keys are loaded.
        let verifier = Verifier::from_config(&config.auth).map_err(ConfigError::from)?;
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        // The broker stops once the drain is over, not when it begins: the
        // connections still open meanwhile (`--drain-spread`) keep receiving, and
        // every session's cleanup (presence, its user's connections) reaches Redis.
        let broker_stop = CancellationToken::new();
        let registry = Registry::new();
        let streams = Streams::new();
        let node_id = config.resolved_node_id();
        let users = Arc::new(Users::new(node_id.clone()));
        let delivery = Delivery {
            registry: registry.clone(),
            metrics: metrics.clone(),
            tracing: tracing.clone(),
            streams: streams.clone(),
            users: users.clone(),
        };
        let broker = Broker::start(config.clone(), delivery, broker_stop.clone())?;
        let proxy = Proxy::new(&config.proxy, metrics.clone(), tracing.clone());
        let origins = OriginPolicy::from_list(&config.auth.allowed_origins);
        if matches!(origins, OriginPolicy::Any) {
            tracing::warn!(
                "--allowed-origins '*': pages from any site may open WebSockets to this relay"
            );
        }
        if let Some(warning) = config.durability_warning() {
            tracing::warn!("{warning}");
        }
        match (&verifier, &config.proxy.proxy_connect_url) {
            (None, None) => {
                tracing::info!("no JWT key configured: clients connect without authentication")
            }
            (None, Some(url)) => {
                tracing::info!(
                    url,
                    "no JWT key configured: the connect proxy decides who connects"
                )
            }
            (Some(_), Some(url)) => tracing::info!(
                url,
                "connections with a token are checked here, those without one by the connect proxy"
            ),
            (Some(_), None) => {}
        }
        let reads = HistoryReads::new(
            config.history.max_history_reads,
            config.history.max_recoveries,
            config.broker.broker_timeout,
            metrics.clone(),
        );
        let pacing = Pacing::new(
            config.limits.write_pacing,
            config.limits.write_pacing_busy(),
        );
        let hub = Arc::new(Hub {
            config,
            node_id,
            registry,
            broker,
            metrics,
            tracing,
            shutdown,
            broker_stop,
            reads,
            proxy,
            users,
            pacing,
        });
        Ok(Node {
            state: Arc::new(AppState {
                hub,
                sessions: TaskTracker::new(),
                verifier,
                origins,
                anyone: Arc::new(Grants::anyone()),
                streams,
            }),
        })
    }

    /// A handle that stays valid while and after the node serves.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            hub: self.state.hub.clone(),
        }
    }

    /// Serves on `listener` until `shutdown` resolves, then drains: readiness turns
    /// 503, the listener stops accepting, every client is closed with 1001, and this
    /// returns once all sessions ended or `--drain-timeout` passed.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let state = self.state;
        let hub = state.hub.clone();
        let addr = listener.local_addr()?;
        tracing::info!(%addr, node = %hub.node_id, broker = hub.broker.kind(), "listening");

        let token = hub.shutdown.clone();
        // However `serve` ends (or is dropped), the broker stops with it.
        let _broker = hub.broker_stop.clone().drop_guard();
        let trigger = {
            let hub = hub.clone();
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = hub.shutdown.cancelled() => {}
                }
                tracing::info!(connections = hub.registry.stats().connections, "draining");
                // Cancelling is what draining means: readiness, the accept loop and
                // every session follow this token.
                hub.shutdown.cancel();
            }
        };
        tokio::spawn(trigger);
        // Pings and pacing go on until the drain is over: with `--drain-spread`
        // connections stay open for a while after it began.
        tokio::spawn(heartbeat(
            hub.registry.clone(),
            hub.config.limits.ping_interval,
            hub.broker_stop.clone(),
        ));
        // Announcing goes on through the drain, and ends with this function.
        let stop_announcing = CancellationToken::new();
        let _announcing = stop_announcing.clone().drop_guard();
        tokio::spawn(announce(hub.clone(), addr, stop_announcing));
        {
            let hub = hub.clone();
            tokio::spawn(async move {
                let until = hub.broker_stop.clone();
                hub.pacing
                    .follow_load(tokio::runtime::Handle::current(), &hub.metrics, until)
                    .await
            });
        }
        tokio::spawn(crate::memory::trim_after_churn(
            hub.registry.clone(),
            hub.metrics.clone(),
            token.clone(),
        ));

        // The closes start with the drain, beside the accept loop (which waits for
        // open HTTP connections, streams among them, to end): every connection is
        // asked to close at once, or they are closed over `--drain-spread`, until
        // every session ended.
        let spread = hub.config.limits.drain_spread;
        let closing = {
            let hub = hub.clone();
            tokio::spawn(async move {
                hub.shutdown.cancelled().await;
                if spread.is_zero() {
                    crate::drain::close_all(&hub.registry);
                } else {
                    crate::drain::spread_closes(&hub.registry, spread).await
                }
            })
        };
        let _closing = AbortOnDrop(closing.abort_handle());

        // On a worker thread, not the caller's: `main` awaits `serve` inside
        // `block_on`, and an accept loop there would hand every new connection over
        // to a worker (a cross-thread wake-up per connect).
        let accepting = tokio::spawn(accept_loop(state.clone(), listener, token));
        if let Err(e) = accepting.await {
            tracing::error!(error = %e, "accept loop failed");
        }

        state.sessions.close();
        let drain_timeout = hub.config.limits.drain_timeout;
        if tokio::time::timeout(drain_timeout, state.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = hub.registry.stats().connections,
                ?drain_timeout,
                "drain timeout: closing the remaining connections abruptly"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl NodeHandle {
    /// The node id shown to clients.
    pub fn node_id(&self) -> &str {
        &self.hub.node_id
    }

    /// Current registry sizes.
    pub fn stats(&self) -> RegistryStats {
        self.hub.registry.stats()
    }

    /// The node's metrics in the Prometheus text format, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        self.hub.metrics.render(self.hub.registry.stats())
    }

    /// Whether the node would answer `/readyz` with 200.
    pub fn is_ready(&self) -> bool {
        Readiness::of(&self.hub).is_ready()
    }

    /// Whether every Redis shard is usable (always, with the memory broker): more
    /// than readiness asks with `--ready-requires any-shard`.
    pub fn all_shards_usable(&self) -> bool {
        self.hub.broker.all_shards_usable()
    }

    /// Starts the drain, as SIGTERM does.
    pub fn shutdown(&self) {
        self.hub.shutdown.cancel();
    }
}

/// Accepts HTTP connections until `stop`, serving each with hyper's HTTP/1 server:
/// its header read timeout drops clients that open a connection and never finish
/// a request (slowloris), and its buffer limit bounds request heads. Requests in
/// flight when the node stops are finished; upgraded WebSockets are drained by the
/// caller.
async fn accept_loop(state: Arc<AppState>, listener: TcpListener, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    let limits = state.hub.config.limits.clone();
    let app = http::router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(limits.max_header_bytes);
    let connections = TaskTracker::new();
    let mut pending = Pending::new(limits.max_http_connections);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (evicted, done) = pending.admit();
        // Every request of the connection carries its slot, so a handler that turns
        // it into a long-lived stream can take it out of the pending set (and drop
        // it when a write to it stalls).
        let slot = ConnSlot::new(evicted.clone(), done.clone());
        let app = app.clone();
        let service = TowerToHyperService::new(tower::service_fn(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(slot.clone());
                app.clone().oneshot(request)
            },
        ));
        let connection = http
            .serve_connection(TokioIo::new(HandshakeIo::new(stream)), service)
            .with_upgrades();
        let stop = stop.clone();
        connections.spawn(async move {
            // Ends at the upgrade for WebSockets (the session lives on), or when an
            // HTTP client is done; on stop, idle keep-alive connections are closed.
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                // Dropping the connection closes its socket.
                _ = evicted.cancelled() => {}
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            done.cancel();
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(limits.drain_timeout, connections.wait()).await;
}

/// The HTTP connections not (yet) WebSockets, oldest first, bounded by
/// `--max-http-connections`: admitting one past the bound evicts the oldest.
///
/// Owned by the accept loop alone, so it needs no lock: each connection's task
/// signals its end through a token the loop sweeps on the next admission.
struct Pending {
    max: usize,
    /// (evict this connection, it ended), oldest first.
    open: std::collections::VecDeque<(CancellationToken, CancellationToken)>,
}

impl Pending {
    fn new(max: usize) -> Self {
        Pending {
            max,
            open: std::collections::VecDeque::new(),
        }
    }

    /// Makes room for one more connection (closing the oldest open one if
    /// needed) and returns its tokens: one cancelled to evict it, one it cancels
    /// when it ends.
    fn admit(&mut self) -> (CancellationToken, CancellationToken) {
        // Ended connections leave from the front at each admission, the others
        // only once the bound is reached: a sweep of every entry on every admission
        // cost a connect storm a lock per connection in flight, per connection.
        while self
            .open
            .front()
            .is_some_and(|(_, done)| done.is_cancelled())
        {
            self.open.pop_front();
        }
        if self.open.len() >= self.max {
            self.open.retain(|(_, done)| !done.is_cancelled());
        }
        if self.open.len() >= self.max
            && let Some((oldest, _)) = self.open.pop_front()
        {
            tracing::debug!("too many HTTP connections: closing the oldest");
            oldest.cancel();
        }
        let tokens = (CancellationToken::new(), CancellationToken::new());
        self.open.push_back(tokens.clone());
        tokens
    }
}

/// Pings every connection each `--ping-interval` from one task, and closes those
/// that did not answer the previous ping. One timer for the node rather than one
/// per connection: an idle connection then carries no timer at all.
async fn heartbeat(registry: Registry, period: std::time::Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => registry.heartbeat(),
        }
    }
}

/// Announces this node every announcement interval until `stop` (the end of
/// [`Node::serve`]): once more as soon as it starts draining, so the view says so
/// at once, and on through the drain.
async fn announce(hub: Arc<Hub>, address: SocketAddr, stop: CancellationToken) {
    let started_at = envelope::now_us() / 1000;
    let period = crate::cluster::interval(hub.config.presence.node_ttl);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (
        std::time::Instant::now(),
        hub.metrics.messages_published.get(),
        hub.metrics.messages_delivered.get(),
    );
    let mut drain_said = false;
    loop {
        tokio::select! {
            // The drain is said even when the node stopped at once.
            biased;
            _ = hub.shutdown.cancelled(), if !drain_said => drain_said = true,
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = std::time::Instant::now();
        let (published, delivered) = (
            hub.metrics.messages_published.get(),
            hub.metrics.messages_delivered.get(),
        );
        let elapsed = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let stats = hub.registry.stats();
        let readiness = Readiness::of(&hub);
        let announcement = Announcement {
            info: NodeInfo {
                id: hub.node_id.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at,
                address: address.to_string(),
                broker: hub.broker.kind().to_owned(),
                ready: readiness.is_ready(),
                connections: stats.connections,
                subscriptions: stats.subscriptions,
                channels: stats.channels,
                published_per_s: (published - last.1) as f64 / elapsed,
                delivered_per_s: (delivered - last.2) as f64 / elapsed,
                announced_at: envelope::now_us() / 1000,
                draining: hub.is_draining(),
                interval_ms: period.as_millis() as u64,
                shards: hub.broker.shards().into_iter().map(shard_info).collect(),
            },
            channels: hub.registry.channel_counts(),
        };
        last = (now, published, delivered);
        if let Err(e) = hub.broker.announce(announcement).await {
            tracing::debug!(error = %e, "could not announce this node");
        }
    }
}

/// A shard's state as the cluster view says it.
fn shard_info(shard: ShardState) -> ShardInfo {
    ShardInfo {
        state: if shard.is_up() {
            ShardHealth::Up
        } else {
            ShardHealth::Down
        },
        shard: shard.label,
        reason: shard.problem,
        probe_rtt_ms: shard.probe_rtt.map(|rtt| rtt.as_secs_f64() * 1000.0),
    }
}

/// Runs a node on `listener` until `shutdown` resolves (see [`Node::serve`]).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    Node::new(config)?.serve(listener, shutdown).await
}

/// Binds the listener for `--listen` with a `--listen-backlog` long accept queue
/// (tokio's `TcpListener::bind` asks for 128, which a reconnect storm overflows).
pub fn bind(config: &Config) -> std::io::Result<TcpListener> {
    let socket = if config.listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restarted node must not wait for its predecessor's TIME_WAIT sockets.
    socket.set_reuseaddr(true)?;
    socket.bind(config.listen)?;
    socket.listen(config.listen_backlog)
}

/// Aborts a task when dropped (the spread closes end with `serve`).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_oldest_open_connection_is_evicted_and_only_past_the_bound() {
        let mut pending = Pending::new(3);
        let (a_evicted, _a_done) = pending.admit();
        let (b_evicted, b_done) = pending.admit();
        let (c_evicted, _c_done) = pending.admit();
        // One in the middle ended: the next admission is within the bound.
        b_done.cancel();
        let (d_evicted, _d_done) = pending.admit();
        assert!(!a_evicted.is_cancelled(), "an ended connection made room");
        // Full of open connections: the oldest goes.
        let (_e_evicted, _e_done) = pending.admit();
        assert!(a_evicted.is_cancelled(), "the oldest is evicted");
        assert!(
            !b_evicted.is_cancelled() && !c_evicted.is_cancelled() && !d_evicted.is_cancelled()
        );
        assert_eq!(pending.open.len(), 3);
    }

    #[test]
    fn ended_connections_leave_from_the_front_at_each_admission() {
        let mut pending = Pending::new(100);
        let ended: Vec<_> = (0..10).map(|_| pending.admit()).collect();
        for (_, done) in &ended {
            done.cancel();
        }
        let _open = pending.admit();
        assert_eq!(pending.open.len(), 1, "the set does not keep what ended");
    }
}
