"""CQRS benchmark: projection catch-up, live lag, view query vs replay.

    .venv/bin/python benchmarks/bench_cqrs.py [--events 100000] [--pg URL]

(a) catch-up: a projection (one upsert per event into a 1,000-row view)
    over N events from the event store into SQLite and PostgreSQL read
    models, events/s, with batches of 500 (view change + checkpoint per
    transaction) and, for scale, one transaction per event; the store's own
    ``read_all`` speed is the ceiling.
(b) live lag under steady writes (appends one event at a time at a fixed
    rate): time from ``append`` returning to the view having committed it
    (``runner.wait_for``), p50/p99 ms. PostgreSQL wakes subscribers with
    LISTEN/NOTIFY.
(c) one question ("how many of SKU x were added?") answered from the view
    versus recomputed by reading the stream.

Uses a fresh PostgreSQL database (created and dropped) on the server at
--pg (default: $STANCHION_POSTGRES_URL or the local one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from stanchion.cqrs import Projection, ProjectionRunner, ReadModel, handles
from stanchion.eventsourcing import ANY, EventStore, NewEvent

SKUS = 1000


class Added(msgspec.Struct, frozen=True):
    sku: str
    qty: int


class Stock(Projection):
    name = "stock"
    pipelined = True

    async def setup(self, tx: Any) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty BIGINT NOT NULL)"
        )

    @handles(Added)
    async def on_added(self, e: Added, tx: Any) -> None:
        sql = (
            "INSERT INTO stock (sku, qty) VALUES (?, ?) ON CONFLICT (sku) "
            "DO UPDATE SET qty = stock.qty + excluded.qty"
        )
        if self.pipelined:
            await tx.write(sql, e.sku, e.qty)
        else:
            await tx.execute(sql, e.sku, e.qty)


class StockExecute(Stock):
    name = "stock"
    pipelined = False


def _events(start: int, n: int) -> list[NewEvent]:
    return [
        NewEvent("Added", {"sku": f"sku-{i % SKUS}", "qty": i % 9 + 1})
        for i in range(start, start + n)
    ]


async def fill(store: EventStore, n: int) -> None:
    done = 0
    while done < n:
        k = min(1000, n - done)
        await store.append(f"stock-{done // 1000}", _events(done, k), ANY)
        done += k


async def catch_up(
    store: EventStore, rm_url: str, projection: Projection, batch: int, limit: int | None
) -> tuple[float, int]:
    """Seconds to project the log (or its first ``limit`` events) into a fresh view."""
    rm = await ReadModel.connect(rm_url)
    try:
        target = await store.head_position() if limit is None else limit
        runner = ProjectionRunner(store, projection, rm, batch_size=batch)
        t0 = time.perf_counter()
        task = asyncio.ensure_future(runner.run())
        await runner.wait_for(target, timeout=600)
        took = time.perf_counter() - t0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return took, target
    finally:
        await rm.close()


async def drop_view(rm_url: str) -> None:
    async with await ReadModel.connect(rm_url) as rm:
        if "postgresql" in rm_url:
            pool = rm._pool  # type: ignore[attr-defined]
            await pool.execute("DROP TABLE IF EXISTS stock")
            await pool.execute("DELETE FROM stanchion_checkpoints")
        else:
            w = rm._writer  # type: ignore[attr-defined]
            w.execute("DROP TABLE IF EXISTS stock")
            w.execute("DELETE FROM stanchion_checkpoints")


async def read_floor(store: EventStore) -> float:
    t0 = time.perf_counter()
    n = 0
    async for _ in store.read_all():
        n += 1
    return n / (time.perf_counter() - t0)


async def live_lag(store: EventStore, rm_url: str, rate: float, count: int) -> list[float]:
    """Append ``count`` events one by one at ``rate``/s; ms from append to view."""
    await drop_view(rm_url)
    rm = await ReadModel.connect(rm_url)
    runner = ProjectionRunner(store, Stock(), rm, batch_size=500)
    task = asyncio.ensure_future(runner.run())
    await runner.wait_for(await store.head_position(), timeout=600)
    lags: list[float] = []
    waiters = []

    async def watch(pos: int, t: float) -> None:
        await runner.wait_for(pos, timeout=30)
        lags.append((time.perf_counter() - t) * 1000)

    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(count):
        r = await store.append(f"live-{i % 10}", _events(i, 1), ANY)
        waiters.append(asyncio.ensure_future(watch(r.last_position, time.perf_counter())))
        delay = start + (i + 1) * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    await asyncio.gather(*waiters)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await rm.close()
    return lags


async def queries(store: EventStore, rm_url: str, repeats: int) -> tuple[float, float]:
    """p50 ms of one question from the view, and recomputed from the stream."""
    rm = await ReadModel.connect(rm_url)
    view: list[float] = []
    for i in range(200):
        t0 = time.perf_counter()
        await rm.fetchval("SELECT qty FROM stock WHERE sku = ?", f"sku-{i % SKUS}")
        view.append((time.perf_counter() - t0) * 1000)
    await rm.close()
    replay: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        total = 0
        async for e in store.read_all(types=["Added"]):
            if e.data["sku"] == "sku-7":
                total += e.data["qty"]
        replay.append((time.perf_counter() - t0) * 1000)
    return statistics.median(view), statistics.median(replay)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def engine(
    label: str,
    store_url: str,
    rm_url: str,
    n: int,
    rows: list[list[str]],
    lag_rows: list[list[str]],
    q_rows: list[list[str]],
    rate: float,
    lag_count: int,
) -> None:
    async with await EventStore.connect(store_url) as store:
        t0 = time.perf_counter()
        await fill(store, n)
        print(f"[{label}] appended {n} events in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        floor = await read_floor(store)
        rows.append([label, "store read_all (ceiling)", "-", f"{floor:,.0f}"])
        await drop_view(rm_url)
        await catch_up(store, rm_url, Stock(), 500, min(n, 5000))  # warm-up, not reported
        variants: list[tuple[str, Projection, int, int | None]] = [
            ("runner, batch 500, tx.write", Stock(), 500, None),
            ("runner, batch 500, tx.execute", StockExecute(), 500, min(n, 20_000)),
            ("runner, batch 1 (one tx per event)", Stock(), 1, min(n, 5000)),
        ]
        for name, proj, batch, limit in variants:
            await drop_view(rm_url)
            took, count = await catch_up(store, rm_url, proj, batch, limit)
            rows.append([label, name, f"{count:,}", f"{count / took:,.0f}"])
            print(f"[{label}] {name}: {count / took:,.0f} events/s", file=sys.stderr)
        lags = await live_lag(store, rm_url, rate, lag_count)
        lag_rows.append(
            [
                label,
                f"{rate:.0f}/s x {lag_count}",
                f"{pct(lags, 50):.1f}",
                f"{pct(lags, 99):.1f}",
                f"{max(lags):.1f}",
            ]
        )
        v, r = await queries(store, rm_url, 3)
        q_rows.append([label, f"{n:,}", f"{v:.3f}", f"{r:,.1f}", f"{r / v:,.0f}x"])


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=200.0, help="live writes per second")
    ap.add_argument("--live", type=int, default=1000, help="live events to measure")
    ap.add_argument(
        "--pg",
        default=os.environ.get(
            "STANCHION_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args()
    rows: list[list[str]] = []
    lag_rows: list[list[str]] = []
    q_rows: list[list[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        await engine(
            "SQLite",
            f"sqlite:///{Path(tmp) / 'events.db'}",
            f"sqlite:///{Path(tmp) / 'views.db'}",
            args.events,
            rows,
            lag_rows,
            q_rows,
            args.rate,
            args.live,
        )
    if not args.skip_pg:
        import asyncpg

        db = f"bench_cqrs_{uuid.uuid4().hex[:8]}"
        admin = await asyncpg.connect(args.pg)
        await admin.execute(f'CREATE DATABASE "{db}"')
        url = args.pg.rsplit("/", 1)[0] + "/" + db
        try:
            await engine(
                "PostgreSQL", url, url, args.events, rows, lag_rows, q_rows, args.rate, args.live
            )
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            await admin.close()
    print()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (2 cores)\n")
    print("Catch-up (events/s, higher is better):\n")
    print(table(["engine", "how", "events", "events/s"], rows))
    print("\nLive lag, append returned -> view committed (ms):\n")
    print(table(["engine", "writes", "p50", "p99", "max"], lag_rows))
    print("\nOne question: from the view vs recomputed from the stream (ms, median):\n")
    print(table(["engine", "events in log", "view query", "replay from stream", "ratio"], q_rows))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
