"""The sharded SQL router: one pool and one circuit breaker per shard."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from stanchion.errors import (
    BackendUnavailable,
    CircuitOpenError,
    ConfigError,
    ReshardError,
    ShardKeyRequired,
    ShardMapChanged,
    ShardUnavailable,
    UnknownShard,
)
from stanchion.observability import Metrics, get_logger
from stanchion.resilience import CircuitBreaker
from stanchion.sharding._backend import ADMIN_VERSION, Params, Row, Shard, ShardTx
from stanchion.sharding._core import Key, StatementInfo, Strategy, inspect_statement
from stanchion.sharding._map import MapState, ShardMap
from stanchion.sharding._progress import ReshardProgress
from stanchion.urls import BackendRegistry, default_registry

__all__ = ["RouterOptions", "ScatterResult", "ShardedDatabase", "Transaction", "open_shard"]

T = TypeVar("T")
_log = get_logger("stanchion.sharding")

# The shard-map version under which the current task made its routing
# decision. Shard connections declare it to the write fence (not the map's
# latest version): a write routed by a map that a reshard has since paused or
# cut over must be rejected by the fence even if the map was reloaded between
# the decision and the statement.
_ROUTING: ContextVar[int | None] = ContextVar("stanchion_shard_routing_version", default=None)


async def open_shard(
    url: str,
    *,
    version_fn: Callable[[], int] = lambda: ADMIN_VERSION,
    pool_size: int | None = None,
    timeout: float | None = None,  # noqa: ASYNC109
    registry: BackendRegistry | None = None,
) -> Shard:
    """Open a shard database by URL (``sqlite:///s1.db``, ``postgresql://host/db``)."""
    cls, _ = (registry or default_registry).load("shard", url)
    return cast(
        Shard,
        await cls.open(  # type: ignore[attr-defined]
            url, version_fn=version_fn, pool_size=pool_size, timeout=timeout
        ),
    )


@dataclass(frozen=True, slots=True)
class RouterOptions:
    """Options of a :class:`ShardedDatabase`.

    Attributes:
        refresh_interval: seconds between checks of the stored map version
            (a router also reloads at once when a shard's write fence says
            its map is stale).
        pause_timeout: longest wait, in seconds, for a write to a key that a
            reshard is cutting over; then :class:`ReshardError`.
        pool_size: connections per shard (default: 4 for SQLite, 10 for
            PostgreSQL, or the URL's ``?pool=``).
        timeout: connect / acquire timeout per shard, in seconds.
        breaker_minimum_calls: calls a shard's breaker sees before judging.
        breaker_window: calls in the breaker's sliding window.
        breaker_failure_rate: failure fraction (connection failures only)
            that opens a shard's breaker.
        breaker_wait: seconds an open breaker waits before a trial call.
    """

    refresh_interval: float = 1.0
    pause_timeout: float = 30.0
    pool_size: int | None = None
    timeout: float = 5.0
    breaker_minimum_calls: int = 3
    breaker_window: int = 10
    breaker_failure_rate: float = 0.5
    breaker_wait: float = 5.0

    def __post_init__(self) -> None:
        for name in ("refresh_interval", "pause_timeout", "timeout", "breaker_wait"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or v <= 0:
                raise ConfigError(f"RouterOptions.{name} must be > 0, got {v!r}")
        if self.pool_size is not None and self.pool_size < 1:
            raise ConfigError("RouterOptions.pool_size must be >= 1")
        if not 0 < self.breaker_failure_rate <= 1:
            raise ConfigError("RouterOptions.breaker_failure_rate must be in (0, 1]")
        if self.breaker_minimum_calls < 1 or self.breaker_window < 1:
            raise ConfigError("RouterOptions breaker window and minimum calls must be >= 1")


@dataclass(frozen=True, slots=True)
class ScatterResult:
    """The answer of a scatter-gather query.

    Attributes:
        rows: the rows of every shard that answered, in shard order.
        failed: shard name -> the exception of each shard that did not
            answer (empty when the answer is complete).
    """

    rows: list[Row]
    failed: dict[str, Exception] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every shard answered."""
        return not self.failed


def _is_down(exc: BaseException) -> bool:
    return isinstance(exc, CircuitOpenError | BackendUnavailable | ShardUnavailable)


class _Slot:
    __slots__ = ("breaker", "counts", "lock", "name", "shard", "url")

    def __init__(self, name: str, url: str, breaker: CircuitBreaker) -> None:
        self.name = name
        self.url = url
        self.breaker = breaker
        self.shard: Shard | None = None
        self.lock = asyncio.Lock()
        self.counts: dict[str, Any] = {}


class Transaction:
    """Statements in one transaction on the shard that owns a key.

    Obtained from ``async with db.transaction(key) as tx``. Statements are
    checked like :meth:`ShardedDatabase.execute` (the shard key must appear
    on sharded tables).
    """

    def __init__(self, db: ShardedDatabase, key: Key, shard: str, tx: ShardTx) -> None:
        self._db = db
        self._tx = tx
        self.key = key
        self.shard = shard

    async def execute(self, sql: str, params: Params = None) -> int:
        """Run a statement in the transaction; return the rows changed."""
        self._db._info(sql)
        return await self._tx.execute(sql, params)

    async def fetch(self, sql: str, params: Params = None) -> list[Row]:
        """Run a query in the transaction; return its rows."""
        self._db._info(sql)
        return await self._tx.fetch(sql, params)

    async def fetch_one(self, sql: str, params: Params = None) -> Row | None:
        """The first row of a query, or ``None``."""
        rows = await self.fetch(sql, params)
        return rows[0] if rows else None


class ShardedDatabase:
    """Routes SQL to the shard that owns a key; scatter-gathers across all shards.

    Build it with :meth:`connect`. Each shard gets its own connection pool
    and its own circuit breaker (from :mod:`stanchion.resilience`): a shard
    that is down fails fast with :class:`~stanchion.errors.ShardUnavailable`
    while the others keep serving.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        shard_map: ShardMap,
        *,
        options: RouterOptions,
        registry: BackendRegistry | None,
        metrics: Metrics | None,
    ) -> None:
        self._map = shard_map
        self.options = options
        self._registry = registry
        self._slots: dict[str, _Slot] = {}
        self._cache: dict[str, StatementInfo] = {}
        self._refresh_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._closed = False
        self._metrics = metrics or Metrics()
        self._queries = self._metrics.counter(
            "shard_queries", "Statements routed, by shard and operation", ("shard", "op")
        )
        self._failures = self._metrics.counter(
            "shard_unavailable", "Calls that failed because a shard was unavailable", ("shard",)
        )
        self._version_gauge = self._metrics.gauge(
            "shard_map_version", "Shard-map version this router uses", ()
        )
        self._applied_version = -1
        self._apply(shard_map.state)

    # -- construction -------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        shard_map: ShardMap | str,
        tables: Mapping[str, str] | None = None,
        reference_tables: Iterable[str] = (),
        *,
        schema: Sequence[str] = (),
        options: RouterOptions | None = None,
        registry: BackendRegistry | None = None,
        metrics: Metrics | None = None,
    ) -> ShardedDatabase:
        """Connect a router to the shards of ``shard_map``.

        Args:
            shard_map: a :class:`ShardMap` (stored if its store holds none;
                the stored map wins if it does) or a store URL to load it from.
            tables: sharded table -> its shard key column, e.g.
                ``{"users": "user_id"}`` (remembered in the store).
            reference_tables: tables copied to every shard (``("regions",)``).
            schema: DDL run on every shard now and on new shards when
                resharding (use ``CREATE TABLE IF NOT EXISTS``). Without it, a
                reshard copies the tables' definitions from an existing shard.
            options: :class:`RouterOptions`.

        Raises:
            ConfigError: bad table declarations or map.
        """
        if isinstance(shard_map, str):
            shard_map = await ShardMap.load(shard_map, registry=registry)
        elif isinstance(shard_map, ShardMap):
            await shard_map.save()
        else:
            raise ConfigError(f"connect() needs a ShardMap or a store URL, got {shard_map!r}")
        tables = dict(tables or {})
        for t, c in tables.items():
            if not isinstance(t, str) or not isinstance(c, str) or not t or not c:
                raise ConfigError(f"tables maps table name -> key column, got {t!r}: {c!r}")
        if isinstance(reference_tables, str):
            reference_tables = (reference_tables,)
        refs = tuple(reference_tables)
        both = set(tables) & set(refs)
        if both:
            raise ConfigError(f"table(s) {sorted(both)} cannot be both sharded and reference")
        if isinstance(schema, str):
            schema = (schema,)
        await shard_map._declare(tables, refs, schema)
        db = cls(shard_map, options=options or RouterOptions(), registry=registry, metrics=metrics)
        if schema:
            try:
                await db.execute_all_statements(list(schema))
            except ShardUnavailable as exc:  # a down shard must not stop the others
                _log.warning("shard.schema_skipped", shards=sorted(exc.shards), error=str(exc))
        db._watch_task = asyncio.create_task(db._watch(), name="stanchion-shardmap-watch")
        return db

    async def __aenter__(self) -> ShardedDatabase:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every shard pool and the map store."""
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        for slot in self._slots.values():
            if slot.shard is not None:
                with contextlib.suppress(Exception):
                    await slot.shard.close()
                slot.shard = None
            slot.breaker.close()
        await self._map.close()

    # -- introspection ------------------------------------------------------------

    @property
    def shard_map(self) -> ShardMap:
        """The shard map this router follows."""
        return self._map

    @property
    def shards(self) -> tuple[str, ...]:
        """The shard names in force."""
        return self._map.state.strategy.shards

    @property
    def tables(self) -> dict[str, str]:
        """Sharded table -> key column."""
        return dict(self._map.state.tables)

    @property
    def reference_tables(self) -> tuple[str, ...]:
        """Tables copied to every shard."""
        return self._map.state.reference_tables

    def shard_for(self, key: Key) -> str:
        """The shard that owns ``key`` now."""
        return self._map.state.strategy.shard_for(key)

    def breaker(self, shard: str) -> CircuitBreaker:
        """The circuit breaker of ``shard``.

        Raises:
            UnknownShard: no such shard.
        """
        return self._slot(shard).breaker

    # -- map following --------------------------------------------------------------

    def _apply(self, state: MapState) -> None:
        urls = state.all_urls
        for name, url in urls.items():
            slot = self._slots.get(name)
            if slot is None:
                self._slots[name] = _Slot(name, url, self._new_breaker(name))
            elif slot.url != url:
                old = slot.shard
                slot.url, slot.shard = url, None
                if old is not None:
                    asyncio.get_running_loop().create_task(old.close())
        self._applied_version = state.version
        self._version_gauge.set(state.version)

    def _new_breaker(self, name: str) -> CircuitBreaker:
        o = self.options
        return CircuitBreaker(
            f"shard:{name}",
            failure_rate_threshold=o.breaker_failure_rate,
            window_size=o.breaker_window,
            minimum_calls=o.breaker_minimum_calls,
            wait_duration_open=o.breaker_wait,
            half_open_calls=1,
            record=(BackendUnavailable,),
            registry=self._metrics.registry,
        )

    async def refresh(self) -> bool:
        """Reload the shard map now if its stored version changed; True if it did."""
        async with self._refresh_lock:
            changed = await self._map.refresh()
            if changed:
                _log.info("shardmap.reloaded", version=self._map.version)
            self._apply(self._map.state)
            return changed

    async def _watch(self) -> None:
        while not self._closed:
            interval = self.options.refresh_interval
            if self._map.state.phase == "pause":
                interval = min(interval, 0.05)
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: keep routing by the last map
                _log.warning("shardmap.refresh_failed", error=str(exc))

    # -- routing --------------------------------------------------------------------

    def _info(self, sql: str) -> StatementInfo:
        info = self._cache.get(sql)
        if info is None:
            if not isinstance(sql, str):
                raise ConfigError(f"sql must be a string, got {type(sql).__name__}")
            st = self._map.state
            info = inspect_statement(sql, st.tables, st.reference_tables)
            if len(self._cache) < 4096:
                self._cache[sql] = info
        if info.missing_key is not None:
            raise ShardKeyRequired(*info.missing_key)
        if info.writes and info.reference:
            raise ConfigError(
                f"writes to reference table(s) {list(info.reference)} must reach every shard: "
                "use execute_all()"
            )
        return info

    async def _route(self, key: Key, write: bool) -> str:
        """The owner of ``key``; also makes the map version it was decided under
        the version this task's next statements declare to the shard's fence."""
        st = self._map._state
        owner = st.strategy.shard_for(key)
        if write and st.reshard is not None and st.reshard["phase"] == "pause":
            target = cast(Strategy, st.reshard["strategy"])
            if target.shard_for(key) != owner:
                await self._wait_pause(key)
                return await self._route(key, write)
        _ROUTING.set(st.version)
        return owner

    async def _wait_pause(self, key: object) -> None:
        deadline = time.monotonic() + self.options.pause_timeout
        while self._map.state.phase == "pause":
            if time.monotonic() > deadline:
                raise ReshardError(
                    f"writes to key {key!r} are paused for a reshard cutover that has not "
                    f"finished within {self.options.pause_timeout}s; run resume_reshard() "
                    "or abort_reshard()"
                )
            await asyncio.sleep(0.02)
            with contextlib.suppress(Exception):
                await self.refresh()

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownShard(name, tuple(self._map.state.all_urls))
        return slot

    async def _open(self, slot: _Slot) -> Shard:
        shard = slot.shard
        if shard is not None:
            return shard
        async with slot.lock:
            if slot.shard is None:
                state = self._map

                def version() -> int:
                    v = _ROUTING.get()
                    return v if v is not None else state.state.version

                slot.shard = await open_shard(
                    slot.url,
                    version_fn=version,
                    pool_size=self.options.pool_size,
                    timeout=self.options.timeout,
                    registry=self._registry,
                )
            return slot.shard

    def _count(self, slot: _Slot, op: str) -> None:
        child = slot.counts.get(op)
        if child is None:
            child = slot.counts[op] = self._queries.labels(slot.name, op)
        child.inc()

    async def _call(self, name: str, op: str, fn: Callable[[Shard], Awaitable[T]]) -> T:
        slot = self._slots.get(name) or self._slot(name)
        self._count(slot, op)
        try:
            shard = slot.shard
            if shard is None:
                shard = await slot.breaker.call_async(self._open, slot)
            return await slot.breaker.call_async(fn, shard)
        except (CircuitOpenError, BackendUnavailable) as exc:
            self._failures.labels(name).inc()
            raise ShardUnavailable({name: exc}) from exc

    async def _routed(self, key: Key, sql: str, op: str, fn: Callable[[Shard], Awaitable[T]]) -> T:
        info = self._cache.get(sql)
        if info is None or info.missing_key is not None or (info.writes and info.reference):
            info = self._info(sql)
        for _ in range(5):
            st = self._map._state
            if info.writes and st.reshard is not None:
                name = await self._route(key, True)
            else:
                name = st.strategy.shard_for(key)
                _ROUTING.set(st.version)
            try:
                return await self._call(name, op, fn)
            except ShardMapChanged:
                await self.refresh()
        raise ShardMapChanged("the shard map kept changing; retry", version=self._map.version)

    async def execute(self, key: Key, sql: str, params: Params = None) -> int:
        """Run a statement on the shard that owns ``key``; return the rows changed.

        ``params`` are positional in the driver's native style (``?`` for
        SQLite, ``$1`` for PostgreSQL) or a mapping for ``:name`` parameters
        (translated for PostgreSQL).

        Raises:
            TypeError: ``key`` is not str, bytes or int.
            ShardKeyRequired: the statement uses a sharded table without its key.
            ShardUnavailable: the shard is down or its breaker is open.
        """
        return await self._routed(key, sql, "execute", lambda s: s.execute(sql, params))

    async def fetch(self, key: Key, sql: str, params: Params = None) -> list[Row]:
        """Run a query on the shard that owns ``key``; return its rows as dicts."""
        return await self._routed(key, sql, "fetch", lambda s: s.fetch(sql, params))

    async def fetch_one(self, key: Key, sql: str, params: Params = None) -> Row | None:
        """The first row of :meth:`fetch`, or ``None``."""
        rows = await self.fetch(key, sql, params)
        return rows[0] if rows else None

    @contextlib.asynccontextmanager
    async def transaction(self, key: Key) -> AsyncIterator[Transaction]:
        """A transaction on the shard that owns ``key``.

        Raises:
            ShardUnavailable: the shard is down.
            ShardMapChanged: a reshard cut over during the transaction; retry it.
        """
        name = await self._route(key, True)
        slot = self._slot(name)
        self._queries.labels(name, "transaction").inc()
        try:
            shard = slot.shard
            if shard is None:
                shard = await slot.breaker.call_async(self._open, slot)
            async with slot.breaker, shard.transaction() as tx:
                yield Transaction(self, key, name, tx)
        except (CircuitOpenError, BackendUnavailable) as exc:
            self._failures.labels(name).inc()
            raise ShardUnavailable({name: exc}) from exc
        except ShardMapChanged:
            with contextlib.suppress(Exception):
                await self.refresh()
            raise

    async def fetch_all(
        self,
        sql: str,
        params: Params = None,
        *,
        on_error: Literal["raise", "partial"] = "raise",
    ) -> ScatterResult:
        """Run a query on every shard in parallel and gather the rows.

        While a reshard copies or cleans up, rows a shard holds only as a
        copy (not owned under the strategy in force) are left out when the
        statement reads one sharded table and returns its key column.

        Args:
            on_error: ``"raise"``: any failed shard raises
                :class:`ShardUnavailable` naming every failed shard (an
                error that is not an outage, such as bad SQL, is raised as
                is);
                ``"partial"``: return the rows of the shards that answered
                and name the others in ``ScatterResult.failed``.
        """
        if on_error not in ("raise", "partial"):
            raise ConfigError(f"on_error must be 'raise' or 'partial', got {on_error!r}")
        if not isinstance(sql, str):
            raise ConfigError(f"sql must be a string, got {type(sql).__name__}")
        st = self._map.state
        _ROUTING.set(st.version)
        info = inspect_statement(sql, st.tables, st.reference_tables)
        names = st.strategy.shards
        results = await asyncio.gather(
            *(self._call(n, "fetch_all", lambda s: s.fetch(sql, params)) for n in names),
            return_exceptions=True,
        )
        rows: list[Row] = []
        failed: dict[str, Exception] = {}
        col = st.tables[info.sharded[0]] if st.reshard and len(info.sharded) == 1 else None
        for name, res in zip(names, results):
            if isinstance(res, ShardUnavailable):
                inner = res.shards.get(name)
                failed[name] = inner if isinstance(inner, Exception) else res
            elif isinstance(res, Exception):
                failed[name] = res
            elif isinstance(res, BaseException):
                raise res
            elif col is not None:
                own = st.strategy.shard_for
                rows.extend(r for r in res if col not in r or own(r[col]) == name)
            else:
                rows.extend(res)
        if failed and on_error == "raise":
            other = [e for e in failed.values() if not _is_down(e)]
            if other:  # a bad statement is the caller's error, not an outage
                raise other[0]
            first = next(iter(failed.values()))
            raise ShardUnavailable(failed) from first
        return ScatterResult(rows, failed)

    async def execute_all(self, sql: str, params: Params = None) -> dict[str, int]:
        """Run a statement on every shard (DDL, writes to reference tables).

        During a reshard, statements that touch no sharded table also reach
        the shards being added.

        Returns:
            shard name -> rows changed.

        Raises:
            ShardUnavailable: naming every shard that failed (the others ran it).
        """
        return await self.execute_all_statements([sql], params)

    async def execute_all_statements(
        self, statements: Sequence[str], params: Params = None
    ) -> dict[str, int]:
        """Run statements, in order, on every shard (see :meth:`execute_all`)."""
        st = self._map.state
        touches_sharded = False
        writes_reference = False
        for sql in statements:
            info = inspect_statement(sql, st.tables, st.reference_tables)
            touches_sharded = touches_sharded or bool(info.sharded)
            writes_reference = writes_reference or (info.writes and bool(info.reference))
        if writes_reference and st.phase == "pause":
            await self._wait_pause("reference tables")
            st = self._map.state
        names = list(st.strategy.shards if touches_sharded else st.all_urls)
        _ROUTING.set(st.version)

        async def run(shard: Shard) -> int:
            n = 0
            for sql in statements:
                n += await shard.execute(sql, params)
            return n

        for _ in range(5):
            results = await asyncio.gather(
                *(self._call(n, "execute_all", run) for n in names), return_exceptions=True
            )
            if any(isinstance(r, ShardMapChanged) for r in results):
                await self.refresh()
                continue
            break
        out: dict[str, int] = {}
        failed: dict[str, BaseException] = {}
        for name, res in zip(names, results):
            if isinstance(res, ShardUnavailable):
                failed[name] = res.shards.get(name) or res
            elif isinstance(res, BaseException):
                raise res
            else:
                out[name] = res
        if failed:
            raise ShardUnavailable(failed)
        return out

    # -- resharding -------------------------------------------------------------------

    async def reshard(
        self,
        new_strategy: Strategy,
        urls: Mapping[str, str] | None = None,
        *,
        batch_size: int = 500,
        on_progress: Callable[[ReshardProgress], object] | None = None,
        grace: float | None = None,
    ) -> ReshardProgress:
        """Move to ``new_strategy`` online, copying only the keys whose owner changes.

        Steps: copy the moving keys to their new shards while change-capture
        triggers record every write; catch up; pause writes to the moving
        keys only; drain the change log; cut over by bumping the shard-map
        version; delete the old copies. Resumable after a crash
        (:meth:`resume_reshard`) and abortable before the cutover
        (:meth:`abort_reshard`).

        Args:
            new_strategy: the strategy to move to.
            urls: URLs of the shards the new strategy adds.
            batch_size: keys per copy / catch-up batch.
            on_progress: called with a :class:`ReshardProgress` after each step.
            grace: seconds to wait after the cutover before removing the
                fences and old copies (default: twice ``refresh_interval``,
                so every router has reloaded the map).

        Returns:
            The final progress (phase ``"done"``).

        Raises:
            ReshardError: a reshard is already in progress, or one cannot run.
            UnknownShard: the new strategy names a shard without a URL.
        """
        from stanchion.sharding._reshard import Resharder

        r = Resharder(self, batch_size=batch_size, on_progress=on_progress, grace=grace)
        return await r.start(new_strategy, dict(urls or {}))

    async def resume_reshard(
        self,
        *,
        on_progress: Callable[[ReshardProgress], object] | None = None,
        grace: float | None = None,
    ) -> ReshardProgress:
        """Continue an interrupted reshard (or abort) from its stored state.

        Raises:
            ReshardError: no reshard is in progress.
        """
        from stanchion.sharding._reshard import Resharder

        r = Resharder(self, batch_size=None, on_progress=on_progress, grace=grace)
        return await r.resume()

    async def abort_reshard(self) -> ReshardProgress:
        """Abandon a reshard that has not cut over; routing and data stay as before.

        Raises:
            ReshardError: no reshard is in progress, or it already cut over.
        """
        from stanchion.sharding._reshard import Resharder

        return await Resharder(self, batch_size=None, on_progress=None, grace=None).abort()

    async def reshard_status(self) -> ReshardProgress | None:
        """The stored progress of a running reshard, or ``None``."""
        from stanchion.sharding._reshard import progress_of

        state = await self._map.reshard_state()
        return progress_of(state) if state else None
