from pathlib import Path

import numpy as np
import pytest

from cdretrieval.data.digits import load_npz_domain, materialize_npz_root, paired_domains, resolve_data_root
from cdretrieval.data.folders import scan_domains
from cdretrieval.data.images import load_image
from cdretrieval.errors import DataError


def test_npz_roundtrip_and_pairs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "mnist.npz", images=rng.integers(0, 255, (6, 28, 28), dtype=np.uint8), labels=np.arange(6) % 3)
    np.savez(src / "mnistm.npz", images=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8), labels=np.arange(6) % 3)
    root = resolve_data_root(src)
    assert root != src and paired_domains(root) == [("mnist", "mnistm")]
    data = scan_domains(root)
    assert {d: len(s) for d, s in data.items()} == {"mnist": 6, "mnistm": 6}
    first = sorted(data["mnist"], key=lambda s: Path(s.path).stem)[0]
    assert Path(first.path).stem == "00000" and first.label == "0"
    arr = np.asarray(load_image(first.path))[..., 0]
    assert np.array_equal(arr, np.load(src / "mnist.npz")["images"][0])
    assert materialize_npz_root(src) == root  # second call reuses


def test_bad_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="'images' and 'labels'"):
        load_npz_domain(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        load_npz_domain(tmp_path / "y.npz")


def test_shared_digits(digits_root: Path) -> None:
    images, labels = load_npz_domain(digits_root / "mnistm.npz")
    assert images.shape == (5000, 32, 32, 3) and set(np.unique(labels)) == set(range(10))
