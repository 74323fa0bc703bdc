"""Pure logic of the sidecar: lines, parsers, records, buffer policy, tailing decisions.

Theory of operation
===================

Bytes come from two kinds of *source*: the child's stdout/stderr pipes and
tailed log files. Each source is a byte stream with offsets. The facade feeds
the bytes it read to a :class:`LineSplitter`, which cuts complete lines and
remembers where the incomplete last line starts (a partial line waits for its
newline). A :class:`Multiline` assembler groups lines into records when a
start pattern is configured (a stack trace is one record); otherwise every
line is a record. A :class:`LineParser` turns the record's text into
``(ts, level, message, fields)`` (JSON lines, logfmt, a regex with named
groups, or plain text) and a :class:`Pipeline` of processors (plain callables,
in the spirit of structlog) finishes the :class:`LogRecord`.

Identity and offsets
--------------------
Every record carries an ``id`` built from its source name, the identity of
the stream it came from and the byte offset of its first line:
``"<source>/<identity>/<offset>"``. Reading the same bytes again (after a
restart) therefore yields the same ids, and any sink that deduplicates (the
collector, Elasticsearch with ``_id``) stores them once. For files the
identity is the inode, a generation counter (bumped when the same inode is
truncated or reused) and a fingerprint of the file's first bytes; inodes
alone are reused after rotation. For pipes it is a random run id chosen when
the child starts.

The *safe offset* of a stream is the offset of the first byte that is not yet
part of an emitted record: the start of the partial last line, or of the
multiline record still being assembled. Checkpoints store safe offsets only.

Tailing decisions
-----------------
:class:`TailTracker` keeps one :class:`FileState` per known file and is told
what the file system looks like now (:class:`FileStat` per glob match, with
the first bytes of the file). For each stat it decides:

* same inode, fingerprint matches, size >= offset: continue reading;
* same inode, size < offset or fingerprint changed: the file was truncated
  (copytruncate) or the inode was reused. Before starting the new generation
  from offset 0, the tracker looks for a *copy*: another matching file, with
  a different inode, whose first bytes equal the old generation's
  fingerprint and which is at least as long as our offset. It reads the copy
  from our offset to its end under the old identity, which recovers the
  lines written after our last read and before the copy. Only lines written
  between the copy and the truncate are lost: that window belongs to
  copytruncate itself, not to the reader;
* unknown inode, fingerprint of a known file, that file still intact: a
  copy made ahead of the truncate; remembered, not read;
* unknown inode, unknown fingerprint: a new file, read from 0 (or from its
  end when ``read_from = "end"`` and it existed at the first scan);
* fewer bytes than a fingerprint needs (no newline yet, shorter than
  ``fingerprint_bytes``): wait.

Renamed files keep their inode, so rename rotation is "continue" at the new
path (or, if the new path does not match the glob, the facade keeps reading
the open descriptor to its end before forgetting it).

Buffering and delivery
----------------------
:class:`BufferPolicy` decides when a batch is cut (records, bytes, age) and
how much of the oldest data to drop when the disk cap is hit. :class:`Backoff`
computes exponential delays with jitter while a sink is down.
:class:`RestartPolicy` decides whether and when to restart the child.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec

from stanchion.errors import ConfigError

__all__ = [
    "Backoff",
    "BufferPolicy",
    "FileStat",
    "FileState",
    "LineParser",
    "LineSplitter",
    "LogQuery",
    "LogRecord",
    "Multiline",
    "Pipeline",
    "Processor",
    "ReadPlan",
    "RestartDecision",
    "RestartPolicy",
    "TailTracker",
    "format_ts",
    "normalize_level",
    "parse_duration",
    "parse_time_param",
    "parse_ts",
]


class LogRecord(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One log record, as stored in buffers, sent to sinks and returned by the collector.

    Attributes:
        id: stable across re-sends: ``"<source>/<stream identity>/<offset>"``.
        source: the input's name (``stdout``, ``stderr`` or a file input's name).
        ts: RFC 3339 UTC timestamp (from the line when it has one, else read time).
        level: normalised level (``trace``, ``debug``, ``info``, ``warning``,
            ``error``, ``critical``) or the line's own word, lower case.
        message: the human text.
        fields: the parsed fields (JSON object keys, logfmt pairs, regex groups).
        labels: ``service``, ``instance``, ``host``, ``stream`` and the config's labels.

    .. versionadded:: 0.1
    """

    id: str
    source: str
    ts: str
    level: str
    message: str
    fields: dict[str, Any] = {}
    labels: dict[str, str] = {}


# -- time and level -----------------------------------------------------------


def format_ts(epoch: float) -> str:
    """RFC 3339 UTC text with microseconds for ``epoch`` seconds."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(value: object) -> float | None:
    """Epoch seconds from a timestamp value (RFC 3339 text, or epoch s/ms/us/ns), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        v = float(value)
        if v > 1e17:
            return v / 1e9
        if v > 1e14:
            return v / 1e6
        if v > 1e11:
            return v / 1e3
        return v
    if isinstance(value, str) and value:
        try:
            dt = datetime.fromisoformat(value.replace(" ", "T", 1) if " " in value else value)
        except ValueError:
            try:
                return parse_ts(float(value))
            except ValueError:
                return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    return None


_LEVELS = {
    "trace": "trace",
    "debug": "debug",
    "dbg": "debug",
    "info": "info",
    "information": "info",
    "notice": "info",
    "warn": "warning",
    "warning": "warning",
    "error": "error",
    "err": "error",
    "fatal": "critical",
    "critical": "critical",
    "crit": "critical",
    "panic": "critical",
    "emerg": "critical",
    "alert": "critical",
}
_NUM_LEVELS = {10: "debug", 20: "info", 30: "warning", 40: "error", 50: "critical"}


def normalize_level(value: object, default: str = "info") -> str:
    """Map a level word or number (Python levels) to stanchion's level names."""
    if isinstance(value, str):
        low = value.strip().lower()
        return _LEVELS.get(low, low or default)
    if isinstance(value, int) and not isinstance(value, bool):
        return _NUM_LEVELS.get(value, default)
    return default


# -- lines --------------------------------------------------------------------


class LineSplitter:
    """Cuts a byte stream into lines, with offsets; a partial last line waits.

    A line longer than ``max_line_bytes`` is *truncated*: its first
    ``max_line_bytes`` bytes are emitted as one line flagged ``truncated``
    (as soon as the limit is crossed, so memory stays bounded), and the rest
    up to the next newline is skipped and counted in :attr:`skipped_bytes`.
    ``\\r\\n`` endings lose their ``\\r``.

    Args:
        max_line_bytes: the longest line kept whole.
        offset: the stream offset of the first byte fed.
    """

    __slots__ = ("_consumed", "_discarding", "_partial", "_start", "max_line_bytes",
                 "skipped_bytes")  # fmt: skip

    def __init__(self, max_line_bytes: int = 256 * 1024, offset: int = 0) -> None:
        if max_line_bytes < 16:
            raise ConfigError("max_line_bytes must be at least 16")
        self.max_line_bytes = max_line_bytes
        self._partial = b""
        self._start = offset  # offset of the first byte of the current line
        self._consumed = offset  # offset of the next byte to be fed
        self._discarding = False
        self.skipped_bytes = 0

    @property
    def pending_offset(self) -> int:
        """The offset where the incomplete last line starts (the safe offset)."""
        return self._start

    @property
    def pending_bytes(self) -> int:
        """How many bytes of an incomplete line are held."""
        return len(self._partial)

    def feed(self, data: bytes) -> list[tuple[int, bytes, bool]]:
        """Complete lines in ``data`` as ``(offset, line, truncated)``."""
        out: list[tuple[int, bytes, bool]] = []
        if not data:
            return out
        limit = self.max_line_bytes
        pos = self._consumed - len(self._partial)
        self._consumed += len(data)
        if self._partial:
            data = self._partial + data
            self._partial = b""
        parts = data.split(b"\n")
        last = parts.pop()
        append = out.append
        for part in parts:
            n = len(part)
            if self._discarding:
                self.skipped_bytes += n
                self._discarding = False
            elif n > limit:
                append((pos, part[:limit], True))
                self.skipped_bytes += n - limit
            else:
                if n and part[-1] == 13:  # \r
                    part = part[:-1]
                append((pos, part, False))
            pos += n + 1
        if self._discarding:
            self.skipped_bytes += len(last)
            # the truncated line's start stays the safe offset until its newline
            self._partial = b""
            return out
        self._start = pos
        if len(last) > limit:
            append((pos, last[:limit], True))
            self.skipped_bytes += len(last) - limit
            self._discarding = True
        else:
            self._partial = last
        return out

    def flush(self) -> tuple[int, bytes, bool] | None:
        """At the end of a stream: the partial last line as a line, if any."""
        if self._discarding:
            self._discarding = False
            self._start = self._consumed
            return None
        if not self._partial:
            return None
        line = (self._start, self._partial, False)
        self._start = self._consumed
        self._partial = b""
        return line


class Multiline:
    """Groups lines into records: a line matching ``start`` opens a new record.

    Lines that do not match are appended to the open record (a stack trace's
    frames). A record is complete when the next start line arrives, when it
    holds ``max_lines`` lines or ``max_bytes`` bytes, or when :meth:`poll` sees
    it idle for ``timeout`` seconds.
    """

    __slots__ = ("_bytes", "_lines", "_offset", "_since", "_truncated", "max_bytes", "max_lines",
                 "start", "timeout")  # fmt: skip

    def __init__(
        self,
        start: str,
        *,
        max_lines: int = 500,
        max_bytes: int = 1024 * 1024,
        timeout: float = 1.0,
    ) -> None:
        try:
            self.start = re.compile(start.encode())
        except re.error as exc:
            raise ConfigError(f"multiline start pattern {start!r} is invalid: {exc}") from exc
        if max_lines < 1 or max_bytes < 1 or timeout <= 0:
            raise ConfigError("multiline max_lines, max_bytes and timeout must be positive")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.timeout = timeout
        self._lines: list[bytes] = []
        self._bytes = 0
        self._offset = 0
        self._since = 0.0
        self._truncated = False

    @property
    def pending_offset(self) -> int | None:
        """The offset of the record being assembled, or None."""
        return self._offset if self._lines else None

    def _take(self) -> tuple[int, bytes, bool]:
        rec = (self._offset, b"\n".join(self._lines), self._truncated)
        self._lines = []
        self._bytes = 0
        self._truncated = False
        return rec

    def push(
        self, lines: Iterable[tuple[int, bytes, bool]], now: float
    ) -> list[tuple[int, bytes, bool]]:
        """Feed lines; return the records completed by them."""
        out: list[tuple[int, bytes, bool]] = []
        match = self.start.match
        for offset, line, truncated in lines:
            if self._lines and (
                match(line) or len(self._lines) >= self.max_lines or self._bytes >= self.max_bytes
            ):
                out.append(self._take())
            if not self._lines:
                self._offset = offset
            self._lines.append(line)
            self._bytes += len(line) + 1
            self._truncated = self._truncated or truncated
            self._since = now
        return out

    def poll(self, now: float) -> tuple[int, bytes, bool] | None:
        """The open record if it has been idle for ``timeout`` seconds."""
        if self._lines and now - self._since >= self.timeout:
            return self._take()
        return None

    def flush(self) -> tuple[int, bytes, bool] | None:
        """The open record, whatever its age (end of stream)."""
        return self._take() if self._lines else None


# -- parsing ------------------------------------------------------------------

_TS_KEYS = ("ts", "time", "timestamp", "@timestamp", "t")
_LEVEL_KEYS = ("level", "lvl", "severity", "levelname", "log.level")
_MSG_KEYS = ("message", "msg", "event", "text")
_LOGFMT = re.compile(rb'([^\s=]+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))')
_FORMATS = ("json", "logfmt", "regex", "text")

_SPECIAL_KEYS = frozenset(_TS_KEYS + _LEVEL_KEYS + _MSG_KEYS)
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)\Z")
_LEVEL_CACHE = {k: v for k, v in _LEVELS.items()} | {k.upper(): v for k, v in _LEVELS.items()}
_LEVEL_CACHE |= {k.capitalize(): v for k, v in _LEVELS.items()}


def _is_rfc3339(value: str) -> bool:
    # the common "....-..-..T..:..:..(.fff)Z" shape without the regex, else the regex
    if len(value) >= 20 and value[-1] == "Z" and value[10] == "T" and value[4] == "-":
        return value[:4].isdigit() and value[11:13].isdigit() and value[17:19].isdigit()
    return _RFC3339.match(value) is not None


Parsed = tuple[float | str | None, str, str, dict[str, Any]]
"""``(ts, level, message, fields)``: ``ts`` is RFC 3339 text, epoch seconds or None."""


class LineParser:
    """Turns one record's bytes into ``(ts, level, message, fields)``.

    Formats:
        ``json``: a JSON object per line; ``ts``/``time``/``timestamp``,
            ``level``/``severity``, ``message``/``msg`` keys are lifted out, the
            other keys become fields. A line that is not a JSON object falls
            back to plain text (no error: a service's stray ``print`` still
            arrives).
        ``logfmt``: ``key=value key2="quoted value"`` pairs, same key rules.
        ``regex``: ``pattern`` with named groups; ``ts``, ``level`` and
            ``message`` groups are lifted, the others become fields; a line
            that does not match is plain text.
        ``text``: the line is the message.

    Args:
        format: one of the formats above.
        pattern: the regex for ``format = "regex"``.
        default_level: the level of records that do not name one.

    .. versionadded:: 0.1
    """

    __slots__ = ("_decode", "_regex", "default_level", "format")

    def __init__(
        self, format: str = "json", pattern: str | None = None, default_level: str = "info"
    ) -> None:
        if format not in _FORMATS:
            raise ConfigError(f"unknown format {format!r}; use one of {', '.join(_FORMATS)}")
        self.format = format
        self.default_level = default_level
        self._regex: re.Pattern[str] | None = None
        if format == "regex":
            if not pattern:
                raise ConfigError('format = "regex" needs a pattern with named groups')
            try:
                self._regex = re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"regex pattern {pattern!r} is invalid: {exc}") from exc
            if not self._regex.groupindex:
                raise ConfigError(f"regex pattern {pattern!r} has no named groups (?P<name>...)")
        self._decode = msgspec.json.Decoder().decode

    def parse(self, data: bytes) -> Parsed:
        """Parse one record's bytes."""
        if self.format == "json":
            if data[:1] == b"{":
                try:
                    obj = self._decode(data)
                except msgspec.DecodeError:
                    pass
                else:
                    if isinstance(obj, dict):
                        return self._lift(obj)
        elif self.format == "logfmt":
            pairs = {
                m.group(1).decode("utf-8", "replace"): (
                    m.group(2).decode("utf-8", "replace").replace('\\"', '"')
                    if m.group(2) is not None
                    else m.group(3).decode("utf-8", "replace")
                )
                for m in _LOGFMT.finditer(data)
            }
            if pairs:
                return self._lift(dict(pairs))
        elif self.format == "regex":
            assert self._regex is not None
            text = data.decode("utf-8", "replace")
            m = self._regex.search(text)
            if m:
                return self._lift({k: v for k, v in m.groupdict().items() if v is not None})
            return None, self.default_level, text, {}
        return None, self.default_level, data.decode("utf-8", "replace"), {}

    def _lift(self, obj: dict[str, Any]) -> Parsed:
        special = obj.keys() & _SPECIAL_KEYS
        if not special:
            return None, self.default_level, "", obj
        ts: float | str | None = None
        level = self.default_level
        message = ""
        for key in _TS_KEYS:
            if key in special:
                value = obj[key]
                # RFC 3339 text is kept as the line gave it; anything else is converted
                ts = value if isinstance(value, str) and _RFC3339.match(value) else parse_ts(value)
                if ts is not None:
                    del obj[key]
                    break
        for key in _LEVEL_KEYS:
            if key in special:
                value = obj.pop(key)
                level = (
                    _LEVEL_CACHE.get(value) or normalize_level(value, self.default_level)
                    if isinstance(value, str)
                    else normalize_level(value, self.default_level)
                )
                break
        for key in _MSG_KEYS:
            if key in special:
                value = obj.pop(key)
                message = value if isinstance(value, str) else msgspec.json.encode(value).decode()
                break
        return ts, level, message, obj


Processor = Callable[[LogRecord], "LogRecord | None"]


class Pipeline:
    """Builds records from parsed lines, then runs processors over them.

    A processor is a callable taking a :class:`LogRecord` and returning it
    (possibly changed) or ``None`` to drop it, in the spirit of structlog.

    Args:
        parser: the :class:`LineParser` for this source.
        source: the source name stamped on every record.
        labels: labels stamped on every record.
        processors: run in order after parsing.

    .. versionadded:: 0.1
    """

    __slots__ = ("_encode", "labels", "parser", "processors", "source")

    def __init__(
        self,
        parser: LineParser,
        source: str,
        labels: dict[str, str],
        processors: Sequence[Processor] = (),
    ) -> None:
        self.parser = parser
        self.source = source
        self.labels = dict(labels)
        self.processors = tuple(processors)
        self._encode = msgspec.json.Encoder().encode

    def build(
        self, identity: str, items: Iterable[tuple[int, bytes, bool]], now_epoch: float
    ) -> list[LogRecord]:
        """Records for ``(offset, data, truncated)`` items of the stream ``identity``."""
        out: list[LogRecord] = []
        prefix = f"{self.source}/{identity}/"
        now_text: str | None = None
        parse = self.parser.parse
        labels = self.labels
        for offset, data, truncated in items:
            ts, level, message, fields = parse(data)
            if truncated:
                fields["truncated"] = True
            if ts is None:
                if now_text is None:
                    now_text = format_ts(now_epoch)
                ts_text = now_text
            elif isinstance(ts, str):
                ts_text = ts
            else:
                ts_text = format_ts(ts)
            rec: LogRecord | None = LogRecord(
                id=prefix + str(offset),
                source=self.source,
                ts=ts_text,
                level=level,
                message=message,
                fields=fields,
                labels=labels,
            )
            for proc in self.processors:
                assert rec is not None
                rec = proc(rec)
                if rec is None:
                    break
            if rec is not None:
                out.append(rec)
        return out


# -- buffering, backoff, restart ----------------------------------------------


@dataclass(frozen=True, slots=True)
class BufferPolicy:
    """When to cut a batch and how much to drop at the disk cap.

    Attributes:
        max_bytes: the buffer's size cap on disk; the oldest data is dropped
            only when it is hit.
        batch_max_records: a batch holds at most this many records.
        batch_max_bytes: ... and at most this many bytes.
        batch_timeout: a non-full batch is sent when its oldest record is this old (s).

    .. versionadded:: 0.1
    """

    max_bytes: int = 256 * 1024 * 1024
    batch_max_records: int = 2000
    batch_max_bytes: int = 1024 * 1024
    batch_timeout: float = 0.2

    def __post_init__(self) -> None:
        if self.max_bytes < 64 * 1024:
            raise ConfigError("buffer max_bytes must be at least 65536")
        if self.batch_max_records < 1 or self.batch_max_bytes < 1:
            raise ConfigError("batch_max_records and batch_max_bytes must be positive")
        if self.batch_timeout < 0:
            raise ConfigError("batch_timeout must be >= 0")

    @property
    def segment_bytes(self) -> int:
        """The size of one buffer segment file (the unit dropped at the cap)."""
        return max(32 * 1024, min(8 * 1024 * 1024, self.max_bytes // 8))

    def ready(self, records: int, nbytes: int, oldest_age: float) -> bool:
        """Whether the pending data makes a batch now."""
        if records <= 0:
            return False
        return (
            records >= self.batch_max_records
            or nbytes >= self.batch_max_bytes
            or oldest_age >= self.batch_timeout
        )

    def segments_to_drop(self, segment_sizes: Sequence[int], incoming: int) -> int:
        """How many of the oldest segments to drop so ``incoming`` bytes fit the cap.

        All of them when needed (the writer then starts a fresh segment); only an
        append larger than the cap by itself can exceed it.
        """
        total = sum(segment_sizes) + incoming
        n = 0
        while total > self.max_bytes and n < len(segment_sizes):
            total -= segment_sizes[n]
            n += 1
        return n


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: ``initial * multiplier**attempt``, capped, with full jitter.

    .. versionadded:: 0.1
    """

    initial: float = 0.1
    max: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.max < self.initial or self.multiplier < 1:
            raise ConfigError("backoff needs 0 < initial <= max and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("backoff jitter must be within [0, 1]")

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """The delay before retry number ``attempt`` (0-based); ``rand`` in [0, 1)."""
        base = min(self.max, self.initial * self.multiplier ** min(attempt, 64))
        return base * (1 - self.jitter + 2 * self.jitter * rand) if self.jitter else base


class RestartMode(StrEnum):
    """When the child is restarted."""

    NEVER = "never"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """What to do after the child exited: restart after ``delay``, or stop."""

    restart: bool
    delay: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """The child's restart policy.

    Attributes:
        mode: ``never``, ``on-failure`` (non-zero exit or killed by a signal)
            or ``always``.
        max_restarts: give up after this many restarts (0: unlimited).
        backoff: delays between restarts.
        reset_after: a run longer than this many seconds resets the backoff
            and the restart count.

    .. versionadded:: 0.1
    """

    mode: str = "never"
    max_restarts: int = 5
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0, 2.0, 0.0))
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        modes = [m.value for m in RestartMode]
        if self.mode not in modes:
            raise ConfigError(f"restart = {self.mode!r} is unknown; use one of {', '.join(modes)}")
        if self.max_restarts < 0:
            raise ConfigError("max_restarts must be >= 0")

    def decide(
        self, returncode: int, restarts: int, shutting_down: bool, rand: float = 0.5
    ) -> RestartDecision:
        """Whether to restart after an exit with ``returncode`` (negative: signal)."""
        if shutting_down:
            return RestartDecision(False, reason="shutdown")
        if self.mode == RestartMode.NEVER.value:
            return RestartDecision(False, reason="restart = never")
        if self.mode == RestartMode.ON_FAILURE.value and returncode == 0:
            return RestartDecision(False, reason="exited 0")
        if self.max_restarts and restarts >= self.max_restarts:
            return RestartDecision(False, reason=f"restart limit {self.max_restarts} reached")
        return RestartDecision(True, self.backoff.delay(restarts, rand), reason="policy")


# -- file tailing -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileStat:
    """What the facade saw of one file matching a glob.

    Attributes:
        path: the path matched.
        dev, inode: the file's device and inode numbers.
        size: its size in bytes.
        head: up to ``fingerprint_bytes`` of its first bytes.
        mtime: modification time (orders new files, oldest first).
    """

    path: str
    dev: int
    inode: int
    size: int
    head: bytes
    mtime: float = 0.0


@dataclass(slots=True)
class FileState:
    """The tracker's memory of one file generation (persisted in checkpoints).

    Attributes:
        identity: ``"<inode hex>.<generation>-<fingerprint>"``: the stream identity in ids.
        dev, inode: where it lives (a copy points at its own inode, see ``copy_of``).
        fp: hex digest of the first ``fp_len`` bytes.
        fp_len: how many first bytes the fingerprint covers.
        offset: the safe offset: everything before it is in the buffers.
        path: the last path it was seen at.
        gen: the generation of this inode (bumped by truncation or reuse).
        copy_of: for a copytruncate copy, the identity of the original.
        done: the file was read to its end and is only kept to recognise it.
    """

    identity: str
    dev: int
    inode: int
    fp: str
    fp_len: int
    offset: int
    path: str
    gen: int = 0
    copy_of: str | None = None
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict for the checkpoint file."""
        return {
            "identity": self.identity,
            "dev": self.dev,
            "inode": self.inode,
            "fp": self.fp,
            "fp_len": self.fp_len,
            "offset": self.offset,
            "path": self.path,
            "gen": self.gen,
            "copy_of": self.copy_of,
            "done": self.done,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileState:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """Read ``path`` (inode ``inode``) from ``offset`` as stream ``state.identity``.

    ``reset`` is true when the state's offset was just reset (a new generation),
    so any open descriptor and line splitter for it must be rebuilt.
    ``final`` is true for a copytruncate copy read once to its end.
    """

    state: FileState
    path: str
    inode: int
    offset: int
    reset: bool = False
    final: bool = False


def fingerprint(head: bytes, fp_bytes: int) -> tuple[str, int] | None:
    """``(digest, length)`` over the first bytes, or None while there are too few.

    The fingerprint covers ``fp_bytes`` bytes, or, in a shorter file, every
    complete line so far (a prefix that can never change in an append-only
    file). A file with no complete line and fewer bytes waits.
    """
    if len(head) >= fp_bytes:
        n = fp_bytes
    else:
        n = head.rfind(b"\n") + 1
        if n == 0:
            return None
    return hashlib.blake2b(head[:n], digest_size=8).hexdigest(), n


def _fp_matches(head: bytes, state: FileState) -> bool:
    return (
        len(head) >= state.fp_len
        and hashlib.blake2b(head[: state.fp_len], digest_size=8).hexdigest() == state.fp
    )


class TailTracker:
    """Decides which files to read from where; pure, driven by :class:`FileStat` lists.

    Args:
        fingerprint_bytes: how many first bytes identify a file.
        read_from: ``"beginning"`` or ``"end"`` for files found at the first scan.
        states: checkpointed states to resume from.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        fingerprint_bytes: int = 256,
        read_from: str = "beginning",
        states: Iterable[FileState] = (),
    ) -> None:
        if fingerprint_bytes < 8:
            raise ConfigError("fingerprint_bytes must be at least 8")
        if read_from not in ("beginning", "end"):
            raise ConfigError('read_from must be "beginning" or "end"')
        self.fp_bytes = fingerprint_bytes
        self.read_from = read_from
        self.states: dict[str, FileState] = {s.identity: s for s in states}
        self._first_scan = not self.states

    def _by_inode(self, dev: int, inode: int) -> FileState | None:
        best: FileState | None = None
        for s in self.states.values():
            if s.dev == dev and s.inode == inode and (best is None or s.gen > best.gen):
                best = s
        return best

    def _new(self, st: FileStat, gen: int, offset: int) -> FileState | None:
        fp = fingerprint(st.head, self.fp_bytes)
        if fp is None:
            return None
        ident = f"{st.inode:x}.{gen}-{fp[0]}"
        state = FileState(ident, st.dev, st.inode, fp[0], fp[1], offset, st.path, gen)
        self.states[ident] = state
        return state

    def observe(self, stats: Sequence[FileStat]) -> list[ReadPlan]:
        """Reading plans for the files seen now, in the order to read them."""
        plans: list[ReadPlan] = []
        seen: set[tuple[int, int]] = set()
        first = self._first_scan
        self._first_scan = False
        copies: list[FileStat] = []
        for st in sorted(stats, key=lambda s: (s.mtime, s.path)):
            key = (st.dev, st.inode)
            if key in seen:
                continue
            seen.add(key)
            known = self._by_inode(st.dev, st.inode)
            if known is not None and known.copy_of is None:
                if _fp_matches(st.head, known) and st.size >= known.offset:
                    known.path = st.path
                    if not known.done or st.size > known.offset:
                        known.done = False
                        plans.append(ReadPlan(known, st.path, st.inode, known.offset))
                    continue
                # truncated (copytruncate) or inode reused: recover from a copy first
                copy = self._find_copy(known, stats)
                if copy is not None:
                    plans.append(copy)
                known.done = True
                new = self._new(st, known.gen + 1, 0)
                if new is not None:
                    plans.append(ReadPlan(new, st.path, st.inode, 0, reset=True))
                continue
            if known is not None:  # a copy we know
                continue
            copies.append(st)
        for st in copies:
            fp = fingerprint(st.head, self.fp_bytes)
            if fp is None or self._by_inode(st.dev, st.inode) is not None:
                continue  # too short yet, or registered as a copy just above
            original = next(
                (
                    s
                    for s in self.states.values()
                    if s.copy_of is None and s.inode != st.inode and _fp_matches(st.head, s)
                ),
                None,
            )
            if original is not None:
                if original.done:
                    # the copy of a generation already found truncated (the copy showed up
                    # after the truncate was seen): read the rest from it now
                    ident = f"{st.inode:x}.c-{original.fp}"
                    self.states[ident] = FileState(
                        ident, st.dev, st.inode, original.fp, original.fp_len, st.size, st.path,
                        0, original.identity, True,
                    )  # fmt: skip
                    if st.size > original.offset:
                        # older than anything else planned: read it first, in order
                        plans.insert(
                            0, ReadPlan(original, st.path, st.inode, original.offset, final=True)
                        )
                # else: a copy made ahead of its original's truncate: wait for the truncate,
                # when _find_copy reads it (see the essay on top)
                continue
            new = self._new(st, 0, st.size if first and self.read_from == "end" else 0)
            if new is not None:
                plans.append(ReadPlan(new, st.path, st.inode, new.offset))
        return plans

    def _find_copy(self, original: FileState, stats: Sequence[FileStat]) -> ReadPlan | None:
        plan: ReadPlan | None = None
        for st in stats:
            if st.inode == original.inode or self._by_inode(st.dev, st.inode) is not None:
                continue
            if _fp_matches(st.head, original):
                ident = f"{st.inode:x}.c-{original.fp}"
                self.states[ident] = FileState(
                    ident, st.dev, st.inode, original.fp, original.fp_len, st.size, st.path, 0,
                    original.identity, True,
                )  # fmt: skip
                if plan is None and st.size > original.offset:
                    plan = ReadPlan(original, st.path, st.inode, original.offset, final=True)
        return plan

    def forget_missing(self, stats: Sequence[FileStat], keep: set[str]) -> list[str]:
        """Drop states of files no longer present (except identities in ``keep``)."""
        present = {(s.dev, s.inode) for s in stats}
        gone = [
            ident
            for ident, s in self.states.items()
            if (s.dev, s.inode) not in present and ident not in keep
        ]
        # keep the last few truncated generations of a present inode: a late copy of
        # one of them is recognised by their fingerprint
        gens: dict[tuple[int, int], list[FileState]] = {}
        for s in self.states.values():
            if s.copy_of is None:
                gens.setdefault((s.dev, s.inode), []).append(s)
        for group in gens.values():
            group.sort(key=lambda s: s.gen)
            gone += [s.identity for s in group[:-8] if s.done]
        for ident in gone:
            if ident not in keep:
                self.states.pop(ident, None)
        return gone


# -- collector queries ----------------------------------------------------------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"30s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"``.

    Raises:
        ConfigError: not a duration.
    """
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{text!r} is not a duration (use e.g. 30s, 15m, 12h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_time_param(text: str, now_epoch: float) -> float:
    """A query time bound: RFC 3339, epoch seconds, or a duration ago (``15m``)."""
    text = text.strip()
    try:
        return parse_ts(float(text)) or 0.0
    except ValueError:
        pass
    if _DURATION.match(text):
        return now_epoch - parse_duration(text)
    value = parse_ts(text)
    if value is None:
        raise ConfigError(
            f"{text!r} is not a time (use RFC 3339, epoch seconds or a duration ago like 15m)"
        )
    return value


@dataclass(frozen=True, slots=True)
class LogQuery:
    """A collector query: filters, a page size and a cursor.

    Attributes:
        service: only records whose ``service`` label is this.
        levels: only records with one of these levels (empty: all).
        since, until: epoch-seconds bounds on ``ts`` (since inclusive, until exclusive).
        q: a case-insensitive substring of the message.
        source: only records from this source.
        limit: the page size.
        cursor: the ``seq`` to continue after (from the previous page's ``next_cursor``).
        descending: newest first.

    .. versionadded:: 0.1
    """

    service: str | None = None
    levels: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    q: str | None = None
    source: str | None = None
    limit: int = 100
    cursor: int | None = None
    descending: bool = False

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ConfigError("limit must be >= 1")

    @classmethod
    def from_params(
        cls, params: dict[str, str], now_epoch: float, max_limit: int = 10000
    ) -> LogQuery:
        """Build from URL query parameters (``service``, ``level``, ``since``, ...).

        Raises:
            ConfigError: a parameter is malformed (the API answers 400).
        """
        known = {"service", "level", "since", "until", "q", "source", "limit", "cursor", "order"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"unknown query parameter(s): {', '.join(unknown)}")
        try:
            limit = int(params.get("limit") or "100")
            cursor = int(params["cursor"]) if params.get("cursor") else None
        except ValueError as exc:
            raise ConfigError("limit and cursor must be integers") from exc
        order = params.get("order") or "asc"
        if order not in ("asc", "desc"):
            raise ConfigError('order must be "asc" or "desc"')
        levels = tuple(normalize_level(x) for x in params.get("level", "").split(",") if x.strip())
        return cls(
            service=params.get("service") or None,
            levels=levels,
            since=parse_time_param(params["since"], now_epoch) if params.get("since") else None,
            until=parse_time_param(params["until"], now_epoch) if params.get("until") else None,
            q=params.get("q") or None,
            source=params.get("source") or None,
            limit=max(1, min(limit, max_limit)),
            cursor=cursor,
            descending=order == "desc",
        )

    def matches(self, rec: LogRecord, ts: float) -> bool:
        """Whether a record passes the filters (used by the live tail)."""
        if self.service is not None and rec.labels.get("service") != self.service:
            return False
        if self.levels and rec.level not in self.levels:
            return False
        if self.source is not None and rec.source != self.source:
            return False
        if self.since is not None and ts < self.since:
            return False
        if self.until is not None and ts >= self.until:
            return False
        return not (self.q and self.q.lower() not in rec.message.lower())
