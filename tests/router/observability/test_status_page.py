"""The status page in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium): it must render the live fleet from `GET /admin/status`, with no network beyond the router."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvroute.engines.sim.fleet import SimFleet

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT_ENV = "KVROUTE_STATUS_SCREENSHOT"  # a path: also save the screenshot there (docs/)
READ_PAGE = """
const cells = (tr) => [...tr.cells].map((td) => td.textContent);
return {
  summary: document.getElementById("summary").textContent,
  rows: Object.fromEntries(
    [...document.querySelectorAll("#fleet tbody tr")].map((tr) => [tr.dataset.worker, cells(tr)])),
  segments: [...document.querySelectorAll("#phases .bar span")].map((s) => s.dataset.phase),
  decisions: [...document.querySelectorAll("#decisions tbody tr")].map((tr) => cells(tr).join(" ")),
};
"""


def _driver() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (the test extra has it: pip install -e '.[test]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "no chromium/chromedriver on PATH (scripts/setup.sh installs Debian chromium + chromium-driver)"
        )
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.slow
async def test_status_page_renders_the_live_fleet(start_router, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = await asyncio.to_thread(_driver)
    try:
        async with SimFleet(workers=3, time_scale=0.05) as fleet:
            r = await start_router(worker_urls=tuple(fleet.urls), policy="kv_aware")
            await r.wait_healthy(3, timeout=10)
            prefix = "shared system prompt " * 30
            for i in range(9):
                body = {
                    "text": prefix + f"question {i}",
                    "sampling_params": {"max_new_tokens": 8},
                    "stream": True,
                }
                async with r.session.post(r.url + "/generate", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()

            def load_and_read() -> dict[str, Any]:
                driver.get(r.url + "/dashboard")
                wait = WebDriverWait(driver, 20)
                wait.until(lambda d: d.find_element(By.ID, "updated").get_attribute("data-state") == "ok")
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#fleet tbody tr")) == 3)
                # One atomic read in the page (it re-renders every 2 s: element handles would go stale).
                out: dict[str, Any] = driver.execute_script(READ_PAGE)
                out["url"] = driver.current_url
                out["png"] = driver.get_screenshot_as_png()
                return out

            page = await asyncio.to_thread(load_and_read)
    finally:
        await asyncio.to_thread(driver.quit)
    assert page["url"].endswith("/dashboard/")
    assert set(page["rows"]) == set(fleet.urls)
    for cells in page["rows"].values():
        assert cells[1] == "regular" and cells[2] == "healthy" and cells[3] == "closed"
    assert "policy kv_aware" in page["summary"] and "3/3 healthy" in page["summary"]
    assert "engine_prefill" in page["segments"]  # the phase bars came from the sim's meta_info
    assert any(d.startswith("kv_aware prefix_hit") for d in page["decisions"])  # follow-ups hit the prefix
    assert page["png"][:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "status.png").write_bytes(page["png"])
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).write_bytes(page["png"])


async def test_dashboard_files_follow_the_admin_rule(start_router) -> None:
    r = await start_router(admin_token="s3cret")
    async with r.session.get(r.url + "/dashboard/") as resp:  # the shell holds no data
        assert resp.status == 200 and "kvroute" in await resp.text()
    async with r.session.get(r.url + "/dashboard/dashboard.js") as resp:
        assert resp.status == 200 and resp.content_type == "application/javascript"
    async with r.session.get(r.url + "/dashboard/nope.js") as resp:
        assert resp.status == 404
    async with r.session.get(r.url + "/admin/status") as resp:
        assert resp.status == 401
    async with r.session.get(r.url + "/admin/status", headers={"Authorization": "Bearer s3cret"}) as resp:
        assert resp.status == 200
        st = await resp.json()
    assert st["workers"] == [] and st["replicas"] == {"enabled": False} and st["fleet"]["requests"] == 0
    async with r.session.get(
        r.url + "/admin/status?window_s=-1", headers={"Authorization": "Bearer s3cret"}
    ) as resp:
        assert resp.status == 400
