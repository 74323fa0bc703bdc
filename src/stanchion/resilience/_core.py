"""Pure cores of the resilience policies: breaker state machine, windows, retry plans.

Theory of operation
===================

Nothing here does I/O, reads a clock or takes a lock. Every method gets the
current time as ``now`` (monotonic seconds) and returns a decision; the
facades in ``_api.py`` read the clock, hold a lock around the tiny state
update, run the user's call *outside* any lock, and turn the transitions the
core reports into listener calls, metrics and log lines.

The breaker (:class:`BreakerMachine`) follows resilience4j's CircuitBreaker::

                 failure or slow rate >= threshold
        CLOSED ──────────────────────────────────────▶ OPEN
          ▲                                          │  ▲
          │ the N trial calls stay below            │  │ a trial batch above the
          │ both thresholds                         │  │ thresholds, or max_wait_half_open
          │                      wait_duration_open │  │ elapsed
          └──────────────────── HALF_OPEN ◀─────────┘  │
                                   └───────────────────┘

    FORCED_OPEN (rejects everything) and DISABLED (admits everything, records
    nothing) are entered and left only by hand: force_open(), disable(), reset().

The automatic arrows are data, in ``TRANSITIONS`` ((state, event) -> state);
the code decides which event happened and looks the next state up.

Inputs are ``admit(now)`` (may a call run?) and ``record(outcome, now,
epoch)`` (how did an admitted call end?). Outcomes are small ints so the hot
path allocates nothing: bit 0 says "failed", bit 1 says "slow"; ``IGNORED``
(an ignored exception or a cancelled call) counts neither way and gives a
half-open trial slot back.

Windows. Rates are computed over a sliding window of outcomes:

* count window: a ring buffer of the last ``window_size`` outcomes, with
  running totals (one subtraction for the evicted entry, one addition);
* time window: ``window_size`` one-second buckets (resilience4j's partial
  aggregation); a record at second ``s`` first empties the buckets of the
  seconds that fell out of ``(s - window_size, s]``.

No rate is computed until ``minimum_calls`` outcomes are buffered (capped at
``window_size`` for a count window); the rates are then -1.0 in the metrics,
as in resilience4j. The decision is re-evaluated only when it can change: on
a failed or slow outcome, when the buffered count first reaches the minimum,
or, for a time window, on every record (expired buckets can raise the rates).

Epochs. Each transition increments ``epoch``. An admitted call carries the
epoch it was admitted in; an outcome from an older epoch is dropped. So a
slow call admitted while CLOSED cannot consume a half-open trial or decide a
half-open batch, and a trial call that outlives its half-open period cannot
close a breaker that re-opened meanwhile. Half-open admits exactly
``half_open_calls`` trials per half-open period: the counter of free slots is
decremented by ``admit`` and incremented only by an ``IGNORED`` outcome of the
same epoch.

Invariants: memory is bounded by the window (no per-rejection state);
``0 <= free_slots <= half_open_calls``; every transition is appended to
``transitions`` (the facade drains it) and bumps ``epoch``.

Retry (:class:`RetryPlan`) is the same shape: ``next(attempt, now)`` returns
:class:`RetryAfter` (sleep ``delay`` then try again) or :class:`GiveUp`; the
deadline caps the last sleep, and the caller caps the last attempt with
``remaining(now)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Final, Literal

__all__ = [
    "FAILURE",
    "IGNORED",
    "SLOW",
    "SLOW_FAILURE",
    "SUCCESS",
    "TRANSITIONS",
    "Admit",
    "BreakerConfig",
    "BreakerMachine",
    "BreakerMetrics",
    "BudgetWindow",
    "Exponential",
    "Fixed",
    "GiveUp",
    "Outcome",
    "Reject",
    "RetryAfter",
    "RetryPlan",
    "State",
    "TokenBucket",
    "Transition",
]


class State(StrEnum):
    """The state of a circuit breaker.

    ``CLOSED`` admits calls and records them; ``OPEN`` rejects them until
    ``wait_duration_open`` has passed; ``HALF_OPEN`` admits a fixed number of
    trial calls; ``FORCED_OPEN`` rejects everything and ``DISABLED`` admits
    everything without recording, until :meth:`CircuitBreaker.reset`.

    .. versionadded:: 0.1
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"

    def __str__(self) -> str:
        return self.value


class Outcome(IntEnum):
    """How an admitted call ended (bit 0: failed, bit 1: slow)."""

    SUCCESS = 0
    FAILURE = 1
    SLOW = 2
    SLOW_FAILURE = 3
    IGNORED = 4


SUCCESS: Final = 0
FAILURE: Final = 1
SLOW: Final = 2
SLOW_FAILURE: Final = 3
IGNORED: Final = 4
_REJECTED: Final = 5

_CLOSED = State.CLOSED
_OPEN = State.OPEN
_HALF_OPEN = State.HALF_OPEN
_FORCED_OPEN = State.FORCED_OPEN
_DISABLED = State.DISABLED


# The automatic transitions, as data: (state, event) -> next state. Manual
# ones (force_open, disable, reset, open) and adopt() (a shared store's
# decision) may go from any state to any state.
RATES_EXCEEDED: Final = "rates_exceeded"  # closed window: failure or slow rate >= threshold
WAIT_ELAPSED: Final = "wait_elapsed"  # open for wait_duration_open
TRIALS_PASSED: Final = "trials_passed"  # the N trials stayed below both thresholds
TRIALS_FAILED: Final = "trials_failed"  # the N trials reached a threshold
TRIALS_TIMED_OUT: Final = "trials_timed_out"  # max_wait_half_open elapsed first

TRANSITIONS: Final[dict[tuple[State, str], State]] = {
    (_CLOSED, RATES_EXCEEDED): _OPEN,
    (_OPEN, WAIT_ELAPSED): _HALF_OPEN,
    (_HALF_OPEN, TRIALS_PASSED): _CLOSED,
    (_HALF_OPEN, TRIALS_FAILED): _OPEN,
    (_HALF_OPEN, TRIALS_TIMED_OUT): _OPEN,
}


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Validated options of a circuit breaker (see :class:`CircuitBreaker`)."""

    failure_rate_threshold: float = 0.5
    slow_call_rate_threshold: float = 1.0
    slow_call_duration: float = 60.0
    window_type: Literal["count", "time"] = "count"
    window_size: int = 100
    minimum_calls: int = 100
    wait_duration_open: float = 60.0
    half_open_calls: int = 10
    max_wait_half_open: float = 0.0

    def __post_init__(self) -> None:
        from stanchion.errors import ConfigError

        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0.0 < v <= 1.0:
                raise ConfigError(f"{name} must be a fraction in (0, 1], got {v!r}")
        if self.window_type not in ("count", "time"):
            raise ConfigError(f"window_type must be 'count' or 'time', got {self.window_type!r}")
        for name in ("window_size", "minimum_calls", "half_open_calls"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("slow_call_duration", "wait_duration_open", "max_wait_half_open"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not v >= 0 or math.isinf(v):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, got {v!r}")
        if self.slow_call_duration <= 0:
            raise ConfigError("slow_call_duration must be > 0 seconds")

    @property
    def effective_minimum(self) -> int:
        """Calls needed before a decision (capped at the window for a count window)."""
        if self.window_type == "count":
            return min(self.minimum_calls, self.window_size)
        return self.minimum_calls


@dataclass(frozen=True, slots=True)
class Admit:
    """Decision: run the call; report its outcome with this ``epoch``."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Reject:
    """Decision: reject the call.

    Attributes:
        state: the state that rejected it.
        retry_after: seconds until the next trial call may be admitted
            (0.0 in half-open with no free slot, ``inf`` when forced open).
    """

    state: State
    retry_after: float


@dataclass(frozen=True, slots=True)
class Transition:
    """The breaker moved from ``old`` to ``new`` at time ``at``."""

    old: State
    new: State
    at: float


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot of a breaker's window, as in resilience4j's ``Metrics``.

    Attributes:
        failure_rate: failed / buffered calls, a fraction; -1.0 until the
            minimum number of calls is buffered.
        slow_call_rate: slow / buffered calls; -1.0 likewise.
        buffered_calls: calls in the current window.
        failed_calls: failed calls in the window (slow or not).
        slow_calls: slow calls in the window (failed or not).
        successful_calls: calls in the window that did not fail.
        not_permitted_calls: calls rejected since the last state transition.
        state: the state when the snapshot was taken.
    """

    failure_rate: float
    slow_call_rate: float
    buffered_calls: int
    failed_calls: int
    slow_calls: int
    successful_calls: int
    not_permitted_calls: int
    state: State = _CLOSED


class _CountWindow:
    """Ring buffer of the last ``size`` outcomes with running totals."""

    __slots__ = ("failed", "i", "n", "ring", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.ring = bytearray(size)
        self.i = 0
        self.n = 0
        self.failed = 0
        self.slow = 0

    def add(self, outcome: int, now: float) -> bool:
        """Add an outcome; return True if the rates may have gone up."""
        i = self.i
        ring = self.ring
        if self.n == self.size:
            old = ring[i]
            if old:
                if old & 1:
                    self.failed -= 1
                if old & 2:
                    self.slow -= 1
        else:
            self.n += 1
        ring[i] = outcome
        i += 1
        self.i = 0 if i == self.size else i
        if outcome:
            if outcome & 1:
                self.failed += 1
            if outcome & 2:
                self.slow += 1
            return True
        return False

    def add_successes(self, k: int, now: float) -> None:
        """Add ``k`` fast successes (oldest entries evicted)."""
        if k >= self.size:
            self.ring = bytearray(self.size)
            self.i = 0
            self.n = self.size
            self.failed = self.slow = 0
            return
        for _ in range(k):
            self.add(0, now)

    def roll(self, now: float) -> None:
        """A count window does not expire with time."""

    def to_list(self) -> list[int]:
        """Outcomes oldest first."""
        if self.n < self.size:
            return list(self.ring[: self.n])
        return list(self.ring[self.i :] + self.ring[: self.i])


class _TimeWindow:
    """``size`` one-second buckets of (total, failed, slow) with running totals."""

    __slots__ = ("b_failed", "b_n", "b_slow", "failed", "head", "n", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self.b_n = [0] * size
        self.b_failed = [0] * size
        self.b_slow = [0] * size
        self.head: int | None = None
        self.n = 0
        self.failed = 0
        self.slow = 0

    def roll(self, now: float) -> None:
        """Empty the buckets whose second fell out of the window."""
        sec = math.floor(now)
        head = self.head
        if head is None:
            self.head = sec
            return
        if sec <= head:
            return
        size = self.size
        steps = min(sec - head, size)
        for s in range(head + 1, head + 1 + steps):
            k = s % size
            if self.b_n[k]:
                self.n -= self.b_n[k]
                self.failed -= self.b_failed[k]
                self.slow -= self.b_slow[k]
                self.b_n[k] = self.b_failed[k] = self.b_slow[k] = 0
        self.head = sec

    def add_successes(self, k: int, now: float) -> None:
        """Add ``k`` fast successes to the bucket of ``now``."""
        self.roll(now)
        head = self.head
        assert head is not None
        self.b_n[head % self.size] += k
        self.n += k

    def add(self, outcome: int, now: float) -> bool:
        self.roll(now)
        head = self.head
        assert head is not None
        k = head % self.size
        self.b_n[k] += 1
        self.n += 1
        if outcome & 1:
            self.b_failed[k] += 1
            self.failed += 1
        if outcome & 2:
            self.b_slow[k] += 1
            self.slow += 1
        # buckets may have expired here or in an earlier roll (a metrics read):
        # the rates may have gone up whatever the outcome, so always re-check
        return True


class BreakerMachine:
    """The circuit breaker's state machine, pure and clock-driven.

    Not thread-safe by itself: the facade serialises ``admit``/``record``
    with a lock held only for these calls (never while a call runs).

    Args:
        config: validated options.
        now: the creation time.

    Attributes:
        state: the current :class:`State` (read it freely; call :meth:`poll`
            first for time-driven transitions).
        epoch: incremented by every transition.
        transitions: transitions not yet drained by the facade.
        totals: cumulative counts indexed by outcome (0-3), ignored (4),
            rejected (5) since creation, for Prometheus counters.
    """

    __slots__ = (
        "_admit",
        "_fthr",
        "_hmin",
        "_min",
        "_need",
        "_sthr",
        "changed_at",
        "config",
        "demand",
        "epoch",
        "follower",
        "free_slots",
        "not_permitted",
        "state",
        "totals",
        "transitions",
        "window",
    )

    def __init__(self, config: BreakerConfig, now: float = 0.0) -> None:
        self.config = config
        self._fthr = config.failure_rate_threshold
        self._sthr = config.slow_call_rate_threshold
        self._min = config.effective_minimum
        self._hmin = config.half_open_calls
        self._need = self._min
        self.state: State = _CLOSED
        self.epoch = 0
        self._admit = Admit(0)
        self.changed_at = now
        self.free_slots = 0
        self.not_permitted = 0
        self.totals = [0, 0, 0, 0, 0, 0]
        self.transitions: list[Transition] = []
        self.window: _CountWindow | _TimeWindow = self._new_window()
        # A follower records outcomes in its window (kept for a fallback) but
        # makes no decision of its own: the shared store's machine decides and
        # the facade applies its state with adopt().
        self.follower = False
        self.demand = 0  # follower: calls rejected in half-open for want of a slot

    def _new_window(self) -> _CountWindow | _TimeWindow:
        c = self.config
        if self.state is _HALF_OPEN:
            return _CountWindow(c.half_open_calls)
        if c.window_type == "count":
            return _CountWindow(c.window_size)
        return _TimeWindow(c.window_size)

    def _step(self, event: str, now: float) -> None:
        """An automatic transition, looked up in :data:`TRANSITIONS`."""
        self._go(TRANSITIONS[(self.state, event)], now)

    def _go(self, new: State, now: float) -> None:
        old = self.state
        self.state = new
        self.epoch += 1
        self._admit = Admit(self.epoch)
        self.changed_at = now
        self.free_slots = self.config.half_open_calls if new is _HALF_OPEN else 0
        self.demand = 0
        if new is not _OPEN:
            # OPEN keeps the window that opened it, so its rates stay visible
            # (as in resilience4j); every other state starts afresh.
            self.not_permitted = 0
            self._need = self._hmin if new is _HALF_OPEN else self._min
            self.window = self._new_window()
        self.transitions.append(Transition(old, new, now))

    # -- inputs ---------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Apply time-driven transitions (open -> half-open, half-open max wait)."""
        if self.follower:
            return
        st = self.state
        if st is _OPEN:
            if now >= self.changed_at + self.config.wait_duration_open:
                self._step(WAIT_ELAPSED, now)
        elif st is _HALF_OPEN:
            mw = self.config.max_wait_half_open
            if mw > 0 and now >= self.changed_at + mw:
                self._step(TRIALS_TIMED_OUT, now)

    def admit(self, now: float) -> Admit | Reject:
        """May a call run now? Consumes a trial slot in half-open."""
        st = self.state
        if st is _CLOSED or st is _DISABLED:
            return self._admit
        if st is _OPEN or st is _HALF_OPEN:
            self.poll(now)
            st = self.state
            if st is _HALF_OPEN:
                if self.free_slots > 0:
                    self.free_slots -= 1
                    return self._admit
                if self.follower:
                    self.demand += 1  # ask the shared machine for a trial slot
                return self._reject(0.0)
            if st is _OPEN:
                return self._reject(
                    max(0.0, self.changed_at + self.config.wait_duration_open - now)
                )
        return self._reject(math.inf)

    def _reject(self, retry_after: float) -> Reject:
        self.not_permitted += 1
        self.totals[_REJECTED] += 1
        return Reject(self.state, retry_after)

    def record(self, outcome: int, now: float, epoch: int | None = None) -> None:
        """Record the outcome of a call admitted in ``epoch`` (None: the current one)."""
        if epoch is not None and epoch != self.epoch:
            return  # admitted before the last transition: no say in this period
        st = self.state
        if st is _DISABLED or st is _FORCED_OPEN or st is _OPEN:
            return
        self.totals[outcome] += 1
        if outcome == IGNORED:
            if st is _HALF_OPEN and self.free_slots < self._hmin:
                self.free_slots += 1
            return
        w = self.window
        if self.follower:
            w.add(outcome, now)
            return
        if st is _CLOSED:
            if w.add(outcome, now) or w.n == self._min:
                n = w.n
                if n >= self._min and (w.failed / n >= self._fthr or w.slow / n >= self._sthr):
                    self._step(RATES_EXCEEDED, now)
            return
        # half-open: decide once the N trials are in
        w.add(outcome, now)
        n = w.n
        if n >= self._hmin:
            if w.failed / n >= self._fthr or w.slow / n >= self._sthr:
                self._step(TRIALS_FAILED, now)
            else:
                self._step(TRIALS_PASSED, now)

    def record_successes(self, k: int, now: float, at: float | None = None) -> None:
        """Record ``k`` successful, not slow calls of the current CLOSED period.

        The facade counts fast-path successes with an atomic counter and
        hands them over in batches (see ``CircuitBreaker``); the result is the
        same as ``k`` calls of ``record(SUCCESS, now)``, except that the calls
        are put in the window at time ``at`` (when they happened; default
        ``now``) while a transition they cause happens at ``now``.
        """
        if k <= 0 or self.state is not _CLOSED:
            return
        self.totals[0] += k
        w = self.window
        before = w.n
        w.add_successes(k, now if at is None else at)
        n = w.n
        changed = before < self._min <= n or isinstance(w, _TimeWindow)
        if changed and n >= self._min and (w.failed / n >= self._fthr or w.slow / n >= self._sthr):
            self._step(RATES_EXCEEDED, now)

    def record_rejections(self, k: int) -> None:
        """Count ``k`` calls the facade rejected on its own (OPEN, before the wait ended)."""
        self.not_permitted += k
        self.totals[_REJECTED] += k

    def reject_until(self) -> float:
        """Until when every call is rejected whatever happens (-inf: not now)."""
        st = self.state
        if st is _OPEN:
            return -math.inf if self.follower else self.changed_at + self.config.wait_duration_open
        if st is _FORCED_OPEN:
            return math.inf
        return -math.inf

    def successes_before_check(self) -> int:
        """How many more plain successes may be batched before a decision is due.

        0 means "record every call now" (not CLOSED); a large number means
        successes cannot change the decision until the clock moves.
        """
        if self.state is not _CLOSED:
            return 0
        n = self.window.n
        return self._min - n if n < self._min else 1 << 62

    def adopt(self, state: State, changed_at: float, now: float) -> None:
        """Take the state decided elsewhere (the shared store), entered at ``changed_at``.

        A follower entering HALF_OPEN starts with no trial slot: slots are
        lent by the shared machine (:meth:`lend_slots`), so that exactly
        ``half_open_calls`` trials run across all replicas.
        """
        if self.state is not state:
            self._go(state, now)
            if self.follower and state is _HALF_OPEN:
                self.free_slots = 0
        self.changed_at = changed_at

    def lend_slots(self, returned: int, wanted: int) -> int:
        """Shared side: take back ``returned`` unused trial slots, lend up to ``wanted``.

        Returns how many slots are lent (0 unless HALF_OPEN).
        """
        if self.state is not _HALF_OPEN:
            return 0
        self.free_slots = min(self._hmin, self.free_slots + returned)
        lent = min(wanted, self.free_slots)
        self.free_slots -= lent
        return lent

    # -- (de)serialisation for a shared store -----------------------------------

    def dump(self) -> dict[str, object]:
        """The machine as plain data (JSON-able), for a shared store."""
        w = self.window
        win: dict[str, object]
        if isinstance(w, _CountWindow):
            win = {"kind": "count", "size": w.size, "outcomes": w.to_list()}
        else:
            win = {
                "kind": "time",
                "size": w.size,
                "head": w.head,
                "n": list(w.b_n),
                "failed": list(w.b_failed),
                "slow": list(w.b_slow),
            }
        c = self.config
        return {
            "config": {
                "failure_rate_threshold": c.failure_rate_threshold,
                "slow_call_rate_threshold": c.slow_call_rate_threshold,
                "slow_call_duration": c.slow_call_duration,
                "window_type": c.window_type,
                "window_size": c.window_size,
                "minimum_calls": c.minimum_calls,
                "wait_duration_open": c.wait_duration_open,
                "half_open_calls": c.half_open_calls,
                "max_wait_half_open": c.max_wait_half_open,
            },
            "state": self.state.value,
            "epoch": self.epoch,
            "changed_at": self.changed_at,
            "free_slots": self.free_slots,
            "not_permitted": self.not_permitted,
            "need": self._need,
            "window": win,
        }

    @classmethod
    def load(cls, config: BreakerConfig, data: dict[str, object]) -> BreakerMachine:
        """Rebuild a machine from :meth:`dump` output (config from the caller)."""
        m = cls(config, float(data["changed_at"]))  # type: ignore[arg-type]
        m.state = State(str(data["state"]))
        m.epoch = int(data["epoch"])  # type: ignore[call-overload]
        m._admit = Admit(m.epoch)
        m.free_slots = int(data["free_slots"])  # type: ignore[call-overload]
        m.not_permitted = int(data["not_permitted"])  # type: ignore[call-overload]
        m._need = int(data["need"])  # type: ignore[call-overload]
        win = data["window"]
        assert isinstance(win, dict)
        if win["kind"] == "count":
            cw = _CountWindow(int(win["size"]))
            for o in win["outcomes"]:
                cw.add(int(o), 0.0)
            m.window = cw
        else:
            tw = _TimeWindow(int(win["size"]))
            tw.head = None if win["head"] is None else int(win["head"])
            tw.b_n = [int(x) for x in win["n"]]
            tw.b_failed = [int(x) for x in win["failed"]]
            tw.b_slow = [int(x) for x in win["slow"]]
            tw.n, tw.failed, tw.slow = sum(tw.b_n), sum(tw.b_failed), sum(tw.b_slow)
            m.window = tw
        return m

    # -- manual transitions ---------------------------------------------------

    def force_open(self, now: float) -> None:
        """Reject every call until :meth:`reset`."""
        if self.state is not _FORCED_OPEN:
            self._go(_FORCED_OPEN, now)

    def disable(self, now: float) -> None:
        """Admit every call and record nothing until :meth:`reset`."""
        if self.state is not _DISABLED:
            self._go(_DISABLED, now)

    def reset(self, now: float) -> None:
        """Back to CLOSED with an empty window (always a transition)."""
        self._go(_CLOSED, now)

    def open(self, now: float) -> None:
        """Open now (as if the thresholds were reached)."""
        self._go(_OPEN, now)

    # -- queries ---------------------------------------------------------------

    def retry_after(self, now: float) -> float:
        """Seconds until a trial call may be admitted (0 when calls are admitted now)."""
        st = self.state
        if st is _OPEN:
            return max(0.0, self.changed_at + self.config.wait_duration_open - now)
        if st is _FORCED_OPEN:
            return math.inf
        return 0.0

    def metrics(self, now: float) -> BreakerMetrics:
        """The window's figures now (time windows expire old buckets first)."""
        w = self.window
        w.roll(now)
        n = w.n
        need = self._need
        enough = n >= need and n > 0
        return BreakerMetrics(
            failure_rate=w.failed / n if enough else -1.0,
            slow_call_rate=w.slow / n if enough else -1.0,
            buffered_calls=n,
            failed_calls=w.failed,
            slow_calls=w.slow,
            successful_calls=n - w.failed,
            not_permitted_calls=self.not_permitted,
            state=self.state,
        )


# == retry ======================================================================
#
# A retry plan answers one question after a failed attempt: sleep how long and
# try again, or give up? Inputs are the attempt number (1 = the first attempt
# has just failed), the time now and one uniform random number in [0, 1) (the
# facade draws it, so the plan stays deterministic). The deadline is absolute
# (started + deadline): the plan never returns a delay that would end at or
# after it, so the last sleep never overshoots; the facade caps the last
# attempt with remaining(now).


@dataclass(frozen=True, slots=True)
class Exponential:
    """Exponential back-off: retry ``n`` waits up to ``min(max, base * 2**(n-1))`` seconds.

    Args:
        base: the first retry's ceiling, seconds.
        max: the ceiling of any delay, seconds.
        jitter: ``"full"`` (uniform in [0, ceiling], AWS's "full jitter", the
            default), ``"equal"`` (half fixed, half random) or ``"none"``.

    .. versionadded:: 0.1
    """

    base: float = 0.1
    max: float = 10.0
    jitter: Literal["full", "equal", "none"] = "full"

    def __post_init__(self) -> None:
        from stanchion.errors import ConfigError

        if not (self.base > 0 and math.isfinite(self.base)):
            raise ConfigError(f"Exponential base must be > 0 seconds, got {self.base!r}")
        if not self.max >= self.base:
            raise ConfigError(f"Exponential max ({self.max!r}) must be >= base ({self.base!r})")
        if self.jitter not in ("full", "equal", "none"):
            raise ConfigError(f"jitter must be 'full', 'equal' or 'none', got {self.jitter!r}")

    def compute(self, retry: int, rand: float) -> float:
        """The delay before retry number ``retry`` (1-based), given ``rand`` in [0, 1)."""
        cap = self.max if retry > 64 else min(self.max, self.base * 2.0 ** (retry - 1))
        if self.jitter == "full":
            return cap * rand
        if self.jitter == "equal":
            return cap / 2 + cap / 2 * rand
        return cap


@dataclass(frozen=True, slots=True)
class Fixed:
    """The same delay before every retry.

    .. versionadded:: 0.1
    """

    delay: float = 0.1

    def __post_init__(self) -> None:
        from stanchion.errors import ConfigError

        if not (self.delay >= 0 and math.isfinite(self.delay)):
            raise ConfigError(f"Fixed delay must be >= 0 seconds, got {self.delay!r}")

    def compute(self, retry: int, rand: float) -> float:
        """Always ``delay``."""
        return self.delay


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Decision: sleep ``delay`` seconds, then make attempt ``attempt``."""

    delay: float
    attempt: int


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Decision: stop; ``reason`` is ``"attempts"``, ``"deadline"`` or ``"budget"``."""

    reason: Literal["attempts", "deadline", "budget"]


class RetryPlan:
    """When to retry: attempts, back-off and an overall deadline, pure.

    Args:
        attempts: total attempts allowed (the first one included), >= 1.
        backoff: an :class:`Exponential` or :class:`Fixed`.
        deadline: seconds from ``started`` after which nothing more starts.
        started: when the operation began.
    """

    __slots__ = ("attempts", "backoff", "ends")

    def __init__(
        self,
        attempts: int,
        backoff: Exponential | Fixed,
        deadline: float | None,
        started: float,
    ) -> None:
        self.attempts = attempts
        self.backoff = backoff
        self.ends = None if deadline is None else started + deadline

    def remaining(self, now: float) -> float | None:
        """Seconds left before the deadline (None without one)."""
        return None if self.ends is None else self.ends - now

    def next(self, failed_attempt: int, now: float, rand: float) -> RetryAfter | GiveUp:
        """After attempt ``failed_attempt`` (1-based) failed at ``now``: retry or give up."""
        if failed_attempt >= self.attempts:
            return GiveUp("attempts")
        delay = self.backoff.compute(failed_attempt, rand)
        if self.ends is not None and now + delay >= self.ends:
            # sleeping would reach the deadline with no time left to try: the
            # deadline caps the last sleep by not taking it
            return GiveUp("deadline")
        return RetryAfter(delay, failed_attempt + 1)


class BudgetWindow:
    """A retry budget's ledger (Finagle's RetryBudget), pure.

    Over the last ``ttl`` seconds (one-second buckets), a retry may be
    withdrawn while ``min_per_second * ttl + ratio * deposits - withdrawals
    >= 1``: retries are at most ``ratio`` of requests, plus a small reserve so
    low-traffic clients can still retry.
    """

    __slots__ = ("dep", "head", "min_per_second", "ratio", "size", "ttl", "wd")

    def __init__(self, ratio: float, min_per_second: float, ttl: float) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self.size = max(1, math.ceil(ttl))
        self.dep = [0] * self.size
        self.wd = [0] * self.size
        self.head: int | None = None

    def _roll(self, now: float) -> int:
        sec = math.floor(now)
        head = self.head
        if head is None or sec - head >= self.size:
            self.dep = [0] * self.size
            self.wd = [0] * self.size
        elif sec > head:
            for s in range(head + 1, sec + 1):
                k = s % self.size
                self.dep[k] = self.wd[k] = 0
        if head is None or sec > head:
            self.head = sec
        return (self.head if self.head is not None else sec) % self.size

    def balance(self, now: float) -> float:
        """Retries available now (may be fractional)."""
        self._roll(now)
        return self.min_per_second * self.ttl + self.ratio * sum(self.dep) - sum(self.wd)

    def deposit(self, now: float) -> None:
        """A new request (first attempt) started."""
        k = self._roll(now)  # may replace the lists: index after rolling
        self.dep[k] += 1

    def withdraw(self, now: float) -> bool:
        """Take one retry if the budget allows it."""
        if self.balance(now) >= 1.0 - 1e-9:
            k = self._roll(now)
            self.wd[k] += 1
            return True
        return False


# == rate limiter =================================================================


class TokenBucket:
    """A token bucket that hands out reservations, pure.

    ``burst`` tokens at most, refilled at ``rate`` per second. ``reserve``
    takes a token now or books the next one (the balance goes negative), so
    waiters are served in order and nobody starves.
    """

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.last = now

    def _refill(self, now: float) -> None:
        if now > self.last:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
            self.last = now

    def reserve(self, now: float, max_wait: float) -> float | None:
        """Book a token: the wait in seconds (0.0 = go), or None (retry later)."""
        self._refill(now)
        wait = 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate
        if wait > max_wait:
            return None
        self.tokens -= 1.0
        return wait

    def retry_after(self, now: float) -> float:
        """Seconds until a token is free."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def available(self, now: float) -> float:
        """Tokens in the bucket now."""
        self._refill(now)
        return self.tokens
