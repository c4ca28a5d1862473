#!/usr/bin/env bash
# The benchmarks, side by side in one run: devices straight to the fake add-on (direct),
# through HAProxy in TCP mode, and through cync-gateway on the legacy and on the new path,
# in interleaved rounds, plaintext and with TLS on both legs. The method and every section are
# described in scripts/bench.py and docs/benchmarks.md; the results print as Markdown tables.
#
#   bash scripts/bench.sh                         # everything (about 25 minutes)
#   bash scripts/bench.sh --only latency,scale    # some sections
#   bash scripts/bench.sh --rounds 5 --duration 20s
#   BIN=/tmp/old-build bash scripts/bench.sh      # another build's binaries
#
# Installs haproxy (Debian package) if it is missing, builds in release mode. Not part of the
# test suite.
set -euo pipefail

cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null 2>&1; then
    echo "bench: installing haproxy" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get install -y haproxy >/dev/null 2>&1 || {
        $SUDO apt-get update >/dev/null && $SUDO apt-get install -y haproxy >/dev/null
    }
fi
command -v taskset >/dev/null 2>&1 || { echo "bench: taskset (util-linux) is needed" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=target/release
fi
# 8,000 idle devices through a proxy: 16,000 sockets for the proxy and as many for the
# generator; raise the soft limit to the hard one.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
BIN="$BIN" exec python3 scripts/bench.py "$@"
