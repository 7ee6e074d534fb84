"""Several views of each image from one decode: the clean view plus ``V`` seeded augmented views.

The frozen-mode feature cache needs ``1 + V`` views of every image. Decoding the file once for all of them
(instead of once per view and pass) saves ``V`` decodes per image, and seeding each augmented view from
``(seed, view, sample index)`` makes the views independent of worker count, batch size and order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cdretrieval.data.folders import Sample
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import ImageTransform
from cdretrieval.errors import ImageLoadError


def view_seed(seed: int, view: int, index: int) -> int:
    """The RNG seed of augmented ``view`` (1..V) of sample ``index`` under run ``seed``: a hash, so
    neighbouring triples get unrelated random streams. In ``[0, 2**63)``."""
    digest = hashlib.blake2b(f"{seed}:{view}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class MultiViewDataset(Dataset[Any]):
    """``i → (views [1 + V, 3, S, S], i, "", (width, height))``: view 0 is ``clean(image)``, view ``v ≥ 1`` is
    ``augment(image)`` with torch's global RNG seeded by :func:`view_seed`; an unreadable file yields
    ``(None, i, reason, (0, 0))``. Pairs with :func:`~cdretrieval.data.datasets.collate_skipping`, which
    stacks the good items into ``[b, 1 + V, 3, S, S]``.

    ``augment`` must draw its randomness from torch's global generator (torchvision's v1 transforms do). That
    generator's state is restored after each item, so a main-process loader (``num_workers=0``) leaves the
    caller's random stream untouched.
    """

    def __init__(
        self, samples: Sequence[Sample], clean: ImageTransform, augment: ImageTransform, views: int, seed: int
    ):
        if views < 0:
            raise ValueError(f"views must be ≥ 0, got {views}")
        self.samples = list(samples)
        self.clean = clean
        self.augment = augment
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, tuple[int, int]]:
        try:
            img = load_image(self.samples[i].path)
        except ImageLoadError as e:
            return None, i, str(e), (0, 0)
        out = [self.clean(img)]
        state = torch.get_rng_state()
        try:
            for v in range(1, self.views + 1):
                # the generator itself, not torch.manual_seed: that also visits every accelerator (~0.8 ms)
                torch.default_generator.manual_seed(view_seed(self.seed, v, i))
                out.append(self.augment(img))
        finally:
            torch.set_rng_state(state)
        return torch.stack(out), i, "", img.size
