"""The collector over every log store: dedupe, queries, cursor, limits, token, tail, retention."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest

from stanchion.sidecar import Collector, CollectorOptions, LogRecord, open_store
from stanchion.sidecar._core import format_ts
from stanchion.testing.servers import free_port

pytestmark = pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def store_url(backend_url: str) -> str:
    return backend_url


def rec(
    i: int,
    *,
    service: str = "api",
    level: str = "info",
    ts: float | None = None,
    msg: str | None = None,
) -> LogRecord:
    return LogRecord(
        id=f"stdout/run1/{i}",
        source="stdout",
        ts=format_ts(ts if ts is not None else 1_700_000_000.0 + i),
        level=level,
        message=msg if msg is not None else f"line {i}",
        fields={"i": i},
        labels={"service": service, "host": "h"},
    )


def ndjson(records: list[LogRecord]) -> bytes:
    return msgspec.json.Encoder().encode_lines(records)


class Running:
    def __init__(self, collector: Collector, base: str, session: aiohttp.ClientSession) -> None:
        self.collector = collector
        self.base = base
        self.http = session

    async def push(self, records: list[LogRecord], **kw: object) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/x-ndjson", **kw.pop("headers", {})}  # type: ignore[dict-item]
        return await self.http.post(self.base + "/api/push", data=ndjson(records), headers=headers)

    async def logs(self, **params: str) -> dict:  # type: ignore[type-arg]
        async with self.http.get(self.base + "/api/logs", params=params) as r:
            assert r.status == 200, await r.text()
            return await r.json()  # type: ignore[no-any-return]


async def start(url: str, options: CollectorOptions | None = None) -> tuple[Collector, str]:
    c = Collector(open_store(url), options)
    port = free_port()
    await c.start("127.0.0.1", port)
    return c, f"http://127.0.0.1:{port}"


@pytest.fixture
async def svc(store_url: str) -> AsyncIterator[Running]:
    c, base = await start(store_url, CollectorOptions(token="t0k", max_body_bytes=64 * 1024))
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0k"}) as s:
        yield Running(c, base, s)
    await c.aclose()


async def test_push_dedupes_and_returns_the_record_shape(svc: Running) -> None:
    r = await svc.push([rec(i) for i in range(10)])
    assert (await r.json()) == {"accepted": 10, "inserted": 10, "duplicates": 0}
    r = await svc.push([rec(i) for i in range(5, 15)])  # a re-sent batch overlapping
    assert (await r.json()) == {"accepted": 10, "inserted": 5, "duplicates": 5}
    page = await svc.logs(limit="100")
    assert [x["message"] for x in page["records"]] == [f"line {i}" for i in range(15)]
    assert set(page["records"][0]) == {"id", "source", "ts", "level", "message", "fields", "labels"}
    assert page["records"][3]["fields"] == {"i": 3} and page["next_cursor"] is None


async def test_filters_and_cursor_paging(svc: Running) -> None:
    batch = [
        rec(
            i,
            service="api" if i % 2 else "web",
            level="error" if i % 3 == 0 else "info",
            msg=f"{'Timeout' if i % 5 == 0 else 'ok'} {i}",
        )
        for i in range(60)
    ]
    assert (await svc.push(batch)).status == 200
    errors = await svc.logs(service="api", level="error", limit="1000")
    assert [x["fields"]["i"] for x in errors["records"]] == [
        i for i in range(60) if i % 2 and i % 3 == 0
    ]
    q = await svc.logs(q="timeout", limit="1000")
    assert [x["fields"]["i"] for x in q["records"]] == list(range(0, 60, 5))
    window = await svc.logs(since=str(1_700_000_010), until="2023-11-14T22:13:40Z", limit="1000")
    assert [x["fields"]["i"] for x in window["records"]] == list(range(10, 20))
    seen, cursor = [], None
    while True:
        params = {"limit": "7"} | ({"cursor": cursor} if cursor else {})
        page = await svc.logs(**params)
        seen += [x["fields"]["i"] for x in page["records"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(60))
    desc = await svc.logs(limit="3", order="desc")
    assert [x["fields"]["i"] for x in desc["records"]] == [59, 58, 57]
    async with svc.http.get(svc.base + "/api/logs", params={"since": "nope"}) as r:
        assert r.status == 400 and "not a time" in (await r.json())["error"]


async def test_token_size_limit_and_bad_bodies(svc: Running) -> None:
    async with aiohttp.ClientSession() as anon:
        r = await anon.post(svc.base + "/api/push", data=ndjson([rec(1)]))
        assert r.status == 401
        r = await anon.post(
            svc.base + "/api/push", data=ndjson([rec(1)]), headers={"Authorization": "Bearer wrong"}
        )
        assert r.status == 401
    big = [rec(i, msg="x" * 1000) for i in range(100)]  # ~110 KB > 64 KiB
    assert (await svc.push(big)).status == 413
    gz = gzip.compress(ndjson(big))
    r = await svc.http.post(svc.base + "/api/push", data=gz, headers={"Content-Encoding": "gzip"})
    assert r.status == 413  # the limit applies after decoding too
    small = gzip.compress(ndjson([rec(1), rec(2)]))
    r = await svc.http.post(
        svc.base + "/api/push", data=small, headers={"Content-Encoding": "gzip"}
    )
    assert r.status == 200 and (await r.json())["inserted"] == 2
    r = await svc.http.post(svc.base + "/api/push", data=b'{"id": 1}\n')
    assert r.status == 400
    assert len((await svc.logs())["records"]) == 2  # nothing half-stored


async def test_live_tail_sse_with_resume(svc: Running) -> None:
    await svc.push([rec(0)])
    got: list[dict] = []  # type: ignore[type-arg]

    async def listen() -> None:
        async with svc.http.get(
            svc.base + "/api/tail", params={"level": "error"}, headers={"Last-Event-ID": "0"}
        ) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    got.append(msgspec.json.decode(line[6:]))
                    if len(got) == 3:
                        return

    task = asyncio.create_task(listen())
    await svc.push([rec(1, level="error")])
    await asyncio.sleep(0.3)
    await svc.push([rec(2), rec(3, level="error"), rec(4, level="error")])
    await asyncio.wait_for(task, 10)
    assert [g["fields"]["i"] for g in got] == [1, 3, 4]
    # the same stream from /api/logs with Accept: text/event-stream, resumed by ?after=
    async with svc.http.get(
        svc.base + "/api/logs",
        params={"level": "error", "after": "0"},
        headers={"Accept": "text/event-stream"},
    ) as r:
        first = None
        async for raw in r.content:
            if raw.startswith(b"data: "):
                first = msgspec.json.decode(raw[6:])
                break
    assert first is not None and first["fields"]["i"] == 1


async def test_retention_by_age_and_count(store_url: str) -> None:
    c, base = await start(
        store_url, CollectorOptions(retention=3600, max_records=5, prune_interval=3600)
    )
    try:
        async with aiohttp.ClientSession() as s:
            now = time.time()
            old = [rec(i, ts=now - 7200) for i in range(3)]
            new = [rec(i, ts=now) for i in range(3, 11)]
            r = await s.post(base + "/api/push", data=ndjson(old + new))
            assert r.status == 200
            assert await c.prune() == 3 + 3
            async with s.get(base + "/api/logs") as r:
                ids = [x["fields"]["i"] for x in (await r.json())["records"]]
            assert ids == [6, 7, 8, 9, 10]
            async with s.get(base + "/metrics") as r:
                assert "stanchion_collector_records_pruned_total 6.0" in await r.text()
    finally:
        await c.aclose()
