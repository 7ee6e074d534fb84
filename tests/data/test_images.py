import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdretrieval.data.images import as_rgb_image, load_image, load_image_bytes
from cdretrieval.errors import ImageLoadError


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    "mode,fmt",
    [("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
     ("1", "PNG"), ("RGB", "JPEG"), ("I", "TIFF"), ("F", "TIFF")],
)
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str, fmt: str) -> None:
    arr = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 200)
    p = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 255))
    out = load_image(_save(rgba, tmp_path / "t.png"))
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)


def test_sixteen_bit_range_is_stretched(tmp_path: Path) -> None:
    arr = np.array([[1000, 2000]], dtype=np.uint16)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "s.png"))
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW when displayed
    p = _save(img, tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(p).size == (20, 40)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("P", (8, 8), c) for c in (1, 2, 3)]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert load_image(p).size == (8, 8)


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    p = tmp_path / "trunc.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="trunc.jpg"):
        load_image(p)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n garbage"])
def test_corrupt_empty_and_fake_files(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match="bad.png"):
        load_image(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_decompression_bomb_limit(tmp_path: Path) -> None:
    p = _save(Image.new("L", (400, 300)), tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(p, max_pixels=100_000)
    assert load_image(p, max_pixels=200_000).size == (400, 300)


def test_bytes_and_in_memory_paths() -> None:
    buf = io.BytesIO()
    Image.new("L", (5, 6), 128).save(buf, "PNG")
    assert load_image_bytes(buf.getvalue()).mode == "RGB"
    with pytest.raises(ImageLoadError, match="empty"):
        load_image_bytes(b"", "upload.png")
    assert as_rgb_image(Image.new("1", (3, 3))).mode == "RGB"
    assert as_rgb_image(Image.new("RGB", (1, 1))).size == (1, 1)
