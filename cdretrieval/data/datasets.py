"""Torch data sets over :class:`~cdretrieval.data.folders.Sample` lists, with counted skipping of bad files."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cdretrieval.data.folders import Sample
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import ImageTransform
from cdretrieval.errors import ImageLoadError


class ImageDataset(Dataset[Any]):
    """``i → (image tensor, i, "", (width, height))``; with ``skip_bad`` an unreadable file yields
    ``(None, i, reason, (0, 0))``. The size is read in the worker that decodes the image anyway.

    Pair with :func:`collate_skipping` so a batch drops the bad items and reports them.
    """

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform, skip_bad: bool = True):
        self.samples = list(samples)
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, tuple[int, int]]:
        try:
            img = load_image(self.samples[i].path)
            return self.transform(img), i, "", img.size
        except ImageLoadError as e:
            if not self.skip_bad:
                raise
            return None, i, str(e), (0, 0)


def collate_skipping(batch: list[tuple[torch.Tensor | None, int, str, tuple[int, int]]]) -> dict[str, Any]:
    """Stack the good images (with ``indices`` and ``sizes`` [b_ok, 2]); list the bad ones as ``(index, reason)``."""
    good = [(x, i, size) for x, i, _, size in batch if x is not None]
    bad = [(i, reason) for x, i, reason, _ in batch if x is None]
    return {
        "images": torch.stack([x for x, _, _ in good]) if good else torch.empty(0),
        "indices": torch.tensor([i for _, i, _ in good], dtype=torch.long),
        "sizes": torch.tensor([size for _, _, size in good], dtype=torch.long).reshape(-1, 2),
        "bad": bad,
    }


def warn_skipped(bad: Sequence[tuple[int, str]], what: str) -> None:
    """One warning that counts and names (the first few) skipped files — never a silent skip."""
    if not bad:
        return
    shown = "; ".join(reason for _, reason in list(bad)[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    warnings.warn(f"{what}: skipped {len(bad)} unreadable image(s): {shown}{more}", stacklevel=2)
