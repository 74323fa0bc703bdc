"""Redis read model: key-value views with the checkpoint in the same MULTI/EXEC.

A transaction queues the handlers' write commands; ``commit`` WATCHes the
projection's checkpoint hash, checks position and fencing token, and sends
the queued commands together with the new checkpoint in one MULTI/EXEC, so
view and checkpoint change atomically (and a concurrent checkpoint writer
makes EXEC fail instead of double-applying). Reads inside a handler
(``tx.get``, ``tx.hget`` …) see committed data only, not the batch's own
pending writes: write views with commands that do not need to read first
(``HSET``, ``HINCRBY``, ``SADD`` …).

Views live under ``<prefix><name>:<generation>:<key>``. A rebuild writes
generation ``g+1`` while queries keep resolving ``g``; the swap flips the
generation in the checkpoint hash (atomically with the checkpoint), then the
old generation's keys are deleted. Query helpers resolve the generation and
read the key in one Lua call, so a query never mixes generations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

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

_READ = """
local g = redis.call('HGET', KEYS[1], 'gen') or '0'
local key = ARGV[1] .. g .. ':' .. ARGV[2]
return redis.call(ARGV[3], key, unpack(ARGV, 4))
"""


class RedisTransaction(Transaction):
    """Write commands queued for one MULTI/EXEC with the checkpoint.

    Every ``key`` is a view key; it is stored under the projection's prefix
    and generation.
    """

    def __init__(self, model: RedisReadModel, name: str, shadow: bool, gen: int) -> None:
        super().__init__(name, shadow)
        self._model = model
        self._gen = gen
        self._cp = model._cp_key(shadow_name(name) if shadow else name)
        self._parked = model._parked_key(shadow_name(name) if shadow else name)
        self._ops: list[tuple[Any, ...]] = []
        self._done = False

    def key(self, key: str) -> str:
        """The stored name of view key ``key``."""
        return self._model._view_key(self.name, self._gen, key)

    # -- writes (queued) -------------------------------------------------------

    async def execute(self, command: str, key: str, *args: Any) -> None:
        """Queue any write command whose first argument is a view key."""
        self._ops.append((command, self.key(key), *args))

    async def set(self, key: str, value: Any) -> None:
        """Queue ``SET key value``."""
        self._ops.append(("SET", self.key(key), value))

    async def delete(self, *keys: str) -> None:
        """Queue ``DEL key …``."""
        self._ops.append(("DEL", *(self.key(k) for k in keys)))

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
        self._ops.append(("HSET", self.key(key), *items))

    async def hdel(self, key: str, *fields: str) -> None:
        """Queue ``HDEL key field …``."""
        self._ops.append(("HDEL", self.key(key), *fields))

    async def hincrby(self, key: str, field: str, amount: int = 1) -> None:
        """Queue ``HINCRBY key field amount``."""
        self._ops.append(("HINCRBY", self.key(key), field, amount))

    async def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        """Queue ``HINCRBYFLOAT key field amount``."""
        self._ops.append(("HINCRBYFLOAT", self.key(key), field, amount))

    async def incrby(self, key: str, amount: int = 1) -> None:
        """Queue ``INCRBY key amount``."""
        self._ops.append(("INCRBY", self.key(key), amount))

    async def sadd(self, key: str, *members: Any) -> None:
        """Queue ``SADD key member …``."""
        self._ops.append(("SADD", self.key(key), *members))

    async def srem(self, key: str, *members: Any) -> None:
        """Queue ``SREM key member …``."""
        self._ops.append(("SREM", self.key(key), *members))

    async def zadd(self, key: str, mapping: Mapping[str, float]) -> None:
        """Queue ``ZADD key score member …``."""
        items: list[Any] = []
        for member, score in mapping.items():
            items += [score, member]
        self._ops.append(("ZADD", self.key(key), *items))

    async def zincrby(self, key: str, amount: float, member: str) -> None:
        """Queue ``ZINCRBY key amount member``."""
        self._ops.append(("ZINCRBY", self.key(key), amount, member))

    async def zrem(self, key: str, *members: Any) -> None:
        """Queue ``ZREM key member …``."""
        self._ops.append(("ZREM", self.key(key), *members))

    async def rpush(self, key: str, *values: Any) -> None:
        """Queue ``RPUSH key value …``."""
        self._ops.append(("RPUSH", self.key(key), *values))

    # -- reads (committed data) ------------------------------------------------

    async def get(self, key: str) -> Any:
        """``GET`` of committed data (not this transaction's pending writes)."""
        return await self._model._client().get(self.key(key))

    async def hget(self, key: str, field: str) -> Any:
        """``HGET`` of committed data."""
        return await self._model._client().hget(self.key(key), field)

    async def hgetall(self, key: str) -> dict[str, str]:
        """``HGETALL`` of committed data."""
        return dict(await self._model._client().hgetall(self.key(key)))

    # -- transaction -----------------------------------------------------------

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
                stored_pos, stored_token, stored_gen = await pipe.hmget(
                    self._cp, ["position", "token", "gen"]
                )
                spos = NO_POSITION if stored_pos is None else int(stored_pos)
                stok = None if stored_token in (None, "") else int(stored_token)
                sgen = 0 if stored_gen is None else int(stored_gen)
                if (
                    spos != expected
                    or (token is not None and stok is not None and stok > token)
                    or sgen != self._gen
                ):
                    raise_conflict(self.name, spos, stok, expected, token)
                pipe.multi()
                for op in self._ops:
                    pipe.execute_command(*op)
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
        self._read: Any = None

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
        self._read = client.register_script(_READ)

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

    def _view_key(self, name: str, gen: int, key: str) -> str:
        return f"{self.prefix}{name}:{gen}:{key}"

    async def _gen(self, name: str) -> int:
        value = await self._client().hget(self._cp_key(name), "gen")
        return 0 if value is None else int(value)

    async def _unlink_generation(self, name: str, gen: int) -> None:
        client = self._client()
        pattern = self._view_key(name, gen, "*").replace("[", "\\[")
        batch: list[str] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)

    # -- runner side -----------------------------------------------------------

    async def begin(self, name: str, *, shadow: bool = False) -> RedisTransaction:
        validate_name(name)
        client = self._client()
        try:
            if shadow:
                gen_raw = await client.hget(self._cp_key(shadow_name(name)), "gen")
                if gen_raw is None:
                    raise ConfigError(f"no rebuild of {name!r} in progress")
                gen = int(gen_raw)
            else:
                await client.sadd(self._index_key(), name)
                await client.hsetnx(self._cp_key(name), "position", NO_POSITION)
                gen = await self._gen(name)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise BackendUnavailable(f"Redis read model: {exc}", url=self.url) from exc
        return RedisTransaction(self, name, shadow, gen)

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

    async def checkpoints(self) -> list[Checkpoint]:
        names = sorted(await self._client().smembers(self._index_key()))
        return [await self.checkpoint(n) for n in names]

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

    async def reset_shadow(self, name: str) -> None:
        validate_name(name)
        client = self._client()
        await client.hsetnx(self._cp_key(name), "position", NO_POSITION)
        await client.sadd(self._index_key(), name)
        target = await self._gen(name) + 1
        await self._unlink_generation(name, target)
        await client.delete(self._parked_key(shadow_name(name)))
        await client.delete(self._cp_key(shadow_name(name)))
        await client.hset(
            self._cp_key(shadow_name(name)), mapping={"position": NO_POSITION, "gen": target}
        )

    async def drop_shadow(self, name: str) -> None:
        client = self._client()
        gen = await client.hget(self._cp_key(shadow_name(name)), "gen")
        if gen is not None and int(gen) != await self._gen(name):
            await self._unlink_generation(name, int(gen))
        await client.delete(self._cp_key(shadow_name(name)), self._parked_key(shadow_name(name)))

    async def swap(self, name: str, position: int) -> bool:
        client = self._client()
        shadow_cp = self._cp_key(shadow_name(name))
        target_raw = await client.hget(shadow_cp, "gen")
        if target_raw is None:
            raise ConfigError(f"no rebuild of {name!r} in progress")
        target = int(target_raw)
        shadow_parked = self._parked_key(shadow_name(name))
        has_parked = bool(await client.exists(shadow_parked))
        live_cp = self._cp_key(name)
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(live_cp)
                live_pos, live_gen = await pipe.hmget(live_cp, ["position", "gen"])
                old = 0 if live_gen is None else int(live_gen)
                if live_pos is not None and int(live_pos) > position:
                    return False
                pipe.multi()
                pipe.hset(
                    live_cp, mapping={"position": position, "gen": target, "updated_at": now()}
                )
                pipe.delete(self._parked_key(name))
                if has_parked:
                    pipe.rename(shadow_parked, self._parked_key(name))
                pipe.delete(shadow_cp)
                await pipe.execute()
            except WatchError:
                return False
        await self._unlink_generation(name, old)
        return True

    # -- query side ------------------------------------------------------------

    async def read(self, name: str, command: str, key: str, *args: Any) -> Any:
        """Run a read command on view key ``key`` of projection ``name`` (current generation)."""
        return await self._read(
            keys=[self._cp_key(name)], args=[f"{self.prefix}{name}:", key, command, *args]
        )

    async def get(self, name: str, key: str) -> Any:
        """``GET`` a view key."""
        return await self.read(name, "GET", key)

    async def hget(self, name: str, key: str, field: str) -> Any:
        """``HGET`` a field of a view hash."""
        return await self.read(name, "HGET", key, field)

    async def hgetall(self, name: str, key: str) -> dict[str, str]:
        """``HGETALL`` of a view hash, as a dict."""
        flat: Sequence[str] = await self.read(name, "HGETALL", key)
        return dict(zip(flat[::2], flat[1::2]))

    async def smembers(self, name: str, key: str) -> set[str]:
        """``SMEMBERS`` of a view set."""
        return set(await self.read(name, "SMEMBERS", key))

    async def zrange(self, name: str, key: str, start: int = 0, stop: int = -1) -> list[str]:
        """``ZRANGE key start stop`` of a view sorted set (members by score)."""
        return list(await self.read(name, "ZRANGE", key, start, stop))

    async def key(self, name: str, key: str) -> str:
        """The stored name of view key ``key`` in the current generation."""
        return self._view_key(name, await self._gen(name), key)
