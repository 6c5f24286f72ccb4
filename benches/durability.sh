#!/bin/sh
# Per-publish latency of POST /api/publish to a history channel with
# publish-durability `leader` and `replicas:1`, against a local master and one
# replica (BENCHMARKS.md, "Durable publishes"). Usage:
#   cargo build --release && benches/durability.sh target/release/wsrelay
set -eu
BIN=$(realpath "$1")
D=$(mktemp -d); M=16391; R=16392; P=18391
cleanup() { kill "$NODE" 2>/dev/null || true; kill "$(cat "$D/m.pid")" "$(cat "$D/r.pid")" 2>/dev/null || true; rm -rf "$D"; }
NODE=
trap cleanup EXIT
redis-server --port $M --bind 127.0.0.1 --save "" --appendonly no --dir "$D" --repl-diskless-sync-delay 0 --daemonize yes --pidfile "$D/m.pid" --logfile "$D/m.log"
redis-server --port $R --bind 127.0.0.1 --save "" --appendonly no --dir "$D" --replicaof 127.0.0.1 $M --daemonize yes --pidfile "$D/r.pid" --logfile "$D/r.log"
until redis-cli -p $M info replication | grep -q "state=online"; do sleep 0.1; done
cat > "$D/wsrelay.toml" <<TOML
[namespaces.lead]
history-size = 1000
[namespaces.dur]
history-size = 1000
publish-durability = "replicas:1"
TOML
RUST_LOG=warn "$BIN" --listen 127.0.0.1:$P --redis-url redis://127.0.0.1:$M --config "$D/wsrelay.toml" --api-key 0123456789abcdef &
NODE=$!
until curl -sf http://127.0.0.1:$P/readyz >/dev/null; do sleep 0.1; done
python3 - $P <<'PY'
import http.client, json, sys, time, statistics
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
headers = {"Authorization": "Bearer 0123456789abcdef", "Content-Type": "application/json"}
def run(ch, n):
    lat = []
    for i in range(n):
        t = time.perf_counter()
        conn.request("POST", "/api/publish", json.dumps({"ch": ch, "data": {"n": i}}), headers)
        r = conn.getresponse(); r.read()
        assert r.status == 200, r.status
        lat.append((time.perf_counter() - t) * 1e6)
    lat.sort()
    return statistics.mean(lat), lat[n // 2], lat[int(n * 0.99)]
for rnd in range(2):
    for ch in ("lead:bench", "dur:bench"):
        run(ch, 200)  # warm-up
        mean, p50, p99 = run(ch, 2000)
        print(f"round {rnd} {ch:10s} 2000 sequential publishes: mean {mean:4.0f} µs  p50 {p50:4.0f} µs  p99 {p99:4.0f} µs")
PY
