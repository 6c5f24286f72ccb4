#!/usr/bin/env bash
# Runs the README's zero-setup command exactly as written (`cargo run --release`) and
# waits until the node it starts answers /readyz on the default address, then stops
# it. CI runs this so the quick start cannot break unnoticed.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bins
log=$(mktemp)
# A process group of its own, so the node cargo started stops with it.
setsid cargo run --release --locked >"$log" 2>&1 &
group=$!
trap 'kill -TERM -- -"$group" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 200); do
  if ./target/release/wsrelay healthcheck >/dev/null 2>&1; then
    echo "ok: cargo run --release serves a ready node on 127.0.0.1:8080"
    exit 0
  fi
  if ! kill -0 "$group" 2>/dev/null; then
    echo "quickstart-check: cargo run --release exited:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "quickstart-check: no ready node on 127.0.0.1:8080 within 20 s:" >&2
cat "$log" >&2
exit 1
