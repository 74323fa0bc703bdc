"""PostgreSQL read model: views and checkpoints in one database (asyncpg).

Each runner transaction first locks its checkpoint row (``SELECT … FOR
UPDATE``), then applies the handlers' SQL, then compare-and-sets the
checkpoint. Taking the checkpoint row first gives every writer of a view
(replicas, a rebuild's swap) one lock order, so they serialise instead of
deadlocking. Handlers may write ``?`` placeholders (rewritten to ``$n``) or
native ``$n``.

A rebuild writes into a shadow *schema* (``stanchion_rebuild_<name>``) put
first on the transaction's ``search_path``: the projection's plain SQL
(``CREATE TABLE orders``, ``CREATE INDEX …``) lands there unchanged, while
reads of other tables fall through to the main schema. The swap moves the
shadow tables into the main schema (``ALTER TABLE … SET SCHEMA``) in one
transaction; PostgreSQL DDL is transactional, so queries see the old view
until the commit and the new one after it.

URL options: ``schema`` (default ``public``), ``pool_size`` (default 10),
``synchronous_commit`` for the projection transactions (default ``off``: view
and checkpoint commit together, so a commit lost in a server crash is
projected again, never half-applied; set ``on`` to wait for the WAL flush).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from stanchion.cqrs._backend import (
    Capabilities,
    ParkedEvent,
    ReadModel,
    SQLTransaction,
    initial,
    now,
    raise_conflict,
)
from stanchion.cqrs._core import (
    NO_POSITION,
    Checkpoint,
    qmark_to_dollar,
    shadow_name,
    validate_name,
)
from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.urls import ParsedURL

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - the registry names the extra
    raise ImportError("asyncpg is needed: pip install 'stanchion[postgres]'") from exc

__all__ = ["PostgresReadModel"]

_CONFLICT = "SC001"  # SQLSTATE our checkpoint compare-and-set raises
_LOCK_KEY = 0x5C0512  # advisory lock serialising schema creation across processes


def _q(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def _count(status: str) -> int:
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return -1


_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


P = ParamSpec("P")
R = TypeVar("R")


def _mapped(
    fn: Callable[Concatenate[_Tx, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[_Tx, P], Coroutine[Any, Any, R]]:
    """Report a lost connection as BackendUnavailable (not as the handler's fault)."""

    async def wrapper(self: _Tx, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except _TRANSIENT as exc:
            raise BackendUnavailable(
                f"PostgreSQL read model: {type(exc).__name__}: {exc}", url=self._model.url
            ) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _Tx(SQLTransaction):
    def __init__(
        self,
        model: PostgresReadModel,
        conn: Any,
        release: Callable[[Any], Awaitable[None]],
        name: str,
        shadow: bool,
    ) -> None:
        super().__init__(name, shadow)
        self._model = model
        self._conn = conn
        self._give_back = release
        self._key = shadow_name(name) if shadow else name
        self._done = False
        self._pending_sql: str | None = None
        self._pending: list[tuple[Any, ...]] = []

    @_mapped
    async def flush(self) -> None:
        if self._pending:
            sql, rows = self._pending_sql, self._pending
            self._pending_sql, self._pending = None, []
            assert sql is not None
            if len(rows) == 1:
                await self._conn.execute(sql, *rows[0])
            else:
                await self._conn.executemany(sql, rows)

    @_mapped
    async def write(self, sql: str, *args: Any) -> None:
        if not args:
            await self.flush()
            await self._conn.execute(sql)
            return
        sql = qmark_to_dollar(sql)
        if self._pending_sql != sql:
            await self.flush()
            self._pending_sql = sql
        self._pending.append(args)

    @_mapped
    async def execute(self, sql: str, *args: Any) -> int:
        await self.flush()
        if args:
            return _count(await self._conn.execute(qmark_to_dollar(sql), *args))
        return _count(await self._conn.execute(sql))

    @_mapped
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.flush()
        await self._conn.executemany(qmark_to_dollar(sql), rows)

    @_mapped
    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        await self.flush()
        return list(await self._conn.fetch(qmark_to_dollar(sql), *args))

    @_mapped
    async def fetchone(self, sql: str, *args: Any) -> Any:
        await self.flush()
        return await self._conn.fetchrow(qmark_to_dollar(sql), *args)

    @_mapped
    async def fetchval(self, sql: str, *args: Any) -> Any:
        await self.flush()
        return await self._conn.fetchval(qmark_to_dollar(sql), *args)

    @_mapped
    async def checkpoint_position(self) -> int:
        value = await self._conn.fetchval(
            f"SELECT position FROM {self._model.cp_table} WHERE name = $1", self._key
        )
        return NO_POSITION if value is None else int(value)

    @_mapped
    async def park(self, event: Any, error: str) -> None:
        self._pending_sql, self._pending = None, []
        await self._conn.execute(
            f"INSERT INTO {self._model.parked_table} VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (name, position) DO UPDATE SET error = excluded.error",
            self._key,
            int(event.position),
            str(event.id),
            str(event.type),
            error,
            now(),
        )

    @_mapped
    async def commit(self, expected: int, position: int, token: int | None) -> None:
        await self.flush()
        # One round trip: the compare-and-set raises inside the transaction
        # when it matches no row, so the COMMIT after it never runs.
        tok = "NULL::bigint" if token is None else str(int(token))
        sql = (
            f"DO $$BEGIN UPDATE {self._model.cp_table} SET position = {int(position)}, "
            f"token = COALESCE({tok}, token), updated_at = {now()!r} "
            f"WHERE name = '{self._key}' AND position = {int(expected)} "
            f"AND ({tok} IS NULL OR token IS NULL OR token <= {tok}); "
            f"IF NOT FOUND THEN RAISE EXCEPTION USING ERRCODE = '{_CONFLICT}', "
            "MESSAGE = 'stanchion checkpoint conflict'; END IF; END$$; COMMIT"
        )
        try:
            await self._conn.execute(sql)
        except asyncpg.PostgresError as exc:
            await self.rollback()
            if getattr(exc, "sqlstate", None) != _CONFLICT:
                raise
            row = await self._model._p().fetchrow(
                f"SELECT position, token FROM {self._model.cp_table} WHERE name = $1", self._key
            )
            if row is None:
                self._model._known.discard(self._key)
            raise_conflict(
                self.name,
                row["position"] if row else NO_POSITION,
                row["token"] if row else None,
                expected,
                token,
            )
        except BaseException:
            await self.rollback()
            raise
        await self._release()

    async def rollback(self) -> None:
        if self._done:
            return
        self._done = True
        self._pending_sql, self._pending = None, []
        conn = self._conn
        try:
            if not conn.is_closed() and conn.is_in_transaction():
                await asyncio.shield(conn.execute("ROLLBACK"))
        except BaseException:
            conn.terminate()  # left mid-protocol (cancelled): the server rolls back
        await asyncio.shield(self._give_back(conn))

    async def _release(self) -> None:
        if not self._done:
            self._done = True
            await self._give_back(self._conn)


class PostgresReadModel(ReadModel):
    """Views, checkpoints and parked events in one PostgreSQL database."""

    capabilities: ClassVar[Capabilities] = Capabilities(sql=True, key_value=False)

    def __init__(self, url: ParsedURL) -> None:
        super().__init__(url)
        self.schema = url.query.get("schema", "public")
        validate_name(self.schema, "schema name")
        self.pool_size = url.get_int("pool_size", 10)
        # A projection commits its view change and checkpoint together, so a
        # commit lost in a server crash is simply projected again: waiting
        # for the WAL flush on every commit buys nothing but latency.
        self.synchronous_commit = url.query.get("synchronous_commit", "off")
        if self.synchronous_commit not in ("on", "off", "local", "remote_write", "remote_apply"):
            raise ConfigError(
                f"{url.masked()}: synchronous_commit must be on, off, local, "
                "remote_write or remote_apply"
            )
        if self.pool_size < 2:
            raise ConfigError(f"{url.masked()}: pool_size must be >= 2")
        self.dsn = url.without_query().replace("postgresql+asyncpg://", "postgresql://")
        for alias in ("postgres://", "pg://"):
            if self.dsn.startswith(alias):
                self.dsn = "postgresql://" + self.dsn[len(alias) :]
        self.cp_table = f"{_q(self.schema)}.stanchion_checkpoints"
        self.parked_table = f"{_q(self.schema)}.stanchion_parked"
        self._pool: Any = None
        self._writers: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._known: set[str] = set()

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                server_settings={"search_path": self.schema},
                timeout=10,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise BackendUnavailable(
                f"cannot connect to PostgreSQL read model {self.url}: {exc}", url=self.url
            ) from exc
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(self.schema)}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.cp_table} (name TEXT PRIMARY KEY, "
                "position BIGINT NOT NULL, token BIGINT, updated_at DOUBLE PRECISION NOT NULL)"
            )
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.parked_table} (name TEXT NOT NULL, "
                "position BIGINT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL, "
                "error TEXT NOT NULL, parked_at DOUBLE PRECISION NOT NULL, "
                "PRIMARY KEY (name, position))"
            )

    async def close(self) -> None:
        writers, self._writers = self._writers, {}
        for conn in writers.values():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except BaseException:
                conn.terminate()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _p(self) -> Any:
        if self._pool is None:
            raise ConfigError("the read model is not open (use ReadModel.connect)")
        return self._pool

    async def _release(self, conn: Any) -> None:
        if self._pool is not None:
            await self._pool.release(conn)

    def _shadow_schema(self, name: str) -> str:
        return f"stanchion_rebuild_{name}"

    # -- runner side -----------------------------------------------------------

    async def _writer(self, name: str) -> Any:
        conn = self._writers.get(name)
        if conn is None or conn.is_closed():
            try:
                conn = await asyncpg.connect(
                    self.dsn,
                    server_settings={
                        "search_path": self.schema,
                        "synchronous_commit": self.synchronous_commit,
                    },
                    timeout=10,
                )
            except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
                raise BackendUnavailable(f"PostgreSQL read model: {exc}", url=self.url) from exc
            self._writers[name] = conn
        return conn

    async def begin(self, name: str, *, shadow: bool = False) -> _Tx:
        validate_name(name)
        key = shadow_name(name) if shadow else name
        release: Callable[[Any], Awaitable[None]]
        if shadow:
            try:
                conn = await self._p().acquire()
            except (OSError, asyncpg.PostgresError) as exc:
                raise BackendUnavailable(f"PostgreSQL read model: {exc}", url=self.url) from exc
            release = self._release
        else:
            # Each projection has its own connection (one transaction at a
            # time): no pool round trips, and prepared statements stay warm.
            lock = self._locks.setdefault(name, asyncio.Lock())
            await lock.acquire()
            try:
                conn = await self._writer(name)
            except BaseException:
                lock.release()
                raise

            async def release(_: Any) -> None:
                lock.release()

        try:
            if key not in self._known:
                await conn.execute(
                    f"INSERT INTO {self.cp_table} VALUES ($1, $2, NULL, $3) "
                    "ON CONFLICT (name) DO NOTHING",
                    key,
                    NO_POSITION,
                    now(),
                )
                self._known.add(key)
            path = (
                f"SET LOCAL search_path TO {_q(self._shadow_schema(name))}, {_q(self.schema)}; "
                if shadow
                else ""
            )
            # One round trip: open the transaction and lock the checkpoint row
            # (the lock order every writer of this view follows).
            await conn.execute(
                f"BEGIN; {path}SELECT 1 FROM {self.cp_table} WHERE name = '{key}' FOR UPDATE"
            )
        except BaseException as exc:
            try:
                if not conn.is_closed() and conn.is_in_transaction():
                    await asyncio.shield(conn.execute("ROLLBACK"))
            except BaseException:
                conn.terminate()
            await asyncio.shield(release(conn))
            if isinstance(exc, _TRANSIENT):
                raise BackendUnavailable(f"PostgreSQL read model: {exc}", url=self.url) from exc
            raise
        return _Tx(self, conn, release, name, shadow)

    async def _checkpoint_row(self, key: str, name: str) -> Checkpoint:
        row = await self._p().fetchrow(
            f"SELECT position, token, updated_at, (SELECT count(*) FROM {self.parked_table} p "
            f"WHERE p.name = c.name) AS parked FROM {self.cp_table} c WHERE name = $1",
            key,
        )
        if row is None:
            return initial(name)
        return Checkpoint(name, row[0], row[1], row[2], row[3])

    async def checkpoint(self, name: str, *, shadow: bool = False) -> Checkpoint:
        return await self._checkpoint_row(shadow_name(name) if shadow else name, name)

    async def checkpoints(self) -> list[Checkpoint]:
        rows = await self._p().fetch(
            f"SELECT name, position, token, updated_at, (SELECT count(*) FROM "
            f"{self.parked_table} p WHERE p.name = c.name) FROM {self.cp_table} c "
            "WHERE name NOT LIKE '%\\_\\_rebuild' ORDER BY name"
        )
        return [Checkpoint(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def parked(self, name: str) -> list[ParkedEvent]:
        rows = await self._p().fetch(
            f"SELECT name, position, event_id, event_type, error, parked_at "
            f"FROM {self.parked_table} WHERE name = $1 ORDER BY position",
            name,
        )
        return [ParkedEvent(*tuple(r)) for r in rows]

    async def reset_shadow(self, name: str) -> None:
        validate_name(name)
        self._known.discard(shadow_name(name))
        schema = _q(self._shadow_schema(name))
        async with self._p().acquire() as conn, conn.transaction():
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            await conn.execute(f"CREATE SCHEMA {schema}")
            await conn.execute(f"DELETE FROM {self.cp_table} WHERE name = $1", shadow_name(name))
            await conn.execute(
                f"DELETE FROM {self.parked_table} WHERE name = $1", shadow_name(name)
            )

    async def drop_shadow(self, name: str) -> None:
        self._known.discard(shadow_name(name))
        async with self._p().acquire() as conn, conn.transaction():
            await conn.execute(f"DROP SCHEMA IF EXISTS {_q(self._shadow_schema(name))} CASCADE")
            await conn.execute(f"DELETE FROM {self.cp_table} WHERE name = $1", shadow_name(name))
            await conn.execute(
                f"DELETE FROM {self.parked_table} WHERE name = $1", shadow_name(name)
            )

    async def swap(self, name: str, position: int) -> bool:
        self._known.discard(shadow_name(name))
        shadow = self._shadow_schema(name)
        async with self._p().acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self.cp_table} VALUES ($1, $2, NULL, $3) "
                "ON CONFLICT (name) DO NOTHING",
                name,
                NO_POSITION,
                now(),
            )
            live = await conn.fetchval(
                f"SELECT position FROM {self.cp_table} WHERE name = $1 FOR UPDATE", name
            )
            if live is not None and live > position:
                return False
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", shadow
            )
            for row in tables:
                table = row[0]
                await conn.execute(f"DROP TABLE IF EXISTS {_q(self.schema)}.{_q(table)} CASCADE")
                await conn.execute(
                    f"ALTER TABLE {_q(shadow)}.{_q(table)} SET SCHEMA {_q(self.schema)}"
                )
            await conn.execute(f"DELETE FROM {self.parked_table} WHERE name = $1", name)
            await conn.execute(
                f"UPDATE {self.parked_table} SET name = $1 WHERE name = $2",
                name,
                shadow_name(name),
            )
            await conn.execute(
                f"UPDATE {self.cp_table} SET position = $1, updated_at = $2 WHERE name = $3",
                position,
                now(),
                name,
            )
            await conn.execute(f"DELETE FROM {self.cp_table} WHERE name = $1", shadow_name(name))
            await conn.execute(f"DROP SCHEMA IF EXISTS {_q(shadow)} CASCADE")
        return True

    # -- query side ------------------------------------------------------------

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        """All rows of a read query (``?`` or ``$n`` placeholders)."""
        return list(await self._p().fetch(qmark_to_dollar(sql), *args))

    async def fetchone(self, sql: str, *args: Any) -> Any:
        """The first row of a read query, or None."""
        return await self._p().fetchrow(qmark_to_dollar(sql), *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        return await self._p().fetchval(qmark_to_dollar(sql), *args)
