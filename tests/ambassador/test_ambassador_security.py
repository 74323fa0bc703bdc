"""Every security rule, with raw-socket requests: smuggling, limits, open proxy, slowloris."""

from __future__ import annotations

import asyncio
import time

import pytest

from conftest import AmbassadorFactory, FakeUpstream, UpstreamFactory, raw, upstream_toml
from stanchion.ambassador import Ambassador

LIMITS = """[listen]
address = "127.0.0.1:0"
header_timeout = 0.5
max_header_bytes = 2048
max_headers = 20
max_uri_bytes = 256
max_body_bytes = 1000
"""


@pytest.fixture
async def proxied(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> tuple[Ambassador, FakeUpstream]:
    up = await upstream()
    amb = await ambassador(
        LIMITS + upstream_toml("u", up.url) + '[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    return amb, up


def status_of(out: bytes) -> int:
    assert out.startswith(b"HTTP/1.1 "), out[:80]
    return int(out[9:12])


CASES = {
    "cl-and-te": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n",
        400,
    ),
    "te-and-cl": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "conflicting-lengths": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ncontent-length: 40\r\n\r\nabc",
        400,
    ),
    "invalid-chunk-size": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "bare-lf-request-line": (b"GET / HTTP/1.1\nhost: x\n\n", 400),
    "bare-lf-header": (b"GET / HTTP/1.1\r\nhost: x\nx-a: b\r\n\r\n", 400),
    "bare-lf-chunk": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
        400,
    ),
    "space-before-colon": (b"GET / HTTP/1.1\r\nhost : x\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\nhost: x\r\nx-a: b\r\n c\r\n\r\n", 400),
    "chunked-twice": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "unknown-coding": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n",
        501,
    ),
    "unknown-coding-before-chunked": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "two-hosts": (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "uri-too-long": (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 414),
    "headers-too-large": (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 3000 + b"\r\n\r\n", 431),
    "too-many-headers": (
        b"GET / HTTP/1.1\r\nhost: x\r\n"
        + b"".join(b"x-h%d: v\r\n" % i for i in range(25))
        + b"\r\n",
        431,
    ),
    "body-too-large-cl": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"a" * 5000,
        413,
    ),
    "body-too-large-chunked": (
        b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"".join(b"100\r\n" + b"a" * 256 + b"\r\n" for _ in range(8))
        + b"0\r\n\r\n",
        413,
    ),
    "connect": (b"CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\n\r\n", 405),
    "absolute-form-other-host": (
        b"GET http://evil.example/steal HTTP/1.1\r\nhost: evil.example\r\n\r\n",
        403,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_rejected_requests(proxied: tuple[Ambassador, FakeUpstream], case: str) -> None:
    amb, up = proxied
    data, expected = CASES[case]
    out = await raw(amb.port, data)
    assert status_of(out) == expected, out[:200]
    assert b"connection: close" in out.lower()
    body = out.partition(b"\r\n\r\n")[2]
    assert body.startswith(b"{") and len(body) < 300  # a small JSON body
    if expected != 413 or case.endswith("-cl"):
        assert up.requests() == [], "nothing may reach the upstream"
    assert b"smuggled" not in b"".join(h.path.encode() for h in up.hits)


async def test_absolute_form_to_ourselves_is_served(
    proxied: tuple[Ambassador, FakeUpstream],
) -> None:
    amb, up = proxied
    out = await raw(
        amb.port,
        b"GET http://127.0.0.1:%d/ok HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
        % amb.port,
    )
    assert status_of(out) == 200 and up.requests()[0].path == "/ok"


async def test_header_read_timeout_stops_slowloris(
    proxied: tuple[Ambassador, FakeUpstream],
) -> None:
    amb, up = proxied
    reader, writer = await asyncio.open_connection("127.0.0.1", amb.port)
    t0 = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n")
    out = b""
    async with asyncio.timeout(5):
        for i in range(100):
            try:
                writer.write(b"x-slow-%d: 1\r\n" % i)  # never ends the headers
                await writer.drain()
            except ConnectionError:
                break
            chunk = b""
            try:
                chunk = await asyncio.wait_for(reader.read(1000), 0.1)
            except TimeoutError:
                continue
            out += chunk
            if not chunk or out:
                break
    writer.close()
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408"), out
    assert 0.4 < elapsed < 2.0
    assert up.requests() == []


async def test_idle_connection_without_bytes_is_closed(
    proxied: tuple[Ambassador, FakeUpstream],
) -> None:
    amb, _ = proxied
    reader, writer = await asyncio.open_connection("127.0.0.1", amb.port)
    t0 = time.monotonic()
    async with asyncio.timeout(5):
        data = await reader.read()
    assert data == b"" and time.monotonic() - t0 < 2.0
    writer.close()


async def test_body_within_limit_passes(proxied: tuple[Ambassador, FakeUpstream]) -> None:
    amb, up = proxied
    out = await raw(
        amb.port,
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 900\r\nconnection: close\r\n\r\n"
        + b"a" * 900,
    )
    assert status_of(out) == 200 and up.requests()[0].body_len == 900


def test_admin_is_loopback_only_by_default() -> None:
    from stanchion.ambassador._core import check_config_file

    base = (
        '[[upstreams]]\nname="u"\nendpoints=["http://h:1"]\n[[routes]]\nprefix="/"\nupstream="u"\n'
    )
    problems = check_config_file("a.toml", '[admin]\naddress = "0.0.0.0:9901"\n' + base)
    assert problems and "loopback" in problems[0]


async def test_header_timeout_applies_to_later_requests_on_a_kept_alive_connection(
    proxied: tuple[Ambassador, FakeUpstream],
) -> None:
    amb, _ = proxied
    reader, writer = await asyncio.open_connection("127.0.0.1", amb.port)
    writer.write(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    await asyncio.sleep(0.3)
    t0 = time.monotonic()
    writer.write(b"GET /second HTTP/1.1\r\nhost: x\r\n")  # never finished
    async with asyncio.timeout(5):
        out = await reader.read()
    assert out.startswith(b"HTTP/1.1 408")
    assert 0.3 < time.monotonic() - t0 < 2.0
    writer.close()
