"""The circuit breaker facade: sync and async calls, decorator, context managers.

The facade reads the clock, takes a lock only around the pure machine's tiny
state update (never while the user's call runs), and turns the machine's
transitions into listener calls, a log line and Prometheus figures. The
closed-state success path is kept short on purpose: two clock reads, one
``try``, one lock round-trip around ``BreakerMachine.record``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import itertools
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, ParamSpec, TypeVar, overload

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from stanchion.errors import CircuitOpenError, ConfigError
from stanchion.observability import StructLogger, get_logger
from stanchion.resilience._core import (
    FAILURE,
    IGNORED,
    SLOW,
    SUCCESS,
    BreakerConfig,
    BreakerMachine,
    BreakerMetrics,
    Reject,
    State,
    Transition,
)

if TYPE_CHECKING:
    from stanchion.resilience._store import SharedState

__all__ = [
    "BreakerEvent",
    "CallFailed",
    "CallRejected",
    "CallSucceeded",
    "CircuitBreaker",
    "ErrorIgnored",
    "SlowCall",
    "StateChanged",
]

P = ParamSpec("P")
T = TypeVar("T")

_CLOSED = State.CLOSED
_new_error = BaseException.__new__  # builds CircuitOpenError(args) without a Python frame

# -- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The breaker ``name`` moved from ``old`` to ``new`` at clock time ``at``."""

    name: str
    old: State
    new: State
    at: float

    @property
    def from_state(self) -> State:
        """Alias of ``old``."""
        return self.old

    @property
    def to_state(self) -> State:
        """Alias of ``new``."""
        return self.new


@dataclass(frozen=True, slots=True)
class CallSucceeded:
    """A call through breaker ``name`` succeeded in ``duration`` seconds."""

    name: str
    duration: float


@dataclass(frozen=True, slots=True)
class CallFailed:
    """A call failed (an exception in ``record`` or a result ``record_result`` flagged)."""

    name: str
    duration: float
    error: BaseException | None
    result: object = None


@dataclass(frozen=True, slots=True)
class ErrorIgnored:
    """A call raised an ignored exception (or was cancelled): it counts neither way."""

    name: str
    duration: float
    error: BaseException


@dataclass(frozen=True, slots=True)
class SlowCall:
    """A call took at least ``slow_call_duration`` (``failed`` says if it also failed)."""

    name: str
    duration: float
    failed: bool


@dataclass(frozen=True, slots=True)
class CallRejected:
    """The breaker rejected a call in ``state``; a trial is due in ``retry_after`` s."""

    name: str
    state: State
    retry_after: float


BreakerEvent = StateChanged | CallSucceeded | CallFailed | ErrorIgnored | SlowCall | CallRejected
"""Any event a breaker emits to its listeners."""

_KINDS = ("state_change", "success", "error", "ignored_error", "slow_call", "rejected", "any")
_ALIASES = {
    "rejection": "rejected",
    "reject": "rejected",
    "ignored": "ignored_error",
    "slow": "slow_call",
    "failure": "error",
    "state": "state_change",
}


# -- Prometheus: figures are read at scrape time, nothing is paid per call ------


class _BreakerCollector(Collector):
    """Exports every breaker registered with one Prometheus registry."""

    def __init__(self) -> None:
        self.breakers: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        state = GaugeMetricFamily(
            "stanchion_breaker_state",
            "1 for the breaker's current state, 0 for the others",
            labels=["name", "state"],
        )
        calls = CounterMetricFamily(
            "stanchion_breaker_calls",
            "Calls through the breaker by outcome",
            labels=["name", "outcome"],
        )
        rejected = CounterMetricFamily(
            "stanchion_breaker_rejected_calls",
            "Calls rejected without running (open, forced open or no half-open slot)",
            labels=["name"],
        )
        rate = GaugeMetricFamily(
            "stanchion_breaker_failure_rate",
            "Failure rate of the current window (-1 until minimum_calls are buffered)",
            labels=["name"],
        )
        slow_rate = GaugeMetricFamily(
            "stanchion_breaker_slow_call_rate",
            "Slow-call rate of the current window (-1 until minimum_calls are buffered)",
            labels=["name"],
        )
        fallback = GaugeMetricFamily(
            "stanchion_breaker_store_fallback",
            "1 while the shared store is unreachable and the breaker runs on local state",
            labels=["name"],
        )
        store_errors = CounterMetricFamily(
            "stanchion_breaker_store_errors",
            "Failed exchanges with the shared store",
            labels=["name"],
        )
        for b in list(self.breakers):
            m = b.metrics
            for s in State:
                state.add_metric([b.name, s.value], 1.0 if m.state is s else 0.0)
            totals = b._machine.totals
            for label, idx in (
                ("success", 0),
                ("failure", 1),
                ("slow_success", 2),
                ("slow_failure", 3),
                ("ignored", 4),
            ):
                calls.add_metric([b.name, label], float(totals[idx]))
            rejected.add_metric([b.name], float(totals[5]))
            rate.add_metric([b.name], m.failure_rate)
            slow_rate.add_metric([b.name], m.slow_call_rate)
            if b._shared is not None:
                fallback.add_metric([b.name], 1.0 if b._shared.fallback else 0.0)
                store_errors.add_metric([b.name], float(b._shared.errors))
        yield from (state, calls, rejected, rate, slow_rate, fallback, store_errors)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _BreakerCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> _BreakerCollector:
    with _collectors_lock:
        c = _collectors.get(registry)
        if c is None:
            c = _collectors[registry] = _BreakerCollector()
            registry.register(c)
        return c


# -- the breaker ---------------------------------------------------------------


def _arity2(cb: Callable[..., object]) -> bool:
    """True if ``cb`` takes two positional arguments (old, new) rather than an event."""
    try:
        params = list(inspect.signature(cb).parameters.values())
    except (TypeError, ValueError):
        return False
    pos = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(pos) == 2


class CircuitBreaker:
    """A circuit breaker with resilience4j semantics, for sync and async code.

    Args:
        name: the breaker's name (in errors, metrics, logs and the shared store key).
        failure_rate_threshold: open when failed/buffered calls reach this fraction (0, 1].
        slow_call_rate_threshold: open when slow/buffered calls reach this fraction (0, 1].
        slow_call_duration: a call taking at least this many seconds is slow.
        window_type: ``"count"`` (the last ``window_size`` calls) or ``"time"``
            (the calls of the last ``window_size`` seconds, one-second buckets).
        window_size: calls (count window) or seconds (time window).
        minimum_calls: no decision until this many calls are buffered.
        wait_duration_open: seconds the breaker stays open before half-open.
        half_open_calls: trial calls admitted in half-open; their outcomes decide.
        max_wait_half_open: if > 0, re-open after this many seconds in half-open
            even if the trials have not all completed (0: wait for them).
        record: exception types counted as failures (others count as successes,
            as in resilience4j), or a predicate ``exc -> bool``.
        ignore: exception types counted neither way (checked first). A
            cancelled call (``asyncio.CancelledError``) and any other
            ``BaseException`` that is not an ``Exception`` are always ignored.
        record_result: ``value -> bool``; True counts a returned value as a failure.
        clock: monotonic seconds (inject a :class:`~stanchion.clock.ManualClock` in tests).
        store: ``None`` for local state, or a URL (``redis://host/0?prefix=app:``)
            whose backend all breakers of this name share.
        registry: Prometheus registry to export to (a private one by default).
        logger: structured logger (default ``stanchion.resilience``).
        sync_interval: seconds between exchanges with the shared store.

    Use it as ``breaker.call(fn, ...)``, ``await breaker.call_async(fn, ...)``,
    ``@breaker`` or ``with breaker:`` / ``async with breaker:``. A rejected
    call raises :class:`~stanchion.errors.CircuitOpenError`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        name: str,
        *,
        failure_rate_threshold: float = 0.5,
        slow_call_rate_threshold: float = 1.0,
        slow_call_duration: float = 60.0,
        window_type: Literal["count", "time"] = "count",
        window_size: int = 100,
        minimum_calls: int = 100,
        wait_duration_open: float = 60.0,
        half_open_calls: int = 10,
        max_wait_half_open: float = 0.0,
        record: tuple[type[BaseException], ...]
        | list[type[BaseException]]
        | type[BaseException]
        | Callable[[BaseException], bool] = (Exception,),
        ignore: tuple[type[BaseException], ...]
        | list[type[BaseException]]
        | type[BaseException] = (),
        record_result: Callable[[Any], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        store: str | None = None,
        registry: CollectorRegistry | None = None,
        logger: StructLogger | None = None,
        sync_interval: float = 0.05,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("a circuit breaker needs a non-empty name")
        self.name = name
        self.config = BreakerConfig(
            failure_rate_threshold=failure_rate_threshold,
            slow_call_rate_threshold=slow_call_rate_threshold,
            slow_call_duration=slow_call_duration,
            window_type=window_type,
            window_size=window_size,
            minimum_calls=minimum_calls,
            wait_duration_open=wait_duration_open,
            half_open_calls=half_open_calls,
            max_wait_half_open=max_wait_half_open,
        )
        self._clock = clock
        self._slow = float(slow_call_duration)
        self._record_pred: Callable[[BaseException], bool] | None = None
        if isinstance(record, type):
            record = (record,)
        elif isinstance(record, list):
            record = tuple(record)
        if isinstance(record, tuple):
            self._record_types: tuple[type[BaseException], ...] = record
        elif callable(record):
            self._record_types = (BaseException,)
            self._record_pred = record
        else:
            raise ConfigError("record must be exception types or a predicate")
        self._ignore = (ignore,) if isinstance(ignore, type) else tuple(ignore)
        self._record_result = record_result
        self._lock = threading.Lock()
        now = clock()
        self._machine = BreakerMachine(self.config, now)
        # Fast-path successes are counted by an atomic counter and handed to
        # the machine in batches (see _flush); _flush_at and _horizon say when
        # a batch must be handed over because the decision could change.
        self._oks = itertools.count()
        self._base = next(self._oks)
        self._timewin = window_type == "time"
        self._flush_at = 0
        self._horizon = 0.0
        self._rejects = itertools.count()
        self._rbase = next(self._rejects)
        self._reject_until = -math.inf
        self._reject_state = "closed"
        self._last_t = now
        self._rearm(now)
        self._listeners: dict[str, list[Callable[[Any], object]]] = {k: [] for k in _KINDS}
        self._per_call = False  # any per-call listener registered?
        self._log = (logger or get_logger("stanchion.resilience")).bind(breaker=name)
        self._cm: contextvars.ContextVar[tuple[tuple[float, int], ...]] = contextvars.ContextVar(
            f"stanchion.breaker.{name}", default=()
        )
        self.registry = registry if registry is not None else CollectorRegistry()
        _collector_for(self.registry).breakers.add(self)
        self._shared: SharedState | None = None
        if store is not None:
            from stanchion.resilience._store import SharedState

            self._shared = SharedState(self, store, sync_interval=sync_interval)
        # the success fast path is taken when nothing per-call must be reported
        self._fast = self._shared is None and record_result is None

    # -- introspection -----------------------------------------------------------

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self._machine.state.value}>"

    # -- batching of fast successes (call these with the lock held) ----------------

    def _flush(self, now: float) -> None:
        c = next(self._oks)
        k = c - self._base - 1
        self._base = c
        if k > 0:
            self._machine.record_successes(k, now, self._last_t)
        c = next(self._rejects)
        k = c - self._rbase - 1
        self._rbase = c
        if k > 0:
            self._machine.record_rejections(k)

    def _rearm(self, now: float) -> None:
        self._reject_until = self._machine.reject_until()
        self._reject_state = self._machine.state.value
        need = self._machine.successes_before_check()
        self._flush_at = self._base + need if need else -1
        self._last_t = now
        self._horizon = math.floor(now) + 1.0 if self._timewin else math.inf

    def _sync(self, now: float) -> None:
        with self._lock:
            self._flush(now)
            self._rearm(now)
        if self._machine.transitions:
            self._drain()

    @property
    def state(self) -> State:
        """The current :class:`State` (time-driven transitions applied first)."""
        m = self._machine
        with self._lock:
            now = self._clock()
            self._flush(now)
            m.poll(now)
            self._rearm(now)
        if m.transitions:
            self._drain()
        return m.state

    @property
    def metrics(self) -> BreakerMetrics:
        """Failure rate, slow rate, buffered/failed/slow/successful/not-permitted counts."""
        m = self._machine
        with self._lock:
            now = self._clock()
            self._flush(now)
            m.poll(now)
            snap = m.metrics(now)
            self._rearm(now)
        if m.transitions:
            self._drain()
        sh = self._shared
        if sh is not None and not sh.fallback and sh.last_metrics is not None:
            # connected: the shared window is the one that decides (rejections
            # are counted by each replica)
            return dataclasses.replace(
                sh.last_metrics, state=snap.state, not_permitted_calls=snap.not_permitted_calls
            )
        return snap

    @property
    def retry_after(self) -> float:
        """Seconds until a trial call is admitted (0.0 if calls are admitted now)."""
        with self._lock:
            return self._machine.retry_after(self._clock())

    # -- manual control -----------------------------------------------------------

    def force_open(self) -> None:
        """Reject every call (state ``FORCED_OPEN``) until :meth:`reset`."""
        self._manual(self._machine.force_open)

    def disable(self) -> None:
        """Admit every call and record nothing (state ``DISABLED``) until :meth:`reset`."""
        self._manual(self._machine.disable)

    def reset(self) -> None:
        """Return to ``CLOSED`` with an empty window."""
        self._manual(self._machine.reset)

    def open(self) -> None:
        """Open the breaker now, as if its thresholds were reached (it half-opens later)."""
        self._manual(self._machine.open)

    def _manual(self, op: Callable[[float], None]) -> None:
        with self._lock:
            now = self._clock()
            self._flush(now)
            op(now)
            self._rearm(now)
        self._drain(manual=True)

    # -- listeners ------------------------------------------------------------------

    def on_state_change(self, cb: Callable[..., object]) -> Callable[..., object]:
        """Call ``cb(event: StateChanged)`` (or ``cb(old, new)``) on every transition.

        Returns ``cb`` so it can be used as a decorator. Listener errors are
        logged, never raised into the call path.
        """
        if _arity2(cb):
            two = cb
            self._listeners["state_change"].append(lambda e: two(e.old, e.new))
        else:
            self._listeners["state_change"].append(cb)
        return cb

    def on_success(self, cb: Callable[[CallSucceeded], object]) -> Callable[..., object]:
        """Call ``cb(CallSucceeded)`` after each successful call."""
        return self._add("success", cb)

    def on_error(self, cb: Callable[[CallFailed], object]) -> Callable[..., object]:
        """Call ``cb(CallFailed)`` after each call recorded as a failure."""
        return self._add("error", cb)

    def on_ignored_error(self, cb: Callable[[ErrorIgnored], object]) -> Callable[..., object]:
        """Call ``cb(ErrorIgnored)`` after each ignored exception or cancellation."""
        return self._add("ignored_error", cb)

    def on_slow_call(self, cb: Callable[[SlowCall], object]) -> Callable[..., object]:
        """Call ``cb(SlowCall)`` after each slow call (successful or not)."""
        return self._add("slow_call", cb)

    def on_rejected(self, cb: Callable[[CallRejected], object]) -> Callable[..., object]:
        """Call ``cb(CallRejected)`` for each call the breaker rejects."""
        return self._add("rejected", cb)

    def on_event(self, cb: Callable[[BreakerEvent], object]) -> Callable[..., object]:
        """Call ``cb(event)`` for every event of any kind."""
        return self._add("any", cb)

    def on(self, event: str, cb: Callable[..., object]) -> Callable[..., object]:
        """Register ``cb`` for ``event`` by name.

        Names: ``state_change``, ``success``, ``error``, ``ignored_error``,
        ``slow_call``, ``rejected`` (or ``rejection``), ``any``.
        """
        kind = _ALIASES.get(event, event)
        if kind == "state_change":
            return self.on_state_change(cb)
        if kind not in _KINDS:
            raise ConfigError(f"unknown breaker event {event!r}; one of {', '.join(_KINDS)}")
        return self._add(kind, cb)

    def _add(self, kind: str, cb: Callable[[Any], object]) -> Callable[..., object]:
        self._listeners[kind].append(cb)
        if kind != "state_change":
            self._per_call = True
            self._fast = False
        return cb

    def _emit(self, kind: str, event: BreakerEvent) -> None:
        for cb in (*self._listeners[kind], *self._listeners["any"]):
            try:
                cb(event)
            except Exception as exc:
                self._log.error("breaker.listener_failed", kind=kind, error=repr(exc))

    def _drain(self, manual: bool = False, source: str = "local") -> None:
        m = self._machine
        with self._lock:
            if not m.transitions:
                return
            ts, m.transitions = m.transitions, []
        for t in ts:
            self._on_transition(t, manual, source)

    def _on_transition(self, t: Transition, manual: bool, source: str) -> None:
        log = self._log.warning if t.new is State.OPEN else self._log.info
        log("breaker.state_changed", old=t.old.value, new=t.new.value, manual=manual, source=source)
        if self._shared is not None:
            self._shared.local_transition(t, manual)
        self._emit("state_change", StateChanged(self.name, t.old, t.new, t.at))

    # -- the call paths ---------------------------------------------------------

    def _classify(self, exc: BaseException) -> int:
        if isinstance(exc, self._ignore) or not isinstance(exc, Exception):
            return IGNORED
        if self._record_pred is not None:
            try:
                return FAILURE if self._record_pred(exc) else SUCCESS
            except Exception:
                return FAILURE
        return FAILURE if isinstance(exc, self._record_types) else SUCCESS

    def _admit(self) -> tuple[float, int]:
        """Admit a call or raise CircuitOpenError; return (start time, epoch)."""
        m = self._machine
        with self._lock:
            now = self._clock()
            self._flush(now)
            d = m.admit(now)
            self._rearm(now)
        if m.transitions:
            self._drain()
        if isinstance(d, Reject):
            if self._shared is not None and d.state is State.HALF_OPEN:
                self._shared.want_slot()
            if self._per_call:
                self._emit("rejected", CallRejected(self.name, d.state, d.retry_after))
            raise CircuitOpenError(self.name, d.retry_after, d.state.value)
        return now, d.epoch

    def _reject_fast(self, now: float) -> NoReturn:
        """Reject without the lock: the breaker is open until ``_reject_until``."""
        next(self._rejects)
        raise _new_error(CircuitOpenError, self.name, self._reject_until - now, self._reject_state)

    def _done(
        self,
        outcome: int,
        start: float,
        epoch: int,
        exc: BaseException | None = None,
        result: object = None,
    ) -> None:
        """Record an outcome (exception already classified, slowness not yet)."""
        end = self._clock()
        dur = end - start
        if outcome != IGNORED and dur >= self._slow:
            outcome |= SLOW
        m = self._machine
        with self._lock:
            self._flush(end)
            current = epoch == m.epoch
            st = m.state
            m.record(outcome, end, epoch)
            self._rearm(end)
        if self._shared is not None and current:
            self._shared.note(outcome, end, st.value)
        if m.transitions:
            self._drain()
        if self._per_call:
            n = self.name
            if outcome == IGNORED:
                assert exc is not None
                self._emit("ignored_error", ErrorIgnored(n, dur, exc))
                return
            if outcome & FAILURE:
                self._emit("error", CallFailed(n, dur, exc, result))
            else:
                self._emit("success", CallSucceeded(n, dur))
            if outcome & SLOW:
                self._emit("slow_call", SlowCall(n, dur, bool(outcome & FAILURE)))

    def _judge(self, result: object) -> int:
        rr = self._record_result
        if rr is None:
            return SUCCESS
        try:
            return FAILURE if rr(result) else SUCCESS
        except Exception as exc:
            self._log.error("breaker.record_result_failed", error=repr(exc))
            return SUCCESS

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` through the breaker.

        Raises:
            CircuitOpenError: the breaker rejected the call (``fn`` did not run).
        """
        m = self._machine
        if m.state is _CLOSED and self._fast:
            # fast path: closed, nothing per call to report, no store
            epoch = m.epoch
            clock = self._clock
            t0 = clock()
            try:
                r = fn(*args, **kwargs)
            except BaseException as exc:
                self._done(self._classify(exc), t0, epoch, exc)
                raise
            t1 = clock()
            if t1 - t0 < self._slow and t1 < self._horizon and m.epoch == epoch:
                if next(self._oks) >= self._flush_at:
                    self._sync(t1)
                return r
            self._done(SUCCESS, t0, epoch, None, r)
            return r
        if self._fast:
            now = self._clock()
            if now < self._reject_until:
                self._reject_fast(now)
        t0, epoch = self._admit()
        try:
            r = fn(*args, **kwargs)
        except BaseException as exc:
            self._done(self._classify(exc), t0, epoch, exc)
            raise
        self._done(self._judge(r), t0, epoch, None, r)
        return r

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker.

        A cancelled call counts neither way and frees its half-open slot.

        Raises:
            CircuitOpenError: the breaker rejected the call (``fn`` did not run).
        """
        m = self._machine
        if m.state is _CLOSED and self._fast:
            epoch = m.epoch
            clock = self._clock
            t0 = clock()
            try:
                r = await fn(*args, **kwargs)
            except BaseException as exc:
                self._done(self._classify(exc), t0, epoch, exc)
                raise
            t1 = clock()
            if t1 - t0 < self._slow and t1 < self._horizon and m.epoch == epoch:
                if next(self._oks) >= self._flush_at:
                    self._sync(t1)
                return r
            self._done(SUCCESS, t0, epoch, None, r)
            return r
        if self._fast:
            now = self._clock()
            if now < self._reject_until:
                self._reject_fast(now)
        t0, epoch = self._admit()
        try:
            r = await fn(*args, **kwargs)
        except BaseException as exc:
            self._done(self._classify(exc), t0, epoch, exc)
            raise
        self._done(self._judge(r), t0, epoch, None, r)
        return r

    # -- decorator -----------------------------------------------------------------

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; the signature is kept."""
        call = self.call
        call_async = self.call_async
        m = self._machine
        clock = self._clock
        done = self._done
        classify = self._classify
        name = self.name
        new_error = _new_error
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
                # the closed-state fast path of call_async(), inlined
                if m.state is not _CLOSED or not self._fast:
                    if self._fast and clock() < self._reject_until:
                        self._reject_fast(clock())
                    return await call_async(fn, *args, **kwargs)
                epoch = m.epoch
                t0 = clock()
                try:
                    r = await fn(*args, **kwargs)
                except BaseException as exc:
                    done(classify(exc), t0, epoch, exc)
                    raise
                t1 = clock()
                if t1 - t0 < self._slow and t1 < self._horizon and m.epoch == epoch:
                    if next(self._oks) >= self._flush_at:
                        self._sync(t1)
                    return r
                done(SUCCESS, t0, epoch, None, r)
                return r

            return awrapper

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            # the closed-state fast path of call(), inlined (one frame less)
            if m.state is not _CLOSED or not self._fast:
                if self._fast:
                    now = clock()
                    if now < self._reject_until:  # open: reject here, one frame deep
                        next(self._rejects)
                        raise new_error(
                            CircuitOpenError, name, self._reject_until - now, self._reject_state
                        )
                return call(fn, *args, **kwargs)
            epoch = m.epoch
            t0 = clock()
            try:
                r = fn(*args, **kwargs)
            except BaseException as exc:
                done(classify(exc), t0, epoch, exc)
                raise
            t1 = clock()
            if t1 - t0 < self._slow and t1 < self._horizon and m.epoch == epoch:
                if next(self._oks) >= self._flush_at:
                    self._sync(t1)
                return r
            done(SUCCESS, t0, epoch, None, r)
            return r

        return wrapper

    # -- context managers --------------------------------------------------------------

    def __enter__(self) -> CircuitBreaker:
        """Admit the block (or raise CircuitOpenError); its outcome is recorded on exit."""
        entry = self._admit()
        self._cm.set((*self._cm.get(), entry))
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        stack = self._cm.get()
        if not stack:
            return False
        t0, epoch = stack[-1]
        self._cm.set(stack[:-1])
        if exc is None:
            self._done(SUCCESS, t0, epoch)
        else:
            self._done(self._classify(exc), t0, epoch, exc)
        return False

    async def __aenter__(self) -> CircuitBreaker:
        """Admit the block (or raise CircuitOpenError); a cancellation counts neither way."""
        return self.__enter__()

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        return self.__exit__(et, exc, tb)

    # -- shared store lifecycle -------------------------------------------------------

    def close(self) -> None:
        """Stop exchanging with the shared store (no-op for a local breaker)."""
        if self._shared is not None:
            self._shared.close()

    def wait_synced(self, timeout: float = 5.0) -> bool:
        """Block until the first exchange with the shared store succeeded.

        Returns True at once for a local breaker, False on timeout.
        """
        return self._shared is None or self._shared.wait_synced(timeout)

    @property
    def store_fallback(self) -> bool:
        """True while the shared store is unreachable and local state is used."""
        return self._shared is not None and self._shared.fallback
