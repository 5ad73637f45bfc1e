#!/usr/bin/env bash
# What Redis pays per record when the listener feeds it (docs/benchmarks.md "One script call per
# partition"): redis-server runs under callgrind, `trackgate listen` in front of it and
# `trackgate simulate` (200 devices, 10 records/frame, as fast as acked) drive it. Instructions
# are stable on a busy machine, unlike wall clock; compare with simulator/bench/store.sh's
# CALLGRIND=1 figure for the same calls replayed, to see what the listener's way of sending
# adds (connections, smaller reads, the command path's own commands).
#
#   simulator/bench/listener_redis_cost.sh [path/to/trackgate]     (SIM_BIN: the simulator's binary)
set -euo pipefail

BIN=${1:-target/release/trackgate}
SIM_BIN=${SIM_BIN:-$BIN}
REDIS_PORT=${REDIS_PORT:-16600}
DEVICE_PORT=${DEVICE_PORT:-17300}
ADMIN_PORT=${ADMIN_PORT:-19300}
SECONDS_RUN=${SECONDS_RUN:-20}
WARM=${WARM:-5}
WORK=$(mktemp -d)
REDIS_PID=""
LISTENER_PID=""
cleanup() {
  [[ -n "$LISTENER_PID" ]] && kill -9 "$LISTENER_PID" 2>/dev/null || true
  [[ -n "$REDIS_PID" ]] && kill -9 "$REDIS_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }
stored() {
  local n=0
  for p in 0 1 2 3; do n=$((n + $(rcli XLEN "trackgate:{bench:$p}:readings"))); done
  echo "$n"
}
export TRACKGATE_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/" RUST_LOG=${RUST_LOG:-warn}

python3 - "$WORK/shard.json" "$DEVICE_PORT" <<'PY'
import json, sys
json.dump({"pool": "bench", "shard": 0, "mode": "shared", "ports": [{"port": int(sys.argv[2])}],
  "devices": [str(356000000000000 + i) for i in range(200)],
  "limits": {"maxConnections": 20000, "acceptRatePerSecond": 100000},
  "redis": {"streamPrefix": "trackgate", "partitions": 4, "maxLen": 1000000}}, open(sys.argv[1], "w"))
PY
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg" \
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" \
  >/dev/null 2>"$WORK/valgrind.log" &
REDIS_PID=$!
disown
until rcli ping >/dev/null 2>&1; do sleep 0.2; done
"$BIN" listen --config "$WORK/shard.json" --admin-addr "127.0.0.1:${ADMIN_PORT}" --bind 127.0.0.1 \
  2>"$WORK/listener.log" &
LISTENER_PID=$!
disown
until (exec 3<>"/dev/tcp/127.0.0.1/${DEVICE_PORT}") 2>/dev/null; do sleep 0.1; done
# One run: the first WARM seconds fill every device's dedup window, the next SECONDS_RUN are
# counted. (A second run would restart the devices' clocks at the wall clock, behind what the
# first stored, and send Redis down the script's lookup path instead of the usual one.)
"$SIM_BIN" simulate --config "$WORK/shard.json" --records-per-frame 10 \
  --duration "$((WARM + SECONDS_RUN + 2))s" >"$WORK/sim.txt" &
SIM_PID=$!
sleep "$WARM"
BEFORE=$(stored)
callgrind_control -i on "$REDIS_PID" >/dev/null
sleep "$SECONDS_RUN"
callgrind_control -i off "$REDIS_PID" >/dev/null
AFTER=$(stored)
wait "$SIM_PID"
grep -E 'acked' "$WORK/sim.txt"
callgrind_control -d "$REDIS_PID" >/dev/null
# Frames per script call: Redis runs ~50x slower under callgrind and the listener's calls come
# out a different size than at full speed (smaller, as measured: 6.6-8.2 against 10.4; listener.sh
# prints the full-speed figure).
CALLS=$(rcli INFO commandstats | tr -d '\r' |
  awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {s += $3} END {print s + 0}')
IR=$(grep -h '^totals:' "$WORK/cg"* | awk '{s += $2} END {print s}')
python3 -c "n = $AFTER - $BEFORE; print(f'{n:,} records stored; {$IR / n:,.0f} redis-server instructions per record; '
      f'{$AFTER / 10 / max($CALLS, 1):.1f} frames per script call')"
