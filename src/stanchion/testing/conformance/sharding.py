"""Conformance suite for sharding backends (shard databases and map stores).

Use it from a test module::

    from stanchion.testing.conformance.sharding import *  # noqa: F403

    @pytest.fixture(params=["sqlite", "postgresql"])
    def backend_url(request): ...   # or backend_params(...)

The ``shard_env`` fixture turns ``backend_url`` into a map store URL and as
many shard URLs as a test asks for: more files next to a SQLite URL, more
databases on the server of a PostgreSQL URL (dropped at the end).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from stanchion.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    ShardKeyRequired,
    ShardUnavailable,
    UnknownShard,
)
from stanchion.sharding import (
    Directory,
    HashRing,
    JumpHash,
    RouterOptions,
    ShardedDatabase,
    ShardMap,
)
from stanchion.sharding._api import open_shard
from stanchion.testing.servers import free_port
from stanchion.testing.services import create_postgres_database, drop_postgres_database
from stanchion.urls import parse_url

__all__ = [
    "ShardEnv",
    "TestShardingConformance",
    "insert_users",
    "shard_env",
    "users_schema",
]


@dataclass
class ShardEnv:
    """Shard and store URLs of one backend for one test."""

    scheme: str
    store: str
    base: str
    tmp: Path
    created: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        """The URL of shard ``name`` (created on first use)."""
        if self.scheme == "sqlite":
            return f"sqlite:///{self.tmp / (name + '.db')}"
        db = f"{self.base}_{name}"
        if db not in self.created:
            self.created.append(db)
            create_postgres_database(db)
        parsed = parse_url(self.store)
        host = f"{parsed.host}:{parsed.port or 5432}"
        user = f"{parsed.username}@" if parsed.username else ""
        return f"postgresql://{user}{host}/{db}"

    def urls(self, *names: str) -> dict[str, str]:
        """URLs of several shards (PostgreSQL databases are created in parallel)."""
        with ThreadPoolExecutor(max(1, len(names))) as pool:
            return dict(zip(names, pool.map(self.url, names)))

    def down_url(self) -> str:
        """A URL of this backend where no database can be reached."""
        if self.scheme == "sqlite":
            return f"sqlite:///{self.tmp / 'missing-dir' / 'nowhere' / 'x.db'}"
        return f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"

    def cleanup(self) -> None:
        """Drop the databases created."""

        def drop(db: str) -> None:
            with contextlib.suppress(Exception):
                drop_postgres_database(db)

        with ThreadPoolExecutor(max(1, len(self.created))) as pool:
            list(pool.map(drop, self.created))


@pytest.fixture
def shard_env(backend_url: str, tmp_path: Path) -> Iterator[ShardEnv]:
    """Store and shard URLs for the backend of ``backend_url``."""
    parsed = parse_url(backend_url)
    scheme = "sqlite" if parsed.scheme == "sqlite" else "postgresql"
    env = ShardEnv(scheme, backend_url, parsed.database, tmp_path)
    try:
        yield env
    finally:
        env.cleanup()


def users_schema(scheme: str) -> list[str]:
    """DDL of the ``users`` (sharded by ``user_id``) and ``regions`` tables."""
    big = "INTEGER" if scheme == "sqlite" else "bigint"
    return [
        f"CREATE TABLE IF NOT EXISTS users (user_id {big} PRIMARY KEY, name TEXT NOT NULL, "
        "region TEXT, score INTEGER NOT NULL DEFAULT 0)",
        "CREATE TABLE IF NOT EXISTS regions (code TEXT PRIMARY KEY, name TEXT NOT NULL)",
    ]


async def insert_users(db: ShardedDatabase, ids: range | list[int]) -> None:
    """Insert users ``ids`` with ``:name`` parameters."""
    for i in ids:
        await db.execute(
            i,
            "INSERT INTO users (user_id, name, region) VALUES (:id, :name, :region)",
            {"id": i, "name": f"user-{i}", "region": "eu"},
        )


async def _connect(
    env: ShardEnv, urls: dict[str, str], strategy: Any = None, **kw: Any
) -> ShardedDatabase:
    shard_map = ShardMap(strategy or HashRing(list(urls)), urls, store=env.store)
    return await ShardedDatabase.connect(
        shard_map,
        tables={"users": "user_id"},
        reference_tables=("regions",),
        schema=users_schema(env.scheme),
        **kw,
    )


async def _direct_ids(url: str) -> set[int]:
    shard = await open_shard(url)
    try:
        return {int(r["user_id"]) for r in await shard.fetch("SELECT user_id FROM users")}
    finally:
        await shard.close()


class TestShardingConformance:
    """Router and map-store behaviour every shard backend must show."""

    async def test_rows_land_on_the_owning_shard(self, shard_env: ShardEnv) -> None:
        urls = shard_env.urls("s1", "s2", "s3")
        db = await _connect(shard_env, urls)
        try:
            await insert_users(db, range(60))
            for name, url in urls.items():
                ids = await _direct_ids(url)
                assert ids, f"shard {name} got no rows"
                assert all(db.shard_for(i) == name for i in ids)
            row = await db.fetch_one(7, "SELECT name FROM users WHERE user_id = :id", {"id": 7})
            assert row == {"name": "user-7"}
        finally:
            await db.close()

    async def test_native_and_named_parameters(self, shard_env: ShardEnv) -> None:
        urls = shard_env.urls("s1", "s2")
        db = await _connect(shard_env, urls)
        try:
            mark = "?" if shard_env.scheme == "sqlite" else "$1"
            await insert_users(db, [1])
            rows = await db.fetch(1, f"SELECT name FROM users WHERE user_id = {mark}", [1])
            assert rows == [{"name": "user-1"}]
            n = await db.execute(
                1,
                "UPDATE users SET name = :name WHERE user_id = :id AND name <> ':id'",
                {"id": 1, "name": "renamed"},
            )
            assert n == 1
            assert await db.fetch(1, "SELECT name FROM users WHERE user_id = :id", {"id": 1}) == [
                {"name": "renamed"}
            ]
        finally:
            await db.close()

    async def test_transaction_commits_and_rolls_back(self, shard_env: ShardEnv) -> None:
        db = await _connect(shard_env, shard_env.urls("s1", "s2"))
        try:
            await insert_users(db, [5])
            async with db.transaction(5) as tx:
                await tx.execute("UPDATE users SET score = score + 1 WHERE user_id = :k", {"k": 5})
                assert tx.shard == db.shard_for(5)

            async def fail() -> None:
                async with db.transaction(5) as tx:
                    await tx.execute("UPDATE users SET score = 100 WHERE user_id = :k", {"k": 5})
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError):
                await fail()
            row = await db.fetch_one(5, "SELECT score FROM users WHERE user_id = :k", {"k": 5})
            assert row == {"score": 1}
            with pytest.raises(ConflictError):
                await insert_users(db, [5])
        finally:
            await db.close()

    async def test_fetch_all_gathers_every_shard(self, shard_env: ShardEnv) -> None:
        db = await _connect(shard_env, shard_env.urls("s1", "s2", "s3"))
        try:
            await insert_users(db, range(40))
            res = await db.fetch_all("SELECT user_id FROM users")
            assert res.failed == {} and res.complete
            assert sorted(r["user_id"] for r in res.rows) == list(range(40))
            await db.execute_all("INSERT INTO regions (code, name) VALUES ('eu', 'Europe')")
            regions = await db.fetch_all("SELECT code FROM regions")
            assert [r["code"] for r in regions.rows] == ["eu", "eu", "eu"]
        finally:
            await db.close()

    async def test_one_shard_down_partial_and_raise(self, shard_env: ShardEnv) -> None:
        urls = {**shard_env.urls("s1", "s2"), "s3": shard_env.down_url()}
        for url in (urls["s1"], urls["s2"]):
            shard = await open_shard(url)
            for sql in users_schema(shard_env.scheme):
                await shard.execute(sql)
            await shard.close()
        shard_map = ShardMap(HashRing(list(urls)), urls, store=shard_env.store)
        opts = RouterOptions(breaker_minimum_calls=2, breaker_window=4, breaker_wait=30.0)
        db = await ShardedDatabase.connect(
            shard_map, tables={"users": "user_id"}, options=opts, schema=()
        )
        try:
            live = [i for i in range(200) if db.shard_for(i) != "s3"][:30]
            dead = next(i for i in range(200) if db.shard_for(i) == "s3")
            await insert_users(db, live)
            res = await db.fetch_all("SELECT user_id FROM users", on_error="partial")
            assert set(res.failed) == {"s3"}
            assert sorted(r["user_id"] for r in res.rows) == sorted(live)
            with pytest.raises(ShardUnavailable) as info:
                await db.fetch_all("SELECT user_id FROM users")
            assert set(info.value.shards) == {"s3"}
            with pytest.raises(ShardUnavailable) as one:
                await db.fetch(dead, "SELECT * FROM users WHERE user_id = :k", {"k": dead})
            assert one.value.shard == "s3"
            # the breaker is open now: fails fast, the others keep serving
            with pytest.raises(ShardUnavailable):
                await db.fetch(dead, "SELECT * FROM users WHERE user_id = :k", {"k": dead})
            assert db.breaker("s3").state.name == "OPEN"
            assert await db.fetch(
                live[0], "SELECT 1 AS x FROM users WHERE user_id = :k", {"k": live[0]}
            ) == [{"x": 1}]
        finally:
            await db.close()

    async def test_bad_input_is_a_clear_error(self, shard_env: ShardEnv) -> None:
        db = await _connect(shard_env, shard_env.urls("s1", "s2"))
        try:
            with pytest.raises(TypeError, match="float"):
                await db.execute(1.5, "SELECT 1")  # type: ignore[arg-type]
            with pytest.raises(ShardKeyRequired) as missing:
                await db.execute(1, "UPDATE users SET name = 'x'")
            assert missing.value.column == "user_id"
            with pytest.raises(ShardKeyRequired):
                await db.execute(1, "INSERT INTO users (name) VALUES ('x')")
            with pytest.raises(ShardKeyRequired):
                await db.fetch(1, "SELECT * FROM users")
            with pytest.raises(ConfigError, match="execute_all"):
                await db.execute(1, "INSERT INTO regions (code, name) VALUES ('eu', 'E')")
            with pytest.raises(UnknownShard):
                db.breaker("nope")
            with pytest.raises(UnknownShard):
                ShardMap(HashRing(["a", "b"]), {"a": shard_env.url("a")}, store=shard_env.store)
        finally:
            await db.close()

    async def test_map_is_durable_and_reloaded(self, shard_env: ShardEnv) -> None:
        urls = shard_env.urls("s1", "s2", "s3")
        db = await _connect(
            shard_env, urls, JumpHash(list(urls)), options=RouterOptions(refresh_interval=0.05)
        )
        try:
            loaded = await ShardMap.load(shard_env.store)
            assert loaded.strategy == JumpHash(list(urls))
            assert loaded.version == db.shard_map.version
            assert loaded.urls == urls
            # a second process starting with an outdated strategy adopts the stored one
            stale = ShardMap(
                JumpHash(["s1", "s2"]), shard_env.urls("s1", "s2"), store=shard_env.store
            )
            db2 = await ShardedDatabase.connect(stale)
            try:
                assert db2.shards == ("s1", "s2", "s3")
                assert db2.tables == {"users": "user_id"}
            finally:
                await db2.close()
            await loaded.close()
        finally:
            await db.close()

    async def test_routers_reload_a_new_version(self, shard_env: ShardEnv) -> None:
        urls = shard_env.urls("s1", "s2")
        regions = Directory({"eu": "s1", "us": "s2"})
        opts = RouterOptions(refresh_interval=0.05)
        db = await _connect(shard_env, urls, regions, options=opts)
        try:
            other = await ShardMap.load(shard_env.store)
            version = await other.update(regions.assign("us", "s1"))
            assert version == db.shard_map.version + 1
            for _ in range(250):  # the router polls every 0.05 s
                if db.shard_for("us") == "s1":
                    break
                await asyncio.sleep(0.02)
            assert db.shard_for("us") == "s1"
            assert db.shard_map.version == version
            await other.close()
            with pytest.raises(BackendError):  # bad SQL is not an outage
                await db.fetch_all("SELECT * FROM no_such_table")
        finally:
            await db.close()
