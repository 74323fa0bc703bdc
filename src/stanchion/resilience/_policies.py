"""Retry, Timeout, Bulkhead, RateLimiter and their composition (Policy).

Each is a thin facade over a pure core in ``_core.py`` (RetryPlan,
BudgetWindow, TokenBucket): the facade reads the clock, sleeps, takes locks
around the tiny state updates and raises the errors of ``stanchion.errors``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar, overload

from prometheus_client import CollectorRegistry

from stanchion.errors import (
    BulkheadFull,
    CallTimeout,
    CircuitOpenError,
    ConfigError,
    RateLimited,
    RetryExhausted,
)
from stanchion.observability import Metrics
from stanchion.resilience._breaker import CircuitBreaker
from stanchion.resilience._core import (
    BudgetWindow,
    Exponential,
    Fixed,
    GiveUp,
    RetryPlan,
    TokenBucket,
)

__all__ = [
    "Bulkhead",
    "Policy",
    "RateLimiter",
    "Retry",
    "RetryBudget",
    "RetryEvent",
    "Timeout",
    "wrap",
]

P = ParamSpec("P")
T = TypeVar("T")


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and value == value and value != float("inf")
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(
            f"{name} must be a {'' if allow_zero else 'positive '}number, got {value!r}"
        )
    return float(value)


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_by_registry_lock = threading.Lock()


def _metrics(registry: CollectorRegistry | None) -> Metrics:
    """One instrument factory per registry, so many policies can share a registry."""
    if registry is None:
        return Metrics()
    with _by_registry_lock:
        m = _by_registry.get(registry)
        if m is None:
            m = _by_registry[registry] = Metrics(registry)
        return m


def _live(obj: object, attr: str) -> Callable[[], float]:
    """A gauge callback reading ``obj.attr`` without keeping ``obj`` alive."""
    ref = weakref.ref(obj)

    def read() -> float:
        o = ref()
        return float(getattr(o, attr)) if o is not None else 0.0

    return read


# == retry budget ==================================================================


class RetryBudget:
    """A retry budget shared by many :class:`Retry` policies (Envoy/Finagle style).

    Over a sliding ``ttl`` (10 s), retries may be at most ``ratio`` of the
    requests started, plus a reserve of ``min_retries_per_second`` so a client
    with little traffic can still retry. When the budget is spent, a
    :class:`Retry` gives up at once with :class:`~stanchion.errors.RetryExhausted`
    instead of adding to a retry storm.

    Args:
        ratio: retries allowed per request (0.2 = 20 %).
        min_retries_per_second: the reserve.
        ttl: seconds of history.
        clock: monotonic seconds.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_retries_per_second: float = 10,
        *,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _positive("ratio", ratio, allow_zero=True)
        _positive("min_retries_per_second", min_retries_per_second, allow_zero=True)
        _positive("ttl", ttl)
        self.ratio = ratio
        self.min_retries_per_second = min_retries_per_second
        self._core = BudgetWindow(ratio, min_retries_per_second, ttl)
        self._lock = threading.Lock()
        self._clock = clock

    @property
    def balance(self) -> float:
        """Retries the budget would allow now."""
        with self._lock:
            return self._core.balance(self._clock())

    def deposit(self) -> None:
        """Note a new request (a first attempt)."""
        with self._lock:
            self._core.deposit(self._clock())

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False if it is spent."""
        with self._lock:
            return self._core.withdraw(self._clock())


# == retry ===========================================================================


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A retry is about to sleep ``delay`` s before attempt ``attempt``.

    ``error`` is the previous attempt's exception, or ``result`` its flagged value.
    """

    attempt: int
    delay: float
    error: BaseException | None
    result: object = None


class Retry:
    """Retry a call with back-off, an overall deadline and an optional shared budget.

    Args:
        attempts: total attempts, the first included (>= 1).
        backoff: :class:`Exponential` (default: base 0.1 s, max 10 s, full
            jitter) or :class:`Fixed`.
        retry_on: exception types to retry, or a predicate ``exc -> bool``.
            Other exceptions propagate at once. A
            :class:`~stanchion.errors.CircuitOpenError` is retried only if
            named explicitly (a breaker rejects to fail fast). Cancellation is
            never retried.
        retry_on_result: ``value -> bool``; True retries a returned value.
        deadline: seconds for the whole operation. No sleep ends at or after
            it (the retry gives up instead of overshooting), and for async
            calls each attempt is cancelled when the deadline comes.
        budget: a :class:`RetryBudget` shared by many retries.
        clock: monotonic seconds.
        sleep: blocking sleep for :meth:`call` (tests inject a fake).
        async_sleep: awaitable sleep for :meth:`call_async`.
        rng: uniform [0, 1) source for the jitter.
        name: label of its Prometheus figures.
        registry: Prometheus registry for ``stanchion_retry_retries_total`` and
            ``stanchion_retry_exhausted_total`` (a private one by default).

    Raises (from the calls):
        RetryExhausted: attempts, deadline or budget ran out; the last
            exception (or result) is attached and chained.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        attempts: int = 3,
        *,
        backoff: Exponential | Fixed | None = None,
        retry_on: tuple[type[BaseException], ...]
        | list[type[BaseException]]
        | type[BaseException]
        | Callable[[BaseException], bool] = (Exception,),
        retry_on_result: Callable[[Any], bool] | None = None,
        deadline: float | None = None,
        budget: RetryBudget | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        async_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        name: str = "retry",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise ConfigError(f"attempts must be an int >= 1, got {attempts!r}")
        if deadline is not None:
            _positive("deadline", deadline)
        if backoff is None:
            backoff = Exponential()
        if not isinstance(backoff, Exponential | Fixed):
            raise ConfigError("backoff must be Exponential(...) or Fixed(...)")
        self.attempts = attempts
        self.backoff = backoff
        self.deadline = deadline
        self.budget = budget
        self._pred: Callable[[BaseException], bool] | None = None
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        elif isinstance(retry_on, list):
            retry_on = tuple(retry_on)
        if isinstance(retry_on, tuple):
            self._types: tuple[type[BaseException], ...] = retry_on
        elif callable(retry_on):
            self._types = ()
            self._pred = retry_on
        else:
            raise ConfigError("retry_on must be exception types or a predicate")
        self._retry_result = retry_on_result
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._rng = rng
        self._listeners: list[Callable[[RetryEvent], object]] = []
        self.name = name
        m = _metrics(registry)
        self.registry = m.registry
        self._m_retries = m.counter(
            "retry_retries", "Retries made (attempts after the first)", ["name"]
        ).labels(name)
        self._m_exhausted = m.counter(
            "retry_exhausted", "Operations given up, by reason", ["name", "reason"]
        )

    def on_retry(self, cb: Callable[[RetryEvent], object]) -> Callable[[RetryEvent], object]:
        """Call ``cb(RetryEvent)`` before each retry's sleep; returns ``cb``."""
        self._listeners.append(cb)
        return cb

    def _retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, Exception):
            return False
        if self._pred is not None:
            return bool(self._pred(exc))
        if isinstance(exc, CircuitOpenError) and not any(
            issubclass(t, CircuitOpenError) for t in self._types
        ):
            return False
        return isinstance(exc, self._types)

    def _decide(
        self, plan: RetryPlan, attempt: int, exc: BaseException | None, result: object
    ) -> float:
        """The delay before the next attempt, or raise RetryExhausted."""
        d = plan.next(attempt, self._clock(), self._rng())
        if not isinstance(d, GiveUp) and self.budget is not None and not self.budget.try_withdraw():
            d = GiveUp("budget")
        if isinstance(d, GiveUp):
            self._m_exhausted.labels(self.name, d.reason).inc()
            what = {
                "attempts": f"all {attempt} attempts failed",
                "deadline": f"deadline of {self.deadline}s reached after {attempt} attempt(s)",
                "budget": f"retry budget spent after {attempt} attempt(s)",
            }[d.reason]
            last = f"{type(exc).__name__}: {exc}" if exc is not None else f"result {result!r}"
            raise RetryExhausted(
                f"{what}; last {last}",
                attempts=attempt,
                last_exception=exc,
                last_result=result,
                reason=d.reason,
            ) from exc
        self._m_retries.inc()
        for cb in self._listeners:
            try:
                cb(RetryEvent(d.attempt, d.delay, exc, result))
            except Exception:
                pass
        return d.delay

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn(*args, **kwargs)`` until it succeeds or the plan gives up.

        With a deadline, a sync attempt cannot be interrupted: the deadline
        stops further attempts and caps every sleep.
        """
        plan = RetryPlan(self.attempts, self.backoff, self.deadline, self._clock())
        if self.budget is not None:
            self.budget.deposit()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                if not self._retryable(exc):
                    raise
                delay = self._decide(plan, attempt, exc, None)
            else:
                if self._retry_result is None or not self._retry_result(result):
                    return result
                delay = self._decide(plan, attempt, None, result)
            if delay > 0:
                self._sleep(delay)

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn(*args, **kwargs)`` until it succeeds or the plan gives up.

        With a deadline, each attempt is cancelled when the deadline comes
        (then :class:`~stanchion.errors.RetryExhausted` carries a
        :class:`~stanchion.errors.CallTimeout`).
        """
        plan = RetryPlan(self.attempts, self.backoff, self.deadline, self._clock())
        if self.budget is not None:
            self.budget.deposit()
        attempt = 0
        while True:
            attempt += 1
            try:
                remaining = plan.remaining(self._clock())
                if remaining is None:
                    result = await fn(*args, **kwargs)
                else:
                    result = await _with_deadline(fn(*args, **kwargs), remaining, self.deadline)
            except _DeadlineHit as hit:
                self._m_exhausted.labels(self.name, "deadline").inc()
                raise RetryExhausted(
                    f"deadline of {self.deadline}s reached during attempt {attempt}",
                    attempts=attempt,
                    last_exception=hit.timeout,
                    reason="deadline",
                ) from hit.timeout
            except BaseException as exc:
                if not self._retryable(exc):
                    raise
                delay = self._decide(plan, attempt, exc, None)
            else:
                if self._retry_result is None or not self._retry_result(result):
                    return result
                delay = self._decide(plan, attempt, None, result)
            if delay > 0:
                await self._async_sleep(delay)

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; the signature is kept."""
        return _decorate(fn, self.call, self.call_async)


class _DeadlineHit(Exception):
    def __init__(self, timeout: CallTimeout) -> None:
        self.timeout = timeout


async def _with_deadline(aw: Awaitable[T], remaining: float, deadline: float | None) -> T:
    if remaining <= 0:
        if inspect.iscoroutine(aw):
            aw.close()
        raise _DeadlineHit(CallTimeout(deadline or 0.0))
    try:
        async with asyncio.timeout(remaining) as cm:
            return await aw
    except TimeoutError as exc:
        if cm.expired():
            raise _DeadlineHit(CallTimeout(deadline or remaining)) from exc
        raise


def _decorate(
    fn: Callable[P, Any],
    call: Callable[..., Any],
    call_async: Callable[..., Awaitable[Any]],
) -> Callable[P, Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def awrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            return await call_async(fn, *args, **kwargs)

        return awrapper

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        return call(fn, *args, **kwargs)

    return wrapper


# == timeout ===========================================================================


class Timeout:
    """Cancel an async call that takes longer than ``seconds``.

    Use ``await timeout.call_async(fn, ...)``, ``@timeout`` on an async
    function, or ``async with timeout:``. On expiry the call is cancelled and
    :class:`~stanchion.errors.CallTimeout` (a ``TimeoutError``) is raised. A
    running sync function cannot be interrupted, so :meth:`call` raises
    :class:`~stanchion.errors.ConfigError`.

    .. versionadded:: 0.1
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = _positive("seconds", seconds)
        self._cms: list[Any] = []

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn(*args, **kwargs)`` for at most ``seconds``.

        Raises:
            CallTimeout: the call was cancelled after ``seconds``.
        """
        try:
            async with asyncio.timeout(self.seconds) as cm:
                return await fn(*args, **kwargs)
        except TimeoutError as exc:
            if cm.expired():
                raise CallTimeout(self.seconds) from exc
            raise

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Not supported: a sync call cannot be interrupted."""
        raise ConfigError(
            "Timeout applies to async calls (a running sync function cannot be interrupted); "
            "use call_async, or give the sync client its own timeout"
        )

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function; the signature is kept."""
        if not inspect.iscoroutinefunction(fn):
            self.call(fn)
        call_async = self.call_async

        @functools.wraps(fn)
        async def awrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await call_async(fn, *args, **kwargs)

        return awrapper

    async def __aenter__(self) -> Timeout:
        """Cancel the block after ``seconds`` (then CallTimeout is raised)."""
        cm = asyncio.timeout(self.seconds)
        await cm.__aenter__()
        task = asyncio.current_task()
        self._cms.append((task, cm))
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        task = asyncio.current_task()
        for i in range(len(self._cms) - 1, -1, -1):
            if self._cms[i][0] is task:
                _, cm = self._cms.pop(i)
                break
        else:  # pragma: no cover - misuse
            return False
        try:
            await cm.__aexit__(et, exc, tb)
        except TimeoutError as e:
            raise CallTimeout(self.seconds) from e
        return False


# == bulkhead ===========================================================================


class Bulkhead:
    """At most ``max_concurrent`` calls in flight; others wait up to ``max_wait``.

    Works for threads and asyncio tasks alike (one shared count). A call that
    finds no free slot within ``max_wait`` seconds (0: do not wait) raises
    :class:`~stanchion.errors.BulkheadFull`. Use ``call``, ``call_async``,
    ``@bulkhead``, ``with bulkhead:`` or ``async with bulkhead:``. Exports
    ``stanchion_bulkhead_in_flight`` and ``stanchion_bulkhead_rejected_total``
    to ``registry`` (a private one by default).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        max_concurrent: int,
        max_wait: float = 0.0,
        *,
        name: str = "bulkhead",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not isinstance(max_concurrent, int) or max_concurrent < 1:
            raise ConfigError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self.max_wait = _positive("max_wait", max_wait, allow_zero=True)
        self.name = name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._in_flight = 0
        self._sync_waiting = 0
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            collections.deque()
        )
        self.rejected = 0
        m = _metrics(registry)
        self.registry = m.registry
        self._m_rejected = m.counter(
            "bulkhead_rejected", "Calls rejected: no free slot within max_wait", ["name"]
        ).labels(name)
        m.gauge("bulkhead_in_flight", "Calls holding a slot", ["name"]).labels(name).set_function(
            _live(self, "_in_flight")
        )

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._in_flight

    @property
    def available(self) -> int:
        """Free slots now."""
        return self.max_concurrent - self._in_flight

    def _full(self) -> BulkheadFull:
        self.rejected += 1
        self._m_rejected.inc()
        return BulkheadFull(self.name, self.max_concurrent)

    def acquire(self) -> None:
        """Take a slot (blocking up to ``max_wait``) or raise BulkheadFull."""
        with self._cond:
            if self._in_flight < self.max_concurrent:
                self._in_flight += 1
                return
            if self.max_wait <= 0:
                raise self._full()
            ends = time.monotonic() + self.max_wait
            self._sync_waiting += 1
            try:
                while self._in_flight >= self.max_concurrent:
                    left = ends - time.monotonic()
                    if left <= 0:
                        raise self._full()
                    self._cond.wait(left)
                self._in_flight += 1
            finally:
                self._sync_waiting -= 1

    async def acquire_async(self) -> None:
        """Take a slot (waiting up to ``max_wait``) or raise BulkheadFull."""
        with self._lock:
            if self._in_flight < self.max_concurrent and not self._waiters:
                self._in_flight += 1
                return
            if self.max_wait <= 0:
                raise self._full()
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            async with asyncio.timeout(self.max_wait):
                await fut
        except BaseException as exc:
            with self._lock:
                try:
                    self._waiters.remove((loop, fut))
                except ValueError:
                    pass
            if fut.done() and not fut.cancelled():
                self.release()  # granted just as we gave up: pass the slot on
            elif not fut.done():
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise self._full() from None
            raise

    def release(self) -> None:
        """Give a slot back (hands it to the oldest async waiter, or wakes a thread)."""
        with self._lock:
            while self._waiters:
                loop, fut = self._waiters.popleft()
                if fut.done():
                    continue
                try:
                    loop.call_soon_threadsafe(self._grant, fut)
                except RuntimeError:  # loop closed
                    continue
                return  # the slot passes to that waiter: in_flight unchanged
            self._in_flight -= 1
            if self._sync_waiting:
                self._cond.notify()

    def _grant(self, fut: asyncio.Future[None]) -> None:
        if fut.done():
            self.release()
        else:
            fut.set_result(None)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` holding a slot."""
        self.acquire()
        try:
            return fn(*args, **kwargs)
        finally:
            self.release()

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn`` holding a slot."""
        await self.acquire_async()
        try:
            return await fn(*args, **kwargs)
        finally:
            self.release()

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; the signature is kept."""
        return _decorate(fn, self.call, self.call_async)

    def __enter__(self) -> Bulkhead:
        """Hold a slot for the block (or raise BulkheadFull)."""
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.release()
        return False

    async def __aenter__(self) -> Bulkhead:
        """Hold a slot for the block (or raise BulkheadFull)."""
        await self.acquire_async()
        return self

    async def __aexit__(self, *exc: object) -> Literal[False]:
        self.release()
        return False


# == rate limiter ========================================================================


class RateLimiter:
    """A token bucket: ``rate`` calls per second on average, bursts of ``burst``.

    A call takes a token; with none left it waits for the next one if that is
    within ``max_wait`` seconds (0: do not wait), else raises
    :class:`~stanchion.errors.RateLimited` with ``retry_after``. Exports
    ``stanchion_ratelimiter_tokens`` and ``stanchion_ratelimiter_rejected_total``
    to ``registry`` (a private one by default).

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        max_wait: float = 0.0,
        name: str = "ratelimiter",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
        async_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.rate = _positive("rate", rate)
        if burst is None:
            burst = max(1, int(rate))
        if not isinstance(burst, int) or burst < 1:
            raise ConfigError(f"burst must be an int >= 1, got {burst!r}")
        self.burst = burst
        self.max_wait = _positive("max_wait", max_wait, allow_zero=True)
        self.name = name
        self._clock = clock
        self._sleep = sleep
        self._async_sleep = async_sleep
        self._lock = threading.Lock()
        self._bucket = TokenBucket(self.rate, burst, clock())
        self.rejected = 0
        m = _metrics(registry)
        self.registry = m.registry
        self._m_rejected = m.counter(
            "ratelimiter_rejected", "Calls rejected: no token within max_wait", ["name"]
        ).labels(name)
        m.gauge("ratelimiter_tokens", "Tokens in the bucket", ["name"]).labels(name).set_function(
            _live(self, "available")
        )

    @property
    def available(self) -> float:
        """Tokens in the bucket now."""
        with self._lock:
            return self._bucket.available(self._clock())

    def _reserve(self) -> float:
        with self._lock:
            now = self._clock()
            wait = self._bucket.reserve(now, self.max_wait)
            if wait is None:
                self.rejected += 1
                self._m_rejected.inc()
                raise RateLimited(self.name, self._bucket.retry_after(now))
            return wait

    def acquire(self) -> None:
        """Take a token, sleeping up to ``max_wait``, or raise RateLimited."""
        wait = self._reserve()
        if wait > 0:
            self._sleep(wait)

    async def acquire_async(self) -> None:
        """Take a token, sleeping up to ``max_wait``, or raise RateLimited."""
        wait = self._reserve()
        if wait > 0:
            await self._async_sleep(wait)

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Take a token, then call ``fn``."""
        self.acquire()
        return fn(*args, **kwargs)

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Take a token, then await ``fn``."""
        await self.acquire_async()
        return await fn(*args, **kwargs)

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; the signature is kept."""
        return _decorate(fn, self.call, self.call_async)


# == composition ===========================================================================


Component = Retry | CircuitBreaker | Timeout | Bulkhead | RateLimiter


class Policy:
    """Several policies applied in one fixed, documented order.

    Outermost first (the order of Microsoft's standard resilience pipeline):

        RateLimiter -> Bulkhead -> Retry -> CircuitBreaker -> Timeout -> your call

    * the rate limiter and bulkhead admit the *operation* once, retries included;
    * the retry wraps the breaker, so every attempt is seen (and counted) by
      the breaker, and an open breaker fails the operation fast (a
      ``CircuitOpenError`` is not retried unless the Retry names it);
    * the timeout is per attempt, inside the breaker, so a timed-out attempt
      counts as a breaker failure (``CallTimeout``); the Retry's ``deadline``
      bounds the whole operation.

    Components may be passed positionally in any order (each kind at most
    once) or by keyword. A Policy is itself usable like its parts:
    ``policy.call``, ``await policy.call_async`` and ``@policy``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        *components: Component | None,
        retry: Retry | None = None,
        breaker: CircuitBreaker | None = None,
        timeout: Timeout | None = None,
        bulkhead: Bulkhead | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        slots: dict[str, Any] = {
            "retry": retry,
            "breaker": breaker,
            "timeout": timeout,
            "bulkhead": bulkhead,
            "rate_limiter": rate_limiter,
        }
        kinds = {
            Retry: "retry",
            CircuitBreaker: "breaker",
            Timeout: "timeout",
            Bulkhead: "bulkhead",
            RateLimiter: "rate_limiter",
        }
        for c in components:
            if c is None:
                continue
            kind = next((k for t, k in kinds.items() if isinstance(c, t)), None)
            if kind is None:
                raise ConfigError(
                    f"Policy takes Retry, CircuitBreaker, Timeout, Bulkhead, RateLimiter; got {c!r}"
                )
            if slots[kind] is not None:
                raise ConfigError(f"Policy got two {kind} components")
            slots[kind] = c
        self.retry: Retry | None = slots["retry"]
        self.breaker: CircuitBreaker | None = slots["breaker"]
        self.timeout: Timeout | None = slots["timeout"]
        self.bulkhead: Bulkhead | None = slots["bulkhead"]
        self.rate_limiter: RateLimiter | None = slots["rate_limiter"]

    def __repr__(self) -> str:
        parts = [
            type(c).__name__
            for c in (self.rate_limiter, self.bulkhead, self.retry, self.breaker, self.timeout)
            if c is not None
        ]
        return f"<Policy {' -> '.join(parts) or 'empty'}>"

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn`` through every component (a Timeout needs :meth:`call_async`)."""
        if self.timeout is not None:
            self.timeout.call(fn)
        f: Callable[[], T] = functools.partial(fn, *args, **kwargs)
        if self.breaker is not None:
            f = functools.partial(self.breaker.call, f)
        if self.retry is not None:
            f = functools.partial(self.retry.call, f)
        if self.bulkhead is not None:
            f = functools.partial(self.bulkhead.call, f)
        if self.rate_limiter is not None:
            f = functools.partial(self.rate_limiter.call, f)
        return f()

    async def call_async(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``fn`` through every component."""
        f: Callable[[], Awaitable[T]] = functools.partial(fn, *args, **kwargs)
        if self.timeout is not None:
            f = functools.partial(self.timeout.call_async, f)
        if self.breaker is not None:
            f = functools.partial(self.breaker.call_async, f)
        if self.retry is not None:
            f = functools.partial(self.retry.call_async, f)
        if self.bulkhead is not None:
            f = functools.partial(self.bulkhead.call_async, f)
        if self.rate_limiter is not None:
            f = functools.partial(self.rate_limiter.call_async, f)
        return await f()

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    @overload
    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        """Decorate a sync or async function; the signature is kept.

        The layers are composed once, here (each component's own decorator,
        innermost first), so a decorated call pays no per-call assembly.
        """
        f: Callable[..., Any] = fn
        for layer in (self.timeout, self.breaker, self.retry, self.bulkhead, self.rate_limiter):
            if layer is not None:
                f = layer(f)
        if f is fn:
            return _decorate(fn, self.call, self.call_async)
        return f


def wrap(*components: Component | None) -> Policy:
    """Compose components into a :class:`Policy` (same as ``Policy(*components)``).

    .. versionadded:: 0.1
    """
    return Policy(*components)
