"""The README's sidecar example works as written (ports and paths moved to the test's)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from stanchion.testing.servers import free_port, wait_for_port

README = Path(__file__).resolve().parents[2] / "README.md"
SERVICE = """
import json, sys
print(json.dumps({"level": "info", "msg": "started", "port": 8080}))
print(json.dumps({"level": "error", "msg": "payment timeout", "order": 17}))
print(json.dumps({"level": "error", "msg": "card declined", "order": 18}))
"""


def test_readme_sidecar_example(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("### Sidecar and collector") : text.index("### CQRS")]
    toml = re.search(r"cat > sidecar.toml <<'TOML'\n(.*?)\nTOML\n", section, re.S)
    query = re.search(r"curl -s '127.0.0.1:8600(/api/logs\?[^']*)'", section)
    assert toml and query
    cport, lport = free_port(), free_port()
    cfg = (
        toml.group(1)
        .replace("127.0.0.1:8600", f"127.0.0.1:{cport}")
        .replace("127.0.0.1:9400", f"127.0.0.1:{lport}")
        .replace(".stanchion/orders", str(tmp_path / "state"))
        .replace("/var/log/orders/", f"{tmp_path}/")
    )
    (tmp_path / "sidecar.toml").write_text(cfg)
    stanchion = [sys.executable, "-m", "stanchion"]
    collector = subprocess.Popen(
        [*stanchion, "collector", "--listen", f"127.0.0.1:{cport}", "--store",
         f"sqlite:///{tmp_path / 'logs.db'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(cport, 30)
        run = subprocess.run(
            [*stanchion, "sidecar", "--config", str(tmp_path / "sidecar.toml"), "--",
             sys.executable, "-c", SERVICE],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{cport}{query.group(1)}") as r:
            page = json.loads(r.read())
    finally:
        collector.terminate()
        collector.wait(30)
    assert [(x["level"], x["message"], x["fields"]) for x in page["records"]] == [
        ("error", "payment timeout", {"order": 17})
    ]
    assert page["records"][0]["labels"]["service"] == "orders"
    assert page["next_cursor"] is None
