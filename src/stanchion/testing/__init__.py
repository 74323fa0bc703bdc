"""Public testing helpers: clocks, service fixtures, throwaway servers, conformance suites.

* :class:`~stanchion.clock.ManualClock` for deterministic time.
* :mod:`stanchion.testing.pytest_plugin`: fixtures giving each test a fresh
  namespace on the shared services, and throwaway servers for fault tests.
* :mod:`stanchion.testing.servers`: start redis, nats, mosquitto, etcd or a
  PostgreSQL cluster on a free port; kill, pause, resume, restart by PID.
* :mod:`stanchion.testing.conformance`: one suite per pattern, importable by
  third-party backends.
"""

from __future__ import annotations

from stanchion.clock import ManualClock
from stanchion.testing.servers import ServerProcess, free_port, wait_for_port
from stanchion.testing.services import new_namespace, require_services

__all__ = [
    "ManualClock",
    "ServerProcess",
    "free_port",
    "new_namespace",
    "require_services",
    "wait_for_port",
]
