"""Ambassador throughput and latency, side by side with nginx, measured with wrk on loopback.

Three targets, same backend, same wrk settings, one run:

  direct      wrk -> backend (nginx, 1 worker, `return 200`)
  nginx       wrk -> nginx reverse proxy (2 workers, upstream keepalive 64) -> backend
  ambassador  wrk -> stanchion ambassador (2 workers, SO_REUSEPORT) -> backend

For each: requests/s, p50 and p99 latency at a fixed concurrency, and p50 at
low load (1 connection) to give the added latency of each proxy. The
ambassador's CPU per proxied request is its processes' CPU time over the run
divided by the requests served.

Usage: .venv/bin/python benchmarks/bench_ambassador.py [--duration 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not ready")


def start_nginx(workdir: Path, name: str, body: str, workers: int) -> subprocess.Popen[bytes]:
    d = workdir / name
    (d / "logs").mkdir(parents=True)
    conf = d / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    {body}
}}
"""
    )
    return subprocess.Popen([NGINX, "-p", str(d), "-c", str(conf)], stderr=subprocess.DEVNULL)


def wrk(url: str, connections: int, duration: float, threads: int = 2) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration:g}s",
         "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    def lat(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else (v * 1000 if unit == "s" else v)

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": lat("50%"),
        "p99": lat("99%"),
        "requests": total,
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if sock_err else 0.0,
    }


def cpu_seconds(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def children(pid: int) -> list[int]:
    out = [pid]
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            out.append(int(p))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="ambassador workers")
    ap.add_argument("--low-repeats", type=int, default=5, help="low-load runs per target")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds at full load")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is not installed", file=sys.stderr)
        return 1
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ambassador-") as tmp:
        work = Path(tmp)
        try:
            backend = free_port()
            procs.append(
                start_nginx(
                    work,
                    "backend",
                    f"server {{ listen 127.0.0.1:{backend} backlog=4096; "
                    f'location / {{ return 200 "hello from the backend\\n"; }} }}',
                    1,
                )
            )
            nginx_port = free_port()
            procs.append(
                start_nginx(
                    work,
                    "proxy",
                    f"upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n"
                    f"server {{ listen 127.0.0.1:{nginx_port} backlog=4096; location / {{ "
                    "proxy_pass http://backend; proxy_http_version 1.1; "
                    'proxy_set_header Connection ""; } }',
                    2,
                )
            )
            amb_port, amb_admin = free_port(), free_port()
            cfg = work / "ambassador.toml"
            cfg.write_text(
                f'[listen]\naddress = "127.0.0.1:{amb_port}"\nworkers = {args.workers}\n'
                f'[admin]\naddress = "127.0.0.1:{amb_admin}"\n[log]\naccess = ""\n'
                f'[[upstreams]]\nname = "backend"\nendpoints = ["http://127.0.0.1:{backend}"]\n'
                '[[routes]]\nprefix = "/"\nupstream = "backend"\n'
                "[routes.retry]\nattempts = 2\n"
            )
            amb = subprocess.Popen(
                [sys.executable, "-m", "stanchion", "ambassador", "--config", str(cfg),
                 "--watch-interval", "0"],
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            procs.append(amb)
            for port in (backend, nginx_port, amb_port, amb_admin):
                wait_port(port)
            time.sleep(0.5)
            targets = {
                "direct": f"http://127.0.0.1:{backend}/",
                "nginx": f"http://127.0.0.1:{nginx_port}/",
                "ambassador": f"http://127.0.0.1:{amb_port}/",
            }
            for url in targets.values():  # warm up pools and caches
                wrk(url, 8, 1.0)
            high: dict[str, dict[str, float]] = {}
            low: dict[str, dict[str, float]] = {}
            # Low load first, interleaved and repeated (median p50): on a shared machine a
            # single run is at the mercy of the scheduler.
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(args.low_repeats):
                for name, url in targets.items():
                    samples[name].append(wrk(url, 1, 2.0, threads=1)["p50"])
            for name, values in samples.items():
                low[name] = {"p50": statistics.median(values)}
            amb_pids = children(amb.pid)
            amb_cpu = 0.0
            # Interleaved rounds (median per target): the machine is shared, and running
            # each target in one block would hand one of them all the quiet minutes.
            per_round = max(2, round(args.duration / args.rounds))
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, url in targets.items():
                    c0 = cpu_seconds(amb_pids)
                    runs[name].append(wrk(url, args.connections, per_round))
                    if name == "ambassador":
                        amb_cpu += cpu_seconds(amb_pids) - c0
            for name, rs in runs.items():
                high[name] = {
                    key: statistics.median(r[key] for r in rs) for key in ("rps", "p50", "p99")
                }
                high[name]["requests"] = sum(r["requests"] for r in rs)
                high[name]["errors"] = sum(r["errors"] for r in rs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM if p is procs[-1] else signal.SIGQUIT)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    direct = high["direct"]["rps"]
    print(
        f"\nwrk -t2 -c{args.connections}, {args.rounds} interleaved rounds of "
        f"{max(2, round(args.duration / args.rounds))}s per target (median), loopback, "
        f"{os.cpu_count()} cores; low load = median p50 of {args.low_repeats} x wrk -t1 -c1 -d2s\n"
    )
    print(
        "| target | requests/s | vs direct | vs nginx | p50 ms | p99 ms "
        "| p50 ms at 1 conn | added p50 at 1 conn |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in targets:
        h, lo = high[name], low[name]
        added = lo["p50"] - low["direct"]["p50"]
        print(
            f"| {name} | {h['rps']:,.0f} | {h['rps'] / direct:.2f} | "
            f"{h['rps'] / high['nginx']['rps']:.2f} | {h['p50']:.3f} | {h['p99']:.3f} | "
            f"{lo['p50']:.3f} | {'-' if name == 'direct' else f'{added * 1000:+.0f} µs'} |"
        )
    reqs = high["ambassador"]["requests"]
    print(
        f"\nambassador CPU per proxied request: {amb_cpu / reqs * 1e6:.1f} µs "
        f"({amb_cpu:.2f} s CPU over {reqs:,.0f} requests, {args.workers} workers)"
    )
    bad = {n: h["errors"] for n, h in high.items() if h["errors"]}
    if bad:
        print(f"non-2xx responses: {bad}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
