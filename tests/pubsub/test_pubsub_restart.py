"""Broker restarts on throwaway servers: messages published before survive it."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from stanchion.pubsub import Broker
from stanchion.testing.conformance.pubsub import Sink, eventually
from stanchion.testing.pytest_plugin import ServerFactory

pytestmark = pytest.mark.slow


async def _publish_restart_consume(url: str, restart: object, n: int = 50) -> None:
    async with await Broker.connect(url) as broker:
        await broker.declare("plant.readings", group="analytics")
        ids = await broker.publish_many("plant.readings", [{"i": i} for i in range(n)])
    restart()  # type: ignore[operator]
    async with await Broker.connect(url) as broker:
        sink = Sink()
        await broker.subscribe("plant.readings", sink, group="analytics", ack_timeout=2.0)
        await eventually(lambda: len(sink.messages) >= n, timeout=20, what="messages after restart")
        assert sorted(sink.ids) == sorted(ids)


async def test_redis_aof_restart_keeps_messages(servers: ServerFactory) -> None:
    server = servers.redis(appendonly=True)
    url = server.url + "?prefix=restart:"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # AOF: no warning expected
        await _publish_restart_consume(url, server.restart)


async def test_redis_without_persistence_warns(servers: ServerFactory) -> None:
    server = servers.redis(appendonly=False)
    with pytest.warns(RuntimeWarning, match="does not persist"):
        broker = await Broker.connect(server.url)
    await broker.close()


async def test_nats_restart_keeps_messages(servers: ServerFactory) -> None:
    server = servers.nats()
    await _publish_restart_consume(server.url + "?prefix=restart", server.restart)


async def test_nats_subscriber_survives_restart(servers: ServerFactory) -> None:
    server = servers.nats()
    url = server.url + "?prefix=live"
    async with await Broker.connect(url) as broker:
        sink = Sink()
        await broker.subscribe("t", sink, group="g", ack_timeout=2.0)
        first = await broker.publish("t", {"n": 1})
        await eventually(lambda: sink.ids == [first])
        server.restart()
        second = None
        for _ in range(100):  # the client reconnects in the background
            try:
                second = await broker.publish("t", {"n": 2})
                break
            except Exception:
                await asyncio.sleep(0.2)
        assert second is not None
        await eventually(lambda: second in sink.ids, timeout=20, what="delivery after restart")


async def test_mosquitto_restart_keeps_queued_messages(servers: ServerFactory) -> None:
    server = servers.mosquitto()
    url = server.url + "?prefix=restart&client_id=analytics1"
    async with await Broker.connect(url) as broker:
        sink = Sink()
        sub = await broker.subscribe("plant.readings", sink, group="analytics")
        await sub.stop()  # the persistent session stays, offline
        ids = await broker.publish_many("plant.readings", [{"i": i} for i in range(20)])
    await asyncio.sleep(1.5)  # autosave_interval 1
    server.restart()
    async with await Broker.connect(url) as broker:
        sink = Sink()
        await broker.subscribe("plant.readings", sink, group="analytics")
        await eventually(lambda: len(sink.messages) >= 20, timeout=20, what="queued messages")
        assert sorted(sink.ids) == sorted(ids)
