"""PostgreSQL shards and map store (asyncpg).

Each shard has its own asyncpg pool. A connection declares the router's map
version in the session setting ``stanchion.map_version`` when it is acquired
and the version moved since it last did (the write fence compares it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import asyncpg

from stanchion.errors import (
    BackendError,
    BackendUnavailable,
    ConflictError,
    ShardMapChanged,
)
from stanchion.sharding._backend import ADMIN_VERSION, FENCE_MESSAGE, Params, Row, StoredMap
from stanchion.sharding._core import translate_named
from stanchion.urls import parse_url

__all__ = ["PostgresMapStore", "PostgresShard"]

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # the connection broke mid-protocol
)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _map_error(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        return ConflictError(f"{where}: {exc}")
    if isinstance(exc, asyncpg.exceptions.PostgresError) and FENCE_MESSAGE in str(exc):
        return ShardMapChanged(
            "the shard map changed (a reshard is cutting over); reload the map and retry"
        )
    if isinstance(exc, _UNAVAILABLE) or "not currently accepting connections" in str(exc):
        return BackendUnavailable(f"{where}: {type(exc).__name__}: {exc}", url=where)
    if isinstance(exc, asyncpg.exceptions.PostgresError):
        return BackendError(f"{where}: {exc}")
    if type(exc).__module__.startswith("asyncpg"):  # never leak a driver error
        return BackendError(f"{where}: {type(exc).__name__}: {exc}")
    return exc


def _count(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _dsn(url: str) -> tuple[str, dict[str, str]]:
    parsed = parse_url(url)
    base = parsed.without_query()
    _, rest = base.split("://", 1)
    return "postgresql://" + rest, parsed.query


class _Statements:
    """``:name`` -> ``$n`` translation, cached per SQL text."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[str, tuple[str, ...]]] = {}

    def prepare(self, sql: str, params: Params) -> tuple[str, Sequence[Any]]:
        if params is None:
            return sql, ()
        if isinstance(params, Mapping):
            hit = self._cache.get(sql)
            if hit is None:
                hit = translate_named(sql)
                if len(self._cache) < 4096:
                    self._cache[sql] = hit
            text, names = hit
            try:
                return text, [params[n] for n in names]
            except KeyError as exc:
                raise BackendError(f"missing parameter :{exc.args[0]} for {sql!r}") from None
        return sql, params


class _Tx:
    def __init__(self, shard: PostgresShard, conn: Any) -> None:
        self._shard = shard
        self._conn = conn

    async def execute(self, sql: str, params: Params = None) -> int:
        text, args = self._shard._stmts.prepare(sql, params)
        try:
            return _count(await self._conn.execute(text, *args))
        except Exception as exc:
            raise _map_error(exc, self._shard.where) from exc

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        text, args = self._shard._stmts.prepare(sql, params)
        try:
            return [dict(r) for r in await self._conn.fetch(text, *args)]
        except Exception as exc:
            raise _map_error(exc, self._shard.where) from exc


class PostgresShard:
    """A shard in one PostgreSQL database.

    URL: ``postgresql://user@host:5432/db`` (``?pool=10`` max connections,
    ``?timeout=5`` connect and command timeout in seconds).
    """

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        version_fn: Callable[[], int] = lambda: ADMIN_VERSION,
        pool_size: int | None = None,
        timeout: float | None = None,
    ) -> None:
        dsn, _ = _dsn(url)
        parsed = parse_url(url)
        self.url = url
        self.where = parsed.masked()
        self._dsn = dsn
        self._size = pool_size or parsed.get_int("pool", 10)
        self._timeout = timeout if timeout is not None else parsed.get_float("timeout", 5.0)
        self._version_fn = version_fn
        self._pool: Any = None
        self._stmts = _Statements()
        self._declared: dict[int, int] = {}

    async def _declare(self, conn: Any) -> None:
        # Runs on every acquire: one round trip only when the router's map
        # version moved since this connection last declared it.
        version = self._version_fn()
        pid = conn.get_server_pid()
        if self._declared.get(pid) != version:
            await conn.execute(
                "SELECT set_config('stanchion.map_version', $1, false)", str(version)
            )
            self._declared[pid] = version

    async def _reset(self, conn: Any) -> None:
        # Replaces asyncpg's RESET ALL round trip on every release (asyncpg
        # still rolls back an open transaction first). Router connections run
        # plain statements and transactions; keeping the session as is keeps
        # the declared map version too (``_declare`` updates it when it moves).
        return None

    @classmethod
    async def open(cls, url: str, **kwargs: Any) -> PostgresShard:
        """Create the pool (one connection opened at once to check the server)."""
        shard = cls(url, **kwargs)
        try:
            shard._pool = await asyncpg.create_pool(
                shard._dsn,
                min_size=1,
                max_size=shard._size,
                timeout=shard._timeout,
                command_timeout=None,
                init=shard._declare,
                setup=shard._declare,
                reset=shard._reset,
            )
        except Exception as exc:
            raise _map_error(exc, shard.where) from exc
        return shard

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run one statement; return the rows changed."""
        text, args = self._stmts.prepare(sql, params)
        try:
            return _count(await self._pool.execute(text, *args))
        except Exception as exc:
            raise _map_error(exc, self.where) from exc

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        """Run a query; return its rows as dicts."""
        text, args = self._stmts.prepare(sql, params)
        try:
            return [dict(r) for r in await self._pool.fetch(text, *args)]
        except Exception as exc:
            raise _map_error(exc, self.where) from exc

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Tx]:
        """A transaction on one pooled connection."""
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
        except Exception as exc:
            raise _map_error(exc, self.where) from exc
        try:
            tx = conn.transaction()
            try:
                await tx.start()
            except Exception as exc:
                raise _map_error(exc, self.where) from exc
            try:
                yield _Tx(self, conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise
            try:
                await tx.commit()
            except Exception as exc:
                raise _map_error(exc, self.where) from exc
        finally:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    async def expire(self) -> None:
        """Nothing to do: each acquire declares the router's current map version."""

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()

    # -- resharding primitives ------------------------------------------------

    async def _script(self, statements: Sequence[str]) -> None:
        async with self.transaction() as tx:
            for s in statements:
                await tx.execute(s)

    async def table_exists(self, table: str) -> bool:
        """True if ``table`` exists in the search path."""
        rows = await self.fetch("SELECT to_regclass($1) IS NOT NULL AS ok", [_q(table)])
        return bool(rows[0]["ok"])

    async def table_ddl(self, table: str) -> list[str]:
        """CREATE TABLE (columns, defaults, primary/unique/check constraints) and indexes.

        Sequence defaults (``serial``) are left out: ids of sharded rows come
        from the application, not from one shard's sequence.
        """
        cols = await self.fetch(
            "SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, "
            "a.attnotnull AS notnull, pg_get_expr(d.adbin, d.adrelid) AS dflt "
            "FROM pg_attribute a LEFT JOIN pg_attrdef d "
            "ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
            "WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped "
            "ORDER BY a.attnum",
            [_q(table)],
        )
        parts = []
        for c in cols:
            p = f"{_q(c['name'])} {c['type']}"
            if c["dflt"] and "nextval(" not in c["dflt"]:
                p += f" DEFAULT {c['dflt']}"
            if c["notnull"]:
                p += " NOT NULL"
            parts.append(p)
        cons = await self.fetch(
            "SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'c') "
            "ORDER BY contype, conname",
            [_q(table)],
        )
        parts += [f"CONSTRAINT {_q(c['conname'])} {c['def']}" for c in cons]
        out = [f"CREATE TABLE IF NOT EXISTS {_q(table)} ({', '.join(parts)})"]
        idx = await self.fetch(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() "
            "AND tablename = $1 AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = $2::regclass)",
            [table, _q(table)],
        )
        for i in idx:
            d = str(i["indexdef"])
            d = d.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1)
            d = d.replace("CREATE UNIQUE INDEX ", "CREATE UNIQUE INDEX IF NOT EXISTS ", 1)
            out.append(d)
        return out

    async def install_capture(self, table: str, column: str) -> None:
        """Change log ``_stanchion_cdc_<table>`` (typed like the key) and a row trigger."""
        rows = await self.fetch(
            "SELECT format_type(atttypid, atttypmod) AS t FROM pg_attribute "
            "WHERE attrelid = $1::regclass AND attname = $2",
            [_q(table), column],
        )
        if not rows:
            raise BackendError(f"{self.where}: table {table!r} has no column {column!r}")
        ktype = rows[0]["t"]
        name = f"_stanchion_cdc_{table}"
        log, fn, t, k = _q(name), _q(name), _q(table), _q(column)
        await self._script(
            [
                f"CREATE TABLE IF NOT EXISTS {log} (seq bigserial PRIMARY KEY, k {ktype})",
                f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $f$ "
                f"BEGIN IF TG_OP = 'INSERT' THEN INSERT INTO {log}(k) VALUES (NEW.{k}); "
                f"ELSIF TG_OP = 'DELETE' THEN INSERT INTO {log}(k) VALUES (OLD.{k}); "
                f"ELSE INSERT INTO {log}(k) VALUES (OLD.{k}); "
                f"IF NEW.{k} IS DISTINCT FROM OLD.{k} THEN "
                f"INSERT INTO {log}(k) VALUES (NEW.{k}); END IF; END IF; RETURN NULL; END $f$",
                f"CREATE OR REPLACE TRIGGER {_q(name)} AFTER INSERT OR UPDATE OR DELETE ON {t} "
                f"FOR EACH ROW EXECUTE FUNCTION {fn}()",
            ]
        )

    async def remove_capture(self, table: str) -> None:
        """Drop the trigger, its function and the log."""
        name = _q(f"_stanchion_cdc_{table}")
        stmts = [f"DROP FUNCTION IF EXISTS {name}() CASCADE", f"DROP TABLE IF EXISTS {name}"]
        await self._script(stmts)

    async def install_fence(self, tables: Sequence[str]) -> None:
        """``_stanchion_fence`` and statement triggers checking ``stanchion.map_version``."""
        stmts = [
            "CREATE TABLE IF NOT EXISTS _stanchion_fence "
            "(id int PRIMARY KEY CHECK (id = 1), min_version bigint NOT NULL)",
            "INSERT INTO _stanchion_fence VALUES (1, 0) ON CONFLICT DO NOTHING",
            "CREATE OR REPLACE FUNCTION _stanchion_fence_check() RETURNS trigger "
            "LANGUAGE plpgsql AS $f$ BEGIN IF coalesce(nullif(current_setting("
            "'stanchion.map_version', true), ''), '0')::bigint < "
            "(SELECT min_version FROM _stanchion_fence WHERE id = 1) THEN "
            f"RAISE EXCEPTION '{FENCE_MESSAGE}'; END IF; RETURN NULL; END $f$",
        ]
        for table in tables:
            stmts.append(
                f"CREATE OR REPLACE TRIGGER {_q('_stanchion_fence_' + table)} "
                f"BEFORE INSERT OR UPDATE OR DELETE ON {_q(table)} "
                "FOR EACH STATEMENT EXECUTE FUNCTION _stanchion_fence_check()"
            )
        await self._script(stmts)

    async def set_fence(self, version: int, tables: Sequence[str]) -> None:
        """Raise the fence to ``version``, then wait for transactions already writing.

        The SHARE lock conflicts with the ROW EXCLUSIVE lock every writer holds
        until it commits, so once it is granted no write that passed the old
        fence is still in flight.
        """
        await self.execute("UPDATE _stanchion_fence SET min_version = $1 WHERE id = 1", [version])
        if tables:
            names = ", ".join(_q(t) for t in tables)
            async with self.transaction() as tx:
                await tx.execute(f"LOCK TABLE {names} IN SHARE MODE")

    async def remove_fence(self, tables: Sequence[str]) -> None:
        """Drop the fence triggers, function and table."""
        await self._script(
            [
                "DROP FUNCTION IF EXISTS _stanchion_fence_check() CASCADE",
                "DROP TABLE IF EXISTS _stanchion_fence",
            ]
        )

    async def read_changes(self, table: str, limit: int) -> list[tuple[int, Any]]:
        """The oldest ``limit`` log entries."""
        log = _q(f"_stanchion_cdc_{table}")
        rows = await self.fetch(f"SELECT seq, k FROM {log} ORDER BY seq LIMIT $1", [limit])
        return [(int(r["seq"]), r["k"]) for r in rows]

    async def delete_changes(self, table: str, seqs: Sequence[int]) -> None:
        """Delete processed entries."""
        if seqs:
            log = _q(f"_stanchion_cdc_{table}")
            await self.execute(f"DELETE FROM {log} WHERE seq = ANY($1::bigint[])", [list(seqs)])

    async def count_changes(self, table: str) -> int:
        """Entries waiting in the log."""
        rows = await self.fetch(f"SELECT count(*) AS n FROM {_q(f'_stanchion_cdc_{table}')}")
        return int(rows[0]["n"])

    async def scan_keys(self, table: str, column: str, after: Any, limit: int) -> list[Any]:
        """Distinct keys in order, after ``after``."""
        t, k = _q(table), _q(column)
        if after is None:
            rows = await self.fetch(f"SELECT DISTINCT {k} FROM {t} ORDER BY {k} LIMIT $1", [limit])
        else:
            rows = await self.fetch(
                f"SELECT DISTINCT {k} FROM {t} WHERE {k} > $1 ORDER BY {k} LIMIT $2",
                [after, limit],
            )
        return [r[column] for r in rows]

    async def rows_for_keys(
        self, table: str, column: str, keys: Sequence[Any]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Every row of ``keys``."""
        if not keys:
            return [], []
        text = f"SELECT * FROM {_q(table)} WHERE {_q(column)} = ANY($1)"
        try:
            async with self._pool.acquire() as conn:
                stmt = await conn.prepare(text)
                cols = [a.name for a in stmt.get_attributes()]
                rows = await stmt.fetch(list(keys))
        except Exception as exc:
            raise _map_error(exc, self.where) from exc
        return cols, [tuple(r) for r in rows]

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
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"DELETE FROM {_q(table)} WHERE {_q(column)} = ANY($1)", list(keys)
                )
                if rows:
                    await conn.copy_records_to_table(table, records=rows, columns=list(columns))
        except Exception as exc:
            raise _map_error(exc, self.where) from exc

    async def delete_keys(self, table: str, column: str, keys: Sequence[Any]) -> int:
        """Delete the rows of ``keys``."""
        if not keys:
            return 0
        return await self.execute(
            f"DELETE FROM {_q(table)} WHERE {_q(column)} = ANY($1)", [list(keys)]
        )

    async def replace_table(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """Empty ``table`` and insert ``rows``."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(f"DELETE FROM {_q(table)}")
                if rows:
                    await conn.copy_records_to_table(table, records=rows, columns=list(columns))
        except Exception as exc:
            raise _map_error(exc, self.where) from exc


class PostgresMapStore:
    """Shard maps in PostgreSQL: ``postgresql://host/db?name=users``.

    Table ``stanchion_shardmap`` (``?table=`` to change), one row per map ``name``.
    """

    def __init__(self, url: str) -> None:
        dsn, query = _dsn(url)
        self.url = url
        self.where = parse_url(url).masked()
        self._dsn = dsn
        self._name = query.get("name", "default")
        self._table = _q(query.get("table", "stanchion_shardmap"))
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def _get(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    try:
                        pool = await asyncpg.create_pool(
                            self._dsn, min_size=1, max_size=2, timeout=10
                        )
                        await pool.execute(
                            f"CREATE TABLE IF NOT EXISTS {self._table} (name text PRIMARY KEY, "
                            "version bigint NOT NULL, body text NOT NULL, reshard text)"
                        )
                    except asyncpg.exceptions.UniqueViolationError:
                        pass  # a concurrent CREATE TABLE IF NOT EXISTS won the race
                    except Exception as exc:
                        raise _map_error(exc, self.where) from exc
                    self._pool = pool
        return self._pool

    async def read(self) -> StoredMap | None:
        """The stored map, or None."""
        pool = await self._get()
        try:
            row = await pool.fetchrow(
                f"SELECT version, body, reshard FROM {self._table} WHERE name = $1", self._name
            )
        except Exception as exc:
            raise _map_error(exc, self.where) from exc
        if row is None:
            return None
        r = row["reshard"]
        return StoredMap(int(row["version"]), json.loads(row["body"]), json.loads(r) if r else None)

    async def version(self) -> int | None:
        """The stored version, or None."""
        pool = await self._get()
        try:
            v = await pool.fetchval(
                f"SELECT version FROM {self._table} WHERE name = $1", self._name
            )
        except Exception as exc:
            raise _map_error(exc, self.where) from exc
        return None if v is None else int(v)

    async def write(
        self,
        expected: int | None,
        version: int,
        body: Mapping[str, Any],
        reshard: Mapping[str, Any] | None,
    ) -> bool:
        """Compare-and-set the whole map."""
        pool = await self._get()
        b = json.dumps(body, sort_keys=True)
        r = json.dumps(reshard, sort_keys=True) if reshard is not None else None
        try:
            if expected is None:
                status = await pool.execute(
                    f"INSERT INTO {self._table} VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    self._name,
                    version,
                    b,
                    r,
                )
            else:
                status = await pool.execute(
                    f"UPDATE {self._table} SET version = $1, body = $2, reshard = $3 "
                    "WHERE name = $4 AND version = $5",
                    version,
                    b,
                    r,
                    self._name,
                    expected,
                )
        except Exception as exc:
            raise _map_error(exc, self.where) from exc
        return _count(status) == 1

    async def write_reshard(self, version: int, reshard: Mapping[str, Any] | None) -> bool:
        """Replace the reshard state if the version is unchanged."""
        pool = await self._get()
        r = json.dumps(reshard, sort_keys=True) if reshard is not None else None
        try:
            status = await pool.execute(
                f"UPDATE {self._table} SET reshard = $1 WHERE name = $2 AND version = $3",
                r,
                self._name,
                version,
            )
        except Exception as exc:
            raise _map_error(exc, self.where) from exc
        return _count(status) == 1

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
