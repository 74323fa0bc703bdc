"""The dashboard in a real headless Chromium: every panel live, "kill leader" works."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from demo_helpers import running_demo

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).exists()
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.timeout(240)


async def test_dashboard_panels_live_and_kill_leader(tmp_path: Path) -> None:
    from playwright import async_api as playwright

    if not HAVE_CHROMIUM:
        pytest.fail("chromium is not installed (apt-get install chromium); .ci/run installs it")
    with running_demo(tmp_path, "--rate", "4") as demo:
        demo.wait(lambda s: (s["orders"] or {}).get("paid", 0) >= 2 and bool(s["logs"]))
        async with playwright.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 1100})
            await page.goto(demo.url + "/")
            await page.wait_for_function(
                "document.getElementById('live').textContent.startsWith('live')", timeout=20000
            )
            # every panel shows live data
            await page.wait_for_function(
                "Number(document.getElementById('leader-token').textContent) >= 1", timeout=20000
            )
            for table in ("shards", "topics", "projections", "services", "events", "logs"):
                await page.wait_for_function(
                    f"document.querySelectorAll('#{table} tbody tr').length > 0", timeout=20000
                )
            assert await page.locator("#circuits .pill").first.inner_text() == "closed"
            placed = await page.locator("#order-totals .big").first.inner_text()
            assert int(placed) > 0
            assert await page.locator("#shards tbody tr").count() == 3
            # charts are drawn
            await page.wait_for_timeout(2500)
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard-top.png"))
            # kill the leader from the dashboard: a new leader with a higher token shows up
            first = int(await page.locator("#leader-token").inner_text())
            first_id = await page.locator("#leader-id").inner_text()
            await page.click("#kill-leader")
            await page.wait_for_function(
                "document.getElementById('chaos-result').textContent.startsWith('kill-leader: ok')",
                timeout=10000,
            )
            await page.wait_for_function(
                f"Number(document.getElementById('leader-token').textContent) > {first}",
                timeout=30000,
            )
            second = int(await page.locator("#leader-token").inner_text())
            rows = await page.locator("#leader-history tbody tr").count()
            await page.screenshot(path=str(ARTIFACTS / "dashboard-after-kill.png"), full_page=True)
            await browser.close()
        assert second > first and rows >= 2, (first_id, first, second)
