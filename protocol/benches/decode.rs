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
//! The `gt06_vs_teltonika` groups put the GT06 decoder beside the Teltonika one on frames of
//! about the same size.
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

/// GT06 against Teltonika on frames of about the same size: one location (41 B GT06 0x12
/// against the 52 B, 1-record wiki Codec 8 #2), and ~1 KB (24 GT06 location frames, 984 B,
/// against the 983 B 11-record Codec 8 frame). Both sides check their CRC and decode every
/// record to owned values.
fn gt06_vs_teltonika(c: &mut Criterion) {
    for (name, gt06, tel) in common::gt06_pairs() {
        let mut group = c.benchmark_group(format!("gt06_vs_teltonika/{name}"));
        group.throughput(Throughput::Bytes(gt06.len() as u64));
        group.bench_function("gt06", |b| {
            let mut d = common::Gt06::new();
            b.iter(|| black_box(d.decode(black_box(&gt06))));
        });
        group.throughput(Throughput::Bytes(tel.len() as u64));
        group.bench_function("teltonika", |b| {
            let mut tg = common::Trackgate::new();
            b.iter(|| black_box(tg.decode(black_box(&tel))));
        });
        group.finish();
    }
}

criterion_group!(benches, decode, gt06_vs_teltonika);
criterion_main!(benches);
