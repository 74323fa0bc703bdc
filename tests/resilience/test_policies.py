"""Retry, Timeout, Bulkhead, RateLimiter and Policy."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from stanchion.clock import ManualClock
from stanchion.errors import (
    BulkheadFull,
    CallTimeout,
    CircuitOpenError,
    ConfigError,
    RateLimited,
    RetryExhausted,
)
from stanchion.resilience import (
    Bulkhead,
    CircuitBreaker,
    Exponential,
    Fixed,
    Policy,
    RateLimiter,
    Retry,
    RetryBudget,
    State,
    Timeout,
    wrap,
)


class Flaky:
    def __init__(self, failures: int, exc: type[BaseException] = ConnectionError) -> None:
        self.failures = failures
        self.calls = 0
        self.exc = exc

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"fail {self.calls}")
        return "ok"


# -- retry ---------------------------------------------------------------------


def test_retry_until_success() -> None:
    f = Flaky(2)
    assert Retry(3, backoff=Fixed(0)).call(f) == "ok"
    assert f.calls == 3


def test_retry_exhausted_carries_last_exception() -> None:
    f = Flaky(10)
    with pytest.raises(RetryExhausted) as ei:
        Retry(4, backoff=Fixed(0)).call(f)
    assert ei.value.attempts == 4 and f.calls == 4
    assert isinstance(ei.value.last_exception, ConnectionError)
    assert ei.value.__cause__ is ei.value.last_exception


def test_non_retryable_propagates_at_once() -> None:
    f = Flaky(10, KeyError)
    with pytest.raises(KeyError):
        Retry(5, backoff=Fixed(0), retry_on=(ConnectionError,)).call(f)
    assert f.calls == 1


def test_retry_on_predicate_and_result() -> None:
    f = Flaky(2)
    r = Retry(3, backoff=Fixed(0), retry_on=lambda e: "fail" in str(e))
    assert r.call(f) == "ok"
    values = iter([503, 503, 200])
    r2 = Retry(3, backoff=Fixed(0), retry_on_result=lambda v: v >= 500)
    assert r2.call(lambda: next(values)) == 200
    with pytest.raises(RetryExhausted) as ei:
        r2.call(lambda: 503)
    assert ei.value.last_result == 503 and ei.value.last_exception is None


def test_exponential_full_jitter_delays() -> None:
    clock = ManualClock()
    slept: list[float] = []
    r = Retry(
        6,
        backoff=Exponential(base=0.1, max=0.5),
        rng=lambda: 0.5,
        sleep=lambda s: slept.append(s),
        clock=clock,
    )
    with pytest.raises(RetryExhausted):
        r.call(Flaky(10))
    assert slept == pytest.approx([0.05, 0.1, 0.2, 0.25, 0.25])
    e = Exponential(0.1, 1.0, jitter="none")
    assert [e.compute(n, 0.0) for n in (1, 2, 3, 4, 5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    full = Exponential(0.1, 1.0)
    assert full.compute(3, 0.0) == 0.0 and full.compute(3, 0.999) < 0.4


def test_deadline_caps_last_sleep_manual_clock() -> None:
    clock = ManualClock()
    f = Flaky(100)

    def attempt() -> str:
        clock.advance(0.05)
        return f()

    r = Retry(100, backoff=Fixed(0.2), deadline=0.5, clock=clock, sleep=clock.advance)
    with pytest.raises(RetryExhausted) as ei:
        r.call(attempt)
    # attempts at 0, 0.25 (0.05 + 0.2), then 0.30 + 0.2 = 0.50 would reach the deadline
    assert f.calls == 2
    assert clock() <= 0.5
    assert ei.value.reason == "deadline"


async def test_async_deadline_is_not_overshot() -> None:
    async def slow_fail() -> None:
        await asyncio.sleep(0.3)
        raise ConnectionError("down")

    r = Retry(10, backoff=Exponential(0.05, 0.2), deadline=0.5)
    t0 = time.monotonic()
    with pytest.raises(RetryExhausted) as ei:
        await r.call_async(slow_fail)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.65, elapsed  # tenacity/stamina overshoot to ~0.75 s
    assert isinstance(ei.value.last_exception, CallTimeout | ConnectionError)


def test_retry_budget_stops_storm() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0, clock=clock)
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError

    retries = [Retry(3, backoff=Fixed(0), budget=budget, clock=clock) for _ in range(2)]
    reasons = []
    for i in range(10):
        with pytest.raises(RetryExhausted) as ei:
            retries[i % 2].call(down)
        reasons.append(ei.value.reason)
    assert set(reasons) == {"budget"}
    # 10 requests, 20 % of them may be retried
    assert calls == 12
    clock.advance(11)  # the window forgets
    assert budget.balance == 0.0


def test_retry_budget_reserve() -> None:
    clock = ManualClock()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=1, ttl=10, clock=clock)
    assert budget.balance == 10
    assert all(budget.try_withdraw() for _ in range(10))
    assert not budget.try_withdraw()


def test_circuit_open_not_retried_by_default() -> None:
    b = CircuitBreaker("x")
    b.force_open()
    f = Flaky(0)
    with pytest.raises(CircuitOpenError):
        Retry(5, backoff=Fixed(0)).call(b.call, f)
    assert Retry(2, backoff=Fixed(0), retry_on=(CircuitOpenError,))._retryable(
        CircuitOpenError("x", 1.0)
    )


async def test_retry_decorator_async_and_cancel_not_retried() -> None:
    calls = 0

    @Retry(3, backoff=Fixed(0))
    async def hang() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)

    task = asyncio.create_task(hang())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1

    f = Flaky(1)

    @Retry(2, backoff=Fixed(0))
    async def once() -> str:
        return f()

    assert await once() == "ok"


def test_retry_bad_options() -> None:
    with pytest.raises(ConfigError):
        Retry(0)
    with pytest.raises(ConfigError):
        Retry(3, deadline=-1)
    with pytest.raises(ConfigError):
        Exponential(base=0)
    with pytest.raises(ConfigError):
        Fixed(-1)


# -- timeout ---------------------------------------------------------------------


async def test_timeout_cancels_and_raises_call_timeout() -> None:
    t = Timeout(0.05)
    cancelled = False

    async def slow() -> None:
        nonlocal cancelled
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled = True
            raise

    with pytest.raises(CallTimeout) as ei:
        await t.call_async(slow)
    assert isinstance(ei.value, TimeoutError) and ei.value.timeout == 0.05
    assert cancelled
    assert await t.call_async(asyncio.sleep, 0, "fast") == "fast"

    @t
    async def deco() -> None:
        await asyncio.sleep(5)

    with pytest.raises(CallTimeout):
        await deco()
    with pytest.raises(CallTimeout):
        async with t:
            await asyncio.sleep(5)


async def test_timeout_lets_inner_timeout_error_through() -> None:
    async def inner() -> None:
        raise TimeoutError("inner")

    with pytest.raises(TimeoutError) as ei:
        await Timeout(5).call_async(inner)
    assert not isinstance(ei.value, CallTimeout)


def test_timeout_sync_call_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        Timeout(1).call(lambda: None)


# -- bulkhead ---------------------------------------------------------------------


def test_bulkhead_threads() -> None:
    bh = Bulkhead(2)
    gate = threading.Event()
    entered = threading.Semaphore(0)

    def hold() -> None:
        entered.release()
        gate.wait(5)

    threads = [threading.Thread(target=bh.call, args=(hold,)) for _ in range(2)]
    for t in threads:
        t.start()
    entered.acquire(timeout=5)
    entered.acquire(timeout=5)
    assert bh.in_flight == 2
    with pytest.raises(BulkheadFull) as ei:
        bh.call(lambda: None)
    assert ei.value.max_concurrent == 2
    gate.set()
    for t in threads:
        t.join(5)
    assert bh.in_flight == 0
    assert bh.call(lambda: 7) == 7


def test_bulkhead_sync_waits_up_to_max_wait() -> None:
    bh = Bulkhead(1, max_wait=2.0)
    bh.acquire()
    threading.Timer(0.05, bh.release).start()
    t0 = time.monotonic()
    with bh:
        pass
    assert time.monotonic() - t0 < 1.0
    bh2 = Bulkhead(1, max_wait=0.05)
    bh2.acquire()
    with pytest.raises(BulkheadFull):
        bh2.acquire()


async def test_bulkhead_async_limits_concurrency() -> None:
    bh = Bulkhead(3, max_wait=5)
    now = peak = 0

    async def work(i: int) -> int:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        await asyncio.sleep(0.01)
        now -= 1
        return i

    results = await asyncio.gather(*(bh.call_async(work, i) for i in range(20)))
    assert results == list(range(20))
    assert peak == 3 and bh.in_flight == 0


async def test_bulkhead_async_full_and_cancelled_waiter_frees_nothing() -> None:
    bh = Bulkhead(1, max_wait=0.05)
    await bh.acquire_async()
    with pytest.raises(BulkheadFull):
        await bh.acquire_async()
    bh3 = Bulkhead(1, max_wait=10)
    await bh3.acquire_async()
    waiter = asyncio.create_task(bh3.acquire_async())
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    bh3.release()
    assert bh3.in_flight == 0
    async with bh3:
        assert bh3.in_flight == 1


# -- rate limiter ------------------------------------------------------------------


def test_rate_limiter_token_bucket() -> None:
    clock = ManualClock()
    rl = RateLimiter(10, 2, clock=clock)
    assert rl.call(lambda: 1) == 1
    assert rl.call(lambda: 2) == 2
    with pytest.raises(RateLimited) as ei:
        rl.call(lambda: 3)
    assert ei.value.retry_after == pytest.approx(0.1)
    clock.advance(0.1)
    assert rl.call(lambda: 4) == 4
    clock.advance(10)
    assert rl.available == 2.0  # capped at burst


def test_rate_limiter_waits_within_max_wait() -> None:
    clock = ManualClock()
    slept: list[float] = []
    rl = RateLimiter(
        4, 1, max_wait=0.3, clock=clock, sleep=lambda s: (slept.append(s), clock.advance(s))
    )
    for _ in range(3):
        rl.acquire()
    assert slept == pytest.approx([0.25, 0.25])


async def test_rate_limiter_async_rate() -> None:
    rl = RateLimiter(50, 1, max_wait=1.0)
    t0 = time.monotonic()
    for _ in range(6):
        await rl.acquire_async()
    assert time.monotonic() - t0 >= 0.09  # 5 waits of 20 ms


# -- policy -------------------------------------------------------------------------


def test_policy_order_breaker_sees_every_attempt() -> None:
    clock = ManualClock()
    b = CircuitBreaker("p", clock=clock, minimum_calls=4, window_size=4)
    f = Flaky(100)
    p = Policy(Retry(4, backoff=Fixed(0)), b)
    with pytest.raises(RetryExhausted):
        p.call(f)
    assert f.calls == 4 and b.state is State.OPEN
    with pytest.raises(CircuitOpenError):  # fails fast, not retried
        p.call(f)
    assert f.calls == 4


async def test_policy_async_all_components_and_decorator() -> None:
    b = CircuitBreaker("q", minimum_calls=2, window_size=2)
    p = wrap(
        Timeout(0.05),
        Retry(2, backoff=Fixed(0)),
        b,
        Bulkhead(2, max_wait=1),
        RateLimiter(1000, 10),
    )
    assert repr(p) == "<Policy RateLimiter -> Bulkhead -> Retry -> CircuitBreaker -> Timeout>"

    @p
    async def slow() -> None:
        await asyncio.sleep(1)

    with pytest.raises(RetryExhausted) as ei:
        await slow()
    assert isinstance(ei.value.last_exception, CallTimeout)
    assert b.metrics.failed_calls == 2 and b.state is State.OPEN

    @Policy(retry=Retry(2, backoff=Fixed(0)))
    def sync_ok(x: int) -> int:
        return x * 2

    assert sync_ok(21) == 42


def test_policy_rejects_duplicates_and_sync_timeout() -> None:
    with pytest.raises(ConfigError):
        Policy(Retry(2), Retry(3))
    with pytest.raises(ConfigError):
        Policy(Timeout(1)).call(lambda: None)


def test_policy_components_export_prometheus_figures() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    r = Retry(3, backoff=Fixed(0), name="fetch", registry=reg)
    with pytest.raises(RetryExhausted):
        r.call(Flaky(10))
    bh = Bulkhead(1, name="db", registry=reg)
    bh2 = Bulkhead(2, name="cache", registry=reg)  # same registry, another name
    bh.acquire()
    with pytest.raises(BulkheadFull):
        bh.acquire()
    clock = ManualClock()
    rl = RateLimiter(1, 1, name="api", clock=clock, registry=reg)
    rl.acquire()
    with pytest.raises(RateLimited):
        rl.acquire()
    text = generate_latest(reg).decode()
    assert 'stanchion_retry_retries_total{name="fetch"} 2.0' in text
    assert 'stanchion_retry_exhausted_total{name="fetch",reason="attempts"} 1.0' in text
    assert 'stanchion_bulkhead_in_flight{name="db"} 1.0' in text
    assert 'stanchion_bulkhead_in_flight{name="cache"} 0.0' in text
    assert 'stanchion_bulkhead_rejected_total{name="db"} 1.0' in text
    assert 'stanchion_ratelimiter_rejected_total{name="api"} 1.0' in text
    assert 'stanchion_ratelimiter_tokens{name="api"} 0.0' in text
    assert bh2.available == 2
