"""redis:// -- Redis Streams with consumer groups and a reclaim loop.

A topic is a stream ``<prefix><topic>`` (default prefix ``stanchion:``); a
group is a consumer group created at id 0 (it sees the stream's history). A
member reads new entries with ``XREADGROUP ... >``; every ``ack_timeout / 2``
it also runs ``XAUTOCLAIM`` with ``min-idle = ack_timeout`` so the entries of
a crashed member are taken over (Redis alone leaves them pending forever).
Live members reset the idle time of what they hold (``XCLAIM ... JUSTID``),
so only a dead member's entries are reclaimed: the bound is ``ack_timeout``
plus one reclaim period. The delivery count is Redis's own (``XPENDING``).

Publishes are pipelined (one round trip per batch); ``publish`` returns when
Redis answered every ``XADD``. Redis acknowledges writes from memory: without
AOF (``appendonly yes``) or RDB snapshots a restart loses every message, so
connecting to such a server emits a :class:`RuntimeWarning` and a log line.

Query parameters: ``prefix``, ``maxlen`` (approximate stream cap, default
none), ``block`` (XREADGROUP block in ms, default: the runtime's poll).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stanchion.errors import BackendUnavailable, PublishError
from stanchion.observability import get_logger
from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import Message, TopicPattern
from stanchion.pubsub.backends._batch import GroupCommit
from stanchion.urls import ParsedURL

__all__ = ["RedisDriver"]

CAPABILITIES: Final = Capabilities(
    wildcards=False,
    redelivery_bound="ack_timeout + ack_timeout/2 (XAUTOCLAIM reclaim loop)",
)

_log = get_logger("stanchion.pubsub.redis")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict[str, str])
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


async def persistence(client: Any) -> bool | None:
    """True if the server persists (AOF or RDB save points), None if unknown."""
    try:
        cfg = await client.config_get("appendonly")
        save = await client.config_get("save")
        aof = str(_s(cfg.get(b"appendonly", cfg.get("appendonly", "")))).lower() == "yes"
        rdb = bool(str(_s(save.get(b"save", save.get("save", "")))).strip())
        return aof or rdb
    except ResponseError:
        try:
            info = await client.info("persistence")
            return bool(int(info.get("aof_enabled", 0)))
        except RedisError:
            return None


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisDriver:
    """Redis Streams driver (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(self, client: Any, prefix: str, maxlen: int | None, url: str) -> None:
        self._r = client
        self._p = prefix
        self._maxlen = maxlen
        self._url = url
        self._groups: set[tuple[str, str]] = set()
        self._commit = GroupCommit(self._xadd, 2000)

    @classmethod
    async def open(cls, url: ParsedURL) -> RedisDriver:
        """Connect, check persistence, warn if the server does not persist."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url.without_query(), socket_connect_timeout=5, max_connections=64, timeout=30
        )
        client = aioredis.Redis(connection_pool=pool)
        try:
            await client.ping()
        except _UNAVAILABLE as exc:
            await client.aclose()
            raise BackendUnavailable(
                f"cannot reach Redis at {url.masked()}: {exc}", url=url.masked()
            ) from exc
        if await persistence(client) is False:
            text = (
                f"Redis at {url.masked()} does not persist (no AOF, no RDB save points): "
                "messages may be lost on a restart; set appendonly yes"
            )
            _log.warning("pubsub.redis_not_persistent", url=url.masked())
            warnings.warn(text, RuntimeWarning, stacklevel=3)
        maxlen = url.get_int("maxlen", 0) or None
        return cls(client, url.query.get("prefix", "stanchion:"), maxlen, url.masked())

    def key(self, topic: str) -> str:
        """The stream key of ``topic``."""
        return self._p + topic

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """XADD the messages, pipelined with concurrent publishers' (one round trip)."""
        await self._commit.submit(messages)

    async def _xadd(self, messages: Sequence[OutboundMessage]) -> None:
        try:
            if len(messages) == 1:
                m = messages[0]
                await self._r.xadd(
                    self.key(m.topic), self._fields(m), maxlen=self._maxlen, approximate=True
                )
                return
            async with self._r.pipeline(transaction=False) as pipe:
                for m in messages:
                    pipe.xadd(
                        self.key(m.topic), self._fields(m), maxlen=self._maxlen, approximate=True
                    )
                await pipe.execute()
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}", url=self._url) from exc
        except RedisError as exc:
            raise PublishError(f"Redis refused the messages: {exc}") from exc

    @staticmethod
    def _fields(m: OutboundMessage) -> dict[Any, Any]:
        fields: dict[Any, Any] = {"i": m.id, "h": _enc.encode(m.headers), "d": m.data, "t": m.ts}
        if m.key is not None:
            fields["k"] = m.key
        return fields

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """XGROUP CREATE at id 0 (MKSTREAM), ignoring BUSYGROUP."""
        k = (pattern.pattern, group)
        if k in self._groups:
            return
        try:
            await self._r.xgroup_create(self.key(pattern.pattern), group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise PublishError(f"cannot create group {group!r}: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}", url=self._url) from exc
        self._groups.add(k)

    async def consumer(self, spec: ConsumerSpec) -> _RedisConsumer:
        """A member of ``spec.group``."""
        await self.declare(spec.pattern, spec.group)
        return _RedisConsumer(self, spec)

    async def close(self) -> None:
        """Disconnect."""
        with contextlib.suppress(Exception):
            await self._r.aclose()


class _RedisConsumer:
    def __init__(self, driver: RedisDriver, spec: ConsumerSpec) -> None:
        self._d = driver
        self._r = driver._r
        self._s = spec
        self._key = driver.key(spec.pattern.pattern)
        self._idle_ms = max(1, int(spec.ack_timeout * 1000))
        self._next_reclaim = 0.0

    def _delivery(self, entry_id: bytes, fields: dict[bytes, bytes], count: int) -> Delivery:
        key = fields.get(b"k")
        msg = Message(
            fields.get(b"i", entry_id).decode(),
            self._s.pattern.pattern,
            key.decode() if key is not None else None,
            fields.get(b"d", b""),
            _dec.decode(fields[b"h"]) if b"h" in fields else {},
            count,
            _ts(int(fields.get(b"t", b"0"))),
        )
        return Delivery(msg, entry_id)

    async def _reclaim(self, n: int) -> list[Delivery]:
        res = await self._r.xautoclaim(
            self._key, self._s.group, self._s.consumer, self._idle_ms, "0-0", count=n
        )
        claimed = res[1]
        deleted = res[2] if len(res) > 2 else []
        if deleted:
            await self._r.xack(self._key, self._s.group, *deleted)
        out: list[Delivery] = []
        for entry_id, fields in claimed:
            if not fields:
                await self._r.xack(self._key, self._s.group, entry_id)
                continue
            info = await self._r.xpending_range(
                self._key, self._s.group, min=entry_id, max=entry_id, count=1
            )
            count = int(info[0]["times_delivered"]) if info else 2
            out.append(self._delivery(entry_id, fields, count))
        if out:
            _log.info("pubsub.redis_reclaimed", stream=self._key, group=self._s.group, n=len(out))
        return out

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        import asyncio

        try:
            now = asyncio.get_running_loop().time()
            if now >= self._next_reclaim:
                self._next_reclaim = now + self._s.ack_timeout / 2
                out = await self._reclaim(max_messages)
                if out:
                    return out
            res = await self._r.xreadgroup(
                self._s.group,
                self._s.consumer,
                {self._key: ">"},
                count=max_messages,
                block=max(1, int(wait * 1000)),
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._d._groups.discard((self._s.pattern.pattern, self._s.group))
                await self._d.declare(self._s.pattern, self._s.group)
                return []
            raise
        except _UNAVAILABLE as exc:
            raise BackendUnavailable(f"Redis unavailable: {exc}", url=self._d._url) from exc
        if not res:
            return []
        return [self._delivery(eid, fields, 1) for eid, fields in res[0][1] if fields]

    async def ack(self, tokens: Sequence[object]) -> None:
        await self._r.xack(self._key, self._s.group, *tokens)

    async def extend(self, tokens: Sequence[object]) -> None:
        await self._r.xclaim(
            self._key, self._s.group, self._s.consumer, 0, list(tokens), justid=True
        )

    async def release(self, tokens: Sequence[object]) -> None:
        # Mark them idle for longer than ack_timeout: the next reclaim takes them.
        await self._r.xclaim(
            self._key,
            self._s.group,
            self._s.consumer,
            0,
            list(tokens),
            idle=self._idle_ms * 10 + 1000,
            justid=True,
        )

    async def lag(self) -> int | None:
        for g in await self._r.xinfo_groups(self._key):
            name = g.get("name")
            if _s(name) == self._s.group:
                lag = g.get("lag")
                return int(lag or 0) + int(g.get("pending") or 0)
        return None

    async def close(self) -> None:
        return None
