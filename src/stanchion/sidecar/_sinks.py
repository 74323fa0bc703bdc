"""Sinks: where batches of records go. Thin adapters; each maps failures to BackendUnavailable.

Every sink takes a batch as NDJSON bytes (one encoded :class:`LogRecord` per
line, exactly as stored in the disk buffer) and either returns (the batch is
acknowledged) or raises :class:`~stanchion.errors.BackendUnavailable` (the
batch is retried after a backoff). A sink that rejects a batch for good (a
4xx other than 408/429) raises :class:`SinkRejected`: the batch is dropped,
counted and logged, so one poisoned batch cannot block the queue forever.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
import msgspec

from stanchion.errors import BackendUnavailable, ConfigError, StanchionError
from stanchion.sidecar._core import LogRecord, parse_ts

__all__ = [
    "CollectorSink",
    "ElasticsearchSink",
    "FileSink",
    "LokiSink",
    "OTLPSink",
    "Sink",
    "SinkRejected",
    "StdoutSink",
    "SyslogSink",
    "make_sink",
]

_decode_lines = msgspec.json.Decoder(LogRecord).decode_lines
_encode = msgspec.json.Encoder().encode


class SinkRejected(StanchionError):
    """The sink refused a batch for good (bad request): it is dropped and counted.

    A 413 (too large) is retried in smaller batches first; only a single record
    refused as too large is dropped.

    Attributes:
        status: the HTTP status, when there is one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Sink:
    """Base class of sinks; ``send`` raises BackendUnavailable or SinkRejected."""

    kind = "sink"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.name = name
        self.options = options
        self.timeout = float(options.get("timeout", 10.0))
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Open connections (lazily reopened on failure)."""

    async def close(self) -> None:
        """Release connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        """The HTTP session of this sink."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=4),
            )
        return self._session

    async def send(self, data: bytes, count: int) -> None:
        """Deliver one batch."""
        raise NotImplementedError

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], ok: Sequence[int] = (200, 201, 204)
    ) -> bytes:
        try:
            async with self.session().post(url, data=body, headers=headers) as resp:
                text = await resp.read()
                if resp.status in ok:
                    return text
                detail = text[:300].decode("utf-8", "replace")
                if 400 <= resp.status < 500 and resp.status not in (401, 403, 404, 408, 429):
                    raise SinkRejected(
                        f"{self.name}: {url} rejected the batch: {resp.status} {detail}",
                        resp.status,
                    )
                raise BackendUnavailable(
                    f"{self.name}: {url} answered {resp.status}: {detail}", url=url
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendUnavailable(
                f"{self.name}: cannot reach {url}: {type(exc).__name__}: {exc}", url=url
            ) from exc


class CollectorSink(Sink):
    """The stanchion collector: ``POST {url}/api/push`` with the NDJSON batch as is."""

    kind = "collector"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.url = str(options["url"]).rstrip("/") + "/api/push"
        self.headers = {"Content-Type": "application/x-ndjson"}
        if options.get("token"):
            self.headers["Authorization"] = f"Bearer {options['token']}"
        self.gzip = bool(options.get("gzip", False))

    async def send(self, data: bytes, count: int) -> None:
        """POST the batch; the collector deduplicates by id."""
        headers = self.headers
        if self.gzip:
            data = gzip.compress(data, 1)
            headers = {**headers, "Content-Encoding": "gzip"}
        await self._post(self.url, data, headers)


def _ns(ts: str) -> int:
    value = parse_ts(ts)
    return int((value or 0.0) * 1e9)


class LokiSink(Sink):
    """Grafana Loki push API: ``POST {url}/loki/api/v1/push``, one stream per label set.

    The log line is the record as JSON without its labels (``id``, ``source``,
    ``level``, ``message``, ``fields``), so LogQL's ``| json`` recovers them.
    """

    kind = "loki"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.url = str(options["url"]).rstrip("/") + "/loki/api/v1/push"
        self.headers = {"Content-Type": "application/json"}
        if options.get("tenant"):
            self.headers["X-Scope-OrgID"] = str(options["tenant"])

    async def send(self, data: bytes, count: int) -> None:
        """Push the batch grouped into streams."""
        streams: dict[tuple[tuple[str, str], ...], list[list[str]]] = {}
        for rec in _decode_lines(data):
            labels = {**rec.labels, "level": rec.level, "source": rec.source}
            key = tuple(sorted(labels.items()))
            line = _encode(
                {"id": rec.id, "message": rec.message, "level": rec.level, "fields": rec.fields}
            ).decode()
            streams.setdefault(key, []).append([str(_ns(rec.ts)), line])
        body = _encode({"streams": [{"stream": dict(k), "values": v} for k, v in streams.items()]})
        await self._post(self.url, body, self.headers)


class ElasticsearchSink(Sink):
    """Elasticsearch/OpenSearch bulk API with ``create`` and ``_id`` = record id.

    A duplicate (409 on an item) counts as delivered: the index deduplicates.
    """

    kind = "elasticsearch"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        self.url = str(options["url"]).rstrip("/") + "/_bulk"
        self.index = str(options.get("index", "logs"))
        self.headers = {"Content-Type": "application/x-ndjson"}
        if options.get("username"):
            self.auth = aiohttp.BasicAuth(str(options["username"]), str(options.get("password")))
            self.headers["Authorization"] = self.auth.encode()

    async def send(self, data: bytes, count: int) -> None:
        """Bulk-create the batch; retry unless every item is created or a duplicate."""
        parts: list[bytes] = []
        for rec in _decode_lines(data):
            parts.append(_encode({"create": {"_index": self.index, "_id": rec.id}}))
            parts.append(
                _encode(
                    {
                        "@timestamp": rec.ts,
                        "id": rec.id,
                        "source": rec.source,
                        "level": rec.level,
                        "message": rec.message,
                        "fields": rec.fields,
                        "labels": rec.labels,
                    }
                )
            )
        body = b"\n".join(parts) + b"\n"
        raw = await self._post(self.url, body, self.headers)
        try:
            reply = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise BackendUnavailable(f"{self.name}: bulk reply is not JSON") from exc
        if reply.get("errors"):
            for item in reply.get("items", []):
                status = next(iter(item.values())).get("status", 500)
                if status not in (200, 201, 409):
                    raise BackendUnavailable(
                        f"{self.name}: bulk item failed with status {status}", url=self.url
                    )


_SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warning": 13, "error": 17, "critical": 21}


def _attr(key: str, value: object) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    if isinstance(value, str):
        return {"key": key, "value": {"stringValue": value}}
    return {"key": key, "value": {"stringValue": _encode(value).decode()}}


class OTLPSink(Sink):
    """OTLP/HTTP logs (JSON encoding): ``POST {url}/v1/logs``.

    Labels become resource attributes, fields log attributes; the record id
    is the ``log.record.uid`` attribute.
    """

    kind = "otlp"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        url = str(options["url"]).rstrip("/")
        self.url = url if url.endswith("/v1/logs") else url + "/v1/logs"
        self.headers = {"Content-Type": "application/json", **dict(options.get("headers", {}))}

    async def send(self, data: bytes, count: int) -> None:
        """Export the batch, one resourceLogs entry per label set."""
        groups: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
        for rec in _decode_lines(data):
            attrs = [_attr("log.record.uid", rec.id), _attr("log.source", rec.source)]
            attrs += [_attr(k, v) for k, v in rec.fields.items()]
            groups.setdefault(tuple(sorted(rec.labels.items())), []).append(
                {
                    "timeUnixNano": str(_ns(rec.ts)),
                    "severityNumber": _SEVERITY.get(rec.level, 9),
                    "severityText": rec.level.upper(),
                    "body": {"stringValue": rec.message},
                    "attributes": attrs,
                }
            )
        body = _encode(
            {
                "resourceLogs": [
                    {
                        "resource": {
                            "attributes": [
                                _attr("service.name" if k == "service" else k, v) for k, v in key
                            ]
                        },
                        "scopeLogs": [{"scope": {"name": "stanchion.sidecar"}, "logRecords": recs}],
                    }
                    for key, recs in groups.items()
                ]
            }
        )
        await self._post(self.url, body, self.headers)


_SYSLOG_SEV = {"trace": 7, "debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_frame(rec: LogRecord, facility: int, hostname: str, app: str) -> bytes:
    """One RFC 5424 message with RFC 6587 octet-counting framing."""
    pri = facility * 8 + _SYSLOG_SEV.get(rec.level, 6)
    host = (rec.labels.get("host") or hostname or "-")[:255]
    appname = (rec.labels.get("service") or app or "-").replace(" ", "_")[:48]
    sd = f'[stanchion@32473 id="{_sd_escape(rec.id)}" source="{_sd_escape(rec.source)}"]'
    msg = f"<{pri}>1 {rec.ts} {host} {appname} - - {sd} {rec.message}".encode()
    return str(len(msg)).encode() + b" " + msg


class SyslogSink(Sink):
    """RFC 5424 syslog over TCP with octet-counting framing (RFC 6587).

    The structured data element ``stanchion@32473`` carries the record id and
    source. TCP gives no application acknowledgement: a batch counts as
    delivered once written and drained; a broken connection retries the
    whole batch (at-least-once).
    """

    kind = "syslog"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        address = str(options.get("address", "127.0.0.1:514"))
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"sink {name!r}: syslog address {address!r} is not HOST:PORT")
        self.host, self.port = host.strip("[]"), int(port)
        self.facility = int(options.get("facility", 1))
        self.app = str(options.get("app_name", ""))
        self.hostname = socket.gethostname()
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, data: bytes, count: int) -> None:
        """Write the batch's frames to the TCP connection."""
        frames = b"".join(
            syslog_frame(r, self.facility, self.hostname, self.app) for r in _decode_lines(data)
        )
        try:
            if self._writer is None or self._writer.is_closing():
                _, self._writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.timeout
                )
            writer = self._writer
            assert writer is not None
            writer.write(frames)
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (OSError, TimeoutError) as exc:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            raise BackendUnavailable(
                f"{self.name}: syslog {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from exc

    async def close(self) -> None:
        """Close the TCP connection."""
        if self._writer is not None:
            self._writer.close()
            with _suppress():
                await self._writer.wait_closed()
            self._writer = None


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


class FileSink(Sink):
    """Appends the records as NDJSON to a file (``path``)."""

    kind = "file"

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        super().__init__(name, options)
        if not options.get("path"):
            raise ConfigError(f"sink {name!r}: type = 'file' needs a path")
        self.path = str(options["path"])
        self.fsync = bool(options.get("fsync", False))

    async def send(self, data: bytes, count: int) -> None:
        """Append and (optionally) fsync."""
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise BackendUnavailable(f"{self.name}: cannot write {self.path}: {exc}") from exc

    def _write(self, data: bytes) -> None:
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())


class StdoutSink(Sink):
    """Writes the records as NDJSON to the sidecar's own standard output."""

    kind = "stdout"

    async def send(self, data: bytes, count: int) -> None:
        """Write and flush."""
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


_KINDS: dict[str, type[Sink]] = {
    "collector": CollectorSink,
    "loki": LokiSink,
    "elasticsearch": ElasticsearchSink,
    "opensearch": ElasticsearchSink,
    "otlp": OTLPSink,
    "syslog": SyslogSink,
    "file": FileSink,
    "stdout": StdoutSink,
}

SINK_TYPES = tuple(_KINDS)


def make_sink(name: str, kind: str, options: dict[str, Any]) -> Sink:
    """Build the sink of type ``kind``."""
    cls = _KINDS.get(kind)
    if cls is None:
        raise ConfigError(f"sink {name!r}: unknown type {kind!r}; use one of {', '.join(_KINDS)}")
    if kind in ("collector", "loki", "elasticsearch", "opensearch", "otlp") and not options.get(
        "url"
    ):
        raise ConfigError(f"sink {name!r}: type = {kind!r} needs a url")
    return cls(name, options)
