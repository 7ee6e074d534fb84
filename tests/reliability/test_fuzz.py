"""Property-based fuzzing of the image-decoding and query path (hypothesis).

Random bytes, mutated valid PNG/JPEG/GIF/TIFF/... files, random PIL images, random arrays and random search
parameters must each either give a valid result (an RGB image; a unit-norm embedding; ≤ k hits sorted by
score from the asked domains) or raise one of the project's :class:`CDRetrievalError` subclasses — never
another exception type, and never hang (each example runs under an alarm).
"""

from __future__ import annotations

import contextlib
import io
import signal
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from _bad_images import encode, noise_rgb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cdretrieval.data.images import as_rgb_image, load_image_bytes
from cdretrieval.errors import CDRetrievalError
from cdretrieval.retrieval import Retriever, SearchResult

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
HANG_SECONDS = 20  # one decode or query taking this long counts as a hang


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` in the code under test eats it."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """SIGALRM after ``seconds``; an outer alarm (pytest-timeout's) is re-armed with its remaining time."""

    def _raise(signum: int, frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    outer = signal.alarm(seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.alarm(max(1, outer - int(time.monotonic() - start)))


def _seed_files() -> list[bytes]:
    rgb = noise_rgb(24, 20)
    grey16 = Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 97)
    frames = [Image.new("P", (12, 10), c) for c in (1, 2)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    return [
        encode(rgb, "PNG"),
        encode(rgb.convert("P"), "PNG"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(grey16, "PNG"),
        encode(rgb, "JPEG", quality=80),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb, "JPEG", progressive=True),
        gif.getvalue(),
        encode(rgb, "BMP"),
        encode(rgb, "TIFF"),
        encode(rgb, "WEBP"),
        encode(rgb.convert("RGBA"), "ICO"),
    ]


SEEDS = _seed_files()


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid seed file with random byte flips, inserted runs, 32-bit extremes (sizes, lengths) and a cut."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "extreme", "cut"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "extreme":
            data[pos:pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                                      b"\x80\x00\x00\x00", b"\x00\x01\x00\x00"]))
        else:
            data = data[:pos]
    return bytes(data)


def _check_rgb(img: Image.Image) -> None:
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert img.width >= 1 and img.height >= 1
    np.asarray(img)  # the pixels are really there


def _decode(data: bytes) -> None:
    with time_limit(HANG_SECONDS):
        try:
            img = load_image_bytes(data, "fuzz")
        except CDRetrievalError as e:
            assert "fuzz" in str(e)  # the error names the file
            return
    _check_rgb(img)


@SETTINGS
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_clear_error(data: bytes) -> None:
    _decode(data)


@SETTINGS
@given(mutated_files())
def test_mutated_files_decode_or_clear_error(data: bytes) -> None:
    _decode(data)


@SETTINGS
@given(
    st.sampled_from(["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
                     "I", "I;16", "I;16B", "F"]),
    st.integers(0, 300),
    st.integers(0, 300),
    st.integers(0, 255),
)
def test_in_memory_images_convert_or_clear_error(mode: str, w: int, h: int, fill: int) -> None:
    img = Image.new(mode, (w, h), fill if Image.getmodebands(mode) == 1 else 0)
    with time_limit(HANG_SECONDS):
        try:
            out = as_rgb_image(img, "in-memory")
        except CDRetrievalError:
            assert w == 0 or h == 0 or max(w, h) > 100 * min(w, h)
            return
    _check_rgb(out)
    assert out.size == (w, h)


# ---------------------------------------------------------------------------------------------------------
# The query path: encode and search


def _check_hits(hits: list[SearchResult], k: int, targets: list[str], retriever: Retriever) -> None:
    gallery = sum(len(retriever.indexes[t]) for t in targets)
    assert len(hits) == min(k, gallery)
    assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
    scores = [h.score for h in hits]
    calibrated = [h.calibrated_score for h in hits]
    assert all(np.isfinite(scores)) and all(c is not None and np.isfinite(c) for c in calibrated)
    assert calibrated == sorted(calibrated, reverse=True)  # type: ignore[type-var]  # the merged order
    for d in {h.domain for h in hits}:  # within a domain, by cosine
        assert [h.score for h in hits if h.domain == d] == sorted((h.score for h in hits if h.domain == d),
                                                                  reverse=True)
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
    assert {h.domain for h in hits} <= set(targets)


@SETTINGS
@given(st.one_of(mutated_files(), st.binary(max_size=512)), st.one_of(st.integers(1, 400), st.integers(-2, 0)))
def test_encode_and_search_fuzzed_files(retriever: Retriever, data: bytes, k: int) -> None:
    with time_limit(HANG_SECONDS):
        try:
            emb = retriever.encode(data)
        except CDRetrievalError:
            emb = None
        if emb is not None:
            assert emb.shape == (32,) and emb.dtype == np.float32 and np.isfinite(emb).all()
            assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4
        try:
            hits = retriever.search(data, "photo", k=k)
        except CDRetrievalError:
            assert emb is None or k < 1
            return
    assert emb is not None and k >= 1
    _check_hits(hits, k, ["photo"], retriever)


_DTYPES = [np.uint8, np.float32, np.float64, np.float16, np.int16, np.int64, np.bool_, np.complex64]
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def arrays(draw: st.DrawFn) -> Any:
    """Random numpy arrays and torch tensors: half image-like ((H,W[,C]) uint8/float in [0, 1]), half anything
    (any rank, shape and dtype; NaN, inf, huge, negative values)."""
    if draw(st.booleans()):  # image-like: mostly accepted
        h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        shape: tuple[int, ...] = (h, w) if draw(st.booleans()) else (h, w, draw(st.sampled_from([1, 3, 4])))
        dtype: Any = draw(st.sampled_from([np.uint8, np.float32, np.float64]))
        fill = "unit"
    else:
        ndim = draw(st.integers(0, 4))
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from(_DTYPES))
        fill = draw(st.sampled_from(["random", "unit", "constant"]))
    size = int(np.prod(shape)) if shape else 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if fill == "random":
        a = rng.normal(0, draw(st.sampled_from([0.3, 10.0, 1e30])), size)
    elif fill == "unit":
        a = rng.uniform(0, 1, size)
    else:
        a = np.full(size, draw(_FLOATS))
    with np.errstate(all="ignore"):
        a = (a * 255).astype(np.uint8) if dtype is np.uint8 else a.astype(dtype)
    a = a.reshape(shape)
    if draw(st.booleans()) and a.dtype != np.complex64 and a.ndim >= 1:
        channels_first = a.transpose(2, 0, 1) if a.ndim == 3 else a  # (H,W,C) → (C,H,W)
        return torch.from_numpy(np.ascontiguousarray(channels_first))
    return a


@st.composite
def embeddings(draw: st.DrawFn) -> Any:
    """Query embeddings: mostly [Q, 32] / [32] of a real dtype, sometimes with a NaN, inf or all-zero row."""
    if not draw(st.booleans()):
        return draw(arrays())
    q = draw(st.integers(0, 5))
    shape = (q, 32) if draw(st.booleans()) else (32,)
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.normal(0, draw(st.sampled_from([1e-3, 1.0, 1e3])), shape)
    spoil = draw(st.sampled_from(["none", "none", "nan", "inf", "zero"]))
    if spoil != "none" and a.size:
        row = a.reshape(-1, 32)[draw(st.integers(0, max(0, a.size // 32 - 1)))]
        row[:] = 0.0 if spoil == "zero" else (np.nan if spoil == "nan" else np.inf)
    with np.errstate(all="ignore"):
        return a.astype(dtype)


_K = st.one_of(st.integers(1, 300), st.integers(-3, 0), st.sampled_from([2**40, 0.5, None, "3", True]))


@SETTINGS
@given(
    arrays(),
    st.one_of(st.none(), st.sampled_from(["ink", "photo", "outline", "sketch", ""]),
              st.lists(st.sampled_from(["ink", "photo", "outline", "Photo"]), max_size=3)),
    _K,
    st.one_of(st.none(), st.sampled_from(["ink", "photo", "nope"])),
)
def test_search_random_arrays_and_parameters(
    retriever: Retriever, query: Any, target: Any, k: Any, source: Any
) -> None:
    with time_limit(HANG_SECONDS):
        try:
            response = retriever.retrieve(query, target, k=k, source_domain=source)  # None: detect it
        except CDRetrievalError:
            return
    assert isinstance(k, int) and not isinstance(k, bool) and k >= 1
    if target is None:
        own = source if source is not None else response.source_domain
        targets = [d for d in retriever.domains if d != own]
    else:
        targets = [target] if isinstance(target, str) else list(dict.fromkeys(target))
    assert response.target_domains == targets
    _check_hits(response.results, k, targets, retriever)


@SETTINGS
@given(embeddings(), st.one_of(st.integers(1, 200), st.integers(-1, 0)))
def test_search_embeddings_random_arrays(retriever: Retriever, emb: Any, k: int) -> None:
    try:
        out = retriever.search_embeddings(emb, ["ink", "photo"], k=k)
    except CDRetrievalError:
        return
    for hits in out:
        _check_hits(hits, k, ["ink", "photo"], retriever)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seed_files_are_valid(seed: int) -> None:
    """The mutation seeds themselves decode (so the fuzzers start from real files)."""
    _check_rgb(load_image_bytes(SEEDS[seed]))
