#!/usr/bin/env python3
"""Syscalls per command a proxy makes, from `perf stat` of its `raw_syscalls:sys_enter`.

One fixed-rate run of the latency section's load per target and round (500 devices, 200
commands/s), targets interleaved; `perf stat` counts the proxy's syscalls for 5 s in the
middle, divided by the commands sent meanwhile (200 a second). Background traffic (the
devices' heartbeats and status reports) is in the count, the same for every target. Needs
`perf` (Debian `linux-perf`) and root or perf_event_paranoid <= 1.

    BIN=target/release python3 scripts/bench_syscalls.py [--tls] [--rounds 2] [haproxy legacy new]
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

WINDOW_S = 5
RATE = 200


def measure(kind, tls):
    started = {}

    def during(p, t, line):
        if "perf" not in started and t > 6:
            started["perf"] = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-p", str(p.proc.pid),
                 "--", "sleep", str(WINDOW_S)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    rep = bench.load_run(kind, tls, 500, RATE, "14s", "3s", during=during)
    rep["proxy"].stop()
    if "perf" not in started:
        raise SystemExit(f"{kind}: the run ended before perf started")
    _, err = started["perf"].communicate()
    try:
        count = int(err.strip().splitlines()[-1].split(",")[0])
    except (IndexError, ValueError):
        raise SystemExit(f"perf stat gave no count: {err.strip()}")
    cpu = None
    if rep["proxy_cpu_s"] is not None and rep["cpu_commands"]:
        cpu = rep["proxy_cpu_s"] / rep["cpu_commands"] * 1e5
    return rep["commands"]["p50_ms"], count / (WINDOW_S * RATE), cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help="haproxy, legacy, new (default all three)")
    ap.add_argument("--tls", action="store_true", help="TLS on both legs (default plaintext)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    args = ap.parse_args()
    kinds = args.targets or ["haproxy", "legacy", "new"]
    unknown = [k for k in kinds if k not in ("haproxy", "legacy", "new")]
    if unknown:
        ap.error(f"unknown target {unknown[0]!r}: choose from haproxy, legacy, new")
    tls, rounds = args.tls, args.rounds
    print("| target | round | legs | p50 ms | syscalls / command | CPU s / 100k commands |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in range(rounds):
        for kind in kinds:
            p50, per, cpu = measure(kind, tls)
            print(f"| {kind} | {r + 1} | {'TLS' if tls else 'plain'} | {p50:.3f} | {per:.1f} | "
                  f"{'-' if cpu is None else f'{cpu:.1f}'} |", flush=True)


if __name__ == "__main__":
    main()
