"""The demo's service bodies (see :mod:`stanchion.demo._services`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry

from stanchion.cqrs import (
    App,
    CommandBus,
    Outbox,
    Projection,
    QueryBus,
    ReadModel,
    handles,
    retry_on_conflict,
)
from stanchion.demo._config import DemoConfig
from stanchion.demo._services import _until_stopped, log, new_order_id, service
from stanchion.demo._shop import (
    PRODUCTS,
    Item,
    Order,
    OrderPlaced,
    PaymentFailed,
    PaymentSucceeded,
    ShopError,
)
from stanchion.election import LeaderElector
from stanchion.errors import BackendError, ShardUnavailable, StanchionError
from stanchion.eventsourcing import EventStore, Repository
from stanchion.pubsub import Broker, Message

TOPICS = {
    "OrderPlaced": "order.placed",
    "PaymentSucceeded": "payment.succeeded",
    "PaymentFailed": "payment.failed",
}


async def write_status(cfg: DemoConfig, identity: str, registry: Any, subs: list[Any]) -> None:
    """Write this service's subscription stats for the dashboard, once a second."""
    path = cfg.dir / "run" / f"{identity}.status.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    last: dict[tuple[str, str], tuple[float, float]] = {}
    while True:
        now = time.time()
        rows = []
        for sub in subs:
            topic, group = sub.spec.pattern.pattern, sub.spec.group
            delivered = (
                registry.get_sample_value(
                    "stanchion_pubsub_delivered_total", {"topic": topic, "group": group}
                )
                or 0.0
            )
            prev_t, prev_n = last.get((topic, group), (now, delivered))
            rate = (delivered - prev_n) / (now - prev_t) if now > prev_t else 0.0
            last[(topic, group)] = (now, delivered)
            lag = None
            with contextlib.suppress(Exception):
                lag = await asyncio.wait_for(sub.lag(), 1.0)
            rows.append(
                {
                    "topic": topic,
                    "group": group,
                    "delivered": int(delivered),
                    "lag": lag,
                    "rate": rate,
                }
            )
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"at": now, "identity": identity, "subscriptions": rows}))
        tmp.replace(path)
        await asyncio.sleep(1.0)


# -- commands, queries, projections ----------------------------------------------------


class PlaceOrder(msgspec.Struct):
    """Place an order for a customer of a region."""

    order_id: str
    customer: str
    region: str
    items: list[Item]


class SettlePayment(msgspec.Struct):
    """Record the outcome of charging an order."""

    order_id: str
    charge_id: str | None = None
    failure: str | None = None


class GetOrder(msgspec.Struct):
    """The order-history row of one order."""

    order_id: str


class OrderHistory(Projection):
    """Every order with its payment status (the order view)."""

    name = "order_history"

    async def setup(self, tx: Any) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, customer TEXT NOT NULL,"
            " region TEXT NOT NULL, total INTEGER NOT NULL, status TEXT NOT NULL,"
            " charge_id TEXT, placed_position BIGINT NOT NULL, updated_position BIGINT NOT NULL)"
        )
        await tx.execute("CREATE INDEX IF NOT EXISTS orders_status ON orders (status)")

    @handles(OrderPlaced)
    async def on_placed(self, e: OrderPlaced, tx: Any) -> None:
        await tx.execute(
            "INSERT INTO orders VALUES (?, ?, ?, ?, 'placed', NULL, ?, ?)",
            e.order_id,
            e.customer,
            e.region,
            e.total,
            tx.event.position,
            tx.event.position,
        )

    @handles(PaymentSucceeded)
    async def on_paid(self, e: PaymentSucceeded, tx: Any) -> None:
        await tx.execute(
            "UPDATE orders SET status = 'paid', charge_id = ?, updated_position = ?"
            " WHERE order_id = ?",
            e.charge_id,
            tx.event.position,
            e.order_id,
        )

    @handles(PaymentFailed)
    async def on_failed(self, e: PaymentFailed, tx: Any) -> None:
        await tx.execute(
            "UPDATE orders SET status = 'payment_failed', updated_position = ? WHERE order_id = ?",
            tx.event.position,
            e.order_id,
        )


class Catalog(Projection):
    """Products with units sold and revenue (the catalog view)."""

    name = "catalog"
    ignores = (PaymentSucceeded, PaymentFailed)

    async def setup(self, tx: Any) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS catalog (sku TEXT PRIMARY KEY, name TEXT NOT NULL,"
            " price INTEGER NOT NULL, sold INTEGER NOT NULL, revenue INTEGER NOT NULL)"
        )

    @handles(OrderPlaced)
    async def on_placed(self, e: OrderPlaced, tx: Any) -> None:
        for item in e.items:
            name, price = PRODUCTS[item.sku]
            await tx.execute(
                "INSERT INTO catalog VALUES (?, ?, ?, ?, ?) ON CONFLICT (sku) DO UPDATE SET"
                " sold = catalog.sold + excluded.sold,"
                " revenue = catalog.revenue + excluded.revenue",
                item.sku,
                name,
                price,
                item.qty,
                item.qty * price,
            )


def command_bus(store: EventStore) -> CommandBus:
    """The orders command side: PlaceOrder and SettlePayment on the Order aggregate."""
    orders = Repository(store, Order)
    bus = CommandBus([retry_on_conflict(attempts=8)])

    @bus.register(PlaceOrder)
    async def place(cmd: PlaceOrder) -> Any:
        order = Order(cmd.order_id)
        order.place(cmd.customer, cmd.region, cmd.items)
        return await orders.save(order)

    @bus.register(SettlePayment)
    async def settle(cmd: SettlePayment) -> Any:
        order = await orders.load(cmd.order_id)
        changed = (
            order.mark_paid(cmd.charge_id)
            if cmd.charge_id is not None
            else order.mark_failed(cmd.failure or "payment failed")
        )
        return await orders.save(order) if changed else None

    return bus


# -- orders (command side + customers on shards) -------------------------------------


class _Customers:
    """Customers sharded by region (``stanchion.sharding``)."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self.db: Any = None
        self.down: set[str] = set()

    async def open(self) -> None:
        from stanchion.demo._sharded import open_customers

        self.db = await open_customers(self.cfg)

    async def register(self, customer: str, region: str) -> str:
        from stanchion.demo._sharded import register_customer

        return await register_customer(self.db, customer, region)

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()


@service("orders")
async def orders_service(cfg: DemoConfig, identity: str) -> None:
    """``POST /orders``, ``GET /orders/{id}``: the command side of the shop."""
    store = await EventStore.connect(cfg.event_store_url)
    views = await ReadModel.connect(cfg.read_model_url)
    customers = _Customers(cfg)
    await customers.open()
    commands = command_bus(store)
    queries = QueryBus(timeout=5.0)

    @queries.register(GetOrder, view=views.view("order_history"))
    async def get_order(q: GetOrder) -> dict[str, Any] | None:
        row = await views.fetchone(
            "SELECT order_id, customer, region, total, status, charge_id FROM orders"
            " WHERE order_id = ?",
            q.order_id,
        )
        if row is None:
            return None
        keys = ("order_id", "customer", "region", "total", "status", "charge_id")
        return dict(zip(keys, row, strict=True))

    async def post_order(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            items = [Item(str(i["sku"]), int(i["qty"])) for i in body["items"]]
            customer, region = str(body["customer"]), str(body["region"])
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f"need JSON {{customer, region, items: [{{sku, qty}}]}}: {exc}")
        order_id = str(body.get("order_id") or new_order_id())
        try:
            Order(order_id).place(customer, region, items)  # validate before touching a shard
        except ShopError as exc:
            return _error(400, str(exc))
        try:
            shard = await customers.register(customer, region)
        except ShardUnavailable as exc:
            log.warning("orders.shard_unavailable", region=region, error=str(exc))
            return _error(503, str(exc), reason="shard-unavailable")
        except BackendError as exc:  # the shard failed mid-call (before its breaker opened)
            log.warning("orders.shard_error", region=region, error=str(exc))
            return _error(503, str(exc), reason="shard-error")
        except (ShopError, StanchionError) as exc:
            return _error(400, str(exc))
        except Exception as exc:  # a bug or an unmapped failure: answer JSON, log it
            log.exception("orders.register_failed", region=region)
            return _error(500, f"{type(exc).__name__}: {exc}")
        try:
            result = await commands.dispatch(PlaceOrder(order_id, customer, region, items))
        except ShopError as exc:
            return _error(400, str(exc))
        log.info("orders.placed", order_id=order_id, customer=customer, region=region, shard=shard)
        return web.json_response(
            {"order_id": order_id, "position": result.position, "shard": shard}, status=201
        )

    async def get_order_http(request: web.Request) -> web.Response:
        after = request.query.get("after")
        try:
            row = await queries.dispatch(
                GetOrder(request.match_info["order_id"]),
                wait_for=int(after) if after else None,
            )
        except TimeoutError:
            return _error(504, "the order view did not catch up in time")
        if row is None:
            return _error(404, "no such order")
        return web.json_response(row)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/orders", post_order)
    app.router.add_get("/orders/{order_id}", get_order_http)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", cfg.orders_port).start()
    log.info("orders.listening", port=cfg.orders_port)
    try:
        await _until_stopped()
    finally:
        await runner.cleanup()
        await customers.close()
        await views.close()
        await store.close()


def _error(status: int, message: str, *, reason: str | None = None) -> web.Response:
    headers = {"x-stanchion-reason": reason} if reason else None
    return web.json_response({"error": message}, status=status, headers=headers)


# -- payments: competing consumers charging through the ambassador --------------------


class PaymentDeclined(Exception):
    """The charge did not go through (the message will be redelivered)."""


@service("payments")
async def payments_service(cfg: DemoConfig, identity: str) -> None:
    """Consume ``order.placed`` in group ``payments``; charge through the ambassador."""
    store = await EventStore.connect(cfg.event_store_url)
    commands = command_bus(store)
    registry = CollectorRegistry()
    broker = await Broker.connect(cfg.broker_url, metrics=registry)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    charge_url = f"{cfg.ambassador_url}/payments/charge"

    async def charge(msg: Message) -> None:
        order = msg.json()
        headers = {"Idempotency-Key": f"order-{order['order_id']}"}
        try:
            async with session.post(
                charge_url,
                json={"order_id": order["order_id"], "amount": order["total"]},
                headers=headers,
            ) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    reason = resp.headers.get("x-stanchion-reason", "")
                    log.warning(
                        "payments.charge_failed",
                        order_id=order["order_id"],
                        status=resp.status,
                        reason=reason,
                        delivery=msg.delivery,
                    )
                    raise PaymentDeclined(f"gateway answered {resp.status} {reason}".strip())
        except aiohttp.ClientError as exc:
            raise PaymentDeclined(f"ambassador unreachable: {exc}") from exc
        await commands.dispatch(SettlePayment(order["order_id"], charge_id=body["charge_id"]))
        log.info(
            "payments.charged",
            order_id=order["order_id"],
            charge_id=body["charge_id"],
            worker=identity,
            delivery=msg.delivery,
        )

    async def give_up(msg: Message) -> None:
        order = msg.json()
        reason = msg.headers.get("x-error", "payment failed")
        await commands.dispatch(SettlePayment(order["order_id"], failure=reason))
        log.error("payments.gave_up", order_id=order["order_id"], error=reason)

    subs = [
        await broker.subscribe(
            "order.placed",
            charge,
            group="payments",
            concurrency=16,
            max_deliveries=40,
            retry_backoff=(0.5, 4.0),
            dead_letter="order.placed.dead",
            ack_timeout=30.0,
        ),
        await broker.subscribe("order.placed.dead", give_up, group="payments-dlq"),
    ]
    status = asyncio.create_task(write_status(cfg, identity, registry, subs))
    try:
        await _until_stopped()
    finally:
        status.cancel()
        for sub in subs:
            await sub.stop()
        await session.close()
        await broker.close()
        await store.close()


# -- projector replicas: projections + outbox, only on the leader ---------------------


@service("projector")
async def projector_service(cfg: DemoConfig, identity: str) -> None:
    """Project the store into the views and relay events to pub/sub, when elected."""
    store = await EventStore.connect(cfg.event_store_url)
    broker = await Broker.connect(cfg.broker_url)
    pidfile = cfg.dir / "run" / f"{identity}.pid"
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(str(os.getpid()))

    def elector(name: str) -> LeaderElector:
        e = LeaderElector.from_url(cfg.election_url, name, identity, ttl=cfg.election_ttl)

        @e.on_elected
        async def elected(lease: Any) -> None:
            log.info("projector.elected", group=name, identity=identity, token=lease.token)

        @e.on_revoked
        async def revoked(lease: Any) -> None:
            log.warning("projector.revoked", group=name, identity=identity, token=lease.token)

        return e

    outbox = Outbox(
        store,
        broker,
        topic=lambda event: TOPICS.get(event.type, "shop.other"),
        checkpoint=cfg.read_model_url,
        name="shop_outbox",
        elector=elector("outbox"),
    )
    app = App(
        store,
        [OrderHistory, Catalog],
        cfg.read_model_url,
        elector=lambda name: elector(f"projections.{name}"),
        outboxes=[outbox],
        batch_size=500,
    )
    task = asyncio.create_task(app.run())
    stop = asyncio.create_task(_until_stopped())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("projector.failed", error=repr(task.exception()))
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        stop.cancel()
        await app.aclose()
        await broker.close()
        await store.close()
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()


# -- analytics and notifications: independent groups (fan-out) -----------------------


@service("analytics")
async def analytics_service(cfg: DemoConfig, identity: str) -> None:
    """Revenue per region from ``order.placed``, in its own group (every message)."""
    registry = CollectorRegistry()
    broker = await Broker.connect(cfg.broker_url, metrics=registry)
    db = sqlite3.connect(cfg.dir / "analytics.db", isolation_level=None)
    db.execute(
        "CREATE TABLE IF NOT EXISTS seen (message_id TEXT PRIMARY KEY, region TEXT NOT NULL,"
        " amount INTEGER NOT NULL, at REAL NOT NULL)"
    )

    async def on_order(msg: Message) -> None:
        order = msg.json()
        db.execute(
            "INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)",
            (msg.id, order["region"], order["total"], time.time()),
        )
        log.info("analytics.order", region=order["region"], total=order["total"])

    sub = await broker.subscribe("order.placed", on_order, group="analytics", concurrency=4)
    status = asyncio.create_task(write_status(cfg, identity, registry, [sub]))
    try:
        await _until_stopped()
    finally:
        status.cancel()
        await sub.stop()
        await broker.close()
        db.close()


@service("notifications")
async def notifications_service(cfg: DemoConfig, identity: str) -> None:
    """Tell customers about their orders and payments, in its own group."""
    registry = CollectorRegistry()
    broker = await Broker.connect(cfg.broker_url, metrics=registry)

    async def on_placed(msg: Message) -> None:
        order = msg.json()
        log.info(
            "notifications.order_confirmation", order_id=order["order_id"], to=order["customer"]
        )

    async def on_paid(msg: Message) -> None:
        log.info("notifications.payment_receipt", order_id=msg.json()["order_id"])

    async def on_failed(msg: Message) -> None:
        log.warning("notifications.payment_problem", order_id=msg.json()["order_id"])

    subs = [
        await broker.subscribe("order.placed", on_placed, group="notifications"),
        await broker.subscribe("payment.succeeded", on_paid, group="notifications"),
        await broker.subscribe("payment.failed", on_failed, group="notifications"),
    ]
    status = asyncio.create_task(write_status(cfg, identity, registry, subs))
    try:
        await _until_stopped()
    finally:
        status.cancel()
        for sub in subs:
            await sub.stop()
        await broker.close()


__all__ = ["Catalog", "OrderHistory", "PlaceOrder", "SettlePayment", "command_bus"]
