"""Pure cores stay pure; importing stanchion loads no pattern or driver."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "stanchion"
FORBIDDEN = {
    "asyncio", "socket", "time", "threading", "sqlite3", "asyncpg", "redis", "nats",
    "aio_pika", "aiomqtt", "aiokafka", "aiohttp", "httptools", "uvloop", "subprocess",
}  # fmt: skip


def test_cores_import_no_io() -> None:
    offenders = []
    for core in SRC.rglob("_core.py"):
        tree = ast.parse(core.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FORBIDDEN:
                    offenders.append(f"{core.relative_to(SRC)} imports {name}")
    assert not offenders, offenders


def test_import_stanchion_is_light() -> None:
    code = (
        "import sys, stanchion, stanchion.urls, stanchion.errors;"
        "heavy = [m for m in ('asyncpg','redis','nats','aio_pika','aiomqtt','aiohttp')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
