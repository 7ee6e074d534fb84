"""Tiny fabricated data sets in the real layouts and naming of the benchmark presets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _image(label_index: int, variant: int, size: int = 40) -> Image.Image:
    """A small picture whose content depends on its class: a bar at a class-specific height."""
    rng = np.random.default_rng(1000 * label_index + variant)
    arr = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    top = 4 + (label_index * 7) % (size - 10)
    arr[top : top + 6, 4 : size - 4] = (255, 255 - 40 * (label_index % 5), 40 * (label_index % 6))
    return Image.fromarray(arr)


def write_domain_folders(
    root: Path, domains: Sequence[str], classes: Sequence[str], per_class: int = 2, ext: str = ".png"
) -> Path:
    """``root/<domain>/<class>/<domain>_<class>_<i><ext>`` for every domain and class."""
    for d in domains:
        for c_idx, c in enumerate(classes):
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _image(c_idx, i).save(folder / f"{d.replace(' ', '_')}_{c}_{i:03d}{ext}")
    return root


def write_lists(root: Path, domain: str, splits: dict[str, int], suffix: str = ".txt") -> None:
    """Split the domain's images (sorted) into consecutive list files ``<domain>_<split><suffix>``.

    ``splits`` maps split name → how many images of every class go into it (in order). Lines are
    ``<domain>/<class>/<file> <label>`` as in DomainNet's and PACS's official lists.
    """
    classes = sorted(p.name for p in (root / domain).iterdir() if p.is_dir())
    lines: dict[str, list[str]] = {s: [] for s in splits}
    for label, c in enumerate(classes):
        files = sorted((root / domain / c).iterdir())
        start = 0
        for split, n in splits.items():
            lines[split] += [f"{domain}/{c}/{f.name} {label}" for f in files[start : start + n]]
            start += n
    for split, ls in lines.items():
        (root / f"{domain}_{split}{suffix}").write_text("\n".join(ls) + "\n")


def write_digits(root: Path, names: Sequence[str] = ("mnist", "mnistm", "usps"), n: int = 16) -> Path:
    """``root/<name>.npz`` with ``images`` and ``labels``; MNIST-M image i is MNIST image i over noise."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    strokes = np.zeros((n, 28, 28), np.uint8)
    for i, lab in enumerate(labels):
        strokes[i, 3 + 6 * lab : 8 + 6 * lab, 4 + i % 3 : 22 + i % 3] = 255
    arrays = {
        "mnist": strokes,
        "mnistm": np.abs(rng.integers(0, 120, (n, 28, 28, 3)) - strokes[..., None].astype(int)).astype(np.uint8),
        "usps": strokes[:, ::2, ::2].copy(),
    }
    for name in names:
        np.savez(root / f"{name}.npz", images=arrays[name], labels=labels)
    return root


class Fabricate:
    """The writers above, handed to tests as one fixture (helpers in a conftest cannot be imported)."""

    folders = staticmethod(write_domain_folders)
    lists = staticmethod(write_lists)
    digits = staticmethod(write_digits)


@pytest.fixture
def fabricate() -> Fabricate:
    return Fabricate()
