"""Redis-specific: a Redis without persistence restarted empty never reissues a token
and never lets a second leader in while the old one may still trust its lease."""

from __future__ import annotations

import asyncio
import time

from stanchion.election import LeaderElector
from stanchion.testing.pytest_plugin import ServerFactory


async def test_restart_empty_redis_no_second_leader_and_no_reissued_token(
    servers: ServerFactory,
) -> None:
    server = servers.redis(appendonly=False)
    url = server.url + "?prefix=t:"
    old = LeaderElector.from_url(url, "g", "old", ttl=2.0, connect_timeout=0.5)
    new = LeaderElector.from_url(url, "g", "new", ttl=2.0, connect_timeout=0.5)
    try:
        lease = await old.campaign()
        await asyncio.to_thread(server.kill)
        deadline = lease.deadline  # no renewal can succeed from here on
        assert deadline > time.monotonic()
        await asyncio.to_thread(server.start)  # same port, no data: the lease key is gone
        restarted = time.monotonic()
        assert await new.leader() is None  # Redis forgot everything ...
        new_lease = await asyncio.wait_for(new.campaign(), 10)
        elected = time.monotonic()
        # ... yet it elected nobody while the old leader could still trust its lease,
        assert elected >= deadline, f"elected {deadline - elected:.2f}s before the old deadline"
        assert elected - restarted >= 1.0
        assert not lease.is_valid()
        # and the new token is above every token issued before the restart.
        assert new_lease.token > lease.token
    finally:
        await old.aclose()
        await new.aclose()


async def test_tokens_are_clock_derived_and_increase_within_one_redis(redis_url: str) -> None:
    e = LeaderElector.from_url(redis_url, "g", "a", ttl=1.0)
    try:
        tokens = []
        for _ in range(5):
            tokens.append((await e.campaign()).token)
            await e.resign()
        assert tokens == sorted(set(tokens))
        assert tokens[0] > 1_600_000_000 * 10**6  # microseconds of Redis TIME
    finally:
        await e.aclose()
