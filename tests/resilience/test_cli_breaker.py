"""``stanchion breaker``: status and manual transitions of a shared breaker."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from stanchion.cli.breaker import main
from stanchion.errors import CircuitOpenError
from stanchion.resilience import CircuitBreaker, State


def eventually(pred: object, timeout: float = 5.0) -> bool:
    ends = time.monotonic() + timeout
    while time.monotonic() < ends:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_cli_status_and_force_open(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    b = CircuitBreaker(
        "orders", store=redis_url, sync_interval=0.02, minimum_calls=2, window_size=2
    )
    try:
        assert b.wait_synced(5)
        assert main(["status", "orders", "--store", redis_url, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["state"] == "closed" and info["buffered_calls"] == 0
        assert main(["force-open", "orders", "--store", redis_url]) == 0
        assert "forced_open" in capsys.readouterr().out
        assert eventually(lambda: b.state is State.FORCED_OPEN)
        with pytest.raises(CircuitOpenError):
            b.call(lambda: None)
        assert main(["reset", "orders", "--store", redis_url, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "closed"
        assert eventually(lambda: b.state is State.CLOSED)
    finally:
        b.close()


def test_cli_unknown_breaker_and_usage(redis_url: str) -> None:
    assert main(["status", "nobody", "--store", redis_url]) == 1
    out = subprocess.run(
        [sys.executable, "-m", "stanchion", "breaker", "status", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and "--store is required" in out.stderr
