"""The README's pub/sub example runs (on SQLite and on memory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("### Pub/sub (`stanchion.pubsub`)", 1)[1].split("\n### ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the pub/sub section has no python example"
    return match.group(1).replace("asyncio.run(main())", "")


@pytest.mark.parametrize("scheme", ["sqlite", "memory"])
async def test_readme_iot_example(
    scheme: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    url = request.getfixturevalue(f"{scheme}_url")
    ns: dict[str, object] = {}
    exec(compile(_example(), "README.md", "exec"), ns)
    await ns["main"](url)  # type: ignore[operator]
    out = capsys.readouterr().out
    assert "{'analytics': 100, 'alerting': 100} ['s0', 's1', 's2', 's3', 's4']" in out
