"""pytest fixtures for stanchion and for code built on it.

Enable with ``pytest_plugins = ["stanchion.testing.pytest_plugin"]``.

Fixtures:
    namespace: a fresh name prefix for this test.
    sqlite_url / memory_url: an embedded backend URL private to the test.
    postgres_url: a fresh PostgreSQL database, dropped afterwards.
    redis_url, nats_url, amqp_url, mqtt_url, etcd_url: the shared service's
        URL with ``?prefix=<namespace>``; what the prefix covers is deleted
        afterwards.
    kafka_url: a session-wide throwaway Tansu (Kafka-protocol) broker with
        ``?prefix=<namespace>`` (and a 2 s group session timeout).
    servers: a :class:`ServerFactory` that starts throwaway servers and kills
        them all when the test ends.
    backend_url: for tests parametrised by :func:`backend_params`, the URL of
        the backend named by the parameter.

A missing service skips the test with the reason, or fails it when
``STANCHION_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stanchion.testing import servers as _servers
from stanchion.testing.services import (
    SERVICES,
    cleanup_amqp,
    cleanup_etcd,
    cleanup_nats,
    cleanup_redis,
    create_postgres_database,
    drop_postgres_database,
    is_reachable,
    new_namespace,
    require_services,
    with_query,
)

__all__ = ["ServerFactory", "backend_params", "need_service"]


def need_service(scheme: str) -> str:
    """The service's URL, or skip (fail under STANCHION_REQUIRE_SERVICES=1) if unreachable."""
    service = SERVICES[scheme]
    host, port = service.address
    if not is_reachable(host, port):
        reason = f"{scheme} is not reachable at {host}:{port} (set {service.env})"
        if require_services():
            pytest.fail(f"STANCHION_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return service.url


def backend_params(*schemes: str) -> list[Any]:
    """``pytest.param`` objects, one per backend scheme, for ``backend_url``.

    Example::

        @pytest.fixture(params=backend_params("memory", "sqlite", "postgresql"))
        def url(backend_url: str) -> str:
            return backend_url
    """
    return [pytest.param(s, id=s) for s in schemes]


@pytest.fixture
def namespace() -> str:
    """A fresh name prefix (``stn…``) for this test."""
    return new_namespace()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file private to this test."""
    return f"sqlite:///{tmp_path / 'stanchion.db'}"


@pytest.fixture
def memory_url(namespace: str) -> str:
    """An in-process backend URL; the namespace keeps instances apart."""
    return f"memory://{namespace}"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    """A directory URL private to this test (for ``file://`` backends)."""
    path = tmp_path / "files"
    path.mkdir()
    return f"file://{path}"


@pytest.fixture
def postgres_url(namespace: str) -> Iterator[str]:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    admin = need_service("postgresql")
    url = create_postgres_database(namespace, admin)
    try:
        yield url
    finally:
        drop_postgres_database(namespace, admin)


@pytest.fixture
def redis_url(namespace: str) -> Iterator[str]:
    """The shared Redis with ``?prefix=<namespace>:``; its keys are deleted afterwards."""
    base = need_service("redis")
    yield with_query(base, prefix=f"{namespace}:")
    with contextlib.suppress(Exception):
        cleanup_redis(namespace, base)


@pytest.fixture
def nats_url(namespace: str) -> Iterator[str]:
    """The shared NATS with ``?prefix=<namespace>``; its streams are deleted afterwards."""
    base = need_service("nats")
    yield with_query(base, prefix=namespace)
    with contextlib.suppress(Exception):
        cleanup_nats(namespace, base)


@pytest.fixture(scope="session")
def _amqp_namespaces() -> Iterator[list[str]]:
    used: list[str] = []
    yield used
    with contextlib.suppress(Exception):
        cleanup_amqp(*used)  # one listing for the whole session: rabbitmqctl is slow


@pytest.fixture
def amqp_url(namespace: str, _amqp_namespaces: list[str]) -> str:
    """The shared RabbitMQ with ``?prefix=<namespace>``; its queues/exchanges go at session end."""
    base = need_service("amqp")
    _amqp_namespaces.append(namespace)
    return with_query(base, prefix=namespace)


@pytest.fixture
def mqtt_url(namespace: str) -> str:
    """The shared Mosquitto with ``?prefix=<namespace>`` (a topic prefix)."""
    base = need_service("mqtt")
    return with_query(base, prefix=namespace)


@pytest.fixture
def etcd_url(namespace: str) -> Iterator[str]:
    """The shared etcd with ``?prefix=/<namespace>/``; its keys are deleted afterwards."""
    base = need_service("etcd")
    yield with_query(base, prefix=f"/{namespace}/")
    with contextlib.suppress(Exception):
        cleanup_etcd(f"/{namespace}/", base)


@pytest.fixture(scope="session")
def _kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_servers.ServerProcess]:
    try:
        server = _servers.kafka_server(tmp_path_factory.mktemp("kafka"))
    except FileNotFoundError as exc:
        if require_services():
            pytest.fail(f"STANCHION_REQUIRE_SERVICES=1 but {exc}", pytrace=False)
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def kafka_url(_kafka_broker: _servers.ServerProcess, namespace: str) -> str:
    """A throwaway Tansu broker (one per session) with ``?prefix=<namespace>``.

    The URL sets a 2 s group session (``session_timeout=2``): Tansu has no
    minimum, a killed consumer's partitions move quickly, and Tansu holds a
    new group's first join for half the session timeout.
    """
    return with_query(_kafka_broker.url, prefix=namespace, session_timeout="1")


_FIXTURE_FOR = {
    "memory": "memory_url",
    "sqlite": "sqlite_url",
    "file": "file_url",
    "postgresql": "postgres_url",
    "redis": "redis_url",
    "nats": "nats_url",
    "amqp": "amqp_url",
    "mqtt": "mqtt_url",
    "etcd": "etcd_url",
    "kafka": "kafka_url",
}


@pytest.fixture
def backend_url(request: pytest.FixtureRequest) -> str:
    """The URL of the backend named by the test's parameter (see :func:`backend_params`)."""
    scheme = getattr(request, "param", None)
    if scheme not in _FIXTURE_FOR:
        raise pytest.UsageError(
            f"backend_url needs a parameter among {sorted(_FIXTURE_FOR)}, got {scheme!r}"
        )
    return str(request.getfixturevalue(_FIXTURE_FOR[scheme]))


class ServerFactory:
    """Starts throwaway servers in a test's temporary directory; kills them at teardown."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._started: list[_servers.ServerProcess] = []

    def _track(self, server: _servers.ServerProcess) -> _servers.ServerProcess:
        self._started.append(server)
        return server

    def _dir(self, name: str) -> Path:
        return self._root / f"{name}-{len(self._started)}"

    def redis(self, **kw: Any) -> _servers.ServerProcess:
        """A throwaway redis-server."""
        return self._track(_servers.redis_server(self._dir("redis"), **kw))

    def nats(self, **kw: Any) -> _servers.ServerProcess:
        """A throwaway nats-server with JetStream."""
        return self._track(_servers.nats_server(self._dir("nats"), **kw))

    def mosquitto(self, **kw: Any) -> _servers.ServerProcess:
        """A throwaway mosquitto."""
        return self._track(_servers.mosquitto_server(self._dir("mosquitto"), **kw))

    def etcd(self, **kw: Any) -> _servers.ServerProcess:
        """A throwaway etcd."""
        return self._track(_servers.etcd_server(self._dir("etcd"), **kw))

    def postgres(self, **kw: Any) -> _servers.ServerProcess:
        """A throwaway PostgreSQL cluster."""
        return self._track(_servers.postgres_server(self._dir("postgres"), **kw))

    def kafka(self, **kw: Any) -> _servers.ServerProcess:
        """A throwaway Tansu (Kafka-protocol) broker, storage in memory."""
        return self._track(_servers.kafka_server(self._dir("kafka"), **kw))

    def close(self) -> None:
        """Kill every server started through this factory."""
        for server in reversed(self._started):
            server.remove()
        self._started.clear()


@pytest.fixture
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """A :class:`ServerFactory`; every server it started is SIGKILLed after the test."""
    factory = ServerFactory(tmp_path_factory.mktemp("servers", numbered=True))
    try:
        yield factory
    finally:
        factory.close()
