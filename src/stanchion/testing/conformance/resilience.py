"""Conformance suite of shared breaker-state stores (``stanchion.resilience`` backends).

Run it over a backend by importing the tests into a module that provides a
``backend_url`` fixture (see ``tests/conformance/test_resilience.py``)::

    from stanchion.testing.conformance.resilience import *  # noqa: F403
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from stanchion.errors import CircuitOpenError
from stanchion.resilience import CircuitBreaker, State
from stanchion.resilience._store import open_store

__all__ = [
    "test_store_cas_versions",
    "test_store_isolates_names",
    "test_store_shares_breaker_state",
    "test_store_shares_manual_transitions",
]


def _eventually(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_store_cas_versions(backend_url: str) -> None:
    """load() is None at first; CAS succeeds only against the current version."""
    store = open_store(backend_url)
    try:
        assert store.load("cas") is None
        assert store.compare_and_set("cas", 0, b"one", 60)
        assert store.load("cas") == (1, b"one")
        assert not store.compare_and_set("cas", 0, b"stale", 60)
        assert store.compare_and_set("cas", 1, b"two", 60)
        assert store.load("cas") == (2, b"two")
    finally:
        store.close()


def test_store_isolates_names(backend_url: str) -> None:
    """Two breaker names never see each other's record."""
    store = open_store(backend_url)
    try:
        assert store.compare_and_set("a", 0, b"A", 60)
        assert store.load("b") is None
    finally:
        store.close()


def _breaker(url: str, name: str) -> CircuitBreaker:
    b = CircuitBreaker(
        name,
        store=url,
        sync_interval=0.02,
        window_size=4,
        minimum_calls=4,
        wait_duration_open=60.0,
    )
    assert b.wait_synced(5)
    return b


def test_store_shares_breaker_state(backend_url: str) -> None:
    """Failures seen by two replicas fill one window; both then reject."""
    a, b = _breaker(backend_url, "shared"), _breaker(backend_url, "shared")
    try:
        for replica in (a, b, a, b):
            with pytest.raises(ZeroDivisionError):
                replica.call(lambda: 1 / 0)
        assert _eventually(lambda: a.state is State.OPEN and b.state is State.OPEN)
        with pytest.raises(CircuitOpenError):
            b.call(lambda: None)
    finally:
        a.close()
        b.close()


def test_store_shares_manual_transitions(backend_url: str) -> None:
    """force_open / reset on one replica reach the others."""
    a, b = _breaker(backend_url, "manual"), _breaker(backend_url, "manual")
    try:
        a.force_open()
        assert _eventually(lambda: b.state is State.FORCED_OPEN)
        b.reset()
        assert _eventually(lambda: a.state is State.CLOSED)
    finally:
        a.close()
        b.close()
