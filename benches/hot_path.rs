//! Micro-benchmarks of the per-message hot path: the fan-out of one encoded frame to
//! local subscribers (on channels without and with history: the offset must not
//! change the per-delivery cost), request decoding, frame encoding (once per
//! publication per node) and the envelope.
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wsrelay::client::{ClientHandle, ClientQueue, QueueBounds};
use wsrelay::publication::{Epoch, Kind, Position, Publication};
use wsrelay::registry::Registry;
use wsrelay::{envelope, protocol};

fn publication(data: &str, offset: Option<u64>) -> Publication {
    Publication {
        kind: Kind::Message,
        data: Bytes::copy_from_slice(data.as_bytes()),
        from: None,
        position: offset.map(|offset| Position {
            epoch: Epoch::parse("k3x9ab01").unwrap(),
            offset,
        }),
        traceparent: Bytes::new(),
        published_at_us: 0,
    }
}

const PUB: &str = r#"{"op":"pub","ch":"room1","data":{"user":"ada","text":"the quick brown fox jumps over the lazy dog","n":[1,2,3]},"id":42}"#;

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for (subscribers, offset) in [(100usize, None), (10_000, None), (10_000, Some(42u64))] {
        let registry = Registry::new();
        let mut clients: Vec<(ClientHandle, ClientQueue)> = (0..subscribers)
            .map(|_| {
                // The defaults: bounded in frames and in bytes.
                let (handle, queue) = registry.register(QueueBounds {
                    frames: 1024,
                    bytes: 4 << 20,
                });
                if offset.is_some() {
                    // A subscription to a history channel, as the hub leaves it: made
                    // held back, then released after its (empty) recovery.
                    registry.subscribe_held(&handle, "room1");
                    let start = Position {
                        epoch: Epoch::parse("k3x9ab01").unwrap(),
                        offset: 0,
                    };
                    registry.release(&handle, "room1", Some(&start), Vec::new());
                } else {
                    registry.subscribe(&handle, "room1");
                }
                (handle, queue)
            })
            .collect();
        let published = publication(r#"{"text":"hello"}"#, offset);
        let frame = protocol::encode_publication("room1", &published);
        group.throughput(Throughput::Elements(subscribers as u64));
        let name = match offset {
            None => format!("{subscribers}_subscribers"),
            Some(_) => format!("{subscribers}_subscribers_history"),
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let delivered =
                        registry.fanout("room1", black_box(&frame), published.position.as_ref());
                    timed += start.elapsed();
                    assert_eq!(delivered, subscribers);
                    // Drained outside the timed part, as the writers would.
                    for (_, queue) in clients.iter_mut() {
                        queue.take_all();
                    }
                }
                timed
            })
        });
        drop(clients);
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    group.bench_function("parse_pub_request", |b| {
        b.iter(|| {
            protocol::parse_request(black_box(PUB))
                .unwrap()
                .id()
                .is_some()
        })
    });
    let protocol::Request::Publish { data, .. } = protocol::parse_request(PUB).unwrap() else {
        unreachable!()
    };
    let plain = publication(data.get(), None);
    let with_offset = publication(data.get(), Some(1_234_567));
    group.bench_function("encode_msg_frame", |b| {
        b.iter(|| protocol::encode_publication(black_box("room1"), black_box(&plain)))
    });
    group.bench_function("encode_msg_frame_with_offset", |b| {
        b.iter(|| protocol::encode_publication(black_box("room1"), black_box(&with_offset)))
    });
    let wire = envelope::encode(&with_offset);
    group.bench_function("envelope_encode", |b| {
        b.iter(|| envelope::encode(black_box(&with_offset)))
    });
    group.bench_function("envelope_decode", |b| {
        b.iter(|| envelope::decode(black_box(wire.clone())).unwrap())
    });
    group.finish();
}

criterion_group!(benches, fanout, codec);
criterion_main!(benches);
