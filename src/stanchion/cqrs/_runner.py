"""The projection runner: store subscription -> handlers -> read model + checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from stanchion.cqrs._backend import CheckpointMoved, ParkedEvent, ReadModel, Transaction
from stanchion.cqrs._core import NO_POSITION, Checkpoint, Lag, fresh
from stanchion.cqrs._projection import Projection, decode_event
from stanchion.errors import BackendUnavailable, ConfigError, ProjectionError, StaleFencingToken
from stanchion.observability import Metrics, StructLogger, get_logger

__all__ = ["EventSource", "LeaderElectorLike", "Lease", "ProjectionRunner", "ProjectionStatus"]


class EventSource(Protocol):
    """What a runner needs of an event store (``stanchion.eventsourcing.EventStore``)."""

    def read_all(
        self, from_position: int = 0, *, limit: int | None = None, types: Any = None
    ) -> AsyncIterator[Any]: ...

    def subscribe(self, from_position: int = 0, *, types: Any = None) -> AsyncIterator[Any]: ...


class Lease(Protocol):
    """What a runner needs of a lease (``stanchion.election``)."""

    @property
    def token(self) -> int: ...
    @property
    def lost(self) -> asyncio.Event: ...
    def is_valid(self) -> bool: ...


class LeaderElectorLike(Protocol):
    """What a runner needs of an elector: ``async with elector.leadership() as lease``."""

    def leadership(self) -> contextlib.AbstractAsyncContextManager[Any]: ...


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """A projection's progress, for ``status`` and dashboards.

    Attributes:
        name: the projection name.
        checkpoint: position of the last applied event (0: none yet).
        head: the store's last position, when known.
        lag: events and seconds behind the head.
        parked: how many events are parked.
        leader: whether this runner is the one projecting.
        token: the fencing token of the current term, if elected.
    """

    name: str
    checkpoint: int
    head: int | None
    lag: Lag
    parked: int
    leader: bool
    token: int | None


class _HandlerFailed(Exception):
    def __init__(self, event: Any, cause: BaseException | str) -> None:
        super().__init__(str(cause))
        self.event = event
        self.cause = cause


class _LeadershipGone(Exception):
    pass


@dataclass(slots=True)
class _Stop:
    error: BaseException | None


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return float(value.timestamp())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


async def _pump(store: Any, start: int, queue: asyncio.Queue[Any]) -> None:
    """Feed ``queue`` from ``store.subscribe(start)``; a ``_Stop`` marks its end or error."""
    subscription = store.subscribe(from_position=start)
    try:
        async for event in subscription:
            await queue.put(event)
        await queue.put(_Stop(None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await queue.put(_Stop(exc))
    finally:
        close = getattr(subscription, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _position(event: Any) -> int:
    return int(event.position)


async def head_position(store: Any) -> int | None:
    """The store's last global position, when it can tell (None otherwise)."""
    for attr in ("head_position", "last_position", "head"):
        fn = getattr(store, attr, None)
        if callable(fn):
            value = fn()
            if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
                value = await value
            if isinstance(value, int):
                return value
            pos = getattr(value, "position", None)
            if isinstance(pos, int):
                return pos
    return None


class ProjectionRunner:
    """Runs one projection: catch-up in batches, then live, exactly-once in effect.

    Each transaction on the read model applies a batch of events and
    compare-and-sets the checkpoint; a crash at any point leaves view and
    checkpoint in agreement. When a handler raises, the batch is rolled back
    and replayed one event per transaction, so the checkpoint ends exactly
    before the failing event, and the runner raises
    :class:`~stanchion.errors.ProjectionError` (or parks the event when the
    projection has ``park_failures``).

    With ``elector=`` (a ``stanchion.election.LeaderElector``), only the
    elected replica projects; its fencing token is checked on every
    checkpoint write, so a deposed leader's batch is rolled back.

    Args:
        store: the event store (``EventStore``) to subscribe to.
        projection: a :class:`Projection` instance (or class).
        read_model: the read model URL (``sqlite:///views.db``,
            ``postgresql://…``, ``redis://…``) or an open :class:`ReadModel`.
        elector: a leader elector; None projects unconditionally.
        batch_size: most events per transaction during catch-up.
        park: override the projection's ``park_failures``.
        metrics: where Prometheus metrics go (a private registry by default).
        logger: a structured logger.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: Any,
        projection: Projection | type[Projection],
        read_model: str | ReadModel | None = None,
        *,
        elector: Any = None,
        batch_size: int = 500,
        park: bool | None = None,
        metrics: Metrics | None = None,
        logger: StructLogger | None = None,
        retry_interval: float = 0.5,
    ) -> None:
        if isinstance(projection, type):
            projection = projection()
        if not isinstance(projection, Projection):
            raise ConfigError(f"{projection!r} is not a Projection")
        if read_model is None:
            raise ConfigError("ProjectionRunner needs read_model= (a URL or a ReadModel)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.store = store
        self.projection = projection
        self.name = projection.name
        self.elector = elector
        self.batch_size = batch_size
        self.park = projection.park_failures if park is None else park
        self.retry_interval = retry_interval
        self._rm_arg = read_model
        self._rm: ReadModel | None = read_model if isinstance(read_model, ReadModel) else None
        self._own_rm = not isinstance(read_model, ReadModel)
        self._checkpoint = NO_POSITION
        self._progress = asyncio.Event()
        self._projecting = False
        self._token: int | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._pending_since: float | None = None
        self._set_up: set[bool] = set()
        self.log = (logger or get_logger("stanchion.cqrs")).bind(projection=self.name)
        m = metrics or Metrics()
        self.metrics = m
        self._m_events = m.counter(
            "cqrs_projection_events", "Events applied by a projection", ("projection",)
        ).labels(self.name)
        self._m_batches = m.histogram(
            "cqrs_projection_batch_seconds", "Projection transaction time", ("projection",)
        ).labels(self.name)
        self._m_checkpoint = m.gauge(
            "cqrs_projection_checkpoint", "Position of the last applied event", ("projection",)
        ).labels(self.name)
        self._m_lag_events = m.gauge(
            "cqrs_projection_lag_events", "Events behind the head of the log", ("projection",)
        ).labels(self.name)
        self._m_lag_seconds = m.gauge(
            "cqrs_projection_lag_seconds", "Age of the oldest unapplied event", ("projection",)
        ).labels(self.name)
        self._m_failed = m.counter(
            "cqrs_projection_failures", "Events a projection failed on", ("projection",)
        ).labels(self.name)
        self._m_parked = m.counter(
            "cqrs_projection_parked", "Events parked by a projection", ("projection",)
        ).labels(self.name)
        self._m_leader = m.gauge(
            "cqrs_projection_leader", "1 while this replica projects", ("projection",)
        ).labels(self.name)

    # -- lifecycle -------------------------------------------------------------

    async def read_model(self) -> ReadModel:
        """The open read model (connecting on first use)."""
        if self._rm is None:
            assert isinstance(self._rm_arg, str)
            self._rm = await ReadModel.connect(self._rm_arg)
        return self._rm

    async def aclose(self) -> None:
        """Close the read model if this runner opened it."""
        if self._rm is not None and self._own_rm:
            await self._rm.close()
            self._rm = None

    async def __aenter__(self) -> ProjectionRunner:
        await self.read_model()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def checkpoint(self) -> int:
        """The position of the last event this runner knows to be applied."""
        return self._checkpoint

    @property
    def is_leader(self) -> bool:
        """True while this runner is the replica projecting."""
        return self._projecting

    @property
    def token(self) -> int | None:
        """The fencing token of the current term (None without election)."""
        return self._token

    # -- running ---------------------------------------------------------------

    async def run(self) -> None:
        """Project until cancelled or until a handler fails (ProjectionError).

        Without an elector, projects right away. With one, campaigns; while
        elected, projects; when leadership is lost (or a checkpoint write is
        rejected as stale) stops projecting and campaigns again.
        """
        rm = await self.read_model()
        cp = await rm.checkpoint(self.name)
        self._advance(cp.position)
        if self.elector is None:
            await self._project(None, None)
            return
        while True:
            try:
                async with self.elector.leadership() as lease:
                    await self._lead(lease)
            except (_LeadershipGone, StaleFencingToken) as exc:
                self.log.warning("cqrs.projection.leadership_lost", reason=str(exc))
            except BackendUnavailable as exc:  # the election backend is down: campaign again
                self.log.warning("cqrs.projection.election_unavailable", error=str(exc))
            except Exception as exc:
                from stanchion.errors import LeadershipLost

                if not isinstance(exc, LeadershipLost):
                    raise
                self.log.warning("cqrs.projection.leadership_lost", reason=str(exc))
            finally:
                self._set_leader(False, None)
            await asyncio.sleep(self.retry_interval)

    async def _lead(self, lease: Any) -> None:
        token = int(lease.token)
        self._set_leader(True, token)
        self.log.info("cqrs.projection.elected", token=token)
        work = asyncio.ensure_future(self._project(token, lease))
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
        raise _LeadershipGone(f"lease of term {token} lost")

    def _set_leader(self, leading: bool, token: int | None) -> None:
        self._projecting = leading
        self._token = token
        self._m_leader.set(1 if leading else 0)

    async def _setup(self, shadow: bool) -> None:
        rm = await self.read_model()
        tx = await rm.begin(self.name, shadow=shadow)
        try:
            await self.projection.setup(tx)
            cp = await tx.checkpoint_position()
            await tx.commit(cp, cp, self._token if not shadow else None)
        except BaseException:
            await tx.rollback()
            raise

    async def _project(self, token: int | None, lease: Any) -> None:
        rm = await self.read_model()
        self._lease = lease
        if self.elector is None:
            self._set_leader(True, None)
        backoff = self.retry_interval
        try:
            while True:
                try:
                    await self._setup(False)
                    cp = await rm.checkpoint(self.name)
                    self._checkpoint = max(NO_POSITION, cp.position)
                    self._advance(cp.position, force=True)
                    await self._follow(token, lease)
                    return  # the subscription ended
                except CheckpointMoved as moved:
                    self.log.info("cqrs.projection.resync", checkpoint=moved.stored)
                except BackendUnavailable as exc:
                    # The store or the read model is down: the open batch was
                    # rolled back; resume from the checkpoint once it is back.
                    self.log.warning(
                        "cqrs.projection.backend_unavailable", error=str(exc), retry_in=backoff
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(5.0, backoff * 2)
                    continue
                backoff = self.retry_interval
        finally:
            if self.elector is None:
                self._set_leader(False, None)

    async def _follow(self, token: int | None, lease: Any) -> None:
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(2 * self.batch_size, 64))
        self._queue = queue
        pump = asyncio.ensure_future(_pump(self.store, self._checkpoint + 1, queue))
        try:
            while True:
                first = await queue.get()
                batch = [first]
                while len(batch) < self.batch_size and not queue.empty():
                    batch.append(queue.get_nowait())
                stops = [i for i, item in enumerate(batch) if isinstance(item, _Stop)]
                stop: _Stop | None = None
                if stops:
                    stop = batch[stops[0]]
                    batch = batch[: stops[0]]
                events = fresh(batch, self._checkpoint, _position)
                if events:
                    if lease is not None and not lease.is_valid():
                        raise _LeadershipGone("lease expired before commit")
                    await self._commit(events, token, shadow=False)
                    self._update_lag(queue)
                if stop is not None:
                    if stop.error is not None:
                        raise stop.error
                    return
        finally:
            self._queue = None
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump

    # -- one transaction -------------------------------------------------------

    async def _commit(self, events: list[Any], token: int | None, *, shadow: bool) -> None:
        """Apply ``events`` and move the checkpoint, in one transaction."""
        rm = await self.read_model()
        expected = self._shadow_cp if shadow else self._checkpoint
        start = time.perf_counter()
        tx = await rm.begin(self.name, shadow=shadow)
        try:
            for event in events:
                await self._apply(event, tx)
            try:
                await tx.flush()
            except BackendUnavailable:
                raise
            except Exception as exc:
                raise _HandlerFailed(events[-1], exc) from exc
            tx.event = None
            lease = self._lease
            if not shadow and lease is not None and not lease.is_valid():
                raise _LeadershipGone("lease expired during the batch")
            await tx.commit(expected, events[-1].position, token)
        except _HandlerFailed as failed:
            await tx.rollback()
            if len(events) > 1:
                # Replay one per transaction: everything before the failing
                # event commits, the checkpoint ends right before it.
                for event in events:
                    await self._commit([event], token, shadow=shadow)
                return
            await self._fail(failed, token, shadow=shadow)
            return
        except BaseException:
            await tx.rollback()
            raise
        self._m_batches.observe(time.perf_counter() - start)
        self._m_events.inc(len(events))
        if shadow:
            self._shadow_cp = events[-1].position
        else:
            self._advance(events[-1].position)

    async def _apply(self, event: Any, tx: Transaction) -> None:
        tx.event = event
        type_name = str(event.type)
        route = self.projection.route(type_name)
        if route is None:
            if self.projection.known(type_name) or self.projection.skip_unknown:
                return
            raise _HandlerFailed(
                event,
                f"unknown event type {type_name!r}: no projection handles it "
                f"(handle it, list it in {type(self.projection).__qualname__}.ignores, "
                "or set skip_unknown = True)",
            )
        handler, cls = route
        try:
            payload = event if cls is None else decode_event(event.data, cls)
        except Exception as exc:
            raise _HandlerFailed(
                event, f"cannot decode {type_name} into {cls.__qualname__ if cls else '?'}: {exc}"
            ) from exc
        try:
            await handler(payload, tx)
        except (asyncio.CancelledError, BackendUnavailable):
            raise
        except Exception as exc:
            raise _HandlerFailed(event, exc) from exc

    async def _fail(self, failed: _HandlerFailed, token: int | None, *, shadow: bool) -> None:
        event = failed.event
        cause = failed.cause
        text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        self._m_failed.inc()
        if self.park:
            rm = await self.read_model()
            expected = self._shadow_cp if shadow else self._checkpoint
            tx = await rm.begin(self.name, shadow=shadow)
            try:
                await tx.park(event, text)
                await tx.commit(expected, event.position, token)
            except BaseException:
                await tx.rollback()
                raise
            self._m_parked.inc()
            self.log.warning(
                "cqrs.projection.parked",
                position=event.position,
                event_id=str(event.id),
                error=text,
            )
            if shadow:
                self._shadow_cp = event.position
            else:
                self._advance(event.position)
            return
        checkpoint = self._shadow_cp if shadow else self._checkpoint
        self.log.error(
            "cqrs.projection.failed",
            position=event.position,
            event_id=str(event.id),
            event_type=str(event.type),
            error=text,
            checkpoint=checkpoint,
        )
        error = ProjectionError(
            self.name,
            event.id,
            event.position,
            text,
            event_type=str(event.type),
            checkpoint=checkpoint,
        )
        if isinstance(cause, BaseException):
            raise error from cause
        raise error

    # -- progress, lag, read-your-writes --------------------------------------

    _shadow_cp: int = NO_POSITION
    _lease: Any = None

    def _advance(self, position: int, *, force: bool = False) -> None:
        if position > self._checkpoint or force:
            self._checkpoint = position
        self._m_checkpoint.set(self._checkpoint)
        self._progress.set()
        self._progress = asyncio.Event()

    def _update_lag(self, queue: asyncio.Queue[Any]) -> None:
        waiting = queue.qsize()
        self._m_lag_events.set(waiting)
        if waiting == 0:
            self._pending_since = None
            self._m_lag_seconds.set(0.0)
            return
        head = queue._queue[0] if hasattr(queue, "_queue") else None
        ts = _timestamp(getattr(head, "recorded_at", None)) if head is not None else None
        self._pending_since = ts
        if ts is not None:
            self._m_lag_seconds.set(max(0.0, time.time() - ts))

    async def lag(self) -> Lag:
        """Events and seconds behind the head of the store's log."""
        head = await head_position(self.store)
        waiting = self._queue.qsize() if self._queue is not None else None
        behind = None if head is not None else waiting
        pending = self._pending_since
        if pending is None and head is not None and head > self._checkpoint:
            with contextlib.suppress(Exception):
                async for event in self.store.read_all(from_position=self._checkpoint + 1, limit=1):
                    pending = _timestamp(getattr(event, "recorded_at", None))
        return Lag.compute(self._checkpoint, head, behind, pending, time.time())

    async def status(self) -> ProjectionStatus:
        """This projection's checkpoint, lag, parked count and leadership."""
        rm = await self.read_model()
        cp = await rm.checkpoint(self.name)
        self._advance(cp.position)
        head = await head_position(self.store)
        lag = await self.lag()
        return ProjectionStatus(
            self.name, cp.position, head, lag, cp.parked, self._projecting, self._token
        )

    async def parked(self) -> list[ParkedEvent]:
        """The events this projection parked."""
        return await (await self.read_model()).parked(self.name)

    async def wait_for(self, position: int, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the view has applied the event at ``position``.

        Works on every replica: one that is not projecting polls the read
        model's checkpoint.

        Raises:
            TimeoutError: the view did not get there within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._checkpoint < position:
            if not self._projecting:
                cp = await (await self.read_model()).checkpoint(self.name)
                self._advance(cp.position)
                if self._checkpoint >= position:
                    return
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"projection {self.name!r} is at position {self._checkpoint}, "
                    f"did not reach {position} within {timeout}s"
                )
            step = remaining if self._projecting else min(remaining or 0.02, 0.02)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), step)

    # -- rebuild ---------------------------------------------------------------

    async def rebuild(self, *, attempts: int = 100) -> Checkpoint:
        """Rebuild the view from position 0 into a shadow, then swap it in atomically.

        The live view keeps answering queries (and a live runner may keep
        projecting into it) until the swap; the swap happens only once the
        shadow has reached the live checkpoint, and a live runner then
        resumes from the swapped-in checkpoint.

        Returns:
            the new checkpoint.

        Raises:
            ProjectionError: a handler failed during the rebuild (the live
                view is untouched and the shadow is dropped).
        """
        rm = await self.read_model()
        await rm.reset_shadow(self.name)
        self._shadow_cp = NO_POSITION
        try:
            await self._setup(True)
            for _ in range(attempts):
                while True:
                    events = [
                        e
                        async for e in self.store.read_all(
                            from_position=self._shadow_cp + 1, limit=self.batch_size
                        )
                    ]
                    events = fresh(events, self._shadow_cp, _position)
                    if not events:
                        break
                    await self._commit(events, None, shadow=True)
                if await rm.swap(self.name, self._shadow_cp):
                    self.log.info("cqrs.projection.rebuilt", checkpoint=self._shadow_cp)
                    self._advance(self._shadow_cp, force=not self._projecting)
                    return await rm.checkpoint(self.name)
                await asyncio.sleep(0.01)
        except BaseException:
            with contextlib.suppress(Exception):
                await rm.drop_shadow(self.name)
            raise
        await rm.drop_shadow(self.name)
        raise ConfigError(
            f"rebuild of {self.name!r} could not catch up with the live view in {attempts} tries"
        )
