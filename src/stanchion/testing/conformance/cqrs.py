"""Conformance suite for CQRS read-model backends (SQLite, PostgreSQL, Redis, yours).

Run it from a test module with a ``backend_url`` fixture naming a read-model
URL::

    from stanchion.testing.conformance.cqrs import *  # noqa: F403

Every test drives a :class:`~stanchion.cqrs.ProjectionRunner` over an
in-memory event log into the backend, with a projection whose effects are
*not* idempotent (it adds quantities), so an event applied twice or skipped
shows in the view.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from stanchion.cqrs import Projection, ProjectionError, ProjectionRunner, ReadModel, handles
from stanchion.testing.eventlog import ListEventLog

__all__ = [
    "ItemAdded",
    "ItemRemoved",
    "Totals",
    "read_totals",
    "test_batch_failure_replays_one_by_one",
    "test_catch_up_then_live",
    "test_database_error_stops_on_its_event",
    "test_decode_error_stops",
    "test_fencing_rejects_stale_token",
    "test_parked_list",
    "test_rebuild_swaps_while_serving",
    "test_restart_resumes_without_duplicates",
    "test_unknown_event_type_stops",
    "test_wait_for",
]


class ItemAdded(msgspec.Struct):
    """Test event: ``qty`` more of ``sku``."""

    sku: str
    qty: int


class ItemRemoved(msgspec.Struct):
    """Test event: ``qty`` fewer of ``sku``; ``qty < 0`` makes the handler raise."""

    sku: str
    qty: int


class Totals(Projection):
    """Quantity per SKU, as a SQL table or a Redis hash (picked by the backend)."""

    name = "totals"
    ignores = ("Noise",)

    async def setup(self, tx: Any) -> None:
        if hasattr(tx, "execute") and not hasattr(tx, "hincrby"):
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS totals "
                "(sku TEXT PRIMARY KEY CHECK (length(sku) < 20), qty INTEGER NOT NULL)"
            )

    async def _add(self, tx: Any, sku: str, qty: int) -> None:
        if hasattr(tx, "hincrby"):
            await tx.hincrby(f"{self.name}:totals", sku, qty)
        else:
            await tx.write(
                "INSERT INTO totals (sku, qty) VALUES (?, ?) ON CONFLICT (sku) "
                "DO UPDATE SET qty = totals.qty + excluded.qty",
                sku,
                qty,
            )

    @handles(ItemAdded)
    async def on_added(self, event: ItemAdded, tx: Any) -> None:
        await self._add(tx, event.sku, event.qty)

    @handles(ItemRemoved)
    async def on_removed(self, event: ItemRemoved, tx: Any) -> None:
        if event.qty < 0:
            raise ValueError(f"negative removal {event.qty}")
        await self._add(tx, event.sku, -event.qty)


class ParkingTotals(Totals):
    """Totals that park failing events instead of stopping."""

    name = "parking_totals"
    park_failures = True


async def read_totals(rm: ReadModel, name: str = "totals") -> dict[str, int]:
    """The view of :class:`Totals` as a dict, whatever the backend."""
    if rm.capabilities.key_value:
        raw = await rm.hgetall(f"{name}:totals")  # type: ignore[attr-defined]
        return {k: int(v) for k, v in raw.items()}
    return {r[0]: r[1] for r in await rm.fetchall("SELECT sku, qty FROM totals")}


@contextlib.asynccontextmanager
async def running(runner: ProjectionRunner) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``runner`` in a task for the block; cancel it afterwards."""
    task = asyncio.ensure_future(runner.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


def _expected(log: ListEventLog, upto: int | None = None) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in log.events[:upto]:
        if e.type == "ItemAdded":
            out[e.data["sku"]] = out.get(e.data["sku"], 0) + e.data["qty"]
        elif e.type == "ItemRemoved":
            out[e.data["sku"]] = out.get(e.data["sku"], 0) - e.data["qty"]
    return out


def _fill(log: ListEventLog, n: int) -> None:
    for i in range(n):
        log.append("ItemAdded", {"sku": f"s{i % 7}", "qty": i % 5 + 1}, stream=f"cart-{i % 3}")
        if i % 4 == 0:
            log.append("Noise", {})


async def test_catch_up_then_live(backend_url: str) -> None:
    log = ListEventLog()
    _fill(log, 1200)
    async with await ReadModel.connect(backend_url) as rm:
        runner = ProjectionRunner(log, Totals(), rm, batch_size=100)
        async with running(runner):
            await runner.wait_for(log.head_position(), timeout=30)
            assert await read_totals(rm) == _expected(log)
            for i in range(20):
                log.append("ItemAdded", {"sku": "live", "qty": 1})
                await runner.wait_for(log.head_position(), timeout=5)
                assert (await read_totals(rm))["live"] == i + 1
        assert (await rm.checkpoint("totals")).position == log.head_position()
        lag = await runner.lag()
        assert lag.events == 0


async def test_restart_resumes_without_duplicates(backend_url: str) -> None:
    log = ListEventLog()
    _fill(log, 300)
    async with await ReadModel.connect(backend_url) as rm:
        r1 = ProjectionRunner(log, Totals(), rm, batch_size=50)
        async with running(r1):
            await r1.wait_for(log.head_position(), timeout=30)
        _fill(log, 200)
        r2 = ProjectionRunner(log, Totals(), rm, batch_size=50)
        async with running(r2):
            await r2.wait_for(log.head_position(), timeout=30)
        assert await read_totals(rm) == _expected(log)


async def test_batch_failure_replays_one_by_one(backend_url: str) -> None:
    log = ListEventLog()
    _fill(log, 40)
    bad = log.append("ItemRemoved", {"sku": "s1", "qty": -1})
    log.append("ItemAdded", {"sku": "after", "qty": 1})
    async with await ReadModel.connect(backend_url) as rm:
        runner = ProjectionRunner(log, Totals(), rm, batch_size=500)
        with pytest.raises(ProjectionError) as info:
            await asyncio.wait_for(runner.run(), 30)
        err = info.value
        assert err.projection == "totals"
        assert err.event_id == bad.id and err.position == bad.position
        assert str(bad.id) in str(err) and "negative removal" in str(err)
        assert isinstance(err.__cause__, ValueError)
        cp = await rm.checkpoint("totals")
        assert cp.position == bad.position - 1 == err.checkpoint
        assert await read_totals(rm) == _expected(log, bad.position - 1)
        # Restarting stops on the same event again: nothing is skipped.
        with pytest.raises(ProjectionError):
            await asyncio.wait_for(ProjectionRunner(log, Totals(), rm).run(), 30)
        assert (await rm.checkpoint("totals")).position == bad.position - 1


async def test_unknown_event_type_stops(backend_url: str) -> None:
    log = ListEventLog()
    log.append("ItemAdded", {"sku": "a", "qty": 1})
    strange = log.append("NobodyKnowsThisType", {"x": 1})
    log.append("ItemAdded", {"sku": "a", "qty": 1})
    async with await ReadModel.connect(backend_url) as rm:
        with pytest.raises(ProjectionError, match="unknown event type") as info:
            await asyncio.wait_for(ProjectionRunner(log, Totals(), rm).run(), 30)
        assert info.value.position == strange.position
        assert (await rm.checkpoint("totals")).position == strange.position - 1
        assert await read_totals(rm) == {"a": 1}


async def test_decode_error_stops(backend_url: str) -> None:
    log = ListEventLog()
    log.append("ItemAdded", {"sku": "a", "qty": 1})
    bad = log.append("ItemAdded", {"sku": "a", "qty": "not a number"})
    async with await ReadModel.connect(backend_url) as rm:
        with pytest.raises(ProjectionError, match="cannot decode") as info:
            await asyncio.wait_for(ProjectionRunner(log, Totals(), rm).run(), 30)
        assert info.value.position == bad.position
        assert (await rm.checkpoint("totals")).position == 1


async def test_database_error_stops_on_its_event(backend_url: str) -> None:
    log = ListEventLog()
    _fill(log, 50)
    bad = log.append("ItemAdded", {"sku": "x" * 30, "qty": 1})  # violates the CHECK
    _fill(log, 50)
    async with await ReadModel.connect(backend_url) as rm:
        if not rm.capabilities.sql:
            return  # key-value views have no constraints to violate (capability sql=False)
        with pytest.raises(ProjectionError) as info:
            await asyncio.wait_for(ProjectionRunner(log, Totals(), rm, batch_size=64).run(), 30)
        assert info.value.position == bad.position
        assert info.value.__cause__ is not None
        assert (await rm.checkpoint("totals")).position == bad.position - 1
        assert await read_totals(rm) == _expected(log, bad.position - 1)


async def test_parked_list(backend_url: str) -> None:
    log = ListEventLog()
    _fill(log, 30)
    bad = log.append("ItemRemoved", {"sku": "s1", "qty": -5})
    _fill(log, 30)
    async with await ReadModel.connect(backend_url) as rm:
        runner = ProjectionRunner(log, ParkingTotals(), rm, batch_size=1000)
        async with running(runner) as task:
            await runner.wait_for(log.head_position(), timeout=30)
            assert not task.done()
        parked = await runner.parked()
        assert [(p.position, p.event_id) for p in parked] == [(bad.position, str(bad.id))]
        assert "negative removal" in parked[0].error
        expected = _expected(log)
        expected["s1"] -= 5  # the parked removal is not applied
        assert await read_totals(rm, "parking_totals") == expected
        assert (await rm.checkpoint("parking_totals")).parked == 1


async def test_wait_for(backend_url: str) -> None:
    log = ListEventLog()
    async with await ReadModel.connect(backend_url) as rm:
        runner = ProjectionRunner(log, Totals(), rm)
        async with running(runner):
            with pytest.raises(TimeoutError):
                await runner.wait_for(1, timeout=0.1)
            event = log.append("ItemAdded", {"sku": "x", "qty": 3})
            await runner.wait_for(event.position, timeout=5)
            assert await read_totals(rm) == {"x": 3}
            # The read model itself can wait (a runner in another process).
            await rm.wait_for("totals", event.position, timeout=5)
            with pytest.raises(TimeoutError):
                await rm.view("totals").wait_for(event.position + 1, timeout=0.1)


async def test_fencing_rejects_stale_token(backend_url: str) -> None:
    from stanchion.errors import StaleFencingToken

    async with await ReadModel.connect(backend_url) as rm:
        tx = await rm.begin("totals")
        await tx.commit(0, 5, 7)
        tx = await rm.begin("totals")
        with pytest.raises(StaleFencingToken):
            await tx.commit(5, 6, 6)  # an older term
        assert (await rm.checkpoint("totals")).position == 5
        tx = await rm.begin("totals")
        await tx.commit(5, 6, 8)  # a newer term may write
        cp = await rm.checkpoint("totals")
        assert (cp.position, cp.token) == (6, 8)


async def test_rebuild_swaps_while_serving(backend_url: str) -> None:
    log = ListEventLog()
    _fill(log, 2000)
    async with await ReadModel.connect(backend_url) as rm:
        runner = ProjectionRunner(log, Totals(), rm, batch_size=200)
        async with running(runner):
            await runner.wait_for(log.head_position(), timeout=30)
            before = await read_totals(rm)
            assert before == _expected(log)
            stop = asyncio.Event()
            answers: list[dict[str, int]] = []

            async def query() -> None:
                while not stop.is_set():
                    answers.append(await read_totals(rm))
                    await asyncio.sleep(0)

            reader = asyncio.ensure_future(query())
            rebuilder = ProjectionRunner(log, Totals(), await ReadModel.connect(backend_url))
            try:
                cp = await rebuilder.rebuild()
            finally:
                await rebuilder.aclose()
            stop.set()
            await reader
            assert cp.position >= log.head_position()
            # Queries kept being answered, always with a complete view.
            assert len(answers) > 1
            assert all(a == before for a in answers)
            log.append("ItemAdded", {"sku": "post", "qty": 2})
            await runner.wait_for(log.head_position(), timeout=10)
            assert await read_totals(rm) == _expected(log)
