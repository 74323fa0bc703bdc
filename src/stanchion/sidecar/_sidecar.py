"""The sidecar runtime: supervise a child, read its output and files, ship records.

Data path (one asyncio loop)::

    child stdout/stderr ─┐                      ┌─ DiskBuffer(sink A) ── shipper A ── sink A
                         ├─ split, multiline, ──┤
    tailed files ────────┘  parse, pipeline     └─ DiskBuffer(sink B) ── shipper B ── sink B

Delivery chain: a record is appended to every sink's disk buffer (a plain
``write``, so a SIGKILL of the sidecar cannot lose it) *before* the file
position that covers it is checkpointed; a buffer's read cursor moves only
after its sink acknowledged the batch. A restart therefore resumes each file
at its checkpoint (re-reading at most the lines appended to the buffers in
the instant before the kill, which carry the same ids) and each sink at its
first unacknowledged batch.

The one gap: bytes still in the child's pipe (and a pipe's partial last line
or open multiline record, held in memory) when the sidecar itself is
SIGKILLed. The child gets SIGTERM when its sidecar dies (Linux
``PR_SET_PDEATHSIG``) so it does not write into a pipe nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import glob
import json
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.observability import CONTENT_TYPE, Metrics, get_logger
from stanchion.sidecar._buffer import DiskBuffer
from stanchion.sidecar._config import FileInput, ParseOptions, SidecarOptions, _split_listen
from stanchion.sidecar._core import (
    FileStat,
    LineSplitter,
    LogRecord,
    Multiline,
    Pipeline,
    Processor,
    TailTracker,
)
from stanchion.sidecar._sinks import Sink, SinkRejected, make_sink

__all__ = ["Sidecar"]

log = get_logger("stanchion.sidecar")
_PIPE_READ = 65536  # one pipe's worth: bounds what a SIGKILL can catch in flight
_encode_lines = msgspec.json.Encoder().encode_lines


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(eq=False)
class _SinkRunner:
    sink: Sink
    buffer: DiskBuffer
    opts: Any
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reachable: bool = True
    last_error: str = ""
    sent: int = 0
    first_unsent: float | None = None


class _Stream:
    """Split + multiline + pipeline for one byte stream (a pipe or a file generation)."""

    __slots__ = ("identity", "multiline", "pipeline", "splitter")

    def __init__(self, parse: ParseOptions, pipeline: Pipeline, identity: str, offset: int) -> None:
        self.splitter = LineSplitter(parse.max_line_bytes, offset)
        self.multiline: Multiline | None = parse.multiline()
        self.pipeline = pipeline
        self.identity = identity

    def feed(self, data: bytes, now: float, epoch: float) -> list[LogRecord]:
        lines = self.splitter.feed(data)
        if self.multiline is not None:
            lines = self.multiline.push(lines, now)
        return self.pipeline.build(self.identity, lines, epoch) if lines else []

    def poll(self, now: float, epoch: float) -> list[LogRecord]:
        if self.multiline is None:
            return []
        rec = self.multiline.poll(now)
        return self.pipeline.build(self.identity, [rec], epoch) if rec else []

    def flush(self, epoch: float) -> list[LogRecord]:
        items = []
        last = self.splitter.flush()
        if self.multiline is not None:
            if last is not None:
                items += self.multiline.push([last], 0.0)
            tail = self.multiline.flush()
            if tail is not None:
                items.append(tail)
        elif last is not None:
            items.append(last)
        return self.pipeline.build(self.identity, items, epoch) if items else []

    @property
    def safe_offset(self) -> int:
        pending = self.multiline.pending_offset if self.multiline is not None else None
        off = self.splitter.pending_offset
        return off if pending is None else min(off, pending)


class Sidecar:
    """Runs ``argv`` under supervision and ships its logs (``stanchion sidecar``).

    Args:
        options: the validated configuration.
        argv: the child's command line (may be empty: files only).
        metrics: where to register metrics (a private registry by default).
        processors: callables run on every record after parsing (return the
            record, changed or not, or ``None`` to drop it), for every source.

    Call :meth:`run`, which returns the exit status to exit with.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        options: SidecarOptions,
        argv: list[str],
        metrics: Metrics | None = None,
        processors: Sequence[Processor] = (),
    ) -> None:
        self.opts = options
        self.processors = tuple(processors)
        self.argv = list(argv)
        self.metrics = metrics or Metrics()
        m = self.metrics
        self.m_in = m.counter("sidecar_records_in", "Records read and buffered", ["source"])
        self.m_out = m.counter("sidecar_records_out", "Records delivered", ["sink"])
        self.m_dropped = m.counter("sidecar_records_dropped", "Records dropped", ["sink", "reason"])
        self.m_errors = m.counter("sidecar_sink_errors", "Failed sends", ["sink"])
        self.m_buffer = m.gauge("sidecar_buffer_bytes", "Bytes in the disk buffer", ["sink"])
        self.m_pending = m.gauge("sidecar_buffer_records", "Undelivered records", ["sink"])
        self.m_restarts = m.counter("sidecar_child_restarts", "Child restarts")
        self.m_truncated = m.counter("sidecar_truncated_lines", "Lines cut at max_line_bytes")
        self.m_child_up = m.gauge("sidecar_child_up", "1 while the child runs")
        self.state_dir = Path(options.state_dir)
        self.labels = options.all_labels(Path(self.argv[0]).name if self.argv else "sidecar")
        self.runners: list[_SinkRunner] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.shutting_down = False
        self._stop = asyncio.Event()
        self._draining = asyncio.Event()
        self._positions_path = self.state_dir / "positions.json"
        self._trackers: dict[str, TailTracker] = {}
        self._dropped_seen: dict[str, int] = {}
        self._truncated_seen = 0
        self._last_checkpoint = 0.0

    # -- records into buffers

    def _ingest(self, records: list[LogRecord], source: str) -> None:
        if not records:
            return
        data = _encode_lines(records)
        n = len(records)
        for r in self.runners:
            r.buffer.append(data, n)
            dropped = r.buffer.dropped_records - self._dropped_seen.get(r.sink.name, 0)
            if dropped:
                self._dropped_seen[r.sink.name] = r.buffer.dropped_records
                self.m_dropped.labels(r.sink.name, "buffer_full").inc(dropped)
                log.warning("sidecar.buffer_full", sink=r.sink.name, dropped=dropped)
            if r.first_unsent is None:
                r.first_unsent = time.monotonic()
            r.wake.set()
        self.m_in.labels(source).inc(n)

    # -- shipping

    async def _ship(self, r: _SinkRunner) -> None:
        policy = r.buffer.policy
        attempt = 0
        max_records = policy.batch_max_records
        name = r.sink.name
        while True:
            unread = r.buffer.unread_bytes()
            if unread <= 0:
                r.first_unsent = None
                if self._draining.is_set():
                    return
                r.wake.clear()
                if r.buffer.unread_bytes() <= 0:
                    await r.wake.wait()
                continue
            if r.first_unsent is None:
                r.first_unsent = time.monotonic()
            age = time.monotonic() - r.first_unsent
            if not self._draining.is_set() and not policy.ready(
                r.buffer.unread_records, unread, age
            ):
                r.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(r.wake.wait(), max(0.001, policy.batch_timeout - age))
                continue
            batch = r.buffer.read(
                min(policy.batch_max_records, max_records), policy.batch_max_bytes
            )
            if batch is None:
                r.first_unsent = None
                await asyncio.sleep(0.01)
                continue
            try:
                await r.sink.send(batch.data, batch.count)
            except SinkRejected as exc:
                if exc.status == 413 and batch.count > 1:
                    # too large for the receiver: same records, smaller batches
                    r.buffer.rewind()
                    max_records = max(1, batch.count // 2)
                    log.warning("sidecar.batch_too_large", sink=name, retry_records=max_records)
                    continue
                r.buffer.ack(batch)
                self.m_dropped.labels(name, "rejected").inc(batch.count)
                log.error("sidecar.batch_rejected", sink=name, records=batch.count, error=str(exc))
                continue
            except (BackendUnavailable, Exception) as exc:
                r.buffer.rewind()
                r.reachable = False
                r.last_error = str(exc)
                self.m_errors.labels(name).inc()
                delay = r.opts.backoff.delay(attempt, random.random())
                attempt += 1
                log.warning("sidecar.sink_down", sink=name, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                continue
            r.buffer.ack(batch)
            max_records = policy.batch_max_records
            if not r.reachable:
                log.info("sidecar.sink_up", sink=name)
            r.reachable = True
            r.last_error = ""
            attempt = 0
            r.sent += batch.count
            self.m_out.labels(name).inc(batch.count)
            self.m_buffer.labels(name).set(r.buffer.size_bytes)
            self.m_pending.labels(name).set(r.buffer.pending_records)
            r.first_unsent = time.monotonic() if r.buffer.unread_bytes() > 0 else None

    # -- child

    async def _read_pipe(self, fd: int, stream: str, run_id: str) -> None:
        """Move the pipe's bytes straight into the buffers (no user-space read-ahead).

        The read callback reads, parses and appends in one step, so the only bytes
        a SIGKILL of the sidecar can lose are those still in the kernel's pipe, plus at
        most the one read (<= 64 KiB, one pipe's worth) being moved into the buffer at
        that instant, and a partial last line or an open multiline record.
        """
        parse = self.opts.stdout_parse if stream == "stdout" else self.opts.stderr_parse
        pipeline = Pipeline(
            parse.parser(), stream, {**self.labels, "stream": stream}, self.processors
        )
        s = _Stream(parse, pipeline, run_id, 0)
        echo = (sys.stdout if stream == "stdout" else sys.stderr).buffer
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)

        def on_readable() -> None:
            try:
                data = os.read(fd, _PIPE_READ)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            if self.opts.passthrough:
                with contextlib.suppress(OSError, ValueError):
                    echo.write(data)
                    echo.flush()
            self._ingest(s.feed(data, loop.time(), time.time()), stream)
            self._count_truncated(s)

        async def poll() -> None:
            while True:
                await asyncio.sleep(0.1)
                self._ingest(s.poll(loop.time(), time.time()), stream)

        poll_task = asyncio.create_task(poll()) if s.multiline is not None else None
        loop.add_reader(fd, on_readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
            os.close(fd)
            if poll_task is not None:
                poll_task.cancel()
            self._ingest(s.flush(time.time()), stream)

    def _count_truncated(self, s: _Stream) -> None:
        if s.splitter.skipped_bytes:
            self.m_truncated.inc()
            log.warning("sidecar.line_truncated", skipped_bytes=s.splitter.skipped_bytes)
            s.splitter.skipped_bytes = 0

    async def _spawn(self) -> tuple[asyncio.subprocess.Process, dict[str, int]]:
        pipes: dict[str, tuple[int, int]] = {}
        if self.opts.capture_stdout:
            pipes["stdout"] = os.pipe()
        if self.opts.capture_stderr:
            pipes["stderr"] = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=None,
                stdout=pipes["stdout"][1] if "stdout" in pipes else None,
                stderr=pipes["stderr"][1] if "stderr" in pipes else None,
                preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None,
            )
        except BaseException:
            for r, w in pipes.values():
                os.close(r)
                os.close(w)
            raise
        for _, w in pipes.values():
            os.close(w)
        return proc, {name: r for name, (r, _) in pipes.items()}

    async def _supervise(self) -> int:
        while True:
            run_id = uuid.uuid4().hex[:12]
            started = time.monotonic()
            try:
                proc, fds = await self._spawn()
            except OSError as exc:
                # like a shell: 127 command not found, 126 not executable
                log.error("sidecar.spawn_failed", argv=self.argv, error=str(exc))
                print(f"stanchion sidecar: cannot start {self.argv[0]!r}: {exc}", file=sys.stderr)
                return 127 if isinstance(exc, FileNotFoundError) else 126
            self.proc = proc
            self.m_child_up.set(1)
            log.info("sidecar.child_started", pid=proc.pid, argv=self.argv, run=run_id)
            readers = [
                asyncio.create_task(self._read_pipe(fd, name, run_id)) for name, fd in fds.items()
            ]
            code = await proc.wait()
            # the pipes end when every holder closed them; a grandchild left running in
            # the background may keep them open: read what is there, then let go
            if readers:
                _, late = await asyncio.wait(readers, timeout=2.0)
                for task in late:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
            self.m_child_up.set(0)
            log.info("sidecar.child_exited", pid=proc.pid, returncode=code)
            if time.monotonic() - started >= self.opts.restart.reset_after:
                self.restarts = 0
            decision = self.opts.restart.decide(
                code, self.restarts, self.shutting_down, random.random()
            )
            if not decision.restart:
                return code
            self.restarts += 1
            self.m_restarts.inc()
            log.info("sidecar.child_restart", delay=decision.delay, restarts=self.restarts)
            try:
                await asyncio.wait_for(self._stop.wait(), decision.delay)
                return code
            except TimeoutError:
                pass

    def _on_signal(self, sig: int) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        if sig == signal.SIGHUP:
            return
        if not self.shutting_down:
            self.shutting_down = True
            self._stop.set()
            asyncio.get_running_loop().create_task(self._kill_after_grace())

    async def _kill_after_grace(self) -> None:
        await asyncio.sleep(self.opts.grace)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            log.warning("sidecar.child_killed", pid=proc.pid, grace=self.opts.grace)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    # -- files

    def _load_positions(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._positions_path.read_text())
            return data
        except (FileNotFoundError, ValueError):
            return {}

    def _save_positions(self, force: bool = False) -> None:
        """Checkpoint file positions (every ``checkpoint_interval`` s, or now if ``force``).

        Records are in the buffers before their positions are saved; with ``fsync``
        the buffers are fsynced first, so a checkpoint never covers data a power
        loss could take. Between checkpoints a crash re-reads (and re-sends, with
        the same ids) at most ``checkpoint_interval`` seconds of lines.
        """
        if not self._trackers:
            return
        now = time.monotonic()
        if not force and now - self._last_checkpoint < self.opts.checkpoint_interval:
            return
        self._last_checkpoint = now
        if self.opts.fsync:
            for r in self.runners:
                r.buffer.sync()
        data = {
            name: [s.to_dict() for s in t.states.values()] for name, t in self._trackers.items()
        }
        tmp = self._positions_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            if self.opts.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self._positions_path)

    async def _tail(self, inp: FileInput) -> None:
        from stanchion.sidecar._core import FileState

        saved = self._load_positions().get(inp.name, [])
        tracker = TailTracker(
            inp.fingerprint_bytes,
            inp.read_from,
            [FileState.from_dict(d) for d in saved],
        )
        self._trackers[inp.name] = tracker
        pipeline = Pipeline(
            inp.parse.parser(), inp.name, {**self.labels, "stream": "file"}, self.processors
        )
        streams: dict[str, _Stream] = {}
        fds: dict[str, tuple[int, int]] = {}  # identity -> (fd, inode)
        loop = asyncio.get_running_loop()
        fp_bytes = inp.fingerprint_bytes

        def read_fd(fd: int, s: _Stream, pos: int, budget: int = 1 << 20) -> tuple[int, bool, bool]:
            """Read up to ``budget`` bytes; returns (position, got data, reached EOF)."""
            got = False
            while budget > 0:
                data = os.pread(fd, min(budget, 1 << 18), pos)
                if not data:
                    return pos, got, True
                got = True
                pos += len(data)
                budget -= len(data)
                self._ingest(s.feed(data, loop.time(), time.time()), inp.name)
                self._count_truncated(s)
            return pos, got, False

        readpos: dict[str, int] = {}
        idle_since: dict[str, float] = {}
        while True:
            stats: list[FileStat] = []
            paths: set[str] = set()
            # glob, stat, then glob again: a copytruncate copy made between our glob and our
            # stat of its truncated original is then seen in the same round
            for _round in (0, 1):
                fresh: set[str] = set()
                for pattern in inp.paths:
                    fresh.update(glob.glob(pattern))
                for p in sorted(fresh - paths):
                    st = self._stat_file(p, fp_bytes)
                    if st is not None:
                        stats.append(st)
                paths |= fresh
            present = {(s.dev, s.inode) for s in stats}
            active = False
            behind = False  # an older file is not read to its end yet: keep the order
            # files rotated out of the globs: read their open descriptors to the end
            for ident in list(fds):
                fd, ino = fds[ident]
                state = tracker.states.get(ident)
                if state is not None and (state.dev, ino) in present:
                    continue
                s = streams[ident]
                pos, got, eof = read_fd(fd, s, readpos[ident])
                readpos[ident] = pos
                behind = behind or not eof
                if state is not None:
                    state.offset = s.safe_offset
                now = loop.time()
                if got:
                    idle_since[ident] = now
                # the writer may still append through its old descriptor for a while
                # (until it reopens): keep reading for rotate_wait seconds of silence
                elif now - idle_since.setdefault(ident, now) >= inp.rotate_wait:
                    idle_since.pop(ident, None)
                    self._ingest(s.flush(time.time()), inp.name)
                    if state is not None:
                        state.offset = s.safe_offset
                        state.done = True
                    os.close(fd)
                    del fds[ident], streams[ident], readpos[ident]
                active = active or got
            for plan in [] if behind else tracker.observe(stats):
                ident = plan.state.identity
                if plan.final:
                    # the rest of a truncated generation, from its copy
                    s = _Stream(inp.parse, pipeline, ident, plan.offset)
                    try:
                        fd = os.open(plan.path, os.O_RDONLY)
                    except OSError:
                        continue
                    try:
                        read_fd(fd, s, plan.offset, 1 << 62)
                    finally:
                        os.close(fd)
                    self._ingest(s.flush(time.time()), inp.name)
                    plan.state.offset = s.safe_offset
                    old = fds.pop(ident, None)
                    if old is not None:
                        os.close(old[0])
                    streams.pop(ident, None)
                    readpos.pop(ident, None)
                    active = True
                    continue
                if plan.reset or ident not in fds:
                    for other, (ofd, oino) in list(fds.items()):
                        if oino == plan.inode and other != ident:
                            # an older generation of this inode (truncated): finish it
                            os.close(ofd)
                            del fds[other]
                            old_s = streams.pop(other)
                            readpos.pop(other, None)
                            self._ingest(old_s.flush(time.time()), inp.name)
                    try:
                        fd = os.open(plan.path, os.O_RDONLY)
                    except OSError:
                        continue
                    if os.fstat(fd).st_ino != plan.inode:
                        os.close(fd)
                        continue
                    fds[ident] = (fd, plan.inode)
                    streams[ident] = _Stream(inp.parse, pipeline, ident, plan.offset)
                    readpos[ident] = plan.offset
                s = streams[ident]
                pos, got, eof = read_fd(fds[ident][0], s, readpos[ident])
                readpos[ident] = pos
                plan.state.offset = s.safe_offset
                active = active or got
                if not eof:
                    break  # newer files wait until this one is read to its end
            for ident, s in streams.items():
                recs = s.poll(loop.time(), time.time())
                if recs:
                    self._ingest(recs, inp.name)
                    state = tracker.states.get(ident)
                    if state is not None:
                        state.offset = s.safe_offset
            tracker.forget_missing(stats, set(fds))
            self._save_positions()
            if self._stop.is_set() and not active and (self.proc is None or self._child_done()):
                for s in streams.values():
                    self._ingest(s.flush(time.time()), inp.name)
                self._save_positions(force=True)
                for fd, _ in fds.values():
                    os.close(fd)
                return
            if not active:
                await asyncio.sleep(inp.poll_interval)
            else:
                await asyncio.sleep(0)

    @staticmethod
    def _stat_file(path: str, fp_bytes: int) -> FileStat | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            head = os.pread(fd, fp_bytes, 0)
        finally:
            os.close(fd)
        if st.st_mode & 0o170000 != 0o100000:
            return None
        return FileStat(path, st.st_dev, st.st_ino, st.st_size, head, st.st_mtime)

    def _child_done(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    # -- health and metrics

    def health(self) -> dict[str, Any]:
        """The /health document: child alive, sinks reachable, buffer sizes."""
        proc = self.proc
        alive = proc is not None and proc.returncode is None
        sinks = {
            r.sink.name: {
                "type": r.sink.kind,
                "reachable": r.reachable,
                "pending_records": r.buffer.pending_records,
                "buffer_bytes": r.buffer.size_bytes,
                "dropped_records": r.buffer.dropped_records,
                "last_error": r.last_error,
            }
            for r in self.runners
        }
        ok = (alive or not self.argv) and all(r.reachable for r in self.runners)
        return {
            "status": "ok" if ok else "degraded",
            "child": {
                "pid": proc.pid if proc else None,
                "alive": alive,
                "restarts": self.restarts,
                "returncode": proc.returncode if proc else None,
            },
            "sinks": sinks,
        }

    async def _serve(self) -> Any:
        from aiohttp import web

        async def health(_: web.Request) -> web.Response:
            doc = self.health()
            return web.json_response(doc, status=200 if doc["status"] == "ok" else 503)

        async def metrics(_: web.Request) -> web.Response:
            for r in self.runners:
                self.m_buffer.labels(r.sink.name).set(r.buffer.size_bytes)
                self.m_pending.labels(r.sink.name).set(r.buffer.pending_records)
            return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, port = _split_listen(self.opts.listen)
        site = web.TCPSite(runner, host, port)
        await site.start()
        return runner

    # -- main

    async def run(self) -> int:
        """Run until the child is done (or a signal stops a files-only sidecar).

        Returns the exit status: the child's, or 128 + N when a signal N killed it.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = self._lock_state_dir()
        for so in self.opts.sinks:
            buf = DiskBuffer(self.state_dir / "buffers" / so.name, so.buffer)
            self.runners.append(_SinkRunner(make_sink(so.name, so.type, so.options), buf, so))
            if buf.pending_records:
                log.info("sidecar.buffer_resumed", sink=so.name, records=buf.pending_records)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        http = await self._serve() if self.opts.listen else None
        shippers = [asyncio.create_task(self._ship(r)) for r in self.runners]
        tails = [asyncio.create_task(self._tail(inp)) for inp in self.opts.files]
        code = 0
        try:
            if self.argv:
                code = await self._supervise()
            else:
                await self._stop.wait()
            self.shutting_down = True
            self._stop.set()
            # let the tailers read what the child wrote last, then drain the buffers
            await asyncio.wait_for(asyncio.gather(*tails), timeout=self.opts.drain_timeout)
        except TimeoutError:
            log.warning("sidecar.tail_drain_timeout")
        finally:
            for t in tails:
                t.cancel()
            await asyncio.gather(*tails, return_exceptions=True)
            with contextlib.suppress(Exception):
                self._save_positions(force=True)
            self._draining.set()
            for r in self.runners:
                r.wake.set()
            _done, pending = (
                await asyncio.wait(shippers, timeout=self.opts.drain_timeout)
                if shippers
                else (set(), set())
            )
            for t in pending:
                t.cancel()
            await asyncio.gather(*shippers, return_exceptions=True)
            for r in self.runners:
                if r.buffer.pending_records:
                    log.warning(
                        "sidecar.exit_with_pending",
                        sink=r.sink.name,
                        records=r.buffer.pending_records,
                    )
                await r.sink.close()
                r.buffer.close()
            if http is not None:
                await http.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            os.close(lock_fd)
        return code if code >= 0 else 128 - code

    def _lock_state_dir(self) -> int:
        """Take the state directory for this sidecar alone (its buffers and positions)."""
        import fcntl

        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"state_dir {str(self.state_dir)!r} is in use by another sidecar (pid {owner}); "
                "give each sidecar its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def stop(self) -> None:
        """Ask the sidecar to stop (as SIGTERM would)."""
        self._on_signal(signal.SIGTERM)
