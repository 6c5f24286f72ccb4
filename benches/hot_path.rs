//! Micro-benchmarks of the per-message hot path: the fan-out of one encoded frame to
//! local subscribers, request decoding, frame encoding and envelope decoding.
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use wsrelay::client::{ClientHandle, ClientQueue};
use wsrelay::registry::Registry;
use wsrelay::{envelope, protocol};

const PUB: &str = r#"{"op":"pub","ch":"room1","data":{"user":"ada","text":"the quick brown fox jumps over the lazy dog","n":[1,2,3]},"id":42}"#;

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for subscribers in [100usize, 10_000] {
        let registry = Registry::new();
        let mut clients: Vec<(ClientHandle, ClientQueue)> = (0..subscribers)
            .map(|_| {
                let (handle, queue) = registry.register(1024);
                registry.subscribe(&handle, "room1");
                (handle, queue)
            })
            .collect();
        let data = RawValue::from_string(r#"{"text":"hello"}"#.into()).unwrap();
        let frame = protocol::encode_message("room1", &data, None);
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(format!("{subscribers}_subscribers"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let delivered = registry.fanout("room1", black_box(&frame));
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
    group.bench_function("encode_msg_frame", |b| {
        b.iter(|| protocol::encode_message(black_box("room1"), black_box(data), None))
    });
    let frame = protocol::encode_message("room1", data, None);
    let wire = envelope::encode(frame.as_bytes(), b"");
    group.bench_function("envelope_encode", |b| {
        b.iter(|| envelope::encode(black_box(frame.as_bytes()), b""))
    });
    group.bench_function("envelope_decode", |b| {
        b.iter(|| envelope::decode(black_box(wire.clone())).unwrap())
    });
    group.finish();
}

criterion_group!(benches, fanout, codec);
criterion_main!(benches);
