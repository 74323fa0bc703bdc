"""The collector's log store contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stanchion.sidecar._core import LogQuery

__all__ = ["Capabilities", "LogStore", "Row", "StoredRecord"]

Row = tuple[str, float, str, str, str, str, bytes]
"""``(id, ts, service, level, source, message, body)``: one record to store."""


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One stored record: its arrival sequence number, ``ts`` and JSON body."""

    seq: int
    ts: float
    body: bytes


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a log store can do."""

    durable: bool = True
    concurrent_writers: bool = False


class LogStore(Protocol):
    """Where the collector keeps records, deduplicated by id.

    Rows are ``(id, ts, service, level, source, message, body)``; ``body`` is
    the record's JSON as returned by the API.
    """

    capabilities: Capabilities

    async def insert(
        self, rows: list[Row], *, returning: bool = False
    ) -> tuple[int, list[StoredRecord]]:
        """Insert rows whose id is new; how many, and (``returning``) which, in order."""
        ...

    async def query(self, query: LogQuery) -> list[StoredRecord]:
        """Up to ``query.limit + 1`` records matching ``query`` after its cursor."""
        ...

    async def prune(self, before_ts: float | None, max_records: int | None) -> int:
        """Delete records older than ``before_ts`` and beyond the newest ``max_records``."""
        ...

    async def count(self) -> int:
        """How many records are stored."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
