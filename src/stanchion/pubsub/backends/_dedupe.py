"""Dedupe stores for :func:`stanchion.pubsub.idempotent`, by URL.

Each records, per key, ``busy`` (being handled; a lease) or ``done`` (handled;
kept for ``ttl``). ``begin`` is atomic: two consumers cannot both get ``new``
for one key while the lease holds.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
import weakref
from pathlib import Path
from typing import Any, Literal

from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.urls import ParsedURL

__all__ = ["MemoryDedupe", "PostgresDedupe", "RedisDedupe", "SQLiteDedupe"]

State = Literal["new", "done", "busy"]


class _MemTable:
    def __init__(self) -> None:
        self.rows: dict[str, tuple[str, float]] = {}


_tables: weakref.WeakValueDictionary[str, _MemTable] = weakref.WeakValueDictionary()


class MemoryDedupe:
    """In-process store; stores opened on the same ``memory://name`` share state."""

    def __init__(self, table: _MemTable) -> None:
        self._t = table

    @classmethod
    async def open(cls, url: ParsedURL) -> MemoryDedupe:
        """Attach to ``memory://name``."""
        name = (url.host or "") + url.path
        t = _tables.get(name)
        if t is None:
            t = _MemTable()
            _tables[name] = t
        return cls(t)

    async def begin(self, key: str, lease: float) -> State:
        now = time.monotonic()
        row = self._t.rows.get(key)
        if row is not None and row[1] > now:
            return "done" if row[0] == "done" else "busy"
        self._t.rows[key] = ("busy", now + lease)
        return "new"

    async def complete(self, key: str, ttl: float) -> None:
        self._t.rows[key] = ("done", time.monotonic() + ttl)

    async def abort(self, key: str) -> None:
        self._t.rows.pop(key, None)

    async def close(self) -> None:
        return None


def _table(url: ParsedURL) -> str:
    name = url.query.get("table", "stanchion_dedupe")
    prefix = re.sub(r"[^A-Za-z0-9_]", "_", url.query.get("prefix", ""))
    full = prefix + name
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", full):
        raise ConfigError(f"{url.masked()}: invalid table name {full!r}")
    return full


class SQLiteDedupe:
    """Dedupe records in a SQLite file (shared by processes on one host)."""

    def __init__(self, path: str, table: str) -> None:
        self._path = path
        self._t = table
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: ParsedURL) -> SQLiteDedupe:
        """Open (and create) the file."""
        path = (url.host or "") + url.path if url.host else url.path
        store = cls(path, _table(url))
        try:
            await asyncio.to_thread(store._setup)
        except (sqlite3.Error, OSError) as exc:
            raise BackendUnavailable(f"cannot open dedupe store {path}: {exc}") from exc
        return store

    def _setup(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {self._t}(key TEXT PRIMARY KEY, state TEXT NOT NULL, "
            "expires REAL NOT NULL) WITHOUT ROWID"
        )
        self._db = db

    def _begin(self, key: str, lease: float) -> State:
        db = self._db
        assert db is not None
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(f"SELECT state, expires FROM {self._t} WHERE key=?", (key,)).fetchone()
            if row is not None and row[1] > now:
                db.execute("COMMIT")
                return "done" if row[0] == "done" else "busy"
            db.execute(
                f"INSERT OR REPLACE INTO {self._t}(key, state, expires) VALUES (?, 'busy', ?)",
                (key, now + lease),
            )
            db.execute("COMMIT")
            return "new"
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _exec(self, sql: str, args: tuple[Any, ...]) -> None:
        assert self._db is not None
        self._db.execute(sql, args)

    async def begin(self, key: str, lease: float) -> State:
        async with self._lock:
            return await asyncio.to_thread(self._begin, key, lease)

    async def complete(self, key: str, ttl: float) -> None:
        async with self._lock:
            await asyncio.to_thread(
                self._exec,
                f"INSERT OR REPLACE INTO {self._t}(key, state, expires) VALUES (?, 'done', ?)",
                (key, time.time() + ttl),
            )

    async def abort(self, key: str) -> None:
        async with self._lock:
            await asyncio.to_thread(
                self._exec, f"DELETE FROM {self._t} WHERE key=? AND state='busy'", (key,)
            )

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class RedisDedupe:
    """Dedupe records as Redis keys with expiry (``SET NX PX``)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._r = client
        self._p = prefix

    @classmethod
    async def open(cls, url: ParsedURL) -> RedisDedupe:
        """Connect."""
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        client = aioredis.Redis.from_url(url.without_query())
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"cannot reach Redis: {exc}", url=url.masked()) from exc
        return cls(client, url.query.get("prefix", "") + "dedupe:")

    async def begin(self, key: str, lease: float) -> State:
        k = self._p + key
        if await self._r.set(k, b"busy", nx=True, px=max(1, int(lease * 1000))):
            return "new"
        val = await self._r.get(k)
        if val is None:
            return await self.begin(key, lease)
        return "done" if val == b"done" else "busy"

    async def complete(self, key: str, ttl: float) -> None:
        await self._r.set(self._p + key, b"done", px=max(1, int(ttl * 1000)))

    async def abort(self, key: str) -> None:
        k = self._p + key
        if await self._r.get(k) == b"busy":
            await self._r.delete(k)

    async def close(self) -> None:
        await self._r.aclose()


class PostgresDedupe:
    """Dedupe records in a PostgreSQL table."""

    def __init__(self, pool: Any, table: str) -> None:
        self._pool = pool
        self._t = table

    @classmethod
    async def open(cls, url: ParsedURL) -> PostgresDedupe:
        """Connect and create the table."""
        import asyncpg

        table = _table(url)
        try:
            pool = await asyncpg.create_pool(url.without_query(), min_size=1, max_size=4)
            async with pool.acquire() as conn:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table}(key TEXT PRIMARY KEY, "
                    "state TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)"
                )
        except (OSError, asyncpg.PostgresError) as exc:
            raise BackendUnavailable(f"cannot reach PostgreSQL: {exc}", url=url.masked()) from exc
        return cls(pool, table)

    async def begin(self, key: str, lease: float) -> State:
        now = time.time()
        async with self._pool.acquire() as conn:
            got = await conn.fetchval(
                f"INSERT INTO {self._t}(key, state, expires) VALUES ($1, 'busy', $2) "
                f"ON CONFLICT (key) DO UPDATE SET state='busy', expires=$2 "
                f"WHERE {self._t}.expires <= $3 RETURNING key",
                key,
                now + lease,
                now,
            )
            if got is not None:
                return "new"
            state = await conn.fetchval(f"SELECT state FROM {self._t} WHERE key=$1", key)
            return "done" if state == "done" else "busy"

    async def complete(self, key: str, ttl: float) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"INSERT INTO {self._t}(key, state, expires) VALUES ($1, 'done', $2) "
                "ON CONFLICT (key) DO UPDATE SET state='done', expires=$2",
                key,
                time.time() + ttl,
            )

    async def abort(self, key: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(f"DELETE FROM {self._t} WHERE key=$1 AND state='busy'", key)

    async def close(self) -> None:
        await self._pool.close()
