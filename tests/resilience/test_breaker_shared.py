"""Breaker state shared through a store: memory, Redis across OS processes, fallback."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import generate_latest

from stanchion.errors import CircuitOpenError, ConfigError
from stanchion.resilience import CircuitBreaker, State


def boom() -> None:
    raise ConnectionError("down")


def fail(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        with pytest.raises(ConnectionError):
            b.call(boom)


def eventually(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def make(url: str, name: str = "shared", **kw: object) -> CircuitBreaker:
    opts: dict[str, object] = dict(
        window_size=5, minimum_calls=5, wait_duration_open=30.0, half_open_calls=2
    )
    opts.update(kw)
    b = CircuitBreaker(name, store=url, sync_interval=0.02, **opts)  # type: ignore[arg-type]
    assert b.wait_synced(5)
    return b


def test_memory_store_shares_one_window(memory_url: str) -> None:
    a, b = make(memory_url), make(memory_url)
    try:
        fail(a, 3)
        fail(b, 2)  # neither alone reached minimum_calls, together they did
        assert eventually(lambda: a.state is State.OPEN and b.state is State.OPEN)
        with pytest.raises(CircuitOpenError):
            b.call(lambda: None)
        assert a.metrics.failed_calls == 5
        b.reset()  # manual transitions are shared too
        assert eventually(lambda: a.state is State.CLOSED)
        a.force_open()
        assert eventually(lambda: b.state is State.FORCED_OPEN)
    finally:
        a.close()
        b.close()


def test_unknown_store_scheme_is_config_error() -> None:
    with pytest.raises(ConfigError):
        CircuitBreaker("x", store="nosuch://host")


CHILD = textwrap.dedent(
    """
    import sys, time
    from stanchion.resilience import CircuitBreaker
    url, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = CircuitBreaker(name, store=url, sync_interval=0.02, window_size=5,
                       minimum_calls=5, wait_duration_open=30.0)
    assert b.wait_synced(5), "no sync"
    for _ in range(n):
        try:
            b.call(lambda: 1 / 0)
        except ZeroDivisionError:
            pass
    ends = time.monotonic() + 5
    while b._shared._pending and time.monotonic() < ends:
        time.sleep(0.01)
    time.sleep(0.1)
    print(b.state.value, flush=True)
    b.close()
    """
)


def run_child(url: str, name: str, failures: int) -> str:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, url, name, str(failures)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def test_two_processes_share_breaker_in_redis(redis_url: str, namespace: str) -> None:
    name = f"pay-{namespace}"
    b = make(redis_url, name)
    try:
        fail(b, 2)  # below minimum_calls here
        assert eventually(lambda: not b._shared or not b._shared._pending)
        time.sleep(0.1)
        assert b.state is State.CLOSED
        # another OS process adds 3 failures to the same shared window: it opens
        assert run_child(redis_url, name, 3) == "open"
        assert eventually(lambda: b.state is State.OPEN, 5)
        with pytest.raises(CircuitOpenError) as ei:
            b.call(lambda: "never")
        assert 25 < ei.value.retry_after <= 30
        assert b.metrics.failed_calls == 5
    finally:
        b.close()


def test_failures_in_one_process_open_it_for_the_other(redis_url: str, namespace: str) -> None:
    name = f"db-{namespace}"
    b = make(redis_url, name)
    try:
        assert run_child(redis_url, name, 5) == "open"
        assert eventually(lambda: b.state is State.OPEN, 5)
    finally:
        b.close()


@pytest.mark.slow
def test_store_down_falls_back_locally_then_rejoins(
    servers: object, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stanchion.resilience")
    srv = servers.redis()  # type: ignore[attr-defined]
    url = f"{srv.url}?prefix={namespace}:&timeout=0.2"
    b = make(url, "fb", wait_duration_open=0.5, half_open_calls=1)
    try:
        assert not b.store_fallback
        srv.kill()
        # calls never wait for the store: each stays fast while Redis is gone
        worst = 0.0
        for _ in range(200):
            t0 = time.perf_counter()
            b.call(lambda: None)
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.002)
        assert worst < 0.2, worst
        assert eventually(lambda: b.store_fallback, 5)
        assert "breaker.store_unavailable" in caplog.text
        text = generate_latest(b.registry).decode()
        assert 'stanchion_breaker_store_fallback{name="fb"} 1.0' in text
        # local decisions while the store is away
        fail(b, 3)  # window of 5: 2 successes + 3 failures
        assert b.state is State.OPEN
        with pytest.raises(CircuitOpenError):
            b.call(lambda: None)
        srv.start()
        assert eventually(lambda: not b.store_fallback, 10)
        assert "breaker.store_rejoined" in caplog.text
        text = generate_latest(b.registry).decode()
        assert 'stanchion_breaker_store_fallback{name="fb"} 0.0' in text
    finally:
        b.close()


@pytest.mark.slow
def test_stalled_store_never_blocks_calls(servers: object, namespace: str) -> None:
    """A SIGSTOPped Redis (accepts connections, never answers) costs calls nothing."""
    srv = servers.redis()  # type: ignore[attr-defined]
    url = f"{srv.url}?prefix={namespace}:&timeout=1.0"
    b = make(url, "stall")
    try:
        srv.pause()
        worst = 0.0
        ends = time.monotonic() + 1.5  # longer than the store's 1 s timeout
        while time.monotonic() < ends:
            t0 = time.perf_counter()
            b.call(lambda: None)
            with pytest.raises(ConnectionError):
                b.call(boom)
            b.call(lambda: None)
            worst = max(worst, time.perf_counter() - t0)
            time.sleep(0.005)
        assert worst < 0.5, worst  # a call waiting on the store would take >= 1 s
        assert eventually(lambda: b.store_fallback, 5)
        srv.resume()
        assert eventually(lambda: not b.store_fallback, 10)
    finally:
        b.close()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_half_open_exactly_n_across_replicas(backend: str, request: pytest.FixtureRequest) -> None:
    """Trial slots are lent by the shared machine: N trials in all, not N per replica."""
    url = request.getfixturevalue(f"{backend}_url")
    a = make(url, "trials", wait_duration_open=0.3, half_open_calls=3)
    b = make(url, "trials", wait_duration_open=0.3, half_open_calls=3)
    gate = threading.Event()
    admitted = 0
    lock = threading.Lock()

    def trial() -> str:
        nonlocal admitted
        with lock:
            admitted += 1
        gate.wait(10)
        return "ok"

    def caller(replica: CircuitBreaker) -> None:
        ends = time.monotonic() + 1.5
        while time.monotonic() < ends:
            try:
                replica.call(trial)
                return
            except CircuitOpenError:
                time.sleep(0.01)

    try:
        fail(a, 5)
        assert eventually(lambda: b.state is State.OPEN)
        assert eventually(lambda: a.state is State.HALF_OPEN and b.state is State.HALF_OPEN)
        threads = [threading.Thread(target=caller, args=(r,)) for r in (a, b) * 10]
        for t in threads:
            t.start()
        time.sleep(1.6)
        assert admitted == 3
        gate.set()
        for t in threads:
            t.join(10)
        assert eventually(lambda: a.state is State.CLOSED and b.state is State.CLOSED)
    finally:
        gate.set()
        a.close()
        b.close()
