"""Batched feature extraction over image samples: progress bar, mixed precision, counted skips.

``extract`` turns a sample list into one feature tensor (training: feature caches, bank filling);
``iter_extract`` streams the same loop batch by batch with each image's size, for the resumable,
chunked embedding of :mod:`cdretrieval.domain_embeddings` (indexing, evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over ``samples`` yielding ``{"images", "indices", "sizes", "bad"}`` dicts (bad files skipped).

    ``seed`` seeds the workers (or, with no workers, the main process), so random transforms repeat.
    """
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be ≥ 1 and num_workers ≥ 0, got {batch_size}, {num_workers}")
    if seed is not None and num_workers == 0:
        torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        generator=gen,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
    )


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

    The collected form of :func:`iter_extract`. ``seed`` makes random (training) transforms reproducible.
    """
    feats: list[torch.Tensor] = []
    idx: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in iter_extract(fn, samples, transform, device=device, amp=amp, channels_last=channels_last,
                                  batch_size=batch_size, num_workers=num_workers, seed=seed):
            bad.extend(batch.bad)
            bar.update(batch.count)
            if len(batch.indices):
                feats.append(batch.features)
                idx.append(batch.indices)
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
    seed: int | None = None,
) -> Iterator[ExtractedBatch]:
    """Run ``fn`` over ``samples`` in order and yield one :class:`ExtractedBatch` per loader batch.

    One loader serves the whole sequence, so its workers keep decoding (``prefetch_factor`` batches
    ahead each) while the model runs; callers that checkpoint partial results (resumable embedding)
    do so between batches without restarting the workers. A batch of only unreadable files is still
    yielded (with no rows) so the caller can count them.
    """
    loader = make_loader(samples, transform, batch_size, num_workers, seed=seed, pin_memory=device.type == "cuda")
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
