#!/usr/bin/env bash
# Two builds side by side: runs scripts/bench.sh for each, interleaved (A, B, A, B, …), so drift
# of the machine during the session hits both alike.
#
#   bash scripts/bench-ab.sh /tmp/before /tmp/after        # dirs holding cync-gateway, cync-sim
#   ROUNDS=3 DURATION=60s bash scripts/bench-ab.sh A B
#
# Make a build's dir with: cargo build --release && cp target/release/cync-{gateway,sim} DIR.
# Other variables (DEVICES, RATE, DURATION, …) pass through to bench.sh. Not part of the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?usage: bench-ab.sh DIR_A DIR_B}
b=${2:?usage: bench-ab.sh DIR_A DIR_B}
for d in "$a" "$b"; do
  for bin in cync-gateway cync-sim; do
    [ -x "$d/$bin" ] || { echo "error: $d/$bin missing" >&2; exit 2; }
  done
done
rounds=${ROUNDS:-2}
for r in $(seq 1 "$rounds"); do
  for d in "$a" "$b"; do
    echo "=== round $r of $rounds: $d"
    BIN="$d" bash scripts/bench.sh
  done
done
