"""The ambassador's pure core: configuration, routing, retry, balancing, outliers.

Theory of operation
===================

The ambassador is a reverse proxy that an application calls instead of the
services it depends on. Everything that *decides* lives here, free of I/O and
of clocks (time is passed in as ``now``), so it is tested without a network;
``_proxy.py`` only moves bytes and asks this module what to do.

Configuration
-------------
A TOML file maps one-to-one onto frozen dataclasses: :class:`ListenConfig`,
:class:`AdminConfig`, :class:`UpstreamConfig` (with :class:`PoolConfig`,
:class:`HealthCheckConfig`, :class:`OutlierConfig`, :class:`TLSConfig` and a
circuit-breaker table handed to ``stanchion.resilience.CircuitBreaker``) and
:class:`RouteConfig` (with :class:`RetryPolicy`, :class:`RateLimitConfig`,
:class:`HeaderOps` and :class:`FaultConfig`). :func:`parse_config` never stops
at the first problem: it walks the whole document, collects every error with
its location (``file:line: routes[1].retry.on: ...``) and raises one
:class:`ConfigError` listing them all, so ``check-config`` shows everything
wrong at once.

Routing
-------
Routes are matched in file order, first match wins (Envoy's semantics): an
optional ``host`` (exact, or ``*.suffix``), then either an exact ``path`` or
a string ``prefix``, then the optional ``methods`` set. A matched prefix is
replaced by ``rewrite_prefix`` when one is given.

Retry decisions
---------------
An attempt ends in an :class:`Outcome` (a connect failure, a reset before the
response, a per-try timeout, or a response status). :meth:`RetryPolicy.decide`
answers "retry?" from the policy alone: the outcome must be one the route
retries ``on``; the method must be retriable (idempotent methods by default; a
non-idempotent one only when the route lists it or the request carries an
``Idempotency-Key``); the body must still be replayable (it fitted in the
bounded replay buffer); attempts must remain. On top of that, a
:class:`RetryBudget` caps retries in flight at a fraction of active requests
(Envoy's ``retry_budget``), which is what stops a retry storm: when every
request fails, at most ``ratio`` of them retry at the same time.

Endpoints and balancing
-----------------------
Each upstream endpoint has an :class:`EndpointState`: active requests, the
active health-check verdict, and passive outlier detection (``consecutive_5xx``
or ``consecutive_gateway_failure`` failures eject it for ``base_ejection_time
* times ejected``, never more than ``max_ejection_percent`` of the endpoints
at once). :class:`Balancer` picks among available endpoints, round robin or
least request (power of two random choices, as Envoy). No available endpoint
means ``503 no-healthy-endpoint``.

Invariants: a decision function never mutates anything but the state object it
is called on; every duration is seconds as a float; every percentage is in
[0, 100]; every fraction in (0, 1].
"""

from __future__ import annotations

import ipaddress
import math
import random
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final
from urllib.parse import urlsplit

from stanchion.errors import ConfigError

__all__ = [
    "HOP_BY_HOP",
    "IDEMPOTENT_METHODS",
    "RETRY_CONDITIONS",
    "AdminConfig",
    "AmbassadorConfig",
    "Balancer",
    "ConfigIssue",
    "Endpoint",
    "EndpointState",
    "FaultConfig",
    "HeaderOps",
    "HealthCheckConfig",
    "ListenConfig",
    "LogConfig",
    "Outcome",
    "OutcomeKind",
    "OutlierConfig",
    "PoolConfig",
    "RateLimitConfig",
    "RetryBudget",
    "RetryPolicy",
    "Route",
    "RouteConfig",
    "RouteTable",
    "TLSConfig",
    "TokenBucket",
    "UpstreamConfig",
    "backoff_delay",
    "check_config_file",
    "hop_by_hop_names",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_traceparent",
    "peer_trusted",
]

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods retried by default (RFC 9110 idempotent methods)."""

RETRY_CONDITIONS: Final = (
    "connect-failure",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "timeout",
)
"""The values a route's ``retry.on`` list may hold (Envoy's ``retry_on`` names)."""

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Header names (lower case bytes) that never cross the proxy (RFC 9110 7.6.1)."""

BREAKER_KEYS: Final = frozenset(
    {
        "failure_rate_threshold",
        "slow_call_rate_threshold",
        "slow_call_duration",
        "window_type",
        "window_size",
        "minimum_calls",
        "wait_duration_open",
        "half_open_calls",
        "max_wait_half_open",
        "store",
    }
)

_METHOD_RE = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_HEADER_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


# --------------------------------------------------------------------------- config model


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """``[listen]``: the proxy listener and its client-facing limits.

    Durations are seconds. ``workers`` processes share the port with
    ``SO_REUSEPORT`` (``0`` means one per CPU).
    """

    host: str = "127.0.0.1"
    port: int = 10000
    workers: int = 1
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_uri_bytes: int = 8192
    max_body_bytes: int = 2**31
    trusted_proxies: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        """``host:port`` as written in the file."""
        return _join_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``[admin]``: the admin listener (``/ready``, ``/metrics``, ``/config``, ``/circuits``).

    Loopback-only unless ``allow_remote = true``; ``port = 0`` disables it.
    """

    host: str = "127.0.0.1"
    port: int = 9901
    allow_remote: bool = False

    @property
    def address(self) -> str:
        """``host:port`` as written in the file."""
        return _join_address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: ``access`` is ``"-"`` (stdout), a file path, or ``""`` (off)."""

    access: str = "-"


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """``[upstreams.pool]``: keep-alive pool limits, per endpoint."""

    max_connections: int = 1024
    max_idle: int = 128
    idle_timeout: float = 60.0
    max_pending: int = 1024


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """``[upstreams.health_check]``: active HTTP health checking of each endpoint."""

    path: str = "/health"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2
    expected_statuses: tuple[int, ...] = (200,)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """``[upstreams.outlier_detection]``: passive ejection of failing endpoints."""

    consecutive_5xx: int = 5
    consecutive_gateway_failure: int = 5
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 50.0


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """``[upstreams.tls]``: verification is on unless ``verify = false``."""

    verify: bool = True
    ca_file: str = ""
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream base URL, parsed."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def authority(self) -> str:
        """The ``Host`` header value sent to this endpoint."""
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``[[upstreams]]``: a named cluster of endpoints and its policies."""

    name: str
    endpoints: tuple[Endpoint, ...]
    load_balancer: str = "round_robin"
    connect_timeout: float = 1.0
    pool: PoolConfig = field(default_factory=PoolConfig)
    health_check: HealthCheckConfig | None = None
    outlier_detection: OutlierConfig | None = None
    circuit_breaker: Mapping[str, Any] | None = None
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``[routes.retry]``: when an attempt may be retried.

    ``attempts`` counts every try, the first included (1 = no retry).
    ``budget`` is the fraction of active requests that may be retrying at once;
    ``min_retry_concurrency`` retries are always allowed (Envoy's defaults:
    0.2 and 3). ``replay_buffer_bytes`` bounds the request body kept for
    replay: a longer body is never retried once it has been sent.
    """

    attempts: int = 1
    on: frozenset[str] = frozenset({"connect-failure", "reset", "gateway-error"})
    retriable_status_codes: frozenset[int] = frozenset()
    methods: frozenset[str] = IDEMPOTENT_METHODS
    backoff_base: float = 0.025
    backoff_max: float = 0.25
    budget: float = 0.2
    min_retry_concurrency: int = 3
    replay_buffer_bytes: int = 65536

    def decide(
        self,
        attempt: int,
        outcome: Outcome,
        method: str,
        *,
        idempotency_key: bool = False,
        replayable: bool = True,
    ) -> bool:
        """True when attempt number ``attempt`` (1-based) ending in ``outcome`` may retry.

        The budget is checked separately (:class:`RetryBudget`), by the caller.
        """
        if attempt >= self.attempts or not replayable:
            return False
        if method not in self.methods and not idempotency_key:
            return False
        return self.retriable(outcome)

    def retriable(self, outcome: Outcome) -> bool:
        """Whether ``outcome`` is one of the conditions in ``on``."""
        on = self.on
        kind = outcome.kind
        if kind is OutcomeKind.CONNECT_FAILURE:
            return "connect-failure" in on or "gateway-error" in on or "5xx" in on
        if kind is OutcomeKind.RESET:
            return "reset" in on or "5xx" in on
        if kind is OutcomeKind.TIMEOUT:
            return "timeout" in on or "5xx" in on or "gateway-error" in on
        status = outcome.status
        if "retriable-status-codes" in on and status in self.retriable_status_codes:
            return True
        if status >= 500 and "5xx" in on:
            return True
        return status in (502, 503, 504) and "gateway-error" in on


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``[routes.rate_limit]``: a token bucket of ``rate`` per second, ``burst`` deep."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Headers added (replacing same-named ones) and removed, names lower-cased."""

    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """``[routes.fault]``: inject a ``delay`` and/or an ``abort`` status for a share.

    ``percentage`` (0-100) applies to both unless ``delay_percentage`` or
    ``abort_percentage`` override it.
    """

    delay: float = 0.0
    delay_percentage: float = 0.0
    abort: int = 0
    abort_percentage: float = 0.0

    def decide(self, r1: float, r2: float) -> tuple[float, int]:
        """``(delay seconds, abort status or 0)`` given two uniform draws in [0, 1)."""
        delay = self.delay if self.delay > 0 and r1 * 100.0 < self.delay_percentage else 0.0
        abort = self.abort if self.abort and r2 * 100.0 < self.abort_percentage else 0
        return delay, abort


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """``[[routes]]``: which requests go where, and with which policies.

    ``timeout`` covers the whole response (body included); ``per_try_timeout``
    bounds each attempt until its response headers arrive (0 = none).
    """

    name: str
    upstream: str
    prefix: str = ""
    path: str = ""
    host: str = ""
    methods: frozenset[str] | None = None
    rewrite_prefix: str | None = None
    timeout: float = 15.0
    per_try_timeout: float = 0.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rate_limit: RateLimitConfig | None = None
    request_headers: HeaderOps = field(default_factory=HeaderOps)
    response_headers: HeaderOps = field(default_factory=HeaderOps)
    fault: FaultConfig | None = None


@dataclass(frozen=True, slots=True)
class AmbassadorConfig:
    """The whole file: listener, admin, log, upstreams by name, routes in order."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    log: LogConfig = field(default_factory=LogConfig)
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    source: str = "<config>"
    raw: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a configuration file: where, and what."""

    path: str
    message: str
    line: int = 0

    def render(self, source: str) -> str:
        """``source:line: path: message`` (line omitted when unknown)."""
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(value: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` / ``":port"`` -> ``(host, port)``; ValueError if bad."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ValueError(f"expected '[host]:port', got {value!r}")
        host, port_s = value[1:end], value[end + 2 :]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            raise ValueError(f"expected 'host:port', got {value!r}")
        host = host or "0.0.0.0"
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_s)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Walker:
    """Reads values out of the raw TOML dict, recording issues instead of raising."""

    def __init__(self) -> None:
        self.issues: list[tuple[tuple[str | int, ...], str]] = []

    def err(self, path: tuple[str | int, ...], message: str) -> None:
        self.issues.append((path, message))

    def table(self, raw: Any, path: tuple[str | int, ...]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.err(path, f"expected a table, got {type(raw).__name__}")
            return {}
        return raw

    def unknown(
        self, raw: Mapping[str, Any], known: Iterable[str], path: tuple[str | int, ...]
    ) -> None:
        known_set = set(known)
        for key in raw:
            if key not in known_set:
                self.err(
                    (*path, key), f"unknown key (expected one of: {', '.join(sorted(known_set))})"
                )

    def number(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: tuple[str | int, ...],
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float = math.inf,
        integer: bool = False,
        exclusive_min: bool = False,
    ) -> Any:
        if key not in raw:
            return default
        value = raw[key]
        where = (*path, key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.err(where, f"expected a number, got {value!r}")
            return default
        if integer and not isinstance(value, int):
            self.err(where, f"expected an integer, got {value!r}")
            return default
        if (value <= minimum if exclusive_min else value < minimum) or value > maximum:
            lo = f"> {minimum:g}" if exclusive_min else f">= {minimum:g}"
            hi = "" if maximum == math.inf else f" and <= {maximum:g}"
            self.err(where, f"must be {lo}{hi}, got {value!r}")
            return default
        return value if integer else float(value)

    def string(
        self, raw: Mapping[str, Any], key: str, path: tuple[str | int, ...], default: str
    ) -> str:
        if key not in raw:
            return default
        value = raw[key]
        if not isinstance(value, str):
            self.err((*path, key), f"expected a string, got {value!r}")
            return default
        return value

    def boolean(
        self, raw: Mapping[str, Any], key: str, path: tuple[str | int, ...], default: bool
    ) -> bool:
        if key not in raw:
            return default
        value = raw[key]
        if not isinstance(value, bool):
            self.err((*path, key), f"expected true or false, got {value!r}")
            return default
        return value

    def strings(
        self, raw: Mapping[str, Any], key: str, path: tuple[str | int, ...]
    ) -> list[str] | None:
        if key not in raw:
            return None
        value = raw[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.err((*path, key), f"expected a list of strings, got {value!r}")
            return None
        return value


def _address(
    w: _Walker, raw: Mapping[str, Any], path: tuple[str | int, ...], default: str
) -> tuple[str, int]:
    value = w.string(raw, "address", path, default)
    try:
        return parse_address(value)
    except ValueError as exc:
        w.err((*path, "address"), str(exc))
        return parse_address(default)


def _parse_listen(w: _Walker, raw: Any) -> ListenConfig:
    p: tuple[str | int, ...] = ("listen",)
    t = w.table(raw, p)
    w.unknown(
        t,
        (
            "address",
            "workers",
            "header_timeout",
            "idle_timeout",
            "max_header_bytes",
            "max_headers",
            "max_uri_bytes",
            "max_body_bytes",
            "trusted_proxies",
            "server_names",
        ),
        p,
    )
    d = ListenConfig()
    host, port = _address(w, t, p, d.address)
    trusted = w.strings(t, "trusted_proxies", p) or []
    for i, cidr in enumerate(trusted):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            w.err((*p, "trusted_proxies", i), f"not an IP address or CIDR: {cidr!r}")
    workers = w.number(t, "workers", p, d.workers, integer=True, maximum=256)
    return ListenConfig(
        host=host,
        port=port,
        workers=workers,
        header_timeout=w.number(t, "header_timeout", p, d.header_timeout, exclusive_min=True),
        idle_timeout=w.number(t, "idle_timeout", p, d.idle_timeout, exclusive_min=True),
        max_header_bytes=w.number(
            t, "max_header_bytes", p, d.max_header_bytes, minimum=256, integer=True
        ),
        max_headers=w.number(t, "max_headers", p, d.max_headers, minimum=1, integer=True),
        max_uri_bytes=w.number(t, "max_uri_bytes", p, d.max_uri_bytes, minimum=16, integer=True),
        max_body_bytes=w.number(t, "max_body_bytes", p, d.max_body_bytes, integer=True),
        trusted_proxies=tuple(trusted),
        server_names=tuple(w.strings(t, "server_names", p) or ()),
    )


def _parse_admin(w: _Walker, raw: Any) -> AdminConfig:
    p: tuple[str | int, ...] = ("admin",)
    t = w.table(raw, p)
    w.unknown(t, ("address", "allow_remote"), p)
    d = AdminConfig()
    host, port = _address(w, t, p, d.address)
    allow = w.boolean(t, "allow_remote", p, False)
    if not allow and not _is_loopback(host):
        w.err(
            (*p, "address"),
            f"{host!r} is not a loopback address; the admin listener is loopback-only "
            "unless allow_remote = true",
        )
    return AdminConfig(host=host, port=port, allow_remote=allow)


def _parse_endpoint(w: _Walker, url: Any, path: tuple[str | int, ...]) -> Endpoint | None:
    if not isinstance(url, str):
        w.err(path, f"expected a URL string, got {url!r}")
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        w.err(path, f"bad URL {url!r}: {exc}")
        return None
    if parts.scheme not in ("http", "https"):
        w.err(path, f"endpoint must be an http:// or https:// URL, got {url!r}")
        return None
    if not parts.hostname:
        w.err(path, f"endpoint {url!r} has no host")
        return None
    if parts.query or parts.fragment or parts.username:
        w.err(path, f"endpoint {url!r} must not carry a query, fragment or credentials")
        return None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return Endpoint(url, parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def _parse_upstream(w: _Walker, raw: Any, i: int) -> UpstreamConfig | None:
    p: tuple[str | int, ...] = ("upstreams", i)
    t = w.table(raw, p)
    w.unknown(
        t,
        (
            "name",
            "endpoints",
            "load_balancer",
            "connect_timeout",
            "pool",
            "health_check",
            "outlier_detection",
            "circuit_breaker",
            "tls",
        ),
        p,
    )
    name = w.string(t, "name", p, "")
    if not name:
        w.err((*p, "name"), "every upstream needs a name")
    raw_eps = t.get("endpoints")
    if isinstance(raw_eps, str):
        raw_eps = [raw_eps]
    endpoints: list[Endpoint] = []
    if not isinstance(raw_eps, list) or not raw_eps:
        w.err((*p, "endpoints"), "expected a non-empty list of http:// or https:// URLs")
    else:
        for j, url in enumerate(raw_eps):
            ep = _parse_endpoint(w, url, (*p, "endpoints", j))
            if ep is not None:
                endpoints.append(ep)
    lb = w.string(t, "load_balancer", p, "round_robin")
    if lb not in ("round_robin", "least_request"):
        w.err((*p, "load_balancer"), f"expected 'round_robin' or 'least_request', got {lb!r}")
    connect_timeout = w.number(t, "connect_timeout", p, 1.0, exclusive_min=True)

    pp = (*p, "pool")
    pt = w.table(t.get("pool"), pp)
    w.unknown(pt, ("max_connections", "max_idle", "idle_timeout", "max_pending"), pp)
    pd = PoolConfig()
    pool = PoolConfig(
        max_connections=w.number(
            pt, "max_connections", pp, pd.max_connections, minimum=1, integer=True
        ),
        max_idle=w.number(pt, "max_idle", pp, pd.max_idle, integer=True),
        idle_timeout=w.number(pt, "idle_timeout", pp, pd.idle_timeout, exclusive_min=True),
        max_pending=w.number(pt, "max_pending", pp, pd.max_pending, integer=True),
    )

    hc: HealthCheckConfig | None = None
    if "health_check" in t:
        hp = (*p, "health_check")
        ht = w.table(t["health_check"], hp)
        w.unknown(
            ht,
            (
                "path",
                "interval",
                "timeout",
                "healthy_threshold",
                "unhealthy_threshold",
                "expected_statuses",
            ),
            hp,
        )
        hd = HealthCheckConfig()
        hpath = w.string(ht, "path", hp, hd.path)
        if not hpath.startswith("/"):
            w.err((*hp, "path"), f"must start with '/', got {hpath!r}")
        statuses = ht.get("expected_statuses", list(hd.expected_statuses))
        if not isinstance(statuses, list) or not all(
            isinstance(s, int) and 100 <= s <= 599 for s in statuses
        ):
            w.err((*hp, "expected_statuses"), f"expected a list of HTTP statuses, got {statuses!r}")
            statuses = list(hd.expected_statuses)
        hc = HealthCheckConfig(
            path=hpath,
            interval=w.number(ht, "interval", hp, hd.interval, exclusive_min=True),
            timeout=w.number(ht, "timeout", hp, hd.timeout, exclusive_min=True),
            healthy_threshold=w.number(
                ht, "healthy_threshold", hp, hd.healthy_threshold, minimum=1, integer=True
            ),
            unhealthy_threshold=w.number(
                ht, "unhealthy_threshold", hp, hd.unhealthy_threshold, minimum=1, integer=True
            ),
            expected_statuses=tuple(statuses),
        )

    od: OutlierConfig | None = None
    if "outlier_detection" in t:
        op = (*p, "outlier_detection")
        ot = w.table(t["outlier_detection"], op)
        w.unknown(
            ot,
            (
                "consecutive_5xx",
                "consecutive_gateway_failure",
                "base_ejection_time",
                "max_ejection_percent",
            ),
            op,
        )
        odd = OutlierConfig()
        od = OutlierConfig(
            consecutive_5xx=w.number(ot, "consecutive_5xx", op, odd.consecutive_5xx, integer=True),
            consecutive_gateway_failure=w.number(
                ot, "consecutive_gateway_failure", op, odd.consecutive_gateway_failure, integer=True
            ),
            base_ejection_time=w.number(
                ot, "base_ejection_time", op, odd.base_ejection_time, exclusive_min=True
            ),
            max_ejection_percent=w.number(
                ot, "max_ejection_percent", op, odd.max_ejection_percent, maximum=100.0
            ),
        )

    cb: dict[str, Any] | None = None
    if "circuit_breaker" in t:
        cp = (*p, "circuit_breaker")
        cb = dict(w.table(t["circuit_breaker"], cp))
        w.unknown(cb, BREAKER_KEYS, cp)
        for key in ("failure_rate_threshold", "slow_call_rate_threshold"):
            if key in cb:
                w.number(cb, key, cp, 0.5, minimum=0.0, maximum=1.0, exclusive_min=True)
        for key in ("slow_call_duration", "wait_duration_open", "max_wait_half_open"):
            if key in cb:
                w.number(cb, key, cp, 0.0)
        for key in ("window_size", "minimum_calls", "half_open_calls"):
            if key in cb:
                w.number(cb, key, cp, 1, minimum=1, integer=True)
        if "window_type" in cb and cb["window_type"] not in ("count", "time"):
            w.err((*cp, "window_type"), f"expected 'count' or 'time', got {cb['window_type']!r}")

    tp = (*p, "tls")
    tt = w.table(t.get("tls"), tp)
    w.unknown(tt, ("verify", "ca_file", "server_name"), tp)
    tls = TLSConfig(
        verify=w.boolean(tt, "verify", tp, True),
        ca_file=w.string(tt, "ca_file", tp, ""),
        server_name=w.string(tt, "server_name", tp, ""),
    )
    if not name or not endpoints:
        return None
    return UpstreamConfig(
        name=name,
        endpoints=tuple(endpoints),
        load_balancer=lb,
        connect_timeout=connect_timeout,
        pool=pool,
        health_check=hc,
        outlier_detection=od,
        circuit_breaker=cb,
        tls=tls,
    )


def _parse_headers(w: _Walker, raw: Any, path: tuple[str | int, ...]) -> HeaderOps:
    t = w.table(raw, path)
    w.unknown(t, ("add", "remove"), path)
    add: list[tuple[bytes, bytes]] = []
    for name, value in w.table(t.get("add"), (*path, "add")).items():
        if not _HEADER_RE.match(name):
            w.err((*path, "add", name), "not a valid header name")
        elif not isinstance(value, str) or "\r" in value or "\n" in value:
            w.err((*path, "add", name), f"expected a one-line string, got {value!r}")
        elif name.lower().encode() in HOP_BY_HOP:
            w.err((*path, "add", name), "hop-by-hop headers cannot be added")
        else:
            add.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    remove = w.strings(t, "remove", path) or []
    for name in remove:
        if not _HEADER_RE.match(name):
            w.err((*path, "remove"), f"not a valid header name: {name!r}")
    return HeaderOps(tuple(add), frozenset(n.lower().encode("latin-1") for n in remove))


def _parse_retry(w: _Walker, raw: Any, path: tuple[str | int, ...]) -> RetryPolicy:
    t = w.table(raw, path)
    w.unknown(
        t,
        (
            "attempts",
            "on",
            "retriable_status_codes",
            "methods",
            "backoff",
            "budget",
            "replay_buffer_bytes",
        ),
        path,
    )
    d = RetryPolicy()
    if isinstance(t.get("on"), str):
        t = {**t, "on": [c.strip() for c in t["on"].split(",") if c.strip()]}
    on = w.strings(t, "on", path)
    if on is None:
        on_set = set(d.on)
    else:
        on_set = set()
        for cond in on:
            if cond not in RETRY_CONDITIONS:
                w.err(
                    (*path, "on"),
                    f"unknown retry condition {cond!r} (expected: {', '.join(RETRY_CONDITIONS)})",
                )
            on_set.add(cond)
    codes = t.get("retriable_status_codes", [])
    if not isinstance(codes, list) or not all(
        isinstance(c, int) and 100 <= c <= 599 for c in codes
    ):
        w.err((*path, "retriable_status_codes"), f"expected HTTP statuses, got {codes!r}")
        codes = []
    if codes and "retriable-status-codes" not in on_set:
        on_set.add("retriable-status-codes")
    if "retriable-status-codes" in on_set and not codes:
        w.err((*path, "on"), "'retriable-status-codes' needs a retriable_status_codes list")
    methods = w.strings(t, "methods", path)
    mset = d.methods if methods is None else frozenset(m.upper() for m in methods)
    for m in mset:
        if not _METHOD_RE.match(m):
            w.err((*path, "methods"), f"not an HTTP method: {m!r}")
    backoff_base, backoff_max = d.backoff_base, d.backoff_max
    if "backoff" in t:
        bp = (*path, "backoff")
        bv = t["backoff"]
        if isinstance(bv, int | float) and not isinstance(bv, bool):
            bv = {"base": bv}
        bt = dict(w.table(bv, bp))
        for alias, key in (("base_interval", "base"), ("max_interval", "max")):
            if alias in bt:
                bt[key] = bt.pop(alias)
        w.unknown(bt, ("base", "max"), bp)
        backoff_base = w.number(bt, "base", bp, d.backoff_base)
        backoff_max = w.number(bt, "max", bp, max(d.backoff_max, backoff_base))
        if backoff_max < backoff_base:
            w.err((*bp, "max"), f"must be >= base ({backoff_base:g})")
    budget, min_conc = d.budget, d.min_retry_concurrency
    if "budget" in t:
        bv = t["budget"]
        if isinstance(bv, dict):
            bp = (*path, "budget")
            w.unknown(bv, ("ratio", "min_retry_concurrency"), bp)
            budget = w.number(bv, "ratio", bp, d.budget, maximum=1.0, exclusive_min=True)
            min_conc = w.number(bv, "min_retry_concurrency", bp, min_conc, integer=True)
        else:
            budget = w.number(t, "budget", path, d.budget, maximum=1.0, exclusive_min=True)
    return RetryPolicy(
        attempts=w.number(t, "attempts", path, 1, minimum=1, maximum=100, integer=True),
        on=frozenset(on_set),
        retriable_status_codes=frozenset(codes),
        methods=mset,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        budget=budget,
        min_retry_concurrency=min_conc,
        replay_buffer_bytes=w.number(
            t, "replay_buffer_bytes", path, d.replay_buffer_bytes, integer=True
        ),
    )


def _parse_fault(w: _Walker, raw: Any, path: tuple[str | int, ...]) -> FaultConfig:
    t = dict(w.table(raw, path))
    w.unknown(t, ("delay", "abort", "percentage", "delay_percentage", "abort_percentage"), path)
    # Envoy-style sub-tables are accepted too: abort = { status = 503, percentage = 10 },
    # delay = { seconds = 0.5, percentage = 20 }.
    for key, value_keys in (("abort", ("status", "http_status")), ("delay", ("seconds", "fixed"))):
        sub = t.get(key)
        if isinstance(sub, dict):
            sp = (*path, key)
            w.unknown(sub, (*value_keys, "percentage"), sp)
            value = next((sub[k] for k in value_keys if k in sub), None)
            if value is None:
                w.err(sp, f"expected {value_keys[0]!r} in the {key} table")
                value = 0
            t[key] = value
            if "percentage" in sub:
                t[f"{key}_percentage"] = sub["percentage"]
    pct = w.number(t, "percentage", path, 100.0, maximum=100.0)
    abort = w.number(t, "abort", path, 0, integer=True)
    if abort and not 200 <= abort <= 599:
        w.err((*path, "abort"), f"expected an HTTP status 200-599, got {abort!r}")
        abort = 0
    fault = FaultConfig(
        delay=w.number(t, "delay", path, 0.0),
        delay_percentage=w.number(t, "delay_percentage", path, pct, maximum=100.0),
        abort=abort,
        abort_percentage=w.number(t, "abort_percentage", path, pct, maximum=100.0),
    )
    if not fault.delay and not fault.abort:
        w.err(path, "a fault needs a delay (seconds) or an abort (HTTP status)")
    return fault


_HEADER_ALIASES = {
    "request_headers_to_add": ("request_headers", "add"),
    "request_headers_to_remove": ("request_headers", "remove"),
    "response_headers_to_add": ("response_headers", "add"),
    "response_headers_to_remove": ("response_headers", "remove"),
}


def _header_aliases(w: _Walker, t: dict[str, Any], p: tuple[str | int, ...]) -> dict[str, Any]:
    """Accept Envoy's ``request_headers_to_add`` etc. as spellings of our header tables."""
    for alias, (table, op) in _HEADER_ALIASES.items():
        if alias in t:
            value = t.pop(alias)
            ops = t.setdefault(table, {})
            if not isinstance(ops, dict) or op in ops:
                w.err((*p, alias), f"conflicts with {table}.{op}")
                continue
            ops[op] = value
    return t


def _parse_route(w: _Walker, raw: Any, i: int, upstreams: Mapping[str, Any]) -> RouteConfig | None:
    p: tuple[str | int, ...] = ("routes", i)
    t = _header_aliases(w, dict(w.table(raw, p)), p)
    w.unknown(
        t,
        (
            "name",
            "prefix",
            "path",
            "host",
            "methods",
            "upstream",
            "rewrite_prefix",
            "timeout",
            "per_try_timeout",
            "retry",
            "rate_limit",
            "request_headers",
            "response_headers",
            "fault",
        ),
        p,
    )
    prefix = w.string(t, "prefix", p, "")
    exact = w.string(t, "path", p, "")
    if prefix and exact:
        w.err(p, "give either 'prefix' or 'path', not both")
    elif not prefix and not exact:
        w.err(p, "every route needs a 'prefix' or an exact 'path'")
    for key, value in (("prefix", prefix), ("path", exact)):
        if value and not value.startswith("/"):
            w.err((*p, key), f"must start with '/', got {value!r}")
    upstream = w.string(t, "upstream", p, "")
    if not upstream:
        w.err((*p, "upstream"), "every route needs an upstream")
    elif upstream not in upstreams:
        known = ", ".join(sorted(upstreams)) or "none defined"
        w.err((*p, "upstream"), f"unknown upstream {upstream!r} (known: {known})")
    methods = w.strings(t, "methods", p)
    mset = None if methods is None else frozenset(m.upper() for m in methods)
    for m in mset or ():
        if not _METHOD_RE.match(m):
            w.err((*p, "methods"), f"not an HTTP method: {m!r}")
    rewrite = t.get("rewrite_prefix")
    if rewrite is not None:
        if not isinstance(rewrite, str) or not rewrite.startswith("/"):
            w.err((*p, "rewrite_prefix"), f"must be a string starting with '/', got {rewrite!r}")
            rewrite = None
        elif exact:
            w.err((*p, "rewrite_prefix"), "only a 'prefix' route can rewrite its prefix")
    timeout = w.number(t, "timeout", p, 15.0)
    per_try = w.number(t, "per_try_timeout", p, 0.0)
    rate: RateLimitConfig | None = None
    if "rate_limit" in t:
        rp = (*p, "rate_limit")
        rt = w.table(t["rate_limit"], rp)
        if "requests_per_second" in rt and "rate" not in rt:
            rt = {**rt, "rate": rt["requests_per_second"]}
            del rt["requests_per_second"]
        w.unknown(rt, ("rate", "burst"), rp)
        r = w.number(rt, "rate", rp, 1.0, exclusive_min=True)
        if "rate" not in rt:
            w.err((*rp, "rate"), "a rate limit needs a rate (requests per second)")
        burst = w.number(rt, "burst", rp, max(1, math.ceil(r)), minimum=1, integer=True)
        rate = RateLimitConfig(r, burst)
    return RouteConfig(
        name=w.string(t, "name", p, f"route{i}"),
        upstream=upstream,
        prefix=prefix,
        path=exact,
        host=w.string(t, "host", p, "").lower(),
        methods=mset,
        rewrite_prefix=rewrite,
        timeout=timeout,
        per_try_timeout=per_try,
        retry=_parse_retry(w, t.get("retry"), (*p, "retry")),
        rate_limit=rate,
        request_headers=_parse_headers(w, t.get("request_headers"), (*p, "request_headers")),
        response_headers=_parse_headers(w, t.get("response_headers"), (*p, "response_headers")),
        fault=_parse_fault(w, t["fault"], (*p, "fault")) if "fault" in t else None,
    )


def _fmt_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_TABLE_RE = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map table and key paths to 1-based line numbers (best effort, for messages)."""
    index: dict[tuple[str | int, ...], int] = {}
    counts: dict[str, int] = {}
    current: tuple[str | int, ...] = ()
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _TABLE_RE.match(line)
        if m:
            names = [n.strip().strip('"') for n in m.group(2).split(".")]
            if m.group(1) == "[[":
                key = ".".join(names)
                counts[key] = counts.get(key, -1) + 1
                current = (*names[:-1], names[-1], counts[key])
            else:
                # [routes.retry] refers to the last [[routes]] element.
                path: list[str | int] = []
                for n in names:
                    path.append(n)
                    joined = ".".join(str(x) for x in path if isinstance(x, str))
                    if joined in counts:
                        path.append(counts[joined])
                current = tuple(path)
            index.setdefault(current, lineno)
            continue
        k = _KEY_RE.match(line)
        if k:
            index.setdefault((*current, k.group(1).strip('"')), lineno)
    return index


def _locate(index: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> int:
    for n in range(len(path), 0, -1):
        line = index.get(path[:n])
        if line:
            return line
    return 0


def parse_config(
    data: Mapping[str, Any], *, source: str = "<config>", text: str = ""
) -> AmbassadorConfig:
    """Validate a parsed TOML document; raise one ConfigError listing every issue.

    ``text`` (the file's contents) lets messages carry line numbers.
    """
    issues = config_issues(data, text=text)
    if isinstance(issues, AmbassadorConfig):
        return AmbassadorConfig(
            listen=issues.listen,
            admin=issues.admin,
            log=issues.log,
            upstreams=issues.upstreams,
            routes=issues.routes,
            source=source,
            raw=data,
        )
    raise ConfigError(
        f"{len(issues)} error(s) in {source}:\n" + "\n".join(i.render(source) for i in issues)
    )


def config_issues(
    data: Mapping[str, Any], *, text: str = ""
) -> AmbassadorConfig | list[ConfigIssue]:
    """The config, or the list of every issue found (with locations)."""
    w = _Walker()
    w.unknown(data, ("listen", "admin", "log", "upstreams", "routes"), ())
    listen = _parse_listen(w, data.get("listen"))
    admin = _parse_admin(w, data.get("admin"))
    lt = w.table(data.get("log"), ("log",))
    w.unknown(lt, ("access",), ("log",))
    log = LogConfig(access=w.string(lt, "access", ("log",), "-"))
    upstreams: dict[str, UpstreamConfig] = {}
    raw_ups = data.get("upstreams", [])
    names: dict[str, int] = {}
    if not isinstance(raw_ups, list):
        w.err(("upstreams",), "expected an array of tables ([[upstreams]])")
        raw_ups = []
    for i, raw in enumerate(raw_ups):
        up = _parse_upstream(w, raw, i)
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name:
            if name in names:
                w.err(("upstreams", i, "name"), f"duplicate upstream name {name!r}")
            names[name] = i
        if up is not None:
            upstreams[up.name] = up
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        w.err(("routes",), "expected an array of tables ([[routes]])")
        raw_routes = []
    routes: list[RouteConfig] = []
    for i, raw in enumerate(raw_routes):
        route = _parse_route(w, raw, i, names)
        if route is not None:
            routes.append(route)
    if not raw_routes:
        w.err(("routes",), "no routes: add at least one [[routes]] table")
    if w.issues:
        index = _line_index(text) if text else {}
        return [ConfigIssue(_fmt_path(path), msg, _locate(index, path)) for path, msg in w.issues]
    return AmbassadorConfig(
        listen=listen, admin=admin, log=log, upstreams=upstreams, routes=tuple(routes), raw=data
    )


def _toml_issue(exc: tomllib.TOMLDecodeError) -> ConfigIssue:
    m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
    line = int(m.group(1)) if m else 0
    msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
    return ConfigIssue("", f"TOML syntax error: {msg}", line)


def check_config_file(source: str, text: str) -> list[str]:
    """Every problem in a config file's text, rendered ``source:line: path: message``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return [_toml_issue(exc).render(source)]
    issues = config_issues(data, text=text)
    if isinstance(issues, AmbassadorConfig):
        return []
    return [i.render(source) for i in issues]


def load_config(source: str, text: str) -> AmbassadorConfig:
    """Parse and validate a config file's text; ConfigError lists every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(_toml_issue(exc).render(source)) from exc
    return parse_config(data, source=source, text=text)


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class Route:
    """A matched route: its config and the path to send upstream."""

    config: RouteConfig
    path: str


class RouteTable:
    """Routes in file order; :meth:`match` returns the first that fits."""

    __slots__ = ("_by_host", "_routes")

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        self._routes = tuple(routes)
        self._by_host = any(r.host for r in self._routes)

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, method: str, host: str, path: str) -> Route | None:
        """The route for ``method host path`` (path may carry a query), or None.

        ``host`` is compared without its port, case-insensitively.
        """
        bare, sep, query = path.partition("?")
        hostname = _strip_port(host).lower() if host and self._by_host else ""
        for rc in self._routes:
            if rc.host and not _host_matches(rc.host, hostname):
                continue
            if rc.path:
                if bare != rc.path:
                    continue
            elif not bare.startswith(rc.prefix):
                continue
            if rc.methods is not None and method not in rc.methods:
                continue
            if rc.rewrite_prefix is not None and rc.prefix:
                rest = bare[len(rc.prefix) :]
                new = rc.rewrite_prefix
                if rest and new.endswith("/") and rest.startswith("/"):
                    rest = rest[1:]
                bare = new + rest or "/"
                return Route(rc, bare + sep + query)
            return Route(rc, path)
        return None


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


# --------------------------------------------------------------------------- retries


class OutcomeKind(Enum):
    """How one attempt ended."""

    CONNECT_FAILURE = "connect-failure"
    RESET = "reset"
    TIMEOUT = "timeout"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one attempt: a kind and, for responses, the status."""

    kind: OutcomeKind
    status: int = 0

    @property
    def failure(self) -> bool:
        """True for anything an outlier detector or breaker counts as failing."""
        return self.kind is not OutcomeKind.RESPONSE or self.status >= 500


CONNECT_FAILURE: Final = Outcome(OutcomeKind.CONNECT_FAILURE)
RESET: Final = Outcome(OutcomeKind.RESET)
TIMEOUT: Final = Outcome(OutcomeKind.TIMEOUT)


def backoff_delay(policy: RetryPolicy, retry: int, rand: float) -> float:
    """Exponential backoff with full jitter before retry number ``retry`` (1-based)."""
    cap = min(policy.backoff_max, policy.backoff_base * (2.0 ** (retry - 1)))
    return float(cap * rand)


class RetryBudget:
    """Envoy's retry budget: retries in flight <= max(min, ratio * active requests)."""

    __slots__ = ("active_requests", "active_retries")

    def __init__(self) -> None:
        self.active_requests = 0
        self.active_retries = 0

    def allows(self, policy: RetryPolicy) -> bool:
        """Whether one more concurrent retry fits the policy's budget."""
        limit = max(policy.min_retry_concurrency, policy.budget * self.active_requests)
        return self.active_retries < limit


class TokenBucket:
    """A token bucket (``rate`` tokens per second, ``burst`` deep), time passed in."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Take one token if there is one."""
        tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return True
        self._tokens = tokens
        return False


# --------------------------------------------------------------------------- endpoints


class EndpointState:
    """Health, ejection and load of one endpoint (mutated by its upstream only)."""

    __slots__ = (
        "active",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_until",
        "ejections",
        "endpoint",
        "hc_failures",
        "hc_successes",
        "healthy",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.active = 0
        self.healthy = True
        self.hc_successes = 0
        self.hc_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0

    def available(self, now: float) -> bool:
        """Healthy by active checks and not ejected at ``now``."""
        return self.healthy and self.ejected_until <= now

    def health_result(self, ok: bool, hc: HealthCheckConfig) -> bool | None:
        """Record one active check; return the new verdict when it changes, else None."""
        if ok:
            self.hc_failures = 0
            self.hc_successes += 1
            if not self.healthy and self.hc_successes >= hc.healthy_threshold:
                self.healthy = True
                return True
        else:
            self.hc_successes = 0
            self.hc_failures += 1
            if self.healthy and self.hc_failures >= hc.unhealthy_threshold:
                self.healthy = False
                return False
        return None

    def outlier_result(
        self, outcome: Outcome, od: OutlierConfig, now: float, ejected_share: float
    ) -> bool:
        """Record one outcome for passive detection; True when it ejects the endpoint.

        ``ejected_share`` is the fraction (0-1) of the upstream's endpoints
        already ejected, so ejection never exceeds ``max_ejection_percent``.
        """
        if not outcome.failure:
            self.consecutive_5xx = 0
            self.consecutive_gateway = 0
            return False
        gateway = outcome.kind is not OutcomeKind.RESPONSE or outcome.status in (502, 503, 504)
        self.consecutive_5xx += 1
        self.consecutive_gateway = self.consecutive_gateway + 1 if gateway else 0
        hit = (od.consecutive_5xx and self.consecutive_5xx >= od.consecutive_5xx) or (
            od.consecutive_gateway_failure
            and self.consecutive_gateway >= od.consecutive_gateway_failure
        )
        if not hit or self.ejected_until > now:
            return False
        if ejected_share * 100.0 >= od.max_ejection_percent:
            return False
        self.ejections += 1
        self.ejected_until = now + od.base_ejection_time * self.ejections
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        return True


class Balancer:
    """Chooses an endpoint among the available ones."""

    __slots__ = ("_next", "_rng", "kind", "states")

    def __init__(
        self, states: Sequence[EndpointState], kind: str, rng: random.Random | None = None
    ) -> None:
        self.states = tuple(states)
        self.kind = kind
        self._next = 0
        self._rng = rng or random.Random()

    def ejected_share(self, now: float) -> float:
        """Fraction of endpoints currently ejected by outlier detection."""
        return sum(1 for s in self.states if s.ejected_until > now) / len(self.states)

    def pick(self, now: float, exclude: EndpointState | None = None) -> EndpointState | None:
        """An available endpoint (avoiding ``exclude`` if another exists), or None."""
        states = self.states
        if len(states) == 1:
            s = states[0]
            return s if s.available(now) else None
        avail = [s for s in states if s.available(now)]
        if not avail:
            return None
        if exclude is not None and len(avail) > 1 and exclude in avail:
            avail.remove(exclude)
        if self.kind == "least_request":
            if len(avail) == 1:
                return avail[0]
            a, b = self._rng.sample(avail, 2)
            return a if a.active <= b.active else b
        self._next += 1
        return avail[self._next % len(avail)]


# --------------------------------------------------------------------------- headers


def hop_by_hop_names(connection_values: Iterable[bytes]) -> frozenset[bytes]:
    """HOP_BY_HOP plus every header named in the given ``Connection`` values."""
    extra = {tok.strip().lower() for value in connection_values for tok in value.split(b",")}
    extra.discard(b"")
    return HOP_BY_HOP | extra


def peer_trusted(
    peer: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether ``peer`` (an IP string) is inside one of ``networks``."""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(addr in net for net in networks)


_TRACEPARENT_RE = re.compile(rb"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse_traceparent(value: bytes) -> tuple[bytes, bytes] | None:
    """``(trace_id, flags)`` of a valid W3C version-00 traceparent, else None."""
    m = _TRACEPARENT_RE.match(value.strip())
    if m is None or m.group(1) == b"0" * 32 or m.group(2) == b"0" * 16:
        return None
    return m.group(1), m.group(3)
