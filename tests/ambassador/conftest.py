"""Real local upstreams (well-behaved and misbehaving) and a raw HTTP client for the tests."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

from stanchion.ambassador import Ambassador, load_config


@dataclass
class Hit:
    method: str
    path: str
    headers: dict[str, str]
    body_len: int


@dataclass
class FakeUpstream:
    """A raw asyncio HTTP/1.1 server whose behaviour tests switch per path or globally.

    Paths: /status/<code>, /slow/<ms>, /hang-mid-body, /stall-body/<ms>, /reset,
    /big/<bytes>, /health; anything else echoes the request as JSON. ``mode``
    (``"503"``, ``"500"``, ``"reset"``, ``"slow"``) overrides for every non-health
    path; ``fail_first`` makes the first N requests answer ``fail_status``.
    """

    server: asyncio.Server | None = None
    hits: list[Hit] = field(default_factory=list)
    mode: str = ""
    fail_first: int = 0
    fail_status: int = 503
    slow_first: int = 0
    slow_ms: int = 0
    healthy: bool = True
    health_hits: int = 0
    sink_bytes: int = 0
    connections: int = 0
    name: str = "up"

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[Hit]:
        return [h for h in self.hits if h.path != "/health"]


class _UpProto(asyncio.Protocol):
    def __init__(self, up: FakeUpstream) -> None:
        self.up = up
        self.parser = httptools.HttpRequestParser(self)
        self.t: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body_len = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.up.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.t:
                self.t.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers[n.decode().lower()] = v.decode()

    def on_body(self, b: bytes) -> None:
        self.body_len += len(b)
        self.up.sink_bytes += len(b)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        path = self.url.decode()
        hit = Hit(method, path, self.headers, self.body_len)
        self.up.hits.append(hit)
        task = asyncio.ensure_future(self.answer(hit))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send(self, status: int, body: bytes, extra: str = "") -> None:
        if self.t is None:
            return
        self.t.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
            f"content-type: application/json\r\nx-upstream: {self.up.name}\r\n{extra}\r\n".encode()
            + body
        )

    async def answer(self, hit: Hit) -> None:
        up = self.up
        path = hit.path.partition("?")[0]
        if path == "/health":
            up.health_hits += 1
            self.send(200 if up.healthy else 503, b"{}")
            return
        n = len(up.requests())
        if up.slow_first and n <= up.slow_first:
            await asyncio.sleep(up.slow_ms / 1000)
        if up.fail_first and n <= up.fail_first:
            self.send(up.fail_status, b'{"fail":true}')
            return
        mode = up.mode
        if mode == "reset" or path.endswith("/reset"):
            if self.t:
                self.t.abort()
            return
        if mode in ("500", "502", "503"):
            self.send(int(mode), b'{"error":"down"}')
            return
        if mode == "slow":
            await asyncio.sleep(up.slow_ms / 1000)
        if path.startswith("/status/"):
            self.send(int(path.split("/")[2]), b"{}")
        elif path.startswith("/slow/"):
            await asyncio.sleep(int(path.split("/")[2]) / 1000)
            self.send(200, b'{"slow":true}')
        elif path == "/hang-mid-body":
            assert self.t is not None
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            await asyncio.sleep(3600)
        elif path.startswith("/big/"):
            size = int(path.split("/")[2])
            assert self.t is not None
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                part = chunk[: min(len(chunk), size - sent)]
                self.t.write(part)
                sent += len(part)
                if self.t.get_write_buffer_size() > 1 << 20:
                    await self._drain()
        elif path == "/close-delimited":
            assert self.t is not None
            self.t.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-eof")
            self.t.close()
        elif path == "/chunked":
            assert self.t is not None
            self.t.write(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
        else:
            body = json.dumps(
                {
                    "method": hit.method,
                    "path": hit.path,
                    "headers": hit.headers,
                    "body_len": hit.body_len,
                    "upstream": up.name,
                }
            ).encode()
            self.send(
                200,
                body,
                "x-internal: secret\r\nconnection: x-hop\r\nx-hop: 1\r\n",
            )

    async def _drain(self) -> None:
        while self.t is not None and self.t.get_write_buffer_size() > 1 << 18:
            if self.t.is_closing():
                return
            await asyncio.sleep(0.001)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _RespParser:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self.p = httptools.HttpResponseParser(self)

    def on_header(self, n: bytes, v: bytes) -> None:
        self.headers[n.decode().lower()] = v.decode()

    def on_body(self, b: bytes) -> None:
        self.body += b

    def on_message_complete(self) -> None:
        self.done = True


async def raw(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(wait):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
    except TimeoutError:
        pass
    finally:
        writer.close()
    return out


async def request(
    port: int,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    wait: float = 10.0,
) -> Response:
    """One request on a fresh connection (Connection: close), parsed."""
    hdrs = {"host": f"127.0.0.1:{port}", "connection": "close"}
    hdrs.update(headers or {})
    if body or method in ("POST", "PUT"):
        hdrs.setdefault("content-length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode() + b"\r\n" + body)
        rp = _RespParser()
        async with asyncio.timeout(wait):
            while not rp.done:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                rp.p.feed_data(chunk)
        return Response(rp.p.get_status_code(), rp.headers, bytes(rp.body))
    finally:
        writer.close()


class KeepAliveClient:
    """Several requests over one connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> KeepAliveClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.writer is not None
        self.writer.close()

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        assert self.reader is not None and self.writer is not None
        hdrs = {"host": f"127.0.0.1:{self.port}"}
        hdrs.update(headers or {})
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        self.writer.write(head.encode() + b"\r\n")
        rp = _RespParser()
        async with asyncio.timeout(10):
            while not rp.done:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise ConnectionError("closed")
                rp.p.feed_data(chunk)
        return Response(rp.p.get_status_code(), rp.headers, bytes(rp.body))


UpstreamFactory = Callable[..., Awaitable[FakeUpstream]]
AmbassadorFactory = Callable[..., Awaitable[Ambassador]]


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamFactory]:
    servers: list[FakeUpstream] = []

    async def make(name: str = "up", **kw: Any) -> FakeUpstream:
        up = FakeUpstream(name=name, **kw)
        loop = asyncio.get_running_loop()
        up.server = await loop.create_server(lambda: _UpProto(up), "127.0.0.1", 0, backlog=2048)
        servers.append(up)
        return up

    yield make
    for up in servers:
        assert up.server is not None
        up.server.close()


@pytest.fixture
async def ambassador() -> AsyncIterator[AmbassadorFactory]:
    started: list[Ambassador] = []

    async def make(toml: str, **kw: Any) -> Ambassador:
        if "[listen]" not in toml:
            toml = '[listen]\naddress = "127.0.0.1:0"\n' + toml
        if "[admin]" not in toml:
            toml = '[admin]\naddress = "127.0.0.1:0"\n' + toml
        cfg = load_config("test.toml", toml)
        kw.setdefault("access_log", io.StringIO())
        amb = Ambassador(cfg, **kw)
        await amb.start()
        started.append(amb)
        return amb

    yield make
    for amb in started:
        await amb.close(grace=0.5)


def upstream_toml(name: str, *urls: str, extra: str = "") -> str:
    eps = ", ".join(f'"{u}"' for u in urls)
    return f'[[upstreams]]\nname = "{name}"\nendpoints = [{eps}]\n{extra}\n'
