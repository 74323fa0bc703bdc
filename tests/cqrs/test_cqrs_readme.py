"""The README's online-store example runs and prints what the README says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("### CQRS (`stanchion.cqrs`)") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    shown = re.search(r"prints\n\n```text\n(.*?)```", section, re.S)
    assert code and shown
    script = code.group(1).replace('DIR = "/tmp/stanchion-shop"', f'DIR = "{tmp_path}"')
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    expected = shown.group(1).strip().splitlines()
    got = out.stdout.strip().splitlines()
    assert got[:2] == expected[:2]
    assert re.fullmatch(re.escape(expected[2]).replace(re.escape("..."), r"[0-9.]+"), got[2]), got[
        2
    ]
