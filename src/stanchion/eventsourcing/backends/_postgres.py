"""PostgreSQL event store (``postgresql://user@host:port/db``), on asyncpg.

Query parameters: ``prefix`` (table, function and channel name prefix),
``pool_size`` (default 10), ``idle`` (seconds between safety re-reads of an
idle subscriber, default 10), ``connect_timeout`` (default 10).

Appends are one round trip: a PL/pgSQL function moves the stream's version in
``es_streams`` with one UPDATE that also checks the tombstone and the expected
version (so writers of one stream queue on its row lock; writers of different
streams never wait for each other), then inserts the batch. The function
takes a transaction id *before* numbering its events: subscribers rely on it
(see ``GapTracker`` in ``_core``) to wait for a position that a transaction
still holds, instead of reading past it.

Live subscribers are woken by LISTEN/NOTIFY. The NOTIFY is *not* sent inside
the append's transaction: PostgreSQL serialises the commits of notifying
transactions on one lock held through the WAL flush, which cut throughput
with 8 concurrent writers by about 3x in our measurements. Instead, after an
append commits, a per-store notifier task sends NOTIFY on its own connection
with ``synchronous_commit=off`` (a NOTIFY takes a transaction id, but its
commit need not wait for a WAL flush), coalescing the appends that committed
meanwhile into one notification, and only when some LISTEN connection is
open on the database (checked in ``pg_stat_activity``, cached for a moment):
without subscribers, appends pay nothing for them. Subscribers in the same
process are woken directly. Subscribers also re-read after ``idle`` seconds
without a notification (a safety net, not a busy poll).

Schema creation runs under a transaction-scoped advisory lock, so any number
of processes may start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import asyncpg

from stanchion.errors import BackendError, BackendUnavailable, ConfigError, StreamDeleted
from stanchion.eventsourcing._backend import Capabilities, EncodedEvent, Row
from stanchion.eventsourcing._core import (
    AppendResult,
    GapTracker,
    Snapshot,
    Stored,
    check_batch,
    check_expected,
    decide_replay,
)
from stanchion.observability import get_logger
from stanchion.urls import ParsedURL

__all__ = ["PostgresBackend"]

_SCHEMA_VERSION = 3
_log = get_logger("stanchion.eventsourcing")

_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS {p}es_position AS bigint;
CREATE TABLE IF NOT EXISTS {p}es_events (
  position bigint PRIMARY KEY,
  stream text NOT NULL,
  version bigint NOT NULL,
  id uuid NOT NULL UNIQUE,
  type text NOT NULL,
  data bytea NOT NULL,
  raw boolean NOT NULL,
  metadata bytea,
  recorded_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (stream, version)
);
CREATE TABLE IF NOT EXISTS {p}es_streams (
  name text PRIMARY KEY,
  version bigint NOT NULL,
  deleted boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS {p}es_snapshots (
  stream text PRIMARY KEY, version bigint NOT NULL, state bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS {p}es_keys (subject text PRIMARY KEY, key bytea NOT NULL);
CREATE OR REPLACE FUNCTION {p}es_append(
  p_stream text, p_expected bigint, p_ids uuid[], p_types text[], p_data bytea[],
  p_raw boolean[], p_meta bytea[]
) RETURNS TABLE (status int, current bigint, first_position bigint, last_position bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
  v_n bigint := cardinality(p_ids);
  v_cur bigint;
  v_del boolean;
  v_first bigint;
  v_last bigint;
  v_attempt int := 0;
BEGIN
  -- Take a transaction id before numbering events (subscribers depend on it).
  PERFORM pg_current_xact_id();
  -- Expected version codes: -2 ANY, -1 NO_STREAM, -3 STREAM_EXISTS, n >= 0 exact
  -- (the rule of _core.check_expected). The fast path is one UPDATE that locks the
  -- stream's row, checks the expectation and moves the version; concurrent writers
  -- of one stream queue on the row lock and re-check after the winner commits.
  LOOP
    v_attempt := v_attempt + 1;
    UPDATE {p}es_streams SET version = version + v_n
      WHERE name = p_stream AND NOT deleted
        AND (p_expected = -2 OR (p_expected = -3 AND version >= 0) OR version = p_expected)
      RETURNING version - v_n INTO v_cur;
    EXIT WHEN FOUND;
    IF p_expected IN (-2, -1) THEN
      -- a new stream? (waits for a concurrent creator to commit, then does nothing)
      INSERT INTO {p}es_streams (name, version) VALUES (p_stream, v_n - 1)
        ON CONFLICT DO NOTHING;
      IF FOUND THEN
        v_cur := -1;
        EXIT;
      END IF;
      CONTINUE WHEN p_expected = -2 AND v_attempt < 3;
    END IF;
    SELECT s.version, s.deleted INTO v_cur, v_del FROM {p}es_streams s WHERE s.name = p_stream;
    IF NOT FOUND THEN
      v_cur := -1;
      v_del := false;
    END IF;
    RETURN QUERY SELECT CASE WHEN v_del THEN 2 ELSE 1 END, v_cur, 0::bigint, 0::bigint;
    RETURN;
  END LOOP;
  WITH ins AS (
    INSERT INTO {p}es_events (position, stream, version, id, type, data, raw, metadata)
    SELECT nextval('{p}es_position'), p_stream, v_cur + u.o, u.id, u.type, u.data, u.raw, u.meta
      FROM unnest(p_ids, p_types, p_data, p_raw, p_meta) WITH ORDINALITY
        AS u(id, type, data, raw, meta, o)
      ORDER BY u.o
    RETURNING {p}es_events.position
  ) SELECT min(ins.position), max(ins.position) INTO v_first, v_last FROM ins;
  RETURN QUERY SELECT 0, v_cur, v_first, v_last;
END
$fn$;
COMMENT ON FUNCTION {p}es_append(text, bigint, uuid[], text[], bytea[], boolean[], bytea[])
  IS 'stanchion eventsourcing schema {version}';
"""

# How long a writer trusts "someone listens" / "nobody listens" before asking again.
# A subscriber re-reads once, _NONE_TTL after it starts listening, to cover appends
# made by writers that had just seen nobody listening.
_SEEN_TTL = 2.0
_NONE_TTL = 0.2
_ANY_LISTENER = (
    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity"
    " WHERE datname = current_database() AND application_name = $1)"
)

_COLS = "stream, version, position, id, type, data, raw, metadata, recorded_at"

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.InterfaceError,
)


def _rows(found: list[Any]) -> list[Row]:
    # asyncpg Records index like the Row tuple: hand them over as they are.
    return found


@contextlib.contextmanager
def _mapped(url: str) -> Any:
    try:
        yield
    except (StreamDeleted, ConfigError, BackendError):
        raise
    except asyncpg.PostgresError as exc:
        raise BackendError(f"PostgreSQL: {exc}") from exc
    except _UNAVAILABLE as exc:
        raise BackendUnavailable(f"PostgreSQL at {url} is unavailable: {exc}", url=url) from exc


class PostgresBackend:
    """The ``postgresql://`` event store engine."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        durable=True, multi_process=True, live_notify=True
    )

    def __init__(self, pool: asyncpg.Pool, dsn: str, masked: str, prefix: str, idle: float):
        self._pool = pool
        self._dsn = dsn
        self._url = masked
        self._p = p = prefix
        self._idle = idle
        self._channel = f"{p}es_events"
        self._listener: asyncpg.Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._wakers: set[asyncio.Event] = set()
        self._notify_pending = False
        self._notifier: asyncio.Task[None] | None = None
        self._notify_conn: asyncpg.Connection | None = None
        # LISTEN connections name themselves so that writers can tell whether anyone
        # listens at all, and skip the NOTIFY (a transaction of its own) when nobody does.
        self._listener_name = f"stanchion-es:{self._channel}"[:63]
        self._listeners_seen = False
        self._listeners_checked = -1e9
        self._q_append = f"SELECT * FROM {p}es_append($1, $2, $3, $4, $5, $6, $7)"
        self._q_all = (
            f"SELECT {_COLS} FROM {p}es_events WHERE position >= $1 ORDER BY position LIMIT $2"
        )
        self._q_all_types = (
            f"SELECT {_COLS} FROM {p}es_events WHERE position >= $1 AND type = ANY($3::text[])"
            " ORDER BY position LIMIT $2"
        )
        # One round trip answers "deleted?" and returns the page: always at least one
        # row, whose last column is the tombstone flag (event columns NULL if none).
        tomb = (
            f"SELECT e.*, d.deleted FROM (SELECT coalesce((SELECT deleted FROM {p}es_streams"
            " WHERE name = $1), false) AS deleted) d LEFT JOIN LATERAL (SELECT"
            f" {_COLS} FROM {p}es_events WHERE stream = $1 AND version {{op}} $2"
            " ORDER BY version {dir} LIMIT $3) e ON NOT d.deleted"
        )
        self._q_fwd = tomb.format(op=">=", dir="ASC")
        self._q_back = tomb.format(op="<=", dir="DESC")
        self._q_state = f"SELECT version, deleted FROM {p}es_streams WHERE name = $1"
        self._q_sub = (
            "WITH s AS (SELECT pg_current_snapshot()::text AS snap) "
            "SELECT e.stream, e.version, e.position, e.id, e.type,"
            " CASE WHEN $3::text[] IS NULL OR e.type = ANY($3::text[]) THEN e.data END,"
            " e.raw, e.metadata, e.recorded_at, s.snap FROM s LEFT JOIN LATERAL"
            f" (SELECT * FROM {p}es_events WHERE position >= $1 ORDER BY position LIMIT $2) e"
            " ON true"
        )

    @classmethod
    async def open(cls, url: ParsedURL) -> PostgresBackend:
        prefix = url.query.get("prefix", "")
        if prefix and not (prefix.replace("_", "").isalnum() and prefix.isascii()):
            raise ConfigError(f"{url.masked()}: prefix must be ASCII letters, digits and _")
        prefix = prefix.lower()
        dsn = url.without_query()
        if url.driver:
            dsn = dsn.replace(f"{url.scheme}+{url.driver}://", "postgresql://", 1)
        dsn = dsn.replace("postgres://", "postgresql://", 1).replace("pg://", "postgresql://", 1)
        masked = url.masked()
        with _mapped(masked):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=url.get_int("pool_size", 10),
                timeout=url.get_float("connect_timeout", 10.0),
                server_settings={"jit": "off", "application_name": "stanchion-eventsourcing"},
            )
        self = cls(pool, dsn, masked, prefix, url.get_float("idle", 10.0))
        try:
            with _mapped(masked):
                await self._setup()
        except BaseException:
            await pool.close()
            raise
        return self

    async def _setup(self) -> None:
        p = self._p
        marker = f"stanchion eventsourcing schema {_SCHEMA_VERSION}"
        check = (
            "SELECT obj_description(to_regprocedure($1), 'pg_proc') = $2"
            f" AND to_regclass('{p}es_keys') IS NOT NULL"
        )
        signature = f"{p}es_append(text,bigint,uuid[],text[],bytea[],boolean[],bytea[])"
        async with self._pool.acquire() as conn:
            if await conn.fetchval(check, signature, marker):
                return
            async with conn.transaction():
                # Two processes creating the schema at once would collide on the
                # catalogs ("tuple concurrently updated"): serialise them.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock($1)", zlib.crc32(f"stanchion:es:{p}".encode())
                )
                if await conn.fetchval(check, signature, marker):
                    return
                await conn.execute(_SCHEMA.format(p=p, version=_SCHEMA_VERSION))

    def _announce(self) -> None:
        """Wake local subscribers now and, soon, every LISTENer (coalesced)."""
        self._notified()
        self._notify_pending = True
        if self._notifier is None or self._notifier.done():
            self._notifier = asyncio.get_running_loop().create_task(self._notify_loop())

    async def _notify_loop(self) -> None:
        # Its own connection, with synchronous_commit off: a NOTIFY takes a transaction
        # id, and its commit need not wait for a WAL flush (it carries no data).
        try:
            if self._notify_conn is None or self._notify_conn.is_closed():
                self._notify_conn = await asyncpg.connect(
                    self._dsn, server_settings={"synchronous_commit": "off", "jit": "off"}
                )
            conn = self._notify_conn
            while self._notify_pending:
                self._notify_pending = False
                now = asyncio.get_running_loop().time()
                if now - self._listeners_checked > (
                    _SEEN_TTL if self._listeners_seen else _NONE_TTL
                ):
                    self._listeners_seen = await conn.fetchval(_ANY_LISTENER, self._listener_name)
                    self._listeners_checked = now
                if self._listeners_seen:
                    await conn.execute(f"NOTIFY {self._channel}")
        except Exception as exc:  # subscribers elsewhere fall back on their idle re-read
            _log.warning("eventsourcing.notify_failed", error=str(exc))

    async def close(self) -> None:
        if self._notifier is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._notifier), 5)
        if self._notify_conn is not None:
            with contextlib.suppress(Exception):
                await self._notify_conn.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        await self._pool.close()

    # -- writes -------------------------------------------------------------

    async def append(
        self, stream: str, events: Sequence[EncodedEvent], expected: int
    ) -> AppendResult:
        ids = [e.id for e in events]
        check_batch(stream, ids)
        args = (
            stream,
            expected,
            ids,
            [e.type for e in events],
            [e.data for e in events],
            [e.raw for e in events],
            [e.metadata for e in events],
        )
        with _mapped(self._url):
            try:
                status, current, first, last = await self._pool.fetchrow(self._q_append, *args)
            except asyncpg.UniqueViolationError:
                replay = await self._replay(stream, ids)
                if replay is not None:
                    return replay
                raise
        if status == 0:
            self._announce()
        elif status == 2:
            raise StreamDeleted(stream)
        if status == 1:
            replay = await self._replay(stream, ids)
            if replay is not None:
                return replay
            check_expected(stream, expected, current)
            raise BackendError(f"append to {stream!r} refused at version {current}")
        n = len(events)
        return AppendResult(current + 1, current + n, first, last)

    async def _replay(self, stream: str, ids: list[Any]) -> AppendResult | None:
        with _mapped(self._url):
            found = await self._pool.fetch(
                f"SELECT id, stream, version, position FROM {self._p}es_events"
                " WHERE id = ANY($1::uuid[])",
                ids,
            )
        return decide_replay(stream, ids, [Stored(r[0], r[1], r[2], r[3]) for r in found])

    async def append_holding(
        self,
        stream: str,
        events: Sequence[EncodedEvent],
        opened: asyncio.Event,
        release: asyncio.Event,
    ) -> AppendResult:
        """Test hook: append, but keep the transaction open until ``release`` is set."""
        args = (
            stream, -2, [e.id for e in events], [e.type for e in events],
            [e.data for e in events], [e.raw for e in events], [e.metadata for e in events],
        )  # fmt: skip
        async with self._pool.acquire() as conn, conn.transaction():
            _status, current, first, last = await conn.fetchrow(self._q_append, *args)
            opened.set()
            await release.wait()
        self._announce()
        return AppendResult(current + 1, current + len(events), first, last)

    async def delete_stream(self, stream: str) -> None:
        with _mapped(self._url):
            await self._pool.execute(
                f"INSERT INTO {self._p}es_streams (name, version, deleted) VALUES ($1, -1, true)"
                " ON CONFLICT (name) DO UPDATE SET deleted = true",
                stream,
            )

    # -- reads --------------------------------------------------------------

    async def read_stream(
        self, stream: str, from_version: int, backwards: bool, limit: int
    ) -> list[Row]:
        with _mapped(self._url):
            if backwards:
                start = (1 << 62) if from_version < 0 else from_version
                found = await self._pool.fetch(self._q_back, stream, start, limit)
            else:
                found = await self._pool.fetch(self._q_fwd, stream, from_version, limit)
        if found[0][9]:
            raise StreamDeleted(stream)
        return _rows(found) if found[0][0] is not None else []

    async def read_all(
        self, from_position: int, limit: int, types: Sequence[str] | None
    ) -> list[Row]:
        with _mapped(self._url):
            if types is None:
                found = await self._pool.fetch(self._q_all, from_position, limit)
            else:
                found = await self._pool.fetch(self._q_all_types, from_position, limit, types)
        return _rows(found)

    async def _listen(self) -> None:
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            conn = await asyncpg.connect(
                self._dsn, server_settings={"application_name": self._listener_name}
            )
            await conn.add_listener(self._channel, self._notified)
            conn.add_termination_listener(self._lost)
            self._listener = conn

    def _notified(self, *_: object) -> None:
        for event in self._wakers:
            event.set()

    def _lost(self, *_: object) -> None:
        self._listener = None
        self._notified()

    async def subscribe(
        self, from_position: int, types: Sequence[str] | None, batch: int
    ) -> AsyncIterator[list[Row]]:
        wanted = None if types is None else list(types)
        wanted_set = None if types is None else frozenset(types)
        tracker = GapTracker(from_position)
        wake = asyncio.Event()
        self._wakers.add(wake)
        gap_delay = 0.01
        early_reread = False
        try:
            while True:
                if self._listener is None:
                    with _mapped(self._url):
                        await self._listen()
                    early_reread = True
                wake.clear()
                with _mapped(self._url):
                    found = await self._pool.fetch(self._q_sub, tracker.next, batch, wanted)
                snapshot = Snapshot.parse(found[0][9])
                rows = found if found[0][2] is not None else []
                ready = tracker.advance([r[2] for r in rows], snapshot)
                head = rows[:ready]
                out = _rows(head if wanted_set is None else [r for r in head if r[4] in wanted_set])
                if out:
                    yield out
                if ready == len(rows) == batch:
                    continue
                if tracker.waiting:
                    # A position is held by a transaction still open (its commit will
                    # NOTIFY) or by one rolled back (no NOTIFY): look again soon.
                    timeout, gap_delay = gap_delay, min(gap_delay * 2, 0.5)
                else:
                    timeout, gap_delay = self._idle, 0.01
                    if early_reread:
                        timeout, early_reread = _NONE_TTL * 2, False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout)
        finally:
            self._wakers.discard(wake)

    async def head_position(self) -> int:
        with _mapped(self._url):
            got = await self._pool.fetchval(
                f"SELECT coalesce(max(position), 0) FROM {self._p}es_events"
            )
        return int(got)

    async def stream_version(self, stream: str) -> int:
        with _mapped(self._url):
            state = await self._pool.fetchrow(self._q_state, stream)
        if state is None:
            return -1
        if state[1]:
            raise StreamDeleted(stream)
        return int(state[0])

    # -- snapshots and keys -------------------------------------------------

    async def save_snapshot(self, stream: str, version: int, state: bytes) -> None:
        with _mapped(self._url):
            await self._pool.execute(
                f"INSERT INTO {self._p}es_snapshots AS s (stream, version, state)"
                " VALUES ($1, $2, $3) ON CONFLICT (stream) DO UPDATE SET"
                " version = excluded.version, state = excluded.state"
                " WHERE excluded.version > s.version",
                stream,
                version,
                state,
            )

    async def load_snapshot(self, stream: str) -> tuple[int, bytes] | None:
        with _mapped(self._url):
            got = await self._pool.fetchrow(
                f"SELECT version, state FROM {self._p}es_snapshots WHERE stream = $1", stream
            )
        return None if got is None else (int(got[0]), bytes(got[1]))

    async def put_key(self, subject: str, key: bytes) -> bytes:
        with _mapped(self._url):
            await self._pool.execute(
                f"INSERT INTO {self._p}es_keys (subject, key) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                subject,
                key,
            )
            got = await self._pool.fetchval(
                f"SELECT key FROM {self._p}es_keys WHERE subject = $1", subject
            )
        return bytes(got)

    async def get_key(self, subject: str) -> bytes | None:
        with _mapped(self._url):
            got = await self._pool.fetchval(
                f"SELECT key FROM {self._p}es_keys WHERE subject = $1", subject
            )
        return None if got is None else bytes(got)

    async def delete_key(self, subject: str) -> None:
        with _mapped(self._url):
            await self._pool.execute(f"DELETE FROM {self._p}es_keys WHERE subject = $1", subject)
