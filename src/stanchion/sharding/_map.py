"""The shard map: a strategy, shard URLs and a version, stored durably."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

from stanchion.errors import ConfigError, UnknownShard
from stanchion.sharding._backend import MapStore, StoredMap
from stanchion.sharding._core import Key, Strategy, strategy_from_dict
from stanchion.urls import BackendRegistry, default_registry

__all__ = ["MapState", "ShardMap", "open_store"]


def open_store(url: str, registry: BackendRegistry | None = None) -> MapStore:
    """The map store for ``url`` (``sqlite:///maps.db`` or ``postgresql://...``)."""
    cls, _ = (registry or default_registry).load("shardmap", url)
    return cast(MapStore, cls(url))  # type: ignore[operator]


def _check_urls(strategy: Strategy, urls: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"a shard map needs a Strategy, got {type(strategy).__name__}")
    if not isinstance(urls, Mapping):
        raise ConfigError("urls must be a mapping of shard name -> URL")
    out = {}
    for name, url in urls.items():
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"shard {name!r}: invalid URL {url!r}")
        out[str(name)] = url
    missing = [s for s in strategy.shards if s not in out]
    if missing:
        raise UnknownShard(
            missing[0],
            tuple(out),
            f"the strategy names shard(s) {missing} that have no URL; urls has {sorted(out)}",
        )
    extra = [s for s in out if s not in strategy.shards]
    if extra:
        raise UnknownShard(
            extra[0],
            strategy.shards,
            f"urls names shard(s) {extra} that the strategy does not know "
            f"(its shards: {list(strategy.shards)})",
        )
    return out


@dataclass(frozen=True, slots=True)
class MapState:
    """One version of a shard map, as every router sees it.

    Attributes:
        version: the routing version (0 = never stored).
        strategy: the strategy in force.
        urls: shard name -> URL.
        tables: sharded table -> key column.
        reference_tables: tables copied to every shard.
        schema: DDL statements that create the tables on a new shard.
        reshard: while a reshard runs, ``{"phase", "strategy", "urls"}`` (the
            target strategy and every shard URL, old and new); else ``None``.
    """

    version: int
    strategy: Strategy
    urls: dict[str, str]
    tables: dict[str, str] = field(default_factory=dict)
    reference_tables: tuple[str, ...] = ()
    schema: tuple[str, ...] = ()
    reshard: dict[str, Any] | None = None

    @property
    def target(self) -> Strategy | None:
        """The strategy being resharded to, or ``None``."""
        return cast("Strategy | None", self.reshard["strategy"]) if self.reshard else None

    @property
    def phase(self) -> str | None:
        """The reshard phase routers must know about (copy, pause, cleanup) or ``None``."""
        return cast("str | None", self.reshard["phase"]) if self.reshard else None

    @property
    def all_urls(self) -> dict[str, str]:
        """The URLs of every shard, including those a running reshard adds."""
        if self.reshard:
            return {**cast("dict[str, str]", self.reshard["urls"]), **self.urls}
        return self.urls

    def body(self) -> dict[str, Any]:
        """The stored JSON body."""
        rs = None
        if self.reshard:
            rs = {
                "phase": self.reshard["phase"],
                "strategy": self.reshard["strategy"].to_dict(),
                "urls": self.reshard["urls"],
            }
        return {
            "strategy": self.strategy.to_dict(),
            "urls": self.urls,
            "tables": self.tables,
            "reference_tables": list(self.reference_tables),
            "schema": list(self.schema),
            "reshard": rs,
        }

    @classmethod
    def from_stored(cls, stored: StoredMap) -> MapState:
        """Rebuild from the store."""
        b = stored.body
        rs = b.get("reshard")
        return cls(
            version=stored.version,
            strategy=strategy_from_dict(b["strategy"]),
            urls=dict(b["urls"]),
            tables=dict(b.get("tables") or {}),
            reference_tables=tuple(b.get("reference_tables") or ()),
            schema=tuple(b.get("schema") or ()),
            reshard=(
                {
                    "phase": rs["phase"],
                    "strategy": strategy_from_dict(rs["strategy"]),
                    "urls": dict(rs["urls"]),
                }
                if rs
                else None
            ),
        )


class ShardMap:
    """A strategy plus shard URLs and a version number, stored durably.

    Every process that loads the same store routes the same way; routers
    poll the stored version and reload the map when it changes (a reshard
    bumps it at each step that changes routing).

    Args:
        strategy: the sharding strategy.
        urls: shard name -> database URL (``sqlite:///s1.db``,
            ``postgresql://host/db``); exactly the strategy's shards.
        store: where the map is kept: ``sqlite:///maps.db`` or
            ``postgresql://host/db`` (``?name=`` selects one of several maps).

    Raises:
        UnknownShard: a strategy shard has no URL or a URL names no shard.

    Example::

        shard_map = ShardMap(HashRing(["s1", "s2", "s3"]), urls, store="sqlite:///maps.db")
        await shard_map.save()

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        strategy: Strategy,
        urls: Mapping[str, str],
        *,
        store: str,
        registry: BackendRegistry | None = None,
    ) -> None:
        if not isinstance(store, str) or "://" not in store:
            raise ConfigError(f"store must be a URL (sqlite:///maps.db), got {store!r}")
        self._state = MapState(0, strategy, _check_urls(strategy, urls))
        self.store = store
        self._registry = registry
        self._store: MapStore | None = None

    # -- reading --------------------------------------------------------------

    @property
    def state(self) -> MapState:
        """The current :class:`MapState` snapshot."""
        return self._state

    @property
    def strategy(self) -> Strategy:
        """The strategy in force."""
        return self._state.strategy

    @property
    def urls(self) -> dict[str, str]:
        """Shard name -> URL."""
        return dict(self._state.urls)

    @property
    def version(self) -> int:
        """The stored version this object reflects (0 before :meth:`save`)."""
        return self._state.version

    @property
    def shards(self) -> tuple[str, ...]:
        """The shard names."""
        return self._state.strategy.shards

    def shard_for(self, key: Key) -> str:
        """The shard that owns ``key`` under the strategy in force."""
        return self._state.strategy.shard_for(key)

    def url_for(self, key: Key) -> str:
        """The URL of the shard that owns ``key``."""
        return self._state.urls[self.shard_for(key)]

    def __repr__(self) -> str:
        return f"ShardMap({self.strategy!r}, version={self.version}, store={self.store!r})"

    # -- storage --------------------------------------------------------------

    def _backend(self) -> MapStore:
        if self._store is None:
            self._store = open_store(self.store, self._registry)
        return self._store

    @classmethod
    async def load(cls, store: str, *, registry: BackendRegistry | None = None) -> ShardMap:
        """Load the map kept in ``store``.

        Raises:
            ConfigError: the store holds no map.
        """
        backend = open_store(store, registry)
        stored = await backend.read()
        if stored is None:
            await backend.close()
            raise ConfigError(f"no shard map stored in {store}; create one with ShardMap(...)")
        state = MapState.from_stored(stored)
        obj = cls.__new__(cls)
        obj._state = state
        obj.store = store
        obj._registry = registry
        obj._store = backend
        return obj

    async def save(self) -> ShardMap:
        """Store this map if the store holds none; adopt the stored one if it does.

        The store is authoritative: a process started with an outdated
        strategy (before a reshard) routes by the stored map, so that every
        process agrees.

        Returns:
            ``self``, now at the stored version.
        """
        store = self._backend()
        if self._state.version == 0:
            first = replace(self._state, version=1)
            if await store.write(None, 1, first.body(), None):
                self._state = first
                return self
        await self.refresh()
        return self

    async def refresh(self) -> bool:
        """Reload the map if the stored version changed; True if it did."""
        store = self._backend()
        version = await store.version()
        if version is None:
            raise ConfigError(f"no shard map stored in {self.store}")
        if version == self._state.version:
            return False
        stored = await store.read()
        if stored is None:
            raise ConfigError(f"no shard map stored in {self.store}")
        self._state = MapState.from_stored(stored)
        return True

    async def reload(self) -> bool:
        """Same as :meth:`refresh`."""
        return await self.refresh()

    async def update(
        self, strategy: Strategy | None = None, urls: Mapping[str, str] | None = None
    ) -> int:
        """Store a new strategy and/or URLs under a new version, WITHOUT moving data.

        Routers reload it within their refresh interval. Use it to point a
        shard at a new URL (after a failover), or to change an empty
        deployment; to change where existing rows live, use
        ``ShardedDatabase.reshard``.

        Returns:
            The new version.

        Raises:
            ReshardError: a reshard is in progress.
            UnknownShard: strategy and URLs do not name the same shards.
        """
        from stanchion.errors import ReshardError

        for _ in range(5):
            await self.save()
            await self.refresh()
            s = self._state
            if s.reshard is not None or await self.reshard_state() is not None:
                raise ReshardError("a reshard is in progress; the map cannot be updated now")
            new_strategy = strategy or s.strategy
            new_urls = _check_urls(new_strategy, urls if urls is not None else s.urls)
            new = replace(s, version=s.version + 1, strategy=new_strategy, urls=new_urls)
            if await self._backend().write(s.version, new.version, new.body(), None):
                self._state = new
                return new.version
        raise ConfigError(f"shard map in {self.store} keeps changing; try again")

    async def stored_version(self) -> int | None:
        """The version in the store now (one cheap query)."""
        return await self._backend().version()

    async def _update(self, new: MapState, reshard: Mapping[str, Any] | None) -> None:
        """Compare-and-set a new state (version must be current + 1)."""
        ok = await self._backend().write(self._state.version, new.version, new.body(), reshard)
        if not ok:
            raise ConfigError(
                f"shard map in {self.store} changed concurrently (expected version "
                f"{self._state.version}); another reshard is running?"
            )
        self._state = new

    async def _declare(
        self, tables: Mapping[str, str], reference: Iterable[str], schema: Iterable[str]
    ) -> None:
        """Record the table declarations in the store (a routing-neutral change)."""
        t, r, sc = dict(tables), tuple(reference), tuple(schema)
        if not (t or r or sc):
            return
        for _ in range(10):  # several processes may declare at once: compare-and-set, retry
            s = self._state
            merged = replace(
                s,
                version=s.version + 1,
                tables={**s.tables, **t},
                reference_tables=tuple(dict.fromkeys((*s.reference_tables, *r))),
                schema=sc or s.schema,
            )
            if (merged.tables, merged.reference_tables, merged.schema) == (
                s.tables,
                s.reference_tables,
                s.schema,
            ):
                return
            stored = await self._backend().read()
            if await self._backend().write(
                s.version, merged.version, merged.body(), stored.reshard if stored else None
            ):
                self._state = merged
                return
            await self.refresh()
        raise ConfigError(f"shard map in {self.store} keeps changing; try again")

    async def reshard_state(self) -> dict[str, Any] | None:
        """The stored reshard progress, or ``None``."""
        stored = await self._backend().read()
        return stored.reshard if stored else None

    async def close(self) -> None:
        """Close the store connection."""
        if self._store is not None:
            store, self._store = self._store, None
            await store.close()
