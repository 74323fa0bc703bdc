"""The facade: lost events, stepping down on time, resign, callbacks, repr."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from stanchion.election import Grant, Holder, LeaderElector, Lease
from stanchion.election._backend import Capabilities
from stanchion.election._core import LeaseOptions
from stanchion.election.backends._memory import MemoryLeases
from stanchion.errors import BackendUnavailable, LeadershipLost
from stanchion.urls import parse_url


class Flaky:
    """Wraps a backend; renew() fails with ``error`` while it is set."""

    capabilities = Capabilities()

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.error: Exception | None = None
        self.renewals = 0

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        result: Grant | Holder | None = await self.inner.acquire(group, identity, ttl)
        return result

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        self.renewals += 1
        if self.error is not None:
            raise self.error
        ok: bool = await self.inner.renew(group, identity, token, ttl)
        return ok

    async def release(self, group: str, identity: str, token: int) -> None:
        await self.inner.release(group, identity, token)

    async def observe(self, group: str) -> Holder | None:
        result: Holder | None = await self.inner.observe(group)
        return result

    async def wait(self, group: str, seconds: float) -> bool:
        result: bool = await self.inner.wait(group, seconds)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()


def flaky(memory_url: str) -> Flaky:
    return Flaky(MemoryLeases.from_url(parse_url(memory_url)))


async def test_steps_down_on_time_when_renewals_fail(memory_url: str) -> None:
    backend = flaky(memory_url)
    short = LeaderElector(backend, "g", "a", options=LeaseOptions(ttl=1.0))
    lease = await short.campaign()
    deadline = lease.deadline
    backend.error = BackendUnavailable("down")
    await asyncio.wait_for(lease.lost.wait(), 2)
    lost_at = time.monotonic()
    assert abs(lost_at - deadline) < 0.1, f"stepped down {lost_at - deadline:+.3f}s off"
    assert backend.renewals >= 3  # it kept retrying until the deadline
    assert lease.reason == "lease expired before it was renewed"
    assert not lease.is_valid() and short.lease is None
    await short.aclose()


async def test_unexpected_backend_error_counts_as_a_failed_renewal(memory_url: str) -> None:
    backend = flaky(memory_url)
    elector = LeaderElector(backend, "g", "a", options=LeaseOptions(ttl=1.0))
    lease = await elector.campaign()
    backend.error = RuntimeError("driver bug")
    await asyncio.wait_for(lease.lost.wait(), 2)
    await elector.aclose()


async def test_taken_over_sets_lost_at_next_renewal(memory_url: str) -> None:
    elector = LeaderElector.from_url(memory_url, "g", "a", ttl=1.0)
    revoked: list[Lease] = []
    elector.on_revoked(revoked.append)
    lease = await elector.campaign()
    # Someone else's term begins behind our back (as after a long pause).
    space = elector.backend._space  # type: ignore[attr-defined]
    slot = space.slots["g"]
    slot.holder, slot.token, slot.expires = "intruder", slot.token + 1, time.monotonic() + 60
    started = time.monotonic()
    await asyncio.wait_for(lease.lost.wait(), 1.0)
    assert time.monotonic() - started <= 1.0 / 3 + 0.1
    assert lease.reason == "lease taken over or lost by the backend"
    assert revoked == [lease]
    with pytest.raises(LeadershipLost) as info:
        lease.check()
    assert info.value.token == lease.token and info.value.group == "g"
    await elector.aclose()


async def test_campaign_twice_returns_the_same_lease(memory_url: str) -> None:
    elector = LeaderElector.from_url(memory_url, "g", "a", ttl=1.0)
    first = await elector.campaign()
    assert await elector.campaign() is first
    assert elector.is_leader and elector.lease is first
    assert "token=1 valid" in repr(first) and "group='g'" in repr(elector)
    await elector.resign()
    await elector.resign()  # idempotent
    assert not elector.is_leader and "lost" in repr(first)
    second = await elector.campaign()
    assert second.token == first.token + 1
    await elector.aclose()
    assert second.lost.is_set()


async def test_callback_errors_do_not_break_the_elector(memory_url: str) -> None:
    def boom(lease: Lease) -> None:
        raise RuntimeError("callback bug")

    elector = LeaderElector.from_url(memory_url, "g", "a", ttl=1.0, on_elected=boom)
    lease = await elector.campaign()
    assert lease.is_valid()
    await elector.aclose()
