//! The TCP stream of an HTTP connection, holding a `101 Switching Protocols`
//! response back so that it leaves in the same write as the first WebSocket frame
//! (`welcome`, or an error and a close).
//!
//! Why: on a node, a connect costs two kernel writes, and each write on a socket is
//! a TCP segment that the peer must receive and be woken for. Sending the upgrade
//! response and `welcome` together saves one of them per connection, which counts in
//! a reconnect storm. Nothing is lost by waiting: a WebSocket client sends nothing
//! before the 101, and the node writes `welcome` (or refuses the connection)
//! without waiting for the client.
//!
//! Every other response passes straight through. A held 101 goes out at the latest
//! on an explicit flush after the one hyper makes, or on shutdown. Above it, a
//! WebSocket's gate (`transport::websocket::socket`) lets through only flushes with
//! something to flush, so there the 101 leaves with the first bytes the node
//! writes: `welcome` (once the connect's subscriptions are made), an error and a
//! close, or a ping (at once when the connect's recovery waits for its turn, see
//! `Hub::recovery_turn`; or the heartbeat's).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const SWITCHING_PROTOCOLS: &[u8] = b"HTTP/1.1 101 ";

/// A stream that holds back a `101` response until the next write.
#[derive(Debug)]
pub(crate) struct HandshakeIo<S> {
    inner: S,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Nothing held (yet): writes pass through.
    Open,
    /// A 101 response, not written yet. `flushed`: hyper's flush after writing it
    /// was answered without writing; the next flush writes it.
    Held { response: Vec<u8>, flushed: bool },
    /// The 101 went out: writes pass through for good.
    Done,
}

impl<S> HandshakeIo<S> {
    pub(crate) fn new(inner: S) -> Self {
        HandshakeIo {
            inner,
            state: State::Open,
        }
    }
}

impl<S: AsyncWrite + Unpin> HandshakeIo<S> {
    /// Holds `bufs` if they are a 101 response (the first one on this stream).
    fn hold(&mut self, bufs: &[IoSlice<'_>]) -> Option<usize> {
        if !matches!(self.state, State::Open) || !bufs.first()?.starts_with(SWITCHING_PROTOCOLS) {
            return None;
        }
        let response: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let len = response.len();
        self.state = State::Held {
            response,
            flushed: false,
        };
        Some(len)
    }

    /// Writes the held response, together with `extra` if there is room. Ready with
    /// how much of `extra` was written once the held response is out.
    fn poll_release(&mut self, cx: &mut Context<'_>, extra: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let State::Held { response, .. } = &mut self.state else {
                return Poll::Ready(Ok(0));
            };
            let bufs = [IoSlice::new(response), IoSlice::new(extra)];
            let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n >= response.len() {
                let extra_written = n - response.len();
                self.state = State::Done;
                return Poll::Ready(Ok(extra_written));
            }
            response.drain(..n);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HandshakeIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HandshakeIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.state {
            // Every frame after the handshake: a plain write, as without the wrapper.
            State::Done => Pin::new(&mut self.inner).poll_write(cx, buf),
            _ => self.poll_write_vectored(cx, &[IoSlice::new(buf)]),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.state {
            State::Open => {
                if let Some(held) = this.hold(bufs) {
                    return Poll::Ready(Ok(held));
                }
                // Not an upgrade: this connection holds nothing back, ever.
                this.state = State::Done;
                Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
            State::Held { .. } => {
                // The first frame after the upgrade: out with the response.
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                let written = ready!(this.poll_release(cx, first))?;
                if written > 0 || first.is_empty() {
                    return Poll::Ready(Ok(written));
                }
                // Only the response fit: report this write's progress on its own.
                Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
            State::Done => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let State::Held { flushed, .. } = &mut this.state {
            if !*flushed {
                // hyper's flush right after the response: the upgrade can go ahead,
                // the response waits for the first frame.
                *flushed = true;
                return Poll::Ready(Ok(()));
            }
            ready!(this.poll_release(cx, &[]))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_release(cx, &[]))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n";

    /// Reads everything the other end has written so far (the writes completed).
    async fn drain(peer: &mut tokio::io::DuplexStream) -> Vec<u8> {
        let mut out = vec![0; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_millis(100), peer.read(&mut out))
            .await
            .map_or(0, |r| r.unwrap());
        out.truncate(n);
        out
    }

    #[tokio::test]
    async fn the_101_leaves_with_the_first_frame() {
        let (ours, mut peer) = tokio::io::duplex(4096);
        let mut io = HandshakeIo::new(ours);
        io.write_all(RESPONSE).await.unwrap();
        io.flush().await.unwrap();
        assert!(
            drain(&mut peer).await.is_empty(),
            "held after hyper's flush"
        );
        io.write_all(b"frame").await.unwrap();
        assert_eq!(drain(&mut peer).await, [RESPONSE, b"frame"].concat());
        io.write_all(b"next").await.unwrap();
        assert_eq!(drain(&mut peer).await, b"next");
    }

    #[tokio::test]
    async fn a_second_flush_sends_a_held_101() {
        let (ours, mut peer) = tokio::io::duplex(4096);
        let mut io = HandshakeIo::new(ours);
        io.write_all(RESPONSE).await.unwrap();
        io.flush().await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(drain(&mut peer).await, RESPONSE);
    }

    #[tokio::test]
    async fn shutdown_sends_a_held_101() {
        let (ours, mut peer) = tokio::io::duplex(4096);
        let mut io = HandshakeIo::new(ours);
        io.write_all(RESPONSE).await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(drain(&mut peer).await, RESPONSE);
    }

    #[tokio::test]
    async fn other_responses_pass_through() {
        let (ours, mut peer) = tokio::io::duplex(4096);
        let mut io = HandshakeIo::new(ours);
        io.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        assert_eq!(drain(&mut peer).await, b"HTTP/1.1 200 OK\r\n\r\n");
        // Only the first response of a connection is held (an upgrade after a
        // keep-alive request is rare and just takes its own write).
        io.write_all(RESPONSE).await.unwrap();
        assert_eq!(drain(&mut peer).await, RESPONSE);
    }

    #[tokio::test]
    async fn partial_writes_keep_the_order() {
        // A pipe with room for 16 bytes at a time: every write is partial.
        let (ours, mut peer) = tokio::io::duplex(16);
        let mut io = HandshakeIo::new(ours);
        io.write_all(RESPONSE).await.unwrap();
        io.flush().await.unwrap();
        let frame = vec![b'x'; 100];
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all
        });
        io.write_all(&frame).await.unwrap();
        io.shutdown().await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), [RESPONSE, &frame].concat());
    }
}
