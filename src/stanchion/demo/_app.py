"""``stanchion demo``: start the shop, serve the dashboard, apply chaos, stop cleanly.

Theory of operation
-------------------

The demo process is a small orchestrator. It picks free ports, writes one
:class:`~stanchion.demo._config.DemoConfig` into the data directory and starts
every service as a real OS process: the log collector first, then each
service under ``stanchion sidecar`` (which supervises it and ships its logs to
the collector). It then serves the dashboard and its API on ``--port``.

A status task samples the running system once a second (ambassador admin and
metrics, the gateway's counters, the election backend, the read models, the
event store, the shards, the collector and the status files the services
write) and pushes the snapshot to every dashboard over server-sent events.

Chaos controls act on the real system: the gateway's knobs, SIGKILL of the
leading projector (found through the election backend), an exclusive lock
that makes a shard stop answering, and stopping/starting the collector
process. Ctrl-C (or SIGTERM) stops every process in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from stanchion._ports import free_port as _free_port
from stanchion.demo._config import DemoConfig, embedded_config, env_urls, services_config
from stanchion.demo._supervisor import ProcessSpec, Supervisor
from stanchion.errors import ConfigError
from stanchion.observability import get_logger

__all__ = ["Demo", "DemoOptions"]

log = get_logger("stanchion.demo")

STATIC = Path(__file__).parent / "static"
LEADER_GROUP = "projections.order_history"


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How to run the demo.

    Attributes:
        port: the dashboard's port.
        data_dir: where every file of the demo lives.
        rate: orders per second from the load generator.
        load: run the load generator.
        services: use PostgreSQL, Redis/NATS and etcd instead of SQLite files.
        host: the dashboard's address.
        namespace: with ``services``, keeps this run's databases and keys apart
            from other runs on the same servers (empty: the shared demo data).
    """

    port: int = 8700
    data_dir: Path = field(default_factory=lambda: Path(".stanchion-demo"))
    rate: float = 2.0
    load: bool = True
    services: bool = False
    host: str = "127.0.0.1"
    namespace: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1..65535, got {self.port}")
        if self.rate < 0:
            raise ConfigError(f"--rate must be >= 0 orders per second, got {self.rate}")


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class Demo:
    """The running reference system."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.dir = options.data_dir.resolve()
        self.cfg: DemoConfig | None = None
        self.supervisor: Supervisor | None = None
        self._lock_fd: int | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._load_task: asyncio.Task[None] | None = None
        self._load_stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._snapshot: dict[str, Any] = {}
        self._snapshot_changed = asyncio.Condition()
        self._store: Any = None
        self._views: Any = None
        self._elector: Any = None
        self._shard_locks: dict[str, sqlite3.Connection] = {}
        self._shards_down: set[str] = set()
        self.load_stats = {"sent": 0, "accepted": 0, "rejected": 0, "errors": 0}
        self.placed: deque[tuple[str, int]] = deque(maxlen=20000)

    # -- lifecycle ---------------------------------------------------------------------

    def _lock(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "demo.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 200).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"a stanchion demo is already running with data dir {self.dir} ({other}); "
                "stop it first (Ctrl-C in its terminal) or pass another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            f"pid {os.getpid()}, dashboard http://{self.options.host}:{self.options.port}/".encode(),
        )
        self._lock_fd = fd

    async def start(self) -> None:
        """Start every process and the dashboard; return when the shop answers."""
        self._lock()
        if _port_in_use(self.options.host, self.options.port):
            raise ConfigError(
                f"port {self.options.port} is in use (another stanchion demo?); "
                "pick another with --port"
            )
        await self._serve_dashboard()  # hold the port from the start
        for sub in ("logs", "run", "sidecar"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        ports = {
            k: _free_port()
            for k in ("gateway", "ambassador", "ambassador_admin", "orders", "collector")
        }
        ports["dashboard"] = self.options.port
        names = self._service_names()
        sidecar_ports = {n: _free_port() for n in names}
        if self.options.services:
            urls = env_urls()
            await self._check_services(urls)
            cfg = services_config(
                self.dir,
                ports,
                sidecar_ports,
                postgres=urls["postgres"],
                broker=urls["broker"],
                etcd=urls["etcd"],
                redis=urls["redis"],
                namespace=self.options.namespace,
            )
            await self._create_databases(cfg, urls["postgres"])
        else:
            cfg = embedded_config(self.dir, ports, sidecar_ports)
        self.cfg = cfg
        config_path = cfg.save()
        self._write_ambassador_config(cfg)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        await self._prepare_stores(cfg)
        self.supervisor = Supervisor(self.dir / "logs")
        await self.supervisor.start(self._collector_spec(cfg))
        await self._wait_http(f"{cfg.collector_url}/api/logs?limit=1", "collector")
        for name in names:
            await self.supervisor.start(self._sidecar_spec(cfg, name, config_path))
        await self._wait_http(f"http://127.0.0.1:{cfg.gateway_port}/health", "gateway")
        await self._wait_http(f"http://127.0.0.1:{cfg.ambassador_admin_port}/ready", "ambassador")
        await self._wait_http(f"{cfg.orders_url}/health", "orders", limit=60)
        self._ready.set()
        self._tasks.append(asyncio.create_task(self._status_loop()))
        if self.options.load and self.options.rate > 0:
            self._load_task = asyncio.create_task(self._load_loop())
            self._tasks.append(self._load_task)
        log.info(
            "demo.started", dashboard=self.dashboard_url, data_dir=str(self.dir), mode=cfg.mode
        )

    @property
    def dashboard_url(self) -> str:
        """Where the dashboard is served."""
        return f"http://{self.options.host}:{self.options.port}/"

    def _service_names(self) -> list[str]:
        names = ["gateway", "ambassador", "orders"]
        names += [f"payments-{i}" for i in range(1, 3)]
        names += [f"projector-{i}" for i in range(1, 3)]
        names += ["analytics", "notifications"]
        return names

    async def stop(self) -> None:
        """Stop the load, the dashboard and every process; release the lock."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for conn in self._shard_locks.values():
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()
                conn.close()
        self._shard_locks.clear()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.supervisor is not None:
            await self.supervisor.close()
        for closer in (self._elector, self._views, self._store):
            if closer is not None:
                with contextlib.suppress(Exception):
                    await (closer.aclose() if hasattr(closer, "aclose") else closer.close())
        if self._http is not None:
            await self._http.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        log.info("demo.stopped")

    async def __aenter__(self) -> Demo:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- set-up --------------------------------------------------------------------------

    async def _check_services(self, urls: dict[str, str]) -> None:
        from urllib.parse import urlsplit

        missing = []
        for name, url in urls.items():
            parts = urlsplit(url)
            default = {"postgres": 5432, "broker": 6379, "redis": 6379, "etcd": 2379}[name]
            host, port = parts.hostname or "127.0.0.1", parts.port or default
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
                writer.close()
            except (OSError, TimeoutError):
                missing.append(f"{name} at {host}:{port} ({url})")
        if missing:
            raise ConfigError(
                "--services needs these services, which cannot be reached: "
                + "; ".join(missing)
                + ". Start them or point STANCHION_DEMO_*_URL at them."
            )

    async def drop_databases(self) -> None:
        """Drop the PostgreSQL databases of a ``services`` run (scenarios clean up with it)."""
        import asyncpg

        if self.cfg is None or self.cfg.mode != "services":
            return
        admin = env_urls()["postgres"].split("?", 1)[0]
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            for url in {
                self.cfg.event_store_url,
                self.cfg.log_store_url,
                *self.cfg.shard_urls.values(),
            }:
                db = url.rsplit("/", 1)[1].split("?", 1)[0]
                await conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        finally:
            await conn.close()

    async def _create_databases(self, cfg: DemoConfig, admin_url: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(admin_url.split("?", 1)[0], timeout=5)
        try:
            names = {cfg.event_store_url, cfg.log_store_url, *cfg.shard_urls.values()}
            for url in names:
                db = url.rsplit("/", 1)[1].split("?", 1)[0]
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", db)
                if not exists:
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f'CREATE DATABASE "{db}"')
        finally:
            await conn.close()

    async def _prepare_stores(self, cfg: DemoConfig) -> None:
        from stanchion.cqrs import ReadModel
        from stanchion.demo._sharded import open_customers
        from stanchion.election import LeaderElector
        from stanchion.eventsourcing import EventStore

        self._store = await EventStore.connect(cfg.event_store_url)
        self._views = await ReadModel.connect(cfg.read_model_url)
        self._elector = LeaderElector.from_url(
            cfg.election_url, LEADER_GROUP, "dashboard", ttl=cfg.election_ttl
        )
        customers = await open_customers(cfg)  # stores the shard map once, before the services
        await customers.close()

    def _write_ambassador_config(self, cfg: DemoConfig) -> None:
        breaker = f'\nstore = "{cfg.breaker_store_url}"' if cfg.breaker_store_url else ""
        (self.dir / "ambassador.toml").write_text(
            f"""# The payment gateway is flaky: the ambassador makes calls to it reliable.
[listen]
address = "127.0.0.1:{cfg.ambassador_port}"
workers = 1

[admin]
address = "127.0.0.1:{cfg.ambassador_admin_port}"

[[upstreams]]
name = "payment-gateway"
endpoints = ["http://127.0.0.1:{cfg.gateway_port}"]
connect_timeout = 1.0

[upstreams.circuit_breaker]
failure_rate_threshold = 0.5
window_type = "count"
window_size = 20
minimum_calls = 10
wait_duration_open = 5.0
half_open_calls = 3{breaker}

[[routes]]
prefix = "/payments/"
upstream = "payment-gateway"
rewrite_prefix = "/"
timeout = 8.0
per_try_timeout = 2.0

[routes.retry]
attempts = 3
on = ["connect-failure", "reset", "5xx", "timeout"]
methods = ["GET", "POST"]
backoff = {{ base = 0.05, max = 0.5 }}
budget = {{ ratio = 0.5, min_retry_concurrency = 5 }}
"""
        )

    def _collector_spec(self, cfg: DemoConfig) -> ProcessSpec:
        return ProcessSpec(
            "collector",
            [
                sys.executable,
                "-m",
                "stanchion",
                "collector",
                "--listen",
                f"127.0.0.1:{cfg.collector_port}",
                "--store",
                cfg.log_store_url,
                "--log-level",
                "WARNING",
            ],
            restart=True,
        )

    def _command(self, cfg: DemoConfig, name: str, config_path: Path) -> list[str]:
        if name == "gateway":
            return [
                sys.executable,
                "-m",
                "stanchion.demo._gateway",
                str(cfg.gateway_port),
                str(self.dir),
            ]
        if name == "ambassador":
            return [
                sys.executable,
                "-m",
                "stanchion",
                "ambassador",
                "--config",
                str(self.dir / "ambassador.toml"),
            ]
        role = name.split("-", 1)[0]
        return [sys.executable, "-m", "stanchion.demo._services", role, str(config_path), name]

    def _sidecar_spec(self, cfg: DemoConfig, name: str, config_path: Path) -> ProcessSpec:
        toml = self.dir / "sidecar" / f"{name}.toml"
        state = self.dir / "sidecar" / name
        state.mkdir(parents=True, exist_ok=True)
        toml.write_text(
            f"""[sidecar]
service = "{name.split("-", 1)[0]}"
instance = "{name}"
state_dir = "{state}"
listen = "127.0.0.1:{cfg.sidecar_ports[name]}"
grace = 5.0
restart = "always"
max_restarts = 0
backoff_initial = 0.5
backoff_max = 3.0
passthrough = true

[capture]
stdout = true
stderr = true
format = "json"

[[sinks]]
name = "collector"
type = "collector"
url = "{cfg.collector_url}"
batch_timeout = 0.2
"""
        )
        argv = [
            sys.executable,
            "-m",
            "stanchion",
            "sidecar",
            "--config",
            str(toml),
            "--",
            *self._command(cfg, name, config_path),
        ]
        return ProcessSpec(name, argv, role=name.split("-", 1)[0], restart=True)

    async def _wait_http(self, url: str, what: str, limit: float = 30.0) -> None:
        assert self._http is not None
        deadline = time.monotonic() + limit
        last = ""
        while time.monotonic() < deadline:
            try:
                async with self._http.get(url) as resp:
                    if resp.status < 500:
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
        tail = ""
        with contextlib.suppress(OSError):
            tail = (self.dir / "logs" / f"{what}.out").read_text(errors="replace")[-1500:]
        raise ConfigError(
            f"the demo's {what} did not come up within {limit:.0f}s ({last}); its output:\n{tail}"
        )

    # -- the shop's API (forwarded to the orders service) -------------------------------

    async def place_order(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST the order to the orders service; return (status, JSON answer)."""
        assert self._http is not None and self.cfg is not None
        async with self._http.post(f"{self.cfg.orders_url}/orders", json=body) as resp:
            try:
                answer = await resp.json(content_type=None)
            except ValueError:
                return resp.status, {"error": (await resp.text())[:500]}
            if resp.status == 201:
                self.placed.append((answer["order_id"], int(answer["position"])))
            return resp.status, answer

    async def get_order(
        self, order_id: str, after: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The order view, with its payment status."""
        assert self._http is not None and self.cfg is not None
        url = f"{self.cfg.orders_url}/orders/{order_id}" + (f"?after={after}" if after else "")
        async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return resp.status, await resp.json(content_type=None)

    async def stop_load(self) -> None:
        """Stop the load generator (the rest keeps running)."""
        task, self._load_task = self._load_task, None
        if task is not None:
            self._load_stop.set()  # let the order in flight finish: it may be accepted
            await asyncio.gather(task, return_exceptions=True)

    async def _load_loop(self) -> None:
        import random

        from stanchion.demo._shop import PRODUCTS, REGIONS

        rng = random.Random()
        customers = [
            f"{name}-{region}"
            for region in REGIONS
            for name in ("ada", "bo", "cy", "dee", "eli", "fay", "gus")
        ]
        interval = 1.0 / self.options.rate
        while not self._load_stop.is_set():
            started = time.monotonic()
            customer = rng.choice(customers)
            body = {
                "customer": customer,
                "region": customer.rsplit("-", 1)[1],
                "items": [
                    {"sku": sku, "qty": rng.randint(1, 3)}
                    for sku in rng.sample(sorted(PRODUCTS), rng.randint(1, 3))
                ],
            }
            self.load_stats["sent"] += 1
            try:
                status, _ = await self.place_order(body)
                self.load_stats["accepted" if status == 201 else "rejected"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError):
                self.load_stats["errors"] += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    # -- chaos -----------------------------------------------------------------------------

    async def chaos(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply one chaos control; return what was done.

        Raises:
            ConfigError: unknown action or bad argument.
        """
        assert self._http is not None and self.cfg is not None and self.supervisor is not None
        cfg = self.cfg
        gw = f"http://127.0.0.1:{cfg.gateway_port}/admin/config"
        if action == "gateway":
            knobs = {k: body[k] for k in ("error_rate", "latency", "down") if k in body}
            async with self._http.post(gw, json=knobs) as resp:
                return {"detail": f"gateway now {await resp.json()}"}
        if action in ("gateway-down", "gateway-up"):
            async with self._http.post(gw, json={"down": action == "gateway-down"}) as resp:
                return {"detail": f"gateway now {await resp.json()}"}
        if action == "kill-leader":
            leader = await self._elector.leader()
            if leader is None:
                raise ConfigError("no projector is leader right now; try again in a moment")
            pid = self._pid_of(leader.identity)
            if pid is None:
                raise ConfigError(f"the leader {leader.identity} has no pid file yet")
            os.kill(pid, signal.SIGKILL)
            log.warning("demo.killed_leader", identity=leader.identity, pid=pid, token=leader.token)
            return {
                "detail": f"SIGKILLed {leader.identity} (pid {pid}, token {leader.token})",
                "killed": leader.identity,
                "token": leader.token,
            }
        if action in ("shard-down", "shard-up"):
            shard = str(body.get("shard") or "")
            if shard not in cfg.shard_urls:
                raise ConfigError(
                    f"unknown shard {shard!r}; shards: {', '.join(sorted(cfg.shard_urls))}"
                )
            await (self._shard_down(shard) if action == "shard-down" else self._shard_up(shard))
            return {"detail": f"{shard} is {'down' if action == 'shard-down' else 'up'}"}
        if action == "collector-stop":
            await self.supervisor.stop("collector")
            return {"detail": "collector stopped: sidecars buffer on disk"}
        if action == "collector-start":
            await self.supervisor.start(self._collector_spec(cfg))
            return {"detail": "collector started: sidecars deliver their buffers"}
        raise ConfigError(
            f"unknown chaos action {action!r}; actions: gateway, gateway-down, gateway-up, "
            "kill-leader, shard-down, shard-up, collector-stop, collector-start"
        )

    def _pid_of(self, identity: str) -> int | None:
        try:
            return int((self.dir / "run" / f"{identity}.pid").read_text())
        except (OSError, ValueError):
            return None

    async def _shard_down(self, shard: str) -> None:
        assert self.cfg is not None
        url = self.cfg.shard_urls[shard]
        if url.startswith("sqlite:"):
            # Hold the shard's write lock: the shard stops answering writes, as a
            # hung database would; its breaker opens and callers fail fast.
            conn = sqlite3.connect(
                url.split("sqlite:///", 1)[1].split("?", 1)[0],
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("BEGIN EXCLUSIVE")
            self._shard_locks[shard] = conn
        else:
            import asyncpg

            db = url.rsplit("/", 1)[1]
            conn = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
            try:
                await conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db
                )
            finally:
                await conn.close()
        self._shards_down.add(shard)

    async def _shard_up(self, shard: str) -> None:
        assert self.cfg is not None
        lock = self._shard_locks.pop(shard, None)
        if lock is not None:
            lock.rollback()
            lock.close()
        url = self.cfg.shard_urls[shard]
        if not url.startswith("sqlite:"):
            import asyncpg

            db = url.rsplit("/", 1)[1]
            conn = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
            try:
                await conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            finally:
                await conn.close()
        self._shards_down.discard(shard)

    # -- status ------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The latest snapshot of the whole system."""
        if not self._snapshot:
            self._snapshot = await self._collect()
        return self._snapshot

    async def _status_loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                snap = await self._collect()
            except Exception as exc:  # a probe bug must not stop the dashboard
                log.error("demo.status_failed", error=repr(exc))
            else:
                async with self._snapshot_changed:
                    self._snapshot = snap
                    self._snapshot_changed.notify_all()
            await asyncio.sleep(max(0.1, 1.0 - (time.monotonic() - started)))

    async def snapshots(self) -> AsyncIterator[dict[str, Any]]:
        """Each new snapshot as it is taken."""
        while True:
            async with self._snapshot_changed:
                await self._snapshot_changed.wait()
                snap = self._snapshot
            yield snap

    async def _collect(self) -> dict[str, Any]:
        assert self.cfg is not None and self.supervisor is not None
        probes = {
            "gateway": self._probe_gateway(),
            "ambassador": self._probe_ambassador(),
            "leader": self._probe_leader(),
            "orders": self._probe_orders(),
            "shards": self._probe_shards(),
            "events": self._probe_events(),
            "projections": self._probe_projections(),
            "logs": self._probe_logs(),
        }
        results = await asyncio.gather(*probes.values(), return_exceptions=True)
        got: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for key, value in zip(probes, results, strict=True):
            if isinstance(value, BaseException):
                errors[key] = f"{type(value).__name__}: {value}"
                got[key] = None
            else:
                got[key] = value
        amb = got["ambassador"] or {}
        logs = got["logs"]
        snap = {
            "mode": self.cfg.mode,
            "at": time.time(),
            "services": self.supervisor.status(),
            "gateway": got["gateway"],
            "circuits": amb.get("circuits", []),
            "calls": amb.get("calls", {}),
            "leader": got["leader"],
            "orders": got["orders"],
            "shards": got["shards"],
            "events": got["events"],
            "topics": self._topics(),
            "projections": got["projections"],
            "logs": logs if logs is not None else [],
            "collector": {"up": logs is not None},
            "load": dict(self.load_stats),
            "errors": errors,
        }
        return snap

    async def _get_json(self, url: str) -> Any:
        assert self._http is not None
        async with self._http.get(url, timeout=aiohttp.ClientTimeout(total=1.5)) as resp:
            resp.raise_for_status()
            return await resp.json(content_type=None)

    async def _probe_gateway(self) -> dict[str, Any]:
        assert self.cfg is not None
        base = f"http://127.0.0.1:{self.cfg.gateway_port}/admin"
        cfg, charges = await asyncio.gather(
            self._get_json(f"{base}/config"), self._get_json(f"{base}/charges")
        )
        return {**cfg, **charges}

    async def _probe_ambassador(self) -> dict[str, Any]:
        assert self.cfg is not None and self._http is not None
        admin = f"http://127.0.0.1:{self.cfg.ambassador_admin_port}"
        circuits = await self._get_json(f"{admin}/circuits")
        out = []
        for name, entry in (circuits.get("upstreams") or {}).items():
            b = entry.get("breaker") or {}
            out.append(
                {
                    "name": name,
                    "state": b.get("state", "none"),
                    "failure_rate": b.get("failure_rate", -1.0),
                    "not_permitted": b.get("not_permitted_calls", 0),
                }
            )
        async with self._http.get(
            f"{admin}/metrics", timeout=aiohttp.ClientTimeout(total=1.5)
        ) as resp:
            text = await resp.text()
        calls = {"ok": 0, "failed": 0, "rejected": 0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "stanchion_ambassador_requests_total":
                    status = int(sample.labels.get("status", "0"))
                    if 200 <= status < 400:
                        calls["ok"] += int(sample.value)
                    elif status >= 500:
                        calls["failed"] += int(sample.value)
                elif (
                    sample.name == "stanchion_ambassador_local_replies_total"
                    and "circuit" in sample.labels.get("reason", "")
                ):
                    calls["rejected"] += int(sample.value)
        calls["failed"] = max(0, calls["failed"] - calls["rejected"])
        return {"circuits": out, "calls": calls}

    async def _probe_leader(self) -> dict[str, Any] | None:
        info = await self._elector.leader()
        if info is None:
            return None
        expires_in = None
        if info.expires_at is not None:
            expires_in = max(0.0, float(info.expires_at) - time.monotonic())
        return {"identity": info.identity, "token": info.token, "expires_in": expires_in}

    async def _probe_orders(self) -> dict[str, Any]:
        rows = await self._views.fetchall("SELECT status, count(*) FROM orders GROUP BY status")
        counts = {str(r[0]): int(r[1]) for r in rows}
        placed = sum(counts.values())
        return {
            "placed": placed,
            "paid": counts.get("paid", 0),
            "payment_failed": counts.get("payment_failed", 0),
            "pending": counts.get("placed", 0),
        }

    async def _probe_shards(self) -> list[dict[str, Any]]:
        assert self.cfg is not None
        regions_of: dict[str, list[str]] = {}
        for region, shard in self.cfg.regions.items():
            regions_of.setdefault(shard, []).append(region)
        out = []
        for shard, url in sorted(self.cfg.shard_urls.items()):
            count: int | None = None
            if url.startswith("sqlite:") and shard not in self._shards_down:
                path = url.split("sqlite:///", 1)[1].split("?", 1)[0]
                with contextlib.suppress(sqlite3.Error):
                    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
                    try:
                        count = int(conn.execute("SELECT count(*) FROM customers").fetchone()[0])
                    finally:
                        conn.close()
            elif not url.startswith("sqlite:") and shard not in self._shards_down:
                import asyncpg

                with contextlib.suppress(Exception):
                    conn2 = await asyncpg.connect(url, timeout=1)
                    try:
                        count = int(await conn2.fetchval("SELECT count(*) FROM customers"))
                    finally:
                        await conn2.close()
            out.append(
                {
                    "name": shard,
                    "regions": sorted(regions_of.get(shard, [])),
                    "customers": count,
                    "up": shard not in self._shards_down,
                }
            )
        return out

    async def _probe_events(self) -> list[dict[str, Any]]:
        head = await self._store.head_position()
        out = []
        async for e in self._store.read_all(from_position=max(1, head - 11)):
            data = e.data if isinstance(e.data, dict) else {}
            out.append(
                {
                    "position": e.position,
                    "stream": e.stream,
                    "version": e.version,
                    "type": e.type,
                    "data": data,
                }
            )
        return out[::-1]

    async def _probe_projections(self) -> list[dict[str, Any]]:
        head = await self._store.head_position()
        out = []
        for cp in await self._views.checkpoints():
            out.append(
                {
                    "name": cp.name,
                    "checkpoint": cp.position,
                    "head": head,
                    "lag": max(0, head - cp.position),
                }
            )
        return out

    async def _probe_logs(self) -> list[dict[str, Any]]:
        assert self.cfg is not None
        answer = await self._get_json(f"{self.cfg.collector_url}/api/logs?limit=100&order=desc")
        records = answer.get("records", []) if isinstance(answer, dict) else answer
        return [r for r in records if isinstance(r, dict)]

    def _topics(self) -> list[dict[str, Any]]:
        now = time.time()
        topics: dict[str, dict[str, Any]] = {}
        for path in (self.dir / "run").glob("*.status.json"):
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if now - float(doc.get("at", 0)) > 10:
                continue
            for sub in doc.get("subscriptions", []):
                t = topics.setdefault(
                    sub["topic"], {"topic": sub["topic"], "groups": {}, "rate": 0.0}
                )
                g = t["groups"].setdefault(
                    sub["group"], {"group": sub["group"], "delivered": 0, "lag": 0, "rate": 0.0}
                )
                g["delivered"] += int(sub.get("delivered", 0))
                g["lag"] = max(g["lag"], int(sub.get("lag") or 0))
                g["rate"] += float(sub.get("rate", 0.0))
        out = []
        for t in sorted(topics.values(), key=lambda x: x["topic"]):
            groups = sorted(t["groups"].values(), key=lambda g: g["group"])
            t["rate"] = max((g["rate"] for g in groups), default=0.0)
            t["groups"] = groups
            out.append(t)
        return out

    # -- the dashboard -----------------------------------------------------------------------

    async def _serve_dashboard(self) -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/", self._h_index)
        app.router.add_get("/api/status", self._h_status)
        app.router.add_get("/api/events", self._h_events)
        app.router.add_post("/api/orders", self._h_post_order)
        app.router.add_get("/api/orders/{order_id}", self._h_get_order)
        app.router.add_post("/api/chaos/{action}", self._h_chaos)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.options.host, self.options.port).start()

    async def _h_index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "dashboard.html")

    async def _h_status(self, request: web.Request) -> web.Response:
        if not self._ready.is_set():
            return web.json_response({"state": "starting"}, status=503)
        return web.json_response(await self.status())

    async def _h_events(self, request: web.Request) -> web.StreamResponse:
        await self._ready.wait()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        first = await self.status()
        await resp.write(b"event: status\ndata: " + json.dumps(first).encode() + b"\n\n")
        async for snap in self.snapshots():
            await resp.write(b"event: status\ndata: " + json.dumps(snap).encode() + b"\n\n")
        return resp

    async def _h_post_order(self, request: web.Request) -> web.Response:
        if not self._ready.is_set():
            return web.json_response({"error": "the shop is starting"}, status=503)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "the body must be JSON"}, status=400)
        try:
            status, answer = await self.place_order(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.json_response({"error": f"orders service unreachable: {exc}"}, status=503)
        return web.json_response(answer, status=status)

    async def _h_get_order(self, request: web.Request) -> web.Response:
        if not self._ready.is_set():
            return web.json_response({"error": "the shop is starting"}, status=503)
        try:
            status, answer = await self.get_order(
                request.match_info["order_id"], request.query.get("after")
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return web.json_response({"error": f"orders service unreachable: {exc}"}, status=503)
        return web.json_response(answer, status=status)

    async def _h_chaos(self, request: web.Request) -> web.Response:
        if not self._ready.is_set():
            return web.json_response({"error": "the shop is starting"}, status=503)
        body: dict[str, Any] = {}
        if request.can_read_body:
            with contextlib.suppress(ValueError):
                body = await request.json()
        try:
            done = await self.chaos(
                request.match_info["action"], body if isinstance(body, dict) else {}
            )
        except ConfigError as exc:
            return web.json_response({"error": str(exc), "detail": str(exc)}, status=400)
        return web.json_response(done)
