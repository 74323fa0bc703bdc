"""Read-model stores: the contract every backend implements.

A read model holds views and, beside them, each projection's checkpoint and
parked list, so that one transaction covers a view change and its checkpoint.
Backends are thin: they open transactions, run statements, compare-and-set
the checkpoint and swap a shadow view in; every decision (what to replay,
when to stop, who may write) is made by the runner and ``_core``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Protocol, runtime_checkable

from stanchion.cqrs._core import NO_POSITION, Checkpoint, Conflict, validate_name
from stanchion.errors import ConfigError, StaleFencingToken
from stanchion.urls import BackendRegistry, ParsedURL, default_registry

__all__ = [
    "Capabilities",
    "CheckpointMoved",
    "ParkedEvent",
    "ReadModel",
    "RecordedEventLike",
    "SQLTransaction",
    "Transaction",
    "View",
    "raise_conflict",
]


@runtime_checkable
class RecordedEventLike(Protocol):
    """What the runner needs of an event from the store (``RecordedEvent``)."""

    @property
    def position(self) -> int: ...
    @property
    def id(self) -> Any: ...
    @property
    def type(self) -> str: ...
    @property
    def data(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a read-model backend supports.

    Attributes:
        sql: handlers run SQL through ``tx.execute`` / ``tx.fetch*``.
        key_value: handlers run Redis-style key commands.
        shadow_rebuild: rebuilds go into a shadow view swapped in atomically.
        read_in_tx: reads inside a transaction see its own pending writes.
    """

    sql: bool
    key_value: bool
    shadow_rebuild: bool = True
    read_in_tx: bool = True


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event a projection could not apply and set aside (``park_failures``).

    Attributes:
        projection: the projection name.
        position: the event's global position.
        event_id: its id (as text).
        event_type: its type name.
        error: the handler's exception, ``Type: message``.
        parked_at: wall-clock seconds.
    """

    projection: str
    position: int
    event_id: str
    event_type: str
    error: str
    parked_at: float


class CheckpointMoved(Exception):
    """Internal: the checkpoint changed under the runner (resync)."""

    def __init__(self, name: str, stored: int) -> None:
        super().__init__(f"checkpoint of {name!r} moved to {stored}")
        self.stored = stored


def raise_conflict(
    name: str, stored_position: int, stored_token: int | None, expected: int, token: int | None
) -> None:
    """Turn a failed checkpoint compare-and-set into the right exception."""
    from stanchion.cqrs._core import classify_conflict

    verdict = classify_conflict(stored_position, stored_token, expected, token)
    if verdict is Conflict.STALE:
        raise StaleFencingToken(f"projection:{name}", token or 0, stored_token)
    raise CheckpointMoved(name, stored_position)


class Transaction:
    """One read-model transaction: a view change plus the checkpoint write.

    Attributes:
        event: the ``RecordedEvent`` whose handler is running (its stream,
            position, id and metadata), set by the runner.
        name: the projection name.
        shadow: True inside a rebuild (writes go to the shadow view).
    """

    event: Any = None

    def __init__(self, name: str, shadow: bool) -> None:
        self.name = name
        self.shadow = shadow

    async def commit(self, expected: int, position: int, token: int | None) -> None:
        """Write the checkpoint (compare-and-set on ``expected``) and commit.

        Raises:
            StaleFencingToken: a newer leader wrote the checkpoint.
            CheckpointMoved: the checkpoint is not at ``expected``.
        """
        raise NotImplementedError

    async def rollback(self) -> None:
        """Discard every change of this transaction."""
        raise NotImplementedError

    async def checkpoint_position(self) -> int:
        """The checkpoint position as this transaction sees it."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Send writes still buffered (the runner calls it before committing)."""

    async def park(self, event: Any, error: str) -> None:
        """Record ``event`` in the parked list (committed with the checkpoint)."""
        raise NotImplementedError


class SQLTransaction(Transaction):
    """A transaction on a SQL read model; ``?`` placeholders work on every engine."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; returns the number of rows it changed (-1 if unknown)."""
        raise NotImplementedError

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of arguments."""
        raise NotImplementedError

    async def write(self, sql: str, *args: Any) -> None:
        """Run a statement whose result is not needed; it may be deferred and pipelined.

        On PostgreSQL consecutive writes are sent together (one round trip
        for many statements) before the next read, ``execute`` or the
        commit, so a handler still reads its own writes. An error of a
        deferred write is reported for the event whose transaction flushed
        it (the runner replays a failed batch event by event, so it lands
        on the right event). On SQLite it is ``execute``.
        """
        await self.execute(sql, *args)

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        """All rows of a query (rows index by position and by column name)."""
        raise NotImplementedError

    async def fetchone(self, sql: str, *args: Any) -> Any:
        """The first row of a query, or None."""
        raise NotImplementedError

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        raise NotImplementedError


class View:
    """A projection's view as seen by queries: waits for a position.

    Pass it as ``QueryBus.register(..., view=read_model.view("orders"))`` when
    the runner lives in another process.
    """

    def __init__(self, read_model: ReadModel, name: str) -> None:
        self.read_model = read_model
        self.name = name

    async def wait_for(self, position: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the view's checkpoint is at or past ``position``."""
        await self.read_model.wait_for(self.name, position, timeout)


class ReadModel:
    """A read-model store (SQLite, PostgreSQL or Redis), chosen by URL.

    ``rm = await ReadModel.connect("sqlite:///views.db")`` opens it. The
    runner writes views and checkpoints through transactions; queries read
    with :meth:`fetchall` / :meth:`fetchone` / :meth:`fetchval` (SQL) or the
    Redis helpers, and :meth:`wait_for` gives read-your-writes when the
    runner is in another process.

    .. versionadded:: 0.1
    """

    capabilities: ClassVar[Capabilities]
    poll_interval: float = 0.02

    def __init__(self, url: ParsedURL) -> None:
        self.parsed = url
        self.url = url.masked()

    @classmethod
    async def connect(cls, url: str, *, registry: BackendRegistry | None = None) -> ReadModel:
        """Open the read model at ``url``.

        Raises:
            ConfigError: unknown scheme or missing driver extra.
            BackendUnavailable: the engine cannot be reached.
        """
        target, parsed = (registry or default_registry).load("readmodel", url)
        if not (isinstance(target, type) and issubclass(target, ReadModel)):
            raise ConfigError(f"readmodel backend for {parsed.scheme!r} is not a ReadModel")
        model = target(parsed)
        await model.open()
        return model

    async def open(self) -> None:
        """Connect and create the checkpoint tables (idempotent)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Close every connection."""
        raise NotImplementedError

    async def __aenter__(self) -> ReadModel:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- runner side ----------------------------------------------------------

    async def begin(self, name: str, *, shadow: bool = False) -> Transaction:
        """Start a transaction on ``name``'s view (or its shadow, on a rebuild)."""
        raise NotImplementedError

    async def checkpoint(self, name: str, *, shadow: bool = False) -> Checkpoint:
        """The stored checkpoint of ``name`` (0 when none: positions start at 1)."""
        raise NotImplementedError

    async def checkpoints(self) -> list[Checkpoint]:
        """Every projection's checkpoint in this read model, by name."""
        raise NotImplementedError

    async def parked(self, name: str) -> list[ParkedEvent]:
        """The parked list of ``name``, by position."""
        raise NotImplementedError

    async def reset_shadow(self, name: str) -> None:
        """Drop any leftover shadow view of ``name`` and start an empty one."""
        raise NotImplementedError

    async def swap(self, name: str, position: int) -> bool:
        """Atomically replace ``name``'s view by its shadow, checkpoint ``position``.

        Returns False (changing nothing) when the live checkpoint is already
        past ``position``: catch the shadow up and try again.
        """
        raise NotImplementedError

    async def drop_shadow(self, name: str) -> None:
        """Remove the shadow view of ``name`` (after a failed rebuild)."""
        raise NotImplementedError

    # -- query side -----------------------------------------------------------

    async def wait_for(self, name: str, position: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until ``name``'s checkpoint reaches ``position``.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        validate_name(name)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            cp = await self.checkpoint(name)
            if cp.position >= position:
                return
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(
                    f"view {name!r} is at position {cp.position}, "
                    f"did not reach {position} within {timeout}s"
                )
            delay = self.poll_interval
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - loop.time()))
            await asyncio.sleep(delay)

    async def fetchall(self, sql: str, *args: Any) -> list[Any]:
        """All rows of a read query (SQL read models)."""
        raise ConfigError(f"{type(self).__name__} is not a SQL read model")

    async def fetchone(self, sql: str, *args: Any) -> Any:
        """The first row of a read query, or None (SQL read models)."""
        raise ConfigError(f"{type(self).__name__} is not a SQL read model")

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None (SQL read models)."""
        raise ConfigError(f"{type(self).__name__} is not a SQL read model")

    def view(self, name: str) -> View:
        """A waitable handle on ``name``'s view (for ``QueryBus.register(view=)``)."""
        return View(self, validate_name(name))


def now() -> float:
    """Wall-clock seconds, for ``updated_at`` / ``parked_at`` columns."""
    return time.time()


def initial(name: str) -> Checkpoint:
    """The checkpoint of a projection that has not started."""
    return Checkpoint(name, NO_POSITION)
