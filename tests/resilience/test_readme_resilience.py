"""The README example, run against a local flaky HTTP server."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from stanchion.errors import CircuitOpenError
from stanchion.resilience import (
    CircuitBreaker,
    Exponential,
    Policy,
    Retry,
    State,
    Timeout,
)


async def test_readme_breaker_with_retry_around_aiohttp() -> None:
    statuses = [503, 503, 200]
    hits = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        status = statuses.pop(0) if statuses else 503
        return web.json_response({"order": request.match_info["order"]}, status=status)

    app = web.Application()
    app.router.add_post("/charge/{order}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        breaker = CircuitBreaker("payments", minimum_calls=4, window_size=4)
        retry = Retry(3, backoff=Exponential(base=0.01, max=0.05), deadline=5.0)

        @Policy(retry, breaker, Timeout(2.0))
        async def charge(session: aiohttp.ClientSession, order: str) -> dict[str, object]:
            async with session.post(f"{base}/charge/{order}") as resp:
                resp.raise_for_status()
                return await resp.json()  # type: ignore[no-any-return]

        async with aiohttp.ClientSession() as session:
            assert await charge(session, "o-1") == {"order": "o-1"}
            assert hits == 3
            assert breaker.metrics.failed_calls == 2
            # the next failure opens the breaker (3 of 4 failed); the retry stops there
            with pytest.raises(CircuitOpenError):
                await charge(session, "o-2")
            assert hits == 4
            assert breaker.state is State.OPEN
            before = hits
            with pytest.raises(CircuitOpenError):
                await charge(session, "o-3")
            assert hits == before  # rejected without a request
    finally:
        await runner.cleanup()
