#!/usr/bin/env bash
# Mutation testing of the pure cores: does each plausible bug (a changed operator, a function
# that returns a constant, a deleted statement) make a test fail? Not part of the README's test
# command (it rebuilds the crate once per mutant, about two hours on a 2-core machine); run it
# before calling a change to these files done, and compare with docs/testing.md.
#
#   bash scripts/mutants.sh                   every core file
#   bash scripts/mutants.sh src/control/router.rs     one file (or several)
#
# Installs cargo-mutants when missing. Results: mutants.out/ (caught.txt, missed.txt, ...),
# and a caught / missed / unviable summary per file printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-mutants >/dev/null 2>&1; then
  echo "== installing cargo-mutants"
  cargo install --locked cargo-mutants
fi

# cargo-mutants tests a copy of the tree; the tests find the real captures through this.
CYNC_CAPTURES="$(cd ../shared/captures && pwd)"
export CYNC_CAPTURES

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(
    src/control/router.rs
    src/protocol/codec.rs src/protocol/packet.rs src/protocol/tap.rs
    src/conn/transactions.rs
    src/conn/reliable/retry.rs src/conn/reliable/rto.rs src/conn/reliable/budget.rs
    src/conn/reliable/dedup.rs src/conn/reliable/queue.rs
    src/telemetry/slo.rs src/control/judge.rs
  )
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done

# The unit tests of these pure modules, plus the protocol vectors and the config table (fast,
# no sockets); the socket-level suites would multiply the run time by ten for little more.
# The targets go to every cargo call (-C), the build included: building the other twenty
# integration suites for each mutant would triple the run for tests that are not run.
cargo mutants "${args[@]}" --profile mutants --timeout 120 --output . \
  -C=--lib -C=--test=protocol_vectors -C=--test=config_validation || true

echo
echo "== summary per file (caught / missed / unviable / timeout)"
for f in "${files[@]}"; do
  c=$(grep -c "^$f:" mutants.out/caught.txt 2>/dev/null || true)
  m=$(grep -c "^$f:" mutants.out/missed.txt 2>/dev/null || true)
  u=$(grep -c "^$f:" mutants.out/unviable.txt 2>/dev/null || true)
  t=$(grep -c "^$f:" mutants.out/timeout.txt 2>/dev/null || true)
  printf '%-32s %4s caught %4s missed %4s unviable %4s timeout\n' "$f" "${c:-0}" "${m:-0}" "${u:-0}" "${t:-0}"
done
if [ -s mutants.out/missed.txt ]; then
  echo
  echo "== missed (each needs a test, or a reason it is harmless in docs/testing.md)"
  cat mutants.out/missed.txt
fi
