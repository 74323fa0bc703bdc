"""Child processes for the CQRS crash and failover tests.

    python cqrs_procs.py runner STORE VIEWS [ELECTION IDENTITY]
    python cqrs_procs.py relay STORE CHECKPOINT BROKER TOPIC [ELECTION IDENTITY]

``TRAP_AT=<position>``: the runner's handler, on reaching that position,
writes ``TRAP_FILE`` and hangs, so the parent can SIGKILL it in the middle of
a batch.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import msgspec

from stanchion.cqrs import App, Outbox, Projection, handles


class Counted(msgspec.Struct, frozen=True):
    key: str
    n: int


class Tally(Projection):
    """Non-idempotent on purpose: a replayed event shows as a double count."""

    name = "tally"

    async def setup(self, tx: Any) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS tally (k TEXT PRIMARY KEY, total BIGINT NOT NULL, "
            "events BIGINT NOT NULL)"
        )
        await tx.execute("CREATE TABLE IF NOT EXISTS seen (position BIGINT NOT NULL)")

    @handles(Counted)
    async def on_counted(self, e: Counted, tx: Any) -> None:
        pos = tx.event.position
        trap = os.environ.get("TRAP_AT")
        if trap and pos == int(trap):
            Path(os.environ["TRAP_FILE"]).write_text(str(pos))  # noqa: ASYNC240
            await asyncio.sleep(3600)
        await tx.execute(
            "INSERT INTO tally VALUES (?, ?, 1) ON CONFLICT (k) DO UPDATE SET "
            "total = tally.total + excluded.total, events = tally.events + 1",
            e.key,
            e.n,
        )
        await tx.execute("INSERT INTO seen VALUES (?)", pos)


async def _runner(store: str, views: str, election: str | None, identity: str | None) -> None:
    app = App(
        store,
        [Tally],
        views,
        election=election,
        identity=identity,
        ttl=float(os.environ.get("TTL", "2.0")),
        batch_size=int(os.environ.get("BATCH", "500")),
    )
    async with app:
        print("ready", flush=True)
        await app.run()


async def _relay(
    store_url: str,
    checkpoint: str,
    broker_url: str,
    topic: str,
    election: str | None,
    identity: str | None,
) -> None:
    from stanchion.election import LeaderElector
    from stanchion.eventsourcing import EventStore
    from stanchion.pubsub import Broker

    elector = (
        LeaderElector.from_url(election, "outbox", identity or "relay", ttl=1.0)
        if election
        else None
    )
    async with (
        await EventStore.connect(store_url) as store,
        await Broker.connect(broker_url) as broker,
    ):
        outbox = Outbox(store, broker, topic, checkpoint=checkpoint, elector=elector, batch_size=50)
        async with outbox:
            print("ready", flush=True)
            await outbox.run()


def main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "runner":
        store, views = argv[1], argv[2]
        election = argv[3] if len(argv) > 3 else None
        identity = argv[4] if len(argv) > 4 else None
        asyncio.run(_runner(store, views, election, identity))
    elif kind == "relay":
        store, cp, broker, topic = argv[1:5]
        election = argv[5] if len(argv) > 5 else None
        identity = argv[6] if len(argv) > 6 else None
        asyncio.run(_relay(store, cp, broker, topic, election, identity))
    else:
        raise SystemExit(f"unknown kind {kind!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
