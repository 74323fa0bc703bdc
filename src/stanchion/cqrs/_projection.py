"""Projections: event handlers that fold the log into a read model."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgspec

from stanchion.cqrs._core import event_type_name, validate_name
from stanchion.errors import ConfigError

__all__ = ["Projection", "handles"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_MARK = "__stanchion_handles__"

# Every Projection subclass defined in this process, for "is this event type
# known to anyone?" (see _core's theory of operation). Class metadata, like a
# msgspec tag registry: it holds no configuration and weakly references classes.
_CLASSES: weakref.WeakSet[type[Projection]] = weakref.WeakSet()
_KNOWN_CACHE: dict[str, bool] = {}


def handles(*event_types: type[Any] | str) -> Callable[[F], F]:
    """Mark an ``async def on_x(self, event, tx)`` method as the handler of event types.

    Args:
        event_types: event classes (msgspec Structs or dataclasses; the handler
            receives the event decoded into the class) or stored type names
            (the handler receives the raw ``RecordedEvent``).

    The event's envelope (stream, version, position, id, metadata) is
    ``tx.event`` while the handler runs.

    .. versionadded:: 0.1
    """
    if not event_types:
        raise ConfigError("@handles needs at least one event type")
    for t in event_types:
        if not isinstance(t, (type, str)):
            raise ConfigError(f"@handles: {t!r} is neither an event class nor a type name")

    def mark(fn: F) -> F:
        existing: tuple[type[Any] | str, ...] = getattr(fn, _MARK, ())
        setattr(fn, _MARK, existing + tuple(event_types))
        return fn

    return mark


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    cls: type[Any] | None


class Projection:
    """Base class of a projection: handlers per event type updating a read model.

    Subclass it with a unique ``name`` and methods decorated
    :func:`handles`; each runs inside the runner's transaction ``tx``
    (``await tx.execute(sql, *args)`` on SQL read models, Redis commands on a
    Redis one) together with the checkpoint write::

        class OrderHistory(Projection):
            name = "order_history"

            async def setup(self, tx):
                await tx.execute(
                    "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, total INTEGER)"
                )

            @handles(OrderPlaced)
            async def on_placed(self, event, tx):
                await tx.execute("INSERT INTO orders VALUES (?, ?)", event.order_id, event.total)

    Class attributes:
        name: the projection's name (letters, digits, underscores); it keys
            the checkpoint and the CLI.
        ignores: event classes or type names this projection deliberately
            skips (they count as *known*).
        skip_unknown: skip events whose type no projection knows instead of
            stopping with ProjectionError (default False: unknown is bad input).
        park_failures: put an event whose handler fails into the parked list
            and go on, instead of stopping (default False).

    .. versionadded:: 0.1
    """

    name: ClassVar[str] = ""
    ignores: ClassVar[Collection[type[Any] | str]] = ()
    skip_unknown: ClassVar[bool] = False
    park_failures: ClassVar[bool] = False
    _routes: ClassVar[dict[str, _Route]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        routes: dict[str, _Route] = {}
        for klass in reversed(cls.__mro__):
            here: dict[str, str] = {}
            for attr, value in vars(klass).items():
                for t in getattr(value, _MARK, ()):
                    type_name = event_type_name(t)
                    if here.get(type_name, attr) != attr:
                        raise ConfigError(
                            f"{klass.__qualname__}: event type {type_name!r} is handled by "
                            f"both {here[type_name]}() and {attr}()"
                        )
                    here[type_name] = attr
                    routes[type_name] = _Route(attr, t if isinstance(t, type) else None)
        cls._routes = routes
        if cls.__dict__.get("name"):
            validate_name(cls.name)
        _CLASSES.add(cls)
        _KNOWN_CACHE.clear()

    def __init__(self) -> None:
        if not self.name:
            raise ConfigError(
                f"{type(self).__qualname__} has no name: set name = 'my_view' on the class"
            )
        validate_name(self.name)
        self._ignored = frozenset(event_type_name(t) for t in self.ignores)

    async def setup(self, tx: Any) -> None:
        """Create the read model's tables or keys (runs once per start, in a transaction).

        Use ``CREATE TABLE IF NOT EXISTS``: it runs on every start, and into
        the shadow view on a rebuild.
        """

    @classmethod
    def event_types(cls) -> frozenset[str]:
        """The stored type names this projection has handlers for."""
        return frozenset(cls._routes)

    def route(
        self, type_name: str
    ) -> tuple[Callable[[Any, Any], Awaitable[Any]], type[Any] | None] | None:
        """The bound handler and its event class for a stored type, or None."""
        r = self._routes.get(type_name)
        if r is None:
            return None
        return getattr(self, r.method), r.cls

    def ignored(self, type_name: str) -> bool:
        """True when the projection skips ``type_name`` on purpose."""
        return type_name in self._ignored

    def known(self, type_name: str) -> bool:
        """True when ``type_name`` is known to this process.

        Known: handled or ignored by some projection, or applied by some
        event-sourced aggregate (``stanchion.eventsourcing``) of the process.
        """
        if type_name in self._ignored or type_name in self._routes:
            return True
        if _KNOWN_CACHE.get(type_name):
            return True
        hit = (
            any(
                type_name in c._routes or type_name in {event_type_name(t) for t in c.ignores}
                for c in list(_CLASSES)
            )
            or type_name in _aggregate_event_types()
        )
        if hit:
            _KNOWN_CACHE[type_name] = True
        return hit


def _aggregate_event_types() -> set[str]:
    """Event types some event-sourced aggregate of this process applies."""
    module = sys.modules.get("stanchion.eventsourcing._aggregate")
    base = getattr(module, "Aggregate", None)
    if not isinstance(base, type):
        return set()
    out: set[str] = set()
    todo: list[type[Any]] = list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        out.update(getattr(cls, "_event_classes", {}) or {})
        todo.extend(cls.__subclasses__())
    return out


def decode_event(data: Any, cls: type[Any]) -> Any:
    """Decode a stored payload (dict or JSON bytes) into the handler's event class."""
    if isinstance(data, cls):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return msgspec.json.decode(data, type=cls)
    if isinstance(data, str):
        return msgspec.json.decode(data.encode(), type=cls)
    return msgspec.convert(data, cls, strict=False)
