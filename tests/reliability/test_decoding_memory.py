"""Small files that decode to huge images are refused from their header, before any pixel is allocated.

Two files of the issue: a 124 kB 16-bit 8000 × 8000 PNG (within the 64 Mpx limit, but ~1.3 GB to decode
and rescale) and an 11000 × 11000 PNG sent as the Draw tab's sketch (Gradio decoded it before any check).
Each goes through every decoding path — upload bytes, a file (bulk loading), the upload handler and the
sketch component — and the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs)
must grow by less than 100 MB.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cdretrieval.data.images import check_image_header, load_image, load_image_bytes
from cdretrieval.errors import ImageLoadError

LIMIT_MB = 100


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _blank_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A valid, complete PNG of zero pixels, compressed row by row (never held decoded in memory)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)  # filter byte + pixels
    z = zlib.compressobj(9)
    parts = [z.compress(row) for _ in range(height)]
    idat = b"".join(parts) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _peak_growth_mb(action: Callable[[], Any]) -> float:
    """Run ``action``; how far the peak RSS rose above the RSS before it, in MB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
    except (OSError, KeyError):
        pytest.skip("no /proc/self/clear_refs or VmHWM on this system")
    action()
    return (_status_kb("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("big")
    files = {"deep": folder / "deep16-8000.png", "sketch": folder / "sketch-11000.png"}
    files["deep"].write_bytes(_blank_png(8000, 8000, 16, 0))  # 16-bit greyscale
    files["sketch"].write_bytes(_blank_png(11000, 11000, 8, 6))  # RGBA, as a canvas sends it
    return files


def _refused(call: Callable[[], Any], error: type[BaseException], pattern: str) -> Callable[[], None]:
    def run() -> None:
        with pytest.raises(error, match=pattern):
            call()
    return run


def test_files_are_small(big_files: dict[str, Path]) -> None:
    assert big_files["deep"].stat().st_size < 400_000 and big_files["sketch"].stat().st_size < 1_000_000
    with pytest.raises(ImageLoadError, match=r"x: I;16 \(high bit depth\) image is 8000x8000"):
        check_image_header(big_files["deep"].read_bytes(), "x")
    assert check_image_header(_blank_png(4000, 4000, 16, 0), "y") == (4000, 4000)  # 16 Mpx: accepted


@pytest.mark.parametrize("path_kind", ["bytes", "file"])
def test_16_bit_8000_square_is_refused_cheaply(big_files: dict[str, Path], path_kind: str) -> None:
    path = big_files["deep"]
    data = path.read_bytes()
    call = (lambda: load_image_bytes(data, name="upload deep.png")) if path_kind == "bytes" else (
        lambda: load_image(path))
    growth = _peak_growth_mb(_refused(call, ImageLoadError, r"high bit depth.*8000x8000"))
    assert growth < LIMIT_MB, f"peak RSS grew by {growth:.0f} MB"


def test_upload_handler_refuses_16_bit_8000_square_cheaply(big_files: dict[str, Path]) -> None:
    from app.ui import QueryInputError, load_upload

    growth = _peak_growth_mb(_refused(lambda: load_upload(big_files["deep"], 10 * 2**20, "deep.png"),
                                      QueryInputError, r"deep\.png: .*high bit depth"))
    assert growth < LIMIT_MB, f"peak RSS grew by {growth:.0f} MB"


def test_sketch_of_11000_square_is_refused_before_decoding(big_files: dict[str, Path]) -> None:
    import gradio as gr
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    from app.ui import QueryInputError, guarded_sketch, prepare_sketch

    sketch = guarded_sketch(gr.Sketchpad(type="pil", image_mode="RGB", canvas_size=(400, 400)))
    payload = EditorData(background=None, layers=[], composite=FileData(path=str(big_files["sketch"])))
    values: list[Any] = []
    growth = _peak_growth_mb(lambda: values.append(sketch.preprocess(payload)))
    assert growth < LIMIT_MB, f"peak RSS grew by {growth:.0f} MB"
    with pytest.raises(QueryInputError, match=r"the sketch: image is 11000x11000 .* over the limit"):
        prepare_sketch(values[0])
    # an ordinary drawing still goes through
    small = big_files["sketch"].parent / "small.png"
    small.write_bytes(_blank_png(40, 40, 8, 2))
    value = sketch.preprocess(EditorData(background=None, layers=[], composite=FileData(path=str(small))))
    assert isinstance(value, dict) and value["composite"].size == (40, 40)
