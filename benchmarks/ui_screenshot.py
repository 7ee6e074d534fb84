"""Screenshot the web UI with real results (for the README): upload a query, and draw one.

    python -m benchmarks.ui_screenshot --run runs/demo --query IMG [--source photo] [--out docs]

Needs Debian's chromium (``apt-get install chromium``) and the playwright Python package (no browser
download: it drives /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_results(page: Any, n: int) -> None:
    page.wait_for_function("n => document.querySelectorAll('#results img').length >= n", arg=n, timeout=60_000)
    page.wait_for_timeout(800)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--query", required=True, help="image to upload")
    ap.add_argument("--source", default=None, help="the query's domain (its results come from the others)")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from app.server import launch_app

    port = _free_port()
    demo = launch_app(args.run, port=port, prevent_thread_lock=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=60_000)
            page.locator("#search-button").wait_for(timeout=60_000)
            page.locator("#query-upload input[type=file]").set_input_files(args.query)
            page.locator("#query-upload img").first.wait_for(timeout=30_000)
            if args.source:
                page.locator("#source-domain input").click()
                page.get_by_role("option", name=args.source, exact=True).click()
            page.locator("#search-button").click()
            _wait_results(page, 10)
            page.screenshot(path=str(args.out / "ui_upload.png"), full_page=False)

            page.get_by_role("tab", name="Draw a sketch").click()
            canvas = page.locator("#query-sketch canvas").first
            canvas.wait_for(timeout=30_000)
            box = canvas.bounding_box()
            assert box is not None
            cx, cy, s = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, min(box["width"], box["height"])
            page.mouse.move(cx - 0.25 * s, cy - 0.3 * s)  # a "7": the top bar, then the diagonal
            page.mouse.down()
            page.mouse.move(cx + 0.25 * s, cy - 0.3 * s, steps=4)
            page.mouse.move(cx - 0.05 * s, cy + 0.32 * s, steps=4)
            page.mouse.up()
            page.locator("#search-button").click()
            _wait_results(page, 10)
            page.screenshot(path=str(args.out / "ui_sketch.png"), full_page=False)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out / 'ui_upload.png'} and {args.out / 'ui_sketch.png'}")


if __name__ == "__main__":
    main()
