//! Client connections: a protocol v1 WebSocket with a deliberately small read buffer,
//! counting the bytes it receives, offering permessage-deflate with `--compression`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::wire::BenchIo;

pub(crate) type Ws = WebSocketStream<BenchIo>;

/// How clients connect.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// tungstenite's read buffer, in bytes.
    pub(crate) read_buffer: usize,
    /// Offer permessage-deflate (as browsers do).
    pub(crate) compression: bool,
    /// Where the bytes read from the sockets are counted.
    pub(crate) wire: Arc<AtomicU64>,
}

/// The offer browsers make.
const DEFLATE_OFFER: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// The key of every handshake: a load generator talks to its own nodes, and a fixed
/// key makes the accept value a constant (RFC 6455's own example pair).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// Largest upgrade response (headers) accepted.
const MAX_RESPONSE: usize = 4096;

/// Connects to `url` (plain `ws://`) and waits for `welcome`. With
/// `options.compression` it offers permessage-deflate; a node may decline
/// (`--compression off`), and the connection is then plain.
///
/// The upgrade is written by hand rather than with tungstenite's client handshake:
/// one prepared request and one read (the node sends the 101 and `welcome`
/// together), which halves the generator's user-space cost per connection, so
/// connect-time figures measure the nodes rather than the generator.
pub(crate) async fn connect(url: &str, options: &Options) -> anyhow::Result<Ws> {
    let (ws, first) = open(url, options, Duration::from_secs(10)).await?;
    match first {
        Message::Text(t) if t.as_str().contains(r#""op":"welcome""#) => Ok(ws),
        other => anyhow::bail!("expected welcome from {url}, got {other:?}"),
    }
}

/// Opens a connection as [`connect`] does, within `within`, and returns it with
/// the node's first frame, whatever it is: `welcome`, or the `error` (then a
/// close) that refuses the connect-time channels, which `storm` counts rather
/// than fails on.
pub(crate) async fn open(
    url: &str,
    options: &Options,
    within: Duration,
) -> anyhow::Result<(Ws, Message)> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| anyhow::anyhow!("only ws:// URLs are supported: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let deadline = tokio::time::Instant::now() + within;
    let mut stream = tokio::time::timeout_at(deadline, TcpStream::connect(authority))
        .await
        .map_err(|_| anyhow::anyhow!("no TCP connection to {url}"))??;
    stream.set_nodelay(true)?;
    let offer = if options.compression {
        DEFLATE_OFFER
    } else {
        ""
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;

    let mut received = Vec::with_capacity(512);
    let head_end = loop {
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        anyhow::ensure!(
            received.len() < MAX_RESPONSE,
            "upgrade response too large from {url}"
        );
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut received))
            .await
            .map_err(|_| anyhow::anyhow!("no upgrade response from {url}"))??;
        anyhow::ensure!(read > 0, "{url} closed the connection during the upgrade");
    };
    let head = std::str::from_utf8(&received[..head_end])?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 101 ")
            && head
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("sec-websocket-accept: {ACCEPT}"))),
        "upgrade refused by {url}: {}",
        head.lines().next().unwrap_or_default()
    );
    let deflate = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("sec-websocket-extensions: permessage-deflate")
    });
    anyhow::ensure!(
        options.compression || !deflate,
        "{url} agreed to permessage-deflate, which was not offered"
    );
    let leftover = received.split_off(head_end);
    let config = WebSocketConfig::default().read_buffer_size(options.read_buffer);
    let mut ws = if deflate {
        let io = BenchIo::new(
            stream,
            options.wire.clone(),
            options.read_buffer,
            true,
            &leftover,
        );
        WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await
    } else {
        let io = BenchIo::new(
            stream,
            options.wire.clone(),
            options.read_buffer,
            false,
            &[],
        );
        WebSocketStream::from_partially_read(io, leftover, Role::Client, Some(config)).await
    };
    loop {
        let first = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no welcome from {url}"))?;
        match first {
            // The node's heartbeat may come before a `welcome` that waits for its
            // subscriptions (tungstenite answers it): not a protocol frame.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(message)) => return Ok((ws, message)),
            Some(Err(e)) => anyhow::bail!("{url}: {e}"),
            None => anyhow::bail!("{url} closed the connection before its first frame"),
        }
    }
}

/// Connects `count` clients; client `i` goes to `urls[i % urls.len()]` with the
/// query `query(i)`. At most `concurrency` handshakes are in flight.
pub(crate) async fn connect_many(
    urls: &[String],
    count: usize,
    concurrency: usize,
    options: &Options,
    query: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<Ws>> {
    let attempts = (0..count).map(|i| {
        let url = format!("{}?{}", urls[i % urls.len()], query(i));
        async move { (i, connect(&url, options).await) }
    });
    // Unordered: `concurrency` connects stay in flight, where in order a slow one
    // would hold back the start of the next ones until it is done. The result
    // keeps the order of `query`'s indexes.
    let mut results: Vec<(usize, anyhow::Result<Ws>)> = futures_util::stream::iter(attempts)
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.sort_unstable_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, ws)| ws).collect()
}
