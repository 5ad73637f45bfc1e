#!/usr/bin/env bash
# Runs the gateway on this machine, no cluster: a local Redis, the example dedicated pool
# (deploy/examples/dedicated.yaml) served by `trackgate run`, and simulated Teltonika devices
# feeding it. Shows records arriving in Redis, the metrics, and how to read the stream; then
# keeps the gateway and a slow trickle of device data running until Ctrl-C.
#
#   REDIS_PORT=6379        Redis to use; one is started when none answers there
#   ADMIN_ADDR=127.0.0.1:9090
#   DEMO_SECONDS=0         stop after this many seconds of trickle (0 = until Ctrl-C)
#   PROFILE=dev            or release
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_cmd cc gcc
ensure_cmd redis-server redis-server
ensure_cmd redis-cli redis-tools
ensure_cmd curl curl

REDIS_PORT=${REDIS_PORT:-6379}
ADMIN_ADDR=${ADMIN_ADDR:-127.0.0.1:9090}
DEMO_SECONDS=${DEMO_SECONDS:-0}
PROFILE=${PROFILE:-dev}
POOL_FILE=deploy/examples/dedicated.yaml
POOL=fleet-dedicated
STATE=.trackgate-demo

cargo build --locked --profile "$PROFILE" -p trackgate
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")/trackgate"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  echo "== using the Redis already on port $REDIS_PORT"
else
  echo "== starting redis-server on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null &
  pids+=($!)
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
export TRACKGATE_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/"

echo "== trackgate run $POOL_FILE  (state: $STATE/, admin: http://$ADMIN_ADDR)"
"$bin" run "$POOL_FILE" --bind 127.0.0.1 --state-dir "$STATE" --admin-addr "$ADMIN_ADDR" &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://$ADMIN_ADDR/readyz" >/dev/null && break; sleep 0.1; done
curl -sf "http://$ADMIN_ADDR/readyz" >/dev/null || { echo "the gateway did not become ready"; exit 1; }
echo "== allocation (imei port), as the operator would persist it:"
cat "$STATE/$POOL"/shard-*/allocation.txt

echo "== 5 simulated devices, 10 s, 5 records a frame; then every acked record is checked in Redis"
"$bin" simulate --config "$STATE/$POOL/shard-0/shard.json" --rate 100 --records-per-frame 5 \
  --duration 10s --verify --redis-url "$TRACKGATE_REDIS_URL"

echo
echo "== where the data lands"
for key in $(redis-cli -p "$REDIS_PORT" --scan --pattern "trackgate:{$POOL:*}:readings" | sort); do
  echo "$key: $(redis-cli -p "$REDIS_PORT" XLEN "$key") entries"
done
first=$(redis-cli -p "$REDIS_PORT" --scan --pattern "trackgate:{$POOL:*}:readings" | sort | head -1)
echo "-- newest entry of $first:"
redis-cli -p "$REDIS_PORT" XREVRANGE "$first" + - COUNT 1
echo "-- device state (trackgate:{$POOL}:devices):"
redis-cli -p "$REDIS_PORT" HGETALL "trackgate:{$POOL}:devices" | head -6
echo "-- metrics (http://$ADMIN_ADDR/metrics):"
curl -s "http://$ADMIN_ADDR/metrics" | grep -E '^trackgate_listener_(records_total|logins_total|connections_open)' || true

cat <<EOF2

== read the stream yourself
  redis-cli -p $REDIS_PORT XRANGE '$first' - + COUNT 5
  redis-cli -p $REDIS_PORT XGROUP CREATE '$first' consumers 0          # a consumer group
  redis-cli -p $REDIS_PORT XREADGROUP GROUP consumers c1 COUNT 10 STREAMS '$first' '>'
  redis-cli -p $REDIS_PORT XRANGE 'trackgate:{$POOL}:events' - + COUNT 5   # logins, disconnects
  curl -s http://$ADMIN_ADDR/metrics | grep trackgate_
  $bin decode 000F333536333037303432343431303133             # what a device sent, as JSON
  $bin command --pool $POOL --imei <imei> getinfo             # a command to a device, its answer
EOF2

echo "== the gateway keeps running with a trickle of device data; Ctrl-C stops it"
trickle=(--duration "${DEMO_SECONDS}s")
[ "$DEMO_SECONDS" = 0 ] && trickle=(--duration 100000h)
"$bin" simulate --config "$STATE/$POOL/shard-0/shard.json" --rate 2 "${trickle[@]}" >/dev/null 2>&1 &
sim=$!
pids+=("$sim")

imei=$(awk 'NF { print $1; exit }' "$STATE/$POOL"/shard-0/allocation.txt)
sleep 2
echo "== a command to device $imei through Redis, and its answer (trackgate command)"
"$bin" command --redis-url "$TRACKGATE_REDIS_URL" --pool "$POOL" --imei "$imei" --wait-seconds 20 getver \
  || echo "(no answer: see the responses stream below)"
echo "-- the command's status changes (trackgate:{$POOL}:responses):"
redis-cli -p "$REDIS_PORT" XREVRANGE "trackgate:{$POOL}:responses" + - COUNT 3
wait "$sim" || true
