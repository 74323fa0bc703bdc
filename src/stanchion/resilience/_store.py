"""Keeping one breaker in step with a shared store (the replica side).

Theory of operation
-------------------

Every replica keeps its local :class:`BreakerMachine`, so a call never waits
for the network: admission and recording stay local and take microseconds.
A background thread per breaker exchanges with the store every
``sync_interval`` seconds (at once after a failure):

1. it takes the outcomes recorded locally since the last exchange (each
   tagged with the local state it was recorded in, and wall-clock time,
   since monotonic clocks are not comparable across hosts) and any manual
   transition (force_open / disable / reset / open);
2. it loads the shared machine (a blob + version), replays those outcomes
   on it with the same pure core (an outcome counts only if the shared
   machine is in the state it was recorded in), applies time-driven
   transitions, and writes it back by compare-and-set; on a conflict it
   reloads and replays (optimistic concurrency; the CAS is atomic in the
   store, a Lua script in Redis);
3. it makes the local machine *follow* the shared state: a follower records
   into its window but makes no decision of its own; ``adopt`` sets its
   state (with the shared ``changed_at`` translated to the local clock).

If the store cannot be reached (every exchange is bounded by the store's
timeout), the replica falls back: the local machine stops following and
decides from its own window, the ``stanchion_breaker_store_fallback`` gauge
goes to 1 and ``breaker.store_unavailable`` is logged once. The thread keeps
trying (backing off to 1 s); when the store answers, the outcomes seen during
the outage are pushed, the replica follows again and logs
``breaker.store_rejoined``.

Half-open across replicas: exactly ``half_open_calls`` trials run in all.
The shared machine owns the trial slots and lends them: a follower enters
HALF_OPEN with no slot, a call finding none is rejected (``retry_after`` 0)
and counted as demand, and the next exchange returns the replica's unused
slots and borrows as many as were wanted (atomically, in the same CAS). The
shared machine decides once ``half_open_calls`` outcomes arrived. Calls never
wait for a slot: they are rejected at once, as in a local half-open state.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from stanchion.errors import ConfigError, ConflictError
from stanchion.observability import get_logger
from stanchion.resilience._backend import BreakerStore
from stanchion.resilience._core import (
    FAILURE,
    IGNORED,
    BreakerConfig,
    BreakerMachine,
    BreakerMetrics,
    State,
    Transition,
)
from stanchion.urls import default_registry

if TYPE_CHECKING:
    from stanchion.resilience._breaker import CircuitBreaker

__all__ = ["SharedState", "open_store", "read_shared", "update_shared"]

_OPS = {"forced_open": "force_open", "disabled": "disable", "closed": "reset", "open": "open"}
_MAX_PENDING = 10_000


def open_store(url: str) -> BreakerStore:
    """Build the store registered for ``url``'s scheme."""
    target, parsed = default_registry.load("resilience", url)
    from_url = getattr(target, "from_url", None)
    if from_url is None:
        raise ConfigError(f"{target!r} is not a breaker store (no from_url)")
    return cast(BreakerStore, from_url(parsed))


def read_shared(store: BreakerStore, name: str) -> tuple[int, BreakerMachine] | None:
    """The (version, machine) stored for ``name`` (config as the writer had it), or None."""
    got = store.load(name)
    if got is None:
        return None
    data = msgspec.json.decode(got[1])
    config = BreakerConfig(**data.get("config", {}))
    return got[0], BreakerMachine.load(config, data)


def update_shared(
    store: BreakerStore,
    name: str,
    apply: Callable[[BreakerMachine, float], None],
    *,
    config: BreakerConfig | None = None,
    ttl: float = 3600.0,
) -> BreakerMachine:
    """Apply ``apply(machine, wall_now)`` to the shared record by compare-and-set.

    Without a record yet, a machine is made from ``config`` (defaults if None).
    """
    for _ in range(20):
        wall = time.time()
        found = read_shared(store, name)
        version, machine = found if found is not None else (0, None)
        if machine is None:
            machine = BreakerMachine(config or BreakerConfig(), wall)
        machine.poll(wall)
        apply(machine, wall)
        if store.compare_and_set(name, version, msgspec.json.encode(machine.dump()), ttl):
            return machine
    raise ConflictError(f"breaker {name!r}: the shared record kept changing; try again")


class SharedState:
    """The sync thread and bookkeeping of one breaker with ``store=``."""

    def __init__(self, breaker: CircuitBreaker, url: str, *, sync_interval: float) -> None:
        if not sync_interval > 0:
            raise ConfigError("sync_interval must be > 0 seconds")
        self.store = open_store(url)
        self.name = breaker.name
        self.interval = sync_interval
        self.fallback = False
        self.errors = 0
        self.exchanges = 0
        self.last_metrics: BreakerMetrics | None = None
        self._slots_epoch = -1  # the shared epoch our lent trial slots belong to
        self._pending: collections.deque[tuple[int, float, str]] = collections.deque(
            maxlen=_MAX_PENDING
        )
        self._ops: collections.deque[str] = collections.deque()
        self._ttl = max(3600.0, breaker.config.wait_duration_open * 10)
        self._log = get_logger("stanchion.resilience").bind(breaker=breaker.name)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._synced = threading.Event()
        breaker._machine.follower = True
        self._thread = threading.Thread(
            target=_run, args=(weakref.ref(breaker), self), daemon=True, name=f"breaker-{self.name}"
        )
        self._thread.start()

    # -- called from the call path (cheap, never blocks) ----------------------

    def note(self, outcome: int, now: float, state: str) -> None:
        """Queue an outcome recorded locally in ``state``."""
        self._pending.append((outcome, time.time(), state))
        if outcome & FAILURE:
            self._wake.set()

    def want_slot(self) -> None:
        """A call was rejected in half-open for want of a trial slot: ask soon."""
        self._wake.set()

    def local_transition(self, t: Transition, manual: bool) -> None:
        """A transition happened locally; manual ones are pushed to the store."""
        if manual:
            self._ops.append(_OPS[t.new.value])
            self._wake.set()

    def wait_synced(self, timeout: float) -> bool:
        """Block until one exchange succeeded (for tests and start-up)."""
        return self._synced.wait(timeout)

    def close(self) -> None:
        """Stop the thread and close the store."""
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)
        self.store.close()

    # -- the exchange (sync thread) --------------------------------------------

    def step(self, breaker: CircuitBreaker) -> None:
        """One exchange with the store; raises on store errors."""
        batch = [self._pending.popleft() for _ in range(len(self._pending))]
        ops = [self._ops.popleft() for _ in range(len(self._ops))]
        local = breaker._machine
        with breaker._lock:
            # trial slots: give back the unused ones, ask for as many as were wanted
            lending = local.follower and local.state is State.HALF_OPEN
            unused = local.free_slots if lending else 0
            local.free_slots -= unused
            wanted = local.demand
            local.demand = 0
            epoch = local.epoch
        try:
            shared, lent = self._exchange(breaker, batch, ops, unused, wanted)
        except BaseException:
            # keep what we could not push, oldest first, for the next attempt
            self._ops.extendleft(reversed(ops))
            room = _MAX_PENDING - len(self._pending)
            if room > 0:
                self._pending.extendleft(reversed(batch[-room:]))
            with breaker._lock:
                if local.epoch == epoch:
                    local.free_slots += unused
                    local.demand += wanted
            raise
        self.exchanges += 1
        self.last_metrics = shared.metrics(time.time())
        if self.fallback:
            self.fallback = False
            self._log.info("breaker.store_rejoined", state=shared.state.value)
        with breaker._lock:
            now = breaker._clock()
            breaker._flush(now)
            local.follower = True
            local.adopt(shared.state, now - max(0.0, time.time() - shared.changed_at), now)
            if local.state is State.HALF_OPEN:
                local.free_slots += lent
            self._slots_epoch = shared.epoch
            breaker._rearm(now)
        self._synced.set()
        if local.transitions:
            breaker._drain(source="store")

    def _exchange(
        self,
        breaker: CircuitBreaker,
        batch: list[tuple[int, float, str]],
        ops: list[str],
        unused: int,
        wanted: int,
    ) -> tuple[BreakerMachine, int]:
        config = breaker.config
        for _ in range(20):
            wall = time.time()
            got = self.store.load(self.name)
            if got is None:
                version, shared = 0, BreakerMachine(config, wall)
            else:
                version = got[0]
                shared = BreakerMachine.load(config, msgspec.json.decode(got[1]))
            # slots lent in an earlier half-open period are void
            returned = unused if shared.epoch == self._slots_epoch else 0
            for outcome, at, state in batch:
                if outcome != IGNORED and shared.state.value == state:
                    shared.record(outcome, at)
            for op in ops:
                getattr(shared, op)(wall)
            shared.poll(wall)
            lent = shared.lend_slots(returned, wanted)
            changed = batch or ops or shared.transitions or got is None or lent or returned
            if not changed:
                return shared, 0  # nothing to write
            blob = msgspec.json.encode(shared.dump())
            if self.store.compare_and_set(self.name, version, blob, self._ttl):
                return shared, lent
        raise RuntimeError("breaker store: too many concurrent writers")  # pragma: no cover

    def failed(self, breaker: CircuitBreaker, exc: BaseException) -> None:
        """The exchange failed: fall back to local decisions (logged once)."""
        self.errors += 1
        if not self.fallback:
            self.fallback = True
            with breaker._lock:
                breaker._machine.follower = False
            self._log.warning(
                "breaker.store_unavailable", error=f"{type(exc).__name__}: {exc}", fallback="local"
            )


def _run(ref: weakref.ReferenceType[Any], shared: SharedState) -> None:
    delay = 0.0
    while not shared._stop.is_set():
        if shared.fallback:
            shared._stop.wait(delay)  # back off; failures do not hurry a reconnect
        else:
            shared._wake.wait(delay)
        shared._wake.clear()
        if shared._stop.is_set():
            return
        breaker = ref()
        if breaker is None:
            shared.store.close()
            return
        try:
            shared.step(breaker)
            delay = shared.interval
        except Exception as exc:
            shared.failed(breaker, exc)
            delay = min(1.0, max(shared.interval, delay * 2 or shared.interval))
        del breaker
