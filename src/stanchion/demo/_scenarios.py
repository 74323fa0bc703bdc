"""Scripted chaos scenarios, run headless against a real demo.

Each scenario starts the whole shop (real processes, steady load), breaks one
thing, repairs it, and then checks what the system did: orders accepted,
payments eventually settled, no event lost, no double charge, plus the checks
specific to the fault. It prints one ``PASS``/``FAIL`` line per check.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stanchion.demo._app import Demo, DemoOptions
from stanchion.demo._app import _free_port as free_port

__all__ = ["SCENARIOS", "Report", "run_scenario"]


class Report:
    """PASS/FAIL lines, printed as they are decided."""

    def __init__(self) -> None:
        self.results: list[tuple[bool, str]] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        """Record and print one check."""
        self.results.append((ok, what))
        line = f"{'PASS' if ok else 'FAIL'} {what}" + (f" ({detail})" if detail else "")
        print(line, flush=True)
        return ok

    @property
    def passed(self) -> bool:
        """True when every check passed (and there was at least one)."""
        return bool(self.results) and all(ok for ok, _ in self.results)


async def _until(probe: Callable[[], Awaitable[Any]], limit: float, interval: float = 0.25) -> Any:
    """Poll ``probe`` until it returns something truthy; return it, or None after ``limit`` s."""
    deadline = time.monotonic() + limit
    while True:
        with_value = None
        try:
            with_value = await probe()
        except Exception:
            with_value = None
        if with_value:
            return with_value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(interval)


async def _final_checks(demo: Demo, report: Report, *, settle: float = 60.0) -> None:
    """The invariants every scenario ends with."""
    await demo.stop_load()
    stats = dict(demo.load_stats)
    accepted = [oid for oid, _ in demo.placed]
    report.check(
        len(accepted) > 0 and stats["errors"] == 0,
        "orders accepted",
        f"{len(accepted)} accepted, {stats['rejected']} refused, {stats['errors']} errors",
    )

    async def settled() -> dict[str, Any] | None:
        snap = await demo._collect()
        o = snap["orders"] or {}
        if o.get("placed") == len(accepted) and o.get("pending") == 0:
            return snap
        return None

    snap = await _until(settled, settle, 0.5)
    last = await demo._collect() if snap is None else snap
    o = last["orders"] or {}
    report.check(
        snap is not None and o.get("payment_failed") == 0,
        "payments eventually settled",
        f"{o.get('paid')} paid, {o.get('payment_failed')} failed, {o.get('pending')} pending"
        f" of {len(accepted)}",
    )
    placed_events: dict[str, int] = {}
    paid_events: dict[str, int] = {}
    async for e in demo._store.read_all(types=["OrderPlaced", "PaymentSucceeded"]):
        target = placed_events if e.type == "OrderPlaced" else paid_events
        target[e.data["order_id"]] = target.get(e.data["order_id"], 0) + 1
    missing = [oid for oid in accepted if placed_events.get(oid) != 1]
    in_view = await demo._views.fetchval("SELECT count(*) FROM orders")
    head = await demo._store.head_position()
    lagging = [p["name"] for p in last["projections"] or [] if p["checkpoint"] != head]
    report.check(
        not missing and in_view == len(placed_events) and not lagging,
        "no event lost",
        f"{len(placed_events)} OrderPlaced events, {in_view} orders in the view,"
        f" projections at head: {not lagging}" + (f", missing {missing[:3]}" if missing else ""),
    )
    gateway = last["gateway"] or {}
    doubles = [oid for oid, n in paid_events.items() if n > 1]
    report.check(
        not gateway.get("double_charged")
        and not doubles
        and gateway.get("orders_charged") == len(paid_events),
        "no double charge",
        f"{gateway.get('charges')} charges for {gateway.get('orders_charged')} orders,"
        f" {len(paid_events)} paid",
    )


async def gateway_outage(demo: Demo, report: Report) -> None:
    """The payment gateway goes down: the breaker opens, fails fast, then recovers."""
    await asyncio.sleep(3)
    await demo.chaos("gateway-down", {})
    opened = await _until(lambda: _circuit(demo, "open"), 20)
    report.check(opened is not None, "breaker opened during the gateway outage")
    before = (await demo._collect())["calls"]["rejected"]
    await asyncio.sleep(3)
    after = (await demo._collect())["calls"]["rejected"]
    report.check(after > before, "calls fail fast while open", f"{after - before} rejected in 3 s")
    await demo.chaos("gateway-up", {})
    closed = await _until(lambda: _circuit(demo, "closed"), 30)
    report.check(closed is not None, "breaker closed again through half-open after recovery")
    await asyncio.sleep(2)
    await _final_checks(demo, report)


async def _circuit(demo: Demo, state: str) -> bool:
    snap = await demo._collect()
    return any(c["state"] == state for c in snap["circuits"])


async def leader_crash(demo: Demo, report: Report) -> None:
    """The leading projector is SIGKILLed: a new leader with a higher token takes over."""
    first = await _until(demo._probe_leader, 20)
    report.check(first is not None, "a projector leads", str(first))
    if first is None:
        return
    await asyncio.sleep(2)
    killed = await demo.chaos("kill-leader", {})
    started = time.monotonic()
    assert demo.cfg is not None
    bound = demo.cfg.election_ttl * 4 / 3 + 3.0

    async def new_leader() -> dict[str, Any] | None:
        info = await demo._probe_leader()
        return info if info and info["token"] > first["token"] else None

    second = await _until(new_leader, bound + 10)
    took = time.monotonic() - started
    report.check(
        second is not None and took <= bound,
        "a new leader with a higher token after the crash",
        f"{killed['killed']} token {first['token']} -> "
        + (f"{second['identity']} token {second['token']} in {took:.1f}s" if second else "none")
        + f" (bound {bound:.1f}s)",
    )
    await asyncio.sleep(2)
    await _final_checks(demo, report)


async def shard_outage(demo: Demo, report: Report) -> None:
    """One shard goes down: its region's orders fail fast, the others keep working."""
    assert demo.cfg is not None
    down_region = "us"
    shard = demo.cfg.regions[down_region]
    await asyncio.sleep(2)
    await demo.chaos("shard-down", {"shard": shard})
    body = {"customer": "zed-us", "region": down_region, "items": [{"sku": "tea", "qty": 1}]}
    statuses = []
    for _ in range(4):  # let the shard's breaker see the failures
        statuses.append((await demo.place_order(body))[0])
    started = time.monotonic()
    fast = [(await demo.place_order(body))[0] for _ in range(5)]
    took = (time.monotonic() - started) / 5
    report.check(
        all(s == 503 for s in fast) and took < 0.5,
        f"orders for region {down_region} fail fast while {shard} is down",
        f"statuses {statuses + fast}, {took * 1000:.0f} ms per refused order",
    )
    ok = await demo.place_order(
        {"customer": "zed-eu", "region": "eu", "items": [{"sku": "mug", "qty": 1}]}
    )
    report.check(ok[0] == 201, "other regions keep working", f"eu order answered {ok[0]}")
    await demo.chaos("shard-up", {"shard": shard})

    async def back() -> bool:
        return (await demo.place_order(body))[0] == 201

    report.check(
        await _until(back, 20, 1.0) is not None, f"{shard} serves again after it comes back"
    )
    await _final_checks(demo, report)


async def collector_outage(demo: Demo, report: Report) -> None:
    """The log collector stops: sidecars buffer on disk and deliver when it returns."""
    assert demo.cfg is not None
    http = demo._http
    assert http is not None
    await asyncio.sleep(2)
    await demo.chaos("collector-stop", {})
    during_start = len(demo.placed)
    await asyncio.sleep(5)
    during = [oid for oid, _ in list(demo.placed)[during_start:]]
    report.check(
        len(during) > 0, "orders keep flowing while the collector is down", f"{len(during)}"
    )
    await demo.chaos("collector-start", {})
    url = demo.cfg.collector_url

    async def delivered() -> bool:
        params = {"service": "orders", "q": "orders.placed", "limit": "1000", "order": "desc"}
        async with http.get(f"{url}/api/logs", params=params) as r:
            records = (await r.json()).get("records", [])
        logged = {rec.get("fields", {}).get("order_id") for rec in records}
        return all(oid in logged for oid in during)

    report.check(
        bool(during) and await _until(delivered, 30, 1.0) is not None,
        "logs written during the outage reach the collector after it returns",
        f"all {len(during)} orders placed during the outage have their log line",
    )
    await _final_checks(demo, report)


SCENARIOS: dict[str, Callable[[Demo, Report], Awaitable[None]]] = {
    "gateway-outage": gateway_outage,
    "leader-crash": leader_crash,
    "shard-outage": shard_outage,
    "collector-outage": collector_outage,
}


async def run_scenario(
    name: str, data_dir: Path | None, *, port: int = 0, services: bool = False
) -> int:
    """Run scenario ``name`` on a fresh demo; 0 when every check passes."""
    scenario = SCENARIOS[name]
    own = data_dir is None or data_dir == Path(".stanchion-demo")
    root = Path(tempfile.mkdtemp(prefix=f"stanchion-{name}-")) if own else data_dir
    assert root is not None
    report = Report()
    print(
        f"scenario {name}: starting the demo ({'services' if services else 'embedded'}) in {root}",
        flush=True,
    )
    namespace = "s" + uuid.uuid4().hex[:8] if services else ""
    options = DemoOptions(
        port=port or free_port(), data_dir=root, rate=5.0, services=services, namespace=namespace
    )
    demo = Demo(options)
    try:
        async with demo:
            await scenario(demo, report)
    finally:
        if services:
            with contextlib.suppress(Exception):
                await demo.drop_databases()
        if own and report.passed:
            shutil.rmtree(root, ignore_errors=True)
    print(f"scenario {name}: {'PASS' if report.passed else 'FAIL'}", flush=True)
    return 0 if report.passed else 1
