"""``stanchion elect``: usage, --status, running the command with the token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


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


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait(pred: Any, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_three_terminals_one_runs_the_job_kill_9_fails_over(file_url: str, tmp_path: Path) -> None:
    """`stanchion elect` on three "terminals": exactly one runs the job; kill -9 moves it."""
    import os
    import signal
    import time

    log = tmp_path / "jobs.log"
    job = f'echo "$STANCHION_ELECTION_ID $STANCHION_FENCING_TOKEN $$" >> {log}; exec sleep 60'
    procs = {
        ident: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stanchion",
                "elect",
                "--url",
                file_url,
                "--group",
                "jobs",
                "--id",
                ident,
                "--ttl",
                "2",
                "--",
                "sh",
                "-c",
                job,
            ],
            stderr=subprocess.DEVNULL,
        )
        for ident in ("t1", "t2", "t3")
    }
    try:
        assert _wait(lambda: log.exists() and log.read_text().strip(), 15)
        time.sleep(1.0)
        lines = log.read_text().split("\n")
        running = [line.split() for line in lines if line.strip()]
        assert len(running) == 1, running  # exactly one terminal runs the job
        leader, token, job_pid = running[0][0], int(running[0][1]), int(running[0][2])
        assert _pid_alive(job_pid)
        os.kill(procs[leader].pid, signal.SIGKILL)
        killed = time.monotonic()
        # The kernel kills the orphaned job (PR_SET_PDEATHSIG) ...
        assert _wait(lambda: not _pid_alive(job_pid), 2), "the job outlived its elector"
        # ... and another terminal starts it with a higher token, fast (flock).
        assert _wait(lambda: len(log.read_text().split()) >= 6, 2 + 2 / 3 + 1)
        took = time.monotonic() - killed
        second = log.read_text().split("\n")[1].split()
        assert second[0] != leader and int(second[1]) > token
        assert took < 1.0, f"failover took {took:.2f}s"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            proc.wait(15)


def test_lost_leadership_stops_the_command_sigterm_then_sigkill(
    sqlite_url: str, tmp_path: Path
) -> None:
    import os
    import sqlite3
    import time

    log = tmp_path / "job.log"
    # The job ignores SIGTERM (so does its `sleep`): only SIGKILL after --grace stops it.
    job = f'trap "" TERM; echo $$ >> {log}; while true; do sleep 0.05; done'
    proc = subprocess.Popen(
        [sys.executable, "-m", "stanchion", "elect", "--url", sqlite_url, "--group", "g",
         "--id", "a", "--ttl", "2", "--grace", "0.3", "--", "sh", "-c", job],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert _wait(lambda: log.exists() and log.read_text().strip(), 15)
        job_pid = int(log.read_text().split()[0])
        # Another node takes the lease behind our back (as after a long pause).
        db = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
        db.execute(
            "UPDATE stanchion_election SET holder = 'intruder', token = token + 1, "
            "expires_at = ?, ttl = 100",
            (time.time() + 100,),
        )
        db.commit()
        db.close()
        stolen = time.monotonic()
        # Noticed at the next renewal (<= ttl/3), then SIGTERM, then SIGKILL after 0.3 s.
        assert _wait(lambda: not _pid_alive(job_pid), 2 / 3 + 0.3 + 1.5)
        assert time.monotonic() - stolen < 2.0
        assert proc.poll() is None  # it campaigns again
        os.kill(proc.pid, 15)
        _, err = proc.communicate(timeout=10)
        assert "leadership lost" in err
        assert "did not stop within 0.3s; SIGKILL" in err
        assert proc.returncode == 128 + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
