"""Pure logic of the event store: value types, append decisions, upcasting, gap tracking.

Theory of operation
===================

An event store is a set of *streams* (one per aggregate, say), each an
append-only list of events numbered by *version* from 0 with no gaps, and a
*global log* in which every event has a *position*; positions strictly
increase along the log (they may skip numbers: a rolled-back transaction
burns the ones it took).

Appending. An append names a stream, a batch of events and an *expected
version*. Backends run, inside one transaction that holds the stream's write
lock, the same three decisions, in this order, all of them defined here:

1. a tombstoned stream refuses everything (:class:`StreamDeleted`);
2. the expected version is checked against the stream's current version
   (-1 for a stream with no events) by :func:`check_expected`;
3. the batch is written at versions ``current + 1 ...``.

Idempotency (as in KurrentDB). Clients retry: a timeout after the commit
looks exactly like a timeout before it, and a retried deposit must not move
money twice. So when step 2 fails, or step 3 hits the unique index on event
ids, the backend looks up the stored events carrying the batch's ids and
:func:`decide_replay` decides: if *every* id of the batch is stored in *this*
stream, in batch order, at consecutive versions (the whole original batch or
a leading part of it), the append is a no-op that returns the original
:class:`AppendResult`, whatever the expected version; any other reuse of an id
is :class:`DuplicateEventId`. The fast path never pays for the lookup.

Upcasting. Stored events never change. An event carries a schema number in
its metadata (``"schema"``, 1 when absent); :class:`UpcasterChain` maps
``(type, schema)`` to the next schema's payload on read, repeatedly, until
no upcaster applies.

Gap tracking (PostgreSQL subscriptions). Positions come from a sequence, and
concurrent transactions commit out of order: position 5 may become visible
after position 6. A reader of "position > last seen" that delivered 6 has
lost 5 for ever. :class:`GapTracker` delivers strictly in position order and
stops at a gap until the gap is *resolved*: every writer first takes a
transaction id (xid8) and only then numbers its events, so the owner of a
gap seen under snapshot S is either rolled back or among S's in-progress
transactions (``xip``). Once a later snapshot shows all of those finished,
a gap that is still there belongs to a rolled-back transaction and is
skipped; if its owner committed, its events are in the later read. The cost
is one snapshot per read and a short wait only while a gap is open; writers
never serialise on a global lock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID, uuid4

import msgspec

from stanchion.errors import ConfigError, DuplicateEventId, StreamDeleted, WrongExpectedVersion

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "Expected",
    "GapTracker",
    "NewEvent",
    "RecordedEvent",
    "Snapshot",
    "Stored",
    "StreamState",
    "Upcaster",
    "UpcasterChain",
    "check_batch",
    "check_expected",
    "decide_replay",
    "expected_code",
    "schema_of",
]


class StreamState(enum.StrEnum):
    """The symbolic expected versions of an append (compare equal to their names).

    .. versionadded:: 0.1
    """

    ANY = "ANY"
    """Append whatever the stream's state."""
    NO_STREAM = "NO_STREAM"
    """The stream must have no events yet."""
    STREAM_EXISTS = "STREAM_EXISTS"
    """The stream must have at least one event."""


ANY = StreamState.ANY
NO_STREAM = StreamState.NO_STREAM
STREAM_EXISTS = StreamState.STREAM_EXISTS

Expected: TypeAlias = "StreamState | int"


def _new_id() -> UUID:
    return uuid4()


class NewEvent(msgspec.Struct, frozen=True):
    """An event to append: its type name, payload, metadata and unique id.

    Args:
        type: the event type name (``"Deposited"``).
        data: a JSON-able dict, or opaque bytes stored as they are.
        metadata: a JSON-able dict (correlation and causation ids, schema, ...).
        id: a unique id; a retried append must reuse it (idempotency).

    .. versionadded:: 0.1
    """

    type: str
    data: dict[str, Any] | bytes
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    id: UUID = msgspec.field(default_factory=_new_id)


class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    """An event as stored, read back from a stream, the global log or a subscription.

    Attributes:
        stream: the stream it belongs to.
        version: its version in the stream (0, 1, 2, ...).
        position: its position in the global log (strictly increasing, from 1).
        id: its unique id.
        type: its type name.
        data: the payload: a dict for JSON events (after upcasting), bytes for
            events appended with bytes.
        metadata: the metadata dict.
        recorded_at: when it was stored (UTC).

    .. versionadded:: 0.1
    """

    stream: str
    version: int
    position: int
    id: UUID
    type: str
    data: Any
    metadata: dict[str, Any]
    recorded_at: datetime

    @property
    def correlation_id(self) -> str | None:
        """The ``correlation_id`` metadata, if any."""
        value = self.metadata.get("correlation_id")
        return None if value is None else str(value)

    @property
    def causation_id(self) -> str | None:
        """The ``causation_id`` metadata, if any."""
        value = self.metadata.get("causation_id")
        return None if value is None else str(value)


class AppendResult(msgspec.Struct, frozen=True, gc=False):
    """What an append wrote: the stream versions and global positions of its events.

    .. versionadded:: 0.1
    """

    first_version: int
    last_version: int
    first_position: int
    last_position: int


@dataclass(frozen=True, slots=True)
class Stored:
    """An already stored event that carries one of a batch's ids (for replay decisions)."""

    id: UUID
    stream: str
    version: int
    position: int


def expected_code(expected: object) -> int:
    """Encode an expected version as an int: -2 ANY, -1 NO_STREAM, -3 STREAM_EXISTS, n >= 0.

    Raises:
        ConfigError: not a :class:`StreamState` nor an int >= -1.
    """
    if isinstance(expected, StreamState):
        return _CODES[expected]
    if isinstance(expected, int) and not isinstance(expected, bool) and expected >= -1:
        return expected
    if isinstance(expected, str) and expected in StreamState.__members__:
        return _CODES[StreamState(expected)]
    raise ConfigError(
        f"expected_version must be ANY, NO_STREAM, STREAM_EXISTS or an int >= 0, got {expected!r}"
    )


_CODES: Mapping[StreamState, int] = {
    StreamState.ANY: -2,
    StreamState.NO_STREAM: -1,
    StreamState.STREAM_EXISTS: -3,
}


def _expected_name(code: int) -> object:
    for state, value in _CODES.items():
        if value == code:
            return state
    return code


def check_expected(stream: str, code: int, current: int) -> None:
    """Raise :class:`WrongExpectedVersion` unless ``current`` satisfies ``code``.

    Args:
        stream: the stream name (for the error).
        code: an expected version encoded by :func:`expected_code`.
        current: the stream's last version, -1 when it has no events.
    """
    if (
        (code == -1 and current != -1)
        or (code == -3 and current == -1)
        or (code >= 0 and current != code)
    ):
        raise WrongExpectedVersion(stream, _expected_name(code), current)


def check_batch(stream: str, ids: Sequence[UUID]) -> None:
    """Refuse an empty batch or one that repeats an id."""
    if not ids:
        raise ConfigError(f"append to {stream!r}: give at least one event")
    if len(set(ids)) != len(ids):
        seen: set[UUID] = set()
        for ident in ids:
            if ident in seen:
                raise DuplicateEventId(ident, stream)
            seen.add(ident)


def decide_replay(
    stream: str, ids: Sequence[UUID], stored: Iterable[Stored]
) -> AppendResult | None:
    """Decide an append whose ids may already be stored (see the module essay).

    Returns:
        the original result when the batch is an exact replay (or a leading
        part of one) in ``stream``; ``None`` when no id is stored at all.

    Raises:
        DuplicateEventId: some id is stored, but not as a replay of this batch.
    """
    wanted = set(ids)
    found = {s.id: s for s in stored if s.id in wanted}
    if not found:
        return None
    first = found.get(ids[0])
    if first is not None and first.stream == stream and len(found) == len(ids):
        last = first
        for offset, ident in enumerate(ids):
            s = found.get(ident)
            if s is None or s.stream != stream or s.version != first.version + offset:
                break
            last = s
        else:
            return AppendResult(first.version, last.version, first.position, last.position)
    culprit = next((i for i in ids if i in found), ids[0])
    raise DuplicateEventId(culprit, stream)


def check_not_deleted(stream: str, deleted: bool) -> None:
    """Raise :class:`StreamDeleted` for a tombstoned stream."""
    if deleted:
        raise StreamDeleted(stream)


# -- upcasting ----------------------------------------------------------------


def schema_of(metadata: Mapping[str, Any]) -> int:
    """The schema number an event was written with (metadata ``"schema"``, default 1)."""
    value = metadata.get("schema", metadata.get("schema_version", 1))
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


@dataclass(frozen=True, slots=True)
class Upcaster:
    """Turns payloads of ``type`` written with ``from_schema`` into ``to_schema``.

    An event's schema number is its metadata's ``"schema"`` (1 when absent):
    write ``NewEvent(type, data, {"schema": 2})``, or give an aggregate's event
    class ``__event_schema__ = 2``. On read, upcasters run in a chain until none
    applies; the returned event's metadata carries the final schema. Register
    them with ``EventStore.connect(url, upcasters=[...])``.

    Args:
        type: the event type name.
        from_schema: the schema number it reads.
        to_schema: the schema number it produces (greater than ``from_schema``).
        fn: ``fn(data) -> data``; receives the payload (a dict, or bytes) and
            returns the new one. It must not mutate its argument.

    .. versionadded:: 0.1
    """

    type: str
    from_schema: int
    to_schema: int
    fn: Callable[[Any], Any] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.type:
            raise ConfigError("Upcaster.type must be an event type name")
        if self.to_schema <= self.from_schema:
            raise ConfigError(
                f"Upcaster for {self.type!r}: to_schema ({self.to_schema}) must be greater "
                f"than from_schema ({self.from_schema})"
            )
        if not callable(self.fn):
            raise ConfigError(f"Upcaster for {self.type!r}: fn must be callable")


class UpcasterChain:
    """Upcasters indexed by ``(type, from_schema)``, applied repeatedly on read."""

    __slots__ = ("_by_key", "types")

    def __init__(self, upcasters: Iterable[Upcaster] = ()) -> None:
        self._by_key: dict[tuple[str, int], Upcaster] = {}
        for up in upcasters:
            if not isinstance(up, Upcaster):
                raise ConfigError(f"upcasters must be Upcaster objects, got {up!r}")
            key = (up.type, up.from_schema)
            if key in self._by_key:
                raise ConfigError(
                    f"two upcasters for {up.type!r} from schema {up.from_schema}; keep one"
                )
            self._by_key[key] = up
        self.types = frozenset(t for t, _ in self._by_key)

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def upcast(self, type: str, metadata: dict[str, Any], data: Any) -> tuple[dict[str, Any], Any]:
        """Return ``(metadata, data)`` brought to the newest schema registered."""
        if type not in self.types:
            return metadata, data
        schema = schema_of(metadata)
        changed = False
        while (up := self._by_key.get((type, schema))) is not None:
            data = up.fn(data)
            schema = up.to_schema
            changed = True
        if changed:
            metadata = {**metadata, "schema": schema}
        return metadata, data


# -- gap tracking (PostgreSQL subscriptions) ----------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A transaction snapshot: ``xmin``, ``xmax`` and the in-progress ids ``xip``."""

    xmin: int
    xmax: int
    xip: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        """Parse PostgreSQL's ``pg_snapshot`` text form ``xmin:xmax:xip1,xip2``."""
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def finished(self, xid: int) -> bool:
        """True when transaction ``xid`` had ended (committed or aborted) at this snapshot."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.xip)


class GapTracker:
    """Delivers positions in order, holding at gaps until they are resolved.

    ``next`` is the first position not yet delivered or skipped. Feed each
    read (the positions visible under one snapshot, ascending, all >= next)
    to :meth:`advance`; it returns how many of them may be delivered now.
    """

    __slots__ = ("next", "pending")

    def __init__(self, next_position: int) -> None:
        self.next = max(next_position, 1)
        self.pending: tuple[int, frozenset[int]] | None = None

    def advance(self, positions: Sequence[int], snapshot: Snapshot) -> int:
        """How many leading ``positions`` are safe to deliver; updates ``next``."""
        count = 0
        for p in positions:
            if p > self.next:
                pending = self.pending
                resolved = (
                    pending is not None
                    and pending[0] == self.next
                    and all(snapshot.finished(x) for x in pending[1])
                )
                if not resolved:
                    if pending is None or pending[0] != self.next:
                        self.pending = (self.next, snapshot.xip)
                    return count
            self.next = p + 1
            self.pending = None
            count += 1
        return count

    @property
    def waiting(self) -> bool:
        """True while a gap is open (its owner may still commit)."""
        return self.pending is not None
