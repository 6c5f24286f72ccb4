//! One connection, whatever transport carries it: what it does with each request
//! (sub, unsub, pub, history, presence, ping, with the token's grants, rate limits,
//! hold-back and recovery) and its life from the connect-time subscriptions to the
//! cleanup.
//!
//! A transport (`transport::websocket`; SSE and HTTP streaming are siblings) moves
//! bytes only: it hands the session the requests it reads, as a stream of
//! [`Inbound`], and drains the connection's bounded queue ([`ClientQueue`]) into its
//! socket with a writer, which the session runs beside its own reading in the
//! connection's one task (`join`: each side is polled only when woken). The session
//! handles one request at a time (so one connection's publishes reach the broker in
//! order), reads the next one only while the queue has room, and `select!`s against
//! the close signal, the node's drain and the token's expiry. Whatever ends the connection records a [`CloseReason`]
//! (the first one wins); the transport's writer turns it into its own goodbye (a
//! close frame), and the session removes the connection from the registry.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tungstenite::Utf8Bytes;

use crate::auth::{ConnectResult, Grants, TokenBucket};
use crate::broker::PresenceEntry;
use crate::client::{ClientHandle, ClientQueue, CloseReason, QueueBounds};
use crate::frame::Frame;
use crate::hub::{Hub, Refusal};
use crate::protocol::{self, ChannelPosition, ErrorCode, Request, RequestId, Since};
use crate::proxy::{self, Forwarded, ProxyError};
use crate::publication::Position;
use crate::users::Command;

/// How often a failed refresh proxy call is tried again, until the expiry itself.
const REFRESH_RETRY: Duration = Duration::from_secs(1);

/// Who a connection is, as its transport hands it over.
#[derive(Debug)]
pub(crate) struct Identity {
    /// The grants known before the connection opened (its token, or the node's
    /// "anyone" without auth); `None`: the connect proxy is asked once it is open.
    pub(crate) grants: Option<Arc<Grants>>,
    /// What of the client's request its proxy calls carry.
    pub(crate) forwarded: Forwarded,
    /// What carries the connection, as the backend is told.
    pub(crate) transport: Transport,
}

/// The transport of a connection, as the backend is told (`transport` of every
/// proxy call). A byte rather than a string: every connection keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    WebSocket,
    Sse,
    Stream,
}

impl Transport {
    /// `websocket`, `sse` or `stream`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Stream => "stream",
        }
    }
}

/// The refresh proxy's `result`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshResult {
    #[serde(default)]
    expire_at: Option<u64>,
    #[serde(default)]
    expired: bool,
}

/// The publish proxy's `result`: the data to publish instead, if any.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishResult {
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// The subscribe proxy's `result`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscribeResult {}

/// The rpc proxy's `result`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RpcResult {
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// What a transport read from its client.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A request, as JSON text.
    Request(Utf8Bytes),
    /// A sign of life that carries no request (a WebSocket ping or pong).
    Alive,
    /// The client is gone, or broke the transport's rules: why.
    End(CloseReason),
}

/// A connection being served.
pub(crate) struct Session {
    hub: Arc<Hub>,
    client: ClientHandle,
    /// What the connection may do (without auth, one shared "anyone"): set at
    /// connect by its token or the connect proxy; its expiry moves on a refresh.
    /// Why a mutex: written only by the session itself, read (an `Arc` cloned) by
    /// its requests; smaller than a `RwLock`, and never contended.
    grants: Mutex<Arc<Grants>>,
    /// Whether `grants` are still to come from the connect proxy.
    ask: bool,
    /// What of the client's request its proxy calls carry.
    forwarded: Forwarded,
    transport: Transport,
    /// The connection's token buckets. Why a mutex: only the reader takes from
    /// them, but the session is shared by reference across `.await`s, which
    /// requires `Sync`; one for both, never contended.
    limiters: Mutex<Limiters>,
}

/// A connection's token buckets (the rates and bursts are the node's limits).
struct Limiters {
    /// Publishes and rpcs.
    publish: TokenBucket,
    /// New subscriptions (`sub`), each of which may fan a `join` out.
    subscribe: TokenBucket,
}

impl Session {
    /// Registers a new connection with the node: the session, and the receiving end
    /// of its outbound queue for the transport's writer.
    pub(crate) fn open(hub: Arc<Hub>, identity: Identity) -> (Session, ClientQueue) {
        let limits = &hub.config.limits;
        let (client, queue) = hub.registry.register(QueueBounds {
            frames: limits.client_queue,
            bytes: limits.client_queue_bytes,
        });
        hub.metrics.connections_opened.inc();
        let limiters = Mutex::new(Limiters {
            publish: TokenBucket::full(limits.publish_burst),
            subscribe: TokenBucket::full(limits.subscribe_burst),
        });
        let ask = identity.grants.is_none();
        let session = Session {
            hub,
            client,
            grants: Mutex::new(
                identity
                    .grants
                    .unwrap_or_else(|| Arc::new(Grants::nobody())),
            ),
            ask,
            forwarded: identity.forwarded,
            transport: identity.transport,
            limiters,
        };
        (session, queue)
    }

    /// The connection's outbound side, for its writer.
    pub(crate) fn client(&self) -> &ClientHandle {
        &self.client
    }

    /// The node this connection is served by.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// A span for the connection's lifetime, only when traces are exported: it
    /// costs memory for as long as the connection lives, and logs name the
    /// connection anyway.
    pub(crate) fn span(&self) -> tracing::Span {
        if self.hub.tracing.enabled() {
            tracing::info_span!("connection", node = %self.hub.node_id, conn = self.client.id())
        } else {
            tracing::Span::none()
        }
    }

    /// Serves the connection until it ends, with the transport's `writer` (which
    /// drains the connection's queue into its socket, then says goodbye) run beside
    /// it in the same task: subscribes `channels` (checked before the connection
    /// opened, with the positions to recover from) and sends `welcome` (with
    /// `stream_id`, the session id of a streaming transport), then handles the
    /// requests of `inbound`. Then leaves the registry and presence, waits for the
    /// writer's goodbye, and returns why the connection ended, with `inbound` for
    /// what the transport still reads (a WebSocket's close reply).
    ///
    /// Not an `async fn`: its future lives as long as the connection, and an
    /// `async fn` keeps a second copy of its arguments (the session, the writer)
    /// in it.
    pub(crate) fn serve<'a, I, W>(
        self,
        channels: Vec<(String, Option<Since>)>,
        inbound: I,
        writer: W,
        stream_id: Option<&'a str>,
    ) -> impl Future<Output = (CloseReason, I)> + Send + 'a
    where
        I: Stream<Item = Inbound> + Unpin + Send + 'a,
        W: Future<Output = ()> + Send + 'a,
    {
        let opened = std::time::Instant::now();
        // Boxed: what the connection starts with is used once, at connect; the
        // reading future keeps a pointer to it rather than its size, for its life.
        let opening = Box::new((channels, stream_id));
        crate::join::join(self.reading(opening, inbound), writer).map(move |(session, inbound)| {
            let reason = session
                .client
                .close_reason()
                .unwrap_or(CloseReason::PeerGone);
            session.hub.metrics.client_closed(reason);
            tracing::info!(
                node = %session.hub.node_id,
                conn = session.client.id(),
                reason = reason.metric_label(),
                code = reason.code(),
                duration_ms = opened.elapsed().as_millis() as u64,
                "connection closed"
            );
            (reason, inbound)
        })
    }

    /// The session's side of [`serve`](Self::serve): connects (with the channels
    /// and stream id of `opening`), reads until the connection ends, leaves; gives
    /// the session and `inbound` back.
    // Not an `async fn`, which would keep a second copy of the session.
    #[allow(clippy::type_complexity, clippy::manual_async_fn)]
    fn reading<'a, I>(
        self,
        opening: Box<(Vec<(String, Option<Since>)>, Option<&'a str>)>,
        mut inbound: I,
    ) -> impl Future<Output = (Session, I)> + Send + 'a
    where
        I: Stream<Item = Inbound> + Unpin + Send + 'a,
    {
        async move {
            // Who the connection is, and every channel it starts with. Boxed:
            // only a connecting connection needs the space of these futures.
            let session = &self;
            let live = Box::pin(async move {
                let (channels, stream_id) = *opening;
                tracing::info!(
                    node = %session.hub.node_id,
                    conn = session.client.id(),
                    channels = ?channels.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
                    "connection opened"
                );
                match session.connect(channels).await {
                    Some(channels) => session.subscribe_at_connect(channels, stream_id).await,
                    None => false,
                }
            })
            .await;
            if live {
                let mut mailbox = self.mailbox();
                self.read_loop(&mut inbound, mailbox.as_mut()).await;
            }
            // Boxed: only a closing connection needs the space of these broker futures.
            Box::pin(self.leave()).await;
            (self, inbound)
        }
    }

    /// Leaves the registry first (so no fan-out queues to a connection that is
    /// going), then presence, with a `leave` where channels send them, then its
    /// user's connections.
    async fn leave(&self) {
        let grants = self.grants();
        self.hub.disconnect(self.client.id(), &grants).await;
        if let Some(user) = &grants.user {
            self.hub.users.deregister(user, self.client.id());
            let member = self.member();
            if let Err(e) = self.hub.broker.user_remove(user, &member).await {
                tracing::debug!(error = %e, "could not remove a user's connection entry; it expires");
            }
        }
    }

    /// The connect step, before anything is subscribed: who the connection is
    /// (asking the connect proxy when it came without a token), whether it may open
    /// (a revoked token, its user's connection limit), and every channel it starts
    /// with: the client's and the server-side ones (a token's `subscribe` claim, the
    /// connect proxy's, the personal channel). `None`: refused, the client told, the
    /// connection closing.
    async fn connect(
        &self,
        mut channels: Vec<(String, Option<Since>)>,
    ) -> Option<Vec<(String, Option<Since>)>> {
        let hub = &self.hub;
        if self.ask {
            let names: Vec<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
            let body = serde_json::json!({
                "client": self.member(),
                "transport": self.transport.as_str(),
                "channels": names,
            });
            let (answer, _) = hub
                .proxy
                .call::<ConnectResult>(
                    proxy::Kind::Connect,
                    body.to_string().into_bytes(),
                    &self.forwarded,
                    None,
                )
                .await;
            let grants = match answer {
                Ok(result) => Grants::from_connect(result).map_err(|e| {
                    tracing::warn!(proxy = "connect", error = %e, "the backend's result is not what the proxy contract says");
                    ProxyError::BadAnswer
                }),
                Err(e) => Err(e),
            };
            match grants {
                Ok(grants) => {
                    *self.grants.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(grants)
                }
                Err(e) => {
                    let reason = match &e {
                        ProxyError::Refused { code, .. } => CloseReason::Application(*code),
                        ProxyError::Unavailable(_) => CloseReason::BackendUnavailable,
                        ProxyError::BadAnswer => CloseReason::BackendError,
                    };
                    self.refuse(Refusal::from(e), reason);
                    return None;
                }
            }
            // The client's channels could only be checked once the grants were known.
            let grants = self.grants();
            let checked = hub
                .check_subscribe(
                    &grants,
                    None,
                    channels.iter().map(|(c, _)| c.as_str()),
                    false,
                )
                .and_then(|()| {
                    channels
                        .iter()
                        .filter(|(_, since)| since.is_some())
                        .try_for_each(|(c, _)| hub.check_since(c))
                });
            if let Err(refusal) = checked {
                self.refuse(refusal, CloseReason::Refused);
                return None;
            }
        }
        let grants = self.grants();
        if hub.config.users.token_revocation
            && let Some(token) = &grants.token
        {
            match hub.broker.is_revoked(grants.user.as_deref(), token).await {
                Ok(false) => {}
                Ok(true) => {
                    self.refuse(
                        Refusal::new(ErrorCode::Forbidden, "this token was revoked"),
                        CloseReason::TokenRevoked,
                    );
                    return None;
                }
                Err(e) => {
                    self.refuse(Refusal::from(e), CloseReason::BrokerUnavailable);
                    return None;
                }
            }
        }
        // Server-side subscriptions: granted by whoever named them, bounded like any.
        let mut server_side: Vec<String> = grants.server_channels.clone();
        if let (Some(ns), Some(user)) = (&hub.config.users.personal_channel_namespace, &grants.user)
        {
            let personal = match ns.as_str() {
                "" => format!("#{user}"),
                ns => format!("{ns}:#{user}"),
            };
            if protocol::validate_channel(&personal).is_ok() {
                server_side.push(personal);
            }
        }
        server_side.retain(|c| !channels.iter().any(|(have, _)| have == c));
        server_side.dedup();
        if !server_side.is_empty() {
            let all = channels
                .iter()
                .map(|(c, _)| c.as_str())
                .chain(server_side.iter().map(String::as_str));
            if let Err(refusal) = hub.check_subscribe(&grants, None, all, true) {
                self.refuse(refusal, CloseReason::Refused);
                return None;
            }
            channels.extend(server_side.into_iter().map(|c| (c, None)));
        }
        if let Some(user) = &grants.user {
            let names: Vec<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
            let max = hub.config.users.max_connections_per_user;
            match hub
                .broker
                .user_add(user, self.user_entry(&names), max)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    self.refuse(
                        Refusal::new(
                            ErrorCode::LimitExceeded,
                            format!("user {user} has {max} connections already (--max-connections-per-user)"),
                        ),
                        CloseReason::Refused,
                    );
                    return None;
                }
                Err(e) => {
                    self.refuse(Refusal::from(e), CloseReason::BrokerUnavailable);
                    return None;
                }
            }
        }
        Some(channels)
    }

    /// A connection with a user gets a mailbox for the server API's commands.
    fn mailbox(&self) -> Option<mpsc::Receiver<Box<Command>>> {
        let grants = self.grants();
        let user = grants.user.as_deref()?;
        Some(
            self.hub
                .users
                .register(user, &self.client, grants.token.clone()),
        )
    }

    /// Tells the client why it is refused, and closes the connection.
    fn refuse(&self, refusal: Refusal, reason: CloseReason) {
        self.send(refusal.frame(None));
        self.client.close(reason);
    }

    /// The connection's name in the cluster, `<node>/<conn>`: its presence member,
    /// its entry among its user's connections, and `client` for the backend.
    fn member(&self) -> String {
        format!("{}/{}", self.hub.node_id, self.client.id())
    }

    /// The connection's entry among its user's connections (`GET /api/connections`).
    fn user_entry(&self, channels: &[&str]) -> PresenceEntry {
        let grants = self.grants();
        let json = serde_json::json!({
            "client": self.member(),
            "node": self.hub.node_id,
            "conn": self.client.id().to_string(),
            "user": grants.user,
            "transport": self.transport.as_str(),
            "channels": channels,
        });
        PresenceEntry {
            member: self.member(),
            json: json.to_string().into(),
            user: grants.user.clone(),
        }
    }

    /// Writes the connection's entry again after its channels changed.
    async fn update_user_entry(&self) {
        let grants = self.grants();
        let Some(user) = &grants.user else { return };
        let channels = self.hub.registry.channels_of(self.client.id());
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        let entry = self.user_entry(&names);
        if let Err(e) = self.hub.broker.user_add(user, entry, 0).await {
            tracing::debug!(error = %e, "could not update a user's connection entry; the next refresh will");
        }
    }

    /// Whether the connection is subscribed to `channel` (however it was allowed:
    /// its grants, the subscribe proxy, the server), which lets it read the
    /// channel's presence and history.
    fn subscribed(&self, channel: &str) -> bool {
        self.hub.registry.is_subscribed(self.client.id(), channel)
    }

    /// The connection's grants now.
    fn grants(&self) -> Arc<Grants> {
        self.grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Subscribes the channels named at connect, sends `welcome` once they are live
    /// (with the position of each history channel), then what each recovered.
    /// Returns `false` (and closes the connection) if the broker cannot serve them.
    async fn subscribe_at_connect(
        &self,
        channels: Vec<(String, Option<Since>)>,
        stream_id: Option<&str>,
    ) -> bool {
        let grants = self.grants();
        // The connection's recoveries take one turn (see `reads`).
        let turn = match channels.iter().any(|(_, since)| since.is_some()) {
            true => match self
                .hub
                .recovery_turn(&self.client, self.transport == Transport::WebSocket)
                .await
            {
                Some(turn) => Some(turn),
                None => {
                    // Closed, or the node drains, while it waited: nothing to make.
                    self.client.close(CloseReason::Shutdown);
                    return false;
                }
            },
            false => None,
        };
        let subscribed = match self
            .hub
            .subscribe_at_connect(&self.client, &grants, &channels)
            .await
        {
            Ok(subscribed) => subscribed,
            Err(e) => {
                self.send(protocol::encode_error(
                    None,
                    ErrorCode::Unavailable,
                    &format!("could not subscribe: {e}"),
                ));
                self.client.close(CloseReason::BrokerUnavailable);
                return false;
            }
        };
        let positions: Vec<ChannelPosition> = subscribed
            .iter()
            .filter_map(|s| {
                let position = s.position()?;
                Some(ChannelPosition {
                    ch: s.channel().to_owned(),
                    epoch: position.epoch.to_string(),
                    offset: position.offset,
                    recovered: s.recovered(),
                })
            })
            .collect();
        // Where the welcome leaves the client: on a recovering channel, where it
        // was (what it missed follows), elsewhere the position read.
        let reached: Vec<(String, Position)> = subscribed
            .iter()
            .filter_map(|s| {
                let top = s.position()?;
                let since = channels
                    .iter()
                    .find(|(c, _)| c == s.channel())
                    .and_then(|(_, since)| since.as_ref());
                let position = match (s.recovered(), since) {
                    (Some(true), Some(since)) => Position {
                        epoch: since.epoch.clone(),
                        offset: since.offset,
                    },
                    _ => top.clone(),
                };
                Some((s.channel().to_owned(), position))
            })
            .collect();
        let names: Vec<String> = channels.into_iter().map(|(c, _)| c).collect();
        let conn = self.client.id().to_string();
        self.send(
            protocol::encode_stream_welcome(
                &self.hub.node_id,
                &conn,
                &names,
                &positions,
                stream_id,
            )
            .with_positions(reached),
        );
        for subscribed in subscribed {
            self.hub.go_live(&self.client, subscribed, None);
        }
        self.hub.end_turn(&self.client, turn).await;
        for channel in &names {
            self.hub.joined(self.client.id(), &grants, channel).await;
        }
        true
    }

    /// Handles the client's requests (and the server API's commands, and the
    /// expiry) until the connection closes.
    ///
    /// What it keeps while it waits is in every connection's task, always: a few
    /// pointers. The close signal, the drain and room in the queue are the
    /// connection's (`ClientHandle`) and wake it without a waiter of their own
    /// here; everything a request needs is boxed, and only while it runs.
    // Not an `async fn`, which would keep its arguments twice.
    #[allow(clippy::manual_async_fn)]
    fn read_loop<'a>(
        &'a self,
        inbound: &'a mut (impl Stream<Item = Inbound> + Unpin),
        mut mailbox: Option<&'a mut mpsc::Receiver<Box<Command>>>,
    ) -> impl Future<Output = ()> + 'a {
        async move {
            // Without `--drain-spread` a draining node asks every open connection to
            // close (`ClientHandle::drain`); one that opened after it asked learns it here.
            if self.hub.config.limits.drain_spread.is_zero() && self.hub.shutdown.is_cancelled() {
                self.client.drain();
            }
            // Boxed, and only when the connection expires: an unauthenticated connection
            // carries no timer. It fires at the expiry, or before it for the refresh
            // proxy; a refresh moves it.
            let mut timer = self.timer(None);
            loop {
                // The arms only say what happened; what it calls for is done below, so
                // that no arm's value is kept across an `.await` in every connection's
                // task.
                let woke = tokio::select! {
                    biased;
                    _ = self.client.closing() => return,
                    // The node drains (with `--drain-spread` the drain closes the
                    // connection in its turn instead).
                    _ = self.client.draining() => {
                        self.client.close(CloseReason::Shutdown);
                        return;
                    }
                    // Polled in place rather than in `async` blocks, which would take
                    // the space of a timer and of a receive in every connection's task.
                    _ = std::future::poll_fn(|cx| match timer.as_mut() {
                        Some(timer) => timer.sleep.as_mut().poll(cx),
                        None => std::task::Poll::Pending,
                    }) => Err(None),
                    Some(command) = std::future::poll_fn(|cx| match mailbox.as_mut() {
                        Some(mailbox) => mailbox.poll_recv(cx),
                        None => std::task::Poll::Pending,
                    }) => Err(Some(command)),
                    // The next request is read once the replies to the earlier ones
                    // left room in the queue: a client pipelining requests is slowed
                    // down by its own unread socket, not closed as slow.
                    next = async {
                        self.client.room().await;
                        inbound.next().await
                    } => Ok(next),
                };
                // What the event calls for, as one boxed future that owns what it needs:
                // its space is taken only while it runs, and only one `.await` point
                // (one pointer) stays in every connection's task.
                let work: std::pin::Pin<Box<dyn Future<Output = Flow> + Send + '_>> = match woke {
                    Ok(next) => {
                        // Anything from the peer proves it is alive, not only a pong.
                        self.client.alive();
                        match next {
                            Some(Inbound::Request(text)) => {
                                self.hub.metrics.frames_received.inc();
                                self.hub.metrics.bytes_received.inc_by(text.len() as u64);
                                Box::pin(async move {
                                    self.handle_text(&text).await;
                                    Flow::Go
                                })
                            }
                            Some(Inbound::Alive) => continue,
                            Some(Inbound::End(reason)) => return self.client.close(reason),
                            None => return self.client.close(CloseReason::PeerGone),
                        }
                    }
                    Err(command) => {
                        let retry_at = timer.as_ref().and_then(|t| t.retry_at);
                        Box::pin(async move {
                            let mut retry_at = retry_at;
                            match self.woke(command, &mut retry_at).await {
                                true => Flow::Rearm(retry_at),
                                false => Flow::Stop,
                            }
                        })
                    }
                };
                match work.await {
                    Flow::Go => {}
                    Flow::Stop => return,
                    // A refresh (the proxy's, the API's) moved the expiry.
                    Flow::Rearm(retry_at) => timer = self.timer(retry_at),
                }
            }
        }
    }

    /// The expiry timer fired (`None`) or a command of the server API arrived;
    /// returns whether the connection goes on.
    async fn woke(&self, command: Option<Box<Command>>, retry_at: &mut Option<Instant>) -> bool {
        match command {
            Some(command) => self.command(*command).await,
            None => match self.expiring().await {
                Expiry::Closed => false,
                Expiry::Extended => {
                    *retry_at = None;
                    true
                }
                Expiry::Retry => {
                    *retry_at = Some(Instant::now() + REFRESH_RETRY);
                    true
                }
            },
        }
    }

    /// The expiry timer for the connection's grants now (none when they do not
    /// expire), after a failed refresh call at `retry_at`.
    fn timer(&self, retry_at: Option<Instant>) -> Option<Box<Timer>> {
        let at = self.deadline(retry_at)?;
        Some(Box::new(Timer {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            retry_at,
        }))
    }

    /// When the expiry timer should fire next: at the expiry, or `--proxy-refresh-
    /// before` ahead of it when the refresh proxy is configured (and at `retry_at`
    /// after a failed call, never past the expiry). `None`: no expiry.
    fn deadline(&self, retry_at: Option<Instant>) -> Option<Instant> {
        let expires = self.grants().expires_at()?;
        if self.hub.proxy.url(proxy::Kind::Refresh).is_none() {
            return Some(expires);
        }
        if let Some(retry) = retry_at {
            return Some(retry.min(expires));
        }
        let before = self.hub.config.proxy.proxy_refresh_before;
        let ask_at = expires.checked_sub(before).unwrap_or(expires);
        // A refresh that did not move the expiry past `before` is not asked again:
        // the connection simply expires.
        Some(if ask_at > Instant::now() {
            ask_at
        } else {
            expires
        })
    }

    /// The expiry timer fired: the connection expires, or the refresh proxy
    /// extends it (or failed, and is asked again soon).
    async fn expiring(&self) -> Expiry {
        let Some(expires) = self.grants().expires_at() else {
            return Expiry::Extended;
        };
        let refresh = self.hub.proxy.url(proxy::Kind::Refresh).is_some();
        if Instant::now() >= expires || !refresh {
            if Instant::now() + Duration::from_millis(1) >= expires {
                self.client.close(CloseReason::TokenExpired);
                return Expiry::Closed;
            }
            return Expiry::Extended;
        }
        let grants = self.grants();
        let body = serde_json::json!({
            "client": self.member(),
            "transport": self.transport.as_str(),
            "user": grants.user.as_deref().unwrap_or(""),
        });
        let (answer, _) = self
            .hub
            .proxy
            .call::<RefreshResult>(
                proxy::Kind::Refresh,
                body.to_string().into_bytes(),
                &self.forwarded,
                None,
            )
            .await;
        match answer {
            Ok(RefreshResult {
                expire_at: Some(at),
                expired: false,
            }) => {
                if self.hub.config.users.token_revocation
                    && let Some(token) = &grants.token
                    && let Ok(true) = self
                        .hub
                        .broker
                        .is_revoked(grants.user.as_deref(), token)
                        .await
                {
                    self.send(protocol::encode_disconnect(1008, "token revoked"));
                    self.client.close(CloseReason::TokenRevoked);
                    return Expiry::Closed;
                }
                *self.grants.lock().unwrap_or_else(|e| e.into_inner()) =
                    Arc::new(grants.expiring(Some(at)));
                Expiry::Extended
            }
            Ok(_) | Err(ProxyError::Refused { .. }) => {
                self.client.close(CloseReason::TokenExpired);
                Expiry::Closed
            }
            Err(_) => Expiry::Retry,
        }
    }

    /// Applies a command of the server API; returns whether the connection goes on.
    async fn command(&self, command: Command) -> bool {
        self.hub.metrics.user_commands.inc();
        match command {
            Command::Disconnect { code, reason, .. } => {
                self.send(protocol::encode_disconnect(code, &reason));
                self.client.close(CloseReason::Application(code));
                false
            }
            Command::Revoke { .. } => {
                self.send(protocol::encode_disconnect(1008, "token revoked"));
                self.client.close(CloseReason::TokenRevoked);
                false
            }
            Command::Subscribe { ch, .. } => {
                let grants = self.grants();
                match self
                    .hub
                    .subscribe(&self.client, &grants, &ch, None, true)
                    .await
                {
                    Ok(Some(subscribed)) => {
                        let position = subscribed.position().cloned();
                        let mut frame = protocol::encode_subscribed(&ch, position.as_ref());
                        if let Some(position) = position {
                            frame = frame.with_positions(vec![(ch.clone(), position)]);
                        }
                        self.hub.go_live(&self.client, subscribed, Some(frame));
                        self.hub.joined(self.client.id(), &grants, &ch).await;
                        self.update_user_entry().await;
                    }
                    Ok(None) => {}
                    Err(refusal) => {
                        tracing::info!(conn = self.client.id(), ch, error = %refusal, "a server-side subscription failed");
                        self.send(protocol::encode_error(
                            None,
                            refusal.code,
                            &format!("the server could not subscribe you to {ch}: {refusal}"),
                        ));
                    }
                }
                true
            }
            Command::Unsubscribe { ch, .. } => {
                if self.hub.registry.is_subscribed(self.client.id(), &ch) {
                    self.hub
                        .unsubscribe(self.client.id(), &self.grants(), &ch)
                        .await;
                    self.send(protocol::encode_unsubscribed(&ch));
                    self.update_user_entry().await;
                }
                true
            }
            Command::Refresh { expire_at, .. } => {
                let grants = self.grants();
                *self.grants.lock().unwrap_or_else(|e| e.into_inner()) =
                    Arc::new(grants.expiring(Some(expire_at)));
                true
            }
        }
    }

    async fn handle_text(&self, text: &str) {
        let request = match protocol::parse_request(text) {
            Ok(request) => request,
            Err(e) => {
                self.send(protocol::encode_error(e.id, e.code, &e.message));
                return;
            }
        };
        let id = request.id();
        let result = match request {
            Request::Subscribe { ch, since, .. } => self.subscribe(&ch, since, id).await,
            Request::Publish { ch, data, tp, .. } => {
                let channel = ch.as_deref().unwrap_or(&self.hub.config.default_channel);
                self.publish(channel, data, tp.as_deref())
                    .await
                    .map(|offset| match (id, offset) {
                        (Some(id), Some(offset)) => Some(protocol::encode_publish_ack(id, offset)),
                        (Some(id), None) => Some(protocol::encode_ack(id)),
                        (None, _) => None,
                    })
            }
            Request::Unsubscribe { ch, .. } => {
                let was = self.hub.registry.is_subscribed(self.client.id(), &ch);
                self.hub
                    .unsubscribe(self.client.id(), &self.grants(), &ch)
                    .await;
                if was {
                    self.update_user_entry().await;
                }
                Ok(id.map(protocol::encode_ack))
            }
            Request::Rpc { method, data, .. } => self.rpc(&method, data, id).await,
            Request::Ping { .. } => Ok(Some(protocol::encode_pong(id))),
            Request::Presence { ch, .. } => self
                .hub
                .presence(&self.grants(), &ch, self.subscribed(&ch))
                .await
                .map(|entries| Some(protocol::encode_presence(id, &ch, &entries))),
            Request::PresenceStats { ch, .. } => self
                .hub
                .presence_stats(&self.grants(), &ch, self.subscribed(&ch))
                .await
                .map(|(clients, users)| {
                    Some(protocol::encode_presence_stats(id, &ch, clients, users))
                }),
            Request::History {
                ch, since, limit, ..
            } => self
                .hub
                .history(&self.grants(), &ch, since, limit, self.subscribed(&ch))
                .await
                .map(|h| {
                    let frame =
                        protocol::encode_history(id, &ch, &h.top, &h.publications, h.truncated);
                    Some(frame)
                }),
        };
        match result {
            Ok(Some(reply)) => self.send(reply),
            Ok(None) => {}
            Err(refusal) => self.send(refusal.frame(id)),
        }
    }

    /// Subscribes (recovering from `since`) and queues the ack in its place: after
    /// the replayed messages, before the live ones. Returns no reply of its own.
    async fn subscribe(
        &self,
        channel: &str,
        since: Option<Since>,
        id: Option<RequestId<'_>>,
    ) -> Result<Option<Frame>, Refusal> {
        if !self.hub.registry.is_subscribed(self.client.id(), channel) {
            let limits = &self.hub.config.limits;
            let (rate, burst) = (limits.subscribe_rate, limits.subscribe_burst);
            self.take_token(|l| &mut l.subscribe, rate, burst)
                .map_err(|()| {
                    Refusal::new(
                        ErrorCode::RateLimited,
                        format!("subscribing faster than {rate}/s (bursts of {burst})"),
                    )
                })?;
        }
        let grants = self.grants();
        // Beyond the grants, the application may allow it (the subscribe proxy).
        let authorized = !grants.may_subscribe(channel)
            && self.hub.config.channel_options(channel).proxy_subscribe
            && !self.hub.registry.is_subscribed(self.client.id(), channel)
            && {
                let body = serde_json::json!({
                    "client": self.member(),
                    "transport": self.transport.as_str(),
                    "user": grants.user.as_deref().unwrap_or(""),
                    "ch": channel,
                });
                let (answer, _) = self
                    .hub
                    .proxy
                    .call::<SubscribeResult>(
                        proxy::Kind::Subscribe,
                        body.to_string().into_bytes(),
                        &self.forwarded,
                        None,
                    )
                    .await;
                answer.map_err(Refusal::from)?;
                true
            };
        // A recovery takes its turn (see `reads`); a plain subscription needs none.
        let turn =
            match since.is_some() && !self.hub.registry.is_subscribed(self.client.id(), channel) {
                true => match self.hub.recovery_turn(&self.client, false).await {
                    Some(turn) => Some(turn),
                    None => {
                        // Closed, or the node drains, while it waited.
                        self.client.close(CloseReason::Shutdown);
                        return Err(Refusal::new(
                            ErrorCode::Unavailable,
                            "the node is shutting down",
                        ));
                    }
                },
                false => None,
            };
        let Some(subscribed) = self
            .hub
            .subscribe(&self.client, &grants, channel, since, authorized)
            .await?
        else {
            // Already subscribed, and that subscription was acknowledged as live.
            return Ok(id.map(protocol::encode_ack));
        };
        let reply = match (id, subscribed.position()) {
            (Some(id), Some(position)) => Some(
                protocol::encode_subscribe_ack(id, position, subscribed.recovered())
                    .with_positions(vec![(channel.to_owned(), position.clone())]),
            ),
            (Some(id), None) => Some(protocol::encode_ack(id)),
            // Without an id there is no ack; a failed recovery must still be told.
            (None, Some(position)) if subscribed.recovered() == Some(false) => Some(
                protocol::encode_gap(channel, position)
                    .with_positions(vec![(channel.to_owned(), position.clone())]),
            ),
            (None, _) => None,
        };
        self.hub.go_live(&self.client, subscribed, reply);
        self.hub.end_turn(&self.client, turn).await;
        self.hub.joined(self.client.id(), &grants, channel).await;
        self.update_user_entry().await;
        Ok(None)
    }

    async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        tp: Option<&str>,
    ) -> Result<Option<u64>, Refusal> {
        let hub = &self.hub;
        let grants = self.grants();
        // With a publish proxy the application alone decides, and sees every
        // message first; otherwise the grants do.
        let proxied = hub.config.channel_options(channel).proxy_publish;
        if !proxied && !grants.may_publish(channel) {
            hub.metrics.publish_error(ErrorCode::Forbidden.as_str());
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("not allowed to publish to {channel}"),
            ));
        }
        self.rate_limited()?;
        let from = if hub.config.auth.expose_publisher {
            grants.user.as_deref()
        } else {
            None
        };
        if !proxied {
            return Ok(hub.publish(channel, data, from, tp).await?);
        }
        let body = format!(
            r#"{{"client":{},"transport":"{}","user":{},"ch":"{channel}","data":{}}}"#,
            serde_json::Value::from(self.member()),
            self.transport.as_str(),
            serde_json::Value::from(grants.user.as_deref().unwrap_or("")),
            data.get()
        );
        let (answer, tp) = hub
            .proxy
            .call::<PublishResult>(proxy::Kind::Publish, body.into_bytes(), &self.forwarded, tp)
            .await;
        let answer = answer.map_err(|e| {
            let refusal = Refusal::from(e);
            hub.metrics.publish_error(refusal.code.as_str());
            refusal
        })?;
        let data = answer.data.as_deref().unwrap_or(data);
        if data.get().len() > hub.config.limits.max_message_bytes {
            hub.metrics.publish_error(ErrorCode::Internal.as_str());
            tracing::warn!(
                proxy = "publish",
                channel,
                "the backend replaced a message with data over --max-message-bytes"
            );
            return Err(Refusal::new(
                ErrorCode::Internal,
                "the application backend's data is over --max-message-bytes",
            ));
        }
        Ok(hub.publish(channel, data, from, tp.as_deref()).await?)
    }

    /// `rpc`: asks the application backend, answers with its `data`.
    async fn rpc(
        &self,
        method: &str,
        data: Option<&RawValue>,
        id: Option<RequestId<'_>>,
    ) -> Result<Option<Frame>, Refusal> {
        if self.hub.proxy.url(proxy::Kind::Rpc).is_none() {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                "rpc is not configured on this relay (--proxy-rpc-url)",
            ));
        }
        // Each rpc is a call of the backend: bounded like publishes.
        self.rate_limited()?;
        let grants = self.grants();
        let body = format!(
            r#"{{"client":{},"transport":"{}","user":{},"method":{},"data":{}}}"#,
            serde_json::Value::from(self.member()),
            self.transport.as_str(),
            serde_json::Value::from(grants.user.as_deref().unwrap_or("")),
            serde_json::Value::from(method),
            data.map_or("null", RawValue::get)
        );
        let (answer, _) = self
            .hub
            .proxy
            .call::<RpcResult>(proxy::Kind::Rpc, body.into_bytes(), &self.forwarded, None)
            .await;
        let answer = answer.map_err(Refusal::from)?;
        let null = RawValue::from_string("null".into()).expect("null is JSON");
        let data = answer.data.as_deref().unwrap_or(&null);
        Ok(Some(protocol::encode_rpc(id, data)))
    }

    /// Takes a publish (or rpc) token; refused past the connection's rate.
    fn rate_limited(&self) -> Result<(), Refusal> {
        let limits = &self.hub.config.limits;
        let (rate, burst) = (limits.publish_rate, limits.publish_burst);
        if self.take_token(|l| &mut l.publish, rate, burst).is_err() {
            self.hub
                .metrics
                .publish_error(ErrorCode::RateLimited.as_str());
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("publishing faster than {rate}/s (bursts of {burst})"),
            ));
        }
        Ok(())
    }

    /// Takes a token from the bucket `bucket` picks; a client refused more than
    /// `burst` times in a row keeps going while refused — not a burst, abuse — and
    /// is closed (1008).
    fn take_token(
        &self,
        bucket: impl FnOnce(&mut Limiters) -> &mut TokenBucket,
        rate: f64,
        burst: u32,
    ) -> Result<(), ()> {
        let taken = {
            let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
            bucket(&mut limiters).try_take(rate, burst)
        };
        match taken {
            Ok(()) => Ok(()),
            Err(refused_in_a_row) => {
                if refused_in_a_row > burst {
                    self.client.close(CloseReason::RateLimited);
                }
                Err(())
            }
        }
    }

    fn send(&self, frame: Frame) {
        let len = frame.len() as u64;
        if self.client.send_reply(frame) {
            self.hub.metrics.bytes_sent.inc_by(len);
        }
    }
}

/// A connection's future inside its span, as `tracing`'s `Instrumented` (entered
/// while the future is polled or dropped), with the span boxed: a span is 40
/// bytes, and every connection's task would keep one, mostly `Span::none()`.
pub(crate) struct InSpan<F> {
    inner: std::mem::ManuallyDrop<F>,
    span: Option<Box<tracing::Span>>,
}

/// `future`, run inside `span` (a connection's [`Session::span`]).
pub(crate) fn in_span<F: Future>(span: tracing::Span, future: F) -> InSpan<F> {
    InSpan {
        span: (!span.is_none()).then(|| Box::new(span)),
        inner: std::mem::ManuallyDrop::new(future),
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // SAFETY: `inner` is pinned with `self`: never moved, dropped in place.
        let this = unsafe { self.get_unchecked_mut() };
        let _entered = this.span.as_deref().map(tracing::Span::enter);
        unsafe { std::pin::Pin::new_unchecked(&mut *this.inner) }.poll(cx)
    }
}

impl<F> Drop for InSpan<F> {
    fn drop(&mut self) {
        let _entered = self.span.as_deref().map(tracing::Span::enter);
        // SAFETY: dropped once, in place, and never used again.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.inner) };
    }
}

/// What the read loop does after an event.
enum Flow {
    /// Read the next request.
    Go,
    /// The connection ends.
    Stop,
    /// Set the expiry timer again (after a failed refresh call, to retry then).
    Rearm(Option<Instant>),
}

/// A connection's expiry timer, and when a failed refresh call is tried again.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    retry_at: Option<Instant>,
}

/// What the expiry timer's firing came to.
enum Expiry {
    /// The connection closed (expired, refresh refused, token revoked).
    Closed,
    /// It goes on, with its expiry where the grants now say.
    Extended,
    /// The refresh proxy failed: asked again soon, until the expiry.
    Retry,
}
