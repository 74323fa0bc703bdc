"""Event store benchmark: stanchion vs the `eventsourcing` library vs the raw driver.

Side by side, in one run, on the same engines:

  (a) single-event appends to many streams, one transaction each   (events/s)
  (b) batches of 100 events per append                              (events/s)
  (c) read_all of 100,000 events                                     (events/s)
  (d) load an aggregate with 1,000 events, without / with snapshot   (loads/s)
  (e) PostgreSQL only: 8 concurrent writers, single-event appends   (events/s)

Reads and loads report the best of 3 runs. SQLite runs every system at the
same durability (WAL, synchronous=FULL, the eventsourcing library's setting);
stanchion's default (synchronous=NORMAL) is shown as an extra figure.
PostgreSQL uses a fresh database per system on the server of
STANCHION_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres).

Run:  .venv/bin/python benchmarks/bench_eventsourcing.py [--quick] [--only sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import msgspec
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate as EsAggregate
from eventsourcing.domain import event as es_event
from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore

from stanchion.eventsourcing import Aggregate, EventStore, NewEvent, Repository, applies

PG_ADMIN = os.environ.get("STANCHION_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REPEAT = 3  # reads and loads: best of REPEAT runs (the machine is shared and noisy)
PAYLOAD = {"amount": 125, "currency": "EUR", "note": "coffee beans"}
PAYLOAD_BYTES = msgspec.json.encode(PAYLOAD)

RAW_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  position INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,
  id BLOB NOT NULL UNIQUE, type TEXT NOT NULL, data BLOB NOT NULL, raw INTEGER NOT NULL,
  metadata BLOB, recorded_at REAL NOT NULL, UNIQUE (stream, version))
"""
RAW_PG_INSERT = (
    "INSERT INTO events (stream, version, id, type, data, raw) VALUES ($1, $2, $3, $4, $5, false)"
)
RAW_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
  position bigserial PRIMARY KEY, stream text NOT NULL, version bigint NOT NULL,
  id uuid NOT NULL UNIQUE, type text NOT NULL, data bytea NOT NULL, raw boolean NOT NULL,
  metadata bytea, recorded_at timestamptz NOT NULL DEFAULT now(), UNIQUE (stream, version))
"""


# -- aggregates ----------------------------------------------------------------


class Deposited(msgspec.Struct, frozen=True):
    amount: int


class Account(Aggregate):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.balance = 0

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount))

    @applies(Deposited)
    def _deposited(self, e: Deposited) -> None:
        self.balance += e.amount


class EsAccount(EsAggregate):
    def __init__(self) -> None:
        self.balance = 0

    @es_event("Deposited")
    def deposit(self, amount: int) -> None:
        self.balance += amount


# -- helpers -------------------------------------------------------------------


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def timed_async(fn: Callable[[], Awaitable[Any]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


async def pg_create(name: str) -> str:
    conn = await asyncpg.connect(PG_ADMIN.split("?")[0])
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_ADMIN.split("?")[0].rsplit("/", 1)[0] + "/" + name


async def pg_drop(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN.split("?")[0])
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def es_pg_env(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parts.path.lstrip("/"),
        "POSTGRES_HOST": parts.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(parts.port or 5432),
        "POSTGRES_USER": parts.username or "postgres",
        "POSTGRES_PASSWORD": parts.password or "",
    }


def es_pg_datastore(url: str, pool_size: int = 1) -> PostgresDatastore:
    env = es_pg_env(url)
    return PostgresDatastore(
        env["POSTGRES_DBNAME"], env["POSTGRES_HOST"], env["POSTGRES_PORT"],
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], pool_size=pool_size,
    )  # fmt: skip


Results = dict[str, dict[str, float]]  # case -> system -> value


def record(results: Results, case: str, system: str, value: float) -> None:
    results.setdefault(case, {})[system] = value
    print(f"  {case:<44} {system:<28} {value:>12,.0f}", flush=True)


# -- stanchion -----------------------------------------------------------------


async def bench_stanchion(url: str, label: str, n: dict[str, int], results: Results) -> None:
    async with await EventStore.connect(url) as store:
        count = n["single"]
        events = [NewEvent("Deposited", PAYLOAD) for _ in range(count)]

        async def singles() -> None:
            for i, e in enumerate(events):
                await store.append(f"acct-{i}", [e])

        record(results, "(a) single-event appends", label, rate(count, await timed_async(singles)))

        batches = n["batches"]
        payloads = [[NewEvent("Deposited", PAYLOAD) for _ in range(100)] for _ in range(batches)]

        async def batched() -> None:
            for i, b in enumerate(payloads):
                await store.append(f"batch-{i}", b)

        record(
            results, "(b) batches of 100", label, rate(100 * batches, await timed_async(batched))
        )

        await fill_stanchion(store, n["read"])

        async def read() -> None:
            got = 0
            async for _ in store.read_all():
                got += 1
            assert got >= n["read"], got

        total = await store.head_position()
        best = min([await timed_async(read) for _ in range(REPEAT)])
        record(results, "(c) read_all", label, rate(total, best))

        for snap in (None, 1000):
            repo = Repository(store, Account, snapshot_every=snap)
            acct = Account(f"agg-{snap}")
            for _ in range(1000):
                acct.deposit(1)
            await repo.save(acct)
            loads = n["loads"]

            async def load(
                repo: Repository[Account] = repo, acct: Account = acct, loads: int = loads
            ) -> None:
                for _ in range(loads):
                    got = await repo.load(acct.id)
                    assert got.balance == 1000

            case = "(d) load 1,000-event aggregate" + (" +snapshot" if snap else "")
            best = min([await timed_async(load) for _ in range(REPEAT)])
            record(results, case + " (loads/s)", label, rate(loads, best))


async def fill_stanchion(store: EventStore, count: int) -> None:
    have = await store.head_position()
    i = 0
    while have < count:
        await store.append(f"fill-{i}", [NewEvent("Deposited", PAYLOAD) for _ in range(1000)])
        have += 1000
        i += 1


# -- eventsourcing library -----------------------------------------------------


def bench_es_recorder(recorder: Any, label: str, n: dict[str, int], results: Results) -> None:
    count = n["single"]
    singles = [StoredEvent(uuid.uuid4(), 1, "bench:Deposited", PAYLOAD_BYTES) for _ in range(count)]

    def run_singles() -> None:
        for s in singles:
            recorder.insert_events([s])

    record(results, "(a) single-event appends", label, rate(count, timed(run_singles)))
    batches = [
        [StoredEvent(oid, v, "bench:Deposited", PAYLOAD_BYTES) for v in range(1, 101)]
        for oid in (uuid.uuid4() for _ in range(n["batches"]))
    ]

    def run_batches() -> None:
        for b in batches:
            recorder.insert_events(b)

    record(results, "(b) batches of 100", label, rate(100 * len(batches), timed(run_batches)))
    have = recorder.max_notification_id() or 0
    while have < n["read"]:
        oid = uuid.uuid4()
        recorder.insert_events(
            [StoredEvent(oid, v, "bench:Deposited", PAYLOAD_BYTES) for v in range(1, 1001)]
        )
        have += 1000

    def read() -> None:
        start, got = 1, 0
        while True:
            page = recorder.select_notifications(start, 2000)
            got += len(page)
            if len(page) < 2000:
                break
            start = page[-1].id + 1
        assert got >= n["read"]

    total = recorder.max_notification_id()
    record(results, "(c) read_all", label, rate(total, min(timed(read) for _ in range(REPEAT))))


def bench_es_aggregate(
    env: dict[str, str], label: str, n: dict[str, int], results: Results
) -> None:
    for snap in (False, True):
        app: Application[Any] = Application(env={**env, "IS_SNAPSHOTTING_ENABLED": "y"})
        acct = EsAccount()
        for _ in range(1000):
            acct.deposit(1)
        app.save(acct)
        if snap:
            app.take_snapshot(acct.id)
        loads = n["loads"]

        def load(app: Application[Any] = app, acct: EsAccount = acct, loads: int = loads) -> None:
            for _ in range(loads):
                got = app.repository.get(acct.id)
                assert got.balance == 1000

        case = "(d) load 1,000-event aggregate" + (" +snapshot" if snap else "")
        record(
            results,
            case + " (loads/s)",
            label,
            rate(loads, min(timed(load) for _ in range(REPEAT))),
        )
        app.close()


# -- raw drivers ---------------------------------------------------------------


def bench_raw_sqlite(path: str, n: dict[str, int], results: Results) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(RAW_SQLITE_SCHEMA)
    sql = (
        "INSERT INTO events (stream, version, id, type, data, raw, metadata, recorded_at)"
        " VALUES (?, ?, ?, ?, ?, 0, NULL, ?)"
    )
    count = n["single"]

    def singles() -> None:
        for i in range(count):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                sql, (f"acct-{i}", 0, uuid.uuid4().bytes, "Deposited", PAYLOAD_BYTES, time.time())
            )
            conn.execute("COMMIT")

    record(results, "(a) single-event appends", "raw sqlite3", rate(count, timed(singles)))

    def batches() -> None:
        for i in range(n["batches"]):
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                sql,
                [(f"b-{i}", v, uuid.uuid4().bytes, "Deposited", PAYLOAD_BYTES, now)
                 for v in range(100)],
            )  # fmt: skip
            conn.execute("COMMIT")

    record(results, "(b) batches of 100", "raw sqlite3", rate(100 * n["batches"], timed(batches)))
    have = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    i = 0
    while have < n["read"]:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            sql,
            [(f"f-{i}", v, uuid.uuid4().bytes, "Deposited", PAYLOAD_BYTES, 0.0)
             for v in range(1000)],
        )  # fmt: skip
        conn.execute("COMMIT")
        have += 1000
        i += 1

    def read() -> None:
        pos, got = 0, 0
        while True:
            rows = conn.execute(
                "SELECT stream, version, position, id, type, data, raw, metadata, recorded_at"
                " FROM events WHERE position >= ? ORDER BY position LIMIT 2000",
                (pos,),
            ).fetchall()
            got += len(rows)
            if len(rows) < 2000:
                break
            pos = rows[-1][2] + 1

    total = conn.execute("SELECT max(position) FROM events").fetchone()[0]
    record(
        results, "(c) read_all", "raw sqlite3", rate(total, min(timed(read) for _ in range(REPEAT)))
    )
    conn.close()


async def bench_raw_pg(url: str, n: dict[str, int], results: Results) -> None:
    conn = await asyncpg.connect(url)
    await conn.execute(RAW_PG_SCHEMA)
    ins = RAW_PG_INSERT
    count = n["single"]

    async def singles() -> None:
        for i in range(count):
            await conn.execute(ins, f"acct-{i}", 0, uuid.uuid4(), "Deposited", PAYLOAD_BYTES)

    record(
        results, "(a) single-event appends", "raw asyncpg", rate(count, await timed_async(singles))
    )

    async def batches() -> None:
        for i in range(n["batches"]):
            async with conn.transaction():
                await conn.executemany(
                    ins,
                    [(f"b-{i}", v, uuid.uuid4(), "Deposited", PAYLOAD_BYTES) for v in range(100)],
                )

    record(
        results, "(b) batches of 100", "raw asyncpg",
        rate(100 * n["batches"], await timed_async(batches)),
    )  # fmt: skip
    have = await conn.fetchval("SELECT count(*) FROM events")
    i = 0
    while have < n["read"]:
        async with conn.transaction():
            await conn.executemany(
                ins, [(f"f-{i}", v, uuid.uuid4(), "Deposited", PAYLOAD_BYTES) for v in range(1000)]
            )
        have += 1000
        i += 1

    async def read() -> None:
        pos = 0
        while True:
            rows = await conn.fetch(
                "SELECT stream, version, position, id, type, data, raw, metadata, recorded_at"
                " FROM events WHERE position >= $1 ORDER BY position LIMIT 2000",
                pos,
            )
            if len(rows) < 2000:
                break
            pos = rows[-1][2] + 1

    total = await conn.fetchval("SELECT max(position) FROM events")
    best = min([await timed_async(read) for _ in range(REPEAT)])
    record(results, "(c) read_all", "raw asyncpg", rate(total, best))
    await conn.close()


# -- concurrency on PostgreSQL ---------------------------------------------------


async def bench_concurrent_pg(urls: dict[str, str], n: dict[str, int], results: Results) -> None:
    case = "(e) 8 writers, single-event appends"
    per = n["concurrent"] // 8
    async with await EventStore.connect(urls["stanchion"] + "?pool_size=8") as store:

        async def writer(w: int) -> None:
            for i in range(per):
                await store.append(f"cw-{w}-{i}", [NewEvent("Deposited", PAYLOAD)])

        t = await timed_async(lambda: asyncio.gather(*(writer(w) for w in range(8))))
        record(results, case, "stanchion", rate(per * 8, t))

    conns = [await asyncpg.connect(urls["raw"]) for _ in range(8)]
    ins = RAW_PG_INSERT

    async def raw_writer(c: asyncpg.Connection, w: int) -> None:
        for i in range(per):
            await c.execute(ins, f"cw-{w}-{i}", 0, uuid.uuid4(), "Deposited", PAYLOAD_BYTES)

    t = await timed_async(lambda: asyncio.gather(*(raw_writer(c, w) for w, c in enumerate(conns))))
    record(results, case, "raw asyncpg", rate(per * 8, t))
    for c in conns:
        await c.close()

    datastore = es_pg_datastore(urls["eventsourcing"], pool_size=8)
    recorder = PostgresApplicationRecorder(datastore)
    recorder.create_table()

    def es_writer() -> None:
        for _ in range(per):
            recorder.insert_events([StoredEvent(uuid.uuid4(), 1, "bench:Deposited", PAYLOAD_BYTES)])

    threads = [threading.Thread(target=es_writer) for _ in range(8)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    record(results, case, "eventsourcing", rate(per * 8, time.perf_counter() - t0))
    datastore.close()


# -- main ----------------------------------------------------------------------


def table(title: str, results: Results, peer: str, raw: str) -> str:
    lines = [
        f"**{title}**",
        "",
        f"| case | stanchion | eventsourcing | {raw} | stanchion / eventsourcing"
        " | stanchion / raw |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, row in results.items():
        ours = row.get("stanchion", float("nan"))
        theirs = row.get(peer, float("nan"))
        floor = row.get(raw, float("nan"))
        extra = [f"{k}: {v:,.0f}" for k, v in row.items() if k not in ("stanchion", peer, raw)]
        name = case + (f" ({'; '.join(extra)})" if extra else "")
        fmt = lambda v: "-" if v != v else f"{v:,.0f}"  # noqa: E731
        ratio = lambda a, b: "-" if a != a or b != b else f"{a / b:.2f}x"  # noqa: E731
        lines.append(
            f"| {name} | {fmt(ours)} | {fmt(theirs)} | {fmt(floor)} | {ratio(ours, theirs)} |"
            f" {ratio(ours, floor)} |"
        )
    return "\n".join(lines)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    n = {"single": 2000, "batches": 100, "read": 100_000, "loads": 30, "concurrent": 4000}
    if args.quick:
        n = {"single": 200, "batches": 10, "read": 5000, "loads": 3, "concurrent": 400}
    print(f"python {sys.version.split()[0]}, sizes {n}", flush=True)
    out: list[str] = []

    if args.only in (None, "sqlite"):
        print("SQLite (file, WAL):", flush=True)
        results: Results = {}
        with tempfile.TemporaryDirectory() as tmp:
            await bench_stanchion(
                f"sqlite:///{tmp}/st.db?synchronous=FULL", "stanchion", n, results
            )
            record_default: Results = {}
            await bench_stanchion(f"sqlite:///{tmp}/st2.db", "stanchion NORMAL", n, record_default)
            for case, row in record_default.items():
                results[case]["stanchion, synchronous=NORMAL"] = row["stanchion NORMAL"]
            ds = SQLiteDatastore(f"{tmp}/es.db")
            rec = SQLiteApplicationRecorder(ds)
            rec.create_table()
            bench_es_recorder(rec, "eventsourcing", n, results)
            ds.close()
            env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": f"{tmp}/es2.db"}
            bench_es_aggregate(env, "eventsourcing", n, results)
            bench_raw_sqlite(f"{tmp}/raw.db", n, results)
        out.append(
            table("SQLite, file, WAL, synchronous=FULL", results, "eventsourcing", "raw sqlite3")
        )

    if args.only in (None, "postgresql"):
        print("PostgreSQL:", flush=True)
        results = {}
        tag = secrets.token_hex(3)
        names = {k: f"bench_{k}_{tag}" for k in ("stanchion", "eventsourcing", "raw", "es_agg")}
        try:
            urls = {k: await pg_create(v) for k, v in names.items()}
            await bench_stanchion(urls["stanchion"], "stanchion", n, results)
            ds = es_pg_datastore(urls["eventsourcing"])
            rec = PostgresApplicationRecorder(ds)
            rec.create_table()
            bench_es_recorder(rec, "eventsourcing", n, results)
            ds.close()
            bench_es_aggregate(es_pg_env(urls["es_agg"]), "eventsourcing", n, results)
            await bench_raw_pg(urls["raw"], n, results)
            await bench_concurrent_pg(urls, n, results)
        finally:
            for name in names.values():
                await pg_drop(name)
        out.append(table("PostgreSQL 15", results, "eventsourcing", "raw asyncpg"))

    print()
    print("\n\n".join(out))
    _ = statistics  # keep the import for ad-hoc medians
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
