//! Decodes one bench frame (default: the ~1 KB one) N times with one contender of
//! `benches/decode.rs`, so that instruction counts can be compared on a loaded machine, where
//! wall-clock times are noise:
//!
//! ```sh
//! cargo build --profile bench -p trackgate-protocol --example decode_ir
//! for who in trackgate nom_evaluate nom_validate nom016; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect='decode_ir::run*' \
//!     target/release/examples/decode_ir $who 10000 2>&1 | grep Collected
//! done
//! ```
//!
//! Only `run` (the decode loop) is counted; divide by N for instructions per decode. A third
//! argument picks another frame by its bench name (e.g. `wiki_codec8e`). `gt06` decodes the
//! GT06 side of a `gt06_vs_teltonika` pair (`one_location`, default `about_1kb`).

use std::hint::black_box;

#[path = "../benches/common/mod.rs"]
mod common;

#[inline(never)]
fn run(who: &str, frame: &[u8], n: u32) {
    match who {
        "trackgate" => {
            let mut tg = common::Trackgate::new();
            for _ in 0..n {
                black_box(tg.decode(black_box(frame)));
            }
        }
        "nom_evaluate" => (0..n).for_each(|_| {
            black_box(common::nom_evaluate(black_box(frame)));
        }),
        "nom_validate" => (0..n).for_each(|_| {
            black_box(common::nom_validate(black_box(frame)));
        }),
        "gt06" => {
            let mut d = common::Gt06::new();
            for _ in 0..n {
                black_box(d.decode(black_box(frame)));
            }
        }
        "nom016" => (0..n).for_each(|_| {
            black_box(common::nom016(black_box(frame)));
        }),
        _ => panic!("usage: decode_ir trackgate|nom_evaluate|nom_validate|nom016|gt06 [N] [FRAME]"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let who = args.next().unwrap_or_else(|| "trackgate".into());
    let n = args
        .next()
        .map_or(10_000, |s| s.parse().expect("N is a count"));
    let mut frames = common::frames();
    if who == "gt06" {
        frames = common::gt06_pairs()
            .into_iter()
            .map(|(name, bytes, _)| (name.to_owned(), bytes))
            .collect();
    }
    let frame = match args.next() {
        Some(name) => frames.iter().find(|(n, _)| *n == name),
        None => frames.last(),
    };
    let (_, frame) = frame.expect("a frame of benches/common/mod.rs");
    run(&who, frame, n);
}
