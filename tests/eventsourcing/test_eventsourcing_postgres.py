"""PostgreSQL specifics: LISTEN/NOTIFY wake-ups across stores, rolled-back gaps."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import asyncpg

from stanchion.eventsourcing import EventStore, NewEvent, RecordedEvent


async def test_live_subscriber_is_woken_by_notify_from_another_store(postgres_url: str) -> None:
    # idle=60: without a NOTIFY the subscriber would not look again for a minute
    async with (
        await EventStore.connect(postgres_url + "?idle=60") as reader,
        await EventStore.connect(postgres_url) as writer,
    ):
        got: list[RecordedEvent] = []

        async def follow() -> None:
            async for e in reader.subscribe():
                got.append(e)
                if len(got) == 2:
                    return

        task = asyncio.create_task(follow())
        try:
            await asyncio.sleep(1.0)  # past the subscriber's start-up re-read
            t0 = time.monotonic()
            await writer.append("n", [NewEvent("A", {})])
            await asyncio.sleep(0.3)
            await writer.append("n", [NewEvent("B", {})])
            await asyncio.wait_for(task, 10)
            assert time.monotonic() - t0 < 5
        finally:
            task.cancel()
        assert [e.type for e in got] == ["A", "B"]


async def test_subscriber_skips_positions_of_rolled_back_transactions(postgres_url: str) -> None:
    async with await EventStore.connect(postgres_url) as store:
        await store.append("g", [NewEvent("Before", {})])
        conn = await asyncpg.connect(postgres_url)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.fetchrow(
                "SELECT * FROM es_append($1, -2, $2, $3, $4, $5, $6)",
                "other", [uuid.uuid4()], ["Lost"], [b"{}"], [False], [None],
            )  # fmt: skip
            got: list[RecordedEvent] = []

            async def follow() -> None:
                async for e in store.subscribe():
                    got.append(e)
                    if len(got) == 2:
                        return

            task = asyncio.create_task(follow())
            await store.append("g", [NewEvent("After", {})])
            await asyncio.sleep(0.3)
            assert [e.type for e in got] == ["Before"]  # held at the open transaction's gap
            await tx.rollback()
            await asyncio.wait_for(task, 10)
            assert [e.type for e in got] == ["Before", "After"]
        finally:
            with contextlib.suppress(Exception):
                task.cancel()
            await conn.close()
