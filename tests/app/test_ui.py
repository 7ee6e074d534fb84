"""The served UI through its HTTP API (gradio_client) and raw HTTP: results, errors, file-serving safety."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

if TYPE_CHECKING:
    from conftest import Served

from app.server import ServedFiles, blocked_paths, indexed_folders, launch_options, parse_auth, resolve_auth
from app.ui import (
    CSV_COLUMNS,
    QueryInputError,
    SearchService,
    check_k,
    default_targets,
    info_markdown,
    load_upload,
    page_info,
    prepare_sketch,
    resolve_domains,
)


@pytest.fixture(scope="module")
def client(served: Served) -> Client:
    return Client(served.url, verbose=False)


def _query_file(data_root: Path, domain: str = "ink", digit: str = "3") -> Path:
    return sorted((data_root / domain / digit).glob("*.png"))[0]


def _search(client: Client, path: Path | str, source: str, targets: list[str], k: int) -> tuple[list, dict]:
    gallery, result = client.predict(handle_file(str(path)), source, targets, k, api_name="/search")
    return gallery, result


# ---------------------------------------------------------------------------------------------------------
# The /search endpoint


def test_search_returns_k_results_from_target_sorted(client: Client, served: Served) -> None:
    gallery, result = _search(client, _query_file(served.data_root), "ink", ["photo"], 7)
    assert result["ok"] is True
    assert result["source_domain"] == "ink" and result["target_domains"] == ["photo"] and result["k"] == 7
    rows = result["results"]
    assert len(rows) == 7 == len(gallery)
    assert all(r["domain"] == "photo" for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in rows] == list(range(1, 8))
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
    for r in rows:  # label from the class folder; files named relative to the data root, never absolute
        assert r["label"] in {str(d) for d in range(10)}
        assert r["file"].startswith("photo/") and not Path(r["file"]).is_absolute()
    for item, r in zip(gallery, rows, strict=True):
        assert item["caption"] == f"photo · {r['label']} · {r['score']:.3f}"
        with Image.open(item["image"]) as thumb:  # a small thumbnail, not the original file
            assert max(thumb.size) <= 160


def test_search_all_other_domains_by_default(client: Client, served: Served) -> None:
    _, result = _search(client, _query_file(served.data_root, "photo", "5"), "photo", [], 12)
    rows = result["results"]
    assert result["target_domains"] == ["ink", "outline"] and result["source"] == "given"
    assert result["detected"] is None and result["source_domain"] == "photo"
    assert len(rows) == 12 and {r["domain"] for r in rows} <= {"ink", "outline"}
    calibrated = [r["calibrated_score"] for r in rows]  # ranked by per-domain calibrated score
    assert calibrated == sorted(calibrated, reverse=True)
    for d in ("ink", "outline"):
        scores = [r["score"] for r in rows if r["domain"] == d]
        assert scores == sorted(scores, reverse=True)


def test_auto_detects_the_domain_and_searches_the_others(client: Client, served: Served) -> None:
    _, result = _search(client, _query_file(served.data_root, "ink", "2"), "auto", [], 10)
    assert result["source"] == "detected" and result["source_domain"] == "ink"
    assert result["detected"]["domain"] == "ink" and 0.5 < result["detected"]["confidence"] <= 1.0
    assert result["target_domains"] == ["outline", "photo"]
    assert len(result["results"]) == 10 and all(r["domain"] != "ink" for r in result["results"])


def test_bad_uploads_report_errors_and_next_query_works(client: Client, served: Served, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 20)
    with pytest.raises(AppError, match=r"notes\.png.*not a readable image"):
        _search(client, text, "auto", ["photo"], 5)

    good = _query_file(served.data_root)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(AppError, match=r"truncated\.png"):
        _search(client, truncated, "auto", ["photo"], 5)

    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(AppError, match="empty"):
        _search(client, empty, "auto", ["photo"], 5)

    _, result = _search(client, good, "auto", ["photo"], 5)  # the server is still fine
    assert len(result["results"]) == 5


def test_bad_parameters_report_errors(client: Client, served: Served) -> None:
    good = _query_file(served.data_root)
    with pytest.raises(AppError, match="nowhere"):
        _search(client, good, "auto", ["nowhere"], 5)
    with pytest.raises(AppError, match="nowhere"):
        _search(client, good, "nowhere", ["photo"], 5)
    with pytest.raises(AppError):
        _search(client, good, "auto", ["photo"], 0)
    fast = Client(served.url, verbose=False, download_files=False)  # don't fetch 50 thumbnails
    assert len(_search(fast, good, "auto", ["photo"], 50)[1]["results"]) == 50


# ---------------------------------------------------------------------------------------------------------
# What the server lets a browser fetch


def _file_url(served: Served, path: str | Path) -> str:
    return f"{served.url}gradio_api/file={path}"


def test_only_indexed_data_files_are_served(served: Served) -> None:
    """The server's copies of indexed images are sent; the originals' own paths and everything else are not."""
    indexed = _query_file(served.data_root).resolve()
    copy = served.files.serve(indexed)
    assert copy is not None and copy.parent.parent == served.files.folder and copy.name == indexed.name
    with httpx.Client(timeout=10) as http:
        ok = http.get(_file_url(served, copy))
        assert ok.status_code == 200 and ok.content == indexed.read_bytes()

        secret = served.data_root.parent / "secret.txt"  # next to the data, not in a domain folder
        secret.write_text("TOP-SECRET-CONTENT")
        from_folder = os.path.relpath(secret, served.files.folder)  # ../../… out of the allowed folder
        refused = [
            "/etc/passwd",
            str(indexed),  # an indexed image, but by its own path: only the server's copy is allowed
            str(indexed.parent),
            str(copy.parent),  # a folder, even inside the allowed one
            str(served.run / "checkpoint.pt"),
            str(served.run / "config.yaml"),
            str(served.data_root / "demo.json"),  # data root itself is not an indexed domain folder
            str(secret),
            f"{served.files.folder}/{from_folder}",
            f"{copy.parent}/../../../../../../../../etc/passwd",
            f"{indexed.parent}/../../../secret.txt",
            str(Path.home() / ".bashrc"),
        ]
        for path in refused:
            r = http.get(_file_url(served, path))
            assert r.status_code in (403, 404), (path, r.status_code)
            assert b"TOP-SECRET-CONTENT" not in r.content and b"root:x:" not in r.content
        # URL-encoded traversal is decoded by the router and then refused the same way
        r = http.get(f"{served.url}gradio_api/file=%2Fetc%2Fpasswd")
        assert r.status_code in (403, 404)
        r = http.get(f"{served.url}gradio_api/file={served.files.folder}/{from_folder.replace('/', '%2F')}")
        assert r.status_code in (403, 404) and b"TOP-SECRET-CONTENT" not in r.content


def _raw_call(http: httpx.Client, served: Served, file_path: str, k: int = 3) -> str:
    """POST /call/search with a file payload pointing at ``file_path``; the SSE text of the outcome."""
    body = {"data": [{"path": file_path, "meta": {"_type": "gradio.FileData"}}, "auto", ["photo"], k]}
    event = http.post(f"{served.url}gradio_api/call/search", json=body).json()["event_id"]
    return http.get(f"{served.url}gradio_api/call/search/{event}").text


def test_api_reads_only_uploaded_files(served: Served) -> None:
    """A client can't make the server read a file by naming its path: only uploads are accepted."""
    indexed = _query_file(served.data_root).resolve()
    with httpx.Client(timeout=30) as http:
        for path in ("/etc/passwd", str(served.run / "checkpoint.pt"), str(indexed)):
            outcome = _raw_call(http, served, path)
            assert outcome.startswith("event: error"), (path, outcome[:200])
        uploaded = http.post(
            f"{served.url}gradio_api/upload", files={"files": ("q.png", indexed.read_bytes(), "image/png")}
        ).json()[0]
        outcome = _raw_call(http, served, uploaded)
        assert outcome.startswith("event: complete") and "photo" in outcome


def test_upload_size_is_limited(served: Served) -> None:
    big = b"\0" * (11 * 2**20)  # over the default 10 MB
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{served.url}gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    assert r.status_code == 413


def test_launch_options_are_safe(app_run: Path, served: Served) -> None:
    from cdretrieval.retrieval import Retriever

    retriever = Retriever.from_run(app_run, device="cpu")
    data = served.data_root.resolve()
    files = ServedFiles.of(retriever, protected=blocked_paths(app_run))
    try:
        opts = launch_options(app_run, served=files)
        assert opts["server_name"] == "127.0.0.1" and opts["share"] is False and opts["auth"] is None
        assert opts["max_file_size"] == "10mb" and opts["show_error"] is False
        # one allowed folder, the server's own (Gradio checks each request against each allowed path: issue 14)
        assert opts["allowed_paths"] == [str(files.folder)] and files.folder.is_dir()
        assert str(app_run.resolve()) in opts["blocked_paths"]
        assert launch_options(app_run)["allowed_paths"] == []  # no ServedFiles: no file is sent as it is
        indexed = sorted(str(Path(it.path).resolve()) for d in retriever.domains for it in retriever.indexes[d].items)
        assert sorted(files.files) == indexed  # exactly the indexed image files, never a folder
        for path in indexed[::60]:
            copy = files.serve(path)
            assert copy is not None and files.folder in copy.parents and copy.name == Path(path).name
            assert copy.read_bytes() == Path(path).read_bytes()
        for refused in (app_run / "checkpoint.pt", app_run / "config.yaml", data / "demo.json", data / "ink",
                        data, Path("/etc/passwd")):
            assert files.serve(refused) is None, refused
    finally:
        files.close()
    assert not files.folder.exists() and files.serve(indexed[0]) is None  # closed: its folder is gone
    assert served.url.startswith("http://127.0.0.1:")
    # nothing inside a protected folder (the run folder) is served (thumbnails still work)
    assert indexed_folders(retriever, protected=[data / "ink" / "3"]) == [str(data / "outline"), str(data / "photo")]
    protected = ServedFiles.of(retriever, protected=blocked_paths(app_run, [data / "ink" / "3"]))
    try:
        assert protected.files and not any(p.startswith(str(data / "ink" / "3")) for p in protected.files)
        assert protected.serve(_query_file(data, "ink", "3")) is None
        assert protected.serve(_query_file(data, "ink", "4")) is not None
    finally:
        protected.close()


def test_info_panel_and_page(served: Served) -> None:
    with httpx.Client(timeout=10) as http:
        page = http.get(served.url)
        config = http.get(f"{served.url}config").json()
    assert page.status_code == 200
    texts = " ".join(str(c.get("props", {}).get("value", "")) for c in config["components"])
    assert "cross-domain image search" in texts
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert "Model and index" in labels
    assert "efficientnet_lite0" in texts and "photo: 120" in texts
    assert "domain detection" in texts and "held-out accuracy" in texts
    # The panel names the data root and run by folder, the index relative to the run: no server paths.
    for absolute in (served.data_root.resolve(), served.run.resolve()):
        assert str(absolute) not in texts
    assert f"`{served.run.resolve().name}`" in texts and "**index dir**: `index`" in texts


# ---------------------------------------------------------------------------------------------------------
# Pure helpers


def test_prepare_sketch_rejects_empty_canvas_and_crops_drawing() -> None:
    for empty in (
        None,
        {"composite": None},
        {"composite": Image.new("RGB", (400, 400), "white")},
        {"composite": Image.new("RGBA", (400, 400), (0, 0, 0, 0))},
    ):
        with pytest.raises(QueryInputError, match="empty"):
            prepare_sketch(empty)
    canvas = np.full((400, 400, 3), 255, np.uint8)
    canvas[50:150, 300:340] = 0  # a 100 × 40 stroke in the top-right corner
    out = prepare_sketch({"composite": Image.fromarray(canvas)})
    assert out.mode == "RGB" and out.width == out.height and out.width > 100
    grey = np.asarray(out.convert("L"))
    ys, xs = np.nonzero(grey < 128)
    assert abs((ys.min() + ys.max()) / 2 - out.height / 2) <= 2  # centred
    assert abs((xs.min() + xs.max()) / 2 - out.width / 2) <= 2


def _stroke_stats(img: Image.Image) -> tuple[float, float, float, float]:
    """``(longer side / image side, centre row, centre column, stroke width)`` of the dark strokes of ``img``
    (width: twice the area over the perimeter of the pixels darker than mid-grey)."""
    from scipy import ndimage as ndi

    dark = np.asarray(img.convert("L")) < 128
    ys, xs = np.nonzero(dark)
    fill = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / img.width
    perimeter = (dark & ~ndi.binary_erosion(dark)).sum()
    return fill, (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2, 2 * dark.sum() / perimeter


def _drawn_seven(canvas: int, radius: int, scale: float, offset: tuple[float, float]) -> Image.Image:
    """A "7" as the Sketchpad's composite holds it: black round-brush strokes (Gradio's brush size is a
    radius), antialiased, on a transparent canvas."""
    from PIL import ImageDraw

    ss = 4
    big = Image.new("L", (canvas * ss, canvas * ss), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = (0.5 + offset[0]) * canvas * ss, (0.5 + offset[1]) * canvas * ss, radius * ss
    points = [(cx + x * scale * canvas * ss, cy + y * scale * canvas * ss)
              for x, y in ((-0.25, -0.3), (0.25, -0.3), (-0.05, 0.32))]
    draw.line(points, fill=255, width=2 * r, joint="curve")
    for x, y in points:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    strokes = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    strokes.putalpha(big.resize((canvas, canvas), Image.Resampling.LANCZOS))
    return strokes


def test_prepare_sketch_frames_a_drawing_like_the_ink_domain() -> None:
    from sklearn.datasets import load_digits

    from cdretrieval.data.demo import DEMO_SIZE, _stroke_mask, render_ink

    digits = load_digits()
    rng = np.random.default_rng(0)
    ink = [render_ink(_stroke_mask(digits.images[i], rng, DEMO_SIZE)) for i in range(12)]
    ink_stats = np.array([_stroke_stats(im) for im in ink])
    ink_fill, ink_width = float(ink_stats[:, 0].mean()), float(np.median(ink_stats[:, 3]))
    widths = []
    # a thin brush drawn large, the default brush, a wide brush drawn small in a corner, a large canvas
    for canvas, radius, scale, offset in ((400, 8, 1.2, (0.0, 0.0)), (400, 16, 1.0, (0.0, 0.0)),
                                          (400, 24, 0.5, (-0.2, 0.15)), (800, 16, 1.0, (0.05, -0.05))):
        out = prepare_sketch({"composite": _drawn_seven(canvas, radius, scale, offset)})
        assert out.mode == "RGB" and out.size == (DEMO_SIZE, DEMO_SIZE)
        a = np.asarray(out)
        assert (a[0] == 255).all() and (a[-1] == 255).all() and (a[:, 0] == 255).all() and (a[:, -1] == 255).all()
        assert a.min() == 0  # black ink on white paper
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey, like the ink images
        fill, cy, cx, width = _stroke_stats(out)
        assert abs(fill - ink_fill) <= 0.02, (radius, fill, ink_fill)  # the ink domain's 73.5 %
        assert abs(cy - (DEMO_SIZE - 1) / 2) <= 1.5 and abs(cx - (DEMO_SIZE - 1) / 2) <= 1.5  # centred
        widths.append(width)
    # the ink pen's width, whatever the brush and however large the drawing is on the canvas
    assert all(abs(w - ink_width) <= 0.25 * ink_width for w in widths), (widths, ink_width)
    assert prepare_sketch({"composite": _drawn_seven(400, 16, 1.0, (0, 0))}, size=224).size == (224, 224)


def test_ui_handler_shows_errors_in_page(served: Served) -> None:
    from app.ui import SearchService
    from cdretrieval.retrieval import Retriever

    service = SearchService(Retriever.from_run(served.run, device="cpu"))
    gallery, status, payload, *_ = service.ui_search("draw", None, {"composite": None}, "auto", [], 5)
    assert gallery == [] and "empty" in status and payload["ok"] is False
    gallery, status, payload, *_ = service.ui_search("upload", None, None, "auto", [], 5)
    assert gallery == [] and "no image" in status
    canvas = np.full((400, 400, 3), 255, np.uint8)
    canvas[100:300, 190:215] = 0  # a "1"
    gallery, status, payload, *_ = service.ui_search("draw", None, {"composite": Image.fromarray(canvas)}, "ink",
                                                     [], 4)
    assert len(gallery) == 4 and payload["target_domains"] == ["outline", "photo"] and "drawing" in status
    gallery, status, payload, *_ = service.ui_search("draw", None, {"composite": Image.fromarray(canvas)}, "auto",
                                                     [], 4)
    detected = payload["detected"]["domain"]  # a drawing is told apart like any query; it is not searched
    assert f"detected: **{detected}**" in status and detected not in payload["target_domains"]


def test_validation_helpers(tmp_path: Path) -> None:
    assert check_k(10.0) == 10 and check_k("3") == 3
    for bad in (0, 51, 2.5, "x", None, float("nan")):
        with pytest.raises(QueryInputError):
            check_k(bad)
    domains = ["ink", "outline", "photo"]
    assert resolve_domains(domains, "auto", []) == (None, None)  # None: every domain but the query's
    assert resolve_domains(domains, "ink", None) == ("ink", None)
    assert resolve_domains(domains, "ink", ["ink"]) == ("ink", ["ink"])
    assert resolve_domains(["ink"], "auto", []) == (None, ["ink"])
    with pytest.raises(QueryInputError, match="sketchy"):
        resolve_domains(domains, "sketchy", [])
    assert default_targets(domains, "photo") == ["ink", "outline"]
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 2048)
    with pytest.raises(QueryInputError, match="over the upload limit"):
        load_upload(big, max_bytes=1024)
    with pytest.raises(QueryInputError, match="no image"):
        load_upload(None, max_bytes=1024)
    assert "a: 1, b: 2" in info_markdown({"counts": {"a": 1, "b": 2}})
    shown = page_info({"data_root": "/data/my_root", "run_dir": "/srv/runs/demo", "index_dir": "/srv/runs/demo/index",
                       "domain_detection": None})
    assert shown["data_root"] == "my_root" and shown["run_dir"] == "demo" and shown["index_dir"] == "index"
    assert "unavailable" in shown["domain_detection"] and "/srv" not in info_markdown(shown)


def test_auth_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_auth("me:s3:cr3t") == ("me", "s3:cr3t")
    assert parse_auth("") is None and parse_auth(None) is None
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(ValueError):
            parse_auth(bad)
    monkeypatch.setenv("CDRETRIEVAL_AUTH", "alice:pw")
    assert resolve_auth(None) == ("alice", "pw")
    assert resolve_auth(("bob", "x")) == ("bob", "x")


def test_auth_is_enforced(app_run: Path, served: Served, free_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.server import launch_app

    monkeypatch.setenv("CDRETRIEVAL_AUTH", "alice:wonderland")
    demo = launch_app(app_run, port=free_port, prevent_thread_lock=True, device="cpu", examples_per_domain=0)
    try:
        url = str(demo.local_url)
        with httpx.Client(timeout=10) as http:
            assert http.get(f"{url}config").status_code == 401
            indexed = _query_file(served.data_root).resolve()
            assert http.get(f"{url}gradio_api/file={indexed}").status_code == 401
        authed = Client(url, auth=("alice", "wonderland"), verbose=False)
        _, result = _search(authed, _query_file(served.data_root), "ink", ["photo"], 3)
        assert len(result["results"]) == 3
    finally:
        demo.close()


def test_main_reports_missing_run_and_index(
    app_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from app.cli import main

    assert main(["--run", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "nope" in capsys.readouterr().err
    no_index = tmp_path / "run-without-index"
    no_index.mkdir()
    for name in ("checkpoint.pt", "config.yaml"):
        shutil.copy(app_run / name, no_index / name)
    assert main(["--run", str(no_index), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "index" in err and "cdretrieval index" in err, err
    with pytest.raises(SystemExit):
        main(["--help"])


def test_undecodable_upload_reaches_the_status_line(served: Served, tmp_path: Path) -> None:
    import gradio as gr

    from app.ui import tolerant_upload
    from cdretrieval.retrieval import Retriever

    image = tolerant_upload(gr.Image(type="filepath", image_mode=None, render=False))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    raw = image.preprocess(image.data_model(path=str(text), orig_name="notes.png"))
    assert raw == str(text)  # not a Gradio error: the handler explains it
    service = SearchService(Retriever.from_run(served.run, device="cpu"))
    cleared, status, name = service.on_upload(raw)
    assert cleared is None and "Error" in status and "notes.png: not a readable image" in status
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), "red").save(good)
    assert image.preprocess(image.data_model(path=str(good), orig_name="good.png")) == str(good)
    _, status, name = service.on_upload(str(good))
    assert "Ready" in status and "good.png" in name


def _file(button: Any) -> str:
    """The file a DownloadButton update holds (its value is already Gradio's file data)."""
    value = button.value
    return str(value["path"] if isinstance(value, dict) else value)


def test_result_preview_downloads_and_more_like_this(served: Served, tmp_path: Path) -> None:
    """Click a result: the original file full size (its own name); CSV/JSON downloads; "more like this"."""
    import csv

    import gradio as gr

    from cdretrieval.retrieval import Retriever

    retriever = Retriever.from_run(served.run, device="cpu")
    service = SearchService(retriever, served=served.files)  # the running server's copies
    query = str(_query_file(served.data_root, "photo", "4"))
    gallery, status, payload, rows, csv_btn, json_btn, _, _ = service.ui_search("upload", query, None, "auto", [],
                                                                                 6, "the uploaded image")
    assert "detected: **photo**" in status and len(rows) == 6
    generated = served.files.folder / "generated"  # thumbnails: files the app wrote, in the allowed folder
    assert all(isinstance(tile, str) and Path(tile).parent == generated for tile, _ in gallery)
    with open(_file(csv_btn)) as f:  # the downloads: relative paths, as the API gives them
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS and [r["path"] for r in table] == [r["file"] for r in payload["results"]]
    assert all(not Path(r["path"]).is_absolute() for r in table) and _file(csv_btn).endswith(".csv")
    assert json.loads(Path(_file(json_btn)).read_text()) == payload

    _, image, text, download, selected = service.select_result(rows, gr.SelectData(None, {"index": 2, "value": None}))
    original = Path(rows[2]["path"])
    copy = Path(image)  # the original file (the server's copy of it, in its one allowed folder), not a thumbnail
    assert served.files.folder in copy.parents and copy.read_bytes() == original.read_bytes()
    assert Path(_file(download)).read_bytes() == original.read_bytes() and download.value["orig_name"] == original.name
    assert download.label == f"Download {original.name}" and f"#3** · {rows[2]['domain']}" in text
    nothing = ServedFiles([])  # the server sends no original: its pixels only, no download
    try:
        _, image, _, download, _ = SearchService(retriever).select_result(
            rows, gr.SelectData(None, {"index": 2, "value": None}))
        assert isinstance(image, Image.Image) and download.visible is False  # no served folder: a PIL image
        _, image, _, download, _ = SearchService(retriever, served=nothing).select_result(
            rows, gr.SelectData(None, {"index": 2, "value": None}))
        assert isinstance(image, str) and Path(image).parent == nothing.folder / "generated"  # a PNG written once
        assert download.visible is False
        with Image.open(image) as shown, Image.open(original) as orig:
            assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(orig.convert("RGB")))
    finally:
        nothing.close()

    img, source, targets, _, mode, name = service.more_like_this(selected)
    assert source == rows[2]["domain"] and targets == [] and mode == "upload" and "result" in name
    assert isinstance(img, str) and Path(img).parent == generated  # its decoded pixels, as a PNG written once
    with Image.open(img) as query_png, Image.open(original) as orig:
        assert np.array_equal(np.asarray(query_png.convert("RGB")), np.asarray(orig.convert("RGB")))
    upload = tmp_path / "again.png"
    upload.write_bytes(Path(img).read_bytes())
    _, status, payload, *_ = service.ui_search("upload", str(upload), None, source, targets, 5, name)
    assert f"for the result **{rows[2]['domain']}" in status and "uploaded image" not in status
    assert payload["source"] == "given" and rows[2]["domain"] not in payload["target_domains"]


def test_port_in_use_is_reported_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from app.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--run", str(tmp_path / "not-loaded"), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == f"error: port {port} is in use; pass --port N"


def test_thumbnails_are_small_and_missing_files_get_a_tile(served: Served, tmp_path: Path) -> None:
    from app.ui import ThumbnailCache

    cache = ThumbnailCache(size=32, capacity=2)
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200), "blue").save(big)
    assert cache.get(str(big)).size == (32, 21)
    assert cache.get(str(tmp_path / "gone.png")).size == (32, 32)  # a grey tile, no exception
    cache.get(str(_query_file(served.data_root)))
    assert len(cache._items) == 2


def test_without_served_files_thumbnails_stay_images(served: Served) -> None:
    from cdretrieval.retrieval import Retriever

    service = SearchService(Retriever.from_run(served.run, device="cpu"))  # served=None: no file sent as is
    gallery, *_ = service.search(Image.open(_query_file(served.data_root)).convert("RGB"), "photo", ["ink"], 3)
    assert service.images is None and len(gallery) == 3
    assert all(isinstance(tile, Image.Image) for tile, _ in gallery)


def _stat(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _in_threads(fn: Any, n: int = 16, timeout: float = 60) -> list[Any]:
    """``fn()`` called by ``n`` threads released at once; their results (None where one did not finish)."""
    start = threading.Barrier(n)
    out: list[Any] = [None] * n

    def work(i: int) -> None:
        start.wait()
        out[i] = fn()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return out


def test_concurrent_thumbnails_are_one_complete_file_written_once(served: Served, tmp_path: Path) -> None:
    """Issue 14: many searches returning the same thumbnail at once all get the same complete file, and that
    file is never rewritten (same inode, same modification time) while it may be read — not by more threads,
    not after the in-memory cache forgets it, not by another cache writing the same image."""
    import io

    from app.ui import ImageFiles, ThumbnailCache

    original = _query_file(served.data_root)
    files = ImageFiles(tmp_path / "generated")
    cache = ThumbnailCache(size=160, capacity=1, files=files)
    got = _in_threads(lambda: cache.tile(str(original)))
    assert len(set(got)) == 1 and isinstance(got[0], str)
    thumb = Path(got[0])
    assert thumb.parent == files.folder and thumb.suffix == ".png"
    first = _stat(thumb)
    expected = io.BytesIO()
    cache.get(str(original)).save(expected, format="PNG")
    assert thumb.read_bytes() == expected.getvalue()  # complete: the whole PNG of the thumbnail
    with Image.open(thumb) as im:
        assert max(im.size) <= 160

    with open(thumb, "rb") as reader:  # a request streaming the file meanwhile
        cache.tile(str(tmp_path / "gone.png"))  # capacity 1: the original's entry is forgotten …
        again = _in_threads(lambda: cache.tile(str(original)))  # … and made again by 16 threads at once
        fresh = ThumbnailCache(size=160, files=ImageFiles(files.folder))  # another cache, same folder
        assert set(again) == {str(thumb)} and fresh.tile(str(original)) == str(thumb)
        assert _in_threads(lambda: str(files.path(Image.open(thumb)))) == [str(thumb)] * 16
        assert reader.read() == expected.getvalue()
    assert _stat(thumb) == first  # never rewritten
    assert not [p.name for p in files.folder.iterdir() if p.name.startswith(".")]  # no staging file left

    other = files.path(Image.new("RGB", (8, 8), "red"))  # another image: another file
    assert other != thumb and _stat(thumb) == first


def test_generated_images_go_to_a_subfolder_of_the_served_folder(tmp_path: Path) -> None:
    files = ServedFiles([])
    try:
        sub = files.subfolder("generated")
        assert sub == files.folder / "generated" and sub.is_dir() and files.subfolder("generated") == sub
        for bad in ("", ".", "..", "a/b", "0123456789abcdef"):  # the last: the form of a copy's folder
            with pytest.raises(ValueError):
                files.subfolder(bad)
    finally:
        files.close()
    assert not files.folder.exists()


def _serve_from_threads(files: ServedFiles, path: Path, n: int = 8) -> list[tuple[Path | None, bytes]]:
    """``n`` threads call ``files.serve(path)`` at once and read what they get."""

    def serve() -> tuple[Path | None, bytes]:
        copy = files.serve(path)
        return copy, copy.read_bytes() if copy is not None else b""

    return _in_threads(serve, n, timeout=30)


@pytest.mark.parametrize("hard_link", [True, False], ids=["hard-link", "copy"])
def test_concurrent_serves_of_a_file_all_get_the_same_complete_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hard_link: bool
) -> None:
    """Several requests at once for the same image: one path, the whole file for each (never half written);
    a copy (another filesystem, no hard links) as well as a link; a changed original is served anew."""
    if not hard_link:
        def no_link(src: object, dst: object) -> None:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    image = tmp_path / "data" / "big photo.png"  # a space: the name is kept as it is
    image.parent.mkdir()
    content = os.urandom(4 * 2**20)  # big enough for a copy to take a while
    image.write_bytes(content)
    (tmp_path / "data" / "notes.txt").write_text("NOTES")
    files = ServedFiles([image])
    try:
        got = _serve_from_threads(files, image)
        paths = {copy for copy, _ in got}
        assert len(paths) == 1 and None not in paths
        copy = next(iter(paths))
        assert copy is not None and copy.parent.parent == files.folder and copy.name == image.name
        assert all(data == content for _, data in got)
        linked = copy.stat().st_ino == image.stat().st_ino
        assert linked is (hard_link and image.stat().st_dev == files.folder.stat().st_dev)  # a link if it can be
        assert [p.name for p in copy.parent.iterdir()] == [image.name]  # no staging file left behind
        assert files.serve(tmp_path / "data" / "notes.txt") is None and files.serve(tmp_path / "data") is None

        changed = os.urandom(1000)
        replacement = tmp_path / "data" / "new.png"
        replacement.write_bytes(changed)
        os.replace(replacement, image)  # the original is replaced (a new file): its copy is made again
        assert all(data == changed for _, data in _serve_from_threads(files, image))
    finally:
        files.close()
    assert not files.folder.exists()
