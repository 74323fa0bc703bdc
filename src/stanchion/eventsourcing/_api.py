"""The event store facade: encodes, decodes, upcasts and pages over a backend."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from types import TracebackType
from typing import Any, final

import msgspec

from stanchion.errors import ConfigError, ConflictError, StreamDeleted
from stanchion.eventsourcing._backend import Backend, Capabilities, EncodedEvent, Row
from stanchion.eventsourcing._core import (
    ANY,
    AppendResult,
    Expected,
    NewEvent,
    RecordedEvent,
    Upcaster,
    UpcasterChain,
    expected_code,
)
from stanchion.observability import Metrics, get_logger
from stanchion.urls import BackendRegistry, ParsedURL, default_registry

__all__ = ["EventStore"]

_log = get_logger("stanchion.eventsourcing")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _encode_event(event: NewEvent) -> EncodedEvent:
    if not isinstance(event, NewEvent):
        raise ConfigError(f"append() takes NewEvent objects, got {type(event).__name__}")
    data = event.data
    try:
        if isinstance(data, bytes | bytearray | memoryview):
            payload, raw = bytes(data), True
        else:
            payload, raw = _encode(data), False
        meta = _encode(event.metadata) if event.metadata else None
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigError(f"event {event.type!r} cannot be encoded as JSON: {exc}") from exc
    return EncodedEvent(event.id, event.type, payload, raw, meta)


@final
class EventStore:
    """An append-only event store: streams, a global log, subscriptions.

    Build one with :meth:`connect`; use it as an async context manager or
    call :meth:`close`. One instance is safe to share between tasks of one
    event loop.

    .. versionadded:: 0.1
    """

    PAGE = 2000
    """Events fetched per round trip by reads and subscriptions."""

    def __init__(
        self,
        backend: Backend,
        url: ParsedURL,
        upcasters: UpcasterChain,
        metrics: Metrics,
    ) -> None:
        self._backend = backend
        self._url = url
        self._upcasters = upcasters
        self._closed = False
        self._appends = metrics.counter("eventsourcing_appends", "Appends by outcome.", ["outcome"])
        self._appended = metrics.counter(
            "eventsourcing_events_appended", "Events written by appends.", []
        )
        self.metrics = metrics

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        upcasters: Iterable[Upcaster] = (),
        registry: BackendRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> EventStore:
        """Open the store at ``url``, creating its schema on first use.

        Args:
            url: ``memory://[name]``, ``sqlite:///path.db`` or
                ``postgresql://user@host/db``; ``?prefix=`` prefixes the
                tables (or the shared in-process log's name).
            upcasters: :class:`Upcaster` objects applied to events on read.
            registry: the backend registry (default: :data:`stanchion.urls.default_registry`).
            metrics: where to register Prometheus instruments (default: a private registry).

        Raises:
            ConfigError: bad URL, unknown scheme, missing driver, bad upcasters.
            BackendUnavailable: the database cannot be reached.
        """
        chain = UpcasterChain(upcasters)
        target, parsed = (registry or default_registry).load("eventsourcing", url)
        backend_cls: Any = target
        backend: Backend = await backend_cls.open(parsed)
        _log.debug("eventsourcing.connected", url=parsed.masked())
        return cls(backend, parsed, chain, metrics or Metrics())

    @property
    def url(self) -> str:
        """The store's URL with any password masked."""
        return self._url.masked()

    @property
    def capabilities(self) -> Capabilities:
        """What the backend offers (durability, multi-process, live notifications)."""
        return self._backend.capabilities

    async def close(self) -> None:
        """Close the store's connections; idempotent."""
        if not self._closed:
            self._closed = True
            await self._backend.close()

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- writing ------------------------------------------------------------

    async def append(
        self,
        stream: str,
        events: Iterable[NewEvent] | NewEvent,
        expected_version: Expected = ANY,
    ) -> AppendResult:
        """Append ``events`` to ``stream`` atomically.

        Args:
            stream: the stream name.
            events: the events, in order (a single :class:`NewEvent` is accepted too).
            expected_version: ``ANY``, ``NO_STREAM``, ``STREAM_EXISTS`` or the
                version the stream's last event must have.

        Returns:
            the versions and global positions written; for a replay of events
            already stored (same ids at the same versions) the original result,
            writing nothing.

        Raises:
            WrongExpectedVersion: the stream is not at the expected version.
            DuplicateEventId: an id is already used elsewhere.
            StreamDeleted: the stream has a tombstone.
        """
        if not isinstance(stream, str) or not stream:
            raise ConfigError(f"stream must be a non-empty string, got {stream!r}")
        code = expected_code(expected_version)
        batch = [events] if isinstance(events, NewEvent) else list(events)
        encoded = [_encode_event(e) for e in batch]
        try:
            result = await self._backend.append(stream, encoded, code)
        except ConflictError:
            self._appends.labels("conflict").inc()
            raise
        except StreamDeleted:
            self._appends.labels("deleted").inc()
            raise
        self._appends.labels("ok").inc()
        self._appended.inc(len(encoded))
        return result

    async def delete_stream(self, stream: str) -> None:
        """Tombstone ``stream``: later appends and stream reads raise StreamDeleted.

        Its events stay in :meth:`read_all` and subscriptions (the audit trail is
        never rewritten; erase personal data with :class:`CryptoShredder`).
        """
        await self._backend.delete_stream(stream)
        _log.info("eventsourcing.stream_deleted", stream=stream)

    # -- reading ------------------------------------------------------------

    def _recorded(self, row: Row) -> RecordedEvent:
        data: Any = row[5] if row[6] else _decode(row[5])
        meta: dict[str, Any] = _decode(row[7]) if row[7] else {}
        if self._upcasters:
            meta, data = self._upcasters.upcast(row[4], meta, data)
        return RecordedEvent(row[0], row[1], row[2], row[3], row[4], data, meta, row[8])

    def _page(self, rows: list[Row]) -> list[RecordedEvent]:
        """Decode a page of rows (the hot loop of reads: no per-row method call)."""
        if self._upcasters:
            return [self._recorded(r) for r in rows]
        dec = _decode
        return [
            RecordedEvent(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5] if r[6] else dec(r[5]),
                dec(r[7]) if r[7] else {},
                r[8],
            )
            for r in rows
        ]

    async def stream_version(self, stream: str) -> int:
        """The version of the stream's last event; -1 when it has none.

        Raises:
            StreamDeleted: the stream has a tombstone.
        """
        return await self._backend.stream_version(stream)

    async def head_position(self) -> int:
        """The global position of the last committed event; 0 when the log is empty.

        Positions start at 1, so ``subscribe(await store.head_position() + 1)``
        receives only events appended from now on.
        """
        return await self._backend.head_position()

    async def read_stream(
        self,
        stream: str,
        from_version: int | None = None,
        *,
        backwards: bool = False,
        limit: int | None = None,
    ) -> AsyncGenerator[RecordedEvent, None]:
        """The events of ``stream`` from ``from_version`` (inclusive).

        Forwards, ``from_version`` defaults to 0; backwards, to the last event
        (newest first). ``limit`` caps how many events are returned. A stream
        without events yields nothing.

        Raises:
            StreamDeleted: the stream has a tombstone.
        """
        if limit is not None and limit < 0:
            raise ConfigError(f"limit must be >= 0, got {limit}")
        if backwards:
            version = -1 if from_version is None else from_version
        else:
            version = 0 if from_version is None else max(from_version, 0)
        remaining = limit
        while remaining is None or remaining > 0:
            page = self.PAGE if remaining is None else min(self.PAGE, remaining)
            rows = await self._backend.read_stream(stream, version, backwards, page)
            for recorded in self._page(rows):
                yield recorded
            if len(rows) < page:
                return
            if remaining is not None:
                remaining -= len(rows)
            version = rows[-1][1] + (-1 if backwards else 1)
            if version < 0:
                return

    async def read_all(
        self,
        from_position: int = 0,
        *,
        limit: int | None = None,
        types: Sequence[str] | None = None,
    ) -> AsyncGenerator[RecordedEvent, None]:
        """The global log from ``from_position`` (inclusive), in increasing position.

        Args:
            from_position: the first position wanted (positions start at 1).
            limit: at most this many events.
            types: only events of these type names.

        On PostgreSQL this reads what is committed now; to follow the log
        without missing events that commit late, use :meth:`subscribe`.
        """
        if limit is not None and limit < 0:
            raise ConfigError(f"limit must be >= 0, got {limit}")
        wanted = None if types is None else list(types)
        position = from_position
        remaining = limit
        while remaining is None or remaining > 0:
            page = self.PAGE if remaining is None else min(self.PAGE, remaining)
            rows = await self._backend.read_all(position, page, wanted)
            for recorded in self._page(rows):
                yield recorded
            if len(rows) < page:
                return
            if remaining is not None:
                remaining -= len(rows)
            position = rows[-1][2] + 1

    async def subscribe(
        self, from_position: int = 0, *, types: Sequence[str] | None = None
    ) -> AsyncGenerator[RecordedEvent, None]:
        """Every event from ``from_position`` (inclusive): catch-up, then live, until cancelled.

        Events arrive exactly once and in position order; none is skipped,
        even when concurrent transactions commit out of order (PostgreSQL).
        To resume, pass the last position you processed plus one. Close the
        iterator (``aclose()``, or leave an ``async with contextlib.aclosing(...)``)
        or cancel the task to stop.
        """
        wanted = None if types is None else list(types)
        async for rows in self._backend.subscribe(from_position, wanted, self.PAGE):
            for recorded in self._page(rows):
                yield recorded

    def __repr__(self) -> str:
        return f"EventStore({self.url!r})"
