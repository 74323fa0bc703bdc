"""SQLite log store (the collector's embedded default): WAL mode, one writer thread."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.sidecar._backend import Capabilities, Row, StoredRecord
from stanchion.sidecar._core import LogQuery
from stanchion.urls import ParsedURL, parse_url

__all__ = ["SQLiteLogStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {t} (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    service TEXT NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS {t}_ts ON {t}(ts);
CREATE INDEX IF NOT EXISTS {t}_service_ts ON {t}(service, ts);
CREATE INDEX IF NOT EXISTS {t}_level_ts ON {t}(level, ts);
"""


def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def build_where(query: LogQuery, ph: Any) -> tuple[str, list[Any]]:
    """SQL conditions and parameters for ``query``; ``ph(n)`` renders placeholder n."""
    conds: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        conds.append(sql.replace("?", ph(len(args))))

    if query.service is not None:
        add("service = ?", query.service)
    if query.levels:
        marks = []
        for lv in query.levels:
            args.append(lv)
            marks.append(ph(len(args)))
        conds.append(f"level IN ({', '.join(marks)})")
    if query.source is not None:
        add("source = ?", query.source)
    if query.since is not None:
        add("ts >= ?", query.since)
    if query.until is not None:
        add("ts < ?", query.until)
    if query.q:
        add("LOWER(message) LIKE LOWER(?) ESCAPE '\\'", _like(query.q))
    if query.cursor is not None:
        add("seq < ?" if query.descending else "seq > ?", query.cursor)
    return (" WHERE " + " AND ".join(conds)) if conds else "", args


class SQLiteLogStore:
    """Log store in one SQLite file (``sqlite:///logs.db?table=logs``).

    .. versionadded:: 0.1
    """

    capabilities = Capabilities(durable=True, concurrent_writers=False)

    def __init__(self, path: str, table: str = "logs") -> None:
        if not table.isidentifier():
            raise ConfigError(f"table {table!r} is not a valid identifier")
        self.path = path
        self.table = table
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stanchion-logstore")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str | ParsedURL) -> SQLiteLogStore:
        """Build from ``sqlite:///path.db`` (``?table=`` optional)."""
        u = parse_url(url) if isinstance(url, str) else url
        path = u.database  # sqlite:///rel.db is relative, sqlite:////abs.db absolute
        if not path:
            raise ConfigError(f"{u.masked()}: give a database file, e.g. sqlite:///logs.db")
        return cls(path, u.query.get("table", "logs"))

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            parent = Path(self.path).parent
            parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA.format(t=self.table))
            self._conn = conn
        return self._conn

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite {self.path}: {exc}") from exc

    def _insert(self, rows: list[Row], returning: bool) -> tuple[int, list[StoredRecord]]:
        conn = self._open()
        t = self.table
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.execute(f"SELECT COALESCE(MAX(seq), 0) FROM {t}").fetchone()[0]
            changes = conn.total_changes
            conn.executemany(
                f"INSERT OR IGNORE INTO {t} (id, ts, service, level, source, message, body)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            n = conn.total_changes - changes
            new = (
                conn.execute(
                    f"SELECT seq, ts, body FROM {t} WHERE seq > ? ORDER BY seq", (before,)
                ).fetchall()
                if returning and n
                else []
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return n, [StoredRecord(s, ts, bytes(b)) for s, ts, b in new]

    async def insert(
        self, rows: list[Row], *, returning: bool = False
    ) -> tuple[int, list[StoredRecord]]:
        """Insert new ids (INSERT OR IGNORE); the count and, if asked, the new records."""
        if not rows:
            return 0, []
        result: tuple[int, list[StoredRecord]] = await self._run(self._insert, rows, returning)
        return result

    def _query(self, query: LogQuery) -> list[StoredRecord]:
        where, args = build_where(query, lambda n: "?")
        order = "DESC" if query.descending else "ASC"
        sql = (
            f"SELECT seq, ts, body FROM {self.table}{where} ORDER BY seq {order} LIMIT "
            f"{int(query.limit) + 1}"
        )
        rows = self._open().execute(sql, args).fetchall()
        return [StoredRecord(s, ts, bytes(b)) for s, ts, b in rows]

    async def query(self, query: LogQuery) -> list[StoredRecord]:
        """Matching records after the cursor, in arrival order."""
        result: list[StoredRecord] = await self._run(self._query, query)
        return result

    def _prune(self, before_ts: float | None, max_records: int | None) -> int:
        conn = self._open()
        n = 0
        if before_ts is not None:
            n += conn.execute(f"DELETE FROM {self.table} WHERE ts < ?", (before_ts,)).rowcount
        if max_records is not None:
            n += conn.execute(
                f"DELETE FROM {self.table} WHERE seq <= (SELECT seq FROM {self.table} "
                "ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                (max_records,),
            ).rowcount
        return n

    async def prune(self, before_ts: float | None, max_records: int | None) -> int:
        """Apply the retention limits; returns how many records were deleted."""
        result: int = await self._run(self._prune, before_ts, max_records)
        return result

    async def count(self) -> int:
        """How many records are stored."""
        result: int = await self._run(
            lambda: self._open().execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]
        )
        return result

    async def aclose(self) -> None:
        """Close the database."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=False)
