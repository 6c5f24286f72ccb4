#!/usr/bin/env bash
# The docker-compose topology without Docker: redis-server, three wsrelay nodes and
# nginx in front of them (rendered from deploy/nginx.conf.template), all on loopback.
# Runs until Ctrl-C, then stops everything it started.
#
#   ./scripts/local-cluster.sh            # then open http://127.0.0.1:8080
#
# Environment: LB_PORT (8080), REDIS_PORT (6390), NODE_PORTS ("8081 8082 8083"),
# WSRELAY_BIN (default: builds target/release/wsrelay), NO_WEBSOCKET=1 (nginx refuses
# WebSocket upgrades, as some proxies do: clients fall back to SSE or HTTP streaming). Needs redis-server and nginx
# (Debian: apt-get install redis-server nginx-light).
set -euo pipefail
cd "$(dirname "$0")/.."

LB_PORT=${LB_PORT:-8080}
REDIS_PORT=${REDIS_PORT:-6390}
NODE_PORTS=${NODE_PORTS:-"8081 8082 8083"}

for tool in redis-server nginx; do
  command -v "$tool" >/dev/null 2>&1 || { echo "local-cluster: $tool not found (apt-get install redis-server nginx-light)" >&2; exit 1; }
done
if [ -z "${WSRELAY_BIN:-}" ]; then
  cargo build --release --locked --bin wsrelay
  WSRELAY_BIN=target/release/wsrelay
fi

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
  trap - EXIT INT TERM
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

wait_port() {
  for _ in $(seq 1 200); do
    (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "local-cluster: nothing listens on port $1" >&2
  return 1
}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT"

i=0
: > "$work/upstreams"
for port in $NODE_PORTS; do
  i=$((i + 1))
  WSRELAY_LISTEN="127.0.0.1:$port" WSRELAY_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" WSRELAY_NODE_ID="node$i" \
    WSRELAY_HISTORY_SIZE=100 WSRELAY_CONFIG=deploy/wsrelay.toml \
    "$WSRELAY_BIN" 2>"$work/node$i.log" &
  pids+=($!)
  echo "        server 127.0.0.1:$port max_fails=1 fail_timeout=2s;" >> "$work/upstreams"
done
for port in $NODE_PORTS; do wait_port "$port"; done

mkdir -p "$work/temp"
sed -e "/@UPSTREAMS@/{r $work/upstreams" -e 'd}' \
    -e "s|@LISTEN@|127.0.0.1:$LB_PORT|" \
    -e "s|@PID@|$work/nginx.pid|" \
    -e "s|@ERROR_LOG@|$work/nginx.log|" \
    -e "s|@TEMP@|$work/temp|g" \
    deploy/nginx.conf.template > "$work/nginx.conf"
if [ "${NO_WEBSOCKET:-}" = 1 ]; then
  sed -i 's|^        location / {|&\n            if ($http_upgrade ~* websocket) { return 403; }|' "$work/nginx.conf"
fi
nginx -t -q -c "$work/nginx.conf"
nginx -c "$work/nginx.conf"
wait_port "$LB_PORT"

echo "ready: http://127.0.0.1:$LB_PORT (nodes on $NODE_PORTS, Redis on $REDIS_PORT; logs in $work)"
wait "${pids[0]}"
