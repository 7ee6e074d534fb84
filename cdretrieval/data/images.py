"""Robust image decoding: any PIL mode → RGB, EXIF orientation applied, clear errors naming the file."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cdretrieval.errors import ImageLoadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

#: Largest image accepted, in pixels (width × height): ~ 8k × 8k. Bigger is treated as a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has an image file extension (case-insensitive); hidden files are not images."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels (LA, RGBA, PA, P with transparency) are composited on white, which is what a
    sketch or clip-art on a transparent background means; 16/32-bit greyscale (I;16, I) is rescaled
    from its actual range; CMYK and YCbCr go through PIL's converters. Animated images use frame 0.
    """
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageLoadError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageLoadError(
            f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(possible decompression bomb); resize it first"
        )


def _decode(fp: io.BytesIO | Path, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                _check_size(img, name, max_pixels)
                img.load()  # force full decode now: truncated files fail here, not later
                upright: Image.Image = ImageOps.exif_transpose(img) or img
                return to_rgb(upright)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{name}: refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name}: not a readable image file (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({e})") from e


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load an image file as RGB, raising :class:`ImageLoadError` naming the file on any problem."""
    p = Path(path)
    if not p.exists():
        raise ImageLoadError(f"{p}: no such file")
    if not p.is_file():
        raise ImageLoadError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ImageLoadError(f"{p}: empty file (0 bytes)")
    return _decode(p, str(p), max_pixels)


def load_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes (an upload) as RGB, raising :class:`ImageLoadError` on any problem."""
    if not data:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels)


def as_rgb_image(img: Image.Image, name: str = "<image>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Validate an in-memory PIL image and return it as RGB."""
    _check_size(img, name, max_pixels)
    return to_rgb(ImageOps.exif_transpose(img) or img)
