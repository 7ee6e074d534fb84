"""Batched feature extraction over image samples: progress bar, mixed precision, counted skips.

``extract`` turns a sample list into one feature tensor (training: feature caches, bank filling);
``iter_extract`` streams the same loop batch by batch with each image's size, for the resumable,
chunked embedding of :mod:`cdretrieval.pipeline` (indexing, evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cdretrieval.data.datasets import ImageDataset, collate_skipping
from cdretrieval.data.folders import Sample
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import ImageTransform
from cdretrieval.device import autocast
from cdretrieval.errors import ImageLoadError


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


# ---------------------------------------------------------------------------------------------------------
# Streaming variant: one batch at a time, with each image's decoded size (for item tables).


@dataclass
class ExtractedBatch:
    """Features of one loader batch. Batches arrive in sample order, so after a batch every sample index
    below ``max(indices + bad) + 1`` has been seen."""

    features: torch.Tensor  # [b_ok, F] float32 on CPU
    indices: torch.Tensor  # [b_ok] long, sample index of each row
    sizes: torch.Tensor  # [b_ok, 2] long, (width, height) of each decoded image
    bad: list[tuple[int, str]]  # (sample index, reason) of the unreadable ones

    @property
    def count(self) -> int:
        """Samples this batch accounts for (readable + unreadable)."""
        return len(self.indices) + len(self.bad)


class _SizedImageDataset(Dataset[Any]):
    """``i → (image tensor | None, i, reason, (width, height))``: like ``ImageDataset`` plus the image size,
    read in the worker that decodes the image anyway (no second open of the file)."""

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str, tuple[int, int]]:
        try:
            img = load_image(self.samples[i].path)
            return self.transform(img), i, "", img.size
        except ImageLoadError as e:
            return None, i, str(e), (0, 0)


def _collate_sized(batch: list[tuple[torch.Tensor | None, int, str, tuple[int, int]]]) -> dict[str, Any]:
    """:func:`collate_skipping` plus ``sizes`` [b_ok, 2] of the readable images."""
    out = collate_skipping([(x, i, reason) for x, i, reason, _ in batch])
    sizes = [size for x, _, _, size in batch if x is not None]
    out["sizes"] = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2)
    return out


def iter_extract(
    fn: Callable[[torch.Tensor], torch.Tensor],
    samples: Sequence[Sample],
    transform: ImageTransform,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    batch_size: int = 64,
    num_workers: int = 2,
) -> Iterator[ExtractedBatch]:
    """Run ``fn`` over ``samples`` in order and yield one :class:`ExtractedBatch` per loader batch.

    One loader serves the whole sequence, so its workers keep decoding (``prefetch_factor`` batches
    ahead each) while the model runs; callers that checkpoint partial results (resumable embedding)
    do so between batches without restarting the workers. A batch of only unreadable files is still
    yielded (with no rows) so the caller can count them.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be ≥ 1 and num_workers ≥ 0, got {batch_size}, {num_workers}")
    loader = DataLoader(
        _SizedImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_sized,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    for batch in loader:
        indices: torch.Tensor = batch["indices"]
        if len(indices) == 0:
            yield ExtractedBatch(torch.empty(0, 0), indices, batch["sizes"], batch["bad"])
            continue
        x = batch["images"].to(device, non_blocking=True)  # [b, 3, H, W]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(device, amp):
            y = fn(x)  # [b, F]
        yield ExtractedBatch(y.float().cpu(), indices, batch["sizes"], batch["bad"])
