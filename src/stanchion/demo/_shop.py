"""The demo shop's domain: products, the event-sourced Order and its events."""

from __future__ import annotations

import msgspec

from stanchion.eventsourcing import Aggregate, applies

__all__ = [
    "PRODUCTS",
    "REGIONS",
    "Item",
    "Order",
    "OrderPlaced",
    "PaymentFailed",
    "PaymentSucceeded",
    "ShopError",
]

PRODUCTS: dict[str, tuple[str, int]] = {
    "tea": ("Green tea, 100 g", 650),
    "mug": ("Stoneware mug", 1200),
    "kettle": ("Gooseneck kettle", 4900),
    "cups": ("Tasting cups, set of 4", 2200),
    "scale": ("Coffee scale", 3100),
}
"""sku -> (name, price in cents)."""

REGIONS = ("eu", "us", "apac")
"""The regions customers live in (each sharded onto one shard)."""


class ShopError(ValueError):
    """A command broke a business rule (unknown product, bad quantity, ...)."""


class Item(msgspec.Struct, frozen=True):
    """One order line."""

    sku: str
    qty: int


class OrderPlaced(msgspec.Struct, frozen=True):
    """An order was accepted."""

    order_id: str
    customer: str
    region: str
    items: list[Item]
    total: int


class PaymentSucceeded(msgspec.Struct, frozen=True):
    """The payment gateway charged the order."""

    order_id: str
    charge_id: str


class PaymentFailed(msgspec.Struct, frozen=True):
    """Charging gave up (the message went to the dead-letter topic)."""

    order_id: str
    reason: str


class Order(Aggregate):
    """An order: placed once, then paid (or failed) once."""

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.status = "new"
        self.total = 0
        self.charge_id: str | None = None

    def place(self, customer: str, region: str, items: list[Item]) -> None:
        """Check the order and record ``OrderPlaced``."""
        if self.status != "new":
            raise ShopError(f"order {self.id} was already placed")
        if region not in REGIONS:
            raise ShopError(f"unknown region {region!r}; choose one of {', '.join(REGIONS)}")
        if not customer:
            raise ShopError("an order needs a customer")
        if not items:
            raise ShopError("an order needs at least one item")
        total = 0
        for item in items:
            if item.sku not in PRODUCTS:
                raise ShopError(f"unknown product {item.sku!r}")
            if not 0 < item.qty <= 100:
                raise ShopError(f"quantity of {item.sku} must be 1..100")
            total += PRODUCTS[item.sku][1] * item.qty
        self.record(OrderPlaced(self.id, customer, region, list(items), total))

    def mark_paid(self, charge_id: str) -> bool:
        """Record the payment once; False when the order was already settled."""
        if self.status != "placed":
            return False
        self.record(PaymentSucceeded(self.id, charge_id))
        return True

    def mark_failed(self, reason: str) -> bool:
        """Record a failed payment once; False when the order was already settled."""
        if self.status != "placed":
            return False
        self.record(PaymentFailed(self.id, reason))
        return True

    @applies(OrderPlaced)
    def _placed(self, event: OrderPlaced) -> None:
        self.status = "placed"
        self.total = event.total

    @applies(PaymentSucceeded)
    def _paid(self, event: PaymentSucceeded) -> None:
        self.status = "paid"
        self.charge_id = event.charge_id

    @applies(PaymentFailed)
    def _failed(self, event: PaymentFailed) -> None:
        self.status = "payment_failed"
