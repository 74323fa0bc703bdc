"""Facade behaviours beyond the conformance suite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stanchion.errors import ConfigError
from stanchion.pubsub import Broker, Message, Outgoing, Router, current_message, timeout
from stanchion.pubsub._middleware import open_dedupe
from stanchion.testing.conformance.pubsub import Sink, eventually


async def test_slow_handler_keeps_its_lease(sqlite_url: str) -> None:
    # A live consumer renews its lease: a handler slower than ack_timeout is
    # not handed to another member of the group.
    a = await Broker.connect(sqlite_url)
    b = await Broker.connect(sqlite_url)
    try:
        seen: list[tuple[str, int]] = []

        async def slow(msg: Message) -> None:
            seen.append(("a", msg.delivery))
            await asyncio.sleep(1.0)

        await a.subscribe("lease", slow, group="g", ack_timeout=0.3)
        await a.publish("lease", b"x")
        await eventually(lambda: len(seen) == 1)
        other = Sink()
        await b.subscribe("lease", other, group="g", ack_timeout=0.3)
        await asyncio.sleep(1.3)
        assert other.messages == [] and seen == [("a", 1)]
    finally:
        await a.close()
        await b.close()


async def test_timeout_middleware_retries(memory_url: str) -> None:
    async with await Broker.connect(memory_url) as broker:
        seen: list[int] = []

        async def handler(msg: Message) -> None:
            seen.append(msg.delivery)
            if msg.delivery == 1:
                await asyncio.sleep(5)

        await broker.subscribe(
            "t", handler, group="g", middleware=[timeout(0.05)], retry_backoff=(0.01, 0.01)
        )
        await broker.publish("t", b"x")
        await eventually(lambda: seen == [1, 2])


async def test_current_message_and_publish_many_forms(memory_url: str) -> None:
    async with await Broker.connect(memory_url) as broker:
        inside: list[str | None] = []

        async def handler(msg: Message) -> None:
            cur = current_message()
            inside.append(cur.id if cur else None)

        await broker.subscribe("a", handler, group="g")
        ids = await broker.publish_many([Outgoing("a", {"x": 1}, id="one"), ("a", b"two")])
        assert ids[0] == "one" and len(ids) == 2
        await eventually(lambda: len(inside) == 2)
        assert inside == ids
        assert current_message() is None
        with pytest.raises(ConfigError):
            await broker.publish_many([("a.*", b"x")])


async def test_router_include_and_default_group(memory_url: str) -> None:
    inner = Router()
    sink = Sink()
    inner.add("x", sink, group="g")
    outer = Router(prefix="app.")
    outer.include_router(inner)
    assert outer.routes == [("app.x", "g")]
    with pytest.raises(ConfigError):
        Router().add("x", sink)
    async with await Broker.connect(memory_url) as broker:
        await outer.start(broker)
        await broker.publish("app.x", b"1")
        await eventually(lambda: len(sink.messages) == 1)
        await outer.stop()


async def test_closed_broker_refuses(memory_url: str) -> None:
    broker = await Broker.connect(memory_url)
    await broker.close()
    with pytest.raises(ConfigError):
        await broker.publish("t", b"x")


async def test_wildcard_dead_letter_default(memory_url: str) -> None:
    async with await Broker.connect(memory_url) as broker:

        async def bad(msg: Message) -> None:
            raise KeyError("nope")

        dead = Sink()
        await broker.subscribe("dev.*.temp", bad, group="g", max_deliveries=1)
        await broker.subscribe("dev.temp.dead", dead, group="g")
        await broker.publish("dev.a.temp", b"x")
        await eventually(lambda: len(dead.messages) == 1)
        assert dead.messages[0].headers["x-original-topic"] == "dev.a.temp"


@pytest.mark.parametrize("scheme", ["memory", "sqlite", "redis", "postgresql"])
async def test_dedupe_stores(scheme: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = {
        "memory": lambda: "memory://dedupe-test",
        "sqlite": lambda: f"sqlite:///{tmp_path}/d.db",
        "redis": lambda: request.getfixturevalue("redis_url"),
        "postgresql": lambda: request.getfixturevalue("postgres_url"),
    }[scheme]()
    store = await open_dedupe(url)
    try:
        assert await store.begin("k1", 30) == "new"
        assert await store.begin("k1", 30) == "busy"
        await store.abort("k1")
        assert await store.begin("k1", 30) == "new"
        await store.complete("k1", 60)
        assert await store.begin("k1", 30) == "done"
        assert await store.begin("k2", 0.05) == "new"
        await asyncio.sleep(0.2)
        assert await store.begin("k2", 30) == "new"  # the lease of a dead consumer expired
    finally:
        await store.close()


async def test_connect_as_context_manager(memory_url: str) -> None:
    async with Broker.connect(memory_url) as broker:
        sink = Sink()
        await broker.subscribe("cm", sink, group="g")
        await broker.publish("cm", b"x")
        await eventually(lambda: len(sink.messages) == 1)
    with pytest.raises(ConfigError):
        await broker.publish("cm", b"y")


async def test_amqp_mandatory_unroutable_topic_is_an_error(pubsub_amqp_url: str) -> None:
    from stanchion.errors import PublishError

    async with Broker.connect(pubsub_amqp_url + "&mandatory=true") as broker:
        with pytest.raises(PublishError, match="no queue bound"):
            await broker.publish("nobody.listens", b"x")
        await broker.declare("somebody.listens", group="g")
        await broker.publish("somebody.listens", b"x")
