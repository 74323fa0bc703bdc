"""memory:// -- the whole broker in this process (tests, single-process apps).

Brokers connected to the same ``memory://name`` in one process share one
log (a :class:`GroupLog`), so a publisher and a subscriber can be separate
:class:`Broker` objects. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import GroupLog, Message, TopicPattern
from stanchion.urls import ParsedURL

__all__ = ["MemoryDriver"]

CAPABILITIES: Final = Capabilities(
    durable=False,
    multi_process=False,
    wildcards=True,
    redelivery_bound="ack_timeout (leases renewed by live consumers)",
)


class _Hub:
    def __init__(self, max_retained: int) -> None:
        self.log = GroupLog(max_retained)
        self.waiters: set[asyncio.Future[None]] = set()

    def wake(self) -> None:
        for w in self.waiters:
            if not w.done():
                w.set_result(None)
        self.waiters.clear()


# Brokers on the same memory://name share a hub while any of them is open.
_hubs: weakref.WeakValueDictionary[str, _Hub] = weakref.WeakValueDictionary()


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


class MemoryDriver:
    """In-process driver (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(self, hub: _Hub, prefix: str) -> None:
        self._hub = hub
        self._prefix = prefix
        self._clock = asyncio.get_running_loop().time

    @classmethod
    async def open(cls, url: ParsedURL) -> MemoryDriver:
        """Attach to the hub named by ``memory://name`` (a new one if none is open)."""
        name = (url.host or "") + url.path + "|" + url.query.get("prefix", "")
        hub = _hubs.get(name)
        if hub is None:
            hub = _Hub(url.get_int("max_retained", 100_000))
            _hubs[name] = hub
        return cls(hub, url.query.get("prefix", ""))

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Append to the log and wake waiting consumers."""
        for m in messages:
            self._hub.log.append(m.topic, m.id, m.key, m.headers, m.data, m.ts)
        self._hub.wake()

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Create the group's cursor at the oldest retained message."""
        self._hub.log.ensure_group(pattern.pattern, group)

    async def consumer(self, spec: ConsumerSpec) -> _MemoryConsumer:
        """A member of ``spec.group``."""
        self._hub.log.ensure_group(spec.pattern.pattern, spec.group)
        return _MemoryConsumer(self, spec)

    async def close(self) -> None:
        """Detach (the hub lives while another broker uses it)."""


class _MemoryConsumer:
    def __init__(self, driver: MemoryDriver, spec: ConsumerSpec) -> None:
        self._d = driver
        self._hub = driver._hub
        self._s = spec
        self._pat = spec.pattern.pattern

    def _claim(self, n: int) -> list[Delivery]:
        now = self._d._clock()
        claims = self._hub.log.claim(
            self._pat, self._s.group, self._s.consumer, n, now, self._s.ack_timeout
        )
        return [
            Delivery(
                Message(
                    c.message.id,
                    c.message.topic,
                    c.message.key,
                    c.message.data,
                    c.message.headers,
                    c.deliveries,
                    _ts(c.message.ts),
                ),
                c.message.seq,
            )
            for c in claims
        ]

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        out = self._claim(max_messages)
        if out:
            return out
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hub.waiters.add(fut)
        # Wake up in time for a lease expiring (a crashed consumer's messages).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, wait)
        self._hub.waiters.discard(fut)
        return self._claim(max_messages)

    async def ack(self, tokens: Sequence[object]) -> None:
        self._hub.log.ack(self._pat, self._s.group, tokens)  # type: ignore[arg-type]

    async def extend(self, tokens: Sequence[object]) -> None:
        until = self._d._clock() + self._s.ack_timeout
        self._hub.log.extend(self._pat, self._s.group, self._s.consumer, tokens, until)  # type: ignore[arg-type]

    async def release(self, tokens: Sequence[object]) -> None:
        self._hub.log.release(self._pat, self._s.group, self._s.consumer, tokens, self._d._clock())  # type: ignore[arg-type]
        self._hub.wake()

    async def lag(self) -> int | None:
        return self._hub.log.lag(self._pat, self._s.group)

    async def close(self) -> None:
        return None
