"""Customers sharded by region: the demo's use of ``stanchion.sharding``."""

from __future__ import annotations

from typing import Any

from stanchion.demo._config import DemoConfig
from stanchion.sharding import Directory, RouterOptions, ShardedDatabase, ShardMap

__all__ = ["CUSTOMERS_DDL", "open_customers", "register_customer", "shard_map"]

CUSTOMERS_DDL = (
    "CREATE TABLE IF NOT EXISTS customers (region TEXT NOT NULL, customer TEXT NOT NULL,"
    " orders INTEGER NOT NULL, PRIMARY KEY (region, customer))"
)


def shard_map(cfg: DemoConfig) -> ShardMap:
    """Regions placed explicitly on shards (a directory, as Vitess would with a lookup)."""
    placement: dict[str | bytes | int, str] = dict(cfg.regions.items())
    return ShardMap(Directory(placement), dict(cfg.shard_urls), store=cfg.shard_map_url)


async def open_customers(cfg: DemoConfig) -> ShardedDatabase:
    """A router over the customer shards, each with its own breaker."""
    return await ShardedDatabase.connect(
        shard_map(cfg),
        tables={"customers": "region"},
        schema=[CUSTOMERS_DDL],
        options=RouterOptions(timeout=1.0, breaker_minimum_calls=2, breaker_wait=3.0),
    )


async def register_customer(db: Any, customer: str, region: str) -> str:
    """Count one more order for ``customer`` on the shard of ``region``; return the shard."""
    await db.execute(
        region,
        "INSERT INTO customers (region, customer, orders) VALUES (:region, :customer, 1)"
        " ON CONFLICT (region, customer) DO UPDATE SET orders = customers.orders + 1",
        {"region": region, "customer": customer},
    )
    return str(db.shard_for(region))
