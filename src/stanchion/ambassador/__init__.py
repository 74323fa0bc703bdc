"""The ambassador: an out-of-process HTTP/1.1 proxy for outbound calls.

An application calls ``http://127.0.0.1:<port>/payments/charge`` and the
ambassador applies the route's policies (retries with a budget, per-try and
overall timeouts, a circuit breaker from :mod:`stanchion.resilience`, outlier
ejection, active health checks, rate limits, header rewrites, fault injection)
before forwarding to the upstream. Run it with ``stanchion ambassador --config
ambassador.toml``; validate a file with ``stanchion ambassador check-config
FILE``.

Public names: :class:`Ambassador` (the server), :func:`load_config` /
:func:`parse_config` / :func:`check_config_file` and the frozen config types,
and the pure routing core (:class:`RouteTable`, :class:`Route`).
"""

from __future__ import annotations

from stanchion.ambassador._core import (
    AdminConfig,
    AmbassadorConfig,
    FaultConfig,
    ListenConfig,
    RetryPolicy,
    Route,
    RouteConfig,
    RouteTable,
    UpstreamConfig,
    check_config_file,
    load_config,
    parse_config,
)
from stanchion.ambassador._proxy import Ambassador

__all__ = [
    "AdminConfig",
    "Ambassador",
    "AmbassadorConfig",
    "FaultConfig",
    "ListenConfig",
    "RetryPolicy",
    "Route",
    "RouteConfig",
    "RouteTable",
    "UpstreamConfig",
    "check_config_file",
    "load_config",
    "parse_config",
]
