"""Event sourcing: an event store on SQLite, PostgreSQL or memory, aggregates, snapshots.

Every state change is appended to a stream as an immutable event; the global
log orders all events by position; subscribers follow it and never miss one;
aggregates are rebuilt by replaying their stream (from a snapshot when there
is one).

Example::

    async with await EventStore.connect("sqlite:///bank.db") as store:
        await store.append("account-1", [NewEvent("Deposited", {"amount": 100})], NO_STREAM)
        async for event in store.read_stream("account-1"):
            print(event.version, event.type, event.data)

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.errors import (
    AggregateNotFound,
    DuplicateEventId,
    StreamDeleted,
    WrongExpectedVersion,
)
from stanchion.eventsourcing._aggregate import (
    Aggregate,
    Causation,
    Repository,
    applies,
    caused_by,
)
from stanchion.eventsourcing._api import EventStore
from stanchion.eventsourcing._core import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    NewEvent,
    RecordedEvent,
    StreamState,
    Upcaster,
)
from stanchion.eventsourcing._shredding import CryptoShredder

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "Aggregate",
    "AggregateNotFound",
    "AppendResult",
    "Causation",
    "CryptoShredder",
    "DuplicateEventId",
    "EventStore",
    "NewEvent",
    "RecordedEvent",
    "Repository",
    "StreamDeleted",
    "StreamState",
    "Upcaster",
    "WrongExpectedVersion",
    "applies",
    "caused_by",
]
