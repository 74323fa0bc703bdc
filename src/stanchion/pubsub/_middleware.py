"""Built-in middleware: idempotent consumer (dedupe), timeout, logging.

A middleware wraps a handler in another (Watermill's ``func(h) h``)::

    def mw(next: Handler) -> Handler:
        async def wrapped(msg: Message) -> None:
            ...  # before
            await next(msg)
            ...  # after
        return wrapped

Metrics (delivered, acked, retried, dead-lettered, latency) and trace/correlation
propagation are built into the runtime; these are the optional ones.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal, Protocol, runtime_checkable

from stanchion.errors import CallTimeout, ConfigError
from stanchion.observability import StructLogger, get_logger
from stanchion.pubsub._api import Handler, Middleware, current_subscription
from stanchion.pubsub._core import Message
from stanchion.urls import BackendRegistry, default_registry

__all__ = ["DedupeStore", "DuplicateInProgress", "idempotent", "log_messages", "timeout"]

BeginResult = Literal["new", "done", "busy"]


@runtime_checkable
class DedupeStore(Protocol):
    """Where the idempotent-consumer middleware records processed message ids.

    ``begin`` atomically takes a key for processing (``"new"``), or says it
    was processed already (``"done"``) or is being processed by someone else
    right now (``"busy"``: the lease has not expired). ``complete`` marks it
    done for ``ttl`` seconds; ``abort`` gives it back after a failure.

    .. versionadded:: 0.1
    """

    async def begin(self, key: str, lease: float) -> BeginResult:
        """Take ``key`` for ``lease`` seconds, or report its state."""
        ...

    async def complete(self, key: str, ttl: float) -> None:
        """Mark ``key`` processed for ``ttl`` seconds."""
        ...

    async def abort(self, key: str) -> None:
        """Release ``key`` after a failed attempt."""
        ...

    async def close(self) -> None:
        """Free resources."""
        ...


class DuplicateInProgress(Exception):
    """The same message is being handled by another consumer; retry later."""


async def open_dedupe(url: str, backends: BackendRegistry | None = None) -> DedupeStore:
    """Open a dedupe store by URL (memory://, sqlite:///, redis://, postgresql://)."""
    factory, parsed = (backends or default_registry).load("dedupe", url)
    opener = getattr(factory, "open", None)
    if opener is None:
        raise ConfigError(f"dedupe backend for {parsed.masked()} has no open()")
    store: DedupeStore = await opener(parsed)
    return store


def idempotent(
    store: str | DedupeStore,
    *,
    ttl: float = 7 * 86400.0,
    lease: float = 60.0,
    scope: str | None = None,
) -> Middleware:
    """Idempotent consumer: each message id is handled once per group (effectively once).

    Args:
        store: a :class:`DedupeStore` or its URL (``sqlite:///dedupe.db``,
            ``redis://...``, ``postgresql://...``, ``memory://name``).
        ttl: how long a processed id is remembered, in seconds.
        lease: how long a handler may hold an id before another consumer may
            take it over (a crashed consumer), in seconds.
        scope: the namespace of the ids (default: the subscription's group).

    .. versionadded:: 0.1
    """
    if ttl <= 0 or lease <= 0:
        raise ConfigError("idempotent(): ttl and lease must be > 0")
    holder: dict[str, DedupeStore] = {}
    lock = asyncio.Lock()

    async def get_store() -> DedupeStore:
        if not isinstance(store, str):
            return store
        if "s" not in holder:
            async with lock:
                if "s" not in holder:
                    holder["s"] = await open_dedupe(store)
        return holder["s"]

    def middleware(next_: Handler) -> Handler:
        async def handle(msg: Message) -> Any:
            s = await get_store()
            sub = current_subscription()
            key = f"{scope or (sub.group if sub else msg.topic)}:{msg.id}"
            state = await s.begin(key, lease)
            if state == "done":
                return None
            if state == "busy":
                raise DuplicateInProgress(f"message {msg.id} is being handled by another consumer")
            try:
                result = await next_(msg)
            except BaseException:
                await s.abort(key)
                raise
            await s.complete(key, ttl)
            return result

        return handle

    return middleware


def timeout(seconds: float) -> Middleware:
    """Fail a handler (so it is retried) when it runs longer than ``seconds``.

    .. versionadded:: 0.1
    """
    if seconds <= 0:
        raise ConfigError(f"timeout must be > 0, got {seconds}")

    def middleware(next_: Handler) -> Handler:
        async def handle(msg: Message) -> Any:
            try:
                return await asyncio.wait_for(next_(msg), seconds)
            except TimeoutError as exc:
                raise CallTimeout(seconds, f"handler did not finish within {seconds}s") from exc

        return handle

    return middleware


def log_messages(logger: StructLogger | None = None) -> Middleware:
    """Log each message handled (debug) and each failure (warning), with latency.

    .. versionadded:: 0.1
    """
    log = logger or get_logger("stanchion.pubsub.handler")

    def middleware(next_: Handler) -> Handler:
        async def handle(msg: Message) -> Any:
            t0 = time.perf_counter()
            try:
                result = await next_(msg)
            except Exception as exc:
                log.warning(
                    "pubsub.handler_failed",
                    id=msg.id,
                    topic=msg.topic,
                    delivery=msg.delivery,
                    error=f"{type(exc).__name__}: {exc}",
                    correlation_id=msg.correlation_id,
                )
                raise
            log.debug(
                "pubsub.handled",
                id=msg.id,
                topic=msg.topic,
                delivery=msg.delivery,
                seconds=round(time.perf_counter() - t0, 6),
                correlation_id=msg.correlation_id,
            )
            return result

        return handle

    return middleware
