"""``stanchion elect``: usage, --status, running the command with the token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def elect(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stanchion", "elect", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_usage_errors_are_one_line_exit_2(file_url: str) -> None:
    out = elect("--url", file_url, "--group", "g", "--id", "a")
    assert out.returncode == 2 and "a command is required after '--'" in out.stderr
    out = elect("--group", "g", "--status")
    assert out.returncode == 2 and "--url is required" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_url_exit_1(tmp_path: Path) -> None:
    out = elect("--url", "nosuch://x", "--group", "g", "--status")
    assert out.returncode == 1
    assert out.stderr.startswith("ConfigError: no election backend for scheme 'nosuch'")


def test_unreachable_backend_exit_1() -> None:
    out = elect(
        "--url", "sqlite:////nonexistent-stanchion/x.db", "--group", "g", "--id", "a", "--", "true"
    )  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith("BackendUnavailable: cannot open sqlite")


def test_runs_command_with_token_and_passes_its_status(sqlite_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = f"echo $STANCHION_FENCING_TOKEN $STANCHION_ELECTION_ID > {marker}; exit 3"
    out = elect(
        "--url", sqlite_url, "--group", "g", "--id", "a", "--ttl", "2", "--", "sh", "-c", script
    )
    assert out.returncode == 3, out.stderr
    assert marker.read_text().split() == ["1", "a"]
    # It resigned on exit: the next term starts at once with a higher token.
    out = elect(
        "--url", sqlite_url, "--group", "g", "--id", "b", "--ttl", "2", "--", "sh", "-c", script
    )
    assert out.returncode == 3
    assert marker.read_text().split() == ["2", "b"]


def test_status_shows_the_leader(sqlite_url: str) -> None:
    out = elect("--url", sqlite_url, "--group", "g", "--status")
    assert out.returncode == 0 and out.stdout.strip() == "group g: no leader"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stanchion", "elect", "--url", sqlite_url, "--group", "g",
         "--id", "node-a", "--ttl", "2", "--", "sleep", "30"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "node-a leads g (token 1)" in line
        out = elect("--url", sqlite_url, "--group", "g", "--status", "--json")
        info = json.loads(out.stdout)
        assert info["leader"] == "node-a" and info["token"] == 1 and 0 < info["expires_in"] <= 2
    finally:
        proc.terminate()
        assert proc.wait(10) == 128 + 15
