"""Fence: a stale token is rejected atomically with the write, on every fence backend."""

from __future__ import annotations

from typing import Any

import pytest

from stanchion.election import Fence
from stanchion.errors import ConfigError, StaleFencingToken
from stanchion.testing.pytest_plugin import backend_params

FENCES = ("memory", "sqlite", "file", "postgresql", "redis", "etcd")


@pytest.fixture(params=backend_params(*FENCES))
def fence_url(request: pytest.FixtureRequest) -> str:
    name = "postgres" if request.param == "postgresql" else request.param
    return str(request.getfixturevalue(f"{name}_url"))


async def test_stale_token_rejected_and_fn_not_run(fence_url: str) -> None:
    ran: list[int] = []

    def record(token: int) -> Any:
        def fn(handle: Any) -> int:
            ran.append(token)
            return token

        return fn

    async with Fence(fence_url, "orders") as fence:
        assert await fence.current() is None
        assert await fence.write(5, record(5)) == 5
        assert await fence.write(5, record(5)) == 5  # the same term writes again
        with pytest.raises(StaleFencingToken) as info:
            await fence.write(4, record(4))
        assert (info.value.resource, info.value.token, info.value.current) == ("orders", 4, 5)
        assert await fence.write(9, record(9)) == 9
        assert await fence.current() == 9
        assert ran == [5, 5, 9]
    # Another resource has its own highest token.
    async with Fence(fence_url, "other") as fence:
        assert await fence.write(1, lambda h: "ok") == "ok"


async def test_async_fn_and_failure(fence_url: str) -> None:
    async with Fence(fence_url, "r") as fence:

        async def fn(handle: Any) -> str:
            return "async"

        assert await fence.write(3, fn) == "async"

        def boom(handle: Any) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await fence.write(4, boom)


def test_bad_arguments(sqlite_url: str) -> None:
    with pytest.raises(ConfigError):
        Fence(sqlite_url, "")
    with pytest.raises(ConfigError):
        Fence("nats://127.0.0.1:4222", "r")  # no fence backend for nats


async def test_sqlite_write_and_fence_commit_together(sqlite_url: str) -> None:
    async with Fence(sqlite_url, "ledger") as fence:

        def setup(conn: Any) -> None:
            conn.execute("CREATE TABLE IF NOT EXISTS ledger (token INTEGER, note TEXT)")
            conn.execute("INSERT INTO ledger VALUES (2, 'first')")

        await fence.write(2, setup)

        def fail(conn: Any) -> None:
            conn.execute("INSERT INTO ledger VALUES (3, 'rolled back')")
            raise RuntimeError("after the insert")

        with pytest.raises(RuntimeError):
            await fence.write(3, fail)
        # The failed write rolled back its token too: token 2 may still write.
        assert await fence.current() == 2
        rows = await fence.write(2, lambda c: c.execute("SELECT note FROM ledger").fetchall())
        assert rows == [("first",)]


def test_update_sql() -> None:
    sql = Fence.update_sql("accounts", "balance = $2", "id = $3")
    assert sql == (
        "UPDATE accounts SET balance = $2, fencing_token = $1 "
        "WHERE (id = $3) AND fencing_token <= $1"
    )
    with pytest.raises(ConfigError):
        Fence.update_sql("accounts; drop", "a = 1", "true")
    assert Fence.SQL.format(table="accounts", assignments="balance = $2", where="id = $3") == sql


async def test_update_sql_rejects_a_stale_writer_in_sqlite(tmp_path: Any) -> None:
    import sqlite3

    conn = sqlite3.connect(tmp_path / "app.db")
    conn.execute("CREATE TABLE accounts (id INTEGER, balance INTEGER, fencing_token INTEGER)")
    conn.execute("INSERT INTO accounts VALUES (1, 100, 0)")
    sql = Fence.update_sql("accounts", "balance = :b", "id = :id", param=":token")
    assert conn.execute(sql, {"b": 150, "id": 1, "token": 7}).rowcount == 1
    assert conn.execute(sql, {"b": 999, "id": 1, "token": 6}).rowcount == 0  # deposed leader
    assert conn.execute("SELECT balance, fencing_token FROM accounts").fetchone() == (150, 7)


async def test_fn_without_argument(fence_url: str) -> None:
    calls: list[int] = []
    async with Fence(fence_url, "noarg") as fence:
        await fence.write(1, lambda: calls.append(1))

        async def fn() -> None:
            calls.append(2)

        await fence.write(2, fn)
        with pytest.raises(StaleFencingToken):
            await fence.write(1, lambda: calls.append(3))
    assert calls == [1, 2]


async def test_two_fences_on_one_resource_share_the_highest_token(fence_url: str) -> None:
    async with Fence(fence_url, "shared") as old, Fence(fence_url, "shared") as new:
        await old.write(4, lambda: None)
        await new.write(5, lambda: None)
        with pytest.raises(StaleFencingToken):
            await old.write(4, lambda: None)
        assert await old.current() == 5
