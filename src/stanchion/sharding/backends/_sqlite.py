"""SQLite shards and map store: one file per shard, connections on worker threads.

Each pooled connection lives on its own single worker thread (sqlite3
objects must stay on one thread); the event loop never blocks on a query.
Files use WAL journaling and a busy timeout so readers never block writers
and concurrent writers queue instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from stanchion.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    ConflictError,
    ShardMapChanged,
)
from stanchion.sharding._backend import ADMIN_VERSION, FENCE_MESSAGE, Params, Row, StoredMap
from stanchion.urls import ParsedURL, parse_url

__all__ = ["SQLiteMapStore", "SQLiteShard", "sqlite_path"]

T = TypeVar("T")


def sqlite_path(parsed: ParsedURL) -> str:
    """The file path of a ``sqlite:///rel.db`` or ``sqlite:////abs.db`` URL."""
    path = parsed.database
    if not path or path == ":memory:":
        raise ConfigError(f"{parsed.masked()}: a shard needs a file path (sqlite:///path/shard.db)")
    return path


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _map_error(exc: BaseException, where: str) -> BaseException:
    msg = str(exc)
    if FENCE_MESSAGE in msg or "no such function: stanchion_map_version" in msg:
        return ShardMapChanged(
            "the shard map changed (a reshard is cutting over); reload the map and retry"
        )
    if isinstance(exc, sqlite3.IntegrityError):
        return ConflictError(f"{where}: {exc}")
    if isinstance(exc, sqlite3.OperationalError) and (
        "unable to open" in msg
        or "disk I/O" in msg
        or "readonly" in msg
        or "database is locked" in msg  # the busy timeout ran out: the shard did not answer
    ):
        return BackendUnavailable(f"{where}: {exc}", url=where)
    if isinstance(exc, sqlite3.Error):
        return BackendError(f"{where}: {exc}")
    return exc


class _Conn:
    """One sqlite3 connection bound to one worker thread."""

    def __init__(self, path: str, version_fn: Callable[[], int], timeout: float) -> None:
        self._path = path
        self._version_fn = version_fn
        self._timeout = timeout
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stanchion-sqlite")
        self.db: sqlite3.Connection | None = None
        self.declared = 0  # the map version the running statement declares

    def _open(self) -> sqlite3.Connection:
        if self.db is None:
            db = sqlite3.connect(
                self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.create_function("stanchion_map_version", 0, lambda: self.declared)
            self.db = db
        return self.db

    async def run(self, fn: Callable[[sqlite3.Connection], T], version: int | None = None) -> T:
        # read the version in the calling task (its routing decision), use it
        # on the worker thread; a transaction keeps the version it began with
        if version is None:
            version = self._version_fn()

        def call() -> T:
            self.declared = version
            return fn(self._open())

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        def shut() -> None:
            if self.db is not None:
                self.db.close()
                self.db = None

        with contextlib.suppress(Exception):
            self._pool.submit(shut).result(timeout=5)
        self._pool.shutdown(wait=False)


def _rows(cur: sqlite3.Cursor) -> list[Row]:
    if cur.description is None:
        return []
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def _args(params: Params) -> Sequence[Any] | Mapping[str, Any]:
    if params is None:
        return ()
    return params


class _Tx:
    def __init__(self, shard: SQLiteShard, conn: _Conn, version: int) -> None:
        self._shard = shard
        self._conn = conn
        self._version = version

    async def execute(self, sql: str, params: Params = None) -> int:
        args = _args(params)
        try:
            return await self._conn.run(lambda db: db.execute(sql, args).rowcount, self._version)
        except Exception as exc:
            raise _map_error(exc, self._shard.where) from exc

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        args = _args(params)
        try:
            return await self._conn.run(lambda db: _rows(db.execute(sql, args)), self._version)
        except Exception as exc:
            raise _map_error(exc, self._shard.where) from exc


class SQLiteShard:
    """A shard stored in one SQLite file.

    URL: ``sqlite:///path/shard.db`` (``?pool=4`` connections, ``?timeout=5``
    busy timeout in seconds).
    """

    dialect = "sqlite"

    def __init__(
        self,
        url: str,
        *,
        version_fn: Callable[[], int] = lambda: ADMIN_VERSION,
        pool_size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        parsed = parse_url(url)
        self.url = url
        self.where = parsed.masked()
        self._path = sqlite_path(parsed)
        self._size = pool_size or parsed.get_int("pool", 4)
        self._timeout = timeout if timeout is not None else parsed.get_float("timeout", 5.0)
        self._version_fn = version_fn
        self._idle: asyncio.LifoQueue[_Conn] = asyncio.LifoQueue()
        self._all: list[_Conn] = []
        self._closed = False

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> SQLiteShard:
        """Open the shard and check that its file can be opened."""
        shard = cls(url, **kwargs)
        await shard.fetch("SELECT 1")
        return shard

    async def _acquire(self) -> _Conn:
        if self._closed:
            raise BackendUnavailable(f"{self.where}: shard closed", url=self.where)
        try:
            return self._idle.get_nowait()
        except asyncio.QueueEmpty:
            pass
        if len(self._all) < self._size:
            conn = _Conn(self._path, self._version_fn, self._timeout)
            self._all.append(conn)
            return conn
        return await self._idle.get()

    def _release(self, conn: _Conn, broken: bool = False) -> None:
        if broken or self._closed:
            with contextlib.suppress(ValueError):
                self._all.remove(conn)
            conn.close()
            return
        self._idle.put_nowait(conn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = await self._acquire()
        broken = False
        try:
            return await conn.run(fn)
        except Exception as exc:
            mapped = _map_error(exc, self.where)
            broken = isinstance(mapped, BackendUnavailable) and conn.db is None
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            self._release(conn, broken)

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run one statement (autocommit); return the rows changed."""
        args = _args(params)
        return await self._run(lambda db: db.execute(sql, args).rowcount)

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        """Run a query; return its rows as dicts."""
        args = _args(params)
        return await self._run(lambda db: _rows(db.execute(sql, args)))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Tx]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) on one connection."""
        conn = await self._acquire()
        broken = False
        version = self._version_fn()
        try:
            try:
                await conn.run(lambda db: db.execute("BEGIN IMMEDIATE"), version)
            except Exception as exc:
                broken = conn.db is None
                raise _map_error(exc, self.where) from exc
            try:
                yield _Tx(self, conn, version)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(conn.run(lambda db: db.execute("ROLLBACK")))
                raise
            try:
                await conn.run(lambda db: db.execute("COMMIT"))
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await conn.run(lambda db: db.execute("ROLLBACK"))
                raise _map_error(exc, self.where) from exc
        finally:
            self._release(conn, broken)

    async def expire(self) -> None:
        """Nothing to do: connections read the router's version on every statement."""

    async def close(self) -> None:
        """Close every connection."""
        self._closed = True
        conns, self._all = self._all, []
        for conn in conns:
            await asyncio.to_thread(conn.close)

    # -- resharding primitives ------------------------------------------------

    async def _script(self, statements: Sequence[str]) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for s in statements:
                    db.execute(s)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(go)

    async def table_exists(self, table: str) -> bool:
        """True if ``table`` exists."""
        rows = await self.fetch(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        )
        return bool(rows)

    async def table_ddl(self, table: str) -> list[str]:
        """The table's CREATE TABLE and CREATE INDEX statements."""
        rows = await self.fetch(
            "SELECT type, sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
            "AND type IN ('table', 'index') AND name NOT LIKE '_stanchion%' "
            "ORDER BY type = 'index', name",
            (table,),
        )
        out = []
        for r in rows:
            sql = str(r["sql"])
            head = "CREATE TABLE " if r["type"] == "table" else None
            if head and sql.upper().startswith(head):
                sql = "CREATE TABLE IF NOT EXISTS " + sql[len(head) :]
            elif sql.upper().startswith("CREATE INDEX "):
                sql = "CREATE INDEX IF NOT EXISTS " + sql[len("CREATE INDEX ") :]
            elif sql.upper().startswith("CREATE UNIQUE INDEX "):
                sql = "CREATE UNIQUE INDEX IF NOT EXISTS " + sql[len("CREATE UNIQUE INDEX ") :]
            out.append(sql)
        return out

    async def install_capture(self, table: str, column: str) -> None:
        """Change log ``_stanchion_cdc_<table>`` and AFTER triggers on ``table``."""
        log, t, k = _q(f"_stanchion_cdc_{table}"), _q(table), _q(column)
        trig = f"_stanchion_cdc_{table}"
        await self._script(
            [
                f"CREATE TABLE IF NOT EXISTS {log} (seq INTEGER PRIMARY KEY AUTOINCREMENT, k)",
                f"CREATE TRIGGER IF NOT EXISTS {_q(trig + '_i')} AFTER INSERT ON {t} "
                f"BEGIN INSERT INTO {log}(k) VALUES (NEW.{k}); END",
                f"CREATE TRIGGER IF NOT EXISTS {_q(trig + '_u')} AFTER UPDATE ON {t} "
                f"BEGIN INSERT INTO {log}(k) VALUES (OLD.{k}); "
                f"INSERT INTO {log}(k) SELECT NEW.{k} WHERE NEW.{k} IS NOT OLD.{k}; END",
                f"CREATE TRIGGER IF NOT EXISTS {_q(trig + '_d')} AFTER DELETE ON {t} "
                f"BEGIN INSERT INTO {log}(k) VALUES (OLD.{k}); END",
            ]
        )

    async def remove_capture(self, table: str) -> None:
        """Drop the change log and its triggers."""
        trig = f"_stanchion_cdc_{table}"
        await self._script(
            [f"DROP TRIGGER IF EXISTS {_q(trig + s)}" for s in ("_i", "_u", "_d")]
            + [f"DROP TABLE IF EXISTS {_q(trig)}"]
        )

    async def install_fence(self, tables: Sequence[str]) -> None:
        """``_stanchion_fence`` plus BEFORE triggers comparing the router's version."""
        stmts = [
            "CREATE TABLE IF NOT EXISTS _stanchion_fence "
            "(id INTEGER PRIMARY KEY CHECK (id = 1), min_version INTEGER NOT NULL)",
            "INSERT OR IGNORE INTO _stanchion_fence VALUES (1, 0)",
        ]
        for table in tables:
            for suffix, op in (("_i", "INSERT"), ("_u", "UPDATE"), ("_d", "DELETE")):
                stmts.append(
                    f"CREATE TRIGGER IF NOT EXISTS {_q('_stanchion_fence_' + table + suffix)} "
                    f"BEFORE {op} ON {_q(table)} BEGIN SELECT RAISE(ABORT, '{FENCE_MESSAGE}') "
                    "WHERE stanchion_map_version() < "
                    "(SELECT min_version FROM _stanchion_fence WHERE id = 1); END"
                )
        await self._script(stmts)

    async def set_fence(self, version: int, tables: Sequence[str]) -> None:
        """Raise the fence to ``version`` (the write lock waits for writers in flight)."""
        await self.execute("UPDATE _stanchion_fence SET min_version = ? WHERE id = 1", (version,))

    async def remove_fence(self, tables: Sequence[str]) -> None:
        """Drop the fence triggers and table."""
        stmts = [
            f"DROP TRIGGER IF EXISTS {_q('_stanchion_fence_' + t + s)}"
            for t in tables
            for s in ("_i", "_u", "_d")
        ]
        await self._script([*stmts, "DROP TABLE IF EXISTS _stanchion_fence"])

    async def read_changes(self, table: str, limit: int) -> list[tuple[int, Any]]:
        """The oldest ``limit`` log entries."""
        log = _q(f"_stanchion_cdc_{table}")
        rows = await self._run(
            lambda db: db.execute(
                f"SELECT seq, k FROM {log} ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        )
        return [(int(s), k) for s, k in rows]

    async def delete_changes(self, table: str, seqs: Sequence[int]) -> None:
        """Delete processed log entries."""
        log = _q(f"_stanchion_cdc_{table}")
        if seqs:
            await self._run(
                lambda db: db.executemany(f"DELETE FROM {log} WHERE seq = ?", [(s,) for s in seqs])
            )

    async def count_changes(self, table: str) -> int:
        """Entries waiting in the log."""
        log = _q(f"_stanchion_cdc_{table}")
        rows = await self.fetch(f"SELECT count(*) AS n FROM {log}")
        return int(rows[0]["n"])

    async def scan_keys(self, table: str, column: str, after: Any, limit: int) -> list[Any]:
        """Distinct keys in order, after ``after``."""
        t, k = _q(table), _q(column)
        if after is None:
            sql, args = f"SELECT DISTINCT {k} FROM {t} ORDER BY {k} LIMIT ?", (limit,)
        else:
            sql = f"SELECT DISTINCT {k} FROM {t} WHERE {k} > ? ORDER BY {k} LIMIT ?"
            args = (after, limit)  # type: ignore[assignment]
        rows = await self._run(lambda db: db.execute(sql, args).fetchall())
        return [r[0] for r in rows]

    async def rows_for_keys(
        self, table: str, column: str, keys: Sequence[Any]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Every row of ``keys``."""
        if not keys:
            return [], []
        marks = ",".join("?" * len(keys))
        sql = f"SELECT * FROM {_q(table)} WHERE {_q(column)} IN ({marks})"

        def go(db: sqlite3.Connection) -> tuple[list[str], list[tuple[Any, ...]]]:
            cur = db.execute(sql, list(keys))
            return [d[0] for d in cur.description], [tuple(r) for r in cur.fetchall()]

        return await self._run(go)

    async def replace_keys(
        self,
        table: str,
        column: str,
        keys: Sequence[Any],
        columns: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        """Delete ``keys`` and insert ``rows`` in one transaction."""
        if not keys:
            return
        marks = ",".join("?" * len(keys))
        delete = f"DELETE FROM {_q(table)} WHERE {_q(column)} IN ({marks})"
        cols = ",".join(_q(c) for c in columns)
        insert = f"INSERT INTO {_q(table)} ({cols}) VALUES ({','.join('?' * len(columns))})"

        def go(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(delete, list(keys))
                if rows:
                    db.executemany(insert, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(go)

    async def delete_keys(self, table: str, column: str, keys: Sequence[Any]) -> int:
        """Delete the rows of ``keys``."""
        if not keys:
            return 0
        marks = ",".join("?" * len(keys))
        return await self.execute(
            f"DELETE FROM {_q(table)} WHERE {_q(column)} IN ({marks})", list(keys)
        )

    async def replace_table(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Empty ``table`` and insert ``rows``."""
        cols = ",".join(_q(c) for c in columns)
        insert = f"INSERT INTO {_q(table)} ({cols}) VALUES ({','.join('?' * len(columns))})"

        def go(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(f"DELETE FROM {_q(table)}")
                if rows:
                    db.executemany(insert, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(go)


class SQLiteMapStore:
    """Shard maps in a SQLite file: ``sqlite:///maps.db?name=users``.

    Table ``stanchion_shardmap`` (``?table=`` to change), one row per map ``name``.
    """

    def __init__(self, url: str) -> None:
        parsed = parse_url(url)
        self.url = url
        self.where = parsed.masked()
        self._path = sqlite_path(parsed)
        self._name = parsed.query.get("name", "default")
        self._table = _q(parsed.query.get("table", "stanchion_shardmap"))
        self._conn = _Conn(self._path, lambda: ADMIN_VERSION, 10.0)
        self._ready = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def go(db: sqlite3.Connection) -> T:
            if not self._ready:
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} (name TEXT PRIMARY KEY, "
                    "version INTEGER NOT NULL, body TEXT NOT NULL, reshard TEXT)"
                )
                self._ready = True
            return fn(db)

        try:
            return await self._conn.run(go)
        except Exception as exc:
            raise _map_error(exc, self.where) from exc

    async def read(self) -> StoredMap | None:
        """The stored map, or None."""
        row = await self._run(
            lambda db: db.execute(
                f"SELECT version, body, reshard FROM {self._table} WHERE name = ?", (self._name,)
            ).fetchone()
        )
        if row is None:
            return None
        return StoredMap(int(row[0]), json.loads(row[1]), json.loads(row[2]) if row[2] else None)

    async def version(self) -> int | None:
        """The stored version, or None."""
        row = await self._run(
            lambda db: db.execute(
                f"SELECT version FROM {self._table} WHERE name = ?", (self._name,)
            ).fetchone()
        )
        return None if row is None else int(row[0])

    async def write(
        self,
        expected: int | None,
        version: int,
        body: Mapping[str, Any],
        reshard: Mapping[str, Any] | None,
    ) -> bool:
        """Compare-and-set the whole map."""
        b = json.dumps(body, sort_keys=True)
        r = json.dumps(reshard, sort_keys=True) if reshard is not None else None

        def go(db: sqlite3.Connection) -> bool:
            if expected is None:
                cur = db.execute(
                    f"INSERT OR IGNORE INTO {self._table} VALUES (?, ?, ?, ?)",
                    (self._name, version, b, r),
                )
            else:
                cur = db.execute(
                    f"UPDATE {self._table} SET version = ?, body = ?, reshard = ? "
                    "WHERE name = ? AND version = ?",
                    (version, b, r, self._name, expected),
                )
            return cur.rowcount == 1

        return await self._run(go)

    async def write_reshard(self, version: int, reshard: Mapping[str, Any] | None) -> bool:
        """Replace the reshard state if the version is unchanged."""
        r = json.dumps(reshard, sort_keys=True) if reshard is not None else None
        return await self._run(
            lambda db: (
                db.execute(
                    f"UPDATE {self._table} SET reshard = ? WHERE name = ? AND version = ?",
                    (r, self._name, version),
                ).rowcount
                == 1
            )
        )

    async def close(self) -> None:
        """Close the connection."""
        await asyncio.to_thread(self._conn.close)
