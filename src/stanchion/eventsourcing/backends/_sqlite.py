"""SQLite event store (``sqlite:///path.db``): WAL, ``BEGIN IMMEDIATE``, one file, many processes.

Query parameters: ``prefix`` (table name prefix), ``busy_timeout`` (seconds a
writer waits for another process's write lock, default 30), ``poll``
(seconds between checks for appends from other processes while a subscriber
is idle, default 0.05), ``synchronous`` (``NORMAL``, the WAL default that
survives a process crash, or ``FULL`` to survive a power loss too).

Positions are the table's rowid, taken inside the write transaction, which
``BEGIN IMMEDIATE`` holds from the first read to the commit: positions become
visible in order, so subscribers never miss one. sqlite3 calls run on the
event loop (a commit takes tens of microseconds); a lock held by another
process is waited for with ``asyncio.sleep`` back-off, never by blocking the
loop in SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import ClassVar, TypeVar
from uuid import UUID, SafeUUID

from stanchion.errors import BackendError, BackendUnavailable, ConfigError, StreamDeleted
from stanchion.eventsourcing._backend import Capabilities, EncodedEvent, Row
from stanchion.eventsourcing._core import (
    AppendResult,
    Stored,
    check_batch,
    check_expected,
    decide_replay,
)
from stanchion.eventsourcing.backends._common import Signal, ordered_subscribe
from stanchion.urls import ParsedURL

__all__ = ["SQLiteBackend"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {p}es_events (
  position INTEGER PRIMARY KEY,
  stream TEXT NOT NULL,
  version INTEGER NOT NULL,
  id BLOB NOT NULL UNIQUE,
  type TEXT NOT NULL,
  data BLOB NOT NULL,
  raw INTEGER NOT NULL,
  metadata BLOB,
  recorded_at REAL NOT NULL,
  UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS {p}es_tombstones (
  stream TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {p}es_snapshots (
  stream TEXT PRIMARY KEY, version INTEGER NOT NULL, state BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {p}es_keys (
  subject TEXT PRIMARY KEY, key BLOB NOT NULL
) WITHOUT ROWID;
"""

_COLUMNS = "stream, version, position, id, type, data, raw, metadata, recorded_at"


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


_Raw = tuple[str, int, int, bytes, str, bytes, int, bytes | None, float]


def _rows(found: list[_Raw]) -> list[Row]:
    """Convert fetched tuples; the hot loop of every read, so built for speed."""
    out: list[Row] = []
    append = out.append
    new, set_attr, from_bytes = object.__new__, object.__setattr__, int.from_bytes
    unknown = SafeUUID.unknown
    last_ts: float | None = None
    last_dt = _EPOCH
    for t in found:
        ident = new(UUID)  # uuid.UUID(bytes=...) validates at length; this is 3x cheaper
        set_attr(ident, "int", from_bytes(t[3]))
        set_attr(ident, "is_safe", unknown)
        ts = t[8]
        if ts != last_ts:  # events of one append share their timestamp
            last_ts, last_dt = ts, datetime.fromtimestamp(ts, UTC)
        append((t[0], t[1], t[2], ident, t[4], t[5], t[6] == 1, t[7], last_dt))
    return out


_EPOCH = datetime.fromtimestamp(0, UTC)


class SQLiteBackend:
    """The ``sqlite://`` event store engine."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        durable=True, multi_process=True, live_notify=False
    )

    def __init__(self, conn: sqlite3.Connection, prefix: str, busy: float, poll: float) -> None:
        self._conn = conn
        self._p = prefix
        self._busy_timeout = busy
        self._poll = poll
        self._lock = asyncio.Lock()
        self._signal = Signal()
        p = prefix
        self._q_head = f"SELECT coalesce(max(position), 0) FROM {p}es_events"
        self._q_state = (
            f"SELECT (SELECT max(version) FROM {p}es_events WHERE stream = ?1),"
            f" EXISTS (SELECT 1 FROM {p}es_tombstones WHERE stream = ?1)"
        )
        self._q_insert = (
            f"INSERT INTO {p}es_events (position, stream, version, id, type, data, raw,"
            " metadata, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._q_all = (
            f"SELECT {_COLUMNS} FROM {p}es_events WHERE position >= ? ORDER BY position LIMIT ?"
        )
        self._q_fwd = (
            f"SELECT {_COLUMNS} FROM {p}es_events WHERE stream = ? AND version >= ?"
            " ORDER BY version LIMIT ?"
        )
        self._q_back = (
            f"SELECT {_COLUMNS} FROM {p}es_events WHERE stream = ? AND version <= ?"
            " ORDER BY version DESC LIMIT ?"
        )
        self._q_tomb = f"SELECT 1 FROM {p}es_tombstones WHERE stream = ?"

    @classmethod
    async def open(cls, url: ParsedURL) -> SQLiteBackend:
        path = url.path
        if url.host and url.host not in ("", "localhost"):
            path = url.host + path
        if not path or path == "/":
            raise ConfigError(f"{url.masked()}: give a database file, sqlite:///path/to/events.db")
        if path != ":memory:" and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        prefix = url.query.get("prefix", "")
        if prefix and not prefix.replace("_", "").isalnum():
            raise ConfigError(f"{url.masked()}: prefix must be letters, digits and _")
        sync = url.query.get("synchronous", "NORMAL").upper()
        if sync not in ("NORMAL", "FULL", "EXTRA"):
            raise ConfigError(f"{url.masked()}: synchronous must be NORMAL, FULL or EXTRA")
        busy = url.get_float("busy_timeout", 30.0)
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"cannot open {path}: {exc}", url=url.masked()) from exc
        self = cls(conn, prefix, busy, url.get_float("poll", 0.05))
        try:
            await self._setup(sync)
        except BaseException:
            conn.close()
            raise
        return self

    async def _setup(self, sync: str) -> None:
        conn = self._conn
        conn.execute("PRAGMA busy_timeout = 0")
        # journal_mode=WAL fails at once with "database is locked" (ignoring the
        # busy timeout) when several processes open a new file together: retry.
        mode = await self._retry(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
        if mode is None or str(mode[0]).lower() != "wal":
            raise BackendError(f"SQLite refused WAL mode (got {mode}); is the file on NFS?")
        conn.execute(f"PRAGMA synchronous = {sync}")
        # Crypto-shredding deletes keys: overwrite freed pages rather than leave them readable.
        conn.execute("PRAGMA secure_delete = ON")

        def create() -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.format(p=self._p).split(";"):
                    if statement.strip():
                        conn.execute(statement)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if conn.in_transaction:
                conn.execute("COMMIT")

        exists = await self._retry(
            lambda: conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name IN (?, ?, ?, ?)",
                tuple(f"{self._p}es_{t}" for t in ("events", "tombstones", "snapshots", "keys")),
            ).fetchone()
        )
        if exists is None or exists[0] < 4:
            await self._retry(create)

    async def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop; on SQLITE_BUSY back off asynchronously and retry."""
        deadline = time.monotonic() + self._busy_timeout
        delay = 0.0005
        while True:
            try:
                return fn()
            except sqlite3.ProgrammingError as exc:  # e.g. the store was closed
                raise BackendError(f"SQLite: {exc}") from exc
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise BackendError(f"SQLite: {exc}") from exc
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                if time.monotonic() > deadline:
                    raise BackendUnavailable(
                        f"SQLite database stayed locked for {self._busy_timeout}s: {exc}"
                    ) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def close(self) -> None:
        async with self._lock:
            self._conn.close()

    # -- writes -------------------------------------------------------------

    def _append_tx(
        self, stream: str, events: Sequence[EncodedEvent], expected: int
    ) -> AppendResult:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            current, deleted = conn.execute(self._q_state, (stream,)).fetchone()
            if deleted:
                raise StreamDeleted(stream)
            current = -1 if current is None else current
            try:
                check_expected(stream, expected, current)
            except BackendError:
                replay = self._replay(stream, events)
                if replay is not None:
                    conn.execute("ROLLBACK")
                    return replay
                raise
            head = conn.execute(self._q_head).fetchone()[0]
            now = time.time()
            rows = [
                (head + 1 + i, stream, current + 1 + i, e.id.bytes, e.type, e.data, e.raw,
                 e.metadata, now)
                for i, e in enumerate(events)
            ]  # fmt: skip
            try:
                if len(rows) == 1:
                    conn.execute(self._q_insert, rows[0])
                else:
                    conn.executemany(self._q_insert, rows)
            except sqlite3.IntegrityError:
                replay = self._replay(stream, events)
                if replay is not None:
                    conn.execute("ROLLBACK")
                    return replay
                raise
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        n = len(events)
        return AppendResult(current + 1, current + n, head + 1, head + n)

    def _replay(self, stream: str, events: Sequence[EncodedEvent]) -> AppendResult | None:
        ids = [e.id for e in events]
        marks = ",".join("?" * len(ids))
        found = self._conn.execute(
            f"SELECT id, stream, version, position FROM {self._p}es_events WHERE id IN ({marks})",
            [i.bytes for i in ids],
        ).fetchall()
        return decide_replay(stream, ids, [Stored(UUID(bytes=i), s, v, p) for i, s, v, p in found])

    async def append(
        self, stream: str, events: Sequence[EncodedEvent], expected: int
    ) -> AppendResult:
        check_batch(stream, [e.id for e in events])
        async with self._lock:
            result = await self._retry(lambda: self._append_tx(stream, events, expected))
        self._signal.fire()
        return result

    async def delete_stream(self, stream: str) -> None:
        sql = f"INSERT OR IGNORE INTO {self._p}es_tombstones (stream) VALUES (?)"
        async with self._lock:
            await self._retry(lambda: self._conn.execute(sql, (stream,)))

    # -- reads --------------------------------------------------------------

    async def _fetch(self, sql: str, args: tuple[object, ...]) -> list[Row]:
        async with self._lock:
            found = await self._retry(lambda: self._conn.execute(sql, args).fetchall())
        return _rows(found)

    async def read_stream(
        self, stream: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        async with self._lock:

            def go() -> list[_Raw]:
                if self._conn.execute(self._q_tomb, (stream,)).fetchone():
                    raise StreamDeleted(stream)
                if backwards:
                    start = (1 << 62) if from_version < 0 else from_version
                    return self._conn.execute(self._q_back, (stream, start, limit)).fetchall()
                return self._conn.execute(self._q_fwd, (stream, from_version, limit)).fetchall()

            found = await self._retry(go)
        return _rows(found)

    async def read_all(
        self, from_position: int, limit: int, types: Sequence[str] | None
    ) -> list[Row]:
        if types is None:
            return await self._fetch(self._q_all, (from_position, limit))
        marks = ",".join("?" * len(types))
        sql = (
            f"SELECT {_COLUMNS} FROM {self._p}es_events WHERE position >= ? AND type IN ({marks})"
            " ORDER BY position LIMIT ?"
        )
        return await self._fetch(sql, (from_position, *types, limit))

    async def subscribe(
        self, from_position: int, types: Sequence[str] | None, batch: int
    ) -> AsyncIterator[list[Row]]:
        wake = self._signal.new()
        async for rows in ordered_subscribe(
            self.read_all, wake, from_position, types, batch, self._poll
        ):
            yield rows

    async def head_position(self) -> int:
        async with self._lock:
            got = await self._retry(lambda: self._conn.execute(self._q_head).fetchone())
        return int(got[0])

    async def stream_version(self, stream: str) -> int:
        async with self._lock:
            current, deleted = await self._retry(
                lambda: self._conn.execute(self._q_state, (stream,)).fetchone()
            )
        if deleted:
            raise StreamDeleted(stream)
        return -1 if current is None else int(current)

    # -- snapshots and keys -------------------------------------------------

    async def save_snapshot(self, stream: str, version: int, state: bytes) -> None:
        sql = (
            f"INSERT INTO {self._p}es_snapshots (stream, version, state) VALUES (?, ?, ?)"
            " ON CONFLICT (stream) DO UPDATE SET version = excluded.version,"
            " state = excluded.state WHERE excluded.version > version"
        )
        async with self._lock:
            await self._retry(lambda: self._conn.execute(sql, (stream, version, state)))

    async def load_snapshot(self, stream: str) -> tuple[int, bytes] | None:
        sql = f"SELECT version, state FROM {self._p}es_snapshots WHERE stream = ?"
        async with self._lock:
            got = await self._retry(lambda: self._conn.execute(sql, (stream,)).fetchone())
        return None if got is None else (int(got[0]), bytes(got[1]))

    async def put_key(self, subject: str, key: bytes) -> bytes:
        ins = f"INSERT OR IGNORE INTO {self._p}es_keys (subject, key) VALUES (?, ?)"
        sel = f"SELECT key FROM {self._p}es_keys WHERE subject = ?"

        def go() -> bytes:
            self._conn.execute(ins, (subject, key))
            return bytes(self._conn.execute(sel, (subject,)).fetchone()[0])

        async with self._lock:
            return await self._retry(go)

    async def get_key(self, subject: str) -> bytes | None:
        sql = f"SELECT key FROM {self._p}es_keys WHERE subject = ?"
        async with self._lock:
            got = await self._retry(lambda: self._conn.execute(sql, (subject,)).fetchone())
        return None if got is None else bytes(got[0])

    async def delete_key(self, subject: str) -> None:
        sql = f"DELETE FROM {self._p}es_keys WHERE subject = ?"
        async with self._lock:
            await self._retry(lambda: self._conn.execute(sql, (subject,)))

    async def append_holding(
        self,
        stream: str,
        events: Sequence[EncodedEvent],
        opened: asyncio.Event,
        release: asyncio.Event,
    ) -> AppendResult:
        """Test hook: append, but hold the write transaction open until ``release``."""
        async with self._lock:
            conn = self._conn
            await self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
            try:
                head = conn.execute(self._q_head).fetchone()[0]
                current = conn.execute(self._q_state, (stream,)).fetchone()[0]
                current = -1 if current is None else current
                conn.executemany(
                    self._q_insert,
                    [
                        (head + 1 + i, stream, current + 1 + i, e.id.bytes, e.type, e.data,
                         e.raw, e.metadata, time.time())
                        for i, e in enumerate(events)
                    ],
                )  # fmt: skip
                opened.set()
                await release.wait()
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
        self._signal.fire()
        n = len(events)
        return AppendResult(current + 1, current + n, head + 1, head + n)
