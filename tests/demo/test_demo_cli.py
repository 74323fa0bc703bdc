"""``stanchion demo`` as a user runs it: up, live, one at a time, Ctrl-C stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from demo_helpers import alive, demo_argv, descendants, get_json, post_json, running_demo

pytestmark = pytest.mark.timeout(240)


def test_demo_runs_serves_api_and_stops_cleanly(tmp_path: Path) -> None:
    with running_demo(tmp_path, "--rate", "4") as demo:
        status = demo.wait(lambda s: (s["orders"] or {}).get("paid", 0) >= 3)
        names = {p["name"] for p in status["services"]}
        assert {
            "collector",
            "gateway",
            "ambassador",
            "orders",
            "analytics",
            "notifications",
        } <= names
        assert {"payments-1", "payments-2", "projector-1", "projector-2"} <= names
        assert all(p["running"] for p in status["services"])
        assert status["leader"]["token"] >= 1
        assert [c["state"] for c in status["circuits"]] == ["closed"]
        assert len(status["shards"]) == 3
        # the public API: place an order, read it back with its payment status
        code, answer = post_json(
            f"{demo.url}/api/orders",
            {"customer": "test-ada", "region": "apac", "items": [{"sku": "kettle", "qty": 1}]},
        )
        assert code == 201, answer
        order = get_json(f"{demo.url}/api/orders/{answer['order_id']}?after={answer['position']}")
        assert order["customer"] == "test-ada" and order["status"] in ("placed", "paid")
        code, bad = post_json(
            f"{demo.url}/api/orders",
            {"customer": "x", "region": "mars", "items": [{"sku": "tea", "qty": 1}]},
        )
        assert code == 400 and "region" in bad["error"]
        code, bad = post_json(f"{demo.url}/api/chaos/frobnicate", {})
        assert code == 400 and "unknown chaos action" in bad["error"]
        demo.wait(
            lambda s: any(
                p["name"] == "order_history" and p["lag"] == 0 for p in s["projections"] or []
            )
        )
        # a second demo on the same data says so and exits
        second = subprocess.run(
            demo_argv(demo.port + 1, demo.data_dir), capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1
        assert "already running" in second.stderr and "Traceback" not in second.stderr
        # Ctrl-C stops every process: no orphan left behind
        tree = descendants(demo.proc.pid)
        assert len(tree) >= 19  # the collector, 9 sidecars and the 9 services under them
        os.killpg(demo.proc.pid, signal.SIGINT)
        assert demo.proc.wait(40) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if alive(p)]


def test_scenario_list_and_unknown(tmp_path: Path) -> None:
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "stanchion", "demo", "scenario", "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0
    for name in ("gateway-outage", "leader-crash", "shard-outage", "collector-outage"):
        assert name in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "stanchion", "demo", "scenario", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown scenario" in bad.stderr


def test_services_mode_names_the_unreachable_service(tmp_path: Path) -> None:
    import sys

    from stanchion.testing.servers import free_port

    dead = free_port()  # nothing listens there
    env = {**os.environ, "STANCHION_DEMO_ETCD_URL": f"etcd://127.0.0.1:{dead}"}
    out = subprocess.run(
        [sys.executable, "-m", "stanchion", "demo", "--services", "--port", str(free_port()),
         "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert out.returncode == 1
    assert f"etcd at 127.0.0.1:{dead}" in out.stderr and "Traceback" not in out.stderr
