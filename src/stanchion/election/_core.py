"""The lease machine: pure logic of one candidate in one election group.

Theory of operation
===================

A candidate is a FOLLOWER or a LEADER. The backend (SQLite row, lease file,
PostgreSQL row, Redis key, etcd key) holds the authoritative lease: holder,
fencing token and an expiry measured by the *backend's* clock. The machine
never reads a clock; the facade passes ``now`` (the elector's monotonic
clock) and an observation, and the machine answers with one action:

    TryAcquire  ask the backend for the lease (follower)
    Renew       extend our lease (leader)
    StepDown    stop acting as leader now (and release what is left)
    Wait(until) nothing to do before ``until``

Safety rests on one rule, from Kleppmann and client-go: a leader trusts its
lease only until ``sent_at + ttl - safety_margin`` where ``sent_at`` is the
local time at which the *request* that granted or renewed it was sent. The
backend starts its ``ttl`` when it *receives* that request, which is later,
so the backend cannot hand the lease to anyone else before our local
deadline (clock *rates* may differ slightly; the margin covers that). The
deadline is computed from the request time and never from the reply time,
so a slow reply, a GC pause or a SIGSTOP between request and reply only
makes us step down earlier. ``is_valid(now)`` compares against the deadline
at the moment it is called, so a process resumed after a long pause sees
False before it acts, even before any background task has run.

Fencing: the token comes from the backend in the same atomic step that
grants the lease and strictly increases with every term; a leader that was
paused past its deadline may still *try* to write, and the resource rejects
its stale token (see ``Fence``). The machine only carries the token.

Transitions (state, observation) -> (state, action):

    FOLLOWER  Tick            -> FOLLOWER  TryAcquire when next_attempt is due, else Wait
    FOLLOWER  Acquired        -> LEADER    Wait(next_renew)        (StepDown if already stale)
    FOLLOWER  Busy            -> FOLLOWER  Wait(now + poll_every), or until the lease
                                           expires if that is sooner
    FOLLOWER  Failed          -> FOLLOWER  Wait(now + poll_every)
    FOLLOWER  Vacated         -> FOLLOWER  TryAcquire (do not wait for the next poll)
    LEADER    Tick            -> LEADER    Renew when due; StepDown past the deadline; else Wait
    LEADER    Renewed         -> LEADER    deadline = max(deadline, sent_at + ttl - margin)
    LEADER    Rejected        -> FOLLOWER  StepDown("taken over")
    LEADER    Failed          -> LEADER    retry soon; StepDown once the deadline passes
    LEADER    Resign          -> FOLLOWER  StepDown("resigned")
    any       other           -> unchanged Wait (observations that do not apply are ignored)

Invariant checked by the tests: whenever ``is_valid(now)`` is True, some
grant or renewal of the *current* token was sent at a time ``t`` with
``now < t + ttl - safety_margin``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from stanchion.errors import ConfigError

__all__ = [
    "Acquired",
    "Busy",
    "Failed",
    "LeaseMachine",
    "LeaseOptions",
    "Observation",
    "Rejected",
    "Renew",
    "Renewed",
    "Resign",
    "Role",
    "StepDown",
    "Tick",
    "TryAcquire",
    "Vacated",
    "Wait",
]


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """Timing of one elector.

    Attributes:
        ttl: lease length in seconds; another candidate can take over at most
            this long after the leader's last successful renewal.
        renew_every: seconds between renewals; default ``ttl / 3``.
        safety_margin: the leader stops trusting its lease this many seconds
            before ``last renewal + ttl``; default ``min(ttl / 10, 1 s)``.
        poll_every: seconds between acquisition attempts of a follower;
            default ``renew_every / 2``.
    """

    ttl: float = 10.0
    renew_every: float | None = None
    safety_margin: float | None = None
    poll_every: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.ttl, int | float) and math.isfinite(self.ttl) and self.ttl > 0):
            raise ConfigError(f"ttl must be a positive number of seconds, got {self.ttl!r}")
        for name in ("renew_every", "safety_margin", "poll_every"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.renewal + self.margin >= self.ttl:
            raise ConfigError(
                f"renew_every ({self.renewal:g}s) plus safety_margin ({self.margin:g}s) must be "
                f"below ttl ({self.ttl:g}s), or the lease expires before it is renewed"
            )

    @property
    def renewal(self) -> float:
        """The effective renewal interval."""
        return self.renew_every if self.renew_every is not None else self.ttl / 3

    @property
    def margin(self) -> float:
        """The effective safety margin."""
        return self.safety_margin if self.safety_margin is not None else min(self.ttl / 10, 1.0)

    @property
    def poll(self) -> float:
        """The effective follower polling interval."""
        return self.poll_every if self.poll_every is not None else self.renewal / 2


class Role(enum.Enum):
    """Where the machine stands."""

    FOLLOWER = "follower"
    LEADER = "leader"


# -- observations (inputs) -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed; nothing else happened."""


@dataclass(frozen=True, slots=True)
class Acquired:
    """The backend granted the lease with ``token``; the request was sent at ``sent_at``."""

    token: int
    sent_at: float


@dataclass(frozen=True, slots=True)
class Busy:
    """Another candidate holds an unexpired lease, for ``expires_in`` seconds if known."""

    expires_in: float | None = None


@dataclass(frozen=True, slots=True)
class Renewed:
    """The backend extended our lease; the request was sent at ``sent_at``."""

    sent_at: float


@dataclass(frozen=True, slots=True)
class Rejected:
    """The backend says the lease is no longer ours (expired and taken, or lost)."""


@dataclass(frozen=True, slots=True)
class Failed:
    """The backend could not be reached or answered with an error."""

    error: str = ""


@dataclass(frozen=True, slots=True)
class Resign:
    """The application gives up leadership."""


@dataclass(frozen=True, slots=True)
class Vacated:
    """The backend signalled that the lease may be free (holder died or resigned)."""


Observation = Tick | Acquired | Busy | Renewed | Rejected | Failed | Resign | Vacated

# -- actions (outputs) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TryAcquire:
    """Ask the backend for the lease now."""


@dataclass(frozen=True, slots=True)
class Renew:
    """Renew the lease of ``token`` now."""

    token: int


@dataclass(frozen=True, slots=True)
class StepDown:
    """Stop acting as leader of term ``token`` now; ``reason`` says why."""

    token: int
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do before ``until`` (machine time)."""

    until: float


Action = TryAcquire | Renew | StepDown | Wait


class LeaseMachine:
    """Decides, from time and backend observations, what one candidate does next.

    Args:
        options: the timing (:class:`LeaseOptions`).

    The machine is pure: no I/O, no clock, no asyncio. Feed it with
    :meth:`step` and perform the action it returns.
    """

    __slots__ = ("_deadline", "_next_attempt", "_next_renew", "_token", "options", "role")

    def __init__(self, options: LeaseOptions) -> None:
        self.options = options
        self.role = Role.FOLLOWER
        self._token: int | None = None
        self._deadline = -math.inf
        self._next_renew = math.inf
        self._next_attempt = -math.inf

    @property
    def token(self) -> int | None:
        """The fencing token of the current term, or None when following."""
        return self._token

    @property
    def deadline(self) -> float:
        """Machine time until which the lease is trusted (-inf when following)."""
        return self._deadline

    def is_valid(self, now: float) -> bool:
        """True when this candidate may act as leader at ``now``."""
        return self.role is Role.LEADER and now < self._deadline

    def _wait(self, now: float) -> Wait:
        if self.role is Role.LEADER:
            return Wait(min(self._next_renew, self._deadline))
        return Wait(max(self._next_attempt, now))

    def _step_down(self, reason: str) -> StepDown:
        token = self._token if self._token is not None else 0
        self.role = Role.FOLLOWER
        self._token = None
        self._deadline = -math.inf
        self._next_renew = math.inf
        return StepDown(token, reason)

    def step(self, now: float, observation: Observation) -> Action:
        """Apply ``observation`` at machine time ``now``; return the next action."""
        opts = self.options
        if self.role is Role.FOLLOWER:
            if isinstance(observation, Tick):
                if now >= self._next_attempt:
                    return TryAcquire()
                return self._wait(now)
            if isinstance(observation, Acquired):
                self.role = Role.LEADER
                self._token = observation.token
                self._deadline = observation.sent_at + opts.ttl - opts.margin
                self._next_renew = observation.sent_at + opts.renewal
                if now >= self._deadline:
                    return self._step_down("lease granted too late to be trusted")
                return self._wait(now)
            if isinstance(observation, Busy | Failed):
                delay = opts.poll
                if isinstance(observation, Busy) and observation.expires_in is not None:
                    # Try again just after the holder's lease runs out, not a poll later.
                    delay = min(delay, max(observation.expires_in, 0.0) + 0.002)
                self._next_attempt = now + delay
                return self._wait(now)
            if isinstance(observation, Vacated):
                self._next_attempt = now
                return TryAcquire()
            return self._wait(now)
        # LEADER
        assert self._token is not None
        if now >= self._deadline:
            return self._step_down("lease expired before it was renewed")
        if isinstance(observation, Tick):
            if now >= self._next_renew:
                return Renew(self._token)
            return self._wait(now)
        if isinstance(observation, Renewed):
            self._deadline = max(self._deadline, observation.sent_at + opts.ttl - opts.margin)
            self._next_renew = max(self._next_renew, observation.sent_at + opts.renewal)
            if now >= self._deadline:  # pragma: no cover - guarded above
                return self._step_down("lease expired before it was renewed")
            return self._wait(now)
        if isinstance(observation, Rejected):
            return self._step_down("lease taken over or lost by the backend")
        if isinstance(observation, Failed):
            # Retry soon, but never past the deadline: the check above steps down.
            retry = min(opts.renewal / 4, max(self._deadline - now, 0.0) / 2)
            self._next_renew = now + max(retry, 0.01)
            return self._wait(now)
        if isinstance(observation, Resign):
            return self._step_down("resigned")
        return self._wait(now)
