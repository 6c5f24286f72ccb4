//! Client connections: a protocol v1 WebSocket with a deliberately small read buffer.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, client_async_with_config};

pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to `url` (plain `ws://`) and waits for `welcome`.
pub(crate) async fn connect(url: &str, read_buffer: usize) -> anyhow::Result<Ws> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| anyhow::anyhow!("only ws:// URLs are supported: {url}"))?;
    let stream = TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let (mut ws, _) =
        client_async_with_config(url, MaybeTlsStream::Plain(stream), Some(config)).await?;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| anyhow::anyhow!("no welcome from {url}"))?;
    match first {
        Some(Ok(Message::Text(t))) if t.as_str().contains(r#""op":"welcome""#) => Ok(ws),
        other => anyhow::bail!("expected welcome from {url}, got {other:?}"),
    }
}

/// Connects `count` clients; client `i` goes to `urls[i % urls.len()]` with the
/// query `query(i)`. At most `concurrency` handshakes are in flight.
pub(crate) async fn connect_many(
    urls: &[String],
    count: usize,
    concurrency: usize,
    read_buffer: usize,
    query: impl Fn(usize) -> String,
) -> anyhow::Result<Vec<Ws>> {
    let attempts = (0..count).map(|i| {
        let url = format!("{}?{}", urls[i % urls.len()], query(i));
        async move { connect(&url, read_buffer).await }
    });
    let results: Vec<anyhow::Result<Ws>> = futures_util::stream::iter(attempts)
        .buffered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}
