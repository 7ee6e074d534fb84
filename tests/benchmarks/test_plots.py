"""The benchmark pictures: they are written, are real images, and bad inputs are refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.plots import embedding_map, loss_curves, read_log, retrieval_grid


def assert_picture(path: Path, min_side: int = 200) -> None:
    """A PNG that decodes, is reasonably large and is not one flat colour."""
    assert path.is_file() and path.stat().st_size > 5_000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) >= min_side, img.size
        arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert arr.std() > 5.0


def _thumbs(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((24, 24, 3), 30 * i % 255, np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_retrieval_grid(tmp_path: Path) -> None:
    paths = _thumbs(tmp_path, 6)
    out = retrieval_grid(
        paths[:2], ["a", "b"], [paths[2:5], [paths[5], str(tmp_path / "gone.png"), paths[2]]],
        [["a", "b", "a"], ["b", "b", "a"]], tmp_path / "grid.png", scores=[[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]],
        title="a → b",
    )
    assert_picture(out)
    with pytest.raises(ValueError, match="same k"):
        retrieval_grid(paths[:2], ["a", "b"], [paths[2:5], paths[2:4]], [["a"] * 3, ["a"] * 2], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 rows"):
        retrieval_grid(paths[:2], ["a"], [paths[2:5]] * 2, [["a"] * 3] * 2, tmp_path / "x.png")


def test_embedding_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = {d: [str(i % 3) for i in range(20)] for d in ("A", "B")}
    before = {d: rng.normal(size=(20, 64)) for d in labels}
    after = {d: rng.normal(size=(20, 8)) + np.eye(8)[[int(c) for c in labels[d]]] * 5 for d in labels}
    assert_picture(embedding_map(before, after, labels, tmp_path / "tsne.png", max_points=30), min_side=400)
    with pytest.raises(ValueError, match="same number of rows"):
        embedding_map(before, {"A": after["A"], "B": after["B"][:3]}, labels, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same domains"):
        embedding_map(before, {"A": after["A"]}, labels, tmp_path / "x.png")


def _log(path: Path) -> Path:
    lines = []
    for epoch in range(3):
        for s in range(4):
            step = epoch * 4 + s + 1
            rec = {"epoch": epoch, "step": step, "instance": 3.0 - 0.1 * step, "total": 3.0 - 0.1 * step,
                   "lr": 1e-3}
            if epoch > 0:
                rec.update(proto=2.0 - 0.05 * step, total=5.0 - 0.15 * step)
            lines.append(json.dumps(rec))
        lines.append(json.dumps({"epoch": epoch, "step": epoch * 4 + 4, "epoch_mean": {"instance": 2.0, "total": 2.5}}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loss_curves(tmp_path: Path) -> None:
    log = _log(tmp_path / "log.jsonl")
    steps, epochs = read_log(log)
    assert len(steps) == 12 and len(epochs) == 3
    out = loss_curves(log)
    assert out == tmp_path / "loss_curves.png"
    assert_picture(out)
    only_means = tmp_path / "means.jsonl"
    only_means.write_text(json.dumps({"epoch": 0, "step": 3, "epoch_mean": {"instance": 1.0}}) + "\n")
    assert_picture(loss_curves(only_means, tmp_path / "means.png"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 0, "step": 1, "instance": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not JSON"):
        loss_curves(bad)
    with pytest.raises(ValueError, match="not found"):
        loss_curves(tmp_path / "missing.jsonl")
