"""The collector: receives batches from sidecars, deduplicates, stores, serves queries.

HTTP API::

    POST /api/push      NDJSON records (or a JSON array / {"records": [...]}),
                        (also POST /api/logs)
                        optional gzip; "Authorization: Bearer TOKEN" when a token is set.
                        -> {"accepted": n, "inserted": k, "duplicates": n - k}
    GET  /api/logs      ?service=&level=&since=&until=&q=&source=&limit=&cursor=&order=
                        -> {"records": [...], "next_cursor": "123" | null}
    GET  /api/tail      the same filters, as server-sent events (one record per event,
                        the event id is its cursor; Last-Event-ID or ?after= resumes);
                        also GET /api/logs/tail, or GET /api/logs with
                        "Accept: text/event-stream"
    GET  /health        {"status": "ok", "records": n}
    GET  /metrics       Prometheus

Deduplication is by record id over what is stored: an id deleted by retention
is accepted again if a sidecar re-sends it (re-sends are of unacknowledged
batches, seconds old, so in practice only with a retention of seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import time
import zlib
from dataclasses import dataclass

import msgspec
from aiohttp import web

from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.observability import CONTENT_TYPE, Metrics, get_logger
from stanchion.sidecar._backend import LogStore, StoredRecord
from stanchion.sidecar._core import LogQuery, LogRecord, parse_ts
from stanchion.urls import default_registry

__all__ = ["Collector", "CollectorOptions", "open_store"]

log = get_logger("stanchion.sidecar.collector")
_decode_lines = msgspec.json.Decoder(LogRecord).decode_lines
_decode_list = msgspec.json.Decoder(list[LogRecord]).decode
_decode_wrapped = msgspec.json.Decoder(dict[str, list[LogRecord]]).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class CollectorOptions:
    """Collector settings.

    Attributes:
        token: when set, ``POST /api/push`` needs ``Authorization: Bearer <token>``.
        max_body_bytes: larger push requests are refused with 413 (after gzip
            decoding too).
        retention: records older than this many seconds (by ``ts``) are deleted.
        max_records: only the newest this many records are kept.
        prune_interval: how often retention runs (s).
        max_limit: the largest page ``limit`` served.
        tail_queue: per-subscriber live-tail queue; a slower subscriber is cut off.

    .. versionadded:: 0.1
    """

    token: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    retention: float | None = None
    max_records: int | None = None
    prune_interval: float = 60.0
    max_limit: int = 10000
    tail_queue: int = 10000

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be at least 1024")
        if self.retention is not None and self.retention <= 0:
            raise ConfigError("retention must be positive")
        if self.max_records is not None and self.max_records < 1:
            raise ConfigError("max_records must be >= 1")


def open_store(url: str) -> LogStore:
    """The log store for ``url`` (``sqlite:///logs.db``, ``postgresql://...``)."""
    cls, parsed = default_registry.load("logstore", url)
    store: LogStore = cls.from_url(parsed)  # type: ignore[attr-defined]
    return store


class _Subscriber:
    __slots__ = ("query", "queue")

    def __init__(self, query: LogQuery, size: int) -> None:
        self.query = query
        self.queue: asyncio.Queue[StoredRecord | None] = asyncio.Queue(size)

    async def get(self) -> StoredRecord | None:
        return await self.queue.get()


class Collector:
    """The central log store's HTTP service (``stanchion collector``).

    Args:
        store: where records go (see :func:`open_store`).
        options: limits, token and retention.
        metrics: where to register metrics (private registry by default).

    Use :attr:`app` with any aiohttp runner, or :meth:`start` / :meth:`aclose`.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        store: LogStore,
        options: CollectorOptions | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.opts = options or CollectorOptions()
        self.metrics = metrics or Metrics()
        m = self.metrics
        self.m_received = m.counter("collector_records_received", "Records received")
        self.m_inserted = m.counter("collector_records_inserted", "Records stored (new ids)")
        self.m_dupes = m.counter("collector_records_duplicate", "Records dropped as duplicates")
        self.m_rejected = m.counter("collector_requests_rejected", "Push requests refused", ["why"])
        self.m_pruned = m.counter("collector_records_pruned", "Records deleted by retention")
        self.m_tails = m.gauge("collector_tail_subscribers", "Live tail connections")
        self._subs: set[_Subscriber] = set()
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self.app = web.Application(client_max_size=self.opts.max_body_bytes)
        self.app.router.add_post("/api/push", self._push)
        self.app.router.add_post("/api/logs", self._push)  # alias
        self.app.router.add_get("/api/logs", self._logs)
        self.app.router.add_get("/api/tail", self._tail)
        self.app.router.add_get("/api/logs/tail", self._tail)  # alias
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)
        self.app.on_cleanup.append(self._on_cleanup)

    # -- lifecycle

    async def _on_startup(self, _: web.Application) -> None:
        await self.store.count()  # connect and create the schema now, fail early
        if self.opts.retention is not None or self.opts.max_records is not None:
            self._prune_task = asyncio.create_task(self._prune_loop())

    async def _on_shutdown(self, _: web.Application) -> None:
        for sub in list(self._subs):
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    async def _on_cleanup(self, _: web.Application) -> None:
        if self._prune_task is not None:
            self._prune_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prune_task
        await self.store.aclose()

    async def start(self, host: str = "127.0.0.1", port: int = 8600) -> None:
        """Serve on ``host:port`` until :meth:`aclose`."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        log.info("collector.listening", host=host, port=port)

    async def aclose(self) -> None:
        """Stop serving and close the store."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def prune(self) -> int:
        """Apply the retention limits once; returns how many records were deleted."""
        before = time.time() - self.opts.retention if self.opts.retention is not None else None
        n = await self.store.prune(before, self.opts.max_records)
        if n:
            self.m_pruned.inc(n)
            log.info("collector.pruned", records=n)
        return n

    async def _prune_loop(self) -> None:
        while True:
            try:
                await self.prune()
            except BackendUnavailable as exc:
                log.warning("collector.prune_failed", error=str(exc))
            await asyncio.sleep(self.opts.prune_interval)

    # -- handlers

    def _refuse(self, status: int, why: str, message: str) -> web.Response:
        self.m_rejected.labels(why).inc()
        return web.json_response({"error": message}, status=status)

    async def _push(self, request: web.Request) -> web.Response:
        if self.opts.token is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.opts.token}":
                return self._refuse(401, "token", "missing or wrong bearer token")
        limit = self.opts.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._refuse(413, "size", f"request body over {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(413, "size", f"request body over {limit} bytes")
        # aiohttp's parser already inflates "Content-Encoding: gzip" (within client_max_size);
        # inflate here only what it left compressed
        if body[:2] == b"\x1f\x8b":
            try:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = d.decompress(body, limit + 1)
            except (zlib.error, gzip.BadGzipFile) as exc:
                return self._refuse(400, "encoding", f"bad gzip body: {exc}")
            if len(body) > limit:
                return self._refuse(413, "size", f"decoded body over {limit} bytes")
        try:
            records = self._decode(body)
        except msgspec.DecodeError as exc:
            return self._refuse(400, "decode", f"cannot decode records: {exc}")
        rows = []
        now = time.time()
        for rec in records:
            if not rec.id:
                return self._refuse(400, "decode", "a record has an empty id")
            ts = parse_ts(rec.ts)
            if ts is None:  # keep the record: index it at its arrival time
                ts = now
            rows.append(
                (
                    rec.id,
                    ts,
                    rec.labels.get("service", ""),
                    rec.level,
                    rec.source,
                    rec.message,
                    _encode(rec),
                )
            )
        self.m_received.inc(len(rows))
        try:
            async with self._lock:  # one writer keeps arrival order = sequence order
                n, inserted = await self.store.insert(rows, returning=bool(self._subs))
        except BackendUnavailable as exc:
            log.error("collector.store_failed", error=str(exc))
            return web.json_response({"error": str(exc)}, status=503)
        self.m_inserted.inc(n)
        self.m_dupes.inc(len(rows) - n)
        if self._subs and inserted:
            self._publish(inserted)
        return web.json_response(
            {"accepted": len(rows), "inserted": n, "duplicates": len(rows) - n}
        )

    @staticmethod
    def _decode(body: bytes) -> list[LogRecord]:
        head = body.lstrip()[:1]
        if head == b"[":
            return _decode_list(body)
        if head == b"{" and body.lstrip().startswith(b'{"records"'):
            return _decode_wrapped(body).get("records", [])
        return _decode_lines(body)

    def _publish(self, inserted: list[StoredRecord]) -> None:
        decode = msgspec.json.Decoder(LogRecord).decode
        for sub in list(self._subs):
            for st in inserted:
                if sub.query.matches(decode(st.body), st.ts):
                    try:
                        sub.queue.put_nowait(st)
                    except asyncio.QueueFull:
                        self._subs.discard(sub)  # too slow: cut off; it may resume by id
                        with contextlib.suppress(asyncio.QueueFull):
                            sub.queue.get_nowait()
                            sub.queue.put_nowait(None)
                        break

    def _query(self, request: web.Request) -> LogQuery:
        return LogQuery.from_params(dict(request.query), time.time(), self.opts.max_limit)

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        if "text/event-stream" in request.headers.get("Accept", ""):
            return await self._tail(request)  # the live tail, same filters
        try:
            query = self._query(request)
        except ConfigError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        try:
            rows = await self.store.query(query)
        except BackendUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cursor = _encode(str(rows[-1].seq)) if more and rows else b"null"
        body = b'{"records":[' + b",".join(r.body for r in rows) + b'],"next_cursor":' + cursor
        body += b"}"
        return web.Response(body=body, content_type="application/json")

    async def _tail(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        last = request.headers.get("Last-Event-ID") or params.pop("after", None)
        try:
            query = LogQuery.from_params(params, time.time(), self.opts.max_limit)
            after = int(last) if last else None
        except (ConfigError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        sub = _Subscriber(query, self.opts.tail_queue)
        self._subs.add(sub)
        self.m_tails.set(len(self._subs))
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        try:
            await resp.write(b": stanchion collector live tail\n\n")
            sent = after or 0
            if after is not None:  # catch up from the store, then go live
                cursor = after
                while True:
                    page = await self.store.query(
                        LogQuery(
                            service=query.service, levels=query.levels, since=query.since,
                            until=query.until, q=query.q, source=query.source, limit=1000,
                            cursor=cursor,
                        )
                    )  # fmt: skip
                    for st in page[:1000]:
                        await resp.write(b"id: %d\ndata: %s\n\n" % (st.seq, st.body))
                        sent = st.seq
                    if len(page) <= 1000:
                        break
                    cursor = page[999].seq
            while True:
                try:
                    item = await asyncio.wait_for(sub.get(), 15.0)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    break
                if item.seq <= sent:
                    continue
                await resp.write(b"id: %d\ndata: %s\n\n" % (item.seq, item.body))
                sent = item.seq
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._subs.discard(sub)
            self.m_tails.set(len(self._subs))
        return resp

    async def _health(self, _: web.Request) -> web.Response:
        try:
            n = await self.store.count()
        except BackendUnavailable as exc:
            return web.json_response({"status": "degraded", "error": str(exc)}, status=503)
        return web.json_response({"status": "ok", "records": n})

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
