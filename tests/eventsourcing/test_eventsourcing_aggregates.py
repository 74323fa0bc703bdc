"""Aggregates, repositories and connect() errors (memory backend, no services)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import msgspec
import pytest

from stanchion.errors import ConfigError
from stanchion.eventsourcing import Aggregate, EventStore, NewEvent, Repository, applies


class Credited(msgspec.Struct, frozen=True):
    amount: Decimal
    __event_type__ = "wallet.credited"
    __event_schema__ = 2


class Wallet(Aggregate):
    stream_category = "wallet"
    balance: Decimal
    tags: set[str]

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.balance = Decimal(0)
        self.tags = set()

    def credit(self, amount: Decimal, tag: str) -> None:
        self.record(Credited(amount))
        self.tags.add(tag)

    @applies(Credited)
    def _credited(self, e: Credited) -> None:
        self.balance += e.amount


def test_event_classes_are_checked() -> None:
    @dataclasses.dataclass
    class Mutable:
        x: int

    with pytest.raises(ConfigError, match="frozen"):
        applies(Mutable)
    with pytest.raises(ConfigError):
        applies(dict)
    with pytest.raises(ConfigError):
        applies()
    with pytest.raises(ConfigError):
        Repository(None, dict)  # type: ignore[arg-type, type-var]


async def test_custom_type_names_schema_and_typed_snapshots(memory_url: str) -> None:
    async with await EventStore.connect(memory_url) as store:
        repo = Repository(store, Wallet, snapshot_every=2)
        w = Wallet("w1")
        w.credit(Decimal("1.10"), "a")
        w.credit(Decimal("2.20"), "b")
        await repo.save(w)
        recorded = [e async for e in store.read_stream("wallet-w1")]
        assert [e.type for e in recorded] == ["wallet.credited"] * 2
        assert recorded[0].metadata == {"schema": 2}
        assert recorded[0].data == {"amount": "1.10"}
        loaded = await repo.load("w1")
        assert loaded.balance == Decimal("3.30") and isinstance(loaded.balance, Decimal)
        assert loaded.tags == {"a", "b"}  # restored from the snapshot, with its type


async def test_bumping_snapshot_schema_ignores_old_snapshots(memory_url: str) -> None:
    async with await EventStore.connect(memory_url) as store:
        repo = Repository(store, Wallet, snapshot_every=1)
        w = Wallet("w2")
        w.credit(Decimal(5), "x")
        await repo.save(w)

        class Wallet2(Wallet):
            stream_category = "wallet"
            snapshot_schema = 2

        loaded = await Repository(store, Wallet2, snapshot_every=1).load("w2")
        assert loaded.balance == 5 and loaded.tags == set()  # replayed, not restored


async def test_unknown_stored_event_type_is_a_clear_error(memory_url: str) -> None:
    async with await EventStore.connect(memory_url) as store:
        await store.append("wallet-w3", [NewEvent("Mystery", {})])
        with pytest.raises(ConfigError, match="Mystery"):
            await Repository(store, Wallet).load("w3")


async def test_connect_errors() -> None:
    with pytest.raises(ConfigError):
        await EventStore.connect("nosuch://x")
    with pytest.raises(ConfigError):
        await EventStore.connect("not a url")
    with pytest.raises(ConfigError):
        await EventStore.connect("sqlite:///tmp/x.db?prefix=bad-prefix!")
    async with await EventStore.connect("memory://") as store:
        with pytest.raises(ConfigError):
            await store.append("", [NewEvent("X", {})])
        with pytest.raises(ConfigError):
            await store.append("s", [{"type": "X"}])  # type: ignore[list-item]
        with pytest.raises(ConfigError):
            await store.append("s", [NewEvent("X", {"bad": object()})])


async def test_named_memory_stores_share_a_log_and_unnamed_do_not() -> None:
    a = await EventStore.connect("memory://shared-test")
    b = await EventStore.connect("memory://shared-test")
    c = await EventStore.connect("memory://")
    await a.append("s", [NewEvent("X", {})])
    assert await b.head_position() == 1 and await c.head_position() == 0
    for s in (a, b, c):
        await s.close()
