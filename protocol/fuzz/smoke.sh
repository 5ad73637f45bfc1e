#!/usr/bin/env bash
# `make fuzz-smoke`: builds every fuzz target and runs each briefly from the vector-seeded corpus,
# so the targets keep compiling and the decoders meet their invariants on fresh inputs in CI.
# FUZZ_SECONDS sets the time per target (default 10). libFuzzer's chatter goes to a log that is
# printed in full only when a target fails.
set -euo pipefail
cd "$(dirname "$0")"
python3 seed-corpus.py
cargo fuzz build --sanitizer none
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in envelope avl login udp gt06_frame gt06_packet; do
  if cargo fuzz run "$target" --sanitizer none -- -max_total_time="${FUZZ_SECONDS:-10}" >"$log" 2>&1; then
    echo "fuzz $target: $(grep -E '^Done [0-9]+ runs' "$log" || echo 'done')"
  else
    cat "$log"
    echo "fuzz $target: FAILED (crash input under protocol/fuzz/artifacts/$target/)"
    exit 1
  fi
done
