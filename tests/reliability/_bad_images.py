"""Crafted image files for the reliability tests: broken ones (each with the message it must produce) and
odd-but-valid ones (each with the RGB pixels it must decode to).

Everything is built in memory, deterministically and cheaply: a "decompression bomb" is a 57-byte PNG whose
header claims 100,000 × 100,000 pixels, a 1 × 100,000 px strip is a 200-byte PNG.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 2) -> bytes:
    """A PNG with a valid IHDR claiming ``width × height`` pixels and no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def noise_rgb(h: int = 48, w: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@dataclass(frozen=True)
class BadFile:
    """A file that must be refused with an error matching ``match`` (a regex) that names it."""

    id: str
    filename: str
    data: bytes
    match: str


def bad_files() -> list[BadFile]:
    png = encode(noise_rgb(), "PNG")
    jpeg = encode(noise_rgb(), "JPEG", quality=90)
    corrupt_png = bytearray(png)
    corrupt_png[60:120] = bytes(60)  # zero a run of the compressed pixel data (IDAT checksum breaks)
    return [
        BadFile("empty", "empty.png", b"", r"empty file \(0 bytes\)"),
        BadFile("truncated-png", "cut.png", png[: len(png) // 2], r"corrupt or truncated"),
        BadFile("truncated-jpeg", "cut.jpg", jpeg[: len(jpeg) // 2], r"corrupt or truncated"),
        BadFile("corrupt-png", "corrupt.png", bytes(corrupt_png), r"corrupt or truncated"),
        BadFile("png-magic-then-garbage", "magic.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
                r"not a readable image|corrupt"),
        BadFile("text-as-png", "notes.png", b"this is not an image\n" * 50, r"not a readable image"),
        BadFile("pdf-as-jpg", "doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n",
                r"not a readable image"),
        BadFile("html-as-gif", "page.gif", b"<html><script>alert(1)</script></html>", r"not a readable image"),
        BadFile("svg-as-png", "vector.png", b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
                r"not a readable image"),
        BadFile("png-0x0", "zero.png", png_header_only(0, 0), r"not a readable image|no pixels|corrupt"),
        BadFile("bomb-100k-x-100k", "bomb.png", png_header_only(100_000, 100_000), r"decompression bomb"),
        BadFile("bomb-9k-x-9k", "big.png", png_header_only(9_000, 9_000), r"over the limit.*decompression bomb"),
        BadFile("strip-1-x-100k", "strip.png", encode(Image.new("L", (100_000, 1), 0), "PNG"),
                r"100000x1.*over 100 times its short side"),
        BadFile("float-tiff-nan", "nan.tif",
                encode(Image.fromarray(np.full((8, 8), np.nan, np.float32)), "TIFF"), r"NaN or infinite"),
    ]


@dataclass(frozen=True)
class OddFile:
    """A valid but unusual file; it must decode to ``expected`` (H, W, 3) uint8 within ``atol``."""

    id: str
    filename: str
    data: bytes
    expected: np.ndarray
    atol: int = 0


def _solid(h: int, w: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def odd_files() -> list[OddFile]:
    ramp16 = np.tile(np.linspace(1000, 60000, 32).astype(np.uint16), (24, 1))  # 16-bit, not full range
    stretched = np.round((ramp16.astype(np.float64) - 1000) / 59000 * 255).astype(np.uint8)
    frames = [Image.new("RGB", (16, 12), c).convert("P") for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    palette_t = Image.new("P", (20, 10), 0)
    palette_t.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette_t.paste(1, (0, 0, 10, 10))  # left half palette index 1 (red), right half index 0 (transparent)
    palette_expected = np.concatenate([_solid(10, 10, (255, 0, 0)), _solid(10, 10, (255, 255, 255))], axis=1)
    la = Image.new("LA", (12, 12), (0, 0))  # fully transparent black: white on paper
    la.paste((40, 255), (0, 0, 6, 12))  # left half opaque dark grey
    la_expected = np.concatenate([_solid(12, 6, (40, 40, 40)), _solid(12, 6, (255, 255, 255))], axis=1)
    return [
        OddFile("1x1", "dot.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), _solid(1, 1, (10, 200, 30))),
        OddFile("16bit-grey", "deep.png", encode(Image.fromarray(ramp16), "PNG"),
                np.repeat(stretched[:, :, None], 3, 2)),
        OddFile("cmyk-jpeg", "print.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100),
                _solid(16, 16, (255, 0, 0)), atol=2),
        OddFile("palette-transparent", "pal.png", encode(palette_t, "PNG", transparency=0), palette_expected),
        OddFile("animated-gif", "anim.gif", gif.getvalue(), _solid(12, 16, (255, 0, 0)), atol=1),
        OddFile("la-transparent", "alpha.png", encode(la, "PNG"), la_expected),
        OddFile("tall-100-to-1", "tall.png", encode(Image.new("L", (2, 200), 90), "PNG"), _solid(200, 2, (90, 90, 90))),
    ]
