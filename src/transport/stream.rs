//! The streaming transports: a session over an HTTP response that never ends, for
//! clients that cannot open a WebSocket (a proxy that breaks upgrades, a client
//! with no WebSocket library).
//!
//! - **SSE** (`GET /sse`, `text/event-stream`): every frame is an event whose
//!   `data` is the frame's JSON. Events that move the client in a history channel
//!   carry an `id` listing every position the client has reached
//!   (`<channel>:<epoch>:<offset>`, comma-separated), so a browser's `EventSource`,
//!   reconnecting on its own with `Last-Event-ID`, recovers what it missed with no
//!   library code. Heartbeats are comments.
//! - **HTTP streaming** (`POST /stream`, `application/x-ndjson`): every frame is a
//!   line of JSON; an empty line is a heartbeat.
//!
//! The client sends requests with `POST /stream/request?session=<id>` to any node
//! (`streams`); the replies come on the stream. The frames are the WebSocket's,
//! built once per node and shared: what a stream adds per connection is its
//! framing (`data: `, a line end), as a WebSocket adds its frame header.
//!
//! The writer hands the body one chunk per batch through a channel of one, so a
//! chunk is "written" once hyper took the previous one to the socket: a client that
//! does not read stalls the writer, which drops the connection after
//! `--write-timeout`, as for a WebSocket.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::ConnSlot;
use crate::client::{ClientHandle, ClientQueue, CloseReason, Next};
use crate::frame::Frame;
use crate::hub::Hub;
use crate::protocol::{self, Since};
use crate::publication::Position;
use crate::session::{Identity, Inbound, Session};
use crate::streams::Streams;

/// Requests of one streaming session waiting to be handled: the session takes one
/// at a time, and a client sends the next once it has the reply (the JS client
/// does), so a few cover pipelining; more are refused with 429.
const REQUEST_QUEUE: usize = 16;
/// A writer keeps its batch buffer between batches unless a burst grew it past
/// this many frames.
const SPARE_BATCH_CAPACITY: usize = 64;
/// How long a reconnecting `EventSource` waits (the `retry` field): soon, but not
/// in a tight loop against a node that just refused it.
const SSE_RETRY_MS: u32 = 1000;

/// How frames are written on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Server-Sent Events.
    EventStream,
    /// One JSON frame per line.
    NdJson,
}

/// Opens a streaming session and returns the response that carries it. The
/// channels (with the positions to recover from) were checked by the caller
/// against the grants of `identity` (when known yet); `slot` is the HTTP
/// connection's place among the pending ones.
pub(crate) fn open(
    hub: Arc<Hub>,
    streams: &Streams,
    sessions: &TaskTracker,
    slot: Option<ConnSlot>,
    channels: Vec<(String, Option<Since>)>,
    identity: Identity,
    format: Format,
) -> Response {
    let (session, queue) = Session::open(hub, identity);
    let span = session.span();
    let (id, requests) = streams.open(session.client().clone(), REQUEST_QUEUE);
    // The connection is a session now: it counts against `--max-connections`, no
    // longer among the pending HTTP connections that the oldest of is evicted.
    if let Some(slot) = &slot {
        slot.detach();
    }
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(1);
    let write_timeout = session.hub().config.limits.write_timeout;
    // Run beside the session, in its task.
    let writer = write_loop(
        body_tx,
        queue,
        session.client().clone(),
        write_timeout,
        format,
        slot,
    );
    let inbound = futures_util::stream::unfold(requests, |mut requests| async move {
        let request = requests.recv().await?;
        Some((Inbound::Request(request), requests))
    });
    let streams = streams.clone();
    sessions.spawn(
        async move {
            let inbound = std::pin::pin!(inbound);
            let _ = session.serve(channels, inbound, writer, Some(&id)).await;
            streams.close(&id);
        }
        .instrument(span),
    );
    let body = futures_util::stream::unfold(body_rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(chunk), rx))
    });
    let content_type = match format {
        Format::EventStream => "text/event-stream; charset=utf-8",
        Format::NdJson => "application/x-ndjson; charset=utf-8",
    };
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // nginx buffers responses unless told not to: a stream must flow.
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(body.boxed()),
    )
        .into_response()
}

/// Drains the connection's queue into the response body until the connection
/// closes, then writes the `close` frame its reason calls for and ends the body.
async fn write_loop(
    body: mpsc::Sender<Bytes>,
    mut queue: ClientQueue,
    client: ClientHandle,
    limit: Duration,
    format: Format,
    slot: Option<ConnSlot>,
) {
    let mut ids = EventIds::default();
    let mut batch = VecDeque::new();
    if format == Format::EventStream {
        let retry = Bytes::from(format!("retry: {SSE_RETRY_MS}\n\n"));
        if !send_within(limit, &body, &client, slot.as_ref(), retry).await {
            return;
        }
    }
    loop {
        let sent = match queue.next(&mut batch).await {
            Next::Close => break,
            Next::Ping => {
                let beat = match format {
                    Format::EventStream => Bytes::from_static(b": ping\n\n"),
                    Format::NdJson => Bytes::from_static(b"\n"),
                };
                let sent = send_within(limit, &body, &client, slot.as_ref(), beat).await;
                // The client cannot answer a ping: that the stream takes what is
                // written is the sign of life.
                if sent {
                    client.alive();
                }
                sent
            }
            Next::Frames => {
                if batch.len() > 1 {
                    // The node is behind: take what the fan-out adds meanwhile, for
                    // fewer, larger writes (as the WebSocket writer does).
                    tokio::task::yield_now().await;
                    queue.append_to(&mut batch);
                }
                // In pieces of at most `WRITE_CHUNK` bytes: the response's channel
                // and hyper each hold one piece the queue no longer counts, so a
                // client that stops reading makes the node hold little more than
                // its queue's bound (until `--write-timeout` drops it).
                let mut sent = true;
                while sent && !batch.is_empty() {
                    let (take, bytes) = super::next_piece(&batch);
                    let mut chunk = BytesMut::with_capacity(bytes + 16 * take);
                    for frame in batch.drain(..take) {
                        encode(&mut chunk, &frame, format, &mut ids);
                    }
                    sent = send_within(limit, &body, &client, slot.as_ref(), chunk.freeze()).await;
                    queue.written(bytes);
                }
                batch.clear();
                sent
            }
        };
        if !sent {
            break;
        }
        if batch.capacity() > SPARE_BATCH_CAPACITY {
            batch = VecDeque::new();
        }
    }

    let reason = client.close_reason().unwrap_or(CloseReason::PeerGone);
    if let Some(code) = reason.code() {
        let mut chunk = BytesMut::new();
        for frame in queue.last_frames(reason) {
            encode(&mut chunk, &frame, format, &mut ids);
        }
        let close = protocol::encode_close(code, reason.as_str(), reconnects(reason));
        encode(&mut chunk, &close, format, &mut ids);
        let _ = send_within(limit, &body, &client, slot.as_ref(), chunk.freeze()).await;
    }
    // Dropping the sender ends the response.
}

/// Whether a client closed for `reason` should connect again (to any node).
fn reconnects(reason: CloseReason) -> bool {
    match reason {
        // The application's own range: its upper half says "reconnect".
        CloseReason::Application(code) => code >= 4500,
        _ => matches!(
            reason,
            CloseReason::Shutdown
                | CloseReason::SlowConsumer
                | CloseReason::HoldBackOverflow
                | CloseReason::BrokerUnavailable
                | CloseReason::BackendUnavailable
                | CloseReason::PingTimeout
        ),
    }
}

/// Hands one chunk to the response body within the write timeout; records why the
/// connection must close if it could not. Returns whether the stream is writable.
async fn send_within(
    limit: Duration,
    body: &mpsc::Sender<Bytes>,
    client: &ClientHandle,
    slot: Option<&ConnSlot>,
    chunk: Bytes,
) -> bool {
    match tokio::time::timeout(limit, body.send(chunk)).await {
        Ok(Ok(())) => true,
        // The response was dropped: the client went away.
        Ok(Err(_)) => {
            client.close(CloseReason::PeerGone);
            false
        }
        Err(_) => {
            client.close(CloseReason::WriteTimeout);
            // hyper would wait for the socket forever: drop the connection.
            if let Some(slot) = slot {
                slot.evict();
            }
            false
        }
    }
}

/// Appends one frame in the stream's format. JSON never needs a raw line break
/// (inside strings they are escaped), so any in the text — insignificant
/// whitespace a publisher's `data` kept — becomes a space, and a frame stays one
/// SSE `data` line, one NDJSON line.
fn encode(out: &mut BytesMut, frame: &Frame, format: Format, ids: &mut EventIds) {
    if format == Format::EventStream {
        if ids.update(frame.positions()) {
            out.put_slice(b"id: ");
            ids.write(out);
            out.put_u8(b'\n');
        }
        out.put_slice(b"data: ");
    }
    let text = frame.as_str().as_bytes();
    if text.iter().any(|&b| b == b'\n' || b == b'\r') {
        out.extend(
            text.iter()
                .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
    } else {
        out.put_slice(text);
    }
    match format {
        Format::EventStream => out.put_slice(b"\n\n"),
        Format::NdJson => out.put_u8(b'\n'),
    }
}

/// The positions a stream's client has reached, one per history channel, as the
/// SSE event id says them.
#[derive(Debug, Default)]
struct EventIds {
    positions: Vec<(String, Position)>,
}

impl EventIds {
    /// Takes the positions a frame brings the client to; whether any changed.
    fn update(&mut self, reached: &[(String, Position)]) -> bool {
        let mut changed = false;
        for (channel, position) in reached {
            match self.positions.iter_mut().find(|(c, _)| c == channel) {
                Some((_, known)) if known == position => {}
                Some((_, known)) => {
                    *known = position.clone();
                    changed = true;
                }
                None => {
                    self.positions.push((channel.clone(), position.clone()));
                    changed = true;
                }
            }
        }
        changed
    }

    fn write(&self, out: &mut BytesMut) {
        for (i, (channel, position)) in self.positions.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            // A user-limited channel's name has commas, which separate the
            // positions: written as `%2C` (`%` is in no channel name).
            for (j, part) in channel.split(',').enumerate() {
                if j > 0 {
                    out.put_slice(b"%2C");
                }
                out.put_slice(part.as_bytes());
            }
            out.put_u8(b':');
            out.put_slice(position.epoch.as_str().as_bytes());
            out.put_u8(b':');
            out.put_slice(position.offset.to_string().as_bytes());
        }
    }
}

/// The positions a `Last-Event-ID` names (`<channel>:<epoch>:<offset>`, comma-
/// separated; a channel name may itself contain `:`), or why it is malformed.
pub(crate) fn parse_event_id(id: &str) -> Result<Vec<(String, Since)>, String> {
    let mut out = Vec::new();
    for item in id.split(',').filter(|s| !s.is_empty()) {
        let mut parts = item.rsplitn(3, ':');
        let (Some(offset), Some(epoch), Some(channel)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{item:?} is not <channel>:<epoch>:<offset>"));
        };
        let channel = channel.replace("%2C", ",");
        protocol::validate_channel(&channel).map_err(|e| format!("{channel:?}: {e}"))?;
        let since = Since::parse_pair(epoch, offset).map_err(|e| format!("{item:?}: {e}"))?;
        out.push((channel, since));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::Epoch;

    fn epoch(text: &str) -> Epoch {
        Epoch::parse(text).expect("valid epoch")
    }

    fn position(e: &str, offset: u64) -> Position {
        Position {
            epoch: epoch(e),
            offset,
        }
    }

    #[test]
    fn events_carry_every_position_reached_and_parse_back() {
        let mut ids = EventIds::default();
        let mut out = BytesMut::new();
        let frame = Frame::from(r#"{"op":"pub","ch":"a:b","offset":3}"#.to_owned())
            .with_positions(vec![("a:b".into(), position("e1", 3))]);
        encode(&mut out, &frame, Format::EventStream, &mut ids);
        let frame = Frame::from(r#"{"op":"pub","ch":"c","offset":9}"#.to_owned())
            .with_positions(vec![("c".into(), position("e2", 9))]);
        encode(&mut out, &frame, Format::EventStream, &mut ids);
        // A frame that moves nothing carries no id: the last one stands.
        encode(
            &mut out,
            &Frame::from("{\"op\":\"pong\"}"),
            Format::EventStream,
            &mut ids,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            text,
            "id: a:b:e1:3\ndata: {\"op\":\"pub\",\"ch\":\"a:b\",\"offset\":3}\n\n\
             id: a:b:e1:3,c:e2:9\ndata: {\"op\":\"pub\",\"ch\":\"c\",\"offset\":9}\n\n\
             data: {\"op\":\"pong\"}\n\n"
        );
        let mut ids = EventIds::default();
        ids.update(&[("dm:x#ada,bo".into(), position("e3", 4))]);
        let mut written = BytesMut::new();
        ids.write(&mut written);
        let written = std::str::from_utf8(&written).unwrap();
        assert_eq!(
            written, "dm:x#ada%2Cbo:e3:4",
            "commas of a user list escaped"
        );
        assert_eq!(parse_event_id(written).unwrap()[0].0, "dm:x#ada,bo");
        let parsed = parse_event_id("a:b:e1:3,c:e2:9").unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!((parsed[0].0.as_str(), parsed[0].1.offset), ("a:b", 3));
        assert_eq!(parsed[1].1.epoch.as_str(), "e2");
        for bad in ["a:3", "a b:e:1", "a:e:x", "a:e!:1"] {
            assert!(parse_event_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_frame_stays_one_line_whatever_whitespace_its_data_kept() {
        let mut ids = EventIds::default();
        let mut out = BytesMut::new();
        let frame = Frame::from("{\"op\":\"pub\",\n\"data\":{\r\n\"a\":1}}".to_owned());
        encode(&mut out, &frame, Format::NdJson, &mut ids);
        assert_eq!(&out[..], b"{\"op\":\"pub\", \"data\":{  \"a\":1}}\n");
    }
}
