"""The Gradio web UI: upload a photo or draw a sketch, get the closest images of the *other* visual domains.

Page (top to bottom on a phone, two columns on a desktop):

* the query — an *Upload* tab (image file) and a *Draw* tab (white canvas, black brush; the drawing is
  redrawn as an ``ink`` image of the demo, :func:`prepare_sketch`) — the query domain ("auto": detected by
  the index's domain detector; or an indexed domain), the domains to search (none
  ticked: every domain but the query's), ``k`` (1–50) and a Search button;
* a status line — what was searched ("detected: ink (0.97)", the domains searched) or what went wrong; an
  error stays there until the next search (no fading toasts);
* the results — thumbnails ranked by per-domain calibrated score (:func:`cdretrieval.retrieval.merge_calibrated`),
  captions ``domain · class · cosine`` under the image (files the app writes once each, :class:`ImageFiles`,
  when the server sends files; never PIL images that Gradio would rewrite in place while sending them);
  clicking one opens it full size (the original indexed file — the server's copy of it,
  :class:`app.server.ServedFiles` — downloadable under its own name; its decoded pixels and no download when
  the server sends no files) with a **More like this** button that searches with it (its domain known); the
  results as CSV or JSON downloads; the raw JSON;
* labelled example queries (``domain · class``) from the indexed images: a click searches with one;
* a collapsed "Model and index" panel (paths relative to the data root / run, never absolute server paths).

HTTP API (for ``gradio_client``; the page's "Use via API" footer link documents it too)::

    from gradio_client import Client, handle_file

    client = Client("http://127.0.0.1:7860/")          # auth=("user", "pass") when the server has auth
    gallery, result = client.predict(
        handle_file("query.png"),  # image file: the query (any format PIL reads; ≤ the upload limit)
        "auto",                    # source_domain: "auto" (detect it) or one of the indexed domains
        [],                        # target_domains: indexed domains; [] = every domain but the query's
        10,                        # k: results to return, 1–50
        api_name="/search",
    )

``gallery`` is a list of ``{"image": <local path of a downloaded thumbnail>, "caption": str}``, best first;
``result`` is a dict ``{"ok": True, "query": str, "source_domain": str | None, "source": "given" | "detected"
| "unknown", "detected": {"domain", "confidence", "probabilities"} | None, "target_domains": [str], "k": int,
"results": [{"rank", "score", "calibrated_score", "domain", "label", "item_id", "file"}]}`` where ``file``
is the image's path relative to the data root (never an absolute server path), ``score`` the cosine
similarity and results are ranked by ``calibrated_score`` (per target domain, a z-score of the query's
similarities; with one target domain the order is that of ``score``). ``source`` is "unknown" (and
``source_domain`` null) when "auto" was asked of an index built without a domain detector: every domain is
then searched. A bad query (not an image, empty or truncated file, over the upload limit, unknown domain,
k out of range, missing index) raises ``gradio_client.exceptions.AppError`` whose message says what is
wrong (for domains and k it is Gradio's own check, e.g. "Value: 'x' ... is not in the list of choices:
[...]"); the server carries on. Over HTTP without the client: ``POST /gradio_api/call/search`` with
``{"data": [{"path": <a path returned by POST /gradio_api/upload>, "meta": {"_type": "gradio.FileData"}},
"auto", [], 10]}`` then ``GET /gradio_api/call/search/<event_id>`` (server-sent events).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
from PIL import Image, UnidentifiedImageError

from cdretrieval.data.images import check_image_header, load_image, load_image_bytes
from cdretrieval.errors import CDRetrievalError, ImageLoadError
from cdretrieval.retrieval import AUTO, Retriever, SearchResponse, SearchResult

if TYPE_CHECKING:  # app.server imports this module
    from app.server import ServedFiles

logger = logging.getLogger(__name__)

K_MIN, K_MAX, K_DEFAULT = 1, 50, 10
THUMBNAIL_PX = 160  # longest side of a result thumbnail
SKETCH_CANVAS = (400, 400)
SKETCH_BRUSH_RADIUS = 16  # px on the 400 px canvas: about the stroke width of a pen sketch at 64–224 px
SKETCH_WHITE = 245  # a canvas whose every pixel is at least this bright counts as empty
SKETCH_MARGIN = 0.18  # white margin around the drawing's bounding box, as a fraction of its size
# A drawing is redrawn as a pen stroke like the demo's ``ink`` domain (cdretrieval/data/demo.py): its centre
# line, smoothed, redrawn with a round pen of a fixed width relative to the image, centred, its longer side
# SKETCH_FILL of the image. Sizes are at 128 px and scale with the image.
SKETCH_FILL = 1 / (1 + 2 * SKETCH_MARGIN)  # 0.735: the longer side of the drawing / the image side
SKETCH_PEN_RADIUS = 4.0  # px at 128 px (the ink domain's pen), whatever the brush and the drawing's size
SKETCH_PEN_BLUR = 0.8  # px at 128 px: the soft edge of the ink domain's pen
SKETCH_SMOOTHING = 0.05  # Gaussian sigma of the centre line's smoothing, as a fraction of the drawing's size
SKETCH_SIZE = 128  # side of the prepared query when the model's input size is not known
_SKETCH_WORK = 4  # the centre line is traced at this multiple of the output resolution
_THUMB_CACHE_SIZE = 2048
RESULT_FILES_KEPT = 256  # per-search CSV/JSON download folders kept on disk (oldest removed first)
UPLOADED = "the uploaded image"
DRAWING = "your drawing"

# Captions under the thumbnails, not over them (Gradio overlays them on the image's bottom edge, clips them
# at 80% of the tile and fades them on hover); the selected result's in bold; 3 tiles to a row on a phone.
CSS = """
#results .thumbnail-item, #examples .thumbnail-item { display: flex; flex-direction: column; height: auto; }
#results .thumbnail-item img, #examples .thumbnail-item img { flex: 1 1 auto; min-height: 0; }
#results .caption-label, #examples .caption-label {
  position: static; max-width: 100%; width: 100%; white-space: normal; overflow: visible; margin: 0;
  padding: 2px 4px; font-size: 0.78rem; line-height: 1.25; text-align: center; border-radius: 0;
  background: var(--block-background-fill); color: var(--body-text-color); box-shadow: none;
  transform: none;
}
#results .thumbnail-item:hover .caption-label, #examples .thumbnail-item:hover .caption-label { opacity: 1; }
#results .thumbnail-item.selected .caption-label { font-weight: 600; }
#results .grid-wrap.fixed-height, #examples .grid-wrap.fixed-height { min-height: 0; max-height: none; }
#status { min-height: 2.6em; }
#status .error-line { color: var(--error-text-color, #b91c1c); }
#preview-original img { object-fit: contain; }
@media (max-width: 640px) {
  #examples .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
  #results .grid-container { grid-template-columns: repeat(3, minmax(0, 1fr)) !important; }
}
"""

#: After a search: bring the status line and results into view when they are off-screen (phones; an example
#: clicked below the results).
SCROLL_TO_RESULTS_JS = """
() => {
  const el = document.querySelector('#status');
  if (!el) return;
  const top = el.getBoundingClientRect().top;
  if (top < 0 || top > window.innerHeight * 0.5) el.scrollIntoView({behavior: 'smooth', block: 'start'});
}
"""
#: After an upload: show the status line only when it reports an error (else the Search button matters).
SCROLL_TO_ERROR_JS = SCROLL_TO_RESULTS_JS.replace(
    "if (!el) return;", "if (!el || !el.innerText.includes('Error')) return;"
)

TITLE = "cdretrieval — cross-domain image search"
INTRO = (
    "Upload a photo or draw a sketch and get the most similar images of the *other* visual domains — "
    "matched by a model trained without any labels. The query's domain is detected (or say it yourself)."
)


class QueryInputError(ValueError):
    """A problem with what the user sent (shown in the page; the server carries on)."""


def tolerant_upload(image: gr.Image) -> gr.Image:
    """Let an undecodable upload reach the event handler as its raw file path, to be reported in the status
    line, instead of failing the event in Gradio (a bare "Error" badge on the component and a toast).

    Wraps the instance's ``preprocess`` (subclassing a Gradio component would make Gradio write a ``.pyi``
    stub next to this module). The handlers decode uploads themselves (:func:`load_upload`).
    """
    original = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original(payload)
        except (Image.DecompressionBombError, UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            path = getattr(payload, "path", None)
            return str(path) if path else None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _editor_sources(editor: gr.Sketchpad, payload: Any) -> list[Any]:
    """The image files or bytes of a Sketchpad payload: background, layers, composite (blobs when sent so)."""
    parts: Any = payload
    if getattr(payload, "id", None) is not None:
        parts = editor.blob_storage.get(payload.id)
        if parts is None:
            return []
    sources = [getattr(parts, "background", None), *(getattr(parts, "layers", None) or []),
               getattr(parts, "composite", None)]
    out: list[bytes | str] = []
    for src in sources:
        if isinstance(src, (bytes, bytearray, memoryview)):
            out.append(bytes(src))
        elif getattr(src, "path", None):
            out.append(str(src.path))
    return out


def guarded_sketch(editor: gr.Sketchpad) -> gr.Sketchpad:
    """Check every image of a sketch from its header (pixel count and bit depth) *before* Gradio decodes it.

    An oversized drawing (e.g. an 11000 × 11000 PNG sent as the sketch) reaches the handler as
    ``{"error": message}`` (reported by :func:`prepare_sketch`) without a pixel being allocated. Wraps the
    instance's ``preprocess``, as :func:`tolerant_upload` does.
    """
    original = editor.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None:
            return original(payload)
        try:
            for source in _editor_sources(editor, payload):
                check_image_header(source, name="the sketch")
        except ImageLoadError as e:
            return {"error": str(e)}
        return original(payload)

    editor.preprocess = preprocess  # type: ignore[method-assign]
    return editor


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
) -> tuple[str | None, list[str] | None]:
    """Validate the source ("auto"/None → None, or an indexed domain) and the targets.

    Returns ``(source, targets)`` where ``targets`` None means "every domain but the query's" (given, or
    detected by the retriever). An index of a single domain searches that domain.
    """
    src = None if source in (None, "", AUTO) else str(source)
    if src is not None and src not in domains:
        raise QueryInputError(f"unknown source domain {src!r}; choose 'auto' or one of {list(domains)}")
    if isinstance(targets, str):
        targets = [targets]
    chosen = [str(t) for t in (targets or [])]
    unknown = [t for t in chosen if t not in domains]
    if unknown:
        raise QueryInputError(f"unknown target domain(s) {unknown}; the indexed domains are {list(domains)}")
    if chosen:
        return src, list(dict.fromkeys(chosen))
    if len(domains) == 1:
        return src, list(domains)
    return src, None


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


def _disc(radius: float) -> np.ndarray:
    r = int(radius) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray((xx**2 + yy**2) <= radius * radius)


def _ridge(blob: np.ndarray, min_depth: float = 1.5) -> tuple[np.ndarray, float]:
    """The centre line of a stroke mask (the ridge of its distance transform) and the stroke's median
    half-width; ridge points shallower than ``min_depth`` or half the median half-width (corner spurs) are
    dropped."""
    from scipy import ndimage as ndi

    dist = ndi.distance_transform_edt(blob)
    ridge = blob & (dist >= ndi.maximum_filter(dist, size=3) - 0.5)
    half = float(np.median(dist[ridge])) if ridge.any() else 0.0
    return ridge & (dist >= max(min_depth, 0.5 * half)), half


def prepare_sketch(value: Any, size: int = SKETCH_SIZE) -> Image.Image:
    """The drawing of a Sketchpad value redrawn as the demo's ``ink`` domain draws a digit: a ``size`` px
    RGB image, white paper, the drawing's centre line (smoothed) redrawn with a round black pen of a fixed
    width (:data:`SKETCH_PEN_RADIUS` at 128 px, soft edge), centred, its longer side :data:`SKETCH_FILL`
    of the image.

    The brush width and how large the drawing is on the canvas therefore do not change the query: cropped
    as drawn, a brush 16 px in radius gave strokes 5 to 21 px wide at 128 px (ink: about 10), and the
    polygonal corners of a mouse drawing made the domain detector call it ``photo`` (see docs/ui.md).
    The composite is flattened on white (transparent = paper). Raises :class:`QueryInputError` when nothing
    was drawn (all white or transparent).
    """
    from scipy import ndimage as ndi

    if isinstance(value, dict) and isinstance(value.get("error"), str):  # refused by guarded_sketch
        raise QueryInputError(value["error"])
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
    dark = 1.0 - grey[top:bottom, left:right].astype(np.float32) / 255.0
    dark = dark / max(float(dark.max()), 1e-6)  # a grey pen counts as black
    k = size / 128
    # Scale the drawing so that its centre line spans what the ink pen leaves inside the framed digit.
    _, half = _ridge(dark > 0.5, min_depth=0.0)
    span = max(bottom - top, right - left) - 2 * half
    target = (SKETCH_FILL * size - 2 * (SKETCH_PEN_RADIUS + SKETCH_PEN_BLUR) * k) * _SKETCH_WORK
    scale = target / max(span, 1.0)
    w, h = max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))
    pad = math.ceil(0.2 * target)
    blob = np.zeros((h + 2 * pad, w + 2 * pad), dtype=bool)
    small = Image.fromarray((dark * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    blob[pad : pad + h, pad : pad + w] = np.asarray(small) > 127
    if not blob.any():  # a hairline shrunk away: keep every touched pixel
        blob[pad : pad + h, pad : pad + w] = np.asarray(small) > 0
    # Round the corners of a mouse drawing (thicken, blur, threshold), then trace its centre line.
    sigma = SKETCH_SMOOTHING * target
    thick = ndi.binary_dilation(blob, structure=_disc(0.5 * sigma))
    smooth = ndi.gaussian_filter(thick.astype(np.float32), sigma) > 0.5
    ridge, _ = _ridge(smooth if smooth.any() else thick)
    if not ridge.any():  # a dot
        ridge = smooth if smooth.any() else thick
    # Down to the output resolution (a pixel is on when its block holds a ridge pixel), then the ink pen.
    n = _SKETCH_WORK
    hh, ww = -(-ridge.shape[0] // n), -(-ridge.shape[1] // n)
    blocks = np.zeros((hh * n, ww * n), dtype=bool)
    blocks[: ridge.shape[0], : ridge.shape[1]] = ridge
    line = blocks.reshape(hh, n, ww, n).any(axis=(1, 3))
    stroke = ndi.binary_dilation(line, structure=_disc(SKETCH_PEN_RADIUS * k))
    m = np.clip(ndi.gaussian_filter(stroke.astype(np.float32), SKETCH_PEN_BLUR * k) * 1.6, 0.0, 1.0)
    # Frame it as the ink domain does: centred, the longer side SKETCH_FILL of the image.
    ys, xs = np.nonzero(m > 0.05)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    fit = SKETCH_FILL * size / max(bottom - top, right - left)
    crop = Image.fromarray((m[top:bottom, left:right] * 255).round().astype(np.uint8))
    crop = crop.resize((max(1, round((right - left) * fit)), max(1, round((bottom - top) * fit))),
                       Image.Resampling.BILINEAR)
    framed = Image.new("L", (size, size), 0)
    framed.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return Image.fromarray(255 - np.asarray(framed)).convert("RGB")


def display_file(path: str, data_root: str | None) -> str:
    """An item's path as shown to users: relative to the data root when under it, else its last parts."""
    p = Path(path)
    if data_root:
        try:
            return p.resolve().relative_to(Path(data_root).resolve()).as_posix()
        except (ValueError, OSError):
            pass
    return Path(*p.parts[-3:]).as_posix() if len(p.parts) >= 3 else p.name


def short_label(domain: str, label: str | None) -> str:
    """``domain · class`` (the domain alone when the class is unknown)."""
    return f"{domain} · {label}" if label is not None else domain


def caption(r: SearchResult) -> str:
    """``domain · class · cosine`` (class only when known); the rank is the gallery order."""
    return f"{short_label(r.domain, r.label)} · {r.score:.3f}"


def _placeholder(size: int = THUMBNAIL_PX, grey: int = 200) -> Image.Image:
    return Image.new("RGB", (size, size), (grey, grey, grey))


class ImageFiles:
    """Images the app generates (result thumbnails, the query made of an indexed image), as PNG files that
    Gradio sends — never as PIL images handed to Gradio.

    Why: Gradio saves a returned PIL image (or array) to a file named by the hash of its bytes and writes that
    file *in place* every time; two searches returning the same thumbnail then rewrote the file while another
    request was sending it, and the client got a cut answer (``peer closed connection without sending complete
    message body``; server: ``Too little data for declared Content-Length``) — issue 14. Here each image is
    named by the sha256 of its PNG bytes, written once under a unique temporary name in the same folder and
    renamed into place (``os.replace``); a file that exists is reused, never truncated or rewritten, so a
    reader always sees the one complete file. Gradio copies a returned path into its cache the same way
    (staged, then renamed).

    Disk use is bounded by the index: the images written are one thumbnail per indexed item shown, one grey
    tile, and one decoded copy per indexed item used as a query; the same image is written once. The folder
    is one the server sends from (:meth:`app.server.ServedFiles.subfolder`) and goes with it.
    """

    SUFFIX = ".png"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # check-then-rename of a final name: one writer at a time

    def path(self, img: Image.Image) -> Path:
        """The file of ``img`` (PNG), written if it is not there yet. Raises OSError (disk full, folder gone)."""
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return self.write(buf.getvalue())

    def write(self, data: bytes) -> Path:
        """``<folder>/<sha256(data)[:32]>.png``: written atomically the first time, afterwards reused as it is."""
        final = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}{self.SUFFIX}"
        if final.is_file():  # complete (only ever renamed into place) and never rewritten
            return final
        staging = self.folder / f".{uuid.uuid4().hex}.part"  # unique: concurrent writers never share one
        try:
            with open(staging, "xb") as f:
                f.write(data)
            with self._lock:
                if not final.exists():  # another thread may have published it meanwhile: keep that file
                    os.replace(staging, final)
        finally:
            staging.unlink(missing_ok=True)
        return final


_V = TypeVar("_V")


class ThumbnailCache:
    """Small RGB thumbnails of indexed images (LRU, ``capacity`` entries); a missing file gets a grey tile.

    Without ``files``: the thumbnails are kept in memory as PIL images (:meth:`get`, and :meth:`tile`).
    With ``files`` (:class:`ImageFiles`): :meth:`tile` gives the path of the thumbnail's file, written once;
    only the paths are kept in memory.
    """

    def __init__(
        self, size: int = THUMBNAIL_PX, capacity: int = _THUMB_CACHE_SIZE, files: ImageFiles | None = None
    ) -> None:
        self.size = size
        self.capacity = capacity
        self.files = files
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._paths: OrderedDict[str, str] = OrderedDict()  # indexed image → its thumbnail file (with files)
        self._lock = threading.Lock()  # searches run in several worker threads

    def _make(self, path: str) -> Image.Image:
        try:
            img = load_image(path)
            img.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
            return img
        except CDRetrievalError as e:
            logger.warning("cannot make a thumbnail of an indexed image: %s", e)
            return _placeholder(self.size)

    def _recall(self, table: OrderedDict[str, _V], path: str) -> _V | None:
        """``table[path]`` marked most recently used, or None when it is not there."""
        with self._lock:
            value = table.get(path)
            if value is not None:
                table.move_to_end(path)
            return value

    def _remember(self, table: OrderedDict[str, _V], path: str, value: _V) -> _V:
        """``value`` stored as ``table[path]``, the least recently used entries dropped beyond ``capacity``."""
        with self._lock:
            table[path] = value
            while len(table) > self.capacity:
                table.popitem(last=False)
        return value

    def get(self, path: str) -> Image.Image:
        """The thumbnail's pixels (kept in memory)."""
        thumb = self._recall(self._items, path)
        return thumb if thumb is not None else self._remember(self._items, path, self._make(path))

    def tile(self, path: str) -> str | Image.Image:
        """What a gallery shows for ``path``: the thumbnail's file with ``files``, else its pixels (also when
        the file cannot be written: logged)."""
        if self.files is None:
            return self.get(path)
        file = self._recall(self._paths, path)
        if file is not None:
            return file
        thumb = self._make(path)
        try:
            file = str(self.files.path(thumb))
        except OSError as e:
            logger.warning("cannot write a thumbnail file: %s", e)
            return thumb
        return self._remember(self._paths, path, file)


def _relative_to(path: str | None, base: str | None) -> str | None:
    """``path`` relative to ``base`` when under it, else just its last component (None stays None)."""
    if not path:
        return None
    p = Path(path)
    if base:
        try:
            rel = p.resolve().relative_to(Path(base).resolve()).as_posix()
            return rel or "."
        except (ValueError, OSError):
            pass
    return p.name or str(p)


def page_info(info: dict[str, Any]) -> dict[str, Any]:
    """``Retriever.info()`` as shown on the page: the data root and run by folder name, the index folder
    relative to the run, the domain detector in words — no absolute server path."""
    out = dict(info)
    run = info.get("run_dir")
    out["data_root"] = _relative_to(info.get("data_root"), None)
    out["run_dir"] = _relative_to(run, None)
    out["index_dir"] = _relative_to(info.get("index_dir"), run)
    detection = info.get("domain_detection")
    if detection is None:
        out["domain_detection"] = "unavailable (index built without a detector): 'auto' searches every domain"
    else:
        acc = detection.get("holdout_accuracy")
        held = f"held-out accuracy {acc:.3f}" if acc is not None else "no held-out accuracy"
        out["domain_detection"] = f"{detection.get('feature')} features, {held}"
    return out


def info_markdown(info: dict[str, Any]) -> str:
    """An info dict as a Markdown list (nested dicts as ``key: value, ...``)."""

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


def describe_source(payload: dict[str, Any]) -> str:
    """The status line's account of the query's domain: detected (with confidence), given, or unknown."""
    detected = payload.get("detected")
    if detected is not None:
        return f"detected: **{_md_escape(detected['domain'])}** ({detected['confidence']:.2f})"
    if payload.get("source") == "given":
        return f"query domain: **{_md_escape(str(payload['source_domain']))}**"
    return "query domain: unknown (this index has no domain detector, so every domain was searched)"


CSV_COLUMNS = ("rank", "score", "calibrated_score", "domain", "class", "path")


def results_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The payload's result rows as CSV: rank, score, calibrated_score, domain, class, path (relative)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        writer.writerow([r["rank"], r["score"], r.get("calibrated_score"), r["domain"], r.get("label") or "",
                         r["file"]])
    return buf.getvalue()


class ResultFiles:
    """The CSV and JSON download of each search, in a private temporary folder (removed at exit).

    Each search gets its own sub-folder (so the files keep plain names); the oldest beyond ``keep`` go.
    """

    def __init__(self, keep: int = RESULT_FILES_KEPT) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cdretrieval-results-"))
        self.keep = keep
        self._lock = threading.Lock()
        self._folders: list[Path] = []
        weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def write(self, payload: dict[str, Any]) -> tuple[str, str]:
        """``(csv_path, json_path)`` of ``payload`` (its ``results`` rows; the JSON is the whole payload)."""
        folder = self.root / uuid.uuid4().hex[:16]
        folder.mkdir()
        csv_path = folder / "cdretrieval_results.csv"
        json_path = folder / "cdretrieval_results.json"
        csv_path.write_text(results_csv(payload["results"]), encoding="utf-8")
        json_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with self._lock:
            self._folders.append(folder)
            old, self._folders = self._folders[: -self.keep], self._folders[-self.keep :]
        for f in old:
            shutil.rmtree(f, ignore_errors=True)
        return str(csv_path), str(json_path)


# ---------------------------------------------------------------------------------------------------------
# The app


@dataclasses.dataclass(frozen=True)
class Example:
    """An indexed image offered as a clickable example query."""

    path: str
    domain: str
    label: str | None


class SearchService:
    """What the page's events call: query → ranked results, thumbnails, JSON, downloads. Thread-safe.

    Args:
        retriever: the loaded run.
        max_upload_mb: largest accepted upload.
        served: the indexed files the server sends as files (:class:`app.server.ServedFiles`: a preview or
            download gets the copy it makes in its one allowed folder); an indexed file it refuses is
            previewed from its decoded pixels, without a download. None: no file is sent as it is.
            With ``served``, every image the page gets from this service is a file: thumbnails and other
            generated images are written once, atomically, to ``served.subfolder("generated")``
            (:class:`ImageFiles`) and handed to Gradio by path. Without it they are PIL images.
    """

    def __init__(self, retriever: Retriever, max_upload_mb: int = 10, served: ServedFiles | None = None) -> None:
        if max_upload_mb < 1:
            raise ValueError(f"max_upload_mb must be ≥ 1, got {max_upload_mb}")
        self.retriever = retriever
        self.domains = list(retriever.domains)
        self.max_bytes = int(max_upload_mb) * 2**20
        info = retriever.info()
        root = info.get("data_root") or info.get("data root")
        self.data_root = str(root) if root else None
        self.images = ImageFiles(served.subfolder("generated")) if served is not None else None
        self.thumbnails = ThumbnailCache(files=self.images)
        self.files = ResultFiles()
        self.served = served
        self.sketch_size = int(info.get("image_size") or SKETCH_SIZE)  # a drawing is prepared at the model's size

    # -- searching ------------------------------------------------------------------------------------
    def search(
        self, query: Image.Image, source: str | None, targets: Sequence[str] | None, k: Any, query_name: str = "query"
    ) -> tuple[list[tuple[str | Image.Image, str]], dict[str, Any], list[SearchResult]]:
        """``(gallery, payload, results)`` of one query (see the module docstring for the payload)."""
        kk = check_k(k)
        src, tgts = resolve_domains(self.domains, source, targets)
        response: SearchResponse = self.retriever.retrieve(query, target_domain=tgts, k=kk,
                                                           source_domain=src if src is not None else AUTO)
        results = response.results
        gallery = [(self._thumbnail(r.path), caption(r)) for r in results]
        payload = {
            "ok": True,
            "query": query_name,
            "source_domain": response.source_domain,
            "source": response.source,
            "detected": response.detection.to_dict() if response.detection is not None else None,
            "target_domains": response.target_domains,
            "k": kk,
            "results": [
                {
                    "rank": r.rank,
                    "score": round(float(r.score), 6),
                    "calibrated_score": r.calibrated_score,
                    "domain": r.domain,
                    "label": r.label,
                    "item_id": int(r.item_id),
                    "file": display_file(r.path, self.data_root),
                }
                for r in results
            ],
        }
        return gallery, payload, results

    def api_search(
        self, image_file: str | None, source_domain: str, target_domains: list[str] | None, k: float
    ) -> tuple[list[tuple[str | Image.Image, str]], dict[str, Any]]:
        """The ``/search`` endpoint: errors raise ``gr.Error`` (the client's ``AppError``)."""
        try:
            query = load_upload(image_file, self.max_bytes)
            gallery, payload, _ = self.search(query, source_domain, target_domains, k,
                                              Path(image_file).name if image_file else "query")
            return gallery, payload
        except (QueryInputError, CDRetrievalError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:
            logger.exception("search failed")
            raise gr.Error(f"internal error ({type(e).__name__}); see the server log") from None

    def ui_search(
        self,
        mode: str,
        upload: str | None,
        sketch: Any,
        source: str,
        targets: list[str] | None,
        k: float,
        query_name: str | None = None,
    ) -> tuple[Any, ...]:
        """The Search button (and example / "more like this" clicks): every outcome lands in the status line.

        Returns the values of ``[gallery, status, result_json, results_state, csv_button, json_button,
        preview_box, selected_state]``.
        """
        name = DRAWING if mode == "draw" else (query_name or UPLOADED)
        try:
            query = prepare_sketch(sketch, self.sketch_size) if mode == "draw" else load_upload(upload, self.max_bytes)
            gallery, payload, results = self.search(query, source, targets, k, _plain(name))
        except (QueryInputError, CDRetrievalError) as e:
            return self._error(str(e))
        except Exception as e:
            logger.exception("search failed")
            return self._error(f"internal error ({type(e).__name__}); see the server log")
        status = (
            f"**{len(gallery)} result(s)** for {name} · {describe_source(payload)} · searched "
            f"**{_md_escape(', '.join(payload['target_domains']))}** — ranked by per-domain calibrated score; "
            "captions: domain · class · cosine similarity. Click a result to see it full size."
        )
        csv_path, json_path = self.files.write(payload)
        return (
            gallery, status, payload, [r.to_dict() for r in results],
            gr.DownloadButton(value=csv_path, visible=True), gr.DownloadButton(value=json_path, visible=True),
            gr.Column(visible=False), None,
        )

    @staticmethod
    def _error(message: str) -> tuple[Any, ...]:
        status = f"⚠️ **Error:** {_md_escape(message)}"
        return (
            [], status, {"ok": False, "error": message}, [],
            gr.DownloadButton(visible=False), gr.DownloadButton(visible=False), gr.Column(visible=False), None,
        )

    # -- query sources --------------------------------------------------------------------------------
    def on_upload(self, upload: str | None) -> tuple[Any, str, str]:
        """A file was uploaded: check it now. Returns ``(upload value, status, query name)``; an unreadable
        file is cleared from the component and explained in the status line."""
        if upload is None:
            return gr.skip(), "Upload an image or draw a sketch, then press **Search**.", UPLOADED
        name = Path(upload).name
        try:
            load_upload(upload, self.max_bytes)
        except QueryInputError as e:
            return None, f"⚠️ **Error:** {_md_escape(str(e))}", UPLOADED
        label = f"{UPLOADED} **{_md_escape(name)}**"
        return gr.skip(), f"Ready: {label} — press **Search**.", label

    def as_file(self, img: Image.Image) -> str | Image.Image:
        """A generated image as the page gets it: the path of its file (:class:`ImageFiles`) when the server
        sends files, else (or when the file cannot be written: logged) the image itself."""
        if self.images is None:
            return img
        try:
            return str(self.images.path(img))
        except OSError as e:
            logger.warning("cannot write an image file: %s", e)
            return img

    def _thumbnail(self, path: str) -> str | Image.Image:
        """The thumbnail of an indexed image (its file when the server sends files, see :meth:`as_file`); a
        grey tile for one that must not be shown (a link out of the data root) — its pixels never reach a
        client."""
        if self.retriever.resolve_item_path(path) is None:
            return self.as_file(_placeholder(self.thumbnails.size))
        return self.thumbnails.tile(path)

    def query_from_item(self, path: str, domain: str, label: str | None, kind: str) -> tuple[Any, ...]:
        """Values for ``[upload, source, targets, tabs, mode, query_name]`` that make an indexed image the query."""
        stored = self.retriever.resolve_item_path(path)  # only indexed files that may be shown
        try:
            img: Image.Image | None = load_image(stored) if stored is not None else None
        except CDRetrievalError:
            img = None
        name = f"{kind} **{_md_escape(short_label(domain, label))}** (`{display_file(path, self.data_root)}`)"
        query = self.as_file(img) if img is not None else None  # a lossless PNG of its pixels, written once
        return query, domain, [], gr.Tabs(selected="upload"), "upload", name

    def select_result(self, rows: list[dict[str, Any]] | None, evt: gr.SelectData) -> tuple[Any, ...]:
        """A result was clicked: show the original full size. Values for ``[preview_box, preview_image,
        preview_text, preview_download, selected_state]``."""
        index = evt.index if isinstance(evt.index, int) else None
        if not rows or index is None or not 0 <= index < len(rows):
            return gr.Column(visible=False), None, "", gr.DownloadButton(visible=False), None
        row = rows[index]
        stored = self.retriever.resolve_item_path(row["path"])  # only indexed files, from server-side state
        file = display_file(row["path"], self.data_root)
        score = f"cosine {row['score']:.3f}"
        if row.get("calibrated_score") is not None:
            score += f", calibrated {row['calibrated_score']:.2f}"
        text = f"**#{row['rank']}** · {_md_escape(short_label(row['domain'], row.get('label')))} · {score}  \n`{file}`"
        if stored is None or not stored.is_file():
            return gr.Column(visible=True), None, text + "  \n(the file is gone)", gr.DownloadButton(visible=False), row
        copy = self.served_copy(stored)
        if copy is not None:  # the server's copy: the same bytes, the same name
            image: Any = str(copy)
            download = gr.DownloadButton(label=f"Download {copy.name}", value=str(copy), visible=True)
        else:  # not sent as a file: show the decoded pixels, offer no download
            try:
                image = self.as_file(load_image(stored))
            except CDRetrievalError:
                image = None
            download = gr.DownloadButton(visible=False)
        return gr.Column(visible=True), image, text, download, row

    def served_copy(self, path: str | os.PathLike[str]) -> Path | None:
        """The file the server sends for the indexed image ``path`` (:meth:`ServedFiles.serve`), or None
        when it sends none (no ``served`` object, or a file it refuses)."""
        return self.served.serve(path) if self.served is not None else None

    def example_tile(self, path: str) -> str | Image.Image:
        """What an example tile shows: the served copy of the indexed image, else its thumbnail (file or
        pixels, as :meth:`_thumbnail`)."""
        copy = self.served_copy(path)
        return str(copy) if copy is not None else self._thumbnail(path)

    def more_like_this(self, row: dict[str, Any] | None) -> tuple[Any, ...]:
        """The selected result becomes the query (its domain as the source)."""
        if not row:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return self.query_from_item(row["path"], row["domain"], row.get("label"), "the result")


def _plain(markdown: str) -> str:
    """The status-line query name without Markdown emphasis (for the JSON payload)."""
    return markdown.replace("**", "").replace("`", "").replace("\\", "")


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


def build_app(
    retriever: Retriever,
    *,
    max_upload_mb: int = 10,
    examples_per_domain: int = 3,
    served: ServedFiles | None = None,
) -> gr.Blocks:
    """The page for ``retriever`` (see the module docstring for the layout and the ``/search`` API).

    ``served``: the files the server sends as files, the object whose folder is its allowed path (see
    :class:`SearchService`); None: every image is shown from its pixels.
    """
    service = SearchService(retriever, max_upload_mb, served)
    domains = service.domains
    examples = example_queries(retriever, examples_per_domain)
    detect_info = ("auto: detect it from the image" if retriever.detector is not None
                   else "auto: not known (this index has no domain detector; every domain is searched)")

    with gr.Blocks(title="cdretrieval", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        mode = gr.State("upload")
        query_name = gr.State(UPLOADED)
        results_state = gr.State([])
        selected_state = gr.State(None)
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
                            buttons=["fullscreen"],
                            elem_id="query-upload",
                        )
                        tolerant_upload(upload)
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
                            buttons=["fullscreen"],
                            elem_id="query-sketch",
                        )
                        guarded_sketch(sketch)
                source = gr.Dropdown(
                    choices=[AUTO, *domains], value=AUTO, label="Query domain", info=detect_info,
                    elem_id="source-domain",
                )
                targets = gr.CheckboxGroup(
                    choices=domains, value=[], label="Search in",
                    info="None ticked: every domain except the query's", elem_id="target-domains",
                )
                k = gr.Slider(K_MIN, K_MAX, value=K_DEFAULT, step=1, label="Number of results (k)", elem_id="k")
                search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
            with gr.Column(scale=3, min_width=340):
                status = gr.Markdown("Upload an image or draw a sketch, then press **Search**.", elem_id="status")
                gallery = gr.Gallery(
                    label="Results", show_label=False, columns=5, height="auto", object_fit="contain",
                    format="png", allow_preview=False, buttons=[], interactive=False, elem_id="results",
                )
                with gr.Column(visible=False, elem_id="preview") as preview_box, gr.Row(equal_height=False):
                    preview_image = gr.Image(
                        label="Original", type="filepath", interactive=False, height=320, format="png",
                        buttons=["download", "fullscreen"], elem_id="preview-original", scale=2,
                    )
                    with gr.Column(scale=1, min_width=200):
                        preview_text = gr.Markdown(elem_id="preview-text")
                        preview_download = gr.DownloadButton("Download original", visible=False, size="sm",
                                                             elem_id="preview-download")
                        more_btn = gr.Button("More like this", variant="primary", size="sm",
                                             elem_id="more-like-this")
                with gr.Row():
                    csv_btn = gr.DownloadButton("Results as CSV", visible=False, size="sm", elem_id="download-csv")
                    json_btn = gr.DownloadButton("Results as JSON", visible=False, size="sm", elem_id="download-json")
                with gr.Accordion("Raw results (JSON)", open=False):
                    result_json = gr.JSON(label="Results", elem_id="result-json")
        gr.Markdown("**Example queries** from the indexed images (domain · class): click one to search with it.",
                    visible=bool(examples), elem_id="examples-title")
        example_gallery = gr.Gallery(
            value=[(service.example_tile(e.path), short_label(e.domain, e.label)) for e in examples],
            label="Example queries", show_label=False, columns=max(1, min(9, len(examples))), height="auto",
            object_fit="contain", allow_preview=False, buttons=[], interactive=False, visible=bool(examples),
            elem_id="examples",
        )
        with gr.Accordion("Model and index", open=False, elem_id="model-info"):
            gr.Markdown(info_markdown(page_info(retriever.info())))

        # Hidden input of the public API: an image *file* (decoded by us, with clear errors).
        api_file = gr.File(label="image", file_types=["image"], visible=False, elem_id="api-file")
        api_button = gr.Button(visible=False)

        search_inputs = [mode, upload, sketch, source, targets, k, query_name]
        search_outputs = [gallery, status, result_json, results_state, csv_btn, json_btn, preview_box,
                          selected_state]
        query_outputs = [upload, source, targets, tabs, mode, query_name]
        private: dict[str, Any] = {"api_visibility": "private"}

        def pick_example(evt: gr.SelectData) -> tuple[Any, ...]:
            ex = examples[int(evt.index)]
            return service.query_from_item(ex.path, ex.domain, ex.label, "the example")

        example_gallery.select(pick_example, None, query_outputs, queue=False, **private).then(
            service.ui_search, search_inputs, search_outputs, concurrency_id="search", **private
        ).then(None, js=SCROLL_TO_RESULTS_JS, **private)
        more_btn.click(service.more_like_this, selected_state, query_outputs, queue=False, **private).then(
            service.ui_search, search_inputs, search_outputs, concurrency_id="search", **private
        ).then(None, js=SCROLL_TO_RESULTS_JS, **private)
        gallery.select(service.select_result, results_state,
                       [preview_box, preview_image, preview_text, preview_download, selected_state], **private)
        upload.upload(service.on_upload, upload, [upload, status, query_name], **private).then(
            None, js=SCROLL_TO_ERROR_JS, **private
        )
        upload.clear(lambda: UPLOADED, None, query_name, queue=False, **private)
        upload_tab.select(lambda: "upload", None, mode, queue=False, **private)
        draw_tab.select(lambda: "draw", None, mode, queue=False, **private)
        search_btn.click(service.ui_search, search_inputs, search_outputs, concurrency_id="search", **private).then(
            None, js=SCROLL_TO_RESULTS_JS, **private
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
    "ImageFiles",
    "QueryInputError",
    "ResultFiles",
    "SearchService",
    "ThumbnailCache",
    "build_app",
    "caption",
    "check_k",
    "default_targets",
    "describe_source",
    "example_queries",
    "guarded_sketch",
    "info_markdown",
    "load_upload",
    "page_info",
    "prepare_sketch",
    "resolve_domains",
    "results_csv",
    "tolerant_upload",
]
