"""The pure lease machine: every transition, and the safety invariant under Hypothesis."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stanchion.election._core import (
    Acquired,
    Busy,
    Failed,
    LeaseMachine,
    LeaseOptions,
    Observation,
    Rejected,
    Renew,
    Renewed,
    Resign,
    Role,
    StepDown,
    Tick,
    TryAcquire,
    Vacated,
    Wait,
)
from stanchion.errors import ConfigError

OPTS = LeaseOptions(ttl=9.0)  # renew 3, margin 0.9, poll 1.5


def leader(token: int = 7, sent_at: float = 100.0) -> LeaseMachine:
    m = LeaseMachine(OPTS)
    assert m.step(sent_at, Tick()) == TryAcquire()
    assert m.step(sent_at + 0.1, Acquired(token, sent_at)) == Wait(sent_at + 3.0)
    return m


def test_defaults() -> None:
    assert (OPTS.renewal, OPTS.margin, OPTS.poll) == (3.0, 0.9, 1.5)
    assert LeaseOptions(ttl=30).margin == 1.0  # capped at one second


@pytest.mark.parametrize(
    "kw",
    [
        {"ttl": 0},
        {"ttl": -1},
        {"ttl": math.inf},
        {"ttl": 1, "renew_every": 1},
        {"ttl": 1, "renew_every": 0.5, "safety_margin": 0.5},
        {"ttl": 1, "poll_every": 0},
    ],
)
def test_bad_options(kw: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        LeaseOptions(**kw)


def test_follower_polls_when_busy_or_failing() -> None:
    m = LeaseMachine(OPTS)
    assert m.step(0.0, Tick()) == TryAcquire()
    assert m.step(0.1, Busy()) == Wait(1.6)
    assert m.step(1.0, Tick()) == Wait(1.6)
    assert m.step(1.6, Tick()) == TryAcquire()
    assert m.step(1.7, Failed("down")) == Wait(3.2)
    assert not m.is_valid(1.7) and m.token is None
    # Observations meant for a leader are ignored by a follower.
    for obs in (Renewed(1.0), Rejected(), Resign()):
        assert m.step(2.0, obs) == Wait(3.2)


def test_vacated_skips_the_rest_of_the_poll_interval() -> None:
    m = LeaseMachine(OPTS)
    m.step(0.0, Tick())
    assert m.step(0.1, Busy()) == Wait(1.6)
    assert m.step(0.2, Vacated()) == TryAcquire()
    assert m.step(0.2, Tick()) == TryAcquire()
    leader_m = leader()
    assert leader_m.step(101.0, Vacated()) == Wait(103.0)  # a leader ignores it


def test_deadline_counts_from_the_request_not_the_reply() -> None:
    m = leader(sent_at=100.0)
    assert m.role is Role.LEADER and m.token == 7
    assert m.deadline == pytest.approx(100.0 + 9.0 - 0.9)
    assert m.is_valid(108.0)
    assert not m.is_valid(108.1)


def test_acquired_too_late_steps_down() -> None:
    m = LeaseMachine(OPTS)
    m.step(0.0, Tick())
    assert m.step(20.0, Acquired(3, 0.0)) == StepDown(3, "lease granted too late to be trusted")
    assert m.role is Role.FOLLOWER


def test_renewal_cycle() -> None:
    m = leader(sent_at=100.0)
    assert m.step(102.0, Tick()) == Wait(103.0)
    assert m.step(103.0, Tick()) == Renew(7)
    assert m.step(103.5, Renewed(103.0)) == Wait(106.0)
    assert m.deadline == pytest.approx(103.0 + 8.1)


def test_renewed_never_shortens_the_deadline() -> None:
    m = leader(sent_at=100.0)
    m.step(103.0, Tick())
    m.step(103.2, Renewed(103.0))
    before = m.deadline
    m.step(103.3, Renewed(101.0))  # a late reply to an older request
    assert m.deadline == before


def test_failed_renewals_retry_then_step_down_at_the_deadline() -> None:
    m = leader(sent_at=100.0)
    assert m.step(103.0, Tick()) == Renew(7)
    action = m.step(103.1, Failed("timeout"))
    assert isinstance(action, Wait) and action.until < 104.0
    assert m.is_valid(108.0)
    assert m.step(108.1, Tick()) == StepDown(7, "lease expired before it was renewed")
    assert not m.is_valid(108.1) and m.token is None


def test_rejected_steps_down() -> None:
    m = leader()
    assert m.step(103.0, Rejected()) == StepDown(7, "lease taken over or lost by the backend")
    assert m.role is Role.FOLLOWER


def test_resign_steps_down() -> None:
    m = leader()
    assert m.step(101.0, Resign()) == StepDown(7, "resigned")
    assert m.step(101.0, Tick()) == TryAcquire()


def test_a_resumed_leader_is_invalid_before_anything_runs() -> None:
    m = leader(sent_at=100.0)
    assert not m.is_valid(500.0)  # no step needed: the deadline is checked at call time
    assert m.step(500.0, Renewed(499.0)) == StepDown(7, "lease expired before it was renewed")


observations = st.one_of(
    st.just(Tick()),
    st.builds(Acquired, st.integers(1, 10**6), st.floats(0, 50)),
    st.just(Busy()),
    st.builds(Renewed, st.floats(0, 50)),
    st.just(Rejected()),
    st.just(Failed("x")),
    st.just(Resign()),
    st.just(Vacated()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), observations), max_size=60))
def test_valid_only_within_ttl_of_a_request_of_the_current_term(
    steps: list[tuple[float, Observation]],
) -> None:
    m = LeaseMachine(OPTS)
    now = 0.0
    latest_sent: float | None = None  # the newest grant/renewal request of this term
    for dt, obs in steps:
        now += dt
        # Requests are sent before their replies arrive.
        if isinstance(obs, Acquired | Renewed):
            obs = type(obs)(
                *(  # type: ignore[arg-type]
                    (obs.token, min(obs.sent_at, now))
                    if isinstance(obs, Acquired)
                    else (min(obs.sent_at, now),)
                )
            )
        was_leader = m.role is Role.LEADER
        action = m.step(now, obs)
        if m.role is Role.LEADER:
            if not was_leader:
                assert isinstance(obs, Acquired)
                latest_sent = obs.sent_at
            elif isinstance(obs, Renewed):
                latest_sent = max(latest_sent or -math.inf, obs.sent_at)
        else:
            latest_sent = None
            assert not isinstance(action, Renew)
        if m.is_valid(now):
            assert latest_sent is not None
            assert now < latest_sent + OPTS.ttl - OPTS.margin
        if isinstance(action, Wait):
            assert action.until >= now or m.role is Role.LEADER
