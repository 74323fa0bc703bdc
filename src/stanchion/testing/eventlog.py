"""A minimal in-memory event log with the ``EventStore`` reading interface.

For testing projections, runners and outboxes without an event store
backend: ``append`` records events with strictly increasing positions
(from 1); ``read_all`` and ``subscribe`` (catch-up then live) read them.
"""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

__all__ = ["ListEventLog", "LoggedEvent"]


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """An event as recorded (the fields of ``RecordedEvent``)."""

    stream: str
    version: int
    position: int
    id: uuid.UUID
    type: str
    data: Any
    metadata: Mapping[str, Any] = field(default_factory=dict)
    recorded_at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )


class ListEventLog:
    """Events in a Python list; ``subscribe`` wakes on every append."""

    def __init__(self) -> None:
        self.events: list[LoggedEvent] = []
        self._versions: dict[str, int] = {}
        self._changed = asyncio.Event()

    def append(
        self,
        type: str | object,
        data: Any = None,
        *,
        stream: str = "stream",
        id: uuid.UUID | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> LoggedEvent:
        """Record one event (a type name and a payload, or an event object)."""
        if not isinstance(type, str):
            data = msgspec.to_builtins(type)
            type = type.__class__.__name__
        version = self._versions.get(stream, -1) + 1
        self._versions[stream] = version
        event = LoggedEvent(
            stream,
            version,
            len(self.events) + 1,
            id or uuid.uuid4(),
            str(type),
            data if data is not None else {},
            dict(metadata or {}),
        )
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()
        return event

    def extend(self, events: Iterable[tuple[str, Any]], *, stream: str = "stream") -> None:
        """Record many ``(type, data)`` events."""
        for type_name, data in events:
            self.append(type_name, data, stream=stream)

    def head_position(self) -> int:
        """The position of the last event (0 when empty)."""
        return len(self.events)

    async def read_all(
        self, from_position: int = 0, *, limit: int | None = None, types: Any = None
    ) -> AsyncIterator[LoggedEvent]:
        """Events from ``from_position`` (inclusive), in order."""
        wanted = None if types is None else set(types)
        count = 0
        for event in self.events[max(0, from_position - 1) :]:
            if wanted is not None and event.type not in wanted:
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            yield event

    async def subscribe(
        self, from_position: int = 0, *, types: Any = None
    ) -> AsyncIterator[LoggedEvent]:
        """Catch up from ``from_position``, then follow new events until cancelled."""
        wanted = None if types is None else set(types)
        nxt = max(1, from_position)
        while True:
            changed = self._changed
            while nxt <= len(self.events):
                event = self.events[nxt - 1]
                nxt += 1
                if wanted is None or event.type in wanted:
                    yield event
            await changed.wait()
