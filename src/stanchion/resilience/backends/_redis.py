"""Shared breaker state in Redis: one hash per breaker, compare-and-set in Lua."""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from stanchion.errors import BackendUnavailable
from stanchion.resilience._backend import Capabilities
from stanchion.urls import ParsedURL

__all__ = ["RedisStore"]

# KEYS[1] the breaker's hash; ARGV: expected version, blob, ttl in ms.
# Atomic in Redis: nobody can write between the version check and the write.
_CAS = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if cur ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', cur + 1, 'blob', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RedisStore:
    """``redis://host:port/db?prefix=app:&timeout=0.25``.

    Keys are ``<prefix>breaker:<name>``. ``timeout`` (seconds, default 0.25)
    bounds every exchange, so a stalled Redis costs the background sync at
    most that long and never the calls themselves.
    """

    capabilities = Capabilities(cross_process=True, expires=True)

    def __init__(self, client: Any, prefix: str = "", url: str | None = None) -> None:
        self._r = client
        self._prefix = prefix
        self._url = url
        self._cas = client.register_script(_CAS)

    @classmethod
    def from_url(cls, url: ParsedURL) -> RedisStore:
        """Connect lazily to the Redis at ``url``."""
        timeout = url.get_float("timeout", 0.25)
        client = redis.Redis.from_url(
            url.without_query(),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        return cls(client, url.query.get("prefix", ""), url.masked())

    def _key(self, name: str) -> str:
        return f"{self._prefix}breaker:{name}"

    def load(self, name: str) -> tuple[int, bytes] | None:
        """The (version, blob) stored for ``name``."""
        try:
            v, blob = self._r.hmget(self._key(name), "v", "blob")
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis: {exc}", url=self._url) from exc
        if v is None or blob is None:
            return None
        return int(v), bytes(blob)

    def compare_and_set(self, name: str, version: int, blob: bytes, ttl: float) -> bool:
        """Write ``blob`` if the version is still ``version`` (a Lua script)."""
        try:
            done = self._cas(keys=[self._key(name)], args=[version, blob, max(1, int(ttl * 1000))])
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"redis: {exc}", url=self._url) from exc
        return bool(done)

    def close(self) -> None:
        """Close the connection pool."""
        try:
            self._r.close()
        except (redis.RedisError, OSError):
            pass
