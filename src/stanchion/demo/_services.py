"""The demo's services, each run as its own OS process (under a sidecar).

``python -m stanchion.demo._services NAME CONFIG [IDENTITY]`` runs one of:

orders
    The command side: ``POST /orders`` registers the customer on the shard of
    their region (``stanchion.sharding``) and sends ``PlaceOrder`` through the
    command bus to the event-sourced ``Order`` (``stanchion.eventsourcing``,
    ``stanchion.cqrs``). ``GET /orders/{id}`` reads the order-history view,
    waiting until it has caught up with the caller's own write.
payments
    Competing consumers of ``order.placed`` (``stanchion.pubsub``) that charge
    the order through the ambassador (``stanchion ambassador``, which retries
    and breaks the circuit), then record ``PaymentSucceeded``.
projector
    Replicas of which only the elected leader (``stanchion.election``)
    projects the event store into the read models and relays events to
    pub/sub through the outbox (``stanchion.cqrs``).
analytics, notifications
    Independent subscriber groups on the same topics (fan-out).

Every service logs JSON lines on stdout; its sidecar ships them to the
collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from stanchion.demo._config import DemoConfig
from stanchion.observability import configure_logging, get_logger

__all__ = ["main"]

log = get_logger("stanchion.demo.service")


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


SERVICES: dict[str, Callable[[DemoConfig, str], Coroutine[Any, Any, None]]] = {}


def service(name: str) -> Callable[[Callable[[DemoConfig, str], Coroutine[Any, Any, None]]], Any]:
    """Register a service body under ``name``."""

    def register(fn: Callable[[DemoConfig, str], Coroutine[Any, Any, None]]) -> Any:
        SERVICES[name] = fn
        return fn

    return register


def main(argv: list[str] | None = None) -> int:
    """Run the service named by the first argument until SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    name, config_path = args[0], args[1]
    identity = args[2] if len(args) > 2 else name
    configure_logging(logging.INFO, stream=sys.stdout)
    cfg = DemoConfig.load(config_path)
    from stanchion.demo import _workers  # noqa: F401 - registers the services
    from stanchion.demo._services import SERVICES as table  # the imported module's table

    fn = table[name]
    log.info("service.started", service=name, identity=identity, pid=os.getpid())
    try:
        asyncio.run(fn(cfg, identity))
    except KeyboardInterrupt:
        pass
    log.info("service.stopped", service=name, identity=identity)
    return 0


def new_order_id() -> str:
    """A short, unique order id."""
    return "o-" + uuid.uuid4().hex[:12]


async def cancel_all(*tasks: asyncio.Task[Any]) -> None:
    """Cancel tasks and wait for them."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


if __name__ == "__main__":
    sys.exit(main())
