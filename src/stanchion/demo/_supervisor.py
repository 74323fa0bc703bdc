"""Runs the demo's services as real OS processes and stops them cleanly.

Each service is a child process in its own session (so a terminal's Ctrl-C
reaches only the demo, which then stops the children in order). On Linux each
child also gets ``PR_SET_PDEATHSIG`` so that even a SIGKILLed demo leaves no
orphan behind. A child that exits on its own is restarted after a short delay
when its spec says so; a child killed on purpose by a chaos control is
restarted the same way, which is what a real orchestrator would do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stanchion.observability import get_logger

__all__ = ["Child", "ProcessSpec", "Supervisor"]

log = get_logger("stanchion.demo")


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    """How to run one service.

    Attributes:
        name: unique service name (``orders``, ``projector-1``, ...).
        argv: the command line.
        env: extra environment variables.
        restart: restart the process when it exits.
        restart_delay: seconds to wait before a restart.
        role: a label grouping replicas (``projector``).
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    restart: bool = True
    restart_delay: float = 2.0
    role: str = ""


@dataclass(slots=True)
class Child:
    """A running (or stopped) service."""

    spec: ProcessSpec
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    stopped: bool = False
    last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        """The process id while running."""
        if self.proc is None or self.proc.returncode is not None:
            return None
        return self.proc.pid

    def status(self) -> dict[str, object]:
        """A JSON-able view for the dashboard."""
        return {
            "name": self.spec.name,
            "role": self.spec.role or self.spec.name,
            "pid": self.pid,
            "running": self.pid is not None,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "uptime": round(time.monotonic() - self.started_at, 1) if self.pid else 0.0,
        }


def _pdeathsig() -> None:  # pragma: no cover - runs in the child
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Starts, watches, restarts and stops the demo's processes."""

    def __init__(self, log_dir: Path, *, grace: float = 5.0) -> None:
        self.children: dict[str, Child] = {}
        self._log_dir = log_dir
        self._grace = grace
        self._watchers: set[asyncio.Task[None]] = set()
        self._closing = False
        self.on_exit: Callable[[Child, int], None] | None = None

    async def start(self, spec: ProcessSpec) -> Child:
        """Start ``spec`` (or restart a stopped child of that name)."""
        child = self.children.get(spec.name) or Child(spec)
        self.children[spec.name] = child
        child.stopped = False
        out = open(self._log_dir / f"{spec.name}.out", "ab")  # noqa: SIM115, ASYNC230 - tiny, local
        try:
            child.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **spec.env},
                start_new_session=True,
                preexec_fn=_pdeathsig,
            )
        finally:
            out.close()
        child.started_at = time.monotonic()
        log.info("demo.process_started", name=spec.name, pid=child.proc.pid)
        task = asyncio.create_task(self._watch(child, child.proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return child

    async def _watch(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        child.last_exit = code
        log.info("demo.process_exited", name=child.spec.name, code=code)
        if self.on_exit is not None:
            self.on_exit(child, code)
        if self._closing or child.stopped or not child.spec.restart or child.proc is not proc:
            return
        await asyncio.sleep(child.spec.restart_delay)
        if not (self._closing or child.stopped) and child.proc is proc:
            child.restarts += 1
            await self.start(child.spec)

    def kill(self, name: str) -> int | None:
        """SIGKILL a service (a crash); it is restarted per its spec. Returns the pid."""
        child = self.children[name]
        pid = child.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pid

    async def stop(self, name: str) -> None:
        """Stop a service on purpose (SIGTERM, then SIGKILL after the grace period)."""
        child = self.children[name]
        child.stopped = True
        await self._terminate(child)

    async def _terminate(self, child: Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """Stop every service, in reverse start order, and wait for all of them."""
        self._closing = True
        children = list(self.children.values())[::-1]
        for child in children:
            child.stopped = True
        await asyncio.gather(*(self._terminate(c) for c in children))
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    def status(self) -> list[dict[str, object]]:
        """Every service's status."""
        return [c.status() for c in self.children.values()]
