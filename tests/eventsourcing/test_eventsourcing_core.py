"""The pure core: expected versions, replay decisions, upcasting, gap tracking."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stanchion.errors import ConfigError, DuplicateEventId, WrongExpectedVersion
from stanchion.eventsourcing import ANY, NO_STREAM, STREAM_EXISTS, AppendResult, Upcaster
from stanchion.eventsourcing._core import (
    GapTracker,
    Snapshot,
    Stored,
    UpcasterChain,
    check_batch,
    check_expected,
    decide_replay,
    expected_code,
)


@pytest.mark.parametrize(
    ("expected", "current", "ok"),
    [
        (ANY, -1, True),
        (ANY, 5, True),
        (NO_STREAM, -1, True),
        (NO_STREAM, 0, False),
        (STREAM_EXISTS, -1, False),
        (STREAM_EXISTS, 0, True),
        (3, 3, True),
        (3, 2, False),
        (3, -1, False),
        (-1, -1, True),
        (0, -1, False),
    ],
)
def test_expected_version_table(expected: object, current: int, ok: bool) -> None:
    code = expected_code(expected)
    if ok:
        check_expected("s", code, current)
    else:
        with pytest.raises(WrongExpectedVersion) as info:
            check_expected("s", code, current)
        assert info.value.actual == current
        assert info.value.expected == (expected if expected != -1 else NO_STREAM)


@pytest.mark.parametrize("bad", [-2, True, "nope", 1.5, None])
def test_expected_code_rejects_garbage(bad: object) -> None:
    with pytest.raises(ConfigError):
        expected_code(bad)


def test_constants_compare_to_names() -> None:
    assert ANY == "ANY" and NO_STREAM == "NO_STREAM" and STREAM_EXISTS == "STREAM_EXISTS"
    assert expected_code("NO_STREAM") == -1


def test_decide_replay() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    stored = [Stored(a, "s", 4, 10), Stored(b, "s", 5, 12), Stored(c, "s", 6, 13)]
    assert decide_replay("s", [a, b], []) is None
    assert decide_replay("s", [a, b, c], stored) == AppendResult(4, 6, 10, 13)
    assert decide_replay("s", [a, b], stored) == AppendResult(4, 5, 10, 12)
    for ids in ([b, a], [a, c], [a, uuid.uuid4()], [uuid.uuid4(), a]):
        with pytest.raises(DuplicateEventId):
            decide_replay("s", ids, stored)
    with pytest.raises(DuplicateEventId) as info:
        decide_replay("t", [a], stored)
    assert info.value.event_id == a and info.value.stream == "t"


def test_check_batch() -> None:
    a = uuid.uuid4()
    with pytest.raises(ConfigError):
        check_batch("s", [])
    with pytest.raises(DuplicateEventId):
        check_batch("s", [a, uuid.uuid4(), a])


def test_upcaster_chain() -> None:
    chain = UpcasterChain(
        [
            Upcaster("T", 2, 3, lambda d: {**d, "v3": True}),
            Upcaster("T", 1, 2, lambda d: {"n": d["old"]}),
        ]
    )
    meta, data = chain.upcast("T", {}, {"old": 1})
    assert data == {"n": 1, "v3": True} and meta == {"schema": 3}
    meta, data = chain.upcast("T", {"schema": 2, "x": 1}, {"n": 5})
    assert data == {"n": 5, "v3": True} and meta == {"schema": 3, "x": 1}
    original = {"schema": 3}
    assert chain.upcast("T", original, {"n": 1}) == (original, {"n": 1})
    assert chain.upcast("U", {}, {"old": 1}) == ({}, {"old": 1})
    assert not UpcasterChain()
    with pytest.raises(ConfigError):
        UpcasterChain([Upcaster("T", 1, 2, str), Upcaster("T", 1, 3, str)])
    with pytest.raises(ConfigError):
        Upcaster("T", 1, 1, str)
    with pytest.raises(ConfigError):
        UpcasterChain(["not an upcaster"])  # type: ignore[list-item]


def test_snapshot_parse_and_visibility() -> None:
    snap = Snapshot.parse("100:110:102,105")
    assert (snap.xmin, snap.xmax, snap.xip) == (100, 110, frozenset({102, 105}))
    assert snap.finished(99) and snap.finished(101) and not snap.finished(102)
    assert not snap.finished(110) and not snap.finished(200)
    assert Snapshot.parse("7:7:").xip == frozenset()


def test_gap_tracker_holds_then_resolves() -> None:
    t = GapTracker(0)
    assert t.next == 1
    # 1 and 2 visible, 3 missing (its owner, xid 50, is in progress), 4 visible
    assert t.advance([1, 2, 4], Snapshot(50, 60, frozenset({50}))) == 2
    assert t.waiting and t.next == 3
    # still in progress: hold
    assert t.advance([4], Snapshot(50, 61, frozenset({50}))) == 0
    # it committed: 3 is visible now
    assert t.advance([3, 4], Snapshot(61, 61, frozenset())) == 2
    assert t.next == 5 and not t.waiting
    # a gap whose owner rolled back: resolved once the xids seen with it finish
    assert t.advance([6], Snapshot(70, 72, frozenset({70, 71}))) == 0
    assert t.advance([6], Snapshot(71, 72, frozenset({71}))) == 0
    assert t.advance([6], Snapshot(72, 72, frozenset())) == 1
    assert t.next == 7


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), min_size=1, max_size=60))
def test_gap_tracker_never_skips_a_committed_position(ops: list[tuple[int, int]]) -> None:
    """Simulate PostgreSQL: xids then positions, commits and rollbacks in any order."""
    next_xid, next_pos = 100, 1
    running: dict[int, list[int]] = {}  # xid -> positions taken
    committed: set[int] = set()
    tracker = GapTracker(0)
    delivered: list[int] = []

    def read() -> None:
        snap = Snapshot(min(running, default=next_xid), next_xid, frozenset(running))
        visible = sorted(p for p in committed if p >= tracker.next)[:5]
        n = tracker.advance(visible, snap)
        delivered.extend(visible[:n])
        # invariant: everything committed below next was delivered, in order
        assert delivered == sorted(p for p in committed if p < tracker.next)

    for op, size in ops:
        if op == 0 or not running:  # a writer takes an xid, then positions
            running[next_xid] = list(range(next_pos, next_pos + size))
            next_xid += 1
            next_pos += size
        elif op in (1, 2):  # the oldest or newest open transaction commits
            xid = min(running) if op == 1 else max(running)
            committed.update(running.pop(xid))
        elif op == 3:  # one rolls back: its positions are burnt
            running.pop(max(running))
        else:
            read()
    for xid in sorted(running):
        committed.update(running.pop(xid))
    for _ in range(len(committed) + 3):
        read()
    assert delivered == sorted(committed)
