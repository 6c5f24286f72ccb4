//! Compressed client messages, inflated within the message bound, below tungstenite
//! (which knows no extensions).
//!
//! [`InflatingIo`] sits between the upgraded socket and tungstenite's
//! `WebSocketStream`. It reads the client's frames: a compressed message (RSV1 on
//! its first frame, then continuation frames, control frames possibly in between)
//! is taken out of the stream, unmasked and collected, and once whole inflated with
//! the worker thread's inflater into one plain frame, which tungstenite then reads
//! as if the client had sent it so (masked with the all-zero key, which changes no
//! byte). Every other frame passes through byte for byte, so tungstenite keeps
//! enforcing RFC 6455: masking, control frames, UTF-8, sizes, reserved bits.
//!
//! **Bounds.** A compressed message may be no longer than `--max-message-bytes` on
//! the wire, like any other, and inflates into a buffer that never grows past that
//! bound plus one byte: a deflate bomb (a few KB that would inflate to gigabytes)
//! stops there, and the read fails with [`InflateError::TooLarge`], which closes
//! the connection with 1009 as an oversized plain message does. Invalid data fails
//! it with 1002. Between messages the adapter holds no buffer and no inflater.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::TAIL;

/// Most bytes read from the socket at once (on the stack): a compressed message of
/// 64 KiB takes 16 reads.
const READ_CHUNK: usize = 4096;

/// Why a client's compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum InflateError {
    /// It was, or inflated to, more than the message bound.
    #[error("a compressed message over {limit} bytes")]
    TooLarge {
        /// `--max-message-bytes`.
        limit: usize,
    },
    /// Its data is not a deflate stream.
    #[error("invalid compressed data")]
    Invalid,
    /// Another data frame came before its last fragment.
    #[error("a data frame inside a fragmented compressed message")]
    Interleaved,
}

impl InflateError {
    /// The inflate error behind a read error of the socket, if that is what it is.
    pub(crate) fn of(error: &io::Error) -> Option<InflateError> {
        error.get_ref()?.downcast_ref::<InflateError>().copied()
    }
}

impl From<InflateError> for io::Error {
    fn from(error: InflateError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, error)
    }
}

/// A WebSocket frame header, as far as this adapter reads it.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    /// RSV2 or RSV3: no extension here uses them; tungstenite refuses them.
    rsv23: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
}

impl Header {
    /// A text or binary frame: the first of a message.
    fn is_data(&self) -> bool {
        matches!(self.opcode, 1 | 2)
    }

    fn is_continuation(&self) -> bool {
        self.opcode == 0
    }

    /// A frame of the message being received, or the start of one.
    fn is_message(&self) -> bool {
        self.is_data() || self.is_continuation()
    }
}

/// Parses the frame header at the start of `buf`; `None` until all of it is there.
fn parse_header(buf: &[u8]) -> Option<(Header, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let mask: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(mask)
    } else {
        None
    };
    let header = Header {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        rsv23: b0 & 0x30 != 0,
        opcode: b0 & 0x0f,
        mask,
        len,
    };
    Some((header, at))
}

/// Writes the header of a client frame (FIN, masked with the all-zero key).
fn put_header(out: &mut BytesMut, opcode: u8, len: usize) {
    out.extend_from_slice(&[0x80 | opcode]);
    if len < 126 {
        out.extend_from_slice(&[0x80 | len as u8]);
    } else if let Ok(len) = u16::try_from(len) {
        out.extend_from_slice(&[0x80 | 126]);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.extend_from_slice(&[0x80 | 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0; 4]);
}

/// Where the adapter is in the client's stream of frames.
#[derive(Debug, Clone, Copy)]
enum State {
    /// At the start of a frame.
    Header,
    /// Passing this many more bytes of a frame through.
    Passthrough(u64),
    /// Collecting this many more bytes of a compressed message's frame, unmasked
    /// with `mask` from position `at`.
    Compressed {
        remaining: u64,
        mask: [u8; 4],
        at: usize,
        fin: bool,
    },
}

/// A compressed message being received.
#[derive(Debug)]
struct Compressed {
    /// Text (1) or binary (2).
    opcode: u8,
    /// Its compressed payload so far, unmasked.
    payload: BytesMut,
}

/// Inflates a client's compressed messages for tungstenite; see the module doc.
#[derive(Debug)]
pub(crate) struct InflatingIo<S> {
    inner: S,
    /// Read from the socket, not looked at yet.
    input: BytesMut,
    /// For tungstenite: frames passed through, inflated messages.
    output: BytesMut,
    state: State,
    /// The compressed message being received.
    message: Option<Compressed>,
    /// tungstenite is receiving a fragmented plain message: a compressed one may
    /// not start before its end.
    plain_fragments: bool,
    /// `--max-message-bytes`: at most tungstenite's `max_frame_size`, since an
    /// inflated message reaches it as one frame.
    max_message: usize,
    /// Sticky: every read after a failure fails alike.
    failed: Option<InflateError>,
    eof: bool,
}

impl<S> InflatingIo<S> {
    /// Wraps the upgraded socket of a connection that negotiated permessage-deflate.
    pub(crate) fn new(inner: S, max_message: usize) -> InflatingIo<S> {
        InflatingIo {
            inner,
            input: BytesMut::new(),
            output: BytesMut::new(),
            state: State::Header,
            message: None,
            plain_fragments: false,
            max_message,
            failed: None,
            eof: false,
        }
    }

    /// Takes one step through `input`; `Ok(false)` when it needs more of it.
    fn step(&mut self) -> Result<bool, InflateError> {
        match self.state {
            State::Header => {
                let Some((header, header_len)) = parse_header(&self.input) else {
                    return Ok(false);
                };
                self.header(header, header_len)?;
                Ok(true)
            }
            State::Passthrough(rest) => {
                if self.input.is_empty() {
                    return Ok(false);
                }
                let n = usize::try_from(rest).map_or(self.input.len(), |r| r.min(self.input.len()));
                let bytes = self.input.split_to(n);
                if self.output.is_empty() {
                    self.output = bytes;
                } else {
                    self.output.extend_from_slice(&bytes);
                }
                let rest = rest - n as u64;
                self.state = match rest {
                    0 => State::Header,
                    rest => State::Passthrough(rest),
                };
                Ok(true)
            }
            State::Compressed {
                remaining,
                mask,
                at,
                fin,
            } => {
                if remaining > 0 {
                    if self.input.is_empty() {
                        return Ok(false);
                    }
                    let n = usize::try_from(remaining)
                        .map_or(self.input.len(), |r| r.min(self.input.len()));
                    let Some(message) = &mut self.message else {
                        return Err(InflateError::Invalid);
                    };
                    let start = message.payload.len();
                    message.payload.extend_from_slice(&self.input[..n]);
                    self.input.advance(n);
                    for (i, byte) in message.payload[start..].iter_mut().enumerate() {
                        *byte ^= mask[(at + i) & 3];
                    }
                    self.state = State::Compressed {
                        remaining: remaining - n as u64,
                        mask,
                        at: at + n,
                        fin,
                    };
                    return Ok(true);
                }
                self.state = State::Header;
                if fin {
                    let Some(message) = self.message.take() else {
                        return Err(InflateError::Invalid);
                    };
                    let text = inflate(&message.payload, self.max_message)?;
                    put_header(&mut self.output, message.opcode, text.len());
                    self.output.extend_from_slice(&text);
                }
                Ok(true)
            }
        }
    }

    /// Decides what becomes of the frame whose header was just read.
    fn header(&mut self, header: Header, header_len: usize) -> Result<(), InflateError> {
        let well_formed = header.mask.is_some() && !header.rsv23;
        let compressed_start = header.is_data()
            && header.rsv1
            && well_formed
            && self.message.is_none()
            && !self.plain_fragments;
        let next_fragment =
            self.message.is_some() && header.is_continuation() && !header.rsv1 && well_formed;
        if compressed_start || next_fragment {
            let so_far = self.message.as_ref().map_or(0, |m| m.payload.len());
            if header.len > (self.max_message - so_far.min(self.max_message)) as u64 {
                return Err(InflateError::TooLarge {
                    limit: self.max_message,
                });
            }
            if compressed_start {
                self.message = Some(Compressed {
                    opcode: header.opcode,
                    payload: BytesMut::with_capacity(header.len as usize),
                });
            }
            self.input.advance(header_len);
            self.state = State::Compressed {
                remaining: header.len,
                mask: header.mask.unwrap_or_default(),
                at: 0,
                fin: header.fin,
            };
            return Ok(());
        }
        if self.message.is_some() && header.is_message() {
            // tungstenite never saw the message began: it would take this frame.
            return Err(InflateError::Interleaved);
        }
        if header.is_data() {
            self.plain_fragments = !header.fin;
        } else if header.is_continuation() && header.fin {
            self.plain_fragments = false;
        }
        self.output.extend_from_slice(&self.input[..header_len]);
        self.input.advance(header_len);
        self.state = match header.len {
            0 => State::Header,
            len => State::Passthrough(len),
        };
        Ok(())
    }
}

thread_local! {
    /// One inflater per worker thread (~48 KB), reset before every message: with
    /// `client_no_context_takeover` no message depends on the one before.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Inflates one message's compressed payload (without its tail) into at most
/// `limit` bytes.
fn inflate(payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let with_thread_inflater = INFLATER.try_with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        let inflater = slot.get_or_insert_with(|| Decompress::new(false));
        inflater.reset(false);
        Some(inflate_with(inflater, payload, limit))
    });
    match with_thread_inflater {
        Ok(Some(result)) => result,
        // The thread is exiting, or (never) inside an inflation already.
        _ => inflate_with(&mut Decompress::new(false), payload, limit),
    }
}

/// Inflates `payload` and the tail with a reset inflater; the output buffer never
/// grows past `limit + 1` bytes (the byte that proves the message too large).
pub(super) fn inflate_with(
    inflater: &mut Decompress,
    payload: &[u8],
    limit: usize,
) -> Result<Vec<u8>, InflateError> {
    let too_large = InflateError::TooLarge { limit };
    let cap = limit.saturating_add(1);
    let mut out: Vec<u8> = Vec::with_capacity(payload.len().saturating_mul(4).clamp(256, cap));
    for (mut input, flush) in [
        (payload, FlushDecompress::None),
        (&TAIL[..], FlushDecompress::Sync),
    ] {
        loop {
            if out.len() == out.capacity() {
                if out.capacity() >= cap {
                    return Err(too_large);
                }
                let grown = out.capacity().saturating_mul(2).min(cap);
                out.reserve_exact(grown - out.len());
            }
            let (in_before, out_before) = (inflater.total_in(), inflater.total_out());
            let status = inflater
                .decompress_vec(input, &mut out, flush)
                .map_err(|_| InflateError::Invalid)?;
            let consumed = (inflater.total_in() - in_before) as usize;
            let produced = (inflater.total_out() - out_before) as usize;
            input = &input[consumed..];
            if out.len() > limit {
                return Err(too_large);
            }
            if status == Status::StreamEnd {
                // The client ended its stream (BFINAL): the message is complete.
                return Ok(out);
            }
            let room = out.len() < out.capacity();
            if input.is_empty() && room {
                break;
            }
            if consumed == 0 && produced == 0 && room {
                // Input left, room to write, and no progress: not deflate data.
                return Err(InflateError::Invalid);
            }
        }
    }
    Ok(out)
}

impl<S: AsyncRead + Unpin> AsyncRead for InflatingIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                if this.output.is_empty() {
                    // An idle connection holds no buffer.
                    this.output = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = this.failed {
                return Poll::Ready(Err(error.into()));
            }
            match this.step() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) => {
                    this.failed = Some(error);
                    this.input = BytesMut::new();
                    this.message = None;
                    continue;
                }
            }
            if this.eof {
                // tungstenite reports the end (mid-frame or not) as it would.
                return Poll::Ready(Ok(()));
            }
            if this.input.is_empty() {
                this.input = BytesMut::new();
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut read = ReadBuf::uninit(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            match read.filled() {
                [] => this.eof = true,
                bytes => this.input.extend_from_slice(bytes),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for InflatingIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
