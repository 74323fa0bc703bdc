"""Sidecar and collector: supervise a service, collect its logs, ship them without loss.

``stanchion sidecar --config sidecar.toml -- CMD ARGS...`` runs a service as a
child process (signals forwarded, grace then SIGKILL, a restart policy, the
child's exit status passed through), captures its stdout/stderr and tails its
log files (globs, rotation by rename and by copytruncate, checkpoints), parses
the lines into :class:`LogRecord` objects and ships them through a disk buffer
per sink, at least once, to the collector, Loki, Elasticsearch/OpenSearch,
OTLP/HTTP, syslog (RFC 5424 over TCP), a file or stdout.

``stanchion collector --listen ADDR --store URL`` receives the batches,
deduplicates by record id and serves ``GET /api/logs`` and a live tail.

Delivery rule: nothing the sidecar has read is lost (each record is in the
disk buffer of every sink before its file position is checkpointed, and
leaves a buffer only when that sink acknowledged it); after a crash or a
SIGKILL it re-sends at most the unacknowledged batches and the lines of the
last ``checkpoint_interval``, with the same ids. Documented exceptions: bytes
still in the child's pipe when the sidecar itself is SIGKILLed (plus the one
64 KiB read in flight into the buffer and a pipe's partial last line), and
with copytruncate rotation the lines written between the copy and the
truncate (the rest of the old file is read from the copy when the globs
match it, e.g. ``app.log*``). A line longer than ``max_line_bytes`` is
truncated to that many bytes and flagged ``fields.truncated = true``.

Library use::

    from stanchion.sidecar import Sidecar, load_config
    code = await Sidecar(load_config("sidecar.toml"), ["python", "app.py"]).run()

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.sidecar._backend import LogStore
from stanchion.sidecar._buffer import DiskBuffer
from stanchion.sidecar._collector import Collector, CollectorOptions, open_store
from stanchion.sidecar._config import (
    FileInput,
    ParseOptions,
    SidecarOptions,
    SinkOptions,
    load_config,
)
from stanchion.sidecar._core import (
    Backoff,
    BufferPolicy,
    LineParser,
    LineSplitter,
    LogQuery,
    LogRecord,
    Multiline,
    Pipeline,
    RestartPolicy,
    TailTracker,
)
from stanchion.sidecar._sidecar import Sidecar

__all__ = [
    "Backoff",
    "BufferPolicy",
    "Collector",
    "CollectorOptions",
    "DiskBuffer",
    "FileInput",
    "LineParser",
    "LineSplitter",
    "LogQuery",
    "LogRecord",
    "LogStore",
    "Multiline",
    "ParseOptions",
    "Pipeline",
    "RestartPolicy",
    "Sidecar",
    "SidecarOptions",
    "SinkOptions",
    "TailTracker",
    "load_config",
    "open_store",
]
