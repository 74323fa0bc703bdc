"""PostgreSQL log store (asyncpg): for many sidecars and long retention."""

from __future__ import annotations

from typing import Any

from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.sidecar._backend import Capabilities, Row, StoredRecord
from stanchion.sidecar._core import LogQuery
from stanchion.sidecar.backends._sqlite import build_where
from stanchion.urls import ParsedURL, parse_url

try:
    import asyncpg
except ImportError as exc:  # pragma: no cover - the registry names the extra
    raise ImportError("asyncpg is needed: pip install 'stanchion[postgres]'") from exc

__all__ = ["PostgresLogStore"]


class PostgresLogStore:
    """Log store in a PostgreSQL table (``postgresql://host/db?table=logs``).

    .. versionadded:: 0.1
    """

    capabilities = Capabilities(durable=True, concurrent_writers=True)

    def __init__(self, dsn: str, table: str = "logs", masked: str = "") -> None:
        if not table.isidentifier():
            raise ConfigError(f"table {table!r} is not a valid identifier")
        self.dsn = dsn
        self.table = table
        self.masked = masked or dsn
        self._pool: Any = None

    @classmethod
    def from_url(cls, url: str | ParsedURL) -> PostgresLogStore:
        """Build from ``postgresql://user:pw@host:port/db?table=logs``."""
        u = parse_url(url) if isinstance(url, str) else url
        dsn = u.without_query().replace(f"{u.scheme}+{u.driver}://", "postgresql://", 1)
        dsn = "postgresql://" + dsn.split("://", 1)[1]
        return cls(dsn, u.query.get("table", "logs"), u.masked())

    async def _get(self) -> Any:
        if self._pool is None:
            try:
                self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
            except (OSError, asyncpg.PostgresError) as exc:
                raise BackendUnavailable(f"cannot connect to {self.masked}: {exc}") from exc
            t = self.table
            async with self._pool.acquire() as conn:
                await conn.execute(
                    f"""
                    CREATE TABLE IF NOT EXISTS {t} (
                        seq BIGSERIAL PRIMARY KEY,
                        id TEXT NOT NULL UNIQUE,
                        ts DOUBLE PRECISION NOT NULL,
                        service TEXT NOT NULL,
                        level TEXT NOT NULL,
                        source TEXT NOT NULL,
                        message TEXT NOT NULL,
                        body BYTEA NOT NULL
                    );
                    CREATE INDEX IF NOT EXISTS {t}_ts ON {t}(ts);
                    CREATE INDEX IF NOT EXISTS {t}_service_ts ON {t}(service, ts);
                    CREATE INDEX IF NOT EXISTS {t}_level_ts ON {t}(level, ts);
                    """
                )
        return self._pool

    async def insert(
        self, rows: list[Row], *, returning: bool = False
    ) -> tuple[int, list[StoredRecord]]:
        """Insert new ids (ON CONFLICT DO NOTHING); the count and, if asked, the new records."""
        if not rows:
            return 0, []
        pool = await self._get()
        cols = list(zip(*rows))
        try:
            async with pool.acquire() as conn:
                result = await conn.fetch(
                    f"INSERT INTO {self.table} (id, ts, service, level, source, message, body) "
                    "SELECT a, b, c, d, e, f, g FROM unnest($1::text[], $2::float8[], "
                    "$3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[]) "
                    "WITH ORDINALITY AS u(a,b,c,d,e,f,g,o) "
                    "ORDER BY o ON CONFLICT (id) DO NOTHING RETURNING seq, ts"
                    + (", body" if returning else ""),
                    *[list(c) for c in cols],
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise BackendUnavailable(f"insert into {self.masked} failed: {exc}") from exc
        if not returning:
            return len(result), []
        new = sorted((StoredRecord(r[0], r[1], bytes(r[2])) for r in result), key=lambda s: s.seq)
        return len(new), new

    async def query(self, query: LogQuery) -> list[StoredRecord]:
        """Matching records after the cursor, in arrival order."""
        pool = await self._get()
        where, args = build_where(query, lambda n: f"${n}")
        order = "DESC" if query.descending else "ASC"
        sql = (
            f"SELECT seq, ts, body FROM {self.table}{where} ORDER BY seq {order} "
            f"LIMIT {int(query.limit) + 1}"
        )
        try:
            rows = await pool.fetch(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise BackendUnavailable(f"query on {self.masked} failed: {exc}") from exc
        return [StoredRecord(r[0], r[1], bytes(r[2])) for r in rows]

    async def prune(self, before_ts: float | None, max_records: int | None) -> int:
        """Apply the retention limits; returns how many records were deleted."""
        pool = await self._get()
        n = 0
        t = self.table
        if before_ts is not None:
            status = await pool.execute(f"DELETE FROM {t} WHERE ts < $1", before_ts)
            n += int(status.split()[-1])
        if max_records is not None:
            status = await pool.execute(
                f"DELETE FROM {t} WHERE seq <= (SELECT seq FROM {t} ORDER BY seq DESC "
                "LIMIT 1 OFFSET $1)",
                max_records,
            )
            n += int(status.split()[-1])
        return n

    async def count(self) -> int:
        """How many records are stored."""
        pool = await self._get()
        return int(await pool.fetchval(f"SELECT COUNT(*) FROM {self.table}"))

    async def aclose(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
