"""Leader election: failover after kill -9 and lease renewals per second.

Failover: two candidate processes per system; the leader is killed with
SIGKILL at a random point of its renewal cycle and we time until the other
process reports itself elected (median of N trials; a fresh candidate
replaces the killed one before the next trial). Same TTL for everyone;
stanchion on sqlite, file, PostgreSQL, Redis and etcd, side by side with
tooz on Redis and on etcd (etcd3gw driver).

Renewals/s: one elector renewing back to back for a few seconds (latency
bound), and 16 electors of 16 groups in one process renewing concurrently.

    .venv/bin/python benchmarks/bench_election.py [--ttl 3] [--trials 10] [--only redis,etcd]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REDIS = os.environ.get("STANCHION_REDIS_URL", "redis://127.0.0.1:6379/0")
PG = os.environ.get("STANCHION_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ETCD_HOST = "127.0.0.1:2379"


# -- candidate processes -------------------------------------------------------------


def _record(log: str, line: str) -> None:
    with open(log, "a") as fh:
        fh.write(line + "\n")


def worker_stanchion(url: str, ident: str, ttl: float, log: str) -> None:
    from stanchion.election import LeaderElector

    async def run() -> None:
        elector = LeaderElector.from_url(url, "bench", ident, ttl=ttl)
        lease = await elector.campaign()
        _record(log, f"{ident} {time.monotonic()} {lease.token}")
        await asyncio.sleep(3600)

    asyncio.run(run())


def worker_tooz(url: str, ident: str, ttl: float, log: str) -> None:
    from tooz import coordination

    coord = coordination.get_coordinator(url, ident.encode())
    coord.start(start_heart=True)
    if url.startswith("etcd3"):
        # tooz's etcd3gw driver has no leader election; its lock is the closest peer.
        lock = coord.get_lock(b"bench-leader")
        lock.acquire(blocking=True)
        _record(log, f"{ident} {time.monotonic()} 0")
        while True:
            time.sleep(1)
    group = b"bench"
    try:
        coord.create_group(group).get()
    except coordination.GroupAlreadyExist:
        pass
    coord.join_group(group).get()

    def elected(event: object) -> None:
        _record(log, f"{ident} {time.monotonic()} 0")

    coord.watch_elected_as_leader(group, elected)
    while True:
        coord.run_watchers()
        time.sleep(0.01)


# -- failover trials --------------------------------------------------------------


def read(log: Path) -> list[tuple[str, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            out.append((parts[0], float(parts[1])))
    return out


def failover(kind: str, url: str, ttl: float, trials: int) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-election-"))
    log = tmp / "elected.log"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    counter = 0

    def spawn() -> str:
        nonlocal counter
        counter += 1
        ident = f"c{counter}"
        procs[ident] = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, url, ident, str(ttl), str(log)],
            stderr=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        return ident

    def wait_elected(after: float, timeout: float) -> tuple[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ident, t in read(log):
                if t > after:
                    return ident, t
            time.sleep(0.005)
        raise RuntimeError(f"{kind} {url}: no leader within {timeout}s")

    results = []
    try:
        spawn()
        spawn()
        leader, t_leader = wait_elected(0.0, 30)
        for _ in range(trials):
            time.sleep(1.0 + random.uniform(0, ttl / 2))  # the follower is up; random phase
            os.kill(procs[leader].pid, signal.SIGKILL)
            killed = time.monotonic()
            procs.pop(leader).wait()
            leader, t_leader = wait_elected(killed, ttl * 4 + 10)
            results.append(t_leader - killed)
            spawn()
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    return results


# -- renewals per second ------------------------------------------------------------


async def renewals(url: str, seconds: float, concurrent: int) -> float:
    from stanchion.election import LeaderElector

    electors = [
        LeaderElector.from_url(url, f"renew-{i}", "bench", ttl=30) for i in range(concurrent)
    ]
    leases = [await e.campaign() for e in electors]
    count = 0
    stop = time.monotonic() + seconds

    async def loop(e: LeaderElector, token: int) -> None:
        nonlocal count
        while time.monotonic() < stop:
            ok = await e.backend.renew(e.group, e.identity, token, 30)
            assert ok
            count += 1

    started = time.monotonic()
    await asyncio.gather(*(loop(e, lease.token) for e, lease in zip(electors, leases)))
    rate = count / (time.monotonic() - started)
    for e in electors:
        await e.aclose()
    return rate


# -- main ---------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, url, ident, ttl, log = sys.argv[2:7]
        (worker_stanchion if kind == "stanchion" else worker_tooz)(url, ident, float(ttl), log)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ttl", type=float, default=3.0)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--renew-seconds", type=float, default=3.0)
    p.add_argument("--only", default="", help="comma-separated subset of system names")
    args = p.parse_args()
    ns = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="bench-election-"))
    ttl = args.ttl
    systems = [
        ("stanchion sqlite", "stanchion", f"sqlite:///{tmp / 'e.db'}"),
        ("stanchion file", "stanchion", f"file://{tmp / 'files'}"),
        ("stanchion postgresql", "stanchion", f"{PG}?prefix=bench_{ns}_"),
        ("stanchion redis", "stanchion", f"{REDIS}?prefix=bench:{ns}:"),
        ("stanchion etcd", "stanchion", f"etcd://{ETCD_HOST}?prefix=/bench/{ns}/"),
        ("tooz redis", "tooz", f"{REDIS.rsplit('/', 1)[0]}?timeout={int(ttl)}&namespace=b{ns}"),
        (
            "tooz etcd3gw (lock)",
            "tooz",
            f"etcd3+http://{ETCD_HOST}?timeout={int(ttl)}&prefix=/b{ns}",
        ),
    ]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only:
        systems = [s for s in systems if any(o in s[0] for o in only)]
    print(f"failover after kill -9, ttl {ttl:g}s, median of {args.trials} (seconds)")
    print("| system | median | min | max | renewals/s (1 client) | renewals/s (16 groups) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, kind, url in systems:
        times = failover(kind, url, ttl, args.trials)
        if kind == "stanchion":
            r1 = asyncio.run(renewals(url, args.renew_seconds, 1))
            r16 = asyncio.run(renewals(url, args.renew_seconds, 16))
            rates = f"{r1:,.0f} | {r16:,.0f}"
        else:
            rates = "n/a | n/a"
        print(
            f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} | "
            f"{max(times):.2f} | {rates} |",
            flush=True,
        )
    _cleanup(ns)


def _cleanup(ns: str) -> None:
    import contextlib

    from stanchion.testing.services import cleanup_etcd, cleanup_redis

    with contextlib.suppress(Exception):
        cleanup_redis(f"bench:{ns}:", REDIS)
        cleanup_redis(f"b{ns}", REDIS)
    with contextlib.suppress(Exception):
        cleanup_etcd(f"/bench/{ns}/")
        cleanup_etcd(f"/b{ns}")

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG)
        await conn.execute(f"DROP TABLE IF EXISTS bench_{ns}_stanchion_election")
        await conn.close()

    with contextlib.suppress(Exception):
        asyncio.run(drop())


if __name__ == "__main__":
    main()
