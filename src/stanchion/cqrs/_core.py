"""Pure CQRS logic: handler tables, projection decisions, checkpoints.

Theory of operation
===================

The write side and the read side meet at the event store's global log: every
event has a *position*, strictly increasing. A projection folds the log into a
read model (SQL tables or Redis keys). Its progress is one integer, the
*checkpoint*: the position of the last event whose effect is in the view
(``NO_POSITION`` = 0 before the first one: store positions start at 1,
and 0 is also what ``EventStore.head_position()`` says of an empty log).

Exactly-once in effect
----------------------

The runner applies a batch of events and writes the new checkpoint **in the
same read-model transaction**. Either both commit or neither does, so after a
crash at any instant the view and the checkpoint agree, and resuming from the
checkpoint neither applies an event twice nor skips one. Delivery from the
store may repeat events (a resubscription starts at ``checkpoint + 1``); the
runner drops any event at or below the checkpoint it holds (:func:`fresh`).

The checkpoint write is a compare-and-set::

    UPDATE checkpoints SET position = :new, token = :token
     WHERE name = :name AND position = :expected AND token <= :token

It fails in exactly two cases, told apart by reading the row
(:func:`classify_conflict`):

* ``STALE`` -- the stored fencing token is newer than ours: another replica
  was elected after us. Our batch is rolled back and we stop projecting
  (Kleppmann's fencing rule, checked where the effect happens).
* ``MOVED`` -- same or older token but the position is not the one we read:
  someone else wrote the checkpoint (a rebuild swapped a new view in, or an
  unfenced second runner). We roll back, reload the checkpoint and resume
  from it.

Failures inside a batch
-----------------------

Catch-up applies up to ``batch_size`` events per transaction; live, whatever
is waiting (usually one event). When a handler raises inside a batch the
whole transaction is rolled back and the batch is replayed one event per
transaction (:func:`replay_plan`), so every event before the failing one is
committed with its checkpoint and the checkpoint ends exactly before it. The
failing event is then either *parked* (recorded in a parked list in the same
transaction that moves the checkpoint past it, when the projection allows it)
or the runner stops with :class:`~stanchion.errors.ProjectionError`.
Nothing is ever silently skipped.

Event types
-----------

Handlers are registered per event class (``@handles(OrderPlaced)``) or per
type name (``@handles("OrderPlaced")``). The stored type name of a class is
:func:`event_type_name`. An event whose type no handler of the projection
takes is skipped (its checkpoint still advances) when the type is *known*
(handled by some projection, or listed in ``ignores``); an event type nobody
knows is bad input and stops the runner like a failing handler, unless the
projection sets ``skip_unknown``.

This module reads no clock and does no I/O: time comes in as arguments.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from stanchion.errors import ConfigError, HandlerAlreadyRegistered, HandlerNotFound

__all__ = [
    "NO_POSITION",
    "Checkpoint",
    "Conflict",
    "HandlerTable",
    "Lag",
    "classify_conflict",
    "event_type_name",
    "fresh",
    "is_message_type",
    "qmark_to_dollar",
    "replay_plan",
    "shadow_name",
    "validate_name",
]

NO_POSITION: Final = 0
"""The checkpoint of a projection that has applied nothing yet."""

H = TypeVar("H")
E = TypeVar("E")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_name(name: object, what: str = "projection name") -> str:
    """``name`` if it is a safe SQL identifier / key part, else ConfigError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"invalid {what} {name!r}: use letters, digits and underscores "
            "(1-63 characters, not starting with a digit)"
        )
    return name


def shadow_name(name: str) -> str:
    """The name of the shadow view a rebuild of ``name`` writes into."""
    return f"{name}__rebuild"


# -- messages and handler tables ---------------------------------------------


def is_message_type(cls: object) -> bool:
    """True for a class usable as a typed message: msgspec Struct or dataclass."""
    if not isinstance(cls, type):
        return False
    if dataclasses.is_dataclass(cls):
        return True
    return any(
        base.__module__.startswith("msgspec") and base.__name__ == "Struct"
        for base in cls.__mro__[1:]
    )


class HandlerTable(Generic[H]):
    """Message type -> exactly one handler; lookup walks the message's MRO."""

    __slots__ = ("_handlers",)

    def __init__(self) -> None:
        self._handlers: dict[type[Any], H] = {}

    def register(self, message_type: type[Any], handler: H) -> None:
        """Bind ``handler``; a second binding for the same type raises."""
        if not is_message_type(message_type):
            raise ConfigError(
                f"{message_type!r} is not a message type: use a msgspec.Struct or a dataclass"
            )
        if message_type in self._handlers:
            raise HandlerAlreadyRegistered(message_type)
        self._handlers[message_type] = handler

    def unregister(self, message_type: type[Any]) -> None:
        """Remove the binding of ``message_type`` (HandlerNotFound if none)."""
        if self._handlers.pop(message_type, None) is None:
            raise HandlerNotFound(message_type)

    def lookup(self, message_type: type[Any]) -> H:
        """The handler for ``message_type`` or its nearest registered base."""
        found = self._handlers.get(message_type)
        if found is not None:
            return found
        for base in message_type.__mro__[1:]:
            found = self._handlers.get(base)
            if found is not None:
                return found
        raise HandlerNotFound(message_type)

    def __contains__(self, message_type: object) -> bool:
        return message_type in self._handlers

    def types(self) -> list[type[Any]]:
        """Registered message types, in registration order."""
        return list(self._handlers)


# -- event types -------------------------------------------------------------


def event_type_name(cls: type[Any] | str) -> str:
    """The type name an event class is stored under.

    A string is returned as is. A class may name itself with a class attribute
    ``event_type`` (or ``__event_type__``); otherwise its ``__name__`` is used,
    as :mod:`stanchion.eventsourcing` does.
    """
    if isinstance(cls, str):
        if not cls:
            raise ConfigError("an event type name cannot be empty")
        return cls
    value = getattr(cls, "__event_type__", None)
    if isinstance(value, str) and value:
        return value
    value = cls.__dict__.get("event_type")
    if isinstance(value, str) and value:
        return value
    return cls.__name__


# -- checkpoints -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A projection's progress as stored in its read model.

    Attributes:
        name: the projection name.
        position: the global position of the last applied event (0: none yet).
        token: the fencing token of the last writer, or None when unfenced.
        updated_at: wall-clock seconds of the last write, or None.
        parked: how many events sit in the parked list.
    """

    name: str
    position: int = NO_POSITION
    token: int | None = None
    updated_at: float | None = None
    parked: int = 0


class Conflict(enum.Enum):
    """Why a compare-and-set of a checkpoint failed."""

    STALE = "stale"
    """A writer with a newer fencing token exists: stop projecting."""
    MOVED = "moved"
    """The position changed under us: reload and resume."""


def classify_conflict(
    stored_position: int, stored_token: int | None, expected: int, token: int | None
) -> Conflict | None:
    """Decide whether a checkpoint write may proceed (None) or why not."""
    if token is not None and stored_token is not None and stored_token > token:
        return Conflict.STALE
    if stored_position != expected:
        return Conflict.MOVED
    return None


def fresh(events: Iterable[E], checkpoint: int, position: Callable[[E], int]) -> list[E]:
    """The events strictly after ``checkpoint``, in order (drops redeliveries)."""
    out: list[E] = []
    last = checkpoint
    for event in events:
        pos = position(event)
        if pos > last:
            out.append(event)
            last = pos
    return out


def replay_plan(batch: Sequence[E]) -> list[list[E]]:
    """After a batch failed: the same events, one transaction each, in order."""
    return [[event] for event in batch]


@dataclass(frozen=True, slots=True)
class Lag:
    """How far a projection is behind the head of the log.

    Attributes:
        events: events between the checkpoint and the head (None: unknown).
        seconds: age of the newest event not yet applied, or 0.0 when caught up
            (None: unknown).
    """

    events: int | None
    seconds: float | None

    @staticmethod
    def compute(
        checkpoint: int,
        head: int | None,
        behind: int | None,
        oldest_pending_at: float | None,
        now: float,
    ) -> Lag:
        """Lag from the checkpoint, the head position, a pending count and a timestamp.

        ``behind`` (events known to be waiting) wins over ``head - checkpoint``
        since positions may have gaps.
        """
        if behind is not None:
            events: int | None = behind
        elif head is not None:
            events = max(0, head - checkpoint)
        else:
            events = None
        if events == 0:
            return Lag(0, 0.0)
        seconds = None if oldest_pending_at is None else max(0.0, now - oldest_pending_at)
        return Lag(events, seconds)


# -- SQL ---------------------------------------------------------------------


_QMARK_SCAN = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|\?|\$\d""")


@functools.lru_cache(maxsize=1024)
def qmark_to_dollar(sql: str) -> str:
    """Rewrite ``?`` placeholders as ``$1, $2, ...`` (PostgreSQL), outside quotes.

    SQL that already uses ``$n`` placeholders is returned unchanged, so a
    projection may write either style.
    """
    if "?" not in sql:
        return sql
    counter = 0
    dollar = False

    def repl(match: re.Match[str]) -> str:
        nonlocal counter, dollar
        token = match.group(0)
        if token == "?":
            counter += 1
            return f"${counter}"
        if token.startswith("$"):
            dollar = True
        return token

    out = _QMARK_SCAN.sub(repl, sql)
    return sql if dollar else out
