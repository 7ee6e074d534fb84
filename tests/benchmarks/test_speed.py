"""Smoke test of the speed suite (``python -m benchmarks.speed``) at tiny sizes: it runs and writes what it says.

Correctness only: the keys of ``speed.json``, recalls in [0, 1], positive ratios and times. No timing asserts (the
CI machines are shared and slow). The train section runs three whole pretrains of 4 images per domain, 1 epoch,
32 px.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.common import write_outputs
from benchmarks.index_speed import clustered_vectors, recall_at_k
from benchmarks.speed import SECTIONS, SuiteOptions, capped_view, default_train_modes, run_suite, summary_rows
from cdretrieval.data.folders import scan_domains

TINY_TRAINING = {"data.image_size": 32, "data.num_workers": 0, "train.epochs": 1, "train.batch_size": 4,
                 "train.cached_views": 1}


def _positive(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def speed_json(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("speed")
    opts = SuiteOptions(
        data_root=demo_root, device=torch.device("cpu"), workdir=tmp / "work", image_size=32, warmup=0,
        train_images=4, finetune_cpu_images=3, train_overrides=TINY_TRAINING, embed_images=8, embed_batch=4,
        embed_repeats=1, worker_counts=(0,), latency_gallery=500, latency_queries=2, index_sizes=(1000,),
        index_queries=10, index_repeats=1, threads=(1,), faiss_threads=1,
    )
    payload, markdown = run_suite(opts)
    path = write_outputs("speed", payload, markdown, tmp / "out")
    assert (tmp / "out" / "speed.md").read_text().count("### ") == len(SECTIONS)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_top_level_keys(speed_json: dict[str, Any]) -> None:
    assert {"benchmark", "machine", "options", "summary", *SECTIONS} <= set(speed_json)
    assert speed_json["benchmark"] == "speed"
    assert len(speed_json["summary"]) == 2  # the embedding ratio, the latency p50 (capped pretrains: no goal)


def test_pretrain_runs(speed_json: dict[str, Any]) -> None:
    """One whole pretrain per CPU mode, the default (``auto``: partial) first; finetune last, on its own cap."""
    runs = speed_json["train"]
    assert [r["mode"] for r in runs] == list(default_train_modes(torch.device("cpu")))
    assert runs[0]["mode"] == speed_json["default_mode"] and runs[-1]["mode"] == "finetune"
    for r, per_domain in zip(runs, (4, 4, 3), strict=True):
        assert r["threads"] == 1 and r["epochs"] == 1 and r["image_size"] == 32
        assert r["images_per_domain_cap"] == per_domain and set(r["domains"].values()) == {per_domain}
        assert r["images"] == 3 * per_domain  # the demo's three domains
        for key in ("setup_s", "train_s", "epoch_s", "train_images_per_s", "wall_s"):
            assert _positive(r[key]), (r["mode"], key, r[key])
        assert r["wall_s"] >= r["setup_s"] + r["train_s"] * 0.99
    assert {r["cache_runtime"] for r in runs[:2]} <= {"onnxruntime", "torch"}
    assert runs[2]["cache_runtime"] is None  # finetune caches nothing


def test_capped_view_keeps_every_class(demo_root: Path, tmp_path: Path) -> None:
    root, split = capped_view(demo_root, 10, tmp_path / "view")
    assert split == "cap10"
    full, capped = scan_domains(demo_root), scan_domains(root, split=split)
    assert list(capped) == list(full)
    for domain, samples in capped.items():  # every k-th of the domain's sorted files, so spread over the classes
        k = len(full[domain]) // 10
        assert [Path(s.path).relative_to(root) for s in samples] == \
            [Path(s.path).relative_to(demo_root) for s in full[domain][::k][:10]]
        assert len({s.label for s in samples}) > 1
    assert capped_view(demo_root, 0, tmp_path / "all") == (demo_root, None)


def test_pretrain_goal_only_for_whole_data_sets() -> None:
    run = {"mode": "partial", "threads": 2, "images": 9977, "wall_s": 300.0, "images_per_domain_cap": None}
    (row,) = summary_rows({"default_mode": "partial", "train": [run, {**run, "mode": "frozen"},
                                                                 {**run, "images_per_domain_cap": 300}]})
    assert row[1] == 300.0 and row[-1] == "yes"


def test_embedding_ratios(speed_json: dict[str, Any]) -> None:
    (e,) = speed_json["embed"]
    assert e["threads"] == 1
    assert {"bare", "decode+preprocess only", "extract w=0", "iter_extract w=0"} <= set(e["variants"])
    assert e["variants"]["bare"]["ratio_to_bare"] == pytest.approx(1.0)
    assert all(_positive(v["images_per_s"]) and _positive(v["ratio_to_bare"]) for v in e["variants"].values())
    assert _positive(e["ratio"])


def test_latency(speed_json: dict[str, Any]) -> None:
    lat = speed_json["latency"]
    assert lat["gallery"] == 500 and lat["index_type"] == "flat"
    split = lat["split_by_threads"]["1"]
    assert {"end_to_end", "decode+preprocess", "model", "search"} <= set(split)
    assert all(_positive(v["p50_ms"]) and v["p95_ms"] >= v["p50_ms"] for v in split.values())
    assert lat["p50_ms"] == split["end_to_end"]["p50_ms"]


def test_index_rows(speed_json: dict[str, Any]) -> None:
    (res,) = speed_json["index"]
    assert res["n"] == 1000 and res["auto_picks"] == "flat" and res["faiss_threads"] == 1
    assert [r["index_type"] for r in res["rows"]] == ["flat", "ivf", "hnsw", "ivfpq"]
    for r in res["rows"]:
        assert 0.0 <= r["recall"] <= 1.0
        assert _positive(r["qps"]) and _positive(r["serialized_mb"]) and r["build_s"] >= 0
    assert res["rows"][0]["recall"] == 1.0  # flat is the ground truth


def test_recall_at_k_by_hand() -> None:
    truth = torch.tensor([[1, 2, 3], [4, 5, 6]]).numpy()
    found = torch.tensor([[3, 2, 9], [-1, -1, -1]]).numpy()
    assert recall_at_k(found, truth) == pytest.approx((2 / 3 + 0) / 2)


def test_clustered_vectors_are_unit_rows() -> None:
    x = clustered_vectors(500, 16, seed=3, n_centres=10)
    assert x.shape == (500, 16) and x.dtype.name == "float32"
    assert abs(float((x * x).sum(axis=1).mean()) - 1.0) < 1e-5
