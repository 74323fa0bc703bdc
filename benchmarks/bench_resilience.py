"""Per-call overhead of circuit breakers and retry wrappers, side by side.

Measures, in one process and interleaved rounds (so every library sees the
same machine conditions):

* the success path in the closed state, sync and async;
* the cost of a rejection in the open state (call + raise + catch);
* how long a retry with a 0.5 s deadline takes to give up when every attempt
  fails after 0.3 s (stanchion, tenacity, stamina);

for stanchion and the peers pybreaker, circuitbreaker, aiobreaker, purgatory,
tenacity and stamina (retry wrappers with no retry needed). Each figure is
the best of ``--rounds`` rounds of ``--number`` calls, in ns per call, with
the ratio to a bare call.

Run::

    .venv/bin/python benchmarks/bench_resilience.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import platform
import sys
import time
from collections.abc import Awaitable, Callable

import aiobreaker
import circuitbreaker
import purgatory
import pybreaker
import stamina
import tenacity

from stanchion.resilience import CircuitBreaker, Exponential, Policy, Retry

SyncCase = Callable[[], object]
AsyncCase = Callable[[], Awaitable[object]]


def work() -> int:
    return 1


async def awork() -> int:
    return 1


def boom() -> int:
    raise ConnectionError("down")


async def aboom() -> int:
    raise ConnectionError("down")


# -- the contenders ---------------------------------------------------------------


def sync_success_cases() -> dict[str, SyncCase]:
    st = CircuitBreaker("bench")
    st_call = CircuitBreaker("bench-call")
    pb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)
    pg = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    stamina.instrumentation.set_on_retry_hooks([])  # no logging/metrics hooks
    return {
        "bare call": work,
        "stanchion @breaker": st(work),
        "stanchion breaker.call": lambda: st_call.call(work),
        "stanchion Retry (no retry)": Retry(3)(work),
        "stanchion Policy(Retry, breaker)": Policy(Retry(3), CircuitBreaker("p"))(work),
        "circuitbreaker": cb(work),
        "pybreaker": pb(work),
        "purgatory": pg("bench")(work),
        "tenacity retry (no retry)": tenacity.retry(stop=tenacity.stop_after_attempt(3))(work),
        "stamina retry (no retry)": stamina.retry(on=ConnectionError, attempts=3)(work),
    }


def async_success_cases() -> dict[str, AsyncCase]:
    st = CircuitBreaker("abench")
    ab = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=datetime.timedelta(seconds=60))
    cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)
    pg = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)

    async def purg() -> int:
        async with await pg.get_breaker("abench"):
            return await awork()

    return {
        "bare await": awork,
        "stanchion @breaker": st(awork),
        "stanchion Retry (no retry)": Retry(3)(awork),
        "stanchion Policy(Retry, breaker)": Policy(Retry(3), CircuitBreaker("ap"))(awork),
        "circuitbreaker": cb(awork),
        "aiobreaker": ab(awork),
        "purgatory": purg,
        "tenacity retry (no retry)": tenacity.retry(stop=tenacity.stop_after_attempt(3))(awork),
        "stamina retry (no retry)": stamina.retry(on=ConnectionError, attempts=3)(awork),
    }


def _catch(fn: Callable[[], object], *errors: type[BaseException]) -> SyncCase:
    def case() -> None:
        try:
            fn()
        except errors:
            pass

    return case


def sync_reject_cases() -> dict[str, SyncCase]:
    st = CircuitBreaker("rej", minimum_calls=1, window_size=1, wait_duration_open=3600)
    f_st = st(work)
    with contextlib.suppress(ConnectionError):
        st.call(boom)
    assert st.state.value == "open"

    cb = circuitbreaker.CircuitBreaker(failure_threshold=1, recovery_timeout=3600)
    f_cb = cb(boom)
    with contextlib.suppress(ConnectionError):
        f_cb()

    pb = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=3600)
    pb.open()
    f_pb = pb(work)

    pg = purgatory.SyncCircuitBreakerFactory(default_threshold=1, default_ttl=3600)
    f_pg = pg("rej")(boom)
    with contextlib.suppress(ConnectionError):
        f_pg()

    def raise_catch() -> None:
        try:
            raise ConnectionError("x")
        except ConnectionError:
            pass

    return {
        "bare raise+catch": raise_catch,
        "stanchion": _catch(f_st, Exception),
        "circuitbreaker": _catch(f_cb, Exception),
        "pybreaker": _catch(f_pb, Exception),
        "purgatory": _catch(f_pg, Exception),
    }


# -- deadlines ---------------------------------------------------------------------


async def slow_fail() -> None:
    await asyncio.sleep(0.3)
    raise ConnectionError("down")


def deadline_cases() -> dict[str, AsyncCase]:
    st = Retry(10, backoff=Exponential(0.05, 0.2), deadline=0.5)
    ten = tenacity.retry(
        stop=tenacity.stop_after_delay(0.5),
        wait=tenacity.wait_random_exponential(multiplier=0.05, max=0.2),
        retry=tenacity.retry_if_exception_type(ConnectionError),
    )(slow_fail)
    sta = stamina.retry(
        on=ConnectionError, attempts=10, timeout=0.5, wait_initial=0.05, wait_max=0.2
    )(slow_fail)
    return {
        "stanchion Retry(deadline=0.5)": lambda: st.call_async(slow_fail),
        "tenacity stop_after_delay(0.5)": ten,
        "stamina timeout=0.5": sta,
    }


def deadline_table(repeat: int) -> str:
    lines = [
        "### Deadline 0.5 s, every attempt fails after 0.3 s (async): time to give up",
        "",
        "| library | best s | worst s |",
        "|---|---:|---:|",
    ]

    async def run() -> None:
        for name, fn in deadline_cases().items():
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                with contextlib.suppress(Exception):
                    await fn()
                times.append(time.perf_counter() - t0)
            lines.append(f"| {name} | {min(times):.3f} | {max(times):.3f} |")

    asyncio.run(run())
    return "\n".join(lines)


# -- timing -------------------------------------------------------------------------


def time_sync(fn: SyncCase, number: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - t0) / number


async def time_async(fn: AsyncCase, number: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(number):
        await fn()
    return (time.perf_counter_ns() - t0) / number


def best_of(
    cases: dict[str, SyncCase], number: int, rounds: int, slow: set[str]
) -> dict[str, float]:
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            n = max(1000, number // 20) if name in slow else number
            gc.collect()
            best[name] = min(best[name], time_sync(fn, n))
    return best


def best_of_async(
    cases: dict[str, AsyncCase], number: int, rounds: int, slow: set[str]
) -> dict[str, float]:
    best = {name: float("inf") for name in cases}

    async def run() -> None:
        for _ in range(rounds):
            for name, fn in cases.items():
                n = max(1000, number // 20) if name in slow else number
                gc.collect()
                best[name] = min(best[name], await time_async(fn, n))

    asyncio.run(run())
    return best


def table(title: str, figures: dict[str, float], base: str) -> str:
    bare = figures[base]
    lines = [
        f"### {title}",
        "",
        "| library | ns/call | overhead ns | ratio to bare |",
        "|---|---:|---:|---:|",
    ]
    for name, ns in sorted(figures.items(), key=lambda kv: kv[1]):
        over = "" if name == base else f"{ns - bare:,.0f}"
        lines.append(f"| {name} | {ns:,.0f} | {over} | {ns / bare:.1f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=20_000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=25, help="rounds; the best is kept")
    args = ap.parse_args()
    slow = {"tenacity retry (no retry)", "stamina retry (no retry)", "purgatory"}
    print(
        f"Python {platform.python_version()} on {platform.machine()}, "
        f"{args.rounds} rounds x {args.number:,} calls (retry wrappers: x{args.number // 20:,})",
        file=sys.stderr,
    )
    out = [
        table(
            "Success path, closed, sync",
            best_of(sync_success_cases(), args.number, args.rounds, slow),
            "bare call",
        ),
        table(
            "Success path, closed, async",
            best_of_async(async_success_cases(), args.number, args.rounds, slow),
            "bare await",
        ),
        table(
            "Rejection, open, sync (call + raise + catch)",
            best_of(sync_reject_cases(), args.number, args.rounds, slow),
            "bare raise+catch",
        ),
        deadline_table(3),
    ]
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
