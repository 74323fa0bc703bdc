"""``stanchion projections status|rebuild|run --app module:attr``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from cqrs_shop import (
    AddProduct,
    BrowseCatalog,
    CatalogView,
    OrderHistory,
    PlaceOrder,
    command_bus,
    query_bus,
)

from stanchion.cqrs import ProjectionRunner, ReadModel
from stanchion.eventsourcing import EventStore

HERE = Path(__file__).resolve().parent


def _env(store: str, views: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SHOP_STORE=store, SHOP_VIEWS=views)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stanchion",
        "projections",
        *args,
        env=env,
        cwd=str(HERE),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _populate(store_url: str, views_url: str, orders: int) -> int:
    async with await EventStore.connect(store_url) as store:
        bus = command_bus(store)
        for i in range(20):
            await bus.dispatch(AddProduct(f"p{i:02d}", f"Product {i}", 100 + i))
        last = None
        for i in range(orders):
            last = await bus.dispatch(
                PlaceOrder(f"o{i}", f"c{i % 9}", {f"p{i % 20:02d}": 1 + i % 3})
            )
        assert last is not None and last.position is not None
        return last.position


@pytest.mark.timeout(120)
async def test_status_and_rebuild_while_queries_are_answered(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'shop.db'}"
    views_url = f"sqlite:///{tmp_path / 'views.db'}"
    env = _env(store_url, views_url)
    head = await _populate(store_url, views_url, 600)

    # Nothing projected yet: status shows the lag.
    code, out, err = await _cli(env, "status", "--app", "cqrs_shop:app", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["catalog"]["checkpoint"] == 0 and rows["catalog"]["lag_events"] == head

    async with await EventStore.connect(store_url) as store:
        rm = await ReadModel.connect(views_url)
        catalog = ProjectionRunner(store, CatalogView(), rm)
        orders = ProjectionRunner(store, OrderHistory(), rm)
        tasks = [asyncio.ensure_future(catalog.run()), asyncio.ensure_future(orders.run())]
        try:
            queries = query_bus(rm, rm, catalog, orders)
            expected = await queries.dispatch(BrowseCatalog(), wait_for=head, timeout=30)
            assert sum(r[3] for r in expected) == sum(1 + i % 3 for i in range(600))
            await orders.wait_for(head, timeout=30)

            code, out, err = await _cli(env, "status", "--app", "cqrs_shop:app")
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0].split()[:4] == ["PROJECTION", "CHECKPOINT", "HEAD", "LAG"]
            assert lines[1].split()[:4] == ["catalog", str(head), str(head), "0"]
            assert lines[2].split()[:4] == ["order_history", str(head), str(head), "0"]

            # Rebuild in another process while this one keeps answering queries.
            answers: list[list[tuple[str, str, int, int]]] = []
            stop = asyncio.Event()

            async def keep_querying() -> None:
                while not stop.is_set():
                    answers.append(await queries.dispatch(BrowseCatalog()))
                    await asyncio.sleep(0.002)

            reader = asyncio.ensure_future(keep_querying())
            code, out, err = await _cli(env, "rebuild", "catalog", "--app", "cqrs_shop:app")
            stop.set()
            await reader
            assert code == 0, err
            assert f"rebuilt catalog: checkpoint {head}" in out
            assert len(answers) > 5
            assert all(a == expected for a in answers)
            assert await queries.dispatch(BrowseCatalog()) == expected
            assert not os.path.exists(f"{tmp_path / 'views.db'}.catalog.rebuild")  # noqa: ASYNC240
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await rm.close()


async def test_cli_errors(tmp_path: Path) -> None:
    env = _env(f"sqlite:///{tmp_path / 's.db'}", f"sqlite:///{tmp_path / 'v.db'}")
    env.pop("STANCHION_APP", None)
    code, _, err = await _cli(env, "status")
    assert code == 2 and "--app" in err
    code, _, err = await _cli(env, "rebuild", "nope", "--app", "cqrs_shop:app")
    assert code == 1 and "ConfigError: no projection named 'nope'" in err
    assert "catalog, order_history" in err
    code, _, err = await _cli(env, "status", "--app", "no_such_module:app")
    assert code == 1 and "cannot import" in err
    code, _, err = await _cli(env, "status", "--app", "cqrs_shop")
    assert code == 1 and "module:attr" in err


@pytest.mark.timeout(60)
async def test_cli_run_projects(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'shop.db'}"
    views_url = f"sqlite:///{tmp_path / 'views.db'}"
    env = _env(store_url, views_url)
    head = await _populate(store_url, views_url, 30)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "stanchion",
        "projections",
        "run",
        "--app",
        "cqrs_shop:app",
        env=env,
        cwd=str(HERE),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with await ReadModel.connect(views_url) as rm:
            await rm.wait_for("catalog", head, timeout=30)
            await rm.wait_for("order_history", head, timeout=30)
            assert await rm.fetchval("SELECT count(*) FROM orders") == 30
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
