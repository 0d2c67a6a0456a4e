"""The heatmap page in a real headless Chromium, served by a real mha-serve: click, wait, look.

Needs Debian's ``chromium`` and the ``playwright`` package (its driver only: the browser is the
system one, so nothing is downloaded); skipped without either.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
mpimg = pytest.importorskip("matplotlib.image")

# This machine has no network beyond loopback: keep Chromium from trying to reach anything.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    s = start_server(tmp_path_factory.mktemp("server"))
    try:
        yield s.url
    finally:
        s.stop()


@pytest.fixture
def page(tmp_path: Path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(30_000)
            page.js_errors = []
            page.on("pageerror", lambda e: page.js_errors.append(str(e)))
            yield page
        finally:
            browser.close()


def pixels(png: bytes) -> np.ndarray:
    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]


def colours(img: np.ndarray) -> int:
    return len(np.unique((img * 255).round().astype(np.uint8).reshape(-1, 3), axis=0))


IMAGE_LOADED = (
    "() => { const i = document.getElementById('heatmap'); return !i.hidden && i.complete && i.naturalWidth > 0; }"
)


def test_click_shows_the_heatmaps(server: str, page, tmp_path: Path) -> None:
    resp = page.goto(f"{server}/")
    assert resp.status == 200, resp.text()
    page.wait_for_function("() => document.getElementById('model').textContent.startsWith('Model')")
    assert "4 heads, emb_size 32" in page.text_content("#model")
    page.click("#random")
    x = page.input_value("#x")
    assert x.startswith("[[") and x.count("\n") == 16 + 1  # T = 16 rows between the brackets
    page.click("#run")
    page.wait_for_function(IMAGE_LOADED)
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot: {shot}")

    width, height = page.evaluate("() => [heatmap.naturalWidth, heatmap.naturalHeight]")
    assert width > 2 * height  # four panels side by side
    assert page.is_hidden("#error")
    assert "queued" in page.text_content("#status")
    whole = pixels(shot.read_bytes())
    assert whole.std() > 0.1 and colours(whole) > 100, "the screenshot looks blank"
    image = pixels(page.locator("#heatmap").screenshot())
    assert image.std() > 0.1 and colours(image) > 50, "the heatmap looks blank"
    assert page.js_errors == []


def test_pasted_input_heads_and_errors(server: str, page, tmp_path: Path) -> None:
    page.goto(f"{server}/")
    page.wait_for_function("() => document.getElementById('model').textContent.startsWith('Model')")
    rows = np.random.default_rng(0).standard_normal((5, 32)).round(3).tolist()
    page.fill("#x", str(rows))  # [T, E], pasted: the page adds the batch dimension
    page.fill("#heads", "1")
    page.uncheck("#causal")
    page.click("#run")
    page.wait_for_function(IMAGE_LOADED)
    width, height = page.evaluate("() => [heatmap.naturalWidth, heatmap.naturalHeight]")
    assert width < 1.5 * height  # one panel
    assert page.text_content("#status").startswith("T = 5")

    page.fill("#heads", "7")
    page.click("#run")
    page.wait_for_selector("#error", state="visible")
    assert "422 validation_error: head index 7 is out of range 0..3" in page.text_content("#error")
    assert page.is_hidden("#heatmap")

    page.fill("#x", "[[1, 2,")
    page.click("#run")
    page.wait_for_function("() => document.getElementById('error').textContent.startsWith('x is not valid JSON')")
    page.screenshot(path=str(tmp_path / "error.png"), full_page=True)
    assert page.js_errors == []
