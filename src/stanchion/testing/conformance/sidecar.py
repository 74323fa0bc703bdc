"""The collector's log store conformance suite (``stanchion.sidecar`` ``LogStore``).

Run it over a backend by providing a ``backend_url`` fixture, as
``tests/conformance/test_sidecar.py`` does::

    from stanchion.testing.conformance.sidecar import *  # noqa: F403

Every test opens the store with :func:`stanchion.sidecar.open_store` and
checks one part of the contract: dedupe by id, arrival order, filters,
cursor paging in both orders, retention, and the returned new records.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from stanchion.sidecar import LogQuery, LogRecord, LogStore, open_store
from stanchion.sidecar._backend import Row, StoredRecord
from stanchion.sidecar._core import format_ts

__all__ = [
    "store",
    "test_logstore_dedupes_by_id_and_keeps_arrival_order",
    "test_logstore_filters",
    "test_logstore_paging_both_orders",
    "test_logstore_retention",
    "test_logstore_returns_new_records_only",
]

_encode = msgspec.json.Encoder().encode


def _row(i: int, *, service: str = "api", level: str = "info", ts: float | None = None,
         message: str | None = None, source: str = "stdout") -> Row:  # fmt: skip
    rec = LogRecord(
        id=f"{source}/run/{i}",
        source=source,
        ts=format_ts(ts if ts is not None else 1_700_000_000.0 + i),
        level=level,
        message=message if message is not None else f"line {i}",
        fields={"i": i},
        labels={"service": service},
    )
    return (
        rec.id,
        ts if ts is not None else 1_700_000_000.0 + i,
        service,
        level,
        source,
        rec.message,
        _encode(rec),
    )


def _ids(rows: list[StoredRecord]) -> list[int]:
    return [msgspec.json.decode(r.body)["fields"]["i"] for r in rows]


@pytest.fixture
async def store(backend_url: str) -> AsyncIterator[LogStore]:
    """The store under test, opened from ``backend_url`` and closed afterwards."""
    s = open_store(backend_url)
    yield s
    await s.aclose()


async def test_logstore_dedupes_by_id_and_keeps_arrival_order(store: LogStore) -> None:
    """Re-inserted ids are ignored; records come back in arrival order."""
    n, _ = await store.insert([_row(i) for i in (5, 3, 9)])
    assert n == 3
    n, _ = await store.insert([_row(i) for i in (3, 9, 1)])
    assert n == 1
    assert await store.count() == 4
    assert _ids(await store.query(LogQuery(limit=100))) == [5, 3, 9, 1]


async def test_logstore_returns_new_records_only(store: LogStore) -> None:
    """With ``returning=True`` the newly stored records come back, in order."""
    await store.insert([_row(1)])
    n, new = await store.insert([_row(1), _row(2), _row(3)], returning=True)
    assert n == 2 and _ids(new) == [2, 3]
    assert new[0].seq < new[1].seq and new[0].ts == 1_700_000_002.0


async def test_logstore_filters(store: LogStore) -> None:
    """service, levels, source, since/until and a case-insensitive substring."""
    rows = [
        _row(i, service="api" if i % 2 else "web", level="error" if i % 3 == 0 else "info",
             message=f"{'Disk 100%_full' if i % 4 == 0 else 'ok'} {i}",
             source="app" if i >= 10 else "stdout")
        for i in range(20)
    ]  # fmt: skip
    await store.insert(rows)

    async def q(**kw: object) -> list[int]:
        return _ids(await store.query(LogQuery(limit=100, **kw)))  # type: ignore[arg-type]

    assert await q(service="api") == [i for i in range(20) if i % 2]
    assert await q(levels=("error",)) == [i for i in range(20) if i % 3 == 0]
    assert await q(service="web", levels=("error", "info")) == list(range(0, 20, 2))
    assert await q(source="app") == list(range(10, 20))
    assert await q(since=1_700_000_005.0, until=1_700_000_008.0) == [5, 6, 7]
    assert await q(q="DISK 100%_F") == list(range(0, 20, 4))  # % and _ are literal
    assert await q(q="%") == list(range(0, 20, 4))


async def test_logstore_paging_both_orders(store: LogStore) -> None:
    """``limit + 1`` rows tell the caller there is a next page; the cursor is the seq."""
    await store.insert([_row(i) for i in range(25)])
    seen: list[int] = []
    cursor = None
    while True:
        page = await store.query(LogQuery(limit=10, cursor=cursor))
        more = len(page) > 10
        page = page[:10]
        seen += _ids(page)
        if not more:
            break
        cursor = page[-1].seq
    assert seen == list(range(25))
    desc = await store.query(LogQuery(limit=5, descending=True))
    assert _ids(desc[:5]) == [24, 23, 22, 21, 20] and len(desc) == 6
    after = await store.query(LogQuery(limit=5, descending=True, cursor=desc[4].seq))
    assert _ids(after[:5]) == [19, 18, 17, 16, 15]


async def test_logstore_retention(store: LogStore) -> None:
    """prune() deletes by age and keeps only the newest ``max_records``."""
    await store.insert([_row(i, ts=1000.0 + i) for i in range(10)])
    assert await store.prune(1003.0, None) == 3
    assert await store.prune(None, 4) == 3
    assert _ids(await store.query(LogQuery(limit=100))) == [6, 7, 8, 9]
    assert await store.prune(None, 4) == 0
