#!/usr/bin/env bash
# Side-by-side benchmark, one run: the same simulated fleet and command load straight to the
# fake add-on (direct), through HAProxy in TCP mode, and through cync-gateway on the legacy
# path and on the new path. Reports command latency as the add-on sees it (command sent ->
# device's f9 reply back), success, and the proxy process's CPU time and peak memory.
#
#   bash scripts/bench.sh                      # defaults below
#   DEVICES=1000 RATE=400 DURATION=60s bash scripts/bench.sh
#   BIN=/tmp/old-build bash scripts/bench.sh  # another build's binaries
#
# Installs haproxy (Debian package) if it is missing. Not part of the test suite.
set -euo pipefail

DEVICES=${DEVICES:-500}
RATE=${RATE:-200}
DURATION=${DURATION:-30s}
WARMUP=${WARMUP:-3s}
SEED=${SEED:-1}

cd "$(dirname "$0")/.."
if ! command -v haproxy >/dev/null 2>&1; then
    echo "bench: installing haproxy" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get install -y haproxy >/dev/null 2>&1 || {
        $SUDO apt-get update >/dev/null && $SUDO apt-get install -y haproxy >/dev/null
    }
fi
# BIN=<dir with cync-gateway and cync-sim> benchmarks another build (e.g. the one before a
# change); by default this tree's release build.
if [ -z "${BIN:-}" ]; then
    cargo build --release --quiet
    BIN=target/release
fi
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_port() {
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench: nothing listening on $1" >&2
    return 1
}

# run NAME TARGET_PORT ADDON_PORT [PID]: one load run; prints one table row.
run() {
    local name=$1 target=$2 addon=$3 pid=${4:-}
    local t0=0
    [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
    "$BIN/cync-sim" load --target "127.0.0.1:$target" --addon-listen "127.0.0.1:$addon" \
        --devices "$DEVICES" --rate "$RATE" --duration "$DURATION" --warmup "$WARMUP" \
        --seed "$SEED" >"$WORK/$name.json" 2>"$WORK/$name.err"
    local cpu="-" rss="-"
    if [ -n "$pid" ]; then
        cpu=$(python3 -c "print(f'{($(cpu_ticks "$pid") - $t0) / $(getconf CLK_TCK):.2f}')")
        rss=$(awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
    fi
    python3 - "$WORK/$name.json" "$name" "$cpu" "$rss" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["commands"]
print(f"| {sys.argv[2]} | {c['sent']} | {100 * r['success_ratio']:.2f} % | {c['p50_ms']:.3f} | "
      f"{c['p90_ms']:.3f} | {c['p99_ms']:.3f} | {c['max_ms']:.1f} | {sys.argv[3]} | {sys.argv[4]} |")
PY
}

echo "devices $DEVICES, $RATE commands/s for $DURATION after a $WARMUP warm-up, seed $SEED; $(nproc) cores" >&2
echo "| path | commands | success | p50 ms | p90 ms | p99 ms | max ms | proxy CPU s | proxy peak RSS MiB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"

# Direct: devices dial the add-on.
AP=$(port)
run direct "$AP" "$AP"

# HAProxy, TCP mode.
AP=$(port); HP=$(port)
cat >"$WORK/haproxy.cfg" <<EOF
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 3s
    timeout client 10m
    timeout server 10m
frontend devices
    bind 127.0.0.1:$HP
    default_backend addon
backend addon
    server addon 127.0.0.1:$AP
EOF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
HPID=$!
wait_port "$HP"
run haproxy "$HP" "$AP" "$HPID"
kill "$HPID"; wait "$HPID" 2>/dev/null || true

# cync-gateway, legacy then new path.
for path in legacy new; do
    AP=$(port); GP=$(port); MP=$(port)
    percent=0
    [ "$path" = new ] && percent=100
    cat >"$WORK/gw-$path.toml" <<EOF
[listen]
devices = "127.0.0.1:$GP"
metrics = "127.0.0.1:$MP"
[device_tls]
mode = "plain"
[upstream.legacy]
address = "127.0.0.1:$AP"
tls = false
[routing]
canary_percent = $percent
[logging]
level = "warn"
format = "json"
EOF
    "$BIN/cync-gateway" run --config "$WORK/gw-$path.toml" 2>"$WORK/gw-$path.log" &
    GPID=$!
    wait_port "$GP"
    run "gateway ($path path)" "$GP" "$AP" "$GPID"
    kill -TERM "$GPID"; wait "$GPID" 2>/dev/null || true
done
