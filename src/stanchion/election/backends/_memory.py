"""``memory://name``: leases in this process (tests, single-process apps).

Electors built from the same ``memory://name`` URL in one process share one
group table; different names never interfere.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stanchion.election._backend import Capabilities, Grant, Holder
from stanchion.errors import StaleFencingToken
from stanchion.urls import ParsedURL

__all__ = ["MemoryFence", "MemoryLeases"]

T = TypeVar("T")


@dataclass
class _Slot:
    holder: str | None = None
    token: int = 0
    expires: float = 0.0


@dataclass
class _Space:
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: dict[str, _Slot] = field(default_factory=dict)
    fences: dict[str, int] = field(default_factory=dict)
    version: int = 0


# The one piece of module state: named in-process spaces, like SQLite's
# shared-cache memory databases. A name is private to whoever picks it.
_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


def _space(parsed: ParsedURL) -> _Space:
    name = (parsed.host or "") + parsed.path + parsed.query.get("prefix", "")
    with _SPACES_LOCK:
        return _SPACES.setdefault(name, _Space())


class MemoryLeases:
    """In-process leases; time is :func:`time.monotonic`."""

    capabilities = Capabilities(detects_death=False, multi_host=False, persistent_tokens=True)

    def __init__(self, space: _Space) -> None:
        self._space = space

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> MemoryLeases:
        """Build from a parsed ``memory://name`` URL."""
        return cls(_space(parsed))

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease if free or expired."""
        now = time.monotonic()
        with self._space.lock:
            slot = self._space.slots.setdefault(group, _Slot())
            if slot.holder is not None and slot.expires > now:
                return Holder(slot.holder, slot.token, slot.expires - now)
            slot.holder, slot.token, slot.expires = identity, slot.token + 1, now + ttl
            self._space.version += 1
            return Grant(slot.token)

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Extend the lease if term ``token`` still holds it."""
        now = time.monotonic()
        with self._space.lock:
            slot = self._space.slots.get(group)
            if slot is None or slot.token != token or slot.holder != identity:
                return False
            slot.expires = now + ttl
            return True

    async def release(self, group: str, identity: str, token: int) -> None:
        """Free the lease if term ``token`` still holds it."""
        with self._space.lock:
            slot = self._space.slots.get(group)
            if slot is not None and slot.token == token and slot.holder == identity:
                slot.holder, slot.expires = None, 0.0
                self._space.version += 1

    async def observe(self, group: str) -> Holder | None:
        """The current holder, if any."""
        now = time.monotonic()
        with self._space.lock:
            slot = self._space.slots.get(group)
            if slot is None or slot.holder is None or slot.expires <= now:
                return None
            return Holder(slot.holder, slot.token, slot.expires - now)

    async def wait(self, group: str, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early when the group changes hands."""
        end = time.monotonic() + seconds
        seen = self._space.version
        while True:
            if self._space.version != seen:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.01))

    async def aclose(self) -> None:
        """Nothing to release."""


class MemoryFence:
    """In-process fenced resources: ``fn()`` runs only with a current token."""

    def __init__(self, space: _Space) -> None:
        self._space = space
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> MemoryFence:
        """Build from a parsed ``memory://name`` URL."""
        return cls(_space(parsed))

    async def write(self, resource: str, token: int, fn: Callable[[Any], Awaitable[T] | T]) -> T:
        """Run ``fn(None)`` if ``token`` is not below the highest seen; record it."""
        async with self._lock:
            with self._space.lock:
                current = self._space.fences.get(resource)
                if current is not None and token < current:
                    raise StaleFencingToken(resource, token, current)
                self._space.fences[resource] = token
            result = fn(None)
            if inspect.isawaitable(result):
                return await result
            return result

    async def current(self, resource: str) -> int | None:
        """The highest token accepted for ``resource``."""
        with self._space.lock:
            return self._space.fences.get(resource)

    async def aclose(self) -> None:
        """Nothing to release."""
