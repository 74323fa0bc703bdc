"""In-process event store (``memory://name``): stores of one process with the same name share a log.

``memory://`` without a name gives a private log. Data lives as long as a
store using it is open.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import ClassVar
from uuid import UUID

from stanchion.errors import StreamDeleted
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

__all__ = ["MemoryBackend"]


class _Log:
    def __init__(self) -> None:
        self.events: list[Row] = []
        self.streams: dict[str, list[Row]] = {}
        self.ids: dict[UUID, Row] = {}
        self.deleted: set[str] = set()
        self.snapshots: dict[str, tuple[int, bytes]] = {}
        self.keys: dict[str, bytes] = {}
        self.signal = Signal()


_SHARED: weakref.WeakValueDictionary[str, _Log] = weakref.WeakValueDictionary()


class MemoryBackend:
    """The ``memory://`` event store engine."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        durable=False, multi_process=False, live_notify=True
    )

    def __init__(self, log: _Log, idle: float) -> None:
        self._log = log
        self._idle = idle

    @classmethod
    async def open(cls, url: ParsedURL) -> MemoryBackend:
        name = (url.host or "") + url.path + url.query.get("prefix", "")
        log = _SHARED.get(name) if name else None
        if log is None:
            log = _Log()
            if name:
                _SHARED[name] = log
        return cls(log, url.get_float("poll", 5.0))

    async def close(self) -> None:
        pass

    async def append(
        self, stream: str, events: Sequence[EncodedEvent], expected: int
    ) -> AppendResult:
        log = self._log
        ids = [e.id for e in events]
        check_batch(stream, ids)
        if stream in log.deleted:
            raise StreamDeleted(stream)
        rows = log.streams.get(stream)
        current = len(rows) - 1 if rows else -1
        stored = [Stored(r[3], r[0], r[1], r[2]) for i in ids if (r := log.ids.get(i))]
        replay = decide_replay(stream, ids, stored)
        if replay is not None:
            return replay
        check_expected(stream, expected, current)
        if rows is None:
            rows = log.streams[stream] = []
        now = datetime.now(UTC)
        first = len(log.events) + 1
        for offset, e in enumerate(events):
            row: Row = (
                stream, current + 1 + offset, first + offset, e.id, e.type, e.data, e.raw,
                e.metadata, now,
            )  # fmt: skip
            log.events.append(row)
            rows.append(row)
            log.ids[e.id] = row
        log.signal.fire()
        return AppendResult(current + 1, current + len(events), first, first + len(events) - 1)

    async def read_stream(
        self, stream: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        if stream in self._log.deleted:
            raise StreamDeleted(stream)
        rows = self._log.streams.get(stream, [])
        if backwards:
            start = len(rows) - 1 if from_version < 0 else min(from_version, len(rows) - 1)
            stop = max(start - limit, -1)
            return rows[start:stop:-1] if stop >= 0 else rows[start::-1]
        return rows[from_version : from_version + limit]

    async def read_all(
        self, from_position: int, limit: int, types: Sequence[str] | None
    ) -> list[Row]:
        start = max(from_position, 1) - 1
        if types is None:
            return self._log.events[start : start + limit]
        wanted = frozenset(types)
        out: list[Row] = []
        for row in self._log.events[start:]:
            if row[4] in wanted:
                out.append(row)
                if len(out) >= limit:
                    break
        return out

    async def subscribe(
        self, from_position: int, types: Sequence[str] | None, batch: int
    ) -> AsyncIterator[list[Row]]:
        wake = self._log.signal.new()
        async for rows in ordered_subscribe(
            self.read_all, wake, from_position, types, batch, self._idle
        ):
            yield rows
            await asyncio.sleep(0)

    async def head_position(self) -> int:
        return len(self._log.events)

    async def stream_version(self, stream: str) -> int:
        if stream in self._log.deleted:
            raise StreamDeleted(stream)
        return len(self._log.streams.get(stream, ())) - 1

    async def delete_stream(self, stream: str) -> None:
        self._log.deleted.add(stream)

    async def save_snapshot(self, stream: str, version: int, state: bytes) -> None:
        old = self._log.snapshots.get(stream)
        if old is None or old[0] < version:
            self._log.snapshots[stream] = (version, state)

    async def load_snapshot(self, stream: str) -> tuple[int, bytes] | None:
        return self._log.snapshots.get(stream)

    async def put_key(self, subject: str, key: bytes) -> bytes:
        return self._log.keys.setdefault(subject, key)

    async def get_key(self, subject: str) -> bytes | None:
        return self._log.keys.get(subject)

    async def delete_key(self, subject: str) -> None:
        self._log.keys.pop(subject, None)
