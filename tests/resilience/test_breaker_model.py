"""Property test: the breaker against a naive reference model of resilience4j's machine."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stanchion.clock import ManualClock
from stanchion.errors import CircuitOpenError
from stanchion.resilience import CircuitBreaker, State


class Boom(Exception):
    pass


class Benign(Exception):
    pass


@dataclass
class Ref:
    """Keeps every outcome in a plain list and recomputes everything each time."""

    window_type: str
    size: int
    minimum: int
    fthr: float
    sthr: float
    wait: float
    n_half: int
    max_wait: float
    state: State = State.CLOSED
    calls: list[tuple[float, bool, bool]] = field(default_factory=list)
    changed: float = 0.0
    free: int = 0
    rejected: int = 0
    trial_window: bool = False  # the window is a half-open batch (OPEN keeps it)

    def go(self, new: State, now: float) -> None:
        if new is not State.OPEN:
            self.calls = []
            self.rejected = 0
            self.trial_window = new is State.HALF_OPEN
        self.state, self.changed = new, now
        self.free = self.n_half if new is State.HALF_OPEN else 0

    def poll(self, now: float) -> None:
        if self.state is State.OPEN and now >= self.changed + self.wait:
            self.go(State.HALF_OPEN, now)
        elif (
            self.state is State.HALF_OPEN
            and self.max_wait > 0
            and now >= self.changed + self.max_wait
        ):
            self.go(State.OPEN, now)

    def window(self, now: float) -> list[tuple[float, bool, bool]]:
        if self.trial_window:
            return self.calls
        if self.window_type == "count":
            return self.calls[-self.size :]
        return [c for c in self.calls if math.floor(c[0]) > math.floor(now) - self.size]

    def need(self) -> int:
        if self.trial_window:
            return self.n_half
        return min(self.minimum, self.size) if self.window_type == "count" else self.minimum

    def admit(self, now: float) -> bool:
        self.poll(now)
        if self.state in (State.CLOSED, State.DISABLED):
            return True
        if self.state is State.HALF_OPEN and self.free > 0:
            self.free -= 1
            return True
        self.rejected += 1
        return False

    def record(self, now: float, failed: bool, slow: bool, ignored: bool, state0: State) -> None:
        if self.state is not state0 or self.state not in (State.CLOSED, State.HALF_OPEN):
            return
        if ignored:
            if self.state is State.HALF_OPEN:
                self.free += 1
            return
        self.calls.append((now, failed, slow))
        w = self.window(now)
        n = len(w)
        if n < self.need():
            return
        f = sum(c[1] for c in w) / n
        s = sum(c[2] for c in w) / n
        bad = f >= self.fthr or s >= self.sthr
        if self.state is State.HALF_OPEN:
            self.go(State.OPEN if bad else State.CLOSED, now)
        elif bad:
            self.go(State.OPEN, now)

    def metrics(self, now: float) -> tuple[float, float, int, int, int]:
        self.poll(now)
        w = self.window(now)
        n = len(w)
        failed = sum(c[1] for c in w)
        slow = sum(c[2] for c in w)
        enough = n >= self.need() and n > 0
        return (
            failed / n if enough else -1.0,
            slow / n if enough else -1.0,
            n,
            failed,
            slow,
        )


# weights: mostly calls, some clock moves and queries, rarely a manual transition
_CALLS = ["ok"] * 6 + ["fail"] * 5 + ["slow"] * 2 + ["slowfail"] + ["ignored"] * 2
_QUERIES = ["state", "metrics"]
ops = st.lists(
    st.one_of(
        st.sampled_from(_CALLS),
        st.sampled_from(_CALLS),
        st.sampled_from(_CALLS),
        st.tuples(st.just("advance"), st.sampled_from([0.1, 0.5, 1.0, 2.0, 4.0, 5.0, 11.0])),
        st.sampled_from(_QUERIES),
        st.sampled_from(["force", "disable", "reset", "ok", "ok", "ok", "ok", "ok", "ok"]),
    ),
    max_size=150,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window_type=st.sampled_from(["count", "time"]),
    size=st.integers(1, 6),
    minimum=st.integers(1, 6),
    fthr=st.sampled_from([0.3, 0.5, 0.7, 1.0, 1.0]),
    sthr=st.sampled_from([0.3, 0.6, 1.0]),
    n_half=st.integers(1, 3),
    max_wait=st.sampled_from([0.0, 3.0]),
    program=ops,
)
def test_breaker_matches_reference(
    window_type: str,
    size: int,
    minimum: int,
    fthr: float,
    sthr: float,
    n_half: int,
    max_wait: float,
    program: list[object],
) -> None:
    clock = ManualClock(1000.0)
    slow_d = 1.0
    wait = 2.0
    b = CircuitBreaker(
        "m",
        window_type=window_type,  # type: ignore[arg-type]
        window_size=size,
        minimum_calls=minimum,
        failure_rate_threshold=fthr,
        slow_call_rate_threshold=sthr,
        slow_call_duration=slow_d,
        wait_duration_open=wait,
        half_open_calls=n_half,
        max_wait_half_open=max_wait,
        ignore=(Benign,),
        clock=clock,
    )
    ref = Ref(window_type, size, minimum, fthr, sthr, wait, n_half, max_wait, changed=1000.0)
    for op in program:
        if isinstance(op, tuple):
            clock.advance(op[1])
        elif op in ("ok", "fail", "slow", "slowfail", "ignored"):
            failed = op in ("fail", "slowfail")
            slow = op in ("slow", "slowfail")

            def fn(failed: bool = failed, slow: bool = slow, op: object = op) -> str:
                if slow:
                    clock.advance(slow_d)
                if op == "ignored":
                    raise Benign
                if failed:
                    raise Boom
                return "r"

            admitted = ref.admit(clock())
            state0 = ref.state
            if admitted:
                with pytest.raises((Boom, Benign)) if (failed or op == "ignored") else _noop():
                    assert b.call(fn) == "r"
                ref.record(clock(), failed, slow, op == "ignored", state0)
            else:
                with pytest.raises(CircuitOpenError):
                    b.call(fn)
                if slow:
                    clock.advance(0)  # a rejected call never ran
        elif op == "state":
            ref.poll(clock())
            assert b.state is ref.state
        elif op == "metrics":
            m = b.metrics
            fr, sr, n, failed_n, slow_n = ref.metrics(clock())
            assert m.state is ref.state
            assert (m.buffered_calls, m.failed_calls, m.slow_calls) == (n, failed_n, slow_n)
            assert m.failure_rate == pytest.approx(fr)
            assert m.slow_call_rate == pytest.approx(sr)
            assert m.not_permitted_calls == ref.rejected
        elif op == "force":
            b.force_open()
            if ref.state is not State.FORCED_OPEN:
                ref.go(State.FORCED_OPEN, clock())
        elif op == "disable":
            b.disable()
            if ref.state is not State.DISABLED:
                ref.go(State.DISABLED, clock())
        elif op == "reset":
            b.reset()
            ref.go(State.CLOSED, clock())
    ref.poll(clock())
    assert b.state is ref.state


class _noop:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
