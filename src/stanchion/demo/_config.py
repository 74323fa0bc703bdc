"""The demo's wiring: where every service listens and which URL each component uses.

The demo writes one :class:`DemoConfig` as JSON into its data directory; every
service process reads it, so the whole system agrees on ports and URLs.
Embedded mode uses SQLite files in the data directory; ``--services`` mode
uses PostgreSQL, Redis (or NATS) and etcd, each URL overridable by an
environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

__all__ = ["DemoConfig", "embedded_config", "services_config"]


class DemoConfig(msgspec.Struct, kw_only=True):
    """Ports and URLs of one running demo."""

    mode: str
    data_dir: str
    dashboard_port: int
    gateway_port: int
    ambassador_port: int
    ambassador_admin_port: int
    orders_port: int
    collector_port: int
    sidecar_ports: dict[str, int]
    event_store_url: str
    broker_url: str
    election_url: str
    read_model_url: str
    shard_map_url: str
    shard_urls: dict[str, str]
    regions: dict[str, str]
    breaker_store_url: str | None = None
    log_store_url: str = ""
    payments_replicas: int = 2
    projector_replicas: int = 2
    election_ttl: float = 3.0

    @property
    def dir(self) -> Path:
        """The data directory."""
        return Path(self.data_dir)

    @property
    def ambassador_url(self) -> str:
        """Base URL applications call the payment gateway through."""
        return f"http://127.0.0.1:{self.ambassador_port}"

    @property
    def orders_url(self) -> str:
        """Base URL of the orders service."""
        return f"http://127.0.0.1:{self.orders_port}"

    @property
    def collector_url(self) -> str:
        """Base URL of the log collector."""
        return f"http://127.0.0.1:{self.collector_port}"

    def save(self) -> Path:
        """Write the config into the data directory and return its path."""
        path = self.dir / "demo.json"
        path.write_bytes(msgspec.json.format(msgspec.json.encode(self)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> DemoConfig:
        """Read a config written by :meth:`save`."""
        return msgspec.json.decode(Path(path).read_bytes(), type=cls)


REGION_SHARDS = {"eu": "shard-1", "us": "shard-2", "apac": "shard-3"}


def embedded_config(
    data_dir: Path, ports: dict[str, int], sidecar_ports: dict[str, int]
) -> DemoConfig:
    """Everything on SQLite files in ``data_dir``: no server needed."""
    d = data_dir.resolve()
    (d / "shards").mkdir(parents=True, exist_ok=True)
    return DemoConfig(
        mode="embedded",
        data_dir=str(d),
        sidecar_ports=sidecar_ports,
        event_store_url=f"sqlite:///{d / 'events.db'}",
        broker_url=f"sqlite:///{d / 'bus.db'}",
        election_url=f"sqlite:///{d / 'election.db'}",
        read_model_url=f"sqlite:///{d / 'views.db'}",
        shard_map_url=f"sqlite:///{d / 'shardmap.db'}",
        shard_urls={
            s: f"sqlite:///{d / 'shards' / (s + '.db')}?timeout=0.5" for s in REGION_SHARDS.values()
        },
        regions=dict(REGION_SHARDS),
        log_store_url=f"sqlite:///{d / 'logs.db'}",
        dashboard_port=ports["dashboard"],
        gateway_port=ports["gateway"],
        ambassador_port=ports["ambassador"],
        ambassador_admin_port=ports["ambassador_admin"],
        orders_port=ports["orders"],
        collector_port=ports["collector"],
    )


def services_config(
    data_dir: Path,
    ports: dict[str, int],
    sidecar_ports: dict[str, int],
    *,
    postgres: str,
    broker: str,
    etcd: str,
    redis: str | None,
    namespace: str = "",
) -> DemoConfig:
    """PostgreSQL databases, a real broker and etcd (URLs from the environment).

    ``namespace`` keeps one run apart from others on the same servers: it
    suffixes the database names and prefixes broker, etcd and Redis keys.
    """
    d = data_dir.resolve()
    base = postgres.split("?", 1)[0].rsplit("/", 1)[0]
    db = f"stanchion_demo{('_' + namespace) if namespace else ''}"

    def prefixed(url: str, prefix: str) -> str:
        if not namespace:
            return url
        return url + ("&" if "?" in url else "?") + f"prefix={prefix}"

    return DemoConfig(
        mode="services",
        data_dir=str(d),
        sidecar_ports=sidecar_ports,
        event_store_url=f"{base}/{db}",
        broker_url=prefixed(broker, f"{namespace}." if broker.startswith("redis") else namespace),
        election_url=prefixed(etcd, f"/{namespace}/"),
        read_model_url=f"{base}/{db}",
        shard_map_url=f"{base}/{db}",
        shard_urls={s: f"{base}/{db}_{s.replace('-', '_')}" for s in REGION_SHARDS.values()},
        regions=dict(REGION_SHARDS),
        breaker_store_url=prefixed(redis, f"{namespace}:") if redis else None,
        log_store_url=f"{base}/{db}_logs",
        dashboard_port=ports["dashboard"],
        gateway_port=ports["gateway"],
        ambassador_port=ports["ambassador"],
        ambassador_admin_port=ports["ambassador_admin"],
        orders_port=ports["orders"],
        collector_port=ports["collector"],
    )


def env_urls() -> dict[str, str]:
    """Service URLs for ``--services`` mode, from STANCHION_DEMO_* or the standard variables."""

    def pick(*names: str, default: str) -> str:
        for name in names:
            if os.environ.get(name):
                return os.environ[name]
        return default

    return {
        "postgres": pick(
            "STANCHION_DEMO_POSTGRES_URL",
            "STANCHION_POSTGRES_URL",
            default="postgresql://postgres@127.0.0.1:5432/postgres",
        ),
        "broker": pick(
            "STANCHION_DEMO_BROKER_URL",
            default=pick("STANCHION_REDIS_URL", default="redis://127.0.0.1:6379/0"),
        ),
        "redis": pick(
            "STANCHION_DEMO_REDIS_URL", "STANCHION_REDIS_URL", default="redis://127.0.0.1:6379/0"
        ),
        "etcd": pick(
            "STANCHION_DEMO_ETCD_URL", "STANCHION_ETCD_URL", default="etcd://127.0.0.1:2379"
        ),
    }
