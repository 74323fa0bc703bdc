"""CircuitBreaker: every transition, deterministic with a ManualClock."""

from __future__ import annotations

import asyncio
import inspect
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stanchion.clock import ManualClock
from stanchion.errors import CircuitOpenError, ConfigError, StanchionError
from stanchion.resilience import CircuitBreaker, State, StateChanged


class Boom(Exception):
    pass


class Benign(Exception):
    pass


def ok() -> str:
    return "ok"


def boom() -> None:
    raise Boom("x")


def fail(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        with pytest.raises(Boom):
            b.call(boom)


def succeed(b: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        assert b.call(ok) == "ok"


def make(clock: ManualClock, **kw: object) -> CircuitBreaker:
    opts: dict[str, object] = dict(
        window_size=10, minimum_calls=10, wait_duration_open=30.0, half_open_calls=3
    )
    opts.update(kw)
    return CircuitBreaker("db", clock=clock, **opts)  # type: ignore[arg-type]


def open_it(b: CircuitBreaker) -> None:
    fail(b, b.config.effective_minimum)
    assert b.state is State.OPEN


def test_minimum_calls_not_reached_keeps_closed() -> None:
    clock = ManualClock()
    b = make(clock)
    fail(b, 9)
    assert b.state is State.CLOSED
    m = b.metrics
    assert m.failure_rate == -1.0 and m.slow_call_rate == -1.0
    assert m.buffered_calls == 9 and m.failed_calls == 9
    fail(b)
    assert b.state is State.OPEN


def test_success_reaching_minimum_decides() -> None:
    clock = ManualClock()
    b = make(clock)
    fail(b, 5)
    succeed(b, 4)
    assert b.state is State.CLOSED
    succeed(b)  # 5/10 failed = 0.5 >= 0.5
    assert b.state is State.OPEN


def test_below_threshold_stays_closed() -> None:
    clock = ManualClock()
    b = make(clock)
    fail(b, 4)
    succeed(b, 6)
    m = b.metrics
    assert b.state is State.CLOSED
    assert m.failure_rate == pytest.approx(0.4)
    assert m.successful_calls == 6


def test_count_window_eviction() -> None:
    clock = ManualClock()
    b = make(clock)
    fail(b, 4)
    succeed(b, 6)  # 4/10
    succeed(b, 4)  # the 4 failures are evicted
    m = b.metrics
    assert m.buffered_calls == 10 and m.failed_calls == 0 and m.failure_rate == 0.0
    fail(b, 4)
    assert b.state is State.CLOSED  # 4/10
    fail(b)
    assert b.state is State.OPEN  # 5/10


def test_many_successes_then_failures_window_bounded() -> None:
    clock = ManualClock()
    b = make(clock)
    succeed(b, 1000)
    assert b.metrics.buffered_calls == 10
    fail(b, 5)
    assert b.state is State.OPEN


def test_time_window_expiry() -> None:
    clock = ManualClock(100.0)
    b = make(clock, window_type="time", window_size=10, minimum_calls=20)
    fail(b, 4)
    clock.advance(5)
    succeed(b, 10)  # 4/14
    assert b.state is State.CLOSED
    assert b.metrics.buffered_calls == 14
    clock.advance(6)  # the 4 failures (t=100) expired, successes (t=105) remain
    m = b.metrics
    assert m.buffered_calls == 10 and m.failed_calls == 0
    clock.advance(10)
    assert b.metrics.buffered_calls == 0
    assert b.metrics.failure_rate == -1.0


def test_time_window_rate_rises_when_successes_expire() -> None:
    clock = ManualClock(0.0)
    b = make(clock, window_type="time", window_size=10, minimum_calls=5)
    succeed(b, 20)
    clock.advance(5)
    fail(b, 10)  # 10/30
    assert b.state is State.CLOSED
    clock.advance(5.5)  # the 20 successes expired: 10 failures / 10
    succeed(b)  # 10/11 >= 0.5
    assert b.state is State.OPEN


def test_slow_calls_open_without_errors() -> None:
    clock = ManualClock()
    b = make(clock, slow_call_duration=1.0, slow_call_rate_threshold=0.5)

    def slow() -> str:
        clock.advance(1.5)
        return "slow"

    for _ in range(5):
        assert b.call(slow) == "slow"
    succeed(b, 4)
    assert b.state is State.CLOSED
    assert b.metrics.slow_calls == 5 and b.metrics.failed_calls == 0
    succeed(b)
    assert b.state is State.OPEN
    assert b.metrics.failure_rate == 0.0 if b.metrics.buffered_calls else True


def test_ignored_exceptions_count_neither_way() -> None:
    clock = ManualClock()
    b = make(clock, ignore=(Benign,))

    def benign() -> None:
        raise Benign

    for _ in range(50):
        with pytest.raises(Benign):
            b.call(benign)
    assert b.metrics.buffered_calls == 0
    assert b.state is State.CLOSED


def test_unrecorded_exceptions_count_as_success() -> None:
    clock = ManualClock()
    b = make(clock, record=(ConnectionError,))
    fail(b, 10)  # Boom is not recorded: successes
    assert b.state is State.CLOSED
    assert b.metrics.failed_calls == 0 and b.metrics.buffered_calls == 10


def test_record_predicate() -> None:
    b = make(ManualClock(), record=lambda e: "x" in str(e))
    fail(b, 10)
    assert b.state is State.OPEN


def test_record_result_counts_values_as_failures() -> None:
    clock = ManualClock()
    b = make(clock, record_result=lambda r: r == 503)
    for _ in range(10):
        assert b.call(lambda: 503) == 503
    assert b.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        b.call(lambda: 200)


def test_open_rejects_with_retry_after_then_half_open() -> None:
    clock = ManualClock()
    b = make(clock)
    open_it(b)
    clock.advance(10)
    ran = []
    with pytest.raises(CircuitOpenError) as ei:
        b.call(lambda: ran.append(1))
    assert not ran
    err = ei.value
    assert isinstance(err, StanchionError)
    assert err.name == "db" and err.retry_after == pytest.approx(20.0)
    assert b.metrics.not_permitted_calls == 1
    clock.advance(20)
    assert b.state is State.HALF_OPEN


def test_half_open_success_closes() -> None:
    clock = ManualClock()
    b = make(clock)
    open_it(b)
    clock.advance(30)
    succeed(b, 2)
    assert b.state is State.HALF_OPEN
    succeed(b)
    assert b.state is State.CLOSED
    assert b.metrics.buffered_calls == 0


def test_half_open_failure_reopens() -> None:
    clock = ManualClock()
    b = make(clock)
    open_it(b)
    clock.advance(30)
    succeed(b)
    fail(b, 2)  # 2/3 >= 0.5
    assert b.state is State.OPEN
    with pytest.raises(CircuitOpenError) as ei:
        b.call(ok)
    assert ei.value.retry_after == pytest.approx(30.0)


def test_half_open_rejects_beyond_n_with_zero_retry_after() -> None:
    clock = ManualClock()
    b = make(clock)
    open_it(b)
    clock.advance(30)
    with b, b, b:
        with pytest.raises(CircuitOpenError) as ei:
            b.call(ok)
        assert ei.value.retry_after == 0.0
    assert b.state is State.CLOSED


def test_half_open_ignored_frees_slot_and_does_not_close() -> None:
    clock = ManualClock()
    b = make(clock, ignore=(Benign,))
    open_it(b)
    clock.advance(30)

    def benign() -> None:
        raise Benign

    for _ in range(10):
        with pytest.raises(Benign):
            b.call(benign)
    assert b.state is State.HALF_OPEN
    fail(b, 3)
    assert b.state is State.OPEN


def test_max_wait_half_open_reopens() -> None:
    clock = ManualClock()
    b = make(clock, max_wait_half_open=5.0)
    open_it(b)
    clock.advance(30)
    assert b.state is State.HALF_OPEN
    clock.advance(5)
    assert b.state is State.OPEN


def test_call_admitted_before_opening_has_no_say() -> None:
    clock = ManualClock()
    b = make(clock)
    with b:  # admitted while closed
        open_it(b)
        clock.advance(30)
        assert b.state is State.HALF_OPEN
    # that success belonged to the closed period: the half-open batch is untouched
    assert b.state is State.HALF_OPEN
    assert b.metrics.buffered_calls == 0


def test_forced_open_and_disabled() -> None:
    clock = ManualClock()
    b = make(clock)
    b.force_open()
    assert b.state is State.FORCED_OPEN
    clock.advance(1000)
    with pytest.raises(CircuitOpenError) as ei:
        b.call(ok)
    assert ei.value.retry_after == float("inf")
    b.disable()
    assert b.state is State.DISABLED
    fail(b, 100)
    assert b.state is State.DISABLED and b.metrics.buffered_calls == 0
    b.reset()
    assert b.state is State.CLOSED
    fail(b, 10)
    assert b.state is State.OPEN
    b.reset()
    assert b.state is State.CLOSED and b.metrics.buffered_calls == 0


def test_listeners_and_events() -> None:
    clock = ManualClock()
    b = make(clock, slow_call_duration=1.0, ignore=(Benign,))
    changes: list[StateChanged] = []
    pairs: list[tuple[State, State]] = []
    kinds: list[str] = []
    b.on_state_change(changes.append)
    b.on_state_change(lambda old, new: pairs.append((old, new)))
    b.on_success(lambda e: kinds.append("success"))
    b.on_error(lambda e: kinds.append("error"))
    b.on_ignored_error(lambda e: kinds.append("ignored"))
    b.on_slow_call(lambda e: kinds.append("slow"))
    b.on_rejected(lambda e: kinds.append("rejected"))

    def slow() -> None:
        clock.advance(2)

    def benign() -> None:
        raise Benign

    b.call(slow)
    with pytest.raises(Benign):
        b.call(benign)
    fail(b, 9)
    with pytest.raises(CircuitOpenError):
        b.call(ok)
    assert kinds == ["success", "slow", "ignored", *["error"] * 9, "rejected"]
    assert [(c.old, c.new) for c in changes] == [(State.CLOSED, State.OPEN)]
    assert pairs == [(State.CLOSED, State.OPEN)]
    assert changes[0].name == "db"
    assert (changes[0].from_state, changes[0].to_state) == (State.CLOSED, State.OPEN)
    seen: list[object] = []
    b.on("rejection", seen.append)
    with pytest.raises(CircuitOpenError):
        b.call(ok)
    assert len(seen) == 1
    with pytest.raises(ConfigError):
        b.on("nonsense", seen.append)


def test_listener_errors_do_not_break_calls() -> None:
    b = make(ManualClock())

    def bad(_: object) -> None:
        raise RuntimeError("listener bug")

    b.on_success(bad)
    succeed(b)


def test_decorator_keeps_signature_sync_and_async() -> None:
    clock = ManualClock()
    b = make(clock)

    @b
    def add(x: int, y: int = 1) -> int:
        """Add."""
        return x + y

    @b
    async def aadd(x: int, y: int = 1) -> int:
        return x + y

    assert add(1, y=2) == 3
    assert add.__doc__ == "Add." and add.__name__ == "add"
    assert str(inspect.signature(add)) == str(inspect.signature(add.__wrapped__))  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(aadd)
    assert asyncio.run(aadd(2)) == 3
    b.force_open()
    with pytest.raises(CircuitOpenError):
        add(1)
    with pytest.raises(CircuitOpenError):
        asyncio.run(aadd(1))


async def test_async_context_manager_and_call_async() -> None:
    clock = ManualClock()
    b = make(clock)

    async def aboom() -> None:
        raise Boom

    for _ in range(5):
        with pytest.raises(Boom):
            async with b:
                raise Boom
    for _ in range(5):
        with pytest.raises(Boom):
            await b.call_async(aboom)
    assert b.state is State.OPEN
    with pytest.raises(CircuitOpenError):
        async with b:
            pass


async def test_half_open_exactly_n_under_100_tasks() -> None:
    clock = ManualClock()
    b = make(clock, half_open_calls=7)
    open_it(b)
    clock.advance(30)
    gate = asyncio.Event()
    admitted = 0

    async def trial() -> str:
        nonlocal admitted
        admitted += 1
        await gate.wait()
        return "ok"

    tasks = [asyncio.create_task(b.call_async(trial)) for _ in range(100)]
    await asyncio.sleep(0.01)
    assert admitted == 7
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(r == "ok" for r in results) == 7
    rejected = [r for r in results if isinstance(r, CircuitOpenError)]
    assert len(rejected) == 93 and all(r.retry_after == 0.0 for r in rejected)
    assert b.state is State.CLOSED


def test_half_open_exactly_n_under_threads() -> None:
    clock = ManualClock()
    b = make(clock, half_open_calls=5)
    open_it(b)
    clock.advance(30)
    gate = threading.Event()
    admitted = 0
    counter_lock = threading.Lock()
    results: list[object] = []
    start = threading.Barrier(50)

    def trial() -> str:
        nonlocal admitted
        with counter_lock:
            admitted += 1
        gate.wait(5)
        return "ok"

    def worker() -> None:
        start.wait(5)
        try:
            results.append(b.call(trial))
        except CircuitOpenError as e:
            results.append(e)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for _ in range(1000):
        if len(results) >= 45 and admitted >= 5:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)
    assert admitted == 5
    gate.set()
    for t in threads:
        t.join(5)
    assert results.count("ok") == 5
    assert sum(isinstance(r, CircuitOpenError) for r in results) == 45
    assert b.state is State.CLOSED


async def test_cancelled_call_frees_half_open_slot() -> None:
    clock = ManualClock()
    b = make(clock, half_open_calls=1)
    open_it(b)
    clock.advance(30)

    async def hang() -> None:
        await asyncio.sleep(3600)

    task = asyncio.create_task(b.call_async(hang))
    await asyncio.sleep(0)
    with pytest.raises(CircuitOpenError):
        await b.call_async(asyncio.sleep, 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state is State.HALF_OPEN  # neither closed nor re-opened
    assert await b.call_async(asyncio.sleep, 0, "fine") == "fine"
    assert b.state is State.CLOSED


async def test_cancelled_call_in_closed_counts_neither_way() -> None:
    b = make(ManualClock())
    task = asyncio.create_task(b.call_async(asyncio.sleep, 3600))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.metrics.buffered_calls == 0


def test_slow_call_never_holds_a_lock() -> None:
    """One slow call must not serialise the others (pybreaker's pitfall)."""
    b = CircuitBreaker("x")
    inside = threading.Event()
    release = threading.Event()

    def slow() -> None:
        inside.set()
        release.wait(5)

    t = threading.Thread(target=b.call, args=(slow,))
    t.start()
    assert inside.wait(5)
    done = threading.Event()
    t2 = threading.Thread(target=lambda: (b.call(ok), done.set()))
    t2.start()
    assert done.wait(2), "a fast call waited for a slow one"
    release.set()
    t.join(5)
    t2.join(5)


def test_prometheus_metrics() -> None:
    reg = CollectorRegistry()
    clock = ManualClock()
    b = CircuitBreaker("pay", clock=clock, minimum_calls=2, window_size=2, registry=reg)
    b2 = CircuitBreaker("ship", clock=clock, registry=reg)
    succeed(b2, 3)
    fail(b, 2)
    with pytest.raises(CircuitOpenError):
        b.call(ok)
    text = generate_latest(reg).decode()
    assert 'stanchion_breaker_state{name="pay",state="open"} 1.0' in text
    assert 'stanchion_breaker_calls_total{name="pay",outcome="failure"} 2.0' in text
    assert 'stanchion_breaker_calls_total{name="ship",outcome="success"} 3.0' in text
    assert 'stanchion_breaker_rejected_calls_total{name="pay"} 1.0' in text
    assert 'stanchion_breaker_failure_rate{name="pay"} 1.0' in text


def test_memory_is_bounded_under_rejections() -> None:
    import tracemalloc

    b = make(ManualClock())
    open_it(b)
    tracemalloc.start()
    for _ in range(2000):
        with pytest.raises(CircuitOpenError):
            b.call(ok)
    first = tracemalloc.get_traced_memory()[0]
    for _ in range(20000):
        try:
            b.call(ok)
        except CircuitOpenError:
            pass
    second = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert second - first < 20_000


@pytest.mark.parametrize(
    "kw",
    [
        {"failure_rate_threshold": 0.0},
        {"failure_rate_threshold": 1.5},
        {"slow_call_rate_threshold": 0},
        {"window_type": "sliding"},
        {"window_size": 0},
        {"minimum_calls": 0},
        {"half_open_calls": 0},
        {"wait_duration_open": -1},
        {"slow_call_duration": 0},
    ],
)
def test_bad_options(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker("x", **kw)  # type: ignore[arg-type]


def test_counts_exact_under_threads() -> None:
    """Batched fast-path successes lose nothing when many threads call at once."""
    reg = CollectorRegistry()
    b = CircuitBreaker("t", window_size=1000, minimum_calls=1000, registry=reg)
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait(5)
        for i in range(5000):
            if i % 100 == 99:
                with pytest.raises(Boom):
                    b.call(boom)
            else:
                b.call(ok)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    m = b.metrics
    assert m.buffered_calls == 1000
    text = generate_latest(reg).decode()
    assert 'stanchion_breaker_calls_total{name="t",outcome="success"} 39600.0' in text
    assert 'stanchion_breaker_calls_total{name="t",outcome="failure"} 400.0' in text
    assert b.state is State.CLOSED


def test_circuit_open_error_pickles_and_reads() -> None:
    import pickle

    e = CircuitOpenError("db", 1.5, "half_open")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.name, e2.retry_after, e2.state) == ("db", 1.5, "half_open")
    assert "db" in str(e2) and "1.500" in str(e2)


def test_importing_resilience_loads_no_driver() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stanchion.resilience;"
        "print([m for m in ('redis', 'aiohttp', 'asyncpg') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
