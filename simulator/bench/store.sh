#!/usr/bin/env bash
# Store benchmarks for docs/benchmarks.md ("## Store"): what Redis pays per record for today's
# store script, for trackgate 0.1.0's, and for plain XADDs of the same entries, side by side in
# one run on one redis-server. The commands are the listener's own (tests/examples/store_calls.rs
# builds them with its code from simulated devices) replayed with `redis-cli --pipe`: one
# connection, pipelined, as the listener's publisher sends them. redis-benchmark cannot play
# them: its only variation is __rand_int__, and the script's cost depends on what a device
# really sends (time running forward, fingerprints of real records).
#
#   cargo build --release -p trackgate-simulator --example store_calls
#   simulator/bench/store.sh [variant...]        (default: xadd v1 current)
#
# Per variant: records/s through Redis (wall clock), Redis CPU per record (user + system, from
# /proc), dedup memory per device and stream memory per entry. CALLGRIND=1 counts redis-server
# instructions per record instead (valgrind; stable on a busy machine, ~50x slower: use fewer
# frames).
# Knobs (env): FRAMES=50000 WARM=10000 DEVICES=200 RPF=10 FPC=16 CALLGRIND=0 REDIS_PORT=16500,
# REDIS_CPUS / CLIENT_CPUS (taskset lists: Redis on a core of its own, as beside a listener),
# PERF_DIR (a folder: `perf record` of redis-server while the measured calls run, to set beside
# listener.sh's).
set -euo pipefail

VARIANTS=${*:-xadd v1 current}
FRAMES=${FRAMES:-50000}
WARM=${WARM:-10000}
export DEVICES=${DEVICES:-200} RPF=${RPF:-10}
CALLGRIND=${CALLGRIND:-0}
REDIS_PORT=${REDIS_PORT:-16500}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GEN=${GEN:-$ROOT/target/release/examples/store_calls}
WORK=$(mktemp -d)
REDIS_PID=""
cleanup() {
  [[ -n "$REDIS_PID" ]] && kill -9 "$REDIS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
pin() { [[ -n "$1" ]] && echo taskset -c "$1"; }
read -ra PIN_REDIS <<<"$(pin "${REDIS_CPUS:-}")"
read -ra PIN_CLIENT <<<"$(pin "${CLIENT_CPUS:-}")"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(redis-server --version | cut -d' ' -f1-3)"
echo "devices $DEVICES, $RPF records/frame, $((FRAMES - WARM)) frames measured after $WARM"
for variant in $VARIANTS; do
  ARGS=(--port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK")
  if [[ "$CALLGRIND" == 1 ]]; then
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.$variant" \
      redis-server "${ARGS[@]}" >/dev/null 2>"$WORK/valgrind.log" &
  else
    "${PIN_REDIS[@]}" redis-server "${ARGS[@]}" >/dev/null &
  fi
  REDIS_PID=$!
  until rcli ping >/dev/null 2>&1; do sleep 0.1; done
  SHA=""
  [[ "$variant" == current ]] && SHA=$(rcli -x SCRIPT LOAD <"$ROOT/api/src/store_readings.lua")
  [[ "$variant" == v1 ]] && SHA=$(rcli -x SCRIPT LOAD <"$ROOT/tests/fixtures/store_readings_v1.lua")
  "$GEN" "$variant" "$FRAMES" "$WARM" "$WORK/$variant" $SHA
  rcli --pipe <"$WORK/$variant/warm.resp" >/dev/null
  MEM0=$(rcli INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
  [[ "$CALLGRIND" == 1 ]] && callgrind_control -i on "$REDIS_PID" >/dev/null
  T0=$(date +%s.%N)
  C0=$(cpu_ticks "$REDIS_PID")
  PERF_PID=""
  if [[ -n "${PERF_DIR:-}" ]]; then
    perf record -q -e cpu-clock -F 999 -g -p "$REDIS_PID" -o "$PERF_DIR/store.$variant.data" 2>/dev/null &
    PERF_PID=$!
  fi
  "${PIN_CLIENT[@]}" redis-cli -p "$REDIS_PORT" --pipe <"$WORK/$variant/measure.resp" >"$WORK/pipe.log"
  [[ -n "$PERF_PID" ]] && { kill -INT "$PERF_PID"; wait "$PERF_PID" || true; }
  C1=$(cpu_ticks "$REDIS_PID")
  T1=$(date +%s.%N)
  if [[ "$CALLGRIND" == 1 ]]; then
    callgrind_control -i off "$REDIS_PID" >/dev/null
    callgrind_control -d "$REDIS_PID" >/dev/null
  fi
  grep -q 'errors: 0' "$WORK/pipe.log" || { cat "$WORK/pipe.log"; echo "$variant: Redis answered errors"; exit 1; }
  RECORDS=$(((FRAMES - WARM) * RPF))
  XLEN=0
  for p in 0 1 2 3; do XLEN=$((XLEN + $(rcli XLEN "trackgate:{bench:$p}:readings"))); done
  # Dedup memory of one device, averaged over ten, and stream memory per entry.
  DEDUP=0
  for d in 0 1 2 3 4 5 6 7 8 9; do
    IMEI=$((356000000000000 + d)); P=$((IMEI % 4))
    KEY="trackgate:{bench:$P}:dedup:$IMEI"; [[ "$variant" == v1 ]] && KEY="trackgate:{bench:$P}:seen:$IMEI"
    DEDUP=$((DEDUP + $(rcli MEMORY USAGE "$KEY" | sed 's/^$/0/')))
  done
  STREAM=0
  for p in 0 1 2 3; do STREAM=$((STREAM + $(rcli MEMORY USAGE "trackgate:{bench:$p}:readings" SAMPLES 0))); done
  MEM1=$(rcli INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
  rcli SHUTDOWN NOSAVE >/dev/null 2>&1 || true
  wait "$REDIS_PID" 2>/dev/null || true
  REDIS_PID=""
  if [[ "$CALLGRIND" == 1 ]]; then
    IR=$(grep -h '^totals:' "$WORK/cg.$variant"* | awk '{s += $2} END {print s}')
    python3 -c "print(f'$variant: {$IR / $RECORDS:,.0f} redis-server instructions per record; entries {$XLEN:,}')"
  else
    python3 -c "
wall = $T1 - $T0; cpu = ($C1 - $C0) / $(getconf CLK_TCK)
print(f'$variant: {$RECORDS / wall:,.0f} records/s, Redis CPU {cpu * 1e6 / $RECORDS:.2f} us/record '
      f'({cpu / wall * 100:.0f}% of a core); entries {$XLEN:,}; '
      f'dedup {$DEDUP / 10:,.0f} B/device; stream {$STREAM / $XLEN:.0f} B/entry; '
      f'used_memory +{($MEM1 - $MEM0) / $RECORDS:.0f} B/record')"
  fi
done
