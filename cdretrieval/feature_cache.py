"""The frozen/partial-mode feature cache: backbone features (or lower feature maps) of every image's views.

``frozen`` and ``partial`` training never run the cached part of the backbone during training: its outputs
for one clean and ``cached_views`` augmented views of every image are computed once (each file decoded
once for all its views, the network under ONNX Runtime on CPU) and stored on disk under a key that names
everything they depend on (:func:`feature_cache_key`). :class:`CachedInputModel` is what trains on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdretrieval.config import RunConfig
from cdretrieval.data.datasets import warn_skipped
from cdretrieval.data.folders import Sample
from cdretrieval.data.transforms import eval_transform, train_transform
from cdretrieval.device import amp_dtype, autocast, torch_threads, use_channels_last
from cdretrieval.errors import DataError
from cdretrieval.io import atomic_torch_save, torch_load
from cdretrieval.models.backbones import BackboneSplit
from cdretrieval.models.encoder import Encoder
from cdretrieval.models.runtime import frozen_forward

#: Version of the feature cache's content definition, part of its key. 2: every image decoded once for all
#: its views, augmented view v of sample i seeded by (seed, v, i); ONNX Runtime on CPU.
FEATURE_CACHE_FORMAT = 2

#: Image views per backbone batch in the cache pass (images per batch = this ÷ (1 + cached_views)).
CACHE_BATCH_VIEWS = 64


#: Training modes that train on cached inputs (backbone features or the lower part's maps).
CACHED_MODES = ("frozen", "partial")


def feature_cache_key(cfg: RunConfig, samples: Sequence[Sample], mode: str = "frozen") -> str:
    """Identity of a feature cache: format, backbone, weights, size, augmentation, views, seed, files, and
    in ``partial`` mode the cut (``trainable_units``)."""
    d, m, t = cfg.data, cfg.model, cfg.train
    fields: list[Any] = [FEATURE_CACHE_FORMAT, m.backbone, m.weights, d.image_size, d.aug_strength, d.min_scale,
                         d.hflip, d.blur, t.cached_views, t.seed]
    if mode == "partial":
        fields += ["partial", t.trainable_units]
    h = hashlib.sha256()
    h.update(json.dumps(fields).encode())
    for s in samples:  # real paths: the same files reached through links share one cache
        h.update(os.path.realpath(s.path).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class ViewFeatures:
    """Backbone features of every view of the readable samples: ``features[v, j]`` is view ``v`` (0 clean)
    of sample ``indices[j]``."""

    features: Tensor  # [1 + V, N_ok, F] float32 on CPU
    indices: Tensor  # [N_ok] long
    bad: list[tuple[int, str]]  # (sample index, reason)


def extract_views(
    fn: Callable[[Tensor], Tensor],
    samples: Sequence[Sample],
    cfg: RunConfig,
    *,
    device: torch.device,
    amp: torch.dtype | None = None,
    channels_last: bool = False,
    num_workers: int | None = None,
    desc: str = "views",
    progress: bool = True,
) -> ViewFeatures:
    """Run ``fn`` (``[n, 3, S, S]`` → ``[n, F]``) over the clean view and ``cfg.train.cached_views`` augmented
    views of every sample, decoding each file once (:class:`~cdretrieval.data.views.MultiViewDataset`).

    Augmented view ``v`` of sample ``i`` is ``train_transform`` seeded by ``(cfg.train.seed, v, i)``, so the
    result does not depend on ``num_workers`` (default ``cfg.data.num_workers``) or on batching. Each batch
    holds ~:data:`CACHE_BATCH_VIEWS` image views, view-major, so ``fn`` sees batches of the usual size.
    """
    from torch.utils.data import DataLoader

    from cdretrieval.data.datasets import collate_skipping
    from cdretrieval.data.views import MultiViewDataset

    dcfg, nv = cfg.data, cfg.train.cached_views
    workers = dcfg.num_workers if num_workers is None else num_workers
    aug = train_transform(dcfg.image_size, dcfg.aug_strength, dcfg.min_scale, dcfg.hflip, dcfg.blur)
    loader = DataLoader(
        MultiViewDataset(samples, eval_transform(dcfg.image_size), aug, nv, cfg.train.seed),
        batch_size=max(1, CACHE_BATCH_VIEWS // (1 + nv)), shuffle=False, num_workers=workers,
        collate_fn=collate_skipping, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # the loader's base seed; leaves the global RNG alone
        prefetch_factor=4 if workers > 0 else None,
    )
    feats: list[Tensor] = []
    idx: list[Tensor] = []
    bad: list[tuple[int, str]] = []
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in loader:
            bad.extend(batch["bad"])
            indices: Tensor = batch["indices"]
            bar.update(len(indices) + len(batch["bad"]))
            if len(indices) == 0:
                continue
            views: Tensor = batch["images"]  # [b, 1 + V, 3, S, S]
            b = views.shape[0]
            x = views.transpose(0, 1).reshape(-1, *views.shape[2:]).to(device, non_blocking=True)  # [(1+V)·b, 3, S, S]
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), autocast(device, amp):
                y = fn(x)  # [(1+V)·b, F]
            feats.append(y.float().cpu().view(1 + nv, b, -1))
            idx.append(indices)
    if not feats:
        return ViewFeatures(torch.empty(1 + nv, 0, 0), torch.empty(0, dtype=torch.long), bad)
    return ViewFeatures(torch.cat(feats, dim=1), torch.cat(idx), bad)


def build_feature_cache(
    encoder: Encoder,
    samples: Sequence[Sample],
    cfg: RunConfig,
    device: torch.device,
    cache_root: Path,
    domain: str,
    progress: bool = True,
    split: BackboneSplit | None = None,
) -> tuple[Tensor, list[Sample]]:
    """Backbone features ``[1 + V, N_ok, F]`` (view 0 clean, views 1..V augmented) for a domain's images;
    with ``split`` (partial mode) the lower part's flattened maps ``[1 + V, N_ok, C·h·w]`` instead.

    Cached (fp16, atomic) under ``cache_root/<key>.pt`` and returned as the fp16 values (so a fresh build
    and a later load give the same numbers; float32 for features, fp16 for maps, which are larger);
    unreadable images are dropped (and warned about) so the returned sample list matches the rows. Each
    image is decoded once for all its views (:func:`extract_views`); on CPU the network runs under ONNX
    Runtime when it can (:func:`~cdretrieval.models.runtime.frozen_forward`).
    """
    key = feature_cache_key(cfg, samples, "partial" if split is not None else "frozen")
    path = cache_root / f"{key}.pt"
    if path.is_file():
        try:
            blob = torch_load(path)
            kept = [samples[i] for i in blob["kept"].tolist()]
            return (blob["features"] if split is not None else blob["features"].float()), kept
        except Exception as e:  # a corrupt cache is rebuilt, never trusted
            warnings.warn(f"feature cache {path} unreadable ({e}); rebuilding", stacklevel=2)
    encoder.backbone.eval()
    backbone: nn.Module = encoder.backbone if split is None else split.lower.eval()
    forward = frozen_forward(backbone, cfg.data.image_size, device)
    desc = f"{domain}: {1 + cfg.train.cached_views} views"
    if forward.runtime == "onnxruntime":
        # ONNX Runtime runs its fp32 graph on its own threads (autocast and channels_last change nothing), so
        # torch's threads here only serve the loader (decoding and augmenting, with num_workers=0), whose small
        # ops run far faster on one thread than on two contended ones (see torch_threads).
        with torch_threads(1):
            got = extract_views(forward, samples, cfg, device=device, desc=desc, progress=progress)
    else:
        cl = use_channels_last(device, cfg.model.backbone)
        if cl:
            backbone.to(memory_format=torch.channels_last)
        got = extract_views(forward, samples, cfg, device=device, channels_last=cl, desc=desc, progress=progress,
                            amp=amp_dtype(device, cfg.train.precision, cfg.model.backbone))
    warn_skipped(got.bad, f"domain {domain}")
    if len(got.indices) == 0:
        raise DataError(f"domain {domain!r}: no readable images")
    kept_idx = got.indices.tolist()
    feats = got.features.half()  # [1+V, N, F]
    atomic_torch_save({"features": feats, "kept": got.indices.clone(), "format": FEATURE_CACHE_FORMAT}, path)
    return (feats if split is not None else feats.float()), [samples[i] for i in kept_idx]


class CachedInputModel(nn.Module):
    """What trains on cached inputs: ``[B, F_in]`` → head output ``[B, dim]`` (not normalised).

    Frozen mode: ``F_in`` = pooled backbone features, the model is the head. Partial mode: ``F_in`` = the lower
    part's flattened maps, the model is ``head(upper(x))``.
    """

    def __init__(self, head: nn.Module, upper: nn.Module | None = None):
        super().__init__()
        self.head = head
        self.upper = upper

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.upper is not None:
            x = self.upper(x)
        return self.head(x)


__all__ = [
    "CACHED_MODES",
    "CACHE_BATCH_VIEWS",
    "FEATURE_CACHE_FORMAT",
    "CachedInputModel",
    "ViewFeatures",
    "build_feature_cache",
    "extract_views",
    "feature_cache_key",
]
