"""The sidecar's configuration: frozen options, loaded one-to-one from ``sidecar.toml``.

Example::

    [sidecar]
    service = "orders"              # label "service" (default: the command's name)
    instance = "orders-1"           # label "instance" (default: the host name)
    state_dir = ".stanchion/sidecar"  # checkpoints and disk buffers
    listen = "127.0.0.1:9400"       # /health and /metrics ("" to disable)
    grace = 10.0                    # seconds between SIGTERM and SIGKILL
    restart = "on-failure"          # never | on-failure | always
    max_restarts = 5                # 0 = unlimited
    backoff_initial = 0.5           # restart delays: initial * 2**n, capped
    backoff_max = 30.0
    passthrough = true              # echo the child's stdout/stderr on ours
    fsync = true                    # fsync buffers before each position checkpoint
    checkpoint_interval = 0.5       # seconds between file position checkpoints
    drain_timeout = 5.0             # on exit, how long to keep delivering

    [labels]                        # more labels on every record
    env = "prod"

    [capture]                       # the child's stdout and stderr
    stdout = true
    stderr = true
    format = "json"                 # json | logfmt | regex | text
    # pattern = '^(?P<level>\\w+) (?P<message>.*)$'
    # multiline_start = '^\\S'      # a stack trace's frames join the line before
    max_line_bytes = 262144         # longer lines are truncated (fields.truncated = true)

    [[files]]
    name = "app"                    # the records' source
    paths = ["/var/log/app/*.log*"] # globs; include rotated names for lossless copytruncate
    format = "json"
    read_from = "beginning"         # or "end" (files found at the first start only)
    rotate_wait = 5.0               # keep reading a file renamed out of the globs this long

    [[sinks]]
    name = "central"
    type = "collector"              # collector | loki | elasticsearch | opensearch | otlp
    url = "http://127.0.0.1:8600"   #   | syslog | file | stdout
    token = "s3cret"
    buffer_max_bytes = 268435456
    batch_max_records = 2000
    batch_max_bytes = 1048576
    batch_timeout = 0.2
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stanchion.errors import ConfigError
from stanchion.sidecar._core import (
    Backoff,
    BufferPolicy,
    LineParser,
    Multiline,
    RestartPolicy,
)

__all__ = ["FileInput", "ParseOptions", "SidecarOptions", "SinkOptions", "load_config"]


@dataclass(frozen=True, slots=True)
class ParseOptions:
    """How a source's bytes become records.

    Attributes:
        format: ``json``, ``logfmt``, ``regex`` or ``text``.
        pattern: the regex (named groups) for ``format = "regex"``.
        multiline_start: a regex; a line matching it starts a new record.
        multiline_max_lines: a multiline record holds at most this many lines.
        multiline_timeout: an open multiline record is emitted after this idle time (s).
        max_line_bytes: a longer line is truncated to this many bytes.
        default_level: the level of records that name none.
    """

    format: str = "json"
    pattern: str | None = None
    multiline_start: str | None = None
    multiline_max_lines: int = 500
    multiline_timeout: float = 1.0
    max_line_bytes: int = 256 * 1024
    default_level: str = "info"

    def __post_init__(self) -> None:
        self.parser()  # validates format and pattern
        self.multiline()
        if self.max_line_bytes < 16:
            raise ConfigError("max_line_bytes must be at least 16")

    def parser(self) -> LineParser:
        """A fresh parser."""
        return LineParser(self.format, self.pattern, self.default_level)

    def multiline(self) -> Multiline | None:
        """A fresh multiline assembler, or None."""
        if not self.multiline_start:
            return None
        return Multiline(
            self.multiline_start,
            max_lines=self.multiline_max_lines,
            max_bytes=self.max_line_bytes * 4,
            timeout=self.multiline_timeout,
        )


@dataclass(frozen=True, slots=True)
class FileInput:
    """Files to tail.

    Attributes:
        name: the records' ``source``.
        paths: glob patterns.
        parse: parsing options.
        read_from: ``beginning`` or ``end`` for files present at the very first start.
        fingerprint_bytes: first bytes that identify a file (with its inode).
        poll_interval: how often the globs are scanned (s).
        rotate_wait: a file renamed out of the globs is read until it has been
            silent this long (s): the writer may append to it until it reopens.
    """

    name: str
    paths: tuple[str, ...]
    parse: ParseOptions = field(default_factory=ParseOptions)
    read_from: str = "beginning"
    fingerprint_bytes: int = 256
    poll_interval: float = 0.25
    rotate_wait: float = 5.0

    def __post_init__(self) -> None:
        if self.rotate_wait < 0:
            raise ConfigError(f"file input {self.name!r}: rotate_wait must be >= 0")
        if not self.paths:
            raise ConfigError(f"file input {self.name!r} needs at least one path")
        if self.read_from not in ("beginning", "end"):
            raise ConfigError(f'file input {self.name!r}: read_from must be "beginning" or "end"')
        if self.poll_interval <= 0:
            raise ConfigError(f"file input {self.name!r}: poll_interval must be > 0")


@dataclass(frozen=True, slots=True)
class SinkOptions:
    """One sink and its own buffer.

    Attributes:
        name: unique name (the buffer directory and metric label).
        type: ``collector``, ``loki``, ``elasticsearch``, ``opensearch``, ``otlp``,
            ``syslog``, ``file`` or ``stdout``.
        options: the type's own keys (url, token, address, path, index, ...).
        buffer: batching and disk cap.
        backoff: delays between retries while the sink is down.
    """

    name: str
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    buffer: BufferPolicy = field(default_factory=BufferPolicy)
    backoff: Backoff = field(default_factory=lambda: Backoff(0.1, 10.0, 2.0, 0.2))

    def __post_init__(self) -> None:
        from stanchion.sidecar._sinks import make_sink

        make_sink(self.name, self.type, self.options)  # validates type and keys


@dataclass(frozen=True, slots=True)
class SidecarOptions:
    """Everything ``stanchion sidecar`` needs (see the module docstring for the TOML).

    .. versionadded:: 0.1
    """

    service: str = ""
    instance: str = ""
    host: str = field(default_factory=socket.gethostname)
    labels: dict[str, str] = field(default_factory=dict)
    state_dir: str = ".stanchion/sidecar"
    listen: str = ""
    grace: float = 10.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    passthrough: bool = True
    capture_stdout: bool = True
    capture_stderr: bool = True
    stdout_parse: ParseOptions = field(default_factory=ParseOptions)
    stderr_parse: ParseOptions = field(default_factory=ParseOptions)
    files: tuple[FileInput, ...] = ()
    sinks: tuple[SinkOptions, ...] = ()
    fsync: bool = True
    checkpoint_interval: float = 0.5
    drain_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.grace < 0:
            raise ConfigError("grace must be >= 0")
        if self.checkpoint_interval < 0 or self.drain_timeout < 0:
            raise ConfigError("checkpoint_interval and drain_timeout must be >= 0")
        if not self.sinks:
            raise ConfigError("configure at least one [[sinks]] entry")
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            raise ConfigError(f"sink names must be unique, got {names}")
        inputs = [f.name for f in self.files]
        if len(set(inputs)) != len(inputs) or {"stdout", "stderr"} & set(inputs):
            raise ConfigError(f"file input names must be unique and not stdout/stderr: {inputs}")
        if self.listen:
            _split_listen(self.listen)

    def all_labels(self, service: str) -> dict[str, str]:
        """The base labels of every record."""
        return {
            "service": self.service or service,
            "instance": self.instance or self.host,
            "host": self.host,
            **self.labels,
        }


def _split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"listen = {listen!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


_PARSE_KEYS = {f for f in ParseOptions.__dataclass_fields__}
_SIDECAR_KEYS = {
    "service", "instance", "host", "state_dir", "listen", "grace", "restart", "max_restarts",
    "backoff_initial", "backoff_max", "reset_after", "passthrough", "fsync", "drain_timeout",
    "checkpoint_interval",
}  # fmt: skip
_BUFFER_KEYS = {"buffer_max_bytes", "batch_max_records", "batch_max_bytes", "batch_timeout"}
_BACKOFF_KEYS = {"backoff_initial", "backoff_max"}


def _check(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")


def _parse_opts(table: dict[str, Any], where: str) -> ParseOptions:
    opts = {k: v for k, v in table.items() if k in _PARSE_KEYS}
    try:
        return ParseOptions(**opts)
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def options_from_dict(data: dict[str, Any], where: str = "config") -> SidecarOptions:
    """Build :class:`SidecarOptions` from a parsed TOML document."""
    _check(data, {"sidecar", "labels", "capture", "stdout", "stderr", "files", "sinks"}, where)
    sc = dict(data.get("sidecar", {}))
    _check(sc, _SIDECAR_KEYS, f"{where} [sidecar]")
    try:
        restart = RestartPolicy(
            mode=str(sc.pop("restart", "never")),
            max_restarts=int(sc.pop("max_restarts", 5)),
            backoff=Backoff(
                float(sc.pop("backoff_initial", 0.5)), float(sc.pop("backoff_max", 30.0)), 2.0, 0.0
            ),
            reset_after=float(sc.pop("reset_after", 60.0)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where} [sidecar]: {exc}") from exc
    capture = dict(data.get("capture", {}))
    _check(capture, _PARSE_KEYS | {"stdout", "stderr"}, f"{where} [capture]")
    base = {k: v for k, v in capture.items() if k in _PARSE_KEYS}
    out_t = {**base, **data.get("stdout", {})}
    err_t = {**base, **data.get("stderr", {})}
    _check(dict(data.get("stdout", {})), _PARSE_KEYS, f"{where} [stdout]")
    _check(dict(data.get("stderr", {})), _PARSE_KEYS, f"{where} [stderr]")
    files = []
    for i, f in enumerate(data.get("files", [])):
        w = f"{where} [[files]] #{i + 1}"
        _check(
            f, _PARSE_KEYS | {"name", "paths", "path", "read_from", "fingerprint_bytes",
                              "poll_interval", "rotate_wait"}, w
        )  # fmt: skip
        paths = f.get("paths", f.get("path"))
        if isinstance(paths, str):
            paths = [paths]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ConfigError(f"{w}: paths must be a list of glob patterns")
        try:
            files.append(
                FileInput(
                    name=str(f.get("name", f"file{i + 1}")),
                    paths=tuple(paths),
                    parse=_parse_opts(f, w),
                    read_from=str(f.get("read_from", "beginning")),
                    fingerprint_bytes=int(f.get("fingerprint_bytes", 256)),
                    poll_interval=float(f.get("poll_interval", 0.25)),
                    rotate_wait=float(f.get("rotate_wait", 5.0)),
                )
            )
        except ConfigError as exc:
            raise ConfigError(f"{w}: {exc}") from exc
    sinks = []
    for i, s in enumerate(data.get("sinks", [])):
        s = dict(s)
        name = str(s.pop("name", f"sink{i + 1}"))
        w = f"{where} [[sinks]] {name!r}"
        if "type" not in s:
            raise ConfigError(f"{w}: missing key 'type'")
        kind = str(s.pop("type"))
        try:
            buffer = BufferPolicy(
                max_bytes=int(s.pop("buffer_max_bytes", 256 * 1024 * 1024)),
                batch_max_records=int(s.pop("batch_max_records", 2000)),
                batch_max_bytes=int(s.pop("batch_max_bytes", 1024 * 1024)),
                batch_timeout=float(s.pop("batch_timeout", 0.2)),
            )
            backoff = Backoff(
                float(s.pop("backoff_initial", 0.1)), float(s.pop("backoff_max", 10.0)), 2.0, 0.2
            )
            sinks.append(SinkOptions(name, kind, s, buffer, backoff))
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"{w}: {exc}") from exc
    stdout_parse = _parse_opts(out_t, f"{where} [capture]")
    stderr_parse = _parse_opts(err_t, f"{where} [capture]/[stderr]")
    try:
        return SidecarOptions(
            service=str(sc.get("service", "")),
            instance=str(sc.get("instance", "")),
            host=str(sc.get("host", socket.gethostname())),
            labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
            state_dir=str(sc.get("state_dir", ".stanchion/sidecar")),
            listen=str(sc.get("listen", "")),
            grace=float(sc.get("grace", 10.0)),
            restart=restart,
            passthrough=bool(sc.get("passthrough", True)),
            capture_stdout=bool(capture.get("stdout", True)),
            capture_stderr=bool(capture.get("stderr", True)),
            stdout_parse=stdout_parse,
            stderr_parse=stderr_parse,
            files=tuple(files),
            sinks=tuple(sinks),
            fsync=bool(sc.get("fsync", True)),
            checkpoint_interval=float(sc.get("checkpoint_interval", 0.5)),
            drain_timeout=float(sc.get("drain_timeout", 5.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def load_config(path: str | Path) -> SidecarOptions:
    """Read and validate ``sidecar.toml``.

    Raises:
        ConfigError: the file is missing, not TOML, or a value is invalid;
            the message names the file and the key.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(p)!r} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from exc
    return options_from_dict(data, str(p))
