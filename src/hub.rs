//! The hub: the life of subscriptions and publications on this node, for WebSocket
//! sessions and the HTTP API alike.
//!
//! It owns the rules that apply whoever asks (permissions, per-connection and
//! per-node limits, channel options), subscribing with recovery, unsubscribing,
//! disconnecting, publishing and reading history. State stays where it lives (the
//! [`Registry`] for local clients, the [`Broker`] for the cluster); the hub is the
//! one place that combines them.
//!
//! A subscription to a channel with history is made in this order, which is what
//! makes recovery exact:
//! 1. the client is added to the registry with its frames *held back*;
//! 2. the broker makes the channel live on this node;
//! 3. the channel's history is read: its position (and, to recover, what followed
//!    the client's `since`);
//! 4. [`Hub::go_live`] queues the replayed messages and the ack, then the held-back
//!    frames above the position read — in one critical section with the fan-out.
//!
//! Every message published after step 2 is either in the history read in step 3 or
//! held back with a higher offset, so the client gets each offset once, in order.
//!
//! A recovery's read (step 3) is answered, in this order of preference, by the
//! node's cache of the channel's recent publications (`broker::recent`: no Redis at
//! all), by one read of the channel's tail shared by every recovery of the channel
//! waiting meanwhile (which fills the cache for the next ones), or by a read of its
//! own range; each gives the client the same answer its own read would have.

use std::sync::Arc;

use crate::frame::Frame;
use crate::pacing::Pacing;
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::auth::Grants;
use crate::broker::recent::{self, Answer, Tail};
use crate::broker::{Broker, BrokerError, History, HistoryRequest, PresenceEntry};
use crate::client::{ClientHandle, ConnId};
use crate::config::{ChannelOptions, Config};
use crate::delivery;
use crate::envelope;
use crate::metrics::Metrics;
use crate::protocol::{self, ErrorCode, Since};
use crate::proxy::{Proxy, ProxyError};
use crate::publication::{Kind, Position, Publication};
use crate::reads::{Fill, HistoryReads, Turn};
use crate::registry::Registry;
use crate::telemetry::Tracing;
use crate::users::Users;

/// Why a request was refused, as a client reads it in an `error` frame (or a
/// backend in an HTTP error body).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    /// A limit of this node rather than of the request: another node may serve it
    /// (HTTP 503 rather than 400 before an upgrade).
    pub(crate) node_full: bool,
    /// The application backend's own code, when it refused (4000 to 4999).
    pub(crate) app_code: Option<u16>,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            node_full: false,
            app_code: None,
        }
    }

    /// The `error` frame a client gets for it.
    pub(crate) fn frame(&self, id: Option<protocol::RequestId<'_>>) -> Frame {
        match self.app_code {
            Some(app_code) => protocol::encode_refused(id, app_code, &self.message),
            None => protocol::encode_error(id, self.code, &self.message),
        }
    }
}

impl From<ProxyError> for Refusal {
    fn from(e: ProxyError) -> Self {
        match e {
            ProxyError::Refused { code, message } => Refusal {
                app_code: Some(code),
                ..Refusal::new(ErrorCode::Refused, message)
            },
            ProxyError::Unavailable(_) => Refusal::new(ErrorCode::Unavailable, e.to_string()),
            ProxyError::BadAnswer => Refusal::new(ErrorCode::Internal, e.to_string()),
        }
    }
}

impl From<BrokerError> for Refusal {
    fn from(e: BrokerError) -> Self {
        let code = match e {
            BrokerError::NotDurable { .. } => ErrorCode::NotDurable,
            BrokerError::Timeout(_) | BrokerError::Unavailable(_) => ErrorCode::Unavailable,
        };
        Refusal::new(code, e.to_string())
    }
}

/// A subscription made in the registry and the broker, not yet live for its client
/// (see [`Hub::go_live`]).
#[derive(Debug)]
#[must_use = "a subscription to a history channel delivers nothing until go_live"]
pub(crate) struct Subscribed {
    channel: String,
    /// The channel's position when the subscription went live (history channels).
    position: Option<Position>,
    /// Whether the client's `since` was recovered, when it gave one.
    recovered: Option<bool>,
    /// The frames of what the client missed, oldest first (only when recovered).
    replay: Vec<Frame>,
}

impl Subscribed {
    /// The channel.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// The position the ack carries, on channels with history.
    pub(crate) fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    /// Whether recovery succeeded, when it was asked for.
    pub(crate) fn recovered(&self) -> Option<bool> {
        self.recovered
    }
}

/// Channels and clients of one node.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) config: Arc<Config>,
    pub(crate) node_id: String,
    pub(crate) registry: Registry,
    pub(crate) broker: Broker,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tracing: Tracing,
    /// The node's one shutdown signal; cancelled means draining.
    pub(crate) shutdown: CancellationToken,
    /// Stops the broker's tasks once the drain is over (see `node`).
    pub(crate) broker_stop: CancellationToken,
    /// Clients' history reads running at once (`--max-history-reads`).
    pub(crate) reads: HistoryReads,
    /// The application backend's proxies.
    pub(crate) proxy: Proxy,
    /// This node's connections by user (the server API's commands reach them here).
    pub(crate) users: Arc<Users>,
    /// The interval WebSocket writers keep between writes, following the load.
    pub(crate) pacing: Pacing,
}

impl Hub {
    /// Whether the node is draining (it then refuses new connections).
    pub(crate) fn is_draining(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Checks that a connection may add subscriptions to `channels` (which it does not
    /// have yet): its grants (unless `authorized`: the server or the application
    /// decided), `--max-subscriptions`, `--max-channels`. `conn` is `None` for a
    /// connection not yet opened.
    pub(crate) fn check_subscribe<'a>(
        &self,
        grants: &Grants,
        conn: Option<ConnId>,
        channels: impl IntoIterator<Item = &'a str> + Clone,
        authorized: bool,
    ) -> Result<(), Refusal> {
        if let Some(channel) = channels
            .clone()
            .into_iter()
            .find(|c| !authorized && !grants.may_subscribe(c))
        {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {channel}"),
            ));
        }
        let limits = &self.config.limits;
        let count = channels.clone().into_iter().count();
        let existing = conn.map_or(0, |id| self.registry.subscription_count(id));
        if existing + count > limits.max_subscriptions {
            return Err(Refusal::new(
                ErrorCode::LimitExceeded,
                format!(
                    "at most {} subscriptions per connection",
                    limits.max_subscriptions
                ),
            ));
        }
        let new_channels = channels
            .into_iter()
            .filter(|c| !self.registry.has_subscribers(c))
            .count();
        if new_channels > 0 && self.registry.stats().channels + new_channels > limits.max_channels {
            return Err(Refusal {
                node_full: true,
                ..Refusal::new(
                    ErrorCode::LimitExceeded,
                    format!("this node serves at most {} channels", limits.max_channels),
                )
            });
        }
        Ok(())
    }

    /// Checks that `since` may be used on `channel` (it needs history).
    pub(crate) fn check_since(&self, channel: &str) -> Result<(), Refusal> {
        if self.config.channel_options(channel).has_history() {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "channel {channel} keeps no history, so it cannot recover: `since` needs history-size > 0 for its namespace"
                ),
            ))
        }
    }

    /// Subscribes a connection to `channel`, recovering from `since`. `None` when it
    /// already was subscribed (which changes nothing). The subscription is made but
    /// delivers nothing until [`go_live`](Self::go_live). `authorized`: allowed
    /// whatever the grants (a server-side subscription, the subscribe proxy).
    pub(crate) async fn subscribe(
        &self,
        client: &ClientHandle,
        grants: &Grants,
        channel: &str,
        since: Option<Since>,
        authorized: bool,
    ) -> Result<Option<Subscribed>, Refusal> {
        if since.is_some() {
            self.check_since(channel)?;
        }
        if self.registry.is_subscribed(client.id(), channel) {
            // Already subscribed, and acknowledged as live: nothing changes.
            return Ok(None);
        }
        self.check_subscribe(grants, Some(client.id()), [channel], authorized)?;
        self.add(client, channel);
        if let Err(e) = self.broker.subscribe(channel).await {
            // Roll back, so the client's view (not subscribed) matches the node's.
            self.drop_subscription(client.id(), channel);
            return Err(e.into());
        }
        let budget = self.config.history.max_history_bytes;
        let subscribed = match self.read_position(channel, since, budget).await {
            Ok(subscribed) => subscribed,
            Err(e) => {
                self.drop_subscription(client.id(), channel);
                return Err(e.into());
            }
        };
        if let Err(e) = self.announce(client.id(), grants, channel).await {
            self.drop_subscription(client.id(), channel);
            return Err(e.into());
        }
        Ok(Some(subscribed))
    }

    /// A subscription is being made: its presence entry is added before the ack (or
    /// `welcome`), so the subscriber finds itself in presence.
    async fn announce(
        &self,
        conn: ConnId,
        grants: &Grants,
        channel: &str,
    ) -> Result<(), BrokerError> {
        if self.config.channel_options(channel).presence {
            let entry = self.presence_entry(conn, grants);
            self.broker.presence_add(channel, entry).await?;
        }
        Ok(())
    }

    /// Sends the `join` of a subscription, after its ack (or `welcome`) was queued:
    /// before anything the connection publishes next, since its requests are handled
    /// one at a time.
    pub(crate) async fn joined(&self, conn: ConnId, grants: &Grants, channel: &str) {
        if self.config.channel_options(channel).join_leave {
            let entry = self.presence_entry(conn, grants);
            self.publish_event(channel, Kind::Join, entry.json).await;
        }
    }

    /// A subscription ended: its presence entry is removed and its `leave` sent.
    async fn farewell(&self, conn: ConnId, grants: &Grants, channel: &str) {
        let options = self.config.channel_options(channel);
        if !options.presence && !options.join_leave {
            return;
        }
        let entry = self.presence_entry(conn, grants);
        if options.presence
            && let Err(e) = self.broker.presence_remove(channel, &entry.member).await
        {
            // The entry expires within --presence-ttl: this node no longer refreshes it.
            tracing::warn!(channel, error = %e, "could not remove a presence entry");
        }
        if options.join_leave {
            self.publish_event(channel, Kind::Leave, entry.json).await;
        }
    }

    /// This node's entry for a connection: `{"conn":..,"node":..,"user":..,"info":..}`.
    fn presence_entry(&self, conn: ConnId, grants: &Grants) -> PresenceEntry {
        let conn = conn.to_string();
        let json = protocol::presence_entry(
            &conn,
            &self.node_id,
            grants.user.as_deref(),
            grants.info.as_deref(),
        );
        PresenceEntry {
            member: format!("{}/{conn}", self.node_id),
            json: Bytes::from(json),
            user: grants.user.clone(),
        }
    }

    /// Sends a join or leave event to the channel on every node (never stored in
    /// history). A failure is logged: the subscription itself stands.
    async fn publish_event(&self, channel: &str, kind: Kind, entry: Bytes) {
        let event = Publication {
            kind,
            data: entry,
            from: None,
            position: None,
            traceparent: Bytes::new(),
            published_at_us: envelope::now_us(),
        };
        let options = ChannelOptions {
            history_size: 0,
            ..self.config.channel_options(channel)
        };
        if let Err(e) = self.broker.publish(channel, event, options).await {
            tracing::warn!(channel, error = %e, ?kind, "could not send a presence event");
        }
    }

    /// Subscribes a new connection to the channels it named at connect (checked
    /// before the upgrade), in parallel.
    pub(crate) async fn subscribe_at_connect(
        &self,
        client: &ClientHandle,
        grants: &Grants,
        channels: &[(String, Option<Since>)],
    ) -> Result<Vec<Subscribed>, BrokerError> {
        for (channel, _) in channels {
            self.add(client, channel);
        }
        let live =
            futures_util::future::join_all(channels.iter().map(|(c, _)| self.broker.subscribe(c)))
                .await;
        live.into_iter().collect::<Result<Vec<()>, _>>()?;
        // The connection's recoveries share one read's bound: together they are
        // queued for the client at once.
        let recovering = channels.iter().filter(|(_, s)| s.is_some()).count();
        let budget = self.config.history.max_history_bytes / recovering.max(1);
        let subscribed = futures_util::future::join_all(
            channels
                .iter()
                .map(|(c, since)| self.read_position(c, since.clone(), budget)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        futures_util::future::join_all(
            channels
                .iter()
                .map(|(c, _)| self.announce(client.id(), grants, c)),
        )
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
        Ok(subscribed)
    }

    /// Adds a subscriber to the registry, held back until [`go_live`](Self::go_live):
    /// so nothing reaches it before its ack or `welcome` (presence and history reads
    /// come in between), and on history channels, so its recovery is exact.
    fn add(&self, client: &ClientHandle, channel: &str) {
        self.registry.subscribe_held(client, channel);
    }

    /// Step 3 of a subscription: on a channel with history, read its position and
    /// what the client missed, in at most `budget` bytes (a recovery that needs more
    /// is not made: `recovered:false`).
    async fn read_position(
        &self,
        channel: &str,
        since: Option<Since>,
        budget: usize,
    ) -> Result<Subscribed, BrokerError> {
        let mut subscribed = Subscribed {
            channel: channel.to_owned(),
            position: None,
            recovered: None,
            replay: Vec::new(),
        };
        if !self.config.channel_options(channel).has_history() {
            return Ok(subscribed);
        }
        let top = match &since {
            // A position alone is a few bytes: it waits for no slot.
            None => {
                let request = HistoryRequest::position();
                let read = || self.broker.history(channel, request.clone());
                self.reads.read(channel, &request, false, read).await?.top
            }
            Some(since) => {
                let (top, replay) = self.recovery_read(channel, since, budget).await?;
                self.metrics.recovery(if replay.is_some() {
                    "recovered"
                } else {
                    "not_recovered"
                });
                subscribed.recovered = Some(replay.is_some());
                subscribed.replay = replay.unwrap_or_default();
                top
            }
        };
        subscribed.position = Some(top);
        Ok(subscribed)
    }

    /// Waits for a recovery's turn (see `reads`): before a subscription with
    /// `since` is made, so nothing is held back meanwhile. `None` when the
    /// connection is closing or the node draining meanwhile: then nothing is to be
    /// recovered (the caller gives up the subscription and, draining, closes with
    /// 1001). `release_handshake`: a WebSocket connecting, whose `101` the node
    /// holds back for its `welcome` (see `handshake_io`): if the turn is not free
    /// at once, the `101` goes out now, with a ping. In a storm the turns are a
    /// queue of seconds, and a client whose WebSocket library times out its
    /// handshake would give up and come back, feeding the storm.
    pub(crate) async fn recovery_turn(
        &self,
        client: &ClientHandle,
        release_handshake: bool,
    ) -> Option<Turn<'_>> {
        let mut turn = std::pin::pin!(self.reads.turn());
        if release_handshake {
            // Polled once: in the queue of turns from here on, in its place.
            if let Some(turn) = futures_util::FutureExt::now_or_never(&mut turn) {
                return Some(turn);
            }
            client.ping();
        }
        let mut closing = std::pin::pin!(client.closing());
        let mut draining = std::pin::pin!(client.draining());
        loop {
            tokio::select! {
                turn = &mut turn => return Some(turn),
                _ = &mut closing => return None,
                _ = &mut draining => return None,
                // Nothing reads the client's pongs while it waits: the wait is the
                // node's, not a sign the client is gone (the heartbeat would close
                // it after a ping interval without an answer).
                _ = tokio::time::sleep(self.config.limits.ping_interval / 2) => client.alive(),
            }
        }
    }

    /// Ends a recovery's turn once the writer has taken its replay: the connection's
    /// queue is under half its bounds (or closing), or `--broker-timeout` passed.
    pub(crate) async fn end_turn(&self, client: &ClientHandle, turn: Option<Turn<'_>>) {
        if turn.is_some() {
            let _ = tokio::time::timeout(self.config.broker.broker_timeout, client.room()).await;
        }
    }

    /// Reads what a client recovering `channel` from `since` missed (all or
    /// nothing, at most `--max-recovery` messages and `budget` bytes): the channel's
    /// position, and the frames of what the client missed if it can be recovered
    /// (`None`: `recovered:false`). The client is
    /// held back on the channel already (step 2), so it may be answered from
    /// anything read after that: the node's cache, a read of the tail that another
    /// recovery of the channel is still waiting for, or a read of its own (see
    /// `reads` for how reads wait for their turn and are shared).
    async fn recovery_read(
        &self,
        channel: &str,
        since: &Since,
        budget: usize,
    ) -> Result<(Position, Option<Vec<Frame>>), BrokerError> {
        let limit = self.config.history.max_recovery;
        let from = Position {
            epoch: since.epoch.clone(),
            offset: since.offset,
        };
        let from_cache = || {
            let run = self.broker.cached(channel, &from)?;
            answered(recent::answer(&from, &run, limit, budget))
        };
        if let Some(answer) = from_cache() {
            self.metrics.history_cache_hits.inc();
            return Ok(answer);
        }
        if let Some(share) = self.broker.caches(channel, &from) {
            // The newest messages a recovery could replay that the cache would
            // keep, read once while the channel's other recoveries wait. Unless its
            // bytes cut it short, what it cannot answer no read could: a client's
            // read takes at most `limit` messages (and Redis keeps at most
            // history-size) of at most --max-history-bytes (its `budget` is a
            // share of that).
            let kept = self.config.channel_options(channel).history_size;
            let tail = HistoryRequest {
                since: None,
                limit: limit.min(kept),
                all_or_nothing: false,
                subscribing: true,
                max_bytes: Some(self.config.history.max_history_bytes.min(share)),
            };
            let read = || async {
                // Filled meanwhile (between the look above and this turn).
                if let Some(run) = self.broker.cached(channel, &from)
                    && !matches!(recent::answer(&from, &run, limit, budget), Answer::Unknown)
                {
                    self.metrics.history_cache_hits.inc();
                    return Ok(run);
                }
                let read = self.broker.history(channel, tail.clone()).await?;
                self.metrics.history_cache_fills.inc();
                // Framed once, for the cache and for every client it answers.
                let run = Tail::read(channel, &read);
                self.broker.backfill(channel, &run);
                Ok(run)
            };
            match self.reads.fill(channel, read).await {
                // Read after this client was held back: its answer stands.
                Fill::Led(run) => {
                    let run = run?;
                    let truncated = run.truncated;
                    let top = run.top.clone();
                    if let Some(answer) = answered(recent::answer(&from, &run, limit, budget)) {
                        return Ok(answer);
                    }
                    // Not from the tail, which holds every message Redis keeps
                    // that a recovery may replay: not recoverable.
                    if !truncated {
                        return Ok((top, None));
                    }
                    // Cut short by the bytes the cache keeps: its own read.
                }
                // Maybe read before: the cache it filled answers, or a read of
                // this client's own range.
                Fill::Joined => {
                    if let Some(answer) = from_cache() {
                        self.metrics.history_cache_hits.inc();
                        return Ok(answer);
                    }
                }
            }
        }
        let request = HistoryRequest {
            since: Some((since.epoch.clone(), since.offset)),
            limit,
            all_or_nothing: true,
            subscribing: true,
            max_bytes: Some(budget),
        };
        let read = || self.broker.history(channel, request.clone());
        let history = self.reads.read(channel, &request, true, read).await?;
        let replay = recover(since, &history).map(|publications| {
            publications
                .iter()
                .map(|p| delivery::frame(channel, p))
                .collect()
        });
        Ok((history.top, replay))
    }

    /// Step 4: queues what the client missed, then `ack` (if any), then the
    /// held-back frames the replay did not contain; from then on the subscription
    /// is live.
    pub(crate) fn go_live(
        &self,
        client: &ClientHandle,
        subscribed: Subscribed,
        ack: Option<Frame>,
    ) {
        let mut frames = subscribed.replay;
        let replayed = frames.len();
        let bytes: usize =
            frames.iter().map(|f| f.len()).sum::<usize>() + ack.as_ref().map_or(0, |a| a.len());
        frames.extend(ack);
        let released = self.registry.release(
            client,
            &subscribed.channel,
            subscribed.position.as_ref(),
            frames,
        );
        self.metrics
            .messages_delivered
            .inc_by((replayed + released) as u64);
        self.metrics.bytes_sent.inc_by(bytes as u64);
    }

    /// Removes one subscription (no effect if there was none): from the registry,
    /// then from presence, with a `leave`.
    pub(crate) async fn unsubscribe(&self, conn: ConnId, grants: &Grants, channel: &str) {
        if self.drop_subscription(conn, channel) {
            self.farewell(conn, grants, channel).await;
        }
    }

    /// Removes a subscription from the registry only (a rollback, or the first step
    /// of an unsubscribe); returns whether there was one.
    fn drop_subscription(&self, conn: ConnId, channel: &str) -> bool {
        match self.registry.unsubscribe(conn, channel) {
            None => false,
            Some(emptied) => {
                if emptied {
                    self.broker.release(channel);
                }
                true
            }
        }
    }

    /// Removes a connection and all its subscriptions, then its presence entries,
    /// with a `leave` on each channel that sends them.
    pub(crate) async fn disconnect(&self, conn: ConnId, grants: &Grants) {
        let channels = self.registry.channels_of(conn);
        for channel in self.registry.deregister(conn) {
            self.broker.release(&channel);
        }
        futures_util::future::join_all(
            channels
                .iter()
                .map(|channel| self.farewell(conn, grants, channel)),
        )
        .await;
    }

    /// Up to `--max-presence` entries of a channel's presence, cluster-wide, and how
    /// many there are. Needs the permission to subscribe, or a subscription
    /// (`subscribed`: one the server or the subscribe proxy allowed counts).
    pub(crate) async fn presence(
        &self,
        grants: &Grants,
        channel: &str,
        subscribed: bool,
    ) -> Result<Vec<Bytes>, Refusal> {
        self.check_presence(grants, channel, subscribed)?;
        let max = self.config.presence.max_presence;
        Ok(self.broker.presence(channel, max).await?.0)
    }

    /// Clients and distinct users of a channel's presence. Needs the permission to
    /// subscribe, or a subscription.
    pub(crate) async fn presence_stats(
        &self,
        grants: &Grants,
        channel: &str,
        subscribed: bool,
    ) -> Result<(usize, usize), Refusal> {
        self.check_presence(grants, channel, subscribed)?;
        Ok(self.broker.presence_stats(channel).await?)
    }

    fn check_presence(
        &self,
        grants: &Grants,
        channel: &str,
        subscribed: bool,
    ) -> Result<(), Refusal> {
        if !subscribed && !grants.may_subscribe(channel) {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("not allowed to see who is in {channel}"),
            ));
        }
        if !self.config.channel_options(channel).presence {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!(
                    "channel {channel} keeps no presence (presence = true for its namespace turns it on)"
                ),
            ));
        }
        Ok(())
    }

    /// Publishes `data` to `channel` on every node (with `from` when given), inside a
    /// publish span continuing `traceparent` when given; counts the outcome. Returns
    /// the message's offset on channels with history. Used by WebSocket clients and
    /// the API, after their own permission checks.
    pub(crate) async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        from: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<Option<u64>, BrokerError> {
        let span = self.tracing.publish(channel, data.get().len(), traceparent);
        let context = span.as_ref().map_or("", |s| s.traceparent.as_str());
        let publication = Publication {
            kind: Kind::Message,
            data: Bytes::copy_from_slice(data.get().as_bytes()),
            from: from.map(|f| Bytes::copy_from_slice(f.as_bytes())),
            position: None,
            traceparent: Bytes::copy_from_slice(context.as_bytes()),
            published_at_us: envelope::now_us(),
        };
        let options = self.config.channel_options(channel);
        let publish = self.broker.publish(channel, publication, options);
        let published = match &span {
            Some(span) => span.broker_publish(&self.tracing, publish).await,
            None => publish.await,
        };
        if let Some(span) = span {
            span.end(published.as_ref().err().map(|e| e.to_string()).as_deref());
        }
        match &published {
            Ok(_) => {
                self.metrics.messages_published.inc();
            }
            // Published all the same: counted as such, and as not durable.
            Err(BrokerError::NotDurable { .. }) => {
                self.metrics.messages_published.inc();
                self.metrics.publish_error(ErrorCode::NotDurable.as_str());
            }
            Err(_) => self.metrics.publish_error(ErrorCode::Unavailable.as_str()),
        }
        published.map(|position| position.map(|p| p.offset))
    }

    /// Reads a channel's history: up to `limit` messages after `since`, or the latest
    /// ones. Needs the permission to subscribe, or a subscription (`subscribed`).
    pub(crate) async fn history(
        &self,
        grants: &Grants,
        channel: &str,
        since: Option<Since>,
        limit: Option<u64>,
        subscribed: bool,
    ) -> Result<History, Refusal> {
        if !subscribed && !grants.may_subscribe(channel) {
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("not allowed to read the history of {channel}"),
            ));
        }
        if !self.config.channel_options(channel).has_history() {
            return Err(Refusal::new(
                ErrorCode::BadRequest,
                format!("channel {channel} keeps no history (history-size is 0 for its namespace)"),
            ));
        }
        let max = self.config.history.max_history_limit;
        let limit = limit.map_or(max, |l| l.min(max as u64) as usize);
        let request = HistoryRequest {
            since: since.map(|s| (s.epoch, s.offset)),
            limit,
            all_or_nothing: false,
            subscribing: false,
            max_bytes: Some(self.config.history.max_history_bytes),
        };
        let read = || self.broker.history(channel, request.clone());
        Ok(self.reads.read(channel, &request, true, read).await?)
    }
}

/// A recovery's answer from a run (the node's cache, or a read of the channel's
/// tail): the channel's position and the frames of what the client missed, if
/// recoverable; `None` when only Redis can say.
fn answered(answer: Answer) -> Option<(Position, Option<Vec<Frame>>)> {
    match answer {
        Answer::Recovered(tail) => Some((tail.top.clone(), Some(tail.frames()))),
        Answer::Lost(tail) => Some((tail.top, None)),
        Answer::Unknown => None,
    }
}

/// What a client that saw `since` missed, if the history holds all of it and it
/// fit the read's bound in bytes: all or nothing, never part.
fn recover<'a>(since: &Since, history: &'a History) -> Option<&'a [Publication]> {
    let top = &history.top;
    if since.epoch != top.epoch || since.offset > top.offset || history.truncated {
        return None;
    }
    let missing = top.offset - since.offset;
    let complete = history.publications.len() as u64 == missing
        && history
            .publications
            .iter()
            .zip(since.offset + 1..)
            .all(|(p, expected)| p.offset() == Some(expected));
    complete.then_some(history.publications.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::Epoch;

    fn history(epoch: &str, top: u64, offsets: std::ops::Range<u64>) -> History {
        let epoch = Epoch::parse(epoch).unwrap();
        History {
            top: Position {
                epoch: epoch.clone(),
                offset: top,
            },
            publications: offsets
                .map(|offset| Publication {
                    kind: Kind::Message,
                    data: Bytes::from_static(b"1"),
                    from: None,
                    position: Some(Position {
                        epoch: epoch.clone(),
                        offset,
                    }),
                    traceparent: Bytes::new(),
                    published_at_us: 0,
                })
                .collect(),
            truncated: false,
        }
    }

    fn since(epoch: &str, offset: u64) -> Since {
        Since {
            epoch: Epoch::parse(epoch).unwrap(),
            offset,
        }
    }

    #[test]
    fn recovery_is_all_or_nothing() {
        assert_eq!(
            recover(&since("e", 40), &history("e", 42, 41..43)).map(|r| r.len()),
            Some(2)
        );
        assert_eq!(
            recover(&since("e", 42), &history("e", 42, 1..1)).map(|r| r.len()),
            Some(0)
        );
        assert!(
            recover(&since("old", 40), &history("e", 42, 41..43)).is_none(),
            "epoch"
        );
        assert!(
            recover(&since("e", 40), &history("e", 42, 42..43)).is_none(),
            "trimmed"
        );
        assert!(
            recover(&since("e", 43), &history("e", 42, 1..1)).is_none(),
            "ahead"
        );
        assert!(
            recover(&since("e", 10), &history("e", 42, 1..1)).is_none(),
            "too many"
        );
    }
}
