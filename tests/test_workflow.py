"""The one-command demo workflow: data → pretrain → index, reused on a second run."""

from __future__ import annotations

from pathlib import Path

import pytest
from _train_setup import shrunk

from cdretrieval.config import RunConfig
from cdretrieval.retrieval import Retriever
from cdretrieval.workflow import demo_config, prepare_demo


def _small(root: Path) -> RunConfig:
    return shrunk(demo_config(str(root), None, is_demo_data=True), hidden_dim=64, epochs=2, steps_per_epoch=2,
                  cached_views=1)


def test_demo_trains_indexes_then_reuses(demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _small(demo_root)
    run = tmp_path / "runs" / "demo"
    first = prepare_demo(run, demo_root, config=cfg, progress=False)
    assert (run / "checkpoint.pt").is_file() and (run / "index").is_dir()
    r = Retriever.from_run(run)
    assert sorted(r.domains) == ["ink", "outline", "photo"]
    hits = r.search(next((demo_root / "ink" / "3").iterdir()), target_domain="photo", k=5)
    assert len(hits) == 5 and all(h.domain == "photo" for h in hits)

    capsys.readouterr()
    second = prepare_demo(run, demo_root, config=cfg, progress=False)
    out = capsys.readouterr().out
    assert "reusing the trained run" in out and "reusing the indexes" in out
    assert second.trained_seconds < first.trained_seconds

    changed = _small(demo_root)
    changed.train.lr = 0.01
    prepare_demo(run, demo_root, config=changed, progress=False)
    assert "moved it to" in capsys.readouterr().out
    assert len(list(run.parent.glob("demo.old-*"))) == 1  # the old run is kept, not deleted
    assert (run / "checkpoint.pt").is_file()


def test_demo_config_defaults() -> None:
    cfg = demo_config("/data", ["a", "b"], is_demo_data=True)
    assert cfg.data.hflip == 0.0 and cfg.data.domains == ["a", "b"] and cfg.data.image_size == 128
    assert cfg.data.min_scale == 0.6 and cfg.train.epochs == 20 and not cfg.losses.num_clusters  # label-free K
    other = demo_config("/data", None, is_demo_data=False)
    assert other.to_dict() == {**RunConfig().to_dict(), "data": {**RunConfig().to_dict()["data"], "root": "/data"}}
