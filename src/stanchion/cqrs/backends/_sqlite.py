"""SQLite read model: views and checkpoints in one database file (WAL).

The runner's transactions use ``BEGIN IMMEDIATE`` on a writer connection;
queries use a separate reader connection, so they only ever see committed
views (WAL lets them read while a batch is being written). Statements run on
the event loop (they take microseconds); ``BEGIN`` and ``COMMIT``, which may
wait for another process's lock or for the disk, run in a worker thread.

A rebuild writes into a shadow database file beside the main one
(``<file>.<name>.rebuild``) through its own connection, so the projection's
plain SQL (tables, indexes) needs no renaming; the swap copies the shadow
tables into the main file in one write transaction, during which readers
keep seeing the old view.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from stanchion.cqrs._backend import (
    Capabilities,
    ParkedEvent,
    ReadModel,
    SQLTransaction,
    initial,
    now,
    raise_conflict,
)
from stanchion.cqrs._core import NO_POSITION, Checkpoint, validate_name
from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.urls import ParsedURL

__all__ = ["SQLiteReadModel"]

T = TypeVar("T")

_CHECKPOINTS = """
CREATE TABLE IF NOT EXISTS stanchion_checkpoints (
    name TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    token INTEGER,
    updated_at REAL NOT NULL
)"""
_PARKED = """
CREATE TABLE IF NOT EXISTS stanchion_parked (
    name TEXT NOT NULL,
    position INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    error TEXT NOT NULL,
    parked_at REAL NOT NULL,
    PRIMARY KEY (name, position)
)"""


def _connect(path: str, busy: float) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=busy, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise BackendUnavailable(f"cannot open SQLite read model {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    for attempt in range(50):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            # Several processes opening a new file at once: journal_mode may
            # fail with "database is locked" without honouring busy_timeout.
            if "locked" not in str(exc) or attempt == 49:
                conn.close()
                raise BackendUnavailable(f"cannot open SQLite read model {path}: {exc}") from exc
            import time

            time.sleep(0.02)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA busy_timeout={int(busy * 1000)}")
    return conn


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a worker thread; if cancelled, wait for the thread before re-raising.

    A cancelled await must not return while the thread still uses the
    connection (closing it under the thread would crash the process).
    """
    fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise


def _schema(conn: sqlite3.Connection) -> None:
    for attempt in range(50):
        try:
            conn.execute(_CHECKPOINTS)
            conn.execute(_PARKED)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise BackendUnavailable(f"cannot create SQLite read-model schema: {exc}") from exc
            import time

            time.sleep(0.02)


class _Tx(SQLTransaction):
    def __init__(
        self, conn: sqlite3.Connection, name: str, shadow: bool, lock: asyncio.Lock | None
    ) -> None:
        super().__init__(name, shadow)
        self._conn = conn
        self._open = True
        self._lock = lock

    def _release(self) -> None:
        self._open = False
        if self._lock is not None and self._lock.locked():
            self._lock.release()
        self._lock = None

    async def execute(self, sql: str, *args: Any) -> int:
        try:
            return self._conn.execute(sql, args).rowcount
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise BackendUnavailable(f"SQLite read model: {exc}") from exc
            raise

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        return self._conn.execute(sql, args).fetchall()

    async def fetchone(self, sql: str, *args: Any) -> Any:
        return self._conn.execute(sql, args).fetchone()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    async def checkpoint_position(self) -> int:
        row = self._conn.execute(
            "SELECT position FROM stanchion_checkpoints WHERE name = ?", (self.name,)
        ).fetchone()
        return NO_POSITION if row is None else int(row[0])

    async def park(self, event: Any, error: str) -> None:
        self._conn.execute(
            "INSERT OR REPLACE INTO stanchion_parked VALUES (?, ?, ?, ?, ?, ?)",
            (self.name, event.position, str(event.id), str(event.type), error, now()),
        )

    async def commit(self, expected: int, position: int, token: int | None) -> None:
        cur = self._conn.execute(
            "UPDATE stanchion_checkpoints SET position = ?, token = COALESCE(?, token), "
            "updated_at = ? WHERE name = ? AND position = ? "
            "AND (? IS NULL OR token IS NULL OR token <= ?)",
            (position, token, now(), self.name, expected, token, token),
        )
        if cur.rowcount != 1:
            row = self._conn.execute(
                "SELECT position, token FROM stanchion_checkpoints WHERE name = ?", (self.name,)
            ).fetchone()
            await self.rollback()
            raise_conflict(
                self.name, row[0] if row else NO_POSITION, row[1] if row else None, expected, token
            )
        try:
            await _blocking(self._conn.execute, "COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._release()

    async def rollback(self) -> None:
        if self._open:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
        self._release()


class SQLiteReadModel(ReadModel):
    """Views, checkpoints and parked events in one SQLite file (``sqlite:///path.db``).

    URL options: ``busy_timeout`` (seconds, default 10).
    """

    capabilities: ClassVar[Capabilities] = Capabilities(sql=True, key_value=False)

    def __init__(self, url: ParsedURL) -> None:
        super().__init__(url)
        path = (url.host or "") + url.path  # sqlite://rel/views.db is relative
        if not path or path in ("/", "/:memory:", ":memory:"):
            raise ConfigError(
                f"{url.masked()}: a SQLite read model needs a file, e.g. sqlite:///views.db"
            )
        self.path = path
        self.busy = url.get_float("busy_timeout", 10.0)
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._shadows: dict[str, sqlite3.Connection] = {}
        # One transaction at a time per connection (runner, rebuild and swap
        # may share this object); "" is the writer's.
        self._locks: dict[str, asyncio.Lock] = {}

    # -- lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        writer = await _blocking(_connect, self.path, self.busy)
        await _blocking(_schema, writer)
        self._writer = writer
        self._reader = await _blocking(_connect, self.path, self.busy)

    async def close(self) -> None:
        for conn in [self._writer, self._reader, *self._shadows.values()]:
            if conn is not None:
                conn.close()
        self._writer = self._reader = None
        self._shadows.clear()

    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise ConfigError("the read model is not open (use ReadModel.connect)")
        return self._writer

    def _r(self) -> sqlite3.Connection:
        if self._reader is None:
            raise ConfigError("the read model is not open (use ReadModel.connect)")
        return self._reader

    def _shadow_path(self, name: str) -> str:
        return f"{self.path}.{name}.rebuild"

    async def _shadow(self, name: str, *, create: bool = True) -> sqlite3.Connection:
        conn = self._shadows.get(name)
        if conn is None:
            if not create:
                raise ConfigError(f"no rebuild of {name!r} in progress")
            conn = await _blocking(_connect, self._shadow_path(name), self.busy)
            await _blocking(_schema, conn)
            self._shadows[name] = conn
        return conn

    # -- runner side -----------------------------------------------------------

    async def begin(self, name: str, *, shadow: bool = False) -> _Tx:
        validate_name(name)
        conn = await self._shadow(name) if shadow else self._w()
        lock = self._locks.setdefault(f"{name}:shadow" if shadow else "", asyncio.Lock())
        await lock.acquire()
        try:
            await _blocking(conn.execute, "BEGIN IMMEDIATE")
            conn.execute(
                "INSERT OR IGNORE INTO stanchion_checkpoints VALUES (?, ?, NULL, ?)",
                (name, NO_POSITION, now()),
            )
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            lock.release()
            raise
        return _Tx(conn, name, shadow, lock)

    async def checkpoint(self, name: str, *, shadow: bool = False) -> Checkpoint:
        conn = (await self._shadow(name)) if shadow else self._r()
        row = conn.execute(
            "SELECT position, token, updated_at, "
            "(SELECT count(*) FROM stanchion_parked p WHERE p.name = c.name) "
            "FROM stanchion_checkpoints c WHERE name = ?",
            (name,),
        ).fetchone()
        if row is None:
            return initial(name)
        return Checkpoint(name, row[0], row[1], row[2], row[3])

    async def checkpoints(self) -> list[Checkpoint]:
        rows = (
            self._r()
            .execute(
                "SELECT name, position, token, updated_at, "
                "(SELECT count(*) FROM stanchion_parked p WHERE p.name = c.name) "
                "FROM stanchion_checkpoints c ORDER BY name"
            )
            .fetchall()
        )
        return [Checkpoint(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def parked(self, name: str) -> list[ParkedEvent]:
        rows = (
            self._r()
            .execute(
                "SELECT name, position, event_id, event_type, error, parked_at "
                "FROM stanchion_parked WHERE name = ? ORDER BY position",
                (name,),
            )
            .fetchall()
        )
        return [ParkedEvent(*tuple(r)) for r in rows]

    async def reset_shadow(self, name: str) -> None:
        validate_name(name)
        conn = self._shadows.pop(name, None)
        if conn is not None:
            conn.close()
        path = self._shadow_path(name)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)
        await self._shadow(name)

    async def drop_shadow(self, name: str) -> None:
        conn = self._shadows.pop(name, None)
        if conn is not None:
            conn.close()
        path = self._shadow_path(name)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + suffix)

    async def swap(self, name: str, position: int) -> bool:
        shadow = await self._shadow(name, create=False)
        # Make the shadow file complete on disk before the main connection reads it.
        await _blocking(shadow.execute, "PRAGMA wal_checkpoint(TRUNCATE)")
        w = self._w()
        lock = self._locks.setdefault("", asyncio.Lock())
        async with lock:
            return await self._swap(w, name, position)

    async def _swap(self, w: sqlite3.Connection, name: str, position: int) -> bool:
        w.execute("ATTACH DATABASE ? AS stanchion_shadow", (self._shadow_path(name),))
        try:
            await _blocking(w.execute, "BEGIN IMMEDIATE")
            try:
                row = w.execute(
                    "SELECT position FROM main.stanchion_checkpoints WHERE name = ?", (name,)
                ).fetchone()
                if row is not None and row[0] > position:
                    w.execute("ROLLBACK")
                    return False
                objects = w.execute(
                    "SELECT type, name, tbl_name, sql FROM stanchion_shadow.sqlite_master "
                    "WHERE sql IS NOT NULL AND name NOT LIKE 'stanchion_%' "
                    "AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
                ).fetchall()
                tables = [o for o in objects if o[0] == "table"]
                for _, table, _, sql in tables:
                    w.execute(f'DROP TABLE IF EXISTS main."{table}"')
                    w.execute(sql)
                    w.execute(
                        f'INSERT INTO main."{table}" SELECT * FROM stanchion_shadow."{table}"'
                    )
                for kind, obj, _, sql in objects:
                    if kind != "table":
                        w.execute(f'DROP {kind.upper()} IF EXISTS main."{obj}"')
                        w.execute(sql)
                w.execute("DELETE FROM main.stanchion_parked WHERE name = ?", (name,))
                w.execute(
                    "INSERT INTO main.stanchion_parked SELECT * FROM "
                    "stanchion_shadow.stanchion_parked WHERE name = ?",
                    (name,),
                )
                w.execute(
                    "INSERT INTO main.stanchion_checkpoints VALUES (?, ?, NULL, ?) "
                    "ON CONFLICT (name) DO UPDATE SET position = excluded.position, "
                    "updated_at = excluded.updated_at",
                    (name, position, now()),
                )
                await _blocking(w.execute, "COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    w.execute("ROLLBACK")
                raise
        finally:
            with contextlib.suppress(sqlite3.Error):
                w.execute("DETACH DATABASE stanchion_shadow")
        await self.drop_shadow(name)
        return True

    # -- query side ------------------------------------------------------------

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        """All rows of a read query (rows index by position and column name)."""
        return self._r().execute(sql, args).fetchall()

    async def fetchone(self, sql: str, *args: Any) -> Any:
        """The first row of a read query, or None."""
        return self._r().execute(sql, args).fetchone()

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        row = self._r().execute(sql, args).fetchone()
        return None if row is None else row[0]
