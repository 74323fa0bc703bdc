"""The admin listener: ``/ready``, ``/metrics``, ``/config``, ``/circuits``.

A deliberately tiny HTTP/1.1 server (one httptools parser per connection, GET
only) so the admin shares the proxy's event loop without another framework.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import httptools
import msgspec

from stanchion.observability import CONTENT_TYPE

if TYPE_CHECKING:
    from stanchion.ambassador._core import AmbassadorConfig
    from stanchion.ambassador._proxy import Ambassador

__all__ = ["AdminProtocol", "circuits", "config_json", "serve_admin"]

Handler = Callable[[str], Awaitable[tuple[int, str, bytes]]]


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, bytes):
        return obj.decode("latin-1")
    if isinstance(obj, frozenset | set):
        return sorted(_plain(v) for v in obj)
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def config_json(config: AmbassadorConfig) -> dict[str, Any]:
    """The effective configuration (defaults filled in) as plain JSON data."""
    out = _plain(config)
    out.pop("raw", None)
    out["upstreams"] = list(out["upstreams"].values())
    for up in out["upstreams"]:
        up["endpoints"] = [ep["url"] for ep in up["endpoints"]]
    for route in out["routes"]:
        for key in ("request_headers", "response_headers"):
            ops = route[key]
            ops["add"] = {name: value for name, value in ops["add"]}
    return dict(out)


def circuits(amb: Ambassador) -> dict[str, Any]:
    """Breaker state and endpoint health per upstream."""
    now = time.monotonic()
    out: dict[str, Any] = {}
    for name, up in amb.upstreams.items():
        entry: dict[str, Any] = {"breaker": None}
        b = up.breaker
        if b is not None:
            m = b.metrics
            entry["breaker"] = {
                "state": getattr(b.state, "name", str(b.state)).lower(),
                "failure_rate": m.failure_rate,
                "slow_call_rate": m.slow_call_rate,
                "buffered_calls": m.buffered_calls,
                "failed_calls": m.failed_calls,
                "not_permitted_calls": m.not_permitted_calls,
            }
        entry["endpoints"] = [
            {
                "url": s.endpoint.url,
                "healthy": s.healthy,
                "ejected": s.ejected_until > now,
                "ejected_for": round(max(0.0, s.ejected_until - now), 3),
                "ejections": s.ejections,
                "active_requests": s.active,
            }
            for s in up.states
        ]
        out[name] = entry
    return {"worker": amb.worker, "upstreams": out}


def _handler(amb: Ambassador) -> Handler:
    async def handle(path: str) -> tuple[int, str, bytes]:
        if path == "/ready":
            if amb.draining:
                return 503, "application/json", b'{"status":"draining"}'
            return 200, "application/json", b'{"status":"ready"}'
        if path == "/metrics":
            return 200, CONTENT_TYPE, amb.metrics.render()
        if path == "/config":
            return 200, "application/json", msgspec.json.encode(config_json(amb.config))
        if path == "/circuits":
            return 200, "application/json", msgspec.json.encode(circuits(amb))
        return 404, "application/json", b'{"error":"not_found"}'

    return handle


class AdminProtocol(asyncio.Protocol):
    """One admin connection: GET/HEAD requests, keep-alive, JSON or Prometheus text."""

    def __init__(self, target: Ambassador | Handler) -> None:
        self.handle: Handler = target if callable(target) else _handler(target)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.size = 0
        self.tail: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.size += len(data)
        try:
            if self.size > 65536:
                raise ValueError("request too large")
            self.parser.feed_data(data)
        except Exception:
            if self.transport is not None:
                self.transport.write(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        url, self.url, self.size = self.url, b"", 0
        keep = self.parser.should_keep_alive()
        prev = self.tail
        self.tail = asyncio.ensure_future(self._answer(prev, method, url, keep))

    async def _answer(
        self, prev: asyncio.Future[None] | None, method: bytes, url: bytes, keep: bool
    ) -> None:
        if prev is not None:
            await prev
        path = url.decode("latin-1").partition("?")[0]
        if method not in (b"GET", b"HEAD"):
            status, ctype, body = 405, "application/json", b'{"error":"method_not_allowed"}'
        else:
            try:
                status, ctype, body = await self.handle(path)
            except Exception as exc:  # pragma: no cover - defensive
                status, ctype = 500, "application/json"
                body = msgspec.json.encode({"error": repr(exc)})
        t = self.transport
        if t is None:
            return
        reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed"}.get(status, b"Error")
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status,
            reason,
            ctype.encode(),
            len(body),
            b"" if keep else b"connection: close\r\n",
        )
        t.write(head + (b"" if method == b"HEAD" else body))
        if not keep:
            t.close()


async def serve_admin(host: str, port: int, handle: Handler) -> asyncio.Server:
    """Serve ``handle`` (path -> (status, content type, body)) on ``host:port``."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminProtocol(handle), host, port)
