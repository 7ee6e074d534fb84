"""A real browser (Debian's chromium, driven by Playwright) uses the page: upload → results, draw → results,
"auto" detects the query's domain and leaves it out, "more like this", a bad upload explained, the phone layout.

Skipped with a reason when ``/usr/bin/chromium`` is absent (``make browser`` installs it). Playwright only
drives the system browser (``executable_path``); it never downloads one. The upload test saves a
screenshot to its ``tmp_path`` and to ``test-artifacts/ui.png`` (git-ignored) for people to look at.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Served


CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found: `apt-get install chromium` (or `make browser`)"
    ),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    """A fresh page (own context: no shared cookies/storage) with the app loaded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    p = context.new_page()
    try:
        p.goto(served.url, wait_until="domcontentloaded", timeout=30_000)
        p.locator("#search-button").wait_for(timeout=30_000)
        yield p
    finally:
        context.close()


def _wait_for_results(page: Any, n: int) -> None:
    page.wait_for_function("n => document.querySelectorAll('#results img').length >= n", arg=n, timeout=30_000)


def test_upload_search_shows_gallery(page: Any, served: Served, tmp_path: Path) -> None:
    query = sorted((served.data_root / "photo" / "7").glob("*.png"))[0]
    page.locator("#query-upload input[type=file]").set_input_files(str(query))
    page.locator("#query-upload img").first.wait_for(timeout=20_000)  # the preview is shown
    page.locator("#source-domain input").click()  # say the query is a photo ...
    page.get_by_role("option", name="photo", exact=True).click()
    page.locator("#search-button").click()  # ... so the other domains are searched
    _wait_for_results(page, 10)
    assert page.locator("#results img").count() >= 10
    status = page.locator("#status").inner_text()
    assert "result(s)" in status and "ink, outline" in status and "query domain: photo" in status, status
    captions = page.locator("#results").inner_text()
    assert re.search(r"(ink|outline) · \d · \d\.\d{3}", captions), captions
    assert "photo ·" not in captions
    page.wait_for_timeout(500)  # let the thumbnails finish painting
    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "ui.png")


def test_draw_sketch_searches_and_empty_canvas_is_reported(page: Any) -> None:
    page.get_by_role("tab", name="Draw a sketch").click()
    canvas = page.locator("#query-sketch canvas").first
    canvas.wait_for(timeout=20_000)
    page.locator("#search-button").click()  # nothing drawn yet
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('empty')", timeout=20_000)
    box = canvas.bounding_box()
    assert box is not None
    x, y, size = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, min(box["width"], box["height"])
    page.mouse.move(x, y - 0.3 * size)  # a vertical stroke: a "1"
    page.mouse.down()
    page.mouse.move(x, y + 0.3 * size, steps=3)  # few steps: each one repaints the canvas (slow headless)
    page.mouse.up()
    page.locator("#search-button").click()
    _wait_for_results(page, 10)
    assert "your drawing" in page.locator("#status").inner_text()


def _captions(page: Any) -> list[str]:
    return [c.strip() for c in page.locator("#results .caption-label").all_inner_texts()]


def test_auto_detects_the_domain_then_more_like_this(page: Any, served: Served) -> None:
    """A sketch-like (ink) upload with "auto": the detected domain is shown and none of the results is from it;
    "more like this" on a result searches with that result, its domain known."""
    query = sorted((served.data_root / "ink" / "2").glob("*.png"))[0]
    page.locator("#query-upload input[type=file]").set_input_files(str(query))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Ready')", timeout=20_000)
    page.locator("#search-button").click()  # the query domain is "auto"
    _wait_for_results(page, 10)
    status = page.locator("#status").inner_text()
    assert "detected: ink (" in status and f"for the uploaded image {query.name}" in status, status
    captions = _captions(page)
    assert len(captions) == 10 and not any(c.startswith("ink") for c in captions), captions

    page.locator("#results .thumbnail-item").nth(1).click()
    page.locator("#preview-original img").wait_for(timeout=20_000)  # the original, full size
    page.wait_for_function(  # fetched and decoded: the server sent its copy of the indexed file
        "() => { const i = document.querySelector('#preview-original img'); return i && i.complete && "
        "i.naturalWidth > 0; }", timeout=20_000)
    assert re.fullmatch(r"Download \S+\.png", page.locator("#preview-download").inner_text().strip())
    picked = captions[1].split(" · ")[0]
    page.locator("#more-like-this").click()
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('for the result')",
                           timeout=30_000)
    _wait_for_results(page, 10)
    status = page.locator("#status").inner_text()
    assert f"query domain: {picked}" in status and "uploaded image" not in status, status
    assert not any(c.startswith(picked) for c in _captions(page))


def test_non_image_upload_is_explained_in_the_status_line(page: Any, tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("this is not an image\n" * 20)
    page.locator("#query-upload input[type=file]").set_input_files(str(notes))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('notes.png')",
                           timeout=20_000)
    status = page.locator("#status").inner_text()
    assert "Error" in status and "notes.png: not a readable image" in status, status
    page.wait_for_timeout(1_500)  # it stays (no fading toast)
    assert "notes.png: not a readable image" in page.locator("#status").inner_text()


def test_phone_layout_puts_results_right_after_the_query(browser: Any, served: Served) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(served.url, wait_until="domcontentloaded", timeout=30_000)
        page.locator("#search-button").wait_for(timeout=30_000)
        page.locator("#examples .thumbnail-item").last.click()  # an example tile (labelled domain · class)
        _wait_for_results(page, 10)
        page.wait_for_timeout(1_000)  # the page scrolls (smoothly) back up to the status line and results
        at = page.evaluate("() => document.querySelector('#status').getBoundingClientRect().top")
        assert -2 <= at <= 844 / 2, at
        status = page.locator("#status").inner_text()
        assert "for the example " in status and "uploaded image" not in status, status

        def top(selector: str) -> float:
            box = page.locator(selector).bounding_box()
            assert box is not None, selector
            return float(box["y"])

        assert top("#search-button") < top("#status") < top("#results") < top("#examples")
        assert page.evaluate("document.documentElement.scrollWidth") <= 392  # nothing wider than the phone
        assert re.fullmatch(r"\w+ · \d", page.locator("#examples .caption-label").first.inner_text().strip())
    finally:
        context.close()
