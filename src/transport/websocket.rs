//! The WebSocket transport: a session over an upgraded connection.
//!
//! [`Upgrade`] makes the connection (the handshake's checks, the `101` with the
//! subprotocol and the compression agreed); then, in the connection's one task, the
//! reader turns messages into [`Inbound`] requests for the session, and the writer
//! drains the connection's bounded queue into the socket: every queued frame (compressed
//! where the connection negotiated it, see `transport::deflate`) framed into one
//! buffer (`wire`) and written at once (`socket`), then the close frame the
//! connection's [`CloseReason`] calls for.

mod socket;
mod upgrade;
mod wire;

pub(crate) use socket::Gate;
pub(crate) use upgrade::Upgrade;

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, Utf8Bytes};

use crate::client::{ClientHandle, ClientQueue, CloseReason, Next};
use crate::hub::Hub;
use crate::protocol::Since;
use crate::session::{Identity, Inbound, Session};
use crate::transport::deflate::{Compressor, InflateError};
use socket::{ReadHalf, WriteHalf};

/// How long to wait for the client's close frame after sending ours: a well-behaved
/// client answers at once; a dead one must not hold the session (or the drain).
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(2);
/// A connection whose queue holds fewer frames than this is not paced: pacing keeps
/// what arrives during an interval in the queue, and a small queue has no room for
/// that and for a writer that is late on a busy machine (it would be closed as a
/// slow consumer for the node's own delay).
const PACED_QUEUE_FRAMES: usize = 16;
/// A writer keeps its batch buffer between batches unless a burst grew it past
/// this many frames.
const SPARE_BATCH_CAPACITY: usize = 64;

/// Serves one upgraded connection until it ends. `channels` (with the positions to
/// recover from) were checked before the upgrade. `compressor`: the connection
/// negotiated permessage-deflate (its socket then inflates what the client
/// compressed).
///
/// One future, for the connection's one task: the session reads (and handles the
/// client's requests) and the writer writes, side by side (`join`), each polled
/// when it is woken. Not an `async fn`, and the socket is split here: the task
/// holds this future for hours, and an async wrapper (or the socket as an argument)
/// would keep dead copies of the arguments in it.
fn run<S>(
    socket: WebSocketStream<Gate<S>>,
    hub: Arc<Hub>,
    channels: Vec<(String, Option<Since>)>,
    identity: Identity,
    compressor: Option<Compressor>,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (session, queue) = Session::open(hub, identity);
    let span = session.span();
    let (stream, sink) = socket::split(socket);
    let writer = write_loop(
        sink,
        queue,
        session.client().clone(),
        session.hub().clone(),
        compressor,
    );
    // Chained, not an `async` block around `serve`: a block would keep the
    // session's arguments, moved into `serve`, as dead copies for the life of the
    // connection (a few hundred bytes each).
    let inbound = stream.map(inbound);
    let served = session
        .serve(channels, inbound, writer, None)
        .then(|(reason, inbound)| close_reply(reason, inbound.into_inner()));
    crate::session::in_span(span, served)
}

/// After our close frame, gives the client a moment to answer it, so the TCP
/// connection ends cleanly after it has read everything we sent.
async fn close_reply<S>(reason: CloseReason, mut stream: ReadHalf<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if reason.code().is_some() {
        let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
            while let Some(Ok(msg)) = stream.next().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// What a WebSocket message means to the session.
fn inbound(message: Result<Message, tungstenite::Error>) -> Inbound {
    match message {
        Ok(Message::Text(text)) => Inbound::Request(text),
        Ok(Message::Binary(_)) => Inbound::End(CloseReason::Binary),
        Ok(Message::Close(_)) => Inbound::End(CloseReason::PeerClosed),
        Ok(Message::Ping(_) | Message::Pong(_)) => Inbound::Alive,
        // tungstenite never reads a raw frame; one would be a bug, not a client's.
        Ok(Message::Frame(_)) => Inbound::End(CloseReason::ProtocolError),
        Err(e) => Inbound::End(classify_read_error(e)),
    }
}

/// Maps a read error to the reason (and so the close code) it deserves.
fn classify_read_error(error: tungstenite::Error) -> CloseReason {
    match error {
        tungstenite::Error::Capacity(_) => CloseReason::TooLarge,
        tungstenite::Error::Utf8(_) => CloseReason::InvalidUtf8,
        // A peer that vanished without a close handshake is gone, not rude.
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => CloseReason::PeerGone,
        tungstenite::Error::Protocol(_) => CloseReason::ProtocolError,
        // A compressed message the socket refused to inflate.
        tungstenite::Error::Io(e) => match InflateError::of(&e) {
            Some(InflateError::TooLarge { .. }) => CloseReason::TooLarge,
            Some(InflateError::Invalid | InflateError::Interleaved) => CloseReason::ProtocolError,
            None => CloseReason::PeerGone,
        },
        _ => CloseReason::PeerGone,
    }
}

/// Drains the outbound queue into the socket until the connection closes, then
/// sends the close frame its reason calls for. Node shutdown reaches the writer as a
/// close (the reader turns it into `CloseReason::Shutdown`), pings as a request
/// from the node's heartbeat.
///
/// Not an `async fn` (which would keep a second copy of its arguments): every
/// connection's task holds this future, and what it keeps while it waits for
/// frames is most of its size; a write that has to wait, pacing and the goodbye
/// are boxed, and only while they last.
#[allow(clippy::manual_async_fn)]
fn write_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut sink: WriteHalf<S>,
    mut queue: ClientQueue,
    client: ClientHandle,
    // The node, for its write timeout, pacing and write counter: one pointer in
    // every connection's writer rather than copies of each.
    hub: Arc<Hub>,
    compressor: Option<Compressor>,
) -> impl Future<Output = ()> {
    async move {
        // Swapped with the queue on every batch, so a busy connection allocates
        // nothing.
        let mut batch = VecDeque::new();
        // When the last batch was written (`--write-pacing`), if this connection
        // is paced.
        let mut last_write: Option<tokio::time::Instant> = None;
        loop {
            let written = match queue.next(&mut batch).await {
                Next::Close => break,
                Next::Ping => write_within(&client, &hub, sink.ping()).await,
                Next::Frames => {
                    if !queue.reply_taken()
                        && let Some(due) = last_write.map(|at| at + hub.pacing.current())
                        && due > tokio::time::Instant::now()
                    {
                        // Messages keep coming: wait out the pacing interval (or
                        // until the queue is half full, or closing) and write
                        // everything queued meanwhile at once. Boxed: only a paced
                        // connection needs the timer's space, and only while it
                        // waits.
                        Box::pin(async {
                            tokio::select! {
                                _ = tokio::time::sleep_until(due) => {}
                                _ = queue.filling() => {}
                            }
                        })
                        .await;
                        queue.append_to(&mut batch);
                    } else if batch.len() > 1 {
                        // Frames piled up while we were away: the node is behind.
                        // Let the fan-out run once more and take what it adds, so
                        // that a behind node writes fewer, larger batches (each
                        // write costs the same kernel work whatever its size)
                        // instead of falling further behind. An unloaded
                        // connection (one frame) does not wait.
                        tokio::task::yield_now().await;
                        queue.append_to(&mut batch);
                    }
                    if client.close_reason() == Some(CloseReason::SlowConsumer) {
                        // It fell behind while the writer waited: its backlog is the
                        // problem itself, dropped as `last_frames` drops the rest
                        // (on a full socket, writing it first would run into the
                        // write timeout, and the 1013 would never go out).
                        break;
                    }
                    // Everything queued goes out, in writes of at most `WRITE_CHUNK`
                    // bytes (one, nearly always); its bytes count against the
                    // connection's bound until written.
                    let mut written;
                    loop {
                        let (take, bytes) = super::next_piece(&batch);
                        let (out, saved) =
                            frame_all(batch.drain(..take), bytes, compressor.as_ref());
                        if saved > 0
                            && let Some(compressor) = &compressor
                        {
                            compressor.saved(saved);
                        }
                        written = write_within(&client, &hub, sink.write_frames(out)).await;
                        queue.written(bytes);
                        hub.metrics.client_writes.inc();
                        if !written || batch.is_empty() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    batch.clear();
                    if paced(&hub, &client) {
                        last_write = Some(tokio::time::Instant::now());
                    }
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
                    // What was queued before the close goes out first (see
                    // `ClientQueue::last_frames`).
                    let last = queue.last_frames(reason);
                    if !last.is_empty() {
                        let bytes = last.iter().map(|f| f.len()).sum();
                        let (out, _) = frame_all(last.into_iter(), bytes, compressor.as_ref());
                        sink.write_frames(out).await?;
                    }
                    let frame = CloseFrame {
                        code: code.into(),
                        reason: Utf8Bytes::from_static(reason.as_str()),
                    };
                    sink.send(Message::Close(Some(frame))).await
                }
                // The socket queued its reply to the client's close frame; flush it
                // out.
                None if reason == CloseReason::PeerClosed => sink.flush().await,
                None => Ok(()),
            }
        };
        // Boxed: only a closing connection needs the space of this future.
        let limit = hub.config.limits.write_timeout;
        let _ = Box::pin(tokio::time::timeout(limit, goodbye)).await;
    }
}

/// Whether the connection's writes are paced (`--write-pacing`): its queue has room
/// for what arrives during an interval (see `PACED_QUEUE_FRAMES`).
fn paced(hub: &Hub, client: &ClientHandle) -> bool {
    !hub.config.limits.write_pacing_busy().is_zero() && client.bounds().frames >= PACED_QUEUE_FRAMES
}

/// Frames `frames` (of `bytes` bytes of text) one after the other into one buffer,
/// each compressed when the connection negotiated it and it shrinks; also returns
/// the bytes compression saved. The buffer is made for the batch and freed after
/// it: an idle connection keeps none.
fn frame_all(
    frames: impl Iterator<Item = crate::frame::Frame>,
    bytes: usize,
    compressor: Option<&Compressor>,
) -> (Vec<u8>, usize) {
    let (count, _) = frames.size_hint();
    let mut out = Vec::with_capacity(bytes + count * wire::MAX_HEADER);
    let mut saved = 0;
    for frame in frames {
        match compressor.and_then(|c| c.compress(&frame)) {
            Some(payload) => {
                saved += frame.len().saturating_sub(payload.len());
                wire::put_frame(&mut out, wire::TEXT_COMPRESSED, &payload);
            }
            None => wire::put_frame(&mut out, wire::TEXT, frame.as_str().as_bytes()),
        }
    }
    (out, saved)
}

/// Runs one write, bounded by the write timeout (`--write-timeout`); records why
/// the connection must close if it failed. Returns whether the connection is still
/// writable.
///
/// Most writes complete on their first poll (the socket has room): that poll is
/// made in place, and only a write that has to wait is boxed with its timer, so
/// that neither takes space in every connection's task. Not an `async fn`, which
/// would keep the write twice.
#[allow(clippy::manual_async_fn)]
fn write_within<'a, W>(
    client: &'a ClientHandle,
    hub: &'a Hub,
    mut write: W,
) -> impl Future<Output = bool> + 'a
where
    W: Future<Output = Result<(), tungstenite::Error>> + Unpin + 'a,
{
    async move {
        let result = if let Poll::Ready(result) =
            std::future::poll_fn(|cx| Poll::Ready(write.poll_unpin(cx))).await
        {
            Ok(result)
        } else {
            let limit = hub.config.limits.write_timeout;
            Box::pin(tokio::time::timeout(limit, write)).await
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
}
