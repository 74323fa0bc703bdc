"""Helpers shared by the in-process and SQLite backends."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from stanchion.eventsourcing._backend import Row

__all__ = ["Signal", "ordered_subscribe"]


class Signal:
    """Wakes every waiting subscriber of one store (in-process appends)."""

    def __init__(self) -> None:
        self._events: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()

    def new(self) -> asyncio.Event:
        """A fresh event, set by the next :meth:`fire`."""
        event = asyncio.Event()
        self._events.add(event)
        return event

    def fire(self) -> None:
        """Wake all waiters."""
        for event in list(self._events):
            event.set()


async def ordered_subscribe(
    read_all: Callable[[int, int, Sequence[str] | None], Awaitable[list[Row]]],
    wake: asyncio.Event,
    from_position: int,
    types: Sequence[str] | None,
    batch: int,
    idle: float,
) -> AsyncIterator[list[Row]]:
    """Catch-up then live over a log whose positions appear in commit order.

    Valid when a position becomes visible only after every smaller one did
    (memory: one writer at a time; SQLite: the write lock is held from
    ``BEGIN IMMEDIATE`` to the commit), so "position >= next" never skips.
    ``wake`` is set on local appends; ``idle`` bounds the wait for appends
    made by other processes.
    """
    wanted = frozenset(types) if types is not None else None
    next_position = max(from_position, 1)
    while True:
        wake.clear()
        rows = await read_all(next_position, batch, None)
        if rows:
            next_position = rows[-1][2] + 1
            if wanted is not None:
                rows = [r for r in rows if r[4] in wanted]
            if rows:
                yield rows
            if len(rows) >= batch:
                continue
            # fewer than a batch: we reached the head; look again only when woken
            if not wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), idle)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), idle)
