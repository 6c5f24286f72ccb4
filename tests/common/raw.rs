//! A WebSocket client written by hand, to see what a library hides: the response
//! headers of the upgrade, the RSV1 bit of each frame, the compressed payload as it
//! is on the wire, and frames a well-behaved client would never send (a deflate
//! bomb, invalid compressed data).

use std::net::SocketAddr;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::WAIT;

/// What every deflate block of permessage-deflate ends with, left off the wire.
pub const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// The offer browsers make.
pub const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// One frame from the server.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    /// As it was on the wire (compressed when `rsv1`).
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The text of a data frame, inflated (with a fresh inflater) when compressed.
    pub fn text(&self) -> String {
        let bytes = if self.rsv1 {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        };
        String::from_utf8(bytes).expect("UTF-8")
    }

    /// The code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A client over a plain TCP socket.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The upgrade response's head (status line and headers), lowercase.
    pub head: String,
}

impl RawClient {
    /// Opens `/ws?query` with the given extra request headers; panics unless the
    /// node answers 101.
    pub async fn connect(addr: SocketAddr, query: &str, headers: &[(&str, &str)]) -> RawClient {
        let mut stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap();
        let mut request = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
            head: String::new(),
        };
        let end = loop {
            if let Some(at) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            client.fill().await;
        };
        client.head = String::from_utf8_lossy(&client.buf[..end]).to_lowercase();
        client.buf.drain(..end);
        assert!(
            client.head.starts_with("http/1.1 101 "),
            "not upgraded: {}",
            client.head
        );
        client
    }

    /// The value of a response header of the upgrade.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }

    async fn fill(&mut self) {
        let mut chunk = [0u8; 8192];
        let n = timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("data in time")
            .unwrap();
        assert!(n > 0, "the node closed the connection");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// The next frame from the server.
    pub async fn frame(&mut self) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill().await;
        }
    }

    /// The next data frame (pings are skipped; a close frame fails the test).
    pub async fn data(&mut self) -> RawFrame {
        loop {
            let frame = self.frame().await;
            match frame.opcode {
                1 | 2 => return frame,
                8 => panic!("closed with {:?}", frame.close_code()),
                _ => continue,
            }
        }
    }

    /// The next data frame's JSON, and whether it came compressed.
    pub async fn json(&mut self) -> (serde_json::Value, bool) {
        let frame = self.data().await;
        let value = serde_json::from_str(&frame.text()).expect("JSON");
        (value, frame.rsv1)
    }

    /// Reads frames until a close frame arrives; its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let frame = self.frame().await;
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
    }

    /// Sends one client frame (masked, with a key that is not all zeros).
    pub async fn send(&mut self, fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) {
        let bytes = client_frame(fin, rsv1, opcode, payload);
        timeout(WAIT, self.stream.write_all(&bytes))
            .await
            .expect("write in time")
            .unwrap();
    }

    /// Sends a text message compressed, as one frame.
    pub async fn send_compressed(&mut self, text: &str) {
        self.send(true, true, 1, &deflate(text.as_bytes())).await;
    }
}

/// A masked client frame.
pub fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x12, 0x9a, 0x5c, 0xe3];
    let mut v = vec![(if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        v.push(0x80 | len as u8);
    } else if len <= 0xffff {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&(len as u64).to_be_bytes());
    }
    v.extend_from_slice(&key);
    v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
    v
}

/// Parses one server frame (unmasked) at the start of `buf`.
fn parse(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode: b0 & 0x0f,
        payload,
    };
    Some((frame, at + len))
}

/// Compresses one message as a permessage-deflate client does (no context).
pub fn deflate(message: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::new(9), false);
    let mut out = Vec::with_capacity(message.len() / 2 + 64);
    let mut input = message;
    loop {
        let before = compress.total_in();
        compress
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .unwrap();
        input = &input[(compress.total_in() - before) as usize..];
        if input.is_empty() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    out.truncate(out.len() - TAIL.len());
    out
}

/// Inflates one server payload with a fresh inflater: what a browser does with
/// `server_no_context_takeover`.
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut inflater = Decompress::new(false);
    let input = [payload, &TAIL].concat();
    let mut out = Vec::with_capacity(payload.len() * 4 + 64);
    loop {
        let consumed = inflater.total_in() as usize;
        let status = inflater
            .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
            .expect("valid deflate data");
        if inflater.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        if status == Status::StreamEnd {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// A JSON payload of about `size` bytes that looks like market data (repeated
/// keys, varying numbers): what compresses about 2x without context. Read back
/// from its text, so that it equals what a client parses (serde_json's float
/// parsing may differ from the value in the last bit).
pub fn ticker_json(seq: u64, size: usize) -> serde_json::Value {
    let mut trades = Vec::new();
    let mut value = serde_json::json!({
        "type": "ticker", "symbol": "BTC-USD", "exchange": "coinbase", "seq": seq,
        "bid": 67995.74, "bid_size": 3.755129, "ask": 67995.88, "ask_size": 0.86307,
        "trades": [],
    });
    let mut k = 0u64;
    while value.to_string().len() < size {
        trades.push(serde_json::json!({
            "trade_id": 629_537_871 + seq * 10 + k, "price": 67995.91 + k as f64 / 100.0,
            "size": 0.689_164_06 * (k + 1) as f64, "side": if k.is_multiple_of(2) { "sell" } else { "buy" },
        }));
        value["trades"] = serde_json::Value::Array(trades.clone());
        k += 1;
    }
    serde_json::from_str(&value.to_string()).expect("JSON")
}
