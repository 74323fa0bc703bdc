"""Real OS processes: schema creation races and SIGKILL in the middle of appends."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter, defaultdict

import pytest

from stanchion.eventsourcing import EventStore
from stanchion.testing.pytest_plugin import backend_params

pytestmark = pytest.mark.slow


@pytest.fixture(params=backend_params("sqlite", "postgresql"))
def url(request: pytest.FixtureRequest) -> str:
    fixture = {"sqlite": "sqlite_url", "postgresql": "postgres_url"}
    return str(request.getfixturevalue(fixture[request.param]))


STARTER = textwrap.dedent(
    """
    import asyncio, sys, time
    from stanchion.eventsourcing import EventStore, NewEvent

    async def main(url, start, n):
        while time.time() < start:
            time.sleep(0.001)
        async with await EventStore.connect(url) as store:
            await store.append("started", [NewEvent("Started", {"n": n})])

    asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
    """
)


def test_processes_starting_at_once_create_the_schema_once(url: str) -> None:
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, url, str(start), str(n)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(6)
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        if proc.returncode != 0:
            errors.append(err)
    assert not errors, errors[0]

    async def check() -> list[int]:
        async with await EventStore.connect(url) as store:
            return sorted([e.data["n"] async for e in store.read_stream("started")])

    import asyncio

    assert asyncio.run(check()) == list(range(6))


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from stanchion.eventsourcing import EventStore, NewEvent

    async def main(url):
        async with await EventStore.connect(url) as store:
            i = 0
            while True:
                events = [NewEvent("Moved", {"batch": i, "k": k, "pad": "x" * 200})
                          for k in range(200)]
                await store.append(f"acct-{i % 5}", events)
                print(i, flush=True)
                i += 1

    asyncio.run(main(sys.argv[1]))
    """
)


def test_sigkill_mid_append_leaves_no_partial_batch(url: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for _ in range(15):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else "writer died"
        time.sleep(0.003)  # land somewhere inside the next append
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite://")
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()

    import asyncio

    from stanchion.eventsourcing import NewEvent

    async def check() -> None:
        async with await EventStore.connect(url) as store:
            events = [e async for e in store.read_all()]
            positions = [e.position for e in events]
            assert positions == sorted(set(positions))
            sizes = Counter(e.data["batch"] for e in events)
            assert len(sizes) >= 15
            assert set(sizes.values()) == {200}, "a partial batch survived the crash"
            versions: dict[str, list[int]] = defaultdict(list)
            for e in events:
                versions[e.stream].append(e.version)
            for stream, got in versions.items():
                assert got == list(range(len(got))), stream
            # the store still works
            r = await store.append("acct-0", [NewEvent("After", {})], len(versions["acct-0"]) - 1)
            assert r.first_version == len(versions["acct-0"])

    asyncio.run(check())
