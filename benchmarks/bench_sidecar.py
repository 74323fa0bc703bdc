"""Sidecar throughput: lines/s from a file tail and from stdout capture, through parsing,
to the collector (and to a null file sink, the sidecar alone); sidecar CPU and peak memory.

    .venv/bin/python benchmarks/bench_sidecar.py [--lines 200000]

Each scenario runs `stanchion sidecar` as a real process. "lines/s" is wall time from the
sidecar's start until the last record is acknowledged (collector: stored); "lines per
sidecar CPU-second" divides by the sidecar's own user+system CPU time, start-up
included (one asyncio thread: that is the one-core figure). Peak memory is the
sidecar's maximum RSS (wait4). Loss is checked: the collector must hold exactly N
distinct records. In the stdout scenarios the child is `cat` of the same file.

Peers (Fluent Bit, Vector, Promtail) are not installed on this machine; the table says so
instead of inventing figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def make_lines(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "ts": "2024-05-01T10:00:00.123Z",
                        "level": "info" if i % 50 else "error",
                        "msg": f"GET /api/orders/{i} 200",
                        "seq": i,
                        "ms": 1.25,
                        "user": "u-17",
                    }
                )
                + "\n"
            )


def run(name: str, tmp: Path, n: int, data: Path, mode: str, sink: str) -> dict[str, object]:
    work = tmp / name
    work.mkdir()
    collector = None
    cport = free_port()
    if sink == "collector":
        collector = subprocess.Popen(
            [PY, "-m", "stanchion", "collector", "--listen", f"127.0.0.1:{cport}",
             "--store", f"sqlite:///{work / 'logs.db'}", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(cport)
        sink_toml = (
            f'[[sinks]]\nname = "out"\ntype = "collector"\nurl = "http://127.0.0.1:{cport}"\n'
            "batch_max_records = 10000\nbatch_max_bytes = 4194304\nbatch_timeout = 0.05\n"
        )
    else:
        sink_toml = (
            '[[sinks]]\nname = "out"\ntype = "file"\npath = "/dev/null"\n'
            "batch_max_records = 10000\nbatch_max_bytes = 4194304\nbatch_timeout = 0.05\n"
        )
    lport = free_port()
    cfg = work / "sidecar.toml"
    files = ""
    if mode == "file":
        shutil.copy(data, work / "app.log")
        files = f'[[files]]\nname = "app"\npaths = ["{work / "app.log"}"]\npoll_interval = 0.05\n'
    cfg.write_text(
        f'[sidecar]\nservice = "bench"\nstate_dir = "{work / "state"}"\n'
        f'listen = "127.0.0.1:{lport}"\npassthrough = false\ndrain_timeout = 60\n'
        f"{files}{sink_toml}"
    )
    cmd = [PY, "-m", "stanchion", "sidecar", "--config", str(cfg), "--log-level", "WARNING"]
    if mode == "stdout":
        cmd += ["--", "cat", str(data)]
    t0 = time.monotonic()
    side = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(lport)

    def delivered() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{lport}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith('stanchion_sidecar_records_out_total{sink="out"}'):
                        return int(float(line.rsplit(" ", 1)[1]))
        except OSError:
            pass
        return 0

    # wait4 gives the sidecar's own CPU time and peak RSS (not its child's)
    while True:
        pid, status, usage = os.wait4(side.pid, os.WNOHANG)
        if pid:  # stdout mode: the child ended, the sidecar drained and exited
            break
        if delivered() >= n:
            side.send_signal(signal.SIGTERM)
            _, status, usage = os.wait4(side.pid, 0)
            break
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"{name}: not done after 600 s")
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    side.returncode = os.waitstatus_to_exitcode(status)
    cpu, peak = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    stored = n
    collector_cpu = float("nan")
    if collector is not None:
        with urllib.request.urlopen(f"http://127.0.0.1:{cport}/health", timeout=30) as r:
            stored = json.loads(r.read())["records"]
        collector.send_signal(signal.SIGTERM)
        _, cstatus, cusage = os.wait4(collector.pid, 0)
        collector.returncode = os.waitstatus_to_exitcode(cstatus)
        collector_cpu = cusage.ru_utime + cusage.ru_stime
    return {
        "scenario": name,
        "lines": n,
        "wall_s": elapsed,
        "lines_per_s": n / elapsed,
        "sidecar_cpu_s": cpu,
        "lines_per_cpu_s": n / cpu if cpu else float("nan"),
        "peak_mb": peak,
        "collector_cpu_s": collector_cpu,
        "lost": n - stored,
    }


def _num(value: object) -> str:
    return "-" if not isinstance(value, float) or value != value else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=200_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    try:
        data = tmp / "lines.ndjson"
        make_lines(data, args.lines)
        rows = [
            run("file tail -> collector", tmp, args.lines, data, "file", "collector"),
            run("stdout -> collector", tmp, args.lines, data, "stdout", "collector"),
            run("file tail -> null sink", tmp, args.lines, data, "file", "null"),
            run("stdout -> null sink", tmp, args.lines, data, "stdout", "null"),
        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average before/after: {os.getloadavg()[0]:.1f}; cores: {os.cpu_count()}")
    print()
    print(
        "| scenario | lines | wall s | lines/s (wall) | sidecar CPU s | lines per sidecar "
        "CPU-s | sidecar peak MB | collector CPU s | lost |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['lines']:,} | {r['wall_s']:.2f} | {r['lines_per_s']:,.0f} "
            f"| {r['sidecar_cpu_s']:.2f} | {r['lines_per_cpu_s']:,.0f} | {r['peak_mb']:.0f} "
            f"| {_num(r['collector_cpu_s'])} | {r['lost']} |"
        )
    print("| Fluent Bit / Vector / Promtail | not installed on this machine | | | | | | | |")


if __name__ == "__main__":
    main()
