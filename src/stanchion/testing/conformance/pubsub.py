"""The pub/sub conformance suite, in the spirit of Watermill's universal tests.

Every test takes a ``backend_url`` fixture (a broker URL private to the test)
and runs against any :class:`stanchion.pubsub.Broker` backend. Use it from a
test module::

    from stanchion.testing.conformance.pubsub import *  # noqa: F403

    @pytest.fixture(params=backend_params("memory", "sqlite", "redis"))
    def backend_url(request): ...

A backend lacking a capability the test needs does not pass silently: the
test is marked ``xfail`` with the documented limitation (the capability flag
and why), so the report lists it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stanchion.codec import EncodeError
from stanchion.errors import BackendUnavailable, ConfigError, StanchionError
from stanchion.pubsub import Broker, Message, Router, idempotent
from stanchion.testing.pytest_plugin import need_service
from stanchion.testing.services import run_sync, with_query
from stanchion.urls import parse_url

__all__ = [
    "pubsub_amqp_url",
    "test_bad_input",
    "test_competing_consumers",
    "test_correlation_and_trace_propagate",
    "test_dead_letter_after_max_deliveries",
    "test_history_for_new_group",
    "test_idempotent_middleware",
    "test_many_messages_in_parallel",
    "test_ordered_by_key",
    "test_prefetch_bounds_memory",
    "test_publish_many_and_ids",
    "test_retry_does_not_block",
    "test_retry_then_success",
    "test_round_trip",
    "test_router_and_metrics",
    "test_sigkill_consumer_redelivers",
    "test_stop_and_resubscribe",
    "test_two_groups_fan_out",
    "test_unreachable_broker",
    "test_wildcards",
]


@pytest.fixture
def pubsub_amqp_url(namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Like the ``amqp_url`` fixture, but deletes what the test declared over AMQP.

    (``rabbitmqctl`` costs about a second per call; a test declares ~10 queues.)
    """
    from stanchion.pubsub.backends import _rabbitmq

    base = need_service("amqp")
    names: set[str] = set()
    original = _rabbitmq.RabbitMQDriver.queue_name

    def recording(self: _rabbitmq.RabbitMQDriver, pattern: object, group: str) -> str:
        name = original(self, pattern, group)  # type: ignore[arg-type]
        names.add(name)
        return name

    monkeypatch.setattr(_rabbitmq.RabbitMQDriver, "queue_name", recording)
    yield with_query(base, prefix=namespace)

    async def cleanup() -> None:
        import aio_pika

        conn = await aio_pika.connect(base)
        try:
            ch = await conn.channel()
            for name in names:
                await ch.queue_delete(name)
            await ch.exchange_delete(f"{namespace}.topics")
        finally:
            await conn.close()

    run_sync(cleanup)


FAST: dict[str, Any] = {"retry_backoff": (0.02, 0.1), "ack_timeout": 2.0}


def limitation(broker: Broker, flag: str, why: str) -> None:
    """Mark the running test as a documented limitation of the backend (xfail)."""
    scheme = broker.url.split(":", 1)[0]
    pytest.xfail(f"documented limitation of {scheme}:// (capabilities.{flag}=False): {why}")


async def eventually(pred: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:  # noqa: ASYNC109
    """Wait until ``pred()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.01)


class Sink:
    """A handler that records messages."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.messages]


async def _settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


async def test_round_trip(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        sink = Sink()
        await broker.subscribe("orders.placed", sink, group="g", **FAST)
        before = datetime.now(UTC)
        mid = await broker.publish(
            "orders.placed", {"order": 42}, key="cust-1", headers={"x-custom": "yes"}
        )
        await eventually(lambda: len(sink.messages) == 1, what="one message")
        msg = sink.messages[0]
        assert msg.id == mid
        assert msg.topic == "orders.placed"
        assert msg.key == "cust-1"
        assert msg.json() == {"order": 42}
        assert msg.headers["x-custom"] == "yes"
        assert msg.headers["x-correlation-id"] == mid
        assert msg.traceparent is not None and msg.traceparent.startswith("00-")
        assert msg.delivery == 1
        assert (
            before - timedelta(seconds=5)
            <= msg.published_at
            <= datetime.now(UTC) + timedelta(seconds=5)
        )
        raw = await broker.publish("orders.placed", b"\x00\x01raw")
        await eventually(lambda: len(sink.messages) == 2)
        assert sink.messages[1].data == b"\x00\x01raw" and sink.messages[1].id == raw
        await _settle(0.1)
        assert len(sink.messages) == 2


async def test_publish_many_and_ids(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        sink = Sink()
        await broker.subscribe("batch", sink, group="g", **FAST)
        ids = await broker.publish_many("batch", [{"n": i} for i in range(20)])
        assert len(set(ids)) == 20
        given = await broker.publish("batch", {"n": 20}, id="my-id-1")
        assert given == "my-id-1"
        await eventually(lambda: len(sink.messages) == 21)
        assert sink.ids[:20] == ids
        assert [m.json()["n"] for m in sink.messages] == list(range(21))


async def test_many_messages_in_parallel(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        sink = Sink()
        await broker.subscribe("par", sink, group="g", concurrency=8, **FAST)
        ids = await asyncio.gather(*(broker.publish("par", {"n": i}) for i in range(150)))
        ids += await broker.publish_many("par", [{"n": i} for i in range(150, 300)])
        await eventually(lambda: len(sink.messages) >= 300, what="300 messages")
        await _settle(0.2)
        assert sorted(sink.ids) == sorted(ids)


async def test_two_groups_fan_out(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        analytics, alerting = Sink(), Sink()
        await broker.subscribe("sensors.temp", analytics, group="analytics", **FAST)
        await broker.subscribe("sensors.temp", alerting, group="alerting", **FAST)
        ids = await broker.publish_many("sensors.temp", [{"c": i} for i in range(50)])
        await eventually(lambda: len(analytics.messages) >= 50 and len(alerting.messages) >= 50)
        await _settle(0.1)
        assert sorted(analytics.ids) == sorted(ids)
        assert sorted(alerting.ids) == sorted(ids)


async def test_competing_consumers(backend_url: str) -> None:
    brokers = [await Broker.connect(backend_url) for _ in range(3)]
    try:
        sinks = [Sink() for _ in brokers]
        for b, s in zip(brokers, sinks):
            await b.subscribe("jobs", s, group="workers", prefetch=4, **FAST)

        async def slow_total() -> int:
            return sum(len(s.messages) for s in sinks)

        ids = await brokers[0].publish_many("jobs", [{"n": i} for i in range(150)])
        await eventually(lambda: sum(len(s.messages) for s in sinks) >= 150, what="150 jobs")
        await _settle(0.2)
        got = [i for s in sinks for i in s.ids]
        assert Counter(got) == Counter(ids), "a job was lost or handled twice"
        assert await slow_total() == 150
    finally:
        for b in brokers:
            await b.close()


async def test_dead_letter_after_max_deliveries(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        seen: list[int] = []

        async def failing(msg: Message) -> None:
            seen.append(msg.delivery)
            raise ValueError("cannot handle")

        dead = Sink()
        await broker.subscribe("pay", failing, group="g", max_deliveries=3, **FAST)
        await broker.subscribe("pay.dead", dead, group="g", **FAST)
        mid = await broker.publish("pay", {"amount": 1})
        await eventually(lambda: len(dead.messages) == 1, what="the dead letter")
        d = dead.messages[0]
        assert seen == [1, 2, 3]
        assert d.id == mid and d.json() == {"amount": 1}
        assert d.headers["x-error"] == "ValueError: cannot handle"
        assert d.headers["x-deliveries"] == "3"
        await _settle(0.2)
        assert seen == [1, 2, 3]


async def test_retry_then_success(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        seen: list[int] = []

        async def flaky(msg: Message) -> None:
            seen.append(msg.delivery)
            if msg.delivery < 3:
                raise RuntimeError("transient")

        dead = Sink()
        custom = "retry.parking"
        await broker.subscribe("retry", flaky, group="g", dead_letter=custom, **FAST)
        await broker.subscribe(custom, dead, group="g", **FAST)
        await broker.publish("retry", {"x": 1})
        await eventually(lambda: seen == [1, 2, 3], what="three deliveries")
        await _settle(0.3)
        assert seen == [1, 2, 3] and not dead.messages


async def test_retry_does_not_block(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        order: list[tuple[str, int]] = []

        async def handler(msg: Message) -> None:
            order.append((msg.json()["name"], msg.delivery))
            if msg.json()["name"] == "poison" and msg.delivery == 1:
                raise RuntimeError("first try fails")

        await broker.subscribe("nb", handler, group="g", retry_backoff=(0.5, 0.5), ack_timeout=5.0)
        await broker.publish("nb", {"name": "poison"})
        await broker.publish_many("nb", [{"name": f"ok{i}"} for i in range(5)])
        await eventually(lambda: ("poison", 2) in order, what="the retry")
        first_retry = order.index(("poison", 2))
        assert all(("ok" + str(i), 1) in order[:first_retry] for i in range(5)), order


async def test_ordered_by_key(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        got: dict[str, list[int]] = defaultdict(list)
        running: set[str] = set()
        overlaps: list[str] = []
        failed_once: set[int] = set()

        async def handler(msg: Message) -> None:
            body = msg.json()
            k = msg.key or ""
            if k in running:
                overlaps.append(k)
            running.add(k)
            try:
                await asyncio.sleep(0.001 * (body["n"] % 3))
                if body["n"] == 7 and body["n"] not in failed_once:
                    failed_once.add(body["n"])
                    raise RuntimeError("one failure holds back only its key")
                got[k].append(body["n"])
            finally:
                running.discard(k)

        await broker.subscribe(
            "ordered", handler, group="g", concurrency=4, ordered_by_key=True, **FAST
        )
        for n in range(40):
            await broker.publish("ordered", {"n": n}, key=f"k{n % 4}")
        await eventually(lambda: sum(len(v) for v in got.values()) == 40, what="40 messages")
        assert not overlaps
        for k, ns in got.items():
            assert ns == sorted(ns), f"key {k} out of order: {ns}"


async def test_stop_and_resubscribe(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        if not broker.capabilities.resume:
            limitation(broker, "resume", "messages published while a group has no member are lost")
        first = Sink()
        sub = await broker.subscribe("resume", first, group="g", **FAST)
        ids1 = await broker.publish_many("resume", [{"n": i} for i in range(20)])
        await eventually(lambda: len(first.messages) == 20)
        await sub.stop()
        ids2 = await broker.publish_many("resume", [{"n": i} for i in range(20, 40)])
        second = Sink()
        await broker.subscribe("resume", second, group="g", **FAST)
        await eventually(lambda: len(second.messages) >= 20, what="the rest")
        await _settle(0.2)
        assert sorted(first.ids) == sorted(ids1)
        assert sorted(second.ids) == sorted(ids2)


async def test_history_for_new_group(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        if not broker.capabilities.resume:
            limitation(broker, "resume", "a group exists only while a member is connected")
        await broker.declare("hist", group="late")
        mid = await broker.publish("hist", {"n": 1})
        sink = Sink()
        await broker.subscribe("hist", sink, group="late", **FAST)
        await eventually(lambda: sink.ids == [mid], what="the message published first")


async def test_prefetch_bounds_memory(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        done: list[str] = []

        async def slow(msg: Message) -> None:
            await asyncio.sleep(0.005)
            done.append(msg.id)

        sub = await broker.subscribe("slow", slow, group="g", prefetch=5, **FAST)
        await broker.publish_many("slow", [b"x" * 1024 for _ in range(60)])
        await eventually(lambda: len(done) == 60, timeout=20, what="60 slow messages")
        assert 1 <= sub.max_held <= 5, sub.max_held


async def test_wildcards(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        if not broker.capabilities.wildcards:
            with pytest.raises(ConfigError):
                await broker.subscribe("w.*.temp", Sink(), group="g")
            limitation(broker, "wildcards", "the engine has no topic patterns")
        one, rest = Sink(), Sink()
        await broker.subscribe("w.*.temp", one, group="g1", **FAST)
        await broker.subscribe("w.>", rest, group="g2", **FAST)
        await _settle(0.2)
        await broker.publish("w.room1.temp", {"c": 1})
        await broker.publish("w.room1.hum", {"h": 1})
        await broker.publish("w.a.b.temp", {"c": 2})
        await eventually(lambda: len(rest.messages) == 3 and len(one.messages) == 1)
        await _settle(0.1)
        assert [m.topic for m in one.messages] == ["w.room1.temp"]
        assert sorted(m.topic for m in rest.messages) == [
            "w.a.b.temp",
            "w.room1.hum",
            "w.room1.temp",
        ]


async def test_correlation_and_trace_propagate(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        out = Sink()

        async def relay(msg: Message) -> None:
            await broker.publish("chain.out", {"from": msg.id})

        await broker.subscribe("chain.in", relay, group="g", **FAST)
        await broker.subscribe("chain.out", out, group="g", **FAST)
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        mid = await broker.publish(
            "chain.in", {"x": 1}, headers={"x-correlation-id": "corr-1", "traceparent": tp}
        )
        await eventually(lambda: len(out.messages) == 1)
        m = out.messages[0]
        assert m.json() == {"from": mid}
        assert m.correlation_id == "corr-1"
        assert m.traceparent is not None
        assert m.traceparent.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
        assert m.traceparent.split("-")[2] != "b7ad6b7169203331"


async def test_idempotent_middleware(backend_url: str, tmp_path: object) -> None:
    async with await Broker.connect(backend_url) as broker:
        sink = Sink()
        store = f"sqlite:///{tmp_path}/dedupe.db"
        await broker.subscribe("idem", sink, group="g", middleware=[idempotent(store)], **FAST)
        await broker.publish("idem", {"n": 1}, id="same")
        await broker.publish("idem", {"n": 1}, id="same")
        await broker.publish("idem", {"n": 2}, id="other")
        await eventually(lambda: len(sink.messages) == 2)
        await _settle(0.3)
        assert sorted(sink.ids) == ["other", "same"]


async def test_router_and_metrics(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        router = Router(prefix="shop.", group="svc")
        alerts = Sink()

        @router.subscriber("readings", publish_to="shop.alerts")
        async def check(msg: Message) -> dict[str, object] | None:
            value = msg.json()["c"]
            return {"hot": value} if value > 30 else None

        router.add("alerts", alerts, group="ops")
        broker.include_router(router)
        subs = await broker.start()
        assert sorted(s.topic for s in subs) == ["shop.alerts", "shop.readings"]
        await broker.publish_many("shop.readings", [{"c": 20}, {"c": 35}])
        await eventually(lambda: len(alerts.messages) == 1)
        assert alerts.messages[0].json() == {"hot": 35}
        await eventually(lambda: b"pubsub_acked_total" in broker.metrics.render())
        text = broker.metrics.render().decode()
        assert 'stanchion_pubsub_published_total{topic="shop.readings"} 2.0' in text
        assert "stanchion_pubsub_handler_seconds" in text
        await router.stop()


async def test_bad_input(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        with pytest.raises(EncodeError) as info:
            await broker.publish("bad", {"x": object()})
        assert isinstance(info.value, ConfigError) and isinstance(info.value, TypeError)
        with pytest.raises(ConfigError):
            await broker.publish("bad.*", b"x")
        with pytest.raises(ConfigError):
            await broker.publish("", b"x")
        with pytest.raises(ConfigError):
            await broker.publish("bad", b"x", headers={"n": 1})  # type: ignore[dict-item]
        with pytest.raises(ConfigError):
            await broker.subscribe("bad", Sink(), group="g", max_deliveries=0)
        with pytest.raises(ConfigError):
            await broker.subscribe("bad", Sink(), group="g", retry_backoff=(5, 1))
        with pytest.raises(ConfigError):
            await broker.subscribe("bad", Sink(), group="g", concurrency=0)
        # nothing was stored by the failed publishes
        sink = Sink()
        await broker.subscribe("bad", sink, group="g", **FAST)
        ok = await broker.publish("bad", {"fine": True})
        await eventually(lambda: len(sink.messages) >= 1)
        await _settle(0.1)
        assert sink.ids == [ok]


def _unreachable(url: str) -> str | None:
    p = parse_url(url)
    if p.scheme == "memory":
        return None
    if p.scheme == "sqlite":
        return "sqlite:////proc/no/such/dir/broker.db"
    from stanchion.testing.servers import free_port

    return f"{p.scheme}://127.0.0.1:{free_port()}/"


async def test_unreachable_broker(backend_url: str) -> None:
    with pytest.raises(ConfigError):
        await Broker.connect("nosuchscheme://127.0.0.1/")
    url = _unreachable(backend_url)
    if url is None:
        return  # memory:// has no server that could be unreachable
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        await Broker.connect(url)
    assert time.monotonic() - t0 < 15
    assert isinstance(info.value, StanchionError)


_CHILD = r"""
import asyncio, sys
from stanchion.pubsub import Broker
async def main():
    broker = await Broker.connect(sys.argv[1])
    async def handler(msg):
        print("got", msg.id, flush=True)
        await asyncio.sleep(3600)
    await broker.subscribe("crash", handler, group="g", ack_timeout=1.0, prefetch=1)
    print("ready", flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


async def _readline(proc: asyncio.subprocess.Process, timeout: float) -> str:  # noqa: ASYNC109
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    return line.decode().strip()


async def test_sigkill_consumer_redelivers(backend_url: str) -> None:
    async with await Broker.connect(backend_url) as broker:
        caps = broker.capabilities
        if not caps.multi_process:
            await _in_process_crash(broker)
            return
        if not caps.crash_redelivery:
            limitation(
                broker,
                "crash_redelivery",
                "an unacked message of a killed consumer is not handed to another member",
            )
        await broker.declare("crash", group="g")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            backend_url,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert await _readline(proc, 30) == "ready"
            mid = await broker.publish("crash", {"n": 1})
            assert await _readline(proc, 30) == f"got {mid}"
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
            sink = Sink()
            await broker.subscribe("crash", sink, group="g", ack_timeout=1.0)
            await eventually(lambda: mid in sink.ids, timeout=20, what="redelivery")
            m = sink.messages[sink.ids.index(mid)]
            if caps.delivery_count:
                assert m.delivery >= 2
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _in_process_crash(broker: Broker) -> None:
    # One process only: a consumer "dies" by abandoning its tasks without acking
    # or releasing anything; its lease is then not renewed.
    got = asyncio.Event()

    async def hang(msg: Message) -> None:
        got.set()
        await asyncio.sleep(3600)

    dead = await broker.subscribe("crash", hang, group="g", ack_timeout=0.5, prefetch=1)
    mid = await broker.publish("crash", {"n": 1})
    await asyncio.wait_for(got.wait(), 10)
    for task in [*dead._loops, *dead._workers]:
        task.cancel()
    broker._subs.discard(dead)
    sink = Sink()
    await broker.subscribe("crash", sink, group="g", ack_timeout=0.5)
    await eventually(lambda: mid in sink.ids, timeout=10, what="redelivery")
    assert sink.messages[0].delivery == 2
