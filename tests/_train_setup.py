"""The small training configs the tests share (imported as ``from _train_setup import small_config, shrunk``)."""

from __future__ import annotations

from pathlib import Path

from cdretrieval.config import RunConfig


def shrunk(cfg: RunConfig, *, hidden_dim: int = 128, **train: object) -> RunConfig:
    """``cfg`` made test-sized, in place: 64 px images decoded in the main process, a ``hidden_dim``→32 head,
    batches of 16 on the CPU; ``train`` overrides :class:`~cdretrieval.config.TrainConfig` fields."""
    cfg.data.image_size = 64
    cfg.data.num_workers = 0
    cfg.model.hidden_dim = hidden_dim
    cfg.model.dim = 32
    cfg.train.batch_size = 16
    cfg.train.device = "cpu"
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def small_config(root: Path | None, *, hidden_dim: int = 128, **train: object) -> RunConfig:
    """A frozen-mode CPU config small enough for tests (:func:`shrunk`, no flips, 2 cached views, 3 epochs,
    5 and 10 clusters); ``root``: the data root (None: left unset); ``train`` overrides
    :class:`~cdretrieval.config.TrainConfig` fields."""
    cfg = RunConfig()
    if root is not None:
        cfg.data.root = str(root)
    cfg.data.hflip = 0.0
    cfg.train.mode = "frozen"
    cfg.losses.num_clusters = [5, 10]
    return shrunk(cfg, hidden_dim=hidden_dim, **{"cached_views": 2, "epochs": 3, **train})
