"""The outbox relay: events from the store to a pub/sub topic, at least once."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any

from stanchion.cqrs._backend import CheckpointMoved, ReadModel
from stanchion.cqrs._core import NO_POSITION, event_type_name, fresh, validate_name
from stanchion.cqrs._runner import _position, _pump, _Stop
from stanchion.errors import (
    BackendUnavailable,
    ConfigError,
    LeadershipLost,
    PublishError,
    StaleFencingToken,
)
from stanchion.observability import Metrics, StructLogger, get_logger

__all__ = ["Outbox"]


class Outbox:
    """Relays the store's events to a pub/sub topic, at least once, resumable.

    Each event is published with message id = event id (``str(event.id)``),
    key = its stream, and headers ``x-event-type``, ``x-stream``,
    ``x-position``, ``x-version`` (plus the correlation id from its
    metadata). After the broker has durably accepted a batch, the relay's
    checkpoint moves past it; a crash in between republishes the batch with
    the *same* message ids, so an idempotent consumer
    (``stanchion.pubsub.idempotent``) processes each event exactly once.

    With ``elector=``, only the elected replica relays; its fencing token is
    checked on every checkpoint write.

    Args:
        store: the event store.
        broker: a ``stanchion.pubsub.Broker``.
        topic: the topic, or a function of the event returning its topic.
        checkpoint: where the relay's checkpoint lives: a read-model URL
            (``sqlite:///…``, ``postgresql://…``, ``redis://…``) or a
            :class:`ReadModel`.
        name: the checkpoint's name (one per relay).
        elector: a ``stanchion.election.LeaderElector``, or None.
        batch_size: most events per publish batch.
        types: only relay events of these types (classes or names).
        retry_backoff: (first, max) seconds between attempts when the broker
            is unavailable; the relay retries until it is back.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: Any,
        broker: Any,
        topic: str | Callable[[Any], str],
        *,
        checkpoint: str | ReadModel,
        name: str = "outbox",
        elector: Any = None,
        batch_size: int = 100,
        types: Collection[type[Any] | str] | None = None,
        retry_backoff: tuple[float, float] = (0.1, 5.0),
        metrics: Metrics | None = None,
        logger: StructLogger | None = None,
    ) -> None:
        validate_name(name, "outbox name")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(topic, str) and topic) and not callable(topic):
            raise ConfigError("Outbox topic must be a topic name or a function of the event")
        self.store = store
        self.broker = broker
        self.topic = topic
        self.name = name
        self.elector = elector
        self.batch_size = batch_size
        self.types = None if types is None else frozenset(event_type_name(t) for t in types)
        self.retry_backoff = retry_backoff
        self._cp_arg = checkpoint
        self._rm: ReadModel | None = checkpoint if isinstance(checkpoint, ReadModel) else None
        self._own_rm = not isinstance(checkpoint, ReadModel)
        self._checkpoint = NO_POSITION
        self._progress = asyncio.Event()
        self._relaying = False
        self.log = (logger or get_logger("stanchion.cqrs")).bind(outbox=name)
        m = metrics or Metrics()
        self._m_published = m.counter(
            "cqrs_outbox_published", "Events relayed to the broker", ("outbox",)
        ).labels(name)
        self._m_retries = m.counter(
            "cqrs_outbox_retries", "Publish attempts that failed and were retried", ("outbox",)
        ).labels(name)
        self._m_checkpoint = m.gauge(
            "cqrs_outbox_checkpoint", "Position of the last relayed event", ("outbox",)
        ).labels(name)

    @property
    def checkpoint(self) -> int:
        """The position of the last event known to be relayed."""
        return self._checkpoint

    async def read_model(self) -> ReadModel:
        """The open checkpoint store."""
        if self._rm is None:
            assert isinstance(self._cp_arg, str)
            self._rm = await ReadModel.connect(self._cp_arg)
        return self._rm

    async def aclose(self) -> None:
        """Close the checkpoint store if this relay opened it."""
        if self._rm is not None and self._own_rm:
            await self._rm.close()
            self._rm = None

    async def __aenter__(self) -> Outbox:
        await self.read_model()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def run(self) -> None:
        """Relay until cancelled (campaigning first when an elector is set)."""
        rm = await self.read_model()
        self._advance((await rm.checkpoint(self.name)).position)
        if self.elector is None:
            await self._relay(None, None)
            return
        while True:
            try:
                async with self.elector.leadership() as lease:
                    await self._lead(lease)
                    return
            except (StaleFencingToken, LeadershipLost, BackendUnavailable) as exc:
                self.log.warning("cqrs.outbox.leadership_lost", reason=str(exc))
            finally:
                self._relaying = False
            await asyncio.sleep(0.2)

    async def _lead(self, lease: Any) -> None:
        work = asyncio.ensure_future(self._relay(int(lease.token), lease))
        lost = asyncio.ensure_future(lease.lost.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
            lost.cancel()
        if work.done() and not work.cancelled():
            exc = work.exception()
            if exc is not None:
                raise exc
            return
        raise LeadershipLost(getattr(lease, "group", self.name), int(lease.token))

    async def _relay(self, token: int | None, lease: Any) -> None:
        rm = await self.read_model()
        self._relaying = True
        while True:
            try:
                cp = await rm.checkpoint(self.name)
            except BackendUnavailable as exc:
                self.log.warning("cqrs.outbox.backend_unavailable", error=str(exc))
                await asyncio.sleep(self.retry_backoff[0])
                continue
            self._advance(cp.position, force=True)
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(2 * self.batch_size, 64))
            pump = asyncio.ensure_future(_pump(self.store, self._checkpoint + 1, queue))
            try:
                while True:
                    batch = [await queue.get()]
                    while len(batch) < self.batch_size and not queue.empty():
                        batch.append(queue.get_nowait())
                    stop = next((b for b in batch if isinstance(b, _Stop)), None)
                    batch = [b for b in batch if not isinstance(b, _Stop)]
                    events = fresh(batch, self._checkpoint, _position)
                    if events:
                        await self._publish(events, lease)
                        if lease is not None and not lease.is_valid():
                            raise LeadershipLost(getattr(lease, "group", self.name), token)
                        tx = await rm.begin(self.name)
                        try:
                            await tx.commit(self._checkpoint, events[-1].position, token)
                        except BaseException:
                            await tx.rollback()
                            raise
                        self._advance(events[-1].position)
                    if stop is not None:
                        if stop.error is not None:
                            raise stop.error
                        return
            except CheckpointMoved as moved:
                self.log.info("cqrs.outbox.resync", checkpoint=moved.stored)
            except BackendUnavailable as exc:
                self.log.warning("cqrs.outbox.backend_unavailable", error=str(exc))
                await asyncio.sleep(self.retry_backoff[0])
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump

    def _topic(self, event: Any) -> str:
        return self.topic if isinstance(self.topic, str) else self.topic(event)

    async def _publish(self, events: list[Any], lease: Any) -> None:
        from stanchion.pubsub import Outgoing

        out = []
        for e in events:
            if self.types is not None and str(e.type) not in self.types:
                continue
            headers = {
                "x-event-type": str(e.type),
                "x-stream": str(getattr(e, "stream", "")),
                "x-position": str(e.position),
                "x-version": str(getattr(e, "version", "")),
            }
            correlation = (getattr(e, "metadata", None) or {}).get("correlation_id")
            if correlation:
                headers["x-correlation-id"] = str(correlation)
            data = e.data
            out.append(
                Outgoing(
                    self._topic(e),
                    data,
                    key=str(getattr(e, "stream", "")) or None,
                    headers=headers,
                    id=str(e.id),
                )
            )
        if not out:
            return
        delay, cap = self.retry_backoff
        while True:
            try:
                await self.broker.publish_many(out)
                self._m_published.inc(len(out))
                return
            except (BackendUnavailable, PublishError, OSError) as exc:
                if lease is not None and not lease.is_valid():
                    raise LeadershipLost(getattr(lease, "group", self.name), None) from exc
                self._m_retries.inc()
                self.log.warning("cqrs.outbox.retry", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                delay = min(cap, delay * 2)

    def _advance(self, position: int, *, force: bool = False) -> None:
        if position > self._checkpoint or force:
            self._checkpoint = position
        self._m_checkpoint.set(self._checkpoint)
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_for(self, position: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the event at ``position`` has been relayed.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._checkpoint < position:
            if not self._relaying:
                cp = await (await self.read_model()).checkpoint(self.name)
                self._advance(cp.position)
                if self._checkpoint >= position:
                    return
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"outbox {self.name!r} is at position {self._checkpoint}, "
                    f"did not reach {position} within {timeout}s"
                )
            step = remaining if self._relaying else min(remaining or 0.02, 0.02)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), step)
