"""Online resharding under concurrent writers, abort, and SIGKILL + resume."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import textwrap
from typing import Any

import pytest

from stanchion.errors import ReshardError, ShardMapChanged, UnknownShard
from stanchion.sharding import (
    HashRing,
    ReshardProgress,
    RouterOptions,
    ShardedDatabase,
    ShardMap,
)
from stanchion.sharding._api import open_shard
from stanchion.testing.conformance.sharding import ShardEnv, shard_env, users_schema

__all__ = ["shard_env"]

pytestmark = pytest.mark.parametrize("backend_url", ["sqlite", "postgresql"], indirect=True)

_MISSING = object()


async def _rows_by_shard(urls: dict[str, str]) -> dict[str, dict[int, tuple[str, int]]]:
    out: dict[str, dict[int, tuple[str, int]]] = {}
    for name, url in urls.items():
        shard = await open_shard(url)
        try:
            rows = await shard.fetch("SELECT user_id, name, score FROM users")
        finally:
            await shard.close()
        out[name] = {int(r["user_id"]): (r["name"], int(r["score"])) for r in rows}
    return out


async def _connect(env: ShardEnv, urls: dict[str, str], **kw: Any) -> ShardedDatabase:
    return await ShardedDatabase.connect(
        ShardMap(HashRing(list(urls)), urls, store=env.store),
        tables={"users": "user_id"},
        reference_tables=("regions",),
        schema=users_schema(env.scheme),
        **kw,
    )


class Writer:
    """Inserts, updates and deletes its own keys (id % 4 == n) and logs each write."""

    def __init__(self, db: ShardedDatabase, n: int, log: dict[int, Any], start: int) -> None:
        self.db, self.n, self.log = db, n, log
        self.next = start + n
        self.ops = 0
        self.rng = random.Random(n)
        self.errors: list[BaseException] = []
        self.retries = 0

    async def step(self) -> None:
        mine = [k for k, v in self.log.items() if k % 4 == self.n and v is not _MISSING]
        op = self.rng.random()
        if op < 0.4 or not mine:
            k = self.next
            self.next += 4
            await self.db.execute(
                k,
                "INSERT INTO users (user_id, name, score) VALUES (:k, :name, 0)",
                {"k": k, "name": f"n{k}"},
            )
            self.log[k] = (f"n{k}", 0)
        elif op < 0.8:
            k = self.rng.choice(mine)
            name, score = self.log[k]
            for attempt in range(5):  # a transaction that meets a cutover is retried
                try:
                    async with self.db.transaction(k) as tx:
                        await tx.execute(
                            "UPDATE users SET score = :s, name = :name WHERE user_id = :k",
                            {"s": score + 1, "name": f"{name[:10]}+", "k": k},
                        )
                    break
                except ShardMapChanged:
                    self.retries += 1
                    if attempt == 4:
                        raise
            self.log[k] = (f"{name[:10]}+", score + 1)
        else:
            k = self.rng.choice(mine)
            n = await self.db.execute(k, "DELETE FROM users WHERE user_id = :k", {"k": k})
            assert n == 1, f"delete of {k} hit {n} rows"
            self.log[k] = _MISSING
        self.ops += 1

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.step()
                await asyncio.sleep(0)
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)
            raise


async def test_reshard_3_to_4_under_concurrent_writers(shard_env: ShardEnv) -> None:
    urls = shard_env.urls("s1", "s2", "s3", "s4")
    old_urls = {k: urls[k] for k in ("s1", "s2", "s3")}
    opts = RouterOptions(refresh_interval=0.1)
    db = await _connect(shard_env, old_urls, options=opts)
    other = await ShardedDatabase.connect(shard_env.store, options=opts)  # a second router
    await db.execute_all("INSERT INTO regions (code, name) VALUES ('eu', 'Europe')")
    log: dict[int, Any] = {}
    initial = 1200
    for k in range(initial):
        log[k] = (f"n{k}", 0)
    await _bulk(db, list(range(initial)))
    writers = [Writer(db if n < 2 else other, n, log, initial) for n in range(4)]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    await asyncio.sleep(0.3)
    ops_before = sum(w.ops for w in writers)
    progress: list[ReshardProgress] = []
    new = db.shard_map.strategy.add("s4")
    try:
        done = await db.reshard(
            new, urls={"s4": urls["s4"]}, batch_size=40, on_progress=progress.append, grace=0.3
        )
        ops_during = sum(w.ops for w in writers) - ops_before
        await asyncio.sleep(0.3)  # writers keep going on the new map
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    for w in writers:
        assert not w.errors, w.errors
    assert done.phase == "done"
    assert ops_during > 50, f"writers were starved during the reshard ({ops_during} ops)"
    assert {p.phase for p in progress} >= {"copy", "catchup", "pause", "cleanup", "done"}
    assert done.rows_copied > 0 and done.rows_deleted > 0
    assert db.shard_map.strategy == new and other.shard_map.version >= db.shard_map.version - 1
    by_shard = await _rows_by_shard(urls)
    seen: dict[int, str] = {}
    for shard, rows in by_shard.items():
        for k in rows:
            assert k not in seen, f"key {k} on both {seen[k]} and {shard}"
            seen[k] = shard
            assert new.shard_for(k) == shard, f"key {k} on {shard}, owner {new.shard_for(k)}"
    expected = {k: v for k, v in log.items() if v is not _MISSING}
    lost, extra = set(expected) - set(seen), set(seen) - set(expected)
    assert not lost and not extra, f"lost {sorted(lost)[:10]}, extra {sorted(extra)[:10]}"
    for rows in by_shard.values():
        for k, value in rows.items():
            assert value == expected[k], f"key {k}: {value} != {expected[k]}"
    assert by_shard["s4"], "the new shard got no rows"
    regions = await db.fetch_all("SELECT code FROM regions")
    assert [r["code"] for r in regions.rows] == ["eu"] * 4
    assert await db.reshard_status() is None
    await other.close()
    await db.close()


async def _bulk(db: ShardedDatabase, ids: list[int]) -> None:
    async def part(chunk: list[int]) -> None:
        for k in chunk:
            await db.execute(
                k,
                "INSERT INTO users (user_id, name, score) VALUES (:k, :name, 0)",
                {"k": k, "name": f"n{k}"},
            )

    await asyncio.gather(*(part(ids[i::8]) for i in range(8)))


async def test_abort_before_cutover_changes_nothing(shard_env: ShardEnv) -> None:
    urls = shard_env.urls("s1", "s2", "s3", "s4")
    old_urls = {k: urls[k] for k in ("s1", "s2", "s3")}
    db = await _connect(shard_env, old_urls)
    try:
        await _bulk(db, list(range(300)))
        before = await _rows_by_shard(old_urls)
        version = db.shard_map.version
        stop_at = {"n": 0}

        def interrupt(p: ReshardProgress) -> None:
            stop_at["n"] += 1
            if p.phase == "copy" and p.rows_copied > 0:
                raise KeyboardInterrupt  # stands for a crash during the copy

        with pytest.raises(KeyboardInterrupt):
            await db.reshard(
                db.shard_map.strategy.add("s4"),
                urls={"s4": urls["s4"]},
                batch_size=20,
                on_progress=interrupt,
            )
        status = await db.reshard_status()
        assert status is not None and status.phase == "copy"
        with pytest.raises(ReshardError, match="in progress"):
            await db.reshard(db.shard_map.strategy.add("s5"), urls={"s5": urls["s4"]})
        result = await db.abort_reshard()
        assert result.phase == "aborted"
        assert await db.reshard_status() is None
        assert db.shard_map.strategy == HashRing(["s1", "s2", "s3"])
        assert db.shard_map.version > version
        assert await _rows_by_shard(old_urls) == before
        assert (await _rows_by_shard({"s4": urls["s4"]}))["s4"] == {}
        with pytest.raises(ReshardError, match="nothing to abort"):
            await db.abort_reshard()
        with pytest.raises(ReshardError, match="nothing to resume"):
            await db.resume_reshard()
        with pytest.raises(UnknownShard, match="s9"):
            await db.reshard(HashRing(["s1", "s2", "s3", "s9"]))
        await db.execute(1, "UPDATE users SET score = 5 WHERE user_id = :k", {"k": 1})
    finally:
        await db.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from stanchion.sharding import ShardedDatabase

    async def main(store, url):
        db = await ShardedDatabase.connect(store)
        new = db.shard_map.strategy.add("s4")

        def report(p):
            print(p.phase, p.rows_copied, flush=True)

        await db.reshard(new, urls={"s4": url}, batch_size=10, on_progress=report)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_reshard_killed_with_sigkill_then_resumed(shard_env: ShardEnv) -> None:
    urls = shard_env.urls("s1", "s2", "s3", "s4")
    old_urls = {k: urls[k] for k in ("s1", "s2", "s3")}
    db = await _connect(shard_env, old_urls)
    await _bulk(db, list(range(1500)))
    await db.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        shard_env.store,
        urls["s4"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        copied = 0
        async with asyncio.timeout(60):
            while line := (await proc.stdout.readline()).decode():
                phase, n = line.split()
                copied = int(n)
                if phase == "copy" and copied >= 30:
                    break
        if copied < 30:
            pytest.fail(f"child did not start copying: {(await proc.stderr.read()).decode()}")
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    db = await ShardedDatabase.connect(shard_env.store)
    try:
        status = await db.reshard_status()
        assert status is not None and status.phase == "copy"
        await db.execute(7, "UPDATE users SET score = 70 WHERE user_id = :k", {"k": 7})
        await db.execute(
            100_000, "INSERT INTO users (user_id, name) VALUES (:k, 'late')", {"k": 100_000}
        )
        done = await db.resume_reshard(grace=0.1)
        assert done.phase == "done"
        new = HashRing(["s1", "s2", "s3", "s4"])
        assert db.shard_map.strategy == new
        by_shard = await _rows_by_shard(urls)
        all_ids = [k for rows in by_shard.values() for k in rows]
        assert sorted(all_ids) == [*range(1500), 100_000]
        for shard, rows in by_shard.items():
            assert all(new.shard_for(k) == shard for k in rows)
        assert (await db.fetch_one(7, "SELECT score FROM users WHERE user_id = :k", {"k": 7})) == {
            "score": 70
        }
    finally:
        await db.close()
