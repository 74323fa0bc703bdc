"""The proxy against real local upstreams: routing, headers, retries, timeouts, breakers."""

from __future__ import annotations

import asyncio
import time

from conftest import (
    AmbassadorFactory,
    KeepAliveClient,
    UpstreamFactory,
    raw,
    request,
    upstream_toml,
)


async def test_routing_rewrite_and_forwarded_headers(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml("pay", up.url)
        + """
[[routes]]
prefix = "/payments/"
upstream = "pay"
rewrite_prefix = "/v1/"
[routes.request_headers]
add = { "x-team" = "shop" }
remove = ["cookie"]
[routes.response_headers]
add = { "x-via" = "ambassador" }
remove = ["x-internal"]
"""
    )
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = await request(
        amb.port,
        "GET",
        "/payments/charge?id=7",
        {
            "x-forwarded-for": "6.6.6.6",
            "x-forwarded-host": "evil",
            "connection": "x-secret, keep-alive",
            "x-secret": "must-not-pass",
            "keep-alive": "timeout=5",
            "proxy-authorization": "Basic Zm9v",
            "te": "trailers",
            "cookie": "a=b",
            "x-request-id": "req-123",
            "traceparent": tp,
        },
    )
    assert r.status == 200
    seen = r.json()
    h = seen["headers"]
    assert seen["path"] == "/v1/charge?id=7"
    assert h["host"] == f"127.0.0.1:{up.port}"  # Host rewritten to the upstream
    assert h["x-forwarded-for"] == "127.0.0.1"  # untrusted peer: replaced
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == f"127.0.0.1:{amb.port}"
    assert h["x-request-id"] == "req-123"
    for hop in ("x-secret", "keep-alive", "proxy-authorization", "te", "cookie"):
        assert hop not in h, hop
    assert h["x-team"] == "shop"
    trace, span = h["traceparent"].split("-")[1:3]
    assert trace == "4bf92f3577b34da6a3ce929d0e0e4736" and span != "00f067aa0ba902b7"
    # response side: hop-by-hop named in Connection removed, ops applied
    assert "x-hop" not in r.headers and "x-internal" not in r.headers
    assert r.headers["x-via"] == "ambassador"


async def test_request_id_and_trace_started_when_absent(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n')
    a = (await request(amb.port, "GET", "/x", {"traceparent": "garbage"})).json()["headers"]
    b = (await request(amb.port, "GET", "/x")).json()["headers"]
    assert a["x-request-id"] and a["x-request-id"] != b["x-request-id"]
    parts = a["traceparent"].split("-")
    assert parts[0] == "00" and len(parts[1]) == 32 and len(parts[2]) == 16


async def test_trusted_proxy_appends_forwarded_for(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        '[listen]\naddress = "127.0.0.1:0"\ntrusted_proxies = ["127.0.0.0/8"]\n'
        + upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    h = (await request(amb.port, "GET", "/", {"x-forwarded-for": "1.2.3.4"})).json()["headers"]
    assert h["x-forwarded-for"] == "1.2.3.4, 127.0.0.1"


async def test_no_route_is_404_json(ambassador: AmbassadorFactory) -> None:
    amb = await ambassador(
        upstream_toml("u", "http://127.0.0.1:9") + '[[routes]]\npath="/only"\nupstream="u"\n'
    )
    r = await request(amb.port, "GET", "/elsewhere")
    assert r.status == 404 and r.json()["error"] == "no-route"
    assert r.headers["content-type"] == "application/json"


async def test_methods_and_exact_path(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    a, b = await upstream("a"), await upstream("b")
    amb = await ambassador(
        upstream_toml("a", a.url)
        + upstream_toml("b", b.url)
        + '[[routes]]\npath="/x"\nmethods=["POST"]\nupstream="a"\n'
        + '[[routes]]\nprefix="/x"\nupstream="b"\n'
    )
    assert (await request(amb.port, "POST", "/x", body=b"1")).json()["upstream"] == "a"
    assert (await request(amb.port, "GET", "/x")).json()["upstream"] == "b"
    assert (await request(amb.port, "POST", "/x/y", body=b"1")).json()["upstream"] == "b"


async def test_keep_alive_and_pipelining(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n')
    async with KeepAliveClient(amb.port) as c:
        for i in range(5):
            r = await c.get(f"/n/{i}")
            assert r.status == 200 and r.json()["path"] == f"/n/{i}"
    # pipelined: three requests in one write, three responses in order
    data = b"".join(
        b"GET /p/%d HTTP/1.1\r\nhost: x\r\n%s\r\n"
        % (i, b"connection: close\r\n" if i == 2 else b"")
        for i in range(3)
    )
    out = await raw(amb.port, data)
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.index(b"/p/0") < out.index(b"/p/1") < out.index(b"/p/2")
    assert up.connections <= 2  # pooled upstream keep-alive


async def test_chunked_request_and_response(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n')
    out = await raw(
        amb.port,
        b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    assert b"200" in out.split(b"\r\n")[0] and b'"body_len": 11' in out
    r = await request(amb.port, "GET", "/chunked")
    assert r.status == 200 and r.body == b"hello world"


async def test_get_retried_on_503_until_success(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(fail_first=2, fail_status=503)
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
        + '[routes.retry]\nattempts = 3\non = ["5xx"]\nbackoff = { base = 0.001, max = 0.01 }\n'
    )
    r = await request(amb.port, "GET", "/x")
    assert r.status == 200 and len(up.requests()) == 3


async def test_no_retry_without_retry_table(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(mode="503")
    amb = await ambassador(upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n')
    r = await request(amb.port, "GET", "/x")
    assert r.status == 503 and len(up.requests()) == 1


async def test_post_not_retried_unless_idempotency_key_or_route_says_so(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(mode="503")
    retry = '[routes.retry]\nattempts = 3\non = ["5xx"]\nbackoff = { base = 0.001, max = 0.001 }\n'
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/charge"\nupstream="u"\n'
        + retry
        + '[[routes]]\nprefix="/refund"\nupstream="u"\n'
        + retry.replace("on = [", 'methods = ["POST"]\non = [')
    )
    r = await request(amb.port, "POST", "/charge", body=b"{}")
    assert r.status == 503 and len(up.requests()) == 1
    up.hits.clear()
    r = await request(amb.port, "POST", "/charge", {"idempotency-key": "k1"}, body=b"{}")
    assert r.status == 503 and len(up.requests()) == 3
    assert all(h.body_len == 2 for h in up.requests())  # replayed from the buffer
    up.hits.clear()
    r = await request(amb.port, "POST", "/refund", body=b"{}")
    assert len(up.requests()) == 3


async def test_body_larger_than_replay_buffer_is_not_retried(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(mode="503")
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
        + '[routes.retry]\nattempts = 3\non = ["5xx"]\nreplay_buffer_bytes = 1024\n'
    )
    r = await request(amb.port, "PUT", "/x", body=b"a" * 4096)
    assert r.status == 503 and len(up.requests()) == 1
    up.hits.clear()
    r = await request(amb.port, "PUT", "/x", body=b"a" * 512)
    assert len(up.requests()) == 3


async def test_connect_failure_is_502_after_retries(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    from stanchion.testing.servers import free_port

    dead = free_port()
    amb = await ambassador(
        upstream_toml("u", f"http://127.0.0.1:{dead}", extra="connect_timeout = 0.5")
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
        + '[routes.retry]\nattempts = 3\non = ["connect-failure"]\n'
    )
    r = await request(amb.port, "GET", "/x")
    assert r.status == 502 and r.headers["x-stanchion-reason"] == "connect-failure"
    text = amb.metrics.render().decode()
    assert 'stanchion_ambassador_retries_total{route="route0",upstream="u"} 2.0' in text


async def test_retry_moves_to_another_endpoint(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    from stanchion.testing.servers import free_port

    good = await upstream("good")
    amb = await ambassador(
        upstream_toml("u", f"http://127.0.0.1:{free_port()}", good.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
        + '[routes.retry]\nattempts = 2\non = ["connect-failure"]\n'
    )
    for _ in range(6):
        assert (await request(amb.port, "GET", "/x")).status == 200


async def test_reset_before_response_is_502_or_retried(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/plain"\nupstream="u"\n'
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
        + '[routes.retry]\nattempts = 3\non = ["reset"]\n'
    )
    r = await request(amb.port, "GET", "/plain/reset")
    assert r.status == 502 and r.headers["x-stanchion-reason"] == "upstream-reset"
    up.hits.clear()
    r = await request(amb.port, "GET", "/reset")
    assert r.status == 502 and len(up.requests()) == 3


async def test_retry_budget_stops_a_retry_storm(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(mode="503")
    amb = await ambassador(
        upstream_toml("u", up.url, extra="[upstreams.pool]\nmax_connections = 500")
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
        + '[routes.retry]\nattempts = 5\non = ["5xx"]\nbackoff = { base = 0.05, max = 0.05 }\n'
        + "budget = { ratio = 0.1, min_retry_concurrency = 1 }\n"
    )
    n = 100
    rs = await asyncio.gather(*(request(amb.port, "GET", f"/{i}") for i in range(n)))
    assert all(r.status == 503 for r in rs)
    hits = len(up.requests())
    # Without a budget: 500 upstream calls. With it, retries are a small fraction.
    assert n <= hits < n + 0.5 * n * 4, hits
    text = amb.metrics.render().decode()
    assert "stanchion_ambassador_retry_budget_exhausted_total" in text


async def test_per_try_timeout_retries_then_succeeds(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(slow_first=1, slow_ms=2000)
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\ntimeout = 5.0\nper_try_timeout = 0.2\n'
        + '[routes.retry]\nattempts = 2\non = ["timeout"]\n'
    )
    t0 = time.monotonic()
    r = await request(amb.port, "GET", "/x")
    assert r.status == 200 and time.monotonic() - t0 < 1.5
    assert len(up.requests()) == 2


async def test_overall_timeout_is_504(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\ntimeout = 0.3\n'
    )
    t0 = time.monotonic()
    r = await request(amb.port, "GET", "/slow/3000")
    assert r.status == 504 and r.headers["x-stanchion-reason"] == "timeout"
    assert 0.25 < time.monotonic() - t0 < 1.5


async def test_overall_timeout_cuts_a_body_stalled_mid_way(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\ntimeout = 0.5\n'
    )
    t0 = time.monotonic()
    out = await raw(amb.port, b"GET /hang-mid-body HTTP/1.1\r\nhost: x\r\n\r\n", wait=5)
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"0123456789")
    assert 0.4 < elapsed < 2.0  # cut at the deadline, not at the client's timeout


async def test_breaker_opens_then_recovers_through_half_open(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream(mode="503")
    amb = await ambassador(
        upstream_toml(
            "u",
            up.url,
            extra="[upstreams.circuit_breaker]\nminimum_calls = 4\nwindow_size = 4\n"
            "failure_rate_threshold = 0.5\nwait_duration_open = 0.5\nhalf_open_calls = 2\n",
        )
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    for _ in range(4):
        assert (await request(amb.port, "GET", "/x")).status == 503
    assert len(up.requests()) == 4
    t0 = time.monotonic()
    r = await request(amb.port, "GET", "/x")
    assert r.status == 503 and r.headers["x-stanchion-reason"] == "circuit-open"
    assert time.monotonic() - t0 < 0.1 and len(up.requests()) == 4  # rejected at once
    assert r.json()["error"] == "circuit-open"
    circuits = amb.upstreams["u"].breaker.state.name
    assert circuits == "OPEN"
    up.mode = ""  # the upstream recovers
    await asyncio.sleep(0.6)
    assert (await request(amb.port, "GET", "/x")).status == 200  # half-open trial
    assert (await request(amb.port, "GET", "/x")).status == 200
    assert amb.upstreams["u"].breaker.state.name == "CLOSED"
    assert (await request(amb.port, "GET", "/x")).status == 200


async def test_outlier_ejection_moves_traffic(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    bad, good = await upstream("bad", mode="500"), await upstream("good")
    amb = await ambassador(
        upstream_toml(
            "u",
            bad.url,
            good.url,
            extra="[upstreams.outlier_detection]\nconsecutive_5xx = 2\n"
            "base_ejection_time = 30.0\nmax_ejection_percent = 50\n",
        )
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    for _ in range(8):
        await request(amb.port, "GET", "/x")
    assert len(bad.requests()) == 2
    before = len(good.requests())
    for _ in range(10):
        assert (await request(amb.port, "GET", "/x")).status == 200
    assert len(good.requests()) == before + 10 and len(bad.requests()) == 2
    assert "stanchion_ambassador_ejections_total" in amb.metrics.render().decode()


async def test_active_health_check_marks_down_and_up(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml(
            "u",
            up.url,
            extra='[upstreams.health_check]\npath = "/health"\ninterval = 0.05\n'
            "timeout = 0.5\nunhealthy_threshold = 2\nhealthy_threshold = 1\n",
        )
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    assert (await request(amb.port, "GET", "/x")).status == 200
    up.healthy = False
    await asyncio.sleep(0.4)
    r = await request(amb.port, "GET", "/x")
    assert r.status == 503 and r.headers["x-stanchion-reason"] == "no-healthy-endpoint"
    up.healthy = True
    await asyncio.sleep(0.3)
    assert (await request(amb.port, "GET", "/x")).status == 200
    assert up.health_hits >= 5


async def test_rate_limit(upstream: UpstreamFactory, ambassador: AmbassadorFactory) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n[routes.rate_limit]\nrate = 0.5\nburst = 3\n'
    )
    statuses = [(await request(amb.port, "GET", "/x")) for _ in range(5)]
    assert [r.status for r in statuses] == [200, 200, 200, 503, 503]
    assert statuses[-1].headers["x-stanchion-reason"] == "rate-limited"
    assert len(up.requests()) == 3


async def test_fault_injection_percentages(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/abort"\nupstream="u"\n'
        + "[routes.fault]\nabort = 503\npercentage = 25.0\n"
        + '[[routes]]\nprefix="/delay"\nupstream="u"\n'
        + "[routes.fault]\ndelay = 0.3\ndelay_percentage = 50.0\n"
    )
    n = 800
    aborted = 0
    async with KeepAliveClient(amb.port) as c:
        for _ in range(n):
            r = await c.get("/abort")
            if r.status == 503:
                assert r.headers["x-stanchion-reason"] == "fault-abort"
                aborted += 1
    assert abs(aborted / n - 0.25) < 0.06, aborted
    assert len(up.requests()) == n - aborted

    times: list[float] = []

    async def worker() -> None:
        async with KeepAliveClient(amb.port) as c:
            for _ in range(15):
                t0 = time.monotonic()
                assert (await c.get("/delay")).status == 200
                times.append(time.monotonic() - t0)

    await asyncio.gather(*(worker() for _ in range(10)))
    delayed = sum(1 for t in times if t >= 0.3)
    assert 50 <= delayed <= 100, delayed  # 150 requests, 50 % delayed


async def test_pool_reuses_upstream_connections(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n')
    for _ in range(20):
        assert (await request(amb.port, "GET", "/x")).status == 200
    assert up.connections == 1


async def test_pool_limit_overflow_is_503(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(
        upstream_toml(
            "u", up.url, extra="connect_timeout = 0.3\n[upstreams.pool]\nmax_connections = 1\n"
        )
        + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    slow, fast = await asyncio.gather(
        request(amb.port, "GET", "/slow/1000"),
        request(amb.port, "GET", "/x"),
    )
    assert slow.status == 200
    assert fast.status == 503 and fast.headers["x-stanchion-reason"] == "pool-overflow"
    assert up.connections == 1


async def test_http10_head_expect_and_close_delimited(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    up = await upstream()
    amb = await ambassador(upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n')
    # HTTP/1.0 without Host: served, then closed
    out = await raw(amb.port, b"GET /ten HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b'"path": "/ten"' in out
    # HEAD: headers only, connection still usable
    async with KeepAliveClient(amb.port) as c:
        assert c.writer is not None and c.reader is not None
        c.writer.write(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n")
        head = await c.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length" in head.lower()
        assert (await c.get("/after-head")).json()["path"] == "/after-head"
    # Expect: 100-continue answered by the proxy, the body then flows
    out = await raw(
        amb.port,
        b"POST /e HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\nexpect: 100-continue\r\n"
        b"connection: close\r\n\r\nabc",
    )
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200") and b'"body_len": 3' in out
    assert "expect" not in up.requests()[-1].headers
    # a response delimited by the upstream closing is re-framed for the client
    r = await request(amb.port, "GET", "/close-delimited")
    assert r.status == 200 and r.body == b"until-eof"


async def test_local_replies_carry_a_request_id(ambassador: AmbassadorFactory) -> None:
    amb = await ambassador(
        upstream_toml("u", "http://127.0.0.1:9") + '[[routes]]\npath="/x"\nupstream="u"\n'
    )
    r = await request(amb.port, "GET", "/nope", {"x-request-id": "abc"})
    assert r.headers["x-request-id"] == "abc" and r.json()["request_id"] == "abc"
    r = await request(amb.port, "GET", "/nope")
    assert r.headers["x-request-id"] and r.json()["request_id"] == r.headers["x-request-id"]


async def test_default_admin_port_taken_does_not_stop_the_proxy(
    upstream: UpstreamFactory,
) -> None:
    import io
    import socket

    from stanchion.ambassador import Ambassador, load_config

    up = await upstream()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        blocker.bind(("127.0.0.1", 9901))
        blocker.listen()
    except OSError:
        pass  # someone else holds it already: same situation
    cfg = load_config(
        "t",
        '[listen]\naddress = "127.0.0.1:0"\n'
        + upstream_toml("u", up.url)
        + '[[routes]]\nprefix="/"\nupstream="u"\n',
    )
    amb = Ambassador(cfg, access_log=io.StringIO())
    try:
        await amb.start()
        assert amb.admin_port == 0
        assert (await request(amb.port, "GET", "/x")).status == 200
    finally:
        await amb.close(grace=0.1)
        blocker.close()
