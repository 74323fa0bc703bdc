"""Start ``stanchion demo`` as a user would, and look at its processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stanchion.testing.servers import free_port


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, body: dict[str, Any], timeout: float = 10.0) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class RunningDemo:
    def __init__(self, proc: subprocess.Popen[str], port: int, data_dir: Path) -> None:
        self.proc = proc
        self.port = port
        self.data_dir = data_dir
        self.url = f"http://127.0.0.1:{port}"

    def status(self) -> dict[str, Any]:
        return get_json(f"{self.url}/api/status")  # type: ignore[no-any-return]

    def wait(self, predicate: Any, limit: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(
            f"demo never reached the state; last status: {json.dumps(last)[:2000]}"
        )


def demo_argv(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "stanchion", "demo", "--port", str(port),
        "--data-dir", str(data_dir), *extra,
    ]  # fmt: skip


@contextmanager
def running_demo(tmp_path: Path, *extra: str) -> Iterator[RunningDemo]:
    port = free_port()
    data_dir = tmp_path / "demo-data"
    proc = subprocess.Popen(
        demo_argv(port, data_dir, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    demo = RunningDemo(proc, port, data_dir)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"demo exited: {proc.stdout.read() if proc.stdout else ''}")
            try:
                demo.status()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("the dashboard never answered") from None
                time.sleep(0.5)
        yield demo
    finally:
        if proc.poll() is None:
            tree = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            for pid in tree:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
