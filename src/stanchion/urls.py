"""Backends by URL: one registry, used by every pattern.

A backend URL names its engine by scheme (``redis://``, ``postgresql://``,
``sqlite:///path.db``, ``memory://``); ``scheme+driver`` is allowed as in
SQLAlchemy (``postgresql+asyncpg://``). Each pattern asks the registry for the
target registered under ``(pattern, scheme)``; targets are ``"module:attr"``
import strings loaded lazily, so importing stanchion loads no driver.

An unknown scheme, or a target whose driver is not installed, raises
:class:`~stanchion.errors.ConfigError` naming what to do
(``pip install 'stanchion[redis]'``). Third parties add backends with
:meth:`BackendRegistry.register` or the ``stanchion.backends`` entry point
group (entry point name ``"<pattern>:<scheme>"``, value ``"module:attr"``).

.. versionadded:: 0.1
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from stanchion.errors import ConfigError

__all__ = ["BackendRegistry", "ParsedURL", "Target", "default_registry", "parse_url"]


@dataclass(frozen=True, slots=True)
class ParsedURL:
    """A backend URL split into its parts.

    Attributes:
        raw: the URL as given.
        scheme: the engine name, lower case, without ``+driver``.
        driver: the part after ``+`` in the scheme, or ``None``.
        host: host name or address, or ``None`` (``sqlite:///x.db``).
        port: port number, or ``None``.
        username: user name, or ``None``.
        password: password, or ``None``.
        path: the path, percent-decoded (``/x.db``; ``/dbname``).
        query: the query parameters; the last value wins for repeated keys.
    """

    raw: str
    scheme: str
    driver: str | None
    host: str | None
    port: int | None
    username: str | None
    password: str | None
    path: str
    query: dict[str, str] = field(default_factory=dict)

    @property
    def database(self) -> str:
        """The path without its leading slash (a database or file name)."""
        return self.path[1:] if self.path.startswith("/") else self.path

    def masked(self) -> str:
        """The URL with its password replaced by ``***``, for logs and errors."""
        if self.password is None:
            return self.raw
        return self.raw.replace(":" + quote(self.password, safe="") + "@", ":***@").replace(
            ":" + self.password + "@", ":***@"
        )

    def get_float(self, key: str, default: float) -> float:
        """A query parameter as a float, or ``default``; a bad value is a ConfigError."""
        value = self.query.get(key)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(
                f"{self.masked()}: query parameter {key}={value!r} is not a number"
            ) from None

    def get_int(self, key: str, default: int) -> int:
        """A query parameter as an int, or ``default``; a bad value is a ConfigError."""
        value = self.query.get(key)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(
                f"{self.masked()}: query parameter {key}={value!r} is not an integer"
            ) from None

    def get_bool(self, key: str, default: bool) -> bool:
        """A query parameter as a bool (true/false, 1/0, yes/no, on/off)."""
        value = self.query.get(key)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{self.masked()}: query parameter {key}={value!r} is not a boolean")

    def without_query(self) -> str:
        """The URL without its query string (what most drivers accept)."""
        return self.raw.split("?", 1)[0]


def parse_url(url: str) -> ParsedURL:
    """Split a backend URL into a :class:`ParsedURL`.

    Raises:
        ConfigError: the URL has no scheme or a malformed port.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(
            f"invalid backend URL {url!r}: expected scheme://..., "
            "for example sqlite:///data.db, memory://, redis://127.0.0.1:6379/0"
        )
    parts = urlsplit(url)
    scheme, _, driver = parts.scheme.lower().partition("+")
    if not scheme:
        raise ConfigError(f"invalid backend URL {url!r}: missing scheme")
    hostname = parts.hostname
    try:
        if "," in parts.netloc:
            # Several hosts (kafka://h1:9092,h2:9092): host and port are the
            # first one's; drivers that take a list read the others from ``raw``.
            first = urlsplit("//" + parts.netloc.rpartition("@")[2].split(",")[0])
            port, hostname = first.port, first.hostname
        else:
            port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid backend URL {url!r}: {exc}") from None
    return ParsedURL(
        raw=url,
        scheme=scheme,
        driver=driver or None,
        host=hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=unquote(parts.path),
        query=dict(parse_qsl(parts.query, keep_blank_values=True)),
    )


@dataclass(frozen=True, slots=True)
class Target:
    """Where a backend lives: an import string and the extra that provides its driver.

    Attributes:
        ref: ``"package.module:attribute"``.
        extra: the pip extra that installs the driver, or ``None`` if the core
            install suffices.
    """

    ref: str
    extra: str | None = None

    def load(self) -> object:
        """Import and return the target object."""
        module_name, _, attr = self.ref.partition(":")
        module = importlib.import_module(module_name)
        obj = module
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
        return obj


# Aliases: the scheme a user may type -> the scheme backends are registered under.
_ALIASES: Final = {"postgres": "postgresql", "pg": "postgresql", "rediss": "redis", "amqps": "amqp"}


class BackendRegistry:
    """Maps ``(pattern, scheme)`` to a lazily imported backend target.

    Registration is append-only and thread-safe. Entry points in the
    ``stanchion.backends`` group are read once, on the first lookup of the
    default registry.
    """

    def __init__(self, *, load_entry_points: bool = False) -> None:
        self._targets: dict[tuple[str, str], Target] = {}
        self._lock = threading.Lock()
        self._entry_points_pending = load_entry_points

    def register(self, pattern: str, scheme: str, ref: str, *, extra: str | None = None) -> None:
        """Register ``ref`` (``"module:attr"``) as the ``scheme`` backend of ``pattern``."""
        if ":" not in ref:
            raise ConfigError(f"backend target {ref!r} must look like 'package.module:attr'")
        with self._lock:
            self._targets[(pattern, scheme.lower())] = Target(ref, extra)

    def schemes(self, pattern: str) -> list[str]:
        """The schemes registered for ``pattern``, sorted."""
        self._load_entry_points()
        return sorted(s for p, s in self._targets if p == pattern)

    def target(self, pattern: str, url: str | ParsedURL) -> tuple[Target, ParsedURL]:
        """The target registered for the URL's scheme, without importing it."""
        parsed = url if isinstance(url, ParsedURL) else parse_url(url)
        self._load_entry_points()
        scheme = _ALIASES.get(parsed.scheme, parsed.scheme)
        found = self._targets.get((pattern, scheme))
        if found is None:
            known = ", ".join(f"{s}://" for s in self.schemes(pattern)) or "none"
            raise ConfigError(
                f"no {pattern} backend for scheme {parsed.scheme!r} in {parsed.masked()}; "
                f"known schemes: {known}"
            )
        return found, parsed

    def load(self, pattern: str, url: str | ParsedURL) -> tuple[object, ParsedURL]:
        """Import the backend target for ``url`` and return it with the parsed URL.

        Raises:
            ConfigError: unknown scheme, or the driver's extra is not installed.
        """
        target, parsed = self.target(pattern, url)
        try:
            return target.load(), parsed
        except ModuleNotFoundError as exc:
            missing = exc.name or "?"
            if target.extra is None or missing.split(".")[0] == "stanchion":
                raise ConfigError(
                    f"{pattern} backend {target.ref} for {parsed.masked()} cannot be imported: "
                    f"{exc}"
                ) from exc
            raise ConfigError(
                f"the {parsed.scheme}:// {pattern} backend needs the {missing!r} package: "
                f"pip install 'stanchion[{target.extra}]'"
            ) from exc

    def _load_entry_points(self) -> None:
        if not self._entry_points_pending:
            return
        with self._lock:
            pending, self._entry_points_pending = self._entry_points_pending, False
            found = entry_points(group="stanchion.backends") if pending else ()
        for ep in found:
            pattern, _, scheme = ep.name.partition(":")
            if pattern and scheme:
                self.register(pattern, scheme, ep.value)


def _builtin(registry: BackendRegistry) -> BackendRegistry:
    # (pattern, scheme, target, extra). Targets follow the house layout:
    # stanchion.<pattern>.backends._<engine>:<attr>.
    table: list[tuple[str, str, str, str | None]] = [
        ("resilience", "memory", "stanchion.resilience.backends._memory:MemoryStore", None),
        ("resilience", "redis", "stanchion.resilience.backends._redis:RedisStore", "redis"),
        ("eventsourcing", "memory", "stanchion.eventsourcing.backends._memory:MemoryBackend", None),
        ("eventsourcing", "sqlite", "stanchion.eventsourcing.backends._sqlite:SQLiteBackend", None),
        (
            "eventsourcing",
            "postgresql",
            "stanchion.eventsourcing.backends._postgres:PostgresBackend",
            "postgres",
        ),
        ("pubsub", "memory", "stanchion.pubsub.backends._memory:MemoryDriver", None),
        ("pubsub", "sqlite", "stanchion.pubsub.backends._sqlite:SQLiteDriver", None),
        ("pubsub", "redis", "stanchion.pubsub.backends._redis:RedisDriver", "redis"),
        ("pubsub", "nats", "stanchion.pubsub.backends._nats:NATSDriver", "nats"),
        ("pubsub", "amqp", "stanchion.pubsub.backends._rabbitmq:RabbitMQDriver", "rabbitmq"),
        ("pubsub", "mqtt", "stanchion.pubsub.backends._mqtt:MQTTDriver", "mqtt"),
        ("pubsub", "kafka", "stanchion.pubsub.backends._kafka:KafkaDriver", "kafka"),
        ("dedupe", "memory", "stanchion.pubsub.backends._dedupe:MemoryDedupe", None),
        ("dedupe", "sqlite", "stanchion.pubsub.backends._dedupe:SQLiteDedupe", None),
        ("dedupe", "redis", "stanchion.pubsub.backends._dedupe:RedisDedupe", "redis"),
        ("dedupe", "postgresql", "stanchion.pubsub.backends._dedupe:PostgresDedupe", "postgres"),
        ("election", "memory", "stanchion.election.backends._memory:MemoryLeases", None),
        ("election", "sqlite", "stanchion.election.backends._sqlite:SQLiteLeases", None),
        ("election", "file", "stanchion.election.backends._file:FileLeases", None),
        (
            "election",
            "postgresql",
            "stanchion.election.backends._postgres:PostgresLeases",
            "postgres",
        ),
        ("election", "redis", "stanchion.election.backends._redis:RedisLeases", "redis"),
        ("election", "etcd", "stanchion.election.backends._etcd:EtcdLeases", "etcd"),
        ("fence", "sqlite", "stanchion.election.backends._sqlite:SQLiteFence", None),
        ("fence", "postgresql", "stanchion.election.backends._postgres:PostgresFence", "postgres"),
        ("fence", "redis", "stanchion.election.backends._redis:RedisFence", "redis"),
        ("fence", "memory", "stanchion.election.backends._memory:MemoryFence", None),
        ("fence", "file", "stanchion.election.backends._file:FileFence", None),
        ("fence", "etcd", "stanchion.election.backends._etcd:EtcdFence", "etcd"),
        ("shardmap", "sqlite", "stanchion.sharding.backends._sqlite:SQLiteMapStore", None),
        (
            "shardmap",
            "postgresql",
            "stanchion.sharding.backends._postgres:PostgresMapStore",
            "postgres",
        ),
        ("shard", "sqlite", "stanchion.sharding.backends._sqlite:SQLiteShard", None),
        ("shard", "postgresql", "stanchion.sharding.backends._postgres:PostgresShard", "postgres"),
        ("readmodel", "sqlite", "stanchion.cqrs.backends._sqlite:SQLiteReadModel", None),
        (
            "readmodel",
            "postgresql",
            "stanchion.cqrs.backends._postgres:PostgresReadModel",
            "postgres",
        ),
        ("readmodel", "redis", "stanchion.cqrs.backends._redis:RedisReadModel", "redis"),
        ("logstore", "sqlite", "stanchion.sidecar.backends._sqlite:SQLiteLogStore", None),
        (
            "logstore",
            "postgresql",
            "stanchion.sidecar.backends._postgres:PostgresLogStore",
            "postgres",
        ),
    ]
    for pattern, scheme, ref, extra in table:
        registry.register(pattern, scheme, ref, extra=extra)
    return registry


default_registry: Final[BackendRegistry] = _builtin(BackendRegistry(load_entry_points=True))
"""The registry every ``connect(url)`` uses unless given its own."""
