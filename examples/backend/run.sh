#!/usr/bin/env bash
# The example application in one command: one relay node (its in-process broker, no
# Redis) that asks the backend (app.py) about every user, and the backend.
#
#   ./examples/backend/run.sh    # then open http://127.0.0.1:8080/?app=http://127.0.0.1:5000
#
# Environment: RELAY_PORT (8080), BACKEND_PORT (5000), BACKEND_DB (.cache/backend-chat.db),
# WSRELAY_BIN (default: builds target/release/wsrelay). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."

RELAY_PORT=${RELAY_PORT:-8080}
BACKEND_PORT=${BACKEND_PORT:-5000}
export BACKEND_DB=${BACKEND_DB:-.cache/backend-chat.db}
# A server API key of this run's own, for the backend's /admin/kick and /admin/revoke.
RELAY_API_KEY=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

python=.cache/pyenv/bin/python
if [ ! -x "$python" ] || ! "$python" -c "import flask" 2>/dev/null; then
  echo "run.sh: installing Flask (PyPI) into .cache/pyenv" >&2
  python3 -m venv .cache/pyenv
  .cache/pyenv/bin/pip install --quiet -r examples/backend/requirements.txt
fi
if [ -z "${WSRELAY_BIN:-}" ]; then
  cargo build --release --locked --bin wsrelay
  WSRELAY_BIN=target/release/wsrelay
fi

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

backend="http://127.0.0.1:$BACKEND_PORT"
proxies=()
for proxy in connect refresh subscribe publish rpc; do
  proxies+=("--proxy-$proxy-url" "$backend/relay/$proxy")
done
"$WSRELAY_BIN" --listen "127.0.0.1:$RELAY_PORT" --config examples/backend/wsrelay.toml \
  --api-key "$RELAY_API_KEY" "${proxies[@]}" &
pids+=($!)
"$python" examples/backend/app.py --port "$BACKEND_PORT" \
  --relay-api "http://127.0.0.1:$RELAY_PORT" --relay-api-key "$RELAY_API_KEY" &
pids+=($!)

echo "open http://127.0.0.1:$RELAY_PORT/?app=$backend (log in as admin to kick: see examples/backend/README.md)"
wait -n
