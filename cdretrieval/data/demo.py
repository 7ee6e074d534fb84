"""The embedded demo data set, generated offline and deterministically from data inside installed packages.

scikit-learn ships 1,797 handwritten digits (8×8) and two photographs. We render three visual domains
from *disjoint* thirds of the digits (so no image has a twin in another domain, as with real unpaired
domains). Each digit becomes a pen stroke: the 8×8 image is upsampled and smoothed, its thick blob is
reduced to its centre line (the ridge of its distance transform) and redrawn with a round pen about as
wide as the UI's brush; the digit is then centred and scaled so its longer side fills 73.5 % of the
image — the framing the UI gives a drawing (its bounding box plus an 18 % margin on each side).

* ``ink``      — black pen strokes on white paper (what a person draws in the UI's canvas);
* ``outline``  — sketch-like hollow outlines of the thickened strokes, grey on off-white;
* ``photo``    — MNIST-M style: the stroke blended (absolute difference) over a colour photo patch,
  the patch defocused and its contrast halved so the digit stays legible.

Layout ``<root>/<domain>/<digit>/<id>.png`` at 128×128 px (the demo's image size, so nothing is resampled
before the backbone); ``generate_demo_data`` writes it once.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cdretrieval.io import atomic_write_json, replace_dir
from cdretrieval.paths import cache_dir

DEMO_DOMAINS: tuple[str, ...] = ("ink", "outline", "photo")
DEMO_SIZE = 128
DEMO_VERSION = 2
_MANIFEST = "demo.json"
_FILL = 0.735  # longer side of the digit / image side: 1 / (1 + 2 × the UI's 0.18 sketch margin)
_PEN_RADIUS = 4.0  # px at 128 px: the UI brush's stroke width relative to a cropped drawing
_ROTATE = 8.0  # degrees, ±


def default_demo_root() -> Path:
    """Where ``cdretrieval demo`` keeps the generated data."""
    return cache_dir() / f"demo-digits-v{DEMO_VERSION}"


def _disc(radius: float) -> np.ndarray:
    r = int(radius) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray((xx**2 + yy**2) <= radius * radius)


def _stroke_mask(digit8: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render an 8×8 sklearn digit (0..16) as a pen-stroke mask [size,size] in [0,1], jittered.

    The digit is upsampled bicubically, rotated a little (±8°), blurred into a smooth blob, reduced to
    its centre line, redrawn with a round pen, and centred at a fixed scale (see the module docstring).
    """
    from scipy import ndimage as ndi

    k = size / 64
    img = Image.fromarray((digit8 / 16.0 * 255).astype(np.uint8))
    inner = int(size * rng.uniform(0.62, 0.8))
    img = img.resize((inner, inner), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    off = (size - inner) // 2
    shift = round(3 * k)
    dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
    canvas.paste(img, (off + dx, off + dy))
    canvas = canvas.rotate(float(rng.uniform(-_ROTATE, _ROTATE)), resample=Image.Resampling.BILINEAR)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=1.0 * k))
    blob = np.clip((np.asarray(canvas, dtype=np.float32) / 255.0 - 0.3) / 0.3, 0.0, 1.0) > 0.5
    # centre line = ridge of the distance transform, redrawn with a round pen
    dist = ndi.distance_transform_edt(blob)
    ridge = blob & (dist >= ndi.maximum_filter(dist, size=3) - 0.5) & (dist >= 1.5)
    stroke = ndi.binary_dilation(ridge, structure=_disc(_PEN_RADIUS * size / 128))
    m = np.clip(ndi.gaussian_filter(stroke.astype(np.float32), 0.8 * size / 128) * 1.6, 0.0, 1.0)
    # centre the digit, its longer side a fixed share of the image
    ys, xs = np.nonzero(m > 0.05)
    if len(ys) == 0:
        return m
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    scale = _FILL * size / max(bottom - top, right - left)
    crop = Image.fromarray((m[top:bottom, left:right] * 255).astype(np.uint8))
    crop = crop.resize((max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale))),
                       Image.Resampling.BILINEAR)
    centred = Image.new("L", (size, size), 0)
    centred.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return np.asarray(centred, dtype=np.float32) / 255.0


def render_ink(mask: np.ndarray) -> Image.Image:
    """Dark ink on white paper."""
    return Image.fromarray(((1.0 - mask) * 255).round().astype(np.uint8)).convert("RGB")


def render_outline(mask: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A hollow outline: the boundary ring around the thickened stroke, as grey lines on off-white."""
    from scipy import ndimage as ndi

    size = mask.shape[0]
    solid = ndi.maximum_filter(mask > 0.5, size=5)
    grown = ndi.maximum_filter(solid, size=max(3, round(2 * size / 64) | 1))
    edge = ndi.gaussian_filter((grown & ~solid).astype(np.float32), 0.6 * size / 64)
    e = np.clip(edge / max(float(edge.max()), 1e-6) * 1.3, 0.0, 1.0)
    paper = float(rng.uniform(0.9, 1.0))
    grey = paper - e * float(rng.uniform(0.6, 0.9))
    return Image.fromarray((np.clip(grey, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")


def render_photo(mask: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> Image.Image:
    """MNIST-M style (Ganin et al. 2016): |patch − stroke·255| over a random patch of a photo, the patch
    defocused and its contrast halved (towards its mean colour) so that the digit stays legible."""
    photo = photos[int(rng.integers(len(photos)))]
    h, w, _ = photo.shape
    s = mask.shape[0]
    y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
    patch_img = Image.fromarray(photo[y : y + s, x : x + s]).filter(ImageFilter.GaussianBlur(3.0 * s / 64))
    patch = np.asarray(patch_img, dtype=np.float32)
    patch = 0.5 * patch + 0.5 * patch.mean(axis=(0, 1), keepdims=True)
    out = np.abs(patch - mask[..., None] * 255.0)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


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

    def fill(tmp: Path) -> None:
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
                img.save(target, compress_level=1)
            counts[domain] = len(ids)
        atomic_write_json(
            tmp / _MANIFEST,
            {"name": "cdretrieval demo digits", "version": DEMO_VERSION, "size": DEMO_SIZE, "counts": counts},
        )

    return replace_dir(out, fill)  # written beside ``out`` and renamed into place: never half a data set
