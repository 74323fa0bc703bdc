"""``file:///dir``: flock plus a lease record, for candidates on one host.

Three files per group in the directory (names carry ``?prefix=``):

``<group>.lock``
    a mutex: every read-decide-write of the record happens under a short
    ``flock(LOCK_EX)`` on it, so acquiring, renewing and releasing are atomic
    across processes.
``<group>.lease``
    the lease record ``{"holder", "token", "expires_at", "ttl"}`` (wall-clock
    seconds), replaced atomically (write, fsync, rename). The token lives
    here, so it survives restarts and never goes backwards.
``<group>.alive``
    the leader holds ``flock(LOCK_EX)`` on it for its whole term. When the
    leader dies the kernel drops the lock at once, and a candidate that finds
    the lock free takes over without waiting for the TTL (failover in tens of
    milliseconds after ``kill -9``). A *paused* leader (SIGSTOP, a long GC)
    keeps its flock, which is why the record's expiry decides: once the
    lease expired, a candidate replaces ``.alive`` by a fresh file it locks
    (rename over the old one) and takes the next token; the paused process
    wakes up holding a lock on an orphaned inode, its local deadline already
    passed, and its renewals are refused because the token moved on.

Caveat: a process SIGSTOPped during the microseconds it holds the
``.lock`` mutex stalls the others until it resumes (they then fail with
``BackendUnavailable`` after the connect timeout and retry); safety is not
affected, since no one can take the lease meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from stanchion.election._backend import Capabilities, Grant, Holder
from stanchion.errors import BackendUnavailable, ConfigError
from stanchion.urls import ParsedURL

__all__ = ["FileLeases"]

T = TypeVar("T")


class FileLeases:
    """Leases in a directory: flock for fast failover, a record for pauses."""

    capabilities = Capabilities(detects_death=True, multi_host=False, persistent_tokens=True)

    def __init__(self, directory: str, *, prefix: str = "", timeout: float = 5.0) -> None:
        self._dir = Path(directory)
        self._prefix = prefix
        self._timeout = timeout
        self._alive: dict[tuple[str, int], int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, parsed: ParsedURL, *, connect_timeout: float = 5.0) -> FileLeases:
        """Build from a parsed ``file:///dir`` URL."""
        if parsed.host not in (None, "", "localhost"):
            raise ConfigError(
                f"{parsed.masked()}: file:// names a local directory: file:///var/lib/app/election"
            )
        if not parsed.path or parsed.path == "/":
            raise ConfigError(f"{parsed.masked()}: file:// needs a directory, e.g. file:///tmp/el")
        return cls(parsed.path, prefix=parsed.query.get("prefix", ""), timeout=connect_timeout)

    # -- files -------------------------------------------------------------------

    def _name(self, group: str, suffix: str) -> Path:
        return self._dir / f"{quote(self._prefix + group, safe='')}.{suffix}"

    def _ensure_dir(self) -> None:
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendUnavailable(f"cannot use directory {str(self._dir)!r}: {exc}") from exc
        if not os.access(self._dir, os.W_OK):
            raise BackendUnavailable(f"directory {str(self._dir)!r} is not writable")

    @contextlib.contextmanager
    def _mutex(self, group: str) -> Iterator[None]:
        self._ensure_dir()
        fd = os.open(self._name(group, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self._timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BackendUnavailable(
                            f"{self._name(group, 'lock')} stayed locked for {self._timeout:g}s "
                            "(a candidate is stalled inside its critical section)"
                        ) from None
                    time.sleep(0.002)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _read(self, group: str) -> dict[str, object] | None:
        try:
            data = self._name(group, "lease").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackendUnavailable(f"cannot read lease record: {exc}") from exc
        try:
            record: dict[str, object] = json.loads(data)
        except ValueError:
            raise BackendUnavailable(
                f"lease record {self._name(group, 'lease')} is corrupt; refusing to elect "
                "(tokens could go backwards); inspect or delete it"
            ) from None
        return record

    def _write(self, group: str, record: dict[str, object], *, sync: bool) -> None:
        path = self._name(group, "lease")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(json.dumps(record).encode())
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if sync:
            dfd = os.open(self._dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @staticmethod
    def _remaining(record: dict[str, object] | None, now: float) -> float:
        if record is None or record.get("holder") is None:
            return 0.0
        expires = float(record["expires_at"])  # type: ignore[arg-type]
        ttl = float(record.get("ttl", 0.0))  # type: ignore[arg-type]
        return min(expires, now + ttl) - now  # clamp: a wall clock that jumped back

    def _try_lock(self, path: Path) -> int | None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _fresh_alive(self, group: str) -> int:
        path = self._name(group, "alive")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, path)
        return fd

    def _run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            try:
                return fn()
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOENT):
                    raise BackendUnavailable(f"file backend {str(self._dir)!r}: {exc}") from exc
                raise BackendUnavailable(f"file backend {str(self._dir)!r}: {exc}") from exc

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._run, fn)

    # -- the contract ------------------------------------------------------------

    async def acquire(self, group: str, identity: str, ttl: float) -> Grant | Holder | None:
        """Take the lease if free, expired, or its holder died."""

        def go() -> Grant | Holder | None:
            with self._mutex(group):
                record = self._read(group)
                now = time.time()
                if self._remaining(record, now) > 0:
                    fd = self._try_lock(self._name(group, "alive"))
                    if fd is None:  # the holder lives
                        assert record is not None
                        return Holder(
                            str(record["holder"]),
                            int(record["token"]),  # type: ignore[call-overload]
                            self._remaining(record, now),
                        )
                else:
                    fd = self._fresh_alive(group)
                try:
                    token = int(record["token"]) + 1 if record else 1  # type: ignore[call-overload]
                    self._write(
                        group,
                        {"holder": identity, "token": token, "expires_at": now + ttl, "ttl": ttl},
                        sync=True,
                    )
                except BaseException:
                    os.close(fd)
                    raise
                self._alive[(group, token)] = fd
                return Grant(token)

        return await self._call(go)

    def _drop_alive(self, group: str, token: int) -> None:
        fd = self._alive.pop((group, token), None)
        if fd is not None:
            os.close(fd)

    async def renew(self, group: str, identity: str, token: int, ttl: float) -> bool:
        """Extend the lease if term ``token`` still holds it."""

        def go() -> bool:
            with self._mutex(group):
                record = self._read(group)
                if (
                    record is None
                    or record.get("token") != token
                    or record.get("holder") != identity
                ):
                    self._drop_alive(group, token)
                    return False
                record["expires_at"] = time.time() + ttl
                record["ttl"] = ttl
                self._write(group, record, sync=False)
                return True

        return await self._call(go)

    async def release(self, group: str, identity: str, token: int) -> None:
        """Free the lease if term ``token`` still holds it."""

        def go() -> None:
            try:
                with self._mutex(group):
                    record = self._read(group)
                    if (
                        record is not None
                        and record.get("token") == token
                        and record.get("holder") == identity
                    ):
                        record["holder"] = None
                        record["expires_at"] = 0.0
                        self._write(group, record, sync=False)
            finally:
                self._drop_alive(group, token)

        await self._call(go)

    async def observe(self, group: str) -> Holder | None:
        """The current holder, if any (a dead holder counts as none)."""

        def go() -> Holder | None:
            self._ensure_dir()
            record = self._read(group)
            remaining = self._remaining(record, time.time())
            if record is None or remaining <= 0:
                return None
            if (group, int(record["token"])) not in self._alive:  # type: ignore[call-overload]
                fd = self._try_lock(self._name(group, "alive"))
                if fd is not None:
                    os.close(fd)
                    return None  # its holder died
            return Holder(str(record["holder"]), int(record["token"]), remaining)  # type: ignore[call-overload]

        return await self._call(go)

    async def wait(self, group: str, seconds: float) -> bool:
        """Sleep up to ``seconds``; return early when the holder dies or its lease ends."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(left, 0.02))
            try:
                record = self._read(group)
            except BackendUnavailable:
                return False
            if self._remaining(record, time.time()) <= 0:
                return True
            path = self._name(group, "alive")
            if record is not None and (group, int(record["token"])) not in self._alive:  # type: ignore[call-overload]
                with contextlib.suppress(OSError):
                    fd = self._try_lock(path)
                    if fd is not None:
                        os.close(fd)
                        return True

    async def aclose(self) -> None:
        """Drop every alive lock this backend holds."""
        for key in list(self._alive):
            self._drop_alive(*key)
