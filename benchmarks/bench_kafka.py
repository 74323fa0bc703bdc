"""Pub/sub on Kafka: stanchion vs raw aiokafka vs FastStream's KafkaBroker, in one run.

Starts a throwaway Tansu (Kafka-protocol broker, storage in memory) on a free
loopback port and measures, with 1 KB messages and ``acks=all``:

* publish, awaited: one message at a time, each acknowledged by the broker;
* publish, batched: batches of 100 in flight (aiokafka: 100 ``send`` futures
  gathered; FastStream: 100 ``publish(no_confirm=True)`` futures gathered;
  stanchion: ``publish_many``);
* end to end: 2N messages already stored, a fresh consumer group reads them
  all and commits only what was handled (raw: ``getmany``, an ``await
  handler(record)`` per message, a ``commit`` per batch; FastStream:
  ``AckPolicy.ACK``, a commit per message; stanchion: its runtime, with
  commits past finished messages). Timed from the first message received, so
  the group join (Tansu holds it half a session timeout) is left out for every
  client.

Usage::

    .venv/bin/python benchmarks/bench_kafka.py [-n 2000] [--rounds 3]

Numbers are msg/s; the machine is shared and noisy, so compare the ratios taken
side by side in the same run. Tansu grants no idempotent producer id, so every
client publishes with ``acks=all`` without idempotence here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stanchion.pubsub import Broker, Message
from stanchion.testing.servers import kafka_server

PAYLOAD = os.urandom(512).hex().encode()  # 1024 bytes
BATCH = 100
SESSION_MS = 1000  # Tansu holds a new group's join for half the session timeout
Result = dict[str, float | None]

logging.disable(logging.WARNING)  # FastStream logs every message; aiokafka logs Tansu's no-PID
warnings.filterwarnings("ignore", category=RuntimeWarning)


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


class Counter:
    """Counts received messages and remembers when the first arrived."""

    def __init__(self) -> None:
        self.n = 0
        self.first = 0.0

    def hit(self, k: int = 1) -> None:
        if self.n == 0:
            self.first = time.perf_counter()
        self.n += k

    async def until(self, n: int, limit: float = 120.0) -> float:
        deadline = time.perf_counter() + limit
        while self.n < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {self.n} of {n} consumed")
            await asyncio.sleep(0.001)
        return rate(n - 1, time.perf_counter() - self.first)


# -- stanchion -----------------------------------------------------------------


async def stanchion_bench(bootstrap: str, n: int) -> Result:
    url = f"kafka://{bootstrap}?prefix=st{uuid.uuid4().hex[:6]}&session_timeout=1"
    out: Result = {}
    async with await Broker.connect(url) as broker:
        await broker.declare("bench", group="g")

        async def pub() -> None:
            for _ in range(n):
                await broker.publish("bench", PAYLOAD)

        async def pub_many() -> None:
            for start in range(0, n, BATCH):
                await broker.publish_many("bench", [PAYLOAD] * min(BATCH, n - start))

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(n, await timed(pub_many))
        got = Counter()

        async def handler(msg: Message) -> None:
            got.hit()

        sub = await broker.subscribe("bench", handler, group="g", prefetch=512)
        out["e2e"] = await got.until(2 * n)
        await sub.stop()
    return out


# -- raw aiokafka --------------------------------------------------------------------


async def raw_bench(bootstrap: str, n: int) -> Result:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"raw{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1)])
    await admin.close()
    out: Result = {}
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1_000_000
    )
    await producer.start()
    try:

        async def pub() -> None:
            for _ in range(n):
                await producer.send_and_wait(topic, PAYLOAD)

        async def pub_batch() -> None:
            for start in range(0, n, BATCH):
                futs = [await producer.send(topic, PAYLOAD) for _ in range(min(BATCH, n - start))]
                await asyncio.gather(*futs)

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(n, await timed(pub_batch))
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="g",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=SESSION_MS // 3,
    )
    await consumer.start()
    got = Counter()

    async def handle(record: Any) -> None:
        got.hit()

    try:
        while got.n < 2 * n:
            batches = await consumer.getmany(timeout_ms=500, max_records=512)
            for tp, records in batches.items():
                for record in records:
                    await handle(record)
                await consumer.commit({tp: records[-1].offset + 1})
        out["e2e"] = rate(2 * n - 1, time.perf_counter() - got.first)
    finally:
        await consumer.stop()
    return out


# -- FastStream ----------------------------------------------------------------------


async def faststream_bench(bootstrap: str, n: int) -> Result:
    from faststream import AckPolicy
    from faststream.kafka import KafkaBroker

    topic = f"fs{uuid.uuid4().hex[:8]}"
    out: Result = {}
    got = Counter()
    broker = KafkaBroker(bootstrap, acks="all", max_batch_size=1_000_000, logger=None)

    @broker.subscriber(
        topic,
        group_id="g",
        auto_offset_reset="earliest",
        ack_policy=AckPolicy.ACK,
        session_timeout_ms=SESSION_MS,
        heartbeat_interval_ms=SESSION_MS // 3,
    )
    async def handle(body: bytes) -> None:
        got.hit()

    await broker.connect()
    try:

        async def pub() -> None:
            for _ in range(n):
                await broker.publish(PAYLOAD, topic)

        async def pub_batch() -> None:
            for start in range(0, n, BATCH):
                futs = [
                    await broker.publish(PAYLOAD, topic, no_confirm=True)
                    for _ in range(min(BATCH, n - start))
                ]
                await asyncio.gather(*futs)  # type: ignore[arg-type]

        out["pub"] = rate(n, await timed(pub))
        out["pub_batch"] = rate(n, await timed(pub_batch))
        await broker.start()
        out["e2e"] = await got.until(2 * n)
    finally:
        await broker.stop()
    return out


# -- the run ---------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f" ({a / b:.2f}x)"


async def run(bootstrap: str, n: int, rounds: int) -> None:
    runners: dict[str, Callable[[], Awaitable[Result]]] = {
        "raw aiokafka": lambda: raw_bench(bootstrap, n),
        "FastStream": lambda: faststream_bench(bootstrap, n),
        "stanchion": lambda: stanchion_bench(bootstrap, n),
    }
    print(
        f"{n} messages of 1 KB per measure (end to end: {2 * n}), acks=all, Tansu in memory, "
        f"median of {rounds} interleaved rounds; msg/s (ratio to raw aiokafka)\n"
    )
    results: dict[str, list[Result]] = {}
    for r in range(rounds):
        for client, fn in runners.items():
            try:
                res = await fn()
            except Exception as exc:
                print(f"  {client}: {type(exc).__name__}: {exc}", file=sys.stderr)
                res = {}
            results.setdefault(client, []).append(res)
        print(f"  round {r + 1} done", file=sys.stderr, flush=True)
    print("| client | publish, awaited | publish, batched | end to end with commits |")
    print("|---|---:|---:|---:|")
    base: Result = {}
    for client in runners:
        res: dict[str, Any] = {}
        for k in ("pub", "pub_batch", "e2e"):
            vals = sorted(v for x in results[client] if (v := x.get(k)) is not None)
            res[k] = statistics.median(vals) if vals else None
        if client.startswith("raw"):
            base = res
        cells = [fmt(res[k]) + ratio(res[k], base.get(k)) for k in ("pub", "pub_batch", "e2e")]
        print(f"| {client} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    server = kafka_server(Path(tempfile.mkdtemp(prefix="bench-kafka-")))
    try:
        asyncio.run(run(f"127.0.0.1:{server.port}", args.n, args.rounds))
    finally:
        server.remove()


if __name__ == "__main__":
    main()
