"""The contract between the :class:`~stanchion.eventsourcing.EventStore` facade and its engines.

A backend stores encoded events and answers reads with plain :data:`Row`
tuples; decoding, upcasting and the public value types live in the facade.
Backends call the decisions of :mod:`stanchion.eventsourcing._core` inside
their own transactions (expected version, tombstone, replay of ids).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple, Protocol, TypeAlias
from uuid import UUID

from stanchion.eventsourcing._core import AppendResult
from stanchion.urls import ParsedURL

__all__ = ["Backend", "Capabilities", "EncodedEvent", "Row"]


class EncodedEvent(NamedTuple):
    """An event ready to store: payload and metadata already encoded."""

    id: UUID
    type: str
    data: bytes
    raw: bool  # True: ``data`` is opaque bytes; False: JSON
    metadata: bytes | None  # JSON, None for an empty dict


Row: TypeAlias = tuple[str, int, int, UUID, str, bytes, bool, "bytes | None", datetime]
"""A stored event as a backend returns it (a plain tuple: reads build 100,000s of them):
``(stream, version, position, id, type, data, raw, metadata, recorded_at)``."""

STREAM, VERSION, POSITION, ID, TYPE, DATA, RAW, METADATA, RECORDED_AT = range(9)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers beyond the common contract."""

    durable: bool
    """Events survive the process (SQLite, PostgreSQL)."""
    multi_process: bool
    """Several processes can share the store."""
    live_notify: bool
    """Live subscribers are woken by the engine (no polling), across processes."""


class Backend(Protocol):
    """An event store engine (memory, SQLite, PostgreSQL)."""

    capabilities: Capabilities

    @classmethod
    async def open(cls, url: ParsedURL) -> Backend:
        """Connect and create the schema if needed (idempotent, safe under concurrency)."""
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...

    async def append(
        self, stream: str, events: Sequence[EncodedEvent], expected: int
    ) -> AppendResult:
        """Append atomically; ``expected`` is encoded by ``_core.expected_code``."""
        ...

    async def read_stream(
        self, stream: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        """Up to ``limit`` events of ``stream`` from ``from_version`` (inclusive).

        Backwards, ``from_version < 0`` means from the last event.
        Raises StreamDeleted for a tombstoned stream.
        """
        ...

    async def read_all(
        self, from_position: int, limit: int, types: Sequence[str] | None
    ) -> list[Row]:
        """Up to ``limit`` events of the global log from ``from_position`` (inclusive)."""
        ...

    def subscribe(
        self, from_position: int, types: Sequence[str] | None, batch: int
    ) -> AsyncIterator[list[Row]]:
        """Batches of the global log in position order, catch-up then live, never skipping."""
        ...

    async def head_position(self) -> int:
        """The last committed global position; 0 when the log is empty."""
        ...

    async def stream_version(self, stream: str) -> int:
        """The stream's last version, -1 without events; raises StreamDeleted."""
        ...

    async def delete_stream(self, stream: str) -> None:
        """Write a tombstone for ``stream``."""
        ...

    async def save_snapshot(self, stream: str, version: int, state: bytes) -> None:
        """Keep ``state`` as of ``version`` unless a newer snapshot is stored."""
        ...

    async def load_snapshot(self, stream: str) -> tuple[int, bytes] | None:
        """The newest snapshot ``(version, state)`` of ``stream``, if any."""
        ...

    async def put_key(self, subject: str, key: bytes) -> bytes:
        """Store ``key`` for ``subject`` unless one exists; return the stored key."""
        ...

    async def get_key(self, subject: str) -> bytes | None:
        """The subject's key, or None when absent or shredded."""
        ...

    async def delete_key(self, subject: str) -> None:
        """Delete the subject's key (crypto-shredding)."""
        ...
