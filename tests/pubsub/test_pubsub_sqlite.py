"""SQLite: several OS processes share one broker file; retention trims what no group needs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

from stanchion.pubsub import Broker
from stanchion.testing.conformance.pubsub import Sink, eventually

_WORKER = r"""
import asyncio, sys
from stanchion.pubsub import Broker
async def main():
    async with await Broker.connect(sys.argv[1]) as broker:
        async def handler(msg):
            await asyncio.sleep(0.005)
            print(msg.id, flush=True)
        await broker.subscribe("jobs", handler, group="workers", prefetch=8, ack_timeout=5)
        print("ready", flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


async def test_processes_share_a_group(sqlite_url: str) -> None:
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WORKER, sqlite_url, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for _ in range(2)
    ]  # fmt: skip
    seen: Counter[str] = Counter()
    per_proc = [0, 0]
    ready = [False, False]

    async def read(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            text = line.decode().strip()
            if text == "ready":
                ready[i] = True
            else:
                seen[text] += 1
                per_proc[i] += 1

    readers = [asyncio.create_task(read(i, p)) for i, p in enumerate(procs)]
    try:
        # both subscribed before anything is published (start-up is slow on a busy host)
        await eventually(lambda: all(ready), timeout=60, what="both workers subscribed")
        async with await Broker.connect(sqlite_url) as broker:
            ids = []
            for _ in range(10):
                ids += await broker.publish_many("jobs", [{"n": i} for i in range(30)])
                await asyncio.sleep(0.02)
            await eventually(lambda: sum(seen.values()) >= 300, timeout=30, what="300 jobs")
            await asyncio.sleep(0.3)
        assert seen == Counter(ids), "a job was lost or handled twice across processes"
        assert all(n > 0 for n in per_proc), per_proc
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await p.wait()
        for r in readers:
            r.cancel()


async def test_retention_trims_only_what_groups_do_not_need(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db?retention=0"
    async with await Broker.connect(url) as broker:
        sink = Sink()
        sub = await broker.subscribe("a", sink, group="fast")
        await broker.declare("b", group="idle")  # never consumes
        await broker.publish_many("a", [b"x"] * 3000)
        b_ids = await broker.publish_many("b", [b"y"] * 10)
        await eventually(lambda: len(sink.messages) == 3000, timeout=30)
        await sub.stop()
        await broker.publish_many("a", [b"x"] * 2000)  # crosses the trim threshold
        drv = broker.driver
        left = await drv._run(  # type: ignore[attr-defined]
            lambda: drv._db.execute(
                "SELECT topic, COUNT(*) FROM messages GROUP BY topic"
            ).fetchall()  # type: ignore[attr-defined]
        )
        counts = dict(left)
        assert counts["b"] == 10  # the idle group still needs them
        assert counts["a"] <= 2000  # the consumed ones of "a" are gone
        idle = Sink()
        await broker.subscribe("b", idle, group="idle")
        await eventually(lambda: len(idle.messages) == 10)
        assert idle.ids == b_ids
