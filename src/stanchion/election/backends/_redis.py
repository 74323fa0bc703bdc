"""``redis://…``: leases as Redis keys with a TTL, granted by Lua scripts.

Keys (``?prefix=`` in front): ``stanchion:election:<group>`` is a hash
``{holder, token}`` whose PEXPIRE is the lease; ``…:<group>:term`` keeps the
last token. One script checks the lease, computes the next token and grants
it, atomically. Releasing publishes on ``…:<group>:released`` so waiting
candidates try again at once instead of at their next poll.

Tokens never go backwards, even when Redis loses its data (no persistence
and a restart, a flush, a failover to a replica that lagged):

* the token is ``max(last token + 1, Redis TIME in microseconds)``, so a
  Redis that comes back empty still issues tokens above every earlier one
  (Redis' clock does not run backwards across a restart);
* a Redis that lost the term key while up for less than one ``ttl`` may
  have lost a lease that a leader still trusts; the script then refuses
  to elect (the candidate sees the lease as busy) until Redis has been up
  for ``ttl`` seconds, by which time that leader's own deadline has passed.
  This is what keeps a restarted Redis from producing two leaders. (Redis
  reports its uptime in whole seconds, so the wait is ``ceil(ttl) + 1`` s.)

All candidates of a group must use the same ``ttl``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from stanchion.election._backend import Capabilities, Grant, Holder
from stanchion.errors import BackendUnavailable, StaleFencingToken
from stanchion.observability import get_logger
from stanchion.urls import ParsedURL

__all__ = ["RedisFence", "RedisLeases"]

T = TypeVar("T")

_log = get_logger("stanchion.election.redis")

# KEYS: lease, term. ARGV: identity, ttl_ms, allow_fresh ("1" once Redis has been up >= ttl).
# Returns {0, holder, token, pttl} when the lease is held, {-1} when the term key is
# missing and allow_fresh is not set, else {1, new token}.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local v = redis.call('HMGET', KEYS[1], 'holder', 'token')
  return {0, v[1] or '', v[2] or '0', redis.call('PTTL', KEYS[1])}
end
local last = redis.call('GET', KEYS[2])
if not last and ARGV[3] ~= '1' then return {-1} end
local t = redis.call('TIME')
local token = tonumber(t[1]) * 1000000 + tonumber(t[2])
if last and tonumber(last) + 1 > token then token = tonumber(last) + 1 end
local s = string.format('%.0f', token)
redis.call('SET', KEYS[2], s)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', s)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, s}
"""

# KEYS: lease. ARGV: token, identity, ttl_ms.
_RENEW = """
local v = redis.call('HMGET', KEYS[1], 'token', 'holder')
if v[1] == ARGV[1] and v[2] == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: token, identity, channel. Wakes the waiting candidates up.
_RELEASE = """
local v = redis.call('HMGET', KEYS[1], 'token', 'holder')
if v[1] == ARGV[1] and v[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[3], 'released')
  return 1
end
return 0
"""


def _client(parsed: ParsedURL, timeout: float) -> Any:
    return aioredis.Redis.from_url(
        parsed.without_query(),
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry_on_timeout=False,
    )


class RedisLeases:
    """Leases in Redis with clock-derived, never-reissued tokens."""

    capabilities = Capabilities(detects_death=False, multi_host=True, persistent_tokens=False)

    def __init__(self, client: Any, *, masked: str, prefix: str = "") -> None:
        self._r = client
        self._masked = masked
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._pubsub: Any = None
        self._channels: set[str] = set()

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> RedisLeases:
        """Build from a parsed ``redis://`` URL."""
        return cls(
            _client(parsed, connect_timeout),
            masked=parsed.masked(),
            prefix=parsed.query.get("prefix", ""),
        )

    def _key(self, group: str) -> str:
        return f"{self._prefix}stanchion:election:{group}"

    async def _do(self, coro: Awaitable[T]) -> T:
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {self._masked}: {exc}") from exc

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease if free (see the module notes on tokens and restarts)."""
        key = self._key(group)
        keys = [key, key + ":term"]
        ttl_ms = max(math.ceil(ttl * 1000), 1)
        got = await self._do(self._acquire(keys=keys, args=[identity, ttl_ms, "0"]))
        if int(got[0]) == -1:
            info = await self._do(self._r.info("server"))
            uptime = int(info.get("uptime_in_seconds", 0))
            # uptime_in_seconds subtracts two truncated wall-clock seconds: it may read
            # one second more than has passed, so demand one second more.
            if uptime < math.ceil(ttl) + 1:
                _log.warning(
                    "election.redis_state_lost",
                    group=group,
                    uptime=uptime,
                    detail="no term record and Redis restarted less than ttl ago: a lease "
                    "may have been lost; electing nobody until ttl has passed",
                )
                return None
            got = await self._do(self._acquire(keys=keys, args=[identity, ttl_ms, "1"]))
        if int(got[0]) == 1:
            return Grant(int(got[1]))
        if int(got[0]) == 0 and int(got[3]) > 0:
            return Holder(got[1].decode(), int(got[2]), int(got[3]) / 1000)
        return None

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Extend the lease if term ``token`` still holds it."""
        ttl_ms = max(math.ceil(ttl * 1000), 1)
        done = await self._do(self._renew(keys=[self._key(group)], args=[token, identity, ttl_ms]))
        return int(done) == 1

    async def release(self, group: str, identity: str, token: int) -> None:
        """Delete the lease if term ``token`` still holds it (the term key stays)."""
        key = self._key(group)
        await self._do(self._release(keys=[key], args=[token, identity, key + ":released"]))

    async def observe(self, group: str) -> Holder | None:
        """The current holder, if any."""
        key = self._key(group)

        async def go() -> Any:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hmget(key, "holder", "token")
                pipe.pttl(key)
                return await pipe.execute()

        (holder, token), pttl = await self._do(go())
        if holder is None or token is None or int(pttl) <= 0:
            return None
        return Holder(holder.decode(), int(token), int(pttl) / 1000)

    async def wait(self, group: str, seconds: float) -> bool:
        """Wait up to ``seconds`` for the holder to resign (a PUBLISH from release)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        channel = self._key(group) + ":released"
        try:
            if self._pubsub is None:
                self._pubsub = self._r.pubsub()
            if channel not in self._channels:
                await self._pubsub.subscribe(channel)
                self._channels.add(channel)
            while (left := end - loop.time()) > 0:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if msg is not None and msg.get("type") == "message":
                    return True
        except (RedisError, OSError):
            # Redis unreachable: sleep out the interval; the next attempt reports it.
            await self._drop_pubsub()
            await asyncio.sleep(max(end - loop.time(), 0.0))
        return False

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._channels.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except (RedisError, OSError):
                pass

    async def aclose(self) -> None:
        """Close the subscription and the connection pool."""
        await self._drop_pubsub()
        try:
            await self._r.aclose()
        except (RedisError, OSError):
            pass


class RedisFence:
    """Fenced writes to Redis with ``WATCH``/``MULTI``/``EXEC``.

    ``fn(pipe)`` receives the pipeline in ``MULTI`` mode: queue commands on
    it (``pipe.set(...)``); they run in the same ``EXEC`` as the fence update,
    which Redis aborts if another writer moved the fence meanwhile (then the
    check runs again).
    """

    def __init__(self, client: Any, *, masked: str, prefix: str = "") -> None:
        self._r = client
        self._masked = masked
        self._prefix = prefix

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> RedisFence:
        """Build from a parsed ``redis://`` URL."""
        return cls(
            _client(parsed, connect_timeout),
            masked=parsed.masked(),
            prefix=parsed.query.get("prefix", ""),
        )

    def _key(self, resource: str) -> str:
        return f"{self._prefix}stanchion:fence:{resource}"

    async def write(self, resource: str, token: int, fn: Callable[[Any], Awaitable[T] | T]) -> T:
        """Check ``token``, then run the commands ``fn(pipe)`` queues with the fence update."""
        key = self._key(resource)
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        if raw is not None and token < int(raw):
                            raise StaleFencingToken(resource, token, int(raw))
                        pipe.multi()
                        pipe.set(key, token)
                        result = fn(pipe)
                        if inspect.isawaitable(result):
                            result = await result
                        await pipe.execute()
                        return result
                    except WatchError:
                        continue
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {self._masked}: {exc}") from exc

    async def current(self, resource: str) -> int | None:
        """The highest token accepted for ``resource``."""
        try:
            raw = await self._r.get(self._key(resource))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {self._masked}: {exc}") from exc
        return None if raw is None else int(raw)

    async def aclose(self) -> None:
        """Close the connection pool."""
        try:
            await self._r.aclose()
        except (RedisError, OSError):
            pass
