"""A disk-backed queue of encoded records: segment files plus an acknowledged cursor.

Layout of a buffer directory::

    000000000001.seg   records, one JSON object per line (NDJSON), appended
    000000000002.seg   ...
    ack                "2 1234": everything before segment 2, offset 1234 is delivered

Appends go straight to the segment with ``os.write`` (no user-space buffer),
so a SIGKILL of the sidecar loses nothing appended; ``sync()`` adds an
``fsync`` for power loss. The reader hands out batches of whole lines from
the acknowledged cursor on; :meth:`ack` moves the cursor (one small fixed-size
record rewritten in place) and deletes fully delivered segments. After a
restart reading starts again at the cursor, so at most the unacknowledged
batches are sent twice.
When the size cap is hit the oldest segments are dropped whole (counted).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from stanchion.sidecar._core import BufferPolicy

__all__ = ["Batch", "DiskBuffer"]


@dataclass(frozen=True, slots=True)
class Batch:
    """Whole NDJSON lines read from the buffer, and where they end."""

    data: bytes
    count: int
    segment: int
    end: int


class DiskBuffer:
    """One sink's disk buffer (see the module docstring)."""

    def __init__(self, directory: str | Path, policy: BufferPolicy) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy
        self.dropped_records = 0
        self._sizes: dict[int, int] = {}
        for p in sorted(self.dir.glob("*.seg")):
            self._sizes[int(p.stem)] = p.stat().st_size
        ack_seg, ack_off = 0, 0
        ack = self.dir / "ack"
        if ack.exists():
            try:
                seg_text, off_text = ack.read_text().split()[:2]
                ack_seg, ack_off = int(seg_text), int(off_text)
            except ValueError:
                ack_seg, ack_off = 0, 0
        for seg in [s for s in self._sizes if s < ack_seg]:
            self._unlink(seg)
        if not self._sizes:
            self._sizes[max(ack_seg, 1)] = 0
        first = min(self._sizes)
        if ack_seg < first:
            ack_seg, ack_off = first, 0
        self._ack = (ack_seg, ack_off)
        self._read = self._ack
        self._cur = max(self._sizes)
        path = self._path(self._cur)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._repair_tail()
        self._rfds: dict[int, int] = {}
        self._ack_fd: int | None = None
        self.pending_records = self._count_unacked()
        self.unread_records = self.pending_records

    # -- internals

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:012d}.seg"

    def _unlink(self, seg: int) -> None:
        fd = self._rfds.pop(seg, None) if hasattr(self, "_rfds") else None
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            self._path(seg).unlink()
        self._sizes.pop(seg, None)

    def _repair_tail(self) -> None:
        # a write cut short by a crash leaves a partial last line: cut it off
        size = self._sizes.get(self._cur, 0)
        if size == 0:
            return
        with open(self._path(self._cur), "rb") as f:
            f.seek(max(0, size - 65536))
            tail = f.read()
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else max(0, size - len(tail))
        os.truncate(self._path(self._cur), keep)
        self._sizes[self._cur] = keep

    def _count_unacked(self) -> int:
        n = 0
        for seg in sorted(self._sizes):
            if seg < self._ack[0]:
                continue
            start = self._ack[1] if seg == self._ack[0] else 0
            with open(self._path(seg), "rb") as f:
                f.seek(start)
                while chunk := f.read(1 << 20):
                    n += chunk.count(b"\n")
        return n

    def _rfd(self, seg: int) -> int:
        fd = self._rfds.get(seg)
        if fd is None:
            fd = self._rfds[seg] = os.open(self._path(seg), os.O_RDONLY)
        return fd

    # -- public

    @property
    def size_bytes(self) -> int:
        """Bytes on disk not yet acknowledged (approximately: whole segments)."""
        return sum(self._sizes.values()) - self._ack[1]

    def append(self, data: bytes, count: int) -> None:
        """Append NDJSON ``data`` holding ``count`` records."""
        if not data:
            return
        sizes = [self._sizes[s] for s in sorted(self._sizes)]
        drop = self.policy.segments_to_drop(sizes, len(data))
        if drop:
            self._drop_oldest(drop)
        if (
            self._sizes[self._cur] + len(data) > self.policy.segment_bytes
            and self._sizes[self._cur]
        ):
            os.close(self._fd)
            self._cur += 1
            self._sizes[self._cur] = 0
            self._fd = os.open(self._path(self._cur), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._sizes[self._cur] += len(data)
        self.pending_records += count
        self.unread_records += count

    def _drop_oldest(self, n: int) -> None:
        if n >= len(self._sizes):  # the segment being written goes too: start the next one
            os.close(self._fd)
            self._cur += 1
            self._sizes[self._cur] = 0
            self._fd = os.open(self._path(self._cur), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for seg in sorted(self._sizes)[:n]:
            start = self._ack[1] if seg == self._ack[0] else 0
            lost = 0
            if seg >= self._ack[0]:
                with open(self._path(seg), "rb") as f:
                    f.seek(start)
                    while chunk := f.read(1 << 20):
                        lost += chunk.count(b"\n")
            self.dropped_records += lost
            self.pending_records -= lost
            unread_lost = lost
            if seg == self._read[0]:
                # only what was not handed out yet leaves the unread count
                with open(self._path(seg), "rb") as f:
                    f.seek(self._read[1])
                    unread_lost = f.read().count(b"\n")
            elif seg < self._read[0]:
                unread_lost = 0
            self.unread_records = max(0, self.unread_records - unread_lost)
            self._unlink(seg)
        first = min(self._sizes)
        if self._ack[0] < first:
            self._ack = (first, 0)
            self._write_ack()
        if self._read[0] < first:
            self._read = (first, 0)

    def sync(self) -> None:
        """fsync the segment being written and the ack record (power-loss durability)."""
        os.fsync(self._fd)
        if self._ack_fd is not None:
            os.fsync(self._ack_fd)

    def rewind(self) -> None:
        """Read again from the acknowledged cursor (after a failed send)."""
        self._read = self._ack
        self.unread_records = self.pending_records

    def unread_bytes(self) -> int:
        """Bytes appended but not yet handed out by :meth:`read`."""
        seg, off = self._read
        return sum(size for s, size in self._sizes.items() if s >= seg) - off

    def read(self, max_records: int, max_bytes: int) -> Batch | None:
        """The next batch of whole lines after the read cursor, or None."""
        seg, off = self._read
        while True:
            size = self._sizes.get(seg)
            if size is None:
                if seg < self._cur:
                    seg, off = seg + 1, 0
                    continue
                return None
            if off < size:
                break
            if seg >= self._cur:
                return None
            seg, off = seg + 1, 0
        data = os.pread(self._rfd(seg), min(max_bytes, size - off), off)
        count = data.count(b"\n")
        if count > max_records:
            idx = -1
            for _ in range(max_records):
                idx = data.index(b"\n", idx + 1)
            data = data[: idx + 1]
            count = max_records
        elif not data.endswith(b"\n"):
            cut = data.rfind(b"\n")
            if cut < 0:
                # one line longer than max_bytes: take it whole
                nl = -1
                chunk = data
                while nl < 0 and off + len(chunk) < size:
                    more = os.pread(self._rfd(seg), 1 << 20, off + len(chunk))
                    chunk += more
                    nl = more.find(b"\n")
                end = chunk.find(b"\n")
                data = chunk[: end + 1] if end >= 0 else chunk
                count = 1 if end >= 0 else 0
                if not count:
                    return None
            else:
                data = data[: cut + 1]
                count = data.count(b"\n")
        self._read = (seg, off + len(data))
        self.unread_records = max(0, self.unread_records - count)
        return Batch(data, count, seg, off + len(data))

    def ack(self, batch: Batch) -> None:
        """Mark everything up to the end of ``batch`` delivered."""
        if (batch.segment, batch.end) <= self._ack:
            return
        self._ack = (batch.segment, batch.end)
        self.pending_records = max(0, self.pending_records - batch.count)
        for seg in [s for s in self._sizes if s < batch.segment]:
            self._unlink(seg)
        self._write_ack()

    def _write_ack(self) -> None:
        # one 40-byte record rewritten in place: a single small write is never torn by a
        # process crash, and it costs no rename per batch
        if self._ack_fd is None:
            self._ack_fd = os.open(self.dir / "ack", os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(self._ack_fd, f"{self._ack[0]} {self._ack[1]}".ljust(39).encode() + b"\n", 0)

    def close(self) -> None:
        """Close the files."""
        os.close(self._fd)
        if self._ack_fd is not None:
            os.close(self._ack_fd)
            self._ack_fd = None
        for fd in self._rfds.values():
            os.close(fd)
        self._rfds.clear()
