#!/usr/bin/env bash
# Runs the fault suite (tests/faults.rs) and prints its results as the Markdown
# table of docs/protocol.md's "Delivery guarantees": one row per fault, one column
# per topology; each cell is what every subscriber got (delivered: every acked
# message once, in order; gap: what was lost reported) and how many publishes were
# refused (`unavailable`) while the fault lasted. A run that breaks the guarantee
# fails the suite, so a table is only printed from a passing run.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --locked --test faults -- --nocapture --test-threads 1 "$@" >"$out" 2>&1 || {
  grep -E 'panicked|fault-table|^  |^node ' "$out" >&2
  sed -n '/^failures:/,$p' "$out" >&2
  exit 1
}
# With one test thread, a test's output follows its name on the same line.
grep -o 'fault-table |.*' "$out" | awk -F' [|] ' '
  {
    topo = $2; fault = $3; outcome = $4; refused = $6
    sub(/^refused /, "", refused)
    cell = outcome (refused > 0 ? ", " refused " refused" : "")
    if (!(fault in seen)) { seen[fault] = 1; order[++n] = fault }
    table[fault, topo] = cell
  }
  END {
    split("Memory Redis Shards Sentinel Cluster", topos, " ")
    printf "| fault |"; for (t = 1; t <= 5; t++) printf " %s |", topos[t]; print ""
    printf "|---|"; for (t = 1; t <= 5; t++) printf "---|"; print ""
    for (i = 1; i <= n; i++) {
      printf "| %s |", order[i]
      for (t = 1; t <= 5; t++) {
        c = table[order[i], topos[t]]
        printf " %s |", (c == "" ? "—" : c)
      }
      print ""
    }
  }'
