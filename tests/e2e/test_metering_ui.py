"""The usage web page (`/ui/`) in headless Chromium, against a real `hutch serve`.

Chromium (Debian's `chromium`; `.ci/run` installs it) loads the page with the tenant's key in
the URL fragment, runs its scripts against the usage API, and hands back the DOM and a
screenshot; both must show the real sessions, not an empty shell.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.test_metering import CONFIG, _function, _run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
ACTIVE_BLUE = (0x25, 0x63, 0xEB)  # the chart's active bars (hutch/ui/app.js)


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--window-size=1280,1100",
            "--virtual-time-budget=5000",  # let the page's fetches and rendering finish
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _near(pixel: tuple, color: tuple, tolerance: int = 24) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], color, strict=True))


def test_the_usage_page_shows_live_sessions_tenant_totals_and_a_chart(fresh_server, tmp_path):
    server = fresh_server(CONFIG.format(uid_base=1_750_000_000))
    made = server.admin.post("/v1/tenants", json={"name": "ui-team"}).json()
    client = httpx.Client(base_url=server.url, headers={"X-API-Key": made["apiKey"]}, timeout=60)
    function = _function(client)
    for key in ("ui-live", "ui-ended"):
        assert client.post(f"/v1/functions/{function}/sessions", json={"sessionId": key}).status_code == 201
    _run(client, function, "ui-live", "sleep 2.5")  # 2.5 s of work: active time for the chart
    assert client.delete(f"/v1/functions/{function}/sessions/ui-ended").status_code == 204
    time.sleep(0.6)  # a sample after the work

    url = f"{server.url}/ui/#key={made['apiKey']}"  # the fragment never reaches the server
    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    live_table = page[page.index('id="live"') : page.index('id="tenants"')]
    assert "ui-live" in live_table and function in live_table
    assert 'class="state idle"' in live_table or 'class="state active"' in live_table
    tenants_table = page[page.index('id="tenants"') : page.index('id="ended"')]
    assert made["tenantId"] in tenants_table and "ui-team" in tenants_table and "USD" in tenants_table
    ended_table = page[page.index('id="ended"') :]
    assert "ui-ended" in ended_table and "deleted" in ended_table
    assert 'fill="#2563eb"' in page  # the chart drew active seconds
    assert '<p id="error" role="alert" hidden=""' in page  # and nothing failed
    assert f"tenant ui-team ({made['tenantId']})" in page

    shot = tmp_path / "usage.png"
    picture = _chromium(tmp_path / "profile-shot", f"--screenshot={shot}", url)
    assert picture.returncode == 0 and shot.exists(), picture.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1100)
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and the chart: not a blank page
    # The legend's swatch of the active blue is 14 pixels high; a bar of active seconds is taller.
    width, height = image.size
    pixels = image.load()
    tallest = max(sum(_near(pixels[x, y], ACTIVE_BLUE) for y in range(height)) for x in range(width))
    assert tallest >= 24, tallest
