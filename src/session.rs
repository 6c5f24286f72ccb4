//! One WebSocket connection: a reader (requests in), a writer (frames out), and the
//! cleanup when either side ends.
//!
//! The writer task owns the socket's sink and drains the connection's bounded queue,
//! feeding every queued frame and flushing once. The reader handles one request at a
//! time (so one connection's publishes reach the broker in order) and `select!`s
//! against the close signal and node shutdown. Whatever ends the connection records
//! a [`CloseReason`]; the writer turns it into a close frame, and the reader removes
//! the connection from the registry.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tracing::Instrument;

use serde_json::value::RawValue;

use crate::auth::{Grants, RateLimiter};
use crate::client::{ClientHandle, ClientQueue, CloseReason, Next, QueueBounds};
use crate::hub::{Hub, Refusal};
use crate::protocol::{self, ChannelPosition, ErrorCode, Request, RequestId, Since};

/// How long to wait for the client's close frame after sending ours: a well-behaved
/// client answers at once; a dead one must not hold the session (or the drain).
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);
/// A writer keeps its batch buffer between batches unless a burst grew it past
/// this many frames (32 bytes each).
const SPARE_BATCH_CAPACITY: usize = 64;

/// Serves one upgraded connection until it ends. `channels` (with the positions to
/// recover from) were checked before the upgrade.
///
/// Not an `async fn`, and the socket is split here: a connection's task holds its
/// future for hours, and an async wrapper (or the socket as an argument) would keep
/// dead copies of the arguments in it.
pub(crate) fn run(
    socket: WebSocket,
    hub: Arc<Hub>,
    channels: Vec<(String, Option<Since>)>,
    grants: Arc<Grants>,
) -> impl Future<Output = ()> + Send {
    let limits = &hub.config.limits;
    let (client, queue) = hub.registry.register(QueueBounds {
        frames: limits.client_queue,
        bytes: limits.client_queue_bytes,
    });
    hub.metrics.connections_opened.inc();
    // A span for the connection's lifetime only when traces are exported: it costs
    // memory for as long as the connection lives, and logs name the connection anyway.
    let span = if hub.tracing.enabled() {
        tracing::info_span!("connection", node = %hub.node_id, conn = client.id())
    } else {
        tracing::Span::none()
    };
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(
        write_loop(sink, queue, client.clone(), hub.config.limits.write_timeout)
            .instrument(span.clone()),
    );
    serve(stream, writer, hub, client, channels, grants).instrument(span)
}

async fn serve(
    mut stream: SplitStream<WebSocket>,
    writer: tokio::task::JoinHandle<()>,
    hub: Arc<Hub>,
    client: ClientHandle,
    channels: Vec<(String, Option<Since>)>,
    grants: Arc<Grants>,
) {
    let opened = std::time::Instant::now();
    tracing::info!(
        node = %hub.node_id,
        conn = client.id(),
        channels = ?channels.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(),
        "connection opened"
    );

    let limits = &hub.config.limits;
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
    // Takes the channel list: nothing needs it after `welcome`.
    if Box::pin(session.subscribe_at_connect(channels)).await {
        session.read_loop(&mut stream).await;
    }

    // Leave the registry first (so no fan-out queues to a connection that is going),
    // then presence, with a `leave` where channels send them.
    session
        .hub
        .disconnect(session.client.id(), &session.grants)
        .await;
    let _ = writer.await;
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
    if reason.code().is_some() {
        // We sent a close frame: give the client a moment to answer it, so the TCP
        // connection ends cleanly after it has read everything we sent.
        let _ = Box::pin(tokio::time::timeout(CLOSE_REPLY_WAIT, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        }))
        .await;
    }
}

struct Session {
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
    /// Subscribes the channels named at connect, sends `welcome` once they are live
    /// (with the position of each history channel), then what each recovered.
    /// Returns `false` (and closes the connection) if the broker cannot serve them.
    async fn subscribe_at_connect(&self, channels: Vec<(String, Option<Since>)>) -> bool {
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
        let names: Vec<String> = channels.into_iter().map(|(c, _)| c).collect();
        let conn = self.client.id().to_string();
        self.send(protocol::encode_welcome(
            &self.hub.node_id,
            &conn,
            &names,
            &positions,
        ));
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

    async fn read_loop(&self, stream: &mut SplitStream<WebSocket>) {
        // Created once: re-creating them on every frame would re-register wakers.
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
            let msg = tokio::select! {
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
                msg = async {
                    self.client.room().await;
                    stream.next().await
                } => msg,
            };
            // Any frame proves the peer is alive, not only a pong.
            self.client.alive();
            match msg {
                Some(Ok(Message::Text(text))) => {
                    self.hub.metrics.frames_received.inc();
                    self.hub.metrics.bytes_received.inc_by(text.len() as u64);
                    // Boxed: a request's broker futures are large, and an idle
                    // connection should not carry their space in its task.
                    Box::pin(self.handle_text(&text)).await
                }
                Some(Ok(Message::Binary(_))) => return self.client.close(CloseReason::Binary),
                Some(Ok(Message::Close(_))) => return self.client.close(CloseReason::PeerClosed),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => return self.client.close(classify_read_error(e)),
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
    ) -> Result<Option<Utf8Bytes>, Refusal> {
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
            (Some(id), Some(position)) => Some(protocol::encode_subscribe_ack(
                id,
                position,
                subscribed.recovered(),
            )),
            (Some(id), None) => Some(protocol::encode_ack(id)),
            // Without an id there is no ack; a failed recovery must still be told.
            (None, Some(position)) if subscribed.recovered() == Some(false) => {
                Some(protocol::encode_gap(channel, position))
            }
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

    fn send(&self, frame: Utf8Bytes) {
        let len = frame.len() as u64;
        if self.client.send(frame) {
            self.hub.metrics.bytes_sent.inc_by(len);
        }
    }
}

/// Maps a read error to the reason (and so the close code) it deserves.
fn classify_read_error(error: axum::Error) -> CloseReason {
    match error.into_inner().downcast::<tungstenite::Error>() {
        Ok(e) => match *e {
            tungstenite::Error::Capacity(_) => CloseReason::TooLarge,
            tungstenite::Error::Utf8(_) => CloseReason::InvalidUtf8,
            // A peer that vanished without a close handshake is gone, not rude.
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => CloseReason::PeerGone,
            tungstenite::Error::Protocol(_) => CloseReason::ProtocolError,
            _ => CloseReason::PeerGone,
        },
        Err(_) => CloseReason::PeerGone,
    }
}

/// Drains the outbound queue into the socket until the connection closes, then
/// sends the close frame its reason calls for. Node shutdown reaches the writer as a
/// close (the reader turns it into `CloseReason::Shutdown`), pings as a request
/// from the node's heartbeat.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: ClientQueue,
    client: ClientHandle,
    limit: Duration,
) {
    // Swapped with the queue on every batch, so a busy connection allocates nothing.
    let mut batch = VecDeque::new();
    loop {
        let written = match queue.next(&mut batch).await {
            Next::Close => break,
            Next::Ping => {
                write_within(limit, &client, sink.send(Message::Ping(Default::default()))).await
            }
            Next::Frames => {
                if batch.len() > 1 {
                    // Frames piled up while we were away: the node is behind. Let
                    // the fan-out run once more and take what it adds, so that a
                    // behind node writes fewer, larger batches (each write costs
                    // the same kernel work whatever its size) instead of falling
                    // further behind. An unloaded connection (one frame) does
                    // not wait.
                    tokio::task::yield_now().await;
                    queue.append_to(&mut batch);
                }
                // Everything queued goes out with one flush; its bytes count
                // against the connection's bound until then.
                let bytes = batch.iter().map(|f| f.len()).sum();
                let write = async {
                    for frame in batch.drain(..) {
                        sink.feed(Message::Text(frame)).await?;
                    }
                    sink.flush().await
                };
                let written = write_within(limit, &client, write).await;
                queue.written(bytes);
                written
            }
        };
        if !written {
            break;
        }
        if batch.capacity() > SPARE_BATCH_CAPACITY {
            // A burst is over: do not keep its buffer for an idle connection.
            batch = VecDeque::new();
        }
    }

    let reason = client.close_reason().unwrap_or(CloseReason::PeerGone);
    let goodbye = async {
        match reason.code() {
            Some(code) => {
                // What was queued before the close (an error telling the client why,
                // the last messages before a drain) goes out first. A slow consumer's
                // backlog is the problem itself, so it is dropped.
                if reason != CloseReason::SlowConsumer {
                    for frame in queue.take_all() {
                        sink.feed(Message::Text(frame)).await?;
                    }
                }
                let frame = CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason.as_str()),
                };
                sink.send(Message::Close(Some(frame))).await
            }
            // The socket queued its reply to the client's close frame; flush it out.
            None if reason == CloseReason::PeerClosed => sink.flush().await,
            None => Ok(()),
        }
    };
    // Boxed: only a closing connection needs the space of this future.
    let _ = Box::pin(tokio::time::timeout(limit, goodbye)).await;
}

/// Runs one write, bounded by the write timeout; records why the connection must
/// close if it failed. Returns whether the connection is still writable.
///
/// Most writes complete on their first poll (the socket has room), so the timer is
/// only armed for a write that has to wait.
async fn write_within(
    limit: Duration,
    client: &ClientHandle,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> bool {
    let mut write = std::pin::pin!(write);
    let result = match futures_util::poll!(write.as_mut()) {
        std::task::Poll::Ready(result) => Ok(result),
        // Boxed so the timer's space is only taken while a write is stalled.
        std::task::Poll::Pending => Box::pin(tokio::time::timeout(limit, write.as_mut())).await,
    };
    match result {
        Ok(Ok(())) => true,
        Ok(Err(_)) => {
            client.close(CloseReason::PeerGone);
            false
        }
        Err(_) => {
            client.close(CloseReason::WriteTimeout);
            false
        }
    }
}
