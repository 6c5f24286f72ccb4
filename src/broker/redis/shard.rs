//! One Redis shard as a node sees it: the publishing connection to its current
//! master, the state of its subscriber connection (which channels are live, which
//! must change, who waits), whether it is usable, and its delivery probe.
//!
//! Owned by the broker ([`super::Inner::shards`]); the shard's subscriber task
//! ([`super::subscriber`]) is the only writer of the connection state, sessions
//! only mark channels dirty and wait.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterConfig;
use tokio::sync::{Notify, oneshot};

use super::conn::{Conn, PubSub};
use super::endpoint::{Endpoint, Resends};
use super::probe::Probes;
use crate::broker::BrokerError;

/// One shard: see the module documentation.
pub(super) struct Shard {
    /// Position in `--redis-url` (what the channel hash picks).
    pub index: usize,
    /// `host:port` or `sentinel/<master>`, for logs, metrics and `/readyz`.
    pub label: String,
    pub endpoint: Endpoint,
    /// `PUBLISH`/`SUBSCRIBE`, or sharded pub/sub on a cluster.
    pub pubsub: PubSub,
    timeout: Duration,
    /// Whether the shard keeps a connection for durable publishes.
    durable: bool,
    /// The master's address (the last one known) and self-reconnecting connections
    /// to it. They are replaced when a Sentinel-managed shard moves to a new
    /// master, and absent until its master is first known or while they are being
    /// replaced.
    publisher: RwLock<Publishers>,
    /// Why a std mutex: critical sections are a few set operations, never held
    /// across an `.await`; shared by sessions and the subscriber task.
    state: Mutex<SubState>,
    /// Wakes the subscriber task when `state.dirty` gained a channel.
    pub wake: Notify,
    /// Makes the subscriber task drop its connection and find the master again
    /// (a `+switch-master` event, a `READONLY` reply).
    pub kick: Arc<Notify>,
    connected: AtomicBool,
    /// Which subscriber connection is the current one: each connection attempt
    /// takes the next number, and pushes of an older connection, still being
    /// drained by its reader after it was replaced, are ignored (the position
    /// reads on the new connection cover what they carried).
    connection: AtomicU64,
    /// Why the shard is not usable although connected (a probe that did not come
    /// back), or why the last connection ended. Cleared by a returning probe.
    problem: Mutex<Option<String>>,
    /// The delivery probes through this shard.
    pub probes: Probes,
}

/// A shard's connections to its master.
#[derive(Default)]
struct Publishers {
    /// The master's address, the last one known.
    address: Option<String>,
    /// Publishes, history, presence, the cluster view, delivery probes: one
    /// multiplexed connection.
    shared: Option<Conn>,
    /// Publishes on a Redis Cluster: a client that never resends a request on its
    /// own (`Resends::Never`). `None` elsewhere: a standalone connection does not
    /// resend, so publishes share `shared`.
    once: Option<Conn>,
    /// Clients' history reads (recoveries, `history`): their replies run to
    /// `--max-history-bytes` each, and on `shared` they would hold up publishes and
    /// delivery probes behind them. `None` on a Redis Cluster (they use `shared`).
    reads: Option<Conn>,
    /// Publishes that wait for replicas (`publish-durability replicas:N`), when any
    /// channel makes them. `WAIT` blocks the connection it is sent on until the
    /// replicas answer: on the shared one it would hold up every other command,
    /// delivery probes included, which then time out and take the shard down.
    durable: Option<Conn>,
}

/// The subscriber connection's channels.
#[derive(Default)]
pub(super) struct SubState {
    /// Channels SUBSCRIBEd (confirmed) on the current subscriber connection.
    pub live: HashSet<String>,
    /// Channels whose local interest may differ from `live`.
    pub dirty: HashSet<String>,
    /// Channels of the batch being subscribed now (SUBSCRIBE sent, not yet live).
    pub subscribing: HashSet<String>,
    /// Those of them Redis unsubscribed meanwhile (a Redis Cluster slot moved
    /// while their SSUBSCRIBE went to the old owner): the batch leaves them dirty
    /// for the next round instead of making them live, where they would stay deaf.
    pub moved: HashSet<String>,
    /// Sessions waiting for a channel to become live. Bounded by the number of
    /// sessions: each waits for at most one subscription at a time, and abandoned
    /// waiters are pruned whenever a new one is added.
    pub waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
}

impl SubState {
    /// Marks a channel for the subscriber task. Not while disconnected: the next
    /// connection starts from the registry and the waiters (`on_connected`), so a
    /// set fed during an outage would only grow with what clients ask for.
    pub(super) fn mark_dirty(&mut self, connected: bool, channel: &str) {
        if connected {
            self.dirty.insert(channel.to_owned());
        }
    }

    /// Tells the sessions waiting for `channel` that it is live.
    pub(super) fn wake_waiters(&mut self, channel: &str) {
        for waiter in self.waiters.remove(channel).into_iter().flatten() {
            // A waiter that gave up (timed out) is simply gone.
            let _ = waiter.send(());
        }
    }
}

impl Shard {
    /// A shard at `endpoint`; `durable`: it keeps a second connection for
    /// publishes that wait for replicas.
    pub(super) fn new(
        index: usize,
        endpoint: Endpoint,
        prefix: &str,
        timeout: Duration,
        durable: bool,
    ) -> Result<Shard, BrokerError> {
        let publisher = match &endpoint {
            Endpoint::Direct(client) => Publishers {
                address: Some(client.get_connection_info().addr().to_string()),
                shared: Some(publisher(client, timeout)?),
                once: None,
                reads: Some(publisher(client, timeout)?),
                durable: durable.then(|| publisher(client, timeout)).transpose()?,
            },
            Endpoint::Sentinel(_) => Publishers::default(),
            Endpoint::Cluster(_) => {
                let client = |resends| {
                    endpoint
                        .cluster_client(false, resends)
                        .expect("a cluster endpoint")
                        .map_err(|e| {
                            BrokerError::Unavailable(format!("invalid Redis Cluster URL: {e}"))
                        })
                };
                let (resending, once) = (client(Resends::Allowed)?, client(Resends::Never)?);
                // Connects in the background: a node starts (not ready) while the
                // cluster is down. Each call is a connection of its own to every
                // node it routes to.
                let connect = |client: &redis::cluster::ClusterClient| {
                    let config = ClusterConfig::new()
                        .set_connection_timeout(timeout)
                        .set_response_timeout(timeout);
                    Conn::Cluster(client.get_pending_async_connection_with_config(config))
                };
                Publishers {
                    address: Some("cluster".to_owned()),
                    shared: Some(connect(&resending)),
                    once: Some(connect(&once)),
                    // Reads share the resending client: a third cluster client
                    // (connections to every master, its own slot map) slowed the
                    // nodes' recovery from a killed master in tests.
                    reads: None,
                    durable: durable.then(|| connect(&once)),
                }
            }
        };
        let pubsub = endpoint.pubsub();
        let label = endpoint.label();
        let probes = Probes::new(prefix, pubsub, &label, timeout);
        Ok(Shard {
            index,
            label,
            endpoint,
            pubsub,
            timeout,
            durable,
            publisher: RwLock::new(publisher),
            state: Mutex::new(SubState::default()),
            wake: Notify::new(),
            kick: Arc::new(Notify::new()),
            connected: AtomicBool::new(false),
            connection: AtomicU64::new(0),
            problem: Mutex::new(None),
            probes,
        })
    }

    /// The publishing connection to the shard's master.
    pub(super) fn publisher(&self) -> Result<Conn, BrokerError> {
        let publishers = self.publisher.read().unwrap_or_else(|e| e.into_inner());
        self.usable(publishers.shared.as_ref())
    }

    /// The connection for publishes, which must never be sent twice (see
    /// [`Publishers::once`]).
    pub(super) fn publisher_once(&self) -> Result<Conn, BrokerError> {
        let publishers = self.publisher.read().unwrap_or_else(|e| e.into_inner());
        self.usable(publishers.once.as_ref().or(publishers.shared.as_ref()))
    }

    /// The connection for clients' history reads (see [`Publishers::reads`]).
    pub(super) fn reader(&self) -> Result<Conn, BrokerError> {
        let publishers = self.publisher.read().unwrap_or_else(|e| e.into_inner());
        self.usable(publishers.reads.as_ref().or(publishers.shared.as_ref()))
    }

    /// The connection for publishes that wait for replicas (see [`Publishers`]).
    pub(super) fn durable_publisher(&self) -> Result<Conn, BrokerError> {
        let publishers = self.publisher.read().unwrap_or_else(|e| e.into_inner());
        self.usable(publishers.durable.as_ref())
    }

    fn usable(&self, conn: Option<&Conn>) -> Result<Conn, BrokerError> {
        conn.cloned().ok_or_else(|| {
            BrokerError::Unavailable(format!("Redis shard {}: finding the master", self.label))
        })
    }

    /// Points the publishing connection at the master at `address` (a no-op when it
    /// is already there). Returns whether it moved from another master.
    pub(super) fn use_master(
        &self,
        address: &str,
        client: &redis::Client,
    ) -> Result<bool, BrokerError> {
        let mut publisher = self.publisher.write().unwrap_or_else(|e| e.into_inner());
        let known = publisher.address.as_deref();
        let moved = known.is_some_and(|known| known != address);
        if !moved && known.is_some() && publisher.shared.is_some() {
            return Ok(false);
        }
        *publisher = Publishers {
            address: Some(address.to_owned()),
            shared: Some(self::publisher(client, self.timeout)?),
            once: None,
            reads: Some(self::publisher(client, self.timeout)?),
            durable: self
                .durable
                .then(|| self::publisher(client, self.timeout))
                .transpose()?,
        };
        Ok(moved)
    }

    /// Stops publishing to a Sentinel-managed shard's master once it is known to be
    /// replaced (a `+switch-master` event, a `READONLY` reply, a failed role
    /// check): until the subscriber task has found the new master, publishes fail
    /// as `unavailable` instead of going to a server that is being demoted, where
    /// they would be lost. Fixed servers keep their connection.
    pub(super) fn forget_master(&self) {
        if self.endpoint.is_sentinel() {
            let mut publisher = self.publisher.write().unwrap_or_else(|e| e.into_inner());
            publisher.shared = None;
            publisher.reads = None;
            publisher.durable = None;
        }
    }

    /// Runs an idempotent operation on the publishing connection within the broker
    /// timeout, twice if the first attempt found the connection dropped: the first
    /// command after Redis restarted finds the old connection broken, and the
    /// connection manager has reconnected by the second. Only for operations that
    /// may run twice (reads, presence writes), never for a publish.
    pub(super) async fn idempotent<T, F, Fut>(&self, op: F) -> Result<T, BrokerError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.idempotent_on(self.publisher()?, op).await
    }

    /// Runs a client's history read as [`idempotent`](Self::idempotent) does, on
    /// the connection kept for them.
    pub(super) async fn read<T, F, Fut>(&self, op: F) -> Result<T, BrokerError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.idempotent_on(self.reader()?, op).await
    }

    async fn idempotent_on<T, F, Fut>(&self, conn: Conn, op: F) -> Result<T, BrokerError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            match op(conn.clone()).await {
                Err(e) if e.is_connection_dropped() || e.is_io_error() => op(conn).await,
                result => result,
            }
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(BrokerError::Timeout(self.timeout)),
        }
    }

    /// Runs an idempotent pipeline (see [`idempotent`](Self::idempotent)).
    pub(super) async fn run(&self, pipe: &redis::Pipeline) -> Result<(), BrokerError> {
        self.idempotent(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await
    }

    /// Turns a failed command into a broker error. On a Sentinel-managed shard a
    /// `READONLY` reply means the server is no longer the master: the subscriber
    /// task is kicked to find the new one (and moves the publishing connection with
    /// it).
    pub(super) fn failed(&self, error: redis::RedisError) -> BrokerError {
        // Only a Sentinel group has another master to find: a fixed server that
        // answers READONLY is a replica by configuration, and stays one.
        if error.code() == Some("READONLY") && self.endpoint.is_sentinel() {
            tracing::warn!(shard = %self.label, "Redis answered READONLY: the master was demoted; finding the new one");
            self.kick.notify_one();
        }
        BrokerError::Unavailable(error.to_string())
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SubState> {
        // A panic while holding this lock cannot leave the sets inconsistent in a
        // way that matters (they are re-derived on reconnect), so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Numbers a new subscriber connection, which makes it the current one.
    pub(super) fn next_connection(&self) -> u64 {
        self.connection.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether `connection` (a number from [`next_connection`](Self::next_connection))
    /// is the current subscriber connection.
    pub(super) fn is_current(&self, connection: u64) -> bool {
        self.connection.load(Ordering::Acquire) == connection
    }

    /// Called with the state lock held, so a session reading the flag under the
    /// lock sees connection changes in order with `live`.
    pub(super) fn set_connected(&self, _state: &MutexGuard<'_, SubState>, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// `Ok` when the shard is usable: connected, and its last probe came back.
    pub(super) fn status(&self) -> Result<(), String> {
        match self.problem() {
            None => Ok(()),
            Some(problem) => Err(format!("Redis shard {}: {problem}", self.label)),
        }
    }

    /// Why the shard is not usable (see [`status`](Self::status)); `None` while it is.
    pub(super) fn problem(&self) -> Option<String> {
        let problem = self.problem.lock().unwrap_or_else(|e| e.into_inner());
        match (&*problem, self.is_connected()) {
            (None, true) => None,
            (Some(problem), _) => Some(problem.clone()),
            (None, false) => Some("not connected".to_owned()),
        }
    }

    pub(super) fn set_problem(&self, problem: impl Into<String>) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = Some(problem.into());
    }

    /// A push on pub/sub channel `channel`: `None` when it is not a probe channel;
    /// otherwise whether it was a probe coming back that cleared a problem.
    pub(super) fn probe_returned(&self, channel: &[u8], payload: &[u8]) -> Option<bool> {
        let returned = self.probes.returned(channel, payload)?;
        let cleared = returned
            && self
                .problem
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .is_some();
        Some(cleared)
    }
}

/// A lazy self-reconnecting publishing connection: a node starts (not ready) while
/// Redis is down. Few retries per failure: the caller's timeout bounds the wait,
/// and the next publish retries.
fn publisher(client: &redis::Client, timeout: Duration) -> Result<Conn, BrokerError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(super::BACKOFF_MAX);
    ConnectionManager::new_lazy_with_config(client.clone(), config)
        .map(Conn::Single)
        .map_err(|e| BrokerError::Unavailable(format!("invalid Redis URL: {e}")))
}
