//! A relay node: its shared state, start-up, serving and graceful drain.
//!
//! [`NodeState`] is built once and shared (`Arc`) by the HTTP handlers and every
//! session. One [`CancellationToken`] is the node's shutdown signal, threaded through
//! every task: the HTTP server, each session's reader and writer, and the broker's
//! subscriber task. Sessions live outside axum's graceful shutdown (an upgraded
//! connection is no longer an HTTP request), so a [`TaskTracker`] tracks them and
//! the drain waits for it, bounded by `--drain-timeout`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Grants, OriginPolicy, Verifier};
use crate::broker::{Broker, BrokerError};
use crate::config::{Config, ConfigError};
use serde_json::value::RawValue;

use crate::handshake_io::HandshakeIo;
use crate::http;
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode};
use crate::registry::{Registry, RegistryStats};
use crate::telemetry::Tracing;

/// State shared by everything on one node.
#[derive(Debug)]
pub(crate) struct NodeState {
    pub(crate) config: Config,
    pub(crate) node_id: String,
    pub(crate) registry: Registry,
    pub(crate) broker: Broker,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tracing: Tracing,
    pub(crate) shutdown: CancellationToken,
    pub(crate) sessions: TaskTracker,
    /// Verifies client tokens; `None` when authentication is off.
    pub(crate) verifier: Option<Verifier>,
    pub(crate) origins: OriginPolicy,
    /// The grants of every connection when authentication is off, shared.
    pub(crate) anyone: Arc<Grants>,
    draining: AtomicBool,
}

impl NodeState {
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Publishes one message to every node: encodes the `msg` frame once (with `from`
    /// when given), runs the publish span (continuing `traceparent` when given) around
    /// the broker call, and counts the outcome. Used by WebSocket clients and the API.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        from: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<(), BrokerError> {
        let frame = protocol::encode_message(channel, data, from);
        let span = self.tracing.publish(channel, data.get().len(), traceparent);
        let context = span.as_ref().map_or("", |s| s.traceparent.as_str());
        let publish = self.broker.publish(channel, frame, context);
        let published = match &span {
            Some(span) => span.broker_publish(&self.tracing, publish).await,
            None => publish.await,
        };
        if let Some(span) = span {
            span.end(published.as_ref().err().map(|e| e.to_string()).as_deref());
        }
        match &published {
            Ok(()) => {
                self.metrics.messages_published.inc();
            }
            Err(_) => self.metrics.publish_error(ErrorCode::Unavailable.as_str()),
        }
        published
    }
}

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
    state: Arc<NodeState>,
}

/// A handle to a running node, for tests and tooling to observe it.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    state: Arc<NodeState>,
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
        let shutdown = CancellationToken::new();
        let registry = Registry::new();
        let broker = Broker::start(
            &config,
            registry.clone(),
            metrics.clone(),
            tracing.clone(),
            shutdown.clone(),
        )?;
        let node_id = config.resolved_node_id();
        // validate() already loaded the key once: this cannot fail.
        let verifier = Verifier::from_config(&config)
            .map_err(|e| NodeError::Config(crate::config::ConfigError::from_key_error(&e)))?;
        let origins = OriginPolicy::from_list(&config.allowed_origins);
        if matches!(origins, OriginPolicy::Any) {
            tracing::warn!(
                "--allowed-origins '*': pages from any site may open WebSockets to this relay"
            );
        }
        if verifier.is_none() {
            tracing::info!("no JWT key configured: clients connect without authentication");
        }
        Ok(Node {
            state: Arc::new(NodeState {
                config,
                node_id,
                registry,
                broker,
                metrics,
                tracing,
                shutdown,
                sessions: TaskTracker::new(),
                verifier,
                origins,
                anyone: Arc::new(Grants::anyone()),
                draining: AtomicBool::new(false),
            }),
        })
    }

    /// A handle that stays valid while and after the node serves.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            state: self.state.clone(),
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
        let addr = listener.local_addr()?;
        tracing::info!(%addr, node = %state.node_id, broker = state.broker.kind(), "listening");

        let token = state.shutdown.clone();
        let trigger = {
            let state = state.clone();
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = state.shutdown.cancelled() => {}
                }
                state.draining.store(true, Ordering::Release);
                tracing::info!(connections = state.registry.stats().connections, "draining");
                state.shutdown.cancel();
            }
        };
        tokio::spawn(trigger);
        tokio::spawn(heartbeat(state.clone()));
        tokio::spawn(crate::memory::trim_after_churn(state.clone()));

        // On a worker thread, not the caller's: `main` awaits `serve` inside
        // `block_on`, and an accept loop there would hand every new connection over
        // to a worker (a cross-thread wake-up per connect).
        let accepting = tokio::spawn(accept_loop(state.clone(), listener, token));
        if let Err(e) = accepting.await {
            tracing::error!(error = %e, "accept loop failed");
        }

        state.sessions.close();
        let drain_timeout = state.config.drain_timeout;
        if tokio::time::timeout(drain_timeout, state.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = state.registry.stats().connections,
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
        &self.state.node_id
    }

    /// Current registry sizes.
    pub fn stats(&self) -> RegistryStats {
        self.state.registry.stats()
    }

    /// The node's metrics in the Prometheus text format, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render(self.state.registry.stats())
    }

    /// Whether the node would answer `/readyz` with 200.
    pub fn is_ready(&self) -> bool {
        !self.state.is_draining() && self.state.broker.is_ready()
    }

    /// Starts the drain, as SIGTERM does.
    pub fn shutdown(&self) {
        self.state.shutdown.cancel();
    }
}

/// Accepts HTTP connections until `stop`, serving each with hyper's HTTP/1 server:
/// its header read timeout drops clients that open a connection and never finish
/// a request (slowloris), and its buffer limit bounds request heads. Requests in
/// flight when the node stops are finished; upgraded WebSockets are drained by the
/// caller.
async fn accept_loop(state: Arc<NodeState>, listener: TcpListener, stop: CancellationToken) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let app = http::router(state.clone());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.handshake_timeout)
        .max_buf_size(state.config.max_header_bytes);
    let connections = TaskTracker::new();
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
        let service = TowerToHyperService::new(app.clone());
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
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(state.config.drain_timeout, connections.wait()).await;
}

/// Pings every connection each `--ping-interval` from one task, and closes those
/// that did not answer the previous ping. One timer for the node rather than one
/// per connection: an idle connection then carries no timer at all.
async fn heartbeat(state: Arc<NodeState>) {
    let period = state.config.ping_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => state.registry.heartbeat(),
        }
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
