import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from cdretrieval.data.demo import DEMO_DOMAINS, DEMO_SIZE, generate_demo_data
from cdretrieval.data.folders import scan_domains


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_well_formed(tmp_path: Path, demo_root: Path) -> None:
    again = generate_demo_data(tmp_path / "again", per_domain=120)
    assert _digest(again) == _digest(demo_root)
    data = scan_domains(demo_root)
    assert tuple(data) == tuple(sorted(DEMO_DOMAINS))
    for samples in data.values():
        assert len(samples) == 120
        assert {s.label for s in samples} == {str(d) for d in range(10)}
    # domains are rendered from disjoint digits: no shared source id
    ids = [{Path(s.path).stem.split("_")[1] for s in samples} for samples in data.values()]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    assert generate_demo_data(demo_root) == demo_root  # complete → reused


def test_demo_digits_are_pen_strokes_framed_like_a_ui_drawing(demo_root: Path) -> None:
    """Images at the demo's 128 px; the ink digit is a thin stroke (not a blob) whose longer side fills
    about 73.5 % of the image, centred — the framing the UI gives a drawing."""
    assert DEMO_SIZE == 128
    for path in sorted((demo_root / "ink").rglob("*.png"))[:20]:
        img = Image.open(path)
        assert img.size == (DEMO_SIZE, DEMO_SIZE)
        ink = np.asarray(img.convert("L")) < 128
        ys, xs = np.nonzero(ink)
        height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert 0.65 * DEMO_SIZE <= max(height, width) <= 0.8 * DEMO_SIZE
        centre = ((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2)
        assert max(abs(c - DEMO_SIZE / 2) for c in centre) <= 4
        assert ink.mean() < 0.2  # strokes, not filled blobs
    for path in sorted((demo_root / "photo").rglob("*.png"))[:5]:
        assert Image.open(path).size == (DEMO_SIZE, DEMO_SIZE)
