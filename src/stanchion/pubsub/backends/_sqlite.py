"""sqlite:///path.db -- a durable broker in one file, for several processes on one host.

Tables (names prefixed by ``?prefix=``): ``messages`` (the log, ``seq``
ordered), ``groups`` (per group and pattern, the ``cursor``: the last seq
handed out) and ``pending`` (messages handed out and not acked, with their
delivery count and a lease). A claim runs in one ``BEGIN IMMEDIATE``
transaction: expired leases first (a crashed consumer's messages, delivery
count + 1), then new messages after the cursor. Live consumers renew their
leases, so ``ack_timeout`` bounds how long a dead consumer's message waits.

Publishes from concurrent tasks are group-committed: one transaction per
batch of waiting publishers. WAL mode; ``?synchronous=normal`` (the default)
survives a process crash, ``?synchronous=full`` also a power loss.
Consumers in the same process wake at once on a publish; other processes
poll every ``?poll=0.05`` seconds.

Query parameters: ``prefix``, ``synchronous`` (normal|full), ``poll``
(seconds), ``retention`` (seconds an acked message is kept, default 3600).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from stanchion.errors import BackendUnavailable, ConfigError, PublishError
from stanchion.pubsub._backend import Capabilities, ConsumerSpec, Delivery, OutboundMessage
from stanchion.pubsub._core import Message, TopicPattern
from stanchion.urls import ParsedURL

__all__ = ["SQLiteDriver"]

T = TypeVar("T")

CAPABILITIES: Final = Capabilities(
    wildcards=True,
    redelivery_bound="ack_timeout (leases renewed every ack_timeout/3 by live consumers)",
)

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict[str, str])


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


class SQLiteDriver:
    """Durable embedded broker (see module docstring)."""

    capabilities = CAPABILITIES

    def __init__(self, path: str, prefix: str, sync: str, poll: float, retention: float) -> None:
        self._path = path
        self._p = prefix
        self._sync = sync
        self.poll = poll
        self._retention = retention
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stanchion-pubsub-sqlite")
        self._db: sqlite3.Connection | None = None
        self._queue: list[tuple[Sequence[OutboundMessage], asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._inserted = 0
        self._closed = False

    @classmethod
    async def open(cls, url: ParsedURL) -> SQLiteDriver:
        """Open (and create) the database file."""
        path = url.path
        if url.host:  # sqlite://relative.db
            path = url.host + url.path
        if not path or path == "/":
            raise ConfigError(f"{url.masked()}: expected sqlite:///path/to/file.db")
        if path.startswith("//"):
            path = path[1:]
        prefix = url.query.get("prefix", "")
        if prefix and not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
            prefix = re.sub(r"[^A-Za-z0-9_]", "_", prefix)
        sync = url.query.get("synchronous", "normal").lower()
        if sync not in ("normal", "full", "off"):
            raise ConfigError(f"{url.masked()}: synchronous must be normal, full or off")
        drv = cls(
            path,
            prefix + "_" if prefix and not prefix.endswith("_") else prefix,
            sync,
            url.get_float("poll", 0.05),
            url.get_float("retention", 3600.0),
        )
        try:
            await drv._run(drv._setup)
        except (sqlite3.Error, OSError) as exc:
            drv._pool.shutdown(wait=False)
            raise BackendUnavailable(
                f"cannot open SQLite broker {path}: {exc}", url=url.masked()
            ) from exc
        return drv

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise BackendUnavailable("the SQLite broker is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    # -- executor-thread functions ------------------------------------------

    def _setup(self) -> None:
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(
            self._path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._sync.upper()}")
        db.execute("PRAGMA busy_timeout=30000")
        p = self._p
        db.executescript(
            f"""
            CREATE TABLE IF NOT EXISTS {p}messages(
                seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, id TEXT NOT NULL,
                key TEXT, headers BLOB NOT NULL, data BLOB NOT NULL, ts INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS {p}messages_topic ON {p}messages(topic, seq);
            CREATE TABLE IF NOT EXISTS {p}groups(
                pattern TEXT NOT NULL, grp TEXT NOT NULL, cursor INTEGER NOT NULL,
                PRIMARY KEY(pattern, grp)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS {p}pending(
                pattern TEXT NOT NULL, grp TEXT NOT NULL, seq INTEGER NOT NULL,
                deliveries INTEGER NOT NULL, lease_until REAL NOT NULL, consumer TEXT NOT NULL,
                PRIMARY KEY(pattern, grp, seq)) WITHOUT ROWID;
            """
        )
        self._db = db

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                f"INSERT INTO {self._p}messages(topic, id, key, headers, data, ts) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self._inserted += len(rows)
        if self._inserted >= 5000:
            self._inserted = 0
            with contextlib.suppress(sqlite3.Error):
                self._trim()

    def _trim(self) -> None:
        # Delete messages older than the retention that no group still needs:
        # not pending anywhere, behind the cursor of every group on their
        # topic, and behind every wildcard group's cursor.
        db = self._db
        assert db is not None
        p = self._p
        cutoff = int((time.time() - self._retention) * 1e6)
        db.execute(
            f"DELETE FROM {p}messages WHERE ts < ? "
            f"AND seq NOT IN (SELECT seq FROM {p}pending) "
            f"AND NOT EXISTS (SELECT 1 FROM {p}groups g "
            f"  WHERE g.pattern = {p}messages.topic AND {p}messages.seq > g.cursor) "
            f"AND seq <= COALESCE((SELECT MIN(cursor) FROM {p}groups "
            "  WHERE pattern GLOB '*[*>#]*'), 9223372036854775807)",
            (cutoff,),
        )

    def _declare(self, pattern: str, group: str) -> None:
        db = self._db
        assert db is not None
        p = self._p
        db.execute(
            f"INSERT OR IGNORE INTO {p}groups(pattern, grp, cursor) "
            f"VALUES (?, ?, (SELECT COALESCE(MIN(seq), 1) - 1 FROM {p}messages))",
            (pattern, group),
        )

    def _claim(
        self, pat: TopicPattern, group: str, consumer: str, n: int, lease: float
    ) -> list[tuple[Any, ...]]:
        db = self._db
        assert db is not None
        p = self._p
        pattern = pat.pattern
        now = time.time()
        until = now + lease
        out: list[tuple[Any, ...]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            expired = db.execute(
                f"SELECT seq, deliveries FROM {p}pending WHERE pattern=? AND grp=? "
                "AND lease_until <= ? ORDER BY seq LIMIT ?",
                (pattern, group, now, n),
            ).fetchall()
            if expired:
                db.executemany(
                    f"UPDATE {p}pending SET deliveries=deliveries+1, lease_until=?, consumer=? "
                    "WHERE pattern=? AND grp=? AND seq=?",
                    [(until, consumer, pattern, group, s) for s, _ in expired],
                )
                for seq, deliveries in expired:
                    row = db.execute(
                        f"SELECT seq, topic, id, key, headers, data, ts FROM {p}messages "
                        "WHERE seq=?",
                        (seq,),
                    ).fetchone()
                    if row is None:
                        db.execute(
                            f"DELETE FROM {p}pending WHERE pattern=? AND grp=? AND seq=?",
                            (pattern, group, seq),
                        )
                    else:
                        out.append((*row, deliveries + 1))
            room = n - len(out)
            if room > 0:
                cur = db.execute(
                    f"SELECT cursor FROM {p}groups WHERE pattern=? AND grp=?", (pattern, group)
                ).fetchone()
                cursor = cur[0] if cur else 0
                fresh: list[tuple[Any, ...]] = []
                last = cursor
                if not pat.is_wildcard:
                    rows = db.execute(
                        f"SELECT seq, topic, id, key, headers, data, ts FROM {p}messages "
                        "WHERE topic=? AND seq>? ORDER BY seq LIMIT ?",
                        (pattern, cursor, room),
                    ).fetchall()
                    fresh = rows
                    if rows:
                        last = rows[-1][0]
                else:
                    while len(fresh) < room:
                        rows = db.execute(
                            f"SELECT seq, topic, id, key, headers, data, ts FROM {p}messages "
                            "WHERE seq>? ORDER BY seq LIMIT 512",
                            (last,),
                        ).fetchall()
                        if not rows:
                            break
                        for row in rows:
                            last = row[0]
                            if pat.match(row[1]):
                                fresh.append(row)
                                if len(fresh) >= room:
                                    break
                if fresh:
                    db.executemany(
                        f"INSERT OR IGNORE INTO {p}pending"
                        "(pattern, grp, seq, deliveries, lease_until, consumer) "
                        "VALUES (?, ?, ?, 1, ?, ?)",
                        [(pattern, group, r[0], until, consumer) for r in fresh],
                    )
                    out.extend((*r, 1) for r in fresh)
                if last != cursor:
                    db.execute(
                        f"UPDATE {p}groups SET cursor=? WHERE pattern=? AND grp=?",
                        (last, pattern, group),
                    )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return out

    def _ack(self, pattern: str, group: str, seqs: Sequence[object]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                f"DELETE FROM {self._p}pending WHERE pattern=? AND grp=? AND seq=?",
                [(pattern, group, s) for s in seqs],
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _set_lease(
        self, pattern: str, group: str, consumer: str, seqs: Sequence[object], until: float
    ) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                f"UPDATE {self._p}pending SET lease_until=? "
                "WHERE pattern=? AND grp=? AND seq=? AND consumer=?",
                [(until, pattern, group, s, consumer) for s in seqs],
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _lag(self, pat: TopicPattern, group: str) -> int | None:
        db = self._db
        assert db is not None
        p = self._p
        row = db.execute(
            f"SELECT cursor FROM {p}groups WHERE pattern=? AND grp=?", (pat.pattern, group)
        ).fetchone()
        if row is None:
            return None
        pending = db.execute(
            f"SELECT COUNT(*) FROM {p}pending WHERE pattern=? AND grp=?", (pat.pattern, group)
        ).fetchone()[0]
        if pat.is_wildcard:
            new = db.execute(f"SELECT COUNT(*) FROM {p}messages WHERE seq>?", (row[0],)).fetchone()[
                0
            ]
        else:
            new = db.execute(
                f"SELECT COUNT(*) FROM {p}messages WHERE topic=? AND seq>?", (pat.pattern, row[0])
            ).fetchone()[0]
        return int(pending) + int(new)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- async API -----------------------------------------------------------

    def _wake(self) -> None:
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        self._waiters.clear()

    async def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Store the messages (group commit with concurrent publishers)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((messages, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        await fut

    async def _write_loop(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            rows = [
                (m.topic, m.id, m.key, _enc.encode(m.headers), m.data, m.ts)
                for msgs, _ in batch
                for m in msgs
            ]
            try:
                await self._run(self._insert, rows)
            except Exception as exc:
                err: Exception = (
                    exc
                    if isinstance(exc, BackendUnavailable)
                    else PublishError(
                        f"SQLite broker {self._path} did not store the messages: {exc}"
                    )
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
            self._wake()

    async def declare(self, pattern: TopicPattern, group: str) -> None:
        """Create the group's cursor (at the oldest retained message)."""
        await self._run(self._declare, pattern.pattern, group)

    async def consumer(self, spec: ConsumerSpec) -> _SQLiteConsumer:
        """A member of ``spec.group``."""
        await self.declare(spec.pattern, spec.group)
        return _SQLiteConsumer(self, spec)

    async def close(self) -> None:
        """Finish pending writes and close the file."""
        if self._closed:
            return
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer
        self._wake()
        with contextlib.suppress(Exception):
            await self._run(self._close)
        self._closed = True
        self._pool.shutdown(wait=True)


class _SQLiteConsumer:
    def __init__(self, driver: SQLiteDriver, spec: ConsumerSpec) -> None:
        self._d = driver
        self._s = spec
        self._pat = spec.pattern.pattern

    async def _claim(self, n: int) -> list[Delivery]:
        s = self._s
        rows = await self._d._run(self._d._claim, s.pattern, s.group, s.consumer, n, s.ack_timeout)
        return [
            Delivery(Message(r[2], r[1], r[3], r[5], _dec.decode(r[4]), r[7], _ts(r[6])), r[0])
            for r in rows
        ]

    async def fetch(self, max_messages: int, wait: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            out = await self._claim(max_messages)
            left = deadline - loop.time()
            if out or left <= 0:
                return out
            fut: asyncio.Future[None] = loop.create_future()
            self._d._waiters.add(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, min(left, self._d.poll))
            self._d._waiters.discard(fut)

    async def ack(self, tokens: Sequence[object]) -> None:
        await self._d._run(self._d._ack, self._pat, self._s.group, tokens)

    async def extend(self, tokens: Sequence[object]) -> None:
        until = time.time() + self._s.ack_timeout
        await self._d._run(
            self._d._set_lease, self._pat, self._s.group, self._s.consumer, tokens, until
        )

    async def release(self, tokens: Sequence[object]) -> None:
        await self._d._run(
            self._d._set_lease, self._pat, self._s.group, self._s.consumer, tokens, 0.0
        )
        self._d._wake()

    async def lag(self) -> int | None:
        return await self._d._run(self._d._lag, self._s.pattern, self._s.group)

    async def close(self) -> None:
        return None
