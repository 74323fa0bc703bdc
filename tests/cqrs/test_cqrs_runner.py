"""Runner details: fencing of a deposed leader, election in-process, outbox, metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stanchion.cqrs import Outbox, Projection, ProjectionRunner, ReadModel, handles
from stanchion.errors import ConfigError
from stanchion.observability import Metrics
from stanchion.testing.conformance.cqrs import Totals, read_totals
from stanchion.testing.eventlog import ListEventLog


class FakeLease:
    def __init__(self, token: int) -> None:
        self.token = token
        self.lost = asyncio.Event()
        self.valid = True

    def is_valid(self) -> bool:
        return self.valid and not self.lost.is_set()


class FakeElector:
    """Grants the given tokens in turn, one term per ``leadership()``."""

    def __init__(self, *tokens: int) -> None:
        self.tokens = list(tokens)
        self.terms: list[FakeLease] = []
        self.granted = asyncio.Event()

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[FakeLease]:
        while not self.tokens:  # noqa: ASYNC110 - tests append tokens at any time
            await asyncio.sleep(0.01)
        lease = FakeLease(self.tokens.pop(0))
        self.terms.append(lease)
        self.granted.set()
        yield lease


async def test_stale_leader_batch_is_rejected(sqlite_url: str) -> None:
    log = ListEventLog()
    log.append("ItemAdded", {"sku": "a", "qty": 1})
    async with await ReadModel.connect(sqlite_url) as rm:
        # A newer leader (token 7) already wrote the checkpoint at position 1.
        tx = await rm.begin("totals")
        await Totals().setup(tx)
        await tx.execute("INSERT INTO totals VALUES ('a', 1)")
        await tx.commit(0, 1, 7)
        log.append("ItemAdded", {"sku": "a", "qty": 5})
        elector = FakeElector(5)  # this replica's term is older: token 5
        runner = ProjectionRunner(log, Totals(), rm, elector=elector, retry_interval=0.01)
        task = asyncio.ensure_future(runner.run())
        try:
            await asyncio.wait_for(elector.granted.wait(), 5)
            await asyncio.sleep(0.3)
            # Its batch was rolled back: the view and checkpoint are the newer leader's.
            assert await read_totals(rm) == {"a": 1}
            cp = await rm.checkpoint("totals")
            assert (cp.position, cp.token) == (1, 7)
            assert not runner.is_leader  # it stepped down and campaigns again
            assert len(elector.terms) == 1
            elector.tokens.append(8)  # elected again, with a newer term
            await runner.wait_for(2, timeout=5)
            assert await read_totals(rm) == {"a": 6}
            assert (await rm.checkpoint("totals")).token == 8
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_lost_lease_stops_projecting(sqlite_url: str) -> None:
    log = ListEventLog()
    async with await ReadModel.connect(sqlite_url) as rm:
        elector = FakeElector(1, 2)
        runner = ProjectionRunner(log, Totals(), rm, elector=elector, retry_interval=0.01)
        task = asyncio.ensure_future(runner.run())
        try:
            log.append("ItemAdded", {"sku": "a", "qty": 1})
            await runner.wait_for(1, timeout=5)
            assert runner.token == 1
            elector.terms[0].lost.set()
            await asyncio.sleep(0.1)
            assert runner.token == 2  # campaigned again and got term 2
            log.append("ItemAdded", {"sku": "a", "qty": 1})
            await runner.wait_for(2, timeout=5)
            assert (await rm.checkpoint("totals")).token == 2
            # A lease that expired locally is not used for a commit.
            elector.terms[1].valid = False
            log.append("ItemAdded", {"sku": "a", "qty": 1})
            await asyncio.sleep(0.2)
            assert (await rm.checkpoint("totals")).position == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_two_runners_one_projects_with_real_election(tmp_path: Path) -> None:
    from stanchion.election import LeaderElector

    election = f"sqlite:///{tmp_path / 'election.db'}"
    views = f"sqlite:///{tmp_path / 'views.db'}"
    log = ListEventLog()
    async with await ReadModel.connect(views) as rm:
        electors = [
            LeaderElector.from_url(election, "projections.totals", f"n{i}", ttl=1.0)
            for i in range(2)
        ]
        runners = [ProjectionRunner(log, Totals(), rm, elector=e) for e in electors]
        tasks = [asyncio.ensure_future(r.run()) for r in runners]
        try:
            for _ in range(50):
                log.append("ItemAdded", {"sku": "a", "qty": 1})
            await runners[0].wait_for(50, timeout=10)
            assert sum(r.is_leader for r in runners) == 1
            leader = 0 if runners[0].is_leader else 1
            tasks[leader].cancel()  # resigns on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await tasks[leader]
            for _ in range(50):
                log.append("ItemAdded", {"sku": "a", "qty": 1})
            other = runners[1 - leader]
            await other.wait_for(100, timeout=10)
            assert other.is_leader
            assert await read_totals(rm) == {"a": 100}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for e in electors:
                await e.aclose()


async def test_lag_and_metrics(sqlite_url: str) -> None:
    log = ListEventLog()
    for _ in range(10):
        log.append("ItemAdded", {"sku": "a", "qty": 1})
    metrics = Metrics()
    async with await ReadModel.connect(sqlite_url) as rm:
        runner = ProjectionRunner(log, Totals(), rm, metrics=metrics)
        lag = await runner.lag()
        assert lag.events == 10 and lag.seconds is not None and lag.seconds >= 0
        task = asyncio.ensure_future(runner.run())
        try:
            await runner.wait_for(10, timeout=5)
            assert (await runner.lag()).events == 0
            status = await runner.status()
            assert (status.checkpoint, status.head, status.parked) == (10, 10, 0)
            text = metrics.render().decode()
            assert 'stanchion_cqrs_projection_checkpoint{projection="totals"} 10.0' in text
            assert 'stanchion_cqrs_projection_events_total{projection="totals"} 10.0' in text
            assert "stanchion_cqrs_projection_lag_events" in text
            assert "stanchion_cqrs_projection_lag_seconds" in text
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_outbox_leader_elected_and_resumable(tmp_path: Path) -> None:
    from stanchion.election import LeaderElector
    from stanchion.pubsub import Broker, Message

    log = ListEventLog()
    got: list[Message] = []

    async def handler(msg: Message) -> None:
        got.append(msg)

    election = f"sqlite:///{tmp_path / 'election.db'}"
    cp = f"sqlite:///{tmp_path / 'outbox.db'}"
    async with await Broker.connect(f"memory://outbox-{tmp_path.name}") as broker:
        sub = await broker.subscribe("orders.events", handler, group="audit")
        electors = [LeaderElector.from_url(election, "outbox", f"r{i}", ttl=1.0) for i in range(2)]
        relays = [Outbox(log, broker, "orders.events", checkpoint=cp, elector=e) for e in electors]
        tasks = [asyncio.ensure_future(r.run()) for r in relays]
        try:
            events = [log.append("ItemAdded", {"sku": f"s{i}", "qty": i}) for i in range(30)]
            await relays[0].wait_for(30, timeout=10)
            for _ in range(100):
                if len(got) >= 30:
                    break
                await asyncio.sleep(0.02)
            tasks[0].cancel()
            tasks[1].cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Restarted relays resume from the checkpoint: nothing is sent twice.
            tasks = [asyncio.ensure_future(r.run()) for r in relays]
            events += [log.append("ItemAdded", {"sku": "late", "qty": 1})]
            await relays[1].wait_for(31, timeout=10)
            for _ in range(100):
                if len(got) >= 31:
                    break
                await asyncio.sleep(0.02)
            assert [m.id for m in got] == [str(e.id) for e in events]
            assert got[0].headers["x-event-type"] == "ItemAdded"
            assert got[0].headers["x-position"] == "1"
            assert got[0].json() == {"sku": "s0", "qty": 0}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sub.stop()
            for e in electors:
                await e.aclose()


def test_runner_and_projection_validation(sqlite_url: str) -> None:
    class Nameless(Projection):
        pass

    with pytest.raises(ConfigError, match="no name"):
        Nameless()
    with pytest.raises(ConfigError, match="invalid projection name"):

        class Bad(Projection):
            name = "drop table;"

    with pytest.raises(ConfigError, match="handled by both"):

        class Twice(Projection):
            name = "twice"

            @handles("X")
            async def a(self, e: Any, tx: Any) -> None: ...

            @handles("X")
            async def b(self, e: Any, tx: Any) -> None: ...

    with pytest.raises(ConfigError, match="batch_size"):
        ProjectionRunner(ListEventLog(), Totals(), sqlite_url, batch_size=0)
    with pytest.raises(ConfigError, match="read_model"):
        ProjectionRunner(ListEventLog(), Totals())


async def test_read_model_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stanchion\[|unknown|no backend|scheme"):
        await ReadModel.connect("mongodb://localhost/x")
    with pytest.raises(ConfigError, match="needs a file"):
        await ReadModel.connect("sqlite://")


async def test_event_types_applied_by_aggregates_are_known(sqlite_url: str) -> None:
    import msgspec

    from stanchion.eventsourcing import Aggregate, applies

    class CouponIssued(msgspec.Struct, frozen=True):
        code: str

    class Coupon(Aggregate):
        @applies(CouponIssued)
        def _issued(self, e: CouponIssued) -> None:
            pass

    log = ListEventLog()
    log.append("ItemAdded", {"sku": "a", "qty": 1})
    log.append("CouponIssued", {"code": "x"})  # no projection handles it, an aggregate does
    log.append("ItemAdded", {"sku": "a", "qty": 1})
    async with await ReadModel.connect(sqlite_url) as rm:
        runner = ProjectionRunner(log, Totals(), rm)
        task = asyncio.ensure_future(runner.run())
        try:
            await runner.wait_for(3, timeout=5)
            assert await read_totals(rm) == {"a": 2}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert Coupon  # keep the class alive until here
