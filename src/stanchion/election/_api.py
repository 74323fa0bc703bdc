"""The async facade: drives a :class:`LeaseMachine` against a lease backend."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, final

from prometheus_client import CollectorRegistry

from stanchion.clock import Clock, monotonic
from stanchion.election._backend import Capabilities, Grant, Holder, LeaseBackend
from stanchion.election._core import (
    Acquired,
    Busy,
    Failed,
    LeaseMachine,
    LeaseOptions,
    Rejected,
    Renew,
    Renewed,
    Resign,
    StepDown,
    Tick,
    TryAcquire,
    Vacated,
    Wait,
)
from stanchion.errors import BackendUnavailable, ConfigError, LeadershipLost
from stanchion.observability import Metrics, get_logger
from stanchion.urls import BackendRegistry, default_registry, parse_url

__all__ = ["LeaderElector", "LeaderInfo", "Lease"]

Callback = Callable[["Lease"], "Awaitable[None] | None"]

_log = get_logger("stanchion.election")


@final
@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """The current leader of a group, as observed without campaigning.

    Attributes:
        identity: the leader's identity.
        token: the fencing token of its term.
        expires_at: when its lease expires unless renewed, as a reading of the
            observing elector's clock (monotonic seconds by default).

    .. versionadded:: 0.1
    """

    identity: str
    token: int
    expires_at: float


@final
class Lease:
    """One term of leadership, returned by :meth:`LeaderElector.campaign`.

    Attributes:
        group: the election group.
        identity: this candidate's identity.
        token: the fencing token of this term; strictly greater than every
            token of earlier terms of the group. Pass it to
            :class:`~stanchion.election.Fence` (or your own conditional
            write) with every side effect.
        lost: an :class:`asyncio.Event` set the moment the lease is lost
            (renewal rejected, deadline passed without renewal, resigned).
        reason: why the lease was lost (None while it holds).

    .. versionadded:: 0.1
    """

    __slots__ = ("_elector", "_machine", "group", "identity", "lost", "reason", "token")

    def __init__(self, elector: LeaderElector, machine: LeaseMachine, token: int) -> None:
        self._elector = elector
        self._machine = machine
        self.group = elector.group
        self.identity = elector.identity
        self.token = token
        self.lost = asyncio.Event()
        self.reason: str | None = None

    def is_valid(self) -> bool:
        """True if this term may still act, checked against the clock *now*.

        The check compares the elector's clock with ``last successful renewal
        + ttl - safety margin`` at the moment of the call, so a process
        resumed after a long pause sees False before it acts, even before the
        background renewal task has run.
        """
        if self.lost.is_set() or self._machine.token != self.token:
            return False
        return self._machine.is_valid(self._elector.clock())

    @property
    def deadline(self) -> float:
        """Clock reading until which the lease is trusted (-inf once lost)."""
        if self.lost.is_set() or self._machine.token != self.token:
            return float("-inf")
        return self._machine.deadline

    def remaining(self) -> float:
        """Seconds this term may still act without a further renewal (0 when lost)."""
        return max(self.deadline - self._elector.clock(), 0.0)

    def check(self) -> None:
        """Raise :class:`~stanchion.errors.LeadershipLost` unless :meth:`is_valid`."""
        if not self.is_valid():
            raise LeadershipLost(self.group, self.token)

    async def wait_lost(self) -> None:
        """Return when the lease is lost."""
        await self.lost.wait()

    def __repr__(self) -> str:
        state = "valid" if self.is_valid() else "lost"
        return f"<Lease group={self.group!r} identity={self.identity!r} token={self.token} {state}>"


class LeaderElector:
    """One candidate in one election group.

    Build it with :meth:`from_url`. ``await campaign()`` waits until elected
    and returns a :class:`Lease`; a background task renews it every
    ``renew_every`` seconds and sets ``lease.lost`` when it cannot.
    ``async with elector.leadership() as lease:`` campaigns, and resigns on
    leaving the block so another candidate takes over at once.

    Args:
        backend: a lease backend (see ``stanchion.election.backends``).
        group: the election group name.
        identity: this candidate's identity (unique within the group).
        options: timing (:class:`~stanchion.election._core.LeaseOptions`).
        clock: monotonic seconds; the lease deadline is measured with it.
        connect_timeout: seconds after which an unreachable backend raises
            :class:`~stanchion.errors.BackendUnavailable` from
            :meth:`campaign`.
        on_elected / on_revoked: callbacks (sync or async) given the Lease.
        metrics_registry: a Prometheus registry (a private one by default).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        backend: LeaseBackend,
        group: str,
        identity: str,
        *,
        options: LeaseOptions | None = None,
        clock: Clock = monotonic,
        connect_timeout: float = 5.0,
        on_elected: Callback | None = None,
        on_revoked: Callback | None = None,
        metrics_registry: CollectorRegistry | None = None,
        url: str = "",
    ) -> None:
        if not isinstance(group, str) or not group or "\n" in group:
            raise ConfigError(f"group must be a non-empty string, got {group!r}")
        if not isinstance(identity, str) or not identity or "\n" in identity:
            raise ConfigError(f"identity must be a non-empty string, got {identity!r}")
        if not connect_timeout > 0:
            raise ConfigError(f"connect_timeout must be positive, got {connect_timeout!r}")
        self.backend = backend
        self.group = group
        self.identity = identity
        self.options = options or LeaseOptions()
        self.clock = clock
        self.connect_timeout = float(connect_timeout)
        self.url = url
        self._machine = LeaseMachine(self.options)
        self._lease: Lease | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._campaign_lock: asyncio.Lock | None = None
        self._on_elected: list[Callback] = [on_elected] if on_elected else []
        self._on_revoked: list[Callback] = [on_revoked] if on_revoked else []
        self._log = _log.bind(group=group, identity=identity)
        metrics = Metrics(metrics_registry)
        self._m_leader = metrics.gauge(
            "election_is_leader", "1 while this candidate leads the group", ["group"]
        ).labels(group)
        self._m_token = metrics.gauge(
            "election_token", "fencing token of the current term", ["group"]
        ).labels(group)
        self._m_elected = metrics.counter(
            "election_elected", "terms won by this candidate", ["group"]
        ).labels(group)
        self._m_renewals = metrics.counter(
            "election_renewals", "lease renewals by outcome", ["group", "outcome"]
        )
        self._m_stepdowns = metrics.counter(
            "election_step_downs", "terms ended, by reason", ["group", "reason"]
        )

    # -- construction ------------------------------------------------------------

    @classmethod
    def from_url(
        cls,
        url: str,
        group: str,
        identity: str,
        *,
        ttl: float = 10.0,
        renew_every: float | None = None,
        clock: Clock = monotonic,
        safety_margin: float | None = None,
        poll_every: float | None = None,
        connect_timeout: float = 5.0,
        on_elected: Callback | None = None,
        on_revoked: Callback | None = None,
        metrics_registry: CollectorRegistry | None = None,
        registry: BackendRegistry | None = None,
    ) -> LeaderElector:
        """An elector for ``group`` on the backend named by ``url``.

        URLs: ``memory://name``, ``sqlite:///path.db``, ``file:///dir``,
        ``postgresql://user@host/db``, ``redis://host:6379/0``,
        ``etcd://host:2379``; ``?prefix=`` prefixes every key or table.

        Args:
            url: the backend URL.
            group: the election group.
            identity: this candidate's identity (unique within the group).
            ttl: lease length in seconds.
            renew_every: seconds between renewals (default ``ttl / 3``).
            clock: monotonic clock for the local deadline.
            safety_margin: seconds before ``last renewal + ttl`` at which the
                leader stops trusting its lease (default ``min(ttl/10, 1)``).
            poll_every: seconds between a follower's attempts (default
                ``renew_every / 2``).
            connect_timeout: seconds to reach the backend before
                :class:`~stanchion.errors.BackendUnavailable`.
            on_elected / on_revoked: callbacks given the :class:`Lease`.
            metrics_registry: Prometheus registry for the metrics.
            registry: backend registry (default: the built-in one).

        Raises:
            ConfigError: bad URL, unknown scheme, missing driver or bad timing.
        """
        options = LeaseOptions(
            ttl=ttl, renew_every=renew_every, safety_margin=safety_margin, poll_every=poll_every
        )
        parsed = parse_url(url)
        target, parsed = (registry or default_registry).load("election", parsed)
        factory: Any = getattr(target, "from_url", None)
        if factory is None:
            raise ConfigError(f"election backend for {parsed.masked()} has no from_url()")
        backend: LeaseBackend = factory(parsed, connect_timeout=connect_timeout)
        return cls(
            backend,
            group,
            identity,
            options=options,
            clock=clock,
            connect_timeout=connect_timeout,
            on_elected=on_elected,
            on_revoked=on_revoked,
            metrics_registry=metrics_registry,
            url=parsed.masked(),
        )

    # -- properties --------------------------------------------------------------

    @property
    def ttl(self) -> float:
        """The lease length in seconds."""
        return self.options.ttl

    @property
    def renew_every(self) -> float:
        """Seconds between renewals."""
        return self.options.renewal

    @property
    def capabilities(self) -> Capabilities:
        """The backend's capability flags."""
        return self.backend.capabilities

    @property
    def lease(self) -> Lease | None:
        """The current lease if this candidate is leader and it is valid, else None."""
        lease = self._lease
        return lease if lease is not None and lease.is_valid() else None

    @property
    def is_leader(self) -> bool:
        """True while this candidate holds a valid lease."""
        return self.lease is not None

    def on_elected(self, callback: Callback) -> Callback:
        """Register a callback (sync or async) run with the Lease when elected."""
        self._on_elected.append(callback)
        return callback

    def on_revoked(self, callback: Callback) -> Callback:
        """Register a callback (sync or async) run with the Lease when it is lost."""
        self._on_revoked.append(callback)
        return callback

    # -- campaigning -------------------------------------------------------------

    async def _call(self, coro: Awaitable[Any], limit: float) -> Any:
        try:
            return await asyncio.wait_for(coro, limit)
        except TimeoutError:
            raise BackendUnavailable(
                f"election backend {self.url} did not answer within {limit:.2f}s"
            ) from None

    async def campaign(self) -> Lease:
        """Wait until elected and return the term's :class:`Lease`.

        Returns the current lease at once if this candidate already leads.

        Raises:
            BackendUnavailable: the backend could not be reached within
                ``connect_timeout`` (never retried forever).
        """
        if self._campaign_lock is None:
            self._campaign_lock = asyncio.Lock()
        async with self._campaign_lock:
            current = self.lease
            if current is not None:
                return current
            machine, clock = self._machine, self.clock
            failing_since: float | None = None
            reached = False
            while True:
                now = clock()
                action = machine.step(now, Tick())
                if isinstance(action, Wait):
                    delay = max(action.until - now, 0.0)
                    # A little jitter so that candidates do not poll in lockstep.
                    if await self.backend.wait(self.group, delay * random.uniform(0.8, 1.0)):
                        machine.step(clock(), Vacated())
                    continue
                assert isinstance(action, TryAcquire)
                sent = clock()
                try:
                    grant = await self._call(
                        self.backend.acquire(self.group, self.identity, self.options.ttl),
                        self.connect_timeout,
                    )
                except BackendUnavailable as exc:
                    now = clock()
                    failing_since = sent if failing_since is None else failing_since
                    # Never reached the backend in this campaign, or unreachable for
                    # longer than connect_timeout: tell the caller instead of looping.
                    if not reached or now - failing_since >= self.connect_timeout:
                        self._log.warning("election.backend_unavailable", error=str(exc))
                        raise
                    machine.step(now, Failed(str(exc)))
                    continue
                failing_since, reached = None, True
                if not isinstance(grant, Grant):
                    holder = grant if isinstance(grant, Holder) else None
                    machine.step(clock(), Busy(holder.remaining if holder else None))
                    continue
                step = machine.step(clock(), Acquired(grant.token, sent))
                if isinstance(step, StepDown):
                    self._log.warning("election.grant_too_late", token=grant.token)
                    await self._release_quietly(grant.token)
                    continue
                lease = Lease(self, machine, grant.token)
                self._lease = lease
                self._m_leader.set(1)
                self._m_token.set(grant.token)
                self._m_elected.inc()
                self._log.info("election.elected", token=grant.token)
                self._keeper = asyncio.get_running_loop().create_task(
                    self._keep(lease), name=f"stanchion-election-{self.group}"
                )
                await self._fire(self._on_elected, lease)
                return lease

    async def _keep(self, lease: Lease) -> None:
        machine, clock = self._machine, self.clock
        while True:
            now = clock()
            action = machine.step(now, Tick())
            if isinstance(action, Wait):
                await asyncio.sleep(max(action.until - now, 0.0))
                continue
            if isinstance(action, Renew):
                sent = clock()
                budget = max(machine.deadline - sent, 0.001)
                try:
                    ok = await self._call(
                        self.backend.renew(self.group, self.identity, action.token, self.ttl),
                        min(budget, self.connect_timeout),
                    )
                except Exception as exc:  # unreachable, or a bug in a backend: keep trying
                    self._m_renewals.labels(self.group, "failed").inc()
                    self._log.warning("election.renew_failed", token=lease.token, error=str(exc))
                    action = machine.step(clock(), Failed(str(exc)))
                else:
                    self._m_renewals.labels(self.group, "ok" if ok else "rejected").inc()
                    action = machine.step(clock(), Renewed(sent) if ok else Rejected())
            if isinstance(action, StepDown):
                await self._lost(lease, action.reason, release=True)
                return

    async def _lost(self, lease: Lease, reason: str, *, release: bool) -> None:
        if lease.lost.is_set():
            return
        lease.reason = reason
        lease.lost.set()
        if self._lease is lease:
            self._lease = None
        self._m_leader.set(0)
        self._m_stepdowns.labels(self.group, reason.split()[0]).inc()
        self._log.info("election.stepped_down", token=lease.token, reason=reason)
        await self._fire(self._on_revoked, lease)
        if release:
            await self._release_quietly(lease.token)

    async def _release_quietly(self, token: int) -> None:
        try:
            await self._call(
                self.backend.release(self.group, self.identity, token), self.connect_timeout
            )
        except Exception as exc:  # the lease expires on its own anyway
            self._log.warning("election.release_failed", token=token, error=str(exc))

    async def _fire(self, callbacks: list[Callback], lease: Lease) -> None:
        for callback in list(callbacks):
            try:
                result = callback(lease)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                self._log.exception("election.callback_failed", callback=repr(callback))

    async def resign(self) -> None:
        """Give up leadership now so another candidate takes over without waiting.

        A no-op when this candidate does not lead.
        """
        lease = self._lease
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper is not asyncio.current_task():
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeper
        if lease is None or lease.lost.is_set():
            self._lease = None
            return
        step = self._machine.step(self.clock(), Resign())
        assert isinstance(step, StepDown)
        await self._lost(lease, "resigned", release=True)

    @contextlib.asynccontextmanager
    async def leadership(self) -> AsyncIterator[Lease]:
        """``async with elector.leadership() as lease:`` — lead for the block's duration.

        Waits until elected; leaving the block resigns at once. Check
        ``lease.is_valid()`` before side effects and watch ``lease.lost``.
        """
        lease = await self.campaign()
        try:
            yield lease
        finally:
            if self._lease is lease:
                await asyncio.shield(self.resign())

    async def leader(self) -> LeaderInfo | None:
        """The current leader of the group, without campaigning; None if there is none.

        Raises:
            BackendUnavailable: the backend could not be reached.
        """
        holder = await self._call(self.backend.observe(self.group), self.connect_timeout)
        if holder is None:
            return None
        return LeaderInfo(holder.identity, holder.token, self.clock() + holder.remaining)

    # -- lifecycle ---------------------------------------------------------------

    async def aclose(self) -> None:
        """Resign if leading and release the backend's connections."""
        try:
            await self.resign()
        finally:
            await self.backend.aclose()

    async def __aenter__(self) -> LeaderElector:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<LeaderElector {self.url} group={self.group!r} identity={self.identity!r} "
            f"ttl={self.ttl:g}>"
        )
