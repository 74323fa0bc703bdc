"""Sharding: strategies, a versioned shard map, a sharded SQL router, online resharding.

Data is partitioned by a key (a user id, a region); each shard is its own
database (a SQLite file or a PostgreSQL database, possibly on different
servers) and keeps serving when another is down.

* Strategies, pure and the same in every process: :class:`HashRing`,
  :class:`Rendezvous`, :class:`JumpHash`, :class:`RangeStrategy`,
  :class:`Directory`; ``shard_for(key)``, ``add(shard)``, ``remove(shard)``
  and :func:`plan_reshard`.
* :class:`ShardMap`: strategy + shard URLs + a version, stored in SQLite or
  PostgreSQL; routers reload it when the version changes.
* :class:`ShardedDatabase`: ``execute`` / ``fetch`` / ``transaction`` by key,
  ``fetch_all`` scatter-gather with an explicit list of failed shards, one
  pool and one circuit breaker per shard, and online ``reshard``.

Example::

    from stanchion.sharding import Directory, ShardMap, ShardedDatabase

    shard_map = ShardMap(
        Directory({"eu": "s1", "us": "s2", "asia": "s3"}),
        {"s1": "sqlite:///s1.db", "s2": "sqlite:///s2.db", "s3": "sqlite:///s3.db"},
        store="sqlite:///shardmap.db",
    )
    db = await ShardedDatabase.connect(shard_map, tables={"users": "region"})
    await db.execute("eu", "INSERT INTO users (region, name) VALUES (:r, :n)",
                     {"r": "eu", "n": "Ada"})

.. versionadded:: 0.1
"""

from __future__ import annotations

from stanchion.errors import (
    ReshardError,
    ShardKeyRequired,
    ShardMapChanged,
    ShardUnavailable,
    UnknownShard,
)
from stanchion.sharding._api import RouterOptions, ScatterResult, ShardedDatabase, Transaction
from stanchion.sharding._core import (
    Directory,
    HashRing,
    JumpHash,
    Move,
    RangeStrategy,
    Rendezvous,
    Strategy,
    encode_key,
    plan_reshard,
    strategy_from_dict,
)
from stanchion.sharding._map import ShardMap
from stanchion.sharding._progress import ReshardProgress

__all__ = [
    "Directory",
    "HashRing",
    "JumpHash",
    "Move",
    "RangeStrategy",
    "Rendezvous",
    "ReshardError",
    "ReshardProgress",
    "RouterOptions",
    "ScatterResult",
    "ShardKeyRequired",
    "ShardMap",
    "ShardMapChanged",
    "ShardUnavailable",
    "ShardedDatabase",
    "Strategy",
    "Transaction",
    "UnknownShard",
    "encode_key",
    "plan_reshard",
    "strategy_from_dict",
]
