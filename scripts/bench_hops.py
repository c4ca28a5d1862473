#!/usr/bin/env python3
"""Where a proxy spends the time of one hop, from its own syscalls.

For each target, one fixed-rate run of the latency section's load (plaintext, 500 devices,
200 commands/s) with `perf record` of the proxy's `raw_syscalls` for 5 s in the middle. Every
wake-up of the proxy that brings events (`epoll_wait` returning > 0) is cut at its syscalls:

- wake -> read: from `epoll_wait` returning to the first `recvfrom`/`read` (the event loop's
  own dispatch: for the gateway, tokio's driver and scheduler);
- read -> write: from that read returning to the next `sendto`/`write` (decoding, metrics,
  bookkeeping: what the proxy does with the bytes before passing them on);
- write -> next: from that write returning to the next syscall (what it does afterwards).

Each is user-space time on the path of a forwarded frame; the kernel's part (the syscalls
themselves) is left out, and is the same work for every proxy. `perf` adds its own cost to
every syscall, equally for all targets, so compare the targets with one another, not with
the latency tables. Needs `perf` (Debian `linux-perf`) and root or perf_event_paranoid <= 1.

    BIN=target/release python3 scripts/bench_hops.py [haproxy legacy new ...] [--repeats 2]
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

EPOLL = {232, 281, 441}       # epoll_wait, epoll_pwait, epoll_pwait2 (x86_64)
WRITE = {1, 20, 44, 46}       # write, writev, sendto, sendmsg
READ = {0, 19, 45, 47}        # read, readv, recvfrom, recvmsg
LINE = re.compile(r"(\d+\.\d+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(?: \(.*\))?(?: = (-?\d+))?")


def hops(script_lines):
    """The three gaps of every wake-up, in microseconds."""
    wake_read, read_write, write_next = [], [], []
    state, last_exit, last_nr = None, None, None
    for line in script_lines:
        m = LINE.search(line)
        if not m:
            continue
        t, kind, nr = float(m.group(1)), m.group(2), int(m.group(3))
        if kind == "exit":
            if nr in EPOLL:
                state = "woke" if int(m.group(4) or 0) > 0 else None
            last_exit, last_nr = t, nr
            continue
        if state == "woke" and nr in READ:
            wake_read.append((t - last_exit) * 1e6)
            state = "read"
        elif state == "read" and nr in WRITE and last_nr in READ:
            read_write.append((t - last_exit) * 1e6)
            state = "wrote"
        elif state == "wrote":
            write_next.append((t - last_exit) * 1e6)
            state = None
    return wake_read, read_write, write_next


def q(xs, p):
    xs = sorted(xs)
    return xs[int(p * (len(xs) - 1))] if xs else float("nan")


def measure(kind, work):
    data = os.path.join(work, f"{kind}.data")
    started = {}

    def during(p, t, line):
        if "perf" not in started and t > 6:
            started["perf"] = subprocess.Popen(
                ["perf", "record", "-q", "-o", data, "-e",
                 "raw_syscalls:sys_enter,raw_syscalls:sys_exit", "-p", str(p.proc.pid), "--", "sleep", "5"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    rep = bench.load_run(kind, False, 500, 200, "14s", "3s", during=during)
    if "perf" in started:
        started["perf"].wait()
    rep["proxy"].stop()
    out = subprocess.run(["perf", "script", "-i", data, "-F", "time,event,trace", "--ns"],
                         capture_output=True, text=True)
    return rep["commands"]["p50_ms"], hops(out.stdout.splitlines())


def main():
    args = [a for a in sys.argv[1:]]
    repeats = 2
    if "--repeats" in args:
        i = args.index("--repeats")
        repeats = int(args[i + 1])
        del args[i:i + 2]
    kinds = args or ["haproxy", "legacy", "new"]
    work = tempfile.mkdtemp(prefix="cync-hops-")
    print("| target | run | p50 ms (under perf) | wakes | wake -> read µs p50 / p90 | read -> write µs p50 / p90 | write -> next µs p50 / p90 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in range(repeats):
        for kind in kinds:
            p50, (a, b, c) = measure(kind, work)
            cell = lambda xs: f"{q(xs, .5):.1f} / {q(xs, .9):.1f}"
            print(f"| {kind} | {r + 1} | {p50:.3f} | {len(a)} | {cell(a)} | {cell(b)} | {cell(c)} |", flush=True)
    subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
