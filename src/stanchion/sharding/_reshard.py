"""Online resharding: copy the moving keys, catch up, pause them briefly, cut over.

Theory of operation
-------------------

Only keys whose owner changes move. A key *moves* from shard S when the old
strategy places it on S and the new one elsewhere. Every step below is
idempotent and its progress is stored with the shard map, so a resharder
killed at any instant (SIGKILL included) is resumed by running the same step
again (``resume_reshard``).

1. **prepare** (map version V+1, phase ``copy``): routers learn that a
   reshard runs (fetch_all then drops rows a shard holds only as a copy;
   writes to reference tables also reach the new shards). The new shards
   get the tables. Every old shard gets a *change log* per sharded table,
   filled by AFTER triggers with the key of every row written, and a *write
   fence*: BEFORE triggers that reject writes from routers declaring a map
   version below the fence (0 for now). Reference tables are copied.
2. **copy**: each old shard's keys are scanned in key order, in batches;
   the moving ones are *resynced*: read every row of those keys on the
   source, then in one transaction on the target delete the keys' rows and
   insert the source's. Resync copies a key's current state, so it is
   idempotent and order-free. The scan cursor is stored after each batch.
3. **catch-up**: the change logs are read oldest first; the moving keys in a
   batch are resynced, then the batch's entries are deleted. Deleting what
   was processed (rather than remembering a sequence watermark) is what
   makes this correct on PostgreSQL, where sequence order is not commit
   order: an entry that commits late is simply seen in a later batch.
4. **pause** (version V+2): routers now hold writes to moving keys (and
   to reference tables) until the next version; other keys are not paused.
   The fence is raised to V+2 on every old shard, so a router that has not
   yet reloaded the map gets "stale shard map", reloads and then waits too;
   raising the fence also waits for transactions already writing (a SHARE
   lock on PostgreSQL, the write lock on SQLite). Then no moving key can
   change on its source any more: the change logs are drained, and the
   reference tables are copied again.
5. **cutover** (version V+3, phase ``cleanup``): one compare-and-set of the
   map makes the new strategy and URLs authoritative; paused writes resume
   on the new owners.
6. **cleanup**: after a grace period (routers that poll have reloaded), the
   triggers, logs and fences are dropped and every old shard deletes the
   keys it no longer owns. The final version V+4 clears the reshard state.

``abort_reshard`` (before the cutover only) restores routing first (a new
version without the reshard), then drops triggers and deletes the copies
made on the targets: the old shards were never changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from stanchion.errors import ConfigError, ReshardError, UnknownShard
from stanchion.observability import get_logger
from stanchion.sharding._backend import ADMIN_VERSION, Shard
from stanchion.sharding._core import (
    Strategy,
    decode_json_value,
    encode_json_value,
    strategy_from_dict,
)
from stanchion.sharding._map import MapState
from stanchion.sharding._progress import ReshardProgress

if TYPE_CHECKING:
    from stanchion.sharding._api import ShardedDatabase

__all__ = ["Resharder", "progress_of"]

_log = get_logger("stanchion.sharding.reshard")


def progress_of(state: dict[str, Any]) -> ReshardProgress:
    """The :class:`ReshardProgress` of a stored state."""
    return ReshardProgress.from_state(state, time.time())


class Resharder:
    """Drives one reshard of a :class:`ShardedDatabase` (see the module essay)."""

    def __init__(
        self,
        db: ShardedDatabase,
        *,
        batch_size: int | None,
        on_progress: Callable[[ReshardProgress], object] | None,
        grace: float | None,
    ) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
        self.db = db
        self.map = db.shard_map
        self._batch = batch_size
        self._on_progress = on_progress
        self._grace = grace if grace is not None else 2 * db.options.refresh_interval + 0.1
        self._shards: dict[str, Shard] = {}
        self._saved_at = 0.0
        self.state: dict[str, Any] = {}
        self.old: Strategy
        self.new: Strategy

    # -- helpers --------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return int(self.state.get("batch_size") or 500)

    @property
    def tables(self) -> dict[str, str]:
        return dict(self.state["tables"])

    @property
    def refs(self) -> list[str]:
        return list(self.state["reference_tables"])

    @property
    def old_urls(self) -> dict[str, str]:
        return dict(self.state["old"]["urls"])

    @property
    def new_urls(self) -> dict[str, str]:
        return dict(self.state["new"]["urls"])

    def _load(self, state: dict[str, Any]) -> None:
        self.state = state
        self.old = strategy_from_dict(state["old"]["strategy"])
        self.new = strategy_from_dict(state["new"]["strategy"])
        state.setdefault("counters", {})
        state.setdefault("cursors", {})

    def _count(self, name: str, n: float) -> None:
        c = self.state["counters"]
        c[name] = c.get(name, 0) + n

    async def _admin(self, name: str) -> Shard:
        shard = self._shards.get(name)
        if shard is None:
            from stanchion.sharding._api import open_shard

            url = self.new_urls.get(name) or self.old_urls.get(name)
            if url is None:
                raise UnknownShard(name, tuple({**self.old_urls, **self.new_urls}))
            shard = await open_shard(
                url, version_fn=lambda: ADMIN_VERSION, pool_size=2, registry=self.db._registry
            )
            self._shards[name] = shard
        return shard

    async def _close(self) -> None:
        shards, self._shards = self._shards, {}
        for s in shards.values():
            with contextlib.suppress(Exception):
                await s.close()

    async def _save(self, *, throttle: bool = False) -> None:
        # Batches are idempotent, so a crash between two saves only repeats
        # work: within a phase, progress is stored at most every 0.25 s.
        now = time.monotonic()
        if throttle and now - self._saved_at < 0.25:
            self._report()
            return
        self._saved_at = now
        self.state["version"] = self.map.version
        ok = await self.map._backend().write_reshard(self.map.version, self.state)
        if not ok:
            raise ReshardError(
                "the shard map changed under the reshard (another resharder, or an abort); stopping"
            )
        self._report()

    def _report(self) -> None:
        if self._on_progress is not None:
            self._on_progress(progress_of(self.state))

    async def _set_map(self, new: MapState, state: dict[str, Any] | None) -> None:
        if state is not None:
            state["version"] = new.version
        await self.map._update(new, state)
        self.db._apply(self.map.state)
        _log.info("reshard.map", version=new.version, phase=new.phase)
        if state is not None:
            self._report()

    def _moving(self, source: str, keys: Sequence[Any]) -> list[Any]:
        old, new = self.old.shard_for, self.new.shard_for
        try:
            return [k for k in keys if k is not None and old(k) == source and new(k) != source]
        except TypeError as exc:
            raise ReshardError(f"cannot place a stored key: {exc}") from exc

    # -- entry points -----------------------------------------------------------------

    async def start(self, new_strategy: Strategy, urls: dict[str, str]) -> ReshardProgress:
        """Begin a reshard to ``new_strategy``."""
        if not isinstance(new_strategy, Strategy):
            raise ConfigError(f"reshard() needs a Strategy, got {type(new_strategy).__name__}")
        await self.db.refresh()
        st = self.map.state
        stored = await self.map.reshard_state()
        if st.reshard is not None or stored is not None:
            phase = (stored or {}).get("phase") or st.phase
            raise ReshardError(
                f"a reshard is already in progress (phase {phase}); "
                "run resume_reshard() or abort_reshard() first"
            )
        new_urls: dict[str, str] = {}
        for name in new_strategy.shards:
            url = urls.get(name) or st.urls.get(name)
            if url is None:
                raise UnknownShard(
                    name,
                    tuple({**st.urls, **urls}),
                    f"the new strategy's shard {name!r} has no URL; pass urls={{{name!r}: ...}}",
                )
            new_urls[name] = url
        extra = [n for n in urls if n not in new_strategy.shards]
        if extra:
            raise UnknownShard(
                extra[0],
                new_strategy.shards,
                f"urls names shard(s) {extra} that the new strategy does not use",
            )
        if new_strategy == st.strategy and new_urls == st.urls:
            raise ReshardError("the new strategy and URLs are the current ones: nothing to move")
        state = {
            "phase": "copy",
            "old": {"strategy": st.strategy.to_dict(), "urls": st.urls},
            "new": {"strategy": new_strategy.to_dict(), "urls": new_urls},
            "tables": st.tables,
            "reference_tables": list(st.reference_tables),
            "schema": list(st.schema),
            "batch_size": self._batch or 500,
            "started": time.time(),
            "old_version": st.version,
            "cursors": {},
            "counters": {},
        }
        self._load(state)
        all_urls = {**st.urls, **new_urls}
        await self._set_map(
            replace(
                st,
                version=st.version + 1,
                reshard={"phase": "copy", "strategy": new_strategy, "urls": all_urls},
            ),
            state,
        )
        _log.info("reshard.started", old=repr(self.old), new=repr(self.new))
        return await self._run()

    async def resume(self) -> ReshardProgress:
        """Continue from the stored state."""
        await self.db.refresh()
        stored = await self.map.reshard_state()
        if stored is None:
            raise ReshardError("no reshard is in progress: nothing to resume")
        self._load(stored)
        if self._batch:
            self.state["batch_size"] = self._batch
        _log.info("reshard.resumed", phase=self.state["phase"])
        return await self._run()

    async def abort(self) -> ReshardProgress:
        """Abandon a reshard that has not cut over."""
        await self.db.refresh()
        stored = await self.map.reshard_state()
        if stored is None:
            raise ReshardError("no reshard is in progress: nothing to abort")
        self._load(stored)
        if self.state["phase"] in ("cleanup", "done"):
            raise ReshardError(
                "the reshard already cut over to the new strategy; it cannot be aborted "
                "(run resume_reshard() to finish its cleanup)"
            )
        try:
            if self.state["phase"] != "aborting":
                self.state["phase"] = "aborting"
                st = self.map.state
                await self._set_map(replace(st, version=st.version + 1, reshard=None), self.state)
            return await self._finish_abort()
        finally:
            await self._close()

    # -- the steps -----------------------------------------------------------------------

    async def _run(self) -> ReshardProgress:
        try:
            if self.state["phase"] == "aborting":
                return await self._finish_abort()
            if self.state["phase"] == "copy":
                await self._prepare()
                await self._copy()
                self.state["phase"] = "catchup"
                await self._save()
            if self.state["phase"] == "catchup":
                await self._catchup(rounds=3)
                st = self.map.state
                assert st.reshard is not None
                self.state["phase"] = "pause"
                self.state["pause_started"] = time.time()
                await self._set_map(
                    replace(st, version=st.version + 1, reshard={**st.reshard, "phase": "pause"}),
                    self.state,
                )
            if self.state["phase"] == "pause":
                await self._pause_and_cutover()
            if self.state["phase"] == "cleanup":
                return await self._cleanup()
            raise ReshardError(f"unknown reshard phase {self.state['phase']!r}")
        finally:
            await self._close()

    async def _prepare(self) -> None:
        old_names = list(self.old_urls)
        new_only = [n for n in self.new_urls if n not in self.old_urls]
        for name in new_only:
            await self._create_tables(await self._admin(name), old_names)
        fenced = [*self.tables, *self.refs]
        for name in old_names:
            shard = await self._admin(name)
            await shard.install_fence(fenced)
            for table, column in self.tables.items():
                await shard.install_capture(table, column)
        await self._copy_reference(new_only)

    async def _create_tables(self, shard: Shard, sources: list[str]) -> None:
        schema = self.state.get("schema") or []
        if schema:
            for sql in schema:
                await shard.execute(sql)
            return
        for table in [*self.refs, *self.tables]:
            if await shard.table_exists(table):
                continue
            src = await self._admin(sources[0])
            if src.dialect != shard.dialect:
                raise ReshardError(
                    f"cannot copy the definition of {table!r} from {src.dialect} to "
                    f"{shard.dialect}: pass schema=[...] to ShardedDatabase.connect()"
                )
            for sql in await src.table_ddl(table):
                await shard.execute(sql)

    async def _copy_reference(self, targets: list[str]) -> None:
        if not targets or not self.refs:
            return
        src = await self._admin(next(iter(self.old_urls)))
        for table in self.refs:
            rows = await src.fetch(f'SELECT * FROM "{table}"')
            cols = list(rows[0]) if rows else []
            data = [tuple(r.values()) for r in rows]
            for name in targets:
                await (await self._admin(name)).replace_table(table, cols, data)

    async def _resync(self, source: str, table: str, column: str, keys: Sequence[Any]) -> int:
        """Make each key's rows on its new shard equal to its rows on ``source``."""
        if not keys:
            return 0
        src = await self._admin(source)
        cols, rows = await src.rows_for_keys(table, column, keys)
        groups: dict[str, tuple[list[Any], list[tuple[Any, ...]]]] = {}
        new = self.new.shard_for
        for k in keys:
            groups.setdefault(new(k), ([], []))[0].append(k)
        if rows:
            i = cols.index(column)
            for r in rows:
                groups[new(r[i])][1].append(r)
        for target, (ks, rs) in groups.items():
            await (await self._admin(target)).replace_keys(table, column, ks, cols, rs)
        return len(rows)

    async def _copy(self) -> None:
        cursors = self.state["cursors"]
        for table, column in self.tables.items():
            for source in self.old_urls:
                ck = f"copy:{table}@{source}"
                cur = cursors.get(ck) or {}
                if cur.get("done"):
                    continue
                after = decode_json_value(cur.get("after"))
                src = await self._admin(source)
                while True:
                    keys = await src.scan_keys(table, column, after, self.batch)
                    if not keys:
                        break
                    moving = self._moving(source, keys)
                    n = await self._resync(source, table, column, moving)
                    self._count("rows_copied", n)
                    self._count("keys_copied", len(moving))
                    self._count("keys_moved", len(moving))
                    after = keys[-1]
                    cursors[ck] = {"after": encode_json_value(after)}
                    await self._save(throttle=True)
                cursors[ck] = {"done": True}
                await self._save()

    async def _catchup_once(self, source: str, table: str, column: str) -> int:
        src = await self._admin(source)
        entries = await src.read_changes(table, self.batch)
        if not entries:
            return 0
        keys = list(dict.fromkeys(k for _, k in entries if k is not None))
        n = await self._resync(source, table, column, self._moving(source, keys))
        await src.delete_changes(table, [s for s, _ in entries])
        self._count("changes_applied", len(entries))
        self._count("rows_copied", n)
        return len(entries)

    async def _drain(self) -> None:
        """Process every change-log entry visible now, on every old shard."""
        for source in self.old_urls:
            for table, column in self.tables.items():
                while await self._catchup_once(source, table, column) >= self.batch:
                    pass

    async def _lag(self) -> int:
        total = 0
        for source in self.old_urls:
            src = await self._admin(source)
            for table in self.tables:
                total += await src.count_changes(table)
        self.state["counters"]["lag"] = total
        return total

    async def _catchup(self, rounds: int) -> None:
        for _ in range(rounds):
            await self._drain()
            lag = await self._lag()
            await self._save()
            if lag <= self.batch:
                break

    async def _pause_and_cutover(self) -> None:
        version = self.map.version
        fenced = [*self.tables, *self.refs]
        for source in self.old_urls:
            await (await self._admin(source)).set_fence(version, fenced)
        await self._drain()
        await self._copy_reference([n for n in self.new_urls if n not in self.old_urls])
        await self._lag()
        st = self.map.state
        assert st.reshard is not None
        started = float(self.state.get("pause_started", time.time()))
        self._count("pause_seconds", time.time() - started)
        self.state["phase"] = "cleanup"
        self.state["cutover_at"] = time.time()
        await self._set_map(
            replace(
                st,
                version=st.version + 1,
                strategy=self.new,
                urls=self.new_urls,
                reshard={**st.reshard, "phase": "cleanup"},
            ),
            self.state,
        )
        _log.info("reshard.cutover", version=self.map.version, paused=time.time() - started)

    async def _cleanup(self) -> ReshardProgress:
        wait = float(self.state.get("cutover_at", 0)) + self._grace - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        fenced = [*self.tables, *self.refs]
        for source in self.old_urls:
            shard = await self._admin(source)
            for table in self.tables:
                await shard.remove_capture(table)
            await shard.remove_fence(fenced)
        cursors = self.state["cursors"]
        for source in self.old_urls:
            shard = await self._admin(source)
            for table, column in self.tables.items():
                ck = f"clean:{table}@{source}"
                cur = cursors.get(ck) or {}
                if cur.get("done"):
                    continue
                after = decode_json_value(cur.get("after"))
                while True:
                    keys = await shard.scan_keys(table, column, after, self.batch)
                    if not keys:
                        break
                    stale = [k for k in keys if k is not None and self.new.shard_for(k) != source]
                    self._count("rows_deleted", await shard.delete_keys(table, column, stale))
                    after = keys[-1]
                    cursors[ck] = {"after": encode_json_value(after)}
                    await self._save(throttle=True)
                cursors[ck] = {"done": True}
                await self._save()
        self.state["phase"] = "done"
        final = progress_of(self.state)
        st = self.map.state
        await self._set_map(replace(st, version=st.version + 1, reshard=None), None)
        done = replace(final, version=self.map.version)
        if self._on_progress is not None:
            self._on_progress(done)
        _log.info("reshard.done", version=self.map.version, rows=done.rows_copied)
        return done

    async def _finish_abort(self) -> ReshardProgress:
        fenced = [*self.tables, *self.refs]
        for source in self.old_urls:
            shard = await self._admin(source)
            for table in self.tables:
                await shard.remove_capture(table)
            await shard.remove_fence(fenced)
        for target in self.new_urls:
            shard = await self._admin(target)
            known = target in self.old_urls
            for table, column in self.tables.items():
                if not known and not await shard.table_exists(table):
                    continue
                after = None
                while True:
                    keys = await shard.scan_keys(table, column, after, self.batch)
                    if not keys:
                        break
                    copies = [k for k in keys if not known or self.old.shard_for(k) != target]
                    self._count("rows_deleted", await shard.delete_keys(table, column, copies))
                    after = keys[-1]
        self.state["phase"] = "aborted"
        final = progress_of(self.state)
        await self.map._backend().write_reshard(self.map.version, None)
        if self._on_progress is not None:
            self._on_progress(final)
        _log.info("reshard.aborted", version=self.map.version)
        return final
