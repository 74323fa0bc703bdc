"""The pure core: config validation, routing, retry decisions, budget, balancing, outliers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stanchion.ambassador._core import (
    CONNECT_FAILURE,
    RESET,
    TIMEOUT,
    Balancer,
    Endpoint,
    EndpointState,
    FaultConfig,
    HealthCheckConfig,
    Outcome,
    OutcomeKind,
    OutlierConfig,
    RetryBudget,
    RetryPolicy,
    RouteTable,
    TokenBucket,
    backoff_delay,
    check_config_file,
    hop_by_hop_names,
    load_config,
    parse_address,
    parse_traceparent,
    peer_trusted,
)
from stanchion.errors import ConfigError

GOOD = """
[listen]
address = "127.0.0.1:10000"
header_timeout = 5.0
max_headers = 50
trusted_proxies = ["10.0.0.0/8"]

[admin]
address = "127.0.0.1:9901"

[[upstreams]]
name = "payments"
endpoints = ["http://127.0.0.1:8001", "https://pay.example.com/api/"]
load_balancer = "least_request"
connect_timeout = 0.5
[upstreams.circuit_breaker]
failure_rate_threshold = 0.5
minimum_calls = 10
[upstreams.health_check]
path = "/healthz"
interval = 2.0
[upstreams.outlier_detection]
consecutive_5xx = 3

[[routes]]
name = "charge"
prefix = "/payments/"
methods = ["POST", "GET"]
upstream = "payments"
rewrite_prefix = "/v2/"
timeout = 3.0
per_try_timeout = 1.0
[routes.retry]
attempts = 3
on = ["connect-failure", "5xx"]
budget = 0.25
[routes.rate_limit]
rate = 100.0
burst = 20
[routes.request_headers]
add = { "X-Team" = "shop" }
remove = ["Cookie"]
[routes.fault]
abort = 503
percentage = 10.0

[[routes]]
path = "/exact"
upstream = "payments"
"""


def test_good_config_parses_with_defaults() -> None:
    cfg = load_config("a.toml", GOOD)
    assert cfg.listen.port == 10000 and cfg.listen.header_timeout == 5.0
    assert cfg.listen.max_uri_bytes == 8192  # default
    up = cfg.upstreams["payments"]
    assert [e.port for e in up.endpoints] == [8001, 443]
    assert up.endpoints[1].base_path == "/api" and up.endpoints[1].authority == "pay.example.com"
    assert up.circuit_breaker == {"failure_rate_threshold": 0.5, "minimum_calls": 10}
    assert up.health_check is not None and up.health_check.path == "/healthz"
    assert up.outlier_detection is not None and up.outlier_detection.consecutive_5xx == 3
    r0, r1 = cfg.routes
    assert r0.retry.attempts == 3 and r0.retry.budget == 0.25
    assert r0.retry.methods == frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
    assert r0.request_headers.add == ((b"x-team", b"shop"),)
    assert r0.request_headers.remove == frozenset({b"cookie"})
    assert r0.fault is not None and r0.fault.abort_percentage == 10.0
    assert r1.name == "route1" and r1.path == "/exact"


def test_every_error_is_reported_with_its_location() -> None:
    text = """[listen]
address = "nonsense"
max_headers = -1

[admin]
address = "0.0.0.0:9901"

[[upstreams]]
name = "a"
endpoints = ["ftp://x"]
load_balancer = "random"

[[routes]]
prefix = "/a"
upstream = "missing"
[routes.retry]
on = ["5xx", "sometimes"]
attempts = 0

[[routes]]
prefix = "b"
upstream = "a"
typo = 1
"""
    problems = check_config_file("bad.toml", text)
    joined = "\n".join(problems)
    expected = [
        "bad.toml:2: listen.address",
        "bad.toml:3: listen.max_headers",
        "bad.toml:6: admin.address: '0.0.0.0' is not a loopback",
        "bad.toml:10: upstreams[0].endpoints[0]",
        "bad.toml:11: upstreams[0].load_balancer",
        "bad.toml:15: routes[0].upstream: unknown upstream 'missing'",
        "bad.toml:17: routes[0].retry.on: unknown retry condition 'sometimes'",
        "bad.toml:18: routes[0].retry.attempts",
        "bad.toml:21: routes[1].prefix: must start with '/'",
        "bad.toml:23: routes[1].typo: unknown key",
    ]
    for item in expected:
        assert item in joined, (item, joined)
    assert len(problems) >= len(expected)
    with pytest.raises(ConfigError) as info:
        load_config("bad.toml", text)
    assert "routes[0].retry.on" in str(info.value)


def test_toml_syntax_error_has_a_line() -> None:
    problems = check_config_file("x.toml", "[listen]\naddress = \n")
    assert len(problems) == 1 and problems[0].startswith("x.toml:2: TOML syntax error")


def test_no_routes_is_an_error() -> None:
    assert any("no routes" in p for p in check_config_file("x.toml", ""))


def test_admin_remote_needs_opt_in() -> None:
    base = (
        '[[upstreams]]\nname="u"\nendpoints=["http://h:1"]\n[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    assert check_config_file("x", '[admin]\naddress = "0.0.0.0:1"\n' + base)
    assert not check_config_file(
        "x", '[admin]\naddress = "0.0.0.0:1"\nallow_remote = true\n' + base
    )


def _table() -> RouteTable:
    cfg = load_config(
        "t",
        """
[[upstreams]]
name = "u"
endpoints = ["http://h:1"]
[[routes]]
name = "exact"
path = "/health"
upstream = "u"
[[routes]]
name = "api-host"
host = "*.example.com"
prefix = "/"
upstream = "u"
[[routes]]
name = "pay-post"
prefix = "/payments/"
methods = ["POST"]
rewrite_prefix = "/v1/"
upstream = "u"
[[routes]]
name = "pay"
prefix = "/payments"
upstream = "u"
""",
    )
    return RouteTable(cfg.routes)


def test_route_matching_in_order() -> None:
    table = _table()
    r = table.match("GET", "localhost:10000", "/health")
    assert r is not None and r.config.name == "exact"
    assert table.match("GET", "x", "/health/x") is None
    r = table.match("GET", "api.example.com:443", "/payments/x")
    assert r is not None and r.config.name == "api-host"
    r = table.match("POST", "localhost", "/payments/charge?id=1")
    assert r is not None and r.config.name == "pay-post" and r.path == "/v1/charge?id=1"
    r = table.match("GET", "localhost", "/payments/charge")
    assert r is not None and r.config.name == "pay" and r.path == "/payments/charge"
    assert table.match("GET", "localhost", "/other") is None


def test_rewrite_prefix_edge_cases() -> None:
    cfg = load_config(
        "t",
        '[[upstreams]]\nname="u"\nendpoints=["http://h:1"]\n'
        '[[routes]]\nprefix="/a"\nrewrite_prefix="/"\nupstream="u"\n',
    )
    table = RouteTable(cfg.routes)
    assert table.match("GET", "", "/a/b").path == "/b"  # type: ignore[union-attr]
    assert table.match("GET", "", "/a").path == "/"  # type: ignore[union-attr]


def test_retry_decisions() -> None:
    p = RetryPolicy(attempts=3, on=frozenset({"connect-failure", "5xx"}))
    r503 = Outcome(OutcomeKind.RESPONSE, 503)
    assert p.decide(1, r503, "GET")
    assert p.decide(2, CONNECT_FAILURE, "GET")
    assert not p.decide(3, r503, "GET")  # attempts exhausted
    assert not p.decide(1, Outcome(OutcomeKind.RESPONSE, 404), "GET")
    # POST only with an Idempotency-Key (or when the route lists POST)
    assert not p.decide(1, r503, "POST")
    assert p.decide(1, r503, "POST", idempotency_key=True)
    p2 = RetryPolicy(attempts=3, on=frozenset({"5xx"}), methods=frozenset({"POST"}))
    assert p2.decide(1, r503, "POST")
    # a body that overflowed the replay buffer is never retried
    assert not p.decide(1, r503, "GET", replayable=False)


def test_retry_conditions_are_distinct() -> None:
    gw = RetryPolicy(attempts=2, on=frozenset({"gateway-error"}))
    assert gw.retriable(Outcome(OutcomeKind.RESPONSE, 502))
    assert not gw.retriable(Outcome(OutcomeKind.RESPONSE, 500))
    reset = RetryPolicy(attempts=2, on=frozenset({"reset"}))
    assert reset.retriable(RESET) and not reset.retriable(TIMEOUT)
    assert not reset.retriable(CONNECT_FAILURE)
    to = RetryPolicy(attempts=2, on=frozenset({"timeout"}))
    assert to.retriable(TIMEOUT) and not to.retriable(RESET)
    codes = RetryPolicy(
        attempts=2,
        on=frozenset({"retriable-status-codes"}),
        retriable_status_codes=frozenset({409}),
    )
    assert codes.retriable(Outcome(OutcomeKind.RESPONSE, 409))
    assert not codes.retriable(Outcome(OutcomeKind.RESPONSE, 503))


def test_retry_budget_caps_concurrent_retries() -> None:
    p = RetryPolicy(attempts=3, budget=0.2, min_retry_concurrency=3)
    b = RetryBudget()
    b.active_requests = 100
    allowed = 0
    for _ in range(100):
        if b.allows(p):
            b.active_retries += 1
            allowed += 1
    assert allowed == 20
    b2 = RetryBudget()
    b2.active_requests = 2
    assert b2.allows(p)  # the minimum concurrency always applies
    b2.active_retries = 3
    assert not b2.allows(p)


@given(st.integers(1, 10), st.floats(0, 0.999))
def test_backoff_is_capped_full_jitter(retry: int, r: float) -> None:
    p = RetryPolicy(backoff_base=0.01, backoff_max=0.1)
    d = backoff_delay(p, retry, r)
    assert 0 <= d <= min(0.1, 0.01 * 2 ** (retry - 1))


def test_token_bucket() -> None:
    tb = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert tb.take(0.0) and tb.take(0.0) and not tb.take(0.0)
    assert not tb.take(0.05)
    assert tb.take(0.11)


def test_fault_decision_percentages() -> None:
    f = FaultConfig(delay=0.1, delay_percentage=50.0, abort=503, abort_percentage=10.0)
    rng = random.Random(1)
    n = 20000
    aborts = sum(1 for _ in range(n) if f.decide(rng.random(), rng.random())[1] == 503)
    delays = sum(1 for _ in range(n) if f.decide(rng.random(), rng.random())[0] > 0)
    assert abs(aborts / n - 0.10) < 0.01
    assert abs(delays / n - 0.50) < 0.02


def _ep(port: int) -> Endpoint:
    return Endpoint(f"http://h:{port}", "http", "h", port, "")


def test_round_robin_skips_unavailable() -> None:
    states = [EndpointState(_ep(p)) for p in (1, 2, 3)]
    b = Balancer(states, "round_robin")
    picks = [b.pick(0.0).endpoint.port for _ in range(6)]  # type: ignore[union-attr]
    assert sorted(picks) == [1, 1, 2, 2, 3, 3]
    states[1].healthy = False
    assert {b.pick(0.0).endpoint.port for _ in range(6)} == {1, 3}  # type: ignore[union-attr]
    states[0].ejected_until = 10.0
    assert {b.pick(5.0).endpoint.port for _ in range(4)} == {3}  # type: ignore[union-attr]
    states[2].healthy = False
    assert b.pick(5.0) is None
    assert b.pick(11.0) is states[0]


def test_least_request_prefers_idle() -> None:
    states = [EndpointState(_ep(p)) for p in (1, 2)]
    states[0].active = 5
    b = Balancer(states, "least_request", random.Random(0))
    assert all(b.pick(0.0) is states[1] for _ in range(10))


def test_retry_avoids_previous_endpoint() -> None:
    states = [EndpointState(_ep(p)) for p in (1, 2)]
    b = Balancer(states, "round_robin")
    for _ in range(5):
        assert b.pick(0.0, exclude=states[0]) is states[1]


def test_outlier_ejection_and_cap() -> None:
    od = OutlierConfig(consecutive_5xx=3, base_ejection_time=10.0, max_ejection_percent=50.0)
    s = EndpointState(_ep(1))
    r500 = Outcome(OutcomeKind.RESPONSE, 500)
    ok = Outcome(OutcomeKind.RESPONSE, 200)
    assert not s.outlier_result(r500, od, 0.0, 0.0)
    assert not s.outlier_result(ok, od, 0.0, 0.0)  # a success resets the count
    assert not s.outlier_result(r500, od, 0.0, 0.0)
    assert not s.outlier_result(r500, od, 0.0, 0.0)
    assert s.outlier_result(r500, od, 0.0, 0.0)
    assert not s.available(5.0) and s.available(10.0)
    # second ejection lasts twice as long
    for _ in range(3):
        ejected = s.outlier_result(r500, od, 20.0, 0.0)
    assert ejected and s.ejected_until == 40.0
    # never more than max_ejection_percent of the endpoints
    t = EndpointState(_ep(2))
    for _ in range(3):
        assert not t.outlier_result(CONNECT_FAILURE, od, 0.0, 0.5)


def test_health_thresholds() -> None:
    hc = HealthCheckConfig(healthy_threshold=2, unhealthy_threshold=2)
    s = EndpointState(_ep(1))
    assert s.health_result(False, hc) is None
    assert s.health_result(False, hc) is False and not s.healthy
    assert s.health_result(True, hc) is None
    assert s.health_result(True, hc) is True and s.healthy


def test_header_helpers() -> None:
    names = hop_by_hop_names([b"keep-alive, X-Secret", b"foo"])
    assert {b"x-secret", b"foo", b"keep-alive", b"upgrade"} <= names
    import ipaddress

    nets = [ipaddress.ip_network("10.0.0.0/8")]
    assert peer_trusted("10.1.2.3", nets) and not peer_trusted("11.0.0.1", nets)
    assert not peer_trusted("10.1.2.3", [])
    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse_traceparent(f"00-{tid}-00f067aa0ba902b7-01".encode()) == (tid.encode(), b"01")
    assert parse_traceparent(b"00-xyz-00f067aa0ba902b7-01") is None
    assert parse_traceparent(b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01") is None


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("[::1]:9901") == ("::1", 9901)
    assert parse_address(":8080") == ("0.0.0.0", 8080)
    with pytest.raises(ValueError):
        parse_address("host")


def test_envoy_style_spellings_are_accepted() -> None:
    cfg = load_config(
        "t",
        '[[upstreams]]\nname="u"\nendpoints="http://h:1"\n'
        '[[routes]]\nprefix="/"\nupstream="u"\n'
        '[routes.retry]\nattempts = 2\non = "5xx, reset"\n'
        "backoff = { base_interval = 0.1, max_interval = 1.0 }\n"
        "[routes.fault]\nabort = { status = 503, percentage = 5.0 }\n"
        "delay = { seconds = 0.2, percentage = 50.0 }\n",
    )
    r = cfg.routes[0]
    assert r.retry.on == frozenset({"5xx", "reset"})
    assert (r.retry.backoff_base, r.retry.backoff_max) == (0.1, 1.0)
    assert r.fault == FaultConfig(delay=0.2, delay_percentage=50.0, abort=503, abort_percentage=5.0)


def test_envoy_header_spellings() -> None:
    cfg = load_config(
        "t",
        '[[upstreams]]\nname="u"\nendpoints="http://h:1"\n'
        '[[routes]]\nprefix="/"\nupstream="u"\n'
        'request_headers_to_add = { "x-a" = "1" }\nresponse_headers_to_remove = ["server"]\n'
        "rate_limit = { requests_per_second = 5.0 }\n",
    )
    r = cfg.routes[0]
    assert r.request_headers.add == ((b"x-a", b"1"),)
    assert r.response_headers.remove == frozenset({b"server"})
    assert r.rate_limit is not None and r.rate_limit.rate == 5.0 and r.rate_limit.burst == 5
