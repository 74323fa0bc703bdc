"""Conformance suite for election backends (``stanchion.election``).

Import the tests into a module that provides a ``backend_url`` fixture::

    from stanchion.testing.conformance.election import *  # noqa: F403

    @pytest.fixture(params=backend_params("memory", "sqlite", "file"))
    def backend_url(request): ...

A backend is done when every test passes on it.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from stanchion.clock import ManualClock
from stanchion.election import LeaderElector, Lease
from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.testing.servers import free_port
from stanchion.urls import parse_url

__all__ = [
    "TTL",
    "test_bad_url_is_config_error",
    "test_callbacks_fire",
    "test_is_valid_reads_the_clock_at_call_time",
    "test_leadership_block_resigns_on_exit",
    "test_observe_leader",
    "test_one_leader_among_five",
    "test_resign_hands_over_well_under_ttl",
    "test_tokens_strictly_increase_over_20_terms",
    "test_unreachable_backend_is_backend_unavailable",
    "ttl_for",
]

TTL = 1.0
"""Lease length used by the suite (etcd: 2 s, it grants whole seconds and at least 2)."""


def ttl_for(url: str) -> float:
    """The suite's lease length for ``url``."""
    return 2.0 if parse_url(url).scheme == "etcd" else TTL


def _electors(url: str, n: int, group: str = "g", **kw: object) -> list[LeaderElector]:
    return [
        LeaderElector.from_url(url, group, f"node-{i}", ttl=ttl_for(url), **kw)  # type: ignore[arg-type]
        for i in range(n)
    ]


async def _close(electors: list[LeaderElector]) -> None:
    for e in electors:
        await e.aclose()


async def test_one_leader_among_five(backend_url: str) -> None:
    # A longer lease here: the leader must keep it through scheduling hiccups of a
    # busy test machine while four followers poll.
    ttl = 2 * ttl_for(backend_url)
    electors = [LeaderElector.from_url(backend_url, "g", f"node-{i}", ttl=ttl) for i in range(5)]
    try:
        tasks = [asyncio.ensure_future(e.campaign()) for e in electors]
        done, pending = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "expected exactly one leader"
        lease = done.pop().result()
        # Stay leader over more than a ttl: renewals keep the others out.
        await asyncio.sleep(ttl * 1.2)
        assert lease.is_valid()
        assert not any(t.done() for t in pending), "a second candidate was elected"
        assert sum(e.is_leader for e in electors) == 1
        info = await electors[0].leader()
        assert info is not None and info.identity == lease.identity and info.token == lease.token
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await _close(electors)


async def test_tokens_strictly_increase_over_20_terms(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    electors = _electors(backend_url, 3)
    tokens: list[int] = []
    try:
        for i in range(20):
            elector = electors[i % 3]
            lease = await asyncio.wait_for(elector.campaign(), ttl * 3)
            tokens.append(lease.token)
            await elector.resign()
            assert not lease.is_valid() and lease.lost.is_set()
        assert all(b > a for a, b in itertools.pairwise(tokens)), tokens
    finally:
        await _close(electors)


async def test_resign_hands_over_well_under_ttl(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    first, second = _electors(backend_url, 2)
    try:
        lease = await asyncio.wait_for(first.campaign(), ttl * 3)
        waiting = asyncio.ensure_future(second.campaign())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        started = time.monotonic()
        await first.resign()
        new = await asyncio.wait_for(waiting, ttl)
        elapsed = time.monotonic() - started
        assert new.token > lease.token
        assert elapsed < ttl / 2, f"handover took {elapsed:.2f}s with ttl {ttl}s"
    finally:
        await _close([first, second])


async def test_observe_leader(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    leader, watcher = _electors(backend_url, 2)
    try:
        assert await watcher.leader() is None
        lease = await asyncio.wait_for(leader.campaign(), ttl * 3)
        info = await watcher.leader()
        assert info is not None
        assert (info.identity, info.token) == ("node-0", lease.token)
        left = info.expires_at - watcher.clock()
        assert 0 < left <= ttl + 1.0
        assert not watcher.is_leader  # observing never campaigns
        await leader.resign()
        assert await watcher.leader() is None
    finally:
        await _close([leader, watcher])


async def test_leadership_block_resigns_on_exit(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    first, second = _electors(backend_url, 2)
    try:
        async with first.leadership() as lease:
            assert isinstance(lease, Lease) and lease.is_valid()
            assert first.lease is lease
        assert lease.lost.is_set() and not lease.is_valid()
        started = time.monotonic()
        new = await asyncio.wait_for(second.campaign(), ttl)
        assert time.monotonic() - started < ttl / 2
        assert new.token > lease.token
    finally:
        await _close([first, second])


async def test_callbacks_fire(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    (elector,) = _electors(backend_url, 1)
    seen: list[tuple[str, int]] = []
    elector.on_elected(lambda lease: seen.append(("elected", lease.token)))

    async def revoked(lease: Lease) -> None:
        seen.append(("revoked", lease.token))

    elector.on_revoked(revoked)
    try:
        lease = await asyncio.wait_for(elector.campaign(), ttl * 3)
        await elector.resign()
        assert seen == [("elected", lease.token), ("revoked", lease.token)]
    finally:
        await elector.aclose()


async def test_is_valid_reads_the_clock_at_call_time(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    clock = ManualClock(1000.0)
    (elector,) = _electors(backend_url, 1, clock=clock)
    try:
        lease = await asyncio.wait_for(elector.campaign(), ttl * 3)
        assert lease.is_valid()
        clock.advance(ttl)  # a "pause" longer than the lease: no task has run since
        assert not lease.is_valid()
        assert lease.remaining() == 0.0
    finally:
        await elector.aclose()


def test_bad_url_is_config_error(backend_url: str) -> None:
    with pytest.raises(ConfigError, match="no election backend for scheme 'nosuch'"):
        LeaderElector.from_url("nosuch://x", "g", "n")
    with pytest.raises(ConfigError, match="invalid backend URL"):
        LeaderElector.from_url("not a url", "g", "n")
    with pytest.raises(ConfigError, match="ttl"):
        LeaderElector.from_url(backend_url, "g", "n", ttl=0)
    with pytest.raises(ConfigError, match="renew_every"):
        LeaderElector.from_url(backend_url, "g", "n", ttl=1, renew_every=2)


def _unreachable(url: str) -> str | None:
    scheme = parse_url(url).scheme
    port = free_port()
    return {
        "sqlite": "sqlite:////nonexistent-stanchion-dir/sub/election.db",
        "file": "file:///dev/null/election",
        "postgresql": f"postgresql://postgres@127.0.0.1:{port}/postgres",
        "redis": f"redis://127.0.0.1:{port}/0",
        "etcd": f"etcd://127.0.0.1:{port}",
    }.get(scheme)


async def test_unreachable_backend_is_backend_unavailable(backend_url: str) -> None:
    ttl = ttl_for(backend_url)
    url = _unreachable(backend_url)
    if url is None:  # in-process: always reachable; campaigning answers at once
        (elector,) = _electors(backend_url, 1, connect_timeout=1.0)
        try:
            await asyncio.wait_for(elector.campaign(), 1.0)
        finally:
            await elector.aclose()
        return
    elector = LeaderElector.from_url(url, "g", "n", ttl=ttl, connect_timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(BackendUnavailable):
            await asyncio.wait_for(elector.campaign(), 5)
        assert time.monotonic() - started < 1.0 + 0.5
        with pytest.raises(BackendUnavailable):
            await elector.leader()
    finally:
        await elector.aclose()
