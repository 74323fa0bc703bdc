"""RetryPlan, back-offs, budget and token bucket: the pure cores."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stanchion.resilience._core import (
    BudgetWindow,
    Exponential,
    Fixed,
    GiveUp,
    RetryAfter,
    RetryPlan,
    TokenBucket,
)


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(1, 12),
    base=st.floats(0.001, 1.0),
    factor=st.floats(1.0, 50.0),
    jitter=st.sampled_from(["full", "equal", "none"]),
    deadline=st.one_of(st.none(), st.floats(0.01, 5.0)),
    durations=st.lists(st.floats(0.0, 0.5), min_size=12, max_size=12),
    rands=st.lists(st.floats(0.0, 0.999), min_size=12, max_size=12),
)
def test_plan_never_sleeps_past_deadline_and_bounds_delays(
    attempts: int,
    base: float,
    factor: float,
    jitter: str,
    deadline: float | None,
    durations: list[float],
    rands: list[float],
) -> None:
    backoff = Exponential(base, base * factor, jitter=jitter)  # type: ignore[arg-type]
    plan = RetryPlan(attempts, backoff, deadline, 100.0)
    now = 100.0
    made = 0
    while True:
        made += 1
        now += durations[made - 1]
        d = plan.next(made, now, rands[made - 1])
        if isinstance(d, GiveUp):
            assert d.reason in ("attempts", "deadline")
            assert made <= attempts
            if d.reason == "attempts":
                assert made == attempts
            break
        assert isinstance(d, RetryAfter) and d.attempt == made + 1
        cap = min(base * factor, base * 2 ** (made - 1))
        assert 0.0 <= d.delay <= cap + 1e-12
        if jitter == "none":
            assert d.delay == pytest.approx(cap)
        if deadline is not None:
            assert now + d.delay < 100.0 + deadline  # the sleep ends before the deadline
            rem = plan.remaining(now + d.delay)
            assert rem is not None and rem > 0
        now += d.delay
    assert made <= attempts


def test_fixed_and_validation() -> None:
    assert Fixed(0.25).compute(7, 0.9) == 0.25
    plan = RetryPlan(3, Fixed(1.0), None, 0.0)
    assert plan.next(1, 0.0, 0.0) == RetryAfter(1.0, 2)
    assert plan.next(3, 0.0, 0.0) == GiveUp("attempts")
    assert plan.remaining(5.0) is None


def test_budget_window_slides() -> None:
    b = BudgetWindow(0.5, 0.0, 3)
    for _ in range(4):
        b.deposit(0.0)
    assert b.balance(0.0) == 2.0
    assert b.withdraw(0.5) and b.withdraw(1.0) and not b.withdraw(1.0)
    assert b.balance(2.9) == 0.0
    assert b.balance(3.0) == pytest.approx(0.0 + 0 - 1)  # deposits of second 0 expired
    assert b.balance(10.0) == 0.0


def test_token_bucket_reservations_are_ordered() -> None:
    tb = TokenBucket(2.0, 2, 0.0)
    assert tb.reserve(0.0, 0.0) == 0.0
    assert tb.reserve(0.0, 0.0) == 0.0
    assert tb.reserve(0.0, 0.0) is None
    assert tb.reserve(0.0, 1.0) == pytest.approx(0.5)
    assert tb.reserve(0.0, 1.0) == pytest.approx(1.0)
    assert tb.reserve(0.0, 1.0) is None  # would need 1.5 s
    assert tb.retry_after(0.0) == pytest.approx(1.5)
    assert tb.available(100.0) == 2.0
