"""Batched feature extraction over image samples: progress bar, mixed precision, counted skips.

``extract`` is the one loop that turns images into vectors; training (feature caches, bank filling),
indexing and evaluation all go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cdretrieval.data.datasets import ImageDataset, collate_skipping
from cdretrieval.data.folders import Sample
from cdretrieval.data.transforms import ImageTransform
from cdretrieval.device import autocast


@dataclass
class Extracted:
    """Features of the readable samples. ``indices[j]`` is the sample index of ``features[j]``."""

    features: torch.Tensor  # [N_ok, F] float32 on CPU
    indices: torch.Tensor  # [N_ok] long
    bad: list[tuple[int, str]] = field(default_factory=list)  # (sample index, reason)


def make_loader(
    samples: Sequence[Sample],
    transform: ImageTransform,
    batch_size: int,
    num_workers: int,
    seed: int | None = None,
    shuffle: bool = False,
) -> DataLoader:
    """A loader over ``samples`` yielding ``{"images", "indices", "bad"}`` dicts (bad files skipped)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        generator=gen,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )


@torch.no_grad()
def extract(
    fn: Callable[[torch.Tensor], torch.Tensor],
    samples: Sequence[Sample],
    transform: ImageTransform,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    batch_size: int = 64,
    num_workers: int = 2,
    seed: int | None = None,
    desc: str = "embedding",
    progress: bool = True,
) -> Extracted:
    """Run ``fn`` (e.g. ``encoder.embed``) over every sample in order; return float32 CPU features.

    ``seed`` makes random (training) transforms reproducible: workers are seeded from it.
    """
    if seed is not None and num_workers == 0:
        torch.manual_seed(seed)
    loader = make_loader(samples, transform, batch_size, num_workers, seed=seed)
    feats: list[torch.Tensor] = []
    idx: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False)
    for batch in loader:
        bad.extend(batch["bad"])
        bar.update(len(batch["indices"]) + len(batch["bad"]))
        if len(batch["indices"]) == 0:
            continue
        x = batch["images"].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            y = fn(x)
        feats.append(y.float().cpu())
        idx.append(batch["indices"])
    bar.close()
    if not feats:
        return Extracted(torch.empty(0, 0), torch.empty(0, dtype=torch.long), bad)
    return Extracted(torch.cat(feats), torch.cat(idx), bad)
