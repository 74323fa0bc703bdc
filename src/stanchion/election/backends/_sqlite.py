"""``sqlite:///path.db``: leases in a SQLite table (one host, any number of processes).

The lease row holds holder, token and expiry (wall-clock seconds). Every step
is one ``BEGIN IMMEDIATE`` transaction, so reading the row, deciding and
writing the new token are atomic across processes. Expiries are clamped to
``now + ttl`` so a wall clock that jumps back cannot stretch a lease.
"""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from stanchion.election._backend import Capabilities, Grant, Holder
from stanchion.election.backends._sql import table_prefix
from stanchion.errors import BackendUnavailable, ConfigError, StaleFencingToken
from stanchion.urls import ParsedURL

__all__ = ["SQLiteFence", "SQLiteLeases"]

T = TypeVar("T")


def _path(parsed: ParsedURL) -> str:
    if parsed.host not in (None, "", "localhost"):
        raise ConfigError(
            f"{parsed.masked()}: a sqlite URL names a local file: sqlite:///relative.db or "
            "sqlite:////absolute/path.db"
        )
    path = parsed.database
    if not path or path == ":memory:":
        raise ConfigError(
            f"{parsed.masked()}: election needs a database file shared by the candidates, "
            "e.g. sqlite:///election.db"
        )
    return path


class _SQLite:
    """One connection used from worker threads, one statement batch at a time."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def connect(self) -> sqlite3.Connection:
        if self._conn is None:
            parent = Path(self.path).resolve().parent
            if not parent.is_dir():
                raise BackendUnavailable(
                    f"cannot open sqlite database {self.path!r}: directory {str(parent)!r} "
                    "does not exist"
                )
            try:
                conn = sqlite3.connect(
                    self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise BackendUnavailable(
                    f"cannot open sqlite database {self.path!r}: {exc}"
                ) from exc
            self._conn = conn
        return self._conn

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            conn = self.connect()
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.rollback()
                raise BackendUnavailable(f"sqlite {self.path!r}: {exc}") from exc

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self.run, fn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class SQLiteLeases:
    """Leases in ``<prefix>stanchion_election`` of a SQLite file."""

    capabilities = Capabilities(detects_death=False, multi_host=False, persistent_tokens=True)

    def __init__(self, path: str, *, prefix: str = "", timeout: float = 5.0) -> None:
        self._db = _SQLite(path, timeout)
        self._table = f"{prefix}stanchion_election"
        self._ready = False

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> SQLiteLeases:
        """Build from a parsed ``sqlite:///path.db`` URL."""
        return cls(_path(parsed), prefix=table_prefix(parsed), timeout=connect_timeout)

    def _setup(self, conn: sqlite3.Connection) -> None:
        if not self._ready:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} (grp TEXT PRIMARY KEY, holder TEXT, "
                "token INTEGER NOT NULL, expires_at REAL NOT NULL, ttl REAL NOT NULL)"
            )
            self._ready = True

    def _row(self, conn: sqlite3.Connection, group: str) -> tuple[str | None, int, float] | None:
        row = conn.execute(
            f"SELECT holder, token, expires_at, ttl FROM {self._table} WHERE grp = ?", (group,)
        ).fetchone()
        if row is None:
            return None
        now = time.time()
        expires = min(float(row[2]), now + float(row[3]))  # a clock that jumped back
        return row[0], int(row[1]), expires - now

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease if free or expired, with the next token, in one transaction."""

        def go(conn: sqlite3.Connection) -> Grant | Holder | None:
            self._setup(conn)
            # Read first, without the write lock: while a lease is held, followers'
            # polls must not contend with the leader's renewals for the write lock.
            row = self._row(conn, group)
            if row is not None and row[0] is not None and row[2] > 0:
                return Holder(row[0], row[1], row[2])
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._row(conn, group)
                if row is not None and row[0] is not None and row[2] > 0:
                    return Holder(row[0], row[1], row[2])
                token = (row[1] if row else 0) + 1
                conn.execute(
                    f"INSERT INTO {self._table} (grp, holder, token, expires_at, ttl) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (grp) DO UPDATE SET "
                    "holder = excluded.holder, token = excluded.token, "
                    "expires_at = excluded.expires_at, ttl = excluded.ttl",
                    (group, identity, token, time.time() + ttl, ttl),
                )
                conn.execute("COMMIT")
                return Grant(token)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")

        return await self._db.call(go)

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Extend the lease if term ``token`` still holds it."""

        def go(conn: sqlite3.Connection) -> bool:
            self._setup(conn)
            cur = conn.execute(
                f"UPDATE {self._table} SET expires_at = ?, ttl = ? "
                "WHERE grp = ? AND token = ? AND holder = ?",
                (time.time() + ttl, ttl, group, token, identity),
            )
            return cur.rowcount == 1

        return await self._db.call(go)

    async def release(self, group: str, identity: str, token: int) -> None:
        """Free the lease if term ``token`` still holds it (the token stays)."""

        def go(conn: sqlite3.Connection) -> None:
            self._setup(conn)
            conn.execute(
                f"UPDATE {self._table} SET holder = NULL, expires_at = 0 "
                "WHERE grp = ? AND token = ? AND holder = ?",
                (group, token, identity),
            )

        await self._db.call(go)

    async def observe(self, group: str) -> Holder | None:
        """The current holder, if any."""

        def go(conn: sqlite3.Connection) -> Holder | None:
            self._setup(conn)
            row = self._row(conn, group)
            if row is None or row[0] is None or row[2] <= 0:
                return None
            return Holder(row[0], row[1], row[2])

        return await self._db.call(go)

    async def wait(self, group: str, seconds: float) -> bool:
        """Sleep ``seconds`` (SQLite has no change notification)."""
        await asyncio.sleep(seconds)
        return False

    async def aclose(self) -> None:
        """Close the connection."""
        self._db.close()


class SQLiteFence:
    """Fenced writes to a SQLite database.

    ``fn(conn)`` receives the :class:`sqlite3.Connection` inside a
    ``BEGIN IMMEDIATE`` transaction in which the token was checked and
    recorded; the transaction commits when ``fn`` returns and rolls back when
    it raises, so the write and the fence check are atomic.
    """

    def __init__(self, path: str, *, prefix: str = "", timeout: float = 5.0) -> None:
        self._db = _SQLite(path, timeout)
        self._table = f"{prefix}stanchion_fences"
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> SQLiteFence:
        """Build from a parsed ``sqlite:///path.db`` URL."""
        return cls(_path(parsed), prefix=table_prefix(parsed), timeout=connect_timeout)

    def _begin(self, resource: str, token: int) -> sqlite3.Connection:
        conn = self._db.connect()
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._table} "
            "(resource TEXT PRIMARY KEY, token INTEGER NOT NULL)"
        )
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            f"SELECT token FROM {self._table} WHERE resource = ?", (resource,)
        ).fetchone()
        if row is not None and token < int(row[0]):
            conn.execute("ROLLBACK")
            raise StaleFencingToken(resource, token, int(row[0]))
        conn.execute(
            f"INSERT INTO {self._table} (resource, token) VALUES (?, ?) "
            "ON CONFLICT (resource) DO UPDATE SET token = excluded.token",
            (resource, token),
        )
        return conn

    async def write(self, resource: str, token: int, fn: Callable[[Any], Awaitable[T] | T]) -> T:
        """Check and record ``token``, run ``fn(conn)`` and commit, atomically."""
        async with self._lock:
            conn = await self._db.call(lambda _c: self._begin(resource, token))
            try:
                result = fn(conn)
                if inspect.isawaitable(result):
                    result = await result
            except BaseException:
                await self._db.call(lambda c: c.execute("ROLLBACK"))
                raise
            await self._db.call(lambda c: c.execute("COMMIT"))
            return result

    async def current(self, resource: str) -> int | None:
        """The highest token accepted for ``resource``."""

        def go(conn: sqlite3.Connection) -> int | None:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} "
                "(resource TEXT PRIMARY KEY, token INTEGER NOT NULL)"
            )
            row = conn.execute(
                f"SELECT token FROM {self._table} WHERE resource = ?", (resource,)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._db.call(go)

    async def aclose(self) -> None:
        """Close the connection."""
        self._db.close()
