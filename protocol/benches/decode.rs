//! Decode throughput of trackgate-protocol against nom-teltonika on the same frames, in the
//! same run: the Teltonika wiki examples and a ~1 KB, 11-record Codec 8 frame.
//!
//! Apples to apples: every contender checks the preamble, the length and the CRC-16 of the
//! whole data field, and all but `nom_validate` return owned records with every IO value.
//! `trackgate` also pays for appending the frame to its read buffer (the listener's steady
//! state), a copy the others do not make. Dropping the decoded values is timed for everyone.
//! `nom_evaluate` (nom-teltonika 0.3.0 `take_frame(..).evaluate()`) is the like-for-like
//! comparison; `nom_validate` (its `take_frame` alone, borrowed views, nothing materialised)
//! is a floor; `nom016` is nom-teltonika 0.1.6, the last release built on `nom`.
//! `examples/decode_ir.rs` runs the same calls (`common/mod.rs`) under callgrind.
//!
//! Run: `cargo bench -p trackgate-protocol --bench decode -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

mod common;

fn decode(c: &mut Criterion) {
    for (name, frame) in &common::frames() {
        let mut group = c.benchmark_group(name.as_str());
        group.throughput(Throughput::Bytes(frame.len() as u64));
        group.bench_function("trackgate", |b| {
            let mut tg = common::Trackgate::new();
            b.iter(|| black_box(tg.decode(black_box(frame))));
        });
        group.bench_function("nom_validate", |b| {
            b.iter(|| black_box(common::nom_validate(black_box(frame))));
        });
        group.bench_function("nom_evaluate", |b| {
            b.iter(|| black_box(common::nom_evaluate(black_box(frame))));
        });
        group.bench_function("nom016", |b| {
            b.iter(|| black_box(common::nom016(black_box(frame))));
        });
        group.finish();
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
