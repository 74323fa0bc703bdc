"""The delivery scenario with real processes: 200,000 lines, rotation both ways, a stopped
collector and a SIGKILLed sidecar; afterwards every line is stored exactly once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stanchion.testing.servers import free_port, wait_for_port

HERE = Path(__file__).parent
WRITER = HERE / "writer_child.py"
TOTAL = 200_000
LINE_BYTES = (
    len(json.dumps({"seq": 199999, "level": "info", "msg": "line 199999", "pad": "p" * 60})) + 1
)
PIPE_CAPACITY = 65536


def stanchion(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "stanchion", *args], **kw)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class CollectorProc:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.db = tmp / "logs.db"
        self.log = open(tmp / "collector.log", "ab")  # noqa: SIM115
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = stanchion(
            "collector",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--store",
            f"sqlite:///{self.db}",
            stdout=self.log,
            stderr=self.log,
        )
        wait_for_port(self.port, 20)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)
        self.proc = None

    def count(self) -> int:
        return int(get_json(self.base + "/health")["records"])

    def all_records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            url = self.base + "/api/logs?limit=10000" + (f"&cursor={cursor}" if cursor else "")
            page = get_json(url)
            out += page["records"]
            cursor = page["next_cursor"]
            if cursor is None:
                return out


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[CollectorProc]:
    c = CollectorProc(tmp_path)
    c.start()
    yield c
    if c.proc is not None:
        c.proc.kill()
        c.proc.wait()


def write_config(tmp: Path, collector_port: int, listen_port: int) -> Path:
    logs = tmp / "logs"
    logs.mkdir(exist_ok=True)
    cfg = tmp / "sidecar.toml"
    cfg.write_text(f"""
[sidecar]
service = "writer"
state_dir = "{tmp / "state"}"
listen = "127.0.0.1:{listen_port}"
passthrough = false
grace = 5
drain_timeout = 120

[[files]]
name = "app"
paths = ["{logs}/app.log*"]
poll_interval = 0.05

[[sinks]]
name = "central"
type = "collector"
url = "http://127.0.0.1:{collector_port}"
batch_max_records = 5000
batch_max_bytes = 2097152
batch_timeout = 0.05
backoff_initial = 0.05
backoff_max = 0.3
""")
    return cfg


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_200k_lines_rotation_collector_down_sidecar_sigkilled(
    tmp_path: Path, collector: CollectorProc
) -> None:
    listen = free_port()
    cfg = write_config(tmp_path, collector.port, listen)
    state = tmp_path / "writer.state"
    argv = [
        "sidecar",
        "--config",
        str(cfg),
        "--",
        sys.executable,
        str(WRITER),
        str(state),
        str(tmp_path / "logs"),
        str(TOTAL),
        "20000",
        "60000",
    ]
    err = open(tmp_path / "sidecar1.log", "wb")  # noqa: SIM115
    side = stanchion(*argv, stdout=subprocess.DEVNULL, stderr=err)
    health = f"http://127.0.0.1:{listen}/health"
    try:
        wait_for_port(listen, 20)
        # phase 1: delivering
        wait_until(lambda: collector.count() >= 20_000, 60, "20k records delivered")
        # phase 2: the collector is down; the sidecar buffers on disk
        collector.stop()
        wait_until(
            lambda: get_json_lenient(health)["sinks"]["central"]["pending_records"] >= 40_000,
            60,
            "40k records buffered while the collector is down",
        )
        doc = get_json_lenient(health)
        assert doc["status"] == "degraded" and not doc["sinks"]["central"]["reachable"]
        # phase 3: SIGKILL the sidecar mid-stream (its child gets SIGTERM and saves progress)
        side.send_signal(signal.SIGKILL)
        side.wait(10)
        wait_until(lambda: state.exists(), 10, "the writer to save its progress")
        first_run = json.loads(state.read_text())
        assert 0 < first_run["out"] < TOTAL, first_run
    finally:
        if side.poll() is None:
            side.kill()
    # phase 4: collector back, sidecar restarted once; the child resumes and finishes
    collector.start()
    err2 = open(tmp_path / "sidecar2.log", "wb")  # noqa: SIM115
    side2 = stanchion(*argv, stdout=subprocess.DEVNULL, stderr=err2)
    try:
        assert side2.wait(150) == 0, (tmp_path / "sidecar2.log").read_text()[-3000:]
    finally:
        if side2.poll() is None:
            side2.kill()
    assert json.loads(state.read_text()) == {"out": TOTAL, "file": TOTAL}

    records = collector.all_records()
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    by_source: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r)
    # the file: every line exactly once, in order, across both rotation styles
    seqs = [r["fields"]["seq"] for r in by_source["app"]]
    assert len(seqs) == TOTAL, (len(seqs), len(set(seqs)))
    assert seqs == list(range(TOTAL))
    # stdout: in order, nothing lost but the lines still in the pipe at the SIGKILL
    out = [r["fields"]["seq"] for r in by_source["stdout"]]
    assert out == sorted(out) and len(out) == len(set(out))
    missing = sorted(set(range(TOTAL)) - set(out))
    if missing:  # one contiguous run just before the resume point
        assert missing == list(range(missing[0], first_run["out"])), missing[:5]
        # what was in the pipe, and at most the one 64 KiB read in flight into the buffer
        assert len(missing) * LINE_BYTES <= 2 * PIPE_CAPACITY + LINE_BYTES
    assert set(range(first_run["out"], TOTAL)) <= set(out)
    # every record has the documented shape and labels
    sample = records[len(records) // 2]
    assert set(sample) == {"id", "source", "ts", "level", "message", "fields", "labels"}
    assert sample["labels"]["service"] == "writer"
    assert {"instance", "host", "stream"} <= set(sample["labels"])


def get_json_lenient(url: str) -> Any:
    try:
        return get_json(url)
    except urllib.error.HTTPError as exc:  # 503 while degraded still carries the document
        return json.loads(exc.read())


_ = os
