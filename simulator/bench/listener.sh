#!/usr/bin/env bash
# Listener benchmarks for docs/benchmarks.md ("## Listener"): one run, one machine, a real
# redis-server, the release `trackgate` binary as listener and as simulator.
#
#   cargo build --release -p trackgate
#   simulator/bench/listener.sh [path/to/trackgate] [part...]
#
# Parts (default: all): ceiling max latency idle.
#   ceiling  Redis running the listener's own store calls, replayed (simulator/bench/store.sh;
#            build its generator with `cargo build --release -p trackgate-simulator --example
#            store_calls`): the Redis ceiling.
#   max      records/s the listener stores (dedup on) with devices sending as fast as acked;
#            over the run's steady middle, records/s and the CPU per record of Redis, the
#            listener and the simulator (Redis's, to set beside the ceiling's).
#   latency  ack latency at 50% and 80% of the measured maximum (needs `max` in the same run,
#            or MAX_RATE=<records/s>).
#   idle     RSS per idle connection at IDLE_DEVICES connections, then SIGKILL + restart of the
#            listener and the time until every device is logged in again.
#
# Knobs (env): SIM_BIN=<trackgate binary for the simulator> DEVICES=200 RPF=10 SECONDS_MAX=20 SECONDS_LAT=15 IDLE_DEVICES=19000
# BENCH_CALLS=50000 (frames measured for the ceiling), PERF_DIR (a folder: `perf record` of
# redis-server over the steady middle of `max`, and of the ceiling's replay).
set -euo pipefail

BIN=${1:-target/release/trackgate}
shift || true
# The simulator binary; set it to compare two listener builds against the same devices.
SIM_BIN=${SIM_BIN:-$BIN}
PARTS=${*:-ceiling max latency idle}
DEVICES=${DEVICES:-200}
RPF=${RPF:-10}
SECONDS_MAX=${SECONDS_MAX:-20}
# CPU is sampled from 5 s in to 5 s before the end of `max`.
((SECONDS_MAX >= 12)) || { echo "SECONDS_MAX must be 12 or more" >&2; exit 1; }
SECONDS_LAT=${SECONDS_LAT:-15}
IDLE_DEVICES=${IDLE_DEVICES:-19000}
BENCH_CALLS=${BENCH_CALLS:-50000}
REDIS_PORT=${REDIS_PORT:-16400}
DEVICE_PORT=${DEVICE_PORT:-17100}
ADMIN_PORT=${ADMIN_PORT:-19100}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
export TRACKGATE_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/"
export RUST_LOG=${RUST_LOG:-warn}

REDIS_PID=""
LISTENER_PID=""
cleanup() {
  [[ -n "$LISTENER_PID" ]] && kill -9 "$LISTENER_PID" 2>/dev/null || true
  [[ -n "$REDIS_PID" ]] && kill "$REDIS_PID" 2>/dev/null || true
  [[ -s "$WORK/listener.log" ]] && tail -5 "$WORK/listener.log" >&2
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n=== %s\n' "$*"; }
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

# Optional CPU pinning (taskset lists), e.g. REDIS_CPUS=0 LISTENER_CPUS=1 SIM_CPUS=1: on a
# small machine the three processes otherwise preempt each other mid-command.
pin() { [[ -n "$1" ]] && echo taskset -c "$1"; }
read -ra PIN_REDIS <<<"$(pin "${REDIS_CPUS:-}")"
read -ra PIN_LISTENER <<<"$(pin "${LISTENER_CPUS:-}")"
read -ra PIN_SIM <<<"$(pin "${SIM_CPUS:-}")"

start_redis() {
  "${PIN_REDIS[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" >/dev/null &
  REDIS_PID=$!
  until rcli ping >/dev/null 2>&1; do sleep 0.05; done
}

# shard_config <file> <devices> <ports>: shared mode, IMEIs from 356000000000000 up.
shard_config() {
  python3 - "$1" "$2" "$3" "$DEVICE_PORT" <<'EOF'
import json, sys
path, n, ports, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
json.dump({
    "pool": "bench", "shard": 0, "mode": "shared",
    "ports": [{"port": first + i} for i in range(ports)],
    "devices": [str(356000000000000 + i) for i in range(n)],
    # No connection cap below the fd limit, and no accept-rate spreading: the benchmark
    # measures how fast one process can take the fleet back.
    "limits": {"maxConnections": 20000, "acceptRatePerSecond": 100000},
    "redis": {"streamPrefix": "trackgate", "partitions": 4, "maxLen": 1000000},
}, open(path, "w"))
EOF
}

start_listener() {
  "${PIN_LISTENER[@]}" "$BIN" listen --config "$1" --admin-addr "127.0.0.1:${ADMIN_PORT}" --bind 127.0.0.1 2>>"$WORK/listener.log" &
  LISTENER_PID=$!
  until (exec 3<>"/dev/tcp/127.0.0.1/${DEVICE_PORT}") 2>/dev/null; do sleep 0.02; done
}

connections_open() {
  curl -s "http://127.0.0.1:${ADMIN_PORT}/metrics" |
    awk '/^trackgate_listener_connections_open/ {s += $2} END {print s + 0}'
}

# A process's CPU (user + system) in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# One line: records stored, the CPU ticks of Redis, the listener and process $1, and the ticks
# cpu0 and cpu1 were busy (neither idle nor waiting on IO).
cpu_sample() {
  echo "$(records_stored) $(cpu_ticks "$REDIS_PID") $(cpu_ticks "$LISTENER_PID") $(cpu_ticks "$1")" \
    "$(awk '/^cpu[01] / {printf "%d ", $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat)"
}

records_stored() {
  curl -s "http://127.0.0.1:${ADMIN_PORT}/metrics" |
    awk '/^trackgate_listener_records_total/ {s += $2} END {printf "%d", s}'
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

start_redis

if [[ " $PARTS " == *" ceiling "* ]]; then
  say "ceiling: Redis running exactly the listener's store calls (simulator/bench/store.sh), ${DEVICES} devices, ${RPF} records/frame"
  DEVICES=$DEVICES RPF=$RPF FRAMES=$((BENCH_CALLS + BENCH_CALLS / 5)) WARM=$((BENCH_CALLS / 5)) \
    REDIS_PORT=$((REDIS_PORT + 1)) "$ROOT/simulator/bench/store.sh" current
fi

if [[ " $PARTS " == *" max "* || " $PARTS " == *" latency "* ]]; then
  shard_config "$WORK/shard.json" "$DEVICES" 1
  rcli FLUSHALL >/dev/null
  start_listener "$WORK/shard.json"
fi

if [[ " $PARTS " == *" max "* ]]; then
  say "max: ${DEVICES} devices, ${RPF} records/frame, as fast as acked, ${SECONDS_MAX}s, verified"
  rcli CONFIG RESETSTAT >/dev/null
  "${PIN_SIM[@]}" "$SIM_BIN" simulate --config "$WORK/shard.json" --records-per-frame "$RPF" \
    --duration "${SECONDS_MAX}s" --verify --json >"$WORK/max.json" &
  SIM_PID=$!
  # CPU per record stored, over the steady middle of the run (not the logins, nor the
  # verification's reads at the end): Redis's, to set beside the ceiling's, and the rest of
  # the machine's.
  sleep 5
  S0=$(cpu_sample "$SIM_PID"); T0=$(date +%s.%N)
  if [[ -n "${PERF_DIR:-}" ]]; then
    perf record -q -e cpu-clock -F 999 -g -p "$REDIS_PID" -o "$PERF_DIR/listener.data" -- \
      sleep $((SECONDS_MAX - 10)) 2>/dev/null
  else
    sleep $((SECONDS_MAX - 10))
  fi
  S1=$(cpu_sample "$SIM_PID"); T1=$(date +%s.%N)
  wait "$SIM_PID"
  python3 - "$WORK/max.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rep, v = r["report"], r["verification"]
l = rep["latency"]
print(f"max: {rep['records_per_second']:.0f} records/s, p50 {l['p50_us']/1000:.2f} ms, "
      f"p99 {l['p99_us']/1000:.2f} ms, p99.9 {l['p999_us']/1000:.2f} ms; "
      f"verify missing={v['missing']} duplicated={v['duplicated']}")
EOF
  MAX_RATE=$(python3 -c "import json;print(json.load(open('$WORK/max.json'))['report']['records_per_second'])")
  if [[ -n "${PERF_DIR:-}" ]]; then
    rcli INFO commandstats >"$PERF_DIR/commandstats.txt"
    curl -s "http://127.0.0.1:${ADMIN_PORT}/metrics" >"$PERF_DIR/metrics.txt"
  fi
  # How many frames the listener put in one store call (EVALSHA, EVAL after NOSCRIPT; the
  # command path's few scripts a second are counted too): what the ceiling should replay.
  CALLS=$(rcli INFO commandstats | tr -d '\r' |
    awk -F'[=,:]' '/^cmdstat_(evalsha|eval):/ {s += $3} END {print s + 0}')
  python3 - "$WORK/max.json" "$CALLS" "$S0" "$S1" "$T0" "$T1" "$(getconf CLK_TCK)" "$RPF" <<'EOF'
import json, sys
acked = json.load(open(sys.argv[1]))["report"]["records_acked"]
calls, rpf = int(sys.argv[2]), int(sys.argv[8])
d = [b - a for a, b in zip(map(int, sys.argv[3].split()), map(int, sys.argv[4].split()))]
secs, ticks, records = float(sys.argv[6]) - float(sys.argv[5]), int(sys.argv[7]), max(d[0], 1)
print(f"store calls: {calls:,}, {acked / rpf / max(calls, 1):.1f} frames per call; "
      f"steady: {d[0] / secs:.0f} records/s stored over {secs:.1f} s")
print("CPU per record stored: " + ", ".join(
    f"{name} {t / ticks * 1e6 / records:.2f} us ({t / ticks / secs:.0%} of a core)"
    for name, t in zip(("Redis", "listener", "simulator"), d[1:4]))
    + f"; cpu0 {d[4] / ticks / secs:.0%} busy, cpu1 {d[5] / ticks / secs:.0%} busy")
EOF
fi

if [[ " $PARTS " == *" latency "* ]]; then
  for pct in 50 80; do
    RATE=$(python3 -c "print(round(${MAX_RATE:?run max first or set MAX_RATE} * $pct / 100))")
    say "latency at ${pct}% of max: --rate ${RATE}"
    "${PIN_SIM[@]}" "$SIM_BIN" simulate --config "$WORK/shard.json" --records-per-frame "$RPF" --rate "$RATE" \
      --duration "${SECONDS_LAT}s" | grep -E 'acked|latency|errors'
  done
fi

if [[ -n "$LISTENER_PID" ]]; then
  kill -TERM "$LISTENER_PID"; wait "$LISTENER_PID" 2>/dev/null || true; LISTENER_PID=""
fi

if [[ " $PARTS " == *" idle "* ]]; then
  say "idle: ${IDLE_DEVICES} idle connections on 2 shared ports (ulimit -n $(ulimit -n))"
  shard_config "$WORK/idle.json" "$IDLE_DEVICES" 2
  rcli FLUSHALL >/dev/null
  start_listener "$WORK/idle.json"
  sleep 1
  BEFORE=$(rss_kb "$LISTENER_PID")
  "$BIN" simulate --config "$WORK/idle.json" --idle --duration 300s --drain 1s \
    --backoff-max 2s >"$WORK/idle.txt" 2>&1 &
  SIM_PID=$!
  T0=$(date +%s.%N)
  while (($(connections_open) < IDLE_DEVICES)); do sleep 0.1; done
  T1=$(date +%s.%N)
  sleep 2
  AFTER=$(rss_kb "$LISTENER_PID")
  python3 -c "
n=$IDLE_DEVICES; b=$BEFORE; a=$AFTER
print(f'login of {n} devices: {$T1-$T0:.2f} s; listener RSS {b} KiB -> {a} KiB: {(a-b)*1024/n:.0f} B per connection')"

  say "restart: SIGKILL the listener, start it again, wait for ${IDLE_DEVICES} logins"
  kill -9 "$LISTENER_PID"; wait "$LISTENER_PID" 2>/dev/null || true
  T2=$(date +%s.%N)
  start_listener "$WORK/idle.json"
  while (($(connections_open) < IDLE_DEVICES)); do sleep 0.1; done
  T3=$(date +%s.%N)
  python3 -c "print(f'all {$IDLE_DEVICES} devices logged in again {$T3-$T2:.2f} s after the kill')"
  kill -INT "$SIM_PID" 2>/dev/null || true
  wait "$SIM_PID" 2>/dev/null || true
fi
