"""Real OS processes: SIGKILL mid-batch, leader failover, outbox across a relay restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stanchion.cqrs import ReadModel
from stanchion.eventsourcing import ANY, EventStore, NewEvent

HERE = Path(__file__).resolve().parent
PROCS = str(HERE / "cqrs_procs.py")

pytestmark = pytest.mark.slow


class Procs:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.children: list[subprocess.Popen[bytes]] = []

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = dict(os.environ)
        full["PYTHONPATH"] = os.pathsep.join([str(HERE), full.get("PYTHONPATH", "")])
        full.update(env or {})
        log = open(self.tmp / f"child-{len(self.children)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, PROCS, *args], stdout=log, stderr=subprocess.STDOUT, env=full
        )
        self.children.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- child {i}\n" + (self.tmp / f"child-{i}.log").read_text(errors="replace")[-3000:]
            for i in range(len(self.children))
        )

    def close(self) -> None:
        for p in self.children:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


async def _append(store: EventStore, start: int, count: int, per_append: int = 200) -> None:
    i = start
    end = start + count
    while i < end:
        n = min(per_append, end - i)
        events = [
            NewEvent("Counted", {"key": f"k{j % 13}", "n": j % 7 + 1}) for j in range(i, i + n)
        ]
        await store.append(f"tally-{i % 5}", events, ANY)
        i += n


def _replay(count: int) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for j in range(count):
        k = f"k{j % 13}"
        total, events = out.get(k, (0, 0))
        out[k] = (total + j % 7 + 1, events + 1)
    return out


async def _view(rm: ReadModel) -> tuple[dict[str, tuple[int, int]], list[int]]:
    tally = {
        r[0]: (int(r[1]), int(r[2]))
        for r in await rm.fetchall("SELECT k, total, events FROM tally")
    }
    seen = [int(r[0]) for r in await rm.fetchall("SELECT position FROM seen ORDER BY position")]
    return tally, seen


async def _wait(cond: Any, timeout: float, what: str, procs: Procs) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while True:
        if await cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{procs.logs()}")
        await asyncio.sleep(0.05)


async def _checkpoint(rm: ReadModel, name: str = "tally") -> Any:
    return await rm.checkpoint(name)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("views", ["sqlite", "postgresql"])
async def test_sigkill_mid_batch_then_restart_equals_single_replay(
    views: str, tmp_path: Path, procs: Procs, request: pytest.FixtureRequest
) -> None:
    if views == "postgresql":  # event store, views and checkpoint in one database
        store_url = views_url = request.getfixturevalue("postgres_url")
    else:
        store_url = f"sqlite:///{tmp_path / 'events.db'}"
        views_url = f"sqlite:///{tmp_path / 'views.db'}"
    total = 3000
    trap_at = 1850
    trap_file = tmp_path / "trapped"
    async with await EventStore.connect(store_url) as store:
        await _append(store, 0, total)
        assert await store.head_position() == total
    child = procs.spawn(
        "runner",
        store_url,
        views_url,
        env={"TRAP_AT": str(trap_at), "TRAP_FILE": str(trap_file), "BATCH": "500"},
    )

    async def trapped() -> bool:
        assert child.poll() is None, procs.logs()
        return trap_file.exists()

    await _wait(trapped, 60, "the runner to reach the trap", procs)
    async with await ReadModel.connect(views_url) as rm:
        before = (await _checkpoint(rm)).position
        _kill(child)  # SIGKILL while the batch holding position trap_at is open
        assert before < trap_at
        cp = await _checkpoint(rm)
        assert cp.position == before
        tally, seen = await _view(rm)
        # The view holds exactly the committed events: nothing of the killed batch.
        assert seen == list(range(1, cp.position + 1))
        assert tally == _replay(cp.position)

        procs.spawn("runner", store_url, views_url, env={"BATCH": "500"})

        async def done() -> bool:
            return (await _checkpoint(rm)).position == total

        await _wait(done, 60, "the restarted runner to catch up", procs)
        tally, seen = await _view(rm)
        assert seen == list(range(1, total + 1))  # no gap, no duplicate
        assert tally == _replay(total)  # no double count


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
async def test_two_runners_with_election_failover(
    engine: str, tmp_path: Path, procs: Procs, request: pytest.FixtureRequest
) -> None:
    from stanchion.election import LeaderElector

    if engine == "postgresql":
        store_url = views_url = election = request.getfixturevalue("postgres_url")
    else:
        store_url = f"sqlite:///{tmp_path / 'events.db'}"
        views_url = f"sqlite:///{tmp_path / 'views.db'}"
        election = f"sqlite:///{tmp_path / 'election.db'}"
    first, more = 800, 800
    async with await EventStore.connect(store_url) as store:
        await _append(store, 0, first)
        children = {
            ident: procs.spawn(
                "runner", store_url, views_url, election, ident, env={"BATCH": "100"}
            )
            for ident in ("node-a", "node-b")
        }
        observer = LeaderElector.from_url(election, "projections.tally", "observer", ttl=1.0)
        rm = await ReadModel.connect(views_url)
        try:

            async def has_leader_progress() -> bool:
                cp = await _checkpoint(rm)
                return cp.position >= 200 and await observer.leader() is not None

            await _wait(has_leader_progress, 60, "a leader to project", procs)
            writer = asyncio.ensure_future(_append(store, first, more, per_append=15))
            leader = await observer.leader()
            assert leader is not None
            old_token = (await _checkpoint(rm)).token
            assert old_token == leader.token
            _kill(children[leader.identity])
            survivor = "node-b" if leader.identity == "node-a" else "node-a"
            await writer
            total = first + more

            async def done() -> bool:
                return (await _checkpoint(rm)).position == total

            await _wait(done, 60, "the survivor to catch up", procs)
            cp = await _checkpoint(rm)
            assert cp.token is not None and cp.token > old_token
            now_leader = await observer.leader()
            assert now_leader is not None and now_leader.identity == survivor
            assert children[survivor].poll() is None
            tally, seen = await _view(rm)
            assert seen == list(range(1, total + 1))  # no gap, no duplicate
            assert tally == _replay(total)
        finally:
            await rm.close()
            await observer.aclose()


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:Redis at .* does not persist")
@pytest.mark.parametrize("broker_kind", ["sqlite", "redis"])
async def test_outbox_exactly_once_per_id_across_relay_restart(
    broker_kind: str, tmp_path: Path, procs: Procs, request: pytest.FixtureRequest
) -> None:
    from stanchion.pubsub import Broker, Message, idempotent

    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    cp_url = f"sqlite:///{tmp_path / 'outbox.db'}"
    broker_url = (
        request.getfixturevalue("redis_url")
        if broker_kind == "redis"
        else f"sqlite:///{tmp_path / 'broker.db'}"
    )
    dedupe_url = f"sqlite:///{tmp_path / 'dedupe.db'}"
    handled: list[str] = []
    deliveries: list[str] = []
    positions: dict[str, int] = {}

    def counting(handler: Any) -> Any:
        async def wrapped(msg: Message) -> Any:
            deliveries.append(msg.id)
            return await handler(msg)

        return wrapped

    async def on_event(msg: Message) -> None:
        handled.append(msg.id)
        positions[msg.id] = int(msg.headers["x-position"])

    async with (
        await EventStore.connect(store_url) as store,
        await Broker.connect(broker_url) as broker,
    ):
        sub = await broker.subscribe(
            "shop.events",
            on_event,
            group="audit",
            middleware=[counting, idempotent(dedupe_url)],
            concurrency=4,
        )
        try:
            await _append(store, 0, 1500, per_append=50)
            relay = procs.spawn("relay", store_url, cp_url, broker_url, "shop.events")
            rm = await ReadModel.connect(cp_url)
            try:

                async def progressed() -> bool:
                    assert relay.poll() is None, procs.logs()
                    return (await rm.checkpoint("outbox")).position >= 400

                await _wait(progressed, 60, "the relay to make progress", procs)
                _kill(relay)
                await _append(store, 1500, 500, per_append=50)
                procs.spawn("relay", store_url, cp_url, broker_url, "shop.events")
                total = 2000

                async def relayed() -> bool:
                    return (await rm.checkpoint("outbox")).position == total

                await _wait(relayed, 60, "the restarted relay to finish", procs)
            finally:
                await rm.close()
            ids = {str(e.id): e.position async for e in store.read_all()}

            async def received() -> bool:
                return len(handled) >= total

            await _wait(received, 60, "the subscriber to receive everything", procs)
            await asyncio.sleep(0.3)  # a late duplicate would show up here
        finally:
            await sub.stop()
    assert len(handled) == len(set(handled)) == total  # exactly once per message id
    assert set(handled) == set(ids)  # message id = event id, none missing
    assert positions == ids
    assert len(deliveries) >= total
