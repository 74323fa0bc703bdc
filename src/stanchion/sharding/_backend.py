"""The contracts the router and the resharder drive: a shard and a map store.

A *shard* is one SQL database (a SQLite file or a PostgreSQL database). The
adapter translates calls, maps driver errors to stanchion errors and knows
its dialect's SQL for the resharding primitives (change-capture triggers,
the write fence, batched copies); it holds no policy.

A *map store* keeps the shard map: one row per map name with a routing
``version`` (bumped only when routing changes), the map body (strategy, URLs,
tables) and the reshard state (progress, cursors), compare-and-set on the
version so two writers never both win.

.. versionadded:: 0.1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ADMIN_VERSION",
    "FENCE_MESSAGE",
    "MapStore",
    "Params",
    "Row",
    "Shard",
    "ShardTx",
    "StoredMap",
]

Row = dict[str, Any]
"""A result row: column name -> value."""

Params = Sequence[Any] | Mapping[str, Any] | None
"""Statement parameters: positional (native style) or named (``:name``)."""

FENCE_MESSAGE = "stanchion: stale shard map"
"""Text of the error the write-fence trigger raises for a stale router."""

ADMIN_VERSION = 1 << 62
"""The map version the resharder's own connections declare (passes every fence)."""


class ShardTx(Protocol):
    """Statements inside one shard transaction."""

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        """Run a query; return its rows."""
        ...


class Shard(Protocol):
    """One shard database: statements, transactions and resharding primitives."""

    dialect: str
    url: str

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run a statement in its own transaction; return the rows changed."""
        ...

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        """Run a query; return its rows."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[ShardTx]:
        """A transaction: commit on normal exit, roll back on an exception."""
        ...

    async def expire(self) -> None:
        """Make pooled connections pick up a new declared map version."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...

    # -- resharding primitives --------------------------------------------

    async def table_exists(self, table: str) -> bool:
        """True if ``table`` exists."""
        ...

    async def table_ddl(self, table: str) -> list[str]:
        """Statements that recreate ``table`` (and its indexes) on another shard."""
        ...

    async def install_capture(self, table: str, column: str) -> None:
        """Create the change log and triggers recording every key ``table`` writes."""
        ...

    async def remove_capture(self, table: str) -> None:
        """Drop the change log and triggers of ``table``."""
        ...

    async def install_fence(self, tables: Sequence[str]) -> None:
        """Create the write-fence triggers on ``tables`` (fence version 0)."""
        ...

    async def set_fence(self, version: int, tables: Sequence[str]) -> None:
        """Reject writes from routers declaring a map version below ``version``, then
        wait until no transaction that passed the old fence still writes ``tables``."""
        ...

    async def remove_fence(self, tables: Sequence[str]) -> None:
        """Drop the write-fence triggers."""
        ...

    async def read_changes(self, table: str, limit: int) -> list[tuple[int, Any]]:
        """The oldest ``limit`` change-log entries: ``(seq, key)``."""
        ...

    async def delete_changes(self, table: str, seqs: Sequence[int]) -> None:
        """Remove processed change-log entries."""
        ...

    async def count_changes(self, table: str) -> int:
        """How many change-log entries wait (the replication lag, in changes)."""
        ...

    async def scan_keys(self, table: str, column: str, after: Any, limit: int) -> list[Any]:
        """Distinct keys of ``table`` above ``after`` (``None``: from the start), in order."""
        ...

    async def rows_for_keys(
        self, table: str, column: str, keys: Sequence[Any]
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Column names and every row whose key is in ``keys``."""
        ...

    async def replace_keys(
        self,
        table: str,
        column: str,
        keys: Sequence[Any],
        columns: Sequence[str],
        rows: Sequence[tuple[Any, ...]],
    ) -> None:
        """In one transaction: delete the rows of ``keys``, insert ``rows``."""
        ...

    async def delete_keys(self, table: str, column: str, keys: Sequence[Any]) -> int:
        """Delete every row whose key is in ``keys``; return how many."""
        ...

    async def replace_table(
        self, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
    ) -> None:
        """In one transaction: empty ``table`` and insert ``rows`` (reference tables)."""
        ...


@dataclass(frozen=True, slots=True)
class StoredMap:
    """One stored shard map.

    Attributes:
        version: the routing version (bumped on every routing change).
        body: strategy, urls, tables, reference tables and pending routing.
        reshard: the reshard state, or ``None`` when no reshard runs.
    """

    version: int
    body: dict[str, Any]
    reshard: dict[str, Any] | None


class MapStore(Protocol):
    """Durable storage of shard maps."""

    async def read(self) -> StoredMap | None:
        """The stored map, or ``None``."""
        ...

    async def version(self) -> int | None:
        """The stored routing version, or ``None`` (cheap: routers poll it)."""
        ...

    async def write(
        self,
        expected: int | None,
        version: int,
        body: Mapping[str, Any],
        reshard: Mapping[str, Any] | None,
    ) -> bool:
        """Replace the map if its version is ``expected`` (``None``: absent); False if not."""
        ...

    async def write_reshard(self, version: int, reshard: Mapping[str, Any] | None) -> bool:
        """Replace only the reshard state, if the version is still ``version``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


VersionFn = Callable[[], int]
