"""The test harness itself: namespaces isolate tests, throwaway servers die by PID."""

from __future__ import annotations

import os
import signal

import pytest
import redis

from stanchion.testing.pytest_plugin import ServerFactory
from stanchion.testing.services import cleanup_redis, new_namespace

SHARED_KEY = "orders:last"  # the same name used by two tests below


def _client(url: str) -> tuple[redis.Redis, str]:
    base, _, query = url.partition("?")
    prefix = dict(p.split("=", 1) for p in query.split("&"))["prefix"]
    return redis.Redis.from_url(base), prefix


@pytest.mark.parametrize("value", ["first", "second"])
def test_redis_namespaces_isolate_same_names(redis_url: str, value: str) -> None:
    client, prefix = _client(redis_url)
    try:
        key = prefix + SHARED_KEY
        assert client.get(key) is None, "a previous test's key leaked into this namespace"
        client.set(key, value)
        assert client.get(key) == value.encode()
    finally:
        client.close()


def test_namespaces_are_unique() -> None:
    names = {new_namespace() for _ in range(1000)}
    assert len(names) == 1000
    assert all(n.isalnum() and n.islower() for n in names)


def test_cleanup_deletes_only_the_namespace(redis_url: str) -> None:
    client, prefix = _client(redis_url)
    other = new_namespace() + ":"
    try:
        client.set(prefix + "a", 1)
        client.set(other + "a", 1)
        assert cleanup_redis(prefix, redis_url.split("?")[0]) == 1
        assert client.get(other + "a") == b"1"
    finally:
        client.delete(other + "a")
        client.close()


async def test_postgres_databases_isolate_same_table(postgres_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        # would fail with "relation already exists" if databases were shared
        await conn.execute("CREATE TABLE orders (id int primary key)")
        await conn.execute("INSERT INTO orders VALUES (1)")
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1
        assert (await conn.fetchval("SELECT current_database()")).startswith("stn")
    finally:
        await conn.close()


async def test_postgres_databases_isolate_same_table_again(postgres_url: str) -> None:
    await test_postgres_databases_isolate_same_table(postgres_url)


def test_throwaway_redis_started_and_killed(servers: ServerFactory) -> None:
    server = servers.redis()
    client = redis.Redis.from_url(server.url, socket_timeout=2)
    try:
        assert client.ping()
        client.set("k", "v")
        pid = server.pid
        server.kill()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()  # same port, fresh (no persistence)
        assert client.ping()
        assert client.get("k") is None
    finally:
        client.close()


def test_throwaway_redis_pause_and_resume(servers: ServerFactory) -> None:
    server = servers.redis()
    client = redis.Redis.from_url(server.url, socket_timeout=0.5)
    try:
        server.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        server.resume()
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.ping()
    finally:
        client.close()
        server.resume()


@pytest.mark.parametrize("kind", ["nats", "mosquitto", "etcd", "postgres"])
def test_other_throwaway_servers_start_and_stop(servers: ServerFactory, kind: str) -> None:
    server = getattr(servers, kind)()
    pid = server.pid
    os.kill(pid, 0)
    server.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, signal.SIG_DFL)


async def test_shared_services_answer(nats_url: str, etcd_url: str, amqp_url: str) -> None:
    import aio_pika
    import aiohttp
    import nats

    nc = await nats.connect(nats_url.split("?")[0])
    await nc.close()
    conn = await aio_pika.connect_robust(amqp_url.split("?")[0])
    await conn.close()
    host = etcd_url.split("://")[1].split("?")[0]
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://{host}/v3/maintenance/status", json={}) as resp,
    ):
        assert resp.status == 200
