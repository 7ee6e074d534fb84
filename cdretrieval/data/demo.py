"""The embedded demo data set, generated offline and deterministically from data inside installed packages.

scikit-learn ships 1,797 handwritten digits (8×8) and two photographs. We render three visual domains
from *disjoint* thirds of the digits (so no image has a twin in another domain, as with real unpaired
domains):

* ``ink``      — smooth black strokes on white paper (what a person draws in the UI's canvas);
* ``outline``  — sketch-like hollow outlines of thickened strokes, slightly wobbly;
* ``photo``    — MNIST-M style: the stroke blended (absolute difference) over a colour photo patch.

Layout ``<root>/<domain>/<digit>/<id>.png`` at 64×64 px; ``generate_demo_data`` writes it once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cdretrieval.io import atomic_write_json
from cdretrieval.paths import cache_dir

DEMO_DOMAINS: tuple[str, ...] = ("ink", "outline", "photo")
DEMO_SIZE = 64
DEMO_VERSION = 1
_MANIFEST = "demo.json"


def default_demo_root() -> Path:
    """Where ``cdretrieval demo`` keeps the generated data."""
    return cache_dir() / f"demo-digits-v{DEMO_VERSION}"


def _stroke_mask(digit8: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render an 8×8 sklearn digit (0..16) as a smooth stroke mask [size,size] in [0,1], jittered.

    The digit is upsampled bicubically, randomly rotated (±12°), scaled and shifted a little, then
    blurred and contrast-stretched so edges are soft like pen strokes.
    """
    img = Image.fromarray((digit8 / 16.0 * 255).astype(np.uint8))
    inner = int(size * rng.uniform(0.62, 0.8))
    img = img.resize((inner, inner), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    off = (size - inner) // 2
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    canvas.paste(img, (off + dx, off + dy))
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=1.0))
    m = np.asarray(canvas, dtype=np.float32) / 255.0
    return np.clip((m - 0.25) / 0.45, 0.0, 1.0)


def render_ink(mask: np.ndarray) -> Image.Image:
    """Dark ink on white paper."""
    return Image.fromarray(((1.0 - mask) * 255).round().astype(np.uint8)).convert("RGB")


def render_outline(mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A hollow outline: dilated stroke minus the stroke, as thin dark lines on off-white."""
    solid = Image.fromarray((mask > 0.5).astype(np.uint8) * 255)
    grown = solid.filter(ImageFilter.MaxFilter(5))
    edge = np.asarray(grown, dtype=np.float32) - np.asarray(solid, np.float32)
    edge_img = Image.fromarray(np.clip(edge, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius=0.6)
    )
    e = np.asarray(edge_img, dtype=np.float32) / 255.0
    paper = float(rng.uniform(0.9, 1.0))
    grey = paper - e * float(rng.uniform(0.6, 0.9))
    return Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")


def render_photo(mask: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """MNIST-M style (Ganin et al. 2016): |patch − stroke·255| over a random patch of a photo."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w, _ = photo.shape
    s = mask.shape[0]
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    patch = photo[y : y + s, x : x + s].astype(np.float32)
    out = np.abs(patch - mask[..., None] * 255.0)
    return Image.fromarray(out.round().astype(np.uint8))


def generate_demo_data(root: str | os.PathLike[str] | None = None, per_domain: int | None = None) -> Path:
    """Write the demo data set (once) and return its root. Deterministic: same bytes on every run.

    Args:
        root: target folder (default :func:`default_demo_root`). If it already holds a complete data
            set (its manifest exists) nothing is written.
        per_domain: cap on images per domain (default: a third of the 1,797 digits each, 599).
    """
    from sklearn.datasets import load_digits, load_sample_images

    out = Path(root) if root is not None else default_demo_root()
    if (out / _MANIFEST).is_file():
        return out
    digits = load_digits()
    images8: np.ndarray = digits.images
    labels: np.ndarray = digits.target
    photos = [np.asarray(p) for p in load_sample_images().images]
    order = np.random.default_rng(0).permutation(len(labels))
    thirds = np.array_split(order, len(DEMO_DOMAINS))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts: dict[str, int] = {}
        for d_idx, (domain, ids) in enumerate(zip(DEMO_DOMAINS, thirds, strict=True)):
            ids = np.sort(ids)[:per_domain] if per_domain else np.sort(ids)
            rng = np.random.default_rng(1000 + d_idx)
            for i in ids:
                mask = _stroke_mask(images8[i], rng, DEMO_SIZE)
                if domain == "ink":
                    img = render_ink(mask)
                elif domain == "outline":
                    img = render_outline(mask, rng)
                else:
                    img = render_photo(mask, photos, rng)
                target = tmp / domain / str(int(labels[i])) / f"{domain}_{int(i):04d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                img.save(target, optimize=False)
            counts[domain] = len(ids)
        atomic_write_json(
            tmp / _MANIFEST,
            {"name": "cdretrieval demo digits", "version": DEMO_VERSION, "size": DEMO_SIZE, "counts": counts},
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
