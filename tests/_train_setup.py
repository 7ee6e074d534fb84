"""The small training config the trainer's tests share (imported as ``from _train_setup import small_config``)."""

from __future__ import annotations

from pathlib import Path

from cdretrieval.config import RunConfig


def small_config(root: Path, **train: object) -> RunConfig:
    """A frozen-mode CPU config small enough for tests: 64 px, a 128→32 head, 2 cached views, batch 16, 3 epochs;
    ``train`` overrides :class:`~cdretrieval.config.TrainConfig` fields."""
    cfg = RunConfig()
    cfg.data.root = str(root)
    cfg.data.image_size = 64
    cfg.data.hflip = 0.0
    cfg.data.num_workers = 0
    cfg.model.hidden_dim = 128
    cfg.model.dim = 32
    cfg.train.mode = "frozen"
    cfg.train.cached_views = 2
    cfg.train.batch_size = 16
    cfg.train.epochs = 3
    cfg.train.device = "cpu"
    cfg.losses.num_clusters = [5, 10]
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg
