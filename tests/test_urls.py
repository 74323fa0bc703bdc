from __future__ import annotations

import sys
import types

import pytest

from stanchion.errors import ConfigError
from stanchion.urls import BackendRegistry, default_registry, parse_url


def test_parse_url_parts() -> None:
    url = parse_url("postgresql+asyncpg://u:p%40ss@db.local:6543/shop?table=leases&ttl=3")
    assert url.scheme == "postgresql"
    assert url.driver == "asyncpg"
    assert (url.host, url.port, url.username, url.password) == ("db.local", 6543, "u", "p@ss")
    assert url.database == "shop"
    assert url.query == {"table": "leases", "ttl": "3"}
    assert url.get_float("ttl", 1.0) == 3.0
    assert "p%40ss" not in url.masked() and "***" in url.masked()


def test_parse_url_sqlite_path() -> None:
    url = parse_url("sqlite:///var/data/x.db")
    assert url.scheme == "sqlite" and url.host is None and url.path == "/var/data/x.db"


@pytest.mark.parametrize("bad", ["", "redis", "localhost:6379", "redis://h:notaport"])
def test_parse_url_rejects_bad_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_url(bad)


def test_bad_query_value_is_config_error() -> None:
    with pytest.raises(ConfigError, match="ttl"):
        parse_url("redis://h/0?ttl=soon").get_float("ttl", 1.0)


def test_registry_picks_backend_by_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("fake_stanchion_backends")

    class RedisThing:
        pass

    class SqliteThing:
        pass

    module.RedisThing = RedisThing  # type: ignore[attr-defined]
    module.SqliteThing = SqliteThing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_stanchion_backends", module)
    registry = BackendRegistry()
    registry.register("widget", "redis", "fake_stanchion_backends:RedisThing", extra="redis")
    registry.register("widget", "sqlite", "fake_stanchion_backends:SqliteThing")
    found, parsed = registry.load("widget", "redis://127.0.0.1:6379/0")
    assert found is RedisThing and parsed.port == 6379
    assert registry.load("widget", "sqlite:///x.db")[0] is SqliteThing
    # aliases and scheme+driver resolve to the registered scheme
    registry.register("widget", "postgresql", "fake_stanchion_backends:SqliteThing")
    assert registry.load("widget", "postgres+asyncpg://h/db")[0] is SqliteThing


def test_unknown_scheme_lists_known_ones() -> None:
    registry = BackendRegistry()
    registry.register("widget", "redis", "x:y")
    with pytest.raises(ConfigError, match=r"known schemes: redis://"):
        registry.load("widget", "mongodb://h/db")


def test_missing_extra_names_the_pip_line() -> None:
    registry = BackendRegistry()
    registry.register("widget", "redis", "a_driver_that_is_not_installed_xyz:Thing", extra="redis")
    with pytest.raises(ConfigError) as info:
        registry.load("widget", "redis://127.0.0.1:6379/0")
    assert "pip install 'stanchion[redis]'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_driver_inside_backend_module_names_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pytest.TempPathFactory
) -> None:
    # A backend module that imports a driver which is not installed.
    pkg = tmp_path / "fake_backend_pkg_abc"  # type: ignore[operator]
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import not_installed_driver_qq  # noqa\nclass B: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = BackendRegistry()
    registry.register("widget", "nats", "fake_backend_pkg_abc:B", extra="nats")
    with pytest.raises(ConfigError, match=r"not_installed_driver_qq.*stanchion\[nats\]"):
        registry.load("widget", "nats://127.0.0.1:4222")


def test_registry_rejects_bad_target() -> None:
    with pytest.raises(ConfigError):
        BackendRegistry().register("widget", "x", "no_colon_here")


def test_default_registry_knows_every_pattern() -> None:
    for pattern in ("eventsourcing", "pubsub", "election", "resilience", "shard", "readmodel"):
        assert default_registry.schemes(pattern), pattern
    assert {"redis", "nats", "amqp", "mqtt", "sqlite", "memory"} <= set(
        default_registry.schemes("pubsub")
    )
