"""The proxy runtime: asyncio Protocols, httptools (llhttp) parsers, pooled upstreams.

Theory of operation
===================

One :class:`_Client` protocol per client connection parses requests with
``httptools.HttpRequestParser``; every limit (URI, header bytes and count,
body size, transfer codings, framing) is checked inside the parser callbacks,
so a bad request is answered before any byte goes upstream. A request that
passes becomes a :class:`_Request` and is handled by one coroutine
(:meth:`Ambassador._handle`) that asks the pure core for the route, the
endpoint and every retry decision.

Bytes never wait in Python longer than needed: request body chunks are written
to the upstream transport as they arrive, response chunks to the client as they
arrive, and back-pressure is the transports' own (``pause_writing`` on one side
pauses reading on the other), so memory per request is bounded by the
transports' high-water marks whatever the body size. The request body is also
kept in a replay buffer until it exceeds ``retry.replay_buffer_bytes``; past
that point the request can no longer be retried once bytes were sent.

Upstream connections are :class:`_Upstream` protocols with a response parser,
kept alive in a per-endpoint :class:`_Pool`. A response that is retried is
drained (its connection goes back to the pool) rather than forwarded.

Timeouts are loop timers, not tasks: the route's ``timeout`` covers the whole
response (a body that stalls is cut at the deadline: 504 if nothing was sent
yet, else the client connection is aborted); ``per_try_timeout`` covers each
attempt until its response headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import ssl
import sys
import time
from collections import deque
from http import HTTPStatus
from typing import IO, Any

import httptools
import msgspec

from stanchion.ambassador._core import (
    CONNECT_FAILURE,
    HOP_BY_HOP,
    RESET,
    TIMEOUT,
    AmbassadorConfig,
    Balancer,
    EndpointState,
    Outcome,
    OutcomeKind,
    RetryBudget,
    Route,
    RouteConfig,
    RouteTable,
    TokenBucket,
    UpstreamConfig,
    backoff_delay,
    parse_traceparent,
    peer_trusted,
)
from stanchion.ambassador._stats import RequestStats
from stanchion.errors import CircuitOpenError
from stanchion.observability import Metrics, get_logger

__all__ = ["Ambassador"]

_log = get_logger("stanchion.ambassador")
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_HIGH_WATER = 256 * 1024
_NO_BODY_STATUS = frozenset({204, 304})
_STATE_CODES = {"CLOSED": 0, "OPEN": 1, "HALF_OPEN": 2, "FORCED_OPEN": 3, "DISABLED": 4}


class _Reject(Exception):
    """Raised inside parser callbacks: answer ``status`` and close."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class _UpstreamFailure(Exception):
    """Raised inside ``async with breaker`` so the breaker records a failure."""


def _error_body(status: int, reason: str, message: str, request_id: bytes = b"") -> bytes:
    return msgspec.json.encode(
        {
            "error": reason,
            "status": status,
            "message": message,
            "request_id": request_id.decode("latin-1"),
        }
    )


def _simple_response(
    status: int,
    body: bytes,
    *,
    reason: str = "",
    close: bool = False,
    content_type: bytes = b"application/json",
    extra: bytes = b"",
) -> bytes:
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
        b"content-type: %s\r\ncontent-length: %d\r\n" % (content_type, len(body)),
    ]
    if reason:
        head.append(b"x-stanchion-reason: %s\r\n" % reason.encode())
    if close:
        head.append(b"connection: close\r\n")
    head.append(extra)
    head.append(b"\r\n")
    return b"".join(head) + body


# --------------------------------------------------------------------------- upstream side


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to an endpoint, carrying one request at a time."""

    __slots__ = (
        "_headers",
        "closed",
        "draining",
        "idle_since",
        "keep_alive",
        "parser",
        "pool",
        "req",
        "status",
        "transport",
        "until_close",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.req: _Request | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self.closed = False
        self.draining = False
        self.keep_alive = True
        self.status = 0
        self.idle_since = 0.0
        self.until_close = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.keep_alive = False
        except Exception:
            self._fail(RESET)
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.req is not None:
            if self.until_close and exc is None:
                # A response delimited by the connection's close ends here.
                self.keep_alive = False
                self._complete()
            else:
                self._fail(RESET)

    def pause_writing(self) -> None:
        req = self.req
        if req is not None and req.client.transport is not None:
            req.client.pause(1)

    def resume_writing(self) -> None:
        req = self.req
        if req is not None and req.client.transport is not None:
            req.client.resume(1)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        self.status = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.until_close = False
        if status not in _NO_BODY_STATUS:
            framed = False
            for name, _ in self._headers:
                n = name.lower()
                if n == b"content-length" or n == b"transfer-encoding":
                    framed = True
                    break
            self.until_close = not framed
        req = self.req
        if req is None or self.draining:
            return
        if req.method == "HEAD":
            self.keep_alive = False
        req.on_response_head(self, status, self._headers)
        if req.method == "HEAD" or status in _NO_BODY_STATUS:
            self._complete()

    def on_body(self, body: bytes) -> None:
        req = self.req
        if req is not None and not self.draining:
            req.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # a 1xx interim response
        self._complete()

    def _complete(self) -> None:
        req = self.req
        if req is None:
            return
        self.req = None
        draining = self.draining
        self.draining = False
        if not draining:
            req.on_response_done()
        if req.body_done and self.keep_alive:
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, outcome: Outcome) -> None:
        req = self.req
        if req is not None:
            self.req = None
            if not self.draining:
                req.on_upstream_failure(self, outcome)

    def start(self, req: _Request, head: bytes) -> None:
        self.req = req
        self.draining = False
        self.status = 0
        assert self.transport is not None
        self.transport.write(head)

    def drain(self) -> None:
        """Discard the rest of the current response, then return to the pool."""
        self.draining = True
        if self.req is not None:
            self.req.early = None
        if self.transport is not None:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Pool:
    """Keep-alive connections to one endpoint, with a connection limit."""

    __slots__ = ("count", "endpoint", "idle", "runtime", "waiters")

    def __init__(self, runtime: _UpstreamRuntime, state: EndpointState) -> None:
        self.runtime = runtime
        self.endpoint = state.endpoint
        self.idle: deque[_Upstream] = deque()
        self.count = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, wait: float) -> _Upstream:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        cfg = self.runtime.config
        if self.count >= cfg.pool.max_connections:
            if len(self.waiters) >= cfg.pool.max_pending:
                raise _Reject(503, "pool-overflow", "upstream connection pool is full")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await asyncio.wait_for(fut, wait)
            except TimeoutError:
                raise _Reject(503, "pool-overflow", "no upstream connection available") from None
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(fut)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn
        self.count += 1
        ep = self.endpoint
        loop = asyncio.get_running_loop()
        try:
            if ep.scheme == "https":
                ctx = self.runtime.ssl_context
                sni = cfg.tls.server_name or ep.host
                coro = loop.create_connection(
                    lambda: _Upstream(self), ep.host, ep.port, ssl=ctx, server_hostname=sni
                )
            else:
                coro = loop.create_connection(lambda: _Upstream(self), ep.host, ep.port)
            _, proto = await asyncio.wait_for(coro, wait)
        except BaseException:
            self.count -= 1
            self._wake()
            raise
        return proto

    def release(self, conn: _Upstream) -> None:
        if conn.closed or len(self.idle) >= self.runtime.config.pool.max_idle:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        self._wake()

    def forget(self, conn: _Upstream) -> None:
        self.count -= 1
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def close_idle(self, older_than: float = -1.0) -> None:
        now = time.monotonic()
        for conn in list(self.idle):
            if older_than < 0 or now - conn.idle_since > older_than:
                conn.abort()


class _UpstreamRuntime:
    """One upstream's live state: endpoints, balancer, pools, breaker, health checks."""

    def __init__(self, config: UpstreamConfig, amb: Ambassador) -> None:
        self.config = config
        self.amb = amb
        self.states = [EndpointState(ep) for ep in config.endpoints]
        self.balancer = Balancer(self.states, config.load_balancer)
        self.pools = {id(s): _Pool(self, s) for s in self.states}
        self.breaker: Any = None
        if config.circuit_breaker is not None:
            from stanchion.resilience import CircuitBreaker

            self.breaker = CircuitBreaker(config.name, **dict(config.circuit_breaker))
        self.ssl_context: ssl.SSLContext | None = None
        if any(ep.scheme == "https" for ep in config.endpoints):
            ctx = ssl.create_default_context(cafile=config.tls.ca_file or None)
            if not config.tls.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self.ssl_context = ctx
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        hc = self.config.health_check
        if hc is not None:
            for state in self.states:
                self.tasks.append(asyncio.ensure_future(self._health_loop(state)))

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        if self.breaker is not None:
            self.breaker.close()
        for pool in self.pools.values():
            pool.close_idle()

    async def _health_loop(self, state: EndpointState) -> None:
        hc = self.config.health_check
        assert hc is not None
        ep = state.endpoint
        while True:
            ok = False
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(hc.timeout):
                    if ep.scheme == "https":
                        reader, writer = await asyncio.open_connection(
                            ep.host,
                            ep.port,
                            ssl=self.ssl_context,
                            server_hostname=self.config.tls.server_name or ep.host,
                        )
                    else:
                        reader, writer = await asyncio.open_connection(ep.host, ep.port)
                    writer.write(
                        b"GET %s HTTP/1.1\r\nhost: %s\r\nuser-agent: stanchion-health\r\n"
                        b"connection: close\r\n\r\n"
                        % ((ep.base_path + hc.path).encode(), ep.authority.encode())
                    )
                    line = await reader.readline()
                    parts = line.split()
                    ok = (
                        len(parts) >= 2
                        and parts[1].isdigit()
                        and int(parts[1]) in (hc.expected_statuses)
                    )
            except (OSError, TimeoutError, ssl.SSLError):
                ok = False
            finally:
                if writer is not None:
                    writer.transport.abort()
            verdict = state.health_result(ok, hc)
            if verdict is not None:
                self.amb._m_healthy.labels(self.config.name, ep.url).set(1 if verdict else 0)
                _log.warning(
                    "ambassador.health_changed",
                    upstream=self.config.name,
                    endpoint=ep.url,
                    healthy=verdict,
                )
            await asyncio.sleep(hc.interval)

    def record(self, state: EndpointState, outcome: Outcome) -> None:
        od = self.config.outlier_detection
        if od is None:
            return
        now = time.monotonic()
        if state.outlier_result(outcome, od, now, self.balancer.ejected_share(now)):
            self.amb._m_ejections.labels(self.config.name, state.endpoint.url).inc()
            _log.warning(
                "ambassador.endpoint_ejected",
                upstream=self.config.name,
                endpoint=state.endpoint.url,
                seconds=round(state.ejected_until - now, 3),
            )


# --------------------------------------------------------------------------- client side


class _Request:
    """One client request on its way through the proxy."""

    __slots__ = (
        "body_bytes",
        "body_done",
        "buffer",
        "buffered",
        "chunked_up",
        "client",
        "conn",
        "content_length",
        "done_waiter",
        "early",
        "expect_continue",
        "head_waiter",
        "headers",
        "host",
        "http10",
        "idempotency_key",
        "keep_alive",
        "method",
        "out_chunked",
        "out_close",
        "replay",
        "replay_bytes",
        "replay_limit",
        "resp_bytes",
        "rid",
        "sent_any",
        "started",
        "status",
        "t0",
        "timed_out",
        "upstream_done",
        "url",
    )

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.method = ""
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.host = b""
        self.content_length = -1
        self.chunked_up = False
        self.http10 = False
        self.keep_alive = True
        self.expect_continue = False
        self.idempotency_key = False
        self.body_bytes = 0
        self.body_done = False
        self.buffer: list[bytes] = []
        self.buffered = 0
        self.replay: list[bytes] | None = []
        self.replay_bytes = 0
        self.replay_limit = 65536
        self.sent_any = False
        self.conn: _Upstream | None = None
        self.head_waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self.done_waiter: asyncio.Future[None] | None = None
        self.started = False
        self.upstream_done = False
        self.out_chunked = False
        self.out_close = False
        self.status = 0
        self.resp_bytes = 0
        self.t0 = 0.0
        self.timed_out = False
        self.early: list[bytes] | None = None
        self.rid = b""

    # body from client ------------------------------------------------------
    def feed_body(self, chunk: bytes) -> None:
        self.body_bytes += len(chunk)
        if self.replay is not None:
            if self.replay_bytes + len(chunk) <= self.replay_limit:
                self.replay.append(chunk)
                self.replay_bytes += len(chunk)
            else:
                self.replay = None
        conn = self.conn
        if conn is not None and conn.transport is not None and not conn.closed:
            self._write_up(conn.transport, chunk)
        else:
            self.buffer.append(chunk)
            self.buffered += len(chunk)
            if self.buffered > _HIGH_WATER:
                self.client.pause(2)

    def end_body(self) -> None:
        self.body_done = True
        conn = self.conn
        if self.chunked_up and conn is not None and conn.transport is not None:
            conn.transport.write(b"0\r\n\r\n")

    def _write_up(self, transport: asyncio.Transport, chunk: bytes) -> None:
        self.sent_any = True
        if self.chunked_up:
            transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
        else:
            transport.write(chunk)

    def replayable(self) -> bool:
        return not self.sent_any or self.replay is not None

    def attach(self, conn: _Upstream, head: bytes, retry: bool) -> None:
        """Send the head and whatever body is available to ``conn``."""
        self.conn = conn
        self.early = None
        self.upstream_done = False
        conn.start(self, head)
        transport = conn.transport
        assert transport is not None
        chunks = self.buffer
        if retry and self.replay is not None:
            chunks = self.replay
        for chunk in chunks:
            if chunk:
                self._write_up(transport, chunk)
        self.buffer = []
        if self.buffered > _HIGH_WATER:
            self.client.resume(2)
        self.buffered = 0
        if self.body_done and self.chunked_up:
            transport.write(b"0\r\n\r\n")

    # response from upstream ------------------------------------------------
    def on_response_head(
        self, conn: _Upstream, status: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        w = self.head_waiter
        if w is not None and not w.done():
            w.set_result((status, headers))

    def on_response_body(self, body: bytes) -> None:
        if not self.started:
            # The head is not forwarded yet (the handler decides on retries first).
            if self.early is None:
                self.early = []
            self.early.append(body)
            conn = self.conn
            if conn is not None and conn.transport is not None and len(self.early) > 4:
                conn.transport.pause_reading()
            return
        self.resp_bytes += len(body)
        t = self.client.transport
        if t is None:
            return
        if self.out_chunked:
            t.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
        else:
            t.write(body)

    def on_response_done(self) -> None:
        self.upstream_done = True
        self.conn = None
        w = self.done_waiter
        if w is not None and not w.done():
            w.set_result(None)
        hw = self.head_waiter
        if hw is not None and not hw.done():
            hw.set_exception(_Attempt(RESET))

    def on_upstream_failure(self, conn: _Upstream, outcome: Outcome) -> None:
        if self.conn is conn:
            self.conn = None
        hw = self.head_waiter
        if hw is not None and not hw.done():
            hw.set_exception(_Attempt(outcome))
            return
        w = self.done_waiter
        if w is not None and not w.done():
            w.set_exception(_Attempt(outcome))


class _Attempt(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.kind.value)
        self.outcome = outcome


class _Client(asyncio.Protocol):
    """One client connection: parses requests, enforces limits, runs them in order."""

    def __init__(self, amb: Ambassador) -> None:
        self.amb = amb
        self.cfg = amb.config.listen
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self.req: _Request | None = None  # being parsed
        self.active: _Request | None = None  # being answered
        self.queue: deque[_Request] = deque()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.deadline = 0.0
        self.idle = False
        self.loop = asyncio.get_running_loop()
        self.paused = 0
        self.closing = False
        self.header_bytes = 0
        self.header_count = 0
        self.reject: _Reject | None = None
        self.closing_after = False

    # connection lifecycle -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.amb._clients.add(self)
        self._arm(self.cfg.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.amb._clients.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # Lazy deadline: one loop timer per connection, re-armed only when it fires early,
    # so a busy keep-alive connection does not create and cancel timers per request.
    def _arm(self, delay: float) -> None:
        loop = self.loop
        deadline = loop.time() + delay
        self.deadline = deadline
        timer = self.timer
        if timer is None:
            self.timer = loop.call_at(deadline, self._header_timeout)
            self.timer_at = deadline
        elif deadline < self.timer_at:
            timer.cancel()
            self.timer = loop.call_at(deadline, self._header_timeout)
            self.timer_at = deadline

    def _disarm(self) -> None:
        self.deadline = 0.0

    def _header_timeout(self) -> None:
        self.timer = None
        if self.transport is None or self.deadline == 0.0:
            return
        now = self.loop.time()
        if now < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._header_timeout)
            self.timer_at = self.deadline
            return
        if self.req is None and self.active is None:
            self.transport.close()  # an idle keep-alive connection
            return
        if self.active is None:
            self._send_error(408, "header-timeout", "request headers not received in time", True)

    def pause(self, bit: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= bit

    def resume(self, bit: int) -> None:
        was = self.paused
        self.paused &= ~bit
        if was and not self.paused and self.transport is not None:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        req = self.active
        if req is not None and req.conn is not None and req.conn.transport is not None:
            req.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        req = self.active
        if req is not None and req.conn is not None and req.conn.transport is not None:
            req.conn.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            req = self.req or self.active
            if req is not None and req.method == "CONNECT":
                self._send_error(405, "connect-refused", "CONNECT is not supported", True)
            else:
                self.closing_after = True
        except httptools.HttpParserCallbackError as exc:
            rej = exc.__context__ if isinstance(exc.__context__, _Reject) else self.reject
            if rej is None:
                self._send_error(400, "bad-request", "malformed request", True)
            else:
                self._send_error(rej.status, rej.reason, str(rej), True)
        except httptools.HttpParserError as exc:
            req = self.req
            status, reason = 400, "bad-request"
            if req is not None and not req.body_done and self.active is req and req.started:
                # Invalid body framing after the response began: cut everything.
                self._abort_active()
                return
            if req is not None:
                te = [v for n, v in req.headers if n.lower() == b"transfer-encoding"]
                if te and _unknown_coding(te):
                    status, reason = 501, "unknown-transfer-encoding"
            self._send_error(status, reason, f"malformed request: {exc}", True)

    def _abort_active(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def _send_error(self, status: int, reason: str, message: str, close: bool) -> None:
        self.closing = self.closing or close
        if self.active is not None:
            # A response is in progress: nothing else may be written on this connection.
            if self.active.started:
                self._abort_active()
                return
            if self.task is not None:
                self.task.cancel()
            self._release_active()
        t = self.transport
        if t is None:
            return
        t.write(
            _simple_response(
                status, _error_body(status, reason, message), reason=reason, close=True
            )
        )
        self.amb._count_simple(status, reason)
        self.amb._access(
            {
                "ts": time.time(),
                "peer": self.peer,
                "method": self.req.method if self.req else "",
                "path": self.req.url.decode("latin-1") if self.req else "",
                "status": status,
                "reason": reason,
            }
        )
        t.close()

    def _release_active(self) -> None:
        req = self.active
        if req is not None and req.conn is not None:
            req.conn.abort()
            req.conn = None

    # parser callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        if self.idle and self.active is None:
            # The first request's deadline runs from the accept; later ones from their
            # first byte.
            self.idle = False
            self._arm(self.cfg.header_timeout)
        req = _Request(self)
        rt = self.amb._rt
        if rt is not None:
            req.replay_limit = rt.replay_limit
        self.req = req
        self.header_bytes = 0
        self.header_count = 0

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        self.header_bytes += len(url)
        if len(req.url) > self.cfg.max_uri_bytes:
            self.reject = _Reject(414, "uri-too-long", "request URI too long")
            raise self.reject

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        self.header_count += 1
        self.header_bytes += len(name) + len(value) + 4
        if self.header_count > self.cfg.max_headers:
            self.reject = _Reject(431, "too-many-headers", "too many request headers")
            raise self.reject
        if self.header_bytes > self.cfg.max_header_bytes:
            self.reject = _Reject(431, "headers-too-large", "request headers too large")
            raise self.reject
        req.headers.append((name, value))

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        p = self.parser
        req.method = p.get_method().decode("latin-1")
        req.http10 = p.get_http_version() == "1.0"
        req.keep_alive = p.should_keep_alive()
        cl = -1
        te: list[bytes] = []
        for name, value in req.headers:
            n = name.lower()
            if n == b"host":
                if req.host and req.host != value:
                    self.reject = _Reject(400, "bad-request", "more than one Host header")
                    raise self.reject
                req.host = value
            elif n == b"content-length":
                cl = int(value)
            elif n == b"transfer-encoding":
                te.append(value)
            elif n == b"expect":
                if value.lower() == b"100-continue":
                    req.expect_continue = True
            elif n == b"x-request-id":
                req.rid = value
            elif n == b"idempotency-key":
                req.idempotency_key = True
        if te:
            if _unknown_coding(te):
                self.reject = _Reject(
                    501,
                    "unknown-transfer-encoding",
                    "only the chunked transfer coding is supported",
                )
                raise self.reject
            req.chunked_up = True
        if req.method == "CONNECT":
            self.reject = _Reject(405, "connect-refused", "CONNECT is not supported")
            raise self.reject
        url = req.url
        if not url.startswith(b"/"):
            if url == b"*" and req.method == "OPTIONS":
                req.url = b"/"
            else:
                try:
                    parsed = httptools.parse_url(url)
                except httptools.HttpParserInvalidURLError:
                    self.reject = _Reject(400, "bad-request", "invalid request target")
                    raise self.reject from None
                host = (parsed.host or b"").decode("latin-1").lower()
                if not self.amb._is_local_name(host, parsed.port):
                    self.reject = _Reject(
                        403,
                        "not-an-open-proxy",
                        "absolute-form requests to other hosts are refused",
                    )
                    raise self.reject
                path = parsed.path or b"/"
                if parsed.query:
                    path += b"?" + parsed.query
                req.url = path
                req.host = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        if req.http10 is False and not req.host:
            self.reject = _Reject(400, "bad-request", "HTTP/1.1 request without Host")
            raise self.reject
        req.content_length = cl
        if cl > self.cfg.max_body_bytes:
            self.reject = _Reject(413, "body-too-large", "request body too large")
            raise self.reject
        if req.method in ("HEAD", "GET", "OPTIONS", "DELETE") and cl <= 0 and not te:
            req.body_done = True
        if self.active is None:
            self._disarm()
            self._start(req)
        else:
            self.queue.append(req)
            self.pause(4)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        if req.body_bytes + len(body) > self.cfg.max_body_bytes:
            self.reject = _Reject(413, "body-too-large", "request body too large")
            raise self.reject
        req.feed_body(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        if not req.body_done or req.chunked_up:
            req.end_body()
        req.body_done = True

    # running requests ----------------------------------------------------
    def _start(self, req: _Request) -> None:
        self.active = req
        req.t0 = time.perf_counter()
        if req.expect_continue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.task = asyncio.ensure_future(self.amb._handle(req))
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        req = self.active
        self.active = None
        self.task = None
        if self.paused & 3:
            self.resume(3)
        if task.cancelled():
            if self.transport is not None:
                self.transport.abort()
            return
        exc = task.exception()
        t = self.transport
        if exc is not None:
            _log.error("ambassador.internal_error", error=repr(exc))
            if t is not None:
                t.abort()
            return
        if t is None:
            return
        if self.closing or self.closing_after or (req is not None and req.out_close):
            t.close()
            return
        if req is not None and not req.body_done:
            # The response came before the request body finished: we cannot keep parsing
            # this connection's stream safely without reading it all; close it.
            t.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.resume(4)
            self._start(nxt)
        else:
            self.header_bytes = 0
            if self.req is not None:
                self._arm(self.cfg.header_timeout)
            else:
                self.idle = True
                self._arm(self.cfg.idle_timeout)


def _unknown_coding(values: list[bytes]) -> bool:
    codings = [c.strip().lower() for v in values for c in v.split(b",") if c.strip()]
    return any(c != b"chunked" for c in codings)


# --------------------------------------------------------------------------- the server


class _Runtime:
    """An immutable snapshot of the routing state (swapped whole on reload)."""

    def __init__(
        self,
        config: AmbassadorConfig,
        upstreams: dict[str, _UpstreamRuntime],
        buckets: dict[str, TokenBucket],
    ) -> None:
        self.config = config
        self.table = RouteTable(config.routes)
        self.upstreams = upstreams
        self.buckets = buckets
        self.trusted = [
            ipaddress.ip_network(c, strict=False) for c in config.listen.trusted_proxies
        ]
        self.replay_limit = max((r.retry.replay_buffer_bytes for r in config.routes), default=0)


class Ambassador:
    """The ambassador proxy: ``await start()``, ``await reload(config)``, ``await close()``.

    ``reuse_port`` lets several processes share the listener (``SO_REUSEPORT``).
    ``access_log`` overrides ``[log] access`` with an open text stream.
    """

    def __init__(
        self,
        config: AmbassadorConfig,
        *,
        reuse_port: bool = False,
        access_log: IO[str] | None = None,
        metrics: Metrics | None = None,
        admin: bool = True,
        worker: int = 0,
    ) -> None:
        self.config = config
        self._reuse_port = reuse_port
        self._admin_enabled = admin
        self.worker = worker
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._admin: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._rt: _Runtime | None = None
        self._budget = RetryBudget()
        self._rng = random.Random()
        self._id_prefix = os.urandom(6).hex().encode()
        self._id_counter = 0
        self.draining = False
        self._log_stream: IO[str] | None = access_log
        self._log_owned = False
        self._log_buf: list[bytes] = []
        self._log_handle: asyncio.TimerHandle | None = None
        self._enc = msgspec.json.Encoder()
        self.metrics = metrics or Metrics(registry=None)
        m = self.metrics
        self._stats = RequestStats()
        m.registry.register(self._stats)
        self._m_retries = m.counter("ambassador_retries", "Retried attempts", ("route", "upstream"))
        self._m_budget = m.counter(
            "ambassador_retry_budget_exhausted", "Retries refused by the budget", ("route",)
        )
        self._m_ejections = m.counter(
            "ambassador_ejections", "Outlier ejections", ("upstream", "endpoint")
        )
        self._m_healthy = m.gauge(
            "ambassador_endpoint_healthy", "1 if the active health check passes",
            ("upstream", "endpoint"),
        )  # fmt: skip
        self._m_breaker = m.gauge(
            "ambassador_circuit_state",
            "Breaker state (0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled)",
            ("upstream",),
        )
        self._m_rejected = m.counter(
            "ambassador_local_replies",
            "Requests answered by the proxy itself",
            ("status", "reason"),
        )
        self._m_reloads = m.counter("ambassador_reloads", "Config reloads", ("result",))
        self._children: dict[tuple[Any, ...], Any] = {}

    # lifecycle ------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound proxy port."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def admin_port(self) -> int:
        """The bound admin port (0 if disabled)."""
        if self._admin is None:
            return 0
        return int(self._admin.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Bind the listener (and the admin listener) and start health checks."""
        self._rt = self._build(self.config, None)
        self._open_log()
        loop = self._loop = asyncio.get_running_loop()
        lc = self.config.listen
        self._server = await loop.create_server(
            lambda: _Client(self),
            lc.host,
            lc.port,
            reuse_port=self._reuse_port or None,
            backlog=4096,
        )
        ac = self.config.admin
        if self._admin_enabled and ac.port >= 0:
            from stanchion.ambassador._admin import AdminProtocol

            try:
                self._admin = await loop.create_server(
                    lambda: AdminProtocol(self), ac.host, ac.port
                )
            except OSError as exc:
                admin_raw = self.config.raw.get("admin")
                if isinstance(admin_raw, dict) and "address" in admin_raw:
                    raise
                # The default admin port is taken (another ambassador on this host): run
                # without an admin listener rather than refuse to proxy.
                _log.warning("ambassador.admin_unavailable", address=ac.address, error=str(exc))
        _log.info("ambassador.started", address=lc.address, worker=self.worker, port=self.port)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace``), close all."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not any(c.active is not None for c in self._clients):
                break
            await asyncio.sleep(0.01)
        for c in list(self._clients):
            if c.transport is not None:
                c.transport.close()
        if self._admin is not None:
            self._admin.close()
        if self._rt is not None:
            for up in self._rt.upstreams.values():
                up.close()
        self._flush_log()
        if self._log_owned and self._log_stream is not None:
            self._log_stream.close()

    def reload(self, config: AmbassadorConfig) -> None:
        """Swap in a new validated config; in-flight requests finish on the old one."""
        old = self._rt
        if config.listen.address != self.config.listen.address:
            _log.warning(
                "ambassador.reload_listen_ignored",
                old=self.config.listen.address,
                new=config.listen.address,
            )
        self._rt = self._build(config, old)
        self.config = config
        if old is not None:
            for name, up in old.upstreams.items():
                if self._rt.upstreams.get(name) is not up:
                    up.close()
        self._m_reloads.labels("ok").inc()
        _log.info("ambassador.reloaded", routes=len(config.routes))

    def _build(self, config: AmbassadorConfig, old: _Runtime | None) -> _Runtime:
        ups: dict[str, _UpstreamRuntime] = {}
        for name, uc in config.upstreams.items():
            prev = old.upstreams.get(name) if old else None
            if prev is not None and prev.config == uc:
                ups[name] = prev
            else:
                rt = _UpstreamRuntime(uc, self)
                rt.start()
                for s in rt.states:
                    self._m_healthy.labels(name, s.endpoint.url).set(1)
                ups[name] = rt
        buckets: dict[str, TokenBucket] = {}
        now = time.monotonic()
        for rc in config.routes:
            if rc.rate_limit is not None:
                prev_b = old.buckets.get(rc.name) if old else None
                if (
                    prev_b is not None
                    and prev_b.rate == rc.rate_limit.rate
                    and prev_b.burst == rc.rate_limit.burst
                ):
                    buckets[rc.name] = prev_b
                else:
                    buckets[rc.name] = TokenBucket(rc.rate_limit.rate, rc.rate_limit.burst, now)
        return _Runtime(config, ups, buckets)

    @property
    def upstreams(self) -> dict[str, _UpstreamRuntime]:
        """Live upstream state by name."""
        assert self._rt is not None
        return self._rt.upstreams

    def _is_local_name(self, host: str, port: int | None) -> bool:
        lc = self.config.listen
        if host in lc.server_names:
            return True
        if port not in (None, self.port):
            return False
        return host in ("localhost", "127.0.0.1", "::1", "[::1]", lc.host)

    # access log -----------------------------------------------------------
    def _open_log(self) -> None:
        if self._log_stream is not None:
            return
        target = self.config.log.access
        if target == "-":
            self._log_stream = sys.stdout
        elif target:
            self._log_stream = open(target, "a", encoding="utf-8")  # noqa: SIM115
            self._log_owned = True

    def _access(self, entry: dict[str, Any]) -> None:
        if self._log_stream is None:
            return
        self._log_buf.append(self._enc.encode(entry))
        if self._log_handle is None:
            self._log_handle = asyncio.get_running_loop().call_later(0.05, self._flush_log)

    def _flush_log(self) -> None:
        self._log_handle = None
        buf = self._log_buf
        if not buf or self._log_stream is None:
            return
        self._log_buf = []
        try:
            self._log_stream.write(b"\n".join(buf).decode() + "\n")
            self._log_stream.flush()
        except (OSError, ValueError):
            pass

    def _count_simple(self, status: int, reason: str) -> None:
        self._m_rejected.labels(str(status), reason).inc()

    # request handling -----------------------------------------------------
    async def _handle(self, req: _Request) -> None:
        rt = self._rt
        assert rt is not None
        method = req.method
        url = req.url.decode("latin-1")
        route = rt.table.match(method, req.host.decode("latin-1"), url)
        if route is None:
            self._local(req, 404, "no-route", f"no route for {method} {url.partition('?')[0]}")
            return
        rc = route.config
        bucket = rt.buckets.get(rc.name)
        if bucket is not None and not bucket.take(time.monotonic()):
            self._local(req, 503, "rate-limited", "rate limit exceeded", rc)
            return
        up = rt.upstreams[rc.upstream]
        if rc.fault is not None:
            delay, abort = rc.fault.decide(self._rng.random(), self._rng.random())
            if delay:
                await asyncio.sleep(delay)
            if abort:
                self._local(req, abort, "fault-abort", "fault injected", rc)
                return
        req.replay_limit = rc.retry.replay_buffer_bytes
        loop = self._loop
        deadline_handle = None
        self._budget.active_requests += 1
        try:
            if rc.timeout > 0:
                deadline_handle = loop.call_later(rc.timeout, self._overall_timeout, req)
            await self._proxy(req, route, rt, up, loop)
        except asyncio.CancelledError:
            if not req.timed_out:
                raise
            if not req.started:
                self._local(req, 504, "timeout", "upstream request timeout", rc)
        finally:
            self._budget.active_requests -= 1
            if deadline_handle is not None:
                deadline_handle.cancel()
            conn = req.conn
            if conn is not None and not req.upstream_done:
                conn.abort()
                req.conn = None

    def _overall_timeout(self, req: _Request) -> None:
        if req.started:
            w = req.done_waiter
            if w is not None and not w.done():
                w.set_exception(_Attempt(TIMEOUT))
        else:
            req.timed_out = True
            task = req.client.task
            if task is not None and req.client.active is req:
                task.cancel()

    async def _proxy(
        self,
        req: _Request,
        route: Route,
        rt: _Runtime,
        up: _UpstreamRuntime,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        rc = route.config
        policy = rc.retry
        attempt = 0
        last: EndpointState | None = None
        retrying = False
        budget = self._budget
        try:
            while True:
                attempt += 1
                now = time.monotonic()
                state = up.balancer.pick(now, last)
                if state is None:
                    self._local(req, 503, "no-healthy-endpoint", "no healthy endpoint", rc)
                    return
                last = state
                try:
                    outcome, headers = await self._try(req, route, rt, up, state, attempt)
                except CircuitOpenError as exc:
                    self._local(
                        req,
                        503,
                        "circuit-open",
                        f"circuit open for upstream {up.config.name}",
                        rc,
                        extra=b"retry-after: %d\r\n" % max(1, int(exc.retry_after + 0.999)),
                    )
                    return
                except _Reject as rej:
                    self._local(req, rej.status, rej.reason, str(rej), rc)
                    return
                if outcome.kind is OutcomeKind.RESPONSE and headers is not None:
                    if not (
                        policy.attempts > attempt
                        and self._should_retry(req, policy, attempt, outcome, rc)
                    ):
                        await self._respond(req, route, up, state, outcome.status, headers, attempt)
                        return
                    conn = req.conn
                    if conn is not None:
                        conn.drain()
                        req.conn = None
                    req.early = None
                elif not self._should_retry(req, policy, attempt, outcome, rc):
                    if outcome.kind is OutcomeKind.TIMEOUT:
                        self._local(req, 504, "timeout", "upstream request timeout", rc)
                    elif outcome.kind is OutcomeKind.CONNECT_FAILURE:
                        self._local(req, 502, "connect-failure", "upstream connect failure", rc)
                    else:
                        self._local(
                            req, 502, "upstream-reset", "upstream reset before response", rc
                        )
                    return
                self._child(self._m_retries, rc.name, up.config.name).inc()
                if not retrying:
                    retrying = True
                    budget.active_retries += 1
                delay = backoff_delay(policy, attempt, self._rng.random())
                if delay > 0:
                    await asyncio.sleep(delay)
        finally:
            if retrying:
                budget.active_retries -= 1

    def _should_retry(
        self, req: _Request, policy: Any, attempt: int, outcome: Outcome, rc: RouteConfig
    ) -> bool:
        if not policy.decide(
            attempt,
            outcome,
            req.method,
            idempotency_key=req.idempotency_key,
            replayable=req.replayable(),
        ):
            return False
        if not self._budget.allows(policy):
            self._m_budget.labels(rc.name).inc()
            return False
        return True

    async def _try(
        self,
        req: _Request,
        route: Route,
        rt: _Runtime,
        up: _UpstreamRuntime,
        state: EndpointState,
        attempt: int,
    ) -> tuple[Outcome, list[tuple[bytes, bytes]] | None]:
        breaker = up.breaker
        if breaker is None:
            return await self._attempt(req, route, rt, up, state, attempt)
        result: tuple[Outcome, list[tuple[bytes, bytes]] | None] = (RESET, None)
        try:
            with breaker:
                result = await self._attempt(req, route, rt, up, state, attempt)
                if result[0].failure:
                    raise _UpstreamFailure
        except _UpstreamFailure:
            pass
        finally:
            self._m_breaker.labels(up.config.name).set(
                _STATE_CODES.get(getattr(breaker.state, "name", ""), 0)
            )
        return result

    async def _attempt(
        self,
        req: _Request,
        route: Route,
        rt: _Runtime,
        up: _UpstreamRuntime,
        state: EndpointState,
        attempt: int,
    ) -> tuple[Outcome, list[tuple[bytes, bytes]] | None]:
        rc = route.config
        pool = up.pools[id(state)]
        state.active += 1
        loop = self._loop
        try:
            try:
                conn = await pool.acquire(up.config.connect_timeout)
            except (OSError, TimeoutError, ssl.SSLError):
                up.record(state, CONNECT_FAILURE)
                return CONNECT_FAILURE, None
            head = self._request_head(req, route, rt, state)
            waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = loop.create_future()
            req.head_waiter = waiter
            timer = None
            if rc.per_try_timeout > 0:
                timer = loop.call_later(rc.per_try_timeout, _try_timeout, waiter)
            req.attach(conn, head, attempt > 1)
            try:
                status, headers = await waiter
            except _Attempt as exc:
                if exc.outcome is TIMEOUT:
                    conn.abort()
                    req.conn = None
                up.record(state, exc.outcome)
                return exc.outcome, None
            finally:
                if timer is not None:
                    timer.cancel()
            outcome = Outcome(OutcomeKind.RESPONSE, status)
            up.record(state, outcome)
            return outcome, headers
        finally:
            state.active -= 1

    def _request_head(
        self, req: _Request, route: Route, rt: _Runtime, state: EndpointState
    ) -> bytes:
        ep = state.endpoint
        rc = route.config
        client = req.client
        path = (ep.base_path + route.path if ep.base_path else route.path).encode("latin-1")
        parts = [
            b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (req.method.encode(), path, ep.authority.encode())
        ]
        append = parts.append
        hop = HOP_BY_HOP
        conn_tokens: set[bytes] | None = None
        xff = b""
        xfp = b""
        tp = b""
        remove = rc.request_headers.remove
        trusted = peer_trusted(client.peer, rt.trusted)
        for name, value in req.headers:
            n = name.lower()
            if n == b"connection":
                if conn_tokens is None:
                    conn_tokens = set()
                conn_tokens.update(t.strip().lower() for t in value.split(b","))
        for name, value in req.headers:
            n = name.lower()
            if n in hop or n == b"host" or n == b"content-length" or n == b"expect":
                continue
            if conn_tokens is not None and n in conn_tokens:
                continue
            if n == b"x-forwarded-for":
                if trusted:
                    xff = xff + b", " + value if xff else value
                continue
            if n == b"x-forwarded-proto":
                if trusted:
                    xfp = value
                continue
            if n == b"x-forwarded-host":
                continue
            if n == b"x-request-id":
                continue
            if n == b"traceparent":
                tp = value
                continue
            if remove and n in remove:
                continue
            append(b"%s: %s\r\n" % (name, value))
        peer = client.peer.encode()
        append(b"x-forwarded-for: %s\r\n" % (xff + b", " + peer if xff else peer))
        append(b"x-forwarded-proto: %s\r\n" % (xfp or b"http"))
        if req.host:
            append(b"x-forwarded-host: %s\r\n" % req.host)
        rid = req.rid or self._request_id(req)
        append(b"x-request-id: %s\r\n" % rid)
        parsed = parse_traceparent(tp) if tp else None
        bits = self._rng.getrandbits
        span = bits(64) or 1
        if parsed is None:
            append(b"traceparent: 00-%032x-%016x-01\r\n" % (bits(128) or 1, span))
        else:
            append(b"traceparent: 00-%s-%016x-%s\r\n" % (parsed[0], span, parsed[1]))
        for name, value in rc.request_headers.add:
            append(b"%s: %s\r\n" % (name, value))
        if req.chunked_up:
            append(b"transfer-encoding: chunked\r\n")
        elif req.content_length >= 0:
            append(b"content-length: %d\r\n" % req.content_length)
        elif req.method in ("POST", "PUT", "PATCH"):
            append(b"content-length: 0\r\n")  # some servers insist (411)
        append(b"\r\n")
        return b"".join(parts)

    async def _respond(
        self,
        req: _Request,
        route: Route,
        up: _UpstreamRuntime,
        state: EndpointState,
        status: int,
        headers: list[tuple[bytes, bytes]],
        attempt: int,
    ) -> None:
        rc = route.config
        client = req.client
        t = client.transport
        conn = req.conn
        if t is None:
            return
        ops = rc.response_headers
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
        append = parts.append
        conn_tokens: set[bytes] | None = None
        cl = -1
        chunked = False
        for name, value in headers:
            n = name.lower()
            if n == b"connection":
                if conn_tokens is None:
                    conn_tokens = set()
                conn_tokens.update(t_.strip().lower() for t_ in value.split(b","))
            elif n == b"content-length":
                cl = int(value)
            elif n == b"transfer-encoding":
                chunked = True
        for name, value in headers:
            n = name.lower()
            if n in HOP_BY_HOP or n == b"content-length":
                continue
            if conn_tokens is not None and n in conn_tokens:
                continue
            if ops.remove and n in ops.remove:
                continue
            append(b"%s: %s\r\n" % (name, value))
        for name, value in ops.add:
            append(b"%s: %s\r\n" % (name, value))
        no_body = req.method == "HEAD" or status in _NO_BODY_STATUS
        if cl >= 0 and not chunked:
            append(b"content-length: %d\r\n" % cl)
        elif not no_body:
            if req.http10:
                req.out_close = True
            else:
                req.out_chunked = True
                append(b"transfer-encoding: chunked\r\n")
        if not req.keep_alive or req.out_close or self.draining or client.closing_after:
            req.out_close = True
            append(b"connection: close\r\n")
        elif req.http10:
            append(b"connection: keep-alive\r\n")
        append(b"\r\n")
        head = b"".join(parts)
        req.started = True
        req.status = status
        early = req.early
        if early:
            # One write for the head and the body already here: one syscall, not two.
            req.early = None
            body = early[0] if len(early) == 1 else b"".join(early)
            req.resp_bytes += len(body)
            if req.out_chunked:
                t.write(b"%s%x\r\n%s\r\n" % (head, len(body), body))
            else:
                t.write(head + body)
            if conn is not None and conn.transport is not None and not conn.closed:
                conn.transport.resume_reading()
        else:
            t.write(head)
        if (no_body and conn is not None and conn.req is None) or req.upstream_done:
            # The whole response is already here: no need to wait (the common small case).
            if req.out_chunked:
                t.write(b"0\r\n\r\n")
            self._finish_log(req, route, up, state, status, attempt, "")
            return
        done: asyncio.Future[None] = self._loop.create_future()
        req.done_waiter = done
        try:
            await done
        except _Attempt as exc:
            # Mid-body failure or overall timeout: the client sees a cut connection.
            if req.conn is not None:
                req.conn.abort()
                req.conn = None
            client._abort_active()
            self._finish_log(req, route, up, state, status, attempt, exc.outcome.kind.value)
            return
        if req.out_chunked:
            t.write(b"0\r\n\r\n")
        self._finish_log(req, route, up, state, status, attempt, "")

    def _finish_log(
        self,
        req: _Request,
        route: Route,
        up: _UpstreamRuntime,
        state: EndpointState,
        status: int,
        attempt: int,
        error: str,
    ) -> None:
        rc = route.config
        elapsed = time.perf_counter() - req.t0
        self._stats.record(rc.name, up.config.name, status, elapsed)
        if self._log_stream is not None:
            entry = {
                "ts": time.time(),
                "peer": req.client.peer,
                "method": req.method,
                "path": req.url.decode("latin-1"),
                "route": rc.name,
                "upstream": up.config.name,
                "endpoint": state.endpoint.url,
                "status": status,
                "attempts": attempt,
                "duration_ms": round(elapsed * 1000, 3),
                "bytes_in": req.body_bytes,
                "bytes_out": req.resp_bytes,
                "request_id": req.rid.decode("latin-1"),
            }
            if error:
                entry["error"] = error
            self._access(entry)

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            self._children[key] = child
        return child

    def _request_id(self, req: _Request) -> bytes:
        self._id_counter += 1
        req.rid = b"%s-%x" % (self._id_prefix, self._id_counter)
        return req.rid

    def _local(
        self,
        req: _Request,
        status: int,
        reason: str,
        message: str,
        rc: RouteConfig | None = None,
        extra: bytes = b"",
    ) -> None:
        """Answer from the proxy itself (no route, breaker open, timeouts, ...)."""
        client = req.client
        t = client.transport
        if req.conn is not None:
            req.conn.abort()
            req.conn = None
        if t is None:
            return
        rid = req.rid or self._request_id(req)
        body = _error_body(status, reason, message, rid)
        extra += b"x-request-id: %s\r\n" % rid
        close = not req.keep_alive or not req.body_done or self.draining
        t.write(_simple_response(status, body, reason=reason, close=close, extra=extra))
        req.started = True
        req.status = status
        req.out_close = close
        self._m_rejected.labels(str(status), reason).inc()
        if rc is not None:
            self._stats.record(rc.name, rc.upstream, status, None)
        if self._log_stream is not None:
            self._access(
                {
                    "ts": time.time(),
                    "peer": client.peer,
                    "method": req.method,
                    "path": req.url.decode("latin-1"),
                    "route": rc.name if rc else "",
                    "upstream": rc.upstream if rc else "",
                    "status": status,
                    "reason": reason,
                    "request_id": rid.decode("latin-1"),
                    "duration_ms": round((time.perf_counter() - req.t0) * 1000, 3),
                }
            )


def _try_timeout(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_Attempt(TIMEOUT))
