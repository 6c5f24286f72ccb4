//! One WebSocket shared by a connection's reader and writer (two futures of its one
//! task, each polled when woken: either may wait while the other goes on): the
//! reader reads the client's messages through tungstenite; the writer writes the
//! node's data frames as bytes it framed itself (`wire`), straight to the socket,
//! and its control frames (ping, close) through tungstenite.
//!
//! **Why not tungstenite's sink for everything.** It frames every message again on
//! every connection, with its state checks and a waker registration per message:
//! ~10% of a saturated node's CPU in a flame graph at 1M deliveries/s, beside the
//! kernel's send path. The writer instead frames a whole batch into one buffer and
//! writes it.
//!
//! **Two writers, one byte stream.** tungstenite writes too: the pongs and the reply
//! to a client's close, while the reader reads, and the writer's pings and close
//! frame. A batch starts only once tungstenite's own buffer is flushed, and while a
//! batch is partly written the [`Gate`] holds tungstenite's writes back (they would
//! land inside a frame); it is opened, and a held-back write woken, once the batch
//! is out. The stream sits behind a mutex held for one poll at a time, as the
//! `BiLock` of `futures`' split held it; the writer is the only one to write
//! batches, so the gate needs no more than a flag.
//!
//! **No data after a close.** tungstenite refuses to send after the close
//! handshake began; batches do not go through it, so the gate also remembers that
//! the reader saw the client's close (or the end of the stream), under the same
//! lock as tungstenite queued its reply, and a batch is refused from then on. A
//! batch cut off by the write timeout leaves the stream torn inside a frame if any
//! of it went out: nothing may be written after it (the close frame included), so
//! the connection just ends; one cut off before any byte went out leaves the
//! stream as it was.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tungstenite::Message;

/// The socket below tungstenite, whose writes wait while a batch is partly written.
#[derive(Debug)]
pub(crate) struct Gate<S> {
    inner: S,
    /// A batch is partly written: tungstenite must not write.
    shut: bool,
    /// A batch was cut off inside a frame: nothing may be written any more.
    torn: bool,
    /// The reader saw the client's close, or the stream's end: no batch may follow.
    closed: bool,
    /// tungstenite's write that found the gate shut.
    held: Option<Waker>,
    /// tungstenite wrote through the gate since its last flush.
    unflushed: bool,
}

impl<S> Gate<S> {
    pub(crate) fn new(inner: S) -> Gate<S> {
        Gate {
            inner,
            shut: false,
            torn: false,
            closed: false,
            held: None,
            unflushed: false,
        }
    }

    fn open(&mut self) {
        self.shut = false;
        if let Some(waker) = self.held.take() {
            waker.wake();
        }
    }

    /// `Pending` (and the caller woken when the gate opens) while it is shut; an
    /// error once the stream is torn.
    fn wait_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.torn {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        } else if self.shut {
            self.held = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.wait_open(cx))?;
        self.unflushed = true;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.wait_open(cx))?;
        self.unflushed = true;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Stops here when tungstenite wrote nothing since its last flush: a batch
    /// flushes tungstenite before it starts, and below this lies the connection's
    /// held `101` (`HandshakeIo`), which such a flush would send on its own, one
    /// kernel write before the first frame's instead of in the same one. A TCP
    /// stream's flush does nothing else.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.wait_open(cx))?;
        if !self.unflushed {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.unflushed = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.wait_open(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Shared<S> = Arc<Mutex<WebSocketStream<Gate<S>>>>;

fn lock<S>(shared: &Shared<S>) -> MutexGuard<'_, WebSocketStream<Gate<S>>> {
    // Held for one poll, which cannot leave the stream torn: a panic there is a
    // bug, and the connection ends with its task either way.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The connection's reading side: tungstenite's messages.
#[derive(Debug)]
pub(crate) struct ReadHalf<S>(Shared<S>);

/// The connection's writing side.
#[derive(Debug)]
pub(crate) struct WriteHalf<S>(Shared<S>);

/// Shares `socket` between a reader and a writer.
pub(crate) fn split<S>(socket: WebSocketStream<Gate<S>>) -> (ReadHalf<S>, WriteHalf<S>) {
    let shared = Arc::new(Mutex::new(socket));
    (ReadHalf(shared.clone()), WriteHalf(shared))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream for ReadHalf<S> {
    type Item = Result<Message, tungstenite::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut socket = lock(&self.0);
        let next = ready!(socket.poll_next_unpin(cx));
        if !matches!(&next, Some(Ok(message)) if !message.is_close()) {
            // tungstenite queued its reply to the close under this lock.
            socket.get_mut().closed = true;
        }
        Poll::Ready(next)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WriteHalf<S> {
    /// Sends a control message (ping, close) through tungstenite, and flushes.
    /// A plain future of its own (`Unpin`): a writer polls it in place and boxes it
    /// only if it has to wait.
    pub(crate) fn send(
        &mut self,
        message: Message,
    ) -> impl Future<Output = Result<(), tungstenite::Error>> + Unpin + '_ {
        let mut message = Some(message);
        std::future::poll_fn(move |cx| {
            let mut socket = lock(&self.0);
            if message.is_some() {
                ready!(socket.poll_ready_unpin(cx))?;
                if let Some(message) = message.take() {
                    socket.start_send_unpin(message)?;
                }
            }
            socket.poll_flush_unpin(cx)
        })
    }

    /// Sends a ping through tungstenite, and flushes; like [`send`](Self::send),
    /// with no message to keep while it waits.
    pub(crate) fn ping(
        &mut self,
    ) -> impl Future<Output = Result<(), tungstenite::Error>> + Unpin + '_ {
        let mut sent = false;
        std::future::poll_fn(move |cx| {
            let mut socket = lock(&self.0);
            if !sent {
                ready!(socket.poll_ready_unpin(cx))?;
                socket.start_send_unpin(Message::Ping(Default::default()))?;
                sent = true;
            }
            socket.poll_flush_unpin(cx)
        })
    }

    /// Writes out what tungstenite holds (its reply to the client's close).
    pub(crate) async fn flush(&mut self) -> Result<(), tungstenite::Error> {
        std::future::poll_fn(|cx| lock(&self.0).poll_flush_unpin(cx)).await
    }

    /// Writes `frames`, whole frames framed by `wire`, after whatever tungstenite
    /// has queued and before anything it writes next; refused once the client's
    /// close was read. A plain future of its own (`Unpin`), like [`send`](Self::send).
    pub(crate) fn write_frames(
        &mut self,
        frames: Vec<u8>,
    ) -> impl Future<Output = Result<(), tungstenite::Error>> + Unpin + '_ {
        let mut batch = Batch {
            shared: &self.0,
            frames,
            written: 0,
            started: false,
            done: false,
        };
        std::future::poll_fn(move |cx| {
            let mut socket = lock(batch.shared);
            if !batch.started {
                if socket.get_ref().closed {
                    return Poll::Ready(Err(tungstenite::Error::AlreadyClosed));
                }
                ready!(socket.poll_flush_unpin(cx))?;
                socket.get_mut().shut = true;
                batch.started = true;
            }
            let gate = socket.get_mut();
            let result = loop {
                if batch.written == batch.frames.len() {
                    break ready!(Pin::new(&mut gate.inner).poll_flush(cx));
                }
                let rest = &batch.frames[batch.written..];
                match ready!(Pin::new(&mut gate.inner).poll_write(cx, rest)) {
                    Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => batch.written += n,
                    Err(e) => break Err(e),
                }
            };
            // Out, or failed (the connection ends): tungstenite may write again.
            gate.open();
            batch.done = true;
            Poll::Ready(result.map_err(tungstenite::Error::Io))
        })
    }
}

/// A batch being written; if its future is dropped before the end (the write
/// timeout), the gate opens again when none of it went out, and the stream is
/// torn otherwise.
struct Batch<'a, S: AsyncRead + AsyncWrite + Unpin> {
    shared: &'a Shared<S>,
    frames: Vec<u8>,
    written: usize,
    started: bool,
    done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Drop for Batch<'_, S> {
    fn drop(&mut self) {
        if self.started && !self.done {
            let mut socket = lock(self.shared);
            let gate = socket.get_mut();
            gate.torn = self.written > 0;
            gate.open();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tungstenite::protocol::Role;

    /// A socket that keeps each write apart, as the kernel sends each as a segment
    /// of its own that the client must be woken for.
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl AsyncRead for Writes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let write: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = write.len();
            self.0.lock().unwrap().push(write);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_upgrade_response_and_the_first_frame_leave_in_one_write() {
        const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";
        let writes = Arc::new(Mutex::new(Vec::new()));
        let mut io = crate::handshake_io::HandshakeIo::new(Writes(writes.clone()));
        // What hyper does with the upgrade response.
        io.write_all(RESPONSE).await.unwrap();
        io.flush().await.unwrap();
        let socket = WebSocketStream::from_raw_socket(Gate::new(io), Role::Server, None).await;
        let (_reader, mut writer) = split(socket);
        let mut frame = Vec::new();
        crate::transport::websocket::wire::put_frame(&mut frame, 0x81, b"welcome");
        // A batch flushes tungstenite first, which had nothing to write.
        writer.write_frames(frame.clone()).await.unwrap();
        assert_eq!(*writes.lock().unwrap(), [[RESPONSE, &frame].concat()]);
        // tungstenite's own writes still reach the socket, and are flushed.
        writer.send(Message::Ping(Vec::new().into())).await.unwrap();
        assert_eq!(writes.lock().unwrap().len(), 2, "the ping went out");
    }

    #[tokio::test]
    async fn no_batch_goes_out_after_the_clients_close_was_read() {
        let (node, mut client) = tokio::io::duplex(4096);
        let socket = WebSocketStream::from_raw_socket(Gate::new(node), Role::Server, None).await;
        let (mut reader, mut writer) = split(socket);
        let mut frame = Vec::new();
        crate::transport::websocket::wire::put_frame(&mut frame, 0x81, b"before");
        writer.write_frames(frame.clone()).await.unwrap();
        // The client's close: code 1000, masked with a zero key.
        client
            .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
            .await
            .unwrap();
        assert!(matches!(reader.next().await, Some(Ok(Message::Close(_)))));
        let refused = writer.write_frames(frame).await;
        assert!(
            matches!(refused, Err(tungstenite::Error::AlreadyClosed)),
            "{refused:?}"
        );
        // What the client reads: the frame from before, then the reply to its close.
        writer.flush().await.unwrap();
        drop((reader, writer));
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.unwrap();
        assert_eq!(seen, b"\x81\x06before\x88\x02\x03\xe8");
    }
}
