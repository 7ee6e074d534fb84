"""Screenshot the web UI with real results, for the README: a desktop and a phone-width (390 px) page.

    python -m benchmarks.ui_screenshot --run runs/demo                 # the default demo model (cdretrieval demo)
    python -m benchmarks.ui_screenshot --run RUN --query IMG --out docs

Writes ``OUT/ui_desktop.png`` — 1400 px wide: a digit ("7", ``--digit``) drawn on the canvas, searched with
the query domain on "auto" (the status line shows what was detected and searched), the results, and the
first result opened full size — and ``OUT/ui_phone.png`` — 390 px wide: a query (``--query IMG`` uploaded,
else the first example tile clicked) and its results, which come right after the query on a phone. Each
status line is printed, so a wrong answer is seen without opening the images. Look at both PNGs before
committing them.

Needs Debian's chromium (``apt-get install chromium``) and the playwright Python package (no browser
download: it drives /usr/bin/chromium). Serves the run in-process on a free localhost port.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
#: Pen strokes per digit, as fractions of the canvas side around its centre (each a list of polylines).
DIGITS: dict[str, list[list[tuple[float, float]]]] = {
    "1": [[(-0.08, -0.2), (0.02, -0.3), (0.02, 0.32)]],
    "4": [[(0.12, 0.32), (0.12, -0.3), (-0.2, 0.12), (0.22, 0.12)]],
    "7": [[(-0.25, -0.3), (0.25, -0.3), (-0.05, 0.32)]],
    "0": [[(0.0, -0.3), (0.18, -0.18), (0.2, 0.12), (0.0, 0.32), (-0.2, 0.12), (-0.18, -0.18), (0.0, -0.3)]],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_results(page: Any, n: int = 1) -> None:
    """Until ``n`` result thumbnails are shown and painted."""
    page.wait_for_function("n => document.querySelectorAll('#results img').length >= n", arg=n, timeout=120_000)
    page.wait_for_timeout(800)


def _open(browser: Any, url: str, viewport: dict[str, int], **options: Any) -> Any:
    page = browser.new_page(viewport=viewport, **options)
    page.goto(url, wait_until="domcontentloaded", timeout=120_000)
    page.locator("#search-button").wait_for(timeout=120_000)
    return page


def _draw(page: Any, strokes: Sequence[Sequence[tuple[float, float]]]) -> None:
    """Draw ``strokes`` (fractions of the canvas around its centre) with the mouse on the Draw tab."""
    page.get_by_role("tab", name="Draw a sketch").click()
    canvas = page.locator("#query-sketch canvas").first
    canvas.wait_for(timeout=30_000)
    box = canvas.bounding_box()
    assert box is not None
    cx, cy, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, min(box["width"], box["height"])
    for line in strokes:
        (x0, y0), *rest = line
        page.mouse.move(cx + x0 * side, cy + y0 * side)
        page.mouse.down()
        for x, y in rest:
            page.mouse.move(cx + x * side, cy + y * side, steps=4)
        page.mouse.up()


def _shot_to(page: Any, path: Path, bottom_of: str) -> None:
    """A full-page screenshot of ``page`` cut just below the element ``bottom_of``."""
    box = page.locator(bottom_of).bounding_box()
    width = page.viewport_size["width"]
    height = box["y"] + box["height"] + 16 if box is not None else page.viewport_size["height"]
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": 0, "width": width, "height": height})


def desktop(browser: Any, url: str, out: Path, digit: str) -> str:
    """Draw ``digit``, search ("auto"), open the first result; screenshot; return the status line."""
    page = _open(browser, url, DESKTOP)
    _draw(page, DIGITS[digit])
    page.locator("#search-button").click()
    _wait_results(page, 10)
    page.locator("#results .thumbnail-item").first.click()
    page.locator("#preview-original img").wait_for(timeout=30_000)
    page.wait_for_timeout(800)
    status = str(page.locator("#status").inner_text())
    page.evaluate("window.scrollTo(0, 0)")
    _shot_to(page, out, "#examples")
    page.close()
    return status


def phone(browser: Any, url: str, out: Path, query: str | None) -> str:
    """At 390 px: upload ``query`` (or click the first example) and search; screenshot; return the status."""
    page = _open(browser, url, PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    if query:
        page.locator("#query-upload input[type=file]").set_input_files(query)
        page.wait_for_function("() => document.querySelector('#status').innerText.includes('Ready')",
                               timeout=60_000)
        page.locator("#search-button").click()
    else:
        page.locator("#examples .thumbnail-item").first.click()
    _wait_results(page, 10)
    status = str(page.locator("#status").inner_text())
    page.evaluate("window.scrollTo(0, 0)")
    _shot_to(page, out, "#results")
    page.close()
    return status


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="run folder with indexes (default runs/demo)")
    ap.add_argument("--query", default=None, help="image to upload for the phone shot (default: an example tile)")
    ap.add_argument("--digit", choices=sorted(DIGITS), default="7", help="digit drawn for the desktop shot")
    ap.add_argument("--out", type=Path, default=Path("docs"), help="output folder (default docs)")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from app.server import launch_app

    port = _free_port()
    demo = launch_app(args.run, port=port, prevent_thread_lock=True)
    url = f"http://127.0.0.1:{port}/"
    args.out.mkdir(parents=True, exist_ok=True)
    shots = {"desktop": args.out / "ui_desktop.png", "phone": args.out / "ui_phone.png"}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                print(f"desktop: {desktop(browser, url, shots['desktop'], args.digit)}")
                print(f"phone: {phone(browser, url, shots['phone'], args.query)}")
            finally:
                browser.close()
    finally:
        demo.close()
    print(f"wrote {shots['desktop']} and {shots['phone']}")


if __name__ == "__main__":
    main()
