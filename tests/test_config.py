from pathlib import Path

import pytest
import yaml

from cdretrieval.config import LossConfig, RunConfig, TrainConfig, backbone_lr_scale, cluster_counts


def test_yaml_roundtrip(tmp_path: Path) -> None:
    cfg = RunConfig()
    cfg.losses.terms["instance"].weight = 0.0
    cfg.losses.clustering = "sinkhorn"
    cfg.data.domains = ["a", "b"]
    cfg.save(tmp_path / "c.yaml")
    assert RunConfig.load(tmp_path / "c.yaml") == cfg


def test_partial_yaml_keeps_defaults_and_rejects_unknowns(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\nlosses:\n  terms:\n    mim: {weight: 0}\n")
    cfg = RunConfig.load(p)
    assert cfg.train.epochs == 3 and cfg.train.batch_size == RunConfig().train.batch_size
    assert cfg.losses.terms == {"mim": cfg.losses.terms["mim"]} and cfg.losses.terms["mim"].weight == 0
    for text, message in [
        ("train:\n  epoch: 3\n", "unknown key.*epoch"),
        ("losses:\n  clustering: spectral\n", "spectral"),
        ("losses:\n  terms:\n    ntxent: {weight: 1}\n", "unknown term"),
        ("data:\n  image_size: 100\n", "multiple of 32"),
    ]:
        p.write_text(text)
        with pytest.raises(ValueError, match=message):
            RunConfig.load(p)


def test_cluster_counts_rule() -> None:
    assert cluster_counts(LossConfig(), [1499, 3531]) == [19, 38]
    assert cluster_counts(LossConfig(), [20]) == [4, 8]
    assert cluster_counts(LossConfig(num_clusters=[7, 14, 500]), [100]) == [7, 14, 100]


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data:\n  image_size: 96000\n", r"image_size must be a multiple of 32 in \[32, 1024\]"),
        ("data:\n  image_size: 0\n", "image_size"),
        ("train:\n  batch_size: 100000000\n", "batch_size must be ≤"),
        ("train:\n  cached_views: 1000\n", "cached_views must be ≤"),
        ("train:\n  epochs: 10000000\n", "epochs must be ≤"),
        ("model:\n  dim: 0\n", "model.dim"),
        ("data:\n  num_workers: -1\n", "num_workers"),
        ("train:\n  lr: 0\n", "train.lr"),
        ("train:\n  backbone_lr_scale: -1\n", "backbone_lr_scale"),
    ],
)
def test_sizes_are_bounded(tmp_path: Path, yaml_text: str, message: str) -> None:
    """A size typo in a config fails at load with the key's name, before any memory is spent on it."""
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        RunConfig.load(p)


def test_retired_keys_of_older_runs_still_load(tmp_path: Path) -> None:
    """``train.tensorboard`` and ``losses.mim_momentum`` were never read: an old config.yaml or checkpoint that
    holds them loads (and resumes) as the same config; a misspelt key is still an error."""
    from cdretrieval.train import comparable_config

    old = RunConfig().to_dict()
    old["train"]["tensorboard"] = False
    old["losses"]["mim_momentum"] = 0.9
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert RunConfig.load(tmp_path / "config.yaml") == RunConfig() == RunConfig.from_dict(old)
    assert comparable_config(old) == comparable_config(RunConfig().to_dict())
    assert "tensorboard" in old["train"]  # the caller's mapping is left alone
    with pytest.raises(ValueError, match="unknown key.*tensorbord"):
        RunConfig.from_dict({"train": {"tensorbord": True}})


def test_backbone_lr_scale_is_the_modes_unless_set() -> None:
    """None picks the mode's measured multiplier (finetune 0.1, partial 1.0); a set value wins in every mode."""
    t = TrainConfig()
    assert t.backbone_lr_scale is None
    assert backbone_lr_scale(t, "finetune") == 0.1 and backbone_lr_scale(t, "partial") == 1.0
    t.backbone_lr_scale = 0.3
    assert backbone_lr_scale(t, "finetune") == 0.3 and backbone_lr_scale(t, "partial") == 0.3
