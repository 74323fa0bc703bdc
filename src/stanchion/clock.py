"""Clocks: every component that reasons about time takes one.

A clock is any zero-argument callable returning monotonic seconds as a float
(``time.monotonic`` is one). Pure cores never read time themselves; facades
call the injected clock and pass ``now`` in. Tests use :class:`ManualClock`
and move time by hand, so no test sleeps to see a timeout.

.. versionadded:: 0.1
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, final, runtime_checkable

__all__ = ["Clock", "ManualClock", "MonotonicClock", "monotonic"]


@runtime_checkable
class Clock(Protocol):
    """A source of monotonic time in seconds."""

    def __call__(self) -> float:
        """Return the current time in seconds (arbitrary epoch, never goes back)."""
        ...


monotonic: Clock = time.monotonic
"""The default clock: :func:`time.monotonic`."""


@final
class MonotonicClock:
    """The system monotonic clock as an object (same as :data:`monotonic`)."""

    __slots__ = ()

    def __call__(self) -> float:
        """Return :func:`time.monotonic`."""
        return time.monotonic()


@final
class ManualClock:
    """A clock that moves only when told to, for deterministic tests.

    Args:
        start: the initial reading in seconds.

    Example::

        clock = ManualClock()
        breaker = CircuitBreaker("db", clock=clock)
        clock.advance(60.0)
    """

    __slots__ = ("_lock", "_now")

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Return the current manual reading."""
        return self._now

    @property
    def now(self) -> float:
        """The current reading."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward by ``seconds`` (>= 0) and return the new reading."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back; advance by >= 0 seconds")
        with self._lock:
            self._now += seconds
            return self._now

    def jump(self, to: float) -> float:
        """Set the clock to ``to``, which must not be earlier than now."""
        with self._lock:
            if to < self._now:
                raise ValueError(f"cannot jump back from {self._now} to {to}")
            self._now = float(to)
            return self._now
