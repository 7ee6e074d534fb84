"""Training is deterministic at the default thread count (issue 14): the same seed, data and feature cache
give identical checkpoints, and an interrupted run resumed from its checkpoint equals the uninterrupted one.

Sizes matter: the bank update that used to differ between runs (a row repeated in a batch, written by
several threads) only runs multi-threaded with batches of ~64 × 256-d embeddings, so the config keeps the
default head (1024 → 256) and batch size on a few dozen PACS images per domain.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from _train_setup import small_config

from cdretrieval.config import RunConfig
from cdretrieval.run import load_checkpoint
from cdretrieval.train import Trainer, pretrain

DOMAINS, CLASSES, PER_CLASS = ("photo", "sketch"), ("dog", "giraffe", "house"), 15


@pytest.fixture(scope="module")
def small_pacs(pacs_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """45 PACS images in each of two domains (copies, so the folder is the same on every machine)."""
    root = tmp_path_factory.mktemp("pacs_small")
    for d in DOMAINS:
        for c in CLASSES:
            (root / d / c).mkdir(parents=True)
            for f in sorted((pacs_root / d / c).iterdir())[:PER_CLASS]:
                shutil.copy(f, root / d / c / f.name)
    return root


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


def _config(root: Path) -> RunConfig:
    """Default batch and head sizes (see the module docstring); 45 images per batch of 64 repeat rows."""
    cfg = small_config(root, epochs=3, batch_size=64)
    cfg.model.hidden_dim = 1024
    cfg.model.dim = 256
    return cfg


def _assert_same_run(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Two checkpoints hold exactly the same weights, banks, MIM state, step and losses."""
    for part in ("model", "banks", "mim"):
        assert a[part].keys() == b[part].keys()
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[part][k]), (part, k, float((v.double() - b[part][k].double()).abs().max()))
    assert a["step"] == b["step"] and a["last_losses"] == b["last_losses"]


def test_same_seed_gives_identical_checkpoints(small_pacs: Path, features: Path, tmp_path: Path) -> None:
    assert torch.get_num_threads() == min(2, os.cpu_count() or 1)  # the default the conftest keeps, not one
    cfg = _config(small_pacs)
    for name in ("a", "b"):
        pretrain(cfg, tmp_path / name, progress=False, feature_cache=features)
    _assert_same_run(load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b"))


def test_resumed_run_equals_uninterrupted_run(small_pacs: Path, features: Path, tmp_path: Path) -> None:
    cfg = _config(small_pacs)
    pretrain(cfg, tmp_path / "full", progress=False, feature_cache=features)
    Trainer(cfg, tmp_path / "part", progress=False, feature_cache=features).fit(stop_after_epochs=2)
    Trainer(cfg, tmp_path / "part", progress=False, feature_cache=features).fit(resume=True)
    _assert_same_run(load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part"))
