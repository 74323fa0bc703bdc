"""Metrics (Prometheus) and structured logs, shared by every component.

Metrics: each component takes an optional ``prometheus_client``
``CollectorRegistry`` (default: a private one per component, so two instances
never clash) and creates its instruments through :class:`Metrics`, which
returns the existing instrument when asked twice for the same name. Serve a
registry with :func:`render`.

Logs: components log structured events through :func:`get_logger`, a thin
wrapper over :mod:`logging`: ``log.info("breaker.opened", name="db")``. The
library never configures logging; the CLI calls :func:`configure_logging`,
which writes one JSON object per line.

.. versionadded:: 0.1
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import IO, Any, TypeVar

import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "CONTENT_TYPE",
    "JsonFormatter",
    "Metrics",
    "StructLogger",
    "configure_logging",
    "get_logger",
    "render",
]

CONTENT_TYPE: str = CONTENT_TYPE_LATEST
"""The Content-Type of the Prometheus text exposition format."""

M = TypeVar("M", bound=MetricWrapperBase)

DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Idempotent instrument factory bound to one Prometheus registry.

    Args:
        registry: where instruments are registered; a new private registry
            when ``None``.
        namespace: prefix of every metric name.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, namespace: str = "stanchion"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.namespace = namespace
        self._made: dict[str, MetricWrapperBase] = {}

    def _get(self, cls: type[M], name: str, doc: str, labels: Sequence[str], **kw: Any) -> M:
        full = f"{self.namespace}_{name}" if self.namespace else name
        existing = self._made.get(full)
        if existing is not None:
            if not isinstance(existing, cls):
                raise ValueError(f"metric {full} already exists as {type(existing).__name__}")
            return existing
        made = cls(full, doc, labelnames=tuple(labels), registry=self.registry, **kw)
        self._made[full] = made
        return made

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A counter named ``<namespace>_<name>`` (``_total`` is added by Prometheus)."""
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge named ``<namespace>_<name>``."""
        return self._get(Gauge, name, doc, labels)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """A histogram named ``<namespace>_<name>``, latency buckets in seconds by default."""
        return self._get(Histogram, name, doc, labels, buckets=tuple(buckets))

    def render(self) -> bytes:
        """This registry in the Prometheus text format."""
        return render(self.registry)


def render(registry: CollectorRegistry) -> bytes:
    """Serialise ``registry`` in the Prometheus text exposition format."""
    return generate_latest(registry)


class StructLogger:
    """Logs events with key-value fields through a :class:`logging.Logger`.

    ``log.info("lease.acquired", group="g", token=7)`` logs the message
    ``lease.acquired`` with ``extra={"fields": {...}}``; :class:`JsonFormatter`
    renders it as one JSON line, plain formatters show ``event k=v ...``.
    """

    __slots__ = ("_bound", "_logger")

    def __init__(self, logger: logging.Logger, bound: dict[str, object] | None = None) -> None:
        self._logger = logger
        self._bound = bound or {}

    @property
    def logger(self) -> logging.Logger:
        """The underlying standard logger."""
        return self._logger

    def bind(self, **fields: object) -> StructLogger:
        """A logger that adds ``fields`` to every event."""
        return StructLogger(self._logger, {**self._bound, **fields})

    def _log(self, level: int, event: str, fields: dict[str, object]) -> None:
        if self._logger.isEnabledFor(level):
            merged = {**self._bound, **fields} if self._bound else fields
            text = event + "".join(f" {k}={v}" for k, v in merged.items())
            self._logger.log(level, text, extra={"event": event, "fields": merged}, stacklevel=3)

    def debug(self, event: str, **fields: object) -> None:
        """Log ``event`` at DEBUG."""
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        """Log ``event`` at INFO."""
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        """Log ``event`` at WARNING."""
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        """Log ``event`` at ERROR."""
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: object) -> None:
        """Log ``event`` at ERROR with the current exception's traceback."""
        if self._logger.isEnabledFor(logging.ERROR):
            merged = {**self._bound, **fields}
            self._logger.error(
                event, exc_info=True, extra={"event": event, "fields": merged}, stacklevel=2
            )


def get_logger(name: str) -> StructLogger:
    """A structured logger for ``name`` (use the component's module name)."""
    return StructLogger(logging.getLogger(name))


_json = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object per line: ts, level, logger, event, fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a JSON line."""
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _json.encode(out).decode()


def configure_logging(
    level: int | str = logging.INFO, *, stream: IO[str] | None = None, json: bool = True
) -> None:
    """Send stanchion's logs to ``stream`` (stderr by default), as JSON lines.

    For applications and the CLI; the library itself never calls it.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json else logging.Formatter("%(levelname)s %(message)s")
    )
    root = logging.getLogger("stanchion")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
