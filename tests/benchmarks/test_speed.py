"""Smoke test of the speed suite (``python -m benchmarks.speed``) at tiny sizes: it runs and writes what it says.

Correctness only: the keys of ``speed.json``, recalls in [0, 1], positive ratios and times. No timing asserts (the
CI machines are shared and slow).
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
from benchmarks.speed import SECTIONS, SuiteOptions, run_suite


def _positive(x: Any) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def speed_json(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("speed")
    opts = SuiteOptions(
        data_root=demo_root, device=torch.device("cpu"), workdir=tmp / "work", image_size=32, warmup=0,
        frozen_batch=8, finetune_batch=2, train_repeats=1, embed_images=8, embed_batch=4, embed_repeats=1,
        worker_counts=(0,), latency_gallery=500, latency_queries=2, index_sizes=(1000,), index_queries=10,
        index_repeats=1, threads=(1,), faiss_threads=1,
    )
    payload, markdown = run_suite(opts)
    path = write_outputs("speed", payload, markdown, tmp / "out")
    assert (tmp / "out" / "speed.md").read_text().count("### ") == len(SECTIONS)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_top_level_keys(speed_json: dict[str, Any]) -> None:
    assert {"benchmark", "machine", "options", "summary", *SECTIONS} <= set(speed_json)
    assert speed_json["benchmark"] == "speed"
    assert len(speed_json["summary"]) == 4  # two training ratios, the embedding ratio, the latency p50


def test_training_ratios(speed_json: dict[str, Any]) -> None:
    assert [r["mode"] for r in speed_json["train"]] == ["frozen", "finetune"]
    for r in speed_json["train"]:
        assert r["threads"] == 1
        assert set(r["terms"]) == {"instance", "cross_instance", "proto", "cross_proto", "mim"}
        for key in ("ratio", "ratio_without_clustering", "full_images_per_s", "bare_images_per_s", "step_s",
                    "bare_step_s", "clustering_s"):
            assert _positive(r[key]), (r["mode"], key, r[key])
        assert {f"loss:{t}" for t in r["terms"]} | {"bank_update", "other"} <= set(r["split_s"])


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
