"""The Gradio web UI: upload a photo or draw a sketch, get the closest images of other visual domains.

Page: an *Upload* tab (image file, with example queries taken from the indexed data) and a *Draw* tab
(white canvas, black brush); the source domain ("auto" or an indexed domain), the target domains
(default: every domain but the source), ``k`` (1–50) and a Search button; the results gallery (small
in-memory thumbnails, best score first, captions ``score · domain · class``); a status line where every
error is reported (the server keeps running); a collapsed "Model and index" panel. Clicking an example
query fills the upload, sets its domain as the source and searches.

HTTP API (for ``gradio_client``; the page's "Use via API" footer link documents it too)::

    from gradio_client import Client, handle_file

    client = Client("http://127.0.0.1:7860/")          # auth=("user", "pass") when the server has auth
    gallery, result = client.predict(
        handle_file("query.png"),  # image file: the query (any format PIL reads; ≤ the upload limit)
        "auto",                    # source_domain: "auto" or one of the indexed domains
        ["photo"],                 # target_domains: indexed domains; [] = every domain but the source
        10,                        # k: results to return, 1–50
        api_name="/search",
    )

``gallery`` is a list of ``{"image": <local path of a downloaded thumbnail>, "caption": str}``, best first;
``result`` is a dict ``{"ok": True, "source_domain": str, "target_domains": [str], "k": int,
"results": [{"rank", "score", "domain", "label", "item_id", "file"}]}`` where ``file`` is the image's path
relative to the data root (never an absolute server path) and results are sorted by score, highest first.
A bad query (not an image, empty or truncated file, over the upload limit, unknown domain, k out of range,
missing index) raises ``gradio_client.exceptions.AppError`` whose message says what is wrong (for domains
and k it is Gradio's own check, e.g. "Value: 'x' ... is not in the list of choices: [...]"); the server
carries on. Over HTTP without the client: ``POST /gradio_api/call/search`` with ``{"data": [{"path": <a
path returned by POST /gradio_api/upload>, "meta": {"_type": "gradio.FileData"}}, "auto", ["photo"], 10]}``
then ``GET /gradio_api/call/search/<event_id>`` (server-sent events).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
from PIL import Image, UnidentifiedImageError

from cdretrieval.data.images import load_image, load_image_bytes
from cdretrieval.errors import CDRetrievalError
from cdretrieval.retrieval import Retriever, SearchResult

logger = logging.getLogger(__name__)

AUTO = "auto"
K_MIN, K_MAX, K_DEFAULT = 1, 50, 10
THUMBNAIL_PX = 160  # longest side of a result thumbnail
SKETCH_CANVAS = (400, 400)
SKETCH_BRUSH_RADIUS = 16  # px on the 400 px canvas: about the stroke width of a pen sketch at 64–224 px
SKETCH_WHITE = 245  # a canvas whose every pixel is at least this bright counts as empty
SKETCH_MARGIN = 0.18  # white margin around the drawing's bounding box, as a fraction of its size
_THUMB_CACHE_SIZE = 2048

# Captions readable in full (Gradio clips them at 80% of the tile on one line).
CSS = """
#results .caption-label { max-width: 100%; white-space: normal; opacity: 0.92; font-size: 0.8rem; }
"""

TITLE = "cdretrieval — cross-domain image search"
INTRO = (
    "Upload a photo or draw a sketch, pick the domain(s) to search, and get the most similar images of "
    "*another* visual domain — matched by a model trained without any labels."
)


class QueryInputError(ValueError):
    """A problem with what the user sent (shown in the page; the server carries on)."""


def readable_decode_errors(image: gr.Image) -> gr.Image:
    """Make ``image`` report an undecodable upload as a readable message instead of Gradio's bare "Error".

    Wraps the instance's ``preprocess`` (subclassing a Gradio component would make Gradio write a
    ``.pyi`` stub next to this module).
    """
    original = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except Image.DecompressionBombError as e:  # the header claims more pixels than PIL will decode
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(f"{name}: image too large ({e}); upload a smaller image", print_exception=False) from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(f"{name}: not a readable image ({type(e).__name__}); upload a PNG, JPEG, ... file") from e

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (no Gradio state): query decoding, result formatting


def check_k(k: Any) -> int:
    """``k`` as an int in [K_MIN, K_MAX] (sliders send floats), else :class:`QueryInputError`."""
    try:
        value = float(k)
    except (TypeError, ValueError):
        raise QueryInputError(f"k must be a number between {K_MIN} and {K_MAX}, got {k!r}") from None
    if not math.isfinite(value) or value != int(value) or not K_MIN <= value <= K_MAX:
        raise QueryInputError(f"k must be a whole number between {K_MIN} and {K_MAX}, got {k!r}")
    return int(value)


def resolve_domains(
    domains: Sequence[str], source: str | None, targets: Sequence[str] | None
) -> tuple[str | None, list[str]]:
    """Validate the source ("auto"/None or an indexed domain) and targets (empty → all but the source)."""
    src = None if source in (None, "", AUTO) else str(source)
    if src is not None and src not in domains:
        raise QueryInputError(f"unknown source domain {src!r}; choose 'auto' or one of {list(domains)}")
    if isinstance(targets, str):
        targets = [targets]
    chosen = [str(t) for t in (targets or [])]
    unknown = [t for t in chosen if t not in domains]
    if unknown:
        raise QueryInputError(f"unknown target domain(s) {unknown}; the indexed domains are {list(domains)}")
    if not chosen:
        chosen = [d for d in domains if d != src] or list(domains)
    return src, list(dict.fromkeys(chosen))


def default_targets(domains: Sequence[str], source: str | None) -> list[str]:
    """Every domain except the source (all of them when the source is auto)."""
    return [d for d in domains if d != source] if source not in (None, "", AUTO) else list(domains)


def load_upload(path: str | os.PathLike[str] | None, max_bytes: int, display_name: str | None = None) -> Image.Image:
    """Decode an uploaded file as RGB; errors name the file as the user knows it, never the server path."""
    if path is None or str(path) == "":
        raise QueryInputError("no image: upload an image file (or draw in the Draw tab) first")
    p = Path(path)
    name = display_name or p.name
    try:
        size = p.stat().st_size
    except OSError:
        raise QueryInputError(f"{name}: the upload could not be read; upload it again") from None
    if size > max_bytes:
        raise QueryInputError(f"{name}: {size / 2**20:.1f} MB is over the upload limit of {max_bytes / 2**20:.0f} MB")
    try:
        return load_image_bytes(p.read_bytes(), name=name)
    except CDRetrievalError as e:
        raise QueryInputError(str(e).replace(str(p), name)) from None


def prepare_sketch(value: Any) -> Image.Image:
    """The drawing of a Sketchpad value (composite on white), cropped to its strokes with a white margin.

    Raises :class:`QueryInputError` when nothing was drawn (all white or transparent).
    """
    img = value.get("composite") if isinstance(value, dict) else value
    if img is None:
        raise QueryInputError("the canvas is empty: draw something in the Draw tab first")
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img.astype(np.uint8))
    if not isinstance(img, Image.Image):
        raise QueryInputError(f"unexpected sketch value of type {type(img).__name__}")
    if img.mode in ("RGBA", "LA", "PA", "P"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    grey = np.asarray(img.convert("L"))
    ink = grey < SKETCH_WHITE
    if not ink.any():
        raise QueryInputError("the canvas is empty: draw something in the Draw tab first")
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    side = max(bottom - top, right - left)
    side = math.ceil(side * (1 + 2 * SKETCH_MARGIN))
    square = Image.new("RGB", (side, side), "white")
    crop = img.convert("RGB").crop((left, top, right, bottom))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


def display_file(path: str, data_root: str | None) -> str:
    """An item's path as shown to users: relative to the data root when under it, else its last parts."""
    p = Path(path)
    if data_root:
        try:
            return p.resolve().relative_to(Path(data_root).resolve()).as_posix()
        except (ValueError, OSError):
            pass
    return Path(*p.parts[-3:]).as_posix() if len(p.parts) >= 3 else p.name


def caption(r: SearchResult) -> str:
    """``score · domain · class`` (class only when known); the rank is the gallery order."""
    parts = [f"{r.score:.3f}", r.domain]
    if r.label is not None:
        parts.append(str(r.label))
    return " · ".join(parts)


def sort_results(results: Sequence[SearchResult]) -> list[SearchResult]:
    """Highest score first (stable), ranks renumbered 1..n to match the order shown."""
    ordered = sorted(results, key=lambda r: -float(r.score))
    return [r if r.rank == i else dataclasses.replace(r, rank=i) for i, r in enumerate(ordered, start=1)]


def _placeholder(size: int = THUMBNAIL_PX, grey: int = 200) -> Image.Image:
    return Image.new("RGB", (size, size), (grey, grey, grey))


class ThumbnailCache:
    """Small RGB thumbnails of indexed images, kept in memory (LRU); a missing file gets a grey tile."""

    def __init__(self, size: int = THUMBNAIL_PX, capacity: int = _THUMB_CACHE_SIZE) -> None:
        self.size = size
        self.capacity = capacity
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()  # searches run in several worker threads

    def get(self, path: str) -> Image.Image:
        with self._lock:
            thumb = self._items.get(path)
            if thumb is not None:
                self._items.move_to_end(path)
                return thumb
        try:
            img = load_image(path)
            img.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
            thumb = img
        except CDRetrievalError as e:
            logger.warning("cannot make a thumbnail of an indexed image: %s", e)
            thumb = _placeholder(self.size)
        with self._lock:
            self._items[path] = thumb
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return thumb


def info_markdown(info: dict[str, Any]) -> str:
    """``Retriever.info()`` as a Markdown list (nested dicts as ``key: value, ...``)."""

    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return ", ".join(fmt(x) for x in v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
        text = str(v).replace("`", "'")
        return f"`{text}`"  # paths and names verbatim (no Markdown emphasis)

    return "\n".join(f"- **{str(k).replace('_', ' ')}**: {fmt(v)}" for k, v in info.items())


def _md_escape(text: str) -> str:
    for ch in "\\`*_[]<>#|":
        text = text.replace(ch, "\\" + ch)
    return text


# ---------------------------------------------------------------------------------------------------------
# The app


class SearchService:
    """What the page's events call: query → sorted results, thumbnails, JSON. Thread-safe for reads."""

    def __init__(self, retriever: Retriever, max_upload_mb: int = 10) -> None:
        if max_upload_mb < 1:
            raise ValueError(f"max_upload_mb must be ≥ 1, got {max_upload_mb}")
        self.retriever = retriever
        self.domains = list(retriever.domains)
        self.max_bytes = int(max_upload_mb) * 2**20
        info = retriever.info()
        root = info.get("data_root") or info.get("data root")
        self.data_root = str(root) if root else None
        self.thumbnails = ThumbnailCache()

    def search(
        self, query: Image.Image, source: str | None, targets: Sequence[str] | None, k: Any
    ) -> tuple[list[tuple[Image.Image, str]], dict[str, Any]]:
        kk = check_k(k)
        src, tgts = resolve_domains(self.domains, source, targets)
        results = sort_results(self.retriever.search(query, target_domain=tgts, k=kk, source_domain=src))
        gallery = [(self.thumbnails.get(r.path), caption(r)) for r in results]
        payload = {
            "ok": True,
            "source_domain": src or AUTO,
            "target_domains": tgts,
            "k": kk,
            "results": [
                {
                    "rank": r.rank,
                    "score": round(float(r.score), 6),
                    "domain": r.domain,
                    "label": r.label,
                    "item_id": int(r.item_id),
                    "file": display_file(r.path, self.data_root),
                }
                for r in results
            ],
        }
        return gallery, payload

    # -- event handlers -------------------------------------------------------------------------------
    def api_search(
        self, image_file: str | None, source_domain: str, target_domains: list[str] | None, k: float
    ) -> tuple[list[tuple[Image.Image, str]], dict[str, Any]]:
        """The ``/search`` endpoint: errors raise ``gr.Error`` (the client's ``AppError``)."""
        try:
            query = load_upload(image_file, self.max_bytes)
            return self.search(query, source_domain, target_domains, k)
        except (QueryInputError, CDRetrievalError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:
            logger.exception("search failed")
            raise gr.Error(f"internal error ({type(e).__name__}); see the server log") from None

    def ui_search(
        self, mode: str, upload: str | None, sketch: Any, source: str, targets: list[str] | None, k: float
    ) -> tuple[list[tuple[Image.Image, str]], str, dict[str, Any]]:
        """The Search button: errors go to the status line and a toast, with an empty gallery."""
        try:
            query = prepare_sketch(sketch) if mode == "draw" else load_upload(upload, self.max_bytes)
            gallery, payload = self.search(query, source, targets, k)
        except (QueryInputError, CDRetrievalError) as e:
            return self._error(str(e))
        except Exception as e:
            logger.exception("search failed")
            return self._error(f"internal error ({type(e).__name__}); see the server log")
        what = "your drawing" if mode == "draw" else "the uploaded image"
        status = (
            f"{len(gallery)} result(s) for {what} in **{', '.join(payload['target_domains'])}** "
            f"(source: {payload['source_domain']}), best first — captions: cosine similarity · domain · class."
        )
        return gallery, status, payload

    @staticmethod
    def _error(message: str) -> tuple[list[tuple[Image.Image, str]], str, dict[str, Any]]:
        gr.Warning(message)
        return [], f"⚠️ **Error:** {_md_escape(message)}", {"ok": False, "error": message}


@dataclasses.dataclass(frozen=True)
class Example:
    """An indexed image offered as a clickable example query."""

    path: str
    domain: str
    label: str | None


def example_queries(retriever: Retriever, per_domain: int) -> list[Example]:
    """``per_domain`` indexed images of each domain (deterministic), existing files only."""
    out: list[Example] = []
    if per_domain < 1:
        return out
    for domain in retriever.domains:
        try:
            items = retriever.example_items(domain, per_domain)
        except CDRetrievalError as e:
            logger.warning("no examples for domain %r: %s", domain, e)
            continue
        for item in items:
            path = retriever.resolve_item_path(item.path)
            if path is not None and Path(path).is_file():
                out.append(Example(str(path), domain, item.label))
    return out


def build_app(retriever: Retriever, *, max_upload_mb: int = 10, examples_per_domain: int = 3) -> gr.Blocks:
    """The page for ``retriever`` (see the module docstring for the layout and the ``/search`` API)."""
    service = SearchService(retriever, max_upload_mb)
    domains = service.domains
    examples = example_queries(retriever, examples_per_domain)

    with gr.Blocks(title="cdretrieval", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        mode = gr.State("upload")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                with gr.Tabs(selected="upload") as tabs:
                    with gr.Tab("Upload an image", id="upload") as upload_tab:
                        upload = gr.Image(
                            label=f"Query image (≤ {max_upload_mb} MB)",
                            type="filepath",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            format="png",  # lossless copies of example queries
                            height=280,
                            elem_id="query-upload",
                        )
                        readable_decode_errors(upload)
                    with gr.Tab("Draw a sketch", id="draw") as draw_tab:
                        sketch = gr.Sketchpad(
                            label="Draw with the mouse (black on white)",
                            value=Image.new("RGB", SKETCH_CANVAS, "white"),  # white paper, not transparent
                            type="pil",
                            image_mode="RGB",
                            canvas_size=SKETCH_CANVAS,
                            fixed_canvas=True,
                            brush=gr.Brush(default_size=SKETCH_BRUSH_RADIUS, colors=["#000000"], color_mode="fixed"),
                            layers=False,
                            transforms=(),
                            height=420,
                            elem_id="query-sketch",
                        )
                source = gr.Dropdown(
                    choices=[AUTO, *domains], value=AUTO, label="Query domain",
                    info="What the query is (auto: don't say)", elem_id="source-domain",
                )
                targets = gr.CheckboxGroup(
                    choices=domains, value=default_targets(domains, AUTO), label="Search in",
                    info="Domains to return images from (none ticked: all but the query's)",
                    elem_id="target-domains",
                )
                k = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="Number of results (k)", elem_id="k")
                search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                example_set = gr.Dataset(
                    components=[gr.Image(visible=False, render=False)],
                    samples=[[e.path] for e in examples],
                    type="index",
                    layout="gallery",
                    samples_per_page=max(len(examples), 1),
                    label="Example queries from the indexed images: click one to search with it",
                    visible=bool(examples),
                    elem_id="examples",
                )
            with gr.Column(scale=3, min_width=360):
                status = gr.Markdown("Upload an image or draw a sketch, then press **Search**.",
                                     elem_id="status")
                gallery = gr.Gallery(
                    label="Results",
                    show_label=False,
                    columns=5, height="auto", object_fit="contain", format="png",
                    allow_preview=True, elem_id="results",
                )
                with gr.Accordion("Raw results (JSON)", open=False):
                    result_json = gr.JSON(label="Results", elem_id="result-json")
        with gr.Accordion("Model and index", open=False, elem_id="model-info"):
            gr.Markdown(info_markdown(retriever.info()))

        # Hidden input of the public API: an image *file* (decoded by us, with clear errors).
        api_file = gr.File(label="image", file_types=["image"], visible=False, elem_id="api-file")
        api_button = gr.Button(visible=False)

        def pick_example(index: int) -> tuple[Any, ...]:
            ex = examples[int(index)]
            try:
                img: Image.Image | None = load_image(ex.path)
            except CDRetrievalError:
                img = None
            return img, ex.domain, default_targets(domains, ex.domain), gr.Tabs(selected="upload"), "upload"

        example_set.click(
            pick_example, example_set, [upload, source, targets, tabs, mode], api_visibility="private", queue=False
        ).then(
            service.ui_search, [mode, upload, sketch, source, targets, k], [gallery, status, result_json],
            api_visibility="private", concurrency_id="search",
        )
        upload_tab.select(lambda: "upload", None, mode, api_visibility="private", queue=False)
        draw_tab.select(lambda: "draw", None, mode, api_visibility="private", queue=False)
        source.change(
            lambda s: gr.update(value=default_targets(domains, s)), source, targets,
            api_visibility="private", queue=False,
        )
        search_btn.click(
            service.ui_search, [mode, upload, sketch, source, targets, k], [gallery, status, result_json],
            api_visibility="private", concurrency_id="search",
        )
        api_button.click(
            service.api_search, [api_file, source, targets, k], [gallery, result_json],
            api_name="search", concurrency_id="search",
            api_description="Query image file → top-k images of the target domains (see app.ui docstring).",
        )
    return demo


__all__ = [
    "AUTO",
    "CSS",
    "K_DEFAULT",
    "K_MAX",
    "K_MIN",
    "Example",
    "QueryInputError",
    "SearchService",
    "ThumbnailCache",
    "build_app",
    "caption",
    "check_k",
    "default_targets",
    "example_queries",
    "info_markdown",
    "load_upload",
    "prepare_sketch",
    "readable_decode_errors",
    "resolve_domains",
    "sort_results",
]
