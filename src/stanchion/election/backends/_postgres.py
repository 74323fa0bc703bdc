"""``postgresql://…``: leases in a PostgreSQL table (asyncpg), for candidates on many hosts.

One row per group: holder, token, expiry. Each step is one statement, so
the row lock makes "is the lease free? then take it with token + 1" atomic;
expiries use the server's ``clock_timestamp()``, so candidate clocks never
have to agree. The token lives in the row: it survives restarts. Releasing
sends a NOTIFY on the table's channel, so waiting candidates try at once.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from stanchion.election._backend import Capabilities, Grant, Holder
from stanchion.election.backends._sql import table_prefix
from stanchion.errors import BackendUnavailable, StaleFencingToken
from stanchion.urls import ParsedURL

__all__ = ["PostgresFence", "PostgresLeases"]

T = TypeVar("T")

_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
)


class _PG:
    """One lazily (re)connected asyncpg connection, one operation at a time."""

    def __init__(self, dsn: str, masked: str, timeout: float) -> None:
        self._dsn = dsn
        self._masked = masked
        self._timeout = timeout
        self._conn: Any = None
        self._lock = asyncio.Lock()
        self.ready: set[str] = set()

    async def _connect(self) -> Any:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
            except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                raise BackendUnavailable(
                    f"cannot connect to PostgreSQL at {self._masked}: {exc}"
                ) from exc
            self.ready.clear()
        return self._conn

    async def run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._lock:
            conn = await self._connect()
            try:
                return await fn(conn)
            except _CONNECTION_ERRORS as exc:
                await self._drop()
                raise BackendUnavailable(f"PostgreSQL at {self._masked}: {exc}") from exc
            except asyncpg.PostgresError as exc:
                raise BackendUnavailable(f"PostgreSQL at {self._masked}: {exc}") from exc

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def ensure(self, conn: Any, name: str, ddl: str) -> None:
        if name in self.ready:
            return
        try:
            await conn.execute(ddl)
        except (
            asyncpg.UniqueViolationError,
            asyncpg.DuplicateTableError,
            asyncpg.DuplicateObjectError,
        ):
            pass  # a concurrent CREATE TABLE IF NOT EXISTS won the race
        self.ready.add(name)

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except Exception:
                    conn.terminate()


class PostgresLeases:
    """Leases in ``<prefix>stanchion_election``."""

    capabilities = Capabilities(detects_death=False, multi_host=True, persistent_tokens=True)

    def __init__(self, dsn: str, *, masked: str, prefix: str = "", timeout: float = 5.0) -> None:
        self._pg = _PG(dsn, masked, timeout)
        self._t = f"{prefix}stanchion_election"
        self._listener: Any = None
        self._released: dict[str, asyncio.Event] = {}

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> PostgresLeases:
        """Build from a parsed ``postgresql://`` URL."""
        return cls(
            _dsn(parsed),
            masked=parsed.masked(),
            prefix=table_prefix(parsed),
            timeout=connect_timeout,
        )

    async def _setup(self, conn: Any) -> None:
        await self._pg.ensure(
            conn,
            self._t,
            f"CREATE TABLE IF NOT EXISTS {self._t} (grp text PRIMARY KEY, holder text, "
            "token bigint NOT NULL, expires_at timestamptz NOT NULL)",
        )

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease if free or expired, with the next token, in one statement."""

        async def go(conn: Any) -> Grant | Holder | None:
            await self._setup(conn)
            # Read first (MVCC, no row lock): while a lease is held, followers' polls
            # must not queue on the row lock the leader's renewal needs.
            holder = await self._observe(conn, group)
            if holder is not None:
                return holder
            token = await conn.fetchval(
                f"INSERT INTO {self._t} AS l (grp, holder, token, expires_at) "
                "VALUES ($1, $2, 1, clock_timestamp() + make_interval(secs => $3)) "
                "ON CONFLICT (grp) DO UPDATE SET holder = EXCLUDED.holder, "
                "token = l.token + 1, expires_at = EXCLUDED.expires_at "
                "WHERE l.holder IS NULL OR l.expires_at <= clock_timestamp() RETURNING token",
                group,
                identity,
                float(ttl),
            )
            if token is not None:
                return Grant(int(token))
            return await self._observe(conn, group)

        return await self._pg.run(go)

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Extend the lease if term ``token`` still holds it."""

        async def go(conn: Any) -> bool:
            await self._setup(conn)
            done = await conn.fetchval(
                f"UPDATE {self._t} SET expires_at = clock_timestamp() + make_interval(secs => $4) "
                "WHERE grp = $1 AND token = $2 AND holder = $3 RETURNING true",
                group,
                token,
                identity,
                float(ttl),
            )
            return bool(done)

        return await self._pg.run(go)

    async def release(self, group: str, identity: str, token: int) -> None:
        """Free the lease if term ``token`` still holds it (the token stays); NOTIFY waiters."""

        async def go(conn: Any) -> None:
            await self._setup(conn)
            await conn.execute(
                f"WITH freed AS (UPDATE {self._t} SET holder = NULL, expires_at = '-infinity' "
                "WHERE grp = $1 AND token = $2 AND holder = $3 RETURNING grp) "
                "SELECT pg_notify($4, grp) FROM freed",
                group,
                token,
                identity,
                self._t,
            )

        await self._pg.run(go)

    async def observe(self, group: str) -> Holder | None:
        """The current holder, if any."""

        async def go(conn: Any) -> Holder | None:
            await self._setup(conn)
            return await self._observe(conn, group)

        return await self._pg.run(go)

    async def _observe(self, conn: Any, group: str) -> Holder | None:
        row = await conn.fetchrow(
            f"SELECT holder, token, extract(epoch FROM expires_at - clock_timestamp()) "
            f"AS remaining FROM {self._t} WHERE grp = $1 AND holder IS NOT NULL "
            "AND expires_at > clock_timestamp()",
            group,
        )
        if row is None:
            return None
        return Holder(row["holder"], int(row["token"]), float(row["remaining"]))

    async def _listen(self, group: str) -> asyncio.Event:
        if self._listener is None or self._listener.is_closed():
            self._listener = None
            conn = await asyncpg.connect(self._pg._dsn, timeout=self._pg._timeout)

            def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                event = self._released.get(payload)
                if event is not None:
                    event.set()

            await conn.add_listener(self._t, notified)
            self._listener = conn
        return self._released.setdefault(group, asyncio.Event())

    async def wait(self, group: str, seconds: float) -> bool:
        """Wait up to ``seconds`` for the holder to resign (LISTEN/NOTIFY)."""
        try:
            event = await asyncio.wait_for(self._listen(group), seconds)
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError):
            await asyncio.sleep(seconds)  # unreachable: the next attempt reports it
            return False
        try:
            await asyncio.wait_for(event.wait(), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            event.clear()

    async def aclose(self) -> None:
        """Close the connections."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await asyncio.wait_for(listener.close(), 2)
            except Exception:
                listener.terminate()
        await self._pg.close()


class PostgresFence:
    """Fenced writes to PostgreSQL: ``fn(conn)`` runs in the transaction that checks the token.

    The fence row of the resource is locked ``FOR UPDATE``, so a concurrent
    writer with another token waits, then sees the newer token.
    """

    def __init__(self, dsn: str, *, masked: str, prefix: str = "", timeout: float = 5.0) -> None:
        self._pg = _PG(dsn, masked, timeout)
        self._t = f"{prefix}stanchion_fences"

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> PostgresFence:
        """Build from a parsed ``postgresql://`` URL."""
        return cls(
            _dsn(parsed),
            masked=parsed.masked(),
            prefix=table_prefix(parsed),
            timeout=connect_timeout,
        )

    async def _setup(self, conn: Any) -> None:
        await self._pg.ensure(
            conn,
            self._t,
            f"CREATE TABLE IF NOT EXISTS {self._t} "
            "(resource text PRIMARY KEY, token bigint NOT NULL)",
        )

    async def write(self, resource: str, token: int, fn: Callable[[Any], Awaitable[T] | T]) -> T:
        """Check and record ``token``, run ``fn(conn)``, commit; all in one transaction."""

        async def go(conn: Any) -> T:
            await self._setup(conn)
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {self._t} (resource, token) VALUES ($1, $2) "
                    "ON CONFLICT (resource) DO NOTHING",
                    resource,
                    token,
                )
                current = await conn.fetchval(
                    f"SELECT token FROM {self._t} WHERE resource = $1 FOR UPDATE", resource
                )
                if token < int(current):
                    raise StaleFencingToken(resource, token, int(current))
                await conn.execute(
                    f"UPDATE {self._t} SET token = $2 WHERE resource = $1", resource, token
                )
                result = fn(conn)
                if inspect.isawaitable(result):
                    result = await result
                return result

        return await self._pg.run(go)

    async def current(self, resource: str) -> int | None:
        """The highest token accepted for ``resource``."""

        async def go(conn: Any) -> int | None:
            await self._setup(conn)
            value = await conn.fetchval(
                f"SELECT token FROM {self._t} WHERE resource = $1", resource
            )
            return None if value is None else int(value)

        return await self._pg.run(go)

    async def aclose(self) -> None:
        """Close the connection."""
        await self._pg.close()


def _dsn(parsed: ParsedURL) -> str:
    # asyncpg wants postgresql://; our query parameters (prefix) are not libpq's.
    raw = parsed.without_query()
    scheme, rest = raw.split("://", 1)
    return "postgresql://" + rest if scheme != "postgresql" else raw
