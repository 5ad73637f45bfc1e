//! Allocation of large generated pools (goal: 100k devices ≤ 100 ms).
//!
//! `cargo bench -p trackgate-operator --bench allocate`
//!
//! - `fresh`: empty previous allocation (first reconcile, or a lost state);
//! - `steady`: previous = the last answer (every periodic reconcile);
//! - `plus1pct`: steady plus 1 % new devices (a fleet roll-out).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use trackgate_api::IdentificationMode;
use trackgate_operator::allocate::{Layout, PoolDevice, Previous, allocate};

fn devices(n: u64) -> Vec<PoolDevice> {
    // scattered IMEIs so the IMEI sort does real work
    (0..n)
        .map(|k| PoolDevice {
            imei: format!(
                "{:015}",
                350_000_000_000_000 + (k * 7_919_993) % 999_999_999_937
            ),
            pinned: (k % 1000 == 0).then_some(0),
        })
        .collect()
}

fn layout(mode: IdentificationMode, start: u16, end: u16, pps: u16) -> Layout {
    Layout {
        mode,
        start,
        end,
        exclude: vec![start + 7, start + 99],
        ports_per_shard: pps,
        devices_per_shard: 5_000,
    }
}

fn pin(mut d: Vec<PoolDevice>, l: &Layout) -> Vec<PoolDevice> {
    for (k, dev) in d.iter_mut().enumerate() {
        if dev.pinned.is_some() {
            dev.pinned = Some(l.start + 200 + (k / 1000) as u16);
        }
    }
    d
}

fn bench(c: &mut Criterion) {
    let cases = [
        (
            "dedicated_10k",
            layout(IdentificationMode::Dedicated, 10_000, 29_999, 50),
            10_000,
        ),
        // a port range holds at most 64,512 unprivileged ports: the rest are reported unallocated
        (
            "dedicated_100k",
            layout(IdentificationMode::Dedicated, 1_024, 65_535, 50),
            100_000,
        ),
        (
            "shared_100k",
            layout(IdentificationMode::Shared, 5_000, 5_999, 50),
            100_000,
        ),
    ];
    let mut group = c.benchmark_group("allocate");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    for (name, l, n) in cases {
        let d = pin(devices(n), &l);
        let first = allocate(&l, &d, &Previous::new());
        let prev = first.to_previous();
        let mut grown = d.clone();
        grown.extend(
            pin(devices(n + n / 100), &l)
                .into_iter()
                .skip(n as usize)
                .map(|mut x| {
                    x.pinned = None;
                    x
                }),
        );
        group.bench_function(format!("{name}/fresh"), |b| {
            b.iter(|| allocate(black_box(&l), black_box(&d), &Previous::new()))
        });
        group.bench_function(format!("{name}/steady"), |b| {
            b.iter(|| allocate(black_box(&l), black_box(&d), black_box(&prev)))
        });
        group.bench_function(format!("{name}/plus1pct"), |b| {
            b.iter(|| allocate(black_box(&l), black_box(&grown), black_box(&prev)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
