use super::inflate::inflate_with;
use super::*;

use flate2::Decompress;
use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
use tokio_tungstenite::WebSocketStream;
use tungstenite::error::ProtocolError;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Error, Message};

const MAX: usize = 64 * 1024;

/// A client frame, masked with a fixed key that is not all zeros.
fn client_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x37, 0xfa, 0x21, 0x3d];
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

/// Writes one client frame to the node's end of the pipe.
async fn send(client: &mut DuplexStream, frame: Vec<u8>) {
    client.write_all(&frame).await.unwrap();
}

/// What a client's compressor sends for `message` (fresh: no context taken over).
fn client_deflate(message: &[u8]) -> Vec<u8> {
    let mut compress = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(message.len() + 64);
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
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

/// What a browser inflates from a payload of the node.
fn fresh_inflate(payload: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    inflate_with(&mut d, payload, usize::MAX - 1).unwrap()
}

/// A server-side WebSocket over `InflatingIo`, as the node makes it, and the
/// client's end of the pipe.
async fn server() -> (WebSocketStream<InflatingIo<DuplexStream>>, DuplexStream) {
    let (client, node) = duplex(1 << 20);
    let config = WebSocketConfig::default()
        .read_buffer_size(512)
        .max_message_size(Some(MAX))
        .max_frame_size(Some(MAX));
    let ws =
        WebSocketStream::from_raw_socket(InflatingIo::new(node, MAX), Role::Server, Some(config))
            .await;
    (ws, client)
}

fn text(message: Option<Result<Message, Error>>) -> Vec<u8> {
    match message {
        Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// The inflate error a read failed with.
fn inflate_error(message: Option<Result<Message, Error>>) -> InflateError {
    match message {
        Some(Err(Error::Io(e))) => InflateError::of(&e).unwrap_or_else(|| panic!("{e}")),
        other => panic!("expected an inflate error, got {other:?}"),
    }
}

fn ticker(i: usize) -> String {
    format!(
        r#"{{"op":"msg","ch":"market.btc-usd","data":{{"type":"ticker","symbol":"BTC-USD","exchange":"coinbase","seq":{i},"bid":67995.74,"bid_size":3.755129,"ask":67995.88,"ask_size":0.86307,"trades":[{{"id":{i},"price":67995.91,"size":0.68916406,"side":"sell"}},{{"id":{i},"price":67995.91,"size":0.68916406,"side":"buy"}}]}}}}"#
    )
}

#[test]
fn offers_are_accepted_or_declined() {
    for offer in [
        // Chromium, Firefox, Node's ws, Python's websockets.
        "permessage-deflate; client_max_window_bits",
        "permessage-deflate",
        "permessage-deflate; client_max_window_bits=12; server_no_context_takeover",
        "permessage-deflate; client_no_context_takeover; server_max_window_bits=15",
        "Permessage-Deflate; Client_Max_Window_Bits=\"10\"",
        // A declined first offer, then one the node takes.
        "permessage-deflate; server_max_window_bits=10, permessage-deflate",
        "x-webkit-deflate-frame, permessage-deflate",
    ] {
        assert!(negotiate([offer]), "{offer}");
    }
    assert!(negotiate(["x-webkit-deflate-frame", "permessage-deflate"]));
    for offer in [
        "",
        "x-webkit-deflate-frame",
        "permessage-deflate; server_max_window_bits=10",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=x",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; foo",
    ] {
        assert!(!negotiate([offer]), "{offer}");
    }
    assert!(!negotiate([]));
}

#[test]
fn a_payload_is_valid_for_any_fresh_inflater_and_only_if_it_shrinks() {
    let mut deflater = Deflater { compress: None };
    let message = ticker(1);
    let payload = deflater.compress(2, message.as_bytes()).expect("shrinks");
    assert!(payload.len() < message.len() * 3 / 4, "{}", payload.len());
    assert_eq!(fresh_inflate(&payload), message.as_bytes());
    // The compressor is reset between messages: the second payload needs no
    // context either.
    let second = deflater.compress(2, ticker(2).as_bytes()).unwrap();
    assert_eq!(fresh_inflate(&second), ticker(2).as_bytes());
    // Another level makes another compressor.
    let nine = deflater.compress(9, message.as_bytes()).unwrap();
    assert_eq!(fresh_inflate(&nine), message.as_bytes());

    assert_eq!(deflater.compress(2, b"{}"), None, "tiny: not smaller");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let noise: Vec<u8> = (0..2000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    assert_eq!(deflater.compress(2, &noise), None, "incompressible");
    // Large and repetitive: more than one output buffer's worth.
    let big = "abc".repeat(200_000);
    let payload = deflater.compress(2, big.as_bytes()).unwrap();
    assert!(fresh_inflate(&payload) == big.as_bytes());
}

#[test]
fn the_compressor_compresses_a_shared_frame_once_and_small_ones_not() {
    let metrics = Arc::new(Metrics::new());
    let config = CompressionConfig {
        compression: true,
        compression_min_bytes: 256,
        compression_level: 2,
    };
    let compressor = Compressor::new(&config, metrics.clone());
    let big = Frame::from(ticker(7)).shared();
    assert!(big.len() >= 256);
    // Three subscribers' writers: one compression, the same bytes for all.
    let payloads: Vec<Bytes> = [big.clone(), big.clone(), big.clone()]
        .iter()
        .map(|copy| compressor.compress(copy).expect("compressed"))
        .collect();
    assert!(payloads[0].len() < big.len());
    assert_eq!(fresh_inflate(&payloads[0]), big.as_str().as_bytes());
    assert!(
        payloads.iter().all(|p| p.as_ptr() == payloads[0].as_ptr()),
        "one buffer"
    );
    assert_eq!(metrics.compressions.get(), 1);
    assert_eq!(metrics.compression_bytes_in.get(), big.len() as u64);
    assert_eq!(
        metrics.compression_bytes_out.get(),
        payloads[0].len() as u64
    );

    // Under the threshold: plain, and not counted.
    assert_eq!(compressor.compress(&Frame::from("{\"op\":\"pong\"}")), None);
    assert_eq!(metrics.compressions.get(), 1);
}

#[tokio::test]
async fn a_compressed_message_and_plain_ones_pass() {
    let (mut ws, mut client) = server().await;
    let message = ticker(3);
    client
        .write_all(&client_frame(
            true,
            true,
            1,
            &client_deflate(message.as_bytes()),
        ))
        .await
        .unwrap();
    send(&mut client, client_frame(true, false, 1, b"plain")).await;
    // An empty message, compressed, and one the client ended with BFINAL.
    send(
        &mut client,
        client_frame(true, true, 1, &client_deflate(b"")),
    )
    .await;
    let mut finished = Vec::with_capacity(64);
    let mut c = Compress::new(Compression::new(6), false);
    c.compress_vec(b"last words", &mut finished, FlushCompress::Finish)
        .unwrap();
    send(&mut client, client_frame(true, true, 1, &finished)).await;
    assert_eq!(text(ws.next().await), message.as_bytes());
    assert_eq!(text(ws.next().await), b"plain");
    assert_eq!(text(ws.next().await), b"");
    assert_eq!(text(ws.next().await), b"last words");
}

#[tokio::test]
async fn fragments_with_a_ping_in_between_and_the_pong_goes_out() {
    let (mut ws, mut client) = server().await;
    let message: Vec<u8> = (0..3000)
        .map(|i| b"abcdefghij"[i % 10] ^ (i as u8 & 1))
        .collect();
    let z = client_deflate(&message);
    let (a, rest) = z.split_at(z.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    send(&mut client, client_frame(false, true, 1, a)).await;
    send(&mut client, client_frame(true, false, 9, b"are you there")).await;
    send(&mut client, client_frame(false, false, 0, b)).await;
    send(&mut client, client_frame(true, false, 0, c)).await;
    match ws.next().await {
        Some(Ok(Message::Ping(p))) => assert_eq!(&p[..], b"are you there"),
        other => panic!("{other:?}"),
    }
    assert_eq!(text(ws.next().await), message);
    // tungstenite queued the pong; it leaves through the adapter's write side.
    ws.flush().await.unwrap();
    let mut pong = [0u8; 15];
    client.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong[..2], &[0x8a, 13]);
    assert_eq!(&pong[2..], b"are you there");
}

#[tokio::test]
async fn a_deflate_bomb_fails_as_too_large() {
    let (mut ws, mut client) = server().await;
    let bomb = client_deflate(&vec![b'a'; 16 << 20]);
    assert!(bomb.len() < MAX / 2, "a bomb fits a frame: {}", bomb.len());
    send(&mut client, client_frame(true, true, 1, &bomb)).await;
    assert_eq!(
        inflate_error(ws.next().await),
        InflateError::TooLarge { limit: MAX }
    );
    // The output never grew past the bound plus the byte that proves it.
    let mut d = Decompress::new(false);
    assert_eq!(
        inflate_with(&mut d, &bomb, MAX),
        Err(InflateError::TooLarge { limit: MAX })
    );
    // Exactly at the bound is fine.
    let exact = vec![b'a'; MAX];
    let mut d = Decompress::new(false);
    let out = inflate_with(&mut d, &client_deflate(&exact), MAX).unwrap();
    assert_eq!((out.len(), out.capacity()), (MAX, MAX + 1));
}

#[tokio::test]
async fn the_bound_holds_across_fragments_and_on_the_wire() {
    let (mut ws, mut client) = server().await;
    // Two fragments inflating to 40 KiB each: 80 KiB > 64 KiB.
    let z = client_deflate(&vec![b'x'; 80 * 1024]);
    let (a, b) = z.split_at(z.len() / 2);
    send(&mut client, client_frame(false, true, 1, a)).await;
    send(&mut client, client_frame(true, false, 0, b)).await;
    assert_eq!(
        inflate_error(ws.next().await),
        InflateError::TooLarge { limit: MAX }
    );

    // Compressed data over the bound is refused before it is read.
    let (mut ws, mut client) = server().await;
    let mut header = vec![0xc1, 0x80 | 127];
    header.extend_from_slice(&(MAX as u64 + 1).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    client.write_all(&header).await.unwrap();
    assert_eq!(
        inflate_error(ws.next().await),
        InflateError::TooLarge { limit: MAX }
    );
}

#[tokio::test]
async fn invalid_data_and_broken_rules_fail() {
    let (mut ws, mut client) = server().await;
    send(
        &mut client,
        client_frame(true, true, 1, &[0xff, 0xff, 0xff, 0xff]),
    )
    .await;
    assert_eq!(inflate_error(ws.next().await), InflateError::Invalid);
    // Every read after that fails alike.
    assert!(ws.next().await.is_none());

    // A new data frame before the compressed message ended.
    let (mut ws, mut client) = server().await;
    let z = client_deflate(ticker(1).as_bytes());
    send(&mut client, client_frame(false, true, 1, &z[..10])).await;
    send(&mut client, client_frame(true, false, 1, b"hi")).await;
    assert_eq!(inflate_error(ws.next().await), InflateError::Interleaved);

    // RSV1 on a control frame, or on a continuation: tungstenite's rules.
    let (mut ws, mut client) = server().await;
    send(&mut client, client_frame(true, true, 9, b"x")).await;
    assert!(matches!(
        ws.next().await,
        Some(Err(Error::Protocol(ProtocolError::NonZeroReservedBits)))
    ));
    let (mut ws, mut client) = server().await;
    send(&mut client, client_frame(false, false, 1, b"plain, ")).await;
    send(&mut client, client_frame(true, true, 0, &z)).await;
    assert!(matches!(
        ws.next().await,
        Some(Err(Error::Protocol(ProtocolError::NonZeroReservedBits)))
    ));
    // A compressed message may not start inside a plain fragmented one.
    let (mut ws, mut client) = server().await;
    send(&mut client, client_frame(false, false, 1, b"plain, ")).await;
    send(&mut client, client_frame(true, true, 1, &z)).await;
    assert!(matches!(ws.next().await, Some(Err(Error::Protocol(_)))));
}

/// Frames of a client that compresses some messages, fragments some, pings in
/// between; each message is (compressed, fragments).
fn wire(messages: &[(Vec<u8>, bool, usize)]) -> Vec<u8> {
    let mut wire = Vec::new();
    for (i, (message, compressed, fragments)) in messages.iter().enumerate() {
        let payload = if *compressed {
            client_deflate(message)
        } else {
            message.clone()
        };
        let n = (*fragments).max(1);
        let size = payload.len().div_ceil(n).max(1);
        let pieces: Vec<&[u8]> = if payload.is_empty() {
            vec![&[]]
        } else {
            payload.chunks(size).collect()
        };
        for (k, piece) in pieces.iter().enumerate() {
            let first = k == 0;
            let last = k == pieces.len() - 1;
            let opcode = if first { 1 } else { 0 };
            wire.extend(client_frame(last, first && *compressed, opcode, piece));
            if !last && i % 2 == 0 {
                wire.extend(client_frame(true, false, 9, b"ping"));
            }
        }
    }
    wire
}

/// Reads every text message, skipping pings, until `n` arrived.
async fn read_texts(ws: &mut WebSocketStream<InflatingIo<DuplexStream>>, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < n {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => out.push(t.as_bytes().to_vec()),
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn byte_by_byte_input() {
    let big: Vec<u8> = (0..60_000u32)
        .map(|i| b"0123456789abcdef"[(i * 7 % 16) as usize])
        .collect();
    let messages = vec![
        (br#"{"op":"pub","data":"first"}"#.to_vec(), true, 1),
        (big.clone(), false, 1),
        (big.clone(), true, 3),
        (b"short".to_vec(), false, 2),
    ];
    let wire = wire(&messages);
    let (mut ws, mut client) = server().await;
    let writer = tokio::spawn(async move {
        for byte in wire.chunks(1) {
            client.write_all(byte).await.unwrap();
            tokio::task::yield_now().await;
        }
        client
    });
    let got = read_texts(&mut ws, messages.len()).await;
    assert_eq!(
        got,
        messages.into_iter().map(|(m, _, _)| m).collect::<Vec<_>>()
    );
    drop(writer.await.unwrap());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever the messages, compression, fragmentation and the way the bytes
    /// arrive, the session reads exactly what the client sent.
    #[test]
    fn any_stream_of_frames_reads_back(
        messages in prop::collection::vec(
            (prop::collection::vec(prop::sample::select(b"ab{}\":,0123 xyz".to_vec()), 0..3000),
             any::<bool>(), 1..4usize),
            1..6),
        chunk in 1..700usize,
    ) {
        let wire = wire(&messages);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got = runtime.block_on(async {
            let (mut ws, mut client) = server().await;
            let writer = tokio::spawn(async move {
                for piece in wire.chunks(chunk) {
                    client.write_all(piece).await.unwrap();
                    tokio::task::yield_now().await;
                }
                client
            });
            let got = read_texts(&mut ws, messages.len()).await;
            drop(writer.await.unwrap());
            got
        });
        let sent: Vec<Vec<u8>> = messages.into_iter().map(|(m, _, _)| m).collect();
        prop_assert_eq!(got, sent);
    }
}
