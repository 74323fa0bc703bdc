"""The shared services tests talk to, and per-test namespaces on them.

Service URLs come from environment variables with the standard loopback
defaults. A test gets a fresh namespace on each service it uses: its own
PostgreSQL database, and a ``prefix`` query parameter on the other URLs that
every stanchion backend honours by prefixing each key, stream, subject,
queue, exchange, topic or etcd key it creates. The fixtures delete what the
namespace holds when the test ends.

========================  ======================================  ============
variable                  default                                 service
========================  ======================================  ============
STANCHION_POSTGRES_URL    postgresql://postgres@127.0.0.1:5432/postgres  PostgreSQL
STANCHION_REDIS_URL       redis://127.0.0.1:6379/0                Redis
STANCHION_NATS_URL        nats://127.0.0.1:4222                   NATS JetStream
STANCHION_AMQP_URL        amqp://guest:guest@127.0.0.1:5672/      RabbitMQ
STANCHION_MQTT_URL        mqtt://127.0.0.1:1883                   Mosquitto
STANCHION_ETCD_URL        etcd://127.0.0.1:2379                   etcd
========================  ======================================  ============

Set ``STANCHION_REQUIRE_SERVICES=1`` to turn "service missing, test skipped"
into a failure (CI does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "SERVICES",
    "Service",
    "cleanup_amqp",
    "cleanup_etcd",
    "cleanup_nats",
    "cleanup_redis",
    "create_postgres_database",
    "drop_postgres_database",
    "is_reachable",
    "new_namespace",
    "require_services",
    "run_sync",
    "with_query",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Service:
    """A shared service: its name, URL variable and default URL."""

    name: str
    env: str
    default: str

    @property
    def url(self) -> str:
        """The configured URL (from the environment or the default)."""
        return os.environ.get(self.env, self.default)

    @property
    def address(self) -> tuple[str, int]:
        """Host and port to probe."""
        parts = urlsplit(self.url)
        return parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[self.name]


_DEFAULT_PORTS: Final = {
    "postgresql": 5432,
    "redis": 6379,
    "nats": 4222,
    "amqp": 5672,
    "mqtt": 1883,
    "etcd": 2379,
}

SERVICES: Final[dict[str, Service]] = {
    "postgresql": Service(
        "postgresql", "STANCHION_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    ),
    "redis": Service("redis", "STANCHION_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "nats": Service("nats", "STANCHION_NATS_URL", "nats://127.0.0.1:4222"),
    "amqp": Service("amqp", "STANCHION_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
    "mqtt": Service("mqtt", "STANCHION_MQTT_URL", "mqtt://127.0.0.1:1883"),
    "etcd": Service("etcd", "STANCHION_ETCD_URL", "etcd://127.0.0.1:2379"),
}
"""The services by scheme."""


def require_services() -> bool:
    """True when ``STANCHION_REQUIRE_SERVICES`` asks that no service test be skipped."""
    return os.environ.get("STANCHION_REQUIRE_SERVICES", "") not in ("", "0", "false")


_reachable_cache: dict[tuple[str, int], bool] = {}


def is_reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection to ``host:port`` succeeds within ``timeout``."""
    key = (host, port)
    if _reachable_cache.get(key):
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _reachable_cache[key] = ok
    return ok


_counter = 0
_session = secrets.token_hex(3)


def new_namespace() -> str:
    """A fresh, short, lower-case identifier usable as a name prefix anywhere.

    It starts with ``stn`` and holds only ``[a-z0-9]``: valid as a PostgreSQL
    database name, a NATS stream name, a Redis key or an MQTT topic level.
    """
    global _counter
    _counter += 1
    return f"stn{_session}{_counter:04d}x{secrets.token_hex(2)}"


def with_query(url: str, **params: str) -> str:
    """``url`` with query parameters added."""
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={v}" for k, v in params.items())


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async function to completion from sync code, in its own thread and loop."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(_call(fn))
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def _call(fn: Callable[[], Awaitable[T]]) -> T:
    return await fn()


def _pg_base(admin_url: str) -> str:
    return admin_url.rsplit("/", 1)[0]


def create_postgres_database(name: str, admin_url: str | None = None) -> str:
    """Create database ``name`` and return its URL (on the admin URL's server)."""
    import asyncpg

    admin = admin_url or SERVICES["postgresql"].url

    async def go() -> None:
        conn = await asyncpg.connect(admin.split("?", 1)[0], timeout=10)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    run_sync(go)
    return f"{_pg_base(admin)}/{name}"


def drop_postgres_database(name: str, admin_url: str | None = None) -> None:
    """Drop database ``name``, disconnecting any session still in it."""
    import asyncpg

    admin = admin_url or SERVICES["postgresql"].url

    async def go() -> None:
        conn = await asyncpg.connect(admin.split("?", 1)[0], timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_sync(go)


def cleanup_redis(prefix: str, url: str | None = None) -> int:
    """Delete every Redis key starting with ``prefix``; return how many."""
    import redis

    client = redis.Redis.from_url((url or SERVICES["redis"].url).split("?", 1)[0])
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


def cleanup_nats(prefix: str, url: str | None = None) -> int:
    """Delete every JetStream stream (and KV bucket) whose name starts with ``prefix``."""
    import nats

    server = (url or SERVICES["nats"].url).split("?", 1)[0]

    async def go() -> int:
        nc = await nats.connect(server, connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            deleted = 0
            for info in await js.streams_info():
                name = info.config.name or ""
                if name.startswith(prefix) or name.startswith(f"KV_{prefix}"):
                    await js.delete_stream(name)
                    deleted += 1
            return deleted
        finally:
            await nc.close()

    return run_sync(go)


def cleanup_amqp(*prefixes: str, url: str | None = None) -> int:
    """Delete RabbitMQ queues and exchanges whose names start with any of ``prefixes``.

    Names are listed with one ``rabbitmqctl`` call per kind (the management
    API is not assumed; it costs about a second each) and deleted over AMQP,
    so call it once for many prefixes. Does nothing where ``rabbitmqctl`` is
    not installed.
    """
    ctl = shutil.which("rabbitmqctl")
    if ctl is None or not prefixes:
        return 0
    found: dict[str, list[str]] = {}
    for kind in ("queues", "exchanges"):
        out = subprocess.run(
            [ctl, "-q", f"list_{kind}", "name"], capture_output=True, text=True, timeout=60
        )
        found[kind] = [n for n in out.stdout.split() if n.startswith(prefixes)]
    if not any(found.values()):
        return 0
    import aio_pika

    async def go() -> int:
        conn = await aio_pika.connect((url or SERVICES["amqp"].url).split("?", 1)[0])
        try:
            channel = await conn.channel()
            for name in found["queues"]:
                await channel.queue_delete(name)
            for name in found["exchanges"]:
                await channel.exchange_delete(name)
        finally:
            await conn.close()
        return len(found["queues"]) + len(found["exchanges"])

    return run_sync(go)


def _etcd_http(url: str) -> str:
    parts = urlsplit(url)
    return f"http://{parts.hostname or '127.0.0.1'}:{parts.port or 2379}"


def cleanup_etcd(prefix: str, url: str | None = None) -> int:
    """Delete every etcd key starting with ``prefix`` (through the v3 JSON gateway)."""
    key = prefix.encode()
    end = key[:-1] + bytes([key[-1] + 1])
    body = json.dumps(
        {"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()}
    ).encode()
    req = urllib.request.Request(
        _etcd_http(url or SERVICES["etcd"].url) + "/v3/kv/deleterange",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        answer = json.loads(resp.read())
    return int(answer.get("deleted", 0))
