//! The socket under each client's tungstenite: counts the bytes it reads (what a
//! subscriber receives on the wire), and with `--compression` turns the node's
//! compressed frames (RSV1) into plain ones, which tungstenite cannot read.
//!
//! A compressed message is inflated only for every [`SAMPLE`]th one of a
//! connection, and only its first [`PREFIX`] bytes: enough for the send timestamp
//! the latency comes from (`{"op":"msg","ch":..,"data":{"t":..`). The others reach
//! the reader as [`UNSAMPLED`], counted as deliveries without a latency. A real
//! client inflates everything; the load generator must not become the bottleneck
//! of the nodes it measures (inflating costs it ~1 µs a message even for a prefix,
//! as much as the rest of its work on a delivery), so its own CPU is not a
//! client's with compression.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use flate2::{Decompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes of a compressed message inflated: the timestamp is within the first 80,
/// and a frame this short has a one-byte length (under 126).
const PREFIX: usize = 120;

/// One compressed message in this many (per connection) is inflated for its
/// latency.
const SAMPLE: u64 = 16;

/// Largest `--read-buffer` the compressed path honours (a stack buffer).
const MAX_READ: usize = 64 * 1024;

/// What the reader gets for a compressed message that was not inflated.
pub(crate) const UNSAMPLED: &str = r#"{"op":"msg"}"#;

thread_local! {
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// A client's TCP stream, counted, and inflating when the node compresses.
pub(crate) struct BenchIo {
    stream: TcpStream,
    /// Bytes read from the socket, shared by the connections of one kind.
    wire: Arc<AtomicU64>,
    /// Most bytes read from the socket at once: the same as tungstenite's buffer
    /// with or without compression, so both cost the generator the same reads.
    read_size: usize,
    /// `Some` once permessage-deflate was agreed: frames are rewritten.
    frames: Option<Frames>,
}

/// Frames read but not yet handed to tungstenite.
struct Frames {
    input: BytesMut,
    output: BytesMut,
    /// Compressed messages seen.
    compressed: u64,
}

impl BenchIo {
    /// `leftover`: what was read past the upgrade response (the first frames).
    pub(crate) fn new(
        stream: TcpStream,
        wire: Arc<AtomicU64>,
        read_size: usize,
        deflate: bool,
        leftover: &[u8],
    ) -> BenchIo {
        let frames = deflate.then(|| Frames {
            input: BytesMut::from(leftover),
            output: BytesMut::new(),
            compressed: 0,
        });
        BenchIo {
            stream,
            wire,
            read_size: read_size.clamp(64, MAX_READ),
            frames,
        }
    }
}

impl Frames {
    /// Moves one whole frame from `input` to `output`, rewriting a compressed one;
    /// false when no whole frame is buffered.
    fn step(&mut self) -> io::Result<bool> {
        let buf = &self.input[..];
        if buf.len() < 2 {
            return Ok(false);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let (len, at) = match b1 & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
            127 if buf.len() >= 10 => (
                u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => return Ok(false),
            n => (n as usize, 2),
        };
        if buf.len() < at + len {
            return Ok(false);
        }
        if b0 & 0x40 == 0 {
            let frame = self.input.split_to(at + len);
            self.output.extend_from_slice(&frame);
            return Ok(true);
        }
        if b0 != 0xc1 {
            return Err(io::Error::other(
                "a compressed message in several frames (wsrelay sends one)",
            ));
        }
        self.compressed += 1;
        if self.compressed % SAMPLE != 1 {
            self.input.advance(at + len);
            self.output
                .extend_from_slice(&[0x81, UNSAMPLED.len() as u8]);
            self.output.extend_from_slice(UNSAMPLED.as_bytes());
            return Ok(true);
        }
        let buf = &self.input[..];
        let mut text = [0u8; PREFIX];
        let n = INFLATER.with(|d| {
            let mut d = d.borrow_mut();
            d.reset(false);
            d.decompress(&buf[at..at + len], &mut text, FlushDecompress::Sync)
                .map(|_| d.total_out() as usize)
                .map_err(io::Error::other)
        })?;
        self.input.advance(at + len);
        self.output.extend_from_slice(&[0x81, n as u8]);
        self.output.extend_from_slice(&text[..n]);
        Ok(true)
    }
}

impl AsyncRead for BenchIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(frames) = &mut this.frames else {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
            let read = buf.filled().len() - before;
            this.wire.fetch_add(read as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        };
        loop {
            if !frames.output.is_empty() {
                let n = buf.remaining().min(frames.output.len());
                buf.put_slice(&frames.output[..n]);
                frames.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if frames.step()? {
                continue;
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); MAX_READ];
            let mut read = ReadBuf::uninit(&mut chunk[..this.read_size]);
            ready!(Pin::new(&mut this.stream).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.wire
                .fetch_add(read.filled().len() as u64, Ordering::Relaxed);
            frames.input.extend_from_slice(read.filled());
        }
    }
}

impl AsyncWrite for BenchIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
