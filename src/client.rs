//! The outbound side of one connection, as seen by everyone but its own reader and
//! writer: a bounded frame queue and a close signal.
//!
//! [`ClientHandle::send`] never waits: a full queue means the client is not keeping
//! up, and it is closed with 1013 rather than allowed to grow memory or to slow the
//! fan-out that serves every other client.
//!
//! The queue is bounded twice ([`QueueBounds`]): in frames (live traffic) and in
//! bytes, which count everything the connection holds for its client until the
//! writer handed it to the socket: queued frames, recoveries, answers, and the batch
//! being written. The connection's own reader does not push past half of either
//! bound ([`ClientHandle::room`]): a client pipelining requests is slowed down (its
//! socket is not read), never called slow for its own replies.
//!
//! The queue is a `VecDeque` behind a mutex rather than a channel: it allocates
//! nothing while a connection is idle (most are), the writer takes everything queued
//! in one lock to write it with one flush, and a push costs an uncontended lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;

use crate::frame::Frame;
use futures_util::task::AtomicWaker;

/// Node-local connection id.
pub type ConnId = u64;

/// Why a connection ends. The first reason recorded wins; it decides the close code
/// the writer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame.
    PeerClosed,
    /// The TCP connection broke or the stream ended without a close frame.
    PeerGone,
    /// The node is draining.
    Shutdown,
    /// The outbound queue filled up.
    SlowConsumer,
    /// A message above `--max-message-bytes`.
    TooLarge,
    /// A binary frame; the protocol is JSON text.
    Binary,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// A WebSocket protocol violation.
    ProtocolError,
    /// No pong arrived within a ping interval.
    PingTimeout,
    /// A write to the client did not complete within `--write-timeout`.
    WriteTimeout,
    /// The connect-time subscriptions could not be made live.
    BrokerUnavailable,
    /// The connection's token expired.
    TokenExpired,
    /// The client kept publishing while rate limited.
    RateLimited,
    /// More messages arrived while a subscription was recovering than its hold-back
    /// buffer takes (`--client-queue`); the client recovers again from its position.
    HoldBackOverflow,
    /// The application closed the connection (the connect proxy refused it, or
    /// `POST /api/disconnect`), with its code (4000 to 4999).
    Application(u16),
    /// The connection's token was revoked (`POST /api/revoke`).
    TokenRevoked,
    /// The application backend could not be asked (connect proxy unavailable).
    BackendUnavailable,
    /// The application backend's answer to the connect proxy was not understood.
    BackendError,
    /// Refused at connect: a channel it may not use, its user's connection limit.
    Refused,
}

impl CloseReason {
    /// The close code to send, or `None` when the peer is gone or already closed.
    pub fn code(self) -> Option<u16> {
        match self {
            CloseReason::PeerClosed | CloseReason::PeerGone | CloseReason::WriteTimeout => None,
            CloseReason::Shutdown => Some(1001),
            CloseReason::ProtocolError => Some(1002),
            CloseReason::TokenExpired
            | CloseReason::RateLimited
            | CloseReason::TokenRevoked
            | CloseReason::Refused => Some(1008),
            CloseReason::Application(code) => Some(code),
            CloseReason::BackendError => Some(1011),
            CloseReason::Binary => Some(1003),
            CloseReason::InvalidUtf8 => Some(1007),
            CloseReason::TooLarge => Some(1009),
            CloseReason::PingTimeout => Some(1011),
            CloseReason::SlowConsumer
            | CloseReason::BrokerUnavailable
            | CloseReason::BackendUnavailable
            | CloseReason::HoldBackOverflow => Some(1013),
        }
    }

    /// Label of the `reason` of `wsrelay_client_closes_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::PeerGone => "peer_gone",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TooLarge => "too_large",
            CloseReason::Binary => "binary",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::BrokerUnavailable => "broker_unavailable",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::HoldBackOverflow => "holdback_overflow",
            CloseReason::Application(_) => "application",
            CloseReason::TokenRevoked => "token_revoked",
            CloseReason::BackendUnavailable => "backend_unavailable",
            CloseReason::BackendError => "backend_error",
            CloseReason::Refused => "refused",
        }
    }

    /// Short label for the close frame and for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "client closed",
            CloseReason::PeerGone => "connection lost",
            CloseReason::Shutdown => "node shutting down",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::TooLarge => "message too large",
            CloseReason::Binary => "binary frames are not supported",
            CloseReason::InvalidUtf8 => "invalid UTF-8",
            CloseReason::ProtocolError => "protocol error",
            CloseReason::PingTimeout => "ping timeout",
            CloseReason::WriteTimeout => "write timeout",
            CloseReason::BrokerUnavailable => "broker unavailable",
            CloseReason::TokenExpired => "token expired",
            CloseReason::RateLimited => "rate limit exceeded",
            CloseReason::HoldBackOverflow => "too many messages during recovery",
            CloseReason::Application(_) => "closed by the application",
            CloseReason::TokenRevoked => "token revoked",
            CloseReason::BackendUnavailable => "application backend unavailable",
            CloseReason::BackendError => "application backend error",
            CloseReason::Refused => "refused",
        }
    }
}

/// The bounds of one connection's outbound queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueBounds {
    /// Most live frames queued (`--client-queue`); a recovery's frames come on top
    /// of it, bounded by `--max-recovery` and by `bytes`.
    pub frames: usize,
    /// Most bytes held for the client, whatever their kind (`--client-queue-bytes`).
    pub bytes: usize,
}

impl QueueBounds {
    /// Bounded in frames only (tests of the frame bound).
    pub fn frames(frames: usize) -> Self {
        QueueBounds {
            frames,
            bytes: usize::MAX,
        }
    }

    /// Whether a queue holding `frames` and `bytes` leaves the connection's own
    /// reader room for more replies: under half of each bound.
    fn has_room(&self, frames: usize, bytes: usize) -> bool {
        frames <= self.frames / 2 && bytes <= self.bytes / 2
    }
}

/// A cheap-to-clone handle to one connection's outbound queue.
#[derive(Debug, Clone)]
pub struct ClientHandle {
    shared: Arc<Shared>,
}

/// The receiving end of a connection's queue, owned by its writer.
#[derive(Debug)]
pub struct ClientQueue {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    id: ConnId,
    /// Why a std mutex: pushes and takes are a few instructions, never span an
    /// `.await`, and are almost never contended (one fan-out, one writer).
    queue: Mutex<Queue>,
    bounds: QueueBounds,
    /// The writer's waker: woken when the queue becomes non-empty or on close.
    writer: AtomicWaker,
    /// The reader's waker: woken on close, when the node drains, and after a write
    /// while it waits for room ([`ClientHandle::room`]). A waker rather than a
    /// `Notify`: the reader is the only one to wait, and a waker keeps nothing in
    /// its future while it waits (every connection's reader waits, always).
    reader: AtomicWaker,
    reason: OnceLock<CloseReason>,
    /// The reader waits for room: only then does a write wake it (a write costs no
    /// wake-up otherwise, which is nearly always).
    reader_waits: AtomicBool,
    /// The node is draining: the reader closes the connection (1001) before its
    /// next request ([`ClientHandle::drain`]).
    draining: AtomicBool,
    /// Bytes of the frames queued and of those the writer took but has not written
    /// yet: what the connection holds for its client. Added under the queue's
    /// lock; the writer subtracts what it wrote without taking the lock again (one
    /// atomic per write), which only ever makes a sender's check conservative.
    bytes: AtomicUsize,
    /// The writer should send a ping (set by the node's heartbeat).
    ping_due: AtomicBool,
    /// A ping was sent and nothing has come back from the peer since.
    pong_due: AtomicBool,
    /// A reply to the client's own request is queued: the writer writes it without
    /// waiting out its pacing interval (a client waiting for each ack would
    /// otherwise get one per interval).
    reply_due: AtomicBool,
}

/// The frames waiting for the writer.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Frame>,
    /// Frames of a recovery queued since the writer last took the queue: they do not
    /// count against the frame bound, which bounds live traffic (a recovery is
    /// bounded by `--max-recovery` and by the byte bound).
    allowance: usize,
}

impl Queue {
    fn take_into(&mut self, batch: &mut VecDeque<Frame>) {
        std::mem::swap(&mut self.frames, batch);
        self.allowance = 0;
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // The queue holds plain frames: a panic elsewhere cannot leave it torn.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientHandle {
    /// A handle and the receiving end of its queue.
    pub fn new(id: ConnId, bounds: QueueBounds) -> (ClientHandle, ClientQueue) {
        let shared = Arc::new(Shared {
            id,
            queue: Mutex::new(Queue::default()),
            bounds,
            writer: AtomicWaker::new(),
            reader: AtomicWaker::new(),
            reason: OnceLock::new(),
            reader_waits: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            bytes: AtomicUsize::new(0),
            ping_due: AtomicBool::new(false),
            pong_due: AtomicBool::new(false),
            reply_due: AtomicBool::new(false),
        });
        (
            ClientHandle {
                shared: shared.clone(),
            },
            ClientQueue { shared },
        )
    }

    /// The connection id.
    pub fn id(&self) -> ConnId {
        self.shared.id
    }

    /// The bounds of the connection's queue.
    pub fn bounds(&self) -> QueueBounds {
        self.shared.bounds
    }

    /// Queues a frame without waiting. Returns `false` if the frame was not queued:
    /// the connection is closing, or its queue is full (in frames or in bytes), in
    /// which case it is closed as a slow consumer.
    pub fn send(&self, frame: Frame) -> bool {
        if self.shared.reason.get().is_some() {
            return false;
        }
        let bounds = self.shared.bounds;
        let mut queue = self.shared.queue();
        let held = self.shared.bytes.load(Ordering::Relaxed);
        if queue.frames.len() >= bounds.frames + queue.allowance
            || held.saturating_add(frame.len()) > bounds.bytes
        {
            drop(queue);
            self.close(CloseReason::SlowConsumer);
            return false;
        }
        let len = frame.len();
        self.shared.bytes.fetch_add(len, Ordering::Relaxed);
        if queue.frames.capacity() == 0 {
            // Room for one frame at first (a `VecDeque` starts at four): most
            // connections are sent a frame at a time, and an idle one keeps this
            // buffer (swapped with the writer's). A busy one grows it once.
            queue.frames.reserve_exact(1);
        }
        queue.frames.push_back(frame);
        let frames = queue.frames.len();
        drop(queue);
        // A writer that found the queue non-empty takes everything; only the first
        // frame after a drain needs to wake it, and one that passes half of a
        // bound (a writer pacing its writes then stops waiting, see
        // `ClientQueue::filling`).
        let half_frames = frames == bounds.frames / 2 + 1;
        let half_bytes = held <= bounds.bytes / 2 && held.saturating_add(len) > bounds.bytes / 2;
        if frames == 1 || half_frames || half_bytes {
            self.shared.writer.wake();
        }
        true
    }

    /// Queues a reply to the client's own request (an ack, an answer, an error):
    /// as [`send`](Self::send), and written without waiting for the writer's
    /// pacing interval (`--write-pacing`), which batches the fan-out's frames.
    pub fn send_reply(&self, frame: Frame) -> bool {
        let queued = self.send(frame);
        if queued {
            self.shared.reply_due.store(true, Ordering::Relaxed);
            self.shared.writer.wake();
        }
        queued
    }

    /// Queues the frames of a recovery (replayed messages and the ack) without
    /// waiting and beyond the frame bound, which bounds live traffic: the recovery
    /// is bounded by `--max-recovery`, and the writer takes it in one batch. The
    /// byte bound holds: frames that would pass it are not queued, and the
    /// connection is closed as a slow consumer (its client left earlier frames
    /// unread). Returns whether they were queued.
    pub fn send_recovered(&self, frames: impl IntoIterator<Item = Frame>) -> bool {
        if self.shared.reason.get().is_some() {
            return false;
        }
        let frames: Vec<Frame> = frames.into_iter().collect();
        let bytes = frames.iter().map(|f| f.len()).sum::<usize>();
        let mut queue = self.shared.queue();
        let held = self.shared.bytes.load(Ordering::Relaxed);
        if held.saturating_add(bytes) > self.shared.bounds.bytes {
            drop(queue);
            self.close(CloseReason::SlowConsumer);
            return false;
        }
        let before = queue.frames.len();
        self.shared.bytes.fetch_add(bytes, Ordering::Relaxed);
        queue.allowance += frames.len();
        queue.frames.extend(frames);
        let added = queue.frames.len() - before;
        drop(queue);
        if added > 0 {
            // The client waits for its ack (or `welcome`) behind them.
            self.shared.reply_due.store(true, Ordering::Relaxed);
            self.shared.writer.wake();
        }
        true
    }

    /// Waits until the queue is under half of both its bounds (or the connection
    /// is closing): the reader calls it before each request, so the replies of a
    /// client that pipelines requests wait for the writer instead of filling the
    /// queue, and its unread socket slows it down. For the connection's reader,
    /// like [`closing`](Self::closing).
    pub fn room(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            // Registered first, then said, then looked: a write or a close after
            // the look wakes us. The writer subtracts before it looks at the flag
            // (all SeqCst): either it sees the flag and wakes us, or this look sees
            // what it wrote.
            self.shared.reader.register(cx.waker());
            if self.shared.reason.get().is_some() {
                return Poll::Ready(());
            }
            self.shared.reader_waits.store(true, Ordering::SeqCst);
            let frames = self.shared.queue().frames.len();
            let bytes = self.shared.bytes.load(Ordering::SeqCst);
            if self.shared.bounds.has_room(frames, bytes) {
                self.shared.reader_waits.store(false, Ordering::Relaxed);
                return Poll::Ready(());
            }
            Poll::Pending
        })
    }

    /// Asks the connection to close; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if self.shared.reason.set(reason).is_ok() {
            self.shared.reader.wake();
            self.shared.writer.wake();
        }
    }

    /// The node is draining: the connection's reader closes it with 1001 once it is
    /// between two requests (a request under way is answered first).
    pub fn drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        self.shared.reader.wake();
    }

    /// One heartbeat of the node: closes the connection if the previous ping went
    /// unanswered, otherwise asks the writer to send a ping.
    pub fn heartbeat(&self) {
        if self.shared.pong_due.swap(true, Ordering::Relaxed) {
            self.close(CloseReason::PingTimeout);
            return;
        }
        self.shared.ping_due.store(true, Ordering::Relaxed);
        self.shared.writer.wake();
    }

    /// Asks the writer to send a ping now, outside the heartbeat (which expects no
    /// answer to it): a WebSocket whose `welcome` must wait gets the handshake's
    /// held `101` with it (see `handshake_io`).
    pub fn ping(&self) {
        self.shared.ping_due.store(true, Ordering::Relaxed);
        self.shared.writer.wake();
    }

    /// The peer showed it is alive (any frame, not only a pong).
    pub fn alive(&self) {
        self.shared.pong_due.store(false, Ordering::Relaxed);
    }

    /// The reason the connection is closing, once one was given.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.shared.reason.get().copied()
    }

    /// Resolves once [`close`](Self::close) has been called. For the connection's
    /// reader (the one waker it keeps is the reader's).
    pub fn closing(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.shared.reader.register(cx.waker());
            match self.shared.reason.get() {
                Some(_) => Poll::Ready(()),
                None => Poll::Pending,
            }
        })
    }

    /// Resolves once [`drain`](Self::drain) has been called. For the connection's
    /// reader, like [`closing`](Self::closing).
    pub fn draining(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            self.shared.reader.register(cx.waker());
            match self.shared.draining.load(Ordering::SeqCst) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
    }
}

/// What the writer should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Write the frames now in the batch.
    Frames,
    /// Send a ping.
    Ping,
    /// Stop: the connection is closing.
    Close,
}

impl ClientQueue {
    /// Waits until there is something to write or the connection is closing. Frames
    /// are swapped into `batch` (which must be empty, and whose allocation the queue
    /// then reuses). Not an `async fn`, which would keep its arguments twice in
    /// the writer's future while it waits.
    pub fn next<'a>(
        &'a mut self,
        batch: &'a mut VecDeque<Frame>,
    ) -> impl Future<Output = Next> + 'a {
        debug_assert!(batch.is_empty());
        std::future::poll_fn(move |cx| {
            // Register first, then look: a push, ping or close after the look wakes us.
            self.shared.writer.register(cx.waker());
            if self.shared.reason.get().is_some() {
                return Poll::Ready(Next::Close);
            }
            if self.shared.ping_due.swap(false, Ordering::Relaxed) {
                return Poll::Ready(Next::Ping);
            }
            let mut queue = self.shared.queue();
            if queue.frames.is_empty() {
                return Poll::Pending;
            }
            // `reply_due` stays as it is: the writer asks (`reply_taken`) whether
            // this batch holds a reply before it paces the batch.
            queue.take_into(batch);
            Poll::Ready(Next::Frames)
        })
    }

    /// Resolves once the queue holds more than half of either bound, a reply to
    /// the client's request is queued, or the connection is closing: a writer
    /// pacing its writes (`--write-pacing`) waits for this or its interval,
    /// whichever comes first, so pacing never fills the queue of a client that
    /// keeps up, nor holds up the answer a client waits for.
    pub async fn filling(&mut self) {
        std::future::poll_fn(|cx| {
            self.shared.writer.register(cx.waker());
            let bounds = self.shared.bounds;
            let frames = self.shared.queue().frames.len();
            let bytes = self.shared.bytes.load(Ordering::Relaxed);
            if self.shared.reason.get().is_some()
                || self.shared.reply_due.load(Ordering::Relaxed)
                || frames > bounds.frames / 2
                || bytes > bounds.bytes / 2
            {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Whether a reply to the client's request (or a recovery it waits for) was
    /// queued since the writer last asked: the batch just taken holds it, and a
    /// pacing writer writes it at once instead of waiting out its interval.
    pub fn reply_taken(&mut self) -> bool {
        // A load first: a batch of the fan-out (nearly every one) holds no reply,
        // and a load costs less than a swap.
        self.shared.reply_due.load(Ordering::Relaxed)
            && self.shared.reply_due.swap(false, Ordering::Relaxed)
    }

    /// Moves whatever is queued to the end of `batch`, without waiting. The queue
    /// keeps its buffer (it is refilled at once when the node is behind).
    pub fn append_to(&mut self, batch: &mut VecDeque<Frame>) {
        let mut queue = self.shared.queue();
        batch.append(&mut queue.frames);
        queue.allowance = 0;
        self.shared.reply_due.store(false, Ordering::Relaxed);
    }

    /// The writer handed `bytes` of frames it took to the socket: they no longer
    /// count against the byte bound, and a reader waiting for room looks again.
    pub fn written(&mut self, bytes: usize) {
        self.shared.bytes.fetch_sub(bytes, Ordering::SeqCst);
        // A load first: nearly always nobody waits, and a load costs less than a swap.
        if self.shared.reader_waits.load(Ordering::SeqCst)
            && self.shared.reader_waits.swap(false, Ordering::SeqCst)
        {
            self.shared.reader.wake();
        }
    }

    /// What a closing connection still sends before its goodbye: what was queued
    /// (an error telling the client why, the last messages before a drain), except
    /// for a slow consumer, whose backlog is the problem itself and is dropped.
    pub fn last_frames(&mut self, reason: CloseReason) -> VecDeque<Frame> {
        if reason == CloseReason::SlowConsumer {
            return VecDeque::new();
        }
        self.take_all()
    }

    /// Takes whatever is queued, without waiting (used to flush before a close).
    pub fn take_all(&mut self) -> VecDeque<Frame> {
        let mut all = VecDeque::new();
        self.shared.queue().take_into(&mut all);
        all
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn full_queue_closes_as_slow_consumer() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(2));
        assert!(h.send("a".into()));
        assert!(h.send("b".into()));
        assert!(h.close_reason().is_none());
        assert!(!h.send("c".into()));
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));
        // The first reason sticks, and a closing connection takes no more frames.
        h.close(CloseReason::Shutdown);
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));
        assert!(!h.send("d".into()));
        let mut batch = VecDeque::new();
        assert_eq!(
            q.next(&mut batch).await,
            Next::Close,
            "closing wins over queued frames"
        );
        assert_eq!(q.take_all(), ["a", "b"]);
    }

    #[tokio::test]
    async fn a_queue_past_half_a_bound_ends_a_pacing_wait() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(8));
        let mut batch = VecDeque::new();
        assert!(h.send("1".into()));
        assert_eq!(q.next(&mut batch).await, Next::Frames);
        let pacing = tokio::spawn(async move {
            q.filling().await;
            q
        });
        for f in ["2", "3", "4", "5"] {
            assert!(h.send(f.into()));
            tokio::task::yield_now().await;
            assert!(!pacing.is_finished(), "at most half: the writer paces on");
        }
        assert!(h.send("6".into()));
        let mut q = tokio::time::timeout(Duration::from_secs(1), pacing)
            .await
            .expect("past half: the wait ends")
            .unwrap();
        q.append_to(&mut batch);
        assert_eq!(batch, ["1", "2", "3", "4", "5", "6"]);
    }

    #[tokio::test]
    async fn a_reply_ends_a_pacing_wait() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(64));
        let mut batch = VecDeque::new();
        assert!(h.send("1".into()));
        assert_eq!(q.next(&mut batch).await, Next::Frames);
        batch.clear();
        let pacing = tokio::spawn(async move {
            q.filling().await;
            q
        });
        assert!(h.send("a message".into()));
        tokio::task::yield_now().await;
        assert!(!pacing.is_finished(), "a message waits for the interval");
        assert!(h.send_reply("its ack".into()));
        let mut q = tokio::time::timeout(Duration::from_secs(1), pacing)
            .await
            .expect("a reply: the wait ends")
            .unwrap();
        q.append_to(&mut batch);
        assert_eq!(batch, ["a message", "its ack"]);
        // Taken: the next pacing wait is a wait again.
        assert!(h.send("later".into()));
        let waiting = tokio::time::timeout(Duration::from_millis(50), q.filling()).await;
        assert!(waiting.is_err(), "no reply pending");
    }

    #[tokio::test]
    async fn the_writer_takes_everything_queued_at_once() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(8));
        let writer = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            assert_eq!(q.next(&mut batch).await, Next::Frames);
            batch
        });
        tokio::task::yield_now().await;
        for f in ["1", "2", "3"] {
            assert!(h.send(f.into()));
        }
        let batch = writer.await.unwrap();
        assert!(!batch.is_empty() && batch.len() <= 3);
        assert_eq!(batch[0], "1");
    }

    #[test]
    fn appending_keeps_the_order_and_empties_the_queue() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(8));
        let mut batch: VecDeque<Frame> = ["1".into()].into();
        assert!(h.send("2".into()));
        assert!(h.send("3".into()));
        q.append_to(&mut batch);
        assert_eq!(batch, ["1", "2", "3"]);
        assert!(q.take_all().is_empty());
    }

    #[tokio::test]
    async fn an_unanswered_heartbeat_closes_the_connection() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(8));
        let mut batch = VecDeque::new();
        h.heartbeat();
        assert_eq!(q.next(&mut batch).await, Next::Ping);
        h.alive();
        h.heartbeat();
        assert_eq!(q.next(&mut batch).await, Next::Ping);
        assert!(h.close_reason().is_none(), "answered in time");
        h.heartbeat();
        assert_eq!(h.close_reason(), Some(CloseReason::PingTimeout));
        assert_eq!(q.next(&mut batch).await, Next::Close);
        h.closing().await;
    }

    #[test]
    fn a_recovery_does_not_count_against_the_live_bound() {
        let (h, mut q) = ClientHandle::new(1, QueueBounds::frames(2));
        h.send_recovered(["r1".into(), "r2".into(), "r3".into()]);
        assert!(h.send("live1".into()));
        assert!(h.send("live2".into()));
        assert!(!h.send("live3".into()), "the live bound still holds");
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(q.take_all(), ["r1", "r2", "r3", "live1", "live2"]);
    }

    #[tokio::test]
    async fn the_byte_bound_counts_everything_until_written() {
        let bounds = QueueBounds {
            frames: 100,
            bytes: 10,
        };
        let (h, mut q) = ClientHandle::new(1, bounds);
        assert!(h.send("1234".into()));
        assert!(h.send_recovered(["5678".into()]));
        // The writer took them but has not written them yet: still counted.
        let mut batch = VecDeque::new();
        assert_eq!(q.next(&mut batch).await, Next::Frames);
        assert!(h.send("90".into()), "exactly 10 bytes");
        q.written(8);
        batch.clear();
        assert!(h.send_recovered(["abcd".into(), "efgh".into()]), "2 + 8");
        assert!(!h.send("x".into()), "11 bytes");
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));

        // A recovery past the bound is refused whole, and closes the connection.
        let (h, _q) = ClientHandle::new(2, bounds);
        assert!(h.send("1234".into()));
        assert!(!h.send_recovered(["56789".into(), "ab".into()]));
        assert_eq!(h.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn the_reader_waits_for_room_until_the_writer_wrote() {
        let bounds = QueueBounds {
            frames: 4,
            bytes: 1000,
        };
        let (h, mut q) = ClientHandle::new(1, bounds);
        for f in ["1", "2"] {
            assert!(h.send(f.into()));
        }
        // At half the frame bound: room.
        tokio::time::timeout(Duration::from_secs(1), h.room())
            .await
            .expect("room at half");
        assert!(h.send("3".into()));
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "over half: the reader waits");
        let mut batch = VecDeque::new();
        assert_eq!(q.next(&mut batch).await, Next::Frames);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "taken, not written yet");
        q.written(3);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room once written")
            .unwrap();
        // A closing connection never keeps its reader waiting.
        for f in ["4", "5", "6"] {
            assert!(h.send(f.into()));
        }
        h.close(CloseReason::Shutdown);
        tokio::time::timeout(Duration::from_secs(1), h.room())
            .await
            .expect("closing");
    }

    #[test]
    fn close_codes() {
        assert_eq!(CloseReason::Shutdown.code(), Some(1001));
        assert_eq!(CloseReason::Binary.code(), Some(1003));
        assert_eq!(CloseReason::TooLarge.code(), Some(1009));
        assert_eq!(CloseReason::SlowConsumer.code(), Some(1013));
        assert_eq!(CloseReason::PeerGone.code(), None);
    }
}
