#!/usr/bin/env bash
# `make fuzz-smoke`: builds every fuzz target and runs each briefly from the vector-seeded corpus,
# so the targets keep compiling and the decoders meet their invariants on fresh inputs in CI.
# FUZZ_SECONDS sets the time per target (default 15).
set -euo pipefail
cd "$(dirname "$0")"
python3 seed-corpus.py
cargo fuzz build --sanitizer none
for target in envelope avl login udp; do
  cargo fuzz run "$target" --sanitizer none -- -max_total_time="${FUZZ_SECONDS:-15}"
done
