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
    """``i → (image tensor, i)``; with ``skip_bad`` an unreadable file yields ``(None, i, reason)``.

    Pair with :func:`collate_skipping` so a batch drops the bad items and reports them.
    """

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform, skip_bad: bool = True):
        self.samples = list(samples)
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return self.transform(load_image(self.samples[i].path)), i, ""
        except ImageLoadError as e:
            if not self.skip_bad:
                raise
            return None, i, str(e)


def collate_skipping(batch: list[tuple[torch.Tensor | None, int, str]]) -> dict[str, Any]:
    """Stack the good images; list the bad ones as ``(index, reason)``."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, reason) for x, i, reason in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return {"images": images, "indices": torch.tensor([i for _, i in good], dtype=torch.long), "bad": bad}


def warn_skipped(bad: Sequence[tuple[int, str]], what: str) -> None:
    """One warning that counts and names (the first few) skipped files — never a silent skip."""
    if not bad:
        return
    shown = "; ".join(reason for _, reason in list(bad)[:3])
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    warnings.warn(f"{what}: skipped {len(bad)} unreadable image(s): {shown}{more}", stacklevel=2)
