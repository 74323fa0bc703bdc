"""A rebuild never swaps in a view that skipped an event still in an open transaction."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stanchion.cqrs import Projection, ProjectionRunner, ReadModel, handles
from stanchion.eventsourcing import EventStore, NewEvent
from stanchion.testing.conformance.eventsourcing import _hold

pytestmark = pytest.mark.timeout(60)


class Seen(Projection):
    name = "seen"

    async def setup(self, tx: Any) -> None:
        await tx.execute("CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY)")

    @handles("Tick")
    async def on_tick(self, event: Any, tx: Any) -> None:
        await tx.execute("INSERT INTO seen (n) VALUES (?)", event.data["n"])


async def test_rebuild_waits_for_an_open_transaction(postgres_url: str, sqlite_url: str) -> None:
    store = await EventStore.connect(postgres_url)
    holder = await EventStore.connect(postgres_url)
    try:
        await store.append("a", [NewEvent("Tick", {"n": 1})])
        opened, release = asyncio.Event(), asyncio.Event()
        held = asyncio.create_task(
            _hold(holder, "b", [NewEvent("Tick", {"n": 2})], opened, release)
        )
        await asyncio.wait_for(opened.wait(), 10)
        late = await store.append("c", [NewEvent("Tick", {"n": 3})])  # commits first
        async with await ReadModel.connect(sqlite_url) as rm:
            runner = ProjectionRunner(store, Seen(), rm)
            rebuild = asyncio.create_task(runner.rebuild())
            await asyncio.sleep(0.5)
            assert not rebuild.done(), "the rebuild swapped in a view past an open transaction"
            release.set()
            result = await asyncio.wait_for(held, 10)
            assert result.first_position < late.first_position  # it really was out of order
            checkpoint = await asyncio.wait_for(rebuild, 20)
            rows = [r[0] for r in await rm.fetchall("SELECT n FROM seen ORDER BY n")]
            assert rows == [1, 2, 3]
            assert checkpoint.position == late.last_position
    finally:
        await holder.close()
        await store.close()
