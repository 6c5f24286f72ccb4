//! The broker: how a message published on one node reaches the other nodes.
//!
//! Two implementations behind one type: [`memory`] (in-process, one node, the
//! zero-setup default) and [`redis`] (Redis pub/sub, any number of nodes). The set
//! is closed, so [`Broker`] is an enum rather than a trait object: static dispatch
//! and plain `async fn`s.
//!
//! Contract, for both:
//! - [`Broker::publish`] resolves once the message is accepted for delivery to every
//!   node, or fails within `--broker-timeout`. Publishes awaited one after another
//!   are delivered in that order.
//! - [`Broker::subscribe`] resolves once messages of the channel published from now
//!   on reach this node's registry (the guarantee behind a `sub` ack).
//! - [`Broker::release`] tells the broker the channel may have lost its last local
//!   subscriber; the broker re-checks the registry and drops its interest.
//! - Incoming messages are handed to [`Registry::fanout`], which never waits.
//!
//! This is the only module that talks to Redis.

pub mod memory;
pub mod redis;

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::telemetry::Tracing;

/// Why a broker operation failed. Both mean "the request had no effect that the
/// client can rely on"; clients see them as `unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No answer within `--broker-timeout`.
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The broker refused or could not be reached.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// What a broker needs to deliver a message on this node.
#[derive(Debug, Clone)]
pub struct Local {
    /// Where the subscribers are.
    pub registry: Registry,
    /// Where deliveries are counted.
    pub metrics: Arc<Metrics>,
    /// Where delivery spans go.
    pub tracing: Tracing,
}

impl Local {
    /// Hands one frame to the local subscribers of `channel` (inside a delivery span
    /// when the message is traced) and counts it. Never waits.
    pub fn deliver(&self, channel: &str, frame: &Utf8Bytes, traceparent: &[u8]) -> usize {
        let delivered = self.tracing.deliver(channel, traceparent, || {
            self.registry.fanout(channel, frame)
        });
        self.metrics.messages_delivered.inc_by(delivered as u64);
        self.metrics
            .bytes_sent
            .inc_by((delivered * frame.len()) as u64);
        delivered
    }
}

/// The node's broker.
#[derive(Debug, Clone)]
pub enum Broker {
    /// In-process, single node.
    Memory(memory::MemoryBroker),
    /// Redis pub/sub, any number of nodes.
    Redis(redis::RedisBroker),
}

impl Broker {
    /// Builds the broker the configuration asks for. The Redis broker starts its
    /// subscriber task, which keeps (re)connecting until `shutdown` is cancelled; a
    /// Redis that is down at start-up only delays readiness.
    pub fn start(
        config: &Config,
        registry: Registry,
        metrics: Arc<Metrics>,
        tracing: Tracing,
        shutdown: CancellationToken,
    ) -> Result<Broker, BrokerError> {
        let local = Local {
            registry,
            metrics,
            tracing,
        };
        match &config.redis_url {
            None => Ok(Broker::Memory(memory::MemoryBroker::new(local))),
            Some(url) => Ok(Broker::Redis(redis::RedisBroker::start(
                url,
                &config.redis_prefix,
                config.broker_timeout,
                local,
                shutdown,
            )?)),
        }
    }

    /// Publishes one encoded `msg` frame to `channel` on every node; `traceparent`
    /// (W3C, may be empty) lets receiving nodes continue the publish's trace.
    pub async fn publish(
        &self,
        channel: &str,
        frame: Utf8Bytes,
        traceparent: &str,
    ) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(b) => {
                b.publish(channel, frame, traceparent);
                Ok(())
            }
            Broker::Redis(b) => b.publish(channel, frame, traceparent).await,
        }
    }

    /// Makes sure this node receives `channel`; resolves once that is live.
    pub async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        match self {
            Broker::Memory(_) => Ok(()),
            Broker::Redis(b) => b.subscribe(channel).await,
        }
    }

    /// Signals that `channel` may have no local subscribers left.
    pub fn release(&self, channel: &str) {
        match self {
            Broker::Memory(_) => {}
            Broker::Redis(b) => b.release(channel),
        }
    }

    /// Whether the broker is connected (readiness).
    pub fn is_ready(&self) -> bool {
        match self {
            Broker::Memory(_) => true,
            Broker::Redis(b) => b.is_connected(),
        }
    }

    /// `"memory"` or `"redis"`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Broker::Memory(_) => "memory",
            Broker::Redis(_) => "redis",
        }
    }
}
