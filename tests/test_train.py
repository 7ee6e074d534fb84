"""The trainer on the embedded demo data: loss goes down, exact resume, DDP == one process, terms/ablations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _train_setup import small_config

from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import eval_transform
from cdretrieval.errors import CheckpointError, DataError
from cdretrieval.models.encoder import build_encoder
from cdretrieval.run import load_checkpoint, load_encoder
from cdretrieval.train import Prototypes, Trainer, pretrain, resolve_mode


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


def test_loss_goes_down_on_demo_data(demo_root: Path, tmp_path: Path, feature_cache: Path) -> None:
    cfg = small_config(demo_root, epochs=6, steps_per_epoch=8)
    tr = Trainer(cfg, tmp_path / "run", progress=False, feature_cache=feature_cache)
    tr.fill_banks()
    firsts, lasts = [], []
    for epoch in range(cfg.train.epochs):
        means = tr.run_epoch(epoch)
        (firsts if epoch == 1 else lasts).append(means)
        tr.epoch += 1
    first, last = firsts[0], lasts[-1]
    # every term that has started decreases between the first epoch with all terms and the last one
    for term in ("instance", "proto", "cross_proto", "total"):
        assert last[term] < first[term], (term, first[term], last[term])


@pytest.mark.parametrize("mode", ["frozen", "partial"])
def test_resume_gives_the_same_next_step(demo_root: Path, tmp_path: Path, feature_cache: Path, mode: str) -> None:
    cfg = small_config(demo_root, epochs=3, steps_per_epoch=4, mode=mode)
    full = pretrain(cfg, tmp_path / "full", progress=False, feature_cache=feature_cache)
    part = Trainer(cfg, tmp_path / "part", progress=False, feature_cache=feature_cache)
    part.fit(stop_after_epochs=2)  # "interrupted" after 2 epochs; checkpoint on disk
    resumed = Trainer(cfg, tmp_path / "part", progress=False, feature_cache=feature_cache)
    result = resumed.fit(resume=True)
    assert result.epochs_done == 3 and result.steps == full.steps
    assert result.last_losses == pytest.approx(full.last_losses, rel=1e-5, abs=1e-6)
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(tmp_path / "part")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    enc, cfg2 = load_encoder(tmp_path / "full")
    assert cfg2 == cfg and enc.dim == 32
    with pytest.raises(CheckpointError, match="already holds a run"):
        pretrain(cfg, tmp_path / "full", progress=False, feature_cache=feature_cache)
    other = small_config(demo_root, epochs=3, steps_per_epoch=4, lr=0.5, mode=mode)
    with pytest.raises(CheckpointError, match="another config"):
        pretrain(other, tmp_path / "full", resume=True, progress=False, feature_cache=feature_cache)


def test_partial_mode_trains_exactly_the_top_units(demo_root: Path, tmp_path: Path, feature_cache: Path) -> None:
    cfg = small_config(demo_root, epochs=2, mode="partial", trainable_units=2)
    tr = Trainer(cfg, tmp_path / "run", progress=False, feature_cache=feature_cache)
    assert tr.split is not None and tr.split.map_shape == (192, 2, 2)  # Lite0 at 64 px, below its last block
    d = tr.domains[0]
    assert tr.cache[d].shape[0] == 1 + cfg.train.cached_views and tr.cache[d].shape[2] == tr.split.map_dim
    before = {n: t.clone() for n, t in tr.encoder.state_dict().items()}
    tr.fill_banks()
    idx = {d: torch.arange(cfg.train.batch_size) for d in tr.domains}
    views = {d: torch.ones(cfg.train.batch_size, dtype=torch.long) for d in tr.domains}
    tr.train_step(idx, Prototypes(), {"instance": 1.0, "cross_instance": 0.5}, views)
    trainable = {id(p) for p in tr.split.upper.parameters()} | {id(p) for p in tr.encoder.head.parameters()}
    net: Any = tr.encoder.backbone.body.net
    assert trainable - {id(p) for p in tr.encoder.head.parameters()} == {
        id(p) for m in (net._blocks[15], net._conv_head, net._bn1) for p in m.parameters()
    }
    for name, p in tr.encoder.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), name
        assert p.requires_grad == (id(p) in trainable), name
    for name, p in tr.encoder.named_parameters():  # the step moved exactly the trainable weights
        assert torch.equal(p, before[name]) != (id(p) in trainable), name
    for name, t in tr.encoder.state_dict().items():  # BatchNorm statistics stay (eval mode)
        if "running_" in name or "num_batches" in name:
            assert torch.equal(t, before[name]), name


def test_auto_mode_and_optimiser_groups(demo_root: Path, tmp_path: Path, feature_cache: Path) -> None:
    """On CPU "auto" trains partially; the top units then learn at lr × 1.0 beside the head (lr), and an
    explicit ``backbone_lr_scale`` replaces that multiplier."""
    cfg = small_config(demo_root, epochs=1, mode="auto")
    assert resolve_mode(cfg, torch.device("cpu")) == "partial"
    assert resolve_mode(cfg, torch.device("cuda")) == "finetune"
    tr = Trainer(cfg, tmp_path / "run", progress=False, feature_cache=feature_cache)
    assert tr.mode == "partial" and tr.split is not None and tr.split.trainable_units == 2
    assert [g["initial_lr"] for g in tr.optimizer.param_groups] == [cfg.train.lr, cfg.train.lr]  # before warm-up
    cfg.train.backbone_lr_scale = 0.25
    tr = Trainer(cfg, tmp_path / "run2", progress=False, feature_cache=feature_cache)
    assert [g["initial_lr"] for g in tr.optimizer.param_groups] == [cfg.train.lr, 0.25 * cfg.train.lr]


def test_partial_mode_cache_reproduces_the_network(demo_root: Path, tmp_path: Path, feature_cache: Path) -> None:
    """The cached clean maps through the trained top give what the whole (uncached) network gives."""
    cfg = small_config(demo_root, epochs=1, steps_per_epoch=2, mode="partial")
    r = pretrain(cfg, tmp_path / "run", progress=False, feature_cache=feature_cache)
    assert r.mode == "partial"
    tr = Trainer(cfg, tmp_path / "again", progress=False, feature_cache=feature_cache)  # cache read back
    enc, _ = load_encoder(tmp_path / "run")
    tr.encoder.load_state_dict(enc.state_dict())
    d = tr.domains[0]
    cached = tr.embed_cached(tr.cache[d][0][:20])
    t = eval_transform(cfg.data.image_size)
    x = torch.stack([t(load_image(s.path)) for s in tr.samples[d][:20]])
    with torch.no_grad():
        direct = enc.eval()(x)
    assert (cached * direct).sum(1).min() > 0.999  # fp16 maps and ONNX Runtime vs PyTorch: cosine ≈ 1
    assert not torch.allclose(enc.backbone.state_dict()["body.net._conv_head.weight"],
                              build_encoder().backbone.state_dict()["body.net._conv_head.weight"])


@pytest.mark.parametrize("clustering", ["kmeans", "sinkhorn"])
def test_ablation_configs_run(demo_root: Path, tmp_path: Path, feature_cache: Path, clustering: str) -> None:
    cfg = small_config(demo_root, epochs=2, steps_per_epoch=2)
    cfg.losses.clustering = clustering  # type: ignore[assignment]
    cfg.losses.cross_topk = 50
    cfg.losses.terms["instance"].weight = 0.0
    r = pretrain(cfg, tmp_path / "run", progress=False, feature_cache=feature_cache)
    assert "instance" not in r.last_losses and {"proto", "cross_proto", "mim"} <= set(r.last_losses)
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "train_summary.json").is_file()


def test_bad_data(tmp_path: Path, demo_root: Path) -> None:
    cfg = small_config(tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        Trainer(cfg, tmp_path / "run", progress=False)
    cfg = small_config(demo_root)
    cfg.data.domains = ["ink"]
    with pytest.raises(DataError, match="at least 2 domains"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_corrupt_images_are_skipped_and_counted(demo_root: Path, tmp_path: Path, feature_cache: Path) -> None:
    import shutil

    root = tmp_path / "data"
    for d in ("ink", "photo"):
        shutil.copytree(demo_root / d / "3", root / d / "3")
        shutil.copytree(demo_root / d / "7", root / d / "7")
    (root / "ink" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = small_config(root, epochs=1, steps_per_epoch=1)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken.png"):
        tr = Trainer(cfg, tmp_path / "run", progress=False, feature_cache=feature_cache)
    assert all("broken" not in s.path for s in tr.samples["ink"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "partial"])
def test_ddp_two_processes_match_one(demo_root: Path, tmp_path: Path, feature_cache: Path, mode: str) -> None:
    """torchrun with 2 gloo processes (each half of every batch) == 1 process on the whole batch."""
    cfg = small_config(demo_root, epochs=2, steps_per_epoch=3, mode=mode)
    cfg.train.optimizer = "sgd"
    cfg.train.lr = 0.05
    cfg_path = tmp_path / "cfg.yaml"
    cfg.save(cfg_path)
    worker = Path(__file__).with_name("_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for nproc, out in ((1, "one"), (2, "two")):
        args = [str(worker), str(cfg_path), str(tmp_path / out), str(feature_cache)]
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_free_port()}"]
        cmd = [sys.executable, *(launcher if nproc > 1 else []), *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5)
    for k in a["banks"]:
        if isinstance(a["banks"][k], torch.Tensor) and a["banks"][k].is_floating_point():
            torch.testing.assert_close(a["banks"][k], b["banks"][k], rtol=1e-4, atol=1e-5)
    assert a["last_losses"] == pytest.approx(b["last_losses"], rel=1e-4, abs=1e-5)
