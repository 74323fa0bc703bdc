"""The README example, run: the app's charges succeed through a flaky payment API."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp

from conftest import AmbassadorFactory, UpstreamFactory

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("### Ambassador (`stanchion ambassador`)")
    return text[start : text.index("\n### ", start + 10)]


async def test_readme_example_makes_a_flaky_payment_api_reliable(
    upstream: UpstreamFactory, ambassador: AmbassadorFactory
) -> None:
    section = _section()
    toml = re.search(r"```toml\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    flaky = await upstream("pay-1", fail_every=4, fail_status=503)  # every 4th call fails
    down_then_up = await upstream("pay-2", fail_first=3, fail_status=502)  # a brief outage
    toml = toml.replace(
        '["https://pay-1.example.com", "https://pay-2.example.com"]',
        f'["{flaky.url}", "{down_then_up.url}"]',
    )
    toml = re.sub(r'address = "127.0.0.1:\d+"', 'address = "127.0.0.1:0"', toml)
    amb = await ambassador(toml)
    ns: dict[str, Any] = {}
    exec(code.replace("127.0.0.1:10000", f"127.0.0.1:{amb.port}"), ns)
    async with aiohttp.ClientSession() as http:
        results = [await ns["charge"](http, f"order-{i}", 1000 + i) for i in range(30)]
    assert all(r["method"] == "POST" and r["path"] == "/v2/charges" for r in results)
    hits = flaky.requests() + down_then_up.requests()
    assert len(hits) > 30  # failures happened and were retried ...
    assert all(h.headers["idempotency-key"].startswith("charge-order-") for h in hits)
