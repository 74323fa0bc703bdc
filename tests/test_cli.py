from __future__ import annotations

import subprocess
import sys

import pytest

from stanchion import __version__
from stanchion.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stanchion", *args], capture_output=True, text=True, timeout=60
    )


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0
    assert out.stdout.startswith(f"stanchion {__version__} (Python ")


def test_help_lists_usage() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "usage: stanchion" in out.stdout and "commands:" in out.stdout


def test_unknown_command_is_one_line_and_exit_2() -> None:
    out = run("frobnicate")
    assert out.returncode == 2
    assert "unknown command 'frobnicate'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_option_is_one_line_and_exit_2() -> None:
    out = run("--frob")
    assert out.returncode == 2
    assert "unknown option '--frob'" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_command_prints_help_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: stanchion" in capsys.readouterr().err


def test_console_script_installed() -> None:
    import shutil

    exe = shutil.which("stanchion") or str(
        __import__("pathlib").Path(sys.executable).parent / "stanchion"
    )
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "stanchion" in out.stdout
