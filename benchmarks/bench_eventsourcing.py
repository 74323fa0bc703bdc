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
TOPIC = "bench:Deposited"
RAW_READ_SQLITE = (
    "SELECT stream, version, position, id, type, data, raw, metadata, recorded_at"
    " FROM events WHERE position >= ? ORDER BY position LIMIT 2000"
)
RAW_READ_PG = (
    "SELECT stream, version, position, id, type, data, raw, metadata, recorded_at"
    " FROM events WHERE position >= $1 ORDER BY position LIMIT 2000"
)
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


# -- the systems under test ------------------------------------------------------
#
# Each system offers the same operations; the runner interleaves them (round
# robin, rotating the order every round) so that load spikes on the shared
# machine hit every system alike and the ratios stay meaningful.


class Stanchion:
    def __init__(self, name: str, store: EventStore) -> None:
        self.name, self.store = name, store
        self.repos: dict[bool, tuple[Repository[Account], str]] = {}

    @classmethod
    async def open(cls, name: str, url: str) -> Stanchion:
        return cls(name, await EventStore.connect(url))

    async def single(self, i: int) -> None:
        await self.store.append(f"acct-{i}", [NewEvent("Deposited", PAYLOAD)])

    async def batch(self, i: int) -> None:
        await self.store.append(f"batch-{i}", [NewEvent("Deposited", PAYLOAD) for _ in range(100)])

    async def fill(self, count: int) -> int:
        have, i = await self.store.head_position(), 0
        while have < count:
            await self.store.append(
                f"fill-{i}", [NewEvent("Deposited", PAYLOAD) for _ in range(1000)]
            )
            have, i = have + 1000, i + 1
        return await self.store.head_position()

    async def read_all(self) -> int:
        got = 0
        async for _ in self.store.read_all():
            got += 1
        return got

    async def prepare(self) -> None:
        for snap in (False, True):
            repo = Repository(self.store, Account, snapshot_every=1000 if snap else None)
            acct = Account(f"agg-{snap}")
            for _ in range(1000):
                acct.deposit(1)
            await repo.save(acct)
            self.repos[snap] = (repo, acct.id)

    async def load(self, snap: bool) -> None:
        repo, ident = self.repos[snap]
        assert (await repo.load(ident)).balance == 1000

    async def close(self) -> None:
        await self.store.close()


class EventsourcingLib:
    """The eventsourcing library: its ApplicationRecorder (its lowest, fastest layer)
    for appends and reads, its Application and Aggregate for loads."""

    name = "eventsourcing"

    def __init__(self, recorder: Any, datastore: Any, env: dict[str, str]) -> None:
        self.recorder, self.datastore, self.env = recorder, datastore, env
        self.apps: dict[bool, tuple[Application[Any], Any]] = {}

    async def single(self, i: int) -> None:
        self.recorder.insert_events([StoredEvent(uuid.uuid4(), 1, TOPIC, PAYLOAD_BYTES)])

    async def batch(self, i: int) -> None:
        oid = uuid.uuid4()
        self.recorder.insert_events(
            [StoredEvent(oid, v, TOPIC, PAYLOAD_BYTES) for v in range(1, 101)]
        )

    async def fill(self, count: int) -> int:
        have = self.recorder.max_notification_id() or 0
        while have < count:
            oid = uuid.uuid4()
            self.recorder.insert_events(
                [StoredEvent(oid, v, TOPIC, PAYLOAD_BYTES) for v in range(1, 1001)]
            )
            have += 1000
        return int(self.recorder.max_notification_id())

    async def read_all(self) -> int:
        start, got = 1, 0
        while True:
            page = self.recorder.select_notifications(start, 2000)
            got += len(page)
            if len(page) < 2000:
                return got
            start = page[-1].id + 1

    async def prepare(self) -> None:
        for snap in (False, True):
            app: Application[Any] = Application(env={**self.env, "IS_SNAPSHOTTING_ENABLED": "y"})
            acct = EsAccount()
            for _ in range(1000):
                acct.deposit(1)
            app.save(acct)
            if snap:
                app.take_snapshot(acct.id)
            self.apps[snap] = (app, acct.id)

    async def load(self, snap: bool) -> None:
        app, ident = self.apps[snap]
        assert app.repository.get(ident).balance == 1000

    async def close(self) -> None:
        for app, _ in self.apps.values():
            app.close()
        self.datastore.close()


class RawSQLite:
    name = "raw sqlite3"

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute(RAW_SQLITE_SCHEMA)
        self.sql = (
            "INSERT INTO events (stream, version, id, type, data, raw, metadata, recorded_at)"
            " VALUES (?, ?, ?, ?, ?, 0, NULL, ?)"
        )

    async def single(self, i: int) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute(
            self.sql, (f"acct-{i}", 0, uuid.uuid4().bytes, "Deposited", PAYLOAD_BYTES, time.time())
        )
        self.conn.execute("COMMIT")

    def _many(self, stream: str, n: int) -> None:
        now = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(
            self.sql,
            [(stream, v, uuid.uuid4().bytes, "Deposited", PAYLOAD_BYTES, now) for v in range(n)],
        )
        self.conn.execute("COMMIT")

    async def batch(self, i: int) -> None:
        self._many(f"b-{i}", 100)

    async def fill(self, count: int) -> int:
        have, i = self.conn.execute("SELECT count(*) FROM events").fetchone()[0], 0
        while have < count:
            self._many(f"f-{i}", 1000)
            have, i = have + 1000, i + 1
        return int(self.conn.execute("SELECT max(position) FROM events").fetchone()[0])

    async def read_all(self) -> int:
        pos, got = 0, 0
        while True:
            rows = self.conn.execute(RAW_READ_SQLITE, (pos,)).fetchall()
            got += len(rows)
            if len(rows) < 2000:
                return got
            pos = rows[-1][2] + 1

    async def close(self) -> None:
        self.conn.close()


class RawAsyncpg:
    name = "raw asyncpg"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, url: str) -> RawAsyncpg:
        conn = await asyncpg.connect(url)
        await conn.execute(RAW_PG_SCHEMA)
        return cls(conn)

    async def single(self, i: int) -> None:
        await self.conn.execute(RAW_PG_INSERT, f"acct-{i}", 0, uuid.uuid4(), "D", PAYLOAD_BYTES)

    async def _many(self, stream: str, n: int) -> None:
        async with self.conn.transaction():
            await self.conn.executemany(
                RAW_PG_INSERT, [(stream, v, uuid.uuid4(), "D", PAYLOAD_BYTES) for v in range(n)]
            )

    async def batch(self, i: int) -> None:
        await self._many(f"b-{i}", 100)

    async def fill(self, count: int) -> int:
        have, i = await self.conn.fetchval("SELECT count(*) FROM events"), 0
        while have < count:
            await self._many(f"f-{i}", 1000)
            have, i = have + 1000, i + 1
        return int(await self.conn.fetchval("SELECT max(position) FROM events"))

    async def read_all(self) -> int:
        pos, got = 0, 0
        while True:
            rows = await self.conn.fetch(RAW_READ_PG, pos)
            got += len(rows)
            if len(rows) < 2000:
                return got
            pos = rows[-1][2] + 1

    async def close(self) -> None:
        await self.conn.close()


async def run_cases(systems: list[Any], n: dict[str, int], results: Results) -> None:
    rounds = 4

    async def interleaved(case: str, op: str, per_round: int, events_per_op: int) -> None:
        spent = {s.name: 0.0 for s in systems}
        for r in range(rounds):
            k = r % len(systems)
            for s in systems[k:] + systems[:k]:
                fn = getattr(s, op)
                t0 = time.perf_counter()
                for i in range(per_round):
                    await fn(r * per_round + i)
                spent[s.name] += time.perf_counter() - t0
        for s in systems:
            record(results, case, s.name, rate(rounds * per_round * events_per_op, spent[s.name]))

    await interleaved("(a) single-event appends", "single", n["single"] // rounds, 1)
    await interleaved("(b) batches of 100", "batch", n["batches"] // rounds, 100)
    totals = {s.name: await s.fill(n["read"]) for s in systems}
    best = {s.name: float("inf") for s in systems}
    for r in range(REPEAT):
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            t0 = time.perf_counter()
            got = await s.read_all()
            best[s.name] = min(best[s.name], time.perf_counter() - t0)
            assert got >= n["read"], (s.name, got)
    for s in systems:
        record(results, "(c) read_all", s.name, rate(totals[s.name], best[s.name]))
    loaders = [s for s in systems if hasattr(s, "load")]
    for s in loaders:
        await s.prepare()
    for snap in (False, True):
        case = "(d) load 1,000-event aggregate" + (" +snapshot" if snap else "") + " (loads/s)"
        best = {s.name: float("inf") for s in loaders}
        for r in range(REPEAT):
            k = r % len(loaders)
            for s in loaders[k:] + loaders[:k]:
                t0 = time.perf_counter()
                for _ in range(n["loads"]):
                    await s.load(snap)
                best[s.name] = min(best[s.name], time.perf_counter() - t0)
        for s in loaders:
            record(results, case, s.name, rate(n["loads"], best[s.name]))


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
            ds = SQLiteDatastore(f"{tmp}/es.db")
            rec = SQLiteApplicationRecorder(ds)
            rec.create_table()
            env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": f"{tmp}/es2.db"}
            systems: list[Any] = [
                await Stanchion.open("stanchion", f"sqlite:///{tmp}/st.db?synchronous=FULL"),
                EventsourcingLib(rec, ds, env),
                RawSQLite(f"{tmp}/raw.db"),
                await Stanchion.open("stanchion, synchronous=NORMAL", f"sqlite:///{tmp}/st2.db"),
            ]
            try:
                await run_cases(systems, n, results)
            finally:
                for system in systems:
                    await system.close()
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
            ds = es_pg_datastore(urls["eventsourcing"])
            rec = PostgresApplicationRecorder(ds)
            rec.create_table()
            systems = [
                await Stanchion.open("stanchion", urls["stanchion"]),
                EventsourcingLib(rec, ds, es_pg_env(urls["es_agg"])),
                await RawAsyncpg.open(urls["raw"]),
            ]
            try:
                await run_cases(systems, n, results)
            finally:
                for system in systems:
                    await system.close()
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
    try:
        import uvloop  # stanchion's CLI runs on uvloop; measure the same runtime

        raise SystemExit(uvloop.run(main()))
    except ImportError:
        raise SystemExit(asyncio.run(main())) from None
