"""A real PostgreSQL shard server killed with SIGKILL: the others keep serving."""

from __future__ import annotations

import asyncio
import time

import pytest

from stanchion.errors import CircuitOpenError, ShardUnavailable
from stanchion.sharding import JumpHash, RouterOptions, ShardedDatabase, ShardMap
from stanchion.sharding._api import open_shard
from stanchion.testing.services import create_postgres_database

SCHEMA = "CREATE TABLE IF NOT EXISTS users (user_id bigint PRIMARY KEY, name text)"


@pytest.mark.slow
async def test_killed_shard_server(servers: object, postgres_url: str, namespace: str) -> None:
    server = servers.postgres()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:  # the port opens before the server accepts connections
        try:
            lone = await asyncio.to_thread(create_postgres_database, "lone", server.url)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    urls = {
        "s1": postgres_url,
        "s2": create_postgres_database(f"{namespace}_s2"),
        "s3": lone,
    }
    try:
        for url in urls.values():
            shard = await open_shard(url)
            await shard.execute(SCHEMA)
            await shard.close()
        opts = RouterOptions(breaker_minimum_calls=2, breaker_window=4, breaker_wait=60, timeout=2)
        db = await ShardedDatabase.connect(
            ShardMap(JumpHash(list(urls)), urls, store=postgres_url),
            tables={"users": "user_id"},
            options=opts,
        )
        for k in range(60):
            await db.execute(k, "INSERT INTO users VALUES (:k, :n)", {"k": k, "n": f"u{k}"})
        assert len((await db.fetch_all("SELECT user_id FROM users")).rows) == 60
        server.kill()
        res = await db.fetch_all("SELECT user_id FROM users", on_error="partial")
        assert list(res.failed) == ["s3"]
        assert {r["user_id"] for r in res.rows} == {k for k in range(60) if db.shard_for(k) != "s3"}
        dead = next(k for k in range(60) if db.shard_for(k) == "s3")
        for _ in range(3):
            with pytest.raises(ShardUnavailable):
                await db.fetch(dead, "SELECT * FROM users WHERE user_id = :k", {"k": dead})
        t0 = time.perf_counter()
        with pytest.raises(ShardUnavailable) as info:
            await db.fetch(dead, "SELECT * FROM users WHERE user_id = :k", {"k": dead})
        assert isinstance(info.value.shards["s3"], CircuitOpenError)  # fails fast, no connect
        assert time.perf_counter() - t0 < 0.05
        live = next(k for k in range(60) if db.shard_for(k) != "s3")
        row = await db.fetch_one(live, "SELECT name FROM users WHERE user_id = :k", {"k": live})
        assert row == {"name": f"u{live}"}
        await db.close()
    finally:
        from stanchion.testing.services import drop_postgres_database

        drop_postgres_database(f"{namespace}_s2")
