"""A deliberately flaky payment gateway: the demo's external API.

It charges orders at ``POST /charge`` (JSON ``{"order_id", "amount"}``, an
``Idempotency-Key`` header makes a retried charge return the first result),
fails a configurable fraction of calls with 503 and adds a configurable
latency. ``/admin/config`` reads and changes the error rate, the latency and
a hard ``down`` switch; ``/admin/charges`` reports what was charged, so a
scenario can prove that no order was charged twice.

Charges are kept in SQLite so the record survives a restart of the gateway.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

__all__ = ["main", "make_app"]


class Gateway:
    """State of the flaky gateway: its knobs and the charges it made."""

    def __init__(self, db_path: Path, *, seed: int | None = None) -> None:
        self.error_rate = 0.0
        self.latency = 0.02
        self.down = False
        self.calls = 0
        self.failures = 0
        self._rng = random.Random(seed)
        self._db = sqlite3.connect(db_path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS charges (idempotency_key TEXT PRIMARY KEY,"
            " charge_id TEXT NOT NULL, order_id TEXT NOT NULL, amount INTEGER NOT NULL,"
            " at REAL NOT NULL)"
        )

    def charge(self, key: str, order_id: str, amount: int) -> tuple[str, bool]:
        """Record a charge once per idempotency key; return (charge id, replayed)."""
        row = self._db.execute(
            "SELECT charge_id FROM charges WHERE idempotency_key = ?", (key,)
        ).fetchone()
        if row is not None:
            return str(row[0]), True
        charge_id = "ch_" + uuid.uuid4().hex[:16]
        self._db.execute(
            "INSERT INTO charges VALUES (?, ?, ?, ?, ?)",
            (key, charge_id, order_id, amount, time.time()),
        )
        return charge_id, False

    def summary(self) -> dict[str, object]:
        """Totals and the orders charged more than once (must stay empty)."""
        total, orders = self._db.execute(
            "SELECT count(*), count(DISTINCT order_id) FROM charges"
        ).fetchone()
        doubles = [
            r[0]
            for r in self._db.execute(
                "SELECT order_id FROM charges GROUP BY order_id HAVING count(*) > 1"
            )
        ]
        return {
            "charges": total,
            "orders_charged": orders,
            "double_charged": doubles,
            "calls": self.calls,
            "failures": self.failures,
        }

    def config(self) -> dict[str, object]:
        """The current knobs."""
        return {"error_rate": self.error_rate, "latency": self.latency, "down": self.down}


def make_app(gateway: Gateway) -> web.Application:
    """The aiohttp application serving ``gateway``."""

    async def charge(request: web.Request) -> web.Response:
        gateway.calls += 1
        if gateway.down:
            gateway.failures += 1
            return web.json_response({"error": "gateway down"}, status=503)
        if gateway.latency > 0:
            await asyncio.sleep(gateway.latency * (0.5 + gateway._rng.random()))
        if gateway._rng.random() < gateway.error_rate:
            gateway.failures += 1
            return web.json_response({"error": "upstream processor error"}, status=503)
        try:
            body = await request.json()
            order_id = str(body["order_id"])
            amount = int(body["amount"])
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "need JSON {order_id, amount}"}, status=400)
        key = request.headers.get("Idempotency-Key") or f"order:{order_id}"
        charge_id, replayed = gateway.charge(key, order_id, amount)
        return web.json_response(
            {"charge_id": charge_id, "order_id": order_id, "replayed": replayed}
        )

    async def get_config(request: web.Request) -> web.Response:
        return web.json_response(gateway.config())

    async def set_config(request: web.Request) -> web.Response:
        body = await request.json()
        if "error_rate" in body:
            gateway.error_rate = min(1.0, max(0.0, float(body["error_rate"])))
        if "latency" in body:
            gateway.latency = min(10.0, max(0.0, float(body["latency"])))
        if "down" in body:
            gateway.down = bool(body["down"])
        return web.json_response(gateway.config())

    async def charges(request: web.Request) -> web.Response:
        return web.json_response(gateway.summary())

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/charge", charge)
    app.router.add_get("/admin/config", get_config)
    app.router.add_post("/admin/config", set_config)
    app.router.add_get("/admin/charges", charges)
    app.router.add_get("/health", health)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m stanchion.demo._gateway PORT DATA_DIR``."""
    args = sys.argv[1:] if argv is None else argv
    port, data_dir = int(args[0]), Path(args[1])
    gateway = Gateway(data_dir / "gateway.db")
    print(f'{{"event": "gateway.listening", "port": {port}}}', flush=True)
    web.run_app(make_app(gateway), host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
