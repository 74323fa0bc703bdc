"""Redis read model: key-value views with the checkpoint in the same MULTI/EXEC.

A transaction queues the handlers' write commands; ``commit`` WATCHes the
projection's checkpoint hash, checks position and fencing token, and sends
the queued commands together with the new checkpoint in one MULTI/EXEC, so
view and checkpoint change atomically (and a concurrent checkpoint writer
makes EXEC fail instead of double-applying). Reads inside a handler
(``tx.get``, ``tx.hget`` …) see committed data only, not the batch's own
pending writes: write views with commands that do not need to read first
(``HSET``, ``HINCRBY``, ``SADD`` …).

Views live under ``<prefix><key>``, exactly the keys the handlers name
(``?prefix=`` of the URL, if any, in front), so any Redis client can read
them. Each transaction also adds the keys it wrote to the projection's key
registry (a set). A rebuild writes a shadow copy under
``<prefix>stanchion:cqrs:shadow:<name>:<key>``; the swap, in one
MULTI/EXEC WATCHing the live checkpoint, deletes the live keys of the
registry, RENAMEs every shadow key to its live name and moves the
checkpoint, so queries see the old view until EXEC and the new one after.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from stanchion.cqrs._backend import (
    Capabilities,
    ParkedEvent,
    ReadModel,
    Transaction,
    initial,
    now,
    raise_conflict,
)
from stanchion.cqrs._core import NO_POSITION, Checkpoint, shadow_name, validate_name
from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.urls import ParsedURL

try:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.exceptions import WatchError
except ImportError as exc:  # pragma: no cover - the registry names the extra
    raise ImportError("redis is needed: pip install 'stanchion[redis]'") from exc

__all__ = ["RedisReadModel", "RedisTransaction"]


P = ParamSpec("P")
R = TypeVar("R")


def _mapped(
    fn: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]:
    """Report a lost connection as BackendUnavailable."""

    async def wrapper(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable(f"Redis read model: {exc}", url=str(self.url)) from exc

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class RedisTransaction(Transaction):
    """Write commands queued for one MULTI/EXEC with the checkpoint.

    Every ``key`` is a view key; it is stored under the projection's prefix
    and generation.
    """

    def __init__(self, model: RedisReadModel, name: str, shadow: bool) -> None:
        super().__init__(name, shadow)
        self._model = model
        self.url = model.url
        key = shadow_name(name) if shadow else name
        self._cp = model._cp_key(key)
        self._parked = model._parked_key(key)
        self._registry = model._registry_key(key)
        self._ops: list[tuple[Any, ...]] = []
        self._written: set[str] = set()
        self._done = False

    def key(self, key: str) -> str:
        """The stored name of view key ``key`` (the shadow's during a rebuild)."""
        if self.shadow:
            return self._model._shadow_key(self.name, key)
        return f"{self._model.prefix}{key}"

    def _w(self, key: str) -> str:
        full = self.key(key)
        self._written.add(full)
        return full

    # -- writes (queued) -------------------------------------------------------

    async def execute(self, command: str, key: str, *args: Any) -> None:
        """Queue any write command whose first argument is a view key."""
        self._ops.append((command, self._w(key), *args))

    async def set(self, key: str, value: Any) -> None:
        """Queue ``SET key value``."""
        self._ops.append(("SET", self._w(key), value))

    async def delete(self, *keys: str) -> None:
        """Queue ``DEL key …``."""
        self._ops.append(("DEL", *(self._w(k) for k in keys)))

    async def hset(
        self,
        key: str,
        field: str | None = None,
        value: Any = None,
        *,
        mapping: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue ``HSET key field value`` (or the fields of ``mapping``)."""
        items: list[Any] = []
        if field is not None:
            items += [field, value]
        for k, v in (mapping or {}).items():
            items += [k, v]
        if not items:
            raise ConfigError("hset needs a field and value or a mapping")
        self._ops.append(("HSET", self._w(key), *items))

    async def hdel(self, key: str, *fields: str) -> None:
        """Queue ``HDEL key field …``."""
        self._ops.append(("HDEL", self._w(key), *fields))

    async def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        """Queue ``HINCRBY key field amount``."""
        self._ops.append(("HINCRBY", self._w(key), field, amount))

    async def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        """Queue ``HINCRBYFLOAT key field amount``."""
        self._ops.append(("HINCRBYFLOAT", self._w(key), field, amount))

    async def incrby(self, key: str, amount: int = 1) -> None:
        """Queue ``INCRBY key amount``."""
        self._ops.append(("INCRBY", self._w(key), amount))

    async def sadd(self, key: str, *members: Any) -> None:
        """Queue ``SADD key member …``."""
        self._ops.append(("SADD", self._w(key), *members))

    async def srem(self, key: str, *members: Any) -> None:
        """Queue ``SREM key member …``."""
        self._ops.append(("SREM", self._w(key), *members))

    async def zadd(self, key: str, mapping: Mapping[str, float]) -> None:
        """Queue ``ZADD key score member …``."""
        items: list[Any] = []
        for member, score in mapping.items():
            items += [score, member]
        self._ops.append(("ZADD", self._w(key), *items))

    async def zincrby(self, key: str, amount: float, member: str) -> None:
        """Queue ``ZINCRBY key amount member``."""
        self._ops.append(("ZINCRBY", self._w(key), amount, member))

    async def zrem(self, key: str, *members: Any) -> None:
        """Queue ``ZREM key member …``."""
        self._ops.append(("ZREM", self._w(key), *members))

    async def rpush(self, key: str, *values: Any) -> None:
        """Queue ``RPUSH key value …``."""
        self._ops.append(("RPUSH", self._w(key), *values))

    # -- reads (committed data) ------------------------------------------------

    @_mapped
    async def get(self, key: str) -> Any:
        """``GET`` of committed data (not this transaction's pending writes)."""
        return await self._model._client().get(self.key(key))

    @_mapped
    async def hget(self, key: str, field: str) -> Any:
        """``HGET`` of committed data."""
        return await self._model._client().hget(self.key(key), field)

    @_mapped
    async def hgetall(self, key: str) -> dict[str, str]:
        """``HGETALL`` of committed data."""
        return dict(await self._model._client().hgetall(self.key(key)))

    # -- transaction -----------------------------------------------------------

    @_mapped
    async def checkpoint_position(self) -> int:
        value = await self._model._client().hget(self._cp, "position")
        return NO_POSITION if value is None else int(value)

    async def park(self, event: Any, error: str) -> None:
        entry = {
            "position": int(event.position),
            "event_id": str(event.id),
            "event_type": str(event.type),
            "error": error,
            "parked_at": now(),
        }
        self._ops.append(("HSET", self._parked, str(int(event.position)), json.dumps(entry)))

    async def commit(self, expected: int, position: int, token: int | None) -> None:
        if self._done:
            raise ConfigError("transaction already finished")
        self._done = True
        client = self._model._client()
        try:
            async with client.pipeline(transaction=True) as pipe:
                await pipe.watch(self._cp)
                stored_pos, stored_token = await pipe.hmget(self._cp, ["position", "token"])
                spos = NO_POSITION if stored_pos is None else int(stored_pos)
                stok = None if stored_token in (None, "") else int(stored_token)
                if spos != expected or (token is not None and stok is not None and stok > token):
                    raise_conflict(self.name, spos, stok, expected, token)
                pipe.multi()
                for op in self._ops:
                    pipe.execute_command(*op)
                if self._written:
                    pipe.sadd(self._registry, *sorted(self._written))
                fields: dict[str, Any] = {"position": position, "updated_at": now()}
                if token is not None:
                    fields["token"] = token
                pipe.hset(self._cp, mapping=fields)
                await pipe.execute()
        except WatchError:
            value = await client.hmget(self._cp, ["position", "token"])
            raise_conflict(
                self.name,
                NO_POSITION if value[0] is None else int(value[0]),
                None if value[1] in (None, "") else int(value[1]),
                expected,
                token,
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"Redis read model: {exc}", url=self._model.url) from exc

    async def rollback(self) -> None:
        self._done = True
        self._ops.clear()


class RedisReadModel(ReadModel):
    """Key-value views in Redis; honours ``?prefix=`` on every key it writes."""

    capabilities: ClassVar[Capabilities] = Capabilities(sql=False, key_value=True, read_in_tx=False)

    def __init__(self, url: ParsedURL) -> None:
        super().__init__(url)
        self.prefix = url.query.get("prefix", "")
        self._url = url.without_query().replace("rediss://", "rediss://")
        if url.scheme == "rediss" and not self._url.startswith("rediss://"):
            self._url = "rediss://" + self._url.split("://", 1)[1]
        self._redis: Any = None
        self._known: set[str] = set()

    async def open(self) -> None:
        if self._redis is not None:
            return
        client = aioredis.from_url(self._url, decode_responses=True)
        try:
            await client.ping()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await client.aclose()
            raise BackendUnavailable(
                f"cannot connect to Redis read model {self.url}: {exc}", url=self.url
            ) from exc
        self._redis = client

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    def _client(self) -> Any:
        if self._redis is None:
            raise ConfigError("the read model is not open (use ReadModel.connect)")
        return self._redis

    def _cp_key(self, key: str) -> str:
        return f"{self.prefix}stanchion:cqrs:cp:{key}"

    def _parked_key(self, key: str) -> str:
        return f"{self.prefix}stanchion:cqrs:parked:{key}"

    def _index_key(self) -> str:
        return f"{self.prefix}stanchion:cqrs:projections"

    def _registry_key(self, key: str) -> str:
        return f"{self.prefix}stanchion:cqrs:keys:{key}"

    def _shadow_key(self, name: str, key: str) -> str:
        return f"{self.prefix}stanchion:cqrs:shadow:{name}:{key}"

    async def _unlink_registry(self, registry: str) -> None:
        client = self._client()
        batch: list[str] = []
        async for key in client.sscan_iter(registry, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
        await client.unlink(registry)

    # -- runner side -----------------------------------------------------------

    @_mapped
    async def begin(self, name: str, *, shadow: bool = False) -> RedisTransaction:
        validate_name(name)
        client = self._client()
        try:
            if shadow:
                if not await client.exists(self._cp_key(shadow_name(name))):
                    raise ConfigError(f"no rebuild of {name!r} in progress")
            elif name not in self._known:
                await client.sadd(self._index_key(), name)
                await client.hsetnx(self._cp_key(name), "position", NO_POSITION)
                self._known.add(name)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"Redis read model: {exc}", url=self.url) from exc
        return RedisTransaction(self, name, shadow)

    @_mapped
    async def checkpoint(self, name: str, *, shadow: bool = False) -> Checkpoint:
        client = self._client()
        key = shadow_name(name) if shadow else name
        raw = await client.hgetall(self._cp_key(key))
        if not raw:
            return initial(name)
        parked = await client.hlen(self._parked_key(key))
        token = raw.get("token")
        updated = raw.get("updated_at")
        return Checkpoint(
            name,
            int(raw.get("position", NO_POSITION)),
            None if token in (None, "") else int(token),
            None if updated is None else float(updated),
            int(parked),
        )

    @_mapped
    async def checkpoints(self) -> list[Checkpoint]:
        names = sorted(await self._client().smembers(self._index_key()))
        return [await self.checkpoint(n) for n in names]

    @_mapped
    async def parked(self, name: str) -> list[ParkedEvent]:
        raw = await self._client().hgetall(self._parked_key(name))
        entries = [json.loads(v) for v in raw.values()]
        entries.sort(key=lambda e: e["position"])
        return [
            ParkedEvent(
                name, e["position"], e["event_id"], e["event_type"], e["error"], e["parked_at"]
            )
            for e in entries
        ]

    @_mapped
    async def reset_shadow(self, name: str) -> None:
        validate_name(name)
        client = self._client()
        await client.hsetnx(self._cp_key(name), "position", NO_POSITION)
        await client.sadd(self._index_key(), name)
        await self.drop_shadow(name)
        await client.hset(self._cp_key(shadow_name(name)), mapping={"position": NO_POSITION})

    @_mapped
    async def drop_shadow(self, name: str) -> None:
        client = self._client()
        await self._unlink_registry(self._registry_key(shadow_name(name)))
        await client.delete(self._cp_key(shadow_name(name)), self._parked_key(shadow_name(name)))

    @_mapped
    async def swap(self, name: str, position: int) -> bool:
        client = self._client()
        shadow_cp = self._cp_key(shadow_name(name))
        if not await client.exists(shadow_cp):
            raise ConfigError(f"no rebuild of {name!r} in progress")
        shadow_registry = self._registry_key(shadow_name(name))
        live_registry = self._registry_key(name)
        shadow_parked = self._parked_key(shadow_name(name))
        has_parked = bool(await client.exists(shadow_parked))
        shadow_prefix = self._shadow_key(name, "")
        shadow_keys = sorted(await client.smembers(shadow_registry))
        existing: list[str] = []
        if shadow_keys:  # keys a shadow handler deleted again have nothing to move
            async with client.pipeline(transaction=False) as check:
                for k in shadow_keys:
                    check.exists(k)
                found = await check.execute()
            existing = [k for k, n in zip(shadow_keys, found) if n]
        live_cp = self._cp_key(name)
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(live_cp)
                live_pos = await pipe.hget(live_cp, "position")
                if live_pos is not None and int(live_pos) > position:
                    return False
                old_keys = sorted(await pipe.smembers(live_registry))
                pipe.multi()
                if old_keys:
                    pipe.delete(*old_keys)
                for k in existing:
                    pipe.rename(k, f"{self.prefix}{k[len(shadow_prefix) :]}")
                pipe.delete(live_registry)
                live_keys = [f"{self.prefix}{k[len(shadow_prefix) :]}" for k in existing]
                if live_keys:
                    pipe.sadd(live_registry, *live_keys)
                pipe.delete(shadow_registry)
                pipe.hset(live_cp, mapping={"position": position, "updated_at": now()})
                pipe.delete(self._parked_key(name))
                if has_parked:
                    pipe.rename(shadow_parked, self._parked_key(name))
                pipe.delete(shadow_cp)
                await pipe.execute()
            except WatchError:
                return False
        return True

    # -- query side ------------------------------------------------------------

    @_mapped
    async def read(self, command: str, key: str, *args: Any) -> Any:
        """Run a read command on view key ``key`` (stored as ``<prefix><key>``)."""
        return await self._client().execute_command(command, f"{self.prefix}{key}", *args)

    @_mapped
    async def get(self, key: str) -> Any:
        """``GET`` a view key."""
        return await self._client().get(f"{self.prefix}{key}")

    @_mapped
    async def hget(self, key: str, field: str) -> Any:
        """``HGET`` a field of a view hash."""
        return await self._client().hget(f"{self.prefix}{key}", field)

    @_mapped
    async def hgetall(self, key: str) -> dict[str, str]:
        """``HGETALL`` of a view hash, as a dict."""
        return dict(await self._client().hgetall(f"{self.prefix}{key}"))

    @_mapped
    async def smembers(self, key: str) -> set[str]:
        """``SMEMBERS`` of a view set."""
        return set(await self._client().smembers(f"{self.prefix}{key}"))

    @_mapped
    async def zrange(self, key: str, start: int = 0, stop: int = -1) -> list[str]:
        """``ZRANGE key start stop`` of a view sorted set (members by score)."""
        return list(await self._client().zrange(f"{self.prefix}{key}", start, stop))

    def key(self, key: str) -> str:
        """The stored name of view key ``key``."""
        return f"{self.prefix}{key}"
