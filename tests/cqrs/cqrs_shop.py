"""The online-store example: catalog and orders, commands and views.

Used by the tests in-process and, through ``--app cqrs_shop:app`` and
``SHOP_*`` environment variables, by the CLI and the multi-process tests.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec

from stanchion.cqrs import App, CommandBus, Projection, QueryBus, handles, retry_on_conflict
from stanchion.eventsourcing import Aggregate, AggregateNotFound, Repository, applies

# -- events -------------------------------------------------------------------


class ProductAdded(msgspec.Struct, frozen=True):
    sku: str
    name: str
    price: int


class PriceChanged(msgspec.Struct, frozen=True):
    sku: str
    price: int


class Line(msgspec.Struct, frozen=True):
    sku: str
    qty: int
    price: int


class OrderPlaced(msgspec.Struct, frozen=True):
    order_id: str
    customer: str
    lines: list[Line]
    total: int


class OrderCancelled(msgspec.Struct, frozen=True):
    order_id: str


# -- aggregates ------------------------------------------------------------------


class Product(Aggregate):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.name = ""
        self.price = 0

    def add(self, name: str, price: int) -> None:
        if self.version >= 0:
            raise ValueError(f"product {self.id} exists")
        if price <= 0:
            raise ValueError("price must be positive")
        self.record(ProductAdded(self.id, name, price))

    def change_price(self, price: int) -> None:
        if price <= 0:
            raise ValueError("price must be positive")
        self.record(PriceChanged(self.id, price))

    @applies(ProductAdded)
    def _added(self, e: ProductAdded) -> None:
        self.name, self.price = e.name, e.price

    @applies(PriceChanged)
    def _price(self, e: PriceChanged) -> None:
        self.price = e.price


class Order(Aggregate):
    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.status = "new"

    def place(self, customer: str, lines: list[Line]) -> None:
        if self.status != "new":
            raise ValueError(f"order {self.id} already placed")
        if not lines:
            raise ValueError("an order needs at least one line")
        total = sum(line.qty * line.price for line in lines)
        self.record(OrderPlaced(self.id, customer, lines, total))

    def cancel(self) -> None:
        if self.status != "placed":
            raise ValueError(f"order {self.id} is {self.status}")
        self.record(OrderCancelled(self.id))

    @applies(OrderPlaced)
    def _placed(self, e: OrderPlaced) -> None:
        self.status = "placed"

    @applies(OrderCancelled)
    def _cancelled(self, e: OrderCancelled) -> None:
        self.status = "cancelled"


# -- commands and queries -------------------------------------------------------------


class AddProduct(msgspec.Struct):
    sku: str
    name: str
    price: int


class ChangePrice(msgspec.Struct):
    sku: str
    price: int


class PlaceOrder(msgspec.Struct):
    order_id: str
    customer: str
    items: dict[str, int]  # sku -> quantity


class CancelOrder(msgspec.Struct):
    order_id: str


class BrowseCatalog(msgspec.Struct):
    pass


class GetOrder(msgspec.Struct):
    order_id: str


class CustomerOrders(msgspec.Struct):
    customer: str


# -- projections (plain SQL: the same code on SQLite and PostgreSQL) -----------


class CatalogView(Projection):
    name = "catalog"

    async def setup(self, tx: Any) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS catalog (sku TEXT PRIMARY KEY, name TEXT NOT NULL, "
            "price INTEGER NOT NULL, sold INTEGER NOT NULL DEFAULT 0)"
        )

    @handles(ProductAdded)
    async def on_added(self, e: ProductAdded, tx: Any) -> None:
        await tx.execute(
            "INSERT INTO catalog (sku, name, price) VALUES (?, ?, ?)", e.sku, e.name, e.price
        )

    @handles(PriceChanged)
    async def on_price(self, e: PriceChanged, tx: Any) -> None:
        await tx.execute("UPDATE catalog SET price = ? WHERE sku = ?", e.price, e.sku)

    @handles(OrderPlaced)
    async def on_order(self, e: OrderPlaced, tx: Any) -> None:
        for line in e.lines:
            await tx.execute("UPDATE catalog SET sold = sold + ? WHERE sku = ?", line.qty, line.sku)


class OrderHistory(Projection):
    name = "order_history"
    ignores = (ProductAdded, PriceChanged)

    async def setup(self, tx: Any) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, customer TEXT NOT NULL,"
            " total INTEGER NOT NULL, status TEXT NOT NULL, position BIGINT NOT NULL)"
        )
        await tx.execute(
            "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer, order_id)"
        )
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS customer_spend (customer TEXT PRIMARY KEY, "
            "orders INTEGER NOT NULL, spent INTEGER NOT NULL)"
        )

    @handles(OrderPlaced)
    async def on_placed(self, e: OrderPlaced, tx: Any) -> None:
        await tx.execute(
            "INSERT INTO orders VALUES (?, ?, ?, 'placed', ?)",
            e.order_id,
            e.customer,
            e.total,
            tx.event.position,
        )
        await tx.execute(
            "INSERT INTO customer_spend VALUES (?, 1, ?) ON CONFLICT (customer) DO UPDATE "
            "SET orders = customer_spend.orders + 1, spent = customer_spend.spent + excluded.spent",
            e.customer,
            e.total,
        )

    @handles(OrderCancelled)
    async def on_cancelled(self, e: OrderCancelled, tx: Any) -> None:
        row = await tx.fetchone("SELECT customer, total FROM orders WHERE order_id = ?", e.order_id)
        await tx.execute("UPDATE orders SET status = 'cancelled' WHERE order_id = ?", e.order_id)
        await tx.execute(
            "UPDATE customer_spend SET spent = spent - ? WHERE customer = ?", row[1], row[0]
        )


# -- wiring ------------------------------------------------------------------------------


def command_bus(store: Any) -> CommandBus:
    products = Repository(store, Product)
    orders = Repository(store, Order)
    bus = CommandBus([retry_on_conflict(attempts=5)])

    @bus.register(AddProduct)
    async def add_product(cmd: AddProduct) -> Any:
        product = Product(cmd.sku)
        product.add(cmd.name, cmd.price)
        return await products.save(product)

    @bus.register(ChangePrice)
    async def change_price(cmd: ChangePrice) -> Any:
        product = await products.load(cmd.sku)
        product.change_price(cmd.price)
        return await products.save(product)

    @bus.register(PlaceOrder)
    async def place_order(cmd: PlaceOrder) -> Any:
        lines = []
        for sku, qty in sorted(cmd.items.items()):
            product = await products.load(sku)
            lines.append(Line(sku, qty, product.price))
        try:
            order = await orders.load(cmd.order_id)
        except AggregateNotFound:
            order = Order(cmd.order_id)
        order.place(cmd.customer, lines)
        return await orders.save(order)

    @bus.register(CancelOrder)
    async def cancel_order(cmd: CancelOrder) -> Any:
        order = await orders.load(cmd.order_id)
        order.cancel()
        return await orders.save(order)

    return bus


def query_bus(catalog_rm: Any, orders_rm: Any, catalog_view: Any, orders_view: Any) -> QueryBus:
    bus = QueryBus()

    @bus.register(BrowseCatalog, view=catalog_view)
    async def browse(q: BrowseCatalog) -> list[tuple[str, str, int, int]]:
        rows = await catalog_rm.fetchall("SELECT sku, name, price, sold FROM catalog ORDER BY sku")
        return [tuple(r) for r in rows]

    @bus.register(GetOrder, view=orders_view)
    async def get_order(q: GetOrder) -> dict[str, Any] | None:
        row = await orders_rm.fetchone(
            "SELECT order_id, customer, total, status FROM orders WHERE order_id = ?", q.order_id
        )
        return None if row is None else dict(zip(("order_id", "customer", "total", "status"), row))

    @bus.register(CustomerOrders, view=orders_view)
    async def customer_orders(q: CustomerOrders) -> dict[str, Any]:
        rows = await orders_rm.fetchall(
            "SELECT order_id FROM orders WHERE customer = ? ORDER BY order_id", q.customer
        )
        spend = await orders_rm.fetchone(
            "SELECT orders, spent FROM customer_spend WHERE customer = ?", q.customer
        )
        return {
            "orders": [r[0] for r in rows],
            "count": spend[0] if spend else 0,
            "spent": spend[1] if spend else 0,
        }

    return bus


def app() -> App:
    """The App for ``stanchion projections ... --app cqrs_shop:app``."""
    return App(
        store=os.environ["SHOP_STORE"],
        projections=[CatalogView, OrderHistory],
        read_model=os.environ["SHOP_VIEWS"],
        election=os.environ.get("SHOP_ELECTION") or None,
        identity=os.environ.get("SHOP_IDENTITY") or None,
        ttl=float(os.environ.get("SHOP_TTL", "2")),
        batch_size=int(os.environ.get("SHOP_BATCH", "500")),
    )
