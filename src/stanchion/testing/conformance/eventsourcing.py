"""The event store conformance suite: every backend must pass all of it.

Use it from a test module that provides a ``backend_url`` fixture::

    from stanchion.testing.conformance.eventsourcing import *  # noqa: F403

    @pytest.fixture(params=backend_params("memory", "sqlite", "postgresql"))
    def backend_url(request): ...

Each test opens its own stores on ``backend_url`` (several when it needs
concurrent writers), so it exercises the backend exactly as applications do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from stanchion.errors import (
    AggregateNotFound,
    ConfigError,
    DuplicateEventId,
    StreamDeleted,
    WrongExpectedVersion,
)
from stanchion.eventsourcing import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    Aggregate,
    AppendResult,
    CryptoShredder,
    EventStore,
    NewEvent,
    RecordedEvent,
    Repository,
    Upcaster,
    applies,
    caused_by,
)

__all__ = [
    "store",
    "test_append_result_and_contiguous_versions",
    "test_concurrent_writers_race_one_stream",
    "test_correlation_and_causation",
    "test_crypto_shredding",
    "test_expected_version_rules",
    "test_head_position_and_capabilities",
    "test_idempotent_reappend",
    "test_read_all_order_filter_limit",
    "test_read_stream_forwards_backwards_limits",
    "test_repository_and_optimistic_concurrency",
    "test_snapshots_never_hide_later_events",
    "test_subscriber_never_skips_under_concurrent_writers",
    "test_subscription_resumes_from_saved_position",
    "test_tombstones",
    "test_upcasters",
]


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[EventStore]:
    """An open store on the backend under test."""
    s = await EventStore.connect(backend_url)
    try:
        yield s
    finally:
        await s.close()


def ev(type: str = "Happened", **data: Any) -> NewEvent:
    return NewEvent(type, data)


async def collect(it: AsyncIterator[RecordedEvent]) -> list[RecordedEvent]:
    return [e async for e in it]


async def test_append_result_and_contiguous_versions(store: EventStore) -> None:
    r1 = await store.append("s-1", [ev(n=1), ev(n=2)], NO_STREAM)
    assert (r1.first_version, r1.last_version) == (0, 1)
    assert r1.first_position >= 1 and r1.last_position > r1.first_position
    r2 = await store.append("s-1", ev(n=3), 1)
    assert isinstance(r2, AppendResult)
    assert (r2.first_version, r2.last_version) == (2, 2)
    assert r2.first_position > r1.last_position
    events = await collect(store.read_stream("s-1"))
    assert [e.version for e in events] == [0, 1, 2]
    assert [e.data for e in events] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert events[0].stream == "s-1" and events[0].type == "Happened"
    assert events[0].recorded_at.tzinfo is not None
    # bytes payloads are stored as they are
    await store.append("s-bin", [NewEvent("Blob", b"\x00\xffraw", {"k": "v"})])
    (blob,) = await collect(store.read_stream("s-bin"))
    assert blob.data == b"\x00\xffraw" and blob.metadata == {"k": "v"}
    with pytest.raises(ConfigError):
        await store.append("s-1", [])
    with pytest.raises(ConfigError):
        await store.append("s-1", [ev()], -5)
    assert await store.stream_version("s-1") == 2
    assert await store.stream_version("nothing-here") == -1


async def test_expected_version_rules(store: EventStore) -> None:
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("ev-1", [ev()], STREAM_EXISTS)
    assert info.value.stream == "ev-1" and info.value.actual == -1
    assert info.value.expected == STREAM_EXISTS
    with pytest.raises(WrongExpectedVersion):
        await store.append("ev-1", [ev()], 0)
    await store.append("ev-1", [ev()], NO_STREAM)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("ev-1", [ev()], NO_STREAM)
    assert info.value.actual == 0 and info.value.expected == "NO_STREAM"
    await store.append("ev-1", [ev()], STREAM_EXISTS)
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("ev-1", [ev()], 0)
    assert info.value.expected == 0 and info.value.actual == 1
    await store.append("ev-1", [ev()], 1)
    await store.append("ev-1", [ev()], ANY)
    await store.append("ev-2", [ev()], ANY)
    assert [e.version for e in await collect(store.read_stream("ev-1"))] == [0, 1, 2, 3]
    # a failed append writes nothing
    assert await store.stream_version("ev-1") == 3


async def test_concurrent_writers_race_one_stream(backend_url: str) -> None:
    writers, rounds = 20, 5
    stores = [await EventStore.connect(backend_url) for _ in range(writers)]
    wins: dict[int, list[int]] = {}
    try:

        async def writer(w: int, s: EventStore) -> None:
            done = 0
            while done < rounds:
                version = await s.stream_version("race")
                try:
                    result = await s.append("race", [ev(w=w, i=done)], version)
                except WrongExpectedVersion:
                    continue
                wins.setdefault(result.first_version, []).append(w)
                done += 1

        # first, every writer races for the stream's creation with NO_STREAM
        outcomes = await asyncio.gather(
            *(s.append("race", [ev(w=i, first=True)], NO_STREAM) for i, s in enumerate(stores)),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if isinstance(o, AppendResult)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, WrongExpectedVersion) for o in outcomes if o is not winners[0]), (
            outcomes
        )
        await asyncio.wait_for(asyncio.gather(*(writer(i, s) for i, s in enumerate(stores))), 120)
    finally:
        for s in stores:
            await s.close()
    async with await EventStore.connect(backend_url) as check:
        events = await collect(check.read_stream("race"))
    assert [e.version for e in events] == list(range(1 + writers * rounds))
    assert len({e.id for e in events}) == len(events)
    assert all(len(ws) == 1 for ws in wins.values()), "two writers won one version"
    per_writer = [sum(1 for e in events[1:] if e.data["w"] == w) for w in range(writers)]
    assert per_writer == [rounds] * writers


async def test_idempotent_reappend(store: EventStore) -> None:
    batch = [ev(n=i) for i in range(3)]
    first = await store.append("idem", batch, NO_STREAM)
    head = await store.head_position()
    # the same batch again: the original result, nothing written, whatever the expectation
    assert await store.append("idem", batch, NO_STREAM) == first
    assert await store.append("idem", batch, ANY) == first
    assert await store.append("idem", batch, 7) == first
    # a leading subset of the batch
    part = await store.append("idem", batch[:2], NO_STREAM)
    assert (part.first_version, part.last_version) == (0, 1)
    assert part.first_position == first.first_position
    assert await store.head_position() == head
    assert await store.stream_version("idem") == 2
    # later appends are unaffected; a retry of a later batch is idempotent too
    more = [ev(n=9)]
    r = await store.append("idem", more, 2)
    assert await store.append("idem", more, 2) == r
    # reusing an id anywhere else is an error
    with pytest.raises(DuplicateEventId):
        await store.append("other", [batch[0]])
    with pytest.raises(DuplicateEventId):
        await store.append("idem", [batch[1], batch[0]])  # not at their versions
    with pytest.raises(DuplicateEventId):
        await store.append("idem", [batch[0], ev(n=10)])  # replay mixed with a new event
    dup = ev()
    with pytest.raises(DuplicateEventId):
        await store.append("idem", [dup, dup])
    assert await store.stream_version("idem") == 3
    assert await store.stream_version("other") == -1


async def test_read_stream_forwards_backwards_limits(store: EventStore) -> None:
    await store.append("rs", [ev(n=i) for i in range(10)])
    await store.append("rs-noise", [ev(n=i) for i in range(3)])
    versions = [e.version for e in await collect(store.read_stream("rs"))]
    assert versions == list(range(10))
    assert [e.version for e in await collect(store.read_stream("rs", 4))] == list(range(4, 10))
    assert [e.version for e in await collect(store.read_stream("rs", 4, limit=3))] == [4, 5, 6]
    assert [e.version for e in await collect(store.read_stream("rs", backwards=True))] == list(
        range(9, -1, -1)
    )
    got = await collect(store.read_stream("rs", backwards=True, limit=3))
    assert [e.version for e in got] == [9, 8, 7]
    got = await collect(store.read_stream("rs", 5, backwards=True, limit=2))
    assert [e.version for e in got] == [5, 4]
    assert [e.version for e in await collect(store.read_stream("rs", 0, backwards=True))] == [0]
    assert await collect(store.read_stream("rs", 10)) == []
    assert await collect(store.read_stream("rs", limit=0)) == []
    assert await collect(store.read_stream("missing")) == []
    # paging across the store's page size
    big = [ev(n=i) for i in range(EventStore.PAGE + 5)]
    await store.append("rs-big", big)
    assert len(await collect(store.read_stream("rs-big"))) == len(big)
    got = await collect(store.read_stream("rs-big", backwards=True))
    assert [e.version for e in got] == list(range(len(big) - 1, -1, -1))


async def test_read_all_order_filter_limit(store: EventStore) -> None:
    for i in range(5):
        await store.append(f"ra-{i % 2}", [ev("A", i=i), ev("B", i=i)])
    events = await collect(store.read_all())
    positions = [e.position for e in events]
    assert len(events) == 10 and positions == sorted(set(positions))
    assert [(e.type, e.data["i"]) for e in events] == [(t, i) for i in range(5) for t in ("A", "B")]
    third = positions[2]
    assert [e.position for e in await collect(store.read_all(third))] == positions[2:]
    assert [e.position for e in await collect(store.read_all(third, limit=2))] == positions[2:4]
    only_b = await collect(store.read_all(types=["B"]))
    assert [e.data["i"] for e in only_b] == list(range(5))
    assert all(e.type == "B" for e in only_b)
    assert len(await collect(store.read_all(types=["B"], limit=2))) == 2
    assert await collect(store.read_all(types=["Nope"])) == []


async def test_head_position_and_capabilities(store: EventStore) -> None:
    assert await store.head_position() == 0
    r = await store.append("hp", [ev(), ev()])
    assert await store.head_position() == r.last_position
    assert isinstance(store.capabilities.durable, bool)
    assert "://" in store.url


async def _hold(
    store: EventStore, stream: str, events: list[NewEvent], opened: asyncio.Event,
    release: asyncio.Event,
) -> AppendResult:  # fmt: skip
    """Append inside a transaction that stays open until ``release`` is set."""
    hold = getattr(store._backend, "append_holding", None)
    if hold is None:  # no transactions (memory): append late instead
        opened.set()
        await release.wait()
        return await store.append(stream, events)
    from stanchion.eventsourcing._api import _encode_event

    result: AppendResult = await hold(stream, [_encode_event(e) for e in events], opened, release)
    return result


async def test_subscriber_never_skips_under_concurrent_writers(backend_url: str) -> None:
    total, writers = 10_000, 8
    held_events = [ev("Held", n=i) for i in range(3)]
    reader = await EventStore.connect(backend_url)
    stores = [await EventStore.connect(backend_url) for _ in range(writers)]
    holder = await EventStore.connect(backend_url)
    expected = total + len(held_events)
    seen: list[RecordedEvent] = []

    async def subscriber() -> None:
        async for event in reader.subscribe():
            seen.append(event)
            if len(seen) >= expected:
                return

    sub = asyncio.create_task(subscriber())
    rng = random.Random(7)
    share = total // writers
    opened, release = asyncio.Event(), asyncio.Event()
    progress = [0] * writers

    async def writer(w: int, s: EventStore) -> None:
        left = share
        while left:
            n = min(left, rng.randint(1, 40))
            await s.append(f"w{w}-{left % 7}", [ev("W", w=w, k=left - j) for j in range(n)])
            left -= n
            progress[w] += n

    try:
        hold = asyncio.create_task(_hold(holder, "held", held_events, opened, release))
        await asyncio.wait_for(opened.wait(), 30)
        tasks = [asyncio.create_task(writer(i, s)) for i, s in enumerate(stores)]
        # let later transactions commit while the held one stays open (engines that
        # serialise writers, like SQLite, make the others wait: release after a while)
        loop = asyncio.get_running_loop()
        until = loop.time() + 1.0
        while sum(progress) < total // 4 and loop.time() < until:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(asyncio.gather(hold, *tasks), 120)
        await asyncio.wait_for(sub, 30)
    finally:
        sub.cancel()
        for s in [reader, holder, *stores]:
            await s.close()
    positions = [e.position for e in seen]
    assert len(seen) == expected
    assert all(a < b for a, b in itertools.pairwise(positions)), "out of order or duplicated"
    async with await EventStore.connect(backend_url) as check:
        stored = [e.position async for e in check.read_all()]
    assert positions == stored, "the subscriber's log differs from the stored log"
    assert sum(1 for e in seen if e.type == "Held") == len(held_events)


async def test_subscription_resumes_from_saved_position(store: EventStore) -> None:
    await store.append("sub", [ev(n=i) for i in range(10)])
    got: list[RecordedEvent] = []
    async with contextlib.aclosing(store.subscribe()) as sub:
        async for e in sub:
            got.append(e)
            if len(got) == 4:
                break
    saved = got[-1].position
    await store.append("sub", [ev(n=i) for i in range(10, 15)])
    rest: list[RecordedEvent] = []
    async with contextlib.aclosing(store.subscribe(saved + 1)) as sub:
        async for e in sub:
            rest.append(e)
            if len(rest) == 11:
                break
    assert [e.data["n"] for e in got + rest] == list(range(15))
    # live: a subscriber from the head sees only new events, promptly
    head = await store.head_position()
    live: list[RecordedEvent] = []

    async def follow() -> None:
        async for e in store.subscribe(head + 1, types=["Live"]):
            live.append(e)
            if len(live) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    await store.append("sub", [ev("Other"), ev("Live", n=1)])
    await store.append("sub2", [ev("Live", n=2)])
    await asyncio.wait_for(task, 10)
    assert [e.data["n"] for e in live] == [1, 2]


# -- aggregates ----------------------------------------------------------------


class Opened(msgspec.Struct, frozen=True):
    owner: str


class Deposited(msgspec.Struct, frozen=True):
    amount: int


@dataclasses.dataclass(frozen=True)
class Withdrawn:
    amount: int


class Account(Aggregate):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.owner = ""
        self.balance = 0
        self.applied = 0
        self._replayed = 0  # private: not part of snapshots

    def open(self, owner: str) -> None:
        self.record(Opened(owner))

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.record(Withdrawn(amount))

    @applies(Opened)
    def _opened(self, e: Opened) -> None:
        self.owner = e.owner
        self.applied += 1
        self._replayed += 1

    @applies(Deposited)
    def _deposited(self, e: Deposited) -> None:
        self.balance += e.amount
        self.applied += 1
        self._replayed += 1

    @applies(Withdrawn)
    def _withdrawn(self, e: Withdrawn) -> None:
        self.balance -= e.amount
        self.applied += 1
        self._replayed += 1


async def test_repository_and_optimistic_concurrency(store: EventStore) -> None:
    repo = Repository(store, Account)
    acct = Account("a1")
    acct.open("ann")
    acct.deposit(100)
    acct.withdraw(30)
    with pytest.raises(ValueError):
        acct.withdraw(1000)
    assert len(acct.pending_events) == 3
    result = await repo.save(acct)
    assert result is not None and result.last_version == 2 and acct.version == 2
    assert await repo.save(acct) is None
    loaded = await repo.load("a1")
    assert (loaded.owner, loaded.balance, loaded.version) == ("ann", 70, 2)
    types = [e.type for e in await collect(store.read_stream("Account-a1"))]
    assert types == ["Opened", "Deposited", "Withdrawn"]
    # two loads, two saves: the second loses
    one, two = await repo.load("a1"), await repo.load("a1")
    one.deposit(1)
    two.deposit(2)
    await repo.save(one)
    with pytest.raises(WrongExpectedVersion):
        await repo.save(two)
    with pytest.raises(AggregateNotFound):
        await repo.load("nobody")
    fresh = Account("a1")
    fresh.open("mallory")
    with pytest.raises(WrongExpectedVersion):
        await repo.save(fresh)


async def test_snapshots_never_hide_later_events(store: EventStore) -> None:
    repo = Repository(store, Account, snapshot_every=5)
    acct = Account("snap")
    acct.open("bob")
    for _ in range(11):
        acct.deposit(1)
        await repo.save(acct)
    assert acct.version == 11
    snap = await store._backend.load_snapshot("Account-snap")
    assert snap is not None and snap[0] == 9  # the last multiple crossed (10 events)
    loaded = await repo.load("snap")
    assert (loaded.balance, loaded.version) == (11, 11)
    assert loaded._replayed == 2 and loaded.applied == 12  # restored at 9, then 10 and 11
    # events written after the snapshot without the repository still count
    await store.append("Account-snap", [NewEvent("Deposited", {"amount": 100})], 11)
    loaded = await repo.load("snap")
    assert (loaded.balance, loaded.version, loaded._replayed) == (111, 12, 3)
    # a repository without snapshots sees the same state
    plain = await Repository(store, Account).load("snap")
    assert (plain.balance, plain.version, plain.applied) == (111, 12, 13)

    # a changed state shape (snapshot_schema bumped) ignores old snapshots and replays
    class AccountV2(Account):
        stream_category = "Account"
        snapshot_schema = 2

    again = await Repository(store, AccountV2, snapshot_every=5).load("snap")
    assert (again.balance, again.version, again._replayed) == (111, 12, 13)
    # a tombstoned aggregate cannot be loaded
    await store.delete_stream("Account-snap")
    with pytest.raises(StreamDeleted):
        await repo.load("snap")


async def test_upcasters(backend_url: str) -> None:
    async with await EventStore.connect(backend_url) as old:
        await old.append("up", [NewEvent("Deposited", {"cents": 1250})])
        await old.append("up", [NewEvent("Deposited", {"amount": 7}, {"schema": 3})])
        await old.append("up", [NewEvent("Other", {"cents": 1})])
        v1 = Upcaster("Deposited", 1, 2, lambda d: {"amount_cents": d["cents"]})
        v2 = Upcaster("Deposited", 2, 3, lambda d: {"amount": d["amount_cents"] // 100})
        async with await EventStore.connect(backend_url, upcasters=[v2, v1]) as new:
            got = [(e.type, e.data, e.metadata.get("schema")) for e in
                   await collect(new.read_stream("up"))]  # fmt: skip
            assert got == [
                ("Deposited", {"amount": 12}, 3),
                ("Deposited", {"amount": 7}, 3),
                ("Other", {"cents": 1}, None),
            ]
            assert [e.data for e in await collect(new.read_all(types=["Deposited"]))] == [
                {"amount": 12},
                {"amount": 7},
            ]
            async with contextlib.aclosing(new.subscribe()) as sub:
                first = await anext(sub)
            assert first.data == {"amount": 12}
        # the stored events never change
        stored = await collect(old.read_stream("up"))
        assert stored[0].data == {"cents": 1250}
    with pytest.raises(ConfigError):
        Upcaster("X", 2, 1, lambda d: d)
    with pytest.raises(ConfigError):
        await EventStore.connect(backend_url, upcasters=[v1, v1])


async def test_tombstones(store: EventStore) -> None:
    await store.append("tomb", [ev(n=1), ev(n=2)])
    await store.append("alive", [ev(n=3)])
    await store.delete_stream("tomb")
    with pytest.raises(StreamDeleted) as info:
        await store.append("tomb", [ev()])
    assert info.value.stream == "tomb"
    with pytest.raises(StreamDeleted):
        await store.append("tomb", [ev()], NO_STREAM)
    with pytest.raises(StreamDeleted):
        await collect(store.read_stream("tomb"))
    with pytest.raises(StreamDeleted):
        await store.stream_version("tomb")
    # the audit trail keeps them
    assert [e.data["n"] for e in await collect(store.read_all())] == [1, 2, 3]
    await store.delete_stream("never-written")
    with pytest.raises(StreamDeleted):
        await store.append("never-written", [ev()])
    with pytest.raises(StreamDeleted):
        await Repository(store, Account).load("x") if False else await collect(
            store.read_stream("never-written")
        )
    await store.append("alive", [ev(n=4)])


async def test_correlation_and_causation(store: EventStore) -> None:
    repo = Repository(store, Account)
    acct = Account("c1")
    acct.open("cy")
    command_id = str(uuid.uuid4())
    await repo.save(acct, correlation_id=command_id, causation_id=command_id)
    (opened,) = await collect(store.read_stream("Account-c1"))
    assert opened.correlation_id == command_id and opened.causation_id == command_id
    follow = await repo.load("c1")
    follow.deposit(5)
    await repo.save(follow, **caused_by(opened))
    second = (await collect(store.read_stream("Account-c1", 1)))[0]
    assert second.correlation_id == command_id
    assert second.causation_id == str(opened.id)
    await store.append("plain", [NewEvent("X", {}, {"correlation_id": "c", "causation_id": "d"})])
    (plain,) = await collect(store.read_stream("plain"))
    assert (plain.correlation_id, plain.causation_id) == ("c", "d")


async def test_crypto_shredding(store: EventStore) -> None:
    shredder = CryptoShredder(store)
    token = await shredder.encrypt("cust-1", {"email": "ann@example.com"})
    other = await shredder.encrypt("cust-2", "bob@example.com")
    assert "ann" not in token
    await store.append("cust-1", [NewEvent("Registered", {"pii": token})])
    (stored,) = await collect(store.read_stream("cust-1"))
    assert await shredder.decrypt("cust-1", stored.data["pii"]) == {"email": "ann@example.com"}
    with pytest.raises(ConfigError):
        await shredder.decrypt("cust-2", token)
    await shredder.forget("cust-1")
    assert await shredder.is_forgotten("cust-1")
    assert await shredder.decrypt("cust-1", stored.data["pii"]) is None
    assert await shredder.decrypt("cust-2", other) == "bob@example.com"
    # the event itself is untouched
    (again,) = await collect(store.read_stream("cust-1"))
    assert again.data == stored.data
