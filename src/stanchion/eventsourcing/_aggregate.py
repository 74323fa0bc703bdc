"""Aggregates (commands record events, ``@applies`` methods evolve state) and the Repository."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypedDict, TypeVar

import msgspec

from stanchion.errors import AggregateNotFound, ConfigError
from stanchion.eventsourcing._api import EventStore
from stanchion.eventsourcing._core import NO_STREAM, AppendResult, NewEvent, RecordedEvent
from stanchion.observability import get_logger

__all__ = ["Aggregate", "Repository", "applies", "caused_by", "event_type_name"]

_log = get_logger("stanchion.eventsourcing")
F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound="Aggregate")

_MARK = "__stanchion_applies__"


def applies(*event_types: type) -> Callable[[F], F]:
    """Mark an aggregate method as the one that applies events of ``event_types``.

    The method takes the event and changes the aggregate's state; it must
    not check invariants (commands do that before recording) nor fail.

    Example::

        @applies(Deposited)
        def _deposited(self, event: Deposited) -> None:
            self.balance += event.amount

    .. versionadded:: 0.1
    """
    if not event_types:
        raise ConfigError("@applies needs at least one event type")
    for t in event_types:
        _check_event_class(t)

    def mark(fn: F) -> F:
        setattr(fn, _MARK, (*getattr(fn, _MARK, ()), *event_types))
        return fn

    return mark


def _check_event_class(t: object) -> None:
    if not isinstance(t, type):
        raise ConfigError(f"@applies takes event classes, got {t!r}")
    if issubclass(t, msgspec.Struct):
        return
    if dataclasses.is_dataclass(t):
        params = getattr(t, "__dataclass_params__", None)
        if params is not None and not params.frozen:
            raise ConfigError(f"event dataclass {t.__name__} must be frozen=True")
        return
    raise ConfigError(f"event class {t.__name__} must be a msgspec.Struct or a frozen dataclass")


def event_type_name(cls: type) -> str:
    """The type name an event class is stored under (``__event_type__``, else its name)."""
    return str(getattr(cls, "__event_type__", cls.__name__))


class Causation(TypedDict):
    """Correlation and causation ids, as keyword arguments of :meth:`Repository.save`."""

    correlation_id: str
    causation_id: str


def caused_by(event: RecordedEvent) -> Causation:
    """Correlation and causation ids for what ``event`` causes.

    The correlation id is carried over (or starts at ``event``); the
    causation id is ``event``'s id. Pass them on:
    ``await repo.save(order, **caused_by(event))``.

    .. versionadded:: 0.1
    """
    return Causation(
        correlation_id=event.correlation_id or str(event.id), causation_id=str(event.id)
    )


class Aggregate:
    """Base class of event-sourced aggregates.

    Commands check invariants and call :meth:`record`; methods decorated with
    :func:`applies` evolve state. The constructor takes the aggregate's id
    only (set other defaults in ``__init__`` after ``super().__init__(id)``),
    because the :class:`Repository` rebuilds aggregates with ``Type(id)``.

    Attributes:
        id: the aggregate id.
        version: the version of the last event applied (-1: none yet).

    Class attributes:
        stream_category: the stream name prefix (default: the class name);
            the stream is ``f"{stream_category}-{id}"``.
        snapshot_schema: bump it when the state's shape changes; older
            snapshots are then ignored (events are replayed instead).

    .. versionadded:: 0.1
    """

    stream_category: ClassVar[str] = ""
    snapshot_schema: ClassVar[int] = 1
    _appliers: ClassVar[dict[type, Callable[[Any, Any], None]]] = {}
    _event_classes: ClassVar[dict[str, type]] = {}
    _decoder_cache: ClassVar[dict[str, tuple[Callable[[bytes], Any], type]]]
    _hints_cache: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        appliers: dict[type, Callable[[Any, Any], None]] = {}
        for klass in reversed(cls.__mro__):
            for value in vars(klass).values():
                for t in getattr(value, _MARK, ()):
                    appliers[t] = value
        cls._appliers = appliers
        cls._event_classes = {event_type_name(t): t for t in appliers}
        if "stream_category" not in vars(cls) or not cls.stream_category:
            cls.stream_category = cls.__name__

    @classmethod
    def _decoders(cls) -> dict[str, tuple[Callable[[bytes], Any], type]]:
        found: dict[str, tuple[Callable[[bytes], Any], type]] | None = cls.__dict__.get(
            "_decoder_cache"
        )
        if found is None:
            found = {
                name: (msgspec.json.Decoder(t).decode, t) for name, t in cls._event_classes.items()
            }
            cls._decoder_cache = found
        return found

    def __init__(self, id: str) -> None:
        self.id = str(id)
        self.version = -1
        self._pending: list[Any] = []

    @property
    def pending_events(self) -> list[Any]:
        """Events recorded and not saved yet (a copy)."""
        return list(self._pending)

    @property
    def stream(self) -> str:
        """The aggregate's stream name."""
        return f"{self.stream_category}-{self.id}"

    def record(self, event: Any) -> None:
        """Apply ``event`` to the state now and queue it for :meth:`Repository.save`."""
        self._apply(event)
        self._pending.append(event)

    def _apply(self, event: Any) -> None:
        fn = self._appliers.get(type(event))
        if fn is None:
            raise ConfigError(
                f"{type(self).__name__} has no @applies({type(event).__name__}) method"
            )
        fn(self, event)

    def snapshot_state(self) -> dict[str, Any]:
        """The state to snapshot: public attributes except ``id`` and ``version``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in _SKIP}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Set attributes from a snapshot, converted to the class's annotations."""
        cls = type(self)
        hints: dict[str, Any] | None = cls.__dict__.get("_hints_cache")
        if hints is None:
            hints = cls._hints_cache = typing.get_type_hints(cls)
        for key, value in state.items():
            hint = hints.get(key)
            if hint is None or (hint in _PLAIN and type(value) is hint):
                setattr(self, key, value)
            else:
                setattr(self, key, msgspec.convert(value, hint))


_SKIP = frozenset({"id", "version"})
_PLAIN = frozenset({int, str, float, bool})


class _Snapshot(msgspec.Struct):
    schema: int
    state: dict[str, Any]


class Repository(Generic[A]):
    """Loads and saves aggregates of one type through an :class:`EventStore`.

    Args:
        store: the event store.
        aggregate_type: the :class:`Aggregate` subclass.
        snapshot_every: when set, save a snapshot each time the stream's
            version crosses a multiple of it. Snapshots sit apart from the
            events; loading reads the newest snapshot, then every event after
            its version, so a snapshot never hides a later event.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: EventStore,
        aggregate_type: type[A],
        *,
        snapshot_every: int | None = None,
    ) -> None:
        if not (isinstance(aggregate_type, type) and issubclass(aggregate_type, Aggregate)):
            raise ConfigError(f"Repository needs an Aggregate subclass, got {aggregate_type!r}")
        if snapshot_every is not None and snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be >= 1, got {snapshot_every}")
        self.store = store
        self.aggregate_type = aggregate_type
        self.snapshot_every = snapshot_every
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(_Snapshot).decode

    def stream_for(self, aggregate_id: str) -> str:
        """The stream name of an aggregate id."""
        return f"{self.aggregate_type.stream_category}-{aggregate_id}"

    async def load(self, aggregate_id: str) -> A:
        """Rebuild the aggregate from its snapshot (if any) and the events after it.

        Raises:
            AggregateNotFound: the aggregate has no events.
            StreamDeleted: its stream was deleted.
        """
        cls = self.aggregate_type
        stream = self.stream_for(aggregate_id)
        aggregate = cls(aggregate_id)
        if self.snapshot_every is not None:
            stored = await self.store._backend.load_snapshot(stream)
            if stored is not None:
                self._restore(aggregate, *stored)
        # Hot path: decode each payload straight into its event class (no dict in
        # between), unless an upcaster must see the payload first.
        store = self.store
        upcast = store._upcasters.types
        decoders = cls._decoders()
        version = aggregate.version + 1
        while True:
            rows = await store._backend.read_stream(stream, version, False, store.PAGE)
            for row in rows:
                decoder = decoders.get(row[4])
                if decoder is None:
                    raise ConfigError(
                        f"{cls.__name__} cannot apply stored event type {row[4]!r} "
                        f"({stream} version {row[1]}); add an @applies method"
                    )
                event: Any
                if row[4] in upcast or row[6]:
                    event = msgspec.convert(store._recorded(row).data, decoder[1])
                else:
                    event = decoder[0](row[5])
                aggregate._apply(event)
            if rows:
                version = aggregate.version = rows[-1][1]
                version += 1
            if len(rows) < store.PAGE:
                break
        if aggregate.version < 0:
            raise AggregateNotFound(aggregate_id)
        return aggregate

    def _restore(self, aggregate: A, version: int, blob: bytes) -> None:
        try:
            snap = self._decode(blob)
            if snap.schema != aggregate.snapshot_schema:
                return
            aggregate.restore_state(snap.state)
        except (msgspec.ValidationError, msgspec.DecodeError, TypeError, ValueError) as exc:
            _log.warning("eventsourcing.snapshot_ignored", aggregate=aggregate.id, error=str(exc))
            fresh = type(aggregate)(aggregate.id)
            vars(aggregate).update(vars(fresh))
            return
        aggregate.version = version

    async def save(
        self,
        aggregate: A,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AppendResult | None:
        """Append the aggregate's pending events, expecting the version it was loaded at.

        Args:
            aggregate: the aggregate.
            correlation_id: stored in each event's metadata.
            causation_id: stored in each event's metadata.
            metadata: more metadata for each event.

        Returns:
            the append result, or ``None`` when nothing was pending.

        Raises:
            WrongExpectedVersion: another writer saved it first; load and retry.
        """
        pending = aggregate._pending
        if not pending:
            return None
        meta: dict[str, Any] = dict(metadata or {})
        if correlation_id is not None:
            meta["correlation_id"] = str(correlation_id)
        if causation_id is not None:
            meta["causation_id"] = str(causation_id)
        events = []
        for event in pending:
            schema = getattr(type(event), "__event_schema__", 1)
            m = meta if schema == 1 else {**meta, "schema": schema}
            events.append(NewEvent(event_type_name(type(event)), msgspec.to_builtins(event), m))
        old = aggregate.version
        expected = NO_STREAM if old < 0 else old
        result = await self.store.append(aggregate.stream, events, expected)
        aggregate.version = result.last_version
        aggregate._pending = []
        every = self.snapshot_every
        if every is not None and (result.last_version + 1) // every > (old + 1) // every:
            blob = self._encode(
                _Snapshot(aggregate.snapshot_schema, dict(aggregate.snapshot_state()))
            )
            await self.store._backend.save_snapshot(aggregate.stream, result.last_version, blob)
        return result
