"""Robust image decoding: any PIL mode → RGB, EXIF orientation applied, clear errors naming the file."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cdretrieval.errors import ImageLoadError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})

#: Largest image accepted, in pixels (width × height): ~ 8k × 8k. Bigger is treated as a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000

#: Largest high-bit-depth image (16/32-bit greyscale or float: modes I;16*, I, F), in pixels (~ 4k × 4k).
#: Decoding and rescaling such an image to 8 bits needs several bytes per pixel on top of the raw data (a
#: 16-bit 8000 × 8000 PNG of 124 kB took 1.3 GB), so its limit is a quarter of :data:`MAX_IMAGE_PIXELS`.
MAX_HIGH_DEPTH_PIXELS = 16_000_000
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F", "I;16S", "I;32", "I;32B", "I;32S"})

#: Largest accepted ratio of the longer to the shorter side. The eval transform resizes the *shorter* side to
#: the model's input size, so a 1 × 1,000,000 px strip (a 1 kB PNG) would become a 64 × 64,000,000 px image
#: (16 GB of memory, a minute of CPU) before its centre is cropped; such strips are refused instead.
MAX_ASPECT_RATIO = 100


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has an image file extension (case-insensitive); hidden files are not images."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Transparent pixels (LA, RGBA, PA, P with transparency) are composited on white, which is what a
    sketch or clip-art on a transparent background means; 16/32-bit greyscale (I;16, I) is rescaled
    from its actual range; CMYK and YCbCr go through PIL's converters. Animated images use frame 0.
    A float image (mode F) with NaN or infinite pixels raises :class:`ImageLoadError` naming ``name``.
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
        if mode == "La":
            img = img.convert("LA")  # PIL converts premultiplied La only to LA
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32 if mode.startswith("I;16") else np.float64)  # one working copy
        if not np.isfinite(arr).all():
            raise ImageLoadError(f"{name}: image has NaN or infinite pixel values")
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if hi <= lo:
            arr[...] = 0
        else:  # in place: (arr - lo) / (hi - lo) * 255
            np.subtract(arr, lo, out=arr)
            np.multiply(arr, 255.0 / (hi - lo), out=arr)
        np.rint(arr, out=arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _check_size(img: Image.Image, name: str, max_pixels: int) -> None:
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageLoadError(f"{name}: image has no pixels ({w}x{h})")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageLoadError(
            f"{name}: image is {w}x{h}, its long side over {MAX_ASPECT_RATIO} times its short side (resizing it "
            "for the model would need too much memory); crop it first"
        )
    if w * h > max_pixels:
        raise ImageLoadError(
            f"{name}: image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(possible decompression bomb); resize it first"
        )
    high_depth_limit = min(max_pixels, MAX_HIGH_DEPTH_PIXELS)
    if img.mode in HIGH_DEPTH_MODES and w * h > high_depth_limit:
        raise ImageLoadError(
            f"{name}: {img.mode} (high bit depth) image is {w}x{h} = {w * h:,} pixels, over the limit of "
            f"{high_depth_limit:,} for 16/32-bit images (decoding it would need too much memory); convert it "
            "to 8 bits or resize it first"
        )


def check_image_header(source: str | os.PathLike[str] | bytes, name: str = "<image>",
                       max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """Check an image file's (or bytes') size and bit depth from its header only, before any pixel is decoded.

    Returns:
        ``(width, height)``.

    Raises:
        ImageLoadError: not an image, or too many pixels for its bit depth (see :func:`load_image`).
    """
    fp: io.BytesIO | Path = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else Path(source)
    try:
        with Image.open(fp) as img:  # lazy: reads the header, allocates no pixels
            _check_size(img, name, max_pixels)
            return img.size
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name}: refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name}: not a readable image file (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{name}: cannot read the image header ({e})") from e


def _decode(fp: io.BytesIO | Path, name: str, max_pixels: int) -> Image.Image:
    # No warnings.catch_warnings() here: it swaps the process-wide filter list and is not thread-safe (the
    # server decodes in several threads). PIL raises DecompressionBombError itself beyond twice its limit;
    # below that _check_size refuses anything over max_pixels before a pixel is decoded.
    try:
        with Image.open(fp) as img:
            _check_size(img, name, max_pixels)
            img.load()  # force full decode now: truncated files fail here, not later
            upright: Image.Image = ImageOps.exif_transpose(img) or img
            return to_rgb(upright, name)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{name}: refused as a possible decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{name}: not a readable image file (unknown or corrupt format)") from e
    except (PermissionError, IsADirectoryError) as e:
        raise ImageLoadError(f"{name}: cannot read the file ({e.strerror})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({e})") from e


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load an image file as RGB, raising :class:`ImageLoadError` naming the file on any problem."""
    p = Path(path)
    try:
        exists, is_file = p.exists(), p.is_file()
        size = p.stat().st_size if is_file else -1
    except (OSError, ValueError) as e:  # name too long, permission denied on a parent folder, ...
        raise ImageLoadError(f"{p}: cannot access the file ({e})") from e
    if not exists:
        raise ImageLoadError(f"{p}: no such file")
    if not is_file:
        raise ImageLoadError(f"{p}: not a file")
    if size == 0:
        raise ImageLoadError(f"{p}: empty file (0 bytes)")
    return _decode(p, str(p), max_pixels)


def load_image_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode image bytes (an upload) as RGB, raising :class:`ImageLoadError` on any problem."""
    if not data:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels)


def as_rgb_image(img: Image.Image, name: str = "<image>", max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Validate an in-memory PIL image and return it as RGB (:class:`ImageLoadError` when it can't be)."""
    _check_size(img, name, max_pixels)
    try:
        return to_rgb(ImageOps.exif_transpose(img) or img, name)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a closed image, a mode PIL can't convert, ...
        raise ImageLoadError(f"{name}: cannot convert the image to RGB ({e})") from e
