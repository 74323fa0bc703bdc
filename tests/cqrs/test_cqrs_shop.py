"""The catalog/orders example: commands through the bus, views through the query bus."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cqrs_shop import (
    AddProduct,
    BrowseCatalog,
    CancelOrder,
    CatalogView,
    ChangePrice,
    CustomerOrders,
    GetOrder,
    OrderHistory,
    PlaceOrder,
    command_bus,
    query_bus,
)

from stanchion.cqrs import App, HandlerNotFound, ProjectionRunner, ReadModel
from stanchion.eventsourcing import EventStore


@contextlib.asynccontextmanager
async def shop(store_url: str, views_url: str) -> AsyncIterator[tuple[Any, ...]]:
    store = await EventStore.connect(store_url)
    rm = await ReadModel.connect(views_url)
    catalog = ProjectionRunner(store, CatalogView(), rm, batch_size=100)
    orders = ProjectionRunner(store, OrderHistory(), rm, batch_size=100)
    tasks = [asyncio.ensure_future(catalog.run()), asyncio.ensure_future(orders.run())]
    try:
        yield store, rm, command_bus(store), query_bus(rm, rm, catalog, orders), catalog, orders
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await rm.close()
        await store.close()


@pytest.mark.parametrize("views", ["sqlite", "postgresql"])
async def test_online_store(views: str, sqlite_url: str, request: pytest.FixtureRequest) -> None:
    views_url = (
        request.getfixturevalue("postgres_url")
        if views == "postgresql"
        else sqlite_url.replace(".db", "-views.db")
    )
    async with shop(sqlite_url, views_url) as (store, _rm, commands, queries, catalog, orders):
        for sku, name, price in [("tea", "Green tea", 400), ("mug", "Mug", 900)]:
            await commands.dispatch(AddProduct(sku, name, price))
        r = await commands.dispatch(ChangePrice("tea", 450))
        assert r.position == await store.head_position()
        # Read-your-writes through the query bus option.
        assert await queries.dispatch(BrowseCatalog(), wait_for=r.position) == [
            ("mug", "Mug", 900, 0),
            ("tea", "Green tea", 450, 0),
        ]
        placed = await commands.dispatch(PlaceOrder("o1", "ann", {"tea": 2, "mug": 1}))
        assert placed.position is not None
        order = await queries.dispatch(GetOrder("o1"), wait_for=placed.position)
        assert order == {"order_id": "o1", "customer": "ann", "total": 1800, "status": "placed"}
        await commands.dispatch(PlaceOrder("o2", "ann", {"tea": 1}))
        cancelled = await commands.dispatch(CancelOrder("o1"))
        await orders.wait_for(cancelled.position, timeout=5)
        mine = await queries.dispatch(CustomerOrders("ann"))
        assert mine == {"orders": ["o1", "o2"], "count": 2, "spent": 450}
        assert (await queries.dispatch(GetOrder("o1")))["status"] == "cancelled"
        await catalog.wait_for(cancelled.position, timeout=5)
        assert [(s, sold) for s, _, _, sold in await queries.dispatch(BrowseCatalog())] == [
            ("mug", 1),
            ("tea", 3),
        ]
        # Invariants stay on the command side.
        with pytest.raises(ValueError, match="already placed"):
            await commands.dispatch(PlaceOrder("o2", "bob", {"tea": 1}))
        with pytest.raises(HandlerNotFound):
            await queries.dispatch(AddProduct("x", "y", 1))
        # Lag is zero once caught up; the checkpoint is the head.
        status = await orders.status()
        assert status.checkpoint == await store.head_position()
        assert status.lag.events == 0
        # Rebuild the order view (tables and index) into a shadow and swap it in
        # while the live runner keeps running.
        before = await queries.dispatch(CustomerOrders("ann"))
        rebuilder = ProjectionRunner(store, OrderHistory(), await ReadModel.connect(views_url))
        try:
            cp = await rebuilder.rebuild()
        finally:
            await rebuilder.aclose()
        assert cp.position == status.checkpoint
        assert await queries.dispatch(CustomerOrders("ann")) == before
        again = await commands.dispatch(PlaceOrder("o3", "ann", {"mug": 2}))
        mine = await queries.dispatch(CustomerOrders("ann"), wait_for=again.position)
        assert mine == {"orders": ["o1", "o2", "o3"], "count": 3, "spent": 2250}


async def test_concurrent_orders_retry_on_conflict(sqlite_url: str, tmp_path: Any) -> None:
    views = f"sqlite:///{tmp_path / 'views.db'}"
    async with shop(sqlite_url, views) as (store, _rm, commands, queries, catalog, _orders):
        await commands.dispatch(AddProduct("tea", "Tea", 100))
        # 20 concurrent price changes on one product stream race on its version;
        # retry_on_conflict re-runs the losers, so all 20 land.
        results = await asyncio.gather(
            *(commands.dispatch(ChangePrice("tea", 100 + i)) for i in range(1, 21))
        )
        assert len({r.position for r in results}) == 20
        versions = [e.version async for e in store.read_stream("Product-tea")]
        assert versions == list(range(21))
        await catalog.wait_for(max(r.position for r in results), timeout=5)
        rows = await queries.dispatch(BrowseCatalog())
        last = [e async for e in store.read_stream("Product-tea")][-1]
        assert rows[0][2] == last.data["price"]


async def test_app_status_and_rebuild(sqlite_url: str, tmp_path: Any) -> None:
    views = f"sqlite:///{tmp_path / 'views.db'}"
    async with shop(sqlite_url, views) as (_store, _rm, commands, queries, catalog, orders):
        await commands.dispatch(AddProduct("tea", "Tea", 100))
        last = await commands.dispatch(PlaceOrder("o1", "ann", {"tea": 3}))
        await orders.wait_for(last.position, timeout=5)
        await catalog.wait_for(last.position, timeout=5)
        before = await queries.dispatch(BrowseCatalog())
        async with App(sqlite_url, [CatalogView, OrderHistory], views) as app:
            statuses = {s.name: s for s in await app.status()}
            assert statuses["catalog"].checkpoint == last.position
            assert statuses["order_history"].lag.events == 0
            cp = await app.rebuild("catalog")
            assert cp.position == last.position
        assert await queries.dispatch(BrowseCatalog()) == before
        # The live runner keeps going after the swap.
        again = await commands.dispatch(PlaceOrder("o2", "bob", {"tea": 1}))
        await catalog.wait_for(again.position, timeout=5)
        assert (await queries.dispatch(BrowseCatalog()))[0][3] == 4
