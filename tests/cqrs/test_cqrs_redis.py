"""Redis views: plain keys under the URL prefix, readable by any client; atomic swap."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis

from stanchion.cqrs import Projection, ProjectionRunner, ReadModel, handles
from stanchion.testing.eventlog import ListEventLog
from stanchion.urls import parse_url


class Carts(Projection):
    name = "carts"

    @handles("ItemAdded")
    async def on_added(self, event: Any, tx: Any) -> None:
        cart = f"cart:{event.stream}"
        await tx.hincrby(cart, event.data["sku"], event.data["qty"])
        await tx.sadd("carts", event.stream)
        if event.data["qty"] == 0:
            await tx.delete(cart)


async def test_views_are_plain_prefixed_keys_and_rebuild_replaces_them(redis_url: str) -> None:
    prefix = parse_url(redis_url).query["prefix"]
    raw = aioredis.from_url(redis_url.split("?")[0], decode_responses=True)
    log = ListEventLog()
    for i in range(30):
        log.append("ItemAdded", {"sku": f"s{i % 3}", "qty": 1 + i % 2}, stream=f"c{i % 4}")
    try:
        async with await ReadModel.connect(redis_url) as rm:
            runner = ProjectionRunner(log, Carts(), rm, batch_size=7)
            task = asyncio.ensure_future(runner.run())
            try:
                await runner.wait_for(30, timeout=10)
                # Any client reads the view at <prefix><key>.
                assert await raw.smembers(f"{prefix}carts") == {"c0", "c1", "c2", "c3"}
                before = await raw.hgetall(f"{prefix}cart:c0")
                assert before == await rm.hgetall("cart:c0")  # type: ignore[attr-defined]
                assert sum(int(v) for v in before.values()) > 0
                # A stray key of the old view is gone after a rebuild (not in the new one).
                await raw.hset(f"{prefix}cart:c0", "stray", 99)
                await raw.sadd(f"{prefix}stanchion:cqrs:keys:carts", f"{prefix}gone")
                await raw.set(f"{prefix}gone", 1)
                cp = await runner.rebuild()
                assert cp.position == 30
                assert await raw.hgetall(f"{prefix}cart:c0") == before
                assert await raw.exists(f"{prefix}gone") == 0
                assert not [k async for k in raw.scan_iter(f"{prefix}stanchion:cqrs:shadow:*")]
                log.append("ItemAdded", {"sku": "s0", "qty": 0}, stream="c1")
                await runner.wait_for(31, timeout=5)
                assert await raw.exists(f"{prefix}cart:c1") == 0
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await raw.aclose()


async def test_runner_survives_a_read_model_outage(servers: Any) -> None:
    from stanchion.testing.conformance.cqrs import Totals, read_totals

    server = servers.redis(appendonly=True)
    url = f"{server.url}?prefix=outage:"
    log = ListEventLog()
    for _ in range(100):
        log.append("ItemAdded", {"sku": "a", "qty": 1})
    async with await ReadModel.connect(url) as rm:
        runner = ProjectionRunner(log, Totals(), rm, retry_interval=0.05)
        task = asyncio.ensure_future(runner.run())
        try:
            await runner.wait_for(100, timeout=10)
            server.kill()  # SIGKILL the Redis server under the runner
            for _ in range(100):
                log.append("ItemAdded", {"sku": "a", "qty": 1})
            await asyncio.sleep(0.5)
            assert not task.done()  # still alive, retrying
            server.restart()
            await runner.wait_for(200, timeout=30)
            assert await read_totals(rm) == {"a": 200}  # nothing lost, nothing doubled
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
