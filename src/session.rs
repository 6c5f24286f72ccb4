//! One connection, whatever transport carries it: what it does with each request
//! (sub, unsub, pub, history, presence, ping, with the token's grants, rate limits,
//! hold-back and recovery) and its life from the connect-time subscriptions to the
//! cleanup.
//!
//! A transport (`transport::websocket`; SSE and HTTP streaming are siblings) moves
//! bytes only: it hands the session the requests it reads, as a stream of
//! [`Inbound`], and drains the connection's bounded queue ([`ClientQueue`]) into its
//! socket in a writer task of its own. The session handles one request at a time
//! (so one connection's publishes reach the broker in order), reads the next one only
//! while the queue has room, and `select!`s against the close signal, node shutdown
//! and the token's expiry. Whatever ends the connection records a [`CloseReason`]
//! (the first one wins); the transport's writer turns it into its own goodbye (a
//! close frame), and the session removes the connection from the registry.

use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tungstenite::Utf8Bytes;

use crate::auth::{Grants, RateLimiter};
use crate::client::{ClientHandle, ClientQueue, CloseReason, QueueBounds};
use crate::frame::Frame;
use crate::hub::{Hub, Refusal};
use crate::protocol::{self, ChannelPosition, ErrorCode, Request, RequestId, Since};
use crate::publication::Position;

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
    /// What the connection's token allows (without auth, one shared "anyone").
    grants: Arc<Grants>,
    /// Why a mutex: only the reader takes from it, but the session is shared by
    /// reference across `.await`s, which requires `Sync`.
    limiter: Mutex<RateLimiter>,
    /// New subscriptions (`sub`), each of which may fan a `join` out.
    sub_limiter: Mutex<RateLimiter>,
}

impl Session {
    /// Registers a new connection with the node: the session, and the receiving end
    /// of its outbound queue for the transport's writer.
    pub(crate) fn open(hub: Arc<Hub>, grants: Arc<Grants>) -> (Session, ClientQueue) {
        let limits = &hub.config.limits;
        let (client, queue) = hub.registry.register(QueueBounds {
            frames: limits.client_queue,
            bytes: limits.client_queue_bytes,
        });
        hub.metrics.connections_opened.inc();
        let limiter = Mutex::new(RateLimiter::new(limits.publish_rate, limits.publish_burst));
        let sub_limiter = Mutex::new(RateLimiter::new(
            limits.subscribe_rate,
            limits.subscribe_burst,
        ));
        let session = Session {
            hub,
            client,
            grants,
            limiter,
            sub_limiter,
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

    /// Serves the connection until it ends: subscribes `channels` (checked before
    /// the connection opened, with the positions to recover from) and sends
    /// `welcome` (with `stream_id`, the session id of a streaming transport), then
    /// handles the requests of `inbound`. Then leaves the registry and presence,
    /// waits for the transport's `writer` to say goodbye, and returns why the
    /// connection ended, with `inbound` for what the transport still reads (a
    /// WebSocket's close reply).
    pub(crate) async fn serve<I>(
        self,
        channels: Vec<(String, Option<Since>)>,
        mut inbound: I,
        writer: JoinHandle<()>,
        stream_id: Option<&str>,
    ) -> (CloseReason, I)
    where
        I: Stream<Item = Inbound> + Unpin,
    {
        let opened = std::time::Instant::now();
        tracing::info!(
            node = %self.hub.node_id,
            conn = self.client.id(),
            channels = ?channels.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
            "connection opened"
        );
        // Takes the channel list: nothing needs it after `welcome`.
        if Box::pin(self.subscribe_at_connect(channels, stream_id)).await {
            self.read_loop(&mut inbound).await;
        }

        // Leave the registry first (so no fan-out queues to a connection that is
        // going), then presence, with a `leave` where channels send them.
        self.hub.disconnect(self.client.id(), &self.grants).await;
        let _ = writer.await;
        let reason = self.client.close_reason().unwrap_or(CloseReason::PeerGone);
        self.hub.metrics.client_closed(reason);
        tracing::info!(
            node = %self.hub.node_id,
            conn = self.client.id(),
            reason = reason.metric_label(),
            code = reason.code(),
            duration_ms = opened.elapsed().as_millis() as u64,
            "connection closed"
        );
        (reason, inbound)
    }

    /// Subscribes the channels named at connect, sends `welcome` once they are live
    /// (with the position of each history channel), then what each recovered.
    /// Returns `false` (and closes the connection) if the broker cannot serve them.
    async fn subscribe_at_connect(
        &self,
        channels: Vec<(String, Option<Since>)>,
        stream_id: Option<&str>,
    ) -> bool {
        let subscribed = match self
            .hub
            .subscribe_at_connect(&self.client, &self.grants, &channels)
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
        for channel in &names {
            self.hub
                .joined(self.client.id(), &self.grants, channel)
                .await;
        }
        true
    }

    async fn read_loop(&self, inbound: &mut (impl Stream<Item = Inbound> + Unpin)) {
        // Created once: re-creating them on every request would re-register wakers.
        let mut closing = std::pin::pin!(self.client.closing());
        let mut shutdown = std::pin::pin!(self.hub.shutdown.cancelled());
        // Boxed, and only when the token expires: an unauthenticated connection
        // carries no timer.
        let mut expired: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> =
            match self.grants.expires_at() {
                Some(at) => Box::pin(tokio::time::sleep_until(at)),
                None => Box::pin(std::future::pending()),
            };
        loop {
            let next = tokio::select! {
                biased;
                _ = &mut closing => return,
                _ = &mut shutdown => {
                    self.client.close(CloseReason::Shutdown);
                    return;
                }
                _ = &mut expired => {
                    self.client.close(CloseReason::TokenExpired);
                    return;
                }
                // The next request is read once the replies to the earlier ones
                // left room in the queue: a client pipelining requests is slowed
                // down by its own unread socket, not closed as slow.
                next = async {
                    self.client.room().await;
                    inbound.next().await
                } => next,
            };
            // Anything from the peer proves it is alive, not only a pong.
            self.client.alive();
            match next {
                Some(Inbound::Request(text)) => {
                    self.hub.metrics.frames_received.inc();
                    self.hub.metrics.bytes_received.inc_by(text.len() as u64);
                    // Boxed: a request's broker futures are large, and an idle
                    // connection should not carry their space in its task.
                    Box::pin(self.handle_text(&text)).await
                }
                Some(Inbound::Alive) => {}
                Some(Inbound::End(reason)) => return self.client.close(reason),
                None => return self.client.close(CloseReason::PeerGone),
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
                self.hub
                    .unsubscribe(self.client.id(), &self.grants, &ch)
                    .await;
                Ok(id.map(protocol::encode_ack))
            }
            Request::Ping { .. } => Ok(Some(protocol::encode_pong(id))),
            Request::Presence { ch, .. } => self
                .hub
                .presence(&self.grants, &ch)
                .await
                .map(|entries| Some(protocol::encode_presence(id, &ch, &entries))),
            Request::PresenceStats { ch, .. } => self
                .hub
                .presence_stats(&self.grants, &ch)
                .await
                .map(|(clients, users)| {
                    Some(protocol::encode_presence_stats(id, &ch, clients, users))
                }),
            Request::History {
                ch, since, limit, ..
            } => self
                .hub
                .history(&self.grants, &ch, since, limit)
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
            Err(refusal) => self.send(protocol::encode_error(id, refusal.code, &refusal.message)),
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
            self.take_token(&self.sub_limiter, burst).map_err(|()| {
                Refusal::new(
                    ErrorCode::RateLimited,
                    format!("subscribing faster than {rate}/s (bursts of {burst})"),
                )
            })?;
        }
        let Some(subscribed) = self
            .hub
            .subscribe(&self.client, &self.grants, channel, since)
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
        self.hub
            .joined(self.client.id(), &self.grants, channel)
            .await;
        Ok(None)
    }

    async fn publish(
        &self,
        channel: &str,
        data: &RawValue,
        tp: Option<&str>,
    ) -> Result<Option<u64>, Refusal> {
        let hub = &self.hub;
        if !self.grants.may_publish(channel) {
            hub.metrics.publish_error(ErrorCode::Forbidden.as_str());
            return Err(Refusal::new(
                ErrorCode::Forbidden,
                format!("not allowed to publish to {channel}"),
            ));
        }
        let limits = &hub.config.limits;
        let (rate, burst) = (limits.publish_rate, limits.publish_burst);
        if self.take_token(&self.limiter, burst).is_err() {
            hub.metrics.publish_error(ErrorCode::RateLimited.as_str());
            return Err(Refusal::new(
                ErrorCode::RateLimited,
                format!("publishing faster than {rate}/s (bursts of {burst})"),
            ));
        }
        let from = if hub.config.auth.expose_publisher {
            self.grants.user.as_deref()
        } else {
            None
        };
        Ok(hub.publish(channel, data, from, tp).await?)
    }

    /// Takes a token from `limiter`; a client refused more than `burst` times in a
    /// row keeps going while refused — not a burst, abuse — and is closed (1008).
    fn take_token(&self, limiter: &Mutex<RateLimiter>, burst: u32) -> Result<(), ()> {
        let taken = limiter.lock().unwrap_or_else(|e| e.into_inner()).try_take();
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
        if self.client.send(frame) {
            self.hub.metrics.bytes_sent.inc_by(len);
        }
    }
}
