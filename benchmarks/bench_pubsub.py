"""Pub/sub throughput: stanchion vs FastStream vs the raw client, per broker, in one run.

For each of Redis Streams, NATS JetStream, RabbitMQ and MQTT (and stanchion's
SQLite backend), with 1 KB messages:

* publish, awaited: one message at a time, each confirmed by the broker
  (XADD reply, JetStream PubAck, publisher confirm, PUBACK);
* publish, batched: the same with batches of 100 in flight (a Redis pipeline,
  concurrent confirms; stanchion's ``publish_many``);
* end to end: N messages already stored, time for a subscriber/consumer
  group to receive and ack them all.

Usage::

    .venv/bin/python benchmarks/bench_pubsub.py [-n 1000] [--rounds 3]
        [--only redis,nats,amqp,mqtt,sqlite]

Needs the shared services on their default ports. Numbers are msg/s; the
machine is shared and noisy, so compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from typing import Any

from stanchion.pubsub import Broker, Message

PAYLOAD = os.urandom(512).hex().encode()  # 1024 bytes
BATCH = 100
Result = dict[str, float | None]

logging.disable(logging.WARNING)  # FastStream logs every message; paho warns on queues
warnings.filterwarnings("ignore", category=RuntimeWarning)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def until(count: Callable[[], int], n: int, limit: float = 120.0) -> None:
    deadline = time.perf_counter() + limit
    while count() < n:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {count()} of {n} consumed")
        await asyncio.sleep(0.001)


async def in_batches(n: int, one: Callable[[int], Awaitable[Any]]) -> None:
    for start in range(0, n, BATCH):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + BATCH))))


# -- stanchion (any backend) -------------------------------------------------


async def stanchion_bench(url: str, n: int) -> Result:
    topic = f"bench{uuid.uuid4().hex[:8]}"
    try:
        return await _stanchion_bench(url, n, topic)
    finally:
        await _cleanup(url, topic)


async def _cleanup(url: str, topic: str) -> None:
    # Delete what the stanchion run created on the shared servers.
    scheme, _, rest = url.partition("://")
    prefix = rest.split("prefix=", 1)[1] if "prefix=" in rest else ""
    with contextlib.suppress(Exception):
        if scheme == "redis":
            import redis.asyncio as aioredis

            r = aioredis.Redis.from_url(url.split("?")[0])
            await r.delete(prefix + topic, prefix + topic + ".dead")
            await r.aclose()
        elif scheme == "nats":
            import nats

            nc = await nats.connect(url.split("?")[0])
            await nc.jetstream().delete_stream(prefix)
            await nc.close()
        elif scheme == "amqp":
            import aio_pika

            conn = await aio_pika.connect(url.split("?")[0])
            ch = await conn.channel()
            for q in (f"{prefix}:g:{topic}", f"{prefix}:g:{topic}.dead"):
                await ch.queue_delete(q)
            await ch.exchange_delete(f"{prefix}.topics")
            await conn.close()


async def _stanchion_bench(url: str, n: int, topic: str) -> Result:
    out: Result = {}
    async with await Broker.connect(url) as broker:
        await broker.declare(topic, group="g")
        out["pub"] = rate(n, await timed(lambda: _st_pub(broker, topic, n)))
        out["pub_batch"] = rate(n, await timed(lambda: _st_pub_many(broker, topic, n)))
        got = 0

        async def handler(msg: Message) -> None:
            nonlocal got
            got += 1

        t0 = time.perf_counter()
        sub = await broker.subscribe(topic, handler, group="g", prefetch=256, ack_timeout=30)
        await until(lambda: got, 2 * n)
        out["e2e"] = rate(2 * n, time.perf_counter() - t0)
        await sub.stop()
    return out


async def _st_pub(broker: Broker, topic: str, n: int) -> None:
    for _ in range(n):
        await broker.publish(topic, PAYLOAD)


async def _st_pub_many(broker: Broker, topic: str, n: int) -> None:
    for start in range(0, n, BATCH):
        await broker.publish_many(topic, [PAYLOAD] * min(BATCH, n - start))


# -- Redis ---------------------------------------------------------------------


async def redis_raw(url: str, n: int) -> Result:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    key = f"benchraw:{uuid.uuid4().hex[:8]}"
    out: Result = {}
    try:
        await r.xgroup_create(key, "g", id="0", mkstream=True)

        async def pub() -> None:
            for _ in range(n):
                await r.xadd(key, {"d": PAYLOAD})

        async def pub_batch() -> None:
            for start in range(0, n, BATCH):
                async with r.pipeline(transaction=False) as p:
                    for _ in range(min(BATCH, n - start)):
                        p.xadd(key, {"d": PAYLOAD})
                    await p.execute()

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(n, await timed(pub_batch))

        async def consume() -> None:
            got = 0
            while got < 2 * n:
                res = await r.xreadgroup("g", "c", {key: ">"}, count=BATCH, block=1000)
                if not res:
                    continue
                ids = [eid for eid, _ in res[0][1]]
                await r.xack(key, "g", *ids)
                got += len(ids)

        out["e2e"] = rate(2 * n, await timed(consume))
    finally:
        await r.delete(key)
        await r.aclose()
    return out


async def redis_faststream(url: str, n: int) -> Result:
    import redis.asyncio as aioredis
    from faststream.redis import RedisBroker, StreamSub

    key = f"benchfs:{uuid.uuid4().hex[:8]}"
    raw = aioredis.Redis.from_url(url)
    await raw.xgroup_create(key, "g", id="0", mkstream=True)
    broker = RedisBroker(url, logger=None)
    got = 0

    @broker.subscriber(stream=StreamSub(key, group="g", consumer="c"))
    async def handle(body: bytes) -> None:
        nonlocal got
        got += 1

    out: Result = {}
    try:
        await broker.connect()

        async def pub() -> None:
            for _ in range(n):
                await broker.publish(PAYLOAD, stream=key)

        async def pub_batch() -> None:
            await in_batches(n, lambda i: broker.publish(PAYLOAD, stream=key))

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(n, await timed(pub_batch))
        t0 = time.perf_counter()
        await broker.start()
        await until(lambda: got, 2 * n, limit=60)
        out["e2e"] = rate(2 * n, time.perf_counter() - t0)
    except Exception as exc:
        print(f"  faststream redis: {type(exc).__name__}: {exc}", file=sys.stderr)
        out.setdefault("e2e", None)
    finally:
        with contextlib.suppress(Exception):
            await broker.stop()
        await raw.delete(key)
        await raw.aclose()
    return out


# -- NATS ----------------------------------------------------------------------


async def nats_raw(url: str, n: int) -> Result:
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream()
    name = f"benchraw{uuid.uuid4().hex[:8]}"
    out: Result = {}
    try:
        await js.add_stream(name=name, subjects=[f"{name}.>"])

        async def pub() -> None:
            for _ in range(n):
                await js.publish(f"{name}.t", PAYLOAD)

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(
            n, await timed(lambda: in_batches(n, lambda i: js.publish(f"{name}.t", PAYLOAD)))
        )
        psub = await js.pull_subscribe(f"{name}.t", durable="g", stream=name)

        async def consume() -> None:
            got = 0
            while got < 2 * n:
                try:
                    msgs = await psub.fetch(BATCH, timeout=1)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    await m.ack()
                got += len(msgs)

        out["e2e"] = rate(2 * n, await timed(consume))
    finally:
        await js.delete_stream(name)
        await nc.close()
    return out


async def nats_faststream(url: str, n: int) -> Result:
    import nats
    from faststream.nats import JStream, NatsBroker, PullSub

    name = f"benchfs{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name}.>"])
    broker = NatsBroker(url, logger=None)
    got = 0

    @broker.subscriber(
        f"{name}.t", stream=JStream(name, declare=False), durable="g", pull_sub=PullSub(BATCH)
    )
    async def handle(body: bytes) -> None:
        nonlocal got
        got += 1

    out: Result = {}
    try:
        await broker.connect()

        async def pub() -> None:
            for _ in range(n):
                await broker.publish(PAYLOAD, f"{name}.t", stream=name)

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(
            n,
            await timed(
                lambda: in_batches(n, lambda i: broker.publish(PAYLOAD, f"{name}.t", stream=name))
            ),
        )
        t0 = time.perf_counter()
        await broker.start()
        await until(lambda: got, 2 * n, limit=60)
        out["e2e"] = rate(2 * n, time.perf_counter() - t0)
    except Exception as exc:
        print(f"  faststream nats: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await broker.stop()
        await js.delete_stream(name)
        await nc.close()
    return out


# -- RabbitMQ ------------------------------------------------------------------


async def amqp_raw(url: str, n: int) -> Result:
    import aio_pika

    conn = await aio_pika.connect(url)
    ch = await conn.channel(publisher_confirms=True)
    name = f"benchraw{uuid.uuid4().hex[:8]}"
    out: Result = {}
    try:
        ex = await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        await q.bind(ex, "t")

        def msg() -> aio_pika.Message:
            return aio_pika.Message(PAYLOAD, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)

        async def pub() -> None:
            for _ in range(n):
                await ex.publish(msg(), "t")

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(
            n, await timed(lambda: in_batches(n, lambda i: ex.publish(msg(), "t")))
        )
        cch = await conn.channel()
        await cch.set_qos(prefetch_count=256)
        cq = await cch.get_queue(name)
        got = 0
        done = asyncio.Event()

        async def on(m: Any) -> None:
            nonlocal got
            await m.ack()
            got += 1
            if got >= 2 * n:
                done.set()

        t0 = time.perf_counter()
        await cq.consume(on)
        await asyncio.wait_for(done.wait(), 120)
        out["e2e"] = rate(2 * n, time.perf_counter() - t0)
    finally:
        ch2 = await conn.channel()
        await ch2.queue_delete(name)
        await ch2.exchange_delete(name)
        await conn.close()
    return out


async def amqp_faststream(url: str, n: int) -> Result:
    import aio_pika
    from faststream.rabbit import ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

    name = f"benchfs{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(url)
    ch = await conn.channel()
    ex0 = await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
    q0 = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    await q0.bind(ex0, "t")
    broker = RabbitBroker(url, logger=None)
    exchange = RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)
    queue = RabbitQueue(
        name, durable=True, routing_key="t", arguments={"x-queue-type": "quorum"}, declare=False
    )
    got = 0

    @broker.subscriber(queue, exchange)
    async def handle(body: bytes) -> None:
        nonlocal got
        got += 1

    out: Result = {}
    try:
        await broker.connect()

        async def pub() -> None:
            for _ in range(n):
                await broker.publish(PAYLOAD, "t", exchange=exchange, persist=True)

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(
            n,
            await timed(
                lambda: in_batches(
                    n, lambda i: broker.publish(PAYLOAD, "t", exchange=exchange, persist=True)
                )
            ),
        )
        t0 = time.perf_counter()
        await broker.start()
        await until(lambda: got, 2 * n, limit=60)
        out["e2e"] = rate(2 * n, time.perf_counter() - t0)
    except Exception as exc:
        print(f"  faststream rabbit: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            await broker.stop()
        await ch.queue_delete(name)
        await ch.exchange_delete(name)
        await conn.close()
    return out


# -- MQTT ----------------------------------------------------------------------


async def mqtt_raw(url: str, n: int) -> Result:
    import aiomqtt

    topic = f"benchraw/{uuid.uuid4().hex[:8]}"
    out: Result = {}
    async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as pub_c:

        async def pub() -> None:
            for _ in range(n):
                await pub_c.publish(topic, PAYLOAD, qos=1)

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(
            n, await timed(lambda: in_batches(n, lambda i: pub_c.publish(topic, PAYLOAD, qos=1)))
        )
        # MQTT keeps nothing for a group without a member: subscribe, then publish.
        async with aiomqtt.Client("127.0.0.1", 1883, protocol=aiomqtt.ProtocolVersion.V5) as sub_c:
            await sub_c.subscribe(f"$share/g/{topic}", qos=1)
            got = 0

            async def consume() -> None:
                nonlocal got
                async for _ in sub_c.messages:
                    got += 1
                    if got >= n:
                        return

            t0 = time.perf_counter()
            task = asyncio.create_task(consume())
            await in_batches(n, lambda i: pub_c.publish(topic, PAYLOAD, qos=1))
            await asyncio.wait_for(task, 120)
            out["e2e"] = rate(n, time.perf_counter() - t0)
    return out


async def mqtt_stanchion(url: str, n: int) -> Result:
    out: Result = {}
    async with await Broker.connect(url + f"?prefix=bench{uuid.uuid4().hex[:6]}") as broker:
        out["pub"] = rate(n, await timed(lambda: _st_pub(broker, "t", n)))
        out["pub_batch"] = rate(n, await timed(lambda: _st_pub_many(broker, "t", n)))
        got = 0

        async def handler(msg: Message) -> None:
            nonlocal got
            got += 1

        sub = await broker.subscribe("t", handler, group="g", prefetch=256)
        t0 = time.perf_counter()
        await _st_pub_many(broker, "t", n)
        await until(lambda: got, n)
        out["e2e"] = rate(n, time.perf_counter() - t0)
        await sub.stop()
    return out


# -- driver ----------------------------------------------------------------------


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f" ({a / b:.2f}x)"


async def run(n: int, only: set[str], rounds: int) -> None:
    tmp = tempfile.mkdtemp()
    plans: list[tuple[str, dict[str, Callable[[], Awaitable[Result]]]]] = []
    redis_url = "redis://127.0.0.1:6379/0"
    nats_url = "nats://127.0.0.1:4222"
    amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
    mqtt_url = "mqtt://127.0.0.1:1883"
    if "redis" in only:
        plans.append(
            (
                "Redis Streams",
                {
                    "raw redis-py": lambda: redis_raw(redis_url, n),
                    "FastStream": lambda: redis_faststream(redis_url, n),
                    "stanchion": lambda: stanchion_bench(redis_url + "?prefix=bench:", n),
                },
            )
        )
    if "nats" in only:
        plans.append(
            (
                "NATS JetStream",
                {
                    "raw nats-py": lambda: nats_raw(nats_url, n),
                    "FastStream": lambda: nats_faststream(nats_url, n),
                    "stanchion": lambda: stanchion_bench(
                        nats_url + f"?prefix=bench{uuid.uuid4().hex[:6]}", n
                    ),
                },
            )
        )
    if "amqp" in only:
        plans.append(
            (
                "RabbitMQ",
                {
                    "raw aio-pika": lambda: amqp_raw(amqp_url, n),
                    "FastStream": lambda: amqp_faststream(amqp_url, n),
                    "stanchion": lambda: stanchion_bench(
                        amqp_url + f"?prefix=bench{uuid.uuid4().hex[:6]}", n
                    ),
                },
            )
        )
    if "mqtt" in only:
        plans.append(
            (
                "MQTT (Mosquitto)",
                {
                    "raw aiomqtt": lambda: mqtt_raw(mqtt_url, n),
                    "stanchion": lambda: mqtt_stanchion(mqtt_url, n),
                },
            )
        )
    if "sqlite" in only:
        plans.append(
            (
                "SQLite (embedded)",
                {"stanchion": lambda: stanchion_bench(f"sqlite:///{tmp}/bench.db", n)},
            )
        )
    print(
        f"{n} messages of 1 KB per measure, median of {rounds} interleaved rounds; "
        "msg/s (ratio to the raw client)\n"
    )
    results: dict[tuple[str, str], list[Result]] = {}
    for r in range(rounds):
        for broker, runners in plans:
            for client, fn in runners.items():
                try:
                    res = await fn()
                except Exception as exc:
                    print(f"  {broker} {client}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    res = {}
                results.setdefault((broker, client), []).append(res)
        print(f"  round {r + 1} done", file=sys.stderr, flush=True)
    print("| broker | client | publish, awaited | publish, batched | end to end with acks |")
    print("|---|---|---:|---:|---:|")
    for broker, runners in plans:
        base: Result = {}
        for client in runners:
            runs = results[(broker, client)]
            res: Result = {}
            for k in ("pub", "pub_batch", "e2e"):
                vals = sorted(v for x in runs if (v := x.get(k)) is not None)
                res[k] = statistics.median(vals) if vals else None
            if client.startswith("raw"):
                base = res
            cells = [
                fmt(res.get(k)) + ratio(res.get(k), base.get(k))
                for k in ("pub", "pub_batch", "e2e")
            ]
            print(f"| {broker} | {client} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--only", default="redis,nats,amqp,mqtt,sqlite")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    asyncio.run(run(args.n, set(args.only.split(",")), args.rounds))


if __name__ == "__main__":
    main()
