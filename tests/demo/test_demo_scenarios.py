"""Each chaos scenario, headless, on embedded defaults and on real services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from stanchion.testing.pytest_plugin import need_service

SCENARIOS = ["gateway-outage", "leader-crash", "shard-outage", "collector-outage"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["embedded", "services"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_passes(name: str, mode: str, tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "stanchion",
        "demo",
        "scenario",
        name,
        "--data-dir",
        str(tmp_path),
    ]
    if mode == "services":
        for scheme in ("postgresql", "redis", "etcd"):
            need_service(scheme)
        argv.append("--services")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(lines) >= 6 and all(line.startswith("PASS") for line in lines), out.stdout
    for check in (
        "orders accepted",
        "payments eventually settled",
        "no event lost",
        "no double charge",
    ):
        assert any(check in line for line in lines), check
