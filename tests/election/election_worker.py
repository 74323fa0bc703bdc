"""A candidate process for the process tests (run as a script, not collected).

    python election_worker.py URL GROUP ID TTL LOG [FENCE_URL]

Appends one line per event to LOG (``time.monotonic()`` is system-wide on
Linux, so times of different processes compare):

    ready ID 0 T             connected to the backend, about to campaign
    elected ID TOKEN T       campaign() returned at T
    act ID TOKEN T           at T the lease was valid (read before is_valid())
    lost ID TOKEN T REASON   the lease was found lost at T
    stale ID TOKEN T OUTCOME a write through the fence after losing: rejected|accepted
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from stanchion.election import Fence, LeaderElector
from stanchion.errors import BackendUnavailable, StaleFencingToken


def main() -> None:
    url, group, ident, ttl, log = sys.argv[1:6]
    fence_url = sys.argv[6] if len(sys.argv) > 6 else None
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(*parts: object) -> None:
        os.write(fd, (" ".join(str(p) for p in parts) + "\n").encode())

    async def run() -> None:
        elector = LeaderElector.from_url(url, group, ident, ttl=float(ttl), connect_timeout=1.0)
        fence = Fence(fence_url, "resource") if fence_url else None

        async def fenced(token: int) -> None:
            assert fence is not None
            await fence.write(token, lambda handle: None)

        while True:
            try:
                await elector.leader()  # connected: from here on, it campaigns
                break
            except BackendUnavailable:
                await asyncio.sleep(0.1)
        emit("ready", ident, 0, time.monotonic())
        while True:
            try:
                lease = await elector.campaign()
            except BackendUnavailable:
                await asyncio.sleep(0.2)
                continue
            emit("elected", ident, lease.token, time.monotonic())
            while True:
                now = time.monotonic()
                if not lease.is_valid():
                    break
                emit("act", ident, lease.token, now)
                if fence is not None:
                    try:
                        await fenced(lease.token)
                    except (StaleFencingToken, BackendUnavailable):
                        pass
                await asyncio.sleep(0.05)
            emit(
                "lost", ident, lease.token, time.monotonic(), (lease.reason or "").replace(" ", "_")
            )
            if fence is not None:
                try:
                    await fenced(lease.token)
                    emit("stale", ident, lease.token, time.monotonic(), "accepted")
                except StaleFencingToken:
                    emit("stale", ident, lease.token, time.monotonic(), "rejected")
                except BackendUnavailable:
                    emit("stale", ident, lease.token, time.monotonic(), "unavailable")

    asyncio.run(run())


if __name__ == "__main__":
    main()
